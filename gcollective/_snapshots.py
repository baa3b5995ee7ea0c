"""A snapshot stream's frames, as a holder builds them (``snapshot_frames``) and as a joiner
queues them once whole (``StreamDue``); the engine decides when either happens (see
docs/design-engine.rst: the snapshot a member owes a peer, a stream merged whole or not at
all). Sans-IO, like the engine.
"""

from __future__ import annotations

import gc
from collections import deque
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from ._store import Store
from ._wire_snapshot import (
    LEAF_BYTES_GUESS,
    PIECE_FILL,
    encode_snapshot_parts,
    join_snapshot,
    learn_piece_size,
)

__all__ = ["SNAPSHOT_FRAME_BYTES", "StreamDue", "snapshot_frames", "without_gc"]

# A snapshot goes out in SNAPSHOT frames of about this size, each built when the previous one
# was sent: the holder exports, the wire carries and the joiner checks at the same time (it
# merges a stream at its end: see ``Inbound``).
SNAPSHOT_FRAME_BYTES = 1 << 20

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


def snapshot_frames(store: Store, max_frame: int, keys: list[str], end: bytes) -> Iterator[bytes]:
    """The SNAPSHOT frames of ``store``'s top-level ``keys``, each exported when its frame is
    built (see ``Engine.snapshot_stream``), then ``end`` (the stream's SNAPSHOT_END)."""
    export_pieces = store.export_pieces
    # Frames of about the target size, well under what the peer accepts: a subtree
    # longer than that goes in pieces (only a single value can make a frame longer,
    # and ``set`` refused values that would not fit in ``max_frame``).
    target = min(SNAPSHOT_FRAME_BYTES, max_frame // 2)
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


class StreamDue(NamedTuple):
    """A snapshot stream whose SNAPSHOT_END came, waiting for ``Engine.merge_step``: each
    staged frame's items, the frames' bytes for a data_dir's log (its SNAPSHOT_END's last),
    and its vector."""

    items: deque[list[Any]]
    frames: list[bytes]
    vector: list[tuple[int, int, int]]
