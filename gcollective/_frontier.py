"""What a member may forget, and from when: the engine's reading of everyone's progress; and
what it must refuse once it forgot (members declared down).

``Engine.housekeep`` runs these every ``sync_interval``: peers silent for ``down_timeout``
are declared down (``_declare_down``), gaps of past incarnations that no live peer can fill
are counted as lost (``skip_dead_gaps``), the log forgets what every live peer applied
(``forget_logged``), and the frontier moves: this member's (``own_frontier``, below which
no operation can still reach it) and everyone's (``gc_frontier``, below which the store's
sweeps may forget metadata). Once it forgot, a member refuses as declared down whatever
would bring an operation or a state older than that (``forgotten_below``: see "members
declared down" below), and one refused so passes no state on. Sans-IO like the engine:
time comes in as arguments, the wall clock through the engine's ``wall_ns``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ._auth import encode_refusal
from ._clock import millis_stamp
from ._errors import ProtocolError
from ._oplog import OpLog, Progress
from ._peerstate import RETURNING_UNKNOWN, Inbound, Peer
from ._wire import Hello

__all__ = ["DEAD_GAP_GRACE", "DeclaredDown", "Frontier"]

log = logging.getLogger("gcollective")

# A gap in a past incarnation's operations that no live peer can fill is counted as lost once
# it stayed so for this long (or ten sync intervals if longer): long enough for every peer to
# report again, and for what was still in flight from that incarnation to land.
DEAD_GAP_GRACE = 2.0


class DeclaredDown(ProtocolError):
    """A connection refused as coming from an incarnation declared down (see
    ``Frontier.refuse_as_down``); ``reply``, if ``told``, the REFUSE line that tells it so
    (it then stops passing its state on: ``Frontier.declared_down_by_peer``)."""

    category = "down"

    def __init__(self, message: str, told: bool) -> None:
        super().__init__(message)
        self.reply = encode_refusal("declared-down") if told else b""


class Frontier:
    """The part of ``Engine`` that decides what may be forgotten (see the module docstring);
    ``Engine`` sets the state it reads."""

    node_id: int
    wall_ns: Callable[[], int]
    sync_interval: float
    down_timeout: float
    clock_skew: float
    peers: dict[tuple[str, int], Any]
    progress: Progress
    log: OpLog
    down_ids: set[int]
    past_ids: set[int]
    dead_gaps: dict[int, float]
    skipped_gaps: int
    frontier: int
    forgotten_below: int
    # Per origin, a stamp every operation of it this member lacks is newer than: the clock
    # it promised when the frontier last counted on it, or its birth (see _lacked_after).
    promised: dict[int, int]
    # The peers that refused this member as declared down, and their incarnations then.
    refused_by: dict[Peer, int | None]

    # -- members declared down ----------------------------------------------------------
    #
    # The rule: this member never applies an operation older than ``forgotten_below`` (the
    # highest frontier it handed to the store's sweeps) that it did not hold already, nor
    # takes state from a member that may hold data its forgotten metadata superseded. The
    # metadata such an operation must meet (a tombstone over its path, a newer value) may
    # be gone: applied, it would bring deleted data back, here and, relayed, everywhere.
    # Counting every peer keeps the rule by construction (no operation older than the
    # frontier can still arrive); a peer declared down is no longer counted, so what comes
    # from its address afterwards is checked at the door (``check_returning``), and so is
    # every operation (``check_not_forgotten``): a connection that breaks the rule is
    # refused as from a member declared down, and its incarnation must restart empty, as
    # the contract asks of a member declared down. (Declaring down is each member's own
    # view: a peer that still counts the member declared down here holds back its own
    # frontier, and this one's through it, for what it takes from that member.)

    def _declare_down(self, peer: Peer) -> None:
        self._stop_counting(peer)
        log.warning(
            "peer %s silent for %gs: declared down (metadata it might have needed "
            "is forgotten; if it comes back it must restart empty)",
            peer.name,
            self.down_timeout,
        )

    def _stop_counting(self, peer: Peer) -> None:
        """Leave ``peer`` out of the frontier and the log's forgetting from now on."""
        peer.down = True
        # Nothing more is queued for it: what is, and what we make from now on, is older than
        # what every member may forget from now on. Delivered to its next, empty incarnation
        # before the snapshot that incarnation asks for (our writer dials the address, and
        # sends what is queued, before anything says who answers), an old write under a
        # forgotten tombstone would live on there for good. (This incarnation is refused if
        # it comes back; one never identified is checked when it does: check_returning.)
        peer.drop_pending()
        if peer.peer_id is not None:
            self.down_ids.add(peer.peer_id)

    def refuse_as_down(self, peer: Peer | None, peer_id: int, why: str) -> ProtocolError:
        """The error that closes a connection from incarnation ``peer_id`` (at ``peer``)
        breaking the rule above (``why``: what it did): that incarnation is refused from
        now on, as declared down, and told so (it then stops passing its state on: see
        ``declared_down_by_peer``) unless this member counts no other peer. A member cut
        off from every other one is as likely to be the one that must restart: telling would
        let it stop the rest of the collective passing its state on."""
        if peer_id:
            self.down_ids.add(peer_id)
        name = "?"
        if peer is not None:
            name = peer.name
            if peer.peer_id == peer_id and not peer.down:
                self._stop_counting(peer)
        return DeclaredDown(
            f"member {name} (id {peer_id:x}) {why}, older than the metadata this member "
            "forgot while it did not count that member (declared down): refused as declared "
            "down, it must restart empty to rejoin",
            told=self._counts_another(None if peer is None else peer.address),
        )

    def refused_again(self, hello: Hello) -> ProtocolError:
        """The error that refuses a HELLO from an incarnation declared down (told so as in
        ``refuse_as_down``)."""
        return DeclaredDown(
            f"incarnation {hello.node_id:x} was declared down after {self.down_timeout:g}s "
            "of silence; restart it to rejoin (its unsent writes are dropped)",
            told=self._counts_another((hello.host, hello.port)),
        )

    def _counts_another(self, address: tuple[str, int] | None) -> bool:
        """Whether the frontier counts a peer other than the one at ``address``."""
        return any(not peer.down for at, peer in self.peers.items() if at != address)

    def declared_down_by_peer(self, peer: Peer) -> None:
        """``peer`` refused this member as declared down (its REFUSE said so): this member
        may hold data the others deleted and forgot, or lack what they forgot, so it stops
        passing on any state (snapshots, and operations resent by catch-up: each may be old
        enough to bring deleted data back to a member that takes it) until it is restarted
        empty, as the contract asks, or until every incarnation that refused it was
        replaced (the other side of a partition restarted empty: ``passing_state_again``).
        Its own new operations still go out live."""
        if not self.refused_by:
            for other in self.peers.values():
                other.drop_pending()  # (catch-up's frames among it)
            log.error(
                "peer %s refused this member as declared down: this member no longer passes "
                "on its state (restart it empty to rejoin; its writes not yet sent are "
                "dropped)",
                peer.name,
            )
        self.refused_by[peer] = peer.peer_id

    @property
    def refused_as_down(self) -> bool:
        """Whether this member passes no state on (see ``declared_down_by_peer``)."""
        return bool(self.refused_by)

    def passing_state_again(self) -> None:
        """Pass state on again once every incarnation that refused this member as declared
        down was replaced, or forgotten (see ``declared_down_by_peer``)."""
        refused_by = self.refused_by
        for peer, incarnation in list(refused_by.items()):
            current = peer.peer_id if self.peers.get(peer.address) is peer else None
            if current is None or current != incarnation:
                del refused_by[peer]
        if not refused_by:
            log.warning("every member that refused this one was replaced: passing state on")

    def note_swept(self, swept: int) -> None:
        """The store's sweeps run to ``swept``: move ``forgotten_below`` up to it, or to the
        newest operation this member holds if that is older (metadata newer than every
        operation held was never here to forget: a member that holds nothing forgets
        nothing, and may take any state)."""
        held = max(self.progress.stamps.values(), default=0)
        self.forgotten_below = max(self.forgotten_below, min(swept, held))

    def check_not_forgotten(self, stamp: int, peer: Peer | None, peer_id: int) -> None:
        """Refuse the connection that brought an operation stamped ``stamp``, new here, if
        it is older than what this member may have forgotten (see the rule above)."""
        if stamp < self.forgotten_below and peer_id:
            raise self.refuse_as_down(peer, peer_id, "sent an operation it lacked")

    def check_snapshot(self, vector: list[tuple[int, int, int]], inbound: Inbound) -> None:
        """Refuse a snapshot stream (its SNAPSHOT_END's ``vector``, before anything of it is
        merged) that breaks the rule above: it holds operations this member lacks that may
        be older than what it may have forgotten (by ``_lacked_after``), or it lacks
        operations this member holds that all are (its data may then be what their
        forgotten tombstones deleted here: a state taken from a member declared down,
        relayed)."""
        below = self.forgotten_below
        if not below or not inbound.peer_id:
            return
        progress = self.progress
        applied, stamps = progress.applied, progress.stamps
        theirs = {}
        for origin, seq, _ in vector:
            theirs[origin] = seq
            if seq > applied.get(origin, 0) and self._lacked_after(origin) < below:
                raise self.refuse_as_down(inbound.peer, inbound.peer_id, "sent a state")
        for origin, seq in applied.items():
            if theirs.get(origin, 0) < seq and stamps.get(origin, below) < below:
                raise self.refuse_as_down(
                    inbound.peer, inbound.peer_id, "sent a state without operations"
                )

    def _lacked_after(self, origin: int) -> int:
        """A stamp that the operations of ``origin`` this member lacks are newer than, as far
        as it can tell: that of the last one it applied, or the clock that origin promised
        while the frontier counted on it, or the birth its HELLO told (``promised``); 0 for
        an origin it knows nothing of (its operations may be as old as any)."""
        return max(self.progress.stamps.get(origin, 0), self.promised.get(origin, 0))

    def note_born(self, origin: int, born_ms: int) -> None:
        """Incarnation ``origin`` said (its HELLO) it was born at ``born_ms`` (0: not said):
        none of its operations is older. Without it, a new incarnation's own state, its first
        operations in it, was refused as possibly older than what this member forgot (it
        knew nothing of that origin), and the member told to restart empty: with the default
        ``down_timeout`` too (simulation seeds 6617, 23922)."""
        born = millis_stamp(born_ms)
        if born > self.promised.get(origin, 0):
            self.promised[origin] = born

    def check_returning(
        self, inbound: Inbound, theirs: dict[int, int], their_stamps: dict[int, int]
    ) -> None:
        """On the first report of a connection from an address declared down (see the rule
        above): refuse it if it holds operations this member lacks that are older than what
        it may have forgotten; and, when the incarnation declared down was never
        identified (this one may be it), if it holds anything at all and lacks an
        operation that may be that old (its data may be what a forgotten tombstone
        deleted here)."""
        below = self.forgotten_below
        applied = self.progress.applied
        for origin, seq in theirs.items():
            if seq > applied.get(origin, 0) and their_stamps.get(origin, 0) < below:
                raise self.refuse_as_down(inbound.peer, inbound.peer_id, "holds operations")
        if inbound.returning is not RETURNING_UNKNOWN or not any(theirs.values()):
            return
        for origin, seq in applied.items():
            if theirs.get(origin, 0) < seq and their_stamps.get(origin, 0) < below:
                raise self.refuse_as_down(
                    inbound.peer, inbound.peer_id, "holds data and lacks operations"
                )

    def skip_dead_gaps(self, now: float) -> None:
        """Count as lost the missing operations before those of a past incarnation held
        beyond a gap, once no live peer can fill it.

        An origin's operation N+1 can arrive while N was lost in flight (its connection cut);
        if the origin then restarts empty before its catch-up resends N, nobody ever will,
        and the gap would hold the log and the frontier (so every member's metadata) for
        good, while N+1 and what follows it would reach no other member: catch-up resends
        only what the version vector covers. A member that held N would report it (holding
        N with N-1, it has N in its vector): so once the origin is known gone (replaced at
        its address, or declared down) and every live peer reports exactly our mark, for
        ``DEAD_GAP_GRACE``, N is lost. The vector then moves past it; peers lacking what
        follows get it by catch-up, or by a snapshot (the log has no frame for N), whose
        vector moves theirs past N too.
        """
        progress = self.progress
        grace = max(DEAD_GAP_GRACE, 10 * self.sync_interval)
        for origin in progress.gap_origins():
            if not self._gap_is_dead(origin):
                self.dead_gaps.pop(origin, None)
                continue
            since = self.dead_gaps.setdefault(origin, now)
            if now - since >= grace:
                del self.dead_gaps[origin]
                done = progress.applied.get(origin, 0)
                upto = progress.skip_gap(origin)
                self.skipped_gaps += 1
                log.warning(
                    "operations after %d of past incarnation %x were lost with it (no live "
                    "peer holds them): counting them as applied, up to %d",
                    done,
                    origin,
                    upto,
                )

    def _gap_is_dead(self, origin: int) -> bool:
        """Whether no live peer can fill the gap of ``origin`` (see ``skip_dead_gaps``)."""
        if origin not in self.past_ids and origin not in self.down_ids:
            return False
        done = self.progress.applied.get(origin, 0)
        for peer in self.peers.values():
            if peer.down:
                continue
            if peer.peer_id is None or peer.peer_promise is None or peer.peer_id == origin:
                return False
            if peer.peer_vector.get(origin, 0) != done:
                return False
        return True

    def forget_logged(self) -> None:
        """Drop from the log what every peer not declared down has applied, as its latest
        PROGRESS says (a peer's applied only grows while it lives): no catch-up resends it.
        A peer silent for a while is still counted, with what it had, so its catch-up after
        a partition finds the rest logged; one declared down comes back empty, or gets a
        snapshot. So the log holds only what some peer may lack, not ``log_bytes`` of churn
        (issue 20)."""
        applied = dict(self.progress.applied)
        for peer in self.peers.values():
            if not peer.down:
                vector = peer.peer_vector
                applied = {
                    origin: min(seq, vector.get(origin, 0)) for origin, seq in applied.items()
                }
        self.log.forget_applied(applied)

    def own_frontier(self) -> int:
        """A stamp below which no operation can still reach this node.

        Each member that is not declared down promises that its next operations are newer
        than its clock (trusted once we hold everything it had sent by then); each past
        incarnation limits it while we hold its operations beyond a gap, while a member holds
        more of them than we do, or less (it gets them from us); a member never heard from
        allows nothing; and a member that was never seen cannot make operations older than
        the clocks allow (``clock_skew``).
        """
        progress = self.progress
        floor = millis_stamp(int((self.wall_ns() / 1e9 - self.clock_skew) * 1000))
        members = [peer for peer in self.peers.values() if not peer.down]
        live = {self.node_id}
        for peer in members:
            peer_id = peer.peer_id
            if peer_id is None or peer.peer_promise is None:
                return 0
            live.add(peer_id)
            if progress.applied.get(peer_id, 0) >= peer.peer_own_seq and not progress.has_gap(
                peer_id
            ):
                floor = min(floor, peer.peer_promise)
                self.promised[peer_id] = peer.peer_promise  # (see _lacked_after)
            else:
                floor = min(floor, progress.stamps.get(peer_id, 0))
        # (Origins with a gap at their first operation have no entry in ``applied``; and
        # an origin a member holds operations of that we never heard of holds us back too:
        # they may come to us, by catch-up or a snapshot, as old as they are.)
        origins = progress.applied.keys() | progress.gap_origins()
        for peer in members:
            origins |= peer.peer_vector.keys()
        for origin in origins:
            limit = None if origin in live else self._past_origin_limit(origin, members)
            if limit is not None:
                floor = min(floor, limit)
        return floor

    def _past_origin_limit(self, origin: int, members: list[Peer]) -> int | None:
        """How far the operations of past incarnation ``origin`` hold the frontier back (see
        ``own_frontier``); None: not at all (we and every live member hold the same)."""
        progress = self.progress
        seq = progress.applied.get(origin, 0)
        # A member that lacks some of them gets them from us (catch-up, or a snapshot): what
        # it may meet there must still be known. (Its own frontier says so once it heard that
        # we hold more, not before: after a gap counted as lost, we may be the only one that
        # knows of what followed it.)
        limits = [
            peer.peer_stamps.get(origin, 0)
            for peer in members
            if peer.peer_vector.get(origin, 0) < seq
        ]
        if progress.has_gap(origin) or any(
            peer.peer_vector.get(origin, 0) > seq for peer in members
        ):
            limits.append(progress.stamps.get(origin, 0))
        return min(limits, default=None)

    def gc_frontier(self) -> int:
        """A stamp below which no operation can reach any member (so every replica already
        holds every operation older than it): the minimum of everyone's frontier."""
        frontier = self.frontier
        for peer in self.peers.values():
            if not peer.down:
                frontier = min(frontier, peer.peer_frontier)
        return frontier
