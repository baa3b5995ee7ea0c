"""A member gone bad, on a real socket: it completes a real HELLO with a running node (which
dials it back, as any member) and then sends frames made by the project's encoders with one
field wrong. The node closes its connection with one log line naming the reason, its replica
is unchanged, and it still replicates with its real peer (``test_hostile``'s pair). The
engine-level fuzz of the same frames is ``test_peer_fuzz``; this checks the shell's side."""

from __future__ import annotations

import json
import logging
import os
import time

import gevent
import pytest
from cluster import free_port, wait_for
from gevent import socket as gsocket
from test_hostile import pair, send_and_wait_closed, still_replicates

from gcollective import Collective
from gcollective._clock import MILLIS_SHIFT, NODE_BITS
from gcollective._store import SET, Store
from gcollective._wire import (
    SNAPSHOT_REQUEST_FRAME,
    encode_hello,
    encode_members,
    encode_ops,
    encode_progress,
    encode_snapshot_end,
)
from gcollective._wire_snapshot import encode_snapshot

__all__ = ["pair"]  # (the fixture, used by name)

BAD_ID = 0x5EED


def stamp_ahead(seconds: float) -> int:
    """A stamp of the bad member's, ``seconds`` ahead of the wall clock."""
    millis = int((time.time() + seconds) * 1000)
    return (millis << MILLIS_SHIFT) | BAD_ID


def hlc_now() -> int:
    return stamp_ahead(0) >> NODE_BITS


def snapshot_with_a_leaf_cut() -> bytes:
    """A real SNAPSHOT frame whose node has one stamp fewer than it has leaves."""
    store = Store()
    store.apply(stamp_ahead(0), SET, ("users", "2"), "eve")
    store.apply(stamp_ahead(0) + (1 << NODE_BITS), SET, ("users", "3"), "mallory")
    message = json.loads(encode_snapshot(store.export()))
    leaves = message[1][0][1][6]  # ([origins, keys, packed] of the node "users")
    leaves[2] = leaves[2][:-1]
    return json.dumps(message).encode() + b"\n"


# What the bad member sends after its HELLO, and what the node's refusal says.
CASES = {
    "a ttl on a delete": (
        lambda: encode_ops(BAD_ID, 1, [hlc_now()], [2], ["users.1"], [None], [60_000]),
        "bad ttl",
    ),
    "a version vector entry cut short": (
        lambda: encode_progress([[BAD_ID, 1]], True, stamp_ahead(0), 0),
        "version vector entry",
    ),
    "a snapshot leaf without its stamp": (snapshot_with_a_leaf_cut, "bad leaves"),
    "a snapshot end stamped ahead": (
        lambda: encode_snapshot_end([[BAD_ID, 1, stamp_ahead(30)]]),
        "SNAPSHOT_END frame stamped",
    ),
    "a member with a bad port": (
        lambda: encode_members([(BAD_ID, "127.0.0.1", 70_000, 0)]),
        "bad port",
    ),
    "an increment of a string": (
        lambda: encode_ops(BAD_ID, 1, [hlc_now()], [1], ["hits"], ["x"]),
        "INCREMENT amount",
    ),
}


@pytest.fixture
def bad_member():
    """The bad member's own address: a listener that takes the node's connection back and
    reads (and drops) whatever comes on it."""
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(5)
    accepted: list = []
    drains: list = []

    def drain(conn) -> None:
        while conn.recv(65536):
            pass

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            accepted.append(conn)
            drains.append(gevent.spawn(drain, conn))

    acceptor = gevent.spawn(accept)
    yield listener.getsockname()[1]
    acceptor.kill()
    gevent.killall(drains)
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.mark.parametrize("name", list(CASES))
def test_a_member_sending_a_bad_frame_is_closed_with_a_reason_and_changes_nothing(
    pair: tuple[Collective, Collective], bad_member: int, caplog, name: str
) -> None:
    a, b = pair
    make, reason = CASES[name]
    hello = encode_hello(BAD_ID, "127.0.0.1", bad_member, 0)
    before = a.snapshot()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        send_and_wait_closed(a, hello + make())
        wait_for(lambda: any(reason in r.getMessage() for r in caplog.records))
    refusals = [
        r for r in caplog.records if "closed" in r.getMessage() or "refused" in r.getMessage()
    ]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
    assert a.snapshot() == before == b.snapshot()
    still_replicates(a, b)


def test_a_member_repeating_snapshot_requests_gets_few_streams(
    pair: tuple[Collective, Collective], bad_member: int
) -> None:
    """50,000 SNAPSHOT_REQUESTs in a row (200 KB): a stream is made again only once the one
    asked before started going out, at most once per read of them, and the node keeps
    replicating."""
    a, b = pair
    hello = encode_hello(BAD_ID, "127.0.0.1", bad_member, 0)
    marker = os.urandom(4).hex()
    with gevent.Timeout(30):
        sock = gsocket.create_connection(a.local)
        try:
            sock.sendall(hello + SNAPSHOT_REQUEST_FRAME * 50_000)
            wait_for(lambda: ("127.0.0.1", bad_member) in a._links, what="the link back")
            link = a._links["127.0.0.1", bad_member]
            wait_for(lambda: a.received_frames >= 50_000, what="every request read")
            # (Far fewer than the requests: bounded by the reads, about 64 KiB each.)
            assert link.snapshots_sent < 1000
            b.set(("alive", marker), True)
            wait_for(lambda: a.get(("alive", marker)) is True)
        finally:
            sock.close()
    still_replicates(a, b)
