"""Gaps in a past incarnation's operations: real members, and a scripted origin speaking the
wire format over real sockets (it must lose an operation in flight, and restart, on cue)."""

from __future__ import annotations

import time

import pytest
from cluster import free_ports, wait_for
from gevent import socket as gsocket

from gcollective import Collective
from gcollective._clock import NODE_BITS, HybridClock
from gcollective._store import SET
from gcollective._wire import encode_hello, encode_ops, encode_progress

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


def origin_connection(member: Collective, node_id: int, port: int) -> gsocket.socket:
    """A connection to ``member`` from incarnation ``node_id`` at 127.0.0.1:``port``, after its
    HELLO and a PROGRESS saying it holds nothing yet."""
    sock = gsocket.create_connection(member.local)
    promise = HybridClock(node_id, now=time.time_ns).promise()
    sock.sendall(encode_hello(node_id, "127.0.0.1", port) + encode_progress([], True, promise, 0))
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
