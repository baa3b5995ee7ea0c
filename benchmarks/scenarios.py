"""The six measurements of issue 6, each a function of a ``Config`` returning plain data.

Every multi-process scenario runs real member processes on 127.0.0.1 with ports from the OS,
bounds every wait, and stops its processes when it ends, whatever happened.
"""

from __future__ import annotations

import importlib.util
import math
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks.common import fill_key
from benchmarks.procs import (
    Group,
    Member,
    Proxy,
    RedisServer,
    broadcast,
    free_port,
    free_ports,
    start_all,
)
from benchmarks.profiling import WindowProfiler

Progress = Callable[[str], None]


@dataclass
class Config:
    """Sizes of every scenario; ``Config.full()`` is the issue's, ``Config.quick()`` a smoke run."""

    name: str
    local_peers: list[int] = field(default_factory=lambda: [0, 3, 7])
    local_ops_per_batch: int = 10_000
    local_batches: int = 5
    throughput: list[tuple[int, int]] = field(
        default_factory=lambda: [(2, 50_000), (4, 50_000), (8, 25_000)]
    )
    # Each throughput run is repeated and the median one reported: on a shared machine one
    # run's figure can be off by 2x.
    throughput_repeats: int = 3
    hot_increments: int = 1_000
    hot_limit: float = 90.0
    latency_members: int = 4
    latency_rates: list[int] = field(default_factory=lambda: [1_000, 10_000])
    latency_seconds: float = 5.0
    join_keys: int = 2_000_000
    join_fanout: int = 100
    join_live_rate: int = 1_000
    join_limit: float = 180.0
    catchup_members: int = 4
    catchup_rate: int = 5_000
    catchup_partition_seconds: float = 10.0
    redis_ops: int = 10_000
    member_max_seconds: float = 900.0
    profile_dir: str | None = None

    @classmethod
    def full(cls) -> Config:
        return cls("full")

    @classmethod
    def quick(cls) -> Config:
        return cls(
            "quick",
            local_ops_per_batch=1_000,
            local_batches=2,
            throughput=[(2, 5_000), (4, 5_000), (8, 2_500)],
            throughput_repeats=1,
            hot_increments=100,
            hot_limit=20.0,
            latency_seconds=1.0,
            join_keys=100_000,
            join_live_rate=500,
            join_limit=60.0,
            catchup_partition_seconds=2.0,
            redis_ops=500,
            member_max_seconds=120.0,
        )


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def wait_listening(port: int, limit: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + limit
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {limit}s") from None
            time.sleep(0.01)


def core_stats(members: list[Member]) -> dict[str, int] | None:
    """Totals over members of the core's own counters (``Collective.stats()``), if it has them.

    ``received_ops`` above ``applied_ops`` means duplicate deliveries (relays, replays);
    ``overflows`` and ``snapshots_sent`` show queues dropped and full resyncs.
    """
    totals: dict[str, int] = {}
    for member in members:
        stats = member.call("stats")["stats"]
        if not stats:
            return None
        for name in ("local_ops", "received_ops", "applied_ops"):
            totals[name] = totals.get(name, 0) + int(stats.get(name) or 0)
        for peer in stats.get("peers", {}).values():
            for name in ("relayed_frames", "overflows", "snapshots_sent", "connects"):
                totals[name] = totals.get(name, 0) + int(peer.get(name) or 0)
    return totals


def _members(group: Group, ports: list[int], peers: list[int], cfg: Config) -> list[Member]:
    return [
        group.add(Member(port, peers, name=f"m{i}:{port}", max_seconds=cfg.member_max_seconds))
        for i, port in enumerate(ports)
    ]


def _warm(members: list[Member], tag: str, limit: float = 30.0) -> None:
    """Every member writes one key and waits for everyone's: all links are up both ways."""
    prefixes = [f"{tag}{i}" for i in range(len(members))]
    for i, member in enumerate(members):
        member.send("write_and_wait", prefix=prefixes[i], count=1, writers=prefixes, limit=limit)
    for member in members:
        reply = member.receive(limit + 30)
        if not reply["complete"]:
            raise RuntimeError(f"{member.name}: the cluster did not connect within {limit}s")


# -- 1. local operations -------------------------------------------------------------------


def local_ops(cfg: Config, progress: Progress) -> dict[str, Any]:
    """ns per get / set / incr at depths 1-5 with 0/3/7 peers, and a plain dict."""
    progress(
        f"local ops: depths 1-5, peers {cfg.local_peers}, "
        f"{cfg.local_batches} x {cfg.local_ops_per_batch:,} ops per figure"
    )
    with Group() as group:
        runner = group.add(Member(free_port(), [], name="local-ops", max_seconds=600))
        result = runner.call(
            "local_ops",
            timeout=600,
            args={
                "peer_counts": cfg.local_peers,
                "ops_per_batch": cfg.local_ops_per_batch,
                "batches": cfg.local_batches,
            },
        )
    result["peers_are"] = "in-process nodes over loopback TCP"
    return result


# -- 2. replication throughput -------------------------------------------------------------


def throughput(cfg: Config, progress: Progress) -> dict[str, Any]:
    """N members each write K distinct keys without yielding; time until all hold N x K.

    Each run is repeated ``cfg.throughput_repeats`` times (once when profiling), with new
    members each time; the run with the median sets/s is reported, with every attempt's
    figures under ``repeats``."""
    runs = []
    repeats = 1 if cfg.profile_dir else max(1, cfg.throughput_repeats)
    for count, keys in cfg.throughput:
        attempts = [_throughput_run(cfg, progress, count, keys) for _ in range(repeats)]
        ranked = sorted(attempts, key=lambda attempt: attempt["sets_per_second"])
        run = ranked[(len(ranked) - 1) // 2]
        if repeats > 1:
            run["complete"] = all(attempt["complete"] for attempt in attempts)
            run["repeats"] = [
                {
                    key: attempt[key]
                    for key in ("seconds", "sets_per_second", "cpu_us_per_key", "complete")
                }
                for attempt in attempts
            ]
            figures = [attempt["sets_per_second"] for attempt in attempts]
            progress(
                f"throughput: {count} x {keys:,}: median of {repeats} runs "
                f"{run['sets_per_second']:,.0f} sets/s ({min(figures):,.0f}-{max(figures):,.0f})"
            )
        runs.append(run)
    return {"runs": runs}


def _throughput_run(cfg: Config, progress: Progress, count: int, keys: int) -> dict[str, Any]:
    """One throughput run (see ``throughput``) with ``count`` new members."""
    progress(f"throughput: {count} processes x {keys:,} keys")
    ports = free_ports(count)
    with Group() as group:
        members = _members(group, ports, ports, cfg)
        start_all(members)
        _warm(members, "warm")
        writers = [f"w{i}" for i in range(count)]
        limit = 60 + keys * count / 10_000
        profiler = WindowProfiler(cfg.profile_dir, f"throughput-{count}x{keys}", members)
        profiler.start()
        for i, member in enumerate(members):
            member.send(
                "write_and_wait", prefix=writers[i], count=keys, writers=writers, limit=limit
            )
        replies = [m.receive(limit + 60) for m in members]
        profile = profiler.stop()
        began = min(r["started"] for r in replies)
        ended = max(r["done"] for r in replies)
        complete = all(r["complete"] for r in replies)
        leaves = [m.call("leaves")["leaves"] for m in members]
        counters = core_stats(members)
        memory = members[0].call("memory")
        hot_each = min(keys, cfg.hot_increments)
        progress(f"throughput: hot counter, {count} processes x {hot_each:,} increments")
        for member in members:
            member.send(
                "incr_and_wait",
                key="hot",
                count=hot_each,
                expected=count * hot_each,
                limit=cfg.hot_limit,
            )
        hot = [m.receive(cfg.hot_limit + 120) for m in members]
        hot_began = min(r["started"] for r in hot)
        hot_ended = max(r["done"] for r in hot)
        hot_memory = members[0].call("memory")
    seconds = ended - began
    hot_seconds = hot_ended - hot_began
    run = {
        "processes": count,
        "keys_each": keys,
        "total_keys": count * keys,
        "key_shape": "w<i>.<j> (2 levels)",
        "seconds": seconds,
        "sets_per_second": count * keys / seconds,
        "complete": complete and all(n == count * keys + count for n in leaves),
        "leaves": leaves,
        "local_write_seconds": [r["written"] - r["started"] for r in replies],
        "local_sets_per_second": statistics.mean(
            keys / (r["written"] - r["started"]) for r in replies
        ),
        # CPU seconds of all members together until each held every key, per key written:
        # the cost of a key (one set, count - 1 receptions) whatever the scheduling did.
        "cpu_seconds": [r["cpu_seconds"] for r in replies],
        "cpu_write_seconds": [r["cpu_write_seconds"] for r in replies],
        "cpu_us_per_key": sum(r["cpu_seconds"] for r in replies) / (count * keys) * 1e6,
        "rss_after": memory["memory"]["rss"],
        "hot_counter": {
            "increments_each": hot_each,
            "limit": cfg.hot_limit,
            "seconds": hot_seconds,
            "increments_per_second": count * hot_each / hot_seconds,
            "complete": all(r["complete"] for r in hot),
            "values": [r["value"] for r in hot],
            "rss_growth": hot_memory["memory"]["rss"] - memory["memory"]["rss"],
        },
    }
    if counters:
        run["core_stats"] = counters
    if profile:
        run["profile"] = profile
    progress(
        f"throughput: {count} x {keys:,}: {seconds:.2f}s, "
        f"{run['sets_per_second']:,.0f} sets/s, {run['cpu_us_per_key']:.2f} us CPU per key; "
        f"hot counter {hot_seconds:.2f}s, "
        f"{run['hot_counter']['increments_per_second']:,.0f} incr/s"
    )
    return run


# -- 3. propagation latency ----------------------------------------------------------------


def latency(cfg: Config, progress: Progress) -> dict[str, Any]:
    """p50 / p99 / max from ``set`` on one member until applied on all others, at fixed loads.

    Every member writes ``rate / N`` sets per second (open loop) to keys that it overwrites in a
    cycle of 1000; a probe in every member records when each remote set is applied.
    """
    count = cfg.latency_members
    ports = free_ports(count)
    names = [f"n{i}" for i in range(count)]
    runs = []
    with Group() as group:
        members = _members(group, ports, ports, cfg)
        start_all(members)
        _warm(members, "warm")
        broadcast(members, "probe", prefix="lat")
        for round_number, rate in enumerate(cfg.latency_rates):
            progress(
                f"latency: {count} processes, {rate:,} sets/s offered for {cfg.latency_seconds}s"
            )
            for i, member in enumerate(members):
                member.send(
                    "pace_start",
                    prefix="lat",
                    name=names[i],
                    rate=rate / count,
                    cycle=1000,
                    record=True,
                )
            for member in members:
                member.receive(30)
            time.sleep(cfg.latency_seconds)
            stops = broadcast(members, "pace_stop")
            _warm(members, f"settle{round_number}.")  # FIFO links: everything sent has arrived
            dumps = broadcast(members, "probe_dump")
            runs.append(_latency_figures(rate, cfg.latency_seconds, names, stops, dumps))
            progress(
                f"latency: {rate:,}/s: p50 {runs[-1]['p50_ms']:.2f} ms, "
                f"p99 {runs[-1]['p99_ms']:.2f} ms, max {runs[-1]['max_ms']:.2f} ms"
            )
    return {"processes": count, "writers": "every member writes rate/N", "runs": runs}


def _latency_figures(
    rate: int, seconds: float, names: list[str], stops: list[dict[str, Any]], dumps: list[Any]
) -> dict[str, Any]:
    warmup = seconds * 0.1
    to_all: list[float] = []
    to_each: list[float] = []
    lost = 0
    sent = 0
    for i, origin in enumerate(names):
        sends = stops[i]["sends"]
        first = stops[i]["started"] + warmup
        arrivals = []
        for j, dump in enumerate(dumps):
            if j != i:
                arrivals.append({seq: t for seq, t in dump["arrivals"].get(origin, [])})
        for seq, sent_at in enumerate(sends):
            if sent_at < first:
                continue
            sent += 1
            times = [a.get(seq) for a in arrivals]
            if any(t is None for t in times):
                lost += 1
                continue
            delays = [t - sent_at for t in times]  # type: ignore[operator]
            to_each.extend(delays)
            to_all.append(max(delays))
    achieved = sum(s["count"] for s in stops) / max(s["elapsed"] for s in stops)
    if not to_all:
        raise RuntimeError(f"latency at {rate}/s: no operation was measured")
    return {
        "offered_rate": rate,
        "achieved_rate": achieved,
        "seconds": seconds,
        "measured_ops": sent,
        "lost": lost,
        "max_writer_lag_ms": max(s["max_lag"] for s in stops) * 1000,
        "p50_ms": _percentile(to_all, 0.50) * 1000,
        "p99_ms": _percentile(to_all, 0.99) * 1000,
        "max_ms": max(to_all) * 1000,
        "mean_ms": statistics.mean(to_all) * 1000,
        "each_p50_ms": _percentile(to_each, 0.50) * 1000,
        "each_p99_ms": _percentile(to_each, 0.99) * 1000,
    }


# -- 4. join ----------------------------------------------------------------------------------


def join(cfg: Config, progress: Progress) -> dict[str, Any]:
    """A member joins two members holding ``join_keys`` 3-level keys while writes continue."""
    total, fanout = cfg.join_keys, cfg.join_fanout
    ports = free_ports(3)
    with Group() as group:
        holders = _members(group, ports[:2], ports[:2], cfg)
        starts = start_all(holders)
        _warm(holders, "warm")
        holder, replica = holders
        chunk = max(10_000, total // 20)
        began = time.monotonic()
        for begin in range(0, total, chunk):
            end = min(total, begin + chunk)
            holder.call("fill", timeout=600, begin=begin, end=end, fanout=fanout)
            progress(
                f"join: filling {end:,} / {total:,} keys "
                f"({time.monotonic() - began:.1f}s, replicated to a second member)"
            )
        limit = 60 + total / 10_000
        reply = replica.call(
            "wait_keys", timeout=limit + 60, keys=[fill_key(total - 1, fanout)], limit=limit
        )
        if not reply["complete"]:
            counters = core_stats(holders)
            raise RuntimeError(
                f"join: the replica did not receive the fill within {limit:.0f}s after it was "
                f"written (core counters: {counters})"
            )
        fill_seconds = time.monotonic() - began
        fill_counters = core_stats(holders)
        holder_memory = holder.call("memory")["memory"]
        replica_memory = replica.call("memory")["memory"]
        progress(f"join: measuring a plain dict of {total:,} keys")
        plain = group.add(Member(free_port(), [], name="plain-dict", max_seconds=600))
        plain_reply = plain.call("plain_dict", timeout=600, count=total, fanout=fanout)
        plain.close()
        for i, member in enumerate(holders):
            member.call(
                "pace_start", prefix="live", name=f"n{i}", rate=cfg.join_live_rate / 2, cycle=0
            )
        progress(
            f"join: a new member joins {total:,} keys while {cfg.join_live_rate:,} sets/s continue"
        )
        joiner = group.add(
            Member(ports[2], ports, name="joiner", max_seconds=cfg.member_max_seconds)
        )
        profiler = WindowProfiler(cfg.profile_dir, "join", [*holders, joiner])
        profiler.start()
        joined = joiner.call(
            "join",
            timeout=cfg.join_limit + 60,
            local=joiner.local,
            peers=joiner.peers,
            options={},
            limit=cfg.join_limit,
        )
        profile = profiler.stop()
        join_seconds = joined["synced_at"] - joined["started"] if joined["synced"] else None
        if join_seconds is None:
            progress(f"join: NOT synced within {cfg.join_limit:.0f}s")
        else:
            progress(
                f"join: synced in {join_seconds:.2f}s (the joiner's CPU: "
                f"{joined['cpu_seconds']:.2f}s); letting live writes run 1s more"
            )
        time.sleep(1.0)
        stops = broadcast(holders, "pace_stop")
        wait = 120 if joined["synced"] else 10
        caught = joiner.call(
            "wait_keys", timeout=wait + 60, keys=[s["last_key"] for s in stops], limit=wait
        )
        missing: list[str] = []  # live writes some holder has and the joiner lacks
        for name in ("n0", "n1"):
            have = set(joiner.call("keys", prefix=["live", name])["keys"])
            for member in holders:
                want = member.call("keys", prefix=["live", name])["keys"]
                missing.extend(f"live.{name}.{k}" for k in want if k not in have)
        missing = sorted(set(missing))
        counters = core_stats([*holders, joiner])
        holders_after = [m.call("memory")["memory"] for m in holders]
        joiner_memory = joiner.call("memory")["memory"]
        leaves = [m.call("leaves", timeout=300)["leaves"] for m in [*holders, joiner]]
    live_total = sum(s["count"] for s in stops)
    holder_base = starts[0]["baseline"]["rss"]
    replica_base = starts[1]["baseline"]["rss"]
    joiner_base = joined["baseline"]["rss"]
    result = {
        "keys": total,
        "key_shape": f"g<a>.s<b>.k<c>, {total // (fanout * fanout)} x {fanout} x {fanout}",
        "fill_seconds": fill_seconds,
        "fill_core_stats": fill_counters,
        "join_seconds": join_seconds,
        "join_limit": cfg.join_limit,
        "start_returned_seconds": joined["returned"] - joined["started"],
        "joiner_cpu_seconds": joined["cpu_seconds"],
        "synced": joined["synced"],
        "caught_up": caught["complete"],
        "live_writes": live_total,
        "live_rate": cfg.join_live_rate,
        "converged": caught["complete"] and len(set(leaves)) == 1 and leaves[0] >= total,
        "leaves": leaves,
        "joiner_missing_live_keys": len(missing),
        "joiner_missing_examples": missing[:10],
        "holder_rss": holder_memory["rss"],
        "holder_bytes_per_key": (holder_memory["rss"] - holder_base) / total,
        "replica_rss": replica_memory["rss"],
        "replica_bytes_per_key": (replica_memory["rss"] - replica_base) / total,
        "holders_peak_rss_after_join": [m["peak_rss"] for m in holders_after],
        "joiner_rss": joiner_memory["rss"],
        "joiner_peak_rss": joiner_memory["peak_rss"],
        "joiner_bytes_per_key": (joiner_memory["rss"] - joiner_base) / total,
        "plain_dict_bytes_per_key": plain_reply["rss_delta"] / total,
        "baseline_rss": holder_base,
    }
    if counters:
        result["core_stats"] = counters
    if profile:
        result["profile"] = profile
    return result


# -- 5. catch-up after a partition ----------------------------------------------------------


def catchup(cfg: Config, progress: Progress) -> dict[str, Any]:
    """One member is cut off (through ``benchmarks.proxy``) while the others write; then healed.

    The figure is the time from the heal until the partitioned member holds every write made
    before it. It includes the reconnect backoff (``backoff_max``, 2 s by default, with jitter).
    """
    writers_count = cfg.catchup_members - 1
    real = free_ports(cfg.catchup_members)
    proxied = free_ports(cfg.catchup_members)
    cut_off = cfg.catchup_members - 1  # the last member is the one partitioned
    with Group() as group:
        proxy = group.add(Proxy(max_seconds=cfg.member_max_seconds))
        proxy.call("rename", ports={str(real[i]): proxied[i] for i in range(len(real))})
        members = []
        for i in range(cfg.catchup_members):
            if i == cut_off:
                peers = [proxied[j] for j in range(writers_count)] + [real[i]]
            else:
                peers = [real[j] for j in range(writers_count)] + [proxied[cut_off]]
            name = f"m{i}:{real[i]}"
            members.append(
                group.add(Member(real[i], peers, name=name, max_seconds=cfg.member_max_seconds))
            )
        # A proxy port listens only once its member does: a member accepted by the proxy while
        # the target is down would see a connection that drops only at its first send, and
        # could wait for a snapshot on it for its whole start timeout.
        for i in [cut_off, *range(writers_count)]:
            member = members[i]
            member.send("start", local=member.local, peers=member.peers, options={}, limit=30)
            wait_listening(real[i])
            proxy.call("route", listen=proxied[i], target=real[i])
            member.receive(60)
        _warm(members, "warm")
        writers = members[:writers_count]
        isolated = members[cut_off]
        for i, member in enumerate(writers):
            member.call(
                "pace_start", prefix="cu", name=f"n{i}", rate=cfg.catchup_rate / writers_count
            )
        time.sleep(1.0)
        before = broadcast(writers, "pace_status")
        proxy.call("cut")
        cut_at = time.monotonic()
        progress(
            f"catch-up: member cut off for {cfg.catchup_partition_seconds}s "
            f"while the others write {cfg.catchup_rate:,} sets/s"
        )
        step = max(1.0, cfg.catchup_partition_seconds / 5)
        while time.monotonic() - cut_at < cfg.catchup_partition_seconds:
            time.sleep(min(step, cfg.catchup_partition_seconds - (time.monotonic() - cut_at)))
            progress(f"catch-up: partitioned for {time.monotonic() - cut_at:.0f}s")
        at_heal = broadcast(writers, "pace_status")
        healed_at = time.monotonic()
        proxy.call("restore")
        caught = isolated.call(
            "wait_keys", timeout=180, keys=[s["key"] for s in at_heal], limit=120
        )
        catchup_seconds = caught["done"] - healed_at
        progress(f"catch-up: converged {catchup_seconds:.2f}s after the heal")
        stops = broadcast(writers, "pace_stop")
        final = broadcast(
            members, "wait_keys", timeout=180, keys=[s["last_key"] for s in stops], limit=120
        )
        leaves = [m.call("leaves")["leaves"] for m in members]
        counters = core_stats(members)
        stats = proxy.call("stats")
    written = sum(s["seq"] for s in at_heal) - sum(s["seq"] for s in before)
    return {
        "processes": cfg.catchup_members,
        "offered_rate": cfg.catchup_rate,
        "achieved_rate": sum(s["achieved_rate"] for s in stops),
        "partition_seconds": healed_at - cut_at,
        "writes_while_partitioned": written,
        "catchup_seconds": catchup_seconds,
        "caught_up": caught["complete"],
        "converged": all(r["complete"] for r in final) and len(set(leaves)) == 1,
        "leaves": leaves,
        "proxy": stats,
        "core_stats": counters,
        "note": "includes the reconnect backoff (backoff_max 2 s, jittered)",
    }


# -- 6. redis for scale ----------------------------------------------------------------------


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


SCENARIOS: dict[str, Callable[[Config, Progress], dict[str, Any]]] = {
    "local": local_ops,
    "throughput": throughput,
    "latency": latency,
    "join": join,
    "catchup": catchup,
    "redis": redis_compare,
}
