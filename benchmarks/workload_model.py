"""The ``workloads`` scenario without member processes (issue 20), for instruction counts: 4
members in this process, connected over loopback, each running the member command of a
workload (``benchmarks.member.Driver``: the same loops) in a greenlet of its own, all at
once, until every member holds everyone's operations.

``python -m benchmarks.workload_model WORKLOAD OPS`` (``distinct``, ``sessions``,
``rate_limit``, ``hot_counter``; ``OPS`` per member) prints the CPU time per operation. For
a steady figure run it under ``valgrind --tool=callgrind --callgrind-out-file=/dev/null``
with two values of ``OPS`` (e.g. 4,000 and 12,000; ``rate_limit`` a multiple of its 1,000
keys): the difference in instructions over the difference in operations (4 members' worth)
is the whole cluster's cost of one operation, as a round of the scenario pays it. The
cyclic GC runs as in a member, but over all four stores (one heap): ``MODEL_GC=0`` turns it
off to leave it out. Set ``PYTHONHASHSEED`` alike in both runs.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402

from benchmarks.member import Driver  # noqa: E402
from benchmarks.procs import free_ports  # noqa: E402
from gcollective import Collective  # noqa: E402

MEMBERS = 4
COUNTER_KEYS = 1000  # (as the scenario's ``workload_counter_keys``)
LIMIT = 600.0


def _requests(workload: str, ops: int, tag: str) -> list[tuple[str, dict]]:
    """The command each member gets for one round of ``workload`` (as
    ``workloads._workload_run`` sends them)."""
    if workload == "distinct":
        writers = [f"{tag}d{k}" for k in range(MEMBERS)]
        return [
            ("write_and_wait", {"prefix": w, "count": ops, "writers": writers, "limit": LIMIT})
            for w in writers
        ]
    if workload == "sessions":
        writers = [f"{tag}s{k}" for k in range(MEMBERS)]
        request = {"count": ops, "writers": writers, "ttl": 60, "limit": LIMIT, "check": False}
        return [("sessions_and_wait", {**request, "prefix": w}) for w in writers]
    if workload == "rate_limit":
        request = {
            "prefix": f"{tag}rl",
            "keys": COUNTER_KEYS,
            "count": ops,
            "ttl": 60,
            "expected": MEMBERS * ops // COUNTER_KEYS,
            "limit": LIMIT,
        }
        return [("incr_keys_and_wait", request)] * MEMBERS
    if workload == "hot_counter":
        request = {"key": f"{tag}hot", "count": ops, "expected": MEMBERS * ops, "limit": LIMIT}
        return [("incr_and_wait", request)] * MEMBERS
    raise SystemExit(f"unknown workload {workload!r}")


def _round(drivers: list[Driver], workload: str, ops: int, tag: str) -> None:
    """Every member runs its command of ``workload`` at once; each must complete."""
    jobs = [
        gevent.spawn(getattr(driver, f"cmd_{command}"), request)
        for driver, (command, request) in zip(drivers, _requests(workload, ops, tag))
    ]
    gevent.joinall(jobs, raise_error=True)
    for job in jobs:
        if not job.value["complete"] or not job.value.get("exact", True):
            raise SystemExit(f"{workload}: a member did not complete exactly: {job.value}")


def main() -> None:
    workload, ops = sys.argv[1], int(sys.argv[2])
    addresses = [f"127.0.0.1:{port}" for port in free_ports(MEMBERS)]
    drivers = []
    for address in addresses:
        driver = Driver()
        driver.node = Collective(address, [a for a in addresses if a != address])
        drivers.append(driver)
    gevent.joinall([gevent.spawn(d.node.start, 30) for d in drivers], raise_error=True)
    _round(drivers, workload, 1000, "warm")  # (links up, every path warm)
    if os.environ.get("MODEL_GC") == "0":
        gc.disable()
    began = time.process_time()
    _round(drivers, workload, ops, "run")
    cpu = time.process_time() - began
    print(f"{workload}: CPU per operation {cpu / (MEMBERS * ops) * 1e6:.2f} us", file=sys.stderr)
    sys.stderr.flush()
    os._exit(0)  # (nothing to tear down: the counts are taken)


if __name__ == "__main__":
    main()
