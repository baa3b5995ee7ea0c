"""Expiring keys: the ttl events' registry, firing them, and making them permanent.

A SET or INCREMENT with a ttl records a ttl event on its path's node (``_Node.ttls``: stamp
-> derived expiry stamp D, see ``_clock.expiry_stamp``); such a path is never a bare int, and
any operation at or below it takes ``Applier._record_and_rebuild``. The contract's derived
EXPIRE fires once ``advance`` has moved ``now_ms`` past its time and acts, if its event still
owns the path, as a DELETE at D for the *materialized* value only (``_rebuild``'s visible
view): nothing is forgotten, since an operation older than D may still arrive and
cancel it. ``expire`` turns fired expiries below the stability frontier into real DELETEs at
D, which ``collect`` then forgets.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, cast

from ._clock import MILLIS_SHIFT
from ._columns import Run
from ._rebuild import fire_session, owners, rebuild_at
from ._tree import (
    FOLDED,
    MISSING,
    Sessions,
    Tree,
    _Node,
    fold_members,
    holds_nothing,
    record_assign,
)

__all__ = ["Expiries", "fired_any", "fired_bound", "path_tuple"]

Path = tuple[str, ...]


class Expiries(Tree):
    """The store's expiring keys (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # Expiries not yet due, (E, stamp, path). Entries may be stale (the event was
        # overtaken), here and in ``_due``: checked on use.
        self._pending: list[tuple[int, int, Path]] = []
        # Due ones not yet made permanent, (D, stamp, path), or for siblings that fired
        # together (D, stamp, run), their D growing, the first's in the entry (``_DueRun``).
        self._due: list[tuple[int, int, Path]] = []
        # The events ``_push_due`` put in ``_due`` (due when registered); those ``advance``
        # fired are told by their node's ``fired_to`` instead.
        self._due_stamps: set[int] = set()
        self._due_extra = 0  # the events of _due's runs beyond the first of each
        # Per parent, the last run ``_push_fired`` made, while it is in ``_due``: siblings
        # that fire later, due no sooner, join it (a churning member holds tens of thousands
        # of fired sessions until their expiries are permanent: not an entry each).
        self._open_due: dict[Path, _DueRun] = {}
        # The sessions pending runs hold beyond their run's one entry in _pending (see
        # ``pend_run``): what ``pending_expiries`` counts too.
        self._run_extra = 0
        # ``fired_bound(now_ms)``: an expiry stamp below it has fired (``increment_key``
        # compares).
        self._fired_below: float | int = fired_bound(self.now_ms)
        # ``increment_key``'s last ``(stamp, ttl_ms, expiry stamp)``: a writer's hits of one
        # millisecond share their expiry stamp (one object, made once).
        self._last_rearm = (0, 0, 0)
        # The last run entry ``_pend_first`` made, while it is in ``_pending``: the nodes
        # given their first ttl event one after the other under one parent (a writer's
        # sessions) join it.
        self._open_run: _RunPath | None = None
        # The writer's own pending run of new sessions (``open_own_sessions``), while it is
        # its parent's last run and in ``_pending``: the next new session there joins it.
        self._open_sessions: _RunPath | None = None
        #: Expiries made permanent by ``expire`` so far.
        self.expired = 0

    @property
    def next_expiry(self) -> float | int:
        """The wall-clock milliseconds of the next expiry not yet due (``inf`` if none):
        ``advance`` to it or later to make it fire."""
        pending = self._pending
        return pending[0][0] if pending else float("inf")

    @property
    def pending_expiries(self) -> int:
        """Registered expiries not yet made permanent (due or not; some may be stale)."""
        return len(self._pending) + self._run_extra + len(self._due) + self._due_extra

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
            self._fired_below = fired_bound(now_ms)
        now_ms = self.now_ms
        pending = self._pending
        if not pending or pending[0][0] > now_ms:
            return []
        self._forget_way()
        fired: list[tuple[Path, int]] = []
        tops: dict[Path, _Node] = {}  # the subtrees to rebuild, once each: their parents
        by_parent: dict[Path, list[tuple[int, int, str]]] = {}  # what fired, for ``_due``
        while pending and pending[0][0] <= now_ms and budget > 0:
            budget -= 1
            _, _, path = heapq.heappop(pending)
            self._fire_due(path, now_ms, fired, tops, by_parent)
        self._push_fired(by_parent)
        for top_path, parent in tops.items():
            self._fire_top(parent, top_path[-1])
        return fired

    def _fire_top(self, parent: _Node, key: str) -> None:
        """Rebuild ``parent``'s child ``key`` (the topmost node with ttl events on the way to
        those that fired) and fold a fired session's members (``fold_members``): a session in
        a few steps (``fire_session``). (``parent`` is as ``_locate`` found it: firing a top
        changes only its own parent's entry and dict, and no top is below another, so each
        parent is still in the tree.)"""
        node = parent.entries.get(key)
        if type(node) is not _Node or fire_session(parent, key, node, self.now_ms):
            return
        rebuild_at(parent, key, node, self.now_ms)
        if parent._entries.get(key) is node:
            fold_members(node)  # (a fired session's: its members' stamps, left out)

    def _fire_due(
        self,
        path: Path,
        now_ms: float | int,
        fired: list[tuple[Path, int]],
        tops: dict[Path, _Node],
        by_parent: dict[Path, list[tuple[int, int, str]]],
    ) -> None:
        """Fire every ttl event of the node at ``path`` due by ``now_ms`` (whether it had a
        ``_pending`` entry of its own or came after the one that popped), adding it to
        ``fired``, the path of its topmost node with ttl events to ``tops`` (with that node's
        parent, not to walk there again) and ``(expiry stamp, stamp, key)`` to ``by_parent``
        (for ``_push_fired``); the earliest event not yet due gets the node's next entry.
        Each event goes to ``_due`` once: one due by the node's ``fired_to`` (its last
        firing) or registered due (``_due_stamps``) is there."""
        if type(path) is _RunPath:
            self._pend_sessions(path)
            return
        found = self._locate(path)
        if found is None:
            return  # overtaken meanwhile
        top_path, top_parent, _, target = found
        ttls = target.ttls
        if not ttls:
            return
        later: tuple[int, int] | None = None
        fired_to = target.fired_to  # (those due by then are in ``_due`` already)
        for stamp, expiry in ttls.items():
            due = expiry >> MILLIS_SHIFT
            if due > now_ms:
                if later is None or due < later[0]:
                    later = (due, stamp)
            elif due > fired_to and stamp not in self._due_stamps:
                events = by_parent.get(path[:-1])
                if events is None:
                    events = by_parent[path[:-1]] = []
                events.append((expiry, stamp, path[-1]))
                tops[top_path] = top_parent
                fired.append((path, stamp))
        target.fired_to = now_ms
        if later is not None:
            heapq.heappush(self._pending, (later[0], later[1], path))

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
            expiry, st, run = heapq.heappop(due)
            if type(run) is not _DueRun:
                budget -= 1
                self._due_stamps.discard(st)
                done += self._expire_one(expiry, st, run, frontier)
                continue
            if self._open_due.get(run) is run:
                del self._open_due[run]
            keys, stamps, expiries = run.keys, run.stamps, run.expiries
            count = len(keys)
            self._due_extra -= count - 1
            index = 0
            while index < count and expiries[index] < frontier and budget > 0:
                budget -= 1
                self._due_stamps.discard(stamps[index])
                done += self._expire_one(
                    expiries[index], stamps[index], (*run, keys[index]), frontier
                )
                index += 1
            if index < count:  # (its later ones: not below the frontier, or no budget left)
                rest = _DueRun(run)
                rest.keys, rest.stamps = keys[index:], stamps[index:]
                rest.expiries = expiries[index:]
                self._due_extra += count - index - 1
                heapq.heappush(due, (rest.expiries[0], rest.stamps[0], rest))
        self.expired += done
        return done

    def _expire_one(self, expiry: int, st: int, path: Path, frontier: int) -> bool:
        """``expire``'s step for ttl event ``st`` at ``path``, expiring at ``expiry`` (below
        the frontier): whether it was made permanent (it still owned its path)."""
        found = self._locate(path)
        if found is None:
            return False
        top_path, top_parent, parent, target = found
        if not target.ttls or (st, expiry) not in owners(target.ttls):
            return False  # overtaken, or replaced by a newer ttl before it fired
        # It owns its path at its expiry: the events that could have cancelled it are all
        # older than the frontier, hence known. (An ancestor's expiry made permanent before
        # or after it comes to the same: the ancestor's DELETE, at a later stamp, drops it; at
        # an earlier one, it leaves nothing this one's could show.)
        if target.runs is FOLDED and target.folded < expiry:
            # Folded members (``fold_members``), older than the DELETE: its rebuild would
            # drop them, so they are not recorded first.
            target.entries = {}
        record_assign(parent.entries, path[-1], expiry, MISSING)
        # (``top_parent`` is still in the tree: the assignment changed only ``parent``'s
        # entry, at or below the top.)
        self._rebuild_child(top_parent, top_path[-1])
        if top_path == path:
            self._drop_tombstone(parent, path[-1], frontier)
        else:
            self._untidy = True  # a tombstone for ``collect``
        return True

    def _drop_tombstone(self, parent: _Node, key: str, frontier: int) -> None:
        """Forget the tombstone an expiry made permanent left at ``parent``'s child ``key``
        (a fired session's), as ``collect`` would on its next pass: it is older than the
        frontier (so is the expiry). Not a node and then a bare stamp per expired session
        until a pass comes by (issue 20: a pass over a churning tree takes seconds)."""
        entry = parent._entries.get(key)  # (a node with ttl events: no pending run here)
        if type(entry) is _Node and holds_nothing(entry, frontier):
            del parent._entries[key]
        else:
            self._untidy = True  # something else for ``collect``

    def expirable(self, frontier: int) -> bool:
        """True while ``expire(frontier)`` has something left to look at."""
        return bool(self._due) and self._due[0][0] < frontier

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
            self._first_ttl(node, s, expiry, path)
            return
        if s in ttls:
            return
        first_due = node.ttl_first >> MILLIS_SHIFT
        if first_due > now:
            # The earliest event here is not due, so it is the earliest not due, and it has
            # an entry (one comparison: a counter hit again and again holds one event per
            # hit until ``collect``).
            covered = first_due <= due
        else:
            covered = False
            for other in ttls.values():
                if now < other >> MILLIS_SHIFT <= due:
                    covered = True  # an entry for this node pops first
                    break
        ttls[s] = expiry
        if expiry < node.ttl_first:
            node.ttl_first = expiry
        if due <= now:
            self._push_due(expiry, s, path_tuple(path))
        elif not covered:
            heapq.heappush(self._pending, (due, s, path_tuple(path)))

    def _first_ttl(self, node: _Node, s: int, expiry: int, path: Any) -> None:
        """Give ``node`` (at ``path``, without ttl events) its only one, at stamp ``s``
        expiring at ``expiry``: a session's or a new counter's, which nothing covers."""
        node.ttls = {s: expiry}
        node.ttl_first = expiry
        due = expiry >> MILLIS_SHIFT
        if due <= self.now_ms:
            self._push_due(expiry, s, path_tuple(path))
        else:
            heapq.heappush(self._pending, (due, s, path_tuple(path)))

    def pend_run(self, parent: tuple[str, ...], run: Run, due: int) -> None:
        """One ``_pending`` entry, at ``due`` (the earliest of theirs), for the sessions of
        ``run`` (a pending run of the node at ``parent``, see ``_tree.Sessions``), instead of
        one per session: when it pops, each session still there gets its own."""
        path = _RunPath(parent)
        path.run = run
        self._run_extra += len(run[0]) - 1
        heapq.heappush(self._pending, (due, run[1][0], path))

    def _pend_sessions(self, path: _RunPath) -> None:
        """A run's entry popped (see ``pend_run``): an entry for each of its sessions still
        a node with ttl events (recorded now, if they were not), at its earliest, which the
        run's entry stood for (``_record_ttl`` relies on it for a later event there too)."""
        keys, stamps, _ = path.run
        self._run_extra -= len(keys) - 1
        if path is self._open_run:
            self._open_run = None
        elif path is self._open_sessions:
            self._open_sessions = None
        parent = self._root
        for segment in path:
            parent = parent.entries.get(segment)  # type: ignore[assignment]
            if type(parent) is not _Node:
                return  # overtaken meanwhile
        entries = parent.entries
        pending = self._pending
        for key, s in zip(keys, stamps):
            node = entries.get(key)
            if type(node) is _Node and node.ttls is not None:
                heapq.heappush(pending, (node.ttl_first >> MILLIS_SHIFT, s, (*path, key)))

    def open_own_sessions(
        self, parent: _Node, key: str, leaf: str, s: int, ttl_ms: int, due: int
    ) -> None:
        """Start the writer's own pending run of new sessions on ``parent`` (the node of the
        dotted ``key``'s parent) with its first, ``leaf`` set at ``s`` with a ttl of
        ``ttl_ms`` (due at ``due``, not yet), and one ``_pending`` entry for the run (see
        ``pend_run``). The caller puts the key's stamp in ``parent``'s entries and its value
        in ``parent``'s dict (see ``_tree.Sessions.stamped``)."""
        run = ([leaf], [s], Sessions([ttl_ms], True))
        if parent.runs is None:
            parent.runs = [run]
        else:
            parent.runs.append(run)
        self._open_sessions = self._pend_open_run(parent, key, run, s, due)

    def _pend_first(
        self, parent: _Node, key: str, node: _Node, s: int, expiry: int, path: Any
    ) -> None:
        """``_first_ttl`` for ``node``, the new child ``key`` of ``parent`` (at ``path``),
        with one ``_pending`` entry for a run of such nodes: where the last node given one
        here came under the same parent, due no later, it joins that one's run entry (see
        ``pend_run``). A writer's sessions so make one entry per run, not one each."""
        node.ttls = {s: expiry}
        node.ttl_first = expiry
        due = expiry >> MILLIS_SHIFT
        if due <= self.now_ms:
            self._push_due(expiry, s, path_tuple(path))
            return
        run_path = self._open_run
        if run_path is not None and run_path.parent is parent and run_path.due <= due:
            keys, stamps, _ = run_path.run  # (lists: its own)
            cast("list[str]", keys).append(key)
            stamps.append(s)
            self._run_extra += 1
            return
        self._open_run = self._pend_open_run(parent, path, ([key], [s], None), s, due)

    def _pend_open_run(self, parent: _Node, path: Any, run: Run, s: int, due: int) -> _RunPath:
        """One ``_pending`` entry, at ``due``, for ``run``, whose first key (set at ``s``) is
        the last segment of ``path`` under ``parent``: the run entry that later members of
        the run join while it stays open (``_pend_first``, ``open_own_sessions``)."""
        run_path = _RunPath(path_tuple(path)[:-1])
        run_path.run = run
        run_path.parent = parent
        run_path.due = due
        heapq.heappush(self._pending, (due, s, run_path))
        return run_path

    def _push_due(self, expiry: int, s: int, path: tuple[str, ...]) -> None:
        """Put ttl event ``s`` at ``path``, expiring at ``expiry`` (due when registered), in
        ``_due`` (once)."""
        if s not in self._due_stamps:
            self._due_stamps.add(s)
            heapq.heappush(self._due, (expiry, s, path))

    def _push_fired(self, by_parent: dict[Path, list[tuple[int, int, str]]]) -> None:
        """Put the ttl events ``advance`` fired (``(expiry stamp, stamp, key)`` by the path of
        their parent) in ``_due``: a parent's join its open run
        when due no sooner than its last, else make a run of their own (``_DueRun``), or a
        plain entry for one alone."""
        due = self._due
        for parent, events in by_parent.items():
            events.sort()
            run = self._open_due.get(parent)
            if run is not None and events[0][0] >= run.expiries[-1]:
                for expiry, s, key in events:
                    run.keys.append(key)
                    run.stamps.append(s)
                    run.expiries.append(expiry)
                self._due_extra += len(events)
                continue
            if len(events) == 1:
                expiry, s, key = events[0]
                heapq.heappush(due, (expiry, s, (*parent, key)))
                continue
            run = _DueRun(parent)
            run.expiries, run.stamps, run.keys = (list(column) for column in zip(*events))
            self._due_extra += len(events) - 1
            self._open_due[parent] = run
            heapq.heappush(due, (run.expiries[0], run.stamps[0], run))

    def _locate(self, path: Path) -> tuple[Path, _Node, _Node, _Node] | None:
        """``(path of the topmost node with ttl events on the way, that node's parent, the
        parent of the node at path, the node at path)``, or None when the way is not made of
        nodes or none of them has ttl events. (The parents too: firing and expiring then
        rebuild there without walking from the root again.)"""
        parent = node = self._root
        top: Path | None = None
        top_parent = node
        for depth, segment in enumerate(path):
            entry = node.entries.get(segment)
            if type(entry) is not _Node:
                return None
            if top is None and entry.ttls is not None:
                top = path[: depth + 1]
                top_parent = node
            parent = node
            node = entry
        return None if top is None else (top, top_parent, parent, node)

    def _rebuild_child(self, parent: _Node, key: str) -> None:
        """Rebuild ``parent``'s child ``key`` (whose ancestors carry no ttl events), if it is
        a node."""
        node = parent.entries.get(key)
        if type(node) is _Node:
            rebuild_at(parent, key, node, self.now_ms)


