"""The web workload (issue 20): a WSGI app under real gunicorn, loaded by ``ab``.

The app (``benchmarks/web_app.py``) does one ``incr("hits.total")`` and one ``set`` per
request. Three variants of it run under gunicorn with the same workers, all started at once
and loaded in turn, round after round (interleaved, so a busy moment of the machine hits
every variant alike):

- ``dict``: the plain gevent worker (``-k gevent``), a dict in each worker;
- ``gcollective``: ``-k gcollective.gunicorn.GeventWorker``, the workers one collective;
- ``redis``: the plain gevent worker, redis-py to a local redis-server of our own.

``ab -n N -c C`` is the client (Debian's ``apache2-utils``); a round's figure is its requests/s.
Afterwards every variant's count is checked: each gcollective worker must end with
``hits.total`` equal to every request sent, redis's counter likewise, and the dict workers'
counters must add up to it. Skipped with a note when ``ab``, ``redis-server`` or redis-py is
missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from benchmarks.procs import ROOT, RedisServer, free_port, free_ports

Progress = Callable[[str], None]

VARIANTS = ("dict", "gcollective", "redis")
WORKER_CLASSES = {
    "dict": "gevent",
    "gcollective": "gcollective.gunicorn.GeventWorker",
    "redis": "gevent",
}
#: Set to another checkout's root (e.g. a worktree of the previous release) to run its
#: gcollective as a fourth variant, ``gcollective-base``, in the same rounds: before/after
#: figures from one window.
BASELINE_VARIANT = "gcollective-base"
BASELINE_ROOT_VARIABLE = "BENCH_WEB_BASELINE"
# The app's directory, the workers' first import path (``python -m`` puts the working
# directory first): not the checkout's root, whose gcollective would shadow ``code_root``'s.
APP_DIR = os.path.join(ROOT, "benchmarks")
# Requests sent before the measured rounds: connections, imports and the first sync are done.
WARMUP_REQUESTS = 500


def missing_tools() -> str | None:
    """Why the workload cannot run here, or None."""
    if shutil.which("ab") is None:
        return "ab is not on PATH (Debian: apt-get install apache2-utils)"
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (Debian: apt-get install redis-server)"
    for module in ("redis", "gunicorn"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'gcollective[bench,gunicorn]')"
    return None


class WebServer:
    """A gunicorn master serving ``benchmarks/web_app.py`` with one store; output to a file.

    ``code_root``: the checkout whose gcollective the workers import (this one by default).
    The app is loaded from this checkout's benchmarks directory whatever the code root."""

    def __init__(
        self, variant: str, workers: int, redis_port: int = 0, code_root: str = ROOT
    ) -> None:
        self.variant = variant
        self.store = "gcollective" if variant == BASELINE_VARIANT else variant
        self.workers = workers
        self.port = free_port()
        self.sent = 0  # requests sent to it, warm-up included: what the counter must reach
        self.extra_pids: list[int] = []  # other processes serving it (its redis-server)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GCOLLECTIVE_")}
        env["PYTHONPATH"] = code_root + os.pathsep + env.get("PYTHONPATH", "")
        env["BENCH_WEB_STORE"] = self.store
        env["BENCH_WEB_REDIS_PORT"] = str(redis_port)
        if self.store == "gcollective":
            members = ",".join(f"127.0.0.1:{port}" for port in free_ports(workers))
            env["GCOLLECTIVE_PEERS"] = members
            env["GCOLLECTIVE_BIND"] = "127.0.0.1"
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            WORKER_CLASSES[self.store],
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{self.port}",
            "--worker-connections",
            "1000",
            "--graceful-timeout",
            "10",
            "--log-level",
            "warning",
            "--chdir",
            APP_DIR,
            "web_app:app",
        ]
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=APP_DIR
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=5) as reply:
            return json.loads(reply.read())

    def wait_ready(self, limit: float = 60.0) -> None:
        """Until every worker answered (gcollective workers answer once their node started)."""
        self.worker_replies(limit)

    def worker_replies(self, limit: float) -> dict[int, dict[str, Any]]:
        """Each worker's ``/count``, asked over fresh connections (each goes to whichever
        worker accepts) until every worker answered, within ``limit`` seconds."""
        deadline = time.monotonic() + limit
        seen: dict[int, dict[str, Any]] = {}
        with ThreadPoolExecutor(8) as pool:
            while len(seen) < self.workers:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.variant}: gunicorn exited\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.variant}: {len(seen)} of {self.workers} workers answered "
                        f"within {limit}s\n{self.log()}"
                    )
                for reply in pool.map(self._try_count, range(16)):
                    if reply is not None:
                        seen[reply["pid"]] = reply
        return seen

    def _try_count(self, _: int) -> dict[str, Any] | None:
        try:
            return self.get("/count")
        except OSError:
            time.sleep(0.05)  # not listening yet: the next attempt comes a little later
            return None

    def exact(self, limit: float = 30.0) -> tuple[bool, dict[int, dict[str, Any]]]:
        """Whether the counter holds every request sent: on every worker (gcollective, redis)
        or added over the workers (dict); polled until true or ``limit`` seconds passed.
        Also each worker's last reply."""
        deadline = time.monotonic() + limit
        while True:
            replies = self.worker_replies(max(1.0, deadline - time.monotonic()))
            counts = {pid: reply["count"] for pid, reply in replies.items()}
            if self.store == "dict":
                good = sum(counts.values()) == self.sent
            else:
                good = all(count == self.sent for count in counts.values())
            if good or time.monotonic() > deadline:
                return good, replies
            time.sleep(0.1)  # replication is asynchronous: ask again shortly

    def cpu_seconds(self) -> float:
        """CPU time used so far by the workers (and by ``extra_pids``, e.g. the redis-server):
        per request, the figure a busy shared machine disturbs least."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as children:
                pids = [int(pid) for pid in children.read().split()]
        except OSError:
            return float("nan")  # not Linux: no figure
        return sum(_cpu_seconds(pid) for pid in [*pids, *self.extra_pids])

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:]

    def terminate(self) -> None:
        """Tell gunicorn to stop (its workers finish and hand their data on); see ``stop``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop gunicorn and wait for it (killed if it takes over 30 s)."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


