"""The way cache keeps a way per parent (issue 20): a writer alternating between a few
parents (a web app's request counts a hit under one and writes a key of its worker's under
another) takes each fast, and the ways stay cached across received batches that leave them
valid. Against ``apply`` one by one (the general path) and the reference model's fold, with
others' batches, deletes and resets of the ways' nodes, ttls, time steps, expiry and
collection between the writer's operations."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_store_property import (
    DELETE,
    INCREMENT,
    SET,
    SMALL_DICTS,
    Op,
    _by_key,
    _settings,
    amounts,
    assert_tree,
    deliver,
    deliver_as_batch,
    fold,
    json_values,
    new_store,
    real_stamp,
    roundtrip,
    small_ints,
    ttls,
)

from gcollective._tree import WAYS_KEPT

# The writer's keys: under parents whose ways nest (``w`` and ``w.1``: an operation at
# ``w.1`` under the way to ``w`` replaces a node on the way to ``w.1``), more parents than
# the store keeps ways for, and the root.
OWN_PATHS = st.sampled_from(
    [("h", "t"), ("h", "u"), ("w", "1", "x"), ("w", "1", "y"), ("w", "1"), ("w", "2"), ("x",)]
)
# What others write: the writer's keys, their parents and the nodes above them.
OTHERS_PATHS = st.sampled_from([("h",), ("h", "t"), ("w",), ("w", "1"), ("w", "1", "x"), ("x",)])
BULK_PARENTS = st.sampled_from([("h",), ("w", "1"), ("s",), ()])
# (Mostly what keeps the ways: plain SETs and counts, as a web app's requests make them.)
OWN_BODIES = st.one_of(
    *[st.tuples(st.just(SET), OWN_PATHS, small_ints, st.none())] * 3,
    *[st.tuples(st.just(INCREMENT), OWN_PATHS, small_ints, st.none())] * 2,
    st.tuples(st.just(SET), OWN_PATHS, st.one_of(SMALL_DICTS, json_values), ttls),
    st.tuples(st.just(INCREMENT), OWN_PATHS, small_ints, ttls),
    st.tuples(st.just(DELETE), OWN_PATHS, st.none(), st.none()),
)
OTHERS_BODIES = st.one_of(
    *[st.tuples(st.just(SET), OTHERS_PATHS, small_ints, st.none())] * 2,
    *[st.tuples(st.just(INCREMENT), OTHERS_PATHS, small_ints, st.none())] * 2,
    st.tuples(st.just(SET), OTHERS_PATHS, json_values, ttls),
    st.tuples(st.just(INCREMENT), OTHERS_PATHS, amounts, ttls),
    st.tuples(st.just(DELETE), OTHERS_PATHS, st.none(), st.none()),
)
STEPS = st.sampled_from(
    ["own", "own", "own", "own", "batch", "batch", "batch", "bulk", "advance", "collect"]
)


def _own(store: Any, operation: Op, flat: bool) -> bool:
    """Apply ``operation`` as ``Collective`` does a node's own (``set_key`` for a plain SET
    without ttl, else ``_by_key``); False when it was not taken (then ``apply`` it)."""
    if operation.op == SET and type(operation.value) is not dict and not operation.ttl:
        store.set_key(operation.stamp, ".".join(operation.path), copy.deepcopy(operation.value))
        return True
    return _by_key(store, operation, flat)


class _Run:
    """The two stores of a run, the operations both were given, and the time: ``cached``
    takes the writer's operations through the way cache and others' as batches, ``plain``
    takes everything through ``apply`` one by one."""

    def __init__(self) -> None:
        self.cached, self.plain = new_store(), new_store()
        self.ops: list[Op] = []
        self.now: int | None = None
        self.millis = 0  # the writer's clock
        self.floor = 0  # no operation older than this millisecond comes any more (collected)
        self.counter = 0  # (unique stamps)
        self.bulk_keys = 0  # (new keys for bulk batches)
        self.bulk_parent: tuple[str, ...] = ()  # (the last bulk batch's)
        self.most_ways = 0  # the most ways the writer had cached at once

    def stamp(self, millis: int, origin: int) -> int:
        self.counter += 1
        return real_stamp(millis, self.counter, origin)

    def own(self, data: st.DataObject) -> None:
        """The writer's operations: 1-3 drawn, or a SET of the key a bulk batch wrote last."""
        for _ in range(data.draw(st.integers(1, 3), label="in a row")):
            if self.bulk_keys and not data.draw(st.integers(0, 5), label="a bulk key"):
                body = (SET, (*self.bulk_parent, f"b{self.bulk_keys}"), -1, None)
            else:
                body = data.draw(OWN_BODIES, label="own")
            self.own_one(data, *body)

    def own_one(self, data: st.DataObject, op: int, path: Any, value: Any, ttl: Any) -> None:
        self.millis = max(self.millis, self.floor) + data.draw(st.integers(0, 2), label="tick")
        operation = Op(self.stamp(self.millis, 1), op, path, value, ttl)
        if data.draw(st.integers(0, 3), label="look for its way at once"):
            self.cached._way_skips = 0  # (the policy's skips are tested elsewhere)
            self.cached._ways_wanted[".".join(path[:-1])] = None
        if not _own(self.cached, operation, data.draw(st.booleans(), label="flat")):
            deliver(self.cached, [operation])
        deliver(self.plain, [operation])
        self.ops.append(operation)
        self.most_ways = max(self.most_ways, len(self.cached._ways))

    def batch(self, data: st.DataObject) -> None:
        bodies = data.draw(st.lists(OTHERS_BODIES, min_size=1, max_size=4), label="batch")
        origin = data.draw(st.sampled_from([2, 3]), label="origin")
        millis = sorted(
            data.draw(st.integers(self.floor, self.millis + 3), label="millis") for _ in bodies
        )
        batch = [Op(self.stamp(m, origin), *body) for m, body in zip(millis, bodies)]
        parents = {operation.path[:-1] for operation in batch}
        under = parents.pop() if len(parents) == 1 else ()
        if under and not data.draw(st.booleans(), label="parent said once"):
            under = ()
        self.deliver_batch(batch, under)

    def bulk(self, data: st.DataObject) -> None:
        """A writer's loop of new keys under one parent from another member: a run there
        (``_set_siblings``)."""
        parent = self.bulk_parent = data.draw(BULK_PARENTS, label="bulk parent")
        millis = data.draw(st.integers(self.floor, self.millis + 3), label="bulk millis")
        batch = []
        for index in range(16):
            self.bulk_keys += 1
            path = (*parent, f"b{self.bulk_keys}")
            batch.append(Op(self.stamp(millis, 2), SET, path, index))
        self.deliver_batch(batch, parent)

    def deliver_batch(self, batch: list[Op], under: tuple[str, ...]) -> None:
        deliver_as_batch(self.cached, batch, under)
        deliver(self.plain, batch)
        self.ops += batch

    def advance(self, data: st.DataObject) -> None:
        self.now = max(self.now or 0, data.draw(st.integers(0, self.millis + 15), label="now"))
        for store in (self.cached, self.plain):
            store.advance(self.now)

    def collect(self, data: st.DataObject) -> None:
        """Expiry made permanent and metadata collected below a frontier that no later
        operation is older than."""
        self.floor = max(self.floor, data.draw(st.integers(0, self.millis), label="frontier"))
        frontier = real_stamp(self.floor, 0, 0)
        for store in (self.cached, self.plain):
            store.expire(frontier)
            while not store.collect(frontier):
                pass

    def check(self, context: str, export: bool) -> None:
        """The same tree as ``apply`` one by one and the model's fold; with ``export``, the
        same metadata too (which raises the summaries the fast paths left to raise)."""
        assert_tree(self.cached.to_dict(), self.plain.to_dict(), context)
        assert_tree(self.cached.to_dict(), fold(self.ops, self.now), context)
        if export:  # (a packed leaf recorded again comes after the others: no state)
            exported = sorted(roundtrip(self.cached.export()))
            assert exported == sorted(roundtrip(self.plain.export())), context


