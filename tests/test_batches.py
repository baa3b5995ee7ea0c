"""Writers' loops between real members: the batches a receiver applies in bulk (keys under one
parent, said once on the wire) and the ones it must apply key by key."""

from __future__ import annotations

import pytest
from cluster import free_port, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples
from test_store_property import (
    NODE_IDS,
    Op,
    alike_later,
    amounts,
    assert_tree,
    batched_and_one_by_one,
    deliver,
    deliver_as_batch,
    deliveries,
    fold,
    new_store,
    real_stamp,
    roundtrip,
    small_ints,
    stamp_keys,
    stamped,
    ttl_bodies,
)

from gcollective._tree import DELETE, INCREMENT, SET

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


def test_loops_of_new_keys_overwrites_and_conflicts_converge(members):
    a, b = members(2)
    for i in range(100):  # new keys: b takes them in bulk
        a.set(f"p.k{i}", i)
    wait_for(lambda: b.get("p.k99") == 99)
    b.set("p.k10", "b's")
    wait_for(lambda: a.get("p.k10") == "b's")
    for i in range(50, 150):  # half overwrites, half new: b goes key by key
        a.set(f"p.k{i}", -i)
    b.set("p.k120", "b's")  # concurrent with a's loop: the later stamp wins everywhere
    wait_for(lambda: a.snapshot() == b.snapshot() and b.get("p.k149") == -149)
    expected = {f"k{i}": i if i < 50 else -i for i in range(150)}
    expected["k10"] = "b's"
    expected["k120"] = a.get("p.k120")
    assert expected["k120"] in ("b's", -120)
    assert a.get("p") == expected


def test_a_loop_under_a_parent_the_receiver_replaced_lands_as_one_by_one(members):
    a, b = members(2)
    a.set("p.x", 1)
    wait_for(lambda: b.get("p.x") == 1)
    b.set("p", {"fresh": True})  # replaces p where a's loop is about to write
    wait_for(lambda: a.get("p") == {"fresh": True})
    for i in range(40):
        a.set(f"p.k{i}", i)
    wait_for(lambda: a.snapshot() == b.snapshot() and b.get("p.k39") == 39)
    assert b.get("p") == {"fresh": True, **{f"k{i}": i for i in range(40)}}


def test_a_watch_sees_each_key_of_a_loop_batch(members):
    a, b = members(2)
    seen: list = []
    b.watch("p", lambda key, value, op, origin: seen.append((key, value)))
    for i in range(40):
        a.set(f"p.k{i}", i)
    wait_for(lambda: len(seen) == 40)
    assert seen == [(f"p.k{i}", i) for i in range(40)]


def test_loop_batches_arriving_out_of_order_are_applied_once_whole():
    """A later batch first (its operations wait beyond the gap), then the earlier one, then a
    repeat: every key lands under its parent, once. (Frames fed straight to a member's
    receive path: the order cannot be forced over one connection.)"""
    from gcollective import Collective
    from gcollective._wire import FrameDecoder, encode_ops

    origin, hlc = 4242, 1 << 40
    frames = [
        encode_ops(
            origin,
            1 + 20 * n,
            [hlc + 20 * n + i for i in range(20)],
            [0] * 20,
            [f"p.k{20 * n + i}" for i in range(20)],
            [20 * n + i for i in range(20)],
        )
        for n in range(2)
    ]
    node = Collective(f"127.0.0.1:{free_port()}")
    node.start()
    try:
        decoder = FrameDecoder(1 << 20)
        for frame in (frames[1], frames[0], frames[1]):
            (message,) = decoder.feed(frame)
            node._engine.apply_ops(message, decoder.frames[0])
        assert node.get("p") == {f"k{i}": i for i in range(40)}
        assert node.applied_ops == 40
    finally:
        node.stop()


