"""The hybrid logical clock (sans-IO: a fake wall clock drives it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gcollective._clock import HybridClock, millis_stamp, stamp_lead, stamp_millis, stamp_origin

NODE = 0x1234_5678_9ABC_DEF0


class FakeWall:
    def __init__(self, ms: int, ns: int = 999_999) -> None:
        self.ms = ms
        self.ns = ns  # (late in the millisecond unless told)

    def __call__(self) -> int:
        return self.ms * 1_000_000 + self.ns


def test_stamps_track_the_wall_clock_and_never_repeat() -> None:
    wall = FakeWall(1_000)
    clock = HybridClock(NODE, wall)
    first, second = clock.stamp(), clock.stamp()
    assert stamp_millis(first) == stamp_millis(second) == 1_000
    assert second == first + (1 << 64) and stamp_origin(second) == NODE
    wall.ms = 1_005
    assert clock.stamp() == millis_stamp(1_005) | NODE


def test_the_first_stamp_of_a_millisecond_is_the_wall_clocks() -> None:
    """From the first nanosecond of a new millisecond on, a stamp follows the wall clock
    again (the counter restarts), and not a nanosecond earlier."""
    wall = FakeWall(1_000, ns=0)
    clock = HybridClock(NODE, wall)
    first = clock.stamp()
    wall.ns = 999_999
    assert clock.stamp() == first + (1 << 64)
    wall.ms, wall.ns = 1_001, 0
    assert clock.stamp() == millis_stamp(1_001) | NODE


def test_a_wall_clock_stepping_back_never_moves_stamps_back() -> None:
    wall = FakeWall(2_000)
    clock = HybridClock(NODE, wall)
    before = clock.stamp()
    wall.ms = 1_000
    assert clock.stamp() == before + (1 << 64)


def test_observed_and_promised_stamps_are_passed() -> None:
    wall = FakeWall(1_000)
    clock = HybridClock(NODE, wall)
    clock.stamp()
    ahead = millis_stamp(5_000) | 7  # another node's clock is ahead
    clock.observe(ahead)
    assert clock.stamp() > ahead
    clock.observe(millis_stamp(10))  # an old stamp changes nothing
    promised = clock.promise()
    assert clock.stamp() > promised
    wall.ms = 9_000
    promised = clock.promise()
    assert stamp_millis(promised) == 9_000
    wall.ms = 8_000
    assert clock.stamp() > promised


@given(
    st.lists(
        st.tuples(st.sampled_from("spo"), st.integers(0, 3_000), st.sampled_from([0, 1, 999_999])),
        max_size=60,
    )
)
def test_every_stamp_exceeds_everything_before_it(steps: list[tuple[str, int, int]]) -> None:
    """Whatever the wall clock does, a new stamp exceeds every stamp issued, observed or
    promised before it."""
    wall = FakeWall(1_500)
    clock = HybridClock(NODE, wall)
    floor = 0
    for action, ms, ns in steps:
        wall.ns = ns
        if action == "s":
            wall.ms = ms
            stamp = clock.stamp()
            assert stamp > floor and stamp_origin(stamp) == NODE
            assert stamp_millis(stamp) >= ms  # never behind the wall clock
            # Exactly: the wall clock's millisecond, or one more than the latest so far.
            assert stamp >> 64 == max(ms << 16, (floor >> 64) + 1)
            floor = stamp
        elif action == "p":
            wall.ms = ms
            floor = max(floor, clock.promise())
        else:
            seen = millis_stamp(ms) | (ms + 1)
            clock.observe(seen)
            floor = max(floor, seen)


def test_stamp_lead_is_how_far_a_stamp_is_ahead_of_a_wall_clock() -> None:
    """What the clock_skew rule compares (tests/test_clock_skew.py): to the millisecond,
    whatever the logical counter and origin."""
    now_ns = 5_000 * 1_000_000 + 999_999
    assert stamp_lead(millis_stamp(7_500) | NODE, now_ns) == 2.5
    assert stamp_lead((millis_stamp(4_000) + (3 << 64)) | NODE, now_ns) == -1.0
    assert stamp_lead(((1 << 64) - 1) << 64, now_ns) > 1e11  # the last hlc the wire carries
