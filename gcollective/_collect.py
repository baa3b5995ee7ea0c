"""Garbage collection: forgetting metadata no operation can need any more.

Below the stability frontier (a stamp below which no operation will ever arrive again,
anywhere) a tombstone can never overtake anything, increments can be folded into one
assignment of their sum, and a ttl event replaced before it expired can never fire. The
sweep is incremental (``collect`` visits at most ``budget`` entries a call) and runs only
when something may have left such metadata (``Tree._untidy``).
"""

from __future__ import annotations

import sys
from typing import Any

from ._errors import InvalidValueError
from ._rebuild import owners
from ._tree import _INT_ONLY, MISSING, NEVER, Tree, _Node, holds_nothing, is_number
from ._ttl import fired_bound
from ._validate import check_number

__all__ = ["Collector"]


class Collector(Tree):
    """``collect`` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # Where the incremental collection stands: a stack of [node, its reset stamp, the
        # keys of its children still to visit (each read as it is when visited), entries
        # dropped, parent, key, the earliest expiry stamp of the ttl events on the way down
        # to it (``_descent_limit``)].
        self._sweep: list[list[Any]] = []
        #: Tombstones and increments dropped or folded by ``collect`` so far.
        self.collected = 0
        # ``fired_bound(now_ms)`` as of this ``collect`` call (see ``_hidden_by_own_expiry``).
        self._fired_below: float | int = NEVER

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
        self._fired_below = fired_bound(self.now_ms)
        sweep = self._sweep
        if not sweep:
            if not self._untidy:
                return True  # nothing to look at since the last pass
            self._untidy = False
            root = self._root
            listed = self._keys_to_visit(root, frontier)
            sweep.append([root, root.reset, listed, 0, None, None, NEVER])
        visited = 0
        while sweep and visited < budget:
            frame = sweep[-1]
            node, todo = frame[0], frame[2]
            if not todo:
                sweep.pop()
                if frame[3] > len(node._entries):
                    self._shrink(node, frame[4], frame[5])
                continue
            key = todo.pop()
            visited += 1
            # (The keys only, listed: not a tuple each, which for a churning tree's hundred
            # thousand tombstones and fired sessions made megabytes at every pass.)
            entry = node._entries.get(key)
            if entry is None:
                continue  # gone since the list was taken
            if type(entry) is int:
                if type(node.value) is not dict or key not in node.value:
                    if node.hidden is not None and key in node.hidden:
                        self._untidy = True  # a hidden value (``_Node.hidden``): kept
                    elif entry < frontier:
                        del node._entries[key]  # a tombstone nothing older can reach any more
                        frame[3] += 1
                        self.collected += 1
                    else:
                        self._untidy = True  # for a later pass
                continue
            self._visit_node(frame, key, entry, frontier)
        return not sweep

    def _visit_node(self, frame: list[Any], key: str, entry: _Node, frontier: int) -> None:
        """``collect``'s step at ``entry``, a child of ``frame``'s node that is a node: drop
        its replaced ttl events, fold its old increments (a folded counter goes back to a
        bare stamp), then go down into its children, or drop it if it holds nothing."""
        node, above = frame[0], frame[6]
        if entry.ttls is not None and self._drop_replaced(entry, frontier):
            self._untidy = True  # replaced ttl events the frontier has not passed yet
        if entry.incs:
            # Folding acts as a SET at the newest folded increment, so it must stay below
            # every ttl event here (it would cancel them otherwise), and below every expiry
            # still to come above (see ``_descent_limit``).
            kept = False
            if _first_in(entry.incs) < frontier:
                limit = frontier if above == NEVER else min(frontier, above)
                if entry.ttls is not None:
                    limit = min(limit, min(entry.ttls))
                kept = self._fold_increments(entry, frame[1], limit)
            if entry.incs and not kept:
                self._untidy = True  # (a counter whose sum cannot travel waits for its next hit)
            if (
                entry.ttls is None
                and not entry.incs
                and not entry._entries
                and entry.runs is None
                and entry.written_below == NEVER
                and NEVER < entry.incremented <= entry.assigned
                and type(node.value) is dict
                and key in node.value
            ):
                node._entries[key] = entry.assigned  # the folded counter is now a plain value
                return
        if _mostly_empty(entry._entries, _SPARSE_BYTES, _SPARSE_BYTES_PER_ENTRY):
            self._shrink(entry, node, key)  # (entries ``expire`` dropped: not counted here)
        if entry._entries:
            if _hidden_by_own_expiry(entry, self._fired_below):
                # Everything below is older than the expiry that hides it (or a tombstone):
                # hidden values to keep, which ``expire`` drops with the rest once the
                # frontier passes the expiry. Not a visit per session and per member of
                # it each pass, most of a churning tree (issue 20).
                self._untidy = True
                return
            if _only_plain_leaves(entry):
                return  # (nothing to forget below: a live session, most of a churning tree)
            below = _descent_limit(above, entry)
            self._sweep.append(
                [entry, entry.reset, self._keys_to_visit(entry, frontier), 0, node, key, below]
            )
        elif (
            entry.value is MISSING
            and entry.assigned_value is MISSING  # (not a value an expiry hides: see below)
            and entry.ttls is None
            and not entry.incs
        ):
            if holds_nothing(entry, frontier):
                del node._entries[key]  # metadata of nothing (left by deletes of absent paths)
                frame[3] += 1
                self.collected += 1
            else:
                self._untidy = True

    def _keys_to_visit(self, node: _Node, frontier: int) -> list[str]:
        """The keys of ``node``'s children a pass visits: its nodes but fired sessions
        (``_fired_session``: a visit finds nothing to do there until ``expire`` makes the
        expiry permanent, and drops them whole), and its bare stamps older than ``frontier``
        that hold no value (tombstones to drop, hidden values). Not a plain leaf, where a
        visit finds nothing to do, nor a newer tombstone, which only tells that a later pass
        must look again (as a fired session does). Listed in a comprehension, not a visit
        each: a churning member holds tens of thousands of each kind, which took most of
        every pass's visits (issue 20: its passes took two rounds of housekeeping where they
        take one, and its tombstones and counters' increments waited for them)."""
        fired_below = self._fired_below
        data = node.value if type(node.value) is dict else _NO_VALUES
        entries = node._entries
        keys = [
            key
            for key, entry in entries.items()
            if (type(entry) is int and entry < frontier and key not in data)
            or (type(entry) is _Node and not _fired_session(entry, fired_below))
        ]
        if len(keys) < len(entries):
            # Is anything left out a later pass must look at again (a newer tombstone, a fired
            # session)? The newest entry first: in a churning tree most often one. Else what
            # is left out is told by a count of the entries that are not plain leaves (a bare
            # stamp holding a value), which everything listed is not either: a comprehension,
            # where a generator resumed for every entry took most of a pass over a parent of a
            # writer's own sessions, tens of thousands of plain leaves (issue 20).
            key, entry = next(reversed(entries.items()))
            if (
                (type(entry) is int and entry >= frontier and key not in data)
                or (type(entry) is _Node and _fired_session(entry, fired_below))
                or len(keys) < _not_plain_leaves(entries, data)
            ):
                self._untidy = True  # (a later pass looks again)
        return keys

    def _drop_replaced(self, node: _Node, frontier: int) -> bool:
        """Forget ttl events older than ``frontier`` that a newer ttl event here replaced
        before they expired. (Not sooner: until then an older ttl event may still arrive,
        and the replaced one is what tells that it was replaced too.) True if replaced
        events are left for a later pass."""
        ttls = node.ttls
        assert ttls is not None
        if len(ttls) == 1:
            return False  # (a session's: its only event, nothing replaced it)
        if _first_in(ttls) >= frontier:
            return True  # nothing to forget yet, most likely: a later pass looks again
        owning = dict(owners(ttls))
        if len(owning) < len(ttls):
            kept = {st: e for st, e in ttls.items() if st >= frontier or st in owning}
            self.collected += len(ttls) - len(kept)
            node.set_ttls(kept or None)
            return len(kept) > len(owning)
        return False

    def _shrink(self, node: _Node, parent: _Node | None, key: str | None) -> None:
        """Give back the memory of a node's dicts after many of their entries were dropped
        (a Python dict never shrinks by itself)."""
        node._entries = dict(node._entries)  # (pending runs stay pending)
        old = node.value
        if type(old) is dict and parent is not None and key is not None:
            pv = parent.value
            if type(pv) is dict and pv.get(key) is old:
                node.value = pv[key] = dict(node.value)  # (``old``: mypy narrows it to None)

    def _fold_increments(self, node: _Node, parent_reset: Any, frontier: int) -> bool:
        """Fold the increments older than ``frontier`` into one assignment of their result
        (``parent_reset``: the reset above the node). True if it kept them instead: their
        result is a number no frame can carry (an infinite float, an int of more than
        ``MAX_INT_DIGITS`` digits), which each of them, checked when it came, is not.
        Folded, it would be the node's value in every snapshot, which no encoder writes or no
        member takes (one member's frame of two increments of 1e308 once stopped every
        snapshot of its holders); kept, the snapshot carries the increments, and a joiner
        sums them to the same result."""
        incs = node.incs
        assert incs is not None
        old = sorted(st for st in incs if st < frontier)
        if not old:
            return False
        newest = old[-1]
        base = node.assigned if node.assigned >= parent_reset else parent_reset
        below = node.written_below if node.written_below > base else NEVER
        lower = base if below == NEVER else below
        if newest <= lower or newest < parent_reset:
            for st in old:  # overtaken already
                del incs[st]
        else:
            base_value = node.assigned_value if node.assigned >= parent_reset else MISSING
            result: Any = base_value if (below == NEVER and is_number(base_value)) else MISSING
            for st in old:
                if st > lower:
                    amount = incs[st]
                    result = amount if result is MISSING else result + amount
            if result is not MISSING:
                try:
                    check_number(result)
                except InvalidValueError:
                    return True
            if len(old) == len(incs):
                incs.clear()  # (the usual fold: all of them, at once)
            else:
                for st in old:
                    del incs[st]
            # As if one SET of the running total had happened at the newest folded stamp:
            # every event still to come is newer, so the outcome is the same.
            node.assigned = newest
            node.assigned_value = result
            if node.written_below <= newest:
                node.written_below = NEVER
        self.collected += len(old)
        if not incs:
            node.incs = None
        elif _mostly_empty(incs, _SPARSE_EVENT_BYTES, _SPARSE_BYTES_PER_EVENT):
            node.incs = dict(incs)  # (a hot counter's: grown at every hit, emptied by folds)
        return False


