"""The replicated tree's nodes: what one path remembers, and reading the tree.

Every operation carries a *stamp*, a unique int (see ``_clock``). The contract: the materialized
tree always equals the result of applying every distinct operation received, in ascending stamp
order, to an empty dict, with these rules:

- SET p v: non-dicts (or nothing) met on the way to p are replaced by dicts; p becomes v.
- DELETE p: p is removed if the way to it consists of dicts; otherwise nothing happens.
- INCREMENT p n: the way is made of dicts as for SET; a number (not a bool) at p grows by n,
  anything else at p (or nothing) becomes n.

Operations may arrive in any order and more than once. Rather than replaying a log, each path
keeps a small summary of the events that can still matter to it (a ``_Node``):

- ``assigned`` / ``assigned_value``: its own latest assignment (SET or DELETE at exactly this
  path). A SET of a dict is recorded as an assignment of DICT here plus an assignment of each
  member below, all with the same stamp.
- ``incs``: increments that are not yet overtaken, by stamp (so a repeat is applied once).
- ``written_below``: the latest SET or INCREMENT strictly below this path; such a write turns
  this path into a dict ("ensure dict").
- ``incremented``: the latest increment here. Together with the assignment it forms ``reset``,
  the reset stamp of the children: a child event older than ``reset`` can never matter again
  and is dropped.
- ``newest``: the latest stamp anywhere in the subtree (one comparison tells the usual case,
  an operation newer than everything there).

The value of a path follows from these: after the effective assignment (its own, or a newer
reset of an ancestor), the latest of {increment here, write below} decides whether it is a
number or a dict. ``_rebuild`` is that definition; the fast paths of ``_apply`` agree with it.

A path whose only metadata is one assignment is stored as a bare int stamp in its parent's
``entries``: its value is in the parent's materialized dict, or absent for a tombstone. That
keeps the cost of the common leaf to one dict slot and one int. A bulk of new leaves (a
writer's loop received in one batch, or a node's leaves installed from a snapshot) is not
even recorded there at first: the parent keeps their keys and stamps as a *run*
(``_Node.runs``), and records them in ``entries`` when anything first reads those
(``_Node.entries`` does). Keys written once, the bulk of a writer's loop, so cost one dict
insert instead of two. A received batch of new sessions (dicts set with a ttl) waits the same
way, its ttls beside it (``Sessions``): each session's node, with its ttl event, is built only
when something reads the parent's ``entries``, not for every session a peer writes.

``Tree`` is the base of the ``Store``: the root, the reads, and the state every concern
shares (the store's now, whether ``collect`` has work, the way ``_way`` caches).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable, Sequence, TypeAlias, cast, final

from ._clock import expiry_stamp
from ._columns import LeafColumns, Run, pack_stamps, unpack_stamps

__all__ = [
    "SET",
    "INCREMENT",
    "DELETE",
    "NEVER",
    "MISSING",
    "DICT",
    "Entry",
    "Tree",
    "is_number",
    "copy_value",
    "read_path",
    "place",
    "build",
    "record_assign",
    "is_plain",
    "bare_if_plain",
    "holds_nothing",
    "newest_in",
    "raise_below",
    "pack_leaves",
    "Sessions",
    "Way",
    "NO_WAY",
    "WAYS_KEPT",
    "FOLDED",
    "fold_members",
    "set_folded",
]

SET = 0
INCREMENT = 1
DELETE = 2

#: The stamp of an event that never happened: below every real stamp.
NEVER: float = float("-inf")


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
        # Copied in C, then only containers take a Python step (a session's small dict of
        # leaves, read back on every request, takes none: its values are only looked at).
        copy = value.copy()
        for v in value.values():
            inner = type(v)
            if inner is dict or inner is list:
                for k, v in value.items():
                    inner = type(v)
                    if inner is dict or inner is list:
                        copy[k] = copy_value(v)
                break
        return copy
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


@final
class _Node:
    """Metadata of one path that is more than a single assignment (see the module docstring).

    Stamps that are unset are ``NEVER``. (``__slots__``: the spelled-out names cost nothing.)
    """

    __slots__ = (
        "assigned",
        "assigned_value",
        "written_below",
        "incremented",
        "incs",
        "reset",
        "newest",
        "_entries",
        "runs",
        "value",
        "ttls",
        "ttl_first",
        "packed",
        "hidden",
        "folded",
        "fired_to",
    )

    def __init__(self) -> None:
        self.assigned: float | int = NEVER  # own assignment's stamp
        self.assigned_value: Any = MISSING  # own assignment: leaf value, DICT or MISSING (DELETE)
        self.written_below: float | int = NEVER  # latest SET or INCREMENT strictly below
        self.incremented: float | int = NEVER  # latest increment here
        self.incs: dict[int, int | float] | None = None  # increments still relevant
        self.reset: float | int = NEVER  # reset stamp for the children
        self.newest: float | int = NEVER  # latest stamp anywhere in this subtree
        self._entries: dict[str, Entry] = {}
        # Leaves set in bulk (or installed from a snapshot) and not yet in ``_entries``, or
        # None (see ``_columns.Run``), or new sessions (a run whose third item is a
        # ``Sessions``). Their keys are new to the node and to each other run, and all in
        # ``value`` (a dict) while they are pending: nothing but ``Batches._set_siblings``,
        # ``Applier.apply_expiring_siblings`` and ``collect`` touch a node with runs without
        # reading ``entries`` first, which records them. (But for a writer's own sessions,
        # ``Sessions.stamped``: their keys have bare stamps in ``_entries``, which the way's
        # fast paths compare and replace as any leaf's.)
        self.runs: list[Run] | None = None
        self.value: Any = MISSING  # materialized value (a dict object when it is a dict)
        # Expiries of ttl operations here still able to fire: their stamp -> derived stamp D.
        self.ttls: dict[int, int] | None = None
        # The earliest derived stamp of ``ttls`` (kept with it by ``set_ttls`` and
        # ``_record_ttl``): whether one has fired is one comparison, not a scan of a
        # counter's ttl events (one per hit until ``collect``).
        self.ttl_first: int = 0
        # How many leaves ``pack_leaves`` last packed here, or entries it last found too few
        # plain leaves in (0: never): it looks again only when the node has twice as many
        # entries, so a writer coming back pays once.
        self.packed = 0
        # The values of bare-stamp children that an expiry hides (key -> value), or None: a
        # node with ttl events keeps them here while they are hidden, not each in a node of
        # its own (``_rebuild``); a bare stamp whose key is neither here nor in ``value`` is
        # a tombstone.
        self.hidden: dict[str, Any] | None = None
        # The stamp of every member folded (``fold_members``: ``runs`` is ``FOLDED``, and
        # ``hidden`` their keys then their values, in a tuple), or 0.
        self.folded = 0
        # The store's now (ms) when ``advance`` last fired this node's ttl events: those due
        # by then are in its ``_due`` already (``Expiries._fire_due``). A slot, not a set of
        # the stamps in ``_due``: a churning member holds tens of thousands of fired
        # sessions (a set of their stamps took 2 MB), and the node's size class has room.
        self.fired_to: float | int = NEVER

    def set_ttls(self, ttls: dict[int, int] | None) -> None:
        """Replace ``ttls`` (None for none), keeping ``ttl_first``."""
        self.ttls = ttls
        if ttls:
            self.ttl_first = min(ttls.values())

    @property
    def entries(self) -> dict[str, Entry]:
        """Each child's key -> its stamp (a plain assignment or tombstone) or its ``_Node``,
        pending runs recorded first. (Hot paths test ``runs`` and read ``_entries`` instead:
        a property costs ~100 ns.)"""
        if self.runs is not None:
            self.record_runs()
        return self._entries

    @entries.setter
    def entries(self, entries: dict[str, Entry]) -> None:
        self.runs = None  # (replaced whole: the runs are read first, or meant to go too)
        self.hidden = None  # (likewise the hidden values: a rebuild gives them back after)
        self._entries = entries

    def record_runs(self) -> None:
        """Record the pending runs in ``_entries`` (or the members ``fold_members`` folded)."""
        if self.runs is FOLDED:
            self._entries = self._folded_entries()
            self.hidden = self.hidden_values()
            self.folded = 0
        else:
            _add_runs(self._entries, self.runs or (), self.value)
        self.runs = None

    def entries_copy(self) -> dict[str, Entry]:
        """A copy of ``entries`` that leaves the pending runs pending: what reads a node
        once (an export) need not keep a 128-bit int and a dict slot per leaf of them."""
        if self.runs is FOLDED:
            return self._folded_entries()
        entries = dict(self._entries)
        if self.runs is not None:
            _add_runs(entries, self.runs, self.value)
        return entries

    def _folded_entries(self) -> dict[str, Entry]:
        """The entries of the members ``fold_members`` folded: each at the stamp ``folded``."""
        folded = cast(tuple[Any, ...], self.hidden)
        return dict.fromkeys(folded[: len(folded) // 2], self.folded)

    def hidden_values(self) -> dict[str, Any] | None:
        """``hidden`` as a dict (None for none), also where the members are folded (without
        recording them): what a reader that leaves the runs pending reads (an export)."""
        if self.runs is not FOLDED:
            return self.hidden
        folded = cast(tuple[Any, ...], self.hidden)
        half = len(folded) // 2
        return dict(zip(folded[:half], folded[half:]))

    def child_entries(self) -> list[Entry]:
        """``entries``' values, pending runs (and folded members) left pending: what reads
        the tree once (a metric) need not record them for good."""
        if self.runs is None:
            return list(self._entries.values())
        return list(self.entries_copy().values())

    def has_sessions(self) -> bool:
        """Whether a pending run here is one of sessions (see ``Sessions``), or the members
        are folded (``fold_members``): runs that a reader of ``_entries`` records first."""
        runs = self.runs
        return runs is not None and (
            runs is FOLDED or any(type(run[2]) is Sessions for run in runs)
        )


#: A child in its parent's entries: a bare stamp (one assignment) or a node.
Entry: TypeAlias = "int | _Node"


@final
class _Folded:
    """The third item of ``FOLDED``'s one run (a marker: no keys, no stamps)."""

    __slots__ = ()


