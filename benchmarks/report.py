"""Turning results into a table, a target check and (with matplotlib) a PNG chart."""

from __future__ import annotations

from typing import Any, Callable

#: The issue's targets on a 2-core machine: (label, how to read the figure, bound, unit, kind).
TARGETS = [
    ("4 x 50,000 keys, sets/s cluster-wide", ("throughput", 4, 50_000), 300_000, "/s", "min"),
    ("8 x 25,000 keys, sets/s cluster-wide", ("throughput", 8, 25_000), 180_000, "/s", "min"),
    ("get, 3-level path", ("local", "get", "0", "3"), 1000, "ns", "max"),
    (
        "set, 3-level path, 7 peers, one parent (full cost)",
        ("set_full", "same_parent", "7"),
        4000,
        "ns",
        "max",
    ),
    (
        "set, 3-level path, 7 peers, scattered (full cost)",
        ("set_full", "scattered", "7"),
        4000,
        "ns",
        "max",
    ),
    ("join of 2,000,000 keys", ("join", "join_seconds", 2_000_000), 3.0, "s", "max"),
    (
        "holder RSS per key (2,000,000 keys)",
        ("join", "holder_bytes_per_key", 2_000_000),
        300,
        "B",
        "max",
    ),
    ("p99 propagation at 10k sets/s, 4 processes", ("latency", 10_000), 5.0, "ms", "max"),
    ("RSS per member under churn (steady state)", ("churn", 240.0), 100e6, "B", "max"),
]


def _fmt(value: float, unit: str) -> str:
    if value == float("inf"):
        return "never"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ns":
        return f"{value:,.0f} ns"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "B" and value >= 1e6:
        return f"{value / 1e6:,.0f} MB"
    return f"{value:,.0f} {unit}"


def target_figure(
    results: dict[str, Any], where: tuple[Any, ...]
) -> tuple[float | None, bool, str | None]:
    """The figure a target refers to, whether it was measured at the target's size, and what
    went wrong in the run it comes from (data lost, members differing), if anything."""
    kind = where[0]
    section = results.get("local" if kind == "set_full" else kind)
    if not section or "error" in section or "skipped" in section:
        return None, False, None
    if kind == "throughput":
        _, processes, keys = where
        for run in section["runs"]:
            if run["processes"] == processes:
                return run["sets_per_second"], run["keys_each"] == keys, _throughput_problem(run)
        return None, False, None
    if kind == "local":
        _, op, peers, depth = where
        figure = section.get("gcollective", {}).get(op, {}).get(peers, {}).get(depth)
        return figure, figure is not None, None
    if kind == "set_full":
        _, pattern, peers = where
        run = section.get("set_full", {}).get(pattern, {}).get(peers)
        if run is None:
            return None, False, None
        problem = None if run["complete"] else "a peer missed sets"
        return run["cpu_ns"], True, problem
    if kind == "join":
        _, name, keys = where
        figure = section.get(name)
        if figure is None:  # the joiner never held everything
            figure = float("inf")
        return figure, section["keys"] == keys, _join_problem(section)
    if kind == "latency":
        _, rate = where
        for run in section["runs"]:
            if run["offered_rate"] == rate:
                return run["p99_ms"], section["processes"] == 4, _latency_problem(run)
        return None, False, None
    if kind == "churn":
        _, seconds = where
        problem = None if section["exact"] else "counters or members' data differ"
        return section["rss_steady_max"], section["seconds"] >= seconds, problem
    return None, False, None


def _throughput_problem(run: dict[str, Any]) -> str | None:
    if not run["complete"]:
        return "keys missing or members' data differ"
    if not run["hot_counter"]["complete"]:
        return "the hot counter is wrong"
    return None


def _join_problem(section: dict[str, Any]) -> str | None:
    if not section["synced"] or not section.get("full", True):
        return "the joiner never held everything"
    if not section["caught_up"]:
        return "live writes missing"
    if not section["converged"]:
        return "members' data differ"
    return None


