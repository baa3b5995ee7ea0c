"""A member declared down, restarted empty: real members in this process, real sockets."""

from __future__ import annotations

from cluster import free_ports, wait_for

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
