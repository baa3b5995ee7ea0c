"""50,000 keys expiring together: the work goes in slices, so the hub (and every other
greenlet) is never held long, and every member, one joining later included, expires them
all. Members run in this process under gevent, so they share one hub with the probe."""

from __future__ import annotations

import gc
import time

import gevent
import pytest
from cluster import LocalMembers, wait_for

FAST = {"sync_interval": 0.1, "backoff_max": 0.2}
KEYS = 50_000
# Bounds the CPU time this thread spent while the probe waited (the work that held the hub):
# a loaded machine (load 15 on two cores) also leaves the process waiting for a core, and the
# probe's wall-clock delays reached 208-348 ms there with nothing wrong. Generous for three
# members in one process (a turn of the loop may run a slice of each): one slice takes about
# 5 ms, the worst delay seen on a quiet machine was 40-80 ms; before, the burst held the hub
# 0.7 s (with the expirer's slices made unbounded, _STEP = 10**6: 764 ms of CPU at load 14).
BOUND = 0.2
# Seconds the keys live: long enough to replicate 50,000 keys and join a member before they
# expire (~3-5 s on a quiet machine, several CPU seconds in all). At load 15 on two cores
# this process gets a fraction of a core and the join alone took over 45 s; the set-up then
# starts again with the next, longer ttl (the figure measured is the burst, not the pace
# of the set-up).
TTLS = (8.0, 30.0, 90.0)


class Probe:
    """A greenlet that reads from a member every 2 ms and records the longest it had to wait
    beyond that (how long someone else held the hub), in wall-clock time and in CPU time of
    this thread meanwhile (the work that held it, without the time the machine ran others)."""

    def __init__(self, node) -> None:
        self.node = node
        self.worst = 0.0
        self.worst_cpu = 0.0
        self.rounds = 0
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            began, cpu_began = time.perf_counter(), time.thread_time()
            gevent.sleep(0.002)
            self.node.get("sessions.0.user")
            self.worst = max(self.worst, time.perf_counter() - began - 0.002)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu_began)
            self.rounds += 1

    def stop(self) -> None:
        self.greenlet.kill()


def set_up(members: LocalMembers, ttl: float) -> tuple | None:
    """Three members holding ``KEYS`` sessions expiring ``ttl`` seconds from now, the third
    joined by snapshot (ttls included); None if that took longer than ``ttl``."""
    a, b = members(2)
    expires = time.time() + ttl
    for i in range(KEYS):
        a.set(f"sessions.{i}", {"user": i}, ttl=ttl)
        if i % 1000 == 0:
            gevent.sleep(0)

    def holds_them_all_or_too_late(node) -> bool:
        # (Once the first keys expired, a member may never count them all: stop waiting.)
        return node.stats()["pending_expiries"] == KEYS or time.time() >= expires

    wait_for(lambda: holds_them_all_or_too_late(b), timeout=ttl + 60, what="replicated")
    c = members.join()
    wait_for(lambda: holds_them_all_or_too_late(c), timeout=ttl + 60, what="joined")
    if time.time() >= expires:
        return None
    assert all(n.stats()["pending_expiries"] == KEYS for n in (a, b, c))
    return a, b, c


def test_a_burst_of_expiries_never_holds_the_hub_long():
    for ttl in TTLS:
        members = LocalMembers(**FAST)
        try:
            nodes = set_up(members, ttl)
            if nodes is not None:
                measure_the_burst(nodes, ttl)
                return
            print(f"the set-up took longer than a {ttl} s ttl: again with a longer one")
        finally:
            members.stop()
    pytest.fail(f"the set-up took longer than every ttl ({TTLS})")


def measure_the_burst(nodes: tuple, ttl: float) -> None:
    # The cyclic GC is paused while the probe runs: a full collection of this process's heap
    # (three members holding 50,000 sessions each) takes ~0.3 s here whatever triggers it,
    # and that is not what is measured. (The members' own work is: firing, making permanent
    # and forgetting 50,000 expiries on each.)
    gc.disable()
    probe = Probe(nodes[1])
    try:
        wait_for(
            lambda: all(n.stats()["expired"] == KEYS for n in nodes),
            timeout=ttl + 60,
            what="every member made every expiry permanent",
        )
    finally:
        probe.stop()
        gc.enable()
    print(
        f"worst delay of a get(): {probe.worst * 1000:.1f} ms, {probe.worst_cpu * 1000:.1f} ms "
        f"of CPU, over {probe.rounds} reads"
    )
    assert probe.rounds > 100
    assert probe.worst_cpu < BOUND, f"the hub was held {probe.worst_cpu * 1000:.0f} ms of CPU"
    for node in nodes:
        assert node.get("sessions") in (None, {}) and node.stats()["pending_expiries"] == 0
