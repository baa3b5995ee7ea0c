"""A member declared down, restarted empty: real members in this process, real sockets."""

from __future__ import annotations

import time

from cluster import free_ports, wait_for
from faults import Proxy

from gcollective import Collective

OPTIONS = {"sync_interval": 0.05, "backoff_max": 0.2, "down_timeout": 1.0, "clock_skew": 0.2}


def test_what_was_queued_for_a_member_declared_down_never_reaches_its_next_incarnation():
    """What a member queued for a peer declared down is older than what the others may have
    forgotten since (tombstones): delivered to the peer's next, empty incarnation before the
    snapshot it asks for, it would bring deleted data back there for good."""
    a_port, b_port, c_port = free_ports(3)
    a_address, b_address, c_address = (f"127.0.0.1:{p}" for p in (a_port, b_port, c_port))
    addresses = [a_address, b_address, c_address]
    a, b, c = (Collective(address, addresses, **OPTIONS) for address in addresses)
    for member in (a, b, c):
        member.start(timeout=5)
    restarted = None
    try:
        wait_for(
            lambda: all(
                link["peer_id"] is not None
                for member in (a, b, c)
                for link in member.stats()["peers"].values()
            )
        )
        # c and later b vanish as a crash would: without saying they left (a member that
        # leaves is no longer dialled, and its address would not be a's peer any more).
        for member in (b, c):
            member._say_goodbye = lambda: None
        c.stop(timeout=1)
        wait_for(lambda: a.stats()["peers"][c_address]["state"] == "backoff")
        a.set(("a", "x"), 1)  # queued for c, which is gone
        wait_for(lambda: b.get(("a", "x")) == 1)
        b.delete("a")  # made by b, which then goes away for good too
        wait_for(lambda: a.get("a") is None)
        b.stop(timeout=1)
        # a declares both down, and forgets the tombstone of a.
        wait_for(lambda: a._store.export_item("a") is None, timeout=20)
        # c's next incarnation, empty, knowing nobody: a dials it (c is still one of its
        # peers), then c asks a for a snapshot.
        restarted = Collective(c_address, [c_address], **OPTIONS)
        restarted.start(timeout=5)
        wait_for(lambda: restarted.synced, timeout=20)
        wait_for(
            lambda: restarted.snapshot() == a.snapshot() == {},
            timeout=5,
            what=f"the same trees (once synced: {restarted.snapshot()} and {a.snapshot()})",
        )
    finally:
        for member in (a, b, c, restarted):
            if member is not None:
                member.stop(timeout=1)


def test_a_member_declared_down_before_anyone_heard_of_it_is_refused_when_it_comes():
    """A member that nobody had heard from when it was declared down (its incarnation
    unknown) writes while cut off; the others delete that key and forget the tombstone. When
    the network heals it must be refused, not let in with its old write (which the forgotten
    tombstone would no longer stop: the deleted key would come back everywhere); once it
    restarts empty, it is welcome."""
    real, public = free_ports(3), free_ports(3)
    proxies = [Proxy(p, r) for p, r in zip(public, real)]
    peers = [("127.0.0.1", port) for port in public]
    a_port, b_port, c_port = public

    def member(index: int) -> Collective:
        return Collective(("127.0.0.1", real[index]), peers, advertise=peers[index], **OPTIONS)

    # c is cut off from a and b, both ways, from the start.
    proxies[2].cut(a_port, b_port, require=False)
    for proxy in proxies[:2]:
        proxy.cut(c_port, require=False)
    a, b, c = member(0), member(1), member(2)
    restarted = None
    try:
        for node in (a, b, c):
            node.start(timeout=5)
        c.set(("k", "x"), 1)  # a and b never see it
        written_ms = time.time_ns() // 1_000_000
        # The delete must be the newer (stamps order by millisecond first).
        wait_for(lambda: time.time_ns() // 1_000_000 > written_ms + 1)
        a.delete("k")
        wait_for(lambda: b._store.export_item("k") is not None)  # (the tombstone)
        # Both declare c down (never heard from) and forget the tombstone.
        for node in (a, b):
            wait_for(lambda node=node: node._store.export_item("k") is None, timeout=20)
        for proxy in proxies:
            proxy.heal()
        c_id = f"{c.node_id:x}"

        def refused(node: Collective) -> bool:
            entry = node.stats()["members"][f"127.0.0.1:{c_port}"]
            return entry["node_id"] == c_id and entry["state"] == "down"

        wait_for(
            lambda: (refused(a) and refused(b)) or a.get("k") or b.get("k"),
            timeout=20,
            what="c refused by a and b, or its old write back",
        )
        assert a.get("k") is None and b.get("k") is None
        # c hears that it was refused, and passes nothing on any more; c, cut off from both,
        # refused them without a word (it may as well have been the one to restart).
        wait_for(lambda: c._engine.refused_as_down, what="c told it was refused")
        assert not a._engine.refused_as_down and not b._engine.refused_as_down
        # Restarted empty (a new incarnation at the same address), it is welcome.
        c.stop(timeout=1)
        proxies[2].target_port = free_ports(1)[0]
        restarted = Collective(
            ("127.0.0.1", proxies[2].target_port), peers, advertise=peers[2], **OPTIONS
        )
        restarted.start(timeout=5)
        wait_for(lambda: restarted.synced, timeout=20)
        restarted.set("after", 1)
        wait_for(
            lambda: a.snapshot() == b.snapshot() == restarted.snapshot() == {"after": 1},
            timeout=20,
            what="the same trees",
        )
    finally:
        for node in (a, b, c, restarted):
            if node is not None:
                node.stop(timeout=1)
        for proxy in proxies:
            proxy.close()
