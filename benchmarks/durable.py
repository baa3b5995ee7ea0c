"""Durability's targets (issue 22), in-memory and ``data_dir`` runs interleaved in one window.

    python -m benchmarks.durable [--rounds 3] [--keys 50000] [--rate 10000] [--seconds 5]

- throughput: 4 members each write ``keys`` distinct keys; time until all hold everything
  (the main benchmark's ``throughput`` run, without the hot counter);
- latency: 4 members writing ``rate`` sets/s in all for ``seconds``; p99 from a set until it
  is applied on every other member (the main benchmark's ``latency`` run).

Each round runs both modes back to back; the figures printed are the medians.

    python -m benchmarks.durable --restore [--restore-keys 2000000] [--depth 1] [--rounds 3]

- restore: the time a member takes to start on a directory of ``restore-keys`` keys in the
  worst case the compaction allows: a checkpoint of the whole tree, then as many bytes of
  frames appended since (overwrites of every key, round after round) as the next checkpoint
  waits for. One process fills the directory, then a fresh process per round times
  ``start()`` on a copy of it until the member serves a key. The keys are ``depth`` levels
  deep (``_key``): 1, flat top-level keys; 3, 200 top-level dicts of 100 dicts of 100 keys
  at 2,000,000 keys.

    python -m benchmarks.durable --checkpoint-lag [--restore-keys 2000000] [--rounds 3]

- checkpoint lag: how late a 1 ms timer wakes while a checkpoint of that many keys is
  written (what the member's other greenlets wait), p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.procs import Group, Member, broadcast, free_ports, start_all, warm
from benchmarks.scenarios import _latency_figures

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
        warm(members, "warm")
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
        warm(members, "warm")
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
        warm(members, "settle.")
        dumps = broadcast(members, "probe_dump")
        return _latency_figures(rate, seconds, names, stops, dumps)


# -- restore, worst case --------------------------------------------------------------------


def _free_address() -> str:
    return f"127.0.0.1:{free_ports(1)[0]}"


def _key(i: int, depth: int) -> str:
    """The ``i``-th key of a restore benchmark, ``depth`` levels deep: ``u{i}`` below
    ``depth - 1`` levels of dicts of 100 (the top level holding the rest)."""
    segments = [f"u{i}"]
    for level in range(1, depth):
        above = i // 100**level
        segments.append(f"d{above if level == depth - 1 else above % 100}")
    return ".".join(reversed(segments))


def _leaves(tree: Any) -> int:
    """How many leaves (values that are not dicts) ``tree`` holds."""
    if type(tree) is not dict:
        return 1
    return sum(map(_leaves, tree.values()))


def fill_worst_case(directory: str, keys: int, depth: int) -> dict[str, Any]:
    """(In its own process.) Fill ``directory`` with ``keys`` keys, checkpoint them, then
    overwrite them until the bytes appended since are just short of the next checkpoint."""
    import gevent

    import gcollective

    node = gcollective.Collective(_free_address(), data_dir=directory)
    node.start(timeout=0)
    durable = node._durable
    assert durable is not None

    def written() -> None:
        while durable.stats()["unwritten_frames"]:
            gevent.sleep(0.05)

    def write_round(value: int, limit: float) -> bool:
        """Overwrite every key; False once the appended bytes reach ``limit``."""
        for i in range(keys):
            node.set(_key(i, depth), value)
            if i % 5_000 == 0:
                gevent.sleep(0.01)  # (the flush and the writer run: their timers fire)
                if durable._since_checkpoint + durable._pending_bytes >= limit:
                    return False
        return True

    write_round(0, float("inf"))
    written()
    checkpoints = durable.checkpoints
    durable._since_checkpoint = 1 << 62  # (the writer checkpoints the whole tree now)
    while durable.checkpoints == checkpoints:
        gevent.sleep(0.05)
    limit = 0.95 * durable.checkpoint_due()
    value = 1
    while write_round(value, limit):
        value += 1
    written()
    gevent.sleep(0.2)  # (long enough for the writer to start a checkpoint if it were due)
    if durable.checkpoints != checkpoints + 1 or durable._since_checkpoint >= limit / 0.95:
        raise RuntimeError("a checkpoint came before the worst case was reached")
    figures = {
        "checkpoint_bytes": durable._checkpoint_bytes,
        "appended_bytes": durable._since_checkpoint,
        "rounds": value,
    }
    node.stop()
    return figures


def time_restore(directory: str, keys: int, depth: int) -> dict[str, Any]:
    """(In its own process.) Seconds from ``start()`` until the member serves a key."""
    import gcollective

    node = gcollective.Collective(_free_address(), data_dir=directory)
    began, cpu = time.perf_counter(), time.process_time()
    node.start(timeout=0)
    served = node.get(_key(keys - 1, depth))
    seconds = time.perf_counter() - began
    cpu_seconds = time.process_time() - cpu  # (all threads: a loaded machine's wall time lies)
    assert served is not None and _leaves(node.snapshot()) == keys
    restored = node.stats()["data_dir"]["restored_frames"]
    node.stop()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "restored_frames": restored}


def checkpoint_lag(directory: str, keys: int, depth: int) -> dict[str, Any]:
    """(In its own process.) How late a 1 ms timer wakes while a checkpoint of ``keys``
    keys is written (the hub's lag, what the member's other greenlets wait)."""
    import gevent

    import gcollective

    node = gcollective.Collective(_free_address(), data_dir=directory)
    node.start(timeout=0)
    durable = node._durable
    assert durable is not None
    for i in range(keys):
        node.set(_key(i, depth), i)
        if i % 5_000 == 0:
            gevent.sleep(0.01)
    while True:  # (until the writer is idle: no checkpoint of the filling under way)
        checkpoints = durable.checkpoints
        while durable.stats()["unwritten_frames"]:
            gevent.sleep(0.05)
        gevent.sleep(2.0)
        if checkpoints == durable.checkpoints and (
            durable._since_checkpoint < durable.checkpoint_due()
        ):
            break
    lateness: list[float] = []

    def ticker() -> None:
        while True:
            before = time.perf_counter()
            gevent.sleep(0.001)
            lateness.append(time.perf_counter() - before - 0.001)

    ticking = gevent.spawn(ticker)
    began = time.perf_counter()
    durable._since_checkpoint = 1 << 62  # (due now)
    while durable.checkpoints == checkpoints:
        gevent.sleep(0.01)
    seconds = time.perf_counter() - began
    ticking.kill()
    node.stop()
    lateness.sort()
    return {
        "checkpoint_seconds": seconds,
        "p50_ms": 1000 * lateness[len(lateness) // 2],
        "p99_ms": 1000 * lateness[int(len(lateness) * 0.99)],
        "max_ms": 1000 * lateness[-1],
    }


def _in_process(phase: str, directory: str, keys: int, depth: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.durable", "--phase", phase, directory]
    sizes = ["--restore-keys", str(keys), "--depth", str(depth)]
    done = subprocess.run([*command, *sizes], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{phase} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.splitlines()[-1]))


def restore(keys: int, depth: int, rounds: int) -> None:
    """Fill one worst-case directory, then time restores on copies of it."""
    with tempfile.TemporaryDirectory(prefix="gcollective-bench-") as directory:
        filled = os.path.join(directory, "filled")
        began = time.perf_counter()
        figures = _in_process("fill", filled, keys, depth)
        database = os.path.join(filled, "gcollective.sqlite3")
        print(
            f"filled in {time.perf_counter() - began:.0f}s: checkpoint "
            f"{figures['checkpoint_bytes'] / 1e6:.0f} MB + appended "
            f"{figures['appended_bytes'] / 1e6:.0f} MB ({figures['rounds']} rounds of "
            f"overwrites), database {os.path.getsize(database) / 1e6:.0f} MB",
            flush=True,
        )
        seconds: list[float] = []
        cpu: list[float] = []
        for round_number in range(rounds):
            copy = os.path.join(directory, f"copy{round_number}")
            shutil.copytree(filled, copy)
            timed = _in_process("restore", copy, keys, depth)
            shutil.rmtree(copy)
            seconds.append(timed["seconds"])
            cpu.append(timed["cpu_seconds"])
            print(f"round {round_number}: restored {timed}", flush=True)
        medians = {"restore_seconds_median": statistics.median(seconds)}
        print(json.dumps({**medians, "restore_cpu_seconds_median": statistics.median(cpu)}))


PHASES = {"fill": fill_worst_case, "restore": time_restore, "lag": checkpoint_lag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--restore", action="store_true", help="the worst-case restore only")
    parser.add_argument("--restore-keys", type=int, default=2_000_000)
    parser.add_argument("--depth", type=int, default=1, help="levels of the restore's keys")
    parser.add_argument(
        "--checkpoint-lag", action="store_true", help="the hub's lag during a checkpoint only"
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("directory", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        from gevent import monkey  # (a phase's own process, as a member's)

        monkey.patch_all()
        work = PHASES[args.phase]
        print(json.dumps(work(args.directory, args.restore_keys, args.depth)))
        return
    if args.restore:
        restore(args.restore_keys, args.depth, args.rounds)
        return
    if args.checkpoint_lag:
        for round_number in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="gcollective-bench-") as directory:
                lag = _in_process(
                    "lag", os.path.join(directory, "d"), args.restore_keys, args.depth
                )
            print(f"round {round_number}: {lag}", flush=True)
        return
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