@_settings(max_examples=400)
@given(st.data())
def test_ways_per_parent_match_apply_with_batches_between(data: st.DataObject) -> None:
    """A writer's operations under several parents through the way cache (``set_key``,
    ``assign_key``, ``increment_key``, ``delete_key``: a way cached per parent, kept across
    received batches that leave it valid), others' batches (ops at the ways' nodes and above
    them too, with ttls, and bulk runs under a way's parent), time steps, expiry and
    collection between them: the store holds what ``apply`` one by one leaves, metadata
    included, and the model's fold, at every step."""
    run = _Run()
    steps = data.draw(st.lists(STEPS, min_size=12, max_size=40), label="steps")
    for index, step in enumerate(steps):
        getattr(run, step)(data)
        context = f"ops: {run.ops!r}, at step {index} ({step}), now={run.now}"
        run.check(context, data.draw(st.booleans(), label="export"))
    run.now = (run.now or 0) + 100
    run.advance(data)
    run.floor = run.millis + 10
    for store in (run.cached, run.plain):
        store.expire(real_stamp(run.floor, 0, 0))
        while not store.collect(real_stamp(run.floor, 0, 0)):
            pass
    run.check(f"ops: {run.ops!r}, at the end", export=True)
    event(f"ways cached at once: {run.most_ways}")