#: The ``runs`` of a node whose members are folded (``fold_members``): one marker run of no
#: keys, shared by all. (A tuple: nothing appends a run to a node without a dict value.)
FOLDED: list[Run] = cast("list[Run]", (((), (), _Folded()),))

#: The ``_entries`` of a node whose members are folded: empty, read-only (a write to it
#: would be a bug: every reader records the runs first), shared by all.
_NO_ENTRIES = cast("dict[str, Entry]", MappingProxyType({}))


def fold_members(node: _Node) -> None:
    """Fold the members of a fired session (issue 20): when each child of ``node`` (no
    value, ttl events, no pending runs) is a bare stamp, the same one (kept in ``folded``),
    whose value an expiry hides, its ``_entries`` and ``hidden`` (a dict of that one stamp
    per member and one of their values, 370 bytes for two) give way to one tuple of their
    keys then values in ``hidden`` (72 bytes), until something reads ``entries``, which
    records them again (as pending runs are: ``runs`` is ``FOLDED``). A churning member
    holds tens of thousands of fired sessions until their expiries are permanent, and
    nothing reads their members meanwhile but an export (``entries_copy``,
    ``hidden_values``) or a late operation at or below one."""
    hidden, entries = node.hidden, node._entries
    if (
        hidden is None
        or node.runs is not None
        or node.ttls is None
        or node.value is not MISSING
        or len(entries) != len(hidden)
    ):
        return
    stamps = list(entries.values())
    stamp = stamps[0]
    if type(stamp) is not int or stamps.count(stamp) != len(stamps):
        return  # (a node, or members written at other stamps)
    if entries.keys() != hidden.keys():
        return
    set_folded(node, (*hidden, *hidden.values()), stamp)


