"""Test helpers: free ports, waiting on conditions, and member processes to drive."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Ports come from blocks below the kernel's ephemeral range (so no socket the OS numbers itself,
# in any process, can take one) and each block is held by one process at a time through a lock
# file (so parallel test runs, of this checkout or another, never hand out the same port). A
# port is handed out once per process and checked free by binding it. Binding port 0 and
# handing the number on would be a race: the OS may give it to someone else before use.
_PORT_LOW, _PORT_HIGH = 20000, 32768  # ip_local_port_range starts at 32768 by default
_BLOCK = 64
_LOCK_DIR = os.path.join(tempfile.gettempdir(), "gcollective-test-ports")
_held_blocks: list[Any] = []  # open lock files: the blocks this process owns until it exits
_next_ports: list[int] = []  # the rest of the newest block, not yet handed out


def _below_ephemeral() -> int:
    """The first port the kernel may pick by itself (32768 unless configured otherwise)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return min(int(ranges.read().split()[0]), _PORT_HIGH)
    except (OSError, ValueError, IndexError):
        return _PORT_HIGH


def _claim_block() -> None:
    """Take the lock of a free block of ports (starting at a random one) for this process."""
    import fcntl
    import random

    os.makedirs(_LOCK_DIR, exist_ok=True)
    starts = list(range(_PORT_LOW, _below_ephemeral() - _BLOCK + 1, _BLOCK))
    first = random.randrange(len(starts))
    for base in starts[first:] + starts[:first]:
        lock = open(os.path.join(_LOCK_DIR, f"{base}.lock"), "w")  # noqa: SIM115 (held)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _held_blocks.append(lock)
        _next_ports[:] = range(base, base + _BLOCK)
        return
    raise RuntimeError("every block of test ports is held by another process")