# A web app's frame: each request's counter hit and its own key alternate between parents,
# some of them on another's way (``a`` holds ``a.x``, ``a.x`` holds ``a.x.p``), so a write at
# one parent may break another's way.
MIXED_PATHS = (("h", "total"), ("a", "x"), ("a", "x", "p"), ("a", "y"), ("a",))


@st.composite
def mixed_frames(draw: st.DrawFn) -> tuple[list[Op], list[Op], list[Op], int]:
    """Operations before, in and after one origin's batch that mixes INCREMENTs and SETs
    (with ttls, DELETEs and dict values among them) under parents it goes back and forth
    between, and a time: real-layout stamps, so that ttls expire."""
    path = st.sampled_from(MIXED_PATHS)
    hit = st.tuples(st.just(INCREMENT), path, st.one_of(small_ints, amounts), st.just(None))
    plain_set = st.tuples(st.just(SET), path, small_ints, st.just(None))
    bodies = draw(
        st.lists(
            st.one_of(hit, hit, plain_set, plain_set, ttl_bodies(path)), min_size=3, max_size=16
        )
    )
    keys = draw(stamp_keys(len(bodies)))
    ops = stamped(keys, bodies)
    groups = draw(st.lists(st.sampled_from("pbbbba"), min_size=len(ops), max_size=len(ops)))
    before = draw(deliveries([op for op, group in zip(ops, groups) if group == "p"]))
    batch = sorted((op for op, group in zip(ops, groups) if group == "b"), key=_stamp)
    after = [op for op, group in zip(ops, groups) if group == "a"]
    return before, batch, after, draw(st.integers(0, 45))


def _stamp(operation: Op) -> int:
    return int(operation.stamp)


@settings(
    max_examples=examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mixed_frames(), st.integers(0, 60))
def test_a_mixed_batch_matches_one_by_one_and_the_model(
    case: tuple[list[Op], list[Op], list[Op], int], later: int
) -> None:
    """A batch of SETs and INCREMENTs under parents it alternates between (what a web app's
    requests send: ``apply_batch`` finds each parent once), on top of any state and at any
    time, leaves the metadata of applying it one by one, and the tree matches the model's
    fold then and after a later time step and later operations."""
    before, batch, after, now = case
    batched, one_by_one = batched_and_one_by_one(before, batch, now)
    context = f"now={now}, before: {before!r}, batch: {batch!r}"
    assert_tree(batched.to_dict(), fold([*before, *batch], now), context)
    context = alike_later(batched, one_by_one, [*before, *batch], after, max(now, later), context)


A_X_PARENT_BROKEN = [
    # a counter's hit turns the parent ``a.x`` a batch met into a number
    (Op(real_stamp(3, 0, 1), INCREMENT, ("a", "x"), 5),),
    # a session replaces it
    (Op(real_stamp(3, 0, 1), SET, ("a", "x"), 5, 10),),
    (Op(real_stamp(3, 0, 1), INCREMENT, ("a", "x"), 5, 10),),
    # a plain SET or a DELETE does, or a dict SET above it
    (Op(real_stamp(3, 0, 1), SET, ("a", "x"), 5),),
    (Op(real_stamp(3, 0, 1), DELETE, ("a", "x"), None),),
    (Op(real_stamp(3, 0, 1), SET, ("a",), {"x": {"z": 1}}),),
]


@pytest.mark.parametrize("breaking", A_X_PARENT_BROKEN)
def test_a_batch_writing_on_the_way_to_a_parent_it_met_finds_that_parent_anew(
    breaking: tuple[Op, ...],
) -> None:
    """Keys under ``a.x`` and ``h`` (both there before), then a write that replaces
    ``a.x``, then keys under both again: the later keys land under what ``a.x`` is then, as
    one by one."""
    before = [
        Op(real_stamp(1, 0, 1), SET, ("a", "x", "p"), 1),
        Op(real_stamp(1, 1, 1), INCREMENT, ("h", "total"), 1),
    ]
    batch = [
        Op(real_stamp(2, 0, 1), SET, ("a", "x", "q"), 2),
        Op(real_stamp(2, 1, 1), INCREMENT, ("h", "total"), 1),
        *breaking,
        Op(real_stamp(4, 0, 1), SET, ("a", "x", "r"), 7),
        Op(real_stamp(4, 1, 1), INCREMENT, ("h", "total"), 1),
    ]
    for now in (0, 5, 20):
        batched, _ = batched_and_one_by_one(before, batch, now)
        assert_tree(batched.to_dict(), fold([*before, *batch], now))


