"""The demo command end to end: real forked workers, a crash and restart, Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

from cluster import ROOT, free_port_run, wait_until


class Lines:
    """Reads a process's output lines in the background so the test can wait on them."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no matching line in {timeout}s; saw {self.seen}") from None
            self.seen.append(line)
            if predicate(line):
                return line


def start_demo(*args: str, own_group: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "gcollective", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=own_group,
    )


def assert_stopped_cleanly(proc: subprocess.Popen, lines: Lines) -> None:
    """The supervisor, interrupted, stops its workers and exits 0 without a traceback."""
    proc.wait(30)
    lines.wait_for(lambda s: "[supervisor] stopped" in s, timeout=10)
    assert proc.returncode == 0
    assert not any("Traceback" in line for line in lines.seen), lines.seen


def test_demo_once_prints_9000_times_workers_then_none():
    base = free_port_run(3)
    proc = start_demo("--workers", "3", "--base-port", str(base), "--once")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert out.count("over.nine.thousand = 27000") == 3, out
    assert out.count("over.nine.thousand = None") == 3, out


def test_demo_restarts_a_killed_worker_which_catches_up_and_ctrl_c_is_clean():
    base = free_port_run(3)
    proc = start_demo("--workers", "3", "--base-port", str(base))
    lines = Lines(proc)
    try:
        pids = {}
        for _ in range(3):
            line = lines.wait_for(lambda s: " is pid " in s)
            pids[int(line.split()[2])] = int(line.split()[-1])
        for _ in range(3):
            lines.wait_for(lambda s: s.endswith("over.nine.thousand = None"))
        os.kill(pids[1], signal.SIGKILL)
        lines.wait_for(lambda s: "worker 1 died" in s)
        caught_up = lines.wait_for(lambda s: s.startswith("[worker 1] restarted"))
        assert "sees 3 workers' ready flags" in caught_up
        assert "over.nine.thousand = None" in caught_up
        proc.send_signal(signal.SIGINT)
        assert_stopped_cleanly(proc, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_to_the_whole_process_group_twice_stops_cleanly():
    """A terminal's Ctrl-C signals the whole foreground group (the workers too), and
    ``timeout -s INT`` signals it twice: the supervisor stopped with a ProcessLookupError
    traceback (a worker reaped while the second interrupt was handled, then killed)."""
    base = free_port_run(2)
    proc = start_demo("--workers", "2", "--base-port", str(base), own_group=True)
    lines = Lines(proc)
    try:
        for _ in range(2):
            lines.wait_for(lambda s: s.endswith("over.nine.thousand = None"))
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
        assert_stopped_cleanly(proc, lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_workers_leave_when_their_supervisor_is_killed_outright():
    """SIGKILL leaves the supervisor no chance to stop its workers: each notices it is
    orphaned and leaves (they held their ports, and ran, for good)."""
    base = free_port_run(2)
    proc = start_demo("--workers", "2", "--base-port", str(base))
    lines = Lines(proc)
    try:
        pids = [int(lines.wait_for(lambda s: " is pid " in s).split()[-1]) for _ in range(2)]
        for _ in range(2):
            lines.wait_for(lambda s: s.endswith("over.nine.thousand = None"))
        proc.kill()
        proc.wait()
        wait_until(lambda: not any(_running(pid) for pid in pids), timeout=20, what="workers")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
