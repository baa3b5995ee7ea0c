"""A joiner's memory and CPU on the ``join`` scenario's snapshot, in one process, without the
network or the live writes (a steadier figure than the scenario's on a loaded machine).

``python -m benchmarks.join_probe make KEYS FILE`` fills a holder's store with the join's
``KEYS`` 3-level keys (``common.fill_key``, fanout 100, int values, written in order by one
member) and writes its snapshot stream, a frame a line, as a holder sends it.
``python -m benchmarks.join_probe join FILE`` reads the frames back one at a time and hands
each to a joiner's engine as its reader does (``FrameDecoder``, ``Engine.receive`` on a
connection that stages its stream, the stream merged at its end), then prints the joiner's
bytes per key (RSS after and peak, less the RSS before the first frame) and CPU seconds. The
file is version-neutral (the wire is): run ``join`` with another checkout's ``PYTHONPATH`` to
compare. Under ``valgrind --tool=callgrind`` two files of different ``KEYS`` give the
instructions per key.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

from .common import fill_key, memory

FANOUT = 100
# The joiners' stores, kept alive after ``join`` returns (for a caller that traces memory).
_kept: list[Any] = []


def _engine(node_id: int, store: Any) -> Any:
    from gcollective._clock import HybridClock
    from gcollective._engine import Engine

    return Engine(
        node_id,
        store,
        HybridClock(node_id),
        wall_ns=time.time_ns,
        advertise=("127.0.0.1", node_id & 0xFFFF),
        log_bytes=1 << 20,
        max_frame=1 << 26,
        max_queue_bytes=1 << 26,
        sync_interval=1.0,
        down_timeout=600.0,
        clock_skew=10.0,
    )


def make(keys: int, out: str) -> None:
    """Write the snapshot stream of a holder of ``keys`` fill keys to ``out``."""
    from gcollective._store import SET, Store

    store = Store()
    holder = _engine(0x1234, store)
    stamp = holder.clock.stamp
    apply = store.apply
    for index in range(keys):
        apply(stamp(), SET, tuple(fill_key(index, FANOUT).split(".")), index)
    frames, _ = holder.snapshot_stream(0.0)
    with open(out, "wb") as file:
        for frame in frames:
            file.write(frame if frame.endswith(b"\n") else frame + b"\n")


def join(path: str) -> dict[str, Any]:
    """Hand the frames of ``path`` to a new joiner as its reader and merging greenlet do;
    its bytes per key (RSS after and peak, less the RSS before) and CPU seconds."""
    from gcollective._peerstate import Inbound
    from gcollective._store import Store
    from gcollective._wire import FrameDecoder

    gc.collect()
    store = Store()
    joiner = _engine(0x5678, store)
    # (as the shell: a stream's end queues its merge, made later in steps with the GC on)
    joiner.schedule_merge = _no_merge_yet
    inbound = Inbound(None, 0x1234, {}, stages=True)
    decoder = FrameDecoder(1 << 26)
    before = memory()["rss"]
    cpu = time.process_time()
    with open(path, "rb") as file:
        for line in file:
            # (as a reader: the GC paused while a read's frames are decoded and applied)
            gc.disable()
            messages = decoder.feed(line)
            joiner.receive(inbound, messages, decoder.frames, time.monotonic())
            del messages
            gc.enable()
            while not joiner.merge_step():
                pass
    cpu = time.process_time() - cpu
    after = memory()
    keys = _count(store.data)
    _kept.append(store)
    return {
        "keys": keys,
        "after_bytes_per_key": round((after["rss"] - before) / keys, 1),
        "peak_bytes_per_key": round((after["peak_rss"] - before) / keys, 1),
        "cpu_seconds": round(cpu, 3),
        "synced": joiner.synced,
    }


def _no_merge_yet() -> None:
    pass


def _count(tree: dict[str, Any]) -> int:
    return sum(len(child) for group in tree.values() for child in group.values())


def main(argv: list[str]) -> None:
    if argv[:1] == ["make"] and len(argv) == 3:
        make(int(argv[1]), argv[2])
    elif argv[:1] == ["join"] and len(argv) == 2:
        print(json.dumps(join(argv[1])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
