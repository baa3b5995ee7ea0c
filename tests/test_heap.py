"""The C heap's trim after big sweeps (``gcollective._heap``, issue 20)."""

from __future__ import annotations

from typing import Any

import pytest

from gcollective import Collective, _heap
from gcollective._clock import MILLIS_SHIFT
from gcollective._heap import TRIM_AFTER, HeapTrimmer
from gcollective._store import DELETE, SET


def test_trims_once_enough_was_forgotten_since_the_last_trim() -> None:
    if _heap.malloc_trim_function() is None:
        pytest.skip("no malloc_trim in this C library")
    trimmer = HeapTrimmer()
    assert not trimmer.after_sweep(TRIM_AFTER - 1)
    assert trimmer.after_sweep(TRIM_AFTER)
    assert not trimmer.after_sweep(2 * TRIM_AFTER - 1)  # (counted from the last trim)
    assert trimmer.after_sweep(2 * TRIM_AFTER + 5)
    assert trimmer.trims == 2


def test_does_nothing_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_heap, "malloc_trim_function", lambda: None)
    trimmer = HeapTrimmer()
    assert not trimmer.after_sweep(10 * TRIM_AFTER)
    assert trimmer.trims == 0


def test_a_churning_store_is_trimmed_by_its_housekeeping() -> None:
    """A member's housekeeping round trims once its sweeps forgot ``TRIM_AFTER`` things."""
    if _heap.malloc_trim_function() is None:
        pytest.skip("no malloc_trim in this C library")

    node: Any = Collective("127.0.0.1:1", [])
    store = node._store
    for i in range(TRIM_AFTER):  # (keys set, then deleted: tombstones for the sweep)
        store.apply(((1000 + i) << MILLIS_SHIFT) | 1, SET, ("x", str(i)), i, None)
        store.apply(((50_000 + i) << MILLIS_SHIFT) | 1, DELETE, ("x", str(i)), None, None)
    # (A node alone, not started: every member's progress is past them, as the engine's
    # round would say.)
    node._engine.housekeep = lambda now: 100_000 << MILLIS_SHIFT
    node._gossip_round = lambda: None
    node._housekeep()
    assert store.collected >= TRIM_AFTER
    assert node._heap_trimmer.trims == 1