#: A node's entries holding more than this, plus ``_SPARSE_BYTES_PER_ENTRY`` per entry, are
#: mostly empty slots, as after ``expire`` dropped the sessions a writer made before it
#: stopped: ``collect`` makes the dict anew (and the node's dict of values). A dict of str
#: keys made anew takes 19-44 B an entry, one that grew 38-88, and one whose entries keep
#: coming and going (a churning writer's sessions and scratch keys, dropped by ``expire``
#: and ``collect`` as the frontier passes them) keeps the size it grew to for three times
#: its entries: not 300 B an entry, which let the churn's parents keep 60-75 (issue 20:
#: ``churn_probe --simulate 12``, their dicts 6.1 -> 2.8 MB, the store 52.0 -> 48.7 MB).
_SPARSE_BYTES = 4096
_SPARSE_BYTES_PER_ENTRY = 64


#: A counter's events dict likewise (a compact one takes 30-55 B an event): one that grew
#: for a frontier's lag of hits, then had the older half folded, keeps its size. (Not 64 B:
#: a counter hit steadily, its older hits folded at every pass, regrows to three times its
#: events, 60-90 B each, and there stayed; a churning member's 100 counters did so together,
#: 5 MB at once that RSS keeps: ``churn_probe --simulate 12``, its peak 62.2 -> 56.8 MB.)
_SPARSE_EVENT_BYTES = 2048
_SPARSE_BYTES_PER_EVENT = 48


