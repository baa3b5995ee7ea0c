"""The replicated tree: a sans-IO, convergent store of nested JSON data.

Every operation carries a *stamp*, a unique int (see ``_clock``). The contract: the materialized
tree always equals the result of applying every distinct operation received, in ascending stamp
order, to an empty dict, with these rules:

- SET p v: non-dicts (or nothing) met on the way to p are replaced by dicts; p becomes v.
- DELETE p: p is removed if the way to it consists of dicts; otherwise nothing happens.
- INCREMENT p n: the way is made of dicts as for SET; a number (not a bool) at p grows by n,
  anything else at p (or nothing) becomes n.

Operations may arrive in any order and more than once. Rather than replaying a log, each path
keeps a small summary of the events that can still matter to it:

- ``a`` / ``av``: its own latest assignment (SET or DELETE at exactly this path). A SET of a dict
  is recorded as an assignment of DICT here plus an assignment of each member below, all with
  the same stamp.
- ``incs``: increments that are not yet overtaken, by stamp (so a repeat is applied once).
- ``d``: the latest SET or INCREMENT strictly below this path; such a write turns this path
  into a dict ("ensure dict").
- ``imax``: the latest increment here. Together with the assignment it forms ``r``, the reset
  stamp of the children: a child event older than ``r`` can never matter again and is dropped.

The value of a path follows from these: after the effective assignment (its own, or a newer
reset of an ancestor), the latest of {increment here, write below} decides whether it is a
number or a dict. In-order writes (the normal case) take short paths that touch only the path
written; anything arriving late records its event and recomputes the affected subtree with
``_rebuild``, which is the definition the fast paths must agree with.

A path whose only metadata is one assignment is stored as a bare int stamp in its parent's
``entries``: its value is in the parent's materialized dict, or absent for a tombstone. That
keeps the cost of the common leaf to one dict slot and one int. A bulk of new leaves (a
writer's loop received in one batch, or a node's leaves installed from a snapshot) is not
even recorded there at first: the parent keeps their keys and stamps as a *run*
(``_Node.runs``), and moves them into ``entries`` when anything first reads those
(``_Node.entries`` does). Keys written once, the bulk of a writer's loop, so cost one dict
insert instead of two.

Expiring keys: a SET or INCREMENT with a ttl records a ttl event on its path's node
(``ttls``: stamp -> derived expiry stamp D, see ``_clock.expiry_stamp``); such a path is never
a bare int, and any operation at or below it takes ``_slow`` (record, then ``_rebuild``). The
contract's derived EXPIRE fires once ``advance`` has moved ``now_ms`` past its time and acts,
if its event still owns the path, as a DELETE at D for the *materialized* value only
(``_rebuild``'s visible base ``vbase`` / visible reset ``vr``): nothing is forgotten, since an
operation older than D may still arrive and cancel it. Values hidden that way keep a node of
their own (a bare int's value would be lost with the hidden dict). ``expire`` turns fired
expiries below the stability frontier into real DELETEs at D, which ``collect`` then forgets.
"""

from __future__ import annotations

import heapq
import math
from itertools import repeat
from operator import itemgetter
from typing import Any, Iterable, Sequence

from ._clock import MILLIS_SHIFT, expiry_stamp
from ._columns import LeafColumns, full_paths, unpack_stamps
from ._validate import INT_BOUND

__all__ = [
    "Store",
    "SET",
    "INCREMENT",
    "DELETE",
    "MISSING",
    "is_number",
    "copy_value",
    "read_path",
]

SET = 0
INCREMENT = 1
DELETE = 2

NEVER = float("-inf")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING: Any = _Marker("MISSING")
DICT: Any = _Marker("DICT")


def is_number(value: object) -> bool:
    """True for int and float values; bool is not a number in JSON."""
    return type(value) is int or type(value) is float


def copy_value(value: Any) -> Any:
    """Copy a JSON value deeply, keeping every type exactly (faster than ``copy.deepcopy``)."""
    kind = type(value)
    if kind is dict:
        return {k: copy_value(v) for k, v in value.items()}
    if kind is list:
        return [copy_value(v) for v in value]
    return value


def read_path(data: dict[str, Any], path: Iterable[str], default: Any = None) -> Any:
    """The value at ``path`` in a plain nested dict (containers copied), or ``default`` when
    there is none (also when the way to it goes through something that is not a dict)."""
    node: Any = data
    try:
        for segment in path:
            node = node[segment]
    except (KeyError, TypeError):
        return default  # missing, or the way goes through a list, str or number (all JSON)
    kind = type(node)
    if kind is dict or kind is list:
        return copy_value(node)
    return node


class _Node:
    """Metadata of one path that is more than a single assignment (see the module docstring)."""

    __slots__ = ("a", "av", "d", "imax", "incs", "r", "top", "_entries", "runs", "value", "ttls")

    def __init__(self) -> None:
        self.a: float | int = NEVER  # own assignment stamp
        self.av: Any = MISSING  # own assignment: leaf value, DICT or MISSING (a DELETE)
        self.d: float | int = NEVER  # latest write strictly below
        self.imax: float | int = NEVER  # latest increment here
        self.incs: dict[int, int | float] | None = None  # increments still relevant
        self.r: float | int = NEVER  # reset stamp for the children
        self.top: float | int = NEVER  # latest stamp anywhere in this subtree
        self._entries: dict[str, int | _Node] = {}
        # Leaves set in bulk (or installed from a snapshot) and not yet in ``_entries``, or
        # None: (keys, stamps, None) (the stamps a list or a frame's ``OpStamps``, made when
        # iterated) or a snapshot's (keys, packed stamps, origins) (``unpack_stamps``). Their
        # keys are new to the node and to each other run, and all in ``value`` (a dict)
        # while they are pending: nothing but ``Store._set_siblings`` and ``collect`` touch
        # a node with runs without reading ``entries`` first, which records them.
        self.runs: list[tuple[Sequence[str], Any, tuple[int, ...] | None]] | None = None
        self.value: Any = MISSING  # materialized value (a dict object when it is a dict)
        # Expiries of ttl operations here still able to fire: their stamp -> derived stamp D.
        self.ttls: dict[int, int] | None = None

    @property
    def entries(self) -> dict[str, int | _Node]:
        """Each child's key -> its stamp (a plain assignment or tombstone) or its ``_Node``,
        pending runs recorded first. (Hot paths test ``runs`` and read ``_entries`` instead:
        a property costs ~100 ns.)"""
        if self.runs is not None:
            self.settle_runs()
        return self._entries

    @entries.setter
    def entries(self, entries: dict[str, int | _Node]) -> None:
        self.runs = None  # (replaced whole: the runs are read first, or meant to go too)
        self._entries = entries

    def settle_runs(self) -> None:
        """Record the pending runs in ``_entries``."""
        _add_runs(self._entries, self.runs or ())
        self.runs = None

    def entries_copy(self) -> dict[str, int | _Node]:
        """A copy of ``entries`` that leaves the pending runs pending: what reads a node
        once (an export) need not keep a 128-bit int and a dict slot per leaf of them."""
        entries = dict(self._entries)
        if self.runs is not None:
            _add_runs(entries, self.runs)
        return entries


def _add_runs(
    entries: dict[str, int | _Node], runs: Iterable[tuple[Sequence[str], Any, Any]]
) -> None:
    """Record ``runs`` (see ``_Node.runs``) in ``entries``."""
    for keys, stamps, origins in runs:
        if origins is not None:
            stamps = unpack_stamps(stamps, origins)
        entries.update(zip(keys, stamps))


