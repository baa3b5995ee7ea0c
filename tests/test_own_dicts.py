"""A writer's own small dicts set without a ttl (issue 20): ``Ways.assign_flat`` keeps each
as a bare stamp in a pending run of the parent (``_open_own_dicts``, a dict of the run's keys
and their stamps), its node built only when something reads the parent's entries. The store
it leaves agrees with ``apply`` one by one and with the reference model, also when keys are
set again, deleted or overwritten with plain values many times within one run, and when
nothing reads the entries for a long time (the other property tests export at every step,
which records the run each time)."""

from __future__ import annotations

import copy
from typing import Any

from cluster import free_port, wait_for
from hypothesis import given
from hypothesis import strategies as st
from test_store_property import (
    DELETE,
    INCREMENT,
    SET,
    Op,
    _by_key,
    _settings,
    _through_way,
    assert_tree,
    deliver,
    fold,
    new_store,
    own_operations,
    real_stamp,
    roundtrip,
    settle_and_compare,
)

from gcollective import Collective
from gcollective._tree import _Node

_PARENTS = [("s",), ("s", "t"), ("u",)]
_LEAVES = ["k0", "k1", "k2"]
_FLAT = st.dictionaries(
    st.sampled_from(["u", "n", "x"]),
    st.one_of(st.integers(-3, 3), st.sampled_from(["a", True, None])),
    max_size=2,
)


@st.composite
def _body(draw: st.DrawFn) -> tuple[Any, ...]:
    """(op, path, value, ttl): mostly dicts set without a ttl over a few keys (so a run names
    keys again), and what else may meet them: sessions, plain values, counters, deletes,
    and a dict set below one of them."""
    path = (*draw(st.sampled_from(_PARENTS)), draw(st.sampled_from(_LEAVES)))
    kind = draw(st.integers(0, 9))
    if kind < 5:
        return (SET, path, draw(_FLAT), None)
    if kind == 5:
        return (SET, path, draw(_FLAT), draw(st.integers(1, 12)))
    if kind == 6:
        return (SET, path, draw(st.integers(-3, 3)), None)
    if kind == 7:
        return (INCREMENT, path, draw(st.integers(-2, 2)), draw(st.none() | st.integers(1, 12)))
    if kind == 8:
        return (DELETE, path, None, None)
    return (SET, (*path, "below"), draw(_FLAT), None)


def _own(store: Any, operation: Op) -> bool:
    """As ``Collective`` takes a node's own operation (``set_key`` for a plain value without
    a ttl, ``_by_key`` with dicts of leaves passed as such otherwise); False when it was not
    taken (then ``apply`` it)."""
    if operation.op == SET and type(operation.value) is not dict and not operation.ttl:
        store.set_key(operation.stamp, ".".join(operation.path), copy.deepcopy(operation.value))
        return True
    return _by_key(store, operation, True)


@_settings(max_examples=600)
@given(st.data())
def test_own_dicts_kept_pending_match_apply(data: st.DataObject) -> None:
    """Own operations through the cached way, mostly dicts set again under a few parents,
    leave the store as ``apply`` one by one does (its export, which records the runs,
    compared only now and then and at the end), and its tree equal to the model's fold at
    every step: others' operations at any stamp between them, time steps, expiry and
    collection at the end."""
    bodies = data.draw(st.lists(_body(), min_size=1, max_size=60), label="bodies")
    ops = own_operations(data, bodies)
    cached, plain = new_store(), new_store()
    received: list[Op] = []
    now: int | None = None
    newest = 0  # the fast paths take stamps newer than any cache_way and fast path had
    for index, operation in enumerate(ops):
        context = f"ops: {ops!r}, at {index}, now={now}"
        if data.draw(st.integers(0, 11), label="advance first") == 0:
            now = max(now or 0, data.draw(st.integers(0, 45), label="now"))
            cached.advance(now)
            plain.advance(now)
        deliver(plain, [operation])
        received.append(operation)
        *way, _ = operation.path
        key = ".".join(way)
        taken = False
        if operation.stamp > newest and data.draw(st.integers(0, 5), label="own") > 0:
            if cached.way_key != key and cached.cache_way(key, way, operation.stamp):
                newest = operation.stamp
            if cached.way_key == key and _through_way(cached, operation, True):
                newest = operation.stamp
                taken = True
        if not taken:
            deliver(cached, [operation])
        assert_tree(cached.to_dict(), fold(received, now), context)
        if data.draw(st.integers(0, 9), label="export now") == 0:
            assert roundtrip(cached.export()) == roundtrip(plain.export()), context
    assert roundtrip(cached.export()) == roundtrip(plain.export()), f"ops: {ops!r}"
    settle_and_compare(cached, plain, ops)


def _run_keys(node: _Node) -> int:
    """How many keys the pending runs of ``node`` name."""
    return sum(len(run[0]) for run in node.runs or ())


def test_dicts_set_again_keep_one_run_entry_per_key_and_no_node() -> None:
    """A writer's loop setting the same small dicts again builds no node for them and keeps
    one run entry per key, however often; a delete, a plain value and an increment in
    between leave them as ``apply`` does, and reading the entries builds the nodes."""
    own_store, plain = new_store(), new_store()
    counter = 0
    for round_ in range(200):
        for leaf in range(10):
            counter += 1
            operation = Op(real_stamp(1, counter, 1), SET, ("p", f"k{leaf}"), {"u": round_})
            _own(own_store, operation)
            deliver(plain, [operation])
    parent = own_store._root._entries["p"]
    assert _run_keys(parent) == 10
    assert all(type(entry) is int for entry in parent._entries.values()), "a node was built"
    for operation in (
        Op(real_stamp(2, 1, 1), DELETE, ("p", "k1"), None),
        Op(real_stamp(2, 2, 1), SET, ("p", "k2"), 7),
        Op(real_stamp(2, 3, 1), INCREMENT, ("p", "k3"), 1),  # (a dict: the general way)
    ):
        if not _own(own_store, operation):
            deliver(own_store, [operation])
        deliver(plain, [operation])
    assert roundtrip(own_store.export()) == roundtrip(plain.export())
    assert own_store.to_dict() == plain.to_dict()
    assert type(parent.entries["k0"]) is _Node  # (recorded: the node ``build`` makes)


