"""The public API in one process: bad input, local behaviour, lifecycle, the module functions."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import gevent
import pytest
from cluster import ROOT, free_port, free_ports, wait_for

import gcollective
from gcollective import (
    DELETE,
    INCREMENT,
    OPERATIONS,
    SET,
    Collective,
    InvalidKeyError,
    InvalidValueError,
    NotStartedError,
)
from gcollective._wire import FrameDecoder, parse_progress


@pytest.fixture
def node():
    n = Collective(f"127.0.0.1:{free_port()}")
    n.start()
    yield n
    n.stop()


def test_operation_constants_match_collective_js():
    assert (SET, INCREMENT, DELETE) == (0, 1, 2)
    assert (OPERATIONS.SET, OPERATIONS.INCREMENT, OPERATIONS.DELETE) == (0, 1, 2)
    assert gcollective.SET is OPERATIONS.SET


def test_a_lone_member_is_a_plain_local_store(node):
    node.set("users.42.visits", 1)
    node.set("users.42.visits", 2, INCREMENT)
    assert node.incr("users.42.visits") == 4
    assert node.get("users") == {"42": {"visits": 4}}
    assert node.get(("users", "42", "visits")) == 4
    node.set("users.42", None, DELETE)
    assert node.get("users") == {}
    node.delete("users")
    assert node.get("users", "none") == "none"
    assert node.snapshot() == {}


def test_tuple_keys_allow_dots_in_segments(node):
    node.set(("mail", "ann@example.org"), {"seen": True})
    assert node.get(("mail", "ann@example.org", "seen")) is True
    assert node.get("mail") == {"ann@example.org": {"seen": True}}


def test_writing_through_a_non_dict_replaces_it(node):
    node.set("a", 5)
    node.set("a.b", 1)
    assert node.get("a") == {"b": 1}
    node.incr("a.b.c")  # a.b holds 1: replaced by a dict holding c
    assert node.get("a") == {"b": {"c": 1}}


def test_reads_return_copies_and_stored_values_are_private(node):
    value = {"list": [1, 2], "nested": {"x": 1}}
    node.set("k", value)
    value["list"].append(3)
    value["nested"]["x"] = 99
    got = node.get("k")
    assert got == {"list": [1, 2], "nested": {"x": 1}}
    got["list"].append(4)
    node.snapshot()["k"]["nested"]["x"] = 5
    assert node.get("k") == {"list": [1, 2], "nested": {"x": 1}}


def test_tuples_are_stored_as_lists(node):
    node.set("t", (1, (2, 3)))
    assert node.get("t") == [1, [2, 3]]


@pytest.mark.parametrize(
    "key",
    ["", ".", "a.", ".a", "a..b", (), ("a", ""), ("a", 1), 5, None, b"a.b", ["a", None]],
)
def test_bad_keys_are_refused(node, key):
    with pytest.raises(InvalidKeyError):
        node.set(key, 1)
    with pytest.raises(InvalidKeyError):
        node.get(key)
    with pytest.raises(InvalidKeyError):
        node.incr(key)
    with pytest.raises(InvalidKeyError):
        node.delete(key)
    assert node.snapshot() == {}


@pytest.mark.parametrize("key", ["a.", "a..b", ".b", ("a", "")])
def test_a_bad_key_is_refused_even_where_a_dict_value_has_an_empty_key(node, key):
    # A dict value may hold "" as a key; no key reaches it, and get raises as set does.
    node.set("a", {"": {"b": 1}, "x": 2})
    with pytest.raises(InvalidKeyError):
        node.get(key)
    assert node.get("a") == {"": {"b": 1}, "x": 2}


@pytest.mark.parametrize("key", [".".join(["x"] * 101), ("x",) * 101])
def test_keys_deeper_than_peers_accept_are_refused(node, key):
    for call in (
        lambda: node.set(key, 1),
        lambda: node.incr(key),
        lambda: node.delete(key),
        lambda: node.get(key),
    ):
        with pytest.raises(InvalidKeyError, match="deeper"):
            call()
    node.set(".".join(["x"] * 100), 1)  # the deepest a peer accepts
    assert node.stats()["local_ops"] == 1


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        b"bytes",
        bytearray(b"x"),
        float("nan"),
        float("inf"),
        -float("inf"),
        object(),
        {"a": object()},
        {1: "int key"},
        [1, {2, 3}],
        {"deep": float("nan")},
    ],
)
def test_non_json_values_are_refused_and_nothing_changes(node, value):
    node.set("keep", 1)
    with pytest.raises(InvalidValueError):
        node.set("keep", value)
    with pytest.raises(InvalidValueError):
        node.set("other", value)
    assert node.snapshot() == {"keep": 1}


def test_too_deep_values_are_refused(node):
    value: list = []
    for _ in range(500):
        value = [value]
    with pytest.raises(InvalidValueError):
        node.set("deep", value)


@pytest.mark.parametrize("amount", [True, False, "1", None, [1], float("nan"), float("inf")])
def test_bad_increment_amounts_are_refused(node, amount):
    with pytest.raises(InvalidValueError):
        node.incr("n", amount)
    with pytest.raises(InvalidValueError):
        node.set("n", amount, INCREMENT)
    assert node.get("n") is None


@pytest.mark.parametrize("held", ["text", [1], {"a": 1}, True, None])
def test_incrementing_a_non_number_is_refused(node, held):
    node.set("k", held)
    with pytest.raises(InvalidValueError):
        node.incr("k")
    assert node.get("k") == held


def test_unknown_operation_is_refused(node):
    with pytest.raises(ValueError):
        node.set("k", 1, 7)
    with pytest.raises(ValueError):
        node.set("k", 1, True)
    assert node.snapshot() == {}


def test_floats_and_ints_increment_exactly(node):
    node.incr("f", 0.5)
    node.incr("f", 0.25)
    node.incr("i", 2**70)
    assert node.get("f") == 0.75
    assert node.get("i") == 2**70


def test_writes_need_a_started_node_and_reads_survive_stop():
    n = Collective(f"127.0.0.1:{free_port()}")
    with pytest.raises(NotStartedError):
        n.set("a", 1)
    n.start()
    n.set("a", 1)
    n.stop()
    with pytest.raises(NotStartedError):
        n.set("a", 2)
    assert n.get("a") == 1
    with pytest.raises(RuntimeError):
        n.start()


def test_context_manager_starts_and_stops():
    with Collective(("127.0.0.1", free_port())) as n:
        n.set("x", 1)
        assert n.running
    assert not n.running


@pytest.mark.parametrize(
    "address",
    ["nohost", "host:", "host:0", "host:70000", ("h",), {"host": "h"}, 5, ("", 80), ("h", True)],
)
def test_bad_addresses_are_refused(address):
    with pytest.raises(ValueError):
        Collective(address)


def test_addresses_in_every_form_and_self_is_skipped():
    port, other = free_ports(2)
    n = Collective(
        {"host": "127.0.0.1", "port": port},
        [f"127.0.0.1:{port}", ("127.0.0.1", other), f"127.0.0.1:{other}"],
    )
    assert n.local == ("127.0.0.1", port)
    assert n.peers == [("127.0.0.1", other)]


@pytest.mark.parametrize(
    "option", ["connect_timeout", "backoff_min", "send_timeout", "stall_timeout"]
)
def test_bad_options_are_refused(option):
    with pytest.raises(ValueError):
        Collective(f"127.0.0.1:{free_port()}", **{option: 0})
    with pytest.raises(ValueError):
        Collective(f"127.0.0.1:{free_port()}", max_frame=10)


def test_binding_a_taken_port_raises():
    with Collective(f"127.0.0.1:{free_port()}") as first:
        second = Collective(first.local)
        with pytest.raises(OSError):
            second.start()


def test_first_member_up_does_not_wait_for_absent_peers():
    port, absent = free_ports(2)
    n = Collective(f"127.0.0.1:{port}", [f"127.0.0.1:{absent}"], connect_timeout=1)
    with gevent.Timeout(5):
        n.start(timeout=30)
    n.stop()


def test_two_members_in_one_process_replicate(node):
    other = Collective(f"127.0.0.1:{free_port()}", [node.local])
    other.start()
    try:
        assert other.synced
        other.set("from.other", 1)
        node.set("from.node", [1, "two"])
        wait_for(
            lambda: (
                node.snapshot() == other.snapshot() == {"from": {"other": 1, "node": [1, "two"]}}
            )
        )
    finally:
        other.stop()


def test_module_level_drop_in():
    with pytest.raises(NotStartedError):
        gcollective.get("x")
    node = gcollective.start(f"127.0.0.1:{free_port()}")
    try:
        assert gcollective.default_node() is node
        with pytest.raises(RuntimeError):
            gcollective.start(f"127.0.0.1:{free_port()}")
        gcollective.set("a.b", 1)
        gcollective.set("a.b", 2, gcollective.INCREMENT)
        assert gcollective.incr("a.b", 1) == 4
        assert gcollective.get("a") == {"b": 4}
        gcollective.delete("a.b")
        assert gcollective.snapshot() == {"a": {}}
    finally:
        gcollective.stop()
    with pytest.raises(NotStartedError):
        gcollective.set("x", 1)
    gcollective.stop()  # a second stop is harmless


def test_import_has_no_side_effects():
    code = (
        "import sys, gcollective\n"
        "bad = [m for m in ('gevent', 'socket', 'ssl', 'threading', 'selectors') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert gcollective.__version__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env())


@pytest.mark.parametrize("enabled", [True, False])
def test_receiving_gives_back_the_apps_gc_setting(node, enabled):
    """A member pauses the cyclic GC while it decodes and applies what it read (see
    ``_read_connection``), and must leave it as the app had it: on, or off."""
    other = Collective(f"127.0.0.1:{free_port()}", [node.local])
    other.start()
    was = gc.isenabled()
    try:
        if not enabled:
            gc.disable()
        for i in range(2000):
            other.set(("k", str(i)), i)
        wait_for(lambda: node.get(("k", "1999")) == 1999)
        assert node.stats()["received_ops"] >= 2000
        assert gc.isenabled() is enabled
    finally:
        if was:
            gc.enable()
        other.stop()


def test_a_forked_child_running_the_hub_leaves_the_parents_links_alone():
    """After a fork the child's hub would run copies of the parent's greenlets on the shared
    descriptors: with a secret, a record sent twice under one counter breaks the link. The
    child here runs its hub for a while; the parent's links must never notice."""
    code = f"""
from gevent import monkey; monkey.patch_all()
import os, time, gevent
from gcollective import Collective
from gcollective._wire import FrameDecoder, parse_progress
addresses = ["127.0.0.1:{free_port()}", "127.0.0.1:{free_port()}"]
options = dict(sync_interval=0.02, secret="s" * 32)
a = Collective(addresses[0], addresses, **options); a.start(timeout=5)
b = Collective(addresses[1], addresses, **options); b.start(timeout=5)
def wait(check):
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline
        gevent.sleep(0.01)
a.set("before", 1)
wait(lambda: b.get("before") == 1)
pids = []
for k in range(10):
    # Forked with writes just made: the writers' wake-ups are queued in the hub already,
    # ahead of the fork hook's kills (a child's writer used to send them a second time).
    a.set(("pre", str(k)), k); b.set(("bpre", str(k)), k)
    gevent.sleep(0.005 * (k % 4))
    pid = os.fork()
    if pid == 0:
        gevent.sleep(0.3)  # the child runs its hub; the parent's nodes are not its own
        os._exit(0)
    pids.append(pid)
for i in range(30):
    a.set(("after", str(i)), i); b.set(("back", str(i)), i)
    gevent.sleep(0.01)
for pid in pids:
    os.waitpid(pid, 0)
wait(lambda: b.get("after") == {{str(i): i for i in range(30)}})
wait(lambda: a.get("back") == {{str(i): i for i in range(30)}})
for node, other in ((a, addresses[1]), (b, addresses[0])):
    peer = node.stats()["peers"][other]
    assert peer["connects"] == 1, peer  # (its last error is from before the peer listened)
    assert node.stats()["refused_connections"] == 0
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_nothing_of_a_parents_node_survives_fork():
    code = (
        "import os, gcollective\n"
        f"gcollective.start('127.0.0.1:{free_port()}')\n"
        "gcollective.set('a', 1)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        gcollective.get('a')\n"
        "    except gcollective.NotStartedError:\n"
        "        os._exit(0)\n"
        "    os._exit(1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0\n"
        "assert gcollective.get('a') == 1\n"
        "gcollective.stop()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env(), timeout=60)


def _env():
    return dict(os.environ, PYTHONPATH=ROOT)


def test_a_lone_surrogate_is_refused_without_a_gap_in_the_sequence(node):
    with pytest.raises(InvalidValueError):
        node.set("k", "\ud800")
    with pytest.raises(InvalidKeyError):
        node.set(("k\ud800",), 1)
    with pytest.raises(InvalidKeyError):
        node.set("k\ud800", 1)
    with pytest.raises(InvalidKeyError):
        node.get("k\ud800")
    with pytest.raises(InvalidValueError):
        node.set("k", {"\ud800": 1})
    node.set("k", "fine")
    assert node.stats()["local_ops"] == 1
    assert node.snapshot() == {"k": "fine"}


def test_a_progress_report_covers_the_operations_not_yet_sent(node):
    """The own entry of the version vector moves when the outbox is flushed; a PROGRESS frame
    built before that (the writer's loop has not yielded yet) must still cover every own
    operation applied, and the promise must be no older than any of them: peers trust it once
    they hold what the vector says."""
    for i in range(5):
        node.set(f"loop.k{i}", i)
    (message,) = FrameDecoder(1 << 20).feed(node._engine.progress_frame(time.monotonic()))
    vector, _, promise, _ = parse_progress(message)
    ((origin, seq, stamp),) = vector
    assert (origin, seq) == (node.node_id, 5)
    assert stamp == node._store._root.entries["loop"].entries["k4"] <= promise
