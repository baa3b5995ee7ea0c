"""Property tests: a fired session's members folded into its hidden values (issue 20).

Once a session's expiry fired, its members are bare stamps (all the session's own) whose
values the expiry hides. ``_tree.fold_members`` leaves their entries out (``runs`` is
``FOLDED``) until something reads ``entries``: a late operation at or below the session, a
rebuild, ``expire``; an export reads them as a copy. The folded form must be the general one
in every respect: the same tree, the same export (whole and in pieces), whatever comes.
"""

from __future__ import annotations

import contextlib
import tracemalloc
import unittest.mock
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from test_churn_hidden import KEYS, SESSIONS, _bodies
from test_store_property import (
    INCREMENT,
    NODE_IDS,
    SET,
    Op,
    _settings,
    _through_the_wire_in_pieces,
    assert_tree,
    deliver,
    deliver_as_batch,
    fold,
    new_store,
    real_stamp,
    roundtrip,
)

from gcollective import _ttl
from gcollective._tree import FOLDED, _Node


def _unfolding() -> Any:
    """A context in which ``fold_members`` does nothing, nor the fast firing that folds a
    session itself (``_rebuild.fire_session``): the general form."""
    stack = contextlib.ExitStack()
    stack.enter_context(unittest.mock.patch.object(_ttl, "fold_members", lambda node: None))
    stack.enter_context(_general_firing())
    return stack


def _general_firing() -> Any:
    """A context in which every firing takes the general rebuild (then ``fold_members``)."""
    return unittest.mock.patch.object(_ttl, "fire_session", lambda *arguments: False)


def _folded(node: _Node) -> int:
    """How many nodes of ``node``'s subtree have their members folded (nothing recorded)."""
    count = int(node.runs is FOLDED)
    for entry in node._entries.values():
        if type(entry) is _Node:
            count += _folded(entry)
    return count


def _same(folding: Any, general: Any, context: str) -> None:
    """The two stores hold the same tree and export the same state, whole and in pieces
    (merged: a folded session weighs less in ``export_pieces``, so it may cut it elsewhere)."""
    assert_tree(folding.to_dict(), general.to_dict(), context)
    assert roundtrip(folding.export()) == roundtrip(general.export()), context
    for leaves in (1, 3):
        joiners = []
        for holder in (folding, general):
            joiner = new_store()
            joiner.advance(holder.now_ms)
            with _unfolding():
                for items in _through_the_wire_in_pieces(holder, 200, leaves):
                    joiner.merge(items)
            joiners.append(roundtrip(joiner.export()))
        assert joiners[0] == joiners[1], context


def _play(store: Any, step: tuple[Any, ...]) -> None:
    kind, argument = step
    if kind == "deliver":
        deliver(store, [argument])
    elif kind == "batch":
        deliver_as_batch(store, [argument], ("s",))
    elif kind == "advance":
        store.advance(argument)
    else:
        store.expire(argument)
        while not store.collect(argument):
            pass


@_settings(max_examples=300)
@given(st.data())
def test_folded_sessions_match_the_general_form(data: st.DataObject) -> None:
    """Sessions fire (and fold), late operations meet them, time goes on, expiries are made
    permanent and collected: the store that folds holds what one that never folds holds, and
    both the model's tree; joiners behind it too."""
    steps = data.draw(st.lists(st.integers(0, 5), min_size=3, max_size=30), label="steps")
    folding, general = new_store(), new_store()
    received: list[Op] = []
    millis, now, collected = 0, 0, 0
    folded = 0
    for counter, kind in enumerate(steps, 1):
        if kind == 0:
            now = data.draw(st.integers(now, max(now, millis + 14)), label="now")
            step: tuple[Any, ...] = ("advance", now)
            if data.draw(st.booleans(), label="hard"):
                collected = data.draw(st.integers(collected, max(collected, min(millis, now))))
                step = ("hard", real_stamp(collected, 0, 0))
                _play(folding, ("advance", now))
                with _unfolding():
                    _play(general, ("advance", now))
        else:
            millis += data.draw(st.integers(0, 3), label="millis")
            late = data.draw(st.integers(0, min(millis - collected, 6)), label="late")
            origin = data.draw(st.sampled_from(NODE_IDS), label="origin")
            operation = Op(real_stamp(millis - late, counter, origin), *data.draw(_bodies()))
            batched = len(operation.path) == 2 and data.draw(st.booleans(), label="batch")
            step = ("batch" if batched else "deliver", operation)
            received.append(operation)
        _play(folding, step)
        with _unfolding():
            _play(general, step)
        folded = max(folded, _folded(folding._root))
        context = f"now={now}, ops: {received!r}"
        assert_tree(folding.to_dict(), fold(received, now), context)
        _same(folding, general, context)
        assert _folded(general._root) == 0
    if folded:
        event("sessions folded")
    joiner = new_store()
    joiner.advance(data.draw(st.integers(min(collected, now), now), label="joiner's now"))
    joiner.merge(roundtrip(folding.export()))
    assert_tree(joiner.to_dict(), fold(received, joiner.now_ms), f"ops: {received!r}")


