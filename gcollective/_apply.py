"""Applying one stamped operation: the walk down, its fast paths, and the general way.

In-order writes (the normal case) take short paths that touch only the path written: a leaf
written where nothing is newer, a new dict on the way. Anything arriving late records its
event and rebuilds the affected subtree (``_rebuild``), which is the definition the fast paths
agree with; so does anything at or below a path with ttl events (``_record_and_rebuild``).
"""

from __future__ import annotations

from heapq import heappush
from operator import countOf
from typing import Any, Iterable, Sequence, cast

from ._clock import MILLIS_SHIFT, expiry_stamp
from ._rebuild import prune_children, rebuild_at
from ._tree import (
    DELETE,
    INCREMENT,
    MISSING,
    NEVER,
    SET,
    Sessions,
    _Node,
    build,
    is_number,
    newest_in,
    place,
    raise_below,
    record_assign,
)
from ._ttl import Expiries, fired_any

__all__ = ["Applier"]


class Applier(Expiries):
    """``apply``: one operation, in any order, any number of times (see the module
    docstring)."""

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
            if s < node.reset:
                return  # overtaken by a newer reset above: no effect on anything below
            key = path[i]
            entries = node._entries if node.runs is None else node.entries
            child = entries.get(key)
            if child is None and writes:
                # The common way down to a new key: a fresh, empty dict written below.
                child = _Node()
                child.written_below = child.newest = s
                child.reset = node.reset
                fresh: dict[str, Any] = {}
                child.value = fresh
                entries[key] = child
                if type(node.value) is dict:
                    node.value[key] = fresh
                node = child
                continue
            if type(child) is not _Node:
                child = self._promote(node, key, child)
            if child.ttls is not None:
                # Below a path that may expire: record the event, recompute that subtree.
                self._record_and_rebuild(node, key, path[i + 1 :], s, op, value, ttl_ms, path)
                return
            # ``written_below`` never exceeds ``newest`` (a write below is in the subtree): the
            # newest event of a subtree, the usual case, is one comparison.
            if s > child.newest:
                child.newest = s
                if writes:
                    child.written_below = s
                    if type(child.value) is not dict:
                        self._write_below(node, key, child, s)
            elif writes and s > child.written_below:
                child.written_below = s
                if type(child.value) is not dict:
                    self._write_below(node, key, child, s)
            node = child
        key = path[last]
        if s < node.reset:
            return
        if ttl_ms:
            self._apply_with_ttl(node, key, s, op, value, ttl_ms, path)
        elif op == SET:
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

    def make_way(self, way: Sequence[str], s: int) -> bool:
        """Make the dicts missing at the end of ``way`` (segments) as a write below it at
        stamp ``s`` makes them (``apply``'s way down to a new key), where the way there is
        all dicts without ttl events, none reset after ``s``: so the first frame of a
        writer's loop under a new parent (sessions, a rate limiter's hits) finds the parent,
        and takes the bulk paths, as its later frames do (one by one it built a node per
        session, which the cyclic GC then walked). The summaries on the way are the
        caller's to raise. False, having changed nothing, when nothing is missing or the way
        is not that."""
        node = self._root
        for depth, segment in enumerate(way):
            if s < node.reset:
                return False
            child = node._entries.get(segment)
            if child is None:
                if segment in node.value:
                    return False  # (a plain leaf in a pending run: ``apply`` decides)
                for key in way[depth:]:
                    child = _Node()
                    child.written_below = child.newest = s
                    child.reset = node.reset
                    child.value = {}
                    node._entries[key] = child
                    node.value[key] = child.value
                    node = child
                return True
            if type(child) is not _Node or type(child.value) is not dict or child.ttls is not None:
                return False
            node = child
        return False

    def apply_expiring_siblings(
        self,
        parent: _Node,
        ancestors: list[_Node],
        stamps: Sequence[int],
        ops: list[int],
        prefix: str,
        keys: list[str],
        values: list[Any],
        ttls: Sequence[int],
    ) -> None:
        """``apply`` one origin's operations (stamps growing, the first not older than
        ``parent.reset``) at ``keys`` under ``parent``, the node at the dotted ``prefix``
        whose way is all dicts without ttl events (``ancestors``: the nodes on it, itself
        included), with the same result, faster for a run of received sessions and rate-limit
        hits: new sessions (a SET with a ttl of a dict at a new key, not due) wait on
        ``parent`` as a pending run (``_tree.Sessions``) with one expiry entry (a batch of
        nothing else: in a few C-level passes, ``_new_sessions_at_once``), and an int hit
        with a ttl takes ``apply_expiring_hits``' few dict updates; anything else goes its
        usual way. The summaries on the way are raised once, as a run's are."""
        self._untidy = True  # (increments and ttl events for ``collect``)
        head = tuple(prefix.split("."))
        if self._new_sessions_at_once(parent, head, stamps, ops, keys, values, ttls):
            raise_below(ancestors, stamps[-1])
            return
        now = self.now_ms
        data = parent.value
        recorded = parent._entries
        session_keys: list[str] = []  # the new sessions not yet put on ``parent`` as a run
        session_stamps: list[int] = []
        session_ttls: list[int] = []
        first_due = 0  # the earliest of theirs
        raised: int | None = None  # the newest stamp not yet raised on the way
        for s, op, key, value, ttl_ms in zip(stamps, ops, keys, values, ttls):
            if ttl_ms:
                due = (s >> MILLIS_SHIFT) + ttl_ms  # (``expiry_stamp``'s milliseconds)
                if (
                    due > now
                    and op == SET
                    and type(value) is dict
                    and key not in data
                    and key not in recorded
                ):
                    # A new session (new to the runs too: their keys are in ``data``).
                    data[key] = value
                    session_keys.append(key)
                    session_stamps.append(s)
                    session_ttls.append(ttl_ms)
                    if due < first_due or not first_due:
                        first_due = due
                    raised = s
                    continue
            if session_keys:  # (anything else reads ``parent``'s entries: the run first)
                self._pend_sessions_run(
                    parent, head, session_keys, session_stamps, session_ttls, first_due
                )
                session_keys, session_stamps, session_ttls, first_due = [], [], [], 0
            if ttl_ms:  # (SET or INCREMENT: a write below the way)
                if op == SET or type(value) is not int:
                    self._apply_with_ttl(parent, key, s, op, value, ttl_ms, (*head, key))
                else:
                    self.apply_expiring_hits(parent, head, (s,), (key,), (value,), (ttl_ms,))
                raised = s
            else:
                if raised is not None:
                    raise_below(ancestors, raised)
                    raised = None
                self.apply(s, op, (*head, key), value)
            recorded = parent._entries  # (the general way may have replaced it)
        if session_keys:
            self._pend_sessions_run(
                parent, head, session_keys, session_stamps, session_ttls, first_due
            )
        if raised is not None:
            raise_below(ancestors, raised)

    def _new_sessions_at_once(
        self,
        parent: _Node,
        head: tuple[str, ...],
        stamps: Sequence[int],
        ops: list[int],
        keys: list[str],
        values: list[Any],
        ttls: Sequence[int],
    ) -> bool:
        """``apply_expiring_siblings``' loop for a batch of only new sessions (a writer's
        loop of them): SETs of dicts at keys new to ``parent`` and to each other, one ttl
        for all, none due. Then they are one pending run, made with a few C-level passes
        (``stamps`` and ``keys`` kept as they are); False, having changed nothing, when the
        batch is not that (the loop decides)."""
        ttl_ms = ttls[0]
        due = (stamps[0] >> MILLIS_SHIFT) + ttl_ms  # (the earliest: the stamps grow)
        data = parent.value
        if not (
            due > self.now_ms
            and ops[0] == SET
            and ops.count(SET) == len(ops)
            and ttl_ms
            and ttls.count(ttl_ms) == len(ttls)
            and countOf(map(type, values), dict) == len(values)  # (in C: no set of types)
            and data.keys().isdisjoint(keys)
            and parent._entries.keys().isdisjoint(keys)  # (the runs' keys are in ``data``)
        ):
            return False
        size = len(data)
        data.update(zip(keys, values))
        if len(data) - size != len(keys):  # a key twice: the loop keeps its last value
            for key in keys:
                data.pop(key, None)
            return False
        self._pend_sessions_run(parent, head, keys, stamps, ttls, due)
        return True

    def _pend_sessions_run(
        self,
        parent: _Node,
        head: tuple[str, ...],
        keys: list[str],
        stamps: Sequence[int],
        ttls: Sequence[int],
        due: int,
    ) -> None:
        """Put new sessions (their values in ``parent``'s dict already) on ``parent``, the
        node at ``head``, as a pending run, with one expiry entry at ``due``."""
        run = (keys, stamps, Sessions(cast("list[int]", ttls)))
        if parent.runs is None:
            parent.runs = [run]
        else:
            parent.runs.append(run)
        self.pend_run(head, run, due)

    def apply_expiring_hits(
        self,
        parent: _Node,
        head: tuple[str, ...],
        stamps: Iterable[int],
        keys: Iterable[str],
        amounts: Iterable[Any],
        ttls: Iterable[int],
    ) -> None:
        """``apply`` one origin's increments with a ttl (stamps growing, the first not
        older than ``parent.reset``; a rate limiter's hits) at ``keys`` under ``parent``, the
        node at ``head`` whose way is all dicts without ttl events; its ancestors' summaries
        are the caller's to raise. An int hit takes a few dict updates here, inline (this
        loop is a receiver's whole cost of a hit), where it is new (a new counter, as the rebuild
        makes it) or only adds to a counter whose expiries have not fired and which holds an
        int, hit in order (``_newest_increment``) or late among others' hits
        (``_late_increment``), its ttl event recorded as ``_record_ttl`` does; anything
        else goes the general way (``_apply_with_ttl``)."""
        self._untidy = True  # (increments and ttl events for ``collect``)
        now = self.now_ms
        fired_below = self._fired_below  # (an expiry stamp below it has fired)
        data = parent.value
        entries = parent._entries if parent.runs is None else parent.entries
        # A hit's expiry (``hit_due``, its stamp ``hit_expiry``) is made once per millisecond
        # and ttl (``hit_ttl``; one origin's expiry is the same for the same two) and kept for
        # the hits before ``next_ms``, the first stamp of the next millisecond (the stamps
        # grow; compared, not shifted: no int made per hit). A hit due already keeps it.
        hit_due = hit_expiry = hit_ttl = next_ms = 0
        never = NEVER  # (a local: read up to three times a hit)
        for s, key, amount, ttl_ms in zip(stamps, keys, amounts, ttls):
            if s >= next_ms or ttl_ms != hit_ttl:
                millis = s >> MILLIS_SHIFT
                due = millis + ttl_ms  # (``expiry_stamp``'s milliseconds)
                if due <= now:  # due already: the general way fires it
                    self._apply_with_ttl(parent, key, s, INCREMENT, amount, ttl_ms, (*head, key))
                    entries = parent._entries if parent.runs is None else parent.entries
                    continue
                hit_due, hit_expiry, hit_ttl = due, expiry_stamp(s, ttl_ms), ttl_ms
                next_ms = (millis + 1) << MILLIS_SHIFT
            try:  # (a subscript, not ``get``: no method call, and a new key is rare)
                node = entries[key]
            except KeyError:
                if type(amount) is int:  # a new counter, as the rebuild makes it
                    node = _Node()
                    node.incs = {s: amount}
                    node.incremented = node.reset = node.newest = s
                    node.value = data[key] = amount
                    self._first_ttl(node, s, hit_expiry, (*head, key))
                    entries[key] = node
                    continue
                node = None
            if type(node) is _Node:
                counts = node.ttls
                current = node.value
                if (
                    counts is not None
                    and type(current) is int
                    and type(amount) is int
                    and node.ttl_first >= fired_below
                ):
                    incs = node.incs
                    if s > node.newest:
                        node.newest = node.incremented = node.reset = s
                        if incs is None:
                            node.incs = incs = {}
                        incs[s] = amount
                        node.value = data[key] = current + amount
                        counts[s] = hit_expiry  # (no event here is as new: none at ``s``)
                        if hit_expiry < node.ttl_first:  # (``_record_ttl``'s case not due)
                            if hit_due < node.ttl_first >> MILLIS_SHIFT:
                                heappush(self._pending, (hit_due, s, (*head, key)))
                            node.ttl_first = hit_expiry
                        continue
                    incremented = node.incremented
                    below = node.written_below
                    assigned = node.assigned
                    if (
                        # ``incremented > below and s > below and s > assigned``, where
                        # ``NEVER``, a float (no write below; no assignment, as a counter
                        # before its first fold has), is told by identity: comparing a stamp
                        # with a float takes int's comparison and then float's.
                        (
                            incremented is not never
                            if below is never
                            else incremented > below and s > below
                        )
                        and (assigned is never or s > assigned)
                    ):
                        # Late, after the assignment and every write below, where the number
                        # counts increments already: the sum does not depend on the order.
                        if incs is None:
                            node.incs = incs = {}
                        elif s in incs:
                            continue  # a repeat
                        if s > incremented:
                            node.incremented = s
                            if s > node.reset:
                                node.reset = s
                        incs[s] = amount
                        node.value = data[key] = current + amount
                        # ``_record_ttl``'s case of an event not due, without its look for
                        # ``s`` in ``counts``: storing the event again changes nothing (one
                        # operation per stamp: the same expiry, not below ``ttl_first``).
                        counts[s] = hit_expiry
                        first = node.ttl_first
                        if hit_expiry < first:
                            node.ttl_first = hit_expiry
                            if hit_due < first >> MILLIS_SHIFT:
                                heappush(self._pending, (hit_due, s, (*head, key)))
                        continue
            # Not that simple (an expiry here fired, whether it owns the path may change;
            # no number here; older than a write below): the general way.
            self._apply_with_ttl(parent, key, s, INCREMENT, amount, ttl_ms, (*head, key))
            entries = parent._entries if parent.runs is None else parent.entries

    def _apply_with_ttl(
        self,
        parent: _Node,
        key: str,
        s: int,
        op: int,
        value: Any,
        ttl_ms: int,
        path: Sequence[str] | str,
    ) -> None:
        """``apply``'s last step for an operation with a ttl: a received session (a dict or
        leaf SET with a ttl, newest there) is built as it is, a rate limiter's hit counts
        in its simple cases (``_increment_expiring``); anything else is recorded and
        rebuilt. ``path``: segments, or a dotted str (see ``path_tuple``)."""
        self._forget_way()  # (the key may be on the cached way)
        if op == SET:
            if self._assign_fresh(parent, key, s, value, ttl_ms, path):
                return
        elif self._increment_expiring(parent, key, s, value, ttl_ms, path):
            return
        if type(path) is str:
            path = path.split(".")
        self._record_and_rebuild(parent, key, (), s, op, value, ttl_ms, path)

    def _assign_fresh(
        self, parent: _Node, key: str, s: int, value: Any, ttl_ms: int, path: Any
    ) -> bool:
        """A SET of a dict or with a ttl (at ``path``, ``parent``'s child ``key``) where
        nothing in the key's subtree is as new as ``s`` and the expiry is not due: the key is
        replaced whole by a fresh node, as ``_set`` (and, with a ttl, ``_record_and_rebuild``)
        would make it. False, having changed nothing, when the case is not that."""
        entries = parent._entries if parent.runs is None else parent.entries
        entry = entries.get(key)
        if (entry is not None and not s > newest_in(entry)) or type(parent.value) is not dict:
            return False  # something there is as new (the general way compares), or no dict
        expiry = 0
        if ttl_ms:
            expiry = expiry_stamp(s, ttl_ms)
            if expiry >> MILLIS_SHIFT <= self.now_ms:
                return False  # due already: the general way fires it
        if type(value) is dict:
            node = build(value, s)
        elif ttl_ms:
            node = _Node()
            node.assigned = node.reset = node.newest = s
            node.assigned_value = node.value = value
        else:
            return False  # a plain leaf: set_leaf's case
        if ttl_ms:
            self._pend_first(parent, key, node, s, expiry, path)
        self._untidy = True  # (what it replaced may have left ttl entries behind: see advance)
        entries[key] = node
        parent.value[key] = node.value
        return True

    def _record_and_rebuild(
        self,
        parent: _Node,
        key: str,
        rest: Sequence[str],
        s: int,
        op: int,
        value: Any,
        ttl_ms: int,
        path: Sequence[str],
    ) -> None:
        """Apply an operation at or below ``parent.entries[key]`` by recording its events
        there and rebuilding that subtree: the way for anything touching a path with ttl
        events (``key`` is the topmost such path on the way, or the target of a ttl op;
        ``rest`` the segments below it). ``parent`` and its ancestors carry no ttl events."""
        self._forget_way()
        if (
            op == INCREMENT
            and not rest
            and self._increment_expiring(parent, key, s, value, ttl_ms, path)
        ):
            return
        writes = op != DELETE
        above, target = parent, key
        for segment in rest:
            node = above.entries.get(target)
            if type(node) is not _Node:
                node = self._promote(above, target, node)
            if s > node.newest:
                node.newest = s
            if writes and s > node.written_below:
                node.written_below = s
            above, target = node, segment
        self._record_at(above, target, s, op, value, ttl_ms, path)
        top = parent.entries.get(key)
        if type(top) is _Node:
            rebuild_at(parent, key, top, self.now_ms)

    def _increment_expiring(
        self, parent: _Node, key: str, s: int, amount: Any, ttl_ms: int, path: Sequence[str]
    ) -> bool:
        """An increment of ``parent.entries[key]``, a path with ttl events, in its simple
        cases, without a rebuild (``_newest_increment``, ``_late_increment``). False, having
        changed nothing, when neither applies (then record and rebuild)."""
        if ttl_ms and (s >> MILLIS_SHIFT) + ttl_ms <= self.now_ms:
            return False  # due already: the rebuild fires it
        node = parent.entries.get(key)
        if type(node) is not _Node:
            return False
        if s > node.newest:
            done = self._newest_increment(parent, key, node, s, amount)
        else:
            done = self._late_increment(parent, key, node, s, amount)
        if done and ttl_ms:
            self._record_ttl(node, s, expiry_stamp(s, ttl_ms), path)  # (the way: forgotten)
        return done

    def _record_at(
        self,
        parent: _Node,
        key: str,
        s: int,
        op: int,
        value: Any,
        ttl_ms: int,
        path: Sequence[str],
    ) -> None:
        """Record an operation's own events at its target ``parent.entries[key]`` (its
        ttl event too), for a rebuild to follow."""
        if op != INCREMENT:
            record_assign(parent.entries, key, s, MISSING if op == DELETE else value)
            node = parent.entries.get(key)
            if ttl_ms and type(node) is _Node and node.assigned == s:
                self._add_ttl(node, s, expiry_stamp(s, ttl_ms), path)
            return
        node = parent.entries.get(key)
        if type(node) is not _Node:
            node = self._promote(parent, key, node)
        if s <= node.assigned:
            return  # overtaken by the assignment here (or a repeat of a folded one)
        if node.incs is None:
            node.incs = {}
        node.incs.setdefault(s, value)
        if s > node.incremented:
            node.incremented = s
        if s > node.newest:
            node.newest = s
        if ttl_ms:
            self._add_ttl(node, s, expiry_stamp(s, ttl_ms), path)

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
        if ttls is not None and s >> MILLIS_SHIFT <= now and fired_any(node, now):
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
        node.newest = node.incremented = node.reset = s
        node.value = result
        place(parent, key, result)
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
            or not (
                node.incremented > node.written_below
                and s > node.written_below
                and s > node.assigned
            )
        ):
            return False
        if node.ttls and fired_any(node, self.now_ms):
            return False  # fired: whether it still owns the path may change
        incs = node.incs
        if incs is None:
            node.incs = incs = {}
        elif s in incs:
            return True  # a repeat
        incs[s] = amount
        if s > node.incremented:
            node.incremented = s
            if s > node.reset:
                node.reset = s
        node.value = current + amount
        place(parent, key, node.value)
        return True

    def _write_below(self, parent: _Node, key: str, node: _Node, s: int) -> None:
        """A write at stamp ``s`` (already recorded in ``node.written_below``) landed below
        a non-dict."""
        self._untidy = True
        self._forget_way()
        if s > node.reset:
            # Newest event here: the path becomes an empty dict (older children are overtaken).
            prune_children(node, node.reset, self.now_ms)
            node.value = {}
            node.incs = None
            place(parent, key, node.value)
        else:
            # Between the assignment and the latest increment: the number changes.
            rebuild_at(parent, key, node, self.now_ms)

    def _set(self, parent: _Node, key: str, s: int, value: Any) -> None:
        """``apply``'s last step for a SET that is not a new leaf's."""
        self._untidy = True
        self._forget_way()
        entry = parent.entries.get(key)
        if type(entry) is _Node:
            if s <= entry.newest:
                # Late: something in the subtree is newer, so record and recompute.
                if s > entry.assigned:
                    record_assign(parent.entries, key, s, value)
                    rebuild_at(parent, key, entry, self.now_ms)
                return
        elif entry is not None and s <= entry:
            return  # older than (or the same as) the assignment there
        # The newest event at the path: the value replaces whatever was there.
        if type(value) is dict:
            node = build(value, s)
            parent.entries[key] = node
            place(parent, key, node.value)
        else:
            parent.entries[key] = s
            place(parent, key, value)

    def _delete(self, parent: _Node, key: str, s: int) -> None:
        """``apply``'s last step for a DELETE."""
        self._untidy = True
        self._forget_way()
        entry = parent.entries.get(key)
        if type(entry) is _Node:
            if s <= entry.newest:
                # Late: something in the subtree is newer, so record and recompute.
                if s > entry.assigned:
                    entry.assigned = s
                    entry.assigned_value = MISSING
                    rebuild_at(parent, key, entry, self.now_ms)
                return
        elif entry is not None and s <= entry:
            return  # older than (or the same as) the assignment there
        # The newest event at the path: a tombstone replaces whatever was there.
        parent.entries[key] = s
        if type(parent.value) is dict:
            parent.value.pop(key, None)

    def _increment(
        self, parent: _Node, key: str, s: int, amount: int | float, path: Any = ()
    ) -> None:
        """``apply``'s last step for an INCREMENT (``path`` the whole path, for a ttl)."""
        self._untidy = True
        entry = parent.entries.get(key)
        if type(entry) is _Node and type(entry.value) is dict:
            self._forget_way()  # (a way may go through it: a counter's keeps them, see _way)
        if type(entry) is _Node and entry.ttls is not None:
            self._record_and_rebuild(parent, key, (), s, INCREMENT, amount, 0, path)
            return
        if entry is None:
            node = _Node()
            node.incs = {s: amount}
            node.incremented = node.reset = node.newest = s
            node.value = amount
            parent.entries[key] = node
            place(parent, key, amount)
            return
        if type(entry) is not _Node:
            if s < entry:
                return  # the assignment there is newer
            entry = self._promote(parent, key, entry)
        incs = entry.incs
        if incs is not None and s in incs:
            return  # a repeat
        if s < entry.assigned:
            return  # overtaken by the assignment here
        if incs is None:
            entry.incs = incs = {}
        incs[s] = amount
        if s > entry.newest:
            # Newest event in the subtree: a number grows, anything else becomes the amount.
            entry.newest = entry.incremented = entry.reset = s
            current = entry.value
            if is_number(current):
                result = current + amount
            else:
                result = amount
                if entry.entries:
                    entry.entries = {}
            entry.value = result
            place(parent, key, result)
        else:
            self._increment_late(parent, key, entry, s, amount)

    def _increment_late(
        self, parent: _Node, key: str, node: _Node, s: int, amount: int | float
    ) -> None:
        """``_increment``'s case of an increment (recorded in ``node.incs``) older than
        something in the subtree (other members' increments interleave): for ints the sum
        does not depend on the order, so a number only grows; anything else is rebuilt."""
        if s > node.incremented:
            node.incremented = s
            if s > node.reset:
                node.reset = s
        current = node.value
        if type(current) is int and type(amount) is int and node.incremented > node.written_below:
            if s > node.written_below:
                node.value = current + amount
                place(parent, key, node.value)
        else:
            rebuild_at(parent, key, node, self.now_ms)
