"""Property tests: a receiver's bulk paths for a frame of expiring operations under one parent
(a writer's loop of sessions, a rate limiter's hits) against the general way.

A frame of only new sessions with one ttl becomes one pending run (under a new parent too,
which its first write makes: ``Applier.make_way``) in a few C-level passes
(``Applier._new_sessions_at_once``); a frame of only hits with ttls goes through one loop
(``Applier.apply_expiring_hits``), whatever the counters it meets. On top of any state, at
any time, the store must hold what applying the same operations one by one holds, metadata
included, and the reference model's tree, then and after later time steps, operations,
hard expiry and collection.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from profiles import examples
from test_store_property import (
    DELETE,
    INCREMENT,
    NODE_IDS,
    SET,
    Op,
    alike_later,
    amounts,
    assert_tree,
    batched_and_one_by_one,
    deliveries,
    fold,
    json_leaves,
    real_stamp,
    roundtrip,
    small_ints,
)

PARENT = ("r",)
KEYS = ("a", "b", "c", "d", "e", "f", "g")
SESSIONS = st.dictionaries(
    st.sampled_from(["u", "w"]),
    st.one_of(json_leaves, st.dictionaries(st.sampled_from(["x"]), json_leaves, max_size=1)),
    max_size=2,
)
TTLS = st.one_of(st.integers(1, 6), st.integers(1, 30))  # (short ones fire before the frame)


def _before_bodies() -> st.SearchStrategy:
    """What the frame may meet: sessions, counters with and without ttls, plain leaves,
    tombstones, writes below a key, and the parent itself replaced or made a number."""
    key = st.sampled_from(KEYS).map(lambda k: (*PARENT, k))
    below = st.sampled_from(KEYS[:2]).map(lambda k: (*PARENT, k, "u"))
    return st.one_of(
        st.tuples(st.just(SET), key, SESSIONS, TTLS),
        st.tuples(st.just(INCREMENT), key, small_ints, st.one_of(st.none(), TTLS)),
        st.tuples(st.just(INCREMENT), key, small_ints, TTLS),
        st.tuples(st.just(SET), key, json_leaves, st.one_of(st.none(), TTLS)),
        st.tuples(st.just(DELETE), key, st.none(), st.none()),
        st.tuples(st.just(SET), below, small_ints, st.none()),
        st.tuples(st.just(SET), st.just(PARENT), st.sampled_from([{}, {"a": 1}, 7]), st.none()),
    )


@st.composite
def expiring_frames(draw: st.DrawFn) -> tuple[list[Op], list[Op], list[Op], int]:
    """Operations before, in and after one origin's frame under ``PARENT`` that is all new
    sessions with one ttl (keys mostly new, sometimes one twice or one there already) or all
    hits with ttls (one for all, or each its own; ints mostly, a float goes the general way),
    and the store's time for it."""
    made = 0

    def stamp(millis: int, origin: int) -> int:
        nonlocal made
        made += 1
        return real_stamp(millis, made, origin)

    # The parent first (a writer's first operation there makes it), or not there at all:
    # the frame's first write makes it (``Applier.make_way``).
    before = [Op(stamp(0, 3), SET, (*PARENT, "z"), 0)] if draw(st.booleans()) else []
    bodies = draw(st.lists(_before_bodies(), max_size=8), label="before")
    before += [
        Op(stamp(draw(st.integers(0, 25)), draw(st.sampled_from(NODE_IDS))), *body)
        for body in bodies
    ]
    origin = draw(st.sampled_from(NODE_IDS), label="origin")
    size = draw(st.integers(1, 8), label="size")
    millis = sorted(draw(st.lists(st.integers(0, 25), min_size=size, max_size=size)))
    stamps = [stamp(m, origin) for m in millis]
    if draw(st.booleans(), label="sessions"):
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=size, max_size=size))
        if draw(st.integers(0, 3), label="keys unique") > 0:
            keys = [f"n{i}" for i in range(size)]  # (new to the parent and to each other)
        ttl = draw(TTLS, label="ttl")
        values = draw(st.lists(SESSIONS, min_size=size, max_size=size))
        batch = [
            Op(s, SET, (*PARENT, k), v, ttl) for s, k, v in zip(stamps, keys, values, strict=True)
        ]
        event("sessions")
    else:
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=size, max_size=size))
        if draw(st.booleans(), label="one ttl"):
            ttls = [draw(TTLS)] * size
        else:
            ttls = draw(st.lists(TTLS, min_size=size, max_size=size))
        hits = st.one_of(small_ints, small_ints, amounts)
        drawn = draw(st.lists(hits, min_size=size, max_size=size), label="amounts")
        batch = [
            Op(s, INCREMENT, (*PARENT, k), a, t)
            for s, k, a, t in zip(stamps, keys, drawn, ttls, strict=True)
        ]
        event("hits")
    # Some of the frame's operations may be there already (a repeat: relayed, or in a
    # snapshot), in any order among the others.
    known = draw(st.lists(st.sampled_from(batch), max_size=2), label="known")
    before = draw(deliveries([*before, *known]))
    after_bodies = draw(st.lists(_before_bodies(), max_size=4), label="after")
    after = [
        Op(stamp(draw(st.integers(0, 40)), draw(st.sampled_from(NODE_IDS))), *body)
        for body in after_bodies
    ]
    return before, batch, after, draw(st.integers(0, 45), label="now")


