"""A gcollective member in its own process, driven by JSON lines on stdin (benchmark driver).

Run as ``python -m benchmarks.member``; every command line gets exactly one reply line on
stdout, ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``. The process is a
monkey-patched gevent app, like the ones gcollective serves. It exits when stdin closes, on
``stop``, or after ``--max-seconds`` whatever it is doing.

Times in replies are ``time.monotonic()`` seconds: on Linux that is CLOCK_MONOTONIC, one clock
for every process of the machine, so the orchestrator can compare times across members.

Commands (``{"cmd": ..., ...}``; ``limit`` is always a member-side timeout in seconds):

  start {local, peers, options, limit}   start the node; reports RSS before and after
  join {local, peers, options, limit, fill_keys, live}
                                         start, wait until a peer's state is merged, then
                                         until it holds ``fill_keys`` and every write of the
                                         ``live`` pacers due by then
  write_and_wait {prefix, count, writers, limit}
                                         SET prefix.<j> = j for j < count without yielding,
                                         then wait until every writer's last key is here
  incr_and_wait {key, count, expected, limit}
                                         INCREMENT key count times without yielding, then
                                         wait until it reads ``expected``
  sessions_and_wait {prefix, count, writers, ttl, limit}
                                         SET prefix.s<j> = {"u": j, "w": prefix} with ``ttl``
                                         and read each back, then wait until every writer's
                                         last one is here; ``exact``: all are, with their values
  incr_keys_and_wait {prefix, keys, count, ttl, expected, limit}
                                         ``incr(prefix.k<j % keys>, 1, ttl=ttl)`` count times,
                                         then wait until every key reads ``expected``
  fill {begin, end, fanout, mixed}       SET the 3-level keys of positions [begin, end)
  wait_keys {keys, limit}                wait until every key has a value
  wait_writes {writers, counts, limit}   wait until every write of each pacer up to its
                                         count is here, with its value
  leaves                                 count the leaves of the local tree
  memory                                 RSS and peak RSS (after a garbage collection)
  pace_start {prefix, rate, name, cycle, record, parents}
                                         start writing ``rate`` sets per second in the
                                         background (open loop)
  pace_status / pace_stop                the pacer's sequence number / stop it
  churn_start {name, rate, ttl}          start a pacer of churn (sessions with ``ttl``,
                                         scratch keys deleted, shared counters)
  churn_status / churn_stop              RSS, live leaves, log figures / stop, with the
                                         increments made of each counter
  churn_settled {expected, limit}        wait until the counters read ``expected`` and
                                         every session expired
  malloc_stats                           the small-object allocator's summary (arenas)
  trace_start {frames} / trace_top {limit}
                                         tracemalloc: start / the biggest sites held
  probe {prefix}                         record when each remote SET under prefix is applied
  probe_dump                             the recorded arrival times
  keys {prefix}                          the keys of the dict at path ``prefix`` (a list)
  stats                                  the node's ``stats()``, when the core has it
  set_cost {pattern, count, yield_every} one batch of SETs, GC on, yielding: ns per set, flush
                                         included
  set {key, value}                       one SET
  digest                                 sha256 of the tree's canonical JSON, and its leaves
  local_ops {...}                        run ``benchmarks.local_ops.measure`` in this process
  local_web {...}                        run ``benchmarks.local_ops.measure_web`` in it
  plain_dict {count, fanout}             RSS of a plain dict holding the fill data
  redis_ops {port, count}                get/set/incr through redis-py against a redis-server
  profile_start / profile_stop {path}    cProfile this process over a window
  stop {limit}                           flush and stop, then exit
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from array import array  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.fileobject import FileObjectPosix  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHURN_COUNTERS,
    CHURN_STEPS,
    churn_counter,
    count_leaves,
    fill_key,
    live_key,
    malloc_stats_lines,
    memory,
    mixed_value,
    scrambled_index,
    tree_digest,
)
from gcollective import Collective  # noqa: E402

monotonic = time.monotonic

#: Poll interval while waiting for data to arrive (cheap checks: a few ``get`` calls).
POLL_SECONDS = 0.001


class GcClock:
    """CPU seconds this process spent in the cyclic GC (a ``gc.callbacks`` entry, installed
    by ``main``): the workloads' replies tell it apart from the rest of their CPU time.
    (``process_time``, two system calls per collection: wall time would count the spells
    the process waits for a core on a busy machine, and py-spy's pauses.)"""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.seconds += time.process_time() - self._began


GC_CLOCK = GcClock()


def costs_since(cpu_began: float, gc_began: float) -> dict[str, float]:
    """This process's CPU and GC seconds since ``time.process_time()`` was ``cpu_began`` and
    ``GC_CLOCK.seconds`` was ``gc_began``."""
    return {
        "cpu_seconds": time.process_time() - cpu_began,
        "gc_seconds": GC_CLOCK.seconds - gc_began,
    }


def wait_for(predicate: Any, limit: float) -> tuple[bool, float]:
    """Poll ``predicate`` (yielding) until true or ``limit`` seconds; (met, monotonic time)."""
    deadline = monotonic() + limit
    while True:
        now = monotonic()
        if predicate():
            return True, now
        if now > deadline:
            return False, now
        gevent.sleep(POLL_SECONDS)


class Pacer:
    """Writes at a fixed offered rate in a background greenlet (open loop: no waiting).

    Operation ``seq`` is due at ``t0 + seq / rate``; whenever the greenlet runs it issues every
    operation that is due, then sleeps until the next one. The key is ``live_key(prefix, name,
    seq, cycle, parents)``, the value ``seq``. With ``record`` the time each operation was due
    is kept, not the time its ``set`` ran: when the process is busy the writes go out late,
    and a latency measured from the actual call would leave that delay out (coordinated
    omission).
    """

    def __init__(
        self,
        node: Collective,
        prefix: str,
        name: str,
        rate: float,
        cycle: int,
        record: bool,
        parents: list[int] | None = None,
    ) -> None:
        self.node = node
        self.prefix = prefix
        self.name = name
        self.parents = parents
        self.rate = float(rate)
        self.cycle = cycle
        self.sends: list[float] | None = [] if record else None
        # when each set was actually called, for comparison only
        self.calls: list[float] | None = [] if record else None
        self.seq = 0
        self.max_lag = 0.0
        self.stopped = 0.0
        self.running = True
        # The schedule's origin is known before the greenlet runs: a joiner computes from it
        # which writes were due by a given time.
        self.started = monotonic()
        self.greenlet = gevent.spawn(self._run)

    def key(self, seq: int) -> str:
        return live_key(self.prefix, self.name, seq, self.cycle, self.parents)

    def _writer(self) -> Any:
        """What the schedule calls for operation ``seq``: here, one ``set``."""
        node_set, key = self.node.set, self.key

        def write(seq: int) -> None:
            node_set(key(seq), seq)

        return write

    def _run(self) -> None:
        write = self._writer()
        sends, calls = self.sends, self.calls
        rate = self.rate
        t0 = self.started
        seq = 0
        while self.running:
            now = monotonic()
            due = int((now - t0) * rate) + 1
            if due - seq > 1:
                lag = now - (t0 + seq / rate)
                if lag > self.max_lag:
                    self.max_lag = lag
            while seq < due:
                if sends is not None and calls is not None:
                    sends.append(t0 + seq / rate)  # when it was due (see the class docstring)
                    calls.append(monotonic())
                write(seq)
                seq += 1
            self.seq = seq
            gevent.sleep(max(0.0, t0 + seq / rate - monotonic()))

    def stop(self) -> dict[str, Any]:
        self.running = False
        self.greenlet.join(5)
        self.stopped = monotonic()
        elapsed = self.stopped - self.started
        return {
            "count": self.seq,
            "elapsed": elapsed,
            "achieved_rate": self.seq / elapsed if elapsed > 0 else 0.0,
            "max_lag": self.max_lag,
            "started": self.started,
            "sends": self.sends,
            "calls": self.calls,
        }


class ChurnPacer(Pacer):
    """A ``Pacer`` whose operations are a web app's churn (``CHURN_STEPS``, issue 20): a
    session ``churn.s.<name>.<seq>`` (a small dict with ``ttl`` seconds), a scratch key
    ``churn.x.<name>.<seq>`` set and deleted two operations later, and increments of the
    counters ``churn.c.k<i>`` every writer shares. The live data stays small (the sessions of
    the last ``ttl`` seconds and the counters) however long it runs; ``counts`` are this
    writer's increments of each counter."""

    def __init__(self, node: Collective, name: str, rate: float, ttl: float) -> None:
        self.ttl = ttl
        self.counts = [0] * CHURN_COUNTERS
        super().__init__(node, "churn", name, rate, 0, False)

    def key(self, seq: int) -> str:
        return f"churn.s.{self.name}.{seq}"

    def _writer(self) -> Any:
        node, name, ttl, counts = self.node, self.name, self.ttl, self.counts
        counters = [f"churn.c.k{i}" for i in range(CHURN_COUNTERS)]
        steps = CHURN_STEPS

        def write(seq: int) -> None:
            step = steps[seq % len(steps)]
            if step == "session":
                node.set(f"churn.s.{name}.{seq}", {"u": seq, "w": name}, ttl=ttl)
            elif step == "scratch":
                node.set(f"churn.x.{name}.{seq}", seq)
            elif step == "unscratch":
                node.delete(f"churn.x.{name}.{seq - 2}")
            else:
                index = churn_counter(seq)
                node.incr(counters[index])
                counts[index] += 1

        return write


def _writes_due(writer: dict[str, Any], moment: float) -> int:
    """How many writes of an open-loop pacer (``pace_start``'s reply and request) were due
    by ``moment``: ``seq`` is due at ``started + seq / rate``."""
    if moment < writer["started"]:
        return 0
    return int((moment - writer["started"]) * writer["rate"]) + 1


def _holds_everything(
    node: Collective, fill_keys: list[str], writers: list[dict[str, Any]], due: list[int]
) -> Any:
    """A predicate for ``wait_for``: ``node`` holds every key of ``fill_keys`` and the first
    ``due[i]`` writes of each pacer ``writers[i]``. One cursor per writer, so each write is
    looked up about once."""
    get = node.get
    cursors = [0] * len(writers)

    def holds() -> bool:
        for i, writer in enumerate(writers):
            prefix, name = writer["prefix"], writer["name"]
            cycle, parents = writer.get("cycle", 0), writer.get("parents")
            seq = cursors[i]
            while seq < due[i] and get(live_key(prefix, name, seq, cycle, parents)) == seq:
                seq += 1
            cursors[i] = seq
            if seq < due[i]:
                return False
        return all(get(key) is not None for key in fill_keys)

    return holds


def set_cost_keys(pattern: str, count: int) -> list[str]:
    """``count`` 3-level keys: under one parent (1000 leaves, cycled) or each under another
    parent than the one before (1000 parents)."""
    if pattern == "same_parent":
        return [f"sp.p.k{j % 1000}" for j in range(count)]
    if pattern == "scattered":
        return [f"sc.p{j % 1000}.k{j // 1000}" for j in range(count)]
    raise ValueError(f"unknown key pattern {pattern!r}")


class Driver:
    """State of this member process between commands."""

    def __init__(self) -> None:
        self.node: Collective | None = None
        self.pacer: Pacer | None = None
        self.arrivals: dict[str, tuple[array[int], array[float]]] = {}
        self.profiler: cProfile.Profile | None = None
        self.batches = 0  # of set_cost
        self.baseline = memory()

    # -- helpers ------------------------------------------------------------------------------

    @property
    def live(self) -> dict[str, Any]:
        """The node's live materialized tree, read-only (no copy, unlike ``get``)."""
        node = self.node
        assert node is not None
        store = getattr(node, "_store", None)  # a peek at the core; fall back to a copy
        data = getattr(store, "data", None)
        return data if type(data) is dict else node.snapshot()

    def _start(self, request: dict[str, Any]) -> float:
        self.node = Collective(request["local"], request.get("peers", []), **request["options"])
        began = monotonic()
        self.node.start(timeout=request.get("limit", 30.0))
        return began

    # -- commands -----------------------------------------------------------------------------

    def cmd_start(self, request: dict[str, Any]) -> dict[str, Any]:
        before = memory()
        began = self._start(request)
        assert self.node is not None
        return {
            "synced": self.node.synced,
            "started": began,
            "returned": monotonic(),
            "baseline": before,
        }

    def cmd_join(self, request: dict[str, Any]) -> dict[str, Any]:
        before = memory()
        cpu_began = time.process_time()
        began = self._start(request)
        returned = monotonic()
        node = self.node
        assert node is not None
        limit = request.get("limit", 60.0)
        synced, synced_at = wait_for(lambda: node.synced, limit)
        cpu_synced = time.process_time()
        full, full_at, due = False, None, []
        if synced:
            due = [_writes_due(writer, synced_at) for writer in request.get("live", [])]
            full, at = wait_for(
                _holds_everything(node, request.get("fill_keys", []), request.get("live", []), due),
                max(0.0, began + limit - monotonic()),
            )
            full_at = at if full else None
        return {
            "synced": synced,
            "started": began,
            "returned": returned,
            "synced_at": synced_at,
            "full": full,
            "full_at": full_at,
            "live_due": due,
            # the joiner's CPU until its first snapshot was merged, and until it held everything
            "cpu_seconds_synced": cpu_synced - cpu_began,
            "cpu_seconds": time.process_time() - cpu_began,
            "baseline": before,
            "memory": memory(),
        }

    def cmd_write_and_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        assert node is not None
        prefix, count = request["prefix"], request["count"]
        node_set = node.set
        cpu_began, gc_began = time.process_time(), GC_CLOCK.seconds
        began = monotonic()
        for j in range(count):
            node_set(f"{prefix}.{j}", j)
        written = monotonic()
        cpu_written, gc_written = time.process_time(), GC_CLOCK.seconds
        # Each writer's operations reach us in order over one connection: its last key
        # being here means all of its keys are.
        last_keys = [f"{w}.{count - 1}" for w in request["writers"]]
        get = node.get
        complete, done = wait_for(
            lambda: all(get(k) is not None for k in last_keys), request.get("limit", 120.0)
        )
        return {
            "started": began,
            "written": written,
            "done": done,
            "complete": complete,
            # CPU time of this process (all its greenlets) while writing and until done: what
            # the work costs, apart from how the two cores were shared meanwhile.
            "cpu_write_seconds": cpu_written - cpu_began,
            "gc_write_seconds": gc_written - gc_began,
            **costs_since(cpu_began, gc_began),
        }

    def cmd_incr_and_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        assert node is not None
        key, count, expected = request["key"], request["count"], request["expected"]
        incr = node.incr
        cpu_began, gc_began = time.process_time(), GC_CLOCK.seconds
        began = monotonic()
        for _ in range(count):
            incr(key)
        written = monotonic()
        complete, done = wait_for(lambda: node.get(key) == expected, request.get("limit", 120.0))
        return {
            **costs_since(cpu_began, gc_began),
            "started": began,
            "written": written,
            "done": done,
            "complete": complete,
            "value": node.get(key),
        }

    def cmd_sessions_and_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        """A web app's sessions (issue 20): small dicts with a ttl, each read back once."""
        node = self.node
        assert node is not None
        prefix, count, ttl = request["prefix"], request["count"], request["ttl"]
        node_set, get = node.set, node.get
        cpu_began, gc_began = time.process_time(), GC_CLOCK.seconds
        began = monotonic()
        for j in range(count):
            node_set(f"{prefix}.s{j}", {"u": j, "w": prefix}, ttl=ttl)
        unread = sum(get(f"{prefix}.s{j}") is None for j in range(count))
        written = monotonic()
        last_keys = [f"{w}.s{count - 1}" for w in request["writers"]]
        complete, done = wait_for(
            lambda: all(get(k) is not None for k in last_keys), request.get("limit", 120.0)
        )
        costs = costs_since(cpu_began, gc_began)  # (what is timed: the check is not)
        # (``check`` false: left out, as the model of the scenario leaves out what it does
        # not time; ``benchmarks.workload_model``.)
        exact = not unread and (
            not request.get("check", True)
            or all(
                get(f"{w}.s{j}") == {"u": j, "w": w}
                for w in request["writers"]
                for j in range(count)
            )
        )
        return {
            **costs,
            "started": began,
            "written": written,
            "done": done,
            "complete": complete,
            "exact": exact,
        }

    def cmd_incr_keys_and_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        """Counters over ``keys`` keys (a rate limiter's, with a ttl), then the wait until
        every key holds every member's increments."""
        node = self.node
        assert node is not None
        prefix, keys, count, ttl = (
            request["prefix"],
            request["keys"],
            request["count"],
            request["ttl"],
        )
        names = [f"{prefix}.k{i}" for i in range(keys)]
        incr, get = node.incr, node.get
        cpu_began, gc_began = time.process_time(), GC_CLOCK.seconds
        began = monotonic()
        for j in range(count):
            incr(names[j % keys], 1, ttl=ttl)
        written = monotonic()
        expected = request["expected"]
        complete, done = wait_for(
            lambda: all(get(name) == expected for name in names), request.get("limit", 120.0)
        )
        return {
            **costs_since(cpu_began, gc_began),
            "started": began,
            "written": written,
            "done": done,
            "complete": complete,
            "exact": complete,
            "values": sorted({repr(get(name)) for name in names})[:5],
        }

    def cmd_fill(self, request: dict[str, Any]) -> dict[str, Any]:
        """SET the fill's keys of positions [begin, end). With ``mixed`` (``{total, part,
        parts}``) this member writes only the positions ``part`` modulo ``parts``, each at the
        scrambled index of its position (consecutive keys in different parents) and with a
        mixed value; otherwise every index in order, its value the index."""
        node = self.node
        assert node is not None
        fanout = request["fanout"]
        mixed = request.get("mixed")
        node_set = node.set
        began = monotonic()
        key = None
        written = 0
        for position in range(request["begin"], request["end"]):
            if mixed is None:
                key, value = fill_key(position, fanout), position
            elif position % mixed["parts"] == mixed["part"]:
                index = scrambled_index(position, mixed["total"])
                key, value = fill_key(index, fanout), mixed_value(index)
            else:
                continue
            node_set(key, value)
            written += 1
            if written % 5000 == 0:
                gevent.sleep(0)  # let the writers send: bounded queues, like a real app
        return {"started": began, "done": monotonic(), "last_key": key, "written": written}

    def cmd_wait_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        assert node is not None
        keys = request["keys"]
        get = node.get
        complete, done = wait_for(
            lambda: all(get(k) is not None for k in keys), request.get("limit", 120.0)
        )
        return {"complete": complete, "done": done}

    def cmd_wait_writes(self, request: dict[str, Any]) -> dict[str, Any]:
        """Wait until this member holds the first ``counts[i]`` writes of each pacer
        ``writers[i]`` (``{prefix, name, cycle}``), every one of them: after a partition the
        last ones can arrive (live) before the catch-up fills the gap below them."""
        node = self.node
        assert node is not None
        holds = _holds_everything(node, [], request["writers"], request["counts"])
        complete, done = wait_for(holds, request.get("limit", 120.0))
        return {"complete": complete, "done": done}

    def cmd_leaves(self, request: dict[str, Any]) -> dict[str, Any]:
        tree: Any = self.live
        for segment in request.get("prefix", []):
            tree = tree.get(segment, {}) if type(tree) is dict else {}
        return {"leaves": count_leaves(tree)}

    def cmd_set(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.node is not None
        self.node.set(request["key"], request["value"])
        return {}

    def cmd_digest(self, request: dict[str, Any]) -> dict[str, Any]:
        """sha256 of the whole tree's canonical JSON, and its leaves: members holding
        identical data have equal digests."""
        tree = self.live
        return {"digest": tree_digest(tree), "leaves": count_leaves(tree)}

    def cmd_memory(self, request: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        return {"memory": memory(), "baseline": self.baseline}

    def cmd_pace_start(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.node is not None and self.pacer is None
        self.pacer = Pacer(
            self.node,
            request["prefix"],
            request["name"],
            request["rate"],
            request.get("cycle", 0),
            request.get("record", False),
            request.get("parents"),
        )
        return {"started": self.pacer.started, "rate": self.pacer.rate}

    def cmd_churn_start(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.node is not None and self.pacer is None
        self.pacer = ChurnPacer(self.node, request["name"], request["rate"], request["ttl"])
        return {"started": self.pacer.started, "rate": self.pacer.rate}

    def cmd_churn_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        pacer = self.pacer
        assert isinstance(pacer, ChurnPacer)
        result = pacer.stop()
        result["counts"] = pacer.counts
        self.pacer = None
        return result

    def cmd_churn_status(self, request: dict[str, Any]) -> dict[str, Any]:
        """RSS (without collecting garbage first: what the process holds as it runs), the
        live leaves, and the node's log and expiry figures."""
        node = self.node
        assert node is not None
        stats = node.stats() if hasattr(node, "stats") else {}
        peers = stats.get("peers", {}).values()
        return {
            "queued_bytes": sum(peer.get("queued_bytes") or 0 for peer in peers),
            "at": monotonic(),
            "frontier_lag": self._frontier_lag(),
            "memory": memory(),
            "leaves": count_leaves(self.live),
            "seq": 0 if self.pacer is None else self.pacer.seq,
            "stats": {
                name: stats.get(name)
                for name in ("log_ops", "log_bytes", "pending_expiries", "expired", "gaps")
            },
        }

    def _frontier_lag(self) -> float | None:
        """Seconds the stability frontier (below which metadata may be forgotten) trails the
        wall clock, or None on a core without one (a peek at the engine)."""
        frontier = getattr(getattr(self.node, "_engine", None), "gc_frontier", None)
        if frontier is None:
            return None
        from gcollective._clock import MILLIS_SHIFT

        stamp = frontier()
        return time.time() - (stamp >> MILLIS_SHIFT) / 1000 if stamp else None

    def cmd_churn_settled(self, request: dict[str, Any]) -> dict[str, Any]:
        """Wait until every counter reads ``expected[i]`` and every session expired."""
        node = self.node
        assert node is not None
        expected = request["expected"]
        get = node.get

        def settled() -> bool:
            # (an expired session leaves its writer's parent behind, an empty dict)
            return count_leaves(get("churn.s") or {}) == 0 and all(
                get(f"churn.c.k{i}") == value for i, value in enumerate(expected)
            )

        complete, done = wait_for(settled, request.get("limit", 120.0))
        return {"complete": complete, "done": done}

    def cmd_trace_start(self, request: dict[str, Any]) -> dict[str, Any]:
        tracemalloc.start(request.get("frames", 1))
        return {}

    def cmd_trace_top(self, request: dict[str, Any]) -> dict[str, Any]:
        """The biggest allocation sites still held (``tracemalloc``), by line."""
        snapshot = tracemalloc.take_snapshot()
        top = snapshot.statistics("lineno")[: request.get("limit", 25)]
        return {
            "traced": tracemalloc.get_traced_memory(),
            "top": [[str(stat.traceback), stat.size, stat.count] for stat in top],
        }

    def cmd_malloc_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        """Python's small-object allocator (``sys._debugmallocstats``): its summary lines,
        e.g. arenas held, and bytes in used and in free blocks (whether RSS is data or
        fragments of freed data)."""
        lines = malloc_stats_lines()
        summary = [line for line in lines if line.startswith("#") or " bytes in " in line]
        return {"summary": summary[-20:], "memory": memory()}

    def cmd_pace_status(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.pacer is not None
        return {"seq": self.pacer.seq, "key": self.pacer.key(self.pacer.seq - 1)}

    def cmd_pace_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.pacer is not None
        result = self.pacer.stop()
        result["last_key"] = self.pacer.key(self.pacer.seq - 1)
        self.pacer = None
        return result

    def cmd_probe(self, request: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        assert node is not None
        store = getattr(node, "_store", None)
        original = getattr(store, "apply", None)
        if original is None:
            raise RuntimeError("this gcollective has no Store.apply to probe: update the probe")
        prefix = request["prefix"]
        # Arrival times go into arrays, not one small list per operation: tens of thousands of
        # tracked objects would make the garbage collector's full passes (which stop the
        # process) longer, and the probe would add to the latency it measures.
        arrivals = self.arrivals = {}

        def record(path: Any, value: Any) -> None:
            if type(path) is str:  # dotted, in newer cores
                path = path.split(".")
            if path[0] == prefix:
                seen = arrivals.get(path[1])
                if seen is None:
                    seen = arrivals[path[1]] = (array("q"), array("d"))
                seen[0].append(value)
                seen[1].append(monotonic())

        def apply(stamp: int, op: int, path: Any, value: Any, *ttl: int) -> None:
            original(stamp, op, path, value, *ttl)
            if op == 0:
                record(path, value)

        # Every received operation goes through store.apply, or through store.apply_batch
        # for received batches (newer cores).
        store.apply = apply  # type: ignore[method-assign]
        original_batch = getattr(store, "apply_batch", None)
        if original_batch is not None:

            def apply_batch(stamps: Any, ops: Any, paths: Any, values: Any, *parent: str) -> None:
                original_batch(stamps, ops, paths, values, *parent)  # (a parent: newer cores)
                head = f"{parent[0]}." if parent and parent[0] else ""
                for op, path, value in zip(ops, paths, values):
                    if op == 0:
                        record(head + path if head else path, value)

            store.apply_batch = apply_batch  # type: ignore[method-assign]
        return {}

    def cmd_probe_dump(self, request: dict[str, Any]) -> dict[str, Any]:
        arrivals = {
            origin: [[value, at] for value, at in zip(*columns)]
            for origin, columns in self.arrivals.items()
        }
        self.arrivals.clear()  # the probe keeps appending to this very dict
        return {"arrivals": arrivals}

    def cmd_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        stats = getattr(self.node, "stats", None)  # newer cores only
        return {"stats": stats() if callable(stats) else None}

    def cmd_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        tree: Any = self.live
        for segment in request["prefix"]:
            tree = tree.get(segment, {}) if type(tree) is dict else {}
        return {"keys": sorted(tree) if type(tree) is dict else []}

    def cmd_set_cost(self, request: dict[str, Any]) -> dict[str, Any]:
        """One batch of ``count`` SETs of 3-level keys (``pattern``: ``same_parent`` or
        ``scattered``), yielding to the event loop every ``yield_every`` sets, with the garbage
        collector on: wall and CPU ns per set, the flushes (encode, log, queue for every peer)
        and the sends included, up to the flush of the batch's last set."""
        node = self.node
        assert node is not None
        keys = set_cost_keys(request["pattern"], request["count"])
        every = request["yield_every"]
        node_set = node.set
        sleep = gevent.sleep
        began_cpu = time.process_time_ns()
        began = time.perf_counter_ns()
        for value, key in enumerate(keys):
            node_set(key, value)
            if value % every == every - 1:
                sleep(0)
        # A peek at the core: its outbox holds the sets not flushed yet (a coalescing timer
        # of about a millisecond sends them); the batch ends when it is empty.
        while getattr(node, "_outbox", None):
            sleep(0.0002)
        wall = time.perf_counter_ns() - began
        cpu = time.process_time_ns() - began_cpu
        # A new key after the batch (its keys repeat from batch to batch): a peer holding it
        # holds the whole batch, the writer's operations arriving in order.
        self.batches += 1
        marker = f"setcost.b{self.batches}"
        node_set(marker, self.batches)
        return {"wall_ns": wall / len(keys), "cpu_ns": cpu / len(keys), "last_key": marker}

    def cmd_local_ops(self, request: dict[str, Any]) -> dict[str, Any]:
        from benchmarks.local_ops import measure

        return measure(**request["args"])

    def cmd_local_web(self, request: dict[str, Any]) -> dict[str, Any]:
        from benchmarks.local_ops import measure_web

        return measure_web(**request["args"])

    def cmd_plain_dict(self, request: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        before = memory()["rss"]
        fanout = request["fanout"]
        tree: dict[str, Any] = {}
        for index in range(request["count"]):
            a, b, c = fill_key(index, fanout).split(".")
            tree.setdefault(a, {}).setdefault(b, {})[c] = index
        gc.collect()
        after = memory()["rss"]
        return {"rss_delta": after - before, "leaves": count_leaves(tree)}

    def cmd_redis_ops(self, request: dict[str, Any]) -> dict[str, Any]:
        from benchmarks.local_ops import measure_redis

        return measure_redis(request["port"], request["count"], request.get("repeats", 3))

    def cmd_profile_start(self, request: dict[str, Any]) -> dict[str, Any]:
        self.profiler = cProfile.Profile()
        self.profiler.enable()
        return {}

    def cmd_profile_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(request["path"])
            self.profiler = None
        return {"path": request["path"]}

    def cmd_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.pacer is not None:
            self.pacer.stop()
        if self.node is not None and self.node.running:
            self.node.stop(request.get("limit", 5.0))
        return {"stopped": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    options = parser.parse_args()
    level = os.environ.get("BENCH_LOG_LEVEL")
    if level:  # gcollective's own log lines, on stderr (shown when a member fails)
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(process)d %(name)s %(message)s"
        )
    # Whatever happens, this process does not outlive its budget.
    gevent.spawn_later(options.max_seconds, os._exit, 3)
    gc.callbacks.append(GC_CLOCK)
    driver = Driver()
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    while True:
        line = stdin.readline()
        if not line:
            break
        request = json.loads(line)
        handler = getattr(driver, "cmd_" + request["cmd"], None)
        try:
            if handler is None:
                raise ValueError(f"unknown command {request['cmd']!r}")
            reply = handler(request)
            reply["ok"] = True
        except Exception as exc:  # reported to the orchestrator, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if request["cmd"] == "stop":
            break
    if driver.node is not None and driver.node.running:
        driver.node.stop(2.0)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of large trees: seconds at 2,000,000 keys


if __name__ == "__main__":
    main()
