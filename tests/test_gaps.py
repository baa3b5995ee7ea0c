"""Gaps in a past incarnation's operations: real members, and a scripted origin speaking the
wire format over real sockets (it must lose an operation in flight, and restart, on cue)."""

from __future__ import annotations

import time

import pytest
from cluster import free_ports, wait_for
from gevent import socket as gsocket

from gcollective import Collective
from gcollective._clock import NODE_BITS, HybridClock
from gcollective._store import DELETE, SET
from gcollective._wire import encode_hello, encode_ops, encode_progress

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


def origin_connection(
    member: Collective, node_id: int, port: int, frontier: bool = False
) -> gsocket.socket:
    """A connection to ``member`` from incarnation ``node_id`` at 127.0.0.1:``port``, after its
    HELLO and a PROGRESS saying it holds nothing yet (and, with ``frontier``, that nothing
    older than its clock can reach it: it holds nothing back)."""
    sock = gsocket.create_connection(member.local)
    promise = HybridClock(node_id, now=time.time_ns).promise()
    progress = encode_progress([], True, promise, promise if frontier else 0)
    sock.sendall(encode_hello(node_id, "127.0.0.1", port) + progress)
    return sock


@pytest.fixture
def members():
    b_port, c_port, origin_port = free_ports(3)
    addresses = [f"127.0.0.1:{port}" for port in (b_port, c_port, origin_port)]
    b = Collective(addresses[0], addresses, **FAST)
    c = Collective(addresses[1], addresses, **FAST)
    b.start(timeout=5)
    c.start(timeout=5)
    try:
        yield b, c, origin_port
    finally:
        b.stop(timeout=1)
        c.stop(timeout=1)


def test_an_operation_beyond_a_gap_left_by_a_restarted_origin_reaches_everyone(members):
    """Operation 2 of an origin reaches one member, operation 1 was lost in flight, and the
    origin restarts empty (nobody can ever resend 1): the member must not hold 2 beyond a
    gap for good, and the other member must get it too."""
    b, c, origin_port = members
    old, new = 0x1111_2222_3333, 0x4444_5555_6666
    sock = origin_connection(b, old, origin_port)
    stamp = HybridClock(old, now=time.time_ns).stamp()
    sock.sendall(encode_ops(old, 2, [stamp >> NODE_BITS], [SET], ["ghost"], ["boo"]))
    wait_for(lambda: b.get("ghost") == "boo")
    assert b.stats()["gaps"] == 1
    sock.close()
    restarted = origin_connection(b, new, origin_port)  # the same address, a new incarnation
    try:
        wait_for(lambda: c.get("ghost") == "boo", timeout=20)
        wait_for(lambda: b.stats()["gaps"] == 0 and c.stats()["gaps"] == 0, timeout=20)
        wait_for(lambda: b.snapshot() == c.snapshot() == {"ghost": "boo"})
        # And the members still replicate what comes next.
        c.set("after", 1)
        wait_for(lambda: b.get("after") == 1)
    finally:
        restarted.close()


def test_a_delete_beyond_a_gap_left_by_a_restarted_origin_is_not_forgotten_before_it_spreads():
    """As above, with a DELETE beyond the gap and the older value it hides held by the other
    member: once the gap is counted as lost, its holder must keep the tombstone until the
    other member has it (until then, nobody else knows it exists)."""
    b_port, c_port, origin_port = free_ports(3)
    addresses = [f"127.0.0.1:{port}" for port in (b_port, c_port, origin_port)]
    options = {**FAST, "clock_skew": 0.2}  # (the frontier follows the clocks closely)
    b, c = (Collective(address, addresses, **options) for address in addresses[:2])
    b.start(timeout=5)
    c.start(timeout=5)
    old, new = 0x1111_2222_3333, 0x4444_5555_6666
    sockets = []
    try:
        c.set("k", 1)
        wait_for(lambda: b.get("k") == 1)
        sockets.append(origin_connection(b, old, origin_port))
        stamp = HybridClock(old, now=time.time_ns).stamp()
        sockets[0].sendall(encode_ops(old, 2, [stamp >> NODE_BITS], [DELETE], ["k"], [None]))
        wait_for(lambda: b.get("k") is None)
        sockets.pop().close()
        # The next incarnation reaches both, with a frontier that holds nothing back.
        sockets += [origin_connection(member, new, origin_port, frontier=True) for member in (b, c)]
        wait_for(lambda: b.stats()["gaps"] == 0 and c.stats()["gaps"] == 0, timeout=20)
        wait_for(
            lambda: b.snapshot() == c.snapshot() == {},
            timeout=10,
            what=f"the same trees (once the gap was counted lost: {c.snapshot()})",
        )
    finally:
        for sock in sockets:
            sock.close()
        b.stop(timeout=1)
        c.stop(timeout=1)
