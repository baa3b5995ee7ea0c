"""What a member may forget, and from when: the engine's reading of everyone's progress.

``Engine.housekeep`` runs these every ``sync_interval``: peers silent for ``down_timeout``
are declared down (``_declare_down``), gaps of past incarnations that no live peer can fill
are counted as lost (``skip_dead_gaps``), the log forgets what every live peer applied
(``forget_logged``), and the frontier moves: this member's (``own_frontier``, below which
no operation can still reach it) and everyone's (``gc_frontier``, below which the store's
sweeps may forget metadata). Sans-IO like the engine: time comes in as arguments, the wall
clock through the engine's ``wall_ns``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ._clock import millis_stamp
from ._oplog import OpLog, Progress
from ._peerstate import Peer

__all__ = ["DEAD_GAP_GRACE", "Frontier"]

log = logging.getLogger("gcollective")

# A gap in a past incarnation's operations that no live peer can fill is counted as lost once
# it stayed so for this long (or ten sync intervals if longer): long enough for every peer to
# report again, and for what was still in flight from that incarnation to land.
DEAD_GAP_GRACE = 2.0


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

    def _declare_down(self, peer: Peer) -> None:
        peer.down = True
        # Nothing more is queued for it: what is, and what we make from now on, is older than
        # what every member may forget from now on. Delivered to its next, empty incarnation
        # before the snapshot that incarnation asks for (our writer dials the address, and
        # sends what is queued, before anything says who answers), an old write under a
        # forgotten tombstone would live on there for good. (This incarnation is refused if
        # it comes back; one never identified, and so not refused, gets all of it by
        # catch-up or a snapshot.)
        peer.drop_pending()
        if peer.peer_id is not None:
            self.down_ids.add(peer.peer_id)
        log.warning(
            "peer %s silent for %gs: declared down (metadata it might have needed "
            "is forgotten; if it comes back it must restart empty)",
            peer.name,
            self.down_timeout,
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
            else:
                floor = min(floor, progress.stamps.get(peer_id, 0))
        # (Origins with a gap at their first operation have no entry in ``applied``.)
        for origin in progress.applied.keys() | progress.gap_origins():
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
