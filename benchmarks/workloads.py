"""What web apps do, measured cluster-wide (issue 20), and redis-py against a local
redis-server for scale (each a scenario of ``benchmarks.run``)."""

from __future__ import annotations

import importlib.util
import statistics
from typing import Any

from benchmarks.config import Config, Progress
from benchmarks.procs import (
    Group,
    Member,
    RedisServer,
    add_members,
    free_port,
    free_ports,
    start_all,
    warm,
)
from benchmarks.profiling import WindowProfiler

# -- redis for scale ----------------------------------------------------------------------


def redis_compare(cfg: Config, progress: Progress) -> dict[str, Any]:
    """get / set / incr through redis-py under gevent against a local redis-server."""
    if importlib.util.find_spec("redis") is None:
        note = "skipped: redis-py is not installed (pip install redis)"
        progress(f"redis: {note}")
        return {"skipped": note}
    with RedisServer() as server:
        if not server.available:
            note = "skipped: redis-server is not on PATH"
            progress(f"redis: {note}")
            return {"skipped": note}
        progress(f"redis: {cfg.redis_ops:,} get/set/incr through redis-py ({server.version})")
        with Group() as group:
            client = group.add(Member(free_port(), [], name="redis-client", max_seconds=300))
            result = client.call("redis_ops", timeout=300, port=server.port, count=cfg.redis_ops)
    result["server"] = server.version
    return result


# -- what web apps do, cluster-wide -------------------------------------------

#: The workloads of ``app_workloads``: distinct keys (the reference), one hot counter,
#: sessions (small dicts with a ttl, read back), a rate limiter (counters with a ttl).
APP_WORKLOADS = ("distinct", "hot_counter", "sessions", "rate_limit")


def app_workloads(cfg: Config, progress: Progress) -> dict[str, Any]:
    """Cluster-wide operations/s of each of ``APP_WORKLOADS``: ``workload_members`` processes
    each make ``workload_ops`` operations (``workload_sessions`` sessions) without yielding;
    the time runs from the first start until every member holds everyone's. Rounds of all
    four run in turn (``workload_repeats``) on the same members; each figure is the median
    round, with its ratio to the distinct-keys figure of the same round. ``exact``: every
    member of every round checked every value (counters exact, every session there with its
    value)."""
    count = cfg.workload_members
    rounds: list[dict[str, Any]] = []
    ports = free_ports(count)
    with Group() as group:
        members = add_members(group, ports, ports, cfg)
        start_all(members)
        warm(members, "warm")
        for round_ in range(cfg.workload_repeats):
            figures = {}
            for name in APP_WORKLOADS:
                progress(f"workloads: round {round_ + 1}, {name}, {count} processes")
                figures[name] = _workload_run(cfg, members, name, f"r{round_}")
            rounds.append(figures)
    result: dict[str, Any] = {"processes": count, "rounds": rounds}
    for name in APP_WORKLOADS:
        result[name] = {
            "ops_per_second": statistics.median(r[name]["ops_per_second"] for r in rounds),
            "x_distinct": statistics.median(
                r[name]["ops_per_second"] / r["distinct"]["ops_per_second"] for r in rounds
            ),
            "ops_each": rounds[0][name]["ops_each"],
            "cpu_us_per_op": statistics.median(r[name]["cpu_us_per_op"] for r in rounds),
            "gc_us_per_op": statistics.median(r[name]["gc_us_per_op"] for r in rounds),
            "exact": all(r[name]["exact"] for r in rounds),
        }
    return result


def _workload_run(cfg: Config, members: list[Member], name: str, tag: str) -> dict[str, Any]:
    """One workload of ``app_workloads`` on every member at once."""
    count = len(members)
    limit = cfg.workload_limit
    ops = cfg.workload_sessions if name == "sessions" else cfg.workload_ops
    profiler = WindowProfiler(cfg.profile_dir, f"workload-{name}-{tag}", members)
    profiler.start()
    for i, member in enumerate(members):
        if name == "distinct":
            writers = [f"{tag}d{k}" for k in range(count)]
            member.send(
                "write_and_wait", prefix=writers[i], count=ops, writers=writers, limit=limit
            )
        elif name == "hot_counter":
            member.send(
                "incr_and_wait", key=f"{tag}hot", count=ops, expected=count * ops, limit=limit
            )
        elif name == "sessions":
            writers = [f"{tag}s{k}" for k in range(count)]
            member.send(
                "sessions_and_wait",
                prefix=writers[i],
                count=ops,
                writers=writers,
                ttl=60,
                limit=limit,
            )
        else:
            keys = cfg.workload_counter_keys
            member.send(
                "incr_keys_and_wait",
                prefix=f"{tag}rl",
                keys=keys,
                count=ops,
                ttl=60,
                expected=count * ops // keys,
                limit=limit,
            )
    replies = [m.receive(limit + 60) for m in members]
    profile = profiler.stop()
    seconds = max(r["done"] for r in replies) - min(r["started"] for r in replies)
    return {
        **({"profile": profile} if profile else {}),
        "ops_each": ops,
        "seconds": seconds,
        "ops_per_second": count * ops / seconds,
        # Every member's CPU (and the cyclic GC's part of it) per operation, from its start
        # to its done: the cluster's cost of one, steadier than the time on a busy machine.
        "cpu_us_per_op": sum(r["cpu_seconds"] for r in replies) / (count * ops) * 1e6,
        "gc_us_per_op": sum(r["gc_seconds"] for r in replies) / (count * ops) * 1e6,
        "exact": all(r["complete"] and r.get("exact", True) for r in replies),
    }
