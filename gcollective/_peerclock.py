"""A peer's clock as its stamps show it: one too far ahead of this node's is refused
(``ClockSkew``, raised by ``Engine.check_clock``), one too far behind is warned about
(``judge_clock_behind``, on the peer's PROGRESS reports). See docs/clocks.rst.
"""

from __future__ import annotations

import logging

from ._auth import encode_refusal
from ._errors import ProtocolError
from ._peerstate import Peer

__all__ = ["CLOCK_JUDGEMENT", "ClockSkew", "judge_clock_behind", "skew_refusal"]

log = logging.getLogger("gcollective")

# A peer's clock is judged (behind ours or not) on the least lag its PROGRESS reports show
# until one comes at least this many sync intervals (by this node's monotonic clock) after
# the first of the judgement's window: a report read late, after a stop or a starved spell,
# looks as far behind as it was late; a fresh one follows within a sync interval.
CLOCK_JUDGEMENT = 2.0


class ClockSkew(ProtocolError):
    """A peer sent a stamp more than ``clock_skew`` ahead of this node's wall clock (its
    connection is refused: see ``Engine.check_clock``)."""

    reply = encode_refusal("clock-skew")

    def __init__(self, message: str, peer_id: int) -> None:
        super().__init__(message)
        self.peer_id = peer_id


def skew_refusal(
    lead: float, clock_skew: float, what: str, peer: Peer | None, peer_id: int, origin: int
) -> ClockSkew:
    """The error that refuses a frame (``what`` names it, ``origin`` the maker of the
    operations it relays) stamped ``lead`` seconds ahead of this node's wall clock, more
    than ``clock_skew``, from incarnation ``peer_id`` (at ``peer``).

    Observing such a stamp would drag this node's clock (and, through its stamps,
    everyone's) ahead for good: ttls would fire late by as much and the metadata sweep would
    stall, and a forged stamp near the wire's limit would leave no stamp to issue. Refusing
    costs nothing within the contract (clocks within ``clock_skew`` never send such a
    stamp); the sender retries, so its operations arrive once the clocks agree (see
    docs/contract.rst).
    """
    if peer is not None and peer.peer_id == peer_id:
        # A refused connection is no sign of life: a member whose clock stays wrong is
        # declared down after ``down_timeout``, like a silent one.
        peer.last_heard = peer.last_report
    name = peer.name if peer is not None else "?"
    if origin and origin != peer_id:
        what = f"{what} (operations of {origin:x})"
    return ClockSkew(
        f"member {name} (id {peer_id:x}) sent {what} stamped {lead:,.3f}s ahead of this "
        f"node's clock, more than clock_skew ({clock_skew:g}s): nothing of it is "
        "applied until the clocks agree (check both members' clocks, e.g. NTP)",
        peer_id,
    )


def judge_clock_behind(
    peer: Peer, lag: float, now: float, sync_interval: float, clock_skew: float
) -> None:
    """Warn if the peer's clock is more than ``clock_skew`` behind ours (its report just
    received showed it ``lag`` seconds behind, at ``now``): if ours is the wrong one, the
    peer refuses our operations, and this says so on our side too.

    A PROGRESS carries the sender's clock when it was built, so one read late (this
    process starved of CPU or stopped, the frames queued meanwhile) looks as far behind
    as it was late: between processes of one machine at load 20, 10-22 s. A real skew
    shows in every report, a late read only until the backlog is read: the lag judged is
    the least of a window's reports until the first one received at least
    ``CLOCK_JUDGEMENT`` sync intervals (of this node's monotonic clock: a backlog read in
    one go is one moment) after its first, which came fresh after any backlog.

    A connection's first report opens a window, unless one is open already: lateness only
    adds lag, so the least lag of any reports is a safe bound, and a window spans the
    peer's reconnections (one whose connections each last less than the window is judged
    all the same). Judged, the window closes; the next connection opens the next one (a
    warning per connection at most). A new incarnation starts afresh
    (``Receiving.connection_made``: its clock may be another).
    """
    if peer.clock_lag is None:  # (no window open: judge later)
        peer.clock_lag = lag
        peer.clock_judged_at = now + CLOCK_JUDGEMENT * sync_interval
        return
    least = peer.clock_lag = min(peer.clock_lag, lag)
    if now < peer.clock_judged_at:
        return
    peer.clock_lag = None  # (judged: the next connection opens the next window)
    if least > clock_skew:
        log.warning(
            "peer %s: its clock is %.3fs behind this node's, more than clock_skew (%gs): "
            "if this node's clock is the wrong one, the peer refuses this node's "
            "operations until it is fixed (check both members' clocks, e.g. NTP)",
            peer.name,
            least,
            clock_skew,
        )