_AB_FIGURES = {
    "complete": re.compile(r"^Complete requests:\s+(\d+)", re.M),
    "failed": re.compile(r"^Failed requests:\s+(\d+)", re.M),
    "non_2xx": re.compile(r"^Non-2xx responses:\s+(\d+)", re.M),
    "requests_per_second": re.compile(r"^Requests per second:\s+([\d.]+)", re.M),
    "ms_per_request": re.compile(r"^Time per request:\s+([\d.]+) \[ms\] \(mean\)", re.M),
}


def run_ab(server: WebServer, requests: int, concurrency: int) -> dict[str, Any]:
    """``ab -n requests -c concurrency`` on ``/hit``: its figures, parsed, and the servers' CPU
    time per request."""
    cpu_before = server.cpu_seconds()
    out = subprocess.run(
        ["ab", "-q", "-n", str(requests), "-c", str(concurrency), f"{server.url}/hit"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    figures: dict[str, Any] = {}
    for name, pattern in _AB_FIGURES.items():
        match = pattern.search(out.stdout)
        if match:
            figures[name] = float(match.group(1))
    if out.returncode != 0 or "requests_per_second" not in figures:
        raise RuntimeError(f"ab failed ({out.returncode}): {out.stderr.strip()}\n{out.stdout}")
    server.sent += int(figures["complete"])
    cpu = server.cpu_seconds() - cpu_before
    figures["cpu_us_per_request"] = cpu / figures["complete"] * 1e6 if figures["complete"] else 0
    figures.setdefault("non_2xx", 0.0)
    return figures


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def web(cfg: Any, progress: Progress) -> dict[str, Any]:
    """The three variants, ``cfg.web_rounds`` interleaved rounds of ``ab`` each."""
    missing = missing_tools()
    if missing:
        progress(f"web: skipped: {missing}")
        return {"skipped": f"skipped: {missing}"}
    baseline = os.environ.get(BASELINE_ROOT_VARIABLE)
    variants = (*VARIANTS, BASELINE_VARIANT) if baseline else VARIANTS
    rounds: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    servers: dict[str, WebServer] = {}
    with RedisServer() as redis_server:
        try:
            for variant in variants:
                root = baseline if variant == BASELINE_VARIANT and baseline else ROOT
                servers[variant] = WebServer(variant, cfg.web_workers, redis_server.port, root)
            if redis_server.proc is not None:
                servers["redis"].extra_pids.append(redis_server.proc.pid)
            for variant in variants:
                servers[variant].wait_ready()
                run_ab(servers[variant], WARMUP_REQUESTS, cfg.web_concurrency)
            for number in range(cfg.web_rounds):
                # Rotate who goes first: no variant always follows the same one.
                turn = number % len(variants)
                order = variants[turn:] + variants[:turn]
                for variant in order:
                    figures = run_ab(servers[variant], cfg.web_requests, cfg.web_concurrency)
                    rounds[variant].append(figures)
                    progress(
                        f"web: round {number + 1}, {variant}: "
                        f"{figures['requests_per_second']:,.0f} requests/s"
                    )
            exact = {variant: servers[variant].exact() for variant in variants}
        finally:
            for server in servers.values():
                server.terminate()  # all at once: each may wait for its workers' hand-off
            for server in servers.values():
                server.stop()
    return _summary(cfg, rounds, exact, redis_server.version)


def _summary(
    cfg: Any,
    rounds: dict[str, list[dict[str, Any]]],
    exact: dict[str, tuple[bool, dict[int, dict[str, Any]]]],
    redis_version: str | None,
) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for variant in rounds:
        rates = [r["requests_per_second"] for r in rounds[variant]]
        good, replies = exact[variant]
        cpu = [r["cpu_us_per_request"] for r in rounds[variant]]
        variants[variant] = {
            "requests_per_second": statistics.median(rates),
            "rounds": rates,
            "cpu_us_per_request": statistics.median(cpu),
            "cpu_rounds": cpu,
            "failed": int(sum(r["failed"] + r["non_2xx"] for r in rounds[variant])),
            "exact": good,
            "counts": {str(pid): reply["count"] for pid, reply in replies.items()},
        }
        frames = [reply["frames"] for reply in replies.values() if "frames" in reply]
        if frames:
            variants[variant]["code"] = sorted({f["code"] for f in frames})
            variants[variant]["ops_per_frame_sent"] = _ratio(frames, "sent_ops", "sent_frames")
            variants[variant]["ops_per_frame_received"] = _ratio(
                frames, "received_ops", "received_frames"
            )
    median = {variant: variants[variant]["requests_per_second"] for variant in rounds}
    summary = {
        "workers": cfg.web_workers,
        "requests": cfg.web_requests,
        "concurrency": cfg.web_concurrency,
        "rounds": cfg.web_rounds,
        "warmup_requests": WARMUP_REQUESTS,
        "redis_server": redis_version,
        "variants": variants,
        "gcollective_vs_dict": median["gcollective"] / median["dict"],
        "gcollective_vs_redis": median["gcollective"] / median["redis"],
    }
    if BASELINE_VARIANT in median:
        summary["gcollective_vs_base"] = median["gcollective"] / median[BASELINE_VARIANT]
    return summary


def _ratio(counters: list[dict[str, int]], over: str, under: str) -> float:
    """sum(over) / sum(under) over the workers' counters (0 when nothing was counted)."""
    total = sum(c[under] for c in counters)
    return sum(c[over] for c in counters) / total if total else 0.0
