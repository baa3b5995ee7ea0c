"""50,000 keys expiring together: the work goes in slices, so the hub (and every other
greenlet) is never held long, and every member, one joining later included, expires them
all. Members run in this process under gevent, so they share one hub with the probe."""

from __future__ import annotations

import gc
import time

import gevent
from cluster import wait_for

FAST = {"sync_interval": 0.1, "backoff_max": 0.2}
KEYS = 50_000
# Generous for a loaded machine (other processes take the CPU for tens of ms at times), and
# for three members in one process (a turn of the loop may run a slice of each): one slice
# takes about 5 ms, the worst delay seen was 40-80 ms; before, the burst held the hub 0.7 s.
BOUND = 0.2


class Probe:
    """A greenlet that reads from a member every 2 ms and records the longest it had to wait
    beyond that (how long someone else held the hub)."""

    def __init__(self, node) -> None:
        self.node = node
        self.worst = 0.0
        self.rounds = 0
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            began = time.perf_counter()
            gevent.sleep(0.002)
            self.node.get("sessions.0.user")
            self.worst = max(self.worst, time.perf_counter() - began - 0.002)
            self.rounds += 1

    def stop(self) -> None:
        self.greenlet.kill()


def test_a_burst_of_expiries_never_holds_the_hub_long(members):
    a, b = members(2)
    ttl = 8.0  # long enough to replicate 50,000 keys and join a member before they expire
    set_at = time.time()
    for i in range(KEYS):
        a.set(f"sessions.{i}", {"user": i}, ttl=ttl)
        if i % 1000 == 0:
            gevent.sleep(0)
    wait_for(lambda: b.stats()["pending_expiries"] == KEYS, timeout=60, what="replicated")
    c = members.join()  # by snapshot, ttls included
    wait_for(lambda: c.stats()["pending_expiries"] == KEYS, timeout=60, what="joined")
    nodes = (a, b, c)
    assert time.time() < set_at + ttl, "set-up took longer than the ttl: raise it"
    # The cyclic GC is paused while the probe runs: a full collection of this process's heap
    # (three members holding 50,000 sessions each) takes ~0.3 s here whatever triggers it,
    # and that is not what is measured. (The members' own work is: firing, making permanent
    # and forgetting 50,000 expiries on each.)
    gc.disable()
    probe = Probe(b)
    try:
        wait_for(
            lambda: all(n.stats()["expired"] == KEYS for n in nodes),
            timeout=ttl + 60,
            what="every member made every expiry permanent",
        )
    finally:
        probe.stop()
        gc.enable()
    print(f"worst delay of a get(): {probe.worst * 1000:.1f} ms over {probe.rounds} reads")
    assert probe.rounds > 100
    assert probe.worst < BOUND, f"the hub was held {probe.worst * 1000:.0f} ms"
    for node in nodes:
        assert node.get("sessions") in (None, {}) and node.stats()["pending_expiries"] == 0
