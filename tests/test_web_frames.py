"""A web worker's frames (issue 20): each flush sends its frame to every idle peer at once,
without waking that peer's writer greenlet, and each member reads a plain connection in the
event loop, without switching to the connection's greenlet; what the kernel does not take at
once still goes out whole and in order. Real members, real sockets."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import gevent
import greenlet
import pytest
from cluster import free_port, free_ports, wait_for
from gevent import socket as gsocket
from test_logging import gcollective_records

from gcollective import Collective
from gcollective._wire import OPS

QUIET = 30.0  # sync_interval: no PROGRESS tick wakes a writer while a test watches


class Switches:
    """The greenlets switched to (or thrown into) while it records."""

    def __init__(self) -> None:
        self.targets: list[Any] = []
        self._previous: Any = None

    def __enter__(self) -> Switches:
        self._previous = greenlet.settrace(self._trace)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        greenlet.settrace(self._previous)

    def _trace(self, event: str, args: tuple[Any, Any]) -> None:
        if event in ("switch", "throw"):
            self.targets.append(args[1])


@pytest.fixture
def pair():
    a_port, b_port = free_ports(2)
    a_address, b_address = f"127.0.0.1:{a_port}", f"127.0.0.1:{b_port}"
    a = Collective(a_address, [b_address], sync_interval=QUIET)
    b = Collective(b_address, [a_address], sync_interval=QUIET)
    for node in (a, b):
        gevent.spawn(node.start)
    wait_for(lambda: a.running and b.running and linked(a, b) and linked(b, a), 20)
    yield a, b
    for node in (a, b):
        node.stop(1)


def linked(node: Collective, other: Collective) -> bool:
    """``node``'s writer to ``other`` is connected, and ``other`` reads that connection."""
    link = node._links[other.local]
    return link.state == "connected" and other._links[node.local].reader is not None


def test_a_write_reaches_an_idle_peer_without_waking_either_connection_greenlet(pair):
    a, b = pair
    a.set("warm.up", 1)
    wait_for(lambda: b.get("warm.up") == 1)
    wait_for(lambda: not a._links[b.local].busy)
    writer = a._links[b.local].greenlet
    reader = b._links[a.local].reader
    with Switches() as switches:
        for number in range(5):
            a.set(f"web.k{number}", number)
            a.incr("web.hits")
            wait_for(lambda number=number: b.get(f"web.k{number}") == number)
    assert b.get("web.hits") == 5
    assert writer is not None and reader is not None
    assert not writer.dead and not reader.dead
    # The flush sent each frame, and b's event loop read and applied it.
    assert writer not in switches.targets
    assert reader not in switches.targets
    link = a._links[b.local]
    assert link.sent_ops >= 11 and not link.pending


class PythonCalls:
    """The Python functions called (by code object) while it records, in this thread."""

    def __init__(self) -> None:
        self.codes: set[Any] = set()

    def __enter__(self) -> PythonCalls:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        sys.setprofile(None)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.codes.add(frame.f_code)


def test_a_frame_is_sent_and_read_by_the_kernel_sockets_not_gevent_s_wrappers(pair):
    """The flush's send to an idle peer and the peer's read in the event loop never wait, so
    they call the kernel socket under gevent's: its Python wrapper (a call per frame and peer
    on both sides, at a web app's rate) only adds the wait."""
    a, b = pair
    a.set("warm.up", 1)
    wait_for(lambda: b.get("warm.up") == 1)
    wait_for(lambda: not a._links[b.local].busy)
    sent_before = a._links[b.local].sent_frames
    with PythonCalls() as calls:
        for number in range(5):
            a.set(f"web.k{number}", number)
            a.incr("web.hits")
            deadline = time.monotonic() + 10  # (no wait_for: its sleep would be recorded)
            while b.get(f"web.k{number}") != number:
                assert time.monotonic() < deadline, "the write did not arrive"
                gevent.sleep(0.001)
    assert b.get("web.hits") == 5
    assert a._links[b.local].sent_frames >= sent_before + 5
    wrappers = {gsocket.socket.send.__code__, gsocket.socket.recv.__code__}
    assert not wrappers & calls.codes


def test_frames_the_kernel_does_not_take_at_once_arrive_whole_and_in_order():
    """A peer that reads nothing for a while: the kernel's buffers fill, frames stay queued
    (sent in part, or not at all, from the flush), and once it reads, every operation comes
    in one piece, numbered in order."""
    listener = gsocket.socket()
    listener.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(1)
    peer_address = f"127.0.0.1:{listener.getsockname()[1]}"
    node = Collective(f"127.0.0.1:{free_port()}", [peer_address], sync_interval=QUIET)
    gevent.spawn(node.start, 1)
    conn, _ = listener.accept()
    link = node._links[("127.0.0.1", listener.getsockname()[1])]
    wait_for(lambda: link.state == "connected")
    value = "v" * 2000
    writes = 3000
    queued = []
    try:
        for number in range(writes):
            node.set(f"big.k{number}", value)
            if number % 20 == 19:
                gevent.sleep(0.002)  # a flush per 20 writes, as a busy worker's would
                queued.append(link.pending_bytes)
        assert max(queued) > 0, "the kernel took everything at once: nothing was tested"
        seqs = read_ops(conn, writes)
    finally:
        conn.close()
        listener.close()
        node.stop(1)
    assert seqs == list(range(1, writes + 1))