def test_a_web_frame_applies_each_hit_and_the_last_set() -> None:
    """A web worker's frame as it arrives (a counter's hit and the worker's key in turn,
    the counter also hit by another worker in between) counts every hit once and keeps the
    last SET, as one by one."""
    hits = [Op(real_stamp(1, n, 1), INCREMENT, ("h", "total"), 1) for n in range(3)]
    sets = [Op(real_stamp(2, n, 1), SET, ("w", "k"), n) for n in range(3)]
    other = Op(real_stamp(1, 1, 2), INCREMENT, ("h", "total"), 5)
    batch = sorted([*hits, *sets], key=_stamp)
    batched, one_by_one = new_store(), new_store()
    for store in (batched, one_by_one):
        deliver(store, [other])
    deliver_as_batch(batched, batch)
    deliver(one_by_one, batch)
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())
    assert batched.to_dict() == {"h": {"total": 8}, "w": {"k": 2}}


# Several writers hitting one counter and setting a key each (a web app's workers): each
# origin's frame reaches a receiver that holds newer hits already, so most of its hits are
# late, and a frame writing a few keys each more than once goes key by key. Now and then an
# assignment of the counter or of a parent (a dict: a newer reset), a write below the
# counter, a dict value, a float hit, a DELETE, or a hit received before its frame (a
# repeat) takes the general way instead.
_COUNTER = ("h", "total")
_KEYS = [("w", "k"), ("w", "j")]
_WEB_BODIES = st.one_of(
    st.tuples(st.just(INCREMENT), st.just(_COUNTER), small_ints, st.just(None)),
    st.tuples(st.just(SET), st.sampled_from(_KEYS), small_ints, st.just(None)),
)
_OTHER_BODIES = st.one_of(
    st.tuples(
        st.sampled_from([SET, INCREMENT]),
        st.sampled_from([_COUNTER, ("h", "total", "x"), ("h",), *_KEYS]),
        amounts,
        st.just(None),
    ),
    st.tuples(
        st.just(SET),
        st.sampled_from([("w",), ("h",), *_KEYS]),
        st.dictionaries(st.sampled_from(["k", "total", "z"]), small_ints, max_size=2),
        st.just(None),
    ),
    st.tuples(
        st.just(DELETE), st.sampled_from([("w",), _COUNTER, *_KEYS]), st.none(), st.just(None)
    ),
)


_TIMES = st.tuples(st.integers(0, 25), st.integers(0, 2))  # (``real_stamp``'s but the origin)


