"""Run gcollective's benchmarks: ``python -m benchmarks`` or ``python benchmarks/run.py``.

Measures, on one machine over loopback (see issue 6):

1. ``local``: ns per get / set / incr at path depths 1-5, next to a plain dict, with 0, 3 and 7
   connected peers; and the full cost of a set (GC on, flush included, peers in their own
   processes), keys under one parent and scattered.
2. ``throughput``: N processes (2, 4, 8) each writing K distinct keys without yielding; time
   until every process holds all N x K; and a hot counter all N increment.
3. ``latency``: p50 / p99 / max from when a ``set`` was due (open loop) until visible on every
   other member, 4 processes, at 1k and 10k sets/s offered.
4. ``join``: a new member joining 2,000,000 keys nested three levels while writes continue,
   timed until it holds everything; RSS of holder and joiner, bytes per key, next to a plain
   dict. ``join_mixed``: the same, harder (two origins, scrambled order, mixed values, live
   writes into the same parents).
5. ``catchup``: a member partitioned 10 s (through a proxy) while the others write 5k sets/s;
   time to catch up after the heal.
6. ``redis``: the same get / set / incr through redis-py against a local redis-server, when one
   is on PATH (skipped with a note otherwise).

``--quick`` shrinks every workload (a smoke run of well under a minute). Every run prints a
table, writes ``benchmarks/results/<timestamp>[-quick].json`` with the machine, the versions
and every figure, and a PNG chart next to it when matplotlib is importable. A target counts as
met only for a run that lost nothing and whose members hold identical data (digests). See
docs/benchmarks.rst.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report, scenarios
from benchmarks.procs import ROOT

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, memory, OS, Python and library versions, commit."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "load_average_at_start": _load(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    import gcollective

    info["versions"] = {
        "gcollective": gcollective.__version__,
        "gevent": _version("gevent"),
        "greenlet": _version("greenlet"),
        "ujson": _version("ujson"),
        "redis-py": _version("redis"),
        "matplotlib": _version("matplotlib"),
    }
    info["gcollective_path"] = os.path.dirname(os.path.abspath(gcollective.__file__))
    commit = _git("rev-parse", "HEAD")
    if commit:
        info["git_commit"] = commit
        info["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return info


def _load() -> float | None:
    """The 1-minute load average (other processes compete with the members for the CPUs)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _busy_note() -> str | None:
    """A warning when other processes keep the machine busy: figures will be pessimistic."""
    load, cpus = _load(), os.cpu_count() or 1
    if load is not None and load > 0.5 * cpus:
        return (
            f"note: the machine is busy before the run (load average {load} on {cpus} CPUs); "
            "figures will be pessimistic"
        )
    return None


class Progress:
    """Progress lines on stderr, with the seconds since the run began."""

    def __init__(self, quiet: bool = False) -> None:
        self.began = time.monotonic()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.began:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="gcollective benchmarks (issue 6): speed, memory and scale on one machine.",
    )
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke run")
    parser.add_argument(
        "--only",
        default=",".join(scenarios.SCENARIOS),
        help="comma-separated scenarios to run (default: all): " + ", ".join(scenarios.SCENARIOS),
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs of each throughput workload, the median one reported (default: 3; 1 with "
        "--quick or --profile)",
    )
    parser.add_argument("--output", help="JSON results path (default: benchmarks/results/...)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the members during the throughput and join windows: py-spy when "
        "available (shares per function in the JSON and the table), else cProfile (.prof files "
        "next to the JSON)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--log-level",
        help="gcollective log level inside the members (e.g. INFO); each child's stderr is kept "
        "in a -logs directory next to the JSON",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios; 0 when every one completed, 1 otherwise."""
    args = parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in scenarios.SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    cfg = scenarios.Config.quick() if args.quick else scenarios.Config.full()
    if args.repeat is not None:
        if args.repeat < 1:
            print("--repeat must be at least 1", file=sys.stderr)
            return 2
        cfg.throughput_repeats = args.repeat
    if args.log_level:
        os.environ["BENCH_LOG_LEVEL"] = args.log_level
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or os.path.join(
        RESULTS_DIR, f"{stamp}{'-quick' if args.quick else ''}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if args.profile:
        cfg.profile_dir = os.path.splitext(os.path.abspath(output))[0] + "-profiles"
        os.makedirs(cfg.profile_dir, exist_ok=True)
    if args.log_level:
        log_dir = os.path.splitext(os.path.abspath(output))[0] + "-logs"
        os.makedirs(log_dir, exist_ok=True)
        os.environ["BENCH_LOG_DIR"] = log_dir
    progress = Progress(args.quiet)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(
            [os.path.basename(sys.executable), "-m", "benchmarks", *(argv or sys.argv[1:])]
        ),
        "machine": machine_info(),
        "config": {k: v for k, v in vars(cfg).items()},
    }
    failed = False
    busy = _busy_note()
    if busy:
        progress(busy)
        results["note"] = busy
    for name in selected:
        began = time.monotonic()
        load_before = _load()
        try:
            section = scenarios.SCENARIOS[name](cfg, progress)
        except Exception as exc:  # keep going: one broken scenario must not hide the others
            failed = True
            section = {"error": f"{type(exc).__name__}: {exc}"}
            progress(f"{name}: FAILED\n{traceback.format_exc()}")
        section["wall_seconds"] = time.monotonic() - began
        section["load_average"] = {"before": load_before, "after": _load()}
        results[name] = section
        progress(f"{name}: done in {section['wall_seconds']:.1f}s")
    results["targets"] = report.check_targets(results)
    results["wall_seconds"] = time.monotonic() - progress.began
    with open(output, "w") as out:
        json.dump(results, out, indent=1)
        out.write("\n")
    print(report.tables(results))
    if busy:
        print(f"\n{busy}")
    print(f"\nresults: {output}")
    if not args.no_chart:
        png = os.path.splitext(output)[0] + ".png"
        if report.chart(results, png):
            print(f"chart: {png}")
        else:
            print("chart: skipped (matplotlib is not importable; pip install 'gcollective[bench]')")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