def read_ops(conn: Any, count: int) -> list[int]:
    """Read newline-delimited frames until ``count`` operations came in OPS frames: their
    numbers, in the order they came (each frame must be whole JSON)."""
    seqs: list[int] = []
    buffered = b""
    conn.settimeout(30)
    while len(seqs) < count:
        data = conn.recv(1 << 16)
        assert data, "closed early"
        buffered += data
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            frame = json.loads(line)
            if frame[0] == OPS:
                first, keys = frame[2], frame[6]
                seqs.extend(range(first, first + len(keys)))
    return seqs


def test_lines_logged_while_a_read_is_applied_name_the_connection_s_peer():
    """A read is applied in the event loop: its log lines still say which peer sent it."""
    holder_port, joiner_port = free_ports(2)
    with gcollective_records(logging.DEBUG) as records:
        holder = Collective(f"127.0.0.1:{holder_port}", [], sync_interval=QUIET)
        joiner = Collective(f"127.0.0.1:{joiner_port}", [f"127.0.0.1:{holder_port}"])
        try:
            holder.start()
            holder.set("data.k", 1)
            joiner.start()
            wait_for(lambda: joiner.get("data.k") == 1)

            def merged() -> list[logging.LogRecord]:
                return [r for r in records.records if r.getMessage() == "merged a peer's state"]

            (line,) = wait_for(merged)
        finally:
            joiner.stop(1)
            holder.stop(1)
    assert line.node_id == f"{joiner.node_id:x}"
    assert line.peer == f"127.0.0.1:{holder_port}"


def test_the_rest_of_a_frame_sent_in_part_never_starts_the_next_connection():
    """A frame the kernel took in part from the flush leaves its rest queued for the writer;
    if that connection ends before the writer sent the rest (here: a bug in the writer, which
    then dials again), the rest is dropped, not sent at the head of the next connection,
    where it would be garbage (catch-up resends what the peer lacks)."""
    listener = gsocket.socket()
    listener.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(2)
    port = listener.getsockname()[1]
    node = Collective(f"127.0.0.1:{free_port()}", [f"127.0.0.1:{port}"], sync_interval=QUIET)
    gevent.spawn(node.start, 1)
    first, _ = listener.accept()
    link = node._links[("127.0.0.1", port)]
    wait_for(lambda: link.state == "connected")
    engine = node._engine
    try:
        for number in range(20_000):
            node.set(f"big.k{number}", "v" * 1500)
            node._flush_outbox()  # (inline: nothing runs between it and the check below)
            if link._rest_pending:
                break
            gevent.sleep(0)
        assert link._rest_pending, "no frame was sent in part: nothing was tested"

        def broken(*args: Any) -> Any:
            del engine.flush  # (once: the class's again)
            raise RuntimeError("a bug in the writer")

        engine.flush = broken  # (the writer's next look at what to send flushes first)
        second, _ = listener.accept()  # the writer dials again
        second.settimeout(10)
        wait_for(lambda: link.state == "connected" and link.connects == 2)
        node.set("after", 1)
        data = b""
        while data.count(b"\n") < 3:
            chunk = second.recv(1 << 16)
            assert chunk, "closed early"
            data += chunk
        # HELLO, PROGRESS, then whole frames: no rest of a frame among them.
        frames = [json.loads(line) for line in data.split(b"\n")[:-1]]
        assert frames[-1][0] == OPS and frames[-1][6] == ["after"]
        assert node.stats()["internal_errors"] == 1
    finally:
        engine.__dict__.pop("flush", None)
        node.stop(1)
        first.close()
        listener.close()


def test_a_loop_that_does_not_yield_leaves_its_full_frames_to_the_writer(pair):
    """A loop of sets that fills the outbox again and again without yielding (a bulk write,
    the throughput benchmark's) sends nothing from inside the loop: its frames wait for the
    writer, which sends them all once the loop yields, one system call per peer rather than
    one per frame inside the loop. Every key still arrives."""
    a, b = pair
    a.set("warm.up", 1)
    wait_for(lambda: b.get("warm.up") == 1)
    wait_for(lambda: not a._links[b.local].busy)
    peer_name = a._links[b.local].name
    before = a.stats()["peers"][peer_name]
    count = 5 * 1024  # five full outboxes (``OUTBOX_LIMIT`` operations each)
    for number in range(count):
        a.set(f"bulk.k{number}", number)
    during = a.stats()["peers"][peer_name]  # (nothing yielded since the loop began)
    assert during["sent_frames"] == before["sent_frames"]
    assert during["queued_frames"] >= 4
    wait_for(lambda: b.get(f"bulk.k{count - 1}") == count - 1, 20)
    assert all(b.get(f"bulk.k{number}") == number for number in range(count))