@settings(
    max_examples=examples(500),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(expiring_frames(), st.integers(0, 70), st.integers(0, 80))
def test_an_expiring_frame_under_one_parent_matches_one_by_one_and_the_model(
    case: tuple[list[Op], list[Op], list[Op], int], later: int, frontier: int
) -> None:
    before, batch, after, now = case
    batched, one_by_one = batched_and_one_by_one(before, batch, now, PARENT)
    context = f"now={now}, before: {before!r}, batch: {batch!r}"
    assert_tree(batched.to_dict(), fold([*before, *batch], now), context)
    assert batched.pending_expiries == one_by_one.pending_expiries, context
    context = alike_later(batched, one_by_one, [*before, *batch], after, max(now, later), context)
    for store in (batched, one_by_one):
        store.advance(100)
        store.expire(real_stamp(frontier, 0, 0))
        while not store.collect(real_stamp(frontier, 0, 0)):
            pass
    context += f", frontier={frontier}"
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export()), context
    assert_tree(batched.to_dict(), fold([*before, *batch, *after], 100), context)
    assert batched.pending_expiries == one_by_one.pending_expiries, context


def _runs_of(store: Any) -> list[Any]:
    node = store._root._entries[PARENT[0]]
    return list(node.runs or ())


def test_a_frame_of_new_sessions_is_one_run_of_the_frame_s_columns() -> None:
    """Sixteen new sessions with one ttl: one pending run holding the frame's keys and
    stamps as they came, one expiry entry, values readable; as one by one after expiry."""
    stamps = [real_stamp(5, i + 1, NODE_IDS[0]) for i in range(16)]
    batch = [Op(s, SET, (*PARENT, f"s{i}"), {"u": i}, 30) for i, s in enumerate(stamps)]
    before = [Op(real_stamp(0, 0, 3), SET, (*PARENT, "z"), 0)]
    batched, one_by_one = batched_and_one_by_one(before, batch, 5, PARENT)
    (run,) = _runs_of(batched)
    assert list(run[0]) == [f"s{i}" for i in range(16)] and list(run[1]) == stamps
    assert batched.get(["r", "s3"]) == {"u": 3}
    for store in (batched, one_by_one):
        store.advance(36)
    assert batched.to_dict() == one_by_one.to_dict() == {"r": {"z": 0}}
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())


def test_a_writer_s_first_frame_of_sessions_under_a_new_parent_is_one_run_too() -> None:
    """The first frame of a writer's loop, under a parent (two levels) that is not there
    yet: the parent is made as the first session's write makes it, and the frame is one
    pending run, as the later frames are (it was a node per session); the same as one by
    one, then and after expiry."""
    parent = ("p", "q")
    stamps = [real_stamp(5, i + 1, NODE_IDS[0]) for i in range(16)]
    batch = [Op(s, SET, (*parent, f"s{i}"), {"u": i}, 30) for i, s in enumerate(stamps)]
    before = [Op(real_stamp(0, 0, 3), SET, ("o",), 1)]
    batched, one_by_one = batched_and_one_by_one(before, batch, 5, parent)
    (run,) = batched._root._entries["p"]._entries["q"].runs
    assert list(run[0]) == [f"s{i}" for i in range(16)] and list(run[1]) == stamps
    assert batched.get(["p", "q", "s3"]) == {"u": 3}
    for store in (batched, one_by_one):
        store.advance(36)
    assert batched.to_dict() == one_by_one.to_dict() == {"o": 1, "p": {"q": {}}}
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())


@pytest.mark.parametrize(
    "before",
    [
        [Op(real_stamp(0, 0, 3), SET, ("p",), 7)],  # a leaf on the way
        [Op(real_stamp(0, 0, 3), DELETE, ("p",), None)],  # a tombstone on the way
        [Op(real_stamp(9, 0, 3), SET, ("p",), {})],  # a newer reset on the way
        [Op(real_stamp(0, 0, 3), SET, ("p",), {"x": 1}, 60)],  # ttl events on the way
    ],
)
def test_a_first_frame_under_a_parent_the_way_to_which_is_not_dicts_matches_one_by_one(
    before: list[Op],
) -> None:
    """Where the way to a new parent is not all dicts (a leaf, a tombstone, a newer reset,
    ttl events), the frame goes the general way: as one by one, and as the model."""
    parent = ("p", "q")
    stamps = [real_stamp(5, i + 1, NODE_IDS[0]) for i in range(16)]
    for batch in (
        [Op(s, SET, (*parent, f"s{i}"), {"u": i}, 30) for i, s in enumerate(stamps)],
        [Op(s, INCREMENT, (*parent, f"k{i % 3}"), 1, 30) for i, s in enumerate(stamps)],
    ):
        batched, _ = batched_and_one_by_one(before, batch, 5, parent)
        assert_tree(batched.to_dict(), fold([*before, *batch], 5), repr(before))


@pytest.mark.parametrize("plain", [0, 1, 3])
def test_a_frame_of_hits_one_of_them_without_a_ttl_goes_hit_by_hit(plain: int) -> None:
    """A frame of hits under a parent, all with one ttl but one without (ttl 0 in the
    column, first or later): not ``apply_expiring_hits``' case (which would give the plain
    hit an expiry at once), so each goes its own way: as one by one, and as the model,
    then and after the others' expiry."""
    stamps = [real_stamp(5, i + 1, NODE_IDS[0]) for i in range(4)]
    batch = [
        Op(s, INCREMENT, (*PARENT, f"k{i % 2}"), 1, None if i == plain else 30)
        for i, s in enumerate(stamps)
    ]
    before = [Op(real_stamp(0, 0, 3), SET, (*PARENT, "z"), 0)]
    batched, one_by_one = batched_and_one_by_one(before, batch, 2, PARENT)
    assert_tree(batched.to_dict(), fold([*before, *batch], 2), repr(batch))
    for store in (batched, one_by_one):
        store.advance(40)
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())
    assert_tree(batched.to_dict(), fold([*before, *batch], 40), repr(batch))
