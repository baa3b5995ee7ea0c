"""``python -m gcollective verify`` against real member processes."""

from __future__ import annotations

import json

import pytest
from cluster import NodeProcess, free_ports, wait_until
from test_cli import gcollective


@pytest.fixture
def processes():
    made: list[NodeProcess] = []

    def make(count: int, linked: bool = True) -> list[NodeProcess]:
        ports = free_ports(count)
        nodes = [NodeProcess(port, ports if linked else [port]) for port in ports]
        made.extend(nodes)
        for node in nodes:
            node.start(timeout=5)
        return nodes

    yield make
    for node in made:
        node.stop()


def verify(nodes: list[NodeProcess], *extra: str):
    done = gcollective("verify", *[n.local for n in nodes], *extra, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_members_that_applied_the_same_operations_agree(processes):
    a, b, c = processes(3)
    for i in range(200):
        a.call("set", key=f"user{i}.name", value=f"n{i}")
    b.call("set", key="config", value={"deep": {"er": [1, 2.5, "x"]}})
    c.call("incr", key="hits", amount=7)
    done = verify([a, b, c], "--json", "--settle", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["agree"] and report["same_operations"] and not report["differing_keys"]
    assert [m["top_level_keys"] for m in report["members"]] == [202] * 3
    assert all(m["behind_ops"] == 0 for m in report["members"])
    text = verify([a, b, c])
    assert text.returncode == 0 and text.stdout.strip().splitlines()[-1].startswith("agree")


def test_a_replica_changed_behind_replications_back_is_named(processes):
    a, b = processes(2)
    for i in range(100):
        a.call("set", key=f"k{i}", value=i)
    wait_until(lambda: verify([a, b], "--settle", "1").returncode == 0, timeout=30)
    b.call("tamper", key="k42", value="not what a holds")
    done = verify([a, b], "--json", "--settle", "1")
    assert done.returncode == 1, done.stdout
    report = json.loads(done.stdout)
    assert report["same_operations"] and report["diverged"] == [[a.local, b.local]]
    assert report["differing_keys"] == [{"key": "k42", "missing_on": []}]
    text = verify([a, b], "--settle", "1")
    assert text.returncode == 1
    assert "DIVERGED" in text.stdout and "differs: 'k42'" in text.stdout


def test_a_member_cut_off_from_the_others_is_behind_and_its_missing_keys_named(processes):
    a, b = processes(2, linked=False)  # two members that never hear of each other
    a.call("set", key="only.on.a", value=1)
    a.call("set", key="shared", value="a")
    b.call("set", key="shared", value="a")
    done = verify([a, b], "--json", "--settle", "1")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert not report["same_operations"] and not report["diverged"]
    behind = {m["address"]: m["behind_ops"] for m in report["members"]}
    assert behind == {a.local: 1, b.local: 2}  # each lacks the other's operations
    assert {"key": "only", "missing_on": [b.local]} in report["differing_keys"]


def test_verify_of_an_unreachable_member_fails_in_one_line(processes):
    (a,) = processes(1)
    (dead,) = free_ports(1)
    done = gcollective("verify", a.local, f"127.0.0.1:{dead}", "--timeout", "2")
    assert done.returncode == 1 and done.stderr.startswith("gcollective verify: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_verify_with_a_secret_as_a_member_would():
    """The digest query authenticates like ``status`` (and is refused without the secret)."""

    secret = "verify-test-secret-0123456789abcdef"
    (port,) = free_ports(1)
    node = NodeProcess(port, [port], secret=secret)
    try:
        node.start(timeout=5)
        node.call("set", key="x", value=1)
        done = gcollective("verify", node.local, env={"GCOLLECTIVE_SECRET": secret})
        assert done.returncode == 0, done.stdout + done.stderr
        done = gcollective("verify", node.local)
        assert done.returncode == 1 and "secret" in done.stderr
    finally:
        node.stop()