def set_folded(node: _Node, members: tuple[Any, ...], stamp: int) -> None:
    """Leave ``node``'s members folded (see ``fold_members``): ``members`` their keys then
    their values, each member a bare stamp ``stamp`` whose value an expiry hides."""
    node._entries = _NO_ENTRIES
    node.hidden = cast("dict[str, Any]", members)
    node.runs = FOLDED
    node.folded = stamp


@final
class Sessions:
    """The third item of a pending run of sessions (``(keys, stamps, Sessions(ttls))``): new
    keys each SET to a dict with a ttl (``ttls``, in milliseconds) at its stamp, not due
    when they came, their values in the parent's dict. Recorded, each is the node ``build``
    makes with its one ttl event, as ``Applier._assign_fresh`` makes it. (The store's
    ``_pending`` holds one entry for the run: see ``Expiries.pend_run``.) A writer's own
    run (``stamped``, see ``Ways.assign_flat``) keeps each key's stamp in the parent's
    entries too, and may name a key again (set again): the key whose stamp is there is
    recorded, the others were replaced."""

    __slots__ = ("ttls", "stamped")

    def __init__(self, ttls: list[int], stamped: bool = False) -> None:
        self.ttls = ttls
        # A writer's own run (``Ways.assign_flat``): each key has its stamp in the parent's
        # entries already (a bare stamp, so the way's fast paths see it), and is recorded
        # only while that stamp is still there (a newer write replaced it otherwise).
        self.stamped = stamped