def _mostly_empty(container: dict[Any, Any], fixed_bytes: int, bytes_per_item: int) -> bool:
    """Whether a dict keeps far more memory than its items need (more than ``fixed_bytes``
    plus ``bytes_per_item`` each): after many were dropped, a dict keeps its size (and
    regrows only to three times what it holds when full), so ``collect`` makes it anew."""
    return sys.getsizeof(container) > fixed_bytes + bytes_per_item * len(container)


def _descent_limit(above: Any, node: _Node) -> Any:
    """The earliest expiry stamp of the ttl events on the way down to ``node``'s children
    (``above``: that of the way down to ``node``; NEVER: none), which bounds the increments
    folded below it.

    An expiry that is not yet permanent (not yet fired: ``advance`` fires a burst a slice at
    a time; or fired, for reading only) acts as a DELETE of its path at its derived stamp D
    when it comes. A key's increments below that path older than D are then hidden and the
    newer ones count alone, so folding increments from both sides of D into one assignment
    at the newest would bring the older ones back. Any of the node's ttl events counts, the
    replaced ones too (``collect`` forgets those soon): a bound too early only folds later.
    """
    ttls = node.ttls
    if ttls is None:
        return above
    earliest = node.ttl_first
    return earliest if above == NEVER or earliest < above else above


