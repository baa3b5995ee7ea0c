"""Bounded metadata: counters and tombstones are forgotten once no operation can need them,
and the down-timeout trade-off, both ways. Members run in this process under gevent."""

from __future__ import annotations

import functools
import logging
import sys

import gevent
import pytest
from cluster import wait_for as _wait_for
from faults import ProxiedMembers

from gcollective import Collective

# Metadata is collected in the background: allow it longer than the default.
wait_for = functools.partial(_wait_for, timeout=20.0, interval=0.02)

FAST = {"sync_interval": 0.05, "backoff_max": 0.2, "clock_skew": 0.05}


def metadata_size(node: Collective) -> int:
    """Entries of metadata held (stamps, tombstones, pending increments), roughly."""
    count = 0
    stack = [node._store._root]
    while stack:
        meta = stack.pop()
        count += len(meta.entries) + len(meta.incs or ())
        stack.extend(e for e in meta.entries.values() if type(e) is not int)
    return count


@pytest.fixture
def members():
    made: list[ProxiedMembers] = []

    def make(count: int, **options) -> ProxiedMembers:
        m = ProxiedMembers(count, **{**FAST, **options})
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def refused_again(*nodes: Collective) -> None:
    """Wait until each node refused one more connection than it has so far."""
    before = [node.stats()["refused_connections"] for node in nodes]
    wait_for(
        lambda: all(
            node.stats()["refused_connections"] > count
            for node, count in zip(nodes, before, strict=True)
        ),
        what="one more refusal on each node",
    )


def sync_intervals_pass(node: Collective, peer: str, count: int) -> None:
    """Wait until ``node`` sent ``count`` more frames to ``peer``: its PROGRESS goes every
    ``sync_interval``, the period of its housekeeping (which forgets metadata)."""
    before = node.stats()["peers"][peer]["sent_frames"]
    wait_for(
        lambda: node.stats()["peers"][peer]["sent_frames"] >= before + count,
        what=f"{count} frames to {peer}",
    )


def test_a_hot_counter_keeps_metadata_in_the_order_of_members(members):
    a, b, c = members(3).nodes
    for _ in range(3000):
        a.incr("hits")
        b.incr("hits")
        c.incr("hits", 2)
        gevent.sleep(0)
    wait_for(lambda: a.get("hits") == b.get("hits") == c.get("hits") == 12000)
    wait_for(lambda: all(metadata_size(n) <= 10 for n in (a, b, c)))
    for _ in range(10):
        a.incr("hits")
    wait_for(lambda: c.get("hits") == 12010)


def test_setting_then_deleting_many_keys_gives_the_memory_back(members):
    a, b = members(2).nodes
    empty = metadata_size(a)
    for i in range(20000):
        a.set(("sessions", str(i)), {"user": i})
        if i % 1000 == 0:
            gevent.sleep(0)
    wait_for(lambda: len(b.get("sessions", {})) == 20000)
    for i in range(20000):
        b.delete(("sessions", str(i)))
        if i % 1000 == 0:
            gevent.sleep(0)
    wait_for(lambda: a.get("sessions") == {} == b.get("sessions"))
    wait_for(lambda: metadata_size(a) <= empty + 3 and metadata_size(b) <= empty + 3)
    # A late, older write cannot bring anything back: no operation that old can arrive, and
    # new writes still work.
    a.set(("sessions", "new"), 1)
    wait_for(lambda: b.get("sessions") == {"new": 1})


def test_short_down_timeout_forgets_and_refuses_the_returning_incarnation(members, caplog):
    m = members(3, down_timeout=0.5)
    a, b, c = m.nodes
    a.set("keep", 1)
    wait_for(lambda: c.get("keep") == 1)
    m.isolate(2)
    c.set("written_while_away", True)  # nobody else ever sees this incarnation's write
    a.delete("keep")
    wait_for(lambda: metadata_size(a) == 0 and metadata_size(b) == 0)  # tombstone forgotten
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        m.heal()
        wait_for(lambda: any("declared down" in r.getMessage() for r in caplog.records))
    refused_again(a, b)  # the returning incarnation dialed both since, and was refused
    assert a.get("written_while_away") is None
    # Restarted empty, the member rejoins and converges.
    c.stop(timeout=1)
    m.nodes[2] = c = m.make(2)
    wait_for(lambda: a.snapshot() == b.snapshot() == c.snapshot() == {})
    c.set("back", 1)
    wait_for(lambda: a.get("back") == 1 == b.get("back"))


def test_long_down_timeout_keeps_what_a_returning_member_needs(members):
    m = members(3, down_timeout=60)
    a, b, c = m.nodes
    a.set("keep", 1)
    c.set("old", 1)
    wait_for(lambda: c.get("keep") == 1 and a.get("old") == 1)
    m.isolate(2)
    c.set("written_while_away", True)
    c.set("keep", "from c")  # older than a's delete below
    gevent.sleep(0.01)
    a.delete("keep")
    c.delete("old")
    sync_intervals_pass(a, f"127.0.0.1:{m.public[1]}", 10)  # nothing forgotten meanwhile
    assert metadata_size(a) > 0
    m.heal()
    wait_for(lambda: a.snapshot() == b.snapshot() == c.snapshot())
    assert a.snapshot() == {"written_while_away": True}


