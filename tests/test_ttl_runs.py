"""Property tests: received sessions kept as a pending run on their parent (issue 20).

A received batch of new sessions (dicts SET with a ttl at keys new under one parent) waits on
the parent as a run (``_tree.Sessions``) with one expiry entry for the run
(``Expiries.pend_run``); each session's node is built only when something reads the parent's
entries. Whatever comes after (more batches, overwrites, writes below a session, time steps
that fire the run's entry, a snapshot in pieces, hard expiry and collection), the store must
hold what the general way (the same operations one by one) holds, metadata included, and the
reference model's tree.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from cluster import wait_for
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
    deliver_as_batch,
    fold,
    json_leaves,
    new_store,
    real_stamp,
    roundtrip,
    small_ints,
)

from gcollective._tree import Sessions

PARENTS = (("s",), ("t",))
# The members' options (the ``members`` fixture's): frames small enough that a few
# thousand sessions under one parent go in a snapshot in pieces (``Store.export_pieces``).
FAST = {"max_frame": 1 << 17}
# What makes the parent ``s`` (a writer's first batch there goes one by one, making it).
PARENT_MADE = Op(real_stamp(0, 0, 3), SET, ("s", "z"), 0)
KEYS = ("a", "b", "c", "d", "e")
SESSIONS = st.dictionaries(
    st.sampled_from(["u", "w", "n"]),
    st.one_of(json_leaves, st.dictionaries(st.sampled_from(["x", "y"]), json_leaves, max_size=2)),
    max_size=3,
)


def _bodies(parent: tuple[str, ...]) -> st.SearchStrategy:
    """Operations of one batch under ``parent``: new sessions most, and what meets them (the
    same key again, a hit, a plain SET or DELETE of a key, a SET without ttl)."""
    key = st.sampled_from(KEYS).map(lambda k: (*parent, k))
    session = st.tuples(st.just(SET), key, SESSIONS, st.integers(1, 30))
    hit = st.tuples(st.just(INCREMENT), key, small_ints, st.integers(1, 30))
    plain = st.tuples(st.just(SET), key, json_leaves, st.just(None))
    gone = st.tuples(st.just(DELETE), key, st.none(), st.none())
    return st.one_of(session, session, session, hit, plain, gone)


def _after_bodies() -> st.SearchStrategy:
    """Operations one by one afterwards: at a session, below one, at its parent."""
    path = st.sampled_from(
        [("s", "a"), ("s", "b", "u"), ("s", "c", "u", "x"), ("s",), ("t", "d"), ("t", "e", "n")]
    )
    return st.one_of(
        st.tuples(st.just(SET), path, st.one_of(json_leaves, SESSIONS), st.none()),
        st.tuples(st.just(SET), path, SESSIONS, st.integers(1, 30)),
        st.tuples(st.just(INCREMENT), path, small_ints, st.none()),
        st.tuples(st.just(DELETE), path, st.none(), st.none()),
    )


def _pending_sessions(store: Any) -> int:
    """How many sessions wait in pending runs of the store's top-level nodes."""
    count = 0
    for entry in store._root._entries.values():
        for run in getattr(entry, "runs", None) or ():
            if type(run[2]) is Sessions:
                count += len(run[0])
    return count


@st.composite
def _batches(draw: st.DrawFn) -> list[tuple[tuple[str, ...], list[Op], int]]:
    """Batches ``(parent, ops, now)``: each one origin's, stamps growing, under one parent,
    delivered when the store's time is ``now`` (not going back)."""
    batches = []
    now = 0
    millis = 0
    made = 10  # (the logical counter: stamps unique across the batches, past the parents')
    for _ in range(draw(st.integers(1, 4), label="batches")):
        parent = draw(st.sampled_from(PARENTS), label="parent")
        origin = draw(st.sampled_from(NODE_IDS), label="origin")
        bodies = draw(st.lists(_bodies(parent), min_size=1, max_size=8), label="bodies")
        ops = []
        for body in bodies:
            millis += draw(st.integers(0, 2), label="step")
            made += 1
            ops.append(Op(real_stamp(millis, made, origin), *body))
        now = draw(st.integers(now, now + 20), label="now")
        batches.append((parent, ops, now))
    return batches


