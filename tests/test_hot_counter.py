"""A hot counter counted by every member at once (issue 20): exact everywhere, a joiner too.

Members that count one key without yielding send batches of INCREMENTs of that key alone,
which a receiver applies as one (``Batches._increment_run``); the property test
``test_a_batch_of_one_hot_counter_matches_one_by_one`` compares that with one by one, and
this checks it end to end: real processes, a member joining later, late SETs among the hits.
"""

from __future__ import annotations

from cluster import NodeProcess, converged, free_ports, wait_until


def _values(nodes: list[NodeProcess], *keys: str) -> list[list[object]]:
    return [[node.call("get", key=key)["value"] for key in keys] for node in nodes]


def test_a_hot_counter_is_exact_on_every_member_and_a_joiner(cluster):
    nodes = cluster(3)
    for node in nodes:  # (each call makes 3,000 hits in a row: batches of the key alone)
        node.call("incr_many", key="hits", count=3000)
        node.call("incr_many", key="site.pages.hits", count=2000)
    expected = [[9000, 6000]] * 3
    wait_until(lambda: _values(nodes, "hits", "site.pages.hits") == expected, timeout=60)
    assert converged(nodes)
    port = free_ports(1)[0]
    late = NodeProcess(port, [*(node.port for node in nodes), port])
    try:
        assert late.start()["synced"]
        # Counted on by the joiner and the others, whose hits it received as a snapshot.
        late.call("incr_many", key="hits", count=1500)
        nodes[0].call("incr_many", key="hits", count=1500)
        everyone = [*nodes, late]
        wait_until(
            lambda: _values(everyone, "hits", "site.pages.hits") == [[12000, 6000]] * 4,
            timeout=60,
        )
        assert converged(everyone)
    finally:
        late.stop()


def test_a_set_among_a_hot_counters_hits_decides_alike_everywhere(cluster):
    """A SET of the counter made while others count (its stamp may land between their hits,
    which arrive in batches applied as one): every member ends with the same number, the
    SET's plus the hits ordered after it."""
    a, b, c = cluster(3)
    a.call("incr_many", key="hits", count=2000)
    b.call("set", key="hits", value=1_000_000)
    c.call("incr_many", key="hits", count=2000)
    a.call("incr_many", key="hits", count=2000)
    for name, node in zip("abc", (a, b, c)):
        node.call("set", key=f"done.{name}", value=1)  # (after all its own operations)
    everything = [{"a": 1, "b": 1, "c": 1}] * 3
    wait_until(
        lambda: [n.call("get", key="done")["value"] for n in (a, b, c)] == everything, timeout=60
    )
    assert converged([a, b, c])
    values = {value for (value,) in _values([a, b, c], "hits")}
    assert len(values) == 1
    # (Which hits order after the SET depends on the clocks: hits made in the SET's
    # millisecond may too, whoever made them.)
    assert 1_000_000 <= values.pop() <= 1_006_000
