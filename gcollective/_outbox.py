"""The outbox of own operations on its way out: how long a batch waits after the last one
(``next_wait``), and how it is turned into OPS frames (``outbox_columns``, ``encode_batch``).

The outbox itself is three lists of the engine's (``Engine.outbox``, ``out_special``,
``out_increments``), which the shell's hot paths hold and add to inline; ``Engine.flush``
numbers a batch, logs it and queues it for every peer with these. Sans-IO, like the engine.
"""

from __future__ import annotations

from itertools import repeat
from operator import rshift
from typing import Any

from ._clock import NODE_BITS
from ._store import INCREMENT, SET
from ._wire import encode_ops

__all__ = [
    "COALESCE_BUSY_SECONDS",
    "COALESCE_SECONDS",
    "OUTBOX_ITEMS",
    "OUTBOX_LIMIT",
    "encode_batch",
    "next_wait",
    "outbox_columns",
]

# A greenlet that sets without yielding gets its operations sent in batches of this many.
OUTBOX_LIMIT = 1024
OUTBOX_ITEMS = 3 * OUTBOX_LIMIT  # (the outbox holds three items per operation)
# After a batch went out, the next one waits until this much time has passed, so a steady
# stream of sets goes out in a few frames per millisecond rather than one frame per set (each
# frame costs a wake-up and a syscall per peer, and a decode on each peer). An idle node sends
# at once. A process too busy to flush when due (its event loop late by more than
# COALESCE_BUSY_SECONDS) waits twice as long after the next batch, up to that: a web worker
# short of CPU has its requests share frames (each frame wakes every peer, which decodes and
# applies it), and its operations wait no longer than the loop holds them up anyway. One on
# time (late by COALESCE_SECONDS at most) waits the short while again; one a little late
# keeps the wait it has. A loop a millisecond or two late is a busy machine's scheduling as
# often as this process's load (a tenth of the flushes of the latency scenario's members on
# a loaded 2-core machine, 1 % over 4 ms, against a third of a web worker's, a quarter over
# 4 ms): lengthening the wait for it only delayed the next operations (p99 at 10k sets/s
# 2.5 -> 3.1 ms). A 2 ms wait (the first and twenty-fourth looks of issue 20, in
# docs/benchmarks.rst) made a web worker's frames 1.6x larger but its CPU per request only
# some 4 % lower, within a loaded machine's noise, for every streamed operation up to a
# millisecond later (and every seed of the simulation replaying differently).
COALESCE_SECONDS = 0.001
COALESCE_BUSY_SECONDS = 0.004


def next_wait(wait: float, late: float) -> float:
    """The wait after a batch that went out ``late`` seconds after it was due, when the one
    before it waited ``wait`` (see ``COALESCE_SECONDS``)."""
    if late > COALESCE_BUSY_SECONDS:  # too busy: wait longer
        return min(2 * wait, COALESCE_BUSY_SECONDS)
    if late <= COALESCE_SECONDS:  # keeping up: the short wait
        return COALESCE_SECONDS
    return wait  # (in between: a loop a little late, busy or not, keeps the wait it has)


def outbox_columns(
    stamps: list[int], outbox: list[Any], special: list[tuple[int, int, int]], increments: list[int]
) -> tuple[list[Any], ...]:
    """The outbox as the OPS frame's columns (hlcs, ops, paths, values, and ttls if any);
    ``special`` and ``increments`` (``Engine.out_special``, ``out_increments``) are emptied."""
    size = len(stamps)
    if increments:
        if len(increments) == size:
            ops: list[int] = [INCREMENT] * size  # (a loop of ``incr``: nothing else)
        else:
            ops = [SET] * size
            for position in increments:
                ops[position // 3] = INCREMENT
        increments.clear()
    else:
        ops = [SET] * size
    ttls: list[int] | None = None
    if special:
        for index, op, ttl_ms in special:
            ops[index] = op
            if ttl_ms:
                if ttls is None:
                    ttls = [0] * size
                ttls[index] = ttl_ms
        special.clear()
    columns: tuple[list[Any], ...] = (
        list(map(rshift, stamps, repeat(NODE_BITS))),
        ops,
        outbox[1::3],
        outbox[2::3],
    )
    if ttls is not None:
        columns += (ttls,)
    return columns


def encode_batch(
    node_id: int,
    first: int,
    columns: tuple[list[Any], ...],
    max_frame: int,
    out: list[tuple[int, int, bytes]],
) -> None:
    """OPS frames of ``node_id`` for the operations in ``columns``, numbered from ``first``,
    halved until each frame is well under what a peer accepts (``max_frame``)."""
    size = len(columns[0])
    frame = encode_ops(node_id, first, *columns)
    if len(frame) > max_frame // 4 and size > 1:
        half = size // 2
        encode_batch(node_id, first, tuple(c[:half] for c in columns), max_frame, out)
        encode_batch(node_id, first + half, tuple(c[half:] for c in columns), max_frame, out)
    else:
        out.append((first, first + size - 1, frame))