@_settings(max_examples=400)
@given(st.data())
def test_sessions_kept_as_runs_match_one_by_one(data: st.DataObject) -> None:
    """Batches of received sessions under two parents, with time steps between them (which
    may fire a run's entry), delivered as ``apply_batch`` to one store and op by op to
    another: the same metadata and the model's tree after each; a snapshot of it in pieces
    merges to the same; then later time steps (in small slices), hard expiry, collection and
    later operations at and below the sessions leave both alike."""
    batches = data.draw(_batches(), label="batches")
    batched, one_by_one = new_store(), new_store()
    # The parents exist (a writer's first batch makes its own, one by one).
    received = [Op(real_stamp(0, i, 3), SET, (*p, "z"), 0) for i, p in enumerate(PARENTS)]
    for store in (batched, one_by_one):
        deliver(store, received)
    for parent, ops, now in batches:
        for store in (batched, one_by_one):
            store.advance(now)
        deliver_as_batch(batched, ops, parent)
        deliver(one_by_one, ops)
        received += ops
        event(f"sessions pending in runs: {min(_pending_sessions(batched), 3)}")
        context = f"batches: {batches!r}"
        assert_tree(batched.to_dict(), fold(received, batched.now_ms), context)
        assert roundtrip(batched.export()) == roundtrip(one_by_one.export()), context
    pieces, whole = new_store(), new_store()
    for items in _through_the_wire_in_pieces(batched, 200, data.draw(st.sampled_from([1, 3]))):
        pieces.merge(items)
    whole.merge(roundtrip(one_by_one.export()))
    assert roundtrip(pieces.export()) == roundtrip(whole.export()), context
    later = data.draw(st.integers(batched.now_ms, max(batched.now_ms, 70)), label="later")
    after = data.draw(st.lists(_after_bodies(), max_size=4), label="after")
    after_ops = [Op(real_stamp(100 + i, 0, 1), *body) for i, body in enumerate(after)]
    frontier = data.draw(st.integers(0, 100), label="frontier millis")
    for store in (batched, one_by_one):
        store.advance(later, budget=2)
        while store.next_expiry <= later:  # (a slice at a time, as a member does)
            store.advance(later, budget=2)
        store.expire(real_stamp(frontier, 0, 0))
        while not store.collect(real_stamp(frontier, 0, 0)):
            pass
    context += f", later={later}, frontier={frontier}"
    assert_tree(batched.to_dict(), fold(received, later), context)
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export()), context
    for store in (batched, one_by_one):
        deliver(store, after_ops)
        store.advance(200)
    context += f", after={after_ops!r}"
    assert_ttl_first(batched._root, context)
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export()), context
    assert_tree(batched.to_dict(), fold(received + after_ops, 200), context)
    for store in (batched, one_by_one):
        store.expire(real_stamp(300, 0, 0))
    assert batched.pending_expiries == one_by_one.pending_expiries == 0, context


def test_a_batch_of_new_sessions_waits_as_one_run_with_one_expiry_entry() -> None:
    """Three received sessions: no node built, one ``_pending`` entry (counted as three),
    their values readable; the entry firing expires each, as one by one."""
    batched, one_by_one = new_store(), new_store()
    ops = [
        Op(real_stamp(1, i, 2), SET, ("s", key), {"u": i, "in": {"x": i}}, 10)
        for i, key in enumerate("abc")
    ]
    for store in (batched, one_by_one):
        deliver(store, [PARENT_MADE])
        store.advance(0)
    deliver_as_batch(batched, ops, ("s",))
    deliver(one_by_one, ops)
    parent = batched._root._entries["s"]
    assert [type(run[2]) for run in parent.runs] == [Sessions]
    assert list(parent._entries) == ["z"] and len(batched._pending) == 1
    assert batched.pending_expiries == one_by_one.pending_expiries == 3
    assert batched.get(["s", "b", "in"]) == {"x": 1}
    assert batched.next_expiry == one_by_one.next_expiry == 11
    fired = [sorted(store.advance(11)) for store in (batched, one_by_one)]
    assert fired[0] == fired[1] == [(("s", key), op.stamp) for key, op in zip("abc", ops)]
    assert batched.to_dict() == one_by_one.to_dict() == {"s": {"z": 0}}
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())


