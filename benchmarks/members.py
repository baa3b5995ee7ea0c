"""What each member of a full mesh costs, idle and under a modest write load, by the number
of members on one machine (issue 19; figures in docs/membership.rst).

    python -m benchmarks.members [--sizes 8,16,32] [--seconds 10] [--rate 20]

For each size N: starts N member processes on 127.0.0.1 (default options), each given only
the first one's address (a seed), waits until every member is linked to the N - 1 others,
then measures each process's CPU (user + system, from /proc) and resident memory over
``--seconds`` idle, and again while every member writes ``--rate`` keys a second (so each
member receives ``(N - 1) * rate`` operations a second). Prints one line per size (medians
over the members) and, with ``--json``, the figures as JSON. Linux only (/proc).
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

from benchmarks.procs import ROOT, free_ports

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def child(local: str, seed: str | None, directory: str, rate: float) -> None:
    """One member: reports how many peers it is linked to in ``directory/<port>.json`` (when
    that changes); writes ``rate`` keys a second while ``directory/load`` exists; stops once
    ``directory/stop`` exists. It looks every quarter of a second, which costs next to
    nothing (a few system calls), so the idle figures are the member's own."""
    import gevent

    import gcollective

    node = gcollective.start(local, [seed] if seed else [], timeout=5)
    port = local.rsplit(":", 1)[1]
    path = os.path.join(directory, f"{port}.json")
    written, reported = 0, -1
    began = time.monotonic()
    while not os.path.exists(os.path.join(directory, "stop")):
        if os.path.exists(os.path.join(directory, "load")):
            due = int((time.monotonic() - began) * rate)
            for _ in range(max(0, due - written)):
                node.set(f"m{port}.k{written % 100}", written)
                written += 1
        else:
            began, written = time.monotonic(), 0
        connected = sum(link.connected for link in node._links.values())
        if connected != reported:
            with open(path + ".tmp", "w") as file:
                json.dump({"connected": connected}, file)
            os.replace(path + ".tmp", path)
            reported = connected
        gevent.sleep(0.25)
    node.stop(timeout=2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_until(predicate: Any, limit: float) -> float:
    """Seconds until ``predicate()`` held; ``RuntimeError`` past ``limit``."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > limit:
            raise RuntimeError(f"not reached within {limit:g}s")
        time.sleep(0.1)
    return time.monotonic() - began


def window(procs: list[subprocess.Popen[bytes]], seconds: float) -> dict[str, float]:
    """Median CPU % and RSS (MiB) per member over ``seconds``, and their sum of CPU %."""
    before = [cpu_seconds(proc.pid) for proc in procs]
    time.sleep(seconds)
    cpu = [100 * (cpu_seconds(p.pid) - b) / seconds for p, b in zip(procs, before)]
    rss = [rss_mib(proc.pid) for proc in procs]
    return {
        "cpu_percent": round(statistics.median(cpu), 2),
        "cpu_percent_total": round(sum(cpu), 1),
        "rss_mib": round(statistics.median(rss), 1),
    }


def measure(size: int, seconds: float, rate: float) -> dict[str, Any]:
    """The figures for ``size`` members (see the module docstring)."""
    directory = tempfile.mkdtemp(prefix="gcollective-members-")
    ports = free_ports(size)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    began = time.monotonic()
    try:
        for i, port in enumerate(ports):
            command = [sys.executable, "-m", "benchmarks.members", "--child"]
            command += ["--local", f"127.0.0.1:{port}", "--dir", directory, "--rate", str(rate)]
            if i:
                command += ["--seed", f"127.0.0.1:{ports[0]}"]
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env))

        def meshed() -> bool:
            for port in ports:
                try:
                    with open(os.path.join(directory, f"{port}.json")) as file:
                        if json.load(file)["connected"] < size - 1:
                            return False
                except (OSError, ValueError):
                    return False
            return True

        wait_until(meshed, 300)
        mesh_seconds = time.monotonic() - began
        time.sleep(3)  # (the start's snapshots and catch-up settle)
        idle = window(procs, seconds)
        open(os.path.join(directory, "load"), "w").close()
        time.sleep(2)
        loaded = window(procs, seconds)
        return {
            "members": size,
            "mesh_seconds": round(mesh_seconds, 1),
            "idle": idle,
            "load": loaded,
        }
    finally:
        open(os.path.join(directory, "stop"), "w").close()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.members", description=__doc__)
    parser.add_argument("--sizes", default="8,16,32", help="member counts (8,16,32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each window (10)")
    parser.add_argument("--rate", type=float, default=20.0, help="keys/s per member (20)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local", help=argparse.SUPPRESS)
    parser.add_argument("--seed", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.local, args.seed, args.dir, args.rate)
        return 0
    results = []
    for size in (int(text) for text in args.sizes.split(",")):
        result = measure(size, args.seconds, args.rate)
        results.append(result)
        idle, load = result["idle"], result["load"]
        print(
            f"{size:3d} members (mesh in {result['mesh_seconds']:.1f}s): idle "
            f"{idle['cpu_percent']:.2f}% CPU, {idle['rss_mib']:.1f} MiB each "
            f"({idle['cpu_percent_total']:.1f}% in all); writing {args.rate:g} keys/s each: "
            f"{load['cpu_percent']:.2f}% CPU, {load['rss_mib']:.1f} MiB each "
            f"({load['cpu_percent_total']:.1f}% in all)",
            flush=True,
        )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