def _fired_session() -> tuple[Any, list[Op]]:
    """A store holding one session whose expiry fired (its members folded)."""
    ops = [Op(real_stamp(1000, 0, 1), SET, ("s", "k"), {"u": 1, "w": "x"}, 2000)]
    store = new_store()
    deliver(store, ops)
    store.advance(3500)
    return store, ops


def test_a_fired_session_folds_and_a_late_write_below_unfolds_it() -> None:
    """The fired session's members wait folded (no entries; ``entries_copy`` and an export
    tell them); a write below it older than its expiry records them again, and the session
    with all three members shows for a joiner whose clock is before the expiry."""
    store, ops = _fired_session()
    session = store._root.entries["s"].entries["k"]
    assert session.runs is FOLDED and not session._entries
    assert session.entries_copy() == dict.fromkeys(["u", "w"], ops[0].stamp)
    assert session.hidden_values() == {"u": 1, "w": "x"}
    ops.append(Op(real_stamp(2000, 0, 2), SET, ("s", "k", "v"), 3))
    deliver(store, ops[1:])
    assert session.runs is None and set(session._entries) == {"u", "w", "v"}
    assert store.to_dict() == fold(ops, 3500) == {"s": {}}
    joiner = new_store()
    joiner.advance(2500)
    joiner.merge(roundtrip(store.export()))
    assert joiner.to_dict() == fold(ops, 2500) == {"s": {"k": {"u": 1, "w": "x", "v": 3}}}


def test_expire_forgets_a_folded_session() -> None:
    """``expire`` makes a folded session's expiry permanent and forgets it whole."""
    store, _ = _fired_session()
    assert store.expire(real_stamp(4000, 0, 0)) == 1
    assert store._root.entries["s"].entries == {} and store.to_dict() == {"s": {}}


