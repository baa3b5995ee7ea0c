"""The replication protocol without I/O: what to send each peer, and what to do with what came.

The engine never touches gevent, sockets or the clocks itself. Time comes in as arguments
(``now``: monotonic seconds; the wall clock through the injected ``wall_ns``, the same one the
``HybridClock`` reads), frames come in already decoded (``receive``), frames go out as bytes
queued on each ``Peer`` (``pending``, drained by the shell through ``data_to_send``), and what
the engine needs from the shell (wake a writer, end a connection, schedule a flush) goes
through a few hooks. So the same engine runs in a member (``_node.Collective``, the gevent
shell) and in the deterministic simulation (``tests/simulation.py``), which wires several of
them through a simulated network and clock.

What it decides:

- the outbox of own operations: numbered, encoded once as OPS frames, logged and queued for
  every peer (``flush``), at most every ``COALESCE_SECONDS`` while writes keep coming;
- what arrives after a connection's HELLO (``connection_made``, then ``receive``): OPS applied
  (repeats skipped, sequence clashes detected), PROGRESS reports (catch-up from the log, or a
  snapshot when the log no longer covers the gap), SNAPSHOT frames checked and staged until
  their stream's SNAPSHOT_END, which queues them all for ``merge_step`` (the shell calls it
  in slices); every stamp checked against ``clock_skew`` first;
- snapshots: asked for by a joiner (one peer at a time, another after ``SNAPSHOT_PATIENCE``
  of silence), streamed by a holder frame by frame, owed until the peer reports complete
  (``_peerstate`` holds that life cycle's states and transitions);
- housekeeping (``housekeep``): peers silent for ``down_timeout`` declared down, gaps of past
  incarnations that no live peer can fill counted as lost, the log forgotten up to what
  every live peer applied, and the frontier below which no operation can still arrive (the
  store's sweeps then run to it, driven by the shell in slices); those decisions are
  ``_frontier``'s, the engine's base class.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from itertools import repeat
from operator import rshift
from typing import Any, Callable, Iterator, NamedTuple, Sequence, TypeVar

from ._auth import encode_refusal
from ._clock import NODE_BITS, HybridClock, stamp_lead
from ._columns import full_paths
from ._errors import ProtocolError
from ._frontier import Frontier
from ._oplog import OpLog, Progress
from ._peerstate import (
    RETURNING_NEW,
    RETURNING_UNKNOWN,
    STREAMING_STATES,
    Event,
    Inbound,
    Peer,
    Snapshot,
)
from ._store import INCREMENT, SET, Store
from ._wire import (
    KNOWS_MEMBERS,
    MEMBERS,
    OPS,
    PROGRESS,
    SNAPSHOT,
    SNAPSHOT_END,
    SNAPSHOT_REQUEST,
    SNAPSHOT_REQUEST_FRAME,
    WANTS_SNAPSHOT,
    Hello,
    encode_hello,
    encode_ops,
    encode_progress,
    encode_snapshot_end,
    parse_progress,
    parse_vector,
)
from ._wire_ops import parse_ops, path_segments
from ._wire_snapshot import (
    LEAF_BYTES_GUESS,
    PIECE_FILL,
    encode_snapshot_parts,
    join_snapshot,
    learn_piece_size,
    parse_snapshot_items,
)

__all__ = ["Engine", "Inbound", "Peer"]  # (the per-peer state is ``_peerstate``'s)

log = logging.getLogger("gcollective")

# A snapshot goes out in SNAPSHOT frames of about this size, each built when the previous one
# was sent: the holder exports, the wire carries and the joiner checks at the same time (it
# merges a stream at its end: see ``Inbound``).
SNAPSHOT_FRAME_BYTES = 1 << 20
# A joiner asks another peer for a snapshot when the one it asked sent none of it for this
# long (or ten sync intervals if longer): silence, not the length of a big snapshot.
SNAPSHOT_PATIENCE = 5.0
# A greenlet that sets without yielding gets its operations sent in batches of this many.
OUTBOX_LIMIT = 1024
OUTBOX_ITEMS = 3 * OUTBOX_LIMIT  # (the outbox holds three items per operation)
# After a batch went out, the next one waits until this much time has passed, so a steady
# stream of sets goes out in a few frames per millisecond rather than one frame per set (each
# frame costs a wake-up and a syscall per peer, and a decode on each peer). An idle node sends
# at once. A process too busy to flush when due (its event loop late by more than
# COALESCE_BUSY_SECONDS) waits twice as long after the next batch, up to that: a web worker
# short of CPU has its requests share frames (each frame wakes every peer, which decodes and
# applies it), and its operations wait no longer than the loop holds them up anyway. One on
# time (late by COALESCE_SECONDS at most) waits the short while again; one a little late
# keeps the wait it has. A loop a millisecond or two late is a busy machine's scheduling as
# often as this process's load (a tenth of the flushes of the latency scenario's members on
# a loaded 2-core machine, 1 % over 4 ms, against a third of a web worker's, a quarter over
# 4 ms): lengthening the wait for it only delayed the next operations (p99 at 10k sets/s
# 2.5 -> 3.1 ms). A 2 ms wait (the first and twenty-fourth looks of issue 20, in
# docs/benchmarks.rst) made a web worker's frames 1.6x larger but its CPU per request only
# some 4 % lower, within a loaded machine's noise, for every streamed operation up to a
# millisecond later (and every seed of the simulation replaying differently).
COALESCE_SECONDS = 0.001
COALESCE_BUSY_SECONDS = 0.004
# A peer's clock is judged (behind ours or not) on the least lag its PROGRESS reports show
# until one comes at least this many sync intervals (by this node's monotonic clock) after a
# connection's first: a report read late, after a stop or a starved spell, looks as far
# behind as it was late; a fresh one follows within a sync interval.
CLOCK_JUDGEMENT = 2.0

_Result = TypeVar("_Result")


def without_gc(call: Callable[..., _Result], *args: Any) -> _Result:
    """``call(*args)`` with the cyclic GC paused (the app's own setting is given back), for
    work that does not yield and makes a mass of young lists it frees before it returns:
    every collection triggered meanwhile would walk them again, and the full collections
    they trigger walk the whole store. Refcounting frees them: nothing in them makes a cycle."""
    collecting = gc.isenabled()
    if collecting:
        gc.disable()
    try:
        return call(*args)
    finally:
        if collecting:
            gc.enable()


def refusal(message: str, category: str) -> ProtocolError:
    """A ``ProtocolError`` of ``category`` (see ``RefusalLog``)."""
    error = ProtocolError(message)
    error.category = category
    return error


class ClockSkew(ProtocolError):
    """A peer sent a stamp more than ``clock_skew`` ahead of this node's wall clock (its
    connection is refused: see ``Engine.check_clock``)."""

    reply = encode_refusal("clock-skew")

    def __init__(self, message: str, peer_id: int) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class StreamDue(NamedTuple):
    """A snapshot stream whose SNAPSHOT_END came, waiting for ``Engine.merge_step``: each
    staged frame's items, the frames' bytes for a data_dir's log (its SNAPSHOT_END's last),
    and its vector."""

    items: deque[list[Any]]
    frames: list[bytes]
    vector: list[tuple[int, int, int]]


def _ignore(*args: Any) -> None:
    pass


class Engine(Frontier):
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
        late = now - self.flush_due
        self.flush_due = float("inf")
        if late > COALESCE_BUSY_SECONDS:  # too busy: wait longer
            self.coalesce = min(2 * self.coalesce, COALESCE_BUSY_SECONDS)
        elif late <= COALESCE_SECONDS:  # keeping up: the short wait
            self.coalesce = COALESCE_SECONDS
        # (in between: a loop a little late, busy or not, keeps the wait it has)
        self.flushed_at = now
        stamps = outbox[0::3]
        columns = self._columns(stamps, outbox)
        outbox.clear()
        numbered_from = self.seq + 1
        frames: list[tuple[int, int, bytes]] = []
        try:
            self.encode_batch(numbered_from, columns, frames)
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

    def _columns(self, stamps: list[int], outbox: list[Any]) -> tuple[list[Any], ...]:
        """The outbox as the OPS frame's columns (hlcs, ops, paths, values, and ttls if any)."""
        size = len(stamps)
        increments = self.out_increments
        if increments:
            if len(increments) == size:
                ops: list[int] = [INCREMENT] * size  # (a loop of ``incr``: nothing else)
            else:
                ops = [SET] * size
                for position in increments:
                    ops[position // 3] = INCREMENT
            increments.clear()
        else:
            ops = [SET] * size
        ttls: list[int] | None = None
        special = self.out_special
        if special:
            for index, op, ttl_ms in special:
                ops[index] = op
                if ttl_ms:
                    if ttls is None:
                        ttls = [0] * size
                    ttls[index] = ttl_ms
            special.clear()
        columns: tuple[list[Any], ...] = (
            list(map(rshift, stamps, repeat(NODE_BITS))),
            ops,
            outbox[1::3],
            outbox[2::3],
        )
        if ttls is not None:
            columns += (ttls,)
        return columns

    def encode_batch(
        self, first: int, columns: tuple[list[Any], ...], out: list[tuple[int, int, bytes]]
    ) -> None:
        """OPS frames for the operations in ``columns``, numbered from ``first``, halved
        until each frame is well under what a peer accepts (``max_frame``)."""
        size = len(columns[0])
        frame = encode_ops(self.node_id, first, *columns)
        if len(frame) > self.max_frame // 4 and size > 1:
            half = size // 2
            self.encode_batch(first, tuple(c[:half] for c in columns), out)
            self.encode_batch(first + half, tuple(c[half:] for c in columns), out)
        else:
            out.append((first, first + size - 1, frame))

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
        export_pieces = self.store.export_pieces
        # Frames of about the target size, well under what the peer accepts: a subtree
        # longer than that goes in pieces (only a single value can make a frame longer,
        # and ``set`` refused values that would not fit in ``max_frame``).
        target = min(SNAPSHOT_FRAME_BYTES, self.max_frame // 2)
        # Leaves per piece of a long item (learnt as pieces are made): a piece is read from
        # the store and encoded at once, so the store may change between pieces (the hub
        # runs between frames) but never under one; and each costs the hub about a frame's
        # work, however long the item.
        budget = [max(1, int(target * PIECE_FILL / LEAF_BYTES_GUESS))]
        parts: list[bytes] = []
        size = 0
        for key in keys:
            for item in export_pieces(key, budget):
                encoded = list(encode_snapshot_parts(item, target))
                learn_piece_size(budget, item, encoded, target)
                for part in encoded:
                    if parts and size + len(part) > target:
                        yield join_snapshot(parts)
                        parts = []
                        size = 0
                    parts.append(part)
                    size += len(part)
        if parts:
            yield join_snapshot(parts)
        yield end

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
        hello = encode_hello(self.node_id, self.advertise[0], self.advertise[1], flags)
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
            peer.peer_id = hello.node_id
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
            self._check_peer_clock_behind(promise, peer, now)
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

    def check_clock(
        self, stamp: int, what: str, peer: Peer | None, peer_id: int, origin: int = 0
    ) -> None:
        """Refuse a frame with a stamp more than ``clock_skew`` ahead of our wall clock
        (``what`` names the frame, ``origin`` the maker of the operations it relays).

        Observing it would drag this node's clock (and, through its stamps, everyone's) ahead
        for good: ttls would fire late by as much and the metadata sweep would stall, and a
        forged stamp near the wire's limit would leave no stamp to issue. Refusing costs
        nothing within the contract (clocks within ``clock_skew`` never send such a stamp);
        the sender retries, so its operations arrive once the clocks agree (see
        docs/contract.rst).
        """
        lead = stamp_lead(stamp, self.wall_ns())
        if lead <= self.clock_skew:
            return
        if peer is not None and peer.peer_id == peer_id:
            # A refused connection is no sign of life: a member whose clock stays wrong is
            # declared down after ``down_timeout``, like a silent one.
            peer.last_heard = peer.last_report
        name = peer.name if peer is not None else "?"
        if origin and origin != peer_id:
            what = f"{what} (operations of {origin:x})"
        raise ClockSkew(
            f"member {name} (id {peer_id:x}) sent {what} stamped {lead:,.3f}s ahead of this "
            f"node's clock, more than clock_skew ({self.clock_skew:g}s): nothing of it is "
            "applied until the clocks agree (check both members' clocks, e.g. NTP)",
            peer_id,
        )

    def _check_peer_clock_behind(self, promise: int, peer: Peer, now: float) -> None:
        """Warn if the peer's clock is more than ``clock_skew`` behind ours: if ours is the
        wrong one, the peer refuses our operations, and this says so on our side too.

        A PROGRESS carries the sender's clock when it was built, so one read late (this
        process starved of CPU or stopped, the frames queued meanwhile) looks as far behind
        as it was late: between processes of one machine at load 20, 10-22 s. A real skew
        shows in every report, a late read only until the backlog is read: the lag judged is
        the least of the connection's reports until the first one received at least
        ``CLOCK_JUDGEMENT`` sync intervals (of this node's monotonic clock: a backlog read in
        one go is one moment) after its first, which came fresh after any backlog.
        """
        lag = -stamp_lead(promise, self.wall_ns())
        if peer.reports == 0:  # (the connection's first: judge later)
            peer.clock_lag = lag
            peer.clock_judged_at = now + CLOCK_JUDGEMENT * self.sync_interval
            return
        assert peer.clock_lag is not None
        least = peer.clock_lag = min(peer.clock_lag, lag)
        if now < peer.clock_judged_at:
            return
        peer.clock_lag = None  # (judged: once per connection)
        if least > self.clock_skew:
            log.warning(
                "peer %s: its clock is %.3fs behind this node's, more than clock_skew (%gs): "
                "if this node's clock is the wrong one, the peer refuses this node's "
                "operations until it is fixed (check both members' clocks, e.g. NTP)",
                peer.name,
                least,
                self.clock_skew,
            )

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
        already (see ``_queued_for``).
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
        sent = self._queued_for(peer, theirs)
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

    def _queued_for(self, peer: Peer, theirs: dict[int, int]) -> dict[int, int]:
        """Per origin, the last operation the peer has or will get on our current connection
        to it without a resend: what it reported, or more if that connection carries the
        rest (what catch-up queued on it; our own operations made since it came up, if the
        peer had all before). Resending those would only duplicate them: a peer that
        applies late (busy, or its link from us backed up) would get everything it lacks
        again every report, and fall further behind."""
        sent = dict(theirs)
        for origin, upto in peer.queued_upto().items():
            if upto > sent.get(origin, 0):
                sent[origin] = upto
        node_id = self.node_id
        if peer.live_from is not None and sent.get(node_id, 0) >= peer.live_from:
            sent[node_id] = self.seq
        return sent

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