def _latency_problem(run: dict[str, Any]) -> str | None:
    if run["lost"]:
        return f"{run['lost']:,} writes lost"
    if not run.get("converged", True):
        return "members' data differ"
    return None


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: the figure, and met / missed (or not comparable at this size).

    A run that lost data or whose members ended with different data fails its targets
    whatever its figure: a fast wrong answer is not a result."""
    rows = []
    for label, where, bound, unit, kind in TARGETS:
        figure, comparable, problem = target_figure(results, where)
        if figure is None:
            verdict = "not run"
        elif problem:
            verdict = f"FAILED: {problem}"
        elif not comparable:
            verdict = "n/a (smaller run)"
        elif (figure >= bound) if kind == "min" else (figure <= bound):
            verdict = "met"
        else:
            verdict = "missed"
        rows.append(
            {
                "target": label,
                "bound": ("at least " if kind == "min" else "at most ") + _fmt(bound, unit),
                "figure": None if figure is None else _fmt(figure, unit),
                "value": figure,
                "verdict": verdict,
            }
        )
    return rows


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def _set_full_table(section: dict[str, Any]) -> str:
    """The full cost of a set (``scenarios.set_cost``), by key pattern and peers."""
    rows = []
    for pattern in ("same_parent", "scattered"):
        for peers, run in sorted(section.get(pattern, {}).items(), key=lambda i: int(i[0])):
            rows.append(
                [
                    f"{pattern.replace('_', ' ')}, {peers} peers",
                    f"{run['cpu_ns']:,.0f}",
                    f"{run['wall_ns']:,.0f}",
                    _yes(run["complete"]),
                ]
            )
    return _table(
        f"Full cost of a set, 3-level key (GC on, yielding every {section['yield_every']} "
        "sets, flush included; peers in their own processes)",
        ["keys", "CPU ns per set", "wall ns per set", "all received"],
        rows,
    )


def _join_table(joins: list[tuple[str, dict[str, Any]]]) -> str:
    """The join figures, one column per join scenario (``join``, ``join_mixed``)."""
    mb = 1024 * 1024

    def seconds(section: dict[str, Any], name: str) -> str:
        value = section.get(name)
        return f"NOT within {section['join_limit']:.0f} s" if value is None else f"{value:.2f} s"

    def per_key(section: dict[str, Any], name: str) -> str:
        value = section.get(name)
        return "-" if value is None else f"{value:,.0f}"

    figures: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("keys (3 levels)", lambda j: f"{j['keys']:,}"),
        ("join: start until full sync", lambda j: seconds(j, "join_seconds")),
        ("  (first snapshot merged)", lambda j: seconds(j, "snapshot_merged_seconds")),
        ("live writes during join", lambda j: f"{j['live_rate']:,}/s"),
        ("converged, identical data", lambda j: _yes(j["converged"])),
        ("holder RSS", lambda j: f"{j['holder_rss'] / mb:,.0f} MB"),
        ("holder bytes per key", lambda j: per_key(j, "holder_bytes_per_key")),
        ("replica bytes per key", lambda j: per_key(j, "replica_bytes_per_key")),
        (
            "joiner RSS (peak)",
            lambda j: f"{j['joiner_rss'] / mb:,.0f} MB ({j['joiner_peak_rss'] / mb:,.0f} MB)",
        ),
        ("joiner bytes per key", lambda j: per_key(j, "joiner_bytes_per_key")),
        ("plain dict bytes per key", lambda j: per_key(j, "plain_dict_bytes_per_key")),
        ("fill (write + replicate)", lambda j: f"{j['fill_seconds']:.1f} s"),
    ]
    headers = {"join": "one origin, in order, ints", "join_mixed": "two origins, mixed"}
    return _table(
        "Join",
        ["figure", *(headers[name] for name, _ in joins)],
        [[label, *(show(section) for _, section in joins)] for label, show in figures],
    )


def _web_table(section: dict[str, Any]) -> str:
    """The web workload: requests/s per variant, each round's figure, and the counts' check."""
    if "variants" not in section:
        return f"Web workload: {section.get('skipped') or section.get('error')}"
    rows = []
    for variant, figures in section["variants"].items():
        rows.append(
            [
                variant,
                f"{figures['requests_per_second']:,.0f}",
                " / ".join(f"{rate:,.0f}" for rate in figures["rounds"]),
                f"{figures['cpu_us_per_request']:,.0f}",
                str(figures["failed"]),
                _yes(figures["exact"]),
                f"{figures['ops_per_frame_sent']:.1f}" if "ops_per_frame_sent" in figures else "-",
            ]
        )
    title = (
        f"Web workload: gunicorn, {section['workers']} workers, ab -n {section['requests']:,} "
        f"-c {section['concurrency']}, {section['rounds']} interleaved rounds (gcollective "
        f"{section['gcollective_vs_dict']:.2f}x dict, {section['gcollective_vs_redis']:.2f}x redis)"
    )
    return _table(
        title,
        [
            "variant",
            "requests/s",
            "rounds",
            "CPU us/request",
            "failed",
            "exact",
            "ops/frame",
        ],
        rows,
    )


def _spread(run: dict[str, Any]) -> str:
    """The sets/s of every attempt of a repeated throughput run: ``"3: 226k-376k"``."""
    repeats = run.get("repeats")
    if not repeats:
        return "1"
    figures = [attempt["sets_per_second"] for attempt in repeats]
    return f"{len(figures)}: {min(figures) / 1000:,.0f}k-{max(figures) / 1000:,.0f}k"


#: What each row of ``local_ops.measure_web`` times (a 3-level key).
_LOCAL_WEB_LABELS = {
    "dict_set": "plain nested dict set",
    "set": "set, int value",
    "set_dict": 'set of a small dict ({"u": i})',
    "set_dict_ttl": "the same with ttl=60",
    "incr_hot": "incr, one hot key",
    "incr": "incr, 1,000 keys",
    "incr_ttl": "incr(..., ttl=60)",
    "delete": "delete",
}


def _local_web_table(section: dict[str, Any]) -> str:
    """The calls web apps make most (``local_ops.measure_web``), next to a plain dict set."""
    rows = [
        [label, f"{section['ns'][row]:,.0f}", f"{section['x_dict_set'][row]:.2f}"]
        for row, label in _LOCAL_WEB_LABELS.items()
        if row in section["ns"]
    ]
    return _table(
        f"Web-app calls, 3-level keys, {section['peers']} peers (ns per call)",
        ["call", "ns", "x dict set"],
        rows,
    )


def _workloads_table(section: dict[str, Any]) -> str:
    """Cluster-wide operations/s of ``workloads.app_workloads``."""
    rows = [
        [
            name.replace("_", " "),
            f"{section[name]['ops_each']:,}",
            f"{section[name]['ops_per_second']:,.0f}",
            f"{section[name]['x_distinct']:.2f}",
            _yes(section[name]["exact"]),
        ]
        for name in ("distinct", "hot_counter", "sessions", "rate_limit")
        if name in section
    ]
    return _table(
        f"Web workloads, {section['processes']} processes (median of {len(section['rounds'])} "
        "rounds)",
        ["workload", "ops each", "ops/s", "x distinct", "exact everywhere"],
        rows,
    )


def _churn_table(section: dict[str, Any]) -> str:
    """RSS per member under churn (``churn.churn``), and the log's size."""
    rows = [
        [
            f"member {i}",
            *(f"{member[key] / 1e6:.0f}" for key in ("rss_start", "rss_peak", "rss_steady")),
            f"{member['rss_end'] / 1e6:.0f}",
            f"{member['rss_after_settle'] / 1e6:.0f}",
            _allocated_mb(member.get("allocator_after_settle") or {}),
            f"{member['log_bytes_peak'] / 1e6:.1f}",
            f"{section['live_leaves_end'][i]:,}",
        ]
        for i, member in enumerate(section["members"])
    ]
    rates = ", ".join(f"{rate:,.0f}" for rate in section["achieved_rate"])
    return _table(
        f"Memory under churn: {section['processes']} members x {section['offered_rate']:,} "
        f"ops/s (achieved {rates}) for {section['seconds']:.0f} s, sessions ttl "
        f"{section['ttl']:g} s; exact at the end: {_yes(section['exact'])}",
        [
            "",
            "RSS start MB",
            "peak",
            "steady",
            "end",
            "settled",
            "of it in Python blocks used / free",
            "log peak MB",
            "live leaves",
        ],
        rows,
    )


