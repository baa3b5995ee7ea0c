"""CI smoke test of the benchmark suite (issue 6): ``python -m benchmarks --quick`` runs through.

It checks that every scenario completes and reports sane, non-zero figures; it sets no timing
thresholds (CI machines vary too much for that; the targets live in docs/performance.rst).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import web
from benchmarks.procs import Group, Member, free_ports, same_data
from benchmarks.report import check_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_quick_benchmark_run_completes_with_sane_figures(tmp_path):
    output = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-chart", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # (the churn scenario adds ~30 s)
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Targets" in proc.stdout  # the printed table
    assert "local ops" in proc.stderr  # progress lines
    results = json.loads(output.read_text())

    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"]
    assert machine["versions"]["gcollective"] and machine["versions"]["gevent"]
    assert results["config"]["name"] == "quick"

    local = results["local"]
    for op in ("get", "set", "incr"):
        assert set(local["gcollective"][op]) == {"0", "3", "7"}
        for figures in [*local["gcollective"][op].values(), local["dict"][op]]:
            assert set(figures) == {"1", "2", "3", "4", "5"}
            assert all(_positive(ns) for ns in figures.values())

    set_full = local["set_full"]
    for pattern in ("same_parent", "scattered"):
        assert set(set_full[pattern]) == {"0", "7"}
        for run in set_full[pattern].values():
            assert run["complete"], run
            assert _positive(run["cpu_ns"]) and _positive(run["wall_ns"])

    runs = results["throughput"]["runs"]
    assert [run["processes"] for run in runs] == [2, 4, 8]
    for run in runs:
        assert run["complete"] and run["identical"], run
        assert _positive(run["seconds"]) and _positive(run["sets_per_second"])
        hot = run["hot_counter"]
        assert hot["complete"], hot
        assert hot["values"] == [run["processes"] * hot["increments_each"]] * run["processes"]
        assert _positive(hot["increments_per_second"])

    latency = results["latency"]
    assert [run["offered_rate"] for run in latency["runs"]] == [1_000, 10_000]
    for run in latency["runs"]:
        assert run["lost"] == 0 and run["measured_ops"] > 0 and run["converged"]
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert _positive(run["achieved_rate"])

    for name in ("join", "join_mixed"):
        join = results[name]
        assert join["synced"] and join["full"] and join["caught_up"], join
        assert join["identical"] and join["converged"], join
        # the join is timed until the joiner holds everything, not until the first snapshot
        assert join["join_seconds"] >= join["snapshot_merged_seconds"] > 0
        assert join["live_writes_due_at_snapshot"] > 0  # live writes were part of the sync
        for member in ("holder", "replica", "joiner"):
            assert _positive(join[f"{member}_bytes_per_key"])
        assert min(join["leaves"]) >= join["keys"]
    assert _positive(results["join"]["plain_dict_bytes_per_key"])

    catchup = results["catchup"]
    assert catchup["caught_up"] and catchup["converged"] and _positive(catchup["catchup_seconds"])
    assert catchup["writes_while_partitioned"] > 0

    web_calls = local["web"]
    assert set(web_calls["ns"]) == set(web_calls["x_dict_set"]) and web_calls["peers"] == 7
    assert all(_positive(ns) for ns in web_calls["ns"].values())
    workloads = results["workloads"]
    for name in ("distinct", "hot_counter", "sessions", "rate_limit"):
        assert workloads[name]["exact"], workloads[name]  # every value checked on every member
        assert _positive(workloads[name]["ops_per_second"])
        assert _positive(workloads[name]["x_distinct"])
        assert _positive(workloads[name]["cpu_us_per_op"])  # (each member's CPU, summed)
        assert 0 <= workloads[name]["gc_us_per_op"] < workloads[name]["cpu_us_per_op"]

    redis = results["redis"]
    if "skipped" not in redis:
        assert all(_positive(ns) for ns in redis["ns"].values())

    _check_web(results["web"])

    churn = results["churn"]
    assert churn["exact"] and churn["identical"], churn["members"]  # counters exact, all equal
    assert len(churn["members"]) == 3 and len(churn["samples"]) > 2
    for member in churn["members"]:
        assert _positive(member["rss_start"]) and member["rss_peak"] >= member["rss_end"]
        assert member["allocator_after_settle"]["used_bytes"] > 0

    assert len(results["targets"]) == 9
    assert not [t for t in results["targets"] if t["verdict"].startswith("FAILED")]
    assert all("error" not in section for section in results.values() if isinstance(section, dict))


def _check_web(web: dict) -> None:
    """The web workload's section: every variant served every request and counted it."""
    if "skipped" in web:
        return
    assert set(web["variants"]) == {"dict", "gcollective", "redis"}
    for variant, figures in web["variants"].items():
        assert figures["exact"] and figures["failed"] == 0, (variant, figures)
        assert _positive(figures["requests_per_second"])
        assert _positive(figures["cpu_us_per_request"])
        assert len(figures["counts"]) == web["workers"]
    sent = web["warmup_requests"] + web["rounds"] * web["requests"]
    assert set(web["variants"]["gcollective"]["counts"].values()) == {sent}
    assert sum(web["variants"]["dict"]["counts"].values()) == sent
    assert web["variants"]["gcollective"]["ops_per_frame_sent"] >= 1


