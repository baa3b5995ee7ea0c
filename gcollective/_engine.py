"""The replication protocol without I/O: what to send each peer, and what to do with what came.

The engine never touches gevent, sockets or the clocks itself. Time comes in as arguments
(``now``: monotonic seconds; the wall clock through the injected ``wall_ns``, the same one the
``HybridClock`` reads), frames come in already decoded (``receive``), frames go out as bytes
queued on each ``Peer`` (``pending``, drained by the shell through ``data_to_send``), and what
the engine needs from the shell (wake a writer, end a connection, schedule a flush) goes
through a few hooks. So the same engine runs in a member (``_node.Collective``, the gevent
shell) and in the deterministic simulation (``tests/simulation.py``), which wires several of
them through a simulated network and clock.

What it decides, here and in its parts:

- the outbox of own operations: numbered, encoded once as OPS frames, logged and queued for
  every peer (``flush``), at most every ``COALESCE_SECONDS`` while writes keep coming (when,
  and how a batch is encoded: ``_outbox``);
- what arrives after a connection's HELLO (``connection_made``, then ``receive``): PROGRESS
  reports answered here (catch-up from the log, or a snapshot when the log no longer covers
  the gap; the peer's clock judged: ``_peerclock``), OPS and SNAPSHOT frames applied and
  staged by ``_receiving.Receiving``, the engine's base;
- snapshots: asked for by a joiner (one peer at a time, another after ``SNAPSHOT_PATIENCE``
  of silence), streamed by a holder frame by frame (``_snapshots``), owed until the peer
  reports complete (``_peerstate`` holds that life cycle's states and transitions);
- housekeeping (``housekeep``): peers silent for ``down_timeout`` declared down, gaps of past
  incarnations that no live peer can fill counted as lost, the log forgotten up to what
  every live peer applied, and the frontier below which no operation can still arrive (the
  store's sweeps then run to it, driven by the shell in slices); those decisions are
  ``_frontier``'s, ``Receiving``'s base.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterator

from ._clock import HybridClock, stamp_millis
from ._oplog import OpLog, Progress
from ._outbox import COALESCE_SECONDS, OUTBOX_ITEMS, encode_batch, next_wait, outbox_columns
from ._peerstate import STREAMING_STATES, Event, Inbound, Peer, Snapshot
from ._receiving import Receiving
from ._snapshots import StreamDue, snapshot_frames, without_gc
from ._store import Store
from ._wire import (
    KNOWS_MEMBERS,
    SNAPSHOT_REQUEST_FRAME,
    WANTS_SNAPSHOT,
    encode_hello,
    encode_progress,
    encode_snapshot_end,
)

__all__ = ["Engine", "Inbound", "Peer"]  # (the per-peer state is ``_peerstate``'s)

log = logging.getLogger("gcollective")

# A joiner asks another peer for a snapshot when the one it asked sent none of it for this
# long (or ten sync intervals if longer): silence, not the length of a big snapshot.
SNAPSHOT_PATIENCE = 5.0


def _ignore(*args: Any) -> None:
    pass


class Engine(Receiving):
    """The replication protocol of one member (see the module docstring)."""

    def __init__(
        self,
        node_id: int,
        store: Store,
        clock: HybridClock,
        *,
        wall_ns: Callable[[], int],
        advertise: tuple[str, int],
        log_bytes: int,
        max_frame: int,
        max_queue_bytes: int,
        sync_interval: float,
        down_timeout: float,
        clock_skew: float,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.clock = clock
        # Every operation this incarnation makes is stamped after this millisecond (its
        # HELLO says so: see ``Frontier._lacked_after``).
        self.born_ms = stamp_millis(clock.promise())
        self.wall_ns = wall_ns
        self.advertise = advertise
        self.max_frame = max_frame
        self.max_queue_bytes = max_queue_bytes
        self.sync_interval = sync_interval
        self.down_timeout = down_timeout
        self.clock_skew = clock_skew
        self.peers: dict[tuple[str, int], Any] = {}  # address -> Peer (the shell's links)
        self.seq = 0  # own operations numbered (and in the log) so far
        # Own operations applied but not yet encoded, numbered from ``seq + 1``: stamp, wire
        # path and value of each, in one flat list (one in-place add per operation, the
        # cheapest append there is), and (index, op, ttl_ms) of the few that are not plain
        # SETs. The lists are emptied in place: the shell's hot paths hold them.
        self.outbox: list[Any] = []
        self.out_special: list[tuple[int, int, int]] = []
        # The shell's ``incr`` marks its INCREMENTs without a ttl here instead, by their
        # position in ``outbox`` (three items per operation): an int it has at hand, where
        # an ``out_special`` entry cost a tuple and a division per hit (a twentieth of one).
        self.out_increments: list[int] = []
        self.flushed_at = float("-inf")  # when the outbox was last encoded and queued
        self.coalesce = COALESCE_SECONDS  # the wait after it (see flush_at)
        self.flush_due = float("inf")  # when the outbox should go out, if the shell said (flush_at)
        self.progress = Progress()
        self.log = OpLog(log_bytes)
        self.down_ids: set[int] = set()  # incarnations declared down: refused from then on
        self.past_ids: set[int] = set()  # incarnations replaced by a new one at their address
        # Origins whose gap no live peer can fill: since when (see ``skip_dead_gaps``).
        self.dead_gaps: dict[int, float] = {}
        self.skipped_gaps = 0
        self.frontier = 0  # no operation older than this can still reach this node
        # The highest frontier handed to the store's sweeps: metadata below it may be gone,
        # so no operation older than it may be applied any more (see ``_frontier``).
        self.forgotten_below = 0
        self.promised: dict[int, int] = {}  # (see Frontier._lacked_after)
        self.refused_by: dict[Peer, int | None] = {}  # (see Frontier.declared_down_by_peer)
        self.synced = False  # a peer's whole state was merged
        self.ready = False  # the shell's start() returned (or may): reports may say complete
        self.stopping = False  # the shell is stopping: ask nobody for anything any more
        self.snapshot_peer: Peer | None = None  # the peer asked for a snapshot
        self.snapshot_asked_at = 0.0
        self.received_frames = 0
        self.received_ops = 0
        self.snapshots_merged = 0  # whole states received from peers and merged
        self.applied_ops = 0
        self.sequence_clashes = 0  # see _sequence_clash
        # Watches: the shell's list (replaced, never changed in place; empty: nobody
        # watches) and how to tell them of a received operation or a merge.
        self.watches: list[Any] = []
        self.notify: Callable[[tuple[str, ...], int, int], None] = _ignore
        self.merge_watched: Callable[[list[Any]], None] = store.merge
        # Hooks into the shell: an expiry due at this wall-clock ms; the outbox got its first
        # operation; a peer's state was merged; a bug was caught (with its place); a warning
        # a stranger could repeat at will (category, message, args).
        self.due_by: Callable[[float], None] = _ignore
        self.schedule_flush: Callable[[], None] = _ignore
        self.flush_now: Callable[[], None] = _ignore  # (the outbox is full: flush it now)
        self.on_synced: Callable[[], None] = _ignore
        self.on_internal_error: Callable[[str], None] = _ignore
        self.notice: Callable[..., None] = _ignore
        # A MEMBERS frame came (the shell's member list learns from it).
        self.on_members: Callable[[Inbound, list[Any]], None] = _ignore
        # Durability (``_durable``): told of every frame applied, own or received, or None.
        self.on_applied: Callable[[bytes], None] | None = None
        # Streams whose end came, merged in order by ``merge_step``; the shell is told when
        # one is added (it calls ``merge_step`` until done, letting others run between
        # calls). By default it merges them at once.
        self.merges_due: deque[StreamDue] = deque()
        self.schedule_merge: Callable[[], None] = self.merge_all

    # -- own operations ----------------------------------------------------------------------

    def apply_local(
        self, stamp: int, op: int, path: tuple[str, ...], value: Any, wire: Any, ttl_ms: int = 0
    ) -> None:
        """Apply an own operation, put it in the outbox and tell the watches (``wire``: its
        path as it travels)."""
        if ttl_ms:
            self.store.apply(stamp, op, path, value, ttl_ms)
        else:
            self.store.apply(stamp, op, path, value)
        self.send_own(stamp, op, wire, value, ttl_ms)
        if self.watches:
            self.notify(path, op, self.node_id)

    def send_own(self, stamp: int, op: int, wire: Any, value: Any, ttl_ms: int = 0) -> None:
        """Put an own operation, applied already, in the outbox. The shell's ``set`` and
        ``incr`` do the same inline for their common cases."""
        outbox = self.outbox
        if op or ttl_ms:
            self.out_special.append((len(outbox) // 3, op, ttl_ms))
        outbox += (stamp, wire, value)
        if len(outbox) == 3:
            self.schedule_flush()
        elif len(outbox) >= OUTBOX_ITEMS:
            self.flush_now()

    def flush_at(self, now: float | None = None) -> float:
        """When (monotonic) the outbox, which just got its first operation (at ``now``, when
        given: how late the flush comes then tells how busy the process is), should go out:
        at once after a quiet while, else ``coalesce`` after the last batch."""
        due = self.flushed_at + self.coalesce
        if now is not None:
            self.flush_due = max(due, now)
        return due

    def flush(self, now: float) -> None:
        """Number the operations of the outbox, encode them as OPS frames (once), log them
        and queue them for every peer; the own entry of the progress moves with them.

        Cheap when the outbox is empty, so anything that needs the log, the queues or the
        own progress current calls it first. ``now`` (monotonic) starts the next coalescing
        wait (see ``flush_at``).
        """
        outbox = self.outbox
        if not outbox:
            return
        self.coalesce = next_wait(self.coalesce, now - self.flush_due)
        self.flush_due = float("inf")
        self.flushed_at = now
        stamps = outbox[0::3]
        columns = outbox_columns(stamps, outbox, self.out_special, self.out_increments)
        outbox.clear()
        numbered_from = self.seq + 1
        frames: list[tuple[int, int, bytes]] = []
        try:
            encode_batch(self.node_id, numbered_from, columns, self.max_frame, frames)
        except Exception:
            # A bug: these operations cannot go out as OPS. They stay unnumbered (no gap in
            # what peers expect next) and reach every peer in a snapshot, which holds them.
            self.on_internal_error("the flush of own operations")
            for peer in self.peers.values():
                self.resync(peer, now)
            return
        self.seq += len(stamps)
        node_id = self.node_id
        self.progress.applied[node_id] = self.seq
        self.progress.stamps[node_id] = stamps[-1]
        peers = self.peers.values()
        add_to_log = self.log.add
        for first, last, frame in frames:
            add_to_log(node_id, first, last, frame)
            for peer in peers:
                # Nothing is queued for a peer declared down (see _declare_down), nor for an
                # address that has never answered: up to ``max_queue_bytes`` held for a
                # member not started yet would reach it ahead of the snapshot it asks for
                # (twice the work, a bigger state built from operations). Catch-up from the
                # log (or a snapshot) brings it what it lacks once it reports.
                if not peer.down and (peer.connected or peer.peer_id is not None):
                    peer.enqueue(frame, last - first + 1)
            if self.on_applied is not None:
                self.on_applied(frame)

    # -- what goes out -----------------------------------------------------------------------

    def progress_frame(self, now: float) -> bytes:
        """A PROGRESS frame: what this node applied, whether it holds a whole state, its
        clock's promise and its frontier."""
        self.flush(now)  # the own entry of the progress moves when the outbox is flushed
        complete = self.ready and (self.synced or self.snapshot_peer is None)
        return encode_progress(
            self.progress.vector(), complete, self.clock.promise(), self.frontier
        )

    def snapshot_stream(
        self, now: float, frames_of: Callable[[list[str], bytes], Iterator[bytes]] | None = None
    ) -> tuple[Iterator[bytes], dict[int, int]]:
        """A snapshot of the whole state: an iterator of SNAPSHOT frames ending with
        SNAPSHOT_END, and the version vector it holds at least.

        The vector is taken now; the top-level keys are exported one by one as the frames are
        built, later (a long one in pieces, each read when its frame is built: see
        ``Store.export_pieces``). The store only ever learns more, so each slice holds
        everything the vector says and maybe more (which the peer then receives twice,
        harmlessly). ``frames_of(keys, end)`` makes the frames (``_snapshot_frames`` by
        default; a ``data_dir``'s checkpoint writes the root's plain leaves its own way).
        """
        self.flush(now)
        end = encode_snapshot_end(self.progress.vector())
        keys = self.store.top_level_keys()
        frames = (frames_of or self._snapshot_frames)(keys, end)
        return frames, dict(self.progress.applied)

    def _snapshot_frames(self, keys: list[str], end: bytes) -> Iterator[bytes]:
        """The default ``frames_of`` of ``snapshot_stream`` (see ``_snapshots``)."""
        return snapshot_frames(self.store, self.max_frame, keys, end)

    def resync(self, peer: Peer, now: float) -> None:
        """Replace what is pending for ``peer`` by a full snapshot (which holds all of it, and
        more). Its frames are built one at a time as the writer sends them (see
        ``snapshot_stream``); their bytes do not count against ``max_queue_bytes``."""
        if self.refused_as_down:
            return  # (see Frontier.declared_down_by_peer)
        stream, vector = self.snapshot_stream(now)
        log.info("peer %s: sending a snapshot", peer.name)
        peer.start_snapshot(stream, vector)

    def data_to_send(self, peer: Peer, now: float) -> tuple[list[bytes], int]:
        """What to send the peer now, taken off its queue (empty: nothing), and how many
        operations (own or relayed) it carries: what is pending, PROGRESS if due, else the
        next frame of a snapshot stream."""
        self.flush(now)  # normally done already, by the shell's scheduled flush
        if peer.progress_due:
            peer.progress_due = False
            peer.pending.append(self.progress_frame(now))
        if not peer.pending and peer.snapshot_stream is not None and not self.refused_as_down:
            # Building a frame exports and encodes top-level items (a full node's export,
            # its leaves as columns): a holder of 500k small dicts spent about two thirds of
            # its snapshot's time in the GC.
            frame = without_gc(peer.next_snapshot_frame)
            if frame is not None:
                peer.pending.append(frame)
        batch = peer.pending
        if not batch:
            return batch, 0
        ops = peer.pending_ops
        peer.pending = []
        peer.pending_bytes = peer.pending_ops = 0
        return batch, ops

    # -- our connection to a peer ------------------------------------------------------------

    def link_up(self, peer: Peer, now: float) -> bytes:
        """Our connection to ``peer`` is up (secured): its first bytes, HELLO (asking for a
        snapshot if this node still needs one and asked nobody) and PROGRESS."""
        flags = KNOWS_MEMBERS
        if not self.synced and self.snapshot_peer is None:
            flags |= WANTS_SNAPSHOT
            self.snapshot_peer = peer
            self.snapshot_asked_at = now
            log.info("peer %s: asking it for a snapshot", peer.name)
        address = self.advertise
        hello = encode_hello(self.node_id, address[0], address[1], flags, self.born_ms)
        peer.connects += 1
        peer.connected = True
        if peer.snapshot is Snapshot.OWED:
            self.resync(peer, now)  # the last one was lost with its connection
        progress = self.progress_frame(now)  # (flushes: what it queues goes on this one)
        if not peer.down:  # (nothing is queued for a peer declared down)
            peer.link_up(self.seq)
        return hello + progress

    def link_failed(self, peer: Peer, now: float) -> None:
        """An attempt to reach ``peer``, or our connection to it, failed: a snapshot asked of
        it is asked of another."""
        peer.connected = False
        if self.snapshot_peer is peer:
            self.snapshot_peer = None
            self.request_snapshot(now)

    def stream_lost(self, peer: Peer) -> None:
        """Our connection to ``peer`` ended: frames of a stream went down with it (a new
        connection starts it over, while it is owed)."""
        if peer.snapshot in STREAMING_STATES:
            peer._move(Event.CONNECTION_LOST)

    def add_peer(self, peer: Peer) -> None:
        self.peers[peer.address] = peer

    def forget_peer(self, peer: Peer, now: float) -> None:
        """Stop replicating to ``peer`` (its address was forgotten); re-ask a snapshot."""
        if self.peers.get(peer.address) is peer:
            del self.peers[peer.address]
        if self.snapshot_peer is peer:
            self.snapshot_peer = None
            self.request_snapshot(now)

    def request_snapshot(self, now: float, avoid: Peer | None = None) -> None:
        """Ask a connected peer for its state (another than ``avoid`` if there is one), after
        the one asked first went away or did not answer in time."""
        if self.synced or self.stopping:
            return
        connected = [peer for peer in self.peers.values() if peer.connected]
        others = [peer for peer in connected if peer is not avoid]
        for peer in others or connected:
            self.snapshot_peer = peer
            self.snapshot_asked_at = now
            log.info("peer %s: asking it for a snapshot", peer.name)
            peer.enqueue(SNAPSHOT_REQUEST_FRAME)
            return

    # -- catch-up: the answer to a peer's report ---------------------------------------------

    def catch_up(
        self,
        peer: Peer,
        theirs: dict[int, int],
        previous: dict[int, int] | None,
        bound: dict[int, int],
        now: float,
    ) -> dict[int, int]:
        """Send a peer what it lacks of what we had by ``bound``; return the next bound.

        After the first report on a connection, only origins on which the peer made no
        progress since its previous report are resent: a peer that is merely behind (busy
        applying a burst) gets nothing twice; one whose link from an origin is broken, or
        whose origin died, gets what it lacks. And never what our connection to it carries
        already (see ``Peer.carried``).
        """
        if self.refused_as_down:
            return dict(self.progress.applied)  # (see Frontier.declared_down_by_peer)
        if peer.snapshot_owed or peer.snapshot_stream is not None:
            # It is still merging the snapshot we sent, or getting it: a report settles a
            # snapshot (a synced peer always reports complete) but must not start it over.
            return dict(self.progress.applied)
        self.flush(now)  # own operations up to ``bound`` must be in the log
        if previous is not None:
            bound = {o: b for o, b in bound.items() if theirs.get(o, 0) <= previous.get(o, 0)}
        sent = peer.carried(theirs, self.node_id, self.seq)
        frames = self.log.missing(sent, bound, exclude=peer.peer_id or 0)
        if frames is not None and sum(map(len, frames)) > self.max_queue_bytes // 2:
            frames = None  # too much to queue: the snapshot bypasses the queue limit
        if frames is None:
            log.info("peer %s missed too much to resend: sending a snapshot", peer.name)
            self.resync(peer, now)
        elif frames:
            log.debug("peer %s: resending %d operations it missed", peer.name, len(frames))
            peer.relayed_frames += len(frames)
            # Own frames are logged with their newline, received ones without.
            peer.enqueue(b"".join(f if f[-1:] == b"\n" else f + b"\n" for f in frames))
            for origin, upto in bound.items():
                peer.mark_queued(origin, upto)
        return dict(self.progress.applied)

    # -- housekeeping ------------------------------------------------------------------------

    def housekeep(self, now: float) -> int:
        """One round of housekeeping (every ``sync_interval``): ask another peer for a
        snapshot if the one asked stays silent, declare silent peers down, count as lost the
        gaps no live peer can fill, forget what every live peer has, and move the frontier.
        Returns the stamp below which no operation can
        reach any member: the store's sweeps may forget metadata older than it."""
        asked = self.snapshot_peer
        patience = max(SNAPSHOT_PATIENCE, 10 * self.sync_interval)
        if (
            asked is not None
            and not self.synced
            and not self.merges_due  # (a stream is merging: it answered)
            and now - self.snapshot_asked_at > patience
        ):
            # No answer yet, or no frame of it for a while (a connection that died
            # unnoticed, a peer that is stuck): ask again, preferably someone else. (Not
            # while frames come: a second holder would export and send all of it again, and
            # the two streams share the CPU, the joiner merging both.)
            self.snapshot_peer = None
            self.request_snapshot(now, avoid=asked)
        for peer in self.peers.values():
            if not peer.down and now - peer.last_heard > self.down_timeout:
                self._declare_down(peer)
        if self.refused_by:
            self.passing_state_again()
        self.skip_dead_gaps(now)
        self.forget_logged()
        self.frontier = self.own_frontier()
        swept = self.gc_frontier()
        self.note_swept(swept)
        return swept
