"""The test port allocator (``cluster.free_port``): ports nobody else can be handed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import cluster
from cluster import HERE, free_port, free_ports

# A process that takes ports starting from the first block (as every process would if their
# random starts met), reports them, and holds them until told to exit.
CLAIMER = f"""
import json, random, sys
sys.path.insert(0, {HERE!r})
random.randrange = lambda n: 0
import cluster
print(json.dumps(cluster.free_ports(100)), flush=True)
sys.stdin.readline()
"""


def test_ports_are_below_the_ephemeral_range_and_distinct():
    ports = free_ports(200)
    assert len(set(ports)) == 200
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_low = int(ranges.read().split()[0])
    assert all(cluster._PORT_LOW <= port < ephemeral_low for port in ports)


def test_processes_starting_at_the_same_block_never_share_a_port():
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        taken = [set(json.loads(c.stdout.readline())) for c in claimers]
        # Ours are taken while the claimers still hold theirs: a block is free again once its
        # holder exits.
        ours = set(free_ports(100))
    finally:
        for claimer in claimers:
            claimer.communicate(b"\n", timeout=30)
    assert len(taken[0]) == len(taken[1]) == 100
    assert not taken[0] & taken[1]
    assert not (taken[0] | taken[1]) & ours


def test_a_port_in_use_is_skipped():
    if not cluster._next_ports:
        cluster._claim_block()
    busy = cluster._next_ports[0]
    with socket.create_server(("127.0.0.1", busy)):
        assert free_port() != busy
