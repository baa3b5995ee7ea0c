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
    assert all(m["behind_ms"] == 0 for m in report["members"])  # nothing in common to date
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


def test_digests_ignore_the_order_keys_were_made_in_and_see_any_change():
    from gcollective._digest import key_digest, value_digest

    one = {"a": {"x": 1, "y": [1, 2]}, "b": "text"}
    other = {"b": "text", "a": {"y": [1, 2], "x": 1}}
    assert value_digest(one) == value_digest(other)
    for changed in (
        {"a": {"x": 1, "y": [2, 1]}, "b": "text"},  # list order matters
        {"a": {"x": 1.0, "y": [1, 2]}, "b": "text"},  # 1.0 is not 1 (JSON keeps the type)
        {"a": {"x": 1, "y": [1, 2], "z": None}, "b": "text"},  # one more entry
        {"a": {"x": 1}, "b": "text", "y": [1, 2]},  # moved up a level
        {"a": {"x": 1, "y": [1, 2]}, "b": "texT"},
    ):
        assert value_digest(changed) != value_digest(one), changed
    assert key_digest("a", 1) != key_digest("b", 1)


def test_a_bad_digest_request_is_refused_and_the_member_carries_on(processes):
    import socket

    from gcollective._errors import ProtocolError
    from gcollective._wire import digest_buckets, encode_digest_request, is_status_request

    for bad in ([999], [-1], ["0"], "all", [True]):
        message = ["gcollective-status", 1, "digest", bad]
        assert is_status_request(message)
        with pytest.raises(ProtocolError):
            digest_buckets(message)
    assert json.loads(encode_digest_request([3, 4])) == ["gcollective-status", 1, "digest", [3, 4]]
    (a,) = processes(1)
    a.call("set", key="x", value=1)
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as sock:
        sock.sendall(b'["gcollective-status",1,"digest",[999]]\n')
        received = b""
        while True:  # the member closes the connection without answering
            data = sock.recv(65536)
            if not data:
                break
            received += data
    assert b"node_id" not in received and b"buckets" not in received
    done = verify([a])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "args", [["verify"], ["verify", "nope"], ["verify", "127.0.0.1:1", "--settle", "0"]]
)
def test_verify_bad_arguments_exit_2_with_usage(args):
    done = gcollective(*args)
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr


def test_a_member_with_a_cut_link_is_behind_then_agrees_once_healed():
    from faults import ProxiedCluster

    members = ProxiedCluster(2)
    try:
        a, b = members.launch(0), members.launch(1)
        a.call("set", key="early", value=1)
        wait_until(lambda: verify([a, b], "--settle", "1").returncode == 0, timeout=30)
        members.partition([0], [1])
        a.call("set", key="late.news", value=2)
        done = verify([a, b], "--json", "--settle", "1")
        assert done.returncode == 1, done.stdout
        report = json.loads(done.stdout)
        lag = {m["address"]: (m["behind_ops"], m["behind_ms"]) for m in report["members"]}
        assert lag[a.local] == (0, 0) and lag[b.local][0] == 1 and lag[b.local][1] >= 0
        assert report["differing_keys"] == [{"key": "late", "missing_on": [b.local]}]
        assert "behind by 1 ops" in verify([a, b], "--settle", "1").stdout
        members.heal()
        wait_until(lambda: verify([a, b], "--settle", "1").returncode == 0, timeout=60)
    finally:
        members.close()
