"""The sizes of every benchmark scenario: ``Config.full()`` is the issues', ``Config.quick()``
a smoke run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Progress = Callable[[str], None]


@dataclass
class Config:
    """Sizes of every scenario; ``Config.full()`` is the issue's, ``Config.quick()`` a smoke run."""

    name: str
    local_peers: list[int] = field(default_factory=lambda: [0, 3, 7])
    local_ops_per_batch: int = 10_000
    local_batches: int = 5
    # The full cost of a set (GC on, flushes included), with peers in their own processes.
    set_cost_peers: list[int] = field(default_factory=lambda: [0, 7])
    set_cost_ops: int = 20_000
    set_cost_yield_every: int = 100
    throughput: list[tuple[int, int]] = field(
        default_factory=lambda: [(2, 50_000), (4, 50_000), (8, 25_000)]
    )
    # Each throughput run is repeated and the median one reported: on a shared machine one
    # run's figure can be off by 2x.
    throughput_repeats: int = 3
    hot_increments: int = 1_000
    hot_limit: float = 90.0
    latency_members: int = 4
    latency_rates: list[int] = field(default_factory=lambda: [1_000, 10_000])
    latency_seconds: float = 5.0
    join_keys: int = 2_000_000
    join_fanout: int = 100
    join_live_rate: int = 1_000
    join_limit: float = 180.0
    catchup_members: int = 4
    catchup_rate: int = 5_000
    catchup_partition_seconds: float = 10.0
    redis_ops: int = 10_000
    # The web workload (benchmarks/web.py): ab -n web_requests -c web_concurrency, per round.
    web_workers: int = 4
    web_requests: int = 20_000
    web_concurrency: int = 50
    web_rounds: int = 3
    # Issue 20's cluster workloads: operations per member, and rounds (interleaved).
    workload_members: int = 4
    workload_ops: int = 50_000
    workload_sessions: int = 20_000
    workload_counter_keys: int = 1_000
    workload_repeats: int = 3
    workload_limit: float = 120.0
    # Churn (issue 20): members each writing churn_rate operations/s of sessions with
    # churn_ttl, scratch keys deleted and shared counters, for churn_seconds; RSS sampled
    # every churn_sample_seconds. churn_options: the members' options (e.g. log_bytes).
    churn_members: int = 3
    churn_rate: int = 6_000
    churn_ttl: float = 2.0
    churn_seconds: float = 240.0
    churn_sample_seconds: float = 10.0
    churn_options: dict[str, Any] = field(default_factory=dict)
    member_max_seconds: float = 900.0
    profile_dir: str | None = None

    @classmethod
    def full(cls) -> Config:
        return cls("full")

    @classmethod
    def quick(cls) -> Config:
        return cls(
            "quick",
            local_ops_per_batch=1_000,
            local_batches=2,
            set_cost_ops=2_000,
            throughput=[(2, 5_000), (4, 5_000), (8, 2_500)],
            throughput_repeats=1,
            hot_increments=100,
            hot_limit=20.0,
            latency_seconds=1.0,
            join_keys=100_000,
            join_live_rate=500,
            join_limit=60.0,
            catchup_partition_seconds=2.0,
            redis_ops=500,
            web_requests=2_000,
            web_rounds=1,
            workload_ops=2_000,
            workload_sessions=1_000,
            workload_counter_keys=100,
            workload_repeats=1,
            workload_limit=60.0,
            churn_seconds=25.0,
            churn_sample_seconds=2.5,
            member_max_seconds=120.0,
        )