def _allocated_mb(figures: dict[str, int]) -> str:
    """Bytes of Python's small-object allocator in used and in free blocks, in MB."""
    if "used_bytes" not in figures:
        return "-"
    return f"{figures['used_bytes'] / 1e6:.0f} / {figures['free_bytes'] / 1e6:.0f}"


def tables(results: dict[str, Any]) -> str:
    """Every section as a plain-text table."""
    local = results.get("local") or {}
    found: list[str | None] = [
        _local_table(local) if "gcollective" in local else None,
        _set_full_table(local["set_full"]) if local.get("set_full") else None,
        _local_web_table(local["web"]) if local.get("web") else None,
        _workloads_table(results["workloads"]) if results.get("workloads") else None,
        _throughput_table(results.get("throughput") or {}),
        _latency_table(results.get("latency") or {}),
        _join_table(joins) if (joins := _joins(results)) else None,
        _catchup_table(results.get("catchup") or {}),
        _churn_table(results["churn"]) if "members" in (results.get("churn") or {}) else None,
        _redis_table(results.get("redis") or {}, local),
        _web_table(results["web"]) if results.get("web") else None,
        *_profile_tables(results),
        *(
            f"{name}: FAILED: {section['error']}"
            for name, section in results.items()
            if isinstance(section, dict) and "error" in section
        ),
        _targets_table(results.get("targets") or []),
    ]
    return "\n\n".join(table for table in found if table)


