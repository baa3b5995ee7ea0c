"""The way cache: a node's own operations in a writer's loop, in a few steps each.

A loop sets (or counts, or deletes) keys under one parent. The store remembers the way to
that parent (``cache_way``) and then takes each key's operation under it with a few dict
updates (``set_leaf``, ``assign_leaf``, ``incr_leaf``, ``delete_leaf``), instead of walking
the path from the root. ``assign_key``, ``increment_key`` and ``delete_key`` are the policy
that ``Collective`` uses: they find or cache the way for a dotted key, and take the fast
path when it applies. The store keeps the ways of a few parents (``WAYS_KEPT``), by the
dotted path of each: a web app's request counts a hit under one parent and writes a key of
its worker's under another, and takes both fast.

A cached way is valid while each node on it is the node at its path, holds a dict, has no
ttl event and no reset stamp newer than the writer's next stamp, and its parent has no
pending run but the writer's own sessions. What may break that, and so calls
``_forget_way`` (which drops them all) first:

- anything that replaces or rebuilds a node whose value is a dict, or gives it a ttl, or
  raises its reset stamp (``_set``, ``_delete``, ``_write_below``, ``_promote``, anything
  with a ttl, ``_increment`` of a dict, expiry, ``collect``, ``merge``);
- a pending run put on a node (``_set_siblings``, received sessions) that is a way's parent.

Nothing else does: a leaf written where nothing is newer, a new dict on the way, an
increment of a counter (a node holding no dict: no way goes through it) change only
leaves under a way's parent and raise the summaries above, which the fast paths read
afresh or only raise. So a received batch of those (a peer's hits and keys) keeps every
way. A fast path under one way never replaces a node on another (``Tree._nodes_on_ways``):
such an operation goes the general way, which forgets them all.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Sequence, cast

from ._apply import Applier
from ._clock import MILLIS_SHIFT, NOT_COUNTER, expiry_stamp
from ._columns import Run
from ._tree import DICT, SET, WAYS_KEPT, Sessions, Way, _Node
from ._validate import INT_BOUND, INT_LOW, parse_key

__all__ = ["Ways"]

# The most pending runs ``_open_own_dicts`` leaves on a parent before recording them.
_RUNS_MOST = 8
# A run of dicts set without a ttl is recorded once it names more than twice its parent's
# keys and this many more (keys deleted or set to a plain value since it named them).
_OWN_SLACK = 64
# The ttls of a run of dicts set without one (``Sessions.ttls``: read by ``zip`` only).
_NO_TTLS = repeat(0)
# What ``Ways._own_dicts`` is before the first such run: no parent's.
_NO_RUN: Run = ((), (), None)

# After a key whose parent differs from the last one's, the keys to take the general way
# before looking for a loop again: keys scattered over parents try no way at every one.
_WAY_SKIPS = 8


class Ways(Applier):
    """The way cache and the fast paths under it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # The parents of the last keys that looked for a way and found none cached (at most
        # ``WAYS_KEPT``, oldest first): a key under one of them is taken for a loop.
        self._ways_wanted: dict[str, None] = {}
        self._way_skips = 0  # keys to take before looking for a loop again
        # The writer's own pending run of dicts set without a ttl (``_open_own_dicts``),
        # which the next one under the same parent joins while it is that parent's last run,
        # and its keys' stamps (the run's keys and stamps are this dict and its values).
        self._own_dicts: Run = _NO_RUN
        self._own_stamps: dict[str, int] = {}

    def set_key(self, stamp: int, key: str, value: Any) -> None:
        """``assign_key(stamp, key, value)`` of a ``value`` that is not a dict (a number, a
        str, a bool, None or a list), without a ttl: ``Collective.set``'s most common call,
        in the fewest steps (``set_leaf``, inline, under the cached way)."""
        above, _, leaf = key.rpartition(".")
        way = self._way
        if above != way.key or not leaf or not leaf.isascii():
            found = self._find_way(above, leaf, key, stamp)
            if found is None:
                self.apply(stamp, SET, parse_key(key), value)
                return
            way = found
        # (``set_leaf``, inline: the call cost a tenth of a ``Collective.set``; the parent was
        # checked when it was cached)
        parent = way.parent
        entries = parent._entries
        entry = entries.setdefault(leaf, stamp)  # (one lookup for a new key)
        if entry is stamp or (type(entry) is int and stamp > entry):
            if entry is not stamp:
                entries[leaf] = stamp
            parent.value[leaf] = value
            way.newest = stamp
            return
        self.apply(stamp, SET, parse_key(key), value)

    def assign_key(
        self, stamp: int, key: str, value: Any, ttl_ms: int = 0, flat: bool = False
    ) -> None:
        """``apply(stamp, SET, parse_key(key), value, ttl_ms)`` for a node's own SET at the
        dotted ``key`` (``InvalidKeyError`` if it is not valid; ``stamp`` as for
        ``set_leaf``). In a writer's loop it takes a few steps: ``set_leaf`` (or
        ``assign_leaf``, for a dict or a ttl) under the way to the key's parent, cached when
        keys come in a row under one parent (see ``_find_way``). ``flat``: ``value`` is a dict
        of leaves that the store may keep (``clean_flat_dict``'s copy, a session's), which
        ``assign_flat`` takes in fewer steps."""
        if flat:
            if not self.assign_flat(stamp, key, value, ttl_ms):
                self.apply(stamp, SET, parse_key(key), value, ttl_ms)
            return
        above, _, leaf = key.rpartition(".")
        way: Way | None = self._way
        if above != self._way.key or not leaf or not leaf.isascii():
            way = self._find_way(above, leaf, key, stamp)
        if way is not None:
            if ttl_ms or type(value) is dict:
                # (``assign_leaf``, inline, its path the dotted key: ``_first_ttl`` splits
                # it only when it makes an entry)
                if self._assign_fresh_on_way(way, leaf, stamp, value, ttl_ms, key):
                    return
            elif self.set_leaf(stamp, leaf, value):
                # (a float or a list: ``Collective.set`` gives the rest to ``set_key``)
                return
        self.apply(stamp, SET, parse_key(key), value, ttl_ms)

    def _assign_fresh_on_way(
        self, way: Way, leaf: str, s: int, value: Any, ttl_ms: int, path: Any
    ) -> bool:
        """``_assign_fresh`` under ``way`` (the cached way taken), unless the node it would
        replace is on a cached way (which the general way replaces, forgetting them all):
        False, having changed nothing, then."""
        parent = way.parent
        entry = parent._entries.get(leaf)
        if type(entry) is _Node and entry in self._nodes_on_ways:  # (the docstring)
            return False
        if not self._assign_fresh(parent, leaf, s, value, ttl_ms, path):
            return False
        way.newest = s
        return True

    def assign_flat(
        self, s: int, key: str, value: dict[str, Any], ttl_ms: int, due: int = 0
    ) -> bool:
        """``assign_key(s, key, value, ttl_ms, True)`` in the common case, in one call (a
        session's set: ``Collective._set_value`` calls it, ``apply`` when it declines):
        ``_assign_fresh`` under the cached way of ``value``, a dict of leaves the store may
        keep (``clean_flat_dict``'s copy), in fewer steps: the node ``build`` makes of it,
        made here without copying ``value`` or looking for a dict member in it. ``due``: the
        wall-clock ms it expires at, ``(s >> MILLIS_SHIFT) + ttl_ms``, when the caller has it
        (``_set_value`` shifts the 128-bit stamp once for both), or 0. False, having changed
        nothing in the tree, when there is no way to take or ``_assign_fresh`` would refuse
        (``InvalidKeyError`` for a bad key, as ``assign_key``)."""
        # (``assign_key``'s way, inline: the call cost a twentieth of a session's set)
        above, _, leaf = key.rpartition(".")
        way = self._way
        if above != way.key or not leaf or not leaf.isascii():
            found = self._find_way(above, leaf, key, s)
            if found is None:
                return False
            way = found
        parent = way.parent
        # (The way's parent has no runs but the writer's own sessions, whose keys have their
        # stamps in ``_entries``: see ``_tree.Sessions.stamped``.)
        entries = parent._entries
        entry = entries.get(leaf)
        if type(entry) is _Node and entry in self._nodes_on_ways:
            return False  # (see ``_assign_fresh_on_way``)
        data = parent.value
        if (
            leaf not in data
            if entry is None
            # (``newest_in(entry)``, inline: the newest there, replaced whole)
            else s > (entry.newest if type(entry) is _Node else entry)
        ):
            # Kept as a leaf (its stamp here, its dict in the parent's) in the writer's
            # pending run, its node built only when something reads the parent's entries,
            # as a receiver's sessions (``_tree.Sessions``): a dict set again meanwhile, or
            # never read below, costs no node. With a ttl, a session, unless due already.
            if not ttl_ms:
                runs = parent.runs
                if runs is not None and runs[-1] is self._own_dicts:
                    stamps = self._own_stamps
                    stamps[leaf] = s  # (a dict set again: its one key, the newest stamp)
                    if len(stamps) > 2 * len(data) + _OWN_SLACK:
                        parent.record_runs()  # (keys deleted or replaced since: a pass)
                else:
                    self._open_own_dicts(parent, leaf, s)
            else:
                if not due:
                    due = (s >> MILLIS_SHIFT) + ttl_ms  # (``expiry_stamp``'s milliseconds)
                if due <= self.now_ms:
                    return False  # due already: the general way fires it
                run_path = self._open_sessions
                runs = parent.runs
                # (Its run the parent's last: it is that parent's, whose runs are its own.)
                # (``run_path.run`` read once: an attribute of a tuple's subclass is a slow
                # lookup, in its instance dict)
                if (
                    run_path is not None
                    and runs is not None
                    and runs[-1] is (run := run_path.run)
                    and run_path.due <= due
                ):
                    keys, stamps, sessions = run
                    keys.append(leaf)  # type: ignore[attr-defined]  # (lists: its own)
                    stamps.append(s)
                    sessions.ttls.append(ttl_ms)
                    self._run_extra += 1
                else:
                    self.open_own_sessions(parent, key, leaf, s, ttl_ms, due)
            if type(entry) is _Node:
                self._untidy = True  # (it may have left ttl entries behind: see advance)
            entries[leaf] = s
            data[leaf] = value
            way.newest = s
            return True
        # (``newest_in(entry)``, inline)
        if entry is not None and not s > (entry.newest if type(entry) is _Node else entry):
            return False  # something there is as new: the general way compares
        node = _Node()
        node.assigned = node.reset = node.newest = s
        node.assigned_value = DICT
        node._entries = dict.fromkeys(value, s)
        node.value = value
        if ttl_ms:
            expiry = expiry_stamp(s, ttl_ms)
            due = expiry >> MILLIS_SHIFT
            if due <= self.now_ms:
                return False  # due already: the general way fires it
            run_path = self._open_run
            if run_path is not None and run_path.parent is parent and run_path.due <= due:
                # (``_pend_first``'s common case, inline: the writer's session joins the run
                # of its last one, under the same parent, due no later)
                node.ttls = {s: expiry}
                node.ttl_first = expiry
                keys, stamps, _ = run_path.run
                keys.append(leaf)  # type: ignore[attr-defined]  # (lists: its own)
                stamps.append(s)
                self._run_extra += 1
            else:
                self._pend_first(parent, leaf, node, s, expiry, key)
        self._untidy = True  # (what it replaced may have left ttl entries behind: see advance)
        entries[leaf] = node
        parent.value[leaf] = value
        way.newest = s
        return True

    def _open_own_dicts(self, parent: _Node, leaf: str, s: int) -> None:
        """Start the writer's own pending run of dicts set without a ttl on ``parent`` (the
        way's parent) with ``leaf``, set at ``s``; the caller puts the key's stamp in
        ``parent``'s entries and its value in ``parent``'s dict (``_tree.Sessions.stamped``,
        with no ttls). The run's keys are a dict of their stamps, so a dict set again takes
        no more room in it. The parent's runs are recorded first when they are many (a
        writer alternating sessions with and without a ttl)."""
        runs = parent.runs
        if runs is not None and len(runs) >= _RUNS_MOST:
            parent.record_runs()
        stamps = self._own_stamps = {leaf: s}
        # (Its keys a dict, not a sequence: every reader of a run of sessions zips them.)
        keys = cast("list[str]", stamps)
        run: Run = (keys, stamps.values(), Sessions(cast("list[int]", _NO_TTLS), True))
        if parent.runs is None:
            parent.runs = [run]
        else:
            parent.runs.append(run)
        self._own_dicts = run

    def _find_way(self, above: str, leaf: str, key: str, stamp: int) -> Way | None:
        """The way to ``above``, the parent of ``key`` (its last segment ``leaf``), for an
        operation at ``stamp`` whose key the quick test (the way taken last, a plain leaf)
        did not take: a cached way (taken now), or one cached now, or None (then take the
        general way); ``InvalidKeyError`` for a bad key that the general way would not see.

        The policy: a key under a parent whose way is cached takes it (a writer alternating
        between a few parents takes each fast). Otherwise a key under the same parent as one
        of the last few that looked is taken for a loop (or loops in turn), and its way
        cached; after a key under another parent, the next ``_WAY_SKIPS`` keys off the
        cached ways take the general way without looking (keys scattered over parents pay
        little for the cache)."""
        way = self._ways.get(above)
        if way is not None:
            if not leaf or not leaf.isascii():
                parse_key(key)  # raises for a bad key
            self._way = way
            return way
        if self._way_skips:
            self._way_skips -= 1  # keys scattered over parents: look for a loop again later
            return None  # (the general way checks the key)
        path = parse_key(key)  # raises for a bad key
        wanted = self._ways_wanted
        if above not in wanted:
            wanted[above] = None
            if len(wanted) > WAYS_KEPT:
                del wanted[next(iter(wanted))]
            self._way_skips = _WAY_SKIPS
            return None
        del wanted[above]  # (cached now, or no fast way there now: try again later)
        if self.cache_way(above, path[:-1], stamp):
            return self._way
        return None

    def cache_way(self, key: str, way: tuple[str, ...] | list[str], s: int) -> bool:
        """Remember the node at ``way`` (named ``key``, its dotted form) for ``set_leaf``, if
        a plain SET below it at stamp ``s`` would take the fast path at every level; True
        when cached (and the way the fast paths take now). ``way`` must be a valid path
        (``key`` is only its name here). The way cached first of ``WAYS_KEPT`` is dropped
        for it.

        The cache stays valid while the tree changes only through the fast paths and what
        the module docstring lists; everything else calls ``_forget_way`` first.
        """
        self._flush_way()
        parent, nodes = self._dict_way(way, s)
        if parent is None or s < max([self._root.reset, *[node.reset for node in nodes]]):
            return False
        ways = self._ways
        if ways.pop(key, None) is None and len(ways) >= WAYS_KEPT:
            self._ways_left.append(ways.pop(next(iter(ways))).parent)  # (flushed above)
        self._leave_way(parent)  # (packs the leaves of the parents left)
        if parent.runs is not None:
            parent.record_runs()  # (set_leaf reads its _entries: no runs are added meanwhile)
        self._way = ways[key] = Way(key, parent, nodes, tuple(way))
        self._nodes_on_ways = {node for way in ways.values() for node in way.nodes}
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
        way = self._way
        parent = way.parent
        entries = parent._entries
        entry = entries.setdefault(leaf, s)  # one lookup when the key is new (``s`` is)
        if entry is not s:
            if type(entry) is not int or not s > entry:
                return False
            entries[leaf] = s
        parent.value[leaf] = value
        way.newest = s  # (the newest yet: raised on the way later, see _flush_way)
        return True

    def assign_leaf(
        self, s: int, leaf: str, value: Any, ttl_ms: int = 0, flat: bool = False
    ) -> bool:
        """``apply(s, SET, way + (leaf,), value, ttl_ms)`` under the cached way, for the SETs
        ``set_leaf`` leaves out: a dict value (a session), or a ttl, where nothing in the
        key's subtree is as new as ``s`` (see ``_assign_fresh``). ``s`` as for ``set_leaf``;
        ``flat`` as for ``assign_key``. False, having changed nothing, when the case is not
        that simple."""
        if flat:
            return self.assign_flat(s, self._under_way(leaf), value, ttl_ms)
        way = self._way
        path = (*way.path, leaf) if ttl_ms else ()
        return self._assign_fresh_on_way(way, leaf, s, value, ttl_ms, path)

    def increment_key(self, s: int, key: str, amount: int, ttl_ms: int = 0, millis: int = 0) -> Any:
        """A node's own INCREMENT of the int counter at the dotted ``key`` by the int
        ``amount``, under the way ``assign_key`` takes, in the common case: an int counter
        (or a new key) where nothing in the key's subtree is as new as ``s``, a result that
        stays an int JSON carries, and no expiry due (a counter hit with
        ``incr(k, ttl=...)`` on every request takes it too, as in ``_increment_expiring``).
        Returns the new value, or None having changed nothing when the case is not that
        (then ``apply`` it). ``s`` as for ``set_leaf``; ``InvalidKeyError`` for a bad key.
        ``millis``: ``s``'s millisecond (``stamp_millis(s)``) when the caller has it, or 0
        (a shift of the 128-bit stamp makes an int: ``Collective.incr`` shifts it once)."""
        way = self._way
        if key == way.hit_key:
            # The way's last key hit again (a hot counter): its leaf as split then, and the
            # quick test below passed with it (``Way.hit_key``).
            leaf = way.hit_leaf
        else:
            above, _, leaf = key.rpartition(".")
            if above != way.key or not leaf or not leaf.isascii():
                found = self._find_way(above, leaf, key, s)
                if found is None:
                    return None
                way = found
            way.hit_key = key
            way.hit_leaf = leaf
        if ttl_ms:
            # (the stamp's millisecond, shifted once; without a ttl only a counter with ttl
            # events needs it, shifted there if the caller had not)
            if not millis:
                millis = s >> MILLIS_SHIFT
            if millis + ttl_ms <= self.now_ms:
                return None  # due already: the general way fires it
        parent = way.parent
        entries = parent._entries
        entry = entries.get(leaf)
        if entry is None:
            entry = _Node()
            entry.incs = {s: amount}
            entry.incremented = entry.reset = entry.newest = s
            entry.value = result = amount
            entries[leaf] = entry
            parent.value[leaf] = amount
        else:
            if type(entry) is not _Node or not s > entry.newest:
                return None
            current = entry.value
            if type(current) is not int:
                return None
            result = current + amount
            if not (
                (result < 0x3FFFFFFF and result > -0x3FFFFFFF)  # (a one-digit int: see set)
                or INT_LOW < result < INT_BOUND
            ):
                return None  # the general way refuses it
            if entry.ttls is not None and (millis or s >> MILLIS_SHIFT) <= self.now_ms:
                return None  # an expiry may have fired after ``s``: _newest_increment
            # (``_newest_increment`` of a number, inline)
            incs = entry.incs
            if incs is None:
                entry.incs = incs = {}
            incs[s] = amount
            entry.newest = entry.incremented = entry.reset = s
            entry.value = result
            parent.value[leaf] = result
        if ttl_ms:
            # The hit's ttl event, as ``_record_ttl(entry, s, expiry, key)`` records it, in a
            # few steps (inline: the call cost a twentieth of the hit) in the common case of a
            # counter hit again and again: its earliest expiry has not fired and is no later
            # than this one, so the ``_pending`` entry it has pops first (``_record_ttl``
            # would compare milliseconds to the same end). The expiry stamp is made once
            # per millisecond, origin and ttl (``_last_rearm``: the writer's hits share it).
            last_stamp, last_ttl, expiry = self._last_rearm
            if ttl_ms != last_ttl or (s ^ last_stamp) & NOT_COUNTER:
                expiry = expiry_stamp(s, ttl_ms)
                self._last_rearm = (s, ttl_ms, expiry)
            ttls = entry.ttls
            if ttls is not None and self._fired_below <= entry.ttl_first <= expiry:
                ttls[s] = expiry  # (no event here is as new as ``s``: it is the newest)
            else:
                self._record_ttl(entry, s, expiry, key)  # (split if it must)
        self._untidy = True  # (increments for ``collect`` to fold)
        way.newest = s
        return result

    def delete_key(self, s: int, key: str) -> bool:
        """A node's own DELETE of the dotted ``key``, under the way ``assign_key`` takes,
        where nothing in the key's subtree is as new as ``s``: a tombstone replaces it, as in
        ``_delete``. ``s`` as for ``set_leaf``; False, having changed nothing, otherwise
        (then ``apply`` it); ``InvalidKeyError`` for a bad key."""
        above, _, leaf = key.rpartition(".")
        way = self._way
        if above != way.key or not leaf or not leaf.isascii():
            found = self._find_way(above, leaf, key, s)
            if found is None:
                return False
            way = found
        parent = way.parent
        entries = parent._entries
        entry = entries.get(leaf)
        if type(entry) is _Node:
            if not s > entry.newest or entry in self._nodes_on_ways:
                return False  # (``newest_in(entry)``, inline: a loop of deletes pays for each)
        elif entry is not None and not s > entry:
            return False
        self._untidy = True  # a tombstone for ``collect``
        entries[leaf] = s
        parent.value.pop(leaf, None)
        # The nodes on the way learn it when read (``_flush_way``), as a write's ``newest``:
        # a loop of deletes raised each node's at every key. (The writer's stamps only grow.)
        way.deleted = s
        return True

    def incr_leaf(self, s: int, leaf: str, amount: int, ttl_ms: int = 0) -> Any:
        """``increment_key`` of ``leaf`` (a segment) under the way ``cache_way`` cached."""
        return self.increment_key(s, self._under_way(leaf), amount, ttl_ms)

    def delete_leaf(self, s: int, leaf: str) -> bool:
        """``delete_key`` of ``leaf`` (a segment) under the way ``cache_way`` cached."""
        return self.delete_key(s, self._under_way(leaf))

    def _under_way(self, leaf: str) -> str:
        """The dotted key of ``leaf`` under the cached way."""
        above = self._way.key
        return f"{above}.{leaf}" if above else leaf

    def _dict_way(self, way: Sequence[str], s: int) -> tuple[_Node | None, list[_Node]]:
        """The node at ``way`` and the nodes on the way to it, if a later plain SET below it
        (with a newer stamp than ``s``) takes the fast path at every level."""
        node = self._root
        ancestors: list[_Node] = []
        for segment in way:
            if s < node.reset:
                return None, ancestors
            child = node._entries.get(segment)  # (never in a run: those are plain leaves)
            if type(child) is not _Node or type(child.value) is not dict or child.ttls is not None:
                return None, ancestors  # (a path that may expire takes apply's slow way)
            ancestors.append(child)
            node = child
        return node, ancestors
