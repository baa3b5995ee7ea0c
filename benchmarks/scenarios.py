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

from benchmarks import web
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
    # The full cost of a set (GC on, flushes included), with peers in their own processes.
    set_cost_peers: list[int] = field(default_factory=lambda: [0, 7])
    set_cost_ops: int = 20_000
    set_cost_yield_every: int = 100
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
    # The web workload (benchmarks/web.py): ab -n web_requests -c web_concurrency, per round.
    web_workers: int = 4
    web_requests: int = 20_000
    web_concurrency: int = 50
    web_rounds: int = 3
    # Issue 20's cluster workloads: operations per member, and rounds (interleaved).
    workload_members: int = 4
    workload_ops: int = 50_000
    workload_sessions: int = 20_000
    workload_counter_keys: int = 1_000
    workload_repeats: int = 3
    workload_limit: float = 120.0
    # Churn (issue 20): members each writing churn_rate operations/s of sessions with
    # churn_ttl, scratch keys deleted and shared counters, for churn_seconds; RSS sampled
    # every churn_sample_seconds. churn_options: the members' options (e.g. log_bytes).
    churn_members: int = 3
    churn_rate: int = 6_000
    churn_ttl: float = 2.0
    churn_seconds: float = 240.0
    churn_sample_seconds: float = 10.0
    churn_options: dict[str, Any] = field(default_factory=dict)
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
            set_cost_ops=2_000,
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
            web_requests=2_000,
            web_rounds=1,
            workload_ops=2_000,
            workload_sessions=1_000,
            workload_counter_keys=100,
            workload_repeats=1,
            workload_limit=60.0,
            churn_seconds=25.0,
            churn_sample_seconds=2.5,
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


def same_data(members: list[Member], timeout: float = 300.0) -> tuple[bool, list[int]]:
    """Whether every member holds identical data (equal digests of their whole trees; equal
    leaf counts would not show a wrong value), and each one's leaf count."""
    replies = broadcast(members, "digest", timeout=timeout)
    return len({r["digest"] for r in replies}) == 1, [r["leaves"] for r in replies]


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
    progress(f"local ops: web-app calls, {max(cfg.local_peers)} peers")
    with Group() as group:
        runner = group.add(Member(free_port(), [], name="local-web", max_seconds=600))
        result["web"] = runner.call(
            "local_web",
            timeout=600,
            args={
                "peer_count": max(cfg.local_peers),
                "ops_per_batch": cfg.local_ops_per_batch,
                "batches": cfg.local_batches,
            },
        )
    result["set_full"] = set_cost(cfg, progress)
    return result


#: The key patterns of ``set_cost``: a writer's loop under one parent, and keys scattered.
SET_COST_PATTERNS = ("same_parent", "scattered")


def set_cost(cfg: Config, progress: Progress) -> dict[str, Any]:
    """The full cost of a ``set`` of a 3-level key, as an app pays it.

    The figures above time the calls alone: the garbage collector off, nothing yielding, so
    the encoding and sending of the operations happen after the timer stops. Here a member
    process sets ``set_cost_ops`` keys per batch with the collector on, yielding to the event
    loop every ``set_cost_yield_every`` sets, until the batch's last set is flushed (encoded,
    logged, queued for every peer; the writers send meanwhile); its peers are processes of
    their own, so their receiving is not counted. ``cpu_ns`` is the writing process's CPU time
    per set (what a set costs the app, however the machine's cores were shared); ``wall_ns``
    the elapsed time, which on a 2-core machine also holds the peers' receiving. Medians over
    ``local_batches`` batches, after one unrecorded batch.
    """
    result: dict[str, Any] = {pattern: {} for pattern in SET_COST_PATTERNS}
    for peer_count in cfg.set_cost_peers:
        progress(f"local ops: full cost of a set, {peer_count} peers in their own processes")
        ports = free_ports(peer_count + 1)
        with Group() as group:
            writer = group.add(
                Member(ports[0], ports[1:], name="set-cost", max_seconds=cfg.member_max_seconds)
            )
            peers = [
                group.add(Member(port, ports[:1], name=f"peer:{port}", max_seconds=600))
                for port in ports[1:]
            ]
            members = [writer, *peers]
            start_all(members)
            _warm(members, "warm")
            for pattern in SET_COST_PATTERNS:
                result[pattern][str(peer_count)] = _set_cost_batches(cfg, writer, peers, pattern)
            result.setdefault("core_stats", {})[str(peer_count)] = core_stats(members)
    result["ops_per_batch"] = cfg.set_cost_ops
    result["yield_every"] = cfg.set_cost_yield_every
    return result