def _bindable(port: int) -> bool:
    """True when nothing listens on (or is bound to) 127.0.0.1:``port`` right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is this process's alone: never handed out twice, in this
    process or any other test run (see ``_claim_block``)."""
    while True:
        if not _next_ports:
            _claim_block()
        port = _next_ports.pop(0)
        if _bindable(port):
            return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports."""
    return [free_port() for _ in range(count)]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "",
    sleep: Callable[[float], Any] = time.sleep,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        sleep(interval)


def started_members(
    make: Callable[..., Any], stop: Callable[[Any], Any] = lambda member: member.stop()
) -> Iterator[Callable[..., Any]]:
    """The body of a fixture handing out started members: yields ``start(*args,
    start_timeout=3.0, **options)``, which makes one with ``make(*args, **options)`` and starts
    it; after the test every one made is stopped with ``stop``."""
    made: list[Any] = []

    def start(*args: Any, start_timeout: float = 3.0, **options: Any) -> Any:
        member = make(*args, **options)
        made.append(member)
        member.start(timeout=start_timeout)
        return member

    yield start
    for member in made:
        stop(member)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """``wait_until`` for members running in this process: it sleeps through gevent, so the
    hub (and the members) run while the test waits."""
    import gevent

    return wait_until(predicate, timeout, interval, what, sleep=gevent.sleep)


class HubTicks:
    """How long the hub is held, measured from a greenlet of this process: it sleeps 1 ms at
    a time and records how long each sleep took (``gaps``) and the CPU time this thread
    spent meanwhile (``cpu_gaps``: work that held the hub, not the time a loaded machine
    left the process waiting for a core); ``longest()`` stops it."""

    def __init__(self) -> None:
        import gevent

        self.gaps: list[float] = []
        self.cpu_gaps: list[float] = []
        self._greenlet = gevent.spawn(self._tick)

    def _tick(self) -> None:
        import gevent

        while True:
            before, cpu_before = time.perf_counter(), time.thread_time()
            gevent.sleep(0.001)
            self.gaps.append(time.perf_counter() - before)
            self.cpu_gaps.append(time.thread_time() - cpu_before)

    def longest(self, cpu: bool = False) -> float:
        """Stop ticking and return the longest gap (of CPU time with ``cpu``). The tick a
        hold delayed may not have recorded itself yet (the waiter may have run first): two
        more ticks come first."""
        ticks = len(self.gaps)
        wait_for(lambda: len(self.gaps) > ticks + 1, timeout=10)
        self._greenlet.kill()
        return max(self.cpu_gaps if cpu else self.gaps)


class LocalMembers:
    """Members running in this process under gevent, peers of each other: calling it with
    ``(n, spare=0)`` starts n more (with ``spare`` addresses kept for ``join``, which starts one
    more with the watches passed to it registered first); ``stop()`` stops them all.

    A member that joins on a spare address is one the others list: what they write before it
    is up waits in their queues for it and reaches it as ordinary operations, racing the
    snapshot it asks for. With no spare left, ``join`` takes a fresh address nobody lists:
    the others learn it from its HELLO and dial back with nothing queued, so all it holds
    comes by snapshot.

    (An address nobody answers on holds the metadata frontier back, so only tests that join
    keep spares.)"""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.addresses: list[str] = []
        self.nodes: list[Any] = []

    def __call__(self, count: int, spare: int = 0) -> list[Any]:
        """Start ``count`` more members; all of them so far."""
        self.addresses.extend(f"127.0.0.1:{p}" for p in free_ports(count + spare))
        for _ in range(count):
            self.join()
        return list(self.nodes)

    def join(self, **watches: Callable[..., Any]) -> Any:
        from gcollective import Collective

        if len(self.nodes) == len(self.addresses):
            self.addresses.append(f"127.0.0.1:{free_port()}")  # unlisted: see the docstring
        node = Collective(self.addresses[len(self.nodes)], self.addresses, **self.options)
        for prefix, callback in watches.items():
            node.watch(prefix, callback)
        node.start()
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(timeout=1)


class NodeProcess:
    """A member running in its own process (tests/node_process.py), driven over stdin."""

    def __init__(
        self,
        port: int,
        peer_ports: list[int],
        clock_offset: float | None = None,
        root: str = ROOT,
        log_path: str | None = None,
        **options: Any,
    ) -> None:
        """``clock_offset``: seconds this member's wall clock runs ahead (negative: behind);
        then ``call("clock_offset", seconds=...)`` moves it (see tests/node_process.py).
        ``root``: the directory its ``gcollective`` is imported from (another release's).
        ``log_path``: a file for its log lines, INFO and above (else none are shown)."""
        self.port = port
        self.local = f"127.0.0.1:{port}"
        self.peers = [f"127.0.0.1:{p}" for p in peer_ports]
        self.options = options
        env = dict(os.environ, PYTHONPATH=root, GCOLLECTIVE_TEST_ROOT=root, PYTHONUNBUFFERED="1")
        if clock_offset is not None:
            env["GCOLLECTIVE_TEST_CLOCK_OFFSET"] = repr(clock_offset)
        if log_path is not None:
            env["GCOLLECTIVE_TEST_LOG"] = "INFO"
        with open(log_path or os.devnull, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "node_process.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log if log_path is not None else None,
                env=env,
                text=True,
            )

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command with ``args`` (all of them reach the process: its ``start``
        takes a ``timeout``) and return its reply; raises on an error reply."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"member {self.local} exited (code {self.proc.poll()})")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"member {self.local}: {reply['error']}")
        return reply

    def start(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.call(
            "start", local=self.local, peers=self.peers, options=self.options, timeout=timeout
        )

    def summary(self) -> dict[str, Any]:
        return self.call("summary")

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("stop")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def scheduler_times(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) that process ``pid``'s
    threads have had so far, from /proc/<pid>/task/*/schedstat; (0.0, 0.0) where Linux's
    scheduler statistics are not there. The waiting is what a loaded machine adds to a
    process's wall time beyond its own work and its sleeps."""
    on_cpu = waited = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                ran, queued = stat.read().split()[:2]
        except (OSError, ValueError):
            continue  # (a thread gone meanwhile)
        on_cpu, waited = on_cpu + int(ran), waited + int(queued)
    return on_cpu / 1e9, waited / 1e9


def converged(nodes: list[NodeProcess], leaves: int | None = None) -> bool:
    """True when every member holds the same tree (and ``leaves`` leaves, if given)."""
    summaries = [n.summary() for n in nodes]
    return _agree(summaries, leaves)


def _agree(summaries: list[dict[str, Any]], leaves: int | None) -> bool:
    if leaves is not None and any(s["leaves"] != leaves for s in summaries):
        return False
    return len({s["digest"] for s in summaries}) == 1


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports, this process's alone (for programs that
    take a base port)."""
    if count > _BLOCK:
        raise ValueError(f"at most {_BLOCK} consecutive ports")
    while True:
        if len(_next_ports) < count:
            _claim_block()
        run = _next_ports[:count]
        del _next_ports[:count]
        if all(_bindable(port) for port in run):
            return run[0]


def converge_while_progressing(
    nodes: list[NodeProcess], leaves: int, stalled: float = 60.0, interval: float = 0.5
) -> None:
    """Wait until every member holds the same ``leaves`` leaves; fail once no member's count
    changed for ``stalled`` seconds. A bound on progress, not on the whole catch-up: on a
    loaded machine (other jobs on the cores) the catch-up of a large cluster takes minutes,
    while a member that lost writes stops short of ``leaves`` and fails after ``stalled``."""
    last: list[int] = []
    changed = time.monotonic()
    while True:
        summaries = [n.summary() for n in nodes]
        if _agree(summaries, leaves):
            return
        counts = [s["leaves"] for s in summaries]
        if counts != last:
            last, changed = counts, time.monotonic()
        elif time.monotonic() - changed > stalled:
            raise AssertionError(
                f"no member's leaf count changed for {stalled}s, short of {leaves}: {counts}"
            )
        time.sleep(interval)
