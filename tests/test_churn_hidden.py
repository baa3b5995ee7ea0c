"""Property tests: what a fired expiry hides, kept compactly until it is permanent (issue 20).

A session (a dict SET with a ttl) whose expiry fired keeps its members' values until
``expire`` makes the expiry permanent: a late operation older than the expiry may still
arrive, and a member whose clock is behind shows them if it joins now. A node with ttl
events keeps the values of its bare children in ``_Node.hidden`` meanwhile (not a node per
member), the fired expiries wait in ``_due`` as runs of siblings (``_DueRun``), and the
tombstone an expired session leaves is forgotten at once. Whatever comes (late writes below
a session or at it, time steps, hard expiry and collection), the store must hold the
reference model's tree, and so must a joiner whose clock is behind the holder's, merging
its export (in one go, and in pieces).
"""

from __future__ import annotations

import sys
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from test_store_property import (
    DELETE,
    INCREMENT,
    NODE_IDS,
    SET,
    Op,
    _settings,
    _through_the_wire_in_pieces,
    assert_tree,
    assert_ttl_first,
    deliver,
    fold,
    json_leaves,
    new_store,
    real_stamp,
    roundtrip,
    small_ints,
)

from gcollective._tree import MISSING, _Node, is_plain

KEYS = ("a", "b", "c")
SESSIONS = st.dictionaries(
    st.sampled_from(["u", "w"]),
    st.one_of(json_leaves, st.dictionaries(st.sampled_from(["x", "y"]), json_leaves, max_size=2)),
    max_size=2,
)


def _bodies() -> st.SearchStrategy:
    """Operations under ``s``: sessions most, and what may meet one late (a write or delete
    below it, deeper below, a SET of it with or without a ttl, an increment of it)."""
    key = st.sampled_from(KEYS).map(lambda k: ("s", k))
    member = st.tuples(st.sampled_from(KEYS), st.sampled_from(["u", "w", "v"])).map(
        lambda km: ("s", *km)
    )
    deep = member.map(lambda path: (*path, "x"))
    ttl = st.one_of(st.none(), st.integers(1, 12))
    return st.one_of(
        st.tuples(st.just(SET), key, SESSIONS, st.integers(1, 12)),
        st.tuples(st.just(SET), key, SESSIONS, st.integers(1, 12)),
        st.tuples(st.just(SET), member, small_ints, st.none()),
        st.tuples(st.just(DELETE), member, st.none(), st.none()),
        st.tuples(st.just(SET), deep, small_ints, st.none()),
        st.tuples(st.just(SET), key, small_ints, ttl),
        st.tuples(st.just(INCREMENT), key, small_ints, ttl),
        st.tuples(st.just(INCREMENT), member, small_ints, ttl),
    )


def _hidden_nodes(node: _Node) -> tuple[int, int]:
    """(values kept in ``hidden``, plain nodes kept for a hidden value under a node with ttl
    events: what ``hidden`` replaces) in the subtree of ``node``."""
    kept = len(node.hidden or ())
    as_nodes = 0
    for entry in node._entries.values():
        if type(entry) is not _Node:
            continue
        if (
            node.ttls is not None
            and is_plain(entry)
            and entry.value is MISSING
            and entry.assigned_value is not MISSING
        ):
            as_nodes += 1
        below = _hidden_nodes(entry)
        kept, as_nodes = kept + below[0], as_nodes + below[1]
    return kept, as_nodes


def _check_joiners(holder: Any, received: list[Op], now: int, collected: int, data: Any) -> None:
    """A member whose clock is behind ``now`` (not behind the last frontier's millisecond:
    no clock is that far off) merging ``holder``'s export, whole and in pieces, holds the
    model's tree at its time, then at ``now``."""
    behind = data.draw(st.integers(min(collected, now), now), label="joiner's now")
    exported = roundtrip(holder.export())
    whole, pieces = new_store(), new_store()
    for joiner in (whole, pieces):
        joiner.advance(behind)
    whole.merge(exported)
    for items in _through_the_wire_in_pieces(holder, 200, data.draw(st.sampled_from([1, 3]))):
        pieces.merge(items)
    context = f"joiner at {behind}, holder at {now}, ops: {received!r}"
    for joiner in (whole, pieces):
        assert_tree(joiner.to_dict(), fold(received, behind), context)
        joiner.advance(now)
        assert_tree(joiner.to_dict(), fold(received, now), context)


