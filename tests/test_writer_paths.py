"""The writer's own fast paths in the store (issue 20): ``set_key``, ``Collective.set``'s
call for a value that is not a dict and has no ttl, and the ways of the other own
operations, against ``apply`` (the general path) and the reference model's fold."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_store_property import (
    SET,
    Op,
    _by_key,
    _settings,
    _way_bodies,
    assert_tree,
    deliver,
    fold,
    new_store,
    own_operations,
    real_stamp,
    roundtrip,
    settle_and_compare,
)

from gcollective import InvalidKeyError


def _own(store: Any, operation: Op, flat: bool) -> bool:
    """Apply ``operation`` as ``Collective`` does a node's own: a SET of a value that is
    not a dict, without a ttl, through ``set_key``; anything else as ``_by_key`` does (any
    other SET through ``assign_key``, an int INCREMENT through ``increment_key``, a DELETE
    through ``delete_key``). False when it was not taken (then ``apply`` it)."""
    value = operation.value
    if operation.op == SET and type(value) is not dict and not operation.ttl:
        # (applied, whichever way)
        store.set_key(operation.stamp, ".".join(operation.path), copy.deepcopy(value))
        event("set_key")
        return True
    return _by_key(store, operation, flat)


@_settings(max_examples=500)
@given(st.data())
def test_own_operations_through_set_key_match_apply(data: st.DataObject) -> None:
    """Own operations, mostly plain SETs in loops under one parent (``set_key``'s case),
    leave the store as ``apply`` one by one does, metadata included, and its tree equal to
    the model's fold at every step: others' operations through ``apply`` at any stamp
    between them, time steps, and expiry and collection at the end."""
    plain_sets = st.tuples(
        st.just(SET),
        st.sampled_from([("x",), ("a", "x"), ("a", "y"), ("a", "z"), ("a", "x", "p"), ("b", "y")]),
        st.one_of(st.integers(-3, 3), st.sampled_from([None, True, "s", 1.5, [1, 2]])),
        st.none(),
    )
    bodies = data.draw(
        st.lists(st.one_of(plain_sets, plain_sets, _way_bodies()), min_size=1, max_size=40),
        label="bodies",
    )
    ops = own_operations(data, bodies)
    own_store, plain = new_store(), new_store()
    received: list[Op] = []
    now: int | None = None
    newest = 0  # own stamps grow, as a clock's do
    held: list[Op] = []  # others' operations that arrive later
    for index, operation in enumerate(ops):
        context = f"ops: {ops!r}, at {index}, now={now}"
        if data.draw(st.integers(0, 7), label="advance first") == 0:
            now = max(now or 0, data.draw(st.integers(0, 45), label="now"))
            own_store.advance(now)
            plain.advance(now)
        own = operation.stamp > newest and data.draw(st.integers(0, 3), label="own") > 0
        if own:
            newest = operation.stamp
        elif data.draw(st.booleans(), label="arrives late"):
            held.append(operation)  # (another member's, older than own ones after it)
        arrived = [] if operation in held else [operation]
        if held and data.draw(st.integers(0, 3), label="the late ones arrive") == 0:
            arrived, held = [*arrived, *held], []
        for each in arrived:
            deliver(plain, [each])
            received.append(each)
            if not (
                each is operation
                and own
                and _own(own_store, each, data.draw(st.booleans(), label="flat"))
            ):
                deliver(own_store, [each])
        assert roundtrip(own_store.export()) == roundtrip(plain.export()), context
        assert_tree(own_store.to_dict(), fold(received, now), context)
    for store in (own_store, plain):
        deliver(store, held)
    settle_and_compare(own_store, plain, ops)


def test_set_key_under_the_cached_way_takes_the_fast_path() -> None:
    """A loop of plain SETs under one parent caches its way and writes each key under it
    (the case ``set_key`` exists for), a bad key still refused, and the tree and metadata
    as ``apply`` leaves them."""
    own_store, plain = new_store(), new_store()
    for index in range(30):
        stamp = real_stamp(1 + index, 0, 1)
        own_store.set_key(stamp, f"loop.k{index % 7}", index)
        deliver(plain, [Op(stamp, SET, ("loop", f"k{index % 7}"), index)])
    assert own_store.way_key == "loop", "a loop's way was not cached"
    assert roundtrip(own_store.export()) == roundtrip(plain.export())
    with pytest.raises(InvalidKeyError):
        own_store.set_key(real_stamp(40, 0, 1), "loop.", 1)
    assert own_store.to_dict() == {"loop": {f"k{index % 7}": index for index in range(30)}}