# -- values an expiry hides until it is made permanent (issue 20) ------------------------------


def _session_store_collected_between_fire_and_expire():
    """A store whose session (set at 1,000 ms with a 2 s ttl) fired at 3,500 ms, swept by
    ``collect`` with a frontier past the SET but not past the expiry (the 2 s the frontier
    trails the expiry by, at most, on every member of a churning cluster)."""
    from test_store_property import new_store, real_stamp

    from gcollective._store import SET

    store = new_store()
    store.apply(real_stamp(1000, 0, 1), SET, ("sess", "k"), {"u": 1, "w": "x"}, 2000)
    store.advance(3500)
    assert store.to_dict() == {"sess": {}}
    frontier = real_stamp(2000, 0, 0)
    while not store.collect(frontier):
        pass
    return store


def test_a_fired_expiry_keeps_what_it_hides_until_it_is_made_permanent():
    """A member joining while its clock is still before the expiry (within clock_skew) shows
    the session with its values: ``collect`` kept them, as metadata that still matters (it
    dropped them as "metadata of nothing" once the frontier passed their stamp, so the
    joiner showed ``{"k": {}}``)."""
    from test_store_property import new_store, roundtrip

    holder = _session_store_collected_between_fire_and_expire()
    joiner = new_store()
    joiner.advance(2500)
    joiner.merge(roundtrip(holder.export()))
    assert joiner.to_dict() == {"sess": {"k": {"u": 1, "w": "x"}}}
    joiner.advance(3000)
    assert joiner.to_dict() == {"sess": {}}


def test_collect_passes_by_a_session_its_expiry_hides_and_expire_drops_it_all():
    """A pass does not visit the members of a session its own expiry hides (a churning
    tree is mostly those); once the frontier passes the expiry, ``expire`` and ``collect``
    forget all of it."""
    from test_store_property import real_stamp

    store = _session_store_collected_between_fire_and_expire()
    session = store._root._entries["sess"]._entries["k"]
    assert set(session.entries_copy()) == {"u", "w"}, "the hidden values were dropped"
    assert store._untidy, "a later pass must come back to it"
    frontier = real_stamp(4000, 0, 0)
    store.expire(frontier)
    while not store.collect(frontier):
        pass
    assert store.to_dict() == {"sess": {}}
    assert store._root._entries["sess"]._entries == {}


def _hypothesis_settings(max_examples: int):
    from test_store_property import _settings

    return _settings(max_examples)


try:  # (hypothesis is a test dependency; the helpers live with the property tests)
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    pass
else:

    @_hypothesis_settings(300)
    @given(st.data())
    def test_a_joiner_behind_the_holders_clock_sees_the_model_after_collect(data):
        """Whatever ttl operations a holder received and however far its time went, a
        joiner whose time is earlier (its clock behind, within clock_skew) merging the
        holder's export shows the model's fold at the joiner's time, also after the holder
        collected (and made permanent) what lies below a frontier the joiner's time has
        passed."""
        from test_store_property import (
            assert_tree,
            deliver,
            fold,
            new_store,
            real_stamp,
            roundtrip,
            ttl_op_sets,
        )

        ops = data.draw(ttl_op_sets(), label="ops")
        joiner_now = data.draw(st.integers(0, 45), label="the joiner's time")
        holder_now = data.draw(st.integers(joiner_now, 60), label="the holder's time")
        holder = new_store()
        deliver(holder, ops)
        holder.advance(holder_now)
        if data.draw(st.booleans(), label="collect"):
            frontier = real_stamp(joiner_now, 0, 0)
            holder.expire(frontier)
            while not holder.collect(frontier):
                pass
        joiner = new_store()
        joiner.advance(joiner_now)
        joiner.merge(roundtrip(holder.export()))
        assert_tree(joiner.to_dict(), fold(ops, joiner_now), f"ops: {ops!r}")


# -- what a pass gives back under churn (issue 20) ---------------------------------------------


def _churned_store(keys: int, hits: int):
    """A store where ``keys`` scratch keys under ``scratch`` were each set and deleted, and
    the counter ``hits`` incremented ``hits`` times, one millisecond apart."""
    from test_store_property import new_store, real_stamp

    from gcollective._store import DELETE, INCREMENT, SET

    store = new_store()
    for i in range(keys):
        store.apply(real_stamp(i, 0, 1), SET, ("scratch", str(i)), i, None)
        store.apply(real_stamp(i, 1, 1), DELETE, ("scratch", str(i)), None, None)
    for i in range(hits):
        store.apply(real_stamp(i, 2, 1), INCREMENT, ("hits",), 1, None)
    return store


