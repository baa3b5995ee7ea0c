"""Membership that spreads (issue 19): members tell each other the members they know, so one
started with a single seed's address ends linked to every member directly and keeps working
when the seed dies; a member that stops says it left. Real processes (tests/node_process.py)
or members in this process, real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import gevent
import pytest
from cluster import (
    ROOT,
    NodeProcess,
    converged,
    free_port,
    free_ports,
    started_members,
    wait_for,
    wait_until,
)

from gcollective import Collective

FAST = {"sync_interval": 0.1, "backoff_max": 0.3}


@pytest.fixture
def processes():
    """``start(port, peer_ports, **options)``: a member process, started; all are stopped
    (or were killed) after the test."""

    def make(port: int, peer_ports: list[int], **options: Any) -> NodeProcess:
        return NodeProcess(port, peer_ports, **{**FAST, **options})  # (root= passes on)

    yield from started_members(make)


@pytest.fixture
def local():
    """``make(port, peer_ports, **options)``: a started member in this process."""

    def make(port: int, peer_ports: tuple[int, ...] = (), **options: Any) -> Collective:
        return Collective(
            f"127.0.0.1:{port}", [f"127.0.0.1:{p}" for p in peer_ports], **{**FAST, **options}
        )

    yield from started_members(make, stop=lambda node: node.stop(timeout=1))


def linked(stats: dict[str, Any], others: list[str]) -> bool:
    """True when this member's links to every one of ``others`` are connected."""
    peers = stats["peers"]
    return all(peers.get(other, {}).get("state") == "connected" for other in others)


def full_mesh(nodes: list[NodeProcess]) -> bool:
    addresses = [node.local for node in nodes]
    return all(
        linked(node.call("stats"), [a for a in addresses if a != node.local]) for node in nodes
    )


def test_members_started_with_one_seed_link_directly_and_outlive_the_seed(processes):
    seed_port, *ports = free_ports(5)
    seed = processes(seed_port, [])
    rest = [processes(port, [seed_port]) for port in ports]  # each knows the seed only
    wait_until(lambda: full_mesh([seed, *rest]), timeout=30, what="every member linked to all")
    members = rest[0].call("stats")["members"]
    assert members[seed.local]["learnt"] == "configured"
    assert {members[node.local]["learnt"] for node in rest[1:]} <= {"gossip", "announced"}
    assert all(entry["state"] == "alive" for entry in members.values())
    seed.kill()
    for index, node in enumerate(rest):
        node.call("set", key=f"after_seed.{index}", value=index)
    wait_until(lambda: converged(rest, leaves=len(rest)), timeout=30, what="writes flow")


def test_a_member_that_stops_says_it_left_and_is_no_longer_dialled(local):
    a_port, b_port = free_ports(2)
    a = local(a_port, (b_port,))
    b = local(b_port, (a_port,))  # configured on a: 0.4.2 would dial it forever
    wait_for(lambda: linked(a.stats(), [f"127.0.0.1:{b_port}"]))
    began = time.monotonic()
    b.stop(timeout=2)
    wait_for(lambda: f"127.0.0.1:{b_port}" not in a.stats()["peers"], timeout=10)
    noticed = time.monotonic() - began
    assert noticed < 1.0, noticed  # at once, not after attempts or down_timeout
    assert a.stats()["members"][f"127.0.0.1:{b_port}"]["state"] == "left"
    again = local(b_port, (a_port,))  # a new incarnation on that address is welcome
    again.set("back", 1)
    wait_for(lambda: a.get("back") == 1)
    assert a.stats()["members"][f"127.0.0.1:{b_port}"]["state"] == "alive"


def test_a_learnt_member_silent_past_down_timeout_is_no_longer_dialled(processes):
    seed_port, b_port, c_port = free_ports(3)
    seed = processes(seed_port, [], down_timeout=2)
    b = processes(b_port, [seed_port], down_timeout=2)
    c = processes(c_port, [seed_port], down_timeout=2)
    wait_until(lambda: full_mesh([seed, b, c]), timeout=30, what="every member linked to all")
    c.kill()  # no goodbye
    wait_until(
        lambda: c.local not in b.call("stats")["peers"], timeout=30, what="c no longer dialled"
    )
    assert b.call("stats")["members"][c.local]["state"] == "down"