def test_a_later_write_below_a_pending_session_builds_it_first() -> None:
    """A write below a session still in a run (and a read of the parent's entries) finds it a
    node with its ttl event, as one by one: the write is cancelled by its expiry too."""
    session = Op(real_stamp(1, 0, 2), SET, ("s", "a"), {"u": 1}, 10)
    below = Op(real_stamp(2, 0, 3), SET, ("s", "a", "w"), {"k": 2}, None)
    batched, one_by_one = new_store(), new_store()
    for store in (batched, one_by_one):
        deliver(store, [PARENT_MADE])
    deliver_as_batch(batched, [session], ("s",))
    deliver(one_by_one, [session])
    for store in (batched, one_by_one):
        deliver(store, [below])
    assert batched.to_dict() == {"s": {"z": 0, "a": {"u": 1, "w": {"k": 2}}}}
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())
    for store in (batched, one_by_one):
        store.advance(11)
    assert batched.to_dict() == one_by_one.to_dict() == fold([PARENT_MADE, session, below], 11)
    assert copy.deepcopy(batched.export()) == copy.deepcopy(one_by_one.export())


@_settings(max_examples=300)
@given(st.data())
def test_own_sessions_sharing_run_entries_expire_as_the_model(data: st.DataObject) -> None:
    """A writer's own sessions and leaves with a ttl (``assign_key``, as ``Collective.set``
    makes them) under two parents, with ttls that shorten and grow, and time steps between
    them (which pop the run entry they share, see ``Expiries._pend_first``): after each step
    the tree is the model's, and once all are due every one has expired."""
    steps = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(PARENTS),
                st.sampled_from(KEYS),
                st.one_of(SESSIONS, json_leaves),
                st.integers(1, 8),
                st.integers(0, 3),  # milliseconds on
                st.booleans(),  # a time step after it
            ),
            min_size=1,
            max_size=20,
        ),
        label="steps",
    )
    store = new_store()
    store.advance(0)
    made: list[Op] = []
    millis = 0
    for parent, key, value, ttl, step, advance in steps:
        millis += step
        op = Op(real_stamp(millis, len(made), 1), SET, (*parent, key), value, ttl)
        made.append(op)
        store.assign_key(op.stamp, ".".join(op.path), copy.deepcopy(value), ttl)
        if advance:
            store.advance(millis, budget=1)
            while store.next_expiry <= millis:
                store.advance(millis, budget=1)
            assert_tree(store.to_dict(), fold(made, millis), f"made: {made!r}")
    for later in (millis + 5, millis + 40):
        while store.next_expiry <= later:
            store.advance(later, budget=3)
        store.advance(later)
        assert_tree(store.to_dict(), fold(made, later), f"made: {made!r}, later={later}")
    store.expire(real_stamp(1000, 0, 0))
    assert store.pending_expiries == 0