def _add_runs(
    entries: dict[str, int | _Node], runs: Iterable[tuple[Sequence[str], Any, Any]], data: Any
) -> None:
    """Record ``runs`` (see ``_Node.runs``) of a node whose dict is ``data`` in ``entries``."""
    for keys, stamps, origins in runs:
        if type(origins) is Sessions:
            stamped = origins.stamped
            for key, s, ttl_ms in zip(keys, stamps, origins.ttls):
                if stamped and entries.get(key) != s:
                    continue  # replaced since (a newer write, or a tombstone forgotten)
                node = build(data[key], s, True)
                if ttl_ms:  # (0: a writer's own dict set without one, ``Ways.assign_flat``)
                    node.ttl_first = expiry = expiry_stamp(s, ttl_ms)
                    node.ttls = {s: expiry}
                entries[key] = node
            continue
        if origins is not None:
            stamps = unpack_stamps(stamps, origins)
        entries.update(zip(keys, stamps))


#: The fewest entries a node must have for ``pack_leaves`` to pack them: below that, the
#: dict slot and the stamp of each leaf cost less than a run's bookkeeping.
PACK_MIN = 32
_INT_ONLY = frozenset([int])


def pack_leaves(node: _Node) -> None:
    """Move the plain leaves of ``node`` that hold a value (bare stamps whose key is in its
    dict) out of ``_entries`` into one pending run of packed stamps (``LeafColumns.as_run``),
    what ``_add_runs`` records again: 16 bytes a leaf instead of a dict slot and a 128-bit
    int (about 75). The leaves a writer's loop left under a parent (``Tree._leave_way``) are
    most of a holder's memory otherwise. Nothing happens to a node with pending runs, without
    a dict, or with fewer than ``PACK_MIN`` entries (twice as many as it last packed, or
    last found too few plain leaves in). Never for the parent of a cached way: ``set_leaf``
    reads its ``_entries`` alone."""
    entries, data = node._entries, node.value
    if (
        node.runs is not None
        or type(data) is not dict
        or len(entries) < max(PACK_MIN, 2 * node.packed)
    ):
        return
    keys: list[str]
    stamps: list[int]
    rest: dict[str, Entry] = {}
    if len(data) == len(entries) and _INT_ONLY.issuperset(map(type, entries.values())):
        # The usual case, read in C: only plain leaves, each with a value (every key of the
        # dict has an entry or is in a run, and there are no runs).
        keys, stamps = list(entries), cast(list[int], list(entries.values()))
    else:
        plain = {key: e for key, e in entries.items() if type(e) is int and key in data}
        if len(plain) < PACK_MIN:
            # (Not again before it has twice as many entries: a writer whose ways are left
            # and cached again at every received frame made a parent of tombstones or
            # sessions pay this pass each time.)
            node.packed = len(entries)
            return
        keys, stamps = list(plain), list(plain.values())
        # A new dict: deleting from the old one would leave its table as large as it was.
        rest = {key: entry for key, entry in entries.items() if key not in plain}
    if min(stamps) < 0:
        return  # (not a clock's: a packed column holds none)
    origins, packed = pack_stamps(stamps)
    if not origins:
        return  # (too many origins: the full stamps would save only the dict slots)
    node._entries = rest
    node.runs = [LeafColumns(keys, origins, packed, len(keys), 0, 0).as_run()]
    node.packed = len(keys)


