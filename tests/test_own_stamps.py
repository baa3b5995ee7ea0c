"""The stamps of a node's own ``set`` (of a plain value, or of a session's small dict, with
a ttl or without), ``incr`` (with a ttl or without) and ``delete``, which take the clock's
common case (the last stamp plus one, within the millisecond of the last wall-clock stamp)
inline: the same stamps as ``HybridClock.stamp`` gives, whatever the wall clock does (a fake
one drives the node's clock) and whatever the node observed meanwhile."""

from __future__ import annotations

from cluster import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from test_clock import FakeWall

from gcollective import Collective
from gcollective._clock import millis_stamp, stamp_origin

# (set of an int, of a small dict or of one with a ttl, incr with a ttl or without, or
# delete, of a key under one parent, so that the writer's way is cached, or elsewhere; a stamp
# observed from another node), the wall clock's millisecond and nanosecond then.
ACTIONS = ["set", "set", "set", "dict", "session", "delete", "delete", "incr", "incr", "incr_ttl"]
ACTIONS += ["elsewhere", "observe"]
STEPS = st.lists(
    st.tuples(
        st.sampled_from(ACTIONS),
        st.integers(0, 3_000),
        st.sampled_from([0, 1, 999_999]),
    ),
    max_size=60,
)
BASE_MS = 1_000_000  # (the fake wall clock's millisecond 0: the node's clock is past its own)


def test_own_sets_and_deletes_take_the_stamps_the_clock_gives() -> None:
    """Each own ``set`` (a session's too), ``incr`` and ``delete`` goes out with a stamp
    greater than every stamp before it: exactly the wall clock's millisecond, or one more than
    the latest stamp so far (as ``test_clock.test_every_stamp_exceeds_everything_before_it``
    holds ``stamp`` to)."""
    node = Collective(f"127.0.0.1:{free_port()}")
    node.start()
    clock = node._clock
    wall = FakeWall(BASE_MS)
    clock._now = wall
    try:

        @settings(max_examples=150, deadline=None)
        @given(STEPS)
        def check(steps: list[tuple[str, int, int]]) -> None:
            node._flush_outbox()  # (an empty outbox: its last stamp is the last call's)
            floor = clock._last
            for number, (action, ms, ns) in enumerate(steps):
                wall.ms, wall.ns = BASE_MS + ms, ns
                if action == "observe":
                    seen = millis_stamp(BASE_MS + ms) | (ms + 1)
                    clock.observe(seen)
                    floor = max(floor, seen)
                    continue
                key = f"loop.k{number % 3}" if action != "elsewhere" else f"e{number}.k"
                if action.startswith("incr"):
                    key = f"loop.c{number % 3}"  # (a counter: a key above may hold a dict)
                if action == "delete":
                    node.delete(key)
                elif action == "dict":
                    node.set(key, {"u": number})
                elif action == "session":
                    node.set(key, {"u": number, "w": "x"}, ttl=60)
                elif action == "incr":
                    node.incr(key)
                elif action == "incr_ttl":
                    node.incr(key, 1, ttl=60)
                else:
                    node.set(key, number)
                stamp = node._outbox[-3]
                assert stamp > floor and stamp_origin(stamp) == node.node_id
                assert stamp >> 64 == max((BASE_MS + ms) << 16, (floor >> 64) + 1)
                floor = stamp

        check()
    finally:
        node.stop()
