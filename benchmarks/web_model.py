"""The web workload's collective without HTTP (issue 20), for instruction counts: 4 members in
this process, connected over loopback; each tick every member makes ``REQUESTS`` requests (an
``incr`` of a shared counter and a ``set``, as ``web_app.py`` does), then the process waits
until every member holds every increment. A tick is one frame per member (ticks are further
apart than the coalescing window), so the per-frame costs (a flush, a send to each peer, a
read, decode and apply on each) show as they do in a web worker.

``python -m benchmarks.web_model TICKS [REQUESTS]`` prints the CPU time per request. For a
steady figure run it under ``valgrind --tool=callgrind --callgrind-out-file=/dev/null`` with
two values of ``TICKS`` (e.g. 100 and 300): the difference in instructions over the
difference in ticks is one tick's cost. ``sync_interval`` is 30 s, so no PROGRESS or sweep
runs meanwhile however slow the run.
"""

from __future__ import annotations

import os
import sys
import time

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402

from benchmarks.procs import free_ports  # noqa: E402
from gcollective import Collective  # noqa: E402

MEMBERS = 4
WARMUP_TICKS = 20
POLL_SECONDS = 0.005  # (a few gets per poll: little beside a tick's frames)


def connected(nodes: list[Collective]) -> bool:
    return all(
        node.running
        and sum(link.state == "connected" for link in node._links.values()) == MEMBERS - 1
        for node in nodes
    )


def main() -> None:
    ticks = int(sys.argv[1])
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    addresses = [f"127.0.0.1:{port}" for port in free_ports(MEMBERS)]
    nodes = [
        Collective(address, [a for a in addresses if a != address], sync_interval=30.0)
        for address in addresses
    ]
    for node in nodes:
        gevent.spawn(node.start, 10)
    deadline = time.monotonic() + 60
    while not connected(nodes):
        if time.monotonic() > deadline:
            raise TimeoutError("the members did not connect")
        gevent.sleep(0.01)
    total = 0

    def tick() -> None:
        nonlocal total
        for number, node in enumerate(nodes):
            for _ in range(requests):
                node.set(f"workers.{number}.last", node.incr("hits.total"))
        total += MEMBERS * requests
        while any(node.get("hits.total") != total for node in nodes):
            gevent.sleep(POLL_SECONDS)

    for _ in range(WARMUP_TICKS):
        tick()
    began = time.process_time()
    for _ in range(ticks):
        tick()
    cpu = time.process_time() - began
    print(f"CPU per request: {cpu / (ticks * MEMBERS * requests) * 1e6:.1f} us", file=sys.stderr)
    sys.stderr.flush()
    os._exit(0)  # (nothing to tear down: the counts are taken)


if __name__ == "__main__":
    main()