def place(parent: _Node, key: str, value: Any) -> None:
    """Put a path's new materialized value into its parent's dict (if that is a dict)."""
    if type(parent.value) is dict:
        if value is MISSING:
            parent.value.pop(key, None)
        else:
            parent.value[key] = value


def build(value: dict[str, Any], s: int, keep: bool = False) -> _Node:
    """A fresh node for a dict assigned at stamp ``s``, its members assigned at ``s`` too.
    The node's value is a copy of ``value`` (the caller may still hold it), or with ``keep``
    ``value`` itself (a value decoded for the store, which it may keep)."""
    node = _Node()
    node.assigned = node.reset = node.newest = s
    node.assigned_value = DICT
    # Copied and stamped in C (a session's small dict is built per SET); only a dict member
    # takes a Python step, its own node.
    entries: dict[str, int | _Node] = dict.fromkeys(value, s)
    data = value if keep else value.copy()
    for k, v in value.items():
        if type(v) is dict:
            child = build(v, s, keep)
            entries[k] = child
            data[k] = child.value
    node._entries = entries  # (a new node: no runs)
    node.value = data
    return node


def record_assign(entries: dict[str, int | _Node], key: str, s: int, value: Any) -> None:
    """Record an assignment (leaf, dict or MISSING) without touching materialized values.

    Leaf assignments are recorded as full nodes carrying their value, since the parent's
    materialized dict may not exist; ``_rebuild`` then places them.
    """
    entry = entries.get(key)
    if type(entry) is not _Node:
        if entry is not None and entry >= s:
            return  # the bare stamp there is as new
        entry = _Node()
        entries[key] = entry
    elif entry.assigned >= s:
        return
    entry.assigned = s
    if s > entry.newest:
        entry.newest = s
    if type(value) is dict:
        entry.assigned_value = DICT
        for k, v in value.items():
            record_assign(entry.entries, k, s, v)
    else:
        entry.assigned_value = value


def is_plain(node: _Node) -> bool:
    """True when a node is just one assignment of a leaf (or a tombstone)."""
    return not (
        node._entries
        or node.runs  # (not ``entries``: that would record them)
        or node.incs
        or node.assigned_value is DICT
        or node.written_below != NEVER
        or node.incremented != NEVER
        or node.assigned == NEVER
        or node.ttls is not None
    )