def _web_request(run: _Run, worker: str) -> int:
    """A web app's request on the writer: ``incr("hits.total")`` and a SET of its worker's
    key (as ``benchmarks/web_app.py``), through the way cache. Returns how many of the two
    took a fast path under a cached way."""
    fast = 0
    for op, path, value in [
        (INCREMENT, ("hits", "total"), 1),
        (SET, ("workers", worker, "last"), run.counter),
    ]:
        run.millis += 1
        operation = Op(run.stamp(run.millis, 1), op, path, value)
        if not _own(run.cached, operation, False):
            deliver(run.cached, [operation])
        fast += run.cached.way_key == ".".join(path[:-1])
        deliver(run.plain, [operation])
        run.ops.append(operation)
    return fast


def test_a_web_requests_two_ways_stay_cached_across_others_requests() -> None:
    """The web workload's writer (a hit counted under ``hits``, a key written under
    ``workers.<pid>``) keeps both ways cached, and takes both fast paths, while batches of
    the same from other workers arrive between its requests, late (older than its own hits:
    concurrent) or not; the store holds what ``apply`` one by one leaves."""
    run = _Run()
    for request in range(40):
        fast = _web_request(run, "1")
        peer = 2 + request % 2
        millis = run.millis - 3 + request % 5  # (late or newer than the writer's last)
        batch = [
            Op(run.stamp(millis, peer), INCREMENT, ("hits", "total"), 1),
            Op(run.stamp(millis, peer), SET, ("workers", str(peer), "last"), request),
        ]
        run.deliver_batch(batch, ())
        if request >= 20:  # (the policy has found both loops by then)
            assert fast == 2, f"request {request}: {fast} of 2 calls took a cached way"
            assert set(run.cached._ways) == {"hits", "workers.1"}, request
        run.check(f"request {request}", export=request % 10 == 9)
    assert run.cached.get(("hits", "total")) == 80
    assert len(run.cached._ways) <= WAYS_KEPT


def _own_at_once(run: _Run, op: int, path: tuple[str, ...], value: Any, ttl: Any = None) -> None:
    """The writer's operation, its way looked for at once (cached if it can be)."""
    run.cached._way_skips = 0
    run.cached._ways_wanted[".".join(path[:-1])] = None
    run.millis += 1
    operation = Op(run.stamp(run.millis, 1), op, path, value, ttl)
    if not _own(run.cached, operation, type(value) is dict):
        deliver(run.cached, [operation])
    deliver(run.plain, [operation])
    run.ops.append(operation)


def _others(run: _Run, bodies: list[tuple[Any, ...]], under: tuple[str, ...] = ()) -> None:
    """Another member's batch of ``bodies`` (op, path, value, ttl), newer than the writer's
    last operation."""
    run.millis += 1
    run.deliver_batch([Op(run.stamp(run.millis, 2), *body) for body in bodies], under)


def _sessions_under_w1(run: _Run) -> None:
    _others(run, [(SET, ("w", "1", f"s{i}"), {"u": i}, 50) for i in range(3)], ("w", "1"))


# Each: what may break a cached way (``w.1``, ``w`` or both cached first), then the writer
# writing under the ways again.
BREAKERS = {
    "a received increment makes a way's parent a number": lambda run: _others(
        run, [(INCREMENT, ("w", "1"), 5, None)]
    ),
    "a received set replaces a way's parent": lambda run: _others(
        run, [(SET, ("w", "1"), {"q": 1}, None)]
    ),
    "a received delete above the ways": lambda run: _others(run, [(DELETE, ("w",), None, None)]),
    "a received ttl on a way's node": lambda run: _others(run, [(SET, ("w",), {"1": {}}, 30)]),
    "the writer deletes a node on another way": lambda run: _own_at_once(
        run, DELETE, ("w", "1"), None
    ),
    "the writer sets a session over a node on another way": lambda run: _own_at_once(
        run, SET, ("w", "1"), {"a": 1}, 40
    ),
    "the writer sets a dict over a node on another way": lambda run: _own_at_once(
        run, SET, ("w", "1"), {"a": 1}
    ),
    "the writer sets a nested dict over a node on another way": lambda run: _own_at_once(
        run, SET, ("w", "1"), {"a": {"b": 1}}
    ),
    "the writer counts at a node on another way": lambda run: _own_at_once(
        run, INCREMENT, ("w", "1"), 1
    ),
    "a received bulk run under a way's parent": lambda run: _others(
        run, [(SET, ("w", "1", f"b{i}"), i, None) for i in range(16)], ("w", "1")
    ),
    "received sessions under a way's parent": _sessions_under_w1,
}


