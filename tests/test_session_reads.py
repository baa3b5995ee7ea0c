"""A session's read (``get``) checks for a due expiry against a float mirror of the next
expiry's millisecond (``_Background._next_due_float``), and a session's set gives the store
and ``_due_by`` its expiry's millisecond shifted once (``Ways.assign_flat``'s ``due``): a get
reads a session as missing from its expiry on, as the expiry rule says (a reference computed
here from each set's stamp and ttl), whichever way (the writer's run of sessions or the
general one) the set took."""

from __future__ import annotations

import time
from typing import Any

from cluster import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from test_clock import FakeWall

from gcollective import Collective
from gcollective._clock import MILLIS_SHIFT

# Each step lets this many ms pass (so that reads fall just before, at and just after the
# sessions' due times), then sets a session (under one parent, so that the writer's way is
# cached, or under another) with this ttl (s).
STEPS = st.lists(
    st.tuples(st.sampled_from([0, 1, 250, 999, 1_000]), st.booleans(), st.integers(1, 3)),
    min_size=1,
    max_size=30,
)


def test_a_sessions_get_reads_it_missing_from_its_expiry_on() -> None:
    """After each set, every session set so far reads as its value before its due time and
    as missing from it on, and the float mirror of the next expiry is the next expiry. The
    node's wall clock and the reads' (``time.time``) are one fake clock, moved by the steps
    only; nothing yields meanwhile, so the expirer greenlet never runs: what expires is what
    the reads fire. (A node per example: its clock never goes back.)"""

    @settings(max_examples=60, deadline=None)
    @given(STEPS)
    def check(steps: list[tuple[int, bool, int]]) -> None:
        node = Collective(f"127.0.0.1:{free_port()}")
        node.start()
        wall = FakeWall(int(time.time() * 1000) + 1_000, 0)
        node._clock._now = wall
        real_time = time.time
        time.time = lambda: wall.ms / 1000  # type: ignore[assignment]  # (restored below)
        try:
            set_so_far: dict[str, tuple[int, dict[str, Any]]] = {}
            for number, (gap, loop, ttl) in enumerate(steps):
                wall.ms += gap
                key = f"s.k{number}" if loop else f"o{number}.k"
                value: dict[str, Any] = {"u": number, "w": "x"}
                node.set(key, value, ttl=ttl)
                stamp = node._outbox[-3]
                set_so_far[key] = ((stamp >> MILLIS_SHIFT) + ttl * 1000, value)
                assert node._next_due_float == node._next_due
                for earlier, (due, expected) in set_so_far.items():
                    assert node.get(earlier) == (expected if due > wall.ms else None), earlier
                    assert node._next_due_float == node._next_due
        finally:
            time.time = real_time  # type: ignore[assignment]
            node.stop()

    check()