def _bytes_per_fired_session(count: int) -> float:
    """Bytes (``tracemalloc``) a store holds per session of ``count`` that fired, their
    expiries not yet permanent: what a churning member holds for each until the stability
    frontier passes it (the values are small ints, shared)."""
    store = new_store()
    keys = [str(index) for index in range(count)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index, key in enumerate(keys):
            stamp = real_stamp(1000 + index // 10, index % 10, 1)
            store.apply(stamp, SET, ("s", key), {"u": 1, "w": 2}, 2000)
        store.advance(1000 + count // 10 + 2001)
        assert store.pending_expiries == count and store.to_dict() == {"s": {}}
        return (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()


def test_a_fired_session_costs_at_most_660_bytes_until_it_is_permanent() -> None:
    """Its node, ttl event, folded members, its key and slot, its ``_due`` share: 614 bytes
    (Python 3.11), against 998 with a dict of its members' stamps and one of their values,
    and 711 with a set of the stamps in ``_due`` (now the node's ``fired_to``: issue 20)."""
    assert _bytes_per_fired_session(20_000) < 660


def test_counting_the_metadata_leaves_the_members_folded() -> None:
    """``metadata_entries`` (a metric, read at each scrape) counts a folded session's
    members without recording them (which would undo the fold at every scrape)."""
    from gcollective._metrics import metadata_entries

    store, _ = _fired_session()
    session = store._root.entries["s"].entries["k"]
    assert metadata_entries(store) == 4  # s, k, and k's two members
    assert session.runs is FOLDED


def test_a_node_whose_entries_pop_after_its_events_all_fired_tells_each_once() -> None:
    """A counter hit with ttl=1 s, then with ttl=0.4 s (an earlier expiry: a ``_pending``
    entry of its own), both due by the next ``advance``: the first entry to pop fires both,
    the second finds them in ``_due`` already (the node's ``fired_to``), so each is told
    once, waits once, and the owner is made permanent once."""
    store = new_store()
    store.advance(1000)
    first, second = real_stamp(1000, 0, 1), real_stamp(1001, 0, 1)
    store.apply(first, INCREMENT, ("c",), 1, 1000)
    store.apply(second, INCREMENT, ("c",), 1, 400)
    assert store.pending_expiries == 2
    fired = store.advance(2500)
    assert sorted(fired) == [(("c",), first), (("c",), second)]
    assert store.advance(3000) == [] and store.pending_expiries == 2
    assert store.to_dict() == {}
    assert store.expire(real_stamp(4000, 0, 0)) == 1  # (the second owns the path)
    assert store.pending_expiries == 0 and store.to_dict() == {}


def _metadata(entry: Any) -> Any:
    """Everything a node (or a bare stamp) of the tree holds, its subtree's included: two
    stores that agree here hold the same state, not only the same tree and export."""
    if type(entry) is not _Node:
        return entry
    slots = {name: getattr(entry, name) for name in _Node.__slots__ if name != "_entries"}
    slots["runs"] = "FOLDED" if entry.runs is FOLDED else [_run(run) for run in entry.runs or ()]
    slots["_entries"] = {key: _metadata(child) for key, child in entry._entries.items()}
    return slots


def _flat_sessions() -> st.SearchStrategy:
    """SETs of a small flat dict with a ttl under ``s``: what the fast firing takes."""
    flat = SESSIONS.filter(lambda value: not any(type(v) is dict for v in value.values()))
    return st.tuples(
        st.just(SET), st.sampled_from(KEYS).map(lambda k: ("s", k)), flat, st.integers(1, 12)
    )


def _run(run: Any) -> Any:
    """A pending run's items, its third told by its contents (``Sessions``: no ``==``)."""
    keys, stamps, third = run
    names = getattr(type(third), "__slots__", ())
    return list(keys), list(stamps), type(third), [getattr(third, n) for n in names]


def _counting_fast_firings(counts: list[int]) -> Any:
    """A context counting the firings that ``fire_session`` took (``counts[0]``)."""
    fast = _ttl.fire_session

    def counted(*arguments: Any) -> bool:
        done = fast(*arguments)
        counts[0] += done
        return done

    return unittest.mock.patch.object(_ttl, "fire_session", counted)


@_settings(max_examples=300)
@given(st.data())
def test_the_fast_firing_leaves_what_the_general_rebuild_leaves(data: st.DataObject) -> None:
    """Sessions fire, with and without writes, deletes or increments below them and older
    or newer operations arriving late, time goes on, expiries are made permanent and
    collected: a store whose sessions fire through ``fire_session`` holds exactly the
    metadata of one where every firing takes the general rebuild, and the model's tree."""
    steps = data.draw(st.lists(st.integers(0, 4), min_size=3, max_size=30), label="steps")
    fast, general = new_store(), new_store()
    received: list[Op] = []
    millis, now, collected = 0, 0, 0
    counts = [0]
    for counter, kind in enumerate(steps, 1):
        if kind == 0:
            now = data.draw(st.integers(now, max(now, millis + 14)), label="now")
            step: tuple[Any, ...] = ("advance", now)
            if data.draw(st.booleans(), label="hard"):
                collected = data.draw(st.integers(collected, max(collected, min(millis, now))))
                step = ("hard", real_stamp(collected, 0, 0))
                with _counting_fast_firings(counts):
                    _play(fast, ("advance", now))
                with _general_firing():
                    _play(general, ("advance", now))
        else:
            millis += data.draw(st.integers(0, 3), label="millis")
            late = data.draw(st.integers(0, min(millis - collected, 6)), label="late")
            origin = data.draw(st.sampled_from(NODE_IDS), label="origin")
            body = data.draw(st.one_of(_flat_sessions(), _bodies()))
            operation = Op(real_stamp(millis - late, counter, origin), *body)
            batched = len(operation.path) == 2 and data.draw(st.booleans(), label="batch")
            step = ("batch" if batched else "deliver", operation)
            received.append(operation)
        with _counting_fast_firings(counts):
            _play(fast, step)
        with _general_firing():
            _play(general, step)
        context = f"now={now}, ops: {received!r}"
        assert _metadata(fast._root) == _metadata(general._root), context
        assert_tree(fast.to_dict(), fold(received, now), context)
    if counts[0]:
        event("sessions fired the fast way")


def test_a_churning_session_fires_the_fast_way() -> None:
    """A received session (a small flat dict with a ttl) fires through ``fire_session``:
    folded, hidden, and its key gone from its parent's dict, as the general way leaves it."""
    counts = [0]
    with _counting_fast_firings(counts):
        store, ops = _fired_session()
    assert counts == [1]
    session = store._root.entries["s"].entries["k"]
    assert session.runs is FOLDED and session.hidden_values() == {"u": 1, "w": "x"}
    assert store.to_dict() == fold(ops, 3500) == {"s": {}}
    general = new_store()
    with _general_firing():
        deliver(general, ops)
        general.advance(3500)
    assert _metadata(store._root) == _metadata(general._root)