@pytest.mark.parametrize("breaker", list(BREAKERS), ids=str)
def test_what_may_break_a_cached_way_leaves_the_store_as_apply(breaker: str) -> None:
    """With the ways to ``w`` and ``w.1`` cached (``w.1``'s node on both), each thing that
    may change a node on them or put a run on a way's parent, then the writer writing under
    both again (the keys the breaker wrote too): the store holds what ``apply`` one by one
    leaves, and the model's fold."""
    run = _Run()
    for path in [("w", "1", "x"), ("w", "1", "y"), ("w", "z"), ("w", "y")]:
        _own_at_once(run, SET, path, 1)
    assert set(run.cached._ways) == {"w", "w.1"}
    BREAKERS[breaker](run)
    run.check(f"{breaker}: ops {run.ops!r}", export=False)
    for leaf in ["x", "b3", "s1", "q"]:
        _own_at_once(run, SET, ("w", "1", leaf), 2)
        _own_at_once(run, SET, ("w", leaf), 3)
        run.check(f"{breaker}: ops {run.ops!r}", export=False)
    run.check(f"{breaker}: ops {run.ops!r}", export=True)


def test_a_parent_with_too_few_plain_leaves_is_looked_at_once_until_it_doubles() -> None:
    """``pack_leaves`` of a parent whose entries are mostly tombstones (a writer's scratch
    keys deleted) finds too few plain leaves to pack, and does not look through them again
    before the parent has twice as many entries (a writer whose ways are left and cached
    again at every received frame made it pay that pass each time: churn slowed and its
    members' memory grew with the lag)."""
    from gcollective import _tree

    store = new_store()
    for index in range(100):
        store.apply(real_stamp(1, index, 1), SET, ("x", f"k{index}"), index)
        store.apply(real_stamp(2, index, 1), DELETE, ("x", f"k{index}"), None)
    node = store._root.entries["x"]
    _tree.pack_leaves(node)
    assert node.runs is None and node.packed == len(node._entries) == 100
    for index in range(100, 150):  # (more entries, not twice as many: not looked at)
        store.apply(real_stamp(3, index, 1), SET, ("x", f"k{index}"), index)
    _tree.pack_leaves(node)
    assert node.runs is None and node.packed == 100
    for index in range(150, 200):  # (twice as many: packed now, 100 plain leaves)
        store.apply(real_stamp(3, index, 1), SET, ("x", f"k{index}"), index)
    _tree.pack_leaves(node)
    assert node.runs is not None and node.packed == 100
    assert store.get(("x", "k150")) == 150 and store.get(("x", "k1")) is None


# A writer's loop of plain sets and deletes under the ways to ``w.1`` and ``h``, and what
# others write at those ways' nodes and below them.
LOOP_PATHS = st.sampled_from([("w", "1", "x"), ("w", "1", "y"), ("h", "t")])
LOOP_BODIES = st.one_of(
    st.tuples(st.just(DELETE), LOOP_PATHS, st.none(), st.none()),
    st.tuples(st.just(SET), LOOP_PATHS, small_ints, st.none()),
)
AT_THE_WAYS = st.sampled_from([("w",), ("w", "1"), ("w", "1", "x"), ("h",), ("h", "t")])
AT_THE_WAYS_BODIES = st.one_of(
    st.tuples(st.just(DELETE), AT_THE_WAYS, st.none(), st.none()),
    st.tuples(st.just(SET), AT_THE_WAYS, small_ints, st.none()),
)


@_settings(max_examples=300)
@given(st.data())
def test_a_loop_of_deletes_under_a_way_raises_its_nodes_as_apply(data: st.DataObject) -> None:
    """A writer's loop of plain sets and deletes under cached ways (``delete_key`` leaves
    raising the ``newest`` of the way's nodes to ``_flush_way``, as ``set_key`` does a
    write's), then others' operations at the ways' nodes and below them, one by one, many
    older than the writer's deletes (a set of a way's node older than a delete under it must
    leave the delete's tombstone): the store holds what ``apply`` one by one leaves, metadata
    included, and the model's fold."""
    run = _Run()
    for path in [("w", "1", "x"), ("h", "t")]:
        _own_at_once(run, SET, path, 1)
    for _ in range(data.draw(st.integers(1, 6), label="in the loop")):
        run.own_one(data, *data.draw(LOOP_BODIES, label="own"))
    for index in range(data.draw(st.integers(1, 4), label="others'")):
        body = data.draw(AT_THE_WAYS_BODIES, label="other")
        millis = data.draw(st.integers(0, run.millis + 1), label="millis")
        operation = Op(run.stamp(millis, 2), *body)
        for store in (run.cached, run.plain):
            deliver(store, [operation])
        run.ops.append(operation)
        run.check(f"ops: {run.ops!r}, after other {index}", data.draw(st.booleans()))