def _set_cost_batches(
    cfg: Config, writer: Member, peers: list[Member], pattern: str
) -> dict[str, Any]:
    """Median figures of ``set_cost`` for one key pattern; each batch waits until every peer
    holds the batch's last key (they start with empty queues)."""
    samples = []
    complete = True
    for batch in range(cfg.local_batches + 1):
        reply = writer.call(
            "set_cost",
            timeout=300,
            pattern=pattern,
            count=cfg.set_cost_ops,
            yield_every=cfg.set_cost_yield_every,
        )
        if peers:
            arrived = broadcast(
                peers, "wait_keys", timeout=180, keys=[reply["last_key"]], limit=120
            )
            complete = complete and all(r["complete"] for r in arrived)
        if batch:  # the first one warms up
            samples.append(reply)
    return {
        "cpu_ns": statistics.median(r["cpu_ns"] for r in samples),
        "wall_ns": statistics.median(r["wall_ns"] for r in samples),
        "complete": complete,
    }


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
        identical, leaves = same_data(members)
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
        # every key arrived everywhere, and every member holds the same data
        "complete": complete and identical and all(n == count * keys + count for n in leaves),
        "identical": identical,
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
    cycle of 1000; a probe in every member records when each remote set is applied. A delay is
    counted from the time the set was due on the writer's schedule, not from when the writer
    got to it (no coordinated omission).
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
            runs[-1]["converged"], runs[-1]["leaves"] = same_data(members)
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
    from_call: list[float] = []  # the same, from when the set was called: for comparison
    lost = 0
    sent = 0
    for i, origin in enumerate(names):
        sends, calls = stops[i]["sends"], stops[i]["calls"]
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
            from_call.append(max(delays) - (calls[seq] - sent_at))
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
        "delays_from": "when each set was due on the writer's open-loop schedule",
        "p99_ms_from_call": _percentile(from_call, 0.99) * 1000,
    }


# -- 4. join ----------------------------------------------------------------------------------


def join(cfg: Config, progress: Progress) -> dict[str, Any]:
    """A member joins two members holding ``join_keys`` 3-level keys while writes continue.

    The easy case: the keys written in order by one member, int values, the live writes in
    a subtree of their own. Timed until the joiner holds everything (see ``_join``)."""
    return _join(cfg, progress, mixed=False)


def join_mixed(cfg: Config, progress: Progress) -> dict[str, Any]:
    """``join``, harder: the keys written by both members in a scrambled order (a parent's
    leaves from two origins, out of order), ints, strs and small dicts as values, and the live
    writes going into the very parents the snapshot carries."""
    return _join(cfg, progress, mixed=True)


