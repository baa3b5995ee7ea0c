"""Helper processes for the orchestrator: members, the partition proxy, a redis-server.

The orchestrator (``benchmarks.run``) is a plain, blocking Python process. Every member is a
separate ``python -m benchmarks.member`` process that answers one JSON line on stdout for each
JSON line on stdin; a reader thread per child turns its stdout into a queue so that every call
has a timeout. Children also bound their own lifetime (``--max-seconds``) and exit when stdin
closes, so nothing outlives a run even if the orchestrator is killed.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from benchmarks.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Longest any helper process may live, in seconds (a safety net, not a timing).
DEFAULT_MAX_SECONDS = 1800.0

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 just handed out by the OS, never the same twice per run."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports."""
    return [free_port() for _ in range(count)]


class ChildError(RuntimeError):
    """A helper process replied with an error, timed out or exited."""


class Child:
    """A helper process speaking JSON lines over stdin/stdout (see the module docstring)."""

    def __init__(
        self, module: str, name: str, max_seconds: float = DEFAULT_MAX_SECONDS, *args: str
    ) -> None:
        self.name = name
        log_dir = os.environ.get("BENCH_LOG_DIR")
        if log_dir:  # keep every child's stderr (its log lines) for later reading
            safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
            path = os.path.join(log_dir, f"{safe}.log")
            self._stderr = open(path, "w+b")  # noqa: SIM115 - closed in close()
        else:
            self._stderr = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--max-seconds", str(max_seconds), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=ROOT,
            env=env,
            text=True,
            bufsize=1,
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def send(self, cmd: str, **args: Any) -> None:
        """Send one command without waiting for its reply (collect it with ``receive``)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ChildError(f"{self.name}: cannot send {cmd!r} ({exc}){self._tail()}") from None

    def receive(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next reply; raises ``ChildError`` on an error reply, a timeout or an exit."""
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no reply within {timeout:.0f}s{self._tail()}") from None
        if line is None:
            self._replies.put(None)
            code = self.proc.wait(5)
            raise ChildError(f"{self.name}: exited with code {code}{self._tail()}")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise ChildError(f"{self.name}: {reply.get('error')}{self._tail()}")
        return reply

    def call(self, cmd: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """Send one command and wait for its reply."""
        self.send(cmd, **args)
        return self.receive(timeout)

    def _tail(self, size: int = 2000) -> str:
        try:
            self._stderr.flush()
            self._stderr.seek(0, os.SEEK_END)
            length = self._stderr.tell()
            self._stderr.seek(max(0, length - size))
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"\n--- stderr of {self.name} ---\n{text}" if text else ""

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop, then make sure it is gone (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            try:
                self.send("stop", limit=min(5.0, timeout))
            except ChildError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # The reader ends at the exited child's end of output; closing stdout under it would
        # make it fail with "I/O operation on closed file".
        self._reader.join(timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._stderr.close()


class Member(Child):
    """One gcollective member in its own process (``benchmarks.member``)."""

    def __init__(
        self,
        port: int,
        peers: list[int],
        name: str | None = None,
        options: dict[str, Any] | None = None,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> None:
        super().__init__("benchmarks.member", name or f"member:{port}", max_seconds)
        self.port = port
        self.local = f"127.0.0.1:{port}"
        self.peers = [f"127.0.0.1:{p}" for p in peers]
        self.options = options or {}

    def start(self, limit: float = 30.0) -> dict[str, Any]:
        """Start the node (blocks until it merged a peer's state or every peer failed once)."""
        return self.call(
            "start",
            timeout=limit + 30,
            local=self.local,
            peers=self.peers,
            options=self.options,
            limit=limit,
        )


class Proxy(Child):
    """The partition proxy (``benchmarks.proxy``): forwards ports and can cut and restore."""

    def __init__(self, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        super().__init__("benchmarks.proxy", "proxy", max_seconds)


ChildType = TypeVar("ChildType", bound=Child)


class Group:
    """Closes every child it was given, whatever happens (a context manager)."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def add(self, child: ChildType) -> ChildType:
        self.children.append(child)
        return child

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for child in reversed(self.children):
            child.close()


def start_all(members: list[Member], limit: float = 30.0) -> list[dict[str, Any]]:
    """Start members one after the other (each waits for a peer's state, as apps do)."""
    return [member.start(limit) for member in members]


def broadcast(
    children: list[Any], cmd: str, timeout: float = 300.0, **args: Any
) -> list[dict[str, Any]]:
    """Send one command to every child first, then collect every reply (in order)."""
    for child in children:
        child.send(cmd, **args)
    return [child.receive(timeout) for child in children]


class RedisServer:
    """A throw-away redis-server on a free port (no persistence), or unavailable."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.version: str | None = None

    @property
    def available(self) -> bool:
        return self.binary is not None

    def __enter__(self) -> RedisServer:
        if self.binary is None:
            return self
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10)
        self.version = out.stdout.strip()
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise ChildError("redis-server did not start listening within 10s")

    def __exit__(self, *exc_info: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- what every scenario does with its members ------------------------------------------


def wait_listening(port: int, limit: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + limit
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {limit}s") from None
            time.sleep(0.01)


def core_stats(members: list[Member]) -> dict[str, int] | None:
    """Totals over members of the core's own counters (``Collective.stats()``), if it has them.

    ``received_ops`` above ``applied_ops`` means duplicate deliveries (relays, replays);
    ``overflows`` and ``snapshots_sent`` show queues dropped and full resyncs.
    """
    totals: dict[str, int] = {}
    for member in members:
        stats = member.call("stats")["stats"]
        if not stats:
            return None
        for name in ("local_ops", "received_ops", "applied_ops"):
            totals[name] = totals.get(name, 0) + int(stats.get(name) or 0)
        for peer in stats.get("peers", {}).values():
            for name in ("relayed_frames", "overflows", "snapshots_sent", "connects"):
                totals[name] = totals.get(name, 0) + int(peer.get(name) or 0)
    return totals


def same_data(members: list[Member], timeout: float = 300.0) -> tuple[bool, list[int]]:
    """Whether every member holds identical data (equal digests of their whole trees; equal
    leaf counts would not show a wrong value), and each one's leaf count."""
    replies = broadcast(members, "digest", timeout=timeout)
    return len({r["digest"] for r in replies}) == 1, [r["leaves"] for r in replies]


def add_members(group: Group, ports: list[int], peers: list[int], cfg: Config) -> list[Member]:
    """A member per port (not started), each dialling ``peers``, added to ``group``."""
    return [
        group.add(Member(port, peers, name=f"m{i}:{port}", max_seconds=cfg.member_max_seconds))
        for i, port in enumerate(ports)
    ]


def warm(members: list[Member], tag: str, limit: float = 30.0) -> None:
    """Every member writes one key and waits for everyone's: all links are up both ways."""
    prefixes = [f"{tag}{i}" for i in range(len(members))]
    for i, member in enumerate(members):
        member.send("write_and_wait", prefix=prefixes[i], count=1, writers=prefixes, limit=limit)
    for member in members:
        reply = member.receive(limit + 30)
        if not reply["complete"]:
            raise RuntimeError(f"{member.name}: the cluster did not connect within {limit}s")
