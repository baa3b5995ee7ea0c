"""A peer's connection to this member, as the engine takes it in: its HELLO
(``connection_made``), then its frames, decoded (``receive``): PROGRESS reports (answered by
``Engine.catch_up``; the peer's clock judged by them), OPS applied (repeats skipped, sequence
clashes detected), SNAPSHOT frames checked and staged until their stream's SNAPSHOT_END,
which queues them all for ``merge_step`` (the shell calls it in slices); every stamp checked
against ``clock_skew`` first (``check_clock``).

``Receiving`` is ``Engine``'s base, and ``Frontier`` its own: whatever is received is also
checked against what this member may have forgotten. Sans-IO, like the engine.
"""

from __future__ import annotations

import logging
from collections import deque
from itertools import repeat
from typing import Any, Callable, Sequence

from ._clock import HybridClock, stamp_lead
from ._columns import full_paths
from ._errors import ProtocolError
from ._frontier import Frontier
from ._peerclock import judge_clock_behind, skew_refusal
from ._peerstate import RETURNING_NEW, RETURNING_UNKNOWN, Event, Inbound, Peer
from ._snapshots import StreamDue
from ._store import Store
from ._wire import (
    MEMBERS,
    OPS,
    PROGRESS,
    SNAPSHOT,
    SNAPSHOT_END,
    SNAPSHOT_REQUEST,
    WANTS_SNAPSHOT,
    Hello,
    parse_progress,
    parse_vector,
)
from ._wire_ops import parse_ops, path_segments
from ._wire_snapshot import parse_snapshot_items

__all__ = ["Receiving"]

log = logging.getLogger("gcollective")


