"""A member that is alive but stops reading (a gunicorn worker busy in a long request, a member
starved of CPU) keeps the connections its peers made to it, for up to ``send_timeout``.

Its receive buffer fills and its TCP stack advertises a zero window, which Linux ends like lost
packets once ``TCP_USER_TIMEOUT`` passes. Links used to set that to ``stall_timeout`` (2 s, so
that lost packets are noticed fast): such a member had its links cut, redialled and sent
their catch-up again, over and over on a loaded machine. Now the kernel waits ``send_timeout``
and the link tells lost packets (nothing answers) from a shut window (every probe answered)
itself (docs/links.rst); tests/test_lossy.py checks that lost packets still end the link
within about ``stall_timeout``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
from cluster import NodeProcess, converged, free_ports, wait_until

from gcollective._links import _limit_unacknowledged, unanswered

KEYS = 200_000  # (~10 MB of frames: more than both kernels' buffers take while one is stopped)
STOPPED_SECONDS = 4.5  # (after its window shut: more than twice stall_timeout)
STALL = 2.0

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="TCP_USER_TIMEOUT and TCP_INFO are Linux's"
)


def link_to(node: NodeProcess, other: NodeProcess) -> dict:
    return node.call("stats")["peers"][other.local]


@linux_only
def test_a_member_stopped_for_twice_stall_timeout_keeps_its_links() -> None:
    writer_port, reader_port = free_ports(2)
    peers = [writer_port, reader_port]
    writer = NodeProcess(writer_port, peers, stall_timeout=STALL)
    reader = NodeProcess(reader_port, peers, stall_timeout=STALL)
    stopped = False
    try:
        writer.start(timeout=0.5)
        reader.start(timeout=0.5)
        wait_until(lambda: link_to(writer, reader)["state"] == "connected", what="connected")
        before = link_to(writer, reader)  # (its first attempt may have been refused)
        os.kill(reader.proc.pid, signal.SIGSTOP)  # alive (its kernel answers), not reading
        stopped = True
        writer.call("write_keys", prefix="w", count=KEYS)
        # The proof that its window shut: the writer's link holds what the kernel refused.
        wait_until(lambda: link_to(writer, reader)["queued_bytes"] > 0, what="window shut")
        time.sleep(STOPPED_SECONDS)  # (the fault's duration, not a synchronisation)
        during = link_to(writer, reader)
        os.kill(reader.proc.pid, signal.SIGCONT)
        stopped = False
        wait_until(lambda: converged([writer, reader], leaves=KEYS), timeout=120, what="converged")
        after = link_to(writer, reader)
        assert during["queued_bytes"] > 0, during  # (still stuck at the end: it did not read)
        for link in (during, after):
            assert (link["connects"], link["last_error"]) == (
                before["connects"],
                before["last_error"],
            ), link
    finally:
        if stopped:
            os.kill(reader.proc.pid, signal.SIGCONT)
        writer.kill()
        reader.kill()


@linux_only
def test_unanswered_tells_a_shut_window_from_a_live_link() -> None:
    """The check itself, on a real loopback connection whose reader never reads: every
    sample over three times ``stall_timeout`` of shut window says the peer answers."""
    stall = 1.0  # (the smallest retry cap: probes at most a second apart)
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
        with sender, receiver:
            _limit_unacknowledged(sender, stall, send_timeout=30.0)
            sender.setblocking(False)
            deadline = None  # (set once the window shut)
            while deadline is None or time.monotonic() < deadline:
                try:
                    sender.send(b"x" * 65536)
                except BlockingIOError:
                    if deadline is None:
                        deadline = time.monotonic() + 3 * stall
                assert unanswered(sender, stall) is None
                time.sleep(0.02)