def test_a_joiner_gets_sessions_a_member_holds_as_a_run_and_expires_them(members) -> None:
    """Sessions that reached a member in frames wait there as runs; with their writer gone,
    a member joining later gets them by that member's snapshot (in pieces: more than a
    frame's worth under one parent), each with its ttl, and every one expires on both (the
    run's one expiry entry, then each session's)."""
    a, b = members(2)
    a.set("sess.first", 0)  # (the parent: a writer's first frame there goes one by one)
    wait_for(lambda: b.get("sess.first") == 0, what="the parent replicated")
    ttl, count = 4.0, 3000  # long enough to replicate and join before they expire
    written = time.time()
    for i in range(count):
        a.set(f"sess.s{i}", {"u": i, "tags": {"n": i}}, ttl=ttl)
    wait_for(lambda: b.get(f"sess.s{count - 1}") is not None, what="the sessions replicated")
    parent = b._store._root.entries["sess"]
    assert any(type(run[2]) is Sessions for run in parent.runs or ()), "not kept as a run"
    a.stop(timeout=1)
    c = members.join()  # (an address nobody lists: all it holds comes by b's snapshot)
    wait_for(lambda: c.synced, what="the joiner synced")
    held = [c.get(f"sess.s{i}") for i in range(count)]
    assert time.time() < written + ttl, "the join took longer than the ttl: raise it"
    assert held == [{"u": i, "tags": {"n": i}} for i in range(count)]
    assert c._store.pending_expiries >= count
    wait_for(
        lambda: all(n.get("sess") == {"first": 0} for n in (b, c)),
        timeout=ttl + 30,
        what="every session expired on both",
    )


# -- a writer's own counter hits re-armed (issue 20: ``Ways.increment_key``) ---------------------

COUNTERS = (("r", "k0"), ("r", "k1"))


def _others_bodies() -> st.SearchStrategy:
    """Other members' operations among a writer's hits: their hits (with or without a ttl,
    floats too), a SET or DELETE of a counter or of its parent, a write below a counter."""
    counter = st.sampled_from(COUNTERS)
    ttl = st.one_of(st.none(), st.integers(1, 30))
    return st.one_of(
        st.tuples(st.just(INCREMENT), counter, small_ints, ttl),
        st.tuples(st.just(INCREMENT), counter, st.just(0.5), st.integers(1, 30)),
        st.tuples(st.just(SET), counter, small_ints, ttl),
        st.tuples(st.just(DELETE), st.sampled_from([*COUNTERS, ("r",)]), st.none(), st.none()),
        st.tuples(st.just(SET), st.just(("r", "k0", "u")), small_ints, st.none()),
    )


@_settings(max_examples=500)
@given(st.data())
def test_own_counter_hits_rearmed_match_one_by_one(data: st.DataObject) -> None:
    """A writer's own hits (``increment_key`` with a ttl, whose ttl event ``increment_key`` records
    in a few steps when the counter's earliest expiry has not fired and is no later) leave
    the store as ``apply`` one by one does, metadata included, and as the model: ttls that
    shorten or lengthen, time steps that fire expiries, other members' operations at any
    stamp among them, hard expiry and collection."""
    writer = 1
    steps = data.draw(st.lists(st.integers(0, 6), min_size=4, max_size=40), label="steps")
    fast, plain = new_store(), new_store()
    received: list[Op] = []
    millis, counter, now = 0, 0, 0
    collected = 0  # the millisecond of the last frontier: no operation comes from before
    rearmed = 0
    for step in steps:
        counter += 1
        if step == 0:  # time goes on (expiries fire), sometimes made permanent and collected
            now = data.draw(st.integers(now, max(now, millis + 10)), label="now")
            for store in (fast, plain):
                store.advance(now)
            if data.draw(st.booleans(), label="hard"):
                frontier = real_stamp(millis, 0, 0)  # (no later operation is older)
                collected = millis
                for store in (fast, plain):
                    store.expire(frontier)
                    while not store.collect(frontier):
                        pass
            continue
        millis += data.draw(st.integers(0, 3), label="millis")
        if step == 1:  # another member's, at a stamp among the writer's (or older)
            late = data.draw(st.integers(0, min(millis - collected, 4)), label="late")
            origin = data.draw(st.sampled_from(NODE_IDS[1:]), label="origin")
            body = data.draw(_others_bodies(), label="other")
            operation = Op(real_stamp(millis - late, counter, origin), *body)
            deliver(fast, [operation])
        else:  # the writer's own hit, its stamp newer than everything it applied
            path = data.draw(st.sampled_from(COUNTERS), label="counter")
            ttl = data.draw(st.integers(1, 20), label="ttl")
            # (another origin now and then: the store keeps no origin of its own)
            origin = writer if data.draw(st.integers(0, 3), label="writer") else NODE_IDS[1]
            operation = Op(real_stamp(millis, counter, origin), INCREMENT, path, 1, ttl)
            ttls_before = _ttl_count(fast, path)
            # (the way cached at once: the policy would wait for a loop after others' ops)
            fast.cache_way("r", ("r",), operation.stamp)
            if fast.increment_key(operation.stamp, ".".join(path), 1, ttl) is None:
                deliver(fast, [operation])
            elif ttls_before:
                rearmed += 1
        deliver(plain, [operation])
        received.append(operation)
        context = f"now={now}, ops: {received!r}"
        assert roundtrip(fast.export()) == roundtrip(plain.export()), context
        assert_tree(fast.to_dict(), fold(received, now), context)
        assert_ttl_first(fast._root, context)
    event("re-armed" if rearmed else "no re-arm")
    for store in (fast, plain):
        store.advance(now + 60)
    assert roundtrip(fast.export()) == roundtrip(plain.export())
    assert_tree(fast.to_dict(), fold(received, now + 60), f"ops: {received!r}")


