"""The member's background greenlets: housekeeping, expiring keys, and merging a peer's state.

Each runs the store's or the engine's work in bounded steps and lets the hub run between
them (``_server._in_slices``): ``_housekeeping`` every ``sync_interval`` (the engine's round,
gossip, then the store's sweeps to the frontier), ``_expiring`` at the next expiry (a
sooner one wakes it: ``_due_by``), and ``_merging`` whenever a snapshot stream's end queued
its merge (``Engine.merge_step``). A bug in a step is logged as an internal error and the
greenlet carries on.
"""

from __future__ import annotations

import time
from collections import deque
from math import inf
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from ._clock import HybridClock, millis_stamp, stamp_origin
from ._engine import Engine
from ._heap import HeapTrimmer
from ._logcontext import context_of, lend_context, tag_current
from ._server import _STEP, _in_slices, _let_others_run
from ._store import DELETE, SET, Store
from ._watches import _MISSING, Watch

__all__ = ["_Background"]


class _Background:
    """The background greenlets' work, a part of ``Collective``."""

    _stopping: bool
    sync_interval: float
    _engine: Engine
    _store: Store
    _clock: HybridClock
    _watches: list[Watch]
    # Expiring keys: the next expiry's wall-clock ms (inf: none), and the expirer's wake-up.
    _next_due: float
    # ``_next_due`` as a float, always (set with it: ``_set_next_due``): what ``get`` compares
    # with the float wall clock, float to float (an int's compare with a float takes the
    # interpreter's generic way, ~100 instructions more, twice a read of a session).
    _next_due_float: float
    _expiry_wake: Event
    _merger: gevent.Greenlet[Any, Any] | None
    _merge_contexts: deque[Any]  # the log context of each stream due
    _heap_trimmer: HeapTrimmer  # gives the C heap's free pages back after big sweeps

    if TYPE_CHECKING:  # (the rest of ``Collective``, which this is a part of)

        def __getattr__(self, name: str) -> Any: ...

    def _schedule_merge(self) -> None:
        """A snapshot stream ended (in a reader's event-loop callback, which cannot yield):
        merge it from a greenlet, a frame's items at a time, letting others run between
        slices, rather than hold the hub for the whole state."""
        # (The reader's log context names the stream's peer: its merge's lines say it too.)
        self._merge_contexts.append(context_of(gevent.getcurrent()))
        if self._merger is None or self._merger.dead:
            self._merger = gevent.spawn(self._merging)

    def _merging(self) -> None:
        """Merge the streams due (see ``Engine.merge_step``), in slices."""
        tag_current(self)  # (see _logcontext)
        merger, own = gevent.getcurrent(), context_of(gevent.getcurrent())
        contexts, due = self._merge_contexts, self._engine.merges_due

        def step() -> bool:
            lend_context(merger, (contexts[0] if contexts else None) or own)
            done = self._engine.merge_step()
            while len(contexts) > len(due):
                contexts.popleft()  # (that stream is merged)
            return done

        try:
            _in_slices(step)
        except Exception:
            self._internal_error("merging a peer's state")
        finally:
            lend_context(merger, own)

    def _housekeeping(self) -> None:
        """Every ``sync_interval``: declare silent peers down, then let the store forget
        what no operation can reach any more, a slice at a time."""
        tag_current(self)  # (see _logcontext)
        while not self._stopping:
            gevent.sleep(self.sync_interval)
            try:
                self._housekeep()
            except Exception:
                self._internal_error("the housekeeping sweep")  # and again next interval

    def _housekeep(self) -> None:
        """One round of ``_housekeeping``: the engine's, then the store's sweeps in slices."""
        frontier = self._engine.housekeep(time.monotonic())
        self._gossip_round()
        # Expiries every member has passed become real deletes; collect then forgets them.
        self._advance()
        store = self._store

        def expire_step() -> bool:
            store.expire(frontier, _STEP)
            return not store.expirable(frontier)

        steps_left = iter(range(50_000 // _STEP))  # a big tree is swept over several rounds

        def collect_step() -> bool:
            return store.collect(frontier, _STEP) or next(steps_left, None) is None

        _in_slices(expire_step)
        _in_slices(collect_step)
        # What the sweeps freed left holes in the C heap that RSS keeps (see ``_heap``).
        self._heap_trimmer.after_sweep(store.expired + store.collected)

    def _due_by(self, due_ms: float) -> None:
        """An expiry is due at ``due_ms``: wake the expirer if that is sooner than it knew."""
        if due_ms < self._next_due:
            self._set_next_due(due_ms)
            self._expiry_wake.set()

    def _set_next_due(self, due_ms: float) -> None:
        """Record the next expiry's wall-clock ms (``inf``: none), and its float mirror."""
        self._next_due = due_ms
        self._next_due_float = float(due_ms)

    def _advance_if_due(self) -> None:
        """Let expiries due by now fire before the caller reads (one float compare when none
        is due)."""
        due = self._next_due_float
        if due < inf and due <= time.time() * 1000:
            self._advance()

    def _advance(self) -> None:
        """Let the store's expiries due by now fire, and tell the watches."""
        store = self._store
        now_ms = int(time.time() * 1000)
        fired = store.advance(now_ms, _STEP)
        self._set_next_due(store.next_expiry)  # still due if the slice did not finish
        if fired:
            # Whatever this node does after seeing a key expire must order after the expiry
            # (derived stamps sit at counter 0 of their millisecond), or it would expire too.
            self._clock.observe(millis_stamp(now_ms))
        if fired and self._watches:
            get = store.get
            for path, stamp in fired:
                op = DELETE if get(path, _MISSING) is _MISSING else SET
                self._notify(path, op, stamp_origin(stamp))

    def _expiring(self) -> None:
        """Sleep until the next expiry (or until a sooner one is registered), then fire it."""
        wake = self._expiry_wake
        while not self._stopping:
            wake.clear()
            due = self._next_due
            if due == inf:
                wake.wait()
            else:
                delay = (due - time.time() * 1000) / 1000
                if delay > 0:
                    wake.wait(delay)
                else:
                    _let_others_run()  # between slices of a burst
            try:
                self._advance()
            except Exception:
                self._internal_error("the expirer")
                gevent.sleep(self.sync_interval)  # a bug: do not retry in a tight loop
