# The fixtures ``nodes`` and ``pki`` come from test_auth (pytest finds them imported here).
# ruff: noqa: F401, F811
"""Strangers and resource limits (issue 17): what someone who can reach a member's port, or a
member misbehaving, must not be able to do. Members in this process under gevent, real
sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import ssl
import time

import gevent
import pytest
from cluster import free_port, free_ports, wait_for
from gevent import socket as gsocket
from test_auth import FAST, logged, messages, nodes, pki, read_until_closed

from gcollective import Collective


@pytest.fixture(autouse=True)
def capture_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="gcollective")


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (made in memory, never sent anywhere)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# -- 3. one deadline for TLS, authentication and HELLO ------------------------------------------


def test_a_client_dripping_its_client_hello_is_closed_at_the_handshake_deadline(nodes, pki):
    a = nodes(free_port(), handshake_timeout=1.0, **pki["a"])
    hello = client_hello()
    socks = [gsocket.create_connection(a.local) for _ in range(3)]
    started = time.monotonic()
    closed: dict[int, float] = {}

    def drip(index: int, sock) -> None:
        # One byte every 0.4 s: each read of the handshake gets its byte in time, so only a
        # deadline over the whole handshake ends it.
        try:
            for byte in hello:
                sock.sendall(bytes([byte]))
                gevent.sleep(0.4)
        except OSError:
            pass
        closed[index] = time.monotonic() - started

    drippers = [gevent.spawn(drip, i, s) for i, s in enumerate(socks)]
    try:
        wait_for(lambda: len(closed) == len(socks), timeout=15)
    finally:
        gevent.killall(drippers)
        for sock in socks:
            sock.close()
    assert max(closed.values()) < 4.0, closed
    assert a.refused_connections == len(socks)


# -- 7. refusals are logged at most once per reason, and all counted ------------------------------


def closed_by(node, payload: bytes) -> None:
    """Connect, send ``payload`` (may be empty) and wait until ``node`` closes on us."""
    sock = gsocket.create_connection(node.local)
    try:
        if payload:
            sock.sendall(payload)
        read_until_closed(sock, timeout=10)
    finally:
        sock.close()


def test_refusals_are_rate_limited_per_reason_not_per_text(nodes, caplog):
    a = nodes(free_port(), handshake_timeout=0.5)
    strangers = 200
    for version in range(100, 100 + strangers):  # each refusal's text differs
        hello = f'["gcollective",{version},12345,"127.0.0.1",1,0]\n'.encode()
        closed_by(a, hello)
    silent = [gevent.spawn(closed_by, a, b"") for _ in range(20)]
    gevent.joinall(silent, raise_error=True)
    warnings = messages(caplog)
    assert sum("protocol version" in m for m in warnings) == 1, warnings
    assert sum("within the handshake timeout" in m for m in warnings) == 1, warnings
    stats = a.stats()
    assert stats["refused_connections"] == strangers + 20
    assert stats["refusals"] == {"hello": strangers, "handshake-timeout": 20}
    assert logged(caplog, "protocol version 299", level=logging.DEBUG)  # all still at debug


# -- 4. a stranger's first frame is small; junk is refused before it is decoded -------------------


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def send_and_wait_closed(port: int, payload: bytes) -> None:
    """Send ``payload`` (the node may close on us before the end) and wait until it closes."""
    sock = gsocket.create_connection(("127.0.0.1", port))
    try:
        try:
            sock.sendall(payload)
        except OSError:
            return
        read_until_closed(sock, timeout=30)
    finally:
        sock.close()


def test_memory_before_and_after_hello_is_bounded(cluster, capsys):
    (member,) = cluster(1)
    pid = member.proc.pid
    junk = b"[" + b"[]," * (2 * 1024 * 1024) + b"[]]\n"  # 6 MB: about 28x that once decoded
    base = peak_rss_mb(pid)
    send_and_wait_closed(member.port, junk)  # as the first frame, before any HELLO
    before_hello = peak_rss_mb(pid) - base
    hello = f'["gcollective",4,{0x1234},"127.0.0.1",{free_port()},0]\n'.encode()
    send_and_wait_closed(member.port, hello + junk)  # after a HELLO: not a known frame kind
    after_hello = peak_rss_mb(pid) - base
    with capsys.disabled():
        print(f"\npeak RSS growth: {before_hello:.1f} MB before HELLO, {after_hello:.1f} MB in all")
    assert before_hello < 4, before_hello  # refused after 4 KiB
    assert after_hello < 3 * len(junk) / 1e6, after_hello  # buffered, never decoded
    stats = member.call("stats")
    assert stats["refused_connections"] == 2
    assert member.summary()["leaves"] == 0