def test_an_own_hit_with_a_shorter_ttl_after_a_replaced_expiry_fired_expires_on_time() -> None:
    """A counter's first hit expires at 5 ms, its second (at 3 ms) at 23 ms: at 6 ms the
    first expiry fired without owning the counter. A hit at 7 ms with a ttl of 2 ms owns it
    and expires at 9 ms, before the entry the counter has (at 23 ms): re-arming it must
    register its own, as ``_record_ttl`` does when the earliest expiry has fired."""
    ops = [
        Op(real_stamp(0, 1, 1), INCREMENT, ("r", "k0"), 1, 5),
        Op(real_stamp(3, 2, 1), INCREMENT, ("r", "k0"), 1, 20),
        Op(real_stamp(7, 3, 1), INCREMENT, ("r", "k0"), 1, 2),
    ]
    fast, plain = new_store(), new_store()
    for operation in ops:
        if operation.stamp >> 80 == 7:
            for store in (fast, plain):
                store.advance(6)
        assert fast.cache_way("r", ("r",), operation.stamp) or operation is ops[0]
        if fast.increment_key(operation.stamp, "r.k0", 1, operation.ttl) is None:
            deliver(fast, [operation])
        deliver(plain, [operation])
    for store in (fast, plain):
        store.advance(9)
    assert roundtrip(fast.export()) == roundtrip(plain.export())
    assert_tree(fast.to_dict(), fold(ops, 9))
    assert fast.to_dict() == {"r": {}}


def _ttl_count(store: Any, path: tuple[str, ...]) -> int:
    """How many ttl events the node at ``path`` holds (0 if it is not a node)."""
    node: Any = store._root
    for segment in path:
        node = node.entries.get(segment) if type(node) is not int else None
        if node is None or type(node) is int:
            return 0
    return len(node.ttls or ())


# -- a writer's own new sessions kept as a run (issue 20: ``Ways.assign_flat``) --------------

OWN_KEYS = ("a", "b", "c")
FLAT_SESSIONS = st.dictionaries(st.sampled_from(["u", "w"]), small_ints, max_size=2)


