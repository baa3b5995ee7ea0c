"""Catch-up resends what a peer lacks, once per connection (issue 20): a peer that applies
late (busy, or its link from us backed up) reports no progress on an origin for a while, and
resending all it lacks at each report only queued the same operations again and again behind
the first copy, so it fell further behind. Members run in this process under gevent; their
links run through proxies that can hold back what one member sends, the link staying up."""

from __future__ import annotations

import functools

import gevent
import pytest
from cluster import wait_for as _wait_for
from faults import ProxiedMembers

wait_for = functools.partial(_wait_for, timeout=60.0, interval=0.02)

WRITES = 2_000
REPORTS = 20  # PROGRESS frames the late peer sends while it lacks the writes


@pytest.fixture
def cluster():
    made = ProxiedMembers(2, sync_interval=0.05, backoff_max=0.2)
    yield made
    made.close()


def sent_frames(node, to: str) -> int:
    return node.stats()["peers"][to]["sent_frames"]


def test_a_peer_that_applies_late_is_sent_nothing_twice(cluster):
    a, b = cluster.nodes
    a_name, b_name = (f"127.0.0.1:{port}" for port in cluster.public)
    a.set("warm", 1)
    wait_for(lambda: b.get("warm") == 1, what="a's link to b up")
    held_from = cluster.public[0]
    cluster.proxies[1].hold(held_from)  # what a sends b stays in flight; the link stays up
    for i in range(WRITES):
        a.set(f"k.{i}", i)
        if i % 200 == 199:
            gevent.sleep(0)
    wait_for(lambda: cluster.proxies[1].held_op_frames(held_from) > 0, what="writes in flight")
    # b keeps reporting (its own link to a is not held) that it lacks every one of them.
    reports_from = sent_frames(b, a_name)
    wait_for(lambda: sent_frames(b, a_name) >= reports_from + REPORTS, what="b's reports")
    assert b.get(f"k.{WRITES - 1}") is None  # (still in flight)
    # They are on their way on a's connection to b: none was queued again.
    assert a.stats()["peers"][b_name]["relayed_frames"] == 0
    cluster.proxies[1].release(held_from)
    wait_for(lambda: b.get(f"k.{WRITES - 1}") == WRITES - 1, what="b holds a's writes")
    stats = b.stats()
    assert stats["received_ops"] - stats["applied_ops"] == 0  # nothing received twice
    assert all(b.get(f"k.{i}") == i for i in range(WRITES))


def test_what_was_in_flight_on_a_connection_that_broke_is_sent_again(cluster):
    a, b = cluster.nodes
    a.set("warm", 1)
    wait_for(lambda: b.get("warm") == 1, what="a's link to b up")
    held_from = cluster.public[0]
    cluster.proxies[1].hold(held_from)
    for i in range(WRITES):
        a.set(f"k.{i}", i)
        if i % 200 == 199:
            gevent.sleep(0)
    wait_for(lambda: cluster.proxies[1].held_op_frames(held_from) > 0, what="writes in flight")
    cluster.proxies[1].cut(held_from)  # the writes in flight are lost with the connection
    assert cluster.proxies[1].dropped_op_frames > 0
    cluster.proxies[1].heal(held_from)
    # b's reports on the new connection show what it lacks: catch-up resends it.
    wait_for(lambda: b.get(f"k.{WRITES - 1}") == WRITES - 1, what="b holds a's writes")
    assert all(b.get(f"k.{i}") == i for i in range(WRITES))
