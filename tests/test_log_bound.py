"""The operation log's default bound (issue 20): what a silent peer costs its live peers.

The log drops what every live peer has applied, so it fills only while a peer is silent
(partitioned, stalled) and not yet declared down; ``log_bytes`` bounds that, and a peer that
missed more gets a snapshot instead. Members run in this process under gevent.
"""

from __future__ import annotations

import functools

import gevent
import pytest
from cluster import wait_for as _wait_for
from faults import ProxiedMembers

wait_for = functools.partial(_wait_for, timeout=60.0, interval=0.05)

#: The default ``log_bytes`` (16 MiB): bigger ones cost a silent peer's live peers this much
#: memory each before it comes back or is declared down.
DEFAULT_LOG_BYTES = 16 * 1024 * 1024


@pytest.fixture
def members():
    made: list[ProxiedMembers] = []

    def make(count: int, **options) -> ProxiedMembers:
        cluster = ProxiedMembers(count, **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def snapshots_sent(node) -> int:
    return sum(peer["snapshots_sent"] for peer in node.stats()["peers"].values())


def test_a_silent_peer_holds_at_most_the_default_log_then_gets_a_snapshot(members):
    cluster = members(3, sync_interval=0.05, backoff_max=0.2)  # log_bytes: the default
    a, b, c = cluster.nodes
    a.set("warm", 1)
    wait_for(lambda: b.get("warm") == c.get("warm") == 1, what="every link up")
    before = snapshots_sent(a) + snapshots_sent(b)
    cluster.isolate(2)
    payload = "x" * 1000
    count = 20_000  # 20 MB of operations: more than the default log holds
    for i in range(count):
        a.set(f"big.k{i}", payload)
        if i % 200 == 199:
            gevent.sleep(0)  # let the writers send, as an app does between requests
    last = f"big.k{count - 1}"
    wait_for(lambda: b.get(last) == payload, what="b holds a's writes")
    # c lacks every one of them, yet neither live member logs more than the bound for it.
    for node in (a, b):
        assert 0 < node.stats()["log_bytes"] <= DEFAULT_LOG_BYTES
    assert c.get(last) is None
    cluster.heal()
    # (Every key, not the last: the log's newest operations may come from one peer before the
    # other's snapshot brings the oldest, 2 runs in 100.)
    wait_for(lambda: c.get("big") == a.get("big"), what="c caught up")
    assert c.get("big") == b.get("big")
    # Beyond the log, catch-up is a snapshot.
    assert snapshots_sent(a) + snapshots_sent(b) > before