def _own_session_steps() -> st.SearchStrategy:
    """A writer's steps: new sessions most (a fresh key under ``s`` or ``t``, or one of
    ``OWN_KEYS`` that may be there already), and what meets them: its own SET, DELETE,
    int hit (with or without a ttl) of a key or below one, others' operations at any
    stamp, a time step, a snapshot merged into a new store, expiry and collection."""
    parent = st.sampled_from([*[PARENTS[0]] * 5, PARENTS[1]])  # (mostly in a row: the way)
    key = st.one_of(st.just(None), st.just(None), st.sampled_from(OWN_KEYS))  # None: fresh
    ttl = st.integers(1, 30)
    below = st.sampled_from([(), (), ("u",)])
    return st.one_of(
        *[st.tuples(st.just("session"), parent, key, FLAT_SESSIONS, ttl, st.integers(1, 24))] * 4,
        st.tuples(st.just("set"), parent, key, below, small_ints),
        st.tuples(st.just("delete"), parent, key, below),
        st.tuples(st.just("hit"), parent, key, below, st.one_of(st.none(), ttl)),
        st.tuples(st.just("other"), st.sampled_from([SET, DELETE, INCREMENT]), parent, key, below),
        st.tuples(st.just("time"), st.integers(0, 12)),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("collect"), st.integers(0, 40)),
    )


def _own_run_keys(store: Any) -> int:
    """How many keys wait in a writer's own pending runs of sessions (``Sessions.stamped``)."""
    count = 0
    for entry in store._root._entries.values():
        for run in getattr(entry, "runs", None) or ():
            if type(run[2]) is Sessions and run[2].stamped:
                count += len(run[0])
    return count


@_settings(max_examples=400)
@given(st.data())
def test_own_new_sessions_kept_as_a_run_match_apply(data: st.DataObject) -> None:
    """A writer's new sessions (``assign_key`` of a flat dict with a ttl, as
    ``Collective.set`` makes them) wait as a pending run on their parent, each a bare stamp
    until something reads the entries. Whatever meets them (own sets, deletes and hits of
    them or below them through the way's fast paths, others' operations late or not, time
    steps that fire the run's entry, snapshots, expiry and collection), the store holds the
    same metadata as ``apply`` one by one and the model's tree."""
    steps = data.draw(st.lists(_own_session_steps(), min_size=1, max_size=30), label="steps")
    own, plain = new_store(), new_store()
    made = [Op(real_stamp(0, i, 3), SET, (*p, "z"), 0) for i, p in enumerate(PARENTS)]
    for store in (own, plain):
        deliver(store, made)
        store.advance(0)
    millis, counter, fresh, now = 1, 10, 0, 0
    pending_seen = 0
    for index, step in enumerate(steps):
        kind = step[0]
        counter += 1
        if kind == "time":
            now += step[1]
            for store in (own, plain):
                while store.next_expiry <= now:
                    store.advance(now, budget=1)
                store.advance(now)
        elif kind == "snapshot":
            # A snapshot of the other reaching the writer, its own sessions still pending;
            # then a joiner of the writer (in pieces, read from the live store: that records
            # its runs) holds what a joiner of the other holds.
            snapshot = roundtrip(plain.export())
            for store in (own, plain):
                store.merge(copy.deepcopy(snapshot))
            assert roundtrip(own.export()) == roundtrip(plain.export()), f"steps: {steps!r}"
            pieces, whole = new_store(), new_store()
            leaves = data.draw(st.sampled_from([0, 1, 3]), label="leaves a piece")
            for items in _through_the_wire_in_pieces(own, 200, leaves):
                pieces.merge(items)
            whole.merge(roundtrip(plain.export()))
            assert roundtrip(pieces.export()) == roundtrip(whole.export()), f"steps: {steps!r}"
        elif kind == "collect":
            frontier = real_stamp(max(0, millis - step[1]), 0, 0)
            for store in (own, plain):
                store.expire(frontier)
                while not store.collect(frontier):
                    pass
        elif kind == "other":
            _, op, parent, key, below = step
            late = data.draw(st.integers(0, millis), label="other's millis")
            path = (*parent, key or f"n{fresh}", *below)
            value = None if op == DELETE else 1
            operation = Op(real_stamp(late, counter, 2), op, path, value)
            made.append(operation)
            deliver(own, [operation])
            deliver(plain, [operation])
        else:
            millis += data.draw(st.integers(0, 2), label="millis on")
            parent, key = step[1], step[2]
            if key is None and kind == "session":
                fresh += 1
                key = f"n{fresh}"
            elif key is None:
                key = f"n{fresh - data.draw(st.integers(0, 3), label='back')}"  # (a recent one)
            if kind == "session":
                path, op, value, ttl = (*parent, key), SET, step[3], step[4]
                for _ in range(step[5] - 1):  # a writer's loop: fresh keys in a row first
                    fresh += 1
                    counter += 1
                    session = Op(
                        real_stamp(millis, counter, 1), SET, (*parent, f"n{fresh}"), value, ttl
                    )
                    made.append(session)
                    own.assign_key(session.stamp, ".".join(session.path), dict(value), ttl, True)
                    deliver(plain, [session])
                counter += 1
            elif kind == "set":
                path, op, value, ttl = (*parent, key, *step[3]), SET, step[4], None
            elif kind == "delete":
                path, op, value, ttl = (*parent, key, *step[3]), DELETE, None, None
            else:
                path, op, value, ttl = (*parent, key, *step[3]), INCREMENT, 1, step[4]
            operation = Op(real_stamp(millis, counter, 1), op, path, value, ttl)
            made.append(operation)
            dotted = ".".join(path)
            if op == SET and ttl:
                own.assign_key(operation.stamp, dotted, copy.deepcopy(value), ttl, True)
            elif op == SET:
                own.set_key(operation.stamp, dotted, value)
            elif op == DELETE:
                if not own.delete_key(operation.stamp, dotted):
                    deliver(own, [operation])
            elif own.increment_key(operation.stamp, dotted, 1, ttl or 0) is None:
                deliver(own, [operation])
            deliver(plain, [operation])
            pending_seen = max(pending_seen, _own_run_keys(own))
        context = f"steps: {steps!r}, at {index}"
        assert roundtrip(own.export()) == roundtrip(plain.export()), context
        assert_tree(own.to_dict(), fold(made, now), context)
        assert own.next_expiry == plain.next_expiry or own.next_expiry <= plain.next_expiry
    event(f"own sessions pending at once: {min(pending_seen, 3)}+")
    later = millis + 40
    for store in (own, plain):
        while store.next_expiry <= later:
            store.advance(later, budget=2)
        store.advance(later)
    assert roundtrip(own.export()) == roundtrip(plain.export()), f"steps: {steps!r}"
    assert_tree(own.to_dict(), fold(made, later), f"steps: {steps!r}")