@pytest.mark.skipif(web.missing_tools() is not None, reason=str(web.missing_tools()))
def test_quick_web_workload_serves_and_counts_every_request(tmp_path):
    """``--only web --quick``: gunicorn + ab, three variants, exact counts on every worker."""
    output = tmp_path / "web.json"
    command = ["-m", "benchmarks", "--quick", "--only", "web", "--no-chart", "--output"]
    proc = subprocess.run(
        [sys.executable, *command, str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Web workload" in proc.stdout
    _check_web(json.loads(output.read_text())["web"])


@pytest.mark.parametrize("workload", ["distinct", "sessions", "rate_limit", "hot_counter"])
def test_the_workloads_model_runs_each_workload_exactly(workload):
    """``benchmarks.workload_model``: the four members in one process complete a round of
    the workload (each member checks it holds everyone's operations) and print its CPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.workload_model", workload, "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert f"{workload}: CPU per operation" in proc.stderr


def _passing_results() -> dict:
    """Results in which every target's figure is well within its bound, every run sound."""
    sound = {"complete": True, "hot_counter": {"complete": True}}
    return {
        "throughput": {
            "runs": [
                {"processes": 4, "keys_each": 50_000, "sets_per_second": 1e6, **sound},
                {"processes": 8, "keys_each": 25_000, "sets_per_second": 1e6, **sound},
            ]
        },
        "local": {
            "gcollective": {"get": {"0": {"3": 100.0}}},
            "set_full": {
                pattern: {"7": {"cpu_ns": 100.0, "wall_ns": 100.0, "complete": True}}
                for pattern in ("same_parent", "scattered")
            },
        },
        "join": {
            "keys": 2_000_000,
            "join_seconds": 0.5,
            "holder_bytes_per_key": 100.0,
            "synced": True,
            "full": True,
            "caught_up": True,
            "converged": True,
        },
        "latency": {
            "processes": 4,
            "runs": [{"offered_rate": 10_000, "p99_ms": 1.0, "lost": 0, "converged": True}],
        },
        "churn": {"seconds": 240.0, "rss_steady_max": 50e6, "exact": True},
    }


def test_targets_are_met_only_by_sound_runs():
    """A figure within its bound is "met" only when its run kept every write and its members
    ended with identical data; otherwise the target fails, whatever the figure."""
    assert {row["verdict"] for row in check_targets(_passing_results())} == {"met"}
    spoilers = {
        "keys missing or members' data differ": [
            lambda r: r["throughput"]["runs"][0].update(complete=False)
        ],
        "the hot counter is wrong": [
            lambda r: r["throughput"]["runs"][1]["hot_counter"].update(complete=False)
        ],
        "a peer missed sets": [
            lambda r: r["local"]["set_full"]["scattered"]["7"].update(complete=False)
        ],
        "live writes missing": [lambda r: r["join"].update(caught_up=False)],
        "members' data differ": [
            lambda r: r["join"].update(converged=False),
            lambda r: r["latency"]["runs"][0].update(converged=False),
        ],
        "the joiner never held everything": [
            lambda r: r["join"].update(full=False, join_seconds=None)
        ],
        "3 writes lost": [lambda r: r["latency"]["runs"][0].update(lost=3)],
        "counters or members' data differ": [lambda r: r["churn"].update(exact=False)],
    }
    for problem, spoils in spoilers.items():
        for spoil in spoils:
            results = _passing_results()
            spoil(results)
            verdicts = [row["verdict"] for row in check_targets(results)]
            assert f"FAILED: {problem}" in verdicts, (problem, verdicts)
            assert "met" in verdicts  # only the spoilt run's targets fail


def test_same_data_compares_digests_not_leaf_counts():
    """Two members holding as many leaves but one different value are not "the same data"."""
    with Group() as group:
        members = [group.add(Member(port, [])) for port in free_ports(2)]
        for member in members:
            member.start(limit=10)
            member.call("fill", begin=0, end=100, fanout=10)
        assert same_data(members) == (True, [100, 100])
        members[1].call("set", key="g0.s0.k1", value="other")
        assert same_data(members) == (False, [100, 100])