def bare_if_plain(node: _Node, key: str) -> Any:
    """The entry at ``key`` of ``node`` (a dict) after a rebuild, back to a bare stamp if
    it is just one assignment, as a rebuild of ``node`` itself would leave it: the same
    events must give the same metadata whichever way they arrived."""
    entry = node._entries.get(key)
    if (
        type(entry) is _Node
        and is_plain(entry)
        and (entry.assigned_value is MISSING if entry.value is MISSING else True)
    ):
        entry = node._entries[key] = cast(int, entry.assigned)  # (plain: a real stamp)
    return entry


def holds_nothing(node: _Node, frontier: int) -> bool:
    """True when a node is metadata of nothing older than ``frontier`` (a tombstone, or
    what deletes of absent paths left): no value (nor one an expiry hides), no children,
    ttl events or increments, and every stamp of it below the stability frontier, so no
    operation can ever meet it again. ``collect`` drops such a node, ``expire`` the one it
    leaves."""
    return (
        node.value is MISSING
        and node.assigned_value is MISSING  # (not a value an expiry hides)
        and not node._entries
        and node.runs is None
        and node.ttls is None
        and not node.incs
        and max(node.assigned, node.written_below, node.incremented) < frontier
    )


def newest_in(entry: int | _Node) -> float | int:
    """The newest stamp in an entry's subtree: a bare stamp's own, a node's ``newest``."""
    return entry.newest if type(entry) is _Node else entry


def raise_below(ancestors: list[_Node], s: int) -> None:
    """Record a write at stamp ``s`` below each of ``ancestors`` (what ``apply`` does on its
    way down, for a write whose way is all dicts)."""
    for node in ancestors:
        if s > node.newest:
            node.newest = s
        if s > node.written_below:
            node.written_below = s


@final
class Way:
    """A way ``cache_way`` remembered (see ``_way``): the dotted path of a parent (``key``;
    None for ``NO_WAY``), the parent node, the nodes on the way to it (itself included, the
    root not), its segments, and the newest stamp a fast path wrote below it since the last
    ``_flush_way`` (0: none), which those nodes' ``newest`` and ``written_below`` learn only
    when read, not at every write; ``deleted`` likewise for a fast path's DELETE below it,
    which raises their ``newest`` only (a DELETE is no write below). ``hit_key`` is the
    dotted key ``Ways.increment_key`` last took under it (None: none yet), ``hit_leaf`` its
    last segment: a hot counter's key hit again takes its leaf from here, not from a split
    of the key (two new strs, and the new leaf's hash computed at every hit). Valid while
    the way is: the way's key and the leaf are what the split gave."""

    __slots__ = ("key", "parent", "nodes", "path", "newest", "deleted", "hit_key", "hit_leaf")

    def __init__(
        self, key: str | None, parent: _Node, nodes: list[_Node], path: tuple[str, ...]
    ) -> None:
        self.key = key
        self.parent = parent
        self.nodes = nodes
        self.path = path
        self.newest = 0
        self.deleted = 0
        self.hit_key: str | None = None
        self.hit_leaf = ""


#: No way: what ``Tree._way`` is while none is cached (its key matches no parent's).
NO_WAY = Way(None, _Node(), [], ())

#: The most ways a store keeps cached (``Tree._ways``): a web app's request writes under a
#: few parents in turn (a hit counted, a key of its worker's, a session).
WAYS_KEPT = 4


