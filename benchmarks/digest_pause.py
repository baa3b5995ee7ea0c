"""How long ``verify``'s digest walk and the metrics' metadata count take on a big tree, and
the longest pause they cause to the member's other greenlets (its hub).

    python -m benchmarks.digest_pause [--keys 2000000]

Fills one member (no peers) with ``--keys`` keys, twice: as that many top-level keys, then
as that many entries under one top-level key; times ``_digest.digest_reply`` and
``_metrics.metadata_entries`` while a greenlet measures how late its 1 ms sleeps wake up.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

import gevent

import gcollective
from gcollective._digest import digest_reply


def fill(node, count: int, nested: bool) -> None:
    for i in range(count):
        node.set(f"users.u{i}" if nested else f"u{i}", i)
        if i % 10000 == 0:
            gevent.sleep(0)


def worst_lateness(work) -> tuple[float, float, object]:
    """Run ``work()``; return (its seconds, the hub's worst lateness in seconds, result)."""
    worst = [0.0]
    done = [False]

    def ticker() -> None:
        while not done[0]:
            before = time.perf_counter()
            gevent.sleep(0.001)
            worst[0] = max(worst[0], time.perf_counter() - before - 0.001)

    watcher = gevent.spawn(ticker)
    gevent.sleep(0.01)
    began = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - began
    done[0] = True
    watcher.join()
    return seconds, worst[0], result


def measure(count: int, nested: bool) -> dict:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = gcollective.Collective(f"127.0.0.1:{port}")
    node.start(timeout=0.1)
    try:
        fill(node, count, nested)
        seconds, late, reply = worst_lateness(lambda: digest_reply(node))
        out = {
            "shape": f"{count} keys under one top-level key"
            if nested
            else f"{count} top-level keys",
            "digest_seconds": round(seconds, 2),
            "digest_longest_slice_ms": round(reply["longest_slice_seconds"] * 1000, 1),
            "digest_hub_worst_lateness_ms": round(late * 1000, 1),
        }
        try:
            from gcollective._metrics import metadata_entries

            seconds, late, entries = worst_lateness(lambda: metadata_entries(node._store))
            out.update(
                metadata_entries=entries,
                metadata_seconds=round(seconds, 2),
                metadata_hub_worst_lateness_ms=round(late * 1000, 1),
            )
        except ImportError:
            pass
        return out
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2_000_000)
    args = parser.parse_args()
    for nested in (False, True):
        print(json.dumps(measure(args.keys, nested)), flush=True)


if __name__ == "__main__":
    main()
