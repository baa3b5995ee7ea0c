"""Expiring keys (``ttl``): validation, the wire, and members expiring keys together.

Members run in this process under gevent (so their stores can be inspected), except one
test that uses member processes. Waits poll conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
from cluster import free_ports, wait_until
from cluster import wait_for as _wait_for
from faults import ProxiedMembers

from gcollective import DELETE, INCREMENT, SET, Collective, InvalidValueError, ProtocolError
from gcollective._clock import expiry_stamp, stamp_millis
from gcollective._validate import check_ttl
from gcollective._wire import encode_ops
from gcollective._wire_ops import parse_ops
from gcollective._wire_snapshot import parse_snapshot_items

wait_for = functools.partial(_wait_for, timeout=20.0, interval=0.01)

FAST = {"sync_interval": 0.05, "backoff_max": 0.2, "clock_skew": 0.05}

# -- validation and the wire ------------------------------------------------------------------


def test_check_ttl() -> None:
    assert check_ttl(1) == 1000
    assert check_ttl(0.3) == 300
    assert check_ttl(0.0001) == 1  # at least one millisecond
    for bad in (0, -1, float("nan"), float("inf"), True, "1", None, 11 * 365 * 24 * 3600):
        with pytest.raises(InvalidValueError):
            check_ttl(bad)


def test_expiry_stamp_layout() -> None:
    stamp = (((1_000 << 16) | 7) << 64) | 12345
    derived = expiry_stamp(stamp, 250)
    assert stamp_millis(derived) == 1_250
    assert derived & ((1 << 64) - 1) == (1 << 63) | 12345
    # after every real stamp of 1250 ms with counter 0, before any with counter 1
    assert ((1_250 << 16) << 64) | ((1 << 63) - 1) < derived < (((1_250 << 16) | 1) << 64) | 1


def test_wire_carries_the_ttl_column_only_when_there_is_a_ttl() -> None:
    import ujson

    plain = ujson.loads(encode_ops(1, 3, [5], [SET], ["a"], [1]))
    assert plain[8] is None and parse_ops(plain)[6] is None
    message = ujson.loads(encode_ops(1, 3, [5, 6], [SET, INCREMENT], ["a", "b"], [1, 2], [0, 300]))
    assert message[8] == [0, 300]
    assert parse_ops(message)[6] == [0, 300]
    for bad in (-5, 1.5, True, None, 10**15):
        with pytest.raises(ProtocolError):
            parse_ops([1, 1, 3, [5], [SET], "", ["a"], [1], [bad]])
    with pytest.raises(ProtocolError):
        parse_ops([1, 1, 3, [5], [DELETE], "", ["a"], [None], [300]])  # no ttl on DELETE
    with pytest.raises(ProtocolError):
        parse_ops([1, 1, 3, [5], [SET], "", ["a"], [1], [300, 0]])  # one ttl per operation
    with pytest.raises(ProtocolError):
        parse_ops([1, 1, 3, [5], [SET], "", ["a"], [1], 1])
    with pytest.raises(ProtocolError):
        parse_ops([1, 1 << 63 | 1, 3, [5], [SET], "", ["a"], [1], None])  # a derived origin


def test_snapshot_entries_with_ttls_are_checked() -> None:
    stamp = (1000 << 80) | 9

    def entry(ttls: list[Any]) -> list[Any]:  # (a new one each time: parsing converts it)
        return [stamp, [1], None, None, [], {}, [[], [], []], [], ttls]

    _, newest = parse_snapshot_items([["k", entry([[stamp, expiry_stamp(stamp, 300)]])]])
    assert newest == stamp  # (an expiry is no operation's stamp)
    for ttls in ([], [[stamp]], [[stamp, stamp + 1]], [[stamp, expiry_stamp(stamp + 1, 3)]]):
        with pytest.raises(ProtocolError):
            parse_snapshot_items([["k", entry(ttls)]])


def test_api_refuses_bad_ttls_before_applying_anything() -> None:
    (port,) = free_ports(1)
    with Collective(f"127.0.0.1:{port}", [], **FAST) as node:
        for bad in (0, -1, True, "5", float("inf")):
            with pytest.raises(InvalidValueError):
                node.set("k", 1, ttl=bad)
            with pytest.raises(InvalidValueError):
                node.incr("k", 1, ttl=bad)
        with pytest.raises(InvalidValueError):
            node.set("k", None, DELETE, ttl=1)
        assert node.snapshot() == {}
        assert node.stats()["local_ops"] == 0
        node.set("k", 1, INCREMENT, ttl=60)
        assert node.get("k") == 1
        assert node.stats()["pending_expiries"] == 1


def test_collective_js_mode_refuses_ttl() -> None:
    (port,) = free_ports(1)
    node = Collective(f"127.0.0.1:{port}", [], protocol="collective.js")
    with pytest.raises(ValueError, match=r"protocol='collective\.js'"):
        node.set("k", 1, ttl=1)
    with pytest.raises(ValueError, match=r"protocol='collective\.js'"):
        node.incr("k", 1, ttl=1)


# -- members in this process ------------------------------------------------------------------


def seen_by_watch(node: Collective, key: str) -> list[tuple]:
    events: list[tuple] = []
    node.watch(key, lambda *event: events.append(event[:3]))
    return events


def test_a_key_expires_on_every_member(members) -> None:
    nodes = members(3)
    watched = [seen_by_watch(node, "session") for node in nodes]
    nodes[0].set("session.s1", {"user": "ann"}, ttl=0.3)
    nodes[1].set("session.s2", {"user": "bob"})  # no ttl: stays
    wait_for(lambda: all(any(e[2] == SET for e in w) for w in watched), what="seen everywhere")
    wait_for(lambda: all(n.get("session.s2") for n in nodes))
    wait_for(lambda: all(n.get("session.s1") is None for n in nodes), what="expired everywhere")
    for node in nodes:
        assert node.get("session") == {"s2": {"user": "bob"}}
        assert node.snapshot() == {"session": {"s2": {"user": "bob"}}}
    # Each watch was told: the expiry reads as a DELETE of the key (or, on a member so slow
    # that the SET arrived after its expiry, as that SET leaving nothing).
    wait_for(lambda: all([e for e in w if e[0] == "session.s1"][-1][1] is None for w in watched))
    assert any(("session.s1", None, DELETE) in w for w in watched)


def test_a_read_right_after_the_expiry_never_sees_the_key(members) -> None:
    (node,) = members(1)
    node.set("k", 1, ttl=0.2)
    due = node._store.next_expiry
    # Nothing else runs: only the read's own check can notice the expiry.
    node._expirer.kill()
    node._housekeeper.kill()
    assert node.get("k") == 1
    wait_until(lambda: node.get("k") is None, timeout=5, interval=0.005)  # time.sleep: no hub
    assert time.time() * 1000 >= due
    assert node.snapshot() == {}


def test_a_set_without_ttl_cancels_the_expiry_everywhere(members) -> None:
    nodes = members(3)
    nodes[0].set("k", "temporary", ttl=1.0)
    due = nodes[0]._store.next_expiry
    wait_for(lambda: all(n.get("k") == "temporary" for n in nodes))
    nodes[2].set("k", "kept")
    wait_for(lambda: all(n.get("k") == "kept" for n in nodes))
    wait_for(lambda: all(n._store.now_ms >= due for n in nodes), what="past the expiry")
    assert all(n.get("k") == "kept" for n in nodes)


def test_incr_with_ttl_expires_after_the_last_hit(members) -> None:
    a, b = members(2)
    assert a.incr("hits", 1, ttl=1.0) == 1
    wait_for(lambda: b.get("hits") == 1)
    b.incr("hits", 2, ttl=1.0)  # replaces the expiry
    b.incr("hits", 1)  # a plain increment keeps it
    wait_for(lambda: a.get("hits") == 4)
    wait_for(lambda: a.get("hits") is None and b.get("hits") is None)
    assert a.incr("hits", 1) == 1  # counting starts afresh


def test_an_operation_made_after_seeing_an_expiry_is_ordered_after_it(members) -> None:
    # Regression: an increment made in the very millisecond its key was seen to expire got a
    # stamp below the expiry's (same millisecond, counter 0) and was itself expired at once.
    (a,) = members(1)
    for _ in range(20):
        a.set("k", 5, ttl=0.001)
        deadline = time.monotonic() + 5
        while a.get("k") is not None:  # busy: the next call lands in the same millisecond
            assert time.monotonic() < deadline, "never expired"
        assert a.incr("k", 1) == 1
        a.set("k", "kept")
        assert a.get("k") == "kept"


def test_incr_returns_what_get_reads_after_an_expiry_nobody_looked_at_yet(members) -> None:
    # Regression: incr read the key before letting due expiries fire, so right after the
    # expiry time (the expirer greenlet not run yet, no get in between) it counted on from the
    # expired value and returned 6, while every read then said 1.
    (a,) = members(1)
    a.set("k", 5, ttl=0.05)
    ends = time.time() + 0.1
    while time.time() < ends:  # no yield: the expirer cannot run
        pass
    assert a.incr("k", 1) == 1
    assert a.get("k") == 1


def test_a_joiner_gets_the_ttl_by_snapshot_and_expires_it(members) -> None:
    a, b = members(2, spare=1)
    ttl = 2.0  # long enough for the join, so the joiner must hold the key and its expiry
    written = time.time()
    a.set("temp", {"x": 1}, ttl=ttl)
    a.set("perm", 1)
    wait_for(lambda: b.get("perm") == 1)
    c = members.join()
    wait_for(lambda: c.synced)
    assert c.get("perm") == 1
    temp, pending = c.get("temp"), c._store.pending_expiries
    assert time.time() < written + ttl, "the join took longer than the ttl: raise it"
    assert temp == {"x": 1} and pending >= 1
    wait_for(lambda: all(n.get("temp") is None for n in (a, b, c)))
    assert c.snapshot() == {"perm": 1}


def test_expired_keys_give_their_memory_back(members) -> None:
    nodes = members(3)
    for i in range(20):
        nodes[i % 3].set(("tmp", str(i)), {"payload": "x" * 100}, ttl=0.2)
    nodes[0].set("keep", 1)
    wait_for(lambda: all(n.get("keep") == 1 for n in nodes))
    wait_for(lambda: all(n.get("tmp") == {} for n in nodes), what="soft expiry")
    # Hard expiry once every member passed it, then the tombstones are collected.
    wait_for(lambda: all(n.stats()["expired"] >= 1 for n in nodes), what="hard expiry")
    wait_for(lambda: all(not _entries_under(n, "tmp") for n in nodes), what="metadata collected")
    assert all(n._store.pending_expiries == 0 for n in nodes)


def _entries_under(node: Collective, key: str) -> int:
    entry = node._store._root.entries.get(key)
    return 0 if entry is None or type(entry) is int else len(entry.entries)


def test_a_late_write_from_a_partition_cancels_an_expiry_that_fired(members_behind_proxies):
    """B, cut off, overwrites the key (no ttl) before its expiry; A hides the key when the
    expiry comes; the partition heals and B's older write arrives: on A the key is back,
    and its watch saw both. (The expiry was only soft on A: the frontier cannot pass B's
    silence, so nothing was forgotten that the late write needs.)"""
    a, b = members_behind_proxies.nodes
    events: list[tuple] = []
    a.watch("k", lambda *event: events.append(event[:3]))
    a.set("k", "first", ttl=0.5)
    expires = a._store.next_expiry
    wait_for(lambda: b.get("k") == "first")
    members_behind_proxies.isolate(1)
    b.set("k", "second")
    if stamp_millis(b._clock.promise()) >= expires:
        pytest.skip("too slow to write before the expiry")  # pragma: no cover
    wait_for(lambda: a.get("k") is None, what="expired on A")
    assert b.get("k") == "second"
    members_behind_proxies.heal()
    wait_for(lambda: a.get("k") == "second", what="brought back on A")
    assert a.snapshot() == b.snapshot() == {"k": "second"}
    assert ("k", None, DELETE) in events and events[-1] == ("k", "second", SET)


@pytest.fixture
def members_behind_proxies():
    made = ProxiedMembers(2, **FAST)
    yield made
    made.close()


# -- member processes ---------------------------------------------------------------------------


def test_member_processes_expire_a_key(cluster) -> None:
    a, b = cluster(2, **FAST)
    a.call("set", key="token", value="abc", ttl=2.0)
    a.call("incr", key="count", amount=2, ttl=2.0)
    wait_until(lambda: b.call("get", key="token")["value"] == "abc", timeout=10)
    wait_until(lambda: b.call("get", key="token")["value"] is None, timeout=10)
    wait_until(lambda: a.call("get", key="token")["value"] is None, timeout=10)
    for node in (a, b):
        assert node.call("get", key="count")["value"] is None
        assert node.call("snapshot")["value"] == {}
