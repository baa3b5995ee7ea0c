"""Durability's targets (issue 22), in-memory and ``data_dir`` runs interleaved in one window.

    python -m benchmarks.durable [--rounds 3] [--keys 50000] [--rate 10000] [--seconds 5]

- throughput: 4 members each write ``keys`` distinct keys; time until all hold everything
  (the main benchmark's ``throughput`` run, without the hot counter);
- latency: 4 members writing ``rate`` sets/s in all for ``seconds``; p99 from a set until it
  is applied on every other member (the main benchmark's ``latency`` run).

Each round runs both modes back to back; the figures printed are the medians. (The restart
of a member on 2,000,000 keys is measured by hand: see docs/durability.rst.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

from benchmarks.procs import Group, Member, broadcast, free_ports, start_all
from benchmarks.scenarios import _latency_figures, _warm

MEMBERS = 4


def _members(group: Group, data_dir: str | None) -> list[Member]:
    ports = free_ports(MEMBERS)
    return [
        group.add(
            Member(
                port,
                ports,
                name=f"m{i}:{port}",
                options={} if data_dir is None else {"data_dir": f"{data_dir}/m{i}"},
            )
        )
        for i, port in enumerate(ports)
    ]


def throughput(keys: int, data_dir: str | None) -> float:
    """Sets per second until every member holds every key."""
    with Group() as group:
        members = _members(group, data_dir)
        start_all(members)
        _warm(members, "warm")
        writers = [f"w{i}" for i in range(MEMBERS)]
        limit = 60 + keys * MEMBERS / 10_000
        for i, member in enumerate(members):
            member.send(
                "write_and_wait", prefix=writers[i], count=keys, writers=writers, limit=limit
            )
        replies = [m.receive(limit + 60) for m in members]
        if not all(r["complete"] for r in replies):
            raise RuntimeError("a throughput run did not complete")
        seconds = max(r["done"] for r in replies) - min(r["started"] for r in replies)
    return MEMBERS * keys / seconds


def latency(rate: int, seconds: float, data_dir: str | None) -> dict[str, Any]:
    """The main benchmark's latency figures at ``rate`` sets/s."""
    names = [f"n{i}" for i in range(MEMBERS)]
    with Group() as group:
        members = _members(group, data_dir)
        start_all(members)
        _warm(members, "warm")
        broadcast(members, "probe", prefix="lat")
        for i, member in enumerate(members):
            member.send(
                "pace_start",
                prefix="lat",
                name=names[i],
                rate=rate / MEMBERS,
                cycle=1000,
                record=True,
            )
        for member in members:
            member.receive(30)
        time.sleep(seconds)  # (the measuring window)
        stops = broadcast(members, "pace_stop")
        _warm(members, "settle.")
        dumps = broadcast(members, "probe_dump")
        return _latency_figures(rate, seconds, names, stops, dumps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {"memory": {}, "data_dir": {}}
    for round_number in range(args.rounds):
        for mode in ("memory", "data_dir"):
            with tempfile.TemporaryDirectory(prefix="gcollective-bench-") as directory:
                data_dir = directory if mode == "data_dir" else None
                sets = throughput(args.keys, data_dir)
                lat = latency(args.rate, args.seconds, data_dir)
            mine = figures[mode]
            mine.setdefault("sets_per_second", []).append(sets)
            mine.setdefault("p99_ms", []).append(lat["p99_ms"])
            mine.setdefault("p50_ms", []).append(lat["p50_ms"])
            print(
                f"round {round_number} {mode}: {sets:,.0f} sets/s, p50 {lat['p50_ms']:.2f} ms, "
                f"p99 {lat['p99_ms']:.2f} ms (achieved {lat['achieved_rate']:,.0f}/s)",
                flush=True,
            )
    medians = {mode: {k: statistics.median(v) for k, v in f.items()} for mode, f in figures.items()}
    medians["ratios"] = {
        "throughput_data_dir_over_memory": medians["data_dir"]["sets_per_second"]
        / medians["memory"]["sets_per_second"],
        "p99_data_dir_over_memory": medians["data_dir"]["p99_ms"] / medians["memory"]["p99_ms"],
    }
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
