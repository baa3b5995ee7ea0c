"""``python -m gcollective demo``: collective.js's cluster example, in Python.

A supervisor forks N worker processes; worker ``i`` runs a member on ``base_port + i`` with every
worker as a peer. Each worker sets 'over.nine.thousand' to 0, increments it by 9000, prints
what it sees (9000 x N), deletes it and prints None. A worker that dies is forked again under
the same id (and so the same port) and shows that it caught up. Ctrl-C stops everything.

Unlike collective.js, the workers wait for each other between steps (a barrier through the
shared tree itself): with the contract's total order, an increment stamped before another
worker's SET 0 would be reset by it, so "everyone has set 0" must be seen before incrementing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from gevent.event import Event

KEY = "over.nine.thousand"


def _say(text: str) -> None:
    """Print one line with a single write, so lines of concurrent workers never interleave."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (text + "\n").encode())


def run_supervisor(workers: int, base_port: int, host: str, once: bool) -> int:
    """Fork the workers, restart any that die, stop them all on Ctrl-C; returns an exit code."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # (SIGINT too, not left to Python's default: a supervisor started by a script in the
    # background inherits SIGINT ignored, and Python then leaves it so.)
    signal.signal(signal.SIGINT, on_signal)
    _say(
        f"[supervisor] starting {workers} workers on {host}:{base_port}-{base_port + workers - 1}"
        + ("" if once else " (Ctrl-C to stop)")
    )
    supervisor = _Supervisor(workers, base_port, host, once)
    for worker_id in range(workers):
        supervisor.spawn(worker_id, restarted=False)
    try:
        supervisor.watch()
    except KeyboardInterrupt:
        supervisor.stop()
    return 0


class _Supervisor:
    """The forked workers, by pid: started, restarted when they die, stopped."""

    def __init__(self, workers: int, base_port: int, host: str, once: bool) -> None:
        self.workers, self.base_port, self.host, self.once = workers, base_port, host, once
        self.pids: dict[int, int] = {}  # pid -> worker id

    def spawn(self, worker_id: int, restarted: bool) -> None:
        """Fork worker ``worker_id``; the child never returns into the supervisor's code."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_worker(
                    worker_id, self.workers, self.base_port, self.host, restarted, self.once
                )
            except BaseException as exc:  # report, then leave with a code
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    _say(f"[worker {worker_id}] failed: {exc!r}")
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.pids[pid] = worker_id
        _say(f"[supervisor] worker {worker_id} is pid {pid}")

    def watch(self) -> None:
        """Reap workers until none is left (with ``once``, each that ended well is done);
        fork a dead one again under its id."""
        while self.pids:
            pid, status = os.wait()
            if pid not in self.pids:
                continue
            worker_id = self.pids.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.once and code == 0:
                continue
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            _say(f"[supervisor] worker {worker_id} died ({how}); restarting it")
            time.sleep(0.2)  # let its port be released before the new one binds it
            self.spawn(worker_id, restarted=True)

    def stop(self) -> None:
        """SIGTERM every worker, wait up to 10 s for them, SIGKILL the rest."""
        # Further interrupts change nothing now (a terminal's Ctrl-C reaches the whole group,
        # ``timeout`` signals twice): one arriving just after a wait reaped a worker would
        # lose that reap.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say("[supervisor] stopping")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                time.sleep(0.05)
                continue
            self.pids.pop(pid, None)
        # (a pid left may be reaped already, its reap lost to an interrupt before stopping)
        self._signal_all(signal.SIGKILL)
        _say("[supervisor] stopped")

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    import gevent

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        gevent.sleep(0.01)


def _leave_when_orphaned(supervisor: int, done: Event) -> None:
    """Set ``done`` once the supervisor is gone: one killed outright (SIGKILL) cannot stop
    its workers, which would otherwise hold their ports for good."""
    import gevent

    while os.getppid() == supervisor:
        gevent.sleep(0.2)
    done.set()


def run_worker(
    worker_id: int, workers: int, base_port: int, host: str, restarted: bool, once: bool
) -> int:
    """One worker: a member on base_port + worker_id running the example."""
    import gevent
    from gevent.event import Event

    import gcollective

    # The worker was forked from the supervisor: give it default signal behaviour back.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    done = Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    gevent.signal_handler(signal.SIGINT, done.set)
    gevent.spawn(_leave_when_orphaned, os.getppid(), done)

    def say(text: str) -> None:
        _say(f"[worker {worker_id}] {text}")

    peers = [(host, base_port + i) for i in range(workers)]
    node = gcollective.start((host, base_port + worker_id), peers)
    me = str(worker_id)
    if restarted:
        # Wait for a peer's state (start() may have given up early if the others were busy).
        _wait_for(lambda: node.synced, "a peer's state", timeout=30)
        ready = gcollective.get("demo.ready", {})
        say(
            f"restarted and caught up: sees {len(ready)} workers' ready flags, "
            f"{KEY} = {gcollective.get(KEY)}"
        )
    else:
        gcollective.set(KEY, 0)
        gcollective.set(("demo", "ready", me), True)
        _wait_for(lambda: len(gcollective.get("demo.ready", {})) >= workers, "every SET 0")
        gcollective.incr(KEY, 9000)
        _wait_for(lambda: gcollective.get(KEY) == 9000 * workers, "every increment")
        say(f"{KEY} = {gcollective.get(KEY)}")
        gcollective.set(("demo", "seen", me), True)
        _wait_for(lambda: len(gcollective.get("demo.seen", {})) >= workers, "every print")
        gcollective.delete(KEY)
        _wait_for(lambda: gcollective.get(KEY, "missing") == "missing", "the delete")
        say(f"{KEY} = {gcollective.get(KEY)}")
        gcollective.set(("demo", "done", me), True)
        if once:
            _wait_for(lambda: len(gcollective.get("demo.done", {})) >= workers, "every worker")
            gcollective.stop()
            return 0
    done.wait()
    gcollective.stop()
    return 0