class Store:
    """A nested dict that converges under operations delivered in any order, with repeats.

    Pure Python, no I/O. ``apply`` takes one stamped operation; ``export`` / ``merge`` move the
    whole state (metadata included) between replicas. Read the tree through ``get`` or
    ``to_dict``; ``data`` is the live root for callers that promise not to mutate it.
    """

    def __init__(self) -> None:
        root = _Node()
        root.value = {}
        self._root = root
        self.data: dict[str, Any] = root.value
        # Where the incremental collection (``collect``) stands: a stack of
        # [node, its reset stamp, its children still to visit, entries dropped, parent, key].
        self._sweep: list[list[Any]] = []
        #: Tombstones and increments dropped or folded by ``collect`` so far.
        self.collected = 0
        # False while nothing can have left metadata for ``collect`` since its last pass: the
        # fast paths of ``apply`` (new keys, newer values of plain leaves) leave none, so a
        # store that only ever sees those is never swept.
        self._untidy = False
        #: The store's notion of now, in wall-clock milliseconds (see ``advance``).
        self.now_ms: float | int = NEVER
        # Expiries not yet due, (E, stamp, path), and due ones not yet made permanent,
        # (D, stamp, path). Entries may be stale (the event was overtaken): checked on use.
        self._pending: list[tuple[int, int, tuple[str, ...]]] = []
        self._due: list[tuple[int, int, tuple[str, ...]]] = []
        self._due_stamps: set[int] = set()  # the events in _due
        #: Expiries made permanent by ``expire`` so far.
        self.expired = 0
        # The way cached by ``cache_way`` for ``set_leaf``: the dotted path of a parent (or
        # None), the parent and the nodes on the way to it (itself included). Valid while only
        # fast-path SETs ran since: every other change of the tree calls ``_forget_way`` (see
        # ``cache_way``). The newest stamp ``set_leaf`` wrote below them, or 0: those nodes'
        # ``top`` and ``d`` learn it only when read (``_settle_way``), not at every write.
        self.way_key: str | None = None
        self._way_parent = root
        self._way_nodes: list[_Node] = []
        self._way_path: tuple[str, ...] = ()
        self._way_newest = 0

    # -- reading ---------------------------------------------------------------------------

    def get(self, path: Iterable[str], default: Any = None) -> Any:
        """The value at ``path`` (containers copied), or ``default`` when there is none."""
        return read_path(self.data, path, default)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the whole tree."""
        return copy_value(self.data)

    # -- applying one operation -------------------------------------------------------------

    def cache_way(self, key: str, way: tuple[str, ...] | list[str], s: int) -> bool:
        """Remember the node at ``way`` (named ``key``, its dotted form) for ``set_leaf``, if
        a plain SET below it at stamp ``s`` would take the fast path at every level; True
        when cached. ``way`` must be a valid path (``key`` is only its name here).

        The cache stays valid while the tree changes only through ``set_leaf`` and the fast
        paths of ``apply`` (a leaf written where nothing is newer, a new dict on the way):
        those never replace a node, make a dict something else, add a ttl or raise a reset
        stamp. Everything else calls ``_forget_way`` first.
        """
        self._settle_way()
        parent, nodes = self._settled_way(way, s)
        if parent is None or s < max([self._root.r, *[node.r for node in nodes]]):
            return False
        if parent.runs is not None:
            parent.settle_runs()  # (set_leaf reads its _entries: no runs are added meanwhile)
        self._way_parent = parent
        self._way_nodes = nodes
        self._way_path = tuple(way)
        self.way_key = key
        return True

    def set_leaf(self, s: int, leaf: str, value: Any) -> bool:
        """``apply(s, SET, way + (leaf,), value)`` under the way ``cache_way`` remembered, in
        the common case: a plain value (not a dict) where there is nothing newer. ``s`` must
        be a stamp new to this store and newer than the one given to ``cache_way`` and to
        every ``set_leaf`` since, as a clock's are (``Collective.set`` takes them from its
        clock). Returns False, having changed nothing, when that is not the case (call
        ``apply``)."""
        if type(value) is dict:
            return self.assign_leaf(s, leaf, value)
        parent = self._way_parent
        entries = parent._entries
        entry = entries.setdefault(leaf, s)  # one lookup when the key is new (``s`` is)
        if entry is not s:
            if type(entry) is not int or not s > entry:
                return False
            entries[leaf] = s
        parent.value[leaf] = value
        self._way_newest = s  # (the newest yet: raised on the way later, see _settle_way)
        return True

    def assign_leaf(self, s: int, leaf: str, value: Any, ttl_ms: int = 0) -> bool:
        """``apply(s, SET, way + (leaf,), value, ttl_ms)`` under the cached way, for the SETs
        ``set_leaf`` leaves out: a dict value (a session), or a ttl, where nothing in the
        key's subtree is as new as ``s`` (see ``_assign_fresh``). ``s`` as for ``set_leaf``;
        False, having changed nothing, when the case is not that simple."""
        path = (*self._way_path, leaf) if ttl_ms else ()
        if not self._assign_fresh(self._way_parent, leaf, s, value, ttl_ms, path):
            return False
        self._way_newest = s
        return True

    def _assign_fresh(
        self, parent: _Node, key: str, s: int, value: Any, ttl_ms: int, path: tuple[str, ...]
    ) -> bool:
        """A SET of a dict or with a ttl (at ``path``, ``parent``'s child ``key``) where
        nothing in the key's subtree is as new as ``s`` and the expiry is not due: the key is
        replaced whole by a fresh node, as ``_set`` (and, with a ttl, ``_slow``'s record and
        rebuild) would make it. False, having changed nothing, when the case is not that."""
        entries = parent._entries if parent.runs is None else parent.entries
        entry = entries.get(key)
        if (entry is not None and not s > _newest_in(entry)) or type(parent.value) is not dict:
            return False  # something there is as new (the general way compares), or no dict
        expiry = 0
        if ttl_ms:
            expiry = expiry_stamp(s, ttl_ms)
            if expiry >> MILLIS_SHIFT <= self.now_ms:
                return False  # due already: the general way fires it
        if type(value) is dict:
            node = self._build(value, s)
        elif ttl_ms:
            node = _Node()
            node.a = node.r = node.top = s
            node.av = node.value = value
        else:
            return False  # a plain leaf: set_leaf's case
        if ttl_ms:
            self._record_ttl(node, s, expiry, path)
        self._untidy = True  # (what it replaced may have left ttl entries behind: see advance)
        entries[key] = node
        parent.value[key] = node.value
        return True

    def incr_leaf(self, s: int, leaf: str, amount: int, ttl_ms: int = 0) -> Any:
        """``apply(s, INCREMENT, way + (leaf,), amount, ttl_ms)`` under the cached way, in
        the common case: an int counter (or a new key) where nothing in the key's subtree is
        as new as ``s``, a result that stays an int JSON carries, and no expiry due (a
        counter hit with ``incr(k, ttl=...)`` on every request takes it too, as in ``_slow``).
        Returns the new value, or None having changed nothing when the case is not that
        (call ``apply``). ``s`` as for ``set_leaf``."""
        if ttl_ms and (s >> MILLIS_SHIFT) + ttl_ms <= self.now_ms:
            return None  # due already: the general way fires it
        parent = self._way_parent
        entries = parent._entries
        entry = entries.get(leaf)
        if entry is None:
            entry = _Node()
            entry.incs = {s: amount}
            entry.imax = entry.r = entry.top = s
            entry.value = result = amount
            entries[leaf] = entry
            parent.value[leaf] = amount
        else:
            if type(entry) is not _Node or not s > entry.top:
                return None
            current = entry.value
            if type(current) is not int:
                return None
            result = current + amount
            if not -INT_BOUND < result < INT_BOUND:
                return None  # the general way refuses it
            if entry.ttls is not None and s >> MILLIS_SHIFT <= self.now_ms:
                return None  # an expiry may have fired after ``s``: _newest_increment
            # (``_newest_increment`` of a number, inline)
            incs = entry.incs
            if incs is None:
                entry.incs = incs = {}
            incs[s] = amount
            entry.top = entry.imax = entry.r = s
            entry.value = result
            parent.value[leaf] = result
        if ttl_ms:
            self._record_ttl(entry, s, expiry_stamp(s, ttl_ms), (*self._way_path, leaf))
        self._untidy = True  # (increments for ``collect`` to fold)
        self._way_newest = s
        return result

    def delete_leaf(self, s: int, leaf: str) -> bool:
        """``apply(s, DELETE, way + (leaf,), None)`` under the cached way, where nothing in
        the key's subtree is as new as ``s``: a tombstone replaces it, as in ``_delete``.
        ``s`` as for ``set_leaf``; False, having changed nothing, otherwise."""
        parent = self._way_parent
        entries = parent._entries
        entry = entries.get(leaf)
        if entry is not None and not s > _newest_in(entry):
            return False
        self._untidy = True  # a tombstone for ``collect``
        entries[leaf] = s
        parent.value.pop(leaf, None)
        for node in self._way_nodes:
            if s > node.top:
                node.top = s  # (not ``d``: a DELETE is no write below, see ``apply``)
        return True

    def _settle_way(self) -> None:
        """Raise the summaries on the cached way to the newest ``set_leaf`` below it: what
        each ``set_leaf`` would have done (the newest stamp decides, as with ``_raise``).
        Anything that reads the metadata calls this first, ``_forget_way`` too, so every path
        of ``apply`` but the fast one settles. That one needs not: its walk only raises the
        same summaries to its own stamp, and maxima commute."""
        if self._way_newest:
            _raise(self._way_nodes, self._way_newest)
            self._way_newest = 0

    def _forget_way(self) -> None:
        """Drop the way ``cache_way`` remembered: the tree is about to change otherwise."""
        self._settle_way()
        self.way_key = None
        self._way_nodes = []
        self._way_parent = self._root

    def apply(
        self,
        stamp: int,
        op: int,
        path: tuple[str, ...] | list[str],
        value: Any,
        ttl_ms: int = 0,
    ) -> None:
        """Apply one stamped operation; a repeat of a stamp already applied changes nothing.

        ``value`` is the SET value (trusted: a fresh JSON value the store may keep) or the
        INCREMENT amount; it is ignored for DELETE. ``path`` must be non-empty. ``ttl_ms``
        (SET and INCREMENT only, positive) makes the path expire at
        ``expiry_stamp(stamp, ttl_ms)`` once ``advance`` passes its time (see ``advance``).
        """
        s = stamp
        node = self._root
        last = len(path) - 1
        writes = op != DELETE
        for i in range(last):
            if s < node.r:
                return  # overtaken by a newer reset above: no effect on anything below
            key = path[i]
            entries = node._entries if node.runs is None else node.entries
            child = entries.get(key)
            if child is None and writes:
                # The common way down to a new key: a fresh, empty dict written below.
                child = _Node()
                child.d = child.top = s
                child.r = node.r
                child.value = fresh = {}
                entries[key] = child
                if type(node.value) is dict:
                    node.value[key] = fresh
                node = child
                continue
            if type(child) is not _Node:
                child = self._promote(node, key, child)
            if child.ttls is not None:
                # Below a path that may expire: record the event, recompute that subtree.
                self._slow(node, key, path[i + 1 :], s, op, value, ttl_ms, path)
                return
            # ``d`` never exceeds ``top`` (a write below is in the subtree): the newest event
            # of a subtree, the usual case, is one comparison.
            if s > child.top:
                child.top = s
                if writes:
                    child.d = s
                    if type(child.value) is not dict:
                        self._write_below(node, key, child, s)
            elif writes and s > child.d:
                child.d = s
                if type(child.value) is not dict:
                    self._write_below(node, key, child, s)
            node = child
        key = path[last]
        if s < node.r:
            return
        if ttl_ms:
            # A received session (a dict or leaf SET with a ttl, newest there) is built as
            # it is; anything else with a ttl is recorded and rebuilt.
            if op == SET:
                self._forget_way()  # (the key may be on the cached way)
                if self._assign_fresh(node, key, s, value, ttl_ms, tuple(path)):
                    return
            self._slow(node, key, (), s, op, value, ttl_ms, path)
            return
        if op == SET:
            entries = node._entries if node.runs is None else node.entries
            entry = entries.get(key)
            if type(value) is not dict and (entry is None or (type(entry) is int and s > entry)):
                # The hot path: a leaf written where there is nothing newer.
                entries[key] = s
                data = node.value
                if type(data) is dict:
                    data[key] = value
                return
            self._set(node, key, s, value)
        elif op == INCREMENT:
            self._increment(node, key, s, value, path)
        else:
            self._delete(node, key, s)

    def apply_batch(
        self,
        stamps: Sequence[int],
        ops: list[int],
        paths: list[str | list[str]],
        values: list[Any],
        parent: str = "",
    ) -> None:
        """``apply`` each operation in turn (stamps growing, as in one origin's batch), with
        the same result, faster: a writer's loop of new keys under one parent takes a few
        C-level dict updates (``_set_siblings``), and a run of plain SETs under one parent
        finds that parent once and raises its ancestors' summaries once, at its end.

        A path is a dotted string (segments without dots) or a list of segments; with
        ``parent`` (a dotted path, as an OPS frame may say it once), each is one key under it.
        The store may keep ``stamps`` and ``paths`` (see ``_Node.runs``): the caller gives
        them up. ``stamps`` is read by index 0 and -1 and iterated (an OPS frame's
        ``OpStamps`` makes its stamps only then).
        """
        self._forget_way()
        if len(stamps) >= _BULK_MIN and set(ops) == _ONLY_SETS:
            if parent:
                if self._set_siblings(stamps, parent, paths, values):
                    return
            elif self._apply_sibling_sets(stamps, paths, values):
                return
        paths = full_paths(parent, paths)
        apply = self.apply
        parent: _Node | None = None  # the last path's parent, while the way to it is settled
        prefix: str | None = None  # its dotted path ("" for the root)
        ancestors: list[_Node] = []
        raised = NEVER  # newest stamp of the run, not yet recorded on the ancestors
        for s, op, path, value in zip(stamps, ops, paths, values):
            if type(path) is str:
                above, _, key = path.rpartition(".")
                if above == prefix and parent is not None and op == SET and type(value) is not dict:
                    if s < parent.r:
                        raised = s  # overtaken by a reset above: only the ancestors learn of it
                        continue
                    # (``apply`` read it just before, unless a reset there overtook that SET)
                    entries = parent._entries if parent.runs is None else parent.entries
                    entry = entries.get(key)
                    if entry is None or (type(entry) is int and s > entry):
                        entries[key] = s
                        parent.value[key] = value
                        raised = s
                        continue
                elif above == prefix and parent is not None and op == INCREMENT:
                    # Counters under one parent (a hot counter, others' hits): ``apply``'s
                    # last step, the way to the parent settled as for the SETs above.
                    # (``parent`` is a _Node here: mypy keeps the parameter's type)
                    if s >= parent.r:  # type: ignore[attr-defined]
                        self._increment(parent, key, s, value, path.split("."))  # type: ignore[arg-type]
                    raised = s
                    continue
                segments = path.split(".")
            else:
                above = None
                segments = path
            if raised != NEVER:
                _raise(ancestors, raised)
                raised = NEVER
            apply(s, op, segments, value)
            parent = None
            if above is not None and op != DELETE and type(value) is not dict:
                parent, ancestors = self._settled_way(segments[:-1], s)
                prefix = above
        if raised != NEVER:
            _raise(ancestors, raised)

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
        ``parent`` settled and none of the keys present. Returns False, having changed
        nothing, when that is not the case."""
        if dict in set(map(type, values)):
            return False
        node, ancestors = self._settled_way(parent.split(".") if parent else [], stamps[0])
        if node is None or stamps[0] < node.r:
            return False
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
        _raise(ancestors, stamps[-1])
        return True

    def _settled_way(self, way: list[str], s: int) -> tuple[_Node | None, list[_Node]]:
        """The node at ``way`` and the nodes on the way to it, if a later plain SET below it
        (with a newer stamp than ``s``) takes the fast path at every level."""
        node = self._root
        ancestors = []
        for segment in way:
            if s < node.r:
                return None, ancestors
            child = node._entries.get(segment)  # (never in a run: those are plain leaves)
            if type(child) is not _Node or type(child.value) is not dict or child.ttls is not None:
                return None, ancestors  # (a path that may expire takes apply's slow way)
            ancestors.append(child)
            node = child
        return node, ancestors

    def _slow(
        self,
        parent: _Node,
        key: str,
        rest: tuple[str, ...] | list[str],
        s: int,
        op: int,
        value: Any,
        ttl_ms: int,
        path: tuple[str, ...] | list[str],
    ) -> None:
        """Apply an operation at or below ``parent.entries[key]`` by recording its events
        there and rebuilding that subtree: the way for anything touching a path with ttl
        events (``key`` is the topmost such path on the way, or the target of a ttl op).
        ``parent`` and its ancestors carry no ttl events."""
        self._forget_way()
        if (
            op == INCREMENT
            and not rest
            and (not ttl_ms or (s >> MILLIS_SHIFT) + ttl_ms > self.now_ms)  # not due yet
        ):
            n = parent.entries.get(key)
            if type(n) is _Node and (
                self._newest_increment(parent, key, n, s, value)
                if s > n.top
                else self._late_increment(parent, key, n, s, value)
            ):
                if ttl_ms:
                    self._add_ttl(n, s, expiry_stamp(s, ttl_ms), path)
                return
        writes = op != DELETE
        p, k = parent, key
        for segment in rest:
            n = p.entries.get(k)
            if type(n) is not _Node:
                n = self._promote(p, k, n)
            if s > n.top:
                n.top = s
            if writes and s > n.d:
                n.d = s
            p, k = n, segment
        if op == INCREMENT:
            n = p.entries.get(k)
            if type(n) is not _Node:
                n = self._promote(p, k, n)
            if s > n.a:  # else overtaken by the assignment here (or a repeat of a folded one)
                if n.incs is None:
                    n.incs = {}
                n.incs.setdefault(s, value)
                if s > n.imax:
                    n.imax = s
                if s > n.top:
                    n.top = s
                if ttl_ms:
                    self._add_ttl(n, s, expiry_stamp(s, ttl_ms), path)
        else:
            self._record_assign(p.entries, k, s, MISSING if op == DELETE else value)
            if ttl_ms:
                n = p.entries.get(k)
                if type(n) is _Node and n.a == s:
                    self._add_ttl(n, s, expiry_stamp(s, ttl_ms), path)
        top = parent.entries.get(key)
        if type(top) is _Node:
            self._rebuild_at(parent, key, top)

    def _newest_increment(
        self, parent: _Node, key: str, node: _Node, s: int, amount: int | float
    ) -> bool:
        """The in-order case of an increment at a path with ttl events (a counter hit with
        ``incr(k, ttl=...)`` on every request): newer than everything in the subtree, so
        the visible number just grows, or restarts. False when it is not that simple: an
        expiry that fired after ``s`` (the increment comes from a clock behind it) may stop
        owning the path and come back to life; then the caller rebuilds."""
        ttls = node.ttls
        now = self.now_ms
        if ttls is not None and s >> MILLIS_SHIFT <= now and _fired_any(ttls, now):
            for expiry in ttls.values():
                if expiry > s and expiry >> MILLIS_SHIFT <= now:
                    return False
        current = node.value
        if is_number(current):
            result = current + amount
        else:
            result = amount  # a number restarts: an INCREMENT replaces anything else
            if node.entries:
                node.entries = {}
        if node.incs is None:
            node.incs = {}
        node.incs[s] = amount
        node.top = node.imax = node.r = s
        node.value = result
        self._place(parent, key, result)
        return True

    def _late_increment(
        self, parent: _Node, key: str, node: _Node, s: int, amount: int | float
    ) -> bool:
        """``_increment``'s late case of ints at a path with ttl events (members hitting one
        rate-limit counter at once): an int amount, after the assignment and every write
        below, where the number counts increments already, and no expiry here has fired.
        The sum does not depend on the order, and a ttl event not due changes nothing
        visible yet: the number grows. False when it is not that simple (the caller
        rebuilds)."""
        current = node.value
        if (
            type(current) is not int
            or type(amount) is not int
            or not (node.imax > node.d and s > node.d and s > node.a)
        ):
            return False
        if node.ttls and _fired_any(node.ttls, self.now_ms):
            return False  # fired: whether it still owns the path may change
        incs = node.incs
        if incs is None:
            node.incs = incs = {}
        elif s in incs:
            return True  # a repeat
        incs[s] = amount
        if s > node.imax:
            node.imax = s
            if s > node.r:
                node.r = s
        node.value = current + amount
        self._place(parent, key, node.value)
        return True

    def _add_ttl(self, node: _Node, s: int, expiry: int, path: Any) -> None:
        """Record ttl event ``s`` (expiring at the derived stamp ``expiry``) at ``node``.

        ``_pending`` holds, per node, an entry no later than the earliest of its events not
        yet due; ``advance`` moves it on when it pops. So a counter hit again and again (each
        hit replacing the expiry) keeps one entry, not one per hit.
        """
        self._forget_way()
        self._record_ttl(node, s, expiry, path)

    def _record_ttl(self, node: _Node, s: int, expiry: int, path: Any) -> None:
        """``_add_ttl`` at a node off the cached way (its leaf: the way keeps no ttls)."""
        self._untidy = True
        ttls = node.ttls
        now = self.now_ms
        due = expiry >> MILLIS_SHIFT
        if ttls is None:
            node.ttls = {s: expiry}  # (a session's: its only event, nothing covers it)
            if due <= now:
                self._push_due(expiry, s, tuple(path))
            else:
                heapq.heappush(self._pending, (due, s, tuple(path)))
            return
        if s in ttls:
            return
        covered = False
        for other in ttls.values():
            if now < other >> MILLIS_SHIFT <= due:
                covered = True  # an entry for this node pops first
                break
        ttls[s] = expiry
        if due <= now:
            self._push_due(expiry, s, tuple(path))
        elif not covered:
            heapq.heappush(self._pending, (due, s, tuple(path)))

    def _push_due(self, expiry: int, s: int, path: tuple[str, ...]) -> None:
        if s not in self._due_stamps:
            self._due_stamps.add(s)
            heapq.heappush(self._due, (expiry, s, path))

    def _write_below(self, parent: _Node, key: str, node: _Node, s: int) -> None:
        """A write at stamp ``s`` (already recorded in ``node.d``) landed below a non-dict."""
        self._untidy = True
        self._forget_way()
        if s > node.r:
            # Newest event here: the path becomes an empty dict (older children are overtaken).
            self._prune_children(node, node.r)
            node.value = {}
            node.incs = None
            self._place(parent, key, node.value)
        else:
            # Between the assignment and the latest increment: the number changes.
            self._rebuild_at(parent, key, node)

    def _set(self, parent: _Node, key: str, s: int, value: Any) -> None:
        self._untidy = True
        self._forget_way()
        entry = parent.entries.get(key)
        if entry is None or (type(entry) is int and s > entry):
            fresh = True
        elif type(entry) is int:
            return  # older than (or the same as) the assignment there
        else:
            fresh = s > entry.top
            if not fresh:
                if s <= entry.a:
                    return
                self._record_assign(parent.entries, key, s, value)
                self._rebuild_at(parent, key, entry)
                return
        if type(value) is dict:
            node = self._build(value, s)
            parent.entries[key] = node
            self._place(parent, key, node.value)
        else:
            parent.entries[key] = s
            self._place(parent, key, value)

    def _delete(self, parent: _Node, key: str, s: int) -> None:
        self._untidy = True
        self._forget_way()
        entry = parent.entries.get(key)
        if entry is None or (type(entry) is int and s > entry):
            parent.entries[key] = s
            if type(parent.value) is dict:
                parent.value.pop(key, None)
        elif type(entry) is int:
            return
        elif s > entry.top:
            parent.entries[key] = s
            if type(parent.value) is dict:
                parent.value.pop(key, None)
        elif s > entry.a:
            entry.a = s
            entry.av = MISSING
            self._rebuild_at(parent, key, entry)

    def _increment(
        self, parent: _Node, key: str, s: int, amount: int | float, path: Any = ()
    ) -> None:
        self._untidy = True
        self._forget_way()
        entry = parent.entries.get(key)
        if type(entry) is _Node and entry.ttls is not None:
            self._slow(parent, key, (), s, INCREMENT, amount, 0, path)
            return
        if entry is None:
            node = _Node()
            node.incs = {s: amount}
            node.imax = node.r = node.top = s
            node.value = amount
            parent.entries[key] = node
            self._place(parent, key, amount)
            return
        if type(entry) is int:
            if s < entry:
                return  # the assignment there is newer
            entry = self._promote(parent, key, entry)
        incs = entry.incs
        if incs is not None and s in incs:
            return  # a repeat
        if s < entry.a:
            return  # overtaken by the assignment here
        if incs is None:
            entry.incs = incs = {}
        incs[s] = amount
        if s > entry.top:
            # Newest event in the subtree: a number grows, anything else becomes the amount.
            entry.top = entry.imax = entry.r = s
            current = entry.value
            if is_number(current):
                result = current + amount
            else:
                result = amount
                if entry.entries:
                    entry.entries = {}
            entry.value = result
            self._place(parent, key, result)
        else:
            # Late (other members' increments interleave): for ints the sum does not depend
            # on the order, so a number only grows; anything else is recomputed.
            if s > entry.imax:
                entry.imax = s
                if s > entry.r:
                    entry.r = s
            current = entry.value
            if type(current) is int and type(amount) is int and entry.imax > entry.d:
                if s > entry.d:
                    entry.value = current + amount
                    self._place(parent, key, entry.value)
            else:
                self._rebuild_at(parent, key, entry)

    # -- building blocks --------------------------------------------------------------------

    def _place(self, parent: _Node, key: str, value: Any) -> None:
        """Put a path's new materialized value into its parent's dict (if that is a dict)."""
        if type(parent.value) is dict:
            if value is MISSING:
                parent.value.pop(key, None)
            else:
                parent.value[key] = value

    def _promote(self, parent: _Node, key: str, entry: int | None) -> _Node:
        """Turn a bare-stamp entry (or nothing) into a full metadata node."""
        self._untidy = True
        self._forget_way()
        node = _Node()
        if entry is None:
            node.r = parent.r
        else:
            node.a = node.top = entry
            pv = parent.value
            node.av = pv.get(key, MISSING) if type(pv) is dict else MISSING
            node.value = node.av
            node.r = max(entry, parent.r)
        parent.entries[key] = node
        return node

    def _build(self, value: dict[str, Any], s: int) -> _Node:
        """A fresh node for a dict assigned at stamp ``s``, its members assigned at ``s`` too."""
        node = _Node()
        node.a = node.r = node.top = s
        node.av = DICT
        data: dict[str, Any] = {}
        entries: dict[str, int | _Node] = {}
        for k, v in value.items():
            if type(v) is dict:
                child = self._build(v, s)
                entries[k] = child
                data[k] = child.value
            else:
                entries[k] = s
                data[k] = v
        node.entries = entries
        node.value = data
        return node

    def _record_assign(self, entries: dict[str, int | _Node], key: str, s: int, value: Any) -> None:
        """Record an assignment (leaf, dict or MISSING) without touching materialized values.

        Leaf assignments are recorded as full nodes carrying their value, since the parent's
        materialized dict may not exist; ``_rebuild`` then places them.
        """
        entry = entries.get(key)
        if type(entry) is int:
            if entry >= s:
                return
            entry = None
        if entry is None:
            entry = _Node()
            entries[key] = entry
        elif entry.a >= s:
            return
        entry.a = s
        if s > entry.top:
            entry.top = s
        if type(value) is dict:
            entry.av = DICT
            for k, v in value.items():
                self._record_assign(entry.entries, k, s, v)
        else:
            entry.av = value

    def _prune_children(self, node: _Node, r: float | int) -> None:
        """Forget children whose every event is older than the reset ``r``."""
        entries = node.entries
        if not entries:
            return
        keep: dict[str, int | _Node] = {}
        for k, e in entries.items():
            if type(e) is int:
                if e >= r:
                    keep[k] = e
            elif e.top >= r:
                self._rebuild(e, r)
                keep[k] = e
        node.entries = keep

    def _rebuild_at(self, parent: _Node, key: str, node: _Node) -> None:
        """Recompute ``node`` (a child of ``parent``) from its metadata, and place the result."""
        if self._rebuild(node, parent.r):
            self._place(parent, key, node.value)
        else:
            del parent.entries[key]
            self._place(parent, key, MISSING)

    def _settle(self, node: _Node, parent_r: float | int) -> tuple[bool, Any, Any]:
        """Fix a node's own events against the reset above it: ``(is_dict, base, bv)``.

        ``base`` / ``bv`` are the effective assignment (its own, or the reset inherited from
        above, which leaves nothing). Sets ``node.r``; forgets overtaken own events.
        """
        if node.a >= parent_r:
            base = node.a
            bv = node.av
        else:
            base = parent_r
            bv = MISSING
            node.a = NEVER
            node.av = MISSING
        if node.imax <= base:
            node.imax = NEVER
        if node.d <= base:
            node.d = NEVER
        if node.ttls is not None:
            self._prune_ttls(node, base)
        imax = node.imax
        d = node.d
        node.r = base if imax == NEVER else imax
        if imax == NEVER and d == NEVER:
            return bv is DICT, base, bv
        return d > imax, base, bv

    @staticmethod
    def _prune_ttls(node: _Node, base: Any) -> None:
        """Forget ttl events older than the assignment or reset here (a SET-with-ttl is the
        assignment itself): those can never fire."""
        ttls = node.ttls
        assert ttls is not None
        if min(ttls) < base:
            node.ttls = {st: expiry for st, expiry in ttls.items() if st >= base} or None

    @staticmethod
    def _owners(ttls: dict[int, int]) -> list[tuple[int, int]]:
        """The ttl events that own their path at their expiry as far as this path goes: no
        other ttl event here came between (which would have become the owner)."""
        stamps = sorted(ttls)
        last = len(stamps) - 1
        return [
            (st, ttls[st])
            for index, st in enumerate(stamps)
            if index == last or stamps[index + 1] > ttls[st]
        ]

    def _expiry(self, node: _Node, parent_vr: Any) -> Any:
        """The stamp of the latest expiry here that has fired (``now_ms`` reached its time)
        and still owns the path, or NEVER. An owner here loses the path anyway if the visible
        reset from above (a newer reset, or an ancestor's expiry) came after it."""
        assert node.ttls is not None
        now = self.now_ms
        fired: Any = NEVER
        for st, expiry in self._owners(node.ttls):
            if st > parent_vr and expiry > fired and expiry >> MILLIS_SHIFT <= now:
                fired = expiry
        return fired

    def _finish(
        self,
        node: _Node,
        base: Any,
        bv: Any,
        new_dict: dict[str, Any] | None,
        vbase: Any,
        vbv: Any,
        vd: Any,
        vimax: Any,
    ) -> None:
        """Set a node's materialized value once its children are settled (see ``_rebuild``).

        ``base`` is the real assignment or reset (what is older is forgotten); ``vbase``,
        ``vbv``, ``vd`` and ``vimax`` describe what is visible, which an expiry that fired
        here or above (a DELETE at its derived stamp, for materialization only) may move
        later than ``base``; without one they equal ``base``, ``bv``, ``node.d``, ``node.imax``.
        """
        d = node.d
        lower = base if d == NEVER else max(base, d)  # increments older than this are overtaken
        if new_dict is not None:
            node.value = new_dict
        elif vimax != NEVER and vimax > vd:
            # A number: the increments after the latest assignment or write below, in order.
            vlower = vbase if vd == NEVER else vd
            incs = node.incs or {}
            result: Any = vbv if (vd == NEVER and is_number(vbv)) else MISSING
            kept: dict[int, int | float] = {}
            for st in sorted(incs):
                amount = incs[st]
                if st > lower:
                    kept[st] = amount
                if st > vlower:
                    result = amount if result is MISSING else result + amount
            node.incs = kept
            node.value = result
            return
        else:
            node.value = vbv
        if node.incs:
            node.incs = {st: n for st, n in node.incs.items() if st > lower} or None

    @staticmethod
    def _is_plain(node: _Node) -> bool:
        """True when a node is just one assignment of a leaf (or a tombstone)."""
        return not (
            node._entries
            or node.runs  # (not ``entries``: that would record them)
            or node.incs
            or node.av is DICT
            or node.d != NEVER
            or node.imax != NEVER
            or node.a == NEVER
            or node.ttls is not None
        )

    def _rebuild(self, node: _Node, parent_r: float | int, parent_vr: Any = NEVER) -> bool:
        """Recompute a node's value from its metadata; drop what can no longer matter.

        This is the reference the fast paths agree with. Returns False when nothing in the
        subtree is newer than the reset inherited from above (the node can be forgotten).
        ``parent_vr`` is the visible reset from above, when an expiry that fired above makes
        it later than ``parent_r``: what is older stays recorded (a late operation may still
        cancel that expiry) but is not visible.
        """
        is_dict, base, bv = self._settle(node, parent_r)
        r = node.r
        vbase = parent_vr if parent_vr > base else base
        if node.ttls is not None:
            fired = self._expiry(node, parent_vr)
            if fired > vbase:
                vbase = fired
        d = node.d
        imax = node.imax
        if vbase == base:
            vr, vbv, vd, vimax = r, bv, d, imax
        else:
            # An expiry (here or above) acts as a DELETE at vbase for what is visible.
            is_dict = False
            vbv = MISSING
            vimax = imax if imax > vbase else NEVER
            vd = d if d > vbase else NEVER
            vr = vbase if vimax == NEVER else vimax
            if vimax != NEVER or vd != NEVER:
                is_dict = vd > vimax
        old_value = node.value
        old_dict = old_value if type(old_value) is dict else None
        new_dict: dict[str, Any] | None = None
        if is_dict:
            new_dict = old_dict if old_dict is not None else {}
        top = max(node.a, node.imax, node.d)
        entries = node.entries
        if entries:
            keep: dict[str, int | _Node] = {}
            for k, e in entries.items():
                if type(e) is int:
                    if e < r:
                        if new_dict is not None:
                            new_dict.pop(k, None)
                        continue
                    if (new_dict is None or e < vr) and old_dict is not None and k in old_dict:
                        # A value about to be hidden: it lives in this node's dict, so give
                        # it a node of its own to keep it while it is hidden.
                        child = _Node()
                        child.a = child.top = e
                        child.av = child.value = old_dict[k]
                        child.r = max(e, r)
                        e = child
                    else:
                        keep[k] = e  # its value (if not a tombstone) is already in new_dict
                        if e > top:
                            top = e
                        continue
                if self._rebuild(e, r, vr):
                    if e.top > top:
                        top = e.top
                    child_value = e.value
                    if new_dict is not None:
                        if child_value is MISSING:
                            new_dict.pop(k, None)
                        else:
                            new_dict[k] = child_value
                    if self._is_plain(e) and (
                        e.av is MISSING if child_value is MISSING else new_dict is not None
                    ):
                        keep[k] = e.a  # a plain assignment: back to a bare stamp
                    else:
                        keep[k] = e
                elif new_dict is not None:
                    new_dict.pop(k, None)
            node.entries = keep
        if new_dict is not None and len(new_dict) > len(node.entries):
            # Drop leftovers that no entry accounts for (possible only after a reset).
            for k in [k for k in new_dict if k not in node.entries]:
                del new_dict[k]
        self._finish(node, base, bv, new_dict, vbase, vbv, vd, vimax)
        node.top = top
        return top != NEVER and top >= parent_r

    def _install(
        self, encoded: Any, parent_r: float | int, path: tuple[str, ...]
    ) -> tuple[Any, Any] | None:
        """Build an exported entry (at ``path``) where nothing is known locally:
        ``(entry, value)``, or None if all of it is overtaken by ``parent_r``. The same result
        as recording the entry's events and rebuilding, in one pass (this is what makes
        joining fast)."""
        if type(encoded) is int:
            return (encoded, MISSING) if encoded >= parent_r else None
        if len(encoded) == 2:
            stamp = encoded[0]
            return (stamp, encoded[1]) if stamp >= parent_r else None
        if len(encoded) == 9:
            # It may expire: record its events and rebuild (the general way, with expiries).
            holder = _Node()
            holder.r = parent_r
            holder.value = {}
            key = path[-1]
            self._merge_entry(holder, key, encoded, path)
            node = holder.entries[key]
            if type(node) is int:
                return (node, MISSING) if node >= parent_r else None
            if not self._rebuild(node, parent_r):
                return None
            return node, node.value
        a, av, d, imax, incs, children, leaves, values = encoded
        node = _Node()
        if a is not None:
            node.a = a
            node.av = DICT if av == 1 and type(av) is int else (MISSING if av == 0 else av[0])
        if d is not None:
            node.d = d
        if imax is not None:
            node.imax = imax
        if incs:
            node.incs = {st: n for st, n in incs}
        is_dict, base, bv = self._settle(node, parent_r)
        r = node.r
        top = max(node.a, node.imax, node.d)
        new_dict: dict[str, Any] | None = {} if is_dict else None
        entries: dict[str, int | _Node] = {}
        run = None
        if type(leaves) is LeafColumns:
            # As a SNAPSHOT brings them: when every leaf stands and holds a value, the keys
            # and the (unmade) stamps wait on the node as a run (see ``_Node.runs``).
            if new_dict is not None and leaves and leaves.lowest >= r and not leaves.tombstones():
                run = leaves.as_run()
                if leaves.newest > top:
                    top = leaves.newest
                new_dict = values  # (the wire's, decoded for this merge: see LeafColumns)
                leaves = None
            else:
                leaves = leaves.as_dict()
        if leaves:
            stamps = leaves.values()
            if min(stamps) >= r:
                # The common case: every leaf stands. The decoded dicts become the node's own
                # (copied, in C: the caller's data stays its own).
                entries = dict(leaves)
                newest = max(stamps)
                if newest > top:
                    top = newest
                if new_dict is not None:
                    new_dict = dict(values)
            else:
                for k, stamp in leaves.items():
                    if stamp >= r:
                        entries[k] = stamp
                        if stamp > top:
                            top = stamp
                        if new_dict is not None and k in values:
                            new_dict[k] = values[k]
        install = self._install
        for k, child in children.items():
            # (the path matters only to register expiries, found in full nodes)
            built = install(
                child, r, (*path, k) if type(child) is list and len(child) > 2 else path
            )
            if built is None:
                continue
            entry, value = built
            if type(entry) is int:
                if entry > top:
                    top = entry
            else:
                if entry.top > top:
                    top = entry.top
                if self._is_plain(entry) and (value is MISSING or new_dict is not None):
                    entry = entry.a  # a plain assignment: a bare stamp
            entries[k] = entry
            if new_dict is not None and value is not MISSING:
                new_dict[k] = value
        node.entries = entries
        if run is not None:
            node.runs = [run]
        self._finish(node, base, bv, new_dict, base, bv, node.d, node.imax)
        node.top = top
        if top == NEVER or top < parent_r:
            return None
        return node, node.value

    # -- expiring keys ----------------------------------------------------------------------

    @property
    def next_expiry(self) -> float | int:
        """The wall-clock milliseconds of the next expiry not yet due (``inf`` if none):
        ``advance`` to it or later to make it fire."""
        pending = self._pending
        return pending[0][0] if pending else float("inf")

    @property
    def pending_expiries(self) -> int:
        """Registered expiries not yet made permanent (due or not; some may be stale)."""
        return len(self._pending) + len(self._due)

    def advance(
        self, now_ms: float | int, budget: float = float("inf")
    ) -> list[tuple[tuple[str, ...], int]]:
        """Move the store's time forward to ``now_ms`` (wall-clock milliseconds; a smaller
        value than before changes nothing) and let the expiries due by then fire, at most
        ``budget`` paths of them: while ``next_expiry`` is still due, call again (a burst
        of expiries then holds the caller's thread a slice at a time).

        A fired expiry hides its path as a DELETE at its derived stamp would, for reading
        only: nothing is forgotten yet, since an older operation arriving late may still
        cancel it (``expire`` makes it permanent once none can). Returns ``(path, stamp)``
        of each ttl operation whose expiry fired (the caller may tell watchers).
        """
        if now_ms > self.now_ms:
            self.now_ms = now_ms
        now_ms = self.now_ms
        pending = self._pending
        if not pending or pending[0][0] > now_ms:
            return []
        self._forget_way()
        fired: list[tuple[tuple[str, ...], int]] = []
        tops: dict[tuple[str, ...], None] = {}
        while pending and pending[0][0] <= now_ms and budget > 0:
            budget -= 1
            _, _, path = heapq.heappop(pending)
            found = self._locate(path)
            if found is None:
                continue  # overtaken meanwhile
            top_path, target = found
            ttls = target.ttls
            if not ttls:
                continue
            # Every event of the node due by now fires (whether it had an entry of its own or
            # came after this one); the earliest one not yet due gets the node's next entry.
            later: tuple[int, int] | None = None
            for st, expiry in ttls.items():
                due = expiry >> MILLIS_SHIFT
                if due > now_ms:
                    if later is None or due < later[0]:
                        later = (due, st)
                elif st not in self._due_stamps:
                    self._push_due(expiry, st, path)
                    tops[top_path] = None
                    fired.append((path, st))
            if later is not None:
                heapq.heappush(pending, (later[0], later[1], path))
        for top_path in tops:
            self._rebuild_path(top_path)
        return fired

    def expire(self, frontier: int, budget: float = float("inf")) -> int:
        """Make permanent the expiries that fired with a derived stamp below ``frontier``
        (the same stability frontier as ``collect``), at most ``budget`` of them (while
        ``expirable(frontier)``, call again): each becomes a real DELETE at that stamp, so
        the path's metadata can be forgotten. Nothing visible changes. Returns how many were
        applied."""
        self._forget_way()
        due = self._due
        done = 0
        while due and due[0][0] < frontier and budget > 0:
            budget -= 1
            expiry, st, path = heapq.heappop(due)
            self._due_stamps.discard(st)
            found = self._locate(path)
            if found is None:
                continue
            top_path, target = found
            if not target.ttls or (st, expiry) not in self._owners(target.ttls):
                continue  # overtaken, or replaced by a newer ttl before it fired
            # It owns its path at its expiry: the events that could have cancelled it are
            # all older than the frontier, hence known; an ancestor's expiry before it was
            # applied first (``due`` is in stamp order) and would have dropped it.
            parent = self._root
            for segment in path[:-1]:
                parent = parent.entries[segment]  # type: ignore[assignment]
            self._record_assign(parent.entries, path[-1], expiry, MISSING)
            self._rebuild_path(top_path)
            self._untidy = True  # a tombstone for ``collect``
            done += 1
        self.expired += done
        return done

    def expirable(self, frontier: int) -> bool:
        """True while ``expire(frontier)`` has something left to look at."""
        return bool(self._due) and self._due[0][0] < frontier

    def _locate(self, path: tuple[str, ...]) -> tuple[tuple[str, ...], _Node] | None:
        """``(path of the topmost node with ttl events on the way, node at path)``, or None
        when the way is not made of nodes or none of them has ttl events."""
        node = self._root
        top: tuple[str, ...] | None = None
        for depth, segment in enumerate(path):
            entry = node.entries.get(segment)
            if type(entry) is not _Node:
                return None
            if top is None and entry.ttls is not None:
                top = path[: depth + 1]
            node = entry
        return None if top is None else (top, node)

    def _rebuild_path(self, path: tuple[str, ...]) -> None:
        """Rebuild the node at ``path`` (whose ancestors carry no ttl events)."""
        parent = self._root
        for segment in path[:-1]:
            entry = parent.entries.get(segment)
            if type(entry) is not _Node:
                return
            parent = entry
        node = parent.entries.get(path[-1])
        if type(node) is _Node:
            self._rebuild_at(parent, path[-1], node)

    # -- forgetting what can no longer matter ------------------------------------------------

    def collect(self, frontier: int, budget: int = 10000) -> bool:
        """Forget metadata older than ``frontier``, visiting at most ``budget`` entries.

        ``frontier`` must be a stamp below which no operation will ever arrive again, at this
        replica or at any other (the node derives it from every member's progress). Then a
        tombstone older than it can never overtake anything, and increments older than it can
        be folded into one assignment. Call repeatedly; returns True when a full pass over the
        tree has finished (the next call starts another).

        Pending runs (``_Node.runs``) are passed by, unread: their leaves all hold values, so
        there is nothing to forget there, and reading them would record them all.
        """
        self._forget_way()
        sweep = self._sweep
        if not sweep:
            if not self._untidy:
                return True  # nothing to look at since the last pass
            self._untidy = False
            root = self._root
            sweep.append([root, root.r, list(root._entries.items()), 0, None, None])
        visited = 0
        while sweep and visited < budget:
            frame = sweep[-1]
            node, r, todo = frame[0], frame[1], frame[2]
            if not todo:
                sweep.pop()
                if frame[3] > len(node._entries):
                    self._shrink(node, frame[4], frame[5])
                continue
            key, entry = todo.pop()
            visited += 1
            if node._entries.get(key) is not entry:
                continue  # changed since the list was taken: the next pass sees it
            if type(entry) is int:
                if type(node.value) is not dict or key not in node.value:
                    if entry < frontier:
                        del node._entries[key]  # a tombstone nothing older can reach any more
                        frame[3] += 1
                        self.collected += 1
                    else:
                        self._untidy = True  # for a later pass
                continue
            if entry.ttls is not None and self._drop_replaced(entry, frontier):
                self._untidy = True  # replaced ttl events the frontier has not passed yet
            if entry.incs:
                # Folding acts as a SET at the newest folded increment, so it must stay
                # below every ttl event here (it would cancel them otherwise).
                limit = frontier if entry.ttls is None else min(frontier, min(entry.ttls))
                self._fold_increments(entry, r, limit)
                if entry.incs:
                    self._untidy = True
                if (
                    entry.ttls is None
                    and not entry.incs
                    and not entry._entries
                    and entry.runs is None
                    and entry.d == NEVER
                    and NEVER < entry.imax <= entry.a
                    and type(node.value) is dict
                    and key in node.value
                ):
                    node._entries[key] = entry.a  # the folded counter is now a plain value
                    continue
            if entry._entries:
                sweep.append([entry, entry.r, list(entry._entries.items()), 0, node, key])
            elif entry.value is MISSING and entry.ttls is None and not entry.incs:
                if max(entry.a, entry.d, entry.imax) < frontier:
                    del node._entries[key]  # metadata of nothing (left by deletes of absent paths)
                    frame[3] += 1
                    self.collected += 1
                else:
                    self._untidy = True
        return not sweep

    def _drop_replaced(self, node: _Node, frontier: int) -> bool:
        """Forget ttl events older than ``frontier`` that a newer ttl event here replaced
        before they expired. (Not sooner: until then an older ttl event may still arrive,
        and the replaced one is what tells that it was replaced too.) True if replaced
        events are left for a later pass."""
        ttls = node.ttls
        assert ttls is not None
        owners = dict(self._owners(ttls))
        if len(owners) < len(ttls):
            kept = {st: e for st, e in ttls.items() if st >= frontier or st in owners}
            self.collected += len(ttls) - len(kept)
            node.ttls = kept or None
            return len(kept) > len(owners)
        return False

    def _shrink(self, node: _Node, parent: _Node | None, key: str | None) -> None:
        """Give back the memory of a node's dicts after many of their entries were dropped
        (a Python dict never shrinks by itself)."""
        node._entries = dict(node._entries)  # (pending runs stay pending)
        old = node.value
        if type(old) is dict and parent is not None and key is not None:
            pv = parent.value
            if type(pv) is dict and pv.get(key) is old:
                node.value = pv[key] = dict(old)

    def _fold_increments(self, node: _Node, parent_r: Any, frontier: int) -> None:
        """Fold the increments older than ``frontier`` into one assignment of their result."""
        incs = node.incs
        assert incs is not None
        old = sorted(st for st in incs if st < frontier)
        if not old:
            return
        newest = old[-1]
        base = node.a if node.a >= parent_r else parent_r
        d = node.d if node.d > base else NEVER
        lower = base if d == NEVER else d
        if newest <= lower or newest < parent_r:
            for st in old:  # overtaken already
                del incs[st]
        else:
            bv = node.av if node.a >= parent_r else MISSING
            result: Any = bv if (d == NEVER and is_number(bv)) else MISSING
            for st in old:
                amount = incs.pop(st)
                if st > lower:
                    result = amount if result is MISSING else result + amount
            # As if one SET of the running total had happened at the newest folded stamp:
            # every event still to come is newer, so the outcome is the same.
            node.a = newest
            node.av = result
            if node.d <= newest:
                node.d = NEVER
        self.collected += len(old)
        if not incs:
            node.incs = None

    # -- whole-state transfer ----------------------------------------------------------------

    def export(self) -> list[Any]:
        """The whole state with its metadata, as JSON-serialisable data (see ``merge``).

        One item per top-level key (``export_item``).
        """
        export_item = self.export_item
        return [item for item in map(export_item, self.top_level_keys()) if item is not None]

    def top_level_keys(self) -> list[str]:
        """Every top-level key with metadata (tombstones too): what ``export`` goes over."""
        return list(self._root.entries)

    def export_item(self, key: str, copy: bool = True) -> list[Any] | None:
        """The export of one top-level key: ``[key, entry]``, or None if there is no such key
        (any more). An entry is an int (a tombstone), a ``[stamp, value]`` pair (a plain
        assignment), or ``[a, av, d, imax, incs, children, leaves, values]`` for a full node,
        where ``av`` is ``[value]``, ``0`` (deleted) or ``1`` (a dict), stamps that are unset
        are ``None``, ``children`` maps keys to the entries of full nodes, ``leaves`` maps the
        keys of plain assignments (and tombstones) to their stamps, and ``values`` maps those
        of ``leaves`` that hold a value to it. A node with ttl events has a ninth element,
        ``[[stamp, expiry stamp], ...]``.

        Each item is a consistent copy (taken without yielding), so a snapshot can be built
        and sent one slice at a time while operations go on. With ``copy=False`` its dicts
        may be the store's own: read it before the store changes, and never change it (a
        snapshot encodes each item at once).
        """
        self._settle_way()
        root = self._root
        entry = root.entries.get(key)
        if entry is None:
            return None
        if type(entry) is int:
            value = root.value.get(key, MISSING)
            return [key, entry if value is MISSING else [entry, copy_value(value)]]
        return [key, self._export_node(entry, copy)]

    def _export_node(self, node: _Node, copy: bool) -> list[Any]:
        av = node.av
        encoded_av: Any = 1 if av is DICT else (0 if av is MISSING else [copy_value(av)])
        incs = [[st, n] for st, n in node.incs.items()] if node.incs else []
        value = node.value
        data = value if type(value) is dict else {}
        entries = node.entries_copy() if copy or node.runs is not None else node._entries
        children: dict[str, Any] = {}
        if set(map(type, entries.values())) <= _LEAF_TYPES:
            # Only plain leaves (the bulk of a big tree): the dicts as they are (copied in C).
            leaves = entries
            if not copy:
                values = data
            elif _has_containers(data):
                values = {k: copy_value(v) for k, v in data.items()}
            else:
                values = dict(data)
        else:
            export_node = self._export_node
            leaves = {}
            values = {}
            for k, e in entries.items():
                if type(e) is int:
                    leaves[k] = e
                    v = data.get(k, MISSING)
                    if v is not MISSING:
                        values[k] = copy_value(v) if copy else v
                else:
                    children[k] = export_node(e, copy)
        out = [_enc(node.a), encoded_av, _enc(node.d), _enc(node.imax), incs, children]
        out += (leaves, values)
        if node.ttls:
            out.append([[st, expiry] for st, expiry in node.ttls.items()])
        return out

    def merge(self, exported: Iterable[Any]) -> None:
        """Merge state exported by another replica: the result is as if this replica had
        received every operation that one had received, too.

        Accepts the whole ``export()`` list or any slice of it, so a snapshot can arrive in
        chunks interleaved with live operations, and pieces of an item (the same key again
        with more of its subtree, see ``_wire.encode_snapshot_parts``), which it grafts.
        """
        root = self._root
        self._untidy = True
        self._forget_way()
        for key, encoded in exported:
            if key not in root.entries:
                built = self._install(encoded, root.r, (key,))
                if built is not None:
                    entry, value = built
                    if type(entry) is _Node and self._is_plain(entry):
                        entry = entry.a
                    root.entries[key] = entry
                    self._place(root, key, value)
                continue
            existing = root.entries[key]
            if self._can_graft(root, key, existing, encoded):
                self._graft(existing, encoded, (key,), root.r)  # type: ignore[arg-type]
                continue
            self._merge_entry(root, key, encoded, (key,))
            entry = root.entries[key]
            if type(entry) is _Node:
                self._rebuild_at(root, key, entry)

    # A big subtree comes in several pieces (see ``_wire.encode_snapshot_parts``): the first
    # installs the node's own events, later ones bring more of its children and leaves under
    # the same path. Merging those the general way (record, then rebuild the whole top-level
    # subtree) would cost the subtree's size for every piece; grafting costs the piece's.

    @staticmethod
    def _can_graft(parent: _Node, key: str, node: Any, encoded: Any) -> bool:
        """True if merging ``encoded`` (a full node's export) into ``node``, the existing
        entry ``key`` of ``parent``, cannot change what ``node`` is: it is a dict with no
        ttl events, and ``encoded`` brings no assignment, reset or increment of its own that
        is newer than what ``node`` has. Then only the events below it are new."""
        return (
            type(node) is _Node
            and type(encoded) is list
            and len(encoded) == 8
            and node.ttls is None
            and type(node.value) is dict
            and type(parent.value) is dict
            and parent.value.get(key) is node.value
            and (encoded[0] is None or encoded[0] <= node.a)
            and (encoded[3] is None or encoded[3] <= node.r)
            and not encoded[4]
        )

    def _graft(self, node: _Node, encoded: list[Any], path: tuple[str, ...], parent_r: Any) -> None:
        """Merge ``encoded`` into ``node`` (``_can_graft`` said yes, and every node above is
        a dict without ttl events; ``parent_r`` is the reset above it): what
        ``_merge_entry`` and a rebuild would make of it, touching only what ``encoded``
        holds."""
        d, children, leaves, values = encoded[2], encoded[5], encoded[6], encoded[7]
        if d is not None and d > node.d and d > node.a and d > parent_r:
            node.d = d  # (a dict stays a dict when a write below is newer)
        top = max(node.top, node.d)
        if leaves:
            top = max(top, self._graft_leaves(node, leaves, values))
        data = node.value
        r = node.r
        for k, child in children.items():
            entry: Any = node._entries.get(k)
            if entry is None and k not in data:
                built = self._install(child, r, (*path, k))
                if built is None:
                    continue
                entry, value = built
                if type(entry) is _Node and self._is_plain(entry):
                    entry = entry.a  # a plain assignment: a bare stamp
                node._entries[k] = entry
                if value is not MISSING:
                    data[k] = value
            elif self._can_graft(node, k, entry, child):
                self._graft(entry, child, (*path, k), r)
            else:
                if node.runs is not None:
                    node.settle_runs()
                self._merge_entry(node, k, child, (*path, k))
                entry = node._entries[k]
                self._rebuild_at(node, k, entry)
                entry = self._bare_if_plain(node, k)
                if entry is None:
                    continue
            ctop = entry if type(entry) is int else entry.top
            if ctop > top:
                top = ctop
        node.top = top

    def _bare_if_plain(self, node: _Node, key: str) -> Any:
        """The entry at ``key`` of ``node`` (a dict) after a rebuild, back to a bare stamp if
        it is just one assignment, as a rebuild of ``node`` itself would leave it: the same
        events must give the same metadata whichever way they arrived."""
        entry = node._entries.get(key)
        if (
            type(entry) is _Node
            and self._is_plain(entry)
            and (entry.av is MISSING if entry.value is MISSING else True)
        ):
            entry = node._entries[key] = entry.a
        return entry

    def _graft_leaves(
        self, node: _Node, leaves: LeafColumns | dict[str, int], values: dict[str, Any]
    ) -> Any:
        """The leaves of a piece (as a SNAPSHOT brings them, or as ``export`` makes them)
        into ``node`` (see ``_graft``); their newest stamp. New keys that all stand are
        recorded the way ``_install`` does (the valued ones as a run)."""
        data = node.value
        entries = node._entries
        if isinstance(leaves, dict):
            pairs: Iterable[tuple[str, int]] = leaves.items()
        elif (
            leaves.lowest >= node.r
            and entries.keys().isdisjoint(leaves.names)
            and data.keys().isdisjoint(leaves.names)
        ):
            names = leaves.names
            valued = leaves.valued
            if valued:
                run = leaves.as_run(valued)
                node.runs = [run] if node.runs is None else [*node.runs, run]
                data.update(values)
            if valued < len(names):
                entries.update(zip(leaves.tombstones(), leaves.stamps[valued:]))
            return leaves.newest
        else:
            pairs = zip(leaves.names, leaves.stamps)
        if node.runs is not None:
            node.settle_runs()
        r = node.r
        newest: Any = NEVER
        for k, stamp in pairs:
            if stamp < r:
                continue  # overtaken by a reset here
            entry: Any = entries.get(k)
            value = values.get(k, MISSING)
            if entry is None or (type(entry) is int and stamp > entry):
                entries[k] = stamp
                self._place(node, k, value)
            elif type(entry) is _Node:
                self._record_assign(entries, k, stamp, value)
                self._rebuild_at(node, k, entry)
                self._bare_if_plain(node, k)
            else:
                continue
            if stamp > newest:
                newest = stamp
        return newest

    def _merge_entry(self, parent: _Node, key: str, encoded: Any, path: tuple[str, ...]) -> None:
        """Record the events of one exported entry (at ``path``) into ``parent.entries[key]``
        (no rebuild)."""
        entries = parent.entries
        if type(encoded) is int:
            self._record_assign(entries, key, encoded, MISSING)
            return
        if len(encoded) == 2:
            stamp, value = encoded
            self._record_assign(entries, key, stamp, value)
            return
        a, av, d, imax, incs, children, leaves, values = encoded[:8]
        if a is not None:
            if av == 1 and type(av) is int:
                value: Any = DICT
            elif av == 0 and type(av) is int:
                value = MISSING
            else:
                value = av[0]
            if value is DICT:
                self._record_assign(entries, key, a, {})
                # the members of that dict come as children with the same stamp
            else:
                self._record_assign(entries, key, a, value)
        node = entries.get(key)
        if type(node) is not _Node:
            node = self._promote(parent, key, node)
        if d is not None and d > node.d:
            node.d = d
        if imax is not None and imax > node.imax:
            node.imax = imax
        if incs:
            current = node.incs
            if current is None:
                node.incs = current = {}
            for st, n in incs:
                current.setdefault(st, n)
        for st in (d, imax):
            if st is not None and st > node.top:
                node.top = st
        record_assign = self._record_assign
        node_entries = node.entries
        if type(leaves) is LeafColumns:
            leaves = leaves.as_dict()
        for k, stamp in leaves.items():
            record_assign(node_entries, k, stamp, values.get(k, MISSING))
            if stamp > node.top:
                node.top = stamp
        if len(encoded) == 9:
            for st, expiry in encoded[8]:
                self._add_ttl(node, st, expiry, path)
        for k, child in children.items():
            self._merge_entry(node, k, child, (*path, k))
            ce = node.entries[k]
            ctop = ce if type(ce) is int else ce.top
            if ctop > node.top:
                node.top = ctop


def _fired_any(ttls: dict[int, int], now_ms: float | int) -> bool:
    """Whether an expiry of ``ttls`` (derived stamps) is due by ``now_ms``: the earliest,
    found in C (a counter hit in a burst holds hundreds, until ``collect``)."""
    if math.isinf(now_ms):
        return now_ms > 0  # (NEVER: no time yet)
    return min(ttls.values()) < (math.floor(now_ms) + 1) << MILLIS_SHIFT


def _newest_in(entry: int | _Node) -> float | int:
    """The newest stamp in an entry's subtree: a bare stamp's own, a node's ``top``."""
    return entry if type(entry) is int else entry.top  # type: ignore[union-attr]


def _raise(ancestors: list[_Node], s: int) -> None:
    """Record a write at stamp ``s`` below each of ``ancestors`` (what ``apply`` does on its
    way down, for a write whose way is all dicts)."""
    for node in ancestors:
        if s > node.top:
            node.top = s
        if s > node.d:
            node.d = s


_BULK_MIN = 16  # below this, a batch goes one operation at a time
_ONLY_SETS = {SET}
_FIRST = itemgetter(0)
_LAST = itemgetter(2)
_LEAF_TYPES = {int}
_CONTAINERS = (dict, list)


def _has_containers(data: dict[str, Any]) -> bool:
    """True if some value of ``data`` is a dict or list (to be copied, not shared)."""
    return not set(map(type, data.values())).isdisjoint(_CONTAINERS)


def _enc(stamp: float | int) -> int | None:
    return None if stamp == NEVER else stamp  # type: ignore[return-value]
