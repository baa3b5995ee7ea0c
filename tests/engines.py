"""A replication engine alone, without a shell (no sockets, no gevent), for the tests that
drive one by hand with time passed in."""

from __future__ import annotations

from typing import Callable

from gcollective._clock import HybridClock
from gcollective._engine import Engine
from gcollective._store import Store


def new_engine(
    node_id: int,
    wall_ns: Callable[[], int],
    *,
    store: Store | None = None,
    port: int = 7000,
    log_bytes: int = 1 << 16,
    max_frame: int = 1 << 20,
    max_queue_bytes: int = 1 << 20,
    sync_interval: float = 0.1,
    down_timeout: float = 3600.0,
    clock_skew: float = 1.0,
) -> Engine:
    """An engine at ``127.0.0.1:port`` whose clock and wall clock read ``wall_ns``."""
    return Engine(
        node_id,
        Store() if store is None else store,
        HybridClock(node_id, now=wall_ns),
        wall_ns=wall_ns,
        advertise=("127.0.0.1", port),
        log_bytes=log_bytes,
        max_frame=max_frame,
        max_queue_bytes=max_queue_bytes,
        sync_interval=sync_interval,
        down_timeout=down_timeout,
        clock_skew=clock_skew,
    )
