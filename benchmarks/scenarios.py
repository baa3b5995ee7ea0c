"""The scenarios of ``python -m benchmarks``, each a function of a ``Config`` returning plain
data: local calls, throughput, latency and join here; catch-up and churn in ``churn``, the
workloads and redis in ``workloads``, the web app in ``web``.

Every multi-process scenario runs real member processes on 127.0.0.1 with ports from the OS,
bounds every wait, and stops its processes when it ends, whatever happened.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

from benchmarks import churn, web, workloads
from benchmarks.config import Config, Progress
from benchmarks.procs import (
    Group,
    Member,
    add_members,
    broadcast,
    core_stats,
    free_port,
    free_ports,
    same_data,
    start_all,
    warm,
)
from benchmarks.profiling import WindowProfiler

__all__ = ["SCENARIOS", "Config"]


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


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
            warm(members, "warm")
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
        members = add_members(group, ports, ports, cfg)
        start_all(members)
        warm(members, "warm")
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
        # the cyclic GC's part of them (a full collection in some members and not others
        # makes the members' CPU uneven)
        "gc_seconds": [r["gc_seconds"] for r in replies],
        "gc_write_seconds": [r["gc_write_seconds"] for r in replies],
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
        members = add_members(group, ports, ports, cfg)
        start_all(members)
        warm(members, "warm")
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
            warm(members, f"settle{round_number}.")  # FIFO links: everything sent has arrived
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
        holders = add_members(group, ports[:2], ports[:2], cfg)
        starts = start_all(holders)
        warm(holders, "warm")
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


SCENARIOS: dict[str, Callable[[Config, Progress], dict[str, Any]]] = {
    "local": local_ops,
    "throughput": throughput,
    "latency": latency,
    "join": join,
    "join_mixed": join_mixed,
    "catchup": churn.catchup,
    "redis": workloads.redis_compare,
    "web": web.web,
    "workloads": workloads.app_workloads,
    "churn": churn.churn,
}
