"""Where a churning member's memory goes (issue 20): a probe, not a benchmark scenario.

Runs the churn scenario's workload (``benchmarks.member.ChurnPacer``) on one member in this
process and on ``--peers`` members in their own processes (``benchmarks.member``), then
reports, for the member in this process after ``--seconds``: RSS, the small-object
allocator's used and free bytes, tracemalloc's biggest sites (traced over the last
``--trace`` seconds: what the steady state keeps), objects by type (``gc``), and the sizes of
the store's structures (tombstones, nodes, ttl events, pending expiries, the log)::

    python -m benchmarks.churn_probe --seconds 60 --trace 20
"""

from gevent import monkey

monkey.patch_all()  # (a member is a monkey-patched gevent app: see benchmarks.member)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from benchmarks.common import malloc_stats_lines, memory  # noqa: E402
from benchmarks.member import ChurnPacer  # noqa: E402
from benchmarks.procs import Group, Member, broadcast  # noqa: E402
from benchmarks.scenarios import free_ports  # noqa: E402
from gcollective import Collective  # noqa: E402
from gcollective._clock import MILLIS_SHIFT  # noqa: E402
from gcollective._tree import MISSING, _Node  # noqa: E402

MB = 1e6


_GC_HEAD = 16  # what a container tracked by the garbage collector costs beyond getsizeof


def _own_bytes(node: _Node) -> int:
    """Bytes of a node and the containers only it holds (its dicts, its ttl and increment
    tables with their ints), not its children nor the keys and stamps it shares."""
    size = sys.getsizeof(node) + sys.getsizeof(node._entries) + 2 * _GC_HEAD
    for values in (node.value, node.hidden):
        if type(values) is dict:
            size += sys.getsizeof(values) + _GC_HEAD
    for table in (node.ttls, node.incs):
        if table:
            size += sys.getsizeof(table) + _GC_HEAD
            size += sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in table.items())
    return size


def _heap_entry_bytes(item: tuple[Any, ...]) -> int:
    """Bytes of one entry of an expiry heap: the tuple, its time, its path (and the lists of
    a run's keys, stamps and expiries beside it; not the ints, which the nodes share)."""
    size = sys.getsizeof(item) + sys.getsizeof(item[0]) + sys.getsizeof(item[2]) + 2 * _GC_HEAD
    for name in ("keys", "stamps", "expiries"):
        column = getattr(item[2], name, None)
        if column is not None:
            size += sys.getsizeof(column) + _GC_HEAD
    return size


def _kind(entry: _Node, parent_kind: str) -> str:
    if entry.ttls is not None:
        return "session (live)" if entry.value is not MISSING else "session (fired)"
    if entry.incs:
        return "counter"
    if parent_kind == "session (fired)":
        return "hidden leaf node"
    if entry.assigned_value is MISSING and entry.value is MISSING and not entry._entries:
        return "tombstone node"
    return "inner node"


def structures(node: Collective) -> dict[str, Any]:
    """Counts and bytes (MB) of the store's structures, by kind of entry, and how old the
    oldest of each is (seconds) beside how far the stability frontier trails."""
    store = node._store  # type: ignore[attr-defined]
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    oldest: dict[str, float] = {}
    now = time.time()

    def age(stamp: Any) -> float:
        if type(stamp) is not int:
            return 0.0
        return round(now - (stamp >> MILLIS_SHIFT) / 1000, 1)

    stack: list[tuple[_Node, str, str]] = [(store._root, "root", "")]
    tombstones_under: Counter[str] = Counter()  # bare tombstones by their parent's path
    while stack:
        current, current_kind, where = stack.pop()
        data = current.value
        for key, entry in current._entries.items():
            key_bytes = sys.getsizeof(key) if len(key) > 1 else 0  # (1-char keys: shared)
            if type(entry) is _Node:
                kind = _kind(entry, current_kind)
                stack.append((entry, kind, f"{where}.{key}" if where.count(".") < 2 else where))
                size[kind] += _own_bytes(entry) + key_bytes
                if entry.incs:
                    count["increments"] += len(entry.incs)
                    oldest["increment"] = max(oldest.get("increment", 0), age(min(entry.incs)))
                if kind != "counter":
                    oldest[kind] = max(oldest.get(kind, 0), age(entry.assigned))
            else:
                if type(data) is dict and key in data:
                    kind = "leaf"
                elif current.hidden is not None and key in current.hidden:
                    kind = "hidden leaf"  # (its value: in the node's ``hidden``)
                else:
                    kind = "tombstone (bare)"
                size[kind] += key_bytes + sys.getsizeof(entry)
                if kind != "leaf":
                    oldest[kind] = max(oldest.get(kind, 0), age(entry))
                if kind == "tombstone (bare)":
                    tombstones_under[where] += 1
            count[kind] += 1
            size[kind] += 40  # its slot in the parent's dict, about
    for name in ("_pending", "_due"):
        heap = getattr(store, name)
        count[name] = len(heap)
        size[name] = sys.getsizeof(heap) + sum(map(_heap_entry_bytes, heap))
    count["_due events"] = len(store._due) + store._due_extra
    count["_due_stamps"] = len(store._due_stamps)
    size["_due_stamps"] = sys.getsizeof(store._due_stamps)
    oldest["frontier"] = age(node._engine.gc_frontier())  # type: ignore[attr-defined]
    print("  oldest (s):", oldest)
    print("  bare tombstones under:", dict(tombstones_under.most_common(8)))
    return {kind: (count[kind], round(size[kind] / MB, 2)) for kind in count}