class Tree:
    """The base of ``Store``: the root node, the reads, and what every concern shares.

    The concerns build on it as mixins (``_ttl.Expiries``, ``_apply.Applier``, ``_way.Ways``,
    ``_batch.Batches``, ``_collect.Collector``, ``_export.Exporter``, ``_merge.Merger``),
    each adding its methods and its own state; ``_store.Store`` composes them.
    """

    def __init__(self) -> None:
        root = _Node()
        root.value = {}
        self._root = root
        #: The materialized tree: the live root, for callers that promise not to mutate it.
        self.data: dict[str, Any] = root.value
        # False while nothing can have left metadata for ``collect`` since its last pass: the
        # fast paths of ``apply`` (new keys, newer values of plain leaves) leave none, so a
        # store that only ever sees those is never swept.
        self._untidy = False
        #: The store's notion of now, in wall-clock milliseconds (see ``advance``): what
        #: decides which expiries have fired, in every rebuild.
        self.now_ms: float | int = NEVER
        # The ways cached by ``cache_way`` for the ``*_leaf`` fast paths (see ``_way``), by
        # the dotted path of their parent, at most ``WAYS_KEPT``, and the one the last fast
        # path took (``NO_WAY`` when none is). Valid while only the fast paths ran since:
        # every other change of a node on a way calls ``_forget_way``, which is why they
        # live here.
        self._ways: dict[str, Way] = {}
        self._way: Way = NO_WAY
        # The nodes on those ways (parents included): what a fast path under one must not
        # replace (see ``Ways._assign_fresh_on_way``).
        self._nodes_on_ways: set[_Node] = set()
        # The parents of the ways dropped since the last ``cache_way``, to pack there
        # (``_leave_way``).
        self._ways_left: list[_Node] = []

    @property
    def way_key(self) -> str | None:
        """The dotted path of the parent of the way the last fast path took, or None."""
        return self._way.key

    def get(self, path: Iterable[str], default: Any = None) -> Any:
        """The value at ``path`` (containers copied), or ``default`` when there is none."""
        return read_path(self.data, path, default)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the whole tree."""
        copy: dict[str, Any] = copy_value(self.data)
        return copy

    def _flush_way(self) -> None:
        """Raise the summaries on each cached way to the newest fast-path write below it:
        what each write would have done (the newest stamp decides, as with
        ``raise_below``). Anything that reads the metadata of a node on a way calls this
        first, ``_forget_way`` too, so every path of ``apply`` that reads or changes one
        flushes. The others need not: their walk only raises the same summaries to their
        own stamp, and maxima commute."""
        for way in self._ways.values():
            if way.newest:
                raise_below(way.nodes, way.newest)
                way.newest = 0
            deleted = way.deleted
            if deleted:
                for node in way.nodes:
                    if deleted > node.newest:
                        node.newest = deleted
                way.deleted = 0

    def _forget_way(self) -> None:
        """Drop every way ``cache_way`` remembered: the tree is about to change otherwise."""
        if not self._ways:
            return  # nothing cached (a received batch calls this per operation)
        self._flush_way()
        root = self._root
        self._ways_left += [way.parent for way in self._ways.values() if way.parent is not root]
        self._ways = {}
        self._way = NO_WAY
        self._nodes_on_ways = set()

    def _leave_way(self, parent: _Node) -> None:
        """Before ``cache_way`` caches the way to ``parent``: pack the leaves of the parents
        the ways dropped since left (``pack_leaves``), a writer's loop done with them. (Only
        there: between operations, with no way cached under it, nothing holds such a node's
        ``_entries``.)"""
        kept = [way.parent for way in self._ways.values()]
        for node in self._ways_left:
            if node is not parent and all(node is not other for other in kept):
                pack_leaves(node)
        self._ways_left = []

    def _promote(self, parent: _Node, key: str, entry: int | None) -> _Node:
        """Turn a bare-stamp entry (or nothing) into a full metadata node."""
        self._untidy = True
        self._forget_way()
        node = _Node()
        if entry is None:
            node.reset = parent.reset
        else:
            node.assigned = node.newest = entry
            parent_value = parent.value
            value = parent_value.get(key, MISSING) if type(parent_value) is dict else MISSING
            if value is MISSING:
                hidden = parent.hidden_values()  # (a dict made anew where members are folded)
                if hidden is not None:
                    value = hidden.get(key, MISSING)  # (a hidden one: a rebuild follows)
            node.assigned_value = node.value = value
            node.reset = max(entry, parent.reset)
        parent.entries[key] = node
        return node
