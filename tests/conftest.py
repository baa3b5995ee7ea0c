"""Shared fixtures: member processes that are always cleaned up."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import NodeProcess, free_ports


@pytest.fixture
def cluster():
    """``cluster(n, **options)`` starts n member processes on fresh ports (all peers of each
    other, started in order) and returns them; all are stopped after the test."""
    made: list[NodeProcess] = []

    def make(count: int, start: bool = True, **options):
        ports = free_ports(count)
        nodes = [NodeProcess(port, ports, **options) for port in ports]
        made.extend(nodes)
        if start:
            for node in nodes:
                node.start()
        return nodes

    yield make
    for node in made:
        node.stop()
