"""Shared fixtures: member processes that are always cleaned up."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profiles  # registers and loads the hypothesis profile, before any test module
from cluster import LocalMembers, NodeProcess, free_ports


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Hand a random profile's seed to hypothesis's plugin (unless --hypothesis-seed was
    given), so every hypothesis test of the run draws from it."""
    if profiles.SEED is not None and config.getoption("hypothesis_seed") is None:
        config.option.hypothesis_seed = str(profiles.SEED)


def pytest_report_header(config):
    if profiles.SEED is None:
        return f"hypothesis: profile {profiles.PROFILE!r} (derandomized)"
    seed = config.getoption("hypothesis_seed")
    return (
        f"hypothesis: profile {profiles.PROFILE!r}, seed {seed} (replay: "
        f"HYPOTHESIS_PROFILE={profiles.PROFILE} HYPOTHESIS_SEED={seed} pytest ...)"
    )


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


@pytest.fixture
def members(request):
    """``members(n, spare=0)`` starts n members in this process, ``members.join()`` one more
    (see ``cluster.LocalMembers``), with the test module's ``FAST`` options; all are stopped
    after the test. (A module may define its own ``members`` instead.)"""
    local = LocalMembers(**getattr(request.module, "FAST", {}))
    yield local
    local.stop()
