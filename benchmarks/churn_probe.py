"""Where a churning member's memory goes (issue 20): a probe, not a benchmark scenario.

Runs the churn scenario's workload (``benchmarks.member.ChurnPacer``) on one member in this
process and on ``--peers`` members in their own processes (``benchmarks.member``), then
reports, for the member in this process after ``--seconds``: RSS, the small-object
allocator's used and free bytes, tracemalloc's biggest sites (traced over the last
``--trace`` seconds: what the steady state keeps), objects by type (``gc``), and the sizes of
the store's structures (tombstones, nodes, ttl events, pending expiries, the log)::

    python -m benchmarks.churn_probe --seconds 60 --trace 20

``--simulate LAG`` instead runs the same operations on one store in simulated time, with a
stability frontier ``LAG`` seconds behind and housekeeping every second as a member does
it, and reports the bytes the store holds (``tracemalloc``): what the store keeps for that
lag, without the noise of a shared machine (its CPU, the members' lag)::

    python -m benchmarks.churn_probe --simulate 12 --seconds 40

``--seconds 240`` is the full run's length (the medians of its second half's minutes too:
at a steady lag the store does not grow after the first: see docs/benchmarks.rst).
"""

from gevent import monkey

monkey.patch_all()  # (a member is a monkey-patched gevent app: see benchmarks.member)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections import Counter, deque  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHURN_STEPS,
    churn_counter,
    malloc_stats_lines,
    memory,
)
from benchmarks.member import ChurnPacer  # noqa: E402
from benchmarks.procs import (  # noqa: E402
    Group,
    Member,
    broadcast,
    free_ports,
)
from gcollective import Collective  # noqa: E402
from gcollective._clock import MILLIS_SHIFT, NODE_BITS  # noqa: E402
from gcollective._heap import HeapTrimmer  # noqa: E402
from gcollective._store import DELETE, INCREMENT, SET, Store  # noqa: E402
from gcollective._tree import FOLDED, MISSING, _Node  # noqa: E402

MB = 1e6


_GC_HEAD = 16  # what a container tracked by the garbage collector costs beyond getsizeof


def _own_bytes(node: _Node) -> int:
    """Bytes of a node and the containers only it holds (its dicts, its ttl and increment
    tables with their ints), not its children nor the keys and stamps it shares."""
    size = sys.getsizeof(node) + 2 * _GC_HEAD
    if node.runs is not FOLDED:  # (folded: a shared empty ``_entries``, see ``fold_members``)
        size += sys.getsizeof(node._entries)
    for values in (node.value, node.hidden):
        if type(values) is dict or type(values) is tuple:
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
    if entry.runs is FOLDED:
        return "session (folded)"
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
    return structures_of(node._store, node._engine.gc_frontier())  # type: ignore[attr-defined]


def structures_of(store: Store, frontier: int | None = None) -> dict[str, Any]:
    """``structures`` of a store (``frontier``: the stability frontier, if known)."""
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
    if frontier is not None:  # (a simulated store's stamps are not of the wall clock)
        oldest["frontier"] = age(frontier)
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_heap() -> dict[str, float]:
    """glibc's heap (``mallinfo2``, MB): the main heap's size and its bytes in use and free,
    and the bytes in blocks of their own mapping (what Python's allocator does not serve:
    blocks over 512 bytes, and its own 256 KiB arenas, which are mmapped)."""
    try:
        call = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    call.restype = _MallInfo2
    info = call()
    return {
        "heap": info.arena / MB,
        "heap_used": info.uordblks / MB,
        "heap_free": info.fordblks / MB,
        "mmapped": info.hblkhd / MB,
        "mmapped_blocks": info.hblks,
    }


_SIZE_CLASSES = (512, 4096, 65536, 1 << 20)


def traced_by_size(snapshot: tracemalloc.Snapshot) -> None:
    """Traced bytes by block size (up to 512 B: Python's small-object allocator; above:
    glibc's malloc), and the biggest sites of blocks over 512 B."""
    by_class: Counter[int] = Counter()
    blocks: Counter[int] = Counter()
    large = Counter()
    for trace in snapshot.traces:
        size = trace.size
        bound = next((b for b in _SIZE_CLASSES if size <= b), 0)
        by_class[bound] += size
        blocks[bound] += 1
        if size > 512:
            large[str(trace.traceback)] += size
    for bound in (*_SIZE_CLASSES, 0):
        label = f"<= {bound}" if bound else "> 1 MiB"
        print(f"    blocks {label:>10}: {by_class[bound] / MB:7.2f} MB in {blocks[bound]:8d}")
    print("    biggest sites of blocks over 512 B:")
    for site, size in large.most_common(12):
        print(f"      {size / MB:7.2f} MB  {site}")