def test_folding_a_hot_counters_events_gives_their_dict_back():
    """A counter's events dict grew with its hits; once ``collect`` folded the older ones it
    is made anew at the size of the events left (it kept its peak size, about twice that)."""
    from test_store_property import real_stamp

    store = _churned_store(0, 4000)
    counter = store._root._entries["hits"]
    peak = sys.getsizeof(counter.incs)
    while not store.collect(real_stamp(3000, 0, 0)):
        pass
    assert len(counter.incs) == 1000
    assert sys.getsizeof(counter.incs) < peak / 3, "the events' dict kept its peak size"
    from gcollective._store import INCREMENT

    for i in range(4000, 4300):  # (hits between two passes fit without growing it again)
        store.apply(real_stamp(i, 2, 1), INCREMENT, ("hits",), 1, None)
    assert store.get(("hits",)) == 4300


def test_a_counter_hit_steadily_keeps_its_events_dict_compact_at_every_pass():
    """A counter hit steadily (90 hits a second), its hits older than a frontier 12 s behind
    folded at each pass (once a second): after every pass that folded, its events take at
    most 48 B each in their dict (plus 2 KiB). At 64 B it regrew to three times its events
    and stayed there, and a churning member's counters, hit alike, grew together (issue
    20)."""
    from test_store_property import new_store, real_stamp

    from gcollective._store import INCREMENT

    store = new_store()
    hits = 0
    for second in range(40):
        for hit in range(90):
            store.apply(real_stamp(second * 1000 + hit * 11, hit, 1), INCREMENT, ("hits",), 1)
            hits += 1
        while not store.collect(real_stamp((second - 12) * 1000, 0, 0)):
            pass
        incs = store._root._entries["hits"].incs
        if second > 12:  # (the frontier passed the first hits: the pass folded some)
            assert sys.getsizeof(incs) <= 2048 + 48 * len(incs), f"after second {second}"
    assert store.get(("hits",)) == hits


def test_a_churning_parent_keeps_its_entries_dict_compact_at_every_pass():
    """A writer's sessions (400 a second, ttl=2 s) under one parent, each expiry made
    permanent once a frontier 12 s behind passed it, a pass after each second: its entries
    come and go (the new sessions, the fired ones dropped), and after every pass its dict
    takes at most 64 B an entry (plus 4 KiB). At 300 B it kept the size it grew to, 69 B an
    entry here (and 60-75 under ``--only churn``; issue 20)."""
    from test_store_property import new_store, real_stamp

    from gcollective._store import SET

    store = new_store()
    for second in range(40):
        for index in range(400):
            number = second * 400 + index
            stamp = real_stamp(1000 + second * 1000 + index * 2, 0, 1)
            store.apply(stamp, SET, ("s", str(number)), {"u": number}, 2000)
        store.advance(1000 + second * 1000 + 999)
        frontier = real_stamp(1000 + (second - 12) * 1000, 0, 0)
        store.expire(frontier)
        while not store.collect(frontier):
            pass
        entries = store._root._entries["s"]._entries
        if second > 20:  # (steady: as many sessions made as dropped each second)
            assert sys.getsizeof(entries) <= 4096 + 64 * len(entries), f"after second {second}"
    assert len(store.to_dict()["s"]) == 800  # (the last two seconds' sessions)


def test_a_round_of_housekeeping_forgets_every_tombstone_and_folds_every_hit_the_frontier_passed():
    """A writer's scratch keys (500 a second, each set then deleted) and a counter's hits
    under a frontier 12 s behind, then a round of housekeeping each second as a member does
    it (``collect`` in slices of 100 visits, at most 5,000 a round here, 50,000 in a
    member): a pass lists only what it may forget (tombstones older than the frontier, not
    the newer ones nor plain leaves), so it ends within the round, and after each round no
    tombstone nor hit older than the frontier is left. When a pass visited every tombstone
    it needed two rounds here (and in a churning member), and they waited (issue 20)."""
    from test_store_property import new_store, real_stamp

    from gcollective._store import DELETE, INCREMENT, SET

    store = new_store()
    hits = 0
    for second in range(30):
        for index in range(500):
            millis = 1000 + second * 1000 + index * 2
            key = ("scratch", f"{second}.{index}")
            store.apply(real_stamp(millis, 0, 1), SET, key, index)
            store.apply(real_stamp(millis, 1, 1), DELETE, key, None)
            store.apply(real_stamp(millis, 2, 1), INCREMENT, ("hits",), 1)
            hits += 1
        frontier = real_stamp(1000 + (second - 12) * 1000, 0, 0)
        for _ in range(50):
            if store.collect(frontier, 100):
                break
        scratch = store._root._entries["scratch"]._entries
        assert not [stamp for stamp in scratch.values() if stamp < frontier], second
        increments = store._root._entries["hits"].incs
        assert min(increments) >= frontier, f"hits older than the frontier after {second}"
    assert store.get(("hits",)) == hits and store.get(("scratch",)) == {}