def test_own_sessions_wait_as_one_run_and_expire() -> None:
    """A writer's loop of new sessions under one parent: one pending run of bare stamps
    (no node each) with one expiry entry, the values readable at once; a set, a delete and
    a write below three of them act on them as on any session; all the others expire on
    time."""
    store = new_store()
    store.advance(0)
    deliver(store, [Op(real_stamp(0, 0, 3), SET, ("s", "z"), 0)])
    counter = 1
    for j in range(50):
        counter += 1
        store.assign_key(real_stamp(1, counter, 1), f"s.k{j}", {"u": j}, 10, True)
    parent = store._root._entries["s"]
    # (The first keys under a parent go the general way, until the way is cached.)
    assert _own_run_keys(store) >= 40, "not kept as a run"
    assert parent._entries["k17"] == real_stamp(1, 19, 1)  # a bare stamp, not a node
    assert len(store._pending) <= 2  # (the run's entry, and the general way's run's)
    assert store.get(("s", "k7")) == {"u": 7}
    store.set_key(real_stamp(2, 1, 1), "s.k21", "plain")
    assert store.delete_key(real_stamp(2, 2, 1), "s.k22")
    store.apply(real_stamp(2, 3, 1), SET, ("s", "k23", "w"), 5)  # (records the run first)
    assert store.get(("s", "k23")) == {"u": 23, "w": 5}
    store.advance(11)
    while store.next_expiry <= 11:
        store.advance(11)
    expected = {"z": 0, "k21": "plain"}
    assert_tree(store.to_dict(), {"s": expected})
