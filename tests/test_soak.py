"""Random faults while every member keeps writing; at the end every member must hold the
same tree with exact totals. CI runs the short variant; ``pytest -m soak`` runs the long one.
"""

from __future__ import annotations

import json
import random
import sys
import time

import pytest
from cluster import converged, wait_until
from faults import ProxiedCluster


def wait_converged(cluster: ProxiedCluster, leaves: int | None = None) -> None:
    """Wait until the live members agree; on failure, print what each one holds and sees."""
    nodes = cluster.live()
    try:
        wait_until(lambda: converged(nodes, leaves=leaves), timeout=120, interval=0.2)
    except AssertionError:
        for node in nodes:
            print(node.port, node.summary(), json.dumps(node.call("stats")), file=sys.stderr)
        raise


def heal_after_a_refusal(cluster: ProxiedCluster) -> None:
    """Heal every cut, once a dialer was refused across one (the cut was felt)."""
    if any(proxy.blocking() for proxy in cluster.proxies):
        refused = cluster.refused()
        wait_until(lambda: cluster.refused() > refused, what="a dialer refused across a cut")
    cluster.heal()


def run_soak(seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    cluster = ProxiedCluster(4)
    try:
        for i in range(4):
            cluster.launch(i)
        expected_leaves = 0
        expected_total = 0
        batch = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            action = rng.random()
            live = [i for i, n in enumerate(cluster.nodes) if n.proc.poll() is None]
            node = cluster.nodes[rng.choice(live)]
            if action < 0.45:
                count = rng.randint(1, 400)
                node.call("write_keys", prefix=f"b{batch}", count=count, yield_every=50)
                batch += 1
                expected_leaves += count
            elif action < 0.7:
                count = rng.randint(1, 50)
                node.call("incr_many", key="total", count=count)
                expected_total += count
            elif action < 0.85:
                source, target = rng.sample(range(4), 2)
                cluster.proxies[target].cut(cluster.public[source], require=False)
            elif action < 0.95:
                heal_after_a_refusal(cluster)
            else:
                # Kill a member only once the others hold all it wrote: nothing to lose.
                cluster.heal()
                wait_converged(cluster)
                victim = rng.choice(live)
                cluster.nodes[victim].kill()
                cluster.launch(victim)
        cluster.heal()
        nodes = cluster.live()
        wait_converged(cluster, leaves=expected_leaves + (1 if expected_total else 0))
        assert all(n.call("get", key="total")["value"] == (expected_total or None) for n in nodes)
        # The faults happened: links were dropped and dialers refused while cut.
        faults = {"dropped": sum(p.dropped for p in cluster.proxies), "refused": cluster.refused()}
        print("faults seen:", faults)
        assert faults["dropped"] > 0 and faults["refused"] > 0, faults
    finally:
        cluster.close()


def test_short_soak():
    run_soak(seconds=8, seed=1)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(5))
def test_long_soak(seed):
    run_soak(seconds=120, seed=seed)
