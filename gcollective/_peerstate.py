"""One peer's protocol state (``Peer``), and the snapshot a node owes it: a named state and
the one table of its transitions.

A node that sends a peer its whole state (the peer asked for it, or missed more than the log
holds) owes it until the peer reports ``complete`` in a PROGRESS: a ``sendall`` that
succeeded proves nothing if the connection then broke, so the snapshot is sent again on every
new connection until then. Its frames are built one at a time as the writer sends them (a
*stream*). Two facts, owed or not and streaming or not, make four states:

========================  =====  =========  ===========================================
state                     owed   streaming  meaning
========================  =====  =========  ===========================================
``NONE``                  no     no         catch-up from the log serves the peer
``STREAMING``             yes    yes        frames are being built and handed to the kernel
``OWED``                  yes    no         all sent (or lost with its connection): waiting
                                            for the peer's complete report; a new
                                            connection streams it again
``STREAMING_UNOWED``      no     yes        the peer reported complete (it merged another
                                            member's snapshot) or restarted while ours
                                            streams: the rest goes out, harmlessly
========================  =====  =========  ===========================================

Like h11's ``_state.py``: every change goes through ``next_state``, and a change the table
does not list raises ``LocalProtocolError`` (a bug in the engine, never a peer's doing).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import Any, Iterator

from ._validate import format_address

log = logging.getLogger("gcollective")


class Snapshot(enum.Enum):
    """Where the snapshot this node owes a peer is (see the module docstring)."""

    NONE = "none"
    STREAMING = "streaming"
    OWED = "owed"
    STREAMING_UNOWED = "streaming-unowed"


class Event(enum.Enum):
    """What moves a peer's ``Snapshot`` state."""

    #: A (new) snapshot stream starts: asked for, too far behind for the log, owed on a new
    #: connection, or the outbox could not be encoded.
    START = "start"
    #: The stream's last frame was handed to the writer.
    STREAMED = "streamed"
    #: The connection carrying the stream ended (or its queue overflowed): frames were lost.
    CONNECTION_LOST = "connection-lost"
    #: The peer reported complete: it merged a snapshot, ours or another member's.
    COMPLETE = "complete"
    #: The peer came back as a new incarnation: what the old one was owed means nothing.
    RESTARTED = "restarted"


class LocalProtocolError(RuntimeError):
    """A state change the transition table does not allow: a bug in the engine."""


_S, _E = Snapshot, Event
#: (state, event) -> next state. Anything missing is illegal.
TRANSITIONS: dict[tuple[Snapshot, Event], Snapshot] = {
    # Starting a stream (again) is allowed from anywhere: a new request replaces an old one.
    **{(state, _E.START): _S.STREAMING for state in Snapshot},
    (_S.STREAMING, _E.STREAMED): _S.OWED,
    (_S.STREAMING_UNOWED, _E.STREAMED): _S.NONE,
    (_S.STREAMING, _E.CONNECTION_LOST): _S.OWED,
    (_S.STREAMING_UNOWED, _E.CONNECTION_LOST): _S.NONE,
    (_S.OWED, _E.CONNECTION_LOST): _S.OWED,
    (_S.NONE, _E.CONNECTION_LOST): _S.NONE,
    (_S.STREAMING, _E.COMPLETE): _S.STREAMING_UNOWED,
    (_S.OWED, _E.COMPLETE): _S.NONE,
    (_S.NONE, _E.COMPLETE): _S.NONE,
    (_S.STREAMING_UNOWED, _E.COMPLETE): _S.STREAMING_UNOWED,
    (_S.STREAMING, _E.RESTARTED): _S.STREAMING_UNOWED,
    (_S.OWED, _E.RESTARTED): _S.NONE,
    (_S.NONE, _E.RESTARTED): _S.NONE,
    (_S.STREAMING_UNOWED, _E.RESTARTED): _S.STREAMING_UNOWED,
}

#: States in which the snapshot is owed (catch-up from the log waits for the peer's report).
OWED_STATES = frozenset({Snapshot.STREAMING, Snapshot.OWED})
#: States in which frames of a stream are still to be built.
STREAMING_STATES = frozenset({Snapshot.STREAMING, Snapshot.STREAMING_UNOWED})