def sparse_containers(limit: int = 10) -> None:
    """The dicts, lists and sets holding the most bytes beyond what their items need
    (grown, then mostly emptied: their capacity stays)."""
    waste = []
    for obj in gc.get_objects():
        kind = type(obj)
        if kind is dict or kind is list or kind is set or kind is deque:
            size = sys.getsizeof(obj)
            if size > 4096:
                waste.append((size - 8 * 3 * len(obj), size, len(obj), kind.__name__))
    waste.sort(reverse=True)
    print(f"    containers over 4 KiB: {len(waste)}, {sum(w[1] for w in waste) / MB:.2f} MB")
    for _excess, size, length, name in waste[:limit]:
        print(f"      {name} {size / 1e3:9.1f} kB for {length} items")


def report(node: Collective, trace: bool) -> None:
    print(f"rss {memory()['rss'] / MB:.1f} MB", flush=True)
    for name, value in allocator().items():
        print(f"  {name}: {value / MB:.1f} MB")
    print("  glibc:", {k: round(v, 1) for k, v in glibc_heap().items()})
    print("  gc counts", gc.get_count(), "stats", gc.get_stats())
    sparse_containers()
    stats = node.stats()
    print("  stats:", {k: stats.get(k) for k in ("log_ops", "log_bytes", "pending_expiries")})
    for kind, figures in structures(node).items():
        print(f"  {kind:>15}: {figures[0]:8d} {figures[1]:7.2f} MB")
    if trace:
        snapshot = tracemalloc.take_snapshot()
        print(f"  traced now {tracemalloc.get_traced_memory()[0] / MB:.1f} MB; top sites:")
        for stat in snapshot.statistics("lineno")[:25]:
            print(f"    {stat.size / MB:7.2f} MB {stat.count:8d}  {stat.traceback}")
        traced_by_size(snapshot)
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    print("  gc objects by type:", counts.most_common(15), flush=True)
    before = memory()["rss"] / MB
    try:  # what glibc's heap holds freed but not given back (glibc only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return
    print(f"  rss {before:.1f} MB, after malloc_trim(0): {memory()['rss'] / MB:.1f} MB")
    found = gc.collect()
    print(f"  gc.collect() found {found}; rss {memory()['rss'] / MB:.1f} MB;", allocator())


def watch_collect(node: Collective) -> dict[str, Any]:
    """Count the store's finished collect passes, its calls and the CPU time spent in them."""
    store = node._store  # type: ignore[attr-defined]
    collect = store.collect
    figures: dict[str, Any] = {"passes": 0, "calls": 0, "seconds": 0.0}

    def counted(frontier: int, budget: int = 10000) -> bool:
        began = time.process_time()  # (CPU: wall time counts the other processes' turns)
        done = collect(frontier, budget)
        figures["seconds"] += time.process_time() - began
        figures["calls"] += 1
        figures["passes"] += done
        return done

    store.collect = counted
    return figures


def _sim_stamp(millis: int, counter: int, origin: int) -> int:
    return (((millis << 16) | counter) << NODE_BITS) | origin


def _sim_writes(store: Store, millis: int, seq: list[int], count: int, ttl: float) -> None:
    """``count`` operations of each writer at ``millis``: ``ChurnPacer``'s steps."""
    for writer in range(len(seq)):
        origin = 0x1000 + writer
        for counter in range(count):
            number = seq[writer]
            seq[writer] += 1
            stamp = _sim_stamp(millis, counter, origin)
            step = CHURN_STEPS[number % len(CHURN_STEPS)]
            name = f"n{writer}"
            if step == "session":
                value = {"u": number, "w": name}
                store.apply(stamp, SET, ("churn", "s", name, str(number)), value, int(ttl * 1000))
            elif step == "scratch":
                store.apply(stamp, SET, ("churn", "x", name, str(number)), number, None)
            elif step == "unscratch":
                store.apply(stamp, DELETE, ("churn", "x", name, str(number - 2)), None, None)
            else:
                path = ("churn", "c", f"k{churn_counter(number)}")
                store.apply(stamp, INCREMENT, path, 1, None)


