"""Inputs the API accepts reach every member, joiners included, or are refused at the call
(issue 24, cases 1-4): member processes, and a member that joins after the writes."""

from __future__ import annotations

import pytest
from cluster import NodeProcess, converged, free_port, wait_until

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}
MIB = 1 << 20


@pytest.fixture
def joiner():
    """``joiner(members, **options)`` starts a member on an address the others do not list
    (they learn it from its HELLO): everything it holds comes by snapshot."""
    made: list[NodeProcess] = []

    def join(members: list[NodeProcess], **options) -> NodeProcess:
        node = NodeProcess(free_port(), [m.port for m in members], **options)
        made.append(node)
        assert node.start(timeout=30)["synced"], "the joiner did not merge a peer's state"
        return node

    yield join
    for node in made:
        node.stop()


def refused(node: NodeProcess, cmd: str, error: str = "InvalidValueError", **args) -> str:
    """The error message of a call that must fail with ``error``."""
    with pytest.raises(RuntimeError) as caught:
        node.call(cmd, **args)
    message = str(caught.value)
    assert f": {error}:" in message, message
    return message


def digits(count: int) -> dict:
    return {"build": "digits", "size": count}


def all_converge(nodes: list[NodeProcess], what: str) -> None:
    wait_until(lambda: converged(nodes), timeout=60, what=what)


def test_numbers_json_cannot_carry_are_refused_and_the_rest_replicates(cluster, joiner):
    a, b = cluster(2, **FAST)
    a.call("set", key="big", value=digits(4300))  # the longest int accepted
    message = refused(a, "set", key="huge", value=digits(4301))
    assert "4300 digits" in message
    refused(a, "set", key="doc", value={"n": [1, digits(5000)]})
    a.call("incr", key="count", amount=digits(4300))
    refused(a, "incr", key="count", amount=digits(4301))
    refused(a, "incr", key="count", amount=digits(4300))  # the sum would have 4301 digits
    assert a.call("get", key="count")["value"] == 10**4300 - 1
    assert a.call("incr", key="x", amount=1.7e308)["value"] == 1.7e308
    message = refused(a, "incr", key="x", amount=1.7e308)  # inf
    assert "not a JSON number" in message
    assert a.call("get", key="x")["value"] == 1.7e308
    refused(a, "incr", key="count", amount=1.5)  # (an int that big is no float)
    a.call("set", key="small", value=1)
    wait_until(lambda: b.call("get", key="small")["value"] == 1, what="small reaches b")
    all_converge([a, b], "a and b hold the same")
    assert b.call("get", key="count")["value"] == 10**4300 - 1
    late = joiner([a, b], **FAST)
    all_converge([a, b, late], "the joiner holds the same")
    assert late.call("get", key="big")["value"] == 10**4300 - 1
    assert late.call("get", key="huge")["value"] is None


def nested(kind: str, levels: int) -> dict:
    return {"build": f"nested_{kind}", "size": levels}


def test_one_nesting_rule_for_key_and_value_on_every_path(cluster, joiner):
    a, b = cluster(2, **FAST)
    message = refused(a, "set", key="deep", value=nested("list", 100))  # 1 + 100 levels
    assert "together" in message
    a.call("set", key="deep", value=nested("list", 99))
    key60 = [f"s{i}" for i in range(60)]
    refused(a, "set", key=key60, value=nested("dict", 60))
    refused(a, "set", key=".".join(key60), value=nested("dict", 41))
    a.call("set", key=key60, value=nested("dict", 40))
    refused(a, "set", key=[*key60, "more"], value=nested("list", 40))
    a.call("set", key=[f"t{i}" for i in range(50)], value=nested("list", 50))
    a.call("incr", key=[f"u{i}" for i in range(100)])
    refused(a, "incr", error="InvalidKeyError", key=[f"u{i}" for i in range(101)])
    a.call("set", key="small", value=1)
    wait_until(lambda: b.call("get", key="small")["value"] == 1, what="small reaches b")
    all_converge([a, b], "a and b hold the same")
    late = joiner([a, b], **FAST)
    all_converge([a, b, late], "the joiner holds the same")
    assert late.call("get", key="s0")["value"] is not None


def test_an_operation_no_peer_could_accept_is_refused(cluster, joiner):
    options = dict(FAST, max_frame=MIB)
    a, b = cluster(2, **options)
    message = refused(a, "set", key="big", value={"build": "text", "size": 2 * MIB})
    assert "max_frame" in message
    refused(a, "set", key=["doc", "text"], value={"build": "text", "size": MIB})
    refused(a, "set", error="InvalidKeyError", key="k" * (2 * MIB), value=1)
    a.call("set", key="half", value={"build": "text", "size": MIB // 2})
    # The longest value accepted at a 3-segment key (docs/guide.rst's rule: 256 bytes plus 160 a
    # segment for the frame around it; the key is ["a","b","c"], the value in quotes), in a
    # node with other leaves: it still reaches the joiner, in a snapshot piece of its own.
    longest = MIB - 256 - 3 * 160 - len('["a","b","c"]') - 2
    refused(a, "set", key=["a", "b", "c"], value={"build": "text", "size": longest + 1})
    a.call("set", key=["a", "b", "c"], value={"build": "text", "size": longest})
    a.call("write_keys", prefix="a.b", count=1000, flat=True)
    a.call("set", key="small", value=1)
    wait_until(lambda: b.call("get", key="small")["value"] == 1, what="small reaches b")
    all_converge([a, b], "a and b hold the same")
    late = joiner([a, b], **options)
    all_converge([a, b, late], "the joiner holds the same")


def test_a_subtree_larger_than_a_frame_reaches_a_joiner(cluster, joiner):
    """60,000 small entries under one top-level key (several MB as a snapshot) at
    max_frame = 1 MiB: the snapshot streams the subtree in pieces under the limit."""
    options = dict(FAST, max_frame=MIB)
    a, b = cluster(2, **options)
    a.call("write_keys", prefix="users", count=60_000)  # users.<i>.v: a node per user
    a.call("write_keys", prefix="sessions", count=100_000, flat=True)  # plain leaves
    a.call("delete", key="sessions.7")  # a tombstone among them
    b.call("incr", key="users.12.visits", amount=3)
    total = 60_000 + 100_000 - 1 + 1
    wait_until(lambda: converged([a, b], leaves=total), timeout=60, what="a and b converge")
    late = joiner([a, b], **options)
    wait_until(
        lambda: converged([a, b, late], leaves=total), timeout=60, what="the joiner converges"
    )
    assert late.call("get", key="users.12")["value"] == {"v": 12, "visits": 3}
    # Writes after the join still reach it: its links are up, not reconnecting.
    a.call("set", key="users.60000.v", value=1)
    wait_until(lambda: late.call("get", key="users.60000.v")["value"] == 1, what="late write")
    stats = late.call("stats")
    assert all(peer["state"] == "connected" for peer in stats["peers"].values()), stats
