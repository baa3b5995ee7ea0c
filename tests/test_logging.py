"""Structured context (node_id, peer, reason) on the records of the ``gcollective`` logger."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

from cluster import ROOT, LocalMembers, free_ports, wait_for, wait_until

from gcollective import Collective


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def gcollective_records(level: int | None = None) -> Iterator[Records]:
    """The records of the ``gcollective`` logger while the block runs (from ``level`` up,
    if given: the logger's own level is set back after)."""
    logger = logging.getLogger("gcollective")
    records = Records()
    logger.addHandler(records)
    before = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(before)


def test_records_of_two_members_in_one_process_say_which_member_and_peer():
    members = LocalMembers()
    with gcollective_records(logging.DEBUG) as records:
        try:
            a, b = members(2)
            ids = {f"{a.node_id:x}": a, f"{b.node_id:x}": b}
            # b vanishes without a goodbye (as a killed process would: its descriptors closed),
            # so a loses its connection to b: a line with a reason. (After a goodbye, a just
            # stops dialling b and says so.)
            b._forget_after_fork()

            def lost():
                return [r for r in records.records if "connection lost" in r.getMessage()]

            (line,) = wait_for(lost, what="a logs the lost connection")
            assert line.node_id == f"{a.node_id:x}" and line.peer == format_address(b)
            assert line.reason and line.reason in line.getMessage()
        finally:
            members.stop()
    assert records.records
    for record in records.records:
        for field in ("node_id", "peer", "reason"):
            assert hasattr(record, field), (field, record.getMessage())
    connected = [r for r in records.records if r.getMessage().endswith(": connected")]
    assert {(r.node_id, r.peer) for r in connected} == {
        (f"{a.node_id:x}", format_address(b)),
        (f"{b.node_id:x}", format_address(a)),
    }
    assert all(r.node_id in ids for r in records.records if r.node_id is not None)
    # Once its HELLO named it, an incoming connection's records name the peer by its address.
    hellos = [r for r in records.records if "connected from" in r.getMessage()]
    assert {(r.node_id, r.peer) for r in hellos} == {
        (f"{a.node_id:x}", format_address(b)),
        (f"{b.node_id:x}", format_address(a)),
    }


def format_address(node: Collective) -> str:
    return node.stats()["address"]


def test_a_refused_connection_is_logged_with_its_reason():
    a_port, b_port = free_ports(2)
    with gcollective_records() as records:
        a = Collective(f"127.0.0.1:{a_port}", secret="one-secret-0123456789abcdef-0123456789")
        b = Collective(
            f"127.0.0.1:{b_port}",
            [f"127.0.0.1:{a_port}"],
            secret="another-secret-0123456789abcdef-012345678",
        )
        a.start()
        b.start(timeout=0.5)
        try:

            def refused():
                return [r for r in records.records if "refused" in r.getMessage()]

            record = wait_for(refused, what="a refuses b")[0]
            assert record.node_id == f"{a.node_id:x}" and record.peer.startswith("127.0.0.1:")
            assert record.reason and f"({record.reason})" in record.getMessage()  # its category
        finally:
            b.stop(timeout=1)
            a.stop(timeout=1)


def test_the_json_logging_example_of_the_docs_carries_the_fields():
    """examples/json_logging.py (the docs' example) in a real process, with an absent peer."""
    port, absent = free_ports(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "examples", "json_logging.py"),
                f"127.0.0.1:{port}",
                f"127.0.0.1:{absent}",
            ],
            stderr=log,
            env=dict(os.environ, PYTHONPATH=ROOT),
            cwd=ROOT,
            # (interrupted below: give it SIGINT's default whatever this run inherited; a
            # run started in the background by a script has it ignored, and so would the
            # example, which waits for a KeyboardInterrupt)
            preexec_fn=_default_sigint,
        )

        def entries():
            log.seek(0)
            lines = [json.loads(line) for line in log.read().splitlines() if line.strip()]
            unreachable = [e for e in lines if "not reachable yet" in e["message"]]
            return unreachable and lines

        try:
            lines = wait_until(entries, what="the member logs its absent peer")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
    unreachable = next(e for e in lines if "not reachable yet" in e["message"])
    assert unreachable["peer"] == f"127.0.0.1:{absent}"
    assert unreachable["node_id"] and "refused" in unreachable["reason"].lower()
    mine = {e["node_id"] for e in lines if e["logger"] == "gcollective"}
    assert mine == {unreachable["node_id"]}  # one member: its id on every record


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