def _sim_housekeep(
    store: Store, frontier: int, cpu: list[float], trimmer: HeapTrimmer | None
) -> None:
    """A member's housekeeping round (``Collective._housekeep``): expire, then collect in
    slices of 100 visits, at most 50,000, then trim the C heap if ``trimmer`` (``cpu``: the
    CPU seconds of each, the passes finished and the seconds trimming, added)."""
    began = time.process_time()
    store.expire(frontier, 100)
    while store.expirable(frontier):
        store.expire(frontier, 100)
    middle = time.process_time()
    for _ in range(500):
        if store.collect(frontier, 100):
            cpu[2] += 1
            break
    cpu[0] += middle - began
    cpu[1] += time.process_time() - middle
    if trimmer is not None:
        began = time.perf_counter()
        if trimmer.after_sweep(store.expired + store.collected):
            cpu[3] += time.perf_counter() - began


def simulate(args: argparse.Namespace) -> None:
    """``--simulate``: see the module docstring. Traced bytes (``--rss``: the process's RSS,
    nothing traced, half-way between two housekeeping rounds) are sampled every simulated
    second of the second half; the median and the peak are reported."""
    store = Store()
    if not args.rss:
        tracemalloc.start()
    trimmer = None if args.no_trim else HeapTrimmer()
    samples = []
    seq = [0] * (args.peers + 1)
    per_tick = args.rate // 100  # (ticks of 10 ms)
    lag_ms = int(args.simulate * 1000)
    cpu = [0.0, 0.0, 0, 0.0]  # (expire, collect, passes, trimming)
    firing = 0.0  # (advance: the sessions' expiries firing)
    for tick in range(int(args.seconds * 100)):
        millis = 1000 + tick * 10
        _sim_writes(store, millis, seq, per_tick, args.ttl)
        began = time.process_time()
        store.advance(millis)
        firing += time.process_time() - began
        if tick % 100 == 99:
            _sim_housekeep(store, _sim_stamp(millis - lag_ms, 0, 0), cpu, trimmer)
            if tick >= args.seconds * 50 and not args.rss:
                samples.append(tracemalloc.get_traced_memory()[0])
        elif tick % 100 == 49 and tick >= args.seconds * 50 and args.rss:
            # (between two rounds: a member's RSS is sampled at any time, not just after a
            # trim)
            samples.append(memory()["rss"])
    print(
        f"{'RSS' if args.rss else 'store'} after {args.seconds:g} simulated s, frontier "
        f"{args.simulate:g} s behind: "
        f"median {statistics.median(samples) / MB:.1f} MB, peak {max(samples) / MB:.1f} MB; "
        f"CPU in advance {firing:.2f} s, in expire {cpu[0]:.2f} s, in collect {cpu[1]:.2f} s "
        f"({cpu[2]} passes)"
        + (f"; {trimmer.trims} trims, {cpu[3] * 1e3:.1f} ms" if trimmer else "")
    )
    if len(samples) >= 120:  # (the full run's 4 minutes: does it grow from minute to minute?)
        start = int(args.seconds // 2)
        by_minute = {
            (start + index) // 60 + 1: samples[index : index + 60]
            for index in range(0, len(samples), 60)
        }
        print(
            "  median by minute:",
            {minute: round(statistics.median(part) / MB, 1) for minute, part in by_minute.items()},
        )
    figures = structures_of(store)
    for kind, (count, size) in figures.items():
        print(f"  {kind:>15}: {count:8d} {size:7.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=6000)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--trace", type=float, default=0.0, help="trace the last N seconds")
    parser.add_argument("--frames", type=int, default=1, help="frames per traced allocation")
    parser.add_argument("--simulate", type=float, help="one store, the frontier LAG s behind")
    parser.add_argument("--rss", action="store_true", help="--simulate: sample RSS, no tracing")
    parser.add_argument("--no-trim", action="store_true", help="--simulate: no malloc_trim")
    args = parser.parse_args()
    if args.simulate is not None:
        simulate(args)
        return
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
                tracemalloc.start(args.frames)
                traced = True
            print(
                f"{time.monotonic() - began:5.0f}s rss {memory()['rss'] / MB:.1f} MB, "
                f"collect passes {passes['passes']}, visits {passes['calls']}, "
                f"{passes['seconds']:.2f}s CPU in collect of {time.process_time():.1f}s",
                flush=True,
            )
        report(node, traced)
        pacer.stop()
        broadcast(others, "churn_stop")
        node.stop()


if __name__ == "__main__":
    main()
