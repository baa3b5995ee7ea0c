"""Issue 20's bound on what the log and expired data cost: memory under churn, and how long a
member cut off for a while takes to catch up (each a scenario of ``benchmarks.run``)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.config import Config, Progress
from benchmarks.procs import (
    Group,
    Member,
    Proxy,
    broadcast,
    core_stats,
    free_ports,
    same_data,
    start_all,
    wait_listening,
    warm,
)

# -- catch-up after a partition ----------------------------------------------------------


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
        warm(members, "warm")
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


# -- memory under churn -------------------------------------------------------


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
        warm(members, "warm")
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