def allocator() -> dict[str, int]:
    """Bytes in used and free blocks of the small-object allocator."""
    lines = malloc_stats_lines()
    figures = {}
    for line in lines:
        name, _, value = line.partition("=")
        if "bytes in allocated blocks" in name or "bytes in available blocks" in name:
            figures[name.strip("# ")] = int(value.strip().replace(",", ""))
    return figures


def report(node: Collective, trace: bool) -> None:
    print(f"rss {memory()['rss'] / MB:.1f} MB", flush=True)
    for name, value in allocator().items():
        print(f"  {name}: {value / MB:.1f} MB")
    stats = node.stats()
    print("  stats:", {k: stats.get(k) for k in ("log_ops", "log_bytes", "pending_expiries")})
    for kind, figures in structures(node).items():
        print(f"  {kind:>15}: {figures[0]:8d} {figures[1]:7.2f} MB")
    if trace:
        snapshot = tracemalloc.take_snapshot()
        print(f"  traced now {tracemalloc.get_traced_memory()[0] / MB:.1f} MB; top sites:")
        for stat in snapshot.statistics("lineno")[:25]:
            print(f"    {stat.size / MB:7.2f} MB {stat.count:8d}  {stat.traceback}")
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    print("  gc objects by type:", counts.most_common(15), flush=True)
    before = memory()["rss"] / MB
    try:  # what glibc's heap holds freed but not given back (glibc only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return
    print(f"  rss {before:.1f} MB, after malloc_trim(0): {memory()['rss'] / MB:.1f} MB")


def watch_collect(node: Collective) -> dict[str, Any]:
    """Count the store's finished collect passes, its calls and the time spent in them."""
    store = node._store  # type: ignore[attr-defined]
    collect = store.collect
    figures: dict[str, Any] = {"passes": 0, "calls": 0, "seconds": 0.0}

    def counted(frontier: int, budget: int = 10000) -> bool:
        began = time.perf_counter()
        done = collect(frontier, budget)
        figures["seconds"] += time.perf_counter() - began
        figures["calls"] += 1
        figures["passes"] += done
        return done

    store.collect = counted
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=6000)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--trace", type=float, default=0.0, help="trace the last N seconds")
    args = parser.parse_args()
    ports = free_ports(args.peers + 1)
    with Group() as group:
        node = Collective(f"127.0.0.1:{ports[0]}", [f"127.0.0.1:{p}" for p in ports])
        node.start(timeout=5)
        others = [
            group.add(Member(port, ports, name=f"m{i + 1}:{port}"))
            for i, port in enumerate(ports[1:])
        ]
        for other in others:
            other.start()
        passes = watch_collect(node)
        pacer = ChurnPacer(node, "n0", args.rate, args.ttl)
        for i, other in enumerate(others):
            other.call("churn_start", name=f"n{i + 1}", rate=args.rate, ttl=args.ttl)
        began = time.monotonic()
        traced = False
        while time.monotonic() - began < args.seconds:
            gevent.sleep(5)
            if args.trace and not traced and time.monotonic() - began > args.seconds - args.trace:
                tracemalloc.start(1)
                traced = True
            print(
                f"{time.monotonic() - began:5.0f}s rss {memory()['rss'] / MB:.1f} MB, "
                f"collect passes {passes['passes']}, visits {passes['calls']}, "
                f"{passes['seconds']:.2f}s in collect",
                flush=True,
            )
        report(node, traced)
        pacer.stop()
        broadcast(others, "churn_stop")
        node.stop()


if __name__ == "__main__":
    main()