def _local_table(local: dict[str, Any]) -> str:
    depths = sorted(next(iter(local["dict"].values())))
    rows = []
    for op in ("get", "set", "incr"):
        for peers, figures in sorted(local["gcollective"][op].items(), key=lambda i: int(i[0])):
            rows.append([f"{op}, {peers} peers"] + [f"{figures[d]:,.0f}" for d in depths])
        rows.append([f"{op}, plain dict"] + [f"{local['dict'][op][d]:,.0f}" for d in depths])
    return _table(
        "Local operations (ns per call, by path depth)",
        ["operation"] + [f"depth {d}" for d in depths],
        rows,
    )


def _throughput_table(section: dict[str, Any]) -> str | None:
    if "runs" not in section:
        return None
    rows = []
    for run in section["runs"]:
        hot = run["hot_counter"]
        counters = run.get("core_stats") or {}
        dup = "-"
        if counters.get("applied_ops"):
            dup = f"{counters['received_ops'] / counters['applied_ops']:.2f}"
        rows.append(
            [
                f"{run['processes']} x {run['keys_each']:,}",
                f"{run['seconds']:.2f}",
                f"{run['sets_per_second']:,.0f}",
                _spread(run),
                f"{run['local_sets_per_second']:,.0f}",
                f"{run['cpu_us_per_key']:.2f}" if "cpu_us_per_key" in run else "-",
                "yes" if run["complete"] else "NO",
                f"{hot['seconds']:.2f}",
                f"{hot['increments_per_second']:,.0f}",
                "yes" if hot["complete"] else "NO",
                dup,
            ]
        )
    return _table(
        "Replication throughput (loopback, until every process holds every key)",
        [
            "processes x keys",
            "s",
            "sets/s",
            "runs (median shown)",
            "local sets/s",
            "CPU us/key",
            "all",
            "hot s",
            "incr/s",
            "exact",
            "recv/applied",
        ],
        rows,
    )


def _latency_table(section: dict[str, Any]) -> str | None:
    if "runs" not in section:
        return None
    rows = [
        [
            f"{run['offered_rate']:,}/s",
            f"{run['achieved_rate']:,.0f}/s",
            f"{run['measured_ops']:,}",
            f"{run['p50_ms']:.2f}",
            f"{run['p99_ms']:.2f}",
            f"{run['max_ms']:.2f}",
            f"{run['p99_ms_from_call']:.2f}" if "p99_ms_from_call" in run else "-",
            str(run["lost"]),
            _yes(run.get("converged")),
        ]
        for run in section["runs"]
    ]
    return _table(
        f"Propagation latency, from when a set was due (open loop) until visible on all "
        f"others ({section['processes']} processes)",
        [
            "offered",
            "achieved",
            "ops",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99 from call",
            "lost",
            "identical",
        ],
        rows,
    )


def _joins(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, results[name])
        for name in ("join", "join_mixed")
        if results.get(name) and "keys" in results[name]
    ]


def _catchup_table(section: dict[str, Any]) -> str | None:
    if "catchup_seconds" not in section:
        return None
    logs = " / ".join(
        "-" if size is None else f"{size / 1e6:.1f} MB"
        for size in section.get("log_bytes_at_heal", [])
    )
    rows = [
        ["partition", f"{section['partition_seconds']:.1f} s"],
        ["offered load", f"{section['offered_rate']:,}/s ({section['processes'] - 1} writers)"],
        ["writes while partitioned", f"{section['writes_while_partitioned']:,}"],
        ["writers' logs at the heal", logs or "-"],
        ["heal until caught up", f"{section['catchup_seconds']:.2f} s"],
        ["converged afterwards", "yes" if section["converged"] else "NO"],
    ]
    return _table("Catch-up after a partition", ["figure", "value"], rows)


