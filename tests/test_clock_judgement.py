"""A peer's clock judged behind this member's (``_peerclock.judge_clock_behind``) on the
least lag of its PROGRESS reports over ``CLOCK_JUDGEMENT`` sync intervals, a window that
spans the peer's reconnections: a peer whose connections each last less than that is judged
all the same, a stale backlog followed by fresh reports is not taken for a clock behind,
a long connection warns once, and a new incarnation is judged on its own reports. The
engine alone, as the shell drives it (HELLO, then decoded PROGRESS frames), on a simulated
monotonic and wall clock (docs/clocks.rst)."""

from __future__ import annotations

import logging

import pytest
from engines import new_engine

from gcollective._clock import millis_stamp
from gcollective._engine import Inbound, Peer
from gcollective._wire import FrameDecoder, Hello, encode_progress

WALL_NS = 1_800_000_000 * 10**9
SYNC_INTERVAL = 1.0
CLOCK_SKEW = 1.0
PEER_ID = 0x5EE
WARNING = "its clock is"


class World:
    """A member's engine and one peer, on a clock of monotonic seconds (``now``) that the
    member's wall clock follows."""

    def __init__(self) -> None:
        self.now = 0.0
        node_id = 7
        self.engine = new_engine(
            node_id, self.wall_ns, sync_interval=SYNC_INTERVAL, clock_skew=CLOCK_SKEW
        )
        self.peer = Peer(("127.0.0.1", 7001), 0.0, 1 << 20)
        self.engine.add_peer(self.peer)

    def wall_ns(self) -> int:
        return WALL_NS + int(self.now * 1e9)

    def connect(self, at: float, peer_id: int = PEER_ID) -> Inbound:
        """The peer's new connection to the member said HELLO at ``at``: its ``Inbound``."""
        self.now = at
        hello = Hello(peer_id, "127.0.0.1", 7001, 0)
        return self.engine.connection_made(self.peer, hello, at)

    def report(self, inbound: Inbound, at: float, behind: float) -> None:
        """A PROGRESS read at ``at``, stamped ``behind`` seconds behind the member's clock."""
        self.now = at
        millis = (self.wall_ns() // 1_000_000) - int(behind * 1000)
        frame = encode_progress([], False, millis_stamp(millis) | PEER_ID, 0)
        decoder = FrameDecoder(1 << 20)
        messages = decoder.feed(frame)
        self.engine.receive(inbound, messages, decoder.frames, at)


def warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(WARNING in record.getMessage() for record in caplog.records)


def test_a_peer_behind_that_reconnects_often_is_warned_about(caplog) -> None:
    """10 s behind, its connection dropping after every 1.5 sync intervals (a report when it
    connects and one a sync interval later): no connection lasts the two sync intervals a
    judgement takes, yet it is warned about within a few connections."""
    world = World()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        at = 0.0
        for _ in range(4):
            inbound = world.connect(at)
            world.report(inbound, at, behind=10.0)
            world.report(inbound, at + SYNC_INTERVAL, behind=10.0)
            at += 1.5 * SYNC_INTERVAL  # (dropped: the peer reconnects at once)
    assert warnings(caplog) >= 1, caplog.text
    assert "10.000s behind" in caplog.text


def test_a_stale_backlog_then_fresh_reports_across_a_reconnection_is_no_clock_behind(
    caplog,
) -> None:
    """The first connection's reports read in one go, 20 s late (this member was stopped),
    and the connection drops; the next one's reports are fresh: the least lag of the window
    is theirs, no warning."""
    world = World()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        inbound = world.connect(0.0)
        for stale in range(30):
            world.report(inbound, 0.0, behind=20.0 - 0.1 * stale)
        at = 0.5
        inbound = world.connect(at)
        while at < 10 * SYNC_INTERVAL:
            world.report(inbound, at, behind=0.0)
            at += SYNC_INTERVAL
    assert warnings(caplog) == 0, caplog.text


def test_a_long_connection_warns_once_and_the_next_one_again(caplog) -> None:
    world = World()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        inbound = world.connect(0.0)
        for tick in range(20):
            world.report(inbound, tick * SYNC_INTERVAL, behind=10.0)
        assert warnings(caplog) == 1, caplog.text
        inbound = world.connect(20 * SYNC_INTERVAL)
        for tick in range(20, 40):
            world.report(inbound, tick * SYNC_INTERVAL, behind=10.0)
    assert warnings(caplog) == 2, caplog.text


def test_a_new_incarnation_is_judged_on_its_own_reports(caplog) -> None:
    """An incarnation whose clock agrees reports once and goes; its successor at the same
    address, 10 s behind, is warned about: the window of the one before does not count."""
    world = World()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        inbound = world.connect(0.0)
        world.report(inbound, 0.0, behind=0.0)
        inbound = world.connect(0.5, peer_id=PEER_ID + 1)
        for tick in range(1, 10):
            world.report(inbound, tick * SYNC_INTERVAL, behind=10.0)
    assert warnings(caplog) == 1, caplog.text