class Receiving(Frontier):
    """The part of ``Engine`` that takes in peers' connections (see the module docstring);
    ``Engine`` sets the state it reads, and the hooks it calls."""

    store: Store
    clock: HybridClock
    received_frames: int
    received_ops: int
    applied_ops: int
    sequence_clashes: int
    snapshots_merged: int
    synced: bool
    snapshot_peer: Peer | None
    snapshot_asked_at: float
    watches: list[Any]
    notify: Callable[[tuple[str, ...], int, int], None]
    merge_watched: Callable[[list[Any]], None]
    due_by: Callable[[float], None]
    notice: Callable[..., None]
    on_synced: Callable[[], None]
    on_applied: Callable[[bytes], None] | None
    on_members: Callable[[Inbound, list[Any]], None]
    merges_due: deque[StreamDue]
    schedule_merge: Callable[[], None]
    # (``Engine``'s, what goes out: the answer to a report, and a snapshot for a peer)
    catch_up: Callable[
        [Peer, dict[int, int], dict[int, int] | None, dict[int, int], float], dict[int, int]
    ]
    resync: Callable[[Peer, float], None]

    def check_clock(
        self, stamp: int, what: str, peer: Peer | None, peer_id: int, origin: int = 0
    ) -> None:
        """Refuse a frame with a stamp more than ``clock_skew`` ahead of our wall clock
        (``what`` names the frame, ``origin`` the maker of the operations it relays; see
        ``_peerclock.skew_refusal`` for why)."""
        lead = stamp_lead(stamp, self.wall_ns())
        if lead > self.clock_skew:
            raise skew_refusal(lead, self.clock_skew, what, peer, peer_id, origin)

    # -- a connection from a peer ------------------------------------------------------------

    def connection_made(self, peer: Peer | None, hello: Hello, now: float) -> Inbound:
        """A peer's connection to us sent ``hello`` (checked by the shell): note who it is
        and report our progress at once, so its catch-up starts."""
        returning = None
        if peer is not None:
            if peer.down:  # (checked on its first report: see Frontier.check_returning)
                returning = RETURNING_UNKNOWN if peer.peer_id is None else RETURNING_NEW
            if peer.peer_id is not None and peer.peer_id != hello.node_id:
                # Our connection may still go to the old incarnation, whose kernel would take
                # bytes it will never read: start a new one.
                log.info("peer %s restarted (new incarnation %x)", peer.name, hello.node_id)
                self.past_ids.add(peer.peer_id)
                peer._move(Event.RESTARTED)
                peer.drop_connection()
                peer.clock_lag = None  # (its clock is judged anew: see judge_clock_behind)
            peer.peer_id = hello.node_id
            self.note_born(hello.node_id, hello.born_ms)
            peer.reports = 0
            peer.down = False
            peer.last_heard = now
            peer.redial_now()
            # A new connection means the peer may have missed what was in flight on its
            # last one: report our progress now, not at the next tick.
            peer.progress_due = True
            peer.data_ready()
            if hello.flags & WANTS_SNAPSHOT:
                self.resync(peer, now)
        return Inbound(
            peer, hello.node_id, dict(self.progress.applied), stages=True, returning=returning
        )

    def receive(
        self, inbound: Inbound, messages: list[Any], frames: list[bytes], now: float
    ) -> None:
        """Apply a batch of decoded frames (``frames``: their bytes) from one connection."""
        self.received_frames += len(messages)
        peer = inbound.peer
        peer_id = inbound.peer_id
        for message, frame in zip(messages, frames):
            if type(message) is not list or not message:
                raise ProtocolError("frame is not a non-empty JSON array")
            kind = message[0]
            if kind == OPS:
                self.apply_ops(message, frame, peer, peer_id)
            elif kind == PROGRESS:
                self._receive_progress(message, inbound, now)
            elif kind == SNAPSHOT:
                if self._receive_snapshot(message, frame, inbound, now):
                    continue  # (staged: a data_dir stores it once its stream ended)
            elif kind == SNAPSHOT_END:
                if self._receive_snapshot_end(message, frame, inbound):
                    continue  # (a data_dir stores it once its stream is merged)
            elif kind == SNAPSHOT_REQUEST:
                # (Each stream made lists every top-level key: a request repeated before its
                # first frame went out, a 4-byte frame, would cost that again and again.)
                if peer is not None and not peer.stream_unsent:
                    self.resync(peer, now)
            elif kind == MEMBERS:
                self.on_members(inbound, message)
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
            if self.on_applied is not None:
                self.on_applied(frame)

    def _receive_progress(self, message: list[Any], inbound: Inbound, now: float) -> None:
        vector, complete, promise, frontier = parse_progress(message)
        peer, peer_id = inbound.peer, inbound.peer_id
        self.check_clock(promise, "a PROGRESS frame (its clock)", peer, peer_id)
        if peer is None or peer.peer_id != peer_id:
            return
        if peer.reports == 0 or peer.clock_lag is not None:
            lag = -stamp_lead(promise, self.wall_ns())
            judge_clock_behind(peer, lag, now, self.sync_interval, self.clock_skew)
        theirs = {origin: seq for origin, seq, _ in vector}
        their_stamps = {origin: stamp for origin, _, stamp in vector}
        if inbound.returning is not None:
            self.check_returning(inbound, theirs, their_stamps)
            inbound.returning = None
        # The previous report on this same connection, to see what stalled.
        previous = peer.peer_vector if peer.reports > 0 else None
        peer.reports += 1
        peer.peer_vector = theirs
        peer.peer_stamps = their_stamps
        peer.peer_promise = promise
        peer.peer_own_seq = theirs.get(peer_id, 0)
        peer.peer_frontier = frontier
        peer.last_heard = peer.last_report = now
        if complete:
            # A joiner reports complete once it merged a snapshot, ours or another member's:
            # ours is no longer owed, and the catch-up below sends whatever it still lacks
            # (or a snapshot, if the log cannot).
            peer._move(Event.COMPLETE)
            inbound.sent_bound = self.catch_up(peer, theirs, previous, inbound.sent_bound, now)

    # -- received operations -----------------------------------------------------------------

    def apply_ops(
        self, message: list[Any], frame: bytes, peer: Peer | None = None, peer_id: int = 0
    ) -> None:
        """Apply a received OPS frame (checked whole first), skipping repeats, and log it
        (``peer`` and ``peer_id``: the connection's, for a refusal's log line)."""
        origin, first, stamps, ops, paths, values, ttls, parent = parse_ops(message)
        # (Each read once: an ``OpStamps``' length and ends are Python calls.)
        size = len(stamps)
        newest = stamps[-1]
        self.check_clock(newest, "an OPS frame", peer, peer_id, origin)
        last = first + size - 1
        progress = self.progress
        done = progress.applied.get(origin, 0)
        self.received_ops += size
        if first <= done and self._sequence_clash(origin, first, last, done, stamps):
            # Two senders numbered different operations alike for one origin (a forger, or
            # two processes with one id): apply the repeats too, rather than drop one
            # sender's writes for good (the store skips any it holds already, by stamp).
            paths = full_paths(parent, paths)
            parent = ""  # the paths are full now
            repeats = zip(stamps, ops, paths, values, ttls or repeat(0))
            for _, (stamp, op, path, value, ttl_ms) in zip(range(first, done + 1), repeats):
                self._apply_received(stamp, op, path, value, ttl_ms, origin)
            self.clock.observe(newest)
            self.due_by(self.store.next_expiry)
        if last <= done:
            return  # all repeats (relayed, or also in a snapshot)
        oldest_new = stamps[0] if first > done else stamps[done + 1 - first]
        if oldest_new < self.forgotten_below:  # (see Frontier.check_not_forgotten)
            self.check_not_forgotten(oldest_new, peer, peer_id)
        in_order = first == done + 1 and not progress.has_gap(origin)
        if in_order and not self.watches:
            # The normal case: the next operations of this origin, in order, nothing watched.
            self.store.apply_batch(stamps, ops, paths, values, parent, ttls)
            progress.applied[origin] = last
            progress.stamps[origin] = newest
            self.applied_ops += size
        else:
            self._apply_one_by_one(
                origin, first, in_order, stamps, ops, full_paths(parent, paths), values, ttls
            )
        if ttls is not None and any(ttls):
            # Wake the expirer for the soonest expiry the store now holds (its own, computed
            # once, instead of each operation's in Python).
            self.due_by(self.store.next_expiry)
        self.clock.observe(newest)
        self.log.add(origin, first, last, frame)  # without its newline: no copy

    def _apply_one_by_one(
        self,
        origin: int,
        first: int,
        in_order: bool,
        stamps: Sequence[int],
        ops: list[int],
        paths: list[Any],
        values: list[Any],
        ttls: list[int] | None,
    ) -> None:
        """``apply_ops``' way for operations that are not simply the next of their origin
        (some out of order, a gap before them) or that are watched: each on its own, those
        ``Progress`` accepts, or all of them when they are the next (``in_order``: watches
        see each)."""
        progress = self.progress
        last = first + len(stamps) - 1
        if ttls is None:
            ttls = [0] * len(stamps)
        apply_one = self._apply_received
        if in_order:
            for stamp, op, path, value, ttl_ms in zip(stamps, ops, paths, values, ttls):
                apply_one(stamp, op, path, value, ttl_ms, origin)
            progress.applied[origin] = last
            progress.stamps[origin] = stamps[-1]
            self.applied_ops += len(stamps)
            return
        accept = progress.accept
        applied = 0
        for seq, stamp, op, path, value, ttl_ms in zip(
            range(first, last + 1), stamps, ops, paths, values, ttls
        ):
            if accept(origin, seq, stamp):
                apply_one(stamp, op, path, value, ttl_ms, origin)
                applied += 1
        self.applied_ops += applied

    def _sequence_clash(
        self, origin: int, first: int, last: int, done: int, stamps: Sequence[int]
    ) -> bool:
        """True, counted and logged, if operations ``first..last`` of ``origin`` (some of them
        applied already: ``first <= done``) cannot be the ones applied under those numbers:
        an origin's stamps grow with its numbers, and ``done``'s stamp is known."""
        known = self.progress.stamps.get(origin)
        if known is None:
            return False
        if last < done:
            clash = stamps[-1] >= known
        else:
            clash = stamps[done - first] != known
        if clash:
            self.sequence_clashes += 1
            self.notice(
                "sequence-clash",
                "operations %d..%d of origin %x differ from those applied under the same "
                "numbers: two senders claim that origin (a member forging another's "
                "operations, or two processes with one id); applying both",
                first,
                last,
                origin,
            )
        return clash

    def _apply_received(
        self, stamp: int, op: int, path: str | list[str], value: Any, ttl_ms: int, origin: int
    ) -> None:
        """Apply one received operation (see ``apply_ops``) and tell the watches."""
        segments = path_segments(path)
        if ttl_ms:
            self.store.apply(stamp, op, segments, value, ttl_ms)
        else:
            self.store.apply(stamp, op, segments, value)
        if self.watches:
            self.notify(tuple(segments), op, origin)

    # -- received snapshot streams -----------------------------------------------------------

    def _receive_snapshot(
        self, message: list[Any], frame: bytes, inbound: Inbound, now: float
    ) -> bool:
        """Check a SNAPSHOT frame and stage its items until the stream's SNAPSHOT_END (see
        ``Inbound``), or merge them at once where nothing is staged; True if staged."""
        if len(message) != 2:
            raise ProtocolError("SNAPSHOT frame has the wrong length")
        peer = inbound.peer
        items, newest = parse_snapshot_items(message[1])
        self.check_clock(newest, "a SNAPSHOT frame", peer, inbound.peer_id)
        if peer is not None and peer is self.snapshot_peer:
            self.snapshot_asked_at = now  # it answers: be patient
        if newest:
            self.clock.observe(newest)  # our next stamps order after all of it
        staged = inbound.staged
        if staged is None:
            self._merge_snapshot_items(items)
            return False
        staged.append(items)
        if self.on_applied is not None:
            inbound.staged_frames.append(frame)
        return True

    def _merge_snapshot_items(self, items: list[Any]) -> None:
        if self.watches:
            self.merge_watched(items)
        else:
            self.store.merge(items)
        self.due_by(self.store.next_expiry)

    def _receive_snapshot_end(self, message: list[Any], frame: bytes, inbound: Inbound) -> bool:
        """The stream is whole: queue what it staged for ``merge_step`` (the connection may
        close meanwhile; the stream is merged all the same), or merge its vector at once where
        nothing is staged. True if queued."""
        if len(message) != 2:
            raise ProtocolError("SNAPSHOT_END frame has the wrong length")
        vector = parse_vector(message[1])
        # (Its stamps become this node's version vector's: one far ahead would skip the
        # origin's operations below it as repeats.)
        newest = max([stamp for _, _, stamp in vector], default=0)
        self.check_clock(newest, "a SNAPSHOT_END frame", inbound.peer, inbound.peer_id)
        self.check_snapshot(vector, inbound)
        staged = inbound.staged
        if staged is None:
            self._merged_a_stream(vector)
            return False
        frames = inbound.staged_frames
        if self.on_applied is not None:
            frames.append(frame)
        self.merges_due.append(StreamDue(staged, frames, vector))
        inbound.staged = deque()
        inbound.staged_frames = []
        self.schedule_merge()
        return True

    def merge_step(self) -> bool:
        """Merge one staged frame's items of the oldest stream due, or, once none is left,
        store its frames (with a data_dir) and merge its vector, which the merged items hold
        at least; True once no stream is due. Operations applied between steps are fine: a
        merge is a commutative fold."""
        due = self.merges_due
        if not due:
            return True
        stream = due[0]
        if stream.items:
            self._merge_snapshot_items(stream.items.popleft())  # (freed once merged)
            return False
        due.popleft()
        if self.on_applied is not None:
            for frame in stream.frames:
                self.on_applied(frame)
        self._merged_a_stream(stream.vector)
        return not due

    def merge_all(self) -> None:
        """Merge every stream due at once (the default ``schedule_merge``)."""
        while not self.merge_step():
            pass

    def _merged_a_stream(self, vector: list[tuple[int, int, int]]) -> None:
        self.progress.merge(vector)
        self.snapshots_merged += 1
        if not self.synced:
            log.info("merged a peer's state")
            self.synced = True
            self.on_synced()