def _redis_table(section: dict[str, Any], local: dict[str, Any]) -> str | None:
    if "skipped" in section:
        return f"Redis comparison: {section['skipped']}"
    if "ns" not in section:
        return None
    local_figures = local.get("gcollective", {})
    rows = []
    for op in ("get", "set", "incr"):
        mine = local_figures.get(op, {}).get("0", {}).get("3")
        rows.append(
            [op, f"{section['ns'][op] / 1000:.1f}", "-" if mine is None else f"{mine / 1000:.2f}"]
        )
    rows.append(["set, pipelined", f"{section['ns']['set_pipelined'] / 1000:.1f}", "-"])
    return _table(
        f"For scale: redis-py under gevent vs gcollective (us per call, 3-level "
        f"key; {section.get('server', '')})",
        ["operation", "redis", "gcollective"],
        rows,
    )


def _profile_tables(results: dict[str, Any]) -> list[str]:
    return [
        _table(
            f"Profile of {label} ({profile['tool']}, {profile['samples']:,} samples, all members)",
            ["function (self)", "samples"],
            [[name, f"{share:.1f}%"] for name, share in list(profile["self_percent"].items())[:12]],
        )
        for label, profile in _profiles(results)
        if profile.get("self_percent")
    ]


def _targets_table(targets: list[dict[str, Any]]) -> str | None:
    if not targets:
        return None
    rows = [[t["target"], t["bound"], t["figure"] or "-", t["verdict"]] for t in targets]
    return _table(
        "Targets (issue 6, 2-core machine)", ["target", "bound", "measured", "verdict"], rows
    )


def _profiles(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for run in (results.get("throughput") or {}).get("runs", []):
        if run.get("profile"):
            found.append((f"throughput {run['processes']} x {run['keys_each']:,}", run["profile"]))
    for name in ("join", "join_mixed"):
        join = results.get(name) or {}
        if join.get("profile"):
            found.append((f"{name} of {join['keys']:,} keys", join["profile"]))
    return found


def chart(results: dict[str, Any], path: str) -> bool:
    """Draw the main figures into a PNG; False when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    title = f"gcollective benchmarks ({results['config']['name']} run)"
    fig.suptitle(title)
    local = results.get("local")
    ax = axes[0][0]
    if local and "gcollective" in local:
        depths = sorted(local["dict"]["get"])
        series = [("get", "0"), ("set", "0"), ("set", "3"), ("set", "7"), ("incr", "7")]
        width = 0.8 / (len(series) + 2)
        for n, (op, peers) in enumerate(series):
            values = [local["gcollective"][op][peers][d] for d in depths]
            ax.bar(
                [int(d) + n * width for d in depths], values, width, label=f"{op}, {peers} peers"
            )
        for n, op in enumerate(("get", "set"), start=len(series)):
            values = [local["dict"][op][d] for d in depths]
            ax.bar([int(d) + n * width for d in depths], values, width, label=f"dict {op}")
        ax.set_xlabel("path depth")
        ax.set_ylabel("ns per call")
        ax.set_title("local operations")
        ax.legend(fontsize=7)
    ax = axes[0][1]
    section = results.get("throughput")
    if section and "runs" in section:
        labels = [f"{r['processes']}x{r['keys_each']:,}" for r in section["runs"]]
        xs = range(len(labels))
        ax.bar(
            [x - 0.2 for x in xs],
            [r["sets_per_second"] for r in section["runs"]],
            0.4,
            label="distinct keys",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [r["hot_counter"]["increments_per_second"] for r in section["runs"]],
            0.4,
            label="hot counter",
        )
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("operations/s cluster-wide")
        ax.set_title("replication throughput")
        ax.legend(fontsize=7)
    ax = axes[1][0]
    section = results.get("latency")
    if section and "runs" in section:
        labels = [f"{r['offered_rate']:,}/s" for r in section["runs"]]
        xs = range(len(labels))
        for n, key in enumerate(("p50_ms", "p99_ms", "max_ms")):
            ax.bar(
                [x + (n - 1) * 0.25 for x in xs],
                [r[key] for r in section["runs"]],
                0.25,
                label=key.replace("_ms", ""),
            )
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("ms until visible on all others")
        ax.set_title("propagation latency")
        ax.legend(fontsize=7)
    ax = axes[1][1]
    section = results.get("join")
    if section and "keys" in section:
        names = ["holder", "replica", "joiner", "plain dict"]
        values = [
            section["holder_bytes_per_key"],
            section["replica_bytes_per_key"],
            section["joiner_bytes_per_key"],
            section["plain_dict_bytes_per_key"],
        ]
        ax.bar(names, values)
        ax.set_ylabel("bytes per key (RSS)")
        seconds = section["join_seconds"]
        took = "not synced" if seconds is None else f"{seconds:.2f} s"
        ax.set_title(f"join of {section['keys']:,} keys: {took}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
