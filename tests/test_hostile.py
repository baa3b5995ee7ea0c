"""Hostile and broken input on the peer port, and stuck peers, in one process under gevent.

Each bad connection must be closed with one log line naming the reason, no replica may
change, and the node must keep serving its real peers.
"""

from __future__ import annotations

import json
import logging
import os
import select

import gevent
import pytest
from cluster import free_port, wait_for
from gevent import socket as gsocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples

from gcollective import Collective
from gcollective._wire import encode_hello

OPTIONS = {"handshake_timeout": 0.5, "max_frame": 4096, "sync_interval": 0.1}


@pytest.fixture
def pair():
    """Two real members in this process, already holding some data."""
    a_port, b_port = free_port(), free_port()
    peers = [f"127.0.0.1:{a_port}", f"127.0.0.1:{b_port}"]
    a = Collective(peers[0], peers, **OPTIONS)
    b = Collective(peers[1], peers, **OPTIONS)
    a.start()
    b.start()
    a.set("users.1", {"name": "ann"})
    b.incr("hits", 3)
    wait_for(lambda: a.snapshot() == b.snapshot() == {"users": {"1": {"name": "ann"}}, "hits": 3})
    yield a, b
    a.stop()
    b.stop()


def send_and_wait_closed(node: Collective, payload: bytes, timeout: float = 5.0) -> None:
    """Connect to ``node``, send ``payload``, end our side, and wait until the node closes."""
    sock = gsocket.create_connection(node.local)
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(gsocket.SHUT_WR)
        except OSError:
            return  # already closed on us: what we wanted
        sock.settimeout(timeout)
        while True:
            try:
                if not sock.recv(4096):
                    return
            except ConnectionResetError:
                return
    finally:
        sock.close()


def still_replicates(a: Collective, b: Collective) -> None:
    marker = os.urandom(4).hex()
    b.set(("alive", marker), True)
    wait_for(lambda: a.get(("alive", marker)) is True)


HELLO = encode_hello(123456789, "127.0.0.1", 1, 0)
HLC = 1 << 16


def ops_frame(hlc, op, path, value) -> bytes:
    """An OPS frame of origin 42 carrying one operation."""
    return (json.dumps([1, 42, 1, [hlc], [op], "", [path], [value], None]) + "\n").encode()