def test_a_run_of_deleted_dicts_is_recorded_before_it_grows_past_its_parent() -> None:
    """Dicts set under new keys and deleted at once (a churning writer) leave a run no
    longer than about twice its parent's live keys: it is recorded (its dead keys dropped)
    before that, and the store stays what ``apply`` makes."""
    own_store, plain = new_store(), new_store()
    for index in range(2000):
        for operation in (
            Op(real_stamp(1, 2 * index, 1), SET, ("p", f"k{index}"), {"u": index}),
            Op(real_stamp(1, 2 * index + 1, 1), DELETE, ("p", f"k{index}"), None),
        ):
            if not _own(own_store, operation):
                deliver(own_store, [operation])
            deliver(plain, [operation])
        # (no live key: recorded once it names 64 more than twice none)
        assert _run_keys(own_store._root._entries["p"]) <= 65
    assert roundtrip(own_store.export()) == roundtrip(plain.export())


def test_own_dicts_set_again_reach_every_member_and_a_joiner() -> None:
    """Through the public API: a member sets small dicts again and again (kept pending in
    its store), deletes and overwrites some; its peer, and a member that joins afterwards
    (a snapshot of the pending run), hold the same tree."""
    ports = [free_port() for _ in range(3)]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    writer = Collective(addresses[0], addresses[1:2])
    peer = Collective(addresses[1], addresses[:1])
    members = [writer, peer]
    try:
        for member in members:
            member.start()
        for round_ in range(50):
            for leaf in range(20):
                writer.set(f"sessions.s{leaf}", {"user": leaf, "round": round_, "ok": True})
        writer.delete("sessions.s3")
        writer.set("sessions.s4", "plain")
        writer.set("sessions.s5", {"user": 5, "round": 50})
        expected = {f"s{leaf}": {"user": leaf, "round": 49, "ok": True} for leaf in range(20)}
        del expected["s3"]
        expected["s4"] = "plain"
        expected["s5"] = {"user": 5, "round": 50}
        assert writer.get("sessions") == expected
        wait_for(lambda: peer.get("sessions") == expected, timeout=30)
        joiner = Collective(addresses[2], addresses[:2])
        members.append(joiner)
        joiner.start()
        wait_for(lambda: joiner.get("sessions") == expected, timeout=30)
        writer.set("sessions.s6", {"user": 6, "round": 51})
        expected["s6"] = {"user": 6, "round": 51}
        for member in members:
            wait_for(lambda member=member: member.get("sessions") == expected, timeout=30)
        assert writer.snapshot() == peer.snapshot() == joiner.snapshot()
    finally:
        for member in members:
            member.stop()


def test_a_small_dict_at_the_depth_limit_is_refused_as_the_general_path_refuses_it() -> None:
    """``set``'s small-dict path bounds a key's segments by its length (no count of its
    dots): at 99 segments a small dict is stored, at 100 refused as too deep, as the
    general path (a member with a watch) does; a key with empty segments is refused as a
    bad key either way."""
    nodes = [Collective(f"127.0.0.1:{free_port()}") for _ in range(2)]
    for node in nodes:
        node.start()
    nodes[1].watch("elsewhere", lambda *args: None)
    try:
        for key in ("a." * 98 + "b", "a." * 99 + "b", "a" + "." * 120, "ab" * 60 + "." * 50):
            outcomes = []
            for node in nodes:
                try:
                    node.set(key, {"u": 1})
                    outcomes.append(node.get(key))
                except Exception as exc:
                    outcomes.append((type(exc), str(exc)))
            assert outcomes[0] == outcomes[1], key
        assert nodes[0].get("a." * 98 + "b") == {"u": 1}
        assert nodes[0].snapshot() == nodes[1].snapshot()
    finally:
        for node in nodes:
            node.stop()


def test_sessions_alternating_with_dicts_without_a_ttl_leave_few_runs() -> None:
    """A writer alternating sessions (a ttl) and dicts without one under one parent opens a
    run at each change; the parent's runs are recorded when a dict would make a ninth (a
    session may then add one), and the store stays what ``apply`` makes, before and after
    the sessions expire."""
    own_store, plain = new_store(), new_store()
    for index in range(100):
        ttl = 5 if index % 2 else None
        operation = Op(real_stamp(1, index, 1), SET, ("p", f"k{index}"), {"u": index}, ttl)
        if not _own(own_store, operation):
            deliver(own_store, [operation])
        deliver(plain, [operation])
        runs = own_store._root._entries["p"].runs
        assert runs is None or len(runs) <= 9
    assert own_store.to_dict() == plain.to_dict()
    assert roundtrip(own_store.export()) == roundtrip(plain.export())
    for store in (own_store, plain):
        store.advance(60)
    assert (
        own_store.to_dict()
        == plain.to_dict()
        == {"p": {f"k{index}": {"u": index} for index in range(0, 100, 2)}}
    )
    assert roundtrip(own_store.export()) == roundtrip(plain.export())
