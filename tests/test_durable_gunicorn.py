"""The gunicorn worker with ``GCOLLECTIVE_DATA_DIR``: each slot keeps its data in its own
subdirectory, so a server stopped whole (nothing to hand over: a quick, quiet shutdown)
comes back with its data (issue 22)."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("gunicorn")

from test_gunicorn import (
    DEFAULT_HANDOFF_TIMEOUT,
    agreed_total,
    gunicorn_server,  # noqa: F401 (the fixture)
    hits,
)


def test_whole_server_stopped_and_started_again_keeps_the_data(tmp_path, gunicorn_server):  # noqa: F811
    env = {"GCOLLECTIVE_DATA_DIR": str(tmp_path)}
    server = gunicorn_server(workers=2, env=env)
    hits(server.port, 100)
    total = agreed_total(server)
    assert total >= 100
    began = time.monotonic()
    server.signal(signal.SIGTERM)  # as an operator (or a service manager) stops it
    assert server.proc is not None
    server.proc.wait(30)
    # Nothing to hand over: no wait for a successor, no warning.
    assert time.monotonic() - began < DEFAULT_HANDOFF_TIMEOUT
    assert "no new worker took it over" not in server.log()
    assert sorted(os.listdir(tmp_path)) == ["slot-0", "slot-1"]
    # A new server (new ports: none of the old members is left) starts from the disk.
    again = gunicorn_server(workers=2, env=env)
    again.every_slot(lambda r: r["total"] == total)
    hits(again.port, 10)
    again.every_slot(lambda r: r["total"] == total + 10)


def test_workers_recycled_under_load_lose_no_hits(tmp_path, gunicorn_server):  # noqa: F811
    """``--max-requests``: each worker leaves in turn (handing nothing over: its data is on
    disk and with the others) and its replacement restores a slot's directory."""
    env = {"GCOLLECTIVE_DATA_DIR": str(tmp_path)}
    limits = ("--max-requests", "90", "--max-requests-jitter", "20")
    server = gunicorn_server(workers=3, args=limits, env=env)
    first = {r["pid"] for r in server.every_slot(lambda r: True).values()}
    sent = len(hits(server.port, 300, concurrency=4))

    def recycled() -> bool:
        log = server.log()
        told = log.count("Autorestarting worker")
        return told >= 2 and log.count("Worker exiting") >= told

    deadline = time.monotonic() + 40
    while not recycled():  # (gunicorn may spread the hits unevenly: keep sending)
        assert time.monotonic() < deadline, f"workers were not recycled:\n{server.log()[-8000:]}"
        if sent < 900:
            sent += len(hits(server.port, 30, concurrency=4))
        time.sleep(0.1)
    final = server.every_slot(lambda r: r["total"] == sent, timeout=40)
    assert first - {r["pid"] for r in final.values()}, "no replacement worker answered"
    assert "no new worker took it over" not in server.log()
    assert sorted(os.listdir(tmp_path)) == ["slot-0", "slot-1", "slot-2"]
