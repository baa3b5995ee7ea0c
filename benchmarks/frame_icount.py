"""Instructions per received frame of the web workload (issue 20): a receiver reads the OPS
frames three other members send, each holding ``OPS`` operations of web requests (an
``incr("hits.total")`` and a ``set("workers.<w>.last", n)`` in turn), one frame per read, as
a member reads a plain connection (``Collective._received``: decode, ``Engine.receive``,
apply, the GC paused).

``python -m benchmarks.frame_icount OPS FRAMES`` makes ``FRAMES`` such frames (the three
writers in turn, their clocks 10 us apart per operation) and reads them. Run it under
``valgrind --tool=callgrind --callgrind-out-file=/dev/null`` with two values of ``FRAMES``
and one of ``OPS`` (1, 2, 11): the difference in instructions over the difference in frames
is one frame's cost; the figure for 1 operation against 11 splits it into a part per frame
and a part per operation. Set ``PYTHONHASHSEED=0`` for both runs. ``FRAME_STAGE=make``
stops once the frames are made (to subtract their making, which is not the receiver's).
"""

from __future__ import annotations

import gc
import os
import sys
import time

WRITERS = 3
STEP_NS = 10_000  # each writer's clock moves this much per operation
SET, INCR = 0, 1


def make_frames(ops_per_frame: int, count: int) -> list[bytes]:
    """``count`` OPS frames of ``ops_per_frame`` web operations, the writers in turn."""
    from gcollective._clock import NODE_BITS, HybridClock
    from gcollective._wire import encode_ops

    start = time.time_ns() - 10_000_000_000  # (in the past: no frame ahead of our clock)
    clocks = []
    for writer in range(WRITERS):
        fake = [start + writer * 1000]
        clocks.append((fake, HybridClock(0x1000 + writer, now=lambda fake=fake: fake[0])))
    sequences = [1] * WRITERS
    hits = [0] * WRITERS
    frames = []
    for number in range(count):
        writer = number % WRITERS
        fake, clock = clocks[writer]
        ops, paths, values, hlcs = [], [], [], []
        for index in range(ops_per_frame):
            fake[0] += STEP_NS
            hlcs.append(clock.stamp() >> NODE_BITS)
            if index % 2 == 0:
                ops.append(INCR)
                paths.append("hits.total")
                values.append(1)
                hits[writer] += 1
            else:
                ops.append(SET)
                paths.append(f"workers.{writer}.last")
                values.append(hits[writer])
        frames.append(
            encode_ops(0x1000 + writer, sequences[writer], hlcs, ops, paths, values, None)
        )
        sequences[writer] += ops_per_frame
    return frames


def read_frames(frames: list[bytes], ops_per_frame: int) -> None:
    """Read ``frames`` as a member reads its three peers' connections, one frame a read."""
    import gcollective
    from gcollective._connections import _FIRST_FRAME_BYTES
    from gcollective._peerstate import Inbound
    from gcollective._wire import FRAME_KINDS, FrameDecoder

    node = gcollective.Collective("127.0.0.1:1", ["127.0.0.1:2"])
    engine = node._engine
    readers = []
    for writer in range(WRITERS):
        decoder = FrameDecoder(node.max_frame, _FIRST_FRAME_BYTES, FRAME_KINDS)
        decoder.feed(b'[1,"x"]\n')  # (a first frame: the HELLO's place, left unread)
        inbound = Inbound(None, 0x1000 + writer, {}, stages=True)
        readers.append((decoder.feed, decoder, inbound))
    received = node._received
    gc.collect()
    now = time.monotonic()
    for number, frame in enumerate(frames):
        feed, decoder, inbound = readers[number % WRITERS]
        received(feed, decoder, None, inbound, frame, now)
    applied = engine.applied_ops
    if applied != len(frames) * ops_per_frame:  # (every operation applied, once)
        raise SystemExit(f"applied {applied} operations of {len(frames) * ops_per_frame}")


def main() -> None:
    ops_per_frame = int(sys.argv[1])
    count = int(sys.argv[2])
    frames = make_frames(ops_per_frame, count)
    if os.environ.get("FRAME_STAGE") != "make":
        read_frames(frames, ops_per_frame)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