@_settings(max_examples=400)
@given(st.data())
def test_fired_sessions_kept_compactly_match_the_model(data: st.DataObject) -> None:
    """Sessions fire, late operations meet them (older than their expiry, or newer), their
    expiries are made permanent and the metadata collected at frontiers that trail time: the
    holder, and joiners behind it, hold the model's tree at every step."""
    steps = data.draw(st.lists(st.integers(0, 5), min_size=3, max_size=30), label="steps")
    holder = new_store()
    received: list[Op] = []
    millis, now = 0, 0
    collected = 0  # the millisecond of the last frontier: no operation comes from before
    for counter, step in enumerate(steps, 1):
        if step == 0:  # time goes on (expiries fire), sometimes made permanent and collected
            now = data.draw(st.integers(now, max(now, millis + 14)), label="now")
            holder.advance(now)
            if data.draw(st.booleans(), label="hard"):
                upto = data.draw(st.integers(collected, max(collected, min(millis, now))))
                frontier = real_stamp(upto, 0, 0)  # (no later operation is older)
                collected = upto
                holder.expire(frontier)
                while not holder.collect(frontier):
                    pass
        else:
            millis += data.draw(st.integers(0, 3), label="millis")
            late = data.draw(st.integers(0, min(millis - collected, 6)), label="late")
            origin = data.draw(st.sampled_from(NODE_IDS), label="origin")
            operation = Op(real_stamp(millis - late, counter, origin), *data.draw(_bodies()))
            deliver(holder, [operation])
            received.append(operation)
        context = f"now={now}, ops: {received!r}"
        assert_tree(holder.to_dict(), fold(received, now), context)
        assert_ttl_first(holder._root, context)
        kept, as_nodes = _hidden_nodes(holder._root)
        assert not as_nodes, context
        if kept:
            event("values kept hidden")
        assert holder.pending_expiries >= len(holder._due)
    _check_joiners(holder, received, now, collected, data)
    holder.advance(now + 60)
    assert_tree(holder.to_dict(), fold(received, now + 60), f"ops: {received!r}")


def test_a_joiner_behind_sees_a_fired_sessions_values_and_late_write() -> None:
    """A session fired at the holder; a write below it older than its expiry arrives late.
    A member joining with its clock before the expiry shows the session with both (the
    values kept in ``hidden`` travel as leaves with values); after it, nothing."""
    ops = [
        Op(real_stamp(1000, 0, 1), SET, ("s", "k"), {"u": 1, "w": {"x": 2}}, 2000),
        Op(real_stamp(2000, 0, 2), SET, ("s", "k", "v"), 3),
    ]
    holder = new_store()
    deliver(holder, ops[:1])
    holder.advance(3500)
    deliver(holder, ops[1:])
    assert holder.to_dict() == {"s": {}}
    session = holder._root.entries["s"].entries["k"]
    assert session.hidden == {"u": 1, "v": 3}  # (``w``: a dict, a node of its own)
    joiner = new_store()
    joiner.advance(2500)
    joiner.merge(roundtrip(holder.export()))
    assert joiner.to_dict() == fold(ops, 2500) == {"s": {"k": {"u": 1, "w": {"x": 2}, "v": 3}}}
    joiner.advance(3001)
    assert joiner.to_dict() == {"s": {}}


def test_an_expired_sessions_tombstone_is_forgotten_with_its_expiry() -> None:
    """``expire`` forgets the tombstone an expired session leaves (older than the frontier)
    rather than leaving a node for ``collect``; its fired expiries wait as one ``_due``
    entry for the run of siblings."""
    holder = new_store()
    for index in range(50):
        stamp = real_stamp(1000 + index, 0, 1)
        deliver(holder, [Op(stamp, SET, ("s", f"k{index}"), {"u": index}, 2000)])
    holder.advance(4000)
    assert holder.to_dict() == {"s": {}}
    assert len(holder._due) == 1 and holder.pending_expiries == 50
    assert holder.expire(real_stamp(5000, 0, 0)) == 50
    assert holder._root.entries["s"].entries == {}
    assert holder.pending_expiries == 0


def test_a_parent_emptied_by_expire_gives_its_memory_back_at_the_next_pass() -> None:
    """``expire`` forgets expired sessions itself, so ``collect`` counts no drop there; its
    next pass still makes the parent's dicts anew once they are mostly empty slots (a
    Python dict never shrinks by itself), as it does for what it drops."""
    holder = new_store()
    ops = [
        Op(real_stamp(1000 + index // 10, index % 10, 1), SET, ("s", str(index)), {"u": 1}, 2000)
        for index in range(5000)
    ]
    deliver(holder, ops)
    holder.advance(5000)
    frontier = real_stamp(6000, 0, 0)
    assert holder.expire(frontier) == 5000
    parent = holder._root.entries["s"]
    assert not parent.entries and sys.getsizeof(parent.entries) > 100_000
    while not holder.collect(frontier):
        pass
    assert sys.getsizeof(parent.entries) < 1000
    assert holder.to_dict() == fold(ops, 5000) == {"s": {}}