def next_state(state: Snapshot, event: Event) -> Snapshot:
    """The state after ``event``, or ``LocalProtocolError`` if the table does not allow it."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"snapshot state {state.value}: {event.value} is not allowed"
        ) from None


class Peer:
    """One peer as the protocol sees it: what is queued for it, what it reported, and the
    snapshot this node owes it (``snapshot``, a ``Snapshot``).

    The shell's link to the peer is a subclass: it overrides the three hooks below, through
    which the engine asks for I/O. ``max_queue_bytes``: what may be queued before the peer
    counts as unable to keep up.
    """

    def __init__(self, address: tuple[str, int], now: float, max_queue_bytes: int) -> None:
        self.address = address
        self.max_queue_bytes = max_queue_bytes
        self.name = format_address(address)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.pending_ops = 0  # own or relayed operations in ``pending`` (not catch-up)
        self.progress_due = False  # set every sync_interval by the connection's ticker
        self.connected = False  # our connection to it is up (its HELLO went out)
        self.connects = 0
        self.peer_id: int | None = None  # from the peer's HELLO on its link to us
        # From the peer's latest PROGRESS (see Engine.gc_frontier).
        self.peer_vector: dict[int, int] = {}
        self.peer_stamps: dict[int, int] = {}  # the stamp at each of those (for metrics)
        self.peer_promise: int | None = None
        self.peer_frontier = 0
        self.peer_own_seq = 0
        self.reports = 0  # PROGRESS frames received on the peer's current connection
        # While the peer's clock is being judged (a window that may span its connections:
        # see _peerclock.judge_clock_behind): the least lag its reports showed (None when
        # no window is open), and the monotonic time the judgement is due at.
        self.clock_lag: float | None = None
        self.clock_judged_at = 0.0
        self.last_heard = now
        self.last_report = now  # the last PROGRESS accepted (or the start)
        self.down = False
        self.snapshot = Snapshot.NONE
        # While a snapshot is owed: the version vector it holds at least.
        self.snapshot_vector: dict[int, int] | None = None
        self.snapshot_stream: Iterator[bytes] | None = None  # its frames still to build
        self.stream_frames = 0  # frames of that stream handed to the writer so far
        self._overflow_logged_at = -1
        self.overflows = 0
        self.snapshots_sent = 0
        self.relayed_frames = 0
        # What the current connection (``connects``) carries, or will: per origin, the last
        # operation catch-up queued for the peer on it (all it lacked up to there), and the
        # last own operation made before it came up (``link_up``: every later one is queued
        # on it live). TCP delivers all of it unless the connection breaks, and a new one
        # starts this over: catch-up does not send it twice (see ``Engine.catch_up``).
        self._queued_upto: dict[int, int] = {}
        self._queued_on = -1
        self.live_from: int | None = None

    # -- hooks: what the engine asks of the shell ---------------------------------------------

    def data_ready(self) -> None:
        """Something is pending: wake whoever sends to the peer."""

    def drop_connection(self) -> None:
        """End the current connection to the peer (it is redialled)."""

    def redial_now(self) -> None:
        """The peer is up (it just connected to us): skip any backoff before dialling it."""

    # -- state -------------------------------------------------------------------------------

    def _move(self, event: Event) -> None:
        """Change ``snapshot`` as the transition table says (see ``_peerstate``)."""
        state = self.snapshot = next_state(self.snapshot, event)
        if state not in OWED_STATES:
            self.snapshot_vector = None
        if state not in STREAMING_STATES:
            self.snapshot_stream = None

    @property
    def snapshot_owed(self) -> bool:
        """A snapshot was sent (or is being sent) and the peer has not reported it merged."""
        return self.snapshot in OWED_STATES

    @property
    def stream_unsent(self) -> bool:
        """A snapshot stream is owed and none of its frames was built yet: asked again, it
        would only be made anew, the same or as good (its vector a little older, what came
        since queued ahead of it)."""
        return self.snapshot is Snapshot.STREAMING and not self.stream_frames

    @property
    def busy(self) -> bool:
        """True while something is queued for the peer."""
        return bool(self.pending) or self.snapshot_stream is not None

    def enqueue(self, frame: bytes, ops: int = 0) -> None:
        """Queue a frame (carrying ``ops`` operations); never blocks. A peer that lets too
        much pile up is dropped: the catch-up by version vectors (or a snapshot) brings it
        back up to date later."""
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        self.pending_ops += ops
        limit = self.max_queue_bytes
        if self.pending_bytes > limit:
            self.overflows += 1
            # Once per connection at WARNING: a stuck peer would otherwise repeat it forever.
            (log.warning if self.connects > self._overflow_logged_at else log.debug)(
                "peer %s: more than %d bytes queued; dropping them and the connection "
                "(it catches up once it keeps pace)",
                self.name,
                limit,
            )
            self._overflow_logged_at = self.connects
            self.drop_pending()
            if self.snapshot in STREAMING_STATES:
                self._move(Event.CONNECTION_LOST)  # (sent again on the next connection)
            self.drop_connection()
        self.data_ready()

    def drop_pending(self) -> None:
        """Forget what is queued (catch-up, or a snapshot, brings the peer what it needs)."""
        self.pending = []
        self.pending_bytes = self.pending_ops = 0
        self._queued_upto = {}
        self.live_from = None

    def queued_upto(self) -> dict[int, int]:
        """Per origin, the last operation queued for the peer on the current connection:
        it arrives unless that connection breaks (empty after it broke)."""
        if self._queued_on != self.connects:
            self._queued_on = self.connects
            self._queued_upto = {}
            self.live_from = None
        return self._queued_upto

    def link_up(self, own_seq: int) -> None:
        """A new connection is up; own operations after ``own_seq`` go out on it live."""
        self.queued_upto()  # (starts the new connection's record)
        self.live_from = own_seq

    def mark_queued(self, origin: int, upto: int) -> None:
        """Operations of ``origin`` up to ``upto`` are queued on the current connection."""
        queued = self.queued_upto()
        if upto > queued.get(origin, 0):
            queued[origin] = upto

    def carried(self, theirs: dict[int, int], own_id: int, own_seq: int) -> dict[int, int]:
        """Per origin, the last operation the peer has or will get on our current connection
        to it without a resend (``theirs``: what it reported; ``own_id`` and ``own_seq``:
        this node's id and last own operation): what it reported, or more if that
        connection carries the rest (what catch-up queued on it; our own operations made
        since it came up, if the peer had all before). Resending those would only duplicate
        them: a peer that applies late (busy, or its link from us backed up) would get
        everything it lacks again every report, and fall further behind."""
        sent = dict(theirs)
        for origin, upto in self.queued_upto().items():
            if upto > sent.get(origin, 0):
                sent[origin] = upto
        if self.live_from is not None and sent.get(own_id, 0) >= self.live_from:
            sent[own_id] = own_seq
        return sent

    def start_snapshot(self, stream: Iterator[bytes], vector: dict[int, int]) -> None:
        """Replace what is pending by a snapshot stream (see ``Engine.resync``).

        A stream part-way out (asked again: the peer heard nothing of it for a while) is not
        followed by the new one on the same connection: the peer stages a connection's
        SNAPSHOT frames until their SNAPSHOT_END, so it would hold the old stream's part and
        the whole new one at once (up to twice the state). The connection ends instead, and
        the next one streams the snapshot, which is owed, from its start."""
        if self.snapshot in STREAMING_STATES and self.stream_frames:
            self.drop_connection()
        self.drop_pending()
        self._move(Event.START)
        self.snapshot_stream = stream
        self.stream_frames = 0
        self.snapshot_vector = vector
        self.snapshots_sent += 1
        self.data_ready()

    def next_snapshot_frame(self) -> bytes | None:
        """The next frame of the stream (built now), or ``None`` once it is all out."""
        stream = self.snapshot_stream
        if stream is None:
            return None
        frame = next(stream, None)
        if frame is None:
            self._move(Event.STREAMED)
        else:
            self.stream_frames += 1
        return frame


#: ``Inbound.returning``: the connection comes from an address declared down, and says it
#: is a new incarnation (another id than the one declared down), or maybe the same one (the
#: incarnation declared down was never identified). See ``Frontier.check_returning``.
RETURNING_NEW = "new"
RETURNING_UNKNOWN = "unknown"


class Inbound:
    """One connection from a peer, after its HELLO: who sent it, the catch-up bound, and the
    snapshot stream it is bringing (``staged``).

    A peer's connection stages the SNAPSHOT frames of a stream until its SNAPSHOT_END:
    merged earlier, a stream cut before its end (its holder restarted empty, or the
    connection broke and another member's snapshot came first) would leave this node holding
    effects beyond its version vector, which no catch-up ever asks of it (an operation only
    the dead holder had, or a piece of a node without the members its stamp stands for).
    ``staged`` is None where frames merge as they come: a data_dir's restore, whose frames
    are stored only once their stream ended (see ``Engine.receive``).
    """

    __slots__ = ("peer", "peer_id", "sent_bound", "staged", "staged_frames", "returning")

    def __init__(
        self,
        peer: Peer | None,
        peer_id: int,
        sent_bound: dict[int, int],
        *,
        stages: bool = False,
        returning: str | None = None,
    ) -> None:
        self.peer = peer  # None past the bound on announced links
        self.peer_id = peer_id
        # What we had when the peer connected bounds the first catch-up: later operations
        # are on their way to it already.
        self.sent_bound = sent_bound
        # The items of each SNAPSHOT frame received since the last SNAPSHOT_END (and their
        # bytes, for a data_dir's log, which stores them once their stream ended).
        self.staged: deque[list[Any]] | None = deque() if stages else None
        self.staged_frames: list[bytes] = []
        # From an address declared down (RETURNING_*), until its first report was checked.
        self.returning = returning
