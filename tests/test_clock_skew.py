"""A bad clock or a forged stamp (issue 17, cases 1 and 2; the clock-skew test of issue 23).

The rule (docs/contract.rst): a member refuses, with the connection, any
frame carrying a stamp more than ``clock_skew`` ahead of its own wall clock. A forged member
speaks the wire protocol over a raw socket to real members in this process; member processes
whose wall clocks run off (``tests/node_process.py``, GCOLLECTIVE_TEST_CLOCK_OFFSET) check
convergence within ``clock_skew`` and the refusal beyond it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import pytest
from cluster import NodeProcess, free_port, free_ports, wait_for, wait_until
from gevent import socket as gsocket
from test_gc import metadata_size
from test_hostile import still_replicates

from gcollective import Collective
from gcollective._auth import explain_refusal
from gcollective._clock import stamp_lead
from gcollective._store import Store
from gcollective._wire import encode_hello, encode_progress
from gcollective._wire_ops import parse_ops
from gcollective._wire_snapshot import encode_snapshot

OPTIONS = {
    "sync_interval": 0.1,
    "clock_skew": 1.0,
    "backoff_max": 0.5,
    # The forged member never sends an accepted PROGRESS: it holds the metadata frontier
    # back until it is declared down, as any silent member would.
    "down_timeout": 5.0,
}
FORGED = 0x5EED_F00D  # the forged member's node id
YEAR_MS = 366 * 24 * 3600 * 1000


def forged_hlcs() -> dict[str, int]:
    now_ms = time.time_ns() // 1_000_000
    return {"2**64-1": (1 << 64) - 1, "a year ahead": (now_ms + YEAR_MS) << 16}


def forged_conversation(node: Collective, frames: list[list], announce: int) -> bytes:
    """Connect to ``node`` as member FORGED (announcing port ``announce``), send HELLO and
    ``frames``, and return what the node sent back before closing the connection."""
    payload = encode_hello(FORGED, "127.0.0.1", announce, 0)
    payload += b"".join(json.dumps(frame).encode() + b"\n" for frame in frames)
    sock = gsocket.create_connection(node.local)
    received = b""
    try:
        sock.sendall(payload)
        sock.settimeout(10)
        while True:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    finally:
        sock.close()
    return received


def refusal_reason(received: bytes) -> str | None:
    for line in received.split(b"\n")[:-1]:
        why = explain_refusal(json.loads(line))
        if why:
            return why
    return None


@pytest.fixture
def pair():
    ports = free_ports(2)
    peers = [f"127.0.0.1:{p}" for p in ports]
    nodes = [Collective(address, peers, **OPTIONS) for address in peers]
    for node in nodes:
        node.start()
    yield nodes
    for node in nodes:
        node.stop(timeout=1)


@pytest.mark.parametrize("case", ["2**64-1", "a year ahead"])
def test_a_forged_stamp_is_refused_and_moves_no_clock(pair, caplog, case):
    a, b = pair
    a.set("users.1", "ann")
    wait_for(lambda: b.get("users.1") == "ann")
    hlc = forged_hlcs()[case]
    frame = [1, FORGED, 1, [hlc], [0], "", ["forged"], ["evil"], None]
    parse_ops(frame)  # the wire carries it: it is the clock rule that refuses it
    nowhere = free_port()  # the address it announces: nobody answers there
    with caplog.at_level(logging.DEBUG, logger="gcollective"):
        for _ in range(2):
            received = forged_conversation(a, [frame], nowhere)
            assert "clock_skew" in (refusal_reason(received) or ""), received
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "ahead of this node's clock" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings  # once, although refused twice
    assert f"{FORGED:x}" in warnings[0] and "clock_skew (1s)" in warnings[0]
    assert a.stats()["clock_refusals"] == 2
    # Nothing of it applied; the receiver's clock did not move.
    assert a.get("forged") is None and b.get("forged") is None
    assert stamp_lead(a._clock.stamp(), time.time_ns()) < 1.0
    # Honest members keep converging, both ways.
    still_replicates(a, b)
    still_replicates(b, a)
    # A 2 s ttl still expires, on time give or take clock_skew.
    a.set("session", "open", ttl=2)
    began = time.monotonic()
    wait_for(lambda: b.get("session") == "open")
    wait_for(lambda: a.get("session") is None and b.get("session") is None, timeout=15)
    assert time.monotonic() - began < 2 + OPTIONS["clock_skew"] + 3
    # A joiner still syncs, and replicates.
    joiner = Collective(f"127.0.0.1:{free_port()}", [a.local], **OPTIONS)
    joiner.start(timeout=10)
    try:
        wait_for(lambda: joiner.snapshot() == a.snapshot() == b.snapshot())
        still_replicates(a, joiner)
        still_replicates(joiner, b)
        # The metadata sweep still frees tombstones (once the forged member, which never
        # said anything acceptable, is declared down after down_timeout).
        baseline = max(metadata_size(n) for n in (a, b, joiner))
        for i in range(50):
            b.set(("tomb", str(i)), i)
        wait_for(lambda: a.get(("tomb", "49")) == 49)
        for i in range(50):
            a.delete(("tomb", str(i)))
        wait_for(lambda: not joiner.get("tomb") and not b.get("tomb"))
        wait_for(
            lambda: all(metadata_size(n) <= baseline + 1 for n in (a, b, joiner)),
            timeout=30,
            what="tombstones forgotten",
        )
    finally:
        joiner.stop(timeout=1)


def test_a_forged_snapshot_stamp_is_refused(pair, caplog):
    """The same rule for the stamps of a SNAPSHOT (a joiner's clock moves past its newest)."""
    a, b = pair
    holder = Store()
    holder.apply((forged_hlcs()["2**64-1"] << 64) | FORGED, 0, ("forged",), "evil")
    snapshot = json.loads(encode_snapshot(holder.export()))
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        received = forged_conversation(a, [snapshot], free_port())
    assert "clock_skew" in (refusal_reason(received) or "")
    assert any("SNAPSHOT" in r.getMessage() for r in caplog.records)
    assert a.stats()["clock_refusals"] == 1 and a.get("forged") is None
    assert stamp_lead(a._clock.stamp(), time.time_ns()) < 1.0
    still_replicates(b, a)


def test_a_peer_clock_ahead_is_refused_and_one_behind_is_reported(pair, caplog):
    """The first PROGRESS of a connection carries the peer's clock: one more than clock_skew
    ahead is refused (the peer is told why), one more than clock_skew behind is logged (if
    this node's clock is the wrong one, that is how it learns)."""
    a, _ = pair
    now_ms = time.time_ns() // 1_000_000
    ahead = ((now_ms + 5_000) << 80) | FORGED
    behind = ((now_ms - 5_000) << 80) | FORGED
    nowhere = free_port()
    with caplog.at_level(logging.WARNING, logger="gcollective"):
        received = forged_conversation(
            a, [json.loads(encode_progress([], True, ahead, 0))], nowhere
        )
        assert "clock_skew" in (refusal_reason(received) or "")
        assert a.stats()["clock_refusals"] == 1
        sock = gsocket.create_connection(a.local)
        try:
            sock.sendall(encode_hello(FORGED, "127.0.0.1", nowhere, 0))
            sock.sendall(encode_progress([], True, behind, 0))
            # (Judged on the reports of a couple of sync intervals: see the next test.)
            report_until(sock, 5.0, lambda: "behind this node's" in caplog.text)
        finally:
            sock.close()
    assert a.stats()["clock_refusals"] == 1  # behind is not refused
    messages = [r.getMessage() for r in caplog.records]
    assert any("ahead" in m and "PROGRESS" in m for m in messages), messages


def report_until(sock, behind: float, done, timeout: float = 10.0) -> None:
    """Send member FORGED's PROGRESS every 20 ms, its clock ``behind`` seconds behind this
    process's, until ``done()`` (fails after ``timeout``)."""

    def report() -> bool:
        now_ms = time.time_ns() // 1_000_000 - int(behind * 1000)
        sock.sendall(encode_progress([], True, (now_ms << 80) | FORGED, 0))
        return bool(done())

    wait_for(report, timeout=timeout, interval=0.02)


def test_a_first_report_read_late_is_no_clock_behind(pair, caplog):
    """A receiver starved of CPU (or stopped) reads a connection's first PROGRESS reports
    late, in one go: their stamps look seconds behind though the clocks agree. Fresh reports
    follow, and the lag judged is the least of them: no warning. (In-process: the backlog is
    sent as one write, as a stopped receiver would find it.)"""
    a, _ = pair
    sync_interval = OPTIONS["sync_interval"]
    now_ms = time.time_ns() // 1_000_000
    backlog = [
        encode_progress([], True, ((now_ms - 20_000 + 100 * i) << 80) | FORGED, 0)
        for i in range(30)
    ]
    sock = gsocket.create_connection(a.local)
    try:
        with caplog.at_level(logging.WARNING, logger="gcollective"):
            sock.sendall(encode_hello(FORGED, "127.0.0.1", free_port(), 0) + b"".join(backlog))
            began = time.monotonic()
            # Fresh reports for well past the judgement (CLOCK_JUDGEMENT sync intervals).
            report_until(sock, 0.0, lambda: time.monotonic() - began > 10 * sync_interval)
            # The node heard the fresh ones (so it judged): it answers a later one as usual.
            assert a.stats()["clock_refusals"] == 0
        assert "behind this node's" not in caplog.text, caplog.text
    finally:
        sock.close()


# -- member processes with offset wall clocks ---------------------------------------------------

PROCESS_OPTIONS = {"sync_interval": 0.1, "backoff_max": 0.5, "clock_skew": 2.0}


@pytest.fixture
def skewed():
    """``skewed(offsets, **options)``: member processes whose wall clocks run ``offsets``
    seconds off, all peers of each other, started; all stopped after the test."""
    made: list[NodeProcess] = []

    def make(offsets: list[float], **options) -> list[NodeProcess]:
        ports = free_ports(len(offsets))
        nodes = [
            NodeProcess(port, ports, clock_offset=offset, **{**PROCESS_OPTIONS, **options})
            for port, offset in zip(ports, offsets)
        ]
        made.extend(nodes)
        for node in nodes:
            node.start()
        return nodes

    yield make
    for node in made:
        node.stop()


def test_a_receiver_stopped_a_few_seconds_does_not_warn_but_a_skewed_peer_does(tmp_path):
    """A member stopped (SIGSTOP) while a peer connects reads the peer's first PROGRESS
    reports 4 s late, beyond clock_skew (2 s), though both run on this machine's clock: no
    "behind" warning. A member whose clock is 5 s behind, connecting afterwards, is still
    reported."""
    ports = free_ports(3)
    log_path = str(tmp_path / "receiver.log")
    receiver = NodeProcess(ports[0], ports, log_path=log_path, **PROCESS_OPTIONS)
    punctual = NodeProcess(ports[1], ports, **PROCESS_OPTIONS)
    late = NodeProcess(ports[2], ports, clock_offset=-5.0, **PROCESS_OPTIONS)
    try:
        receiver.start(timeout=0.5)  # (alone yet)
        os.kill(receiver.proc.pid, signal.SIGSTOP)
        try:
            punctual.start(timeout=0.5)  # (its HELLO and reports wait in the kernel)
            wait_until(
                lambda: punctual.call("stats")["peers"][receiver.local]["sent_frames"] >= 2,
                what="the punctual member reported to the stopped one",
            )
            sent = time.monotonic()
            # (The fault itself, not a synchronisation: the reports wait this long unread.)
            wait_until(lambda: time.monotonic() - sent > 2 * PROCESS_OPTIONS["clock_skew"])
        finally:
            os.kill(receiver.proc.pid, signal.SIGCONT)
        punctual.call("set", key="after", value=1)
        everywhere([receiver, punctual], "after", 1)
        late.start(timeout=0.5)  # (the others refuse its snapshot request: it is behind)

        def warned_of_the_late_member() -> bool:
            with open(log_path) as log:
                return f"peer {late.local}: its clock is" in log.read()

        wait_until(warned_of_the_late_member, what="the late member's clock warning")
        with open(log_path) as log:
            text = log.read()
        assert f"peer {punctual.local}: its clock is" not in text, text
    finally:
        for node in (receiver, punctual, late):
            node.stop()


def everywhere(nodes: list[NodeProcess], key: str, value, timeout: float = 20.0) -> None:
    wait_until(
        lambda: all(n.call("get", key=key)["value"] == value for n in nodes),
        timeout=timeout,
        what=f"{key} == {value!r} on every member",
    )


def test_members_with_clocks_within_clock_skew_converge(skewed):
    """Clocks 1.2 s ahead and 0.6 s behind (clock_skew 2 s): a write made after seeing
    another wins over it wherever it was made, deletes and ttls work, the sweep forgets
    tombstones, and nothing is refused."""
    nodes = skewed([0.0, 1.2, -0.6])
    exact, ahead, behind = nodes
    ahead.call("set", key="cfg.mode", value="ahead")
    everywhere(nodes, "cfg.mode", "ahead")
    behind.call("set", key="cfg.mode", value="behind")  # later, though its clock reads earlier
    exact.call("set", key="cfg.old", value=1)
    everywhere(nodes, "cfg.mode", "behind")
    everywhere(nodes, "cfg.old", 1)
    behind.call("delete", key="cfg.old")
    ahead.call("incr", key="hits", amount=2)
    behind.call("incr", key="hits", amount=3)
    everywhere(nodes, "hits", 5)
    everywhere(nodes, "cfg.old", None)
    began = time.monotonic()
    behind.call("incr", key="visits", amount=1, ttl=2)
    everywhere(nodes, "visits", 1)
    everywhere(nodes, "visits", None, timeout=15)
    # Expired within its ttl, give or take clock_skew (and polling on a loaded machine).
    assert time.monotonic() - began < 2 + 2 + 4
    for i in range(30):
        nodes[i % 3].call("set", key=f"tomb.{i}", value=i)
    everywhere(nodes, "tomb.29", 29)
    for i in range(30):
        nodes[(i + 1) % 3].call("delete", key=f"tomb.{i}")
    everywhere(nodes, "tomb", {})
    snapshots = [n.call("snapshot")["value"] for n in nodes]
    assert snapshots[0] == snapshots[1] == snapshots[2]
    assert snapshots[0] == {"cfg": {"mode": "behind"}, "hits": 5, "tomb": {}}
    wait_until(
        lambda: all(n.call("metadata")["entries"] <= 8 for n in nodes),
        timeout=30,
        what="tombstones forgotten on every member",
    )
    assert all(n.call("stats")["clock_refusals"] == 0 for n in nodes)


def test_a_member_beyond_clock_skew_is_refused_until_its_clock_is_fixed(skewed):
    """A member 4 s ahead (clock_skew 2 s): the others refuse it, counted, and their own
    clocks stay right (their ttls expire on time); it still receives their writes. Once its
    clock is fixed, its writes arrive and every member holds the same tree."""
    nodes = skewed([0.0, 0.0, 4.0])
    first, second, wrong = nodes
    wrong.call("set", key="late.x", value=1)
    wait_until(
        lambda: all(n.call("stats")["clock_refusals"] >= 2 for n in (first, second)),
        timeout=20,
        what="the member ahead refused, repeatedly",
    )
    assert first.call("get", key="late")["value"] is None
    assert second.call("get", key="late")["value"] is None
    # The honest members replicate among themselves, and to the one ahead.
    first.call("set", key="early", value=1)
    everywhere(nodes, "early", 1)
    began = time.monotonic()
    second.call("set", key="session", value="open", ttl=2)
    everywhere([first, second], "session", "open")
    everywhere([first, second], "session", None, timeout=15)
    assert time.monotonic() - began < 2 + 2 + 4  # their clocks were not dragged ahead
    assert first.call("get", key="late")["value"] is None  # still refused meanwhile
    wrong.call("clock_offset", seconds=0.0)
    everywhere(nodes, "late", {"x": 1}, timeout=30)
    wait_until(
        lambda: len({json.dumps(n.call("snapshot")["value"], sort_keys=True) for n in nodes}) == 1,
        timeout=20,
        what="the same tree everywhere",
    )
    wrong.call("set", key="late.y", value=2)
    everywhere(nodes, "late", {"x": 1, "y": 2})


@pytest.mark.parametrize("skew", [float("inf"), 400 * 24 * 3600.0])
def test_clock_skew_is_bounded(skew):
    """At most a year: a receiver must refuse stamps long before the wire's limit."""
    with pytest.raises(ValueError, match="clock_skew"):
        Collective(f"127.0.0.1:{free_port()}", [], clock_skew=skew)
