"""A joiner that stops reading in the middle of its snapshot (frozen, or starved of CPU on a
busy machine) still gets that snapshot, once: the holder's stream waits for it.

The holder's links end a connection whose data stays unacknowledged for ``stall_timeout``
(``TCP_USER_TIMEOUT``, for lost packets). Linux applies that timeout to a zero window too:
a peer that is alive but does not read for that long, its receive buffer full, was cut
like a dead one, and a snapshot, merged only at its end, started again from nothing on
the next connection, again and again on a loaded machine (docs/links.rst)."""

from __future__ import annotations

import time

import gevent
from cluster import NodeProcess, free_ports, wait_until

from gcollective import Collective

KEYS = 1_000_000  # (a snapshot of ~35 MB: far more than the kernel's buffers hold)
FROZEN_SECONDS = 4.0  # (twice the holder's stall_timeout)


def test_a_joiner_frozen_mid_snapshot_gets_it_once() -> None:
    holder_port, joiner_port = free_ports(2)
    peers = [holder_port, joiner_port]
    # (A small queue: the writes made before the joiner came are dropped, not queued for it,
    # so what its connection carries is the snapshot.)
    holder = NodeProcess(holder_port, peers, stall_timeout=2.0, max_queue_bytes=65536)
    joiner = None
    try:
        holder.start(timeout=0.5)
        holder.call("write_keys", prefix="g", count=KEYS, flat=True)
        joiner = Collective(f"127.0.0.1:{joiner_port}", holder.peers)
        joiner.start(timeout=0)
        deadline = time.monotonic() + 60
        while joiner.stats()["received_bytes"] < 1_000_000:  # the stream under way
            assert time.monotonic() < deadline, "no snapshot came"
            gevent.sleep(0.001)
        # The freeze itself (not a wait for something): this process, the joiner, runs
        # nothing for this long, its receive buffer full, the holder's stream blocked.
        time.sleep(FROZEN_SECONDS)
        wait_until(lambda: joiner.synced, timeout=120, sleep=gevent.sleep)
        assert joiner.get(f"g.{KEYS - 1}") == KEYS - 1
        link = next(iter(holder.call("stats")["peers"].values()))  # (the holder's to the joiner)
        assert link["snapshots_sent"] == 1, (link["last_error"], link["connects"])
    finally:
        holder.kill()
        if joiner is not None:
            joiner.stop(timeout=1)
