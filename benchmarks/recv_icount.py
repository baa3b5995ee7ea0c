"""Instructions per received operation of the ``workloads`` and ``throughput`` scenarios'
frames (a steadier figure than ns on a loaded machine): a receiver decodes and applies what
the other members of a workload send.

``python -m benchmarks.recv_icount make WORKLOAD OPS FILE`` writes the frames three writers
send for ``OPS`` operations each (OPS frames of 1,024 operations, as a writer's loop without
yielding sends them, made with ``encode_ops`` and a clock per writer ticking 10 us per
operation, the writers interleaved in time); ``python -m benchmarks.recv_icount apply FILE``
decodes them (``FrameDecoder``) and applies them as a member does (the engine's
``apply_ops``, or ``Collective._apply_ops`` in releases before the engine), round robin in
the order of their times. Run ``apply`` under ``valgrind --tool=callgrind`` with the files of
two values of ``OPS``: the difference in total instructions over the difference in received
operations is the cost of one. The file is version-neutral (the wire is), so one file
measures any checkout: run ``apply`` with that checkout's interpreter and ``PYTHONPATH``.
Set ``PYTHONHASHSEED=0`` for both runs: the hash seed moves the counts by about 1 %.
``RECV_STAGE`` (``load``, ``decode``, ``parse``) stops after that step, to split the cost.

Workloads (as ``workloads._workload_run`` and ``throughput`` write them): ``distinct``
(``<w>.<j> = j``), ``sessions`` (``<w>.s<j> = {"u": j, "w": <w>}``, ttl 60 s), ``ratelimit``
(``incr(rl.k<j % 1000>, 1, ttl=60)``), ``ratelimit_late`` (the same, each round of frames
arriving newest writer first: two thirds of the hits are *late*, older than their counter's
newest hit, as most are in the scenario, where a receiver's own hits come first), ``hot``
(``incr(hot)``).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any

FRAME_OPS = 1024
WRITERS = 3
STEP_NS = 10_000  # each writer's clock moves this much per operation
TTL_MS = 60_000
COUNTER_KEYS = 1000


def _operations(workload: str, writer: str, count: int) -> tuple[list[Any], ...]:
    """(ops, paths, values, ttls or None) of one writer's loop."""
    if workload == "distinct":
        paths = [f"{writer}.{j}" for j in range(count)]
        return [0] * count, paths, list(range(count)), None
    if workload == "sessions":
        paths = [f"{writer}.s{j}" for j in range(count)]
        values = [{"u": j, "w": writer} for j in range(count)]
        return [0] * count, paths, values, [TTL_MS] * count
    if workload in ("ratelimit", "ratelimit_late"):
        paths = [f"rl.k{j % COUNTER_KEYS}" for j in range(count)]
        return [1] * count, paths, [1] * count, [TTL_MS] * count
    if workload == "hot":
        return [1] * count, ["hot"] * count, [1] * count, None
    raise SystemExit(f"unknown workload {workload!r}")


def make(workload: str, count: int, out: str) -> None:
    from gcollective._clock import NODE_BITS, HybridClock
    from gcollective._wire import encode_ops

    start = time.time_ns()
    frames: list[tuple[Any, bytes]] = []  # (the time sent, or ``ratelimit_late``'s order)
    for w in range(WRITERS):
        node_id = 0x1000 + w
        fake = [start + w * 1000]
        clock = HybridClock(node_id, now=lambda fake=fake: fake[0])
        ops, paths, values, ttls = _operations(workload, f"w{w}", count)
        hlcs = []
        for _ in range(count):
            fake[0] += STEP_NS
            hlcs.append(clock.stamp() >> NODE_BITS)
        for first in range(0, count, FRAME_OPS):
            end = first + FRAME_OPS
            frame = encode_ops(
                node_id,
                first + 1,
                hlcs[first:end],
                ops[first:end],
                paths[first:end],
                values[first:end],
                None if ttls is None else ttls[first:end],
            )
            sent = start + w * 1000 + end * STEP_NS
            # (``ratelimit_late``: each round of frames newest writer first, so the later
            # frames' hits are older than the counter's newest hit.)
            frames.append((sent if workload != "ratelimit_late" else (end, -w), frame))
    frames.sort(key=lambda item: item[0])
    with open(out, "wb") as file:  # (the writers' time, then the frames as they travel)
        file.write(b"%d\n" % (start // 1_000_000))
        file.writelines(frame for _, frame in frames)


def apply(path: str) -> None:
    import gcollective
    from gcollective._wire import FrameDecoder

    with open(path, "rb") as file:
        start_ms = int(file.readline())
        chunks = file.read().splitlines(keepends=True)  # (as a socket's reads might come)
    node = gcollective.Collective("127.0.0.1:1", ["127.0.0.1:2"])
    engine = getattr(node, "_engine", None)
    apply_ops = engine.apply_ops if engine is not None else node._apply_ops
    store = engine.store if engine is not None else node._store
    store.advance(start_ms)  # (the writers' time: none of their ttls due)
    decoder = FrameDecoder(1 << 26)
    gc.collect()
    gc.disable()  # (as a member reads: see ``Collective._received`` in ``_connections``)
    # RECV_STAGE: "apply" (all), or only the steps before: "decode", "parse"; "load": none.
    stage = os.environ.get("RECV_STAGE", "apply")
    if stage == "load":
        pass
    elif stage == "decode":
        for chunk in chunks:
            decoder.feed(chunk)
    elif stage == "parse":
        from gcollective._wire_ops import parse_ops

        for chunk in chunks:
            for message in decoder.feed(chunk):
                parse_ops(message)
    else:
        for chunk in chunks:
            for message, frame in zip(decoder.feed(chunk), decoder.frames):
                apply_ops(message, frame)
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        apply(sys.argv[2])


if __name__ == "__main__":
    main()
