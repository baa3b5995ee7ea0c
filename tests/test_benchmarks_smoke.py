"""CI smoke test of the benchmark suite (issue 6): ``python -m benchmarks --quick`` runs through.

It checks that every scenario completes and reports sane, non-zero figures; it sets no timing
thresholds (CI machines vary too much for that; the targets live in the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
        timeout=240,
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

    runs = results["throughput"]["runs"]
    assert [run["processes"] for run in runs] == [2, 4, 8]
    for run in runs:
        assert run["complete"], run
        assert _positive(run["seconds"]) and _positive(run["sets_per_second"])
        hot = run["hot_counter"]
        assert hot["complete"], hot
        assert hot["values"] == [run["processes"] * hot["increments_each"]] * run["processes"]
        assert _positive(hot["increments_per_second"])

    latency = results["latency"]
    assert [run["offered_rate"] for run in latency["runs"]] == [1_000, 10_000]
    for run in latency["runs"]:
        assert run["lost"] == 0 and run["measured_ops"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert _positive(run["achieved_rate"])

    join = results["join"]
    assert join["synced"] and join["caught_up"]
    assert _positive(join["join_seconds"])
    for name in ("holder", "replica", "joiner", "plain_dict"):
        assert _positive(join[f"{name}_bytes_per_key"])
    assert min(join["leaves"]) >= join["keys"]

    catchup = results["catchup"]
    assert catchup["caught_up"] and _positive(catchup["catchup_seconds"])
    assert catchup["writes_while_partitioned"] > 0

    redis = results["redis"]
    if "skipped" not in redis:
        assert all(_positive(ns) for ns in redis["ns"].values())

    assert len(results["targets"]) == 7
    assert all("error" not in section for section in results.values() if isinstance(section, dict))
