"""Nothing is queued for an address that never answered (a member not started yet, a slot
nobody took): holding up to ``max_queue_bytes`` of own operations for it only sent a joiner
them all ahead of the snapshot it asked for (twice the work, and a bigger state built from
operations: 174 against 124 B/key, found by the session-19 look at test_snapshot's flakes).
A peer that did answer keeps its queue while its connection is down, so a short break needs
no catch-up. In-process members on real sockets."""

from __future__ import annotations

import functools

import gevent
from cluster import NodeProcess, free_ports
from cluster import wait_for as _wait_for

from gcollective import Collective

wait_for = functools.partial(_wait_for, timeout=30.0, interval=0.02)
WRITES = 5_000


def name(port: int) -> str:
    return f"127.0.0.1:{port}"


def test_nothing_is_queued_for_an_address_that_never_answered() -> None:
    ports = free_ports(2)
    holder = Collective(name(ports[0]), [name(ports[1])], backoff_max=0.2)
    joiner = None
    try:
        holder.start(timeout=0)
        for index in range(WRITES):
            holder.set(f"k.{index}", index)
        wait_for(lambda: holder.stats()["log_bytes"] > 0, what="the writes flushed")
        gevent.sleep(0)  # (every flush of them done)
        peer = holder.stats()["peers"][name(ports[1])]
        assert peer["state"] != "connected" and peer["peer_id"] is None
        assert peer["queued_bytes"] == 0 and peer["queued_ops"] == 0, peer

        joiner = Collective(name(ports[1]), [name(ports[0])], backoff_max=0.2)
        joiner.start(timeout=30)
        wait_for(lambda: joiner.get(f"k.{WRITES - 1}") == WRITES - 1, what="the joiner synced")
        assert all(joiner.get(f"k.{index}") == index for index in range(WRITES))
        # All of it came in the snapshot it asked for: no operation ahead of it.
        assert joiner.stats()["received_ops"] == 0
    finally:
        for node in (holder, joiner):
            if node is not None:
                node.stop(timeout=1)


def test_a_peer_that_answered_keeps_its_queue_while_away() -> None:
    ports = free_ports(2)
    holder = Collective(name(ports[0]), [name(ports[1])], backoff_max=0.2)
    away = NodeProcess(ports[1], [ports[0]])
    try:
        holder.start(timeout=0)
        away.start(timeout=0)  # (this process, its peer, runs only between calls)
        holder.set("warm", 1)
        wait_for(lambda: away.call("get", key="warm")["value"] == 1, what="the link up")
        wait_for(lambda: peer_stats(holder, ports[1])["peer_id"] is not None, what="its HELLO")
        away.kill()  # (no goodbye: a peer that says one is forgotten)
        wait_for(lambda: peer_stats(holder, ports[1])["state"] != "connected", what="it is away")
        for index in range(100):
            holder.set(f"k.{index}", index)
        wait_for(
            lambda: peer_stats(holder, ports[1])["queued_ops"] >= 100,
            what="the writes queued for the peer that went away",
        )
    finally:
        holder.stop(timeout=1)
        away.stop()


def peer_stats(node: Collective, port: int) -> dict:
    return node.stats()["peers"][name(port)]