class _RunPath(tuple[str, ...]):
    """The path of a run's parent in its ``_pending`` entry (see ``pend_run``), the run
    beside it (``_pend_first``'s: the parent node and the entry's time too)."""

    run: Run
    parent: _Node
    due: int


class _DueRun(tuple[str, ...]):
    """The path of a parent in a ``_due`` entry, with the due ttl events of its children the
    entry stands for (see ``_push_fired``), their expiry stamps in order: one entry, not one
    each with its own path."""

    keys: list[str]
    stamps: list[int]
    expiries: list[int]


def path_tuple(path: Any) -> tuple[str, ...]:
    """A path given as segments, or as a dotted str (segments without dots, as a batch's
    paths are), as the tuple of its segments: what ``_pending`` holds. (A dotted path is
    split only when an entry is made: a counter's hits make none.)"""
    return tuple(path.split(".")) if type(path) is str else tuple(path)


def fired_any(node: _Node, now_ms: float | int) -> bool:
    """Whether an expiry of ``node.ttls`` (not None) is due by ``now_ms``: the earliest
    (``ttl_first``; a counter hit in a burst holds hundreds of them, until ``collect``)."""
    return node.ttl_first < fired_bound(now_ms)


def fired_bound(now_ms: float | int) -> float | int:
    """The stamp below which an expiry stamp has fired by ``now_ms`` (its milliseconds are
    not later): ``fired_any``'s comparison, made once for a batch."""
    if math.isinf(now_ms):
        return now_ms  # (NEVER: no time yet, nothing fired; inf: everything)
    return (math.floor(now_ms) + 1) << MILLIS_SHIFT
