"""Prometheus metrics of real member processes (``node --metrics``): the exposition parsed
with prometheus_client's parser, and once scraped by a real Prometheus server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from cluster import free_ports, wait_until
from test_cli import gcollective, member  # noqa: F401 - the fixture

parser = pytest.importorskip("prometheus_client.parser", reason="needs gcollective[metrics]")


def scrape(port: int) -> dict[str, list]:
    """The samples at ``port``, by sample name, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(families: dict[str, list], name: str, **labels: str) -> float:
    samples = [s for s in families[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(samples) == 1, (name, labels, families.get(name))
    return samples[0].value


def two_members(member, metrics_ports):  # noqa: F811
    a_port, b_port = free_ports(2)
    peers = [a_port, b_port]
    a = member(a_port, peers, None, "--metrics", f"127.0.0.1:{metrics_ports[0]}")
    b = member(b_port, peers, None, "--metrics", f"127.0.0.1:{metrics_ports[1]}")
    return a, b


def test_metrics_of_two_members_parse_and_follow_the_traffic(member):  # noqa: F811
    metrics_ports = free_ports(2)
    a, b = two_members(member, metrics_ports)

    def connected(port: int, peer: str):
        try:
            families = scrape(port)
        except OSError:
            return False  # the member serves its metrics once started
        return value(families, "gcollective_peer_state", peer=peer, state="connected") == 1

    wait_until(lambda: connected(metrics_ports[0], b.address), what="a connected to b")
    wait_until(lambda: connected(metrics_ports[1], a.address), what="b connected to a")
    # Write through a third process that joins as a member: the two see its operations.
    writer = subprocess.run(
        [
            *[sys.executable, "-c"],
            "import gcollective, sys\n"
            f"n = gcollective.start('127.0.0.1:{free_ports(1)[0]}', "
            f"['{a.address}', '{b.address}'])\n"
            "for i in range(50): n.set(f'k{i}.v', i)\n"
            "gcollective.stop(5)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=__import__("test_cli").environment(),
    )
    assert writer.returncode == 0, writer.stderr

    def holds_every_key():
        families = scrape(metrics_ports[1])
        return value(families, "gcollective_keys") == 50 and families

    families = wait_until(holds_every_key, what="b holds the 50 keys")
    info = families["gcollective_info"][0].labels
    assert info["address"] == b.address and info["version"]
    assert value(families, "gcollective_operations_applied_total") >= 50
    assert value(families, "gcollective_received_bytes_total") > 0
    assert value(families, "gcollective_received_frames_total") > 0
    assert value(families, "gcollective_metadata_entries") >= 100  # a stamp per key and leaf
    assert value(families, "gcollective_running") == 1
    # The member that started second took the first one's state as a snapshot.
    merged = [value(scrape(port), "gcollective_snapshots_merged_total") for port in metrics_ports]
    assert sum(merged) >= 1, merged
    assert value(families, "gcollective_peer_sent_bytes_total", peer=a.address) > 0
    assert value(families, "gcollective_peer_connects_total", peer=a.address) >= 1
    assert value(families, "gcollective_peer_lag_operations", peer=a.address) >= 0
    assert value(families, "gcollective_peer_queued_bytes", peer=a.address) >= 0
    for name in ("gcollective_log_bytes", "gcollective_pending_expiries"):
        assert name in families
    assert a.stop() == 0 and b.stop() == 0


def test_metrics_address_that_cannot_be_bound_fails_in_one_line(member):  # noqa: F811
    (port,) = free_ports(1)
    done = gcollective("node", "--local", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert "--metrics" in done.stderr and "Traceback" not in done.stderr


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary (Debian: apt-get install prometheus; .ci/run does it)",
)
def test_a_real_prometheus_scrapes_two_members(member, tmp_path):  # noqa: F811
    metrics_ports = free_ports(2)
    a, b = two_members(member, metrics_ports)
    (web_port,) = free_ports(1)
    config = tmp_path / "prometheus.yml"
    targets = ", ".join(f"'127.0.0.1:{port}'" for port in metrics_ports)
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: gcollective\n"
        f"    static_configs:\n      - targets: [{targets}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=log,
    )
    try:

        def query(expression: str) -> list:
            url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": expression}
            )
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    answer = json.load(response)
            except OSError:
                return []
            assert answer["status"] == "success", answer
            return answer["data"]["result"]

        def both_connected():
            return len(query('gcollective_peer_state{state="connected"} == 1')) == 2

        wait_until(both_connected, timeout=60, interval=0.5, what="prometheus sees 2 links up")
        result = query("sum by (address) (gcollective_info)")
        assert {r["metric"]["address"] for r in result} == {a.address, b.address}
    finally:
        server.terminate()
        server.wait(20)
        log.close()
    assert a.stop() == 0 and b.stop() == 0


def test_every_gunicorn_worker_serves_its_metrics_on_its_slots_port():
    """GCOLLECTIVE_METRICS_PORT + slot: each worker answers for itself, at a known port."""
    from cluster import free_port_run
    from test_gunicorn import Gunicorn

    metrics_base = free_port_run(2)
    server = Gunicorn(workers=2, env={"GCOLLECTIVE_METRICS_PORT": str(metrics_base)})
    try:
        server.start()

        def both_linked():
            try:
                pages = [scrape(metrics_base + slot) for slot in (0, 1)]
            except OSError:
                return False
            links = [value(p, "gcollective_peer_state", state="connected") for p in pages]
            return links == [1, 1] and pages

        pages = wait_until(both_linked, timeout=30, what="both workers linked")
        addresses = [p["gcollective_info"][0].labels["address"] for p in pages]
        assert addresses == [f"127.0.0.1:{server.base_port + slot}" for slot in (0, 1)]
    finally:
        server.close()


def test_lag_of_a_peer_behind_a_cut_link_grows_with_the_writes_it_misses():
    from faults import ProxiedCluster

    members = ProxiedCluster(2)
    (metrics_port,) = free_ports(1)
    try:
        a, _ = members.launch(0), members.launch(1)
        a.call("serve_metrics", port=metrics_port)
        b_name = f"127.0.0.1:{members.public[1]}"
        a.call("set", key="before", value=0)

        def caught_up():
            families = scrape(metrics_port)
            return value(families, "gcollective_peer_lag_operations", peer=b_name) == 0

        wait_until(caught_up, what="b reports it has a's first write")
        members.partition([0], [1])

        def link_down():
            families = scrape(metrics_port)
            return value(families, "gcollective_peer_state", peer=b_name, state="connected") == 0

        wait_until(link_down, what="a sees its link to b cut")
        for i in range(5):
            a.call("set", key=f"missed{i}", value=i)

        def lag_of_five():
            # (Own operations count once their batch went out: a millisecond after the set.)
            families = scrape(metrics_port)
            lag = value(families, "gcollective_peer_lag_operations", peer=b_name)
            assert lag <= 5
            return lag == 5 and families

        families = wait_until(lag_of_five, what="b lacks the 5 operations")
        assert value(families, "gcollective_peer_lag_seconds", peer=b_name) > 0
        members.heal()
        wait_until(caught_up, timeout=60, what="b caught up after the heal")
    finally:
        members.close()
