"""What a pass of ``collect`` visits under a node (issue 20): ``Collector._keys_to_visit``
tells whether it left out something a later pass must see (a newer tombstone, a fired
session) from the newest entry, else from a count of the entries that are not plain leaves,
where it scanned all the entries a second time with a generator (a writer's own sessions,
tens of thousands of bare stamps holding values under one parent, took most of a pass). It
lists the same keys in the same order, and marks the store untidy in the same cases, as that
formulation (kept here as the reference), for every node of stores that a writer's own
sessions, dicts without a ttl, others' late operations, deletes, time steps and collection
leave; and the store's tree stays the model's.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from test_own_dicts import _body, _own
from test_store_property import (
    Op,
    _settings,
    assert_tree,
    deliver,
    fold,
    new_store,
    own_operations,
    real_stamp,
)

from gcollective._collect import _NO_VALUES, _fired_session
from gcollective._tree import _Node


def _reference_keys_to_visit(store: Any, node: _Node, frontier: int) -> tuple[list[str], bool]:
    """The former ``_keys_to_visit``: its keys, and whether it marked the store untidy."""
    fired_below = store._fired_below
    data = node.value if type(node.value) is dict else _NO_VALUES
    entries = node._entries
    keys = [
        key
        for key, entry in entries.items()
        if (type(entry) is int and entry < frontier and key not in data)
        or (type(entry) is _Node and not _fired_session(entry, fired_below))
    ]
    untidy = len(keys) < len(entries) and any(
        (type(entry) is int and entry >= frontier and key not in data)
        or (type(entry) is _Node and _fired_session(entry, fired_below))
        for key, entry in reversed(entries.items())
    )
    return keys, untidy


def _nodes(root: _Node) -> list[_Node]:
    """Every node of the tree under ``root`` (``root`` included)."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(entry for entry in node._entries.values() if type(entry) is _Node)
    return found


def _check_listing(store: Any, frontier: int, context: str) -> tuple[int, int]:
    """``_keys_to_visit`` of every node agrees with the reference; (keys listed, nodes where
    something was left out) for the statistics."""
    listed = left_out = 0
    for node in _nodes(store._root):
        expected, untidy = _reference_keys_to_visit(store, node, frontier)
        store._untidy = False
        assert store._keys_to_visit(node, frontier) == expected, context
        assert store._untidy is untidy, context
        listed += len(expected)
        left_out += untidy
    store._untidy = True  # (as it may have been: a later pass looks)
    return listed, left_out


@_settings(max_examples=400)
@given(st.data())
def test_keys_to_visit_match_the_former_listing_and_the_model(data: st.DataObject) -> None:
    """Own sessions and dicts (pending runs with their stamps in the parent's entries, and
    nodes where the way was not cached) among others' operations and deletes, time steps and
    collections at frontiers trailing time: at each step every node lists what the former
    listing did, and the tree is the model's."""
    bodies = data.draw(st.lists(_body(), min_size=1, max_size=50), label="bodies")
    ops = own_operations(data, bodies)
    store = new_store()
    received: list[Op] = []
    now = 0
    for index, operation in enumerate(ops):
        context = f"ops: {ops!r}, at {index}, now={now}"
        if data.draw(st.integers(0, 5), label="own") > 0:
            *way, _ = operation.path
            key = ".".join(way)
            if store.way_key != key:
                store.cache_way(key, way, operation.stamp)
            if not _own(store, operation):
                deliver(store, [operation])
        else:
            deliver(store, [operation])
        received.append(operation)
        if data.draw(st.integers(0, 3), label="time step") == 0:
            now = max(now, data.draw(st.integers(0, 45), label="now"))
            store.advance(now)
        upto = data.draw(st.integers(0, 50), label="frontier")
        frontier = real_stamp(upto, 0, 0)
        _check_listing(store, frontier, context)
        if data.draw(st.integers(0, 4), label="collect") == 0:
            # (Only a frontier no later operation is older than, and not past now.)
            later = [later.stamp for later in ops[index + 1 :]]
            frontier = min(real_stamp(min(upto, now), 0, 0), *later, operation.stamp)
            store.expire(frontier)
            while not store.collect(frontier):
                pass
        assert_tree(store.to_dict(), fold(received, now), context)
    store.advance(60)
    end = real_stamp(1000, 0, 1)
    _check_listing(store, end, f"ops: {ops!r}, at the end")
    store.expire(end)
    while not store.collect(end):
        pass
    assert_tree(store.to_dict(), fold(ops, 60), f"ops: {ops!r}")


def test_a_writers_own_sessions_are_not_listed_and_leave_the_store_tidy() -> None:
    """A parent of a writer's own sessions (bare stamps holding values, a pending run) and
    one tombstone newer than the frontier: nothing is listed, and the tombstone tells that a
    later pass must look again."""
    store = new_store()
    store.cache_way("s", ["s"], real_stamp(1, 0, 1))
    for j in range(50):
        store.assign_key(real_stamp(2, j, 1), f"s.k{j}", {"u": j}, 60_000, True)
    parent = store._root._entries["s"]
    assert parent.runs, "the sessions are a pending run"
    store._untidy = False
    assert store._keys_to_visit(parent, real_stamp(3, 0, 0)) == [
        key for key, entry in parent._entries.items() if type(entry) is _Node
    ]
    assert not store._untidy
    store.delete_key(real_stamp(4, 0, 1), "s.k7")
    store._untidy = False
    listed = store._keys_to_visit(parent, real_stamp(3, 0, 0))
    assert "k7" not in listed and store._untidy
    assert "k7" in store._keys_to_visit(parent, real_stamp(5, 0, 0))