@st.composite
def interleaved_writers(draw: st.DrawFn) -> tuple[list[Op], list[list[Op]], int]:
    """Operations of three origins (stamps interleaved), each origin's mostly a web
    request's writes over and over (or in any order): some received one by one first (in
    any order, repeated, with other writes among them), then each origin's operations as
    one batch, origins in any order; and a time."""
    bodies = st.one_of(_WEB_BODIES, _WEB_BODIES, _WEB_BODIES, _OTHER_BODIES)
    if draw(st.booleans()):
        bodies = _WEB_BODIES
    ops: list[Op] = []
    for origin in NODE_IDS:
        request = draw(st.lists(bodies, min_size=1, max_size=3))
        writes = request * draw(st.integers(1, 5))
        writes = writes[: draw(st.integers(1, len(writes)))]
        if draw(st.integers(0, 3)) == 0:
            writes = draw(st.lists(bodies, min_size=1, max_size=10))  # (in any order)
        keys = draw(st.lists(_TIMES, min_size=len(writes), max_size=len(writes), unique=True))
        ops += stamped([(*key, origin) for key in sorted(keys)], writes)
    others = draw(st.lists(_OTHER_BODIES, max_size=4))
    other_keys = draw(st.lists(_TIMES, min_size=len(others), max_size=len(others), unique=True))
    other_origin = max(NODE_IDS) + 1  # (stamps of their own: not any of the batches')
    others_ops = stamped([(*key, other_origin) for key in other_keys], others)
    early = draw(st.lists(st.sampled_from(ops), max_size=4)) if draw(st.booleans()) else []
    before = draw(deliveries([*early, *others_ops]))
    origins = draw(st.permutations(NODE_IDS))
    batches = [[op for op in ops if _stamp(op) & 0xFF == o] for o in origins]
    return before, batches, draw(st.integers(0, 45))


@settings(
    max_examples=examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(interleaved_writers())
def test_web_writers_batches_match_one_by_one_and_the_model(
    case: tuple[list[Op], list[list[Op]], int],
) -> None:
    """Each origin's batch of hits (late ones among them: older than the newest the
    receiver holds) and sets, applied in turn or key by key, leaves the metadata of
    applying it one by one, and the tree matches the model's fold, batch after batch."""
    before, batches, now = case
    batched, one_by_one = new_store(), new_store()
    for store in (batched, one_by_one):
        deliver(store, before)
        store.advance(now)
    received = list(before)
    for batch in batches:
        deliver_as_batch(batched, batch)
        deliver(one_by_one, batch)
        received += batch
        context = f"now={now}, before: {before!r}, batches: {batches!r}"
        assert roundtrip(batched.export()) == roundtrip(one_by_one.export()), context
        assert_tree(batched.to_dict(), fold(received, now), context)


@pytest.mark.parametrize(
    "writes",
    [
        # keys in no repeated order: not columns of the batch
        [(SET, ("w", "k"), 1), (SET, ("w", "j"), 2), (SET, ("w", "j"), 3), (SET, ("w", "k"), 4)],
        [(INCREMENT, ("h", "t"), 1), (INCREMENT, ("h", "u"), 2), (INCREMENT, ("h", "u"), 3)],
        # keys in one repeated order, but a key set in one round and counted in another
        [
            (INCREMENT, ("h", "t"), 1),
            (SET, ("w", "k"), 1),
            (SET, ("h", "t"), 5),
            (SET, ("w", "k"), 2),
            (INCREMENT, ("h", "t"), 2),
            (SET, ("w", "k"), 3),
        ],
        # a dict value among a key's SETs: a node of its own
        [(SET, ("w", "k"), {"a": 1}), (SET, ("w", "j"), 2), (SET, ("w", "k"), 3)],
        [(SET, ("w", "k"), 1), (SET, ("w", "j"), 2), (SET, ("w", "k"), {"a": 1})],
    ],
)
def test_a_batch_of_a_few_keys_in_any_order_matches_one_by_one(
    writes: list[tuple[int, tuple[str, ...], object]],
) -> None:
    """Batches writing a few keys each more than once, but not a request's writes over and
    over (keys or kinds), or with a dict value, leave what one by one leaves, on top of the
    keys there."""
    before = [
        Op(real_stamp(1, 0, 2), SET, ("w",), {"k": 0}),
        Op(real_stamp(1, 1, 2), SET, ("h",), {}),
    ]
    batch = [Op(real_stamp(2, n, 1), op, path, value) for n, (op, path, value) in enumerate(writes)]
    batched, one_by_one = batched_and_one_by_one(before, batch, 0)
    assert roundtrip(batched.export()) == roundtrip(one_by_one.export())
    assert_tree(batched.to_dict(), fold([*before, *batch], 0))