CASES = {
    "random bytes": (os.urandom(512).replace(b"\n", b""), "HELLO"),
    "binary junk with newline": (b"\x00\xff\xfe\x80\n", "not valid JSON"),
    "non-JSON line": (b"hello there\n", "not valid JSON"),
    "JSON of the wrong shape": (b'{"a": 1}\n', "HELLO"),
    "unknown protocol version": (
        json.dumps(["gcollective", 99, 5, "h", 1, 0]).encode() + b"\n",
        "protocol version",
    ),
    "oversized frame": (b"[" + b"1," * 5000 + b"1]\n", "exceeds"),
    "oversized after hello": (HELLO + b'[1, "' + b"x" * 8000, "exceeds"),
    "unknown message type": (HELLO + b"[77]\n", "unknown message type"),
    "ops frame of the wrong shape": (HELLO + b"[1, 42, 1]\n", "wrong length"),
    "op of the wrong shape": (
        HELLO + b'[1, 42, 1, [1], [0], "", ["a"], [], null]\n',
        "different lengths",
    ),
    "op with a NaN value": (
        HELLO + b'[1, 42, 1, [%d], [0], "", ["a"], [NaN], null]\n' % HLC,
        "non-finite",
    ),
    "op with a bad path": (HELLO + ops_frame(HLC, 0, ["a", ""], 1), "path segment"),
    "unknown operation": (HELLO + ops_frame(HLC, 9, "a", 1), "unknown operation"),
    "stamps going backwards": (
        HELLO + b'[1, 42, 1, [%d, 0], [0, 0], "", ["a", "b"], [1, 1], null]\n' % HLC,
        "bad stamp",
    ),
    "a bad op after good ones applies none": (
        HELLO + b'[1, 42, 1, [%d, 1], [0, 0], "", ["a", "b."], [1, 1], null]\n' % HLC,
        "path segment",
    ),
    "bad snapshot": (HELLO + b'[2, [["users", [1, 2, 3]]]]\n', "SNAPSHOT"),
    "truncated frame": (HELLO + ops_frame(HLC, 0, "users", "evil")[:-9], "middle"),
    "truncated hello": (HELLO[:20], "HELLO"),
    "a bad frame after a good one spoils nothing": (
        HELLO + ops_frame(HLC, 0, "ok", 1)[:-1] + b"garbage\n",
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_a_reason_and_changes_nothing(pair, caplog, name):
    a, b = pair
    payload, reason = CASES[name]
    before = a.snapshot()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        send_and_wait_closed(a, payload)
        wait_for(lambda: any(reason in r.getMessage() for r in caplog.records))
    refusals = [r for r in caplog.records if "closed" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
    assert a.snapshot() == before == b.snapshot()
    still_replicates(a, b)


def test_one_byte_at_a_time_is_cut_at_the_handshake_timeout(pair, caplog):
    a, b = pair
    sock = gsocket.create_connection(a.local)
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        with gevent.Timeout(5):
            try:
                for byte in HELLO:
                    sock.sendall(bytes([byte]))
                    gevent.sleep(0.2)
            except OSError:
                pass
        wait_for(lambda: any("handshake" in r.getMessage() for r in caplog.records))
    sock.close()
    still_replicates(a, b)


def established(sockets: list) -> int:
    """How many of these non-blocking sockets finished connecting (or were closed since)."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock.fileno(), select.POLLOUT)
    done = select.POLLOUT | select.POLLHUP | select.POLLERR
    return sum(1 for _, events in poller.poll(0) if events & done)


def test_thousands_of_silent_connections_do_not_lock_out_a_real_member(pair):
    a, b = pair
    pool = a._server.pool  # the listener's pool: max_connections handlers (1024)
    busiest = [0]

    def watch_pool() -> None:
        while True:
            busiest[0] = max(busiest[0], pool.size - pool.free_count())
            gevent.sleep(0.005)

    watcher = gevent.spawn(watch_pool)
    idle = []
    for i in range(2000):
        sock = gsocket.socket()
        sock.setblocking(False)
        try:
            sock.connect(a.local)
        except BlockingIOError:
            pass
        idle.append(sock)
        if i % 100 == 99:
            gevent.sleep(0.001)  # let the node accept, or the kernel's backlog drops SYNs
    try:
        # The attack is real: every handler of the pool held by a silent connection.
        wait_for(lambda: busiest[0] == pool.size, what="the pool full of silent connections")
        joiner = Collective(f"127.0.0.1:{free_port()}", [a.local], **OPTIONS)
        joiner.start(timeout=10)
        try:
            wait_for(lambda: joiner.get("hits") == 3)
            joiner.set("from_joiner", 1)
            wait_for(lambda: a.get("from_joiner") == 1)
        finally:
            joiner.stop()
        # And all 2,000 got through to the node (accepted, then cut at the handshake timeout).
        wait_for(lambda: established(idle) == 2000, timeout=60, what="2000 sockets connected")
    finally:
        watcher.kill()
        for sock in idle:
            sock.close()
    still_replicates(a, b)


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(junk=st.binary(min_size=1, max_size=300))
def test_fuzz_random_bytes_never_change_a_replica(pair, junk):
    a, _ = pair
    before = a.snapshot()
    send_and_wait_closed(a, junk + b"\n")
    assert a.snapshot() == before


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    frame=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=12,
    )
)
def test_fuzz_json_of_any_shape_as_a_first_frame_is_refused(pair, frame):
    a, _ = pair
    before = a.snapshot()
    send_and_wait_closed(a, json.dumps(frame).encode() + b"\n")
    assert a.snapshot() == before


def test_a_stuck_peer_is_dropped_and_never_grows_memory_or_slows_writers():
    stuck_listener = gsocket.socket()
    stuck_listener.bind(("127.0.0.1", 0))
    stuck_listener.listen(5)
    accepted = []

    def accept_and_never_read():
        while True:
            conn, _ = stuck_listener.accept()
            accepted.append(conn)  # never read from: the kernel buffers fill up

    acceptor = gevent.spawn(accept_and_never_read)
    stuck = f"127.0.0.1:{stuck_listener.getsockname()[1]}"
    good_port, node_port = free_port(), free_port()
    good = Collective(f"127.0.0.1:{good_port}", [], sync_interval=0.1)
    good.start()
    limit = 256 * 1024
    node = Collective(
        f"127.0.0.1:{node_port}",
        [stuck, good.local],
        max_queue_bytes=limit,
        send_timeout=2,
        sync_interval=0.1,
    )
    node.start(timeout=2)
    try:
        worst = 0
        # ~12 MB in all: well past the queue limit plus what the kernel buffers on loopback.
        for i in range(60000):
            node.set(("k", str(i)), "x" * 200)
            if i % 500 == 0:
                gevent.sleep(0)
                worst = max(worst, node.stats()["peers"][stuck]["queued_bytes"])
        assert worst <= limit + 200
        wait_for(lambda: good.get(("k", "59999")) == "x" * 200, timeout=30)
        assert node.stats()["peers"][stuck]["overflows"] >= 1
    finally:
        node.stop(timeout=1)
        good.stop()
        acceptor.kill()
        for conn in accepted:
            conn.close()
        stuck_listener.close()
