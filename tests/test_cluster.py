"""Real member processes on loopback: convergence, joins, restarts."""

from __future__ import annotations

import json
import time

import pytest
from cluster import NodeProcess, converge_while_progressing, converged, free_ports, wait_until


def test_two_members_converge_on_keys_counters_and_deletes(cluster):
    a, b = cluster(2)
    a.call("set", key="users.1.name", value="ann")
    b.call("set", key=["users", "b@x.org", "name"], value="bob")
    a.call("incr_many", key="hits", count=100)
    b.call("incr_many", key="hits", count=50)
    a.call("set", key="gone.soon", value=[1, 2])
    b.call("delete", key="gone")
    wait_until(lambda: converged([a, b]) and a.call("get", key="hits")["value"] == 150)
    tree = a.call("snapshot")["value"]
    assert tree["users"] == {"1": {"name": "ann"}, "b@x.org": {"name": "bob"}}
    assert tree["hits"] == 150


def test_four_members_converge_under_concurrent_writes(cluster):
    nodes = cluster(4)
    for i, node in enumerate(nodes):
        node.call("write_keys", prefix=f"n{i}", count=2000)
        node.call("incr_many", key="counter", count=250)
        node.call("set", key="shared.last", value=i)
    wait_until(lambda: converged(nodes, leaves=4 * 2000 + 2), timeout=60)
    assert all(n.call("get", key="counter")["value"] == 1000 for n in nodes)


def test_member_joining_a_cluster_with_data_while_writes_continue(cluster):
    a, b = cluster(2)
    a.call("write_keys", prefix="old", count=5000)
    wait_until(lambda: converged([a, b], leaves=5000), timeout=60)
    port = free_ports(1)[0]
    joiner = NodeProcess(port, [a.port, b.port, port])
    try:
        b.call("write_keys", prefix="during", count=3000)
        reply = joiner.start()
        assert reply["synced"]
        a.call("write_keys", prefix="after", count=2000)
        wait_until(lambda: converged([a, b, joiner], leaves=10000), timeout=60)
    finally:
        joiner.stop()


def test_killed_member_restarts_empty_and_catches_up(cluster):
    ports = free_ports(3)
    nodes = [NodeProcess(p, ports) for p in ports]
    try:
        for n in nodes:
            n.start()
        nodes[0].call("write_keys", prefix="a", count=3000)
        nodes[2].kill()
        nodes[1].call("write_keys", prefix="b", count=3000)
        nodes[2] = NodeProcess(ports[2], ports)
        assert nodes[2].start()["synced"]
        wait_until(lambda: converged(nodes, leaves=6000), timeout=60)
    finally:
        for n in nodes:
            n.stop()


# (pyproject's 300 s per test: at load 15-20 on two cores this test took 211 s to over 300 s
# in all; its wait fails on its own once progress stops, so the whole may take longer.)
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("members,keys", [(8, 25000)])
def test_reverse_order_start_loses_nothing(members, keys):
    """collective.js 0.3.1 left the last-started member with 176,964 of 200,000 keys here."""
    ports = free_ports(members)
    nodes = [NodeProcess(p, ports) for p in ports]
    try:
        for node in reversed(nodes):
            node.start()
            # Writes begin as soon as the member is up, while later members still join.
            command = {"cmd": "write_keys", "prefix": f"p{node.port}", "count": keys}
            node.proc.stdin.write(json.dumps(command) + "\n")
            node.proc.stdin.flush()
        for node in nodes:
            assert node.proc.stdout.readline()  # the write_keys reply
        began = time.monotonic()
        # (At load 15 on two cores, 8 processes applying 175,000 remote writes each took
        # over 120 s: the bound is on progress, not on the whole catch-up. The last member
        # to start gets its peers' state by snapshot, merged whole at its end, so its count
        # stands still meanwhile: 43 s there, the snapshot cut and sent again three times
        # (docs/benchmarks.rst, twenty-third look); over 60 s in a full run. Every 2 s: each
        # look digests 200,000 leaves in each of the 8 processes, work that slows them.)
        converge_while_progressing(nodes, leaves=members * keys, stalled=180.0, interval=2.0)
        print(f"{members} x {keys}: converged {time.monotonic() - began:.1f}s after the writes")
    finally:
        for node in nodes:
            node.stop()