def _fill(
    holders: list[Member], cfg: Config, progress: Progress, mixed: bool, label: str
) -> list[str]:
    """Write the join's fill (on the first holder, or shared by all when ``mixed``) and wait
    until every holder has it; the last key each writer wrote."""
    total, fanout = cfg.join_keys, cfg.join_fanout
    writers = holders if mixed else holders[:1]
    last_keys: dict[str, str] = {}
    chunk = max(10_000, total // 20)
    began = time.monotonic()
    for begin in range(0, total, chunk):
        end = min(total, begin + chunk)
        for part, member in enumerate(writers):
            shares = {"total": total, "part": part, "parts": len(writers)} if mixed else None
            member.send("fill", begin=begin, end=end, fanout=fanout, mixed=shares)
        for member in writers:
            reply = member.receive(600)
            if reply["last_key"] is not None:
                last_keys[member.name] = reply["last_key"]
        progress(
            f"{label}: filling {end:,} / {total:,} keys "
            f"({time.monotonic() - began:.1f}s, {len(writers)} writer(s), replicated)"
        )
    limit = 60 + total / 10_000
    keys = list(last_keys.values())
    replies = broadcast(holders, "wait_keys", timeout=limit + 60, keys=keys, limit=limit)
    if not all(reply["complete"] for reply in replies):
        raise RuntimeError(
            f"{label}: the holders did not all receive the fill within {limit:.0f}s after it "
            f"was written (core counters: {core_stats(holders)})"
        )
    return keys


def _join(cfg: Config, progress: Progress, mixed: bool) -> dict[str, Any]:
    """Fill two members, start live writes on both, and time a third member's join until it
    holds everything: its first snapshot merged, the fill's last keys, and every live write
    that was due on the writers' schedules by the time that snapshot was merged (whatever the
    snapshot carried, the rest came as operations). Then, the writes stopped, every member's
    data must be identical (digests)."""
    label = "join (mixed)" if mixed else "join"
    total, fanout = cfg.join_keys, cfg.join_fanout
    ports = free_ports(3)
    with Group() as group:
        holders = _members(group, ports[:2], ports[:2], cfg)
        starts = start_all(holders)
        _warm(holders, "warm")
        holder, replica = holders
        began = time.monotonic()
        fill_keys = _fill(holders, cfg, progress, mixed, label)
        fill_seconds = time.monotonic() - began
        fill_counters = core_stats(holders)
        holder_memory = holder.call("memory")["memory"]
        replica_memory = replica.call("memory")["memory"]
        plain_reply = None
        if not mixed:
            progress(f"{label}: measuring a plain dict of {total:,} keys")
            plain = group.add(Member(free_port(), [], name="plain-dict", max_seconds=600))
            plain_reply = plain.call("plain_dict", timeout=600, count=total, fanout=fanout)
            plain.close()
        parents = [max(1, total // (fanout * fanout)), fanout] if mixed else None
        live = []
        for i, member in enumerate(holders):
            name, rate = f"n{i}", cfg.join_live_rate / len(holders)
            reply = member.call(
                "pace_start", prefix="live", name=name, rate=rate, cycle=0, parents=parents
            )
            live.append({"prefix": "live", "name": name, "cycle": 0, "parents": parents, **reply})
        progress(
            f"{label}: a new member joins {total:,} keys while {cfg.join_live_rate:,} sets/s "
            f"continue{' into the same parents' if mixed else ''}"
        )
        joiner = group.add(
            Member(ports[2], ports, name="joiner", max_seconds=cfg.member_max_seconds)
        )
        profiler = WindowProfiler(
            cfg.profile_dir, "join-mixed" if mixed else "join", [*holders, joiner]
        )
        profiler.start()
        joined = joiner.call(
            "join",
            timeout=cfg.join_limit + 60,
            local=joiner.local,
            peers=joiner.peers,
            options={},
            limit=cfg.join_limit,
            fill_keys=fill_keys,
            live=live,
        )
        profile = profiler.stop()
        join_seconds = joined["full_at"] - joined["started"] if joined["full"] else None
        snapshot_seconds = joined["synced_at"] - joined["started"] if joined["synced"] else None
        if join_seconds is None:
            progress(f"{label}: NOT in full sync within {cfg.join_limit:.0f}s")
        else:
            progress(
                f"{label}: in full sync after {join_seconds:.2f}s (first snapshot merged after "
                f"{snapshot_seconds:.2f}s; the joiner's CPU: {joined['cpu_seconds']:.2f}s); "
                "letting live writes run 1s more"
            )
        time.sleep(1.0)  # workload, not synchronisation: live writes go on after the join
        stops = broadcast(holders, "pace_stop")
        wait = 120 if joined["synced"] else 10
        last_live = [stop["last_key"] for stop in stops]
        caught = broadcast(
            [*holders, joiner], "wait_keys", timeout=wait + 60, keys=last_live, limit=wait
        )
        identical, leaves = same_data([*holders, joiner])
        counters = core_stats([*holders, joiner])
        holders_after = [m.call("memory")["memory"] for m in holders]
        joiner_memory = joiner.call("memory")["memory"]
    live_total = sum(s["count"] for s in stops)
    holder_base = starts[0]["baseline"]["rss"]
    replica_base = starts[1]["baseline"]["rss"]
    joiner_base = joined["baseline"]["rss"]
    result = {
        "keys": total,
        "key_shape": f"g<a>.s<b>.k<c>, {total // (fanout * fanout)} x {fanout} x {fanout}",
        "workload": (
            "written by both members in a scrambled order; int, str and small dict values; "
            "live writes into the same parents"
            if mixed
            else "written in order by one member; int values; live writes in their own subtree"
        ),
        "fill_seconds": fill_seconds,
        "fill_core_stats": fill_counters,
        "join_seconds": join_seconds,
        "join_ends": "full sync: the fill, and every live write due when the snapshot merged",
        "snapshot_merged_seconds": snapshot_seconds,
        "join_limit": cfg.join_limit,
        "start_returned_seconds": joined["returned"] - joined["started"],
        "joiner_cpu_seconds": joined["cpu_seconds"],
        "joiner_cpu_seconds_to_snapshot": joined["cpu_seconds_synced"],
        "synced": joined["synced"],
        "full": joined["full"],
        "live_writes_due_at_snapshot": sum(joined["live_due"]),
        "caught_up": all(reply["complete"] for reply in caught),
        "live_writes": live_total,
        "live_rate": cfg.join_live_rate,
        "identical": identical,
        "converged": all(reply["complete"] for reply in caught)
        and identical
        and min(leaves) >= total,
        "leaves": leaves,
        "holder_rss": holder_memory["rss"],
        "holder_bytes_per_key": (holder_memory["rss"] - holder_base) / total,
        "replica_rss": replica_memory["rss"],
        "replica_bytes_per_key": (replica_memory["rss"] - replica_base) / total,
        "holders_peak_rss_after_join": [m["peak_rss"] for m in holders_after],
        "joiner_rss": joiner_memory["rss"],
        "joiner_peak_rss": joiner_memory["peak_rss"],
        "joiner_bytes_per_key": (joiner_memory["rss"] - joiner_base) / total,
        "baseline_rss": holder_base,
    }
    if plain_reply is not None:
        result["plain_dict_bytes_per_key"] = plain_reply["rss_delta"] / total
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

    Every member advertises its proxy port and dials the others' (so the addresses members
    pass on in their member lists are proxy ports too: with real ones, the partitioned member
    learnt the writers' real ports and dialled them around the proxy); the cut drops the
    partitioned member's links only.
    """
    writers_count = cfg.catchup_members - 1
    real = free_ports(cfg.catchup_members)
    proxied = free_ports(cfg.catchup_members)
    cut_off = cfg.catchup_members - 1  # the last member is the one partitioned
    with Group() as group:
        proxy = group.add(Proxy(max_seconds=cfg.member_max_seconds))
        members = [
            group.add(
                Member(
                    real[i],
                    proxied,
                    name=f"m{i}:{real[i]}",
                    options={"advertise": f"127.0.0.1:{proxied[i]}"},
                    max_seconds=cfg.member_max_seconds,
                )
            )
            for i in range(cfg.catchup_members)
        ]
        # A proxy port listens only once its member does: a member accepted by the proxy while
        # the target is down would see a connection that drops only at its first send, and
        # could wait for a snapshot on it for its whole start timeout.
        for i in [cut_off, *range(writers_count)]:
            member = members[i]
            member.send(
                "start", local=member.local, peers=member.peers, options=member.options, limit=30
            )
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
        proxy.call("cut", isolate=proxied[cut_off])
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
        # What the writers' logs hold for the partitioned member (catch-up resends it).
        logged = [reply["stats"] for reply in broadcast(writers, "stats")]
        healed_at = time.monotonic()
        proxy.call("restore")
        # Every write made before the heal, not only the last ones: those can come live,
        # ahead of the catch-up that fills the gap below them.
        pacers = [{"prefix": "cu", "name": f"n{i}", "cycle": 0} for i in range(writers_count)]
        caught = isolated.call(
            "wait_writes",
            timeout=180,
            writers=pacers,
            counts=[s["seq"] for s in at_heal],
            limit=120,
        )
        catchup_seconds = caught["done"] - healed_at
        progress(f"catch-up: converged {catchup_seconds:.2f}s after the heal")
        stops = broadcast(writers, "pace_stop")
        final = broadcast(
            members,
            "wait_writes",
            timeout=180,
            writers=pacers,
            counts=[s["count"] for s in stops],
            limit=120,
        )
        identical, leaves = same_data(members)
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
        "log_bytes_at_heal": [stats and stats.get("log_bytes") for stats in logged],
        "converged": all(r["complete"] for r in final) and identical,
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


# -- 7. what web apps do, cluster-wide (issue 20) -------------------------------------------

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
        members = _members(group, ports, ports, cfg)
        start_all(members)
        _warm(members, "warm")
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
        "exact": all(r["complete"] and r.get("exact", True) for r in replies),
    }


# -- 8. memory under churn (issue 20) -------------------------------------------------------


def churn(cfg: Config, progress: Progress) -> dict[str, Any]:
    """Does memory follow the live data? ``churn_members`` members each make ``churn_rate``
    operations/s (``benchmarks.member.ChurnPacer``: sessions with a ttl of ``churn_ttl``,
    scratch keys set and deleted, 100 shared counters) for ``churn_seconds``; the live tree
    stays a few thousand keys. Every ``churn_sample_seconds`` each member reports its RSS (no
    garbage collection first), live leaves and log size. Then the writes stop and every
    member must settle to the same data: each counter exactly the increments made of it,
    every session expired, equal digests."""
    count = cfg.churn_members
    ports = free_ports(count)
    with Group() as group:
        members = [
            group.add(
                Member(
                    port,
                    ports,
                    name=f"m{i}:{port}",
                    options=cfg.churn_options,
                    max_seconds=cfg.member_max_seconds,
                )
            )
            for i, port in enumerate(ports)
        ]
        start_all(members)
        _warm(members, "warm")
        progress(
            f"churn: {count} members x {cfg.churn_rate:,} ops/s for {cfg.churn_seconds:.0f}s "
            f"(sessions with ttl={cfg.churn_ttl:g}, scratch deletes, 100 counters)"
        )
        samples = [_churn_sample(members, 0.0)]
        for i, member in enumerate(members):
            member.call("churn_start", name=f"n{i}", rate=cfg.churn_rate, ttl=cfg.churn_ttl)
        began = time.monotonic()
        while time.monotonic() - began < cfg.churn_seconds:
            time.sleep(min(cfg.churn_sample_seconds, began + cfg.churn_seconds - time.monotonic()))
            samples.append(_churn_sample(members, time.monotonic() - began))
            progress(f"churn: {_churn_line(samples[-1])}")
        stops = broadcast(members, "churn_stop")
        expected = [sum(column) for column in zip(*(stop["counts"] for stop in stops))]
        settled = broadcast(
            members, "churn_settled", timeout=180, expected=expected, limit=60 + cfg.churn_ttl
        )
        identical, leaves = same_data(members)
        after = _churn_sample(members, time.monotonic() - began)
        after["malloc"] = [_allocator(reply) for reply in broadcast(members, "malloc_stats")]
        counters = core_stats(members)
    return _churn_result(cfg, samples, after, stops, settled, identical, leaves, counters)


def _allocator(reply: dict[str, Any]) -> dict[str, int]:
    """The figures of Python's small-object allocator from a member's ``malloc_stats``:
    arenas held now and at most, and bytes in used and in free blocks (freed memory that
    stays in the process while any block of its arena is used)."""
    wanted = {
        "# arenas highwater mark": "arenas_peak",
        "# arenas allocated current": "arenas",
        "# bytes in allocated blocks": "used_bytes",
        "# bytes in available blocks": "free_bytes",
    }
    figures = {}
    for line in reply["summary"]:
        name, _, value = line.partition("=")
        if name.strip() in wanted:
            figures[wanted[name.strip()]] = int(value.strip().replace(",", ""))
    return figures


def _churn_sample(members: list[Member], at: float) -> dict[str, Any]:
    """Every member's RSS, live leaves and log figures at ``at`` seconds into the churn."""
    replies = broadcast(members, "churn_status")
    return {
        "seconds": at,
        "rss": [reply["memory"]["rss"] for reply in replies],
        "leaves": [reply["leaves"] for reply in replies],
        "log_bytes": [reply["stats"]["log_bytes"] for reply in replies],
        "log_ops": [reply["stats"]["log_ops"] for reply in replies],
        "pending_expiries": [reply["stats"]["pending_expiries"] for reply in replies],
        "frontier_lag": [reply["frontier_lag"] for reply in replies],
        "queued_bytes": [reply["queued_bytes"] for reply in replies],
    }


def _churn_line(sample: dict[str, Any]) -> str:
    """One progress line of a churn sample (figures an older core lacks are left out)."""
    line = f"{sample['seconds']:.0f}s: RSS " + ", ".join(f"{r / 1e6:.0f}" for r in sample["rss"])
    line += f" MB, leaves {max(sample['leaves']):,}"
    if None not in sample["log_bytes"]:
        line += ", log " + ", ".join(f"{size / 1e6:.1f}" for size in sample["log_bytes"]) + " MB"
    if None not in sample["pending_expiries"]:
        line += f", pending expiries {max(sample['pending_expiries']):,}"
    lags = [lag for lag in sample["frontier_lag"] if lag is not None]
    if lags:
        line += f", frontier lag {max(lags):.1f}s"
    line += f", queued for peers {max(sample['queued_bytes']) / 1e6:.1f} MB"
    return line


def _churn_result(
    cfg: Config,
    samples: list[dict[str, Any]],
    after: dict[str, Any],
    stops: list[dict[str, Any]],
    settled: list[dict[str, Any]],
    identical: bool,
    leaves: list[int],
    counters: dict[str, int] | None,
) -> dict[str, Any]:
    """``churn``'s figures: RSS per member at the start, its peak among the samples, at the
    end of the churn, and the steady state (the median of the samples of the second half)."""
    count = len(samples[0]["rss"])
    late = [sample for sample in samples if sample["seconds"] >= cfg.churn_seconds / 2]
    per_member = [
        {
            "rss_start": samples[0]["rss"][i],
            "rss_peak": max(sample["rss"][i] for sample in samples),
            "rss_end": samples[-1]["rss"][i],
            "rss_steady": statistics.median(sample["rss"][i] for sample in late),
            "rss_after_settle": after["rss"][i],
            "allocator_after_settle": after["malloc"][i],
            "log_bytes_peak": max(sample["log_bytes"][i] or 0 for sample in samples),
            "log_bytes_end": samples[-1]["log_bytes"][i],
        }
        for i in range(count)
    ]
    return {
        "processes": count,
        "offered_rate": cfg.churn_rate,
        "achieved_rate": [stop["achieved_rate"] for stop in stops],
        "seconds": cfg.churn_seconds,
        "ttl": cfg.churn_ttl,
        "options": cfg.churn_options,
        "members": per_member,
        "rss_steady_max": max(member["rss_steady"] for member in per_member),
        "live_leaves_end": samples[-1]["leaves"],
        "leaves_after_settle": leaves,
        "exact": all(reply["complete"] for reply in settled) and identical,
        "identical": identical,
        "samples": samples,
        "core_stats": counters,
    }


SCENARIOS: dict[str, Callable[[Config, Progress], dict[str, Any]]] = {
    "local": local_ops,
    "throughput": throughput,
    "latency": latency,
    "join": join,
    "join_mixed": join_mixed,
    "catchup": catchup,
    "redis": redis_compare,
    "web": web.web,
    "workloads": app_workloads,
    "churn": churn,
}