def _first_in(events: dict[int, int] | dict[int, int | float]) -> int:
    """The stamp of the oldest event recorded in ``events`` (a node's ``ttls`` or
    ``incs``, not empty): the oldest of them, unless one arrived late. ``collect`` passes
    such a dict by while this is not below the frontier: a counter hit for less than the
    frontier's lag holds an event per hit, which that spares a scan (out of the CPU's
    caches: a miss each) and a sort. One that arrived late waits until the frontier passes
    the first (it moves on), no longer."""
    return next(iter(events))


def _fired_session(node: _Node, fired_below: float | int) -> bool:
    """Whether ``node`` is hidden by its own expiry that fired (``_hidden_by_own_expiry``),
    its only ttl event, without increments: a fired session, which ``expire`` drops whole."""
    return (
        _hidden_by_own_expiry(node, fired_below)
        and len(node.ttls) == 1  # type: ignore[arg-type]  # (not None: see above)
        and not node.incs
    )


def _not_plain_leaves(entries: dict[str, Any], data: dict[str, Any] | frozenset[str]) -> int:
    """How many of ``entries`` (a node's, ``data`` its values) are not plain leaves (a bare
    stamp holding a value): nodes, and bare stamps without a value."""
    return len(
        [None for key, entry in entries.items() if type(entry) is not int or key not in data]
    )


def _only_plain_leaves(node: _Node) -> bool:
    """Whether every child of ``node`` is a bare stamp holding a value (its dict has a value
    for each entry, and no pending run adds more): a pass finds nothing to do there."""
    data = node.value
    return (
        node.runs is None
        and type(data) is dict
        and len(data) == len(node._entries)
        and _INT_ONLY.issuperset(map(type, node._entries.values()))
    )


#: The values of a node without a dict: none (every bare stamp under it holds none).
_NO_VALUES: frozenset[str] = frozenset()


def _hidden_by_own_expiry(node: _Node, fired_below: float | int) -> bool:
    """Whether ``node``'s value is hidden by one of its own expiries that fired, not yet
    made permanent (``Expiries.expire``); ``fired_below``: ``fired_bound`` of the store's now
    (``fired_any``'s comparison). Its members' values are kept meanwhile (in its
    ``hidden``, or in nodes of their own: ``_rebuild``): a member whose clock is behind
    still shows them if it joins now, so they are not "metadata of nothing" even once the
    frontier passed their stamp.
    """
    return node.value is MISSING and node.ttls is not None and node.ttl_first < fired_below
