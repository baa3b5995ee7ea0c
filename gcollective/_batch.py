"""Applying a batch of one origin's operations (an OPS frame) faster than one by one.

A writer's loop of new keys under one parent takes a few C-level dict updates
(``_set_siblings``: the keys and stamps wait on the parent as a run, see ``_Node.runs``), and
a run of plain SETs or counters under one parent finds that parent once and raises its
ancestors' summaries once, at the run's end.
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter
from typing import Any, Callable, Iterable, Sequence, cast

from ._columns import full_paths
from ._tree import DELETE, INCREMENT, SET, _Node, raise_below
from ._way import Ways

__all__ = ["Batches"]

_BULK_MIN = 16  # below this, a batch goes one operation at a time
_ONLY_SETS = {SET}
_ONLY_INCREMENTS = {INCREMENT}
_ONLY_INTS = {int}
_SETS_AND_INCREMENTS = {SET, INCREMENT}
# A batch writing at most this many keys, each more than once, may go key by key
# (``_apply_by_key``): a web worker's frame counts one hit and sets one key per request.
_KEYS_MOST = 4
_FIRST = itemgetter(0)
_LAST = itemgetter(2)


def _only_hits_with_ttls(ops: list[int], ttls: Sequence[int]) -> bool:
    """Whether a batch is only INCREMENTs, each with a ttl (a rate limiter's hits:
    ``apply_expiring_hits``' case)."""
    if ops[0] != INCREMENT or ops.count(INCREMENT) != len(ops):
        return False
    # (A writer's loop: one ttl object repeated, as ``parse_ops`` makes the column, which
    # ``count`` matches by identity; ``0 not in`` would compare each with 0 in full.)
    first = ttls[0]
    return (first != 0 and ttls.count(first) == len(ttls)) or 0 not in ttls


def _set_last(
    node: _Node, entries: dict[str, Any], key: str, s: int, value: Any, ancestors: list[_Node]
) -> None:
    """The last of a key's SETs (``Batches._set_step``): what each leaves, the next
    overwrites."""
    entries[key] = s
    node.value[key] = value
    raise_below(ancestors, s)


def _add_hits(
    node: _Node,
    entries: dict[str, Any],
    key: str,
    entry: _Node | None,
    hits: list[int],
    amounts: list[int],
    ancestors: list[_Node],
) -> None:
    """Add INCREMENTs of ints at ``key`` (``Batches._hits_step``) to its counter (``entry``,
    or a new one) as one (see ``Batches._increment_run``)."""
    if entry is None:
        entry = _Node()
        entry.value = 0
    if entry.incs is None:
        entry.incs = dict(zip(hits, amounts))
    else:
        entry.incs.update(zip(hits, amounts))
    last = hits[-1]
    if last > entry.incremented:  # (as ``_increment`` and ``_increment_late`` raise them)
        entry.incremented = last
        if last > entry.reset:
            entry.reset = last
    if last > entry.newest:
        entry.newest = last
    entry.value += sum(amounts)
    entries[key] = entry
    node.value[key] = entry.value
    raise_below(ancestors, last)


class _Parent:
    """A parent met in a batch (see ``Batches._apply_in_turn``): its node, the nodes on the
    way to it, and the newest stamp written below it not yet recorded on them (None: none;
    a stamp is any int)."""

    __slots__ = ("node", "ancestors", "raised")

    def __init__(self, node: _Node, ancestors: list[_Node]) -> None:
        self.node = node
        self.ancestors = ancestors
        self.raised: int | None = None


def _raise_all(parents: dict[str, _Parent], keep: str | None = None) -> None:
    """Record on their ancestors what was written below ``parents`` and forget them, all
    but the one at ``keep``."""
    kept = parents.get(keep) if keep is not None else None
    for parent in parents.values():
        if parent is not kept and parent.raised is not None:
            raise_below(parent.ancestors, parent.raised)
    parents.clear()
    if kept is not None and keep is not None:
        parents[keep] = kept


class Batches(Ways):
    """``apply_batch`` (see the module docstring)."""

    def apply_batch(
        self,
        stamps: Sequence[int],
        ops: list[int],
        paths: list[str | list[str]],
        values: list[Any],
        parent: str = "",
        ttls: Sequence[int] | None = None,
    ) -> None:
        """``apply`` each operation in turn (stamps growing, as in one origin's batch), with
        the same result, faster: a writer's loop of new keys under one parent takes a few
        C-level dict updates (``_set_siblings``), and a run of plain SETs under one parent
        finds that parent once and raises its ancestors' summaries once, at its end.

        A path is a dotted string (segments without dots) or a list of segments; with
        ``parent`` (a dotted path, as an OPS frame may say it once), each is one key under it.
        The store may keep ``stamps`` and ``paths`` (see ``_Node.runs``): the caller gives
        them up. ``stamps`` is read by index 0 and -1 and iterated (an OPS frame's
        ``OpStamps`` makes its stamps only then). ``ttls``: each operation's ttl in
        milliseconds (0 for none), or None when none has one.
        """
        if ttls is not None and any(ttls):
            # (Sessions and hits with a ttl: they may add ttl events or runs anywhere under
            # their parent. Anything else keeps the cached ways where it leaves them valid:
            # see ``_way``.)
            self._forget_way()
            if parent:  # (sessions, rate-limit hits: keys under one parent)
                way = parent.split(".")
                node, ancestors = self._dict_way(way, stamps[0])
                if node is None and ops[0] != DELETE and self.make_way(way, stamps[0]):
                    node, ancestors = self._dict_way(way, stamps[0])  # (a new parent)
                if node is not None and stamps[0] >= node.reset:
                    keys = cast("list[str]", paths)
                    if _only_hits_with_ttls(ops, ttls):
                        self.apply_expiring_hits(
                            node, tuple(parent.split(".")), stamps, keys, values, ttls
                        )
                        raise_below(ancestors, stamps[-1])
                    else:
                        self.apply_expiring_siblings(
                            node, ancestors, stamps, ops, parent, keys, values, ttls
                        )
                    return
            self._apply_in_turn(stamps, ops, full_paths(parent, paths), values, ttls)
            return
        kinds = set(ops)
        if kinds == _ONLY_INCREMENTS and self._increment_run(stamps, parent, paths, values):
            return
        if len(stamps) >= _BULK_MIN and kinds == _ONLY_SETS:
            if parent:
                if self._set_siblings(stamps, parent, cast("list[str]", paths), values):
                    return
            elif self._apply_sibling_sets(stamps, paths, values):
                return
        paths = full_paths(parent, paths)
        # (A batch of one or two operations gains nothing key by key, and the look cost 4 %
        # of a 2-operation frame's read: one request's writes, when frames carry one.)
        if len(ops) > 2 and kinds <= _SETS_AND_INCREMENTS:
            if self._apply_by_key(stamps, ops, paths, values):
                return
        self._apply_in_turn(stamps, ops, paths, values)

    def _apply_in_turn(
        self,
        stamps: Sequence[int],
        ops: list[int],
        paths: list[Any],
        values: list[Any],
        ttls: Iterable[int] = repeat(0),
    ) -> None:
        """``apply_batch`` one operation after the other, where a plain SET or INCREMENT
        under a parent already met in the batch skips the walk from the root: each parent
        (a web app's request alternates a counter's and a key of its own) is found once,
        and its ancestors' summaries raised once, at the end. So does a SET or INCREMENT
        with a ttl (sessions, a rate limiter's counters): apply's last step for it
        (``_apply_with_ttl``) under that parent."""
        apply = self.apply
        # The parents met, by dotted path ("" for the root), while their ways are all dicts
        # (``_Parent``). Only leaves change under them: a SET of a non-dict where nothing
        # newer is, an INCREMENT of no dict, so no way in it breaks; anything else goes
        # through ``apply``, which may change any way: they are raised and dropped first.
        parents: dict[str, _Parent] = {}
        for s, op, path, value, ttl_ms in zip(stamps, ops, paths, values, ttls):
            if type(path) is str:
                above, _, key = path.rpartition(".")
                known = parents.get(above)
                if known is None and op != DELETE:
                    known = self._parent_of(above, s)
                    if known is not None:
                        parents[above] = known
                if known is not None:
                    parent = known.node
                    if ttl_ms:
                        # (SET or INCREMENT: a DELETE carries no ttl) Its key may be on
                        # another parent's way: only this one stays.
                        if len(parents) > 1:
                            _raise_all(parents, keep=above)
                        if s >= parent.reset:
                            self._apply_with_ttl(parent, key, s, op, value, ttl_ms, path)
                        known.raised = s
                        continue
                    if s < parent.reset:
                        if op != DELETE:
                            known.raised = s  # overtaken by a reset above: only ancestors learn
                            continue
                    elif op == SET and type(value) is not dict:
                        entries = parent._entries if parent.runs is None else parent.entries
                        entry = entries.get(key)
                        if entry is None or (type(entry) is int and s > entry):
                            # (``apply``'s hot path)
                            entries[key] = s
                            parent.value[key] = value
                            known.raised = s
                            continue
                    elif op == INCREMENT:
                        # Counters (a hot counter, others' hits): ``apply``'s last step, unless
                        # it would turn a dict (maybe on another parent's way) into a number.
                        entries = parent._entries if parent.runs is None else parent.entries
                        entry = entries.get(key)
                        if (
                            type(entry) is _Node
                            and type(value) is int
                            and type(entry.value) is int
                            and entry.incs is not None
                            and entry.ttls is None
                        ):
                            if s > entry.newest:
                                # ``_increment``'s usual case inline: a hit of an int counter,
                                # the newest event there (so newer than its assignment, and
                                # no repeat: every recorded hit is at most ``newest``).
                                entry.incs[s] = value
                                entry.newest = entry.incremented = entry.reset = s
                                entry.value += value
                                parent.value[key] = entry.value
                                self._untidy = True  # (hits for ``collect`` to fold)
                                known.raised = s
                                continue
                            if (
                                entry.incremented > s > entry.written_below
                                and s >= entry.assigned
                                and s not in entry.incs
                            ):
                                # ``_increment_late``'s usual case inline: several writers
                                # hit one counter, so a hit often arrives after a newer one
                                # (the receiver's own, another peer's). Not a repeat, not
                                # overtaken by the assignment, newer than any write below:
                                # an int sum does not depend on the order, so it only grows
                                # (its stamps stay: a newer hit raised them already).
                                entry.incs[s] = value
                                entry.value += value
                                parent.value[key] = entry.value
                                self._untidy = True
                                known.raised = s
                                continue
                        if type(entry) is not _Node or type(entry.value) is not dict:
                            # (without ttl: its path is not needed, not even below)
                            self._increment(parent, key, s, value)
                            known.raised = s
                            continue
                segments = path.split(".")
            else:
                above = None
                segments = path
            if parents:
                _raise_all(parents)
            apply(s, op, segments, value, ttl_ms)
        if parents:
            _raise_all(parents)

    def _parent_of(self, above: str, s: int) -> _Parent | None:
        """The node at the dotted path ``above`` and its ancestors, if its way is all dicts
        (``_dict_way``) for operations from stamp ``s`` on, else None."""
        node, ancestors = self._dict_way(above.split(".") if above else [], s)
        if node is None:
            return None
        return _Parent(node, ancestors)

    def _increment_run(
        self, stamps: Sequence[int], parent: str, paths: list[Any], amounts: list[Any]
    ) -> bool:
        """Apply INCREMENTs of ints at one dotted path (a hot counter's hits from one origin,
        stamps growing) as one, where each one by one would just add to an int counter: after
        its assignment and every write below it, none a repeat, nothing that may expire. Then
        the order of the additions does not matter, whether a hit is the newest there or
        lands among other members' hits: the counter (or a new one) gets every stamp's
        increment recorded as one by one would (``incs``, which repeats, late events, the
        export and ``collect`` read), its number grows by their sum once, its stamps and the
        summaries above it are raised once. Returns False, having changed nothing, when the
        batch is not that (then one by one decides)."""
        path = paths[0]
        if type(path) is not str or paths.count(path) != len(paths):
            return False
        above, _, key = (f"{parent}.{path}" if parent else path).rpartition(".")
        step = self._hits_step(above, key, list(stamps), amounts)
        if step is None:
            return False
        _add_hits(*step)
        self._untidy = True  # (increments for ``collect`` to fold)
        return True

    def _entries_at(
        self, above: str, first: int
    ) -> tuple[_Node, dict[str, Any], list[_Node]] | None:
        """The node at the dotted path ``above``, its entries and its ancestors, if its way
        is all dicts (``_dict_way``) and nothing reset it after ``first``; else None."""
        node, ancestors = self._dict_way(above.split(".") if above else [], first)
        if node is None or first < node.reset:
            return None
        return node, node._entries if node.runs is None else node.entries, ancestors

    def _hits_step(
        self, above: str, key: str, hits: list[int], amounts: list[Any]
    ) -> tuple[Any, ...] | None:
        """``_add_hits``' arguments for INCREMENTs of ``amounts`` at stamps ``hits``
        (growing) at ``key`` under the dotted path ``above``, if they add up as
        ``_increment_run`` says; else None (nothing changed)."""
        if set(map(type, amounts)) != _ONLY_INTS:
            return None  # (a float's sum depends on the order of the additions)
        first = hits[0]
        found = self._entries_at(above, first)
        if found is None:
            return None
        node, entries, ancestors = found
        entry = entries.get(key)
        if entry is not None and (
            type(entry) is not _Node
            or entry.ttls is not None
            or type(entry.value) is not int
            or not (first > entry.assigned and first > entry.written_below)
            or (entry.incs is not None and not entry.incs.keys().isdisjoint(hits))
        ):
            return None  # not only additions to a number: one by one
        return node, entries, key, entry, hits, amounts, ancestors

    def _set_step(
        self, above: str, key: str, stamps: list[int], values: list[Any]
    ) -> tuple[Any, ...] | None:
        """``_set_last``'s arguments for plain SETs of ``values`` at stamps ``stamps``
        (growing) at ``key`` under the dotted path ``above``, if each one by one would take
        ``_apply_in_turn``'s hot path (no dict value, nothing as new at the key, the way all
        dicts): then only the last one's stamp and value stay. Else None."""
        if dict in set(map(type, values)):
            return None
        first = stamps[0]
        found = self._entries_at(above, first)
        if found is None:
            return None
        node, entries, ancestors = found
        entry = entries.get(key)
        if entry is not None and (type(entry) is not int or not first > entry):
            return None
        return node, entries, key, stamps[-1], values[-1], ancestors

    def _apply_by_key(
        self, stamps: Sequence[int], ops: list[int], paths: list[Any], values: list[Any]
    ) -> bool:
        """Apply a batch of SETs and INCREMENTs without ttls (stamps growing) that writes
        a few keys, each more than once, in one order over and over (a web worker's frame:
        each request counts a hit of the same counter and sets the worker's key), a key at
        a time: each key's SETs (``_set_step``) or each key's INCREMENTs of ints
        (``_hits_step``) at once. Every key's case is checked before anything changes;
        returns False, having changed nothing, when one is not such a case (then in turn
        decides).

        The order between keys does not matter here: each key holds a leaf or a counter
        (no dict: no other key's way goes through it) under a way of dicts, so a write at
        one key changes only that leaf and raises the summaries above it (maxima)."""
        try:
            keys = dict.fromkeys(paths)  # (in the order of first writes, as in turn)
        except TypeError:
            return False  # a path given as a list of segments
        count = len(keys)
        if count > _KEYS_MOST or count == len(paths):
            return False
        if type(stamps) is not list:
            stamps = list(stamps)  # (an ``OpStamps``: sliced below)
        steps: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        make_step: Callable[[str, str, list[int], list[Any]], tuple[Any, ...] | None]
        apply_step: Callable[..., None]
        for first, path in enumerate(keys):
            # Each key's writes a column of the batch, which repeats its keys in one order
            # (slices: a batch in any other order goes in turn).
            column = paths[first::count]
            if type(path) is not str or column.count(path) != len(column):
                return False
            kinds = ops[first::count]
            if kinds.count(SET) == len(column):
                make_step, apply_step = self._set_step, _set_last
            elif kinds.count(INCREMENT) == len(column):
                make_step, apply_step = self._hits_step, _add_hits
            else:
                return False  # (a key set and counted: the order decides)
            above, _, key = path.rpartition(".")
            step = make_step(above, key, stamps[first::count], values[first::count])
            if step is None:
                return False
            steps.append((apply_step, step))
        for apply_step, arguments in steps:
            apply_step(*arguments)
            if apply_step is _add_hits:
                self._untidy = True  # (increments for ``collect`` to fold)
        return True

    def _apply_sibling_sets(
        self, stamps: Sequence[int], paths: list[Any], values: list[Any]
    ) -> bool:
        """``_set_siblings`` of plain SETs given as dotted paths, if they are under one parent.
        Returns False, having changed nothing, when the batch is not that."""
        try:
            parts = list(map(str.rpartition, paths, repeat(".")))
        except TypeError:
            return False  # a path given as a list of segments
        prefixes = set(map(_FIRST, parts))
        if len(prefixes) != 1:
            return False
        return self._set_siblings(stamps, prefixes.pop(), list(map(_LAST, parts)), values)

    def _set_siblings(
        self, stamps: Sequence[int], parent: str, keys: list[str], values: list[Any]
    ) -> bool:
        """Apply SETs of ``values`` at ``keys`` (segments) under the dotted path ``parent``
        ("" for the top level), stamps growing, with a few C-level dict operations instead
        of a Python step per operation, when all are new there: no dict values, the way to
        ``parent`` all dicts (``_dict_way``) and none of the keys present. Returns False,
        having changed nothing, when that is not the case."""
        if dict in set(map(type, values)):
            return False
        node, ancestors = self._dict_way(parent.split(".") if parent else [], stamps[0])
        if node is None or stamps[0] < node.reset:
            return False
        if any(way.parent is node for way in self._ways.values()):
            self._forget_way()  # (set_leaf reads a way's parent's ``_entries`` alone: no runs)
        # None of the keys may be there yet: the pending runs' keys are all in ``value``, and
        # every key of ``value`` has an entry or is in a run.
        data = node.value
        entries = node._entries
        if not data.keys().isdisjoint(keys) or (entries and not entries.keys().isdisjoint(keys)):
            return False  # some are overwrites: each needs its stamp compared
        # A key written twice keeps its last value and stamp, as one by one. The stamps go
        # to ``entries`` only when something reads them (see ``_Node.runs``).
        data.update(zip(keys, values))
        if node.runs is None:
            node.runs = [(keys, stamps, None)]
        else:
            node.runs.append((keys, stamps, None))
        raise_below(ancestors, stamps[-1])
        return True