def test_members_are_bounded_by_max_members(local):
    seed_port, *ports = free_ports(4)
    seed = local(seed_port, max_members=2)
    others = [local(port, (seed_port,)) for port in ports]
    wait_for(lambda: sum(linked(n.stats(), [f"127.0.0.1:{seed_port}"]) for n in others) == 3)
    assert len(seed.stats()["members"]) <= 2
    assert len(seed.stats()["peers"]) <= 2
    with pytest.raises(ValueError, match="max_members"):
        Collective(f"127.0.0.1:{free_port()}", max_members=0)


def test_thirty_two_members_with_one_seed_each_converge_to_a_full_mesh(local, capsys):
    count = 32
    ports = free_ports(count)
    began = time.monotonic()
    nodes = [local(ports[0])]
    for port in ports[1:]:
        nodes.append(local(port, (ports[0],), start_timeout=0))
    addresses = [f"127.0.0.1:{port}" for port in ports]

    def meshed() -> bool:
        return all(
            linked(node.stats(), [a for a in addresses if a != f"127.0.0.1:{ports[i]}"])
            for i, node in enumerate(nodes)
        )

    wait_for(meshed, timeout=60, interval=0.1, what="a full mesh of 32")
    seconds = time.monotonic() - began
    with capsys.disabled():
        print(f"\n{count} members, one seed each: full mesh in {seconds:.1f}s")
    nodes[-1].set("last", 1)
    wait_for(lambda: all(node.get("last") == 1 for node in nodes), timeout=20)
    gevent.sleep(0)


RELEASE_0_4_2 = "6d91bb0"  # the commit of 0.4.2 (protocol 4): "0.4.2 (protocol 4, unchanged)"


@pytest.fixture
def release_0_4_2(tmp_path):
    """The directory of gcollective 0.4.2's sources, from this repository's history."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(
        ["git", "-C", root, "archive", RELEASE_0_4_2, "gcollective"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"no git history with 0.4.2 here: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    return str(tmp_path)


def test_members_of_0_4_2_mix_with_members_that_spread_membership(processes, release_0_4_2):
    old_port, new_port, joiner_port = free_ports(3)
    new = processes(new_port, [old_port])
    old = processes(old_port, [new_port], root=release_0_4_2)
    joiner = processes(joiner_port, [new_port])  # learns of old from new's list
    nodes = [old, new, joiner]
    wait_until(lambda: full_mesh(nodes), timeout=30, what="every member linked to all")
    for index, node in enumerate(nodes):
        node.call("set", key=f"mixed.{index}", value=index)
    wait_until(lambda: converged(nodes, leaves=3), timeout=30, what="writes flow")
    for node in nodes:
        assert node.call("stats")["refused_connections"] == 0
    assert "members" not in old.call("stats")  # (it is 0.4.2 indeed)


def test_the_members_benchmark_runs_through():
    """``python -m benchmarks.members`` (docs/membership.rst's figures) still works: two
    members, short windows; not a timing."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.members", "--sizes", "2", "--seconds", "0.5", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout[done.stdout.index("[") :])
    assert figures[0]["members"] == 2
    assert figures[0]["idle"]["rss_mib"] > 0 and figures[0]["load"]["cpu_percent"] >= 0


def test_the_writer_to_a_member_that_left_ends(local):
    """A link dropped because its member left ends its writer greenlet (it waited for
    something to send forever, outliving even this member's ``stop``)."""
    a_port, b_port = free_ports(2)
    a = local(a_port, (b_port,))
    b = local(b_port, (a_port,))
    wait_for(lambda: linked(a.stats(), [f"127.0.0.1:{b_port}"]))
    link = a._links[("127.0.0.1", b_port)]
    b.stop(timeout=2)
    wait_for(lambda: f"127.0.0.1:{b_port}" not in a.stats()["peers"], timeout=10)
    wait_for(lambda: link.greenlet.dead, timeout=10, what="the writer to b ended")
    assert link.state == "stopped"
