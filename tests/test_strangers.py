# The fixtures ``nodes`` and ``pki`` come from test_auth (pytest finds them imported here).
# ruff: noqa: F401, F811
"""Strangers and resource limits (issue 17): what someone who can reach a member's port, or a
member misbehaving, must not be able to do. Members in this process under gevent, real
sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import time

import gevent
import pytest
import trustme
from cluster import free_port, free_ports, wait_for
from gevent import socket as gsocket
from test_auth import (
    FAST,
    SECRET,
    authenticate,
    logged,
    messages,
    nodes,
    pair,
    pki,
    read_until_closed,
)

import gcollective
from gcollective import Collective
from gcollective._wire import encode_hello, encode_ops


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


# -- 5. links to announced addresses --------------------------------------------------------------


def announce(node, host: str, port: int, node_id: int) -> None:
    """Connect to ``node``, send a HELLO announcing ``host:port``, and hang up."""
    sock = gsocket.create_connection(node.local)
    try:
        sock.sendall(f'["gcollective",4,{node_id},"{host}",{port},0]\n'.encode())
    finally:
        sock.close()


def dialled(node) -> set[str]:
    return set(node.stats()["peers"])


def test_announced_addresses_that_never_answer_are_forgotten_and_bounded(nodes, caplog):
    MAX_ANNOUNCED_LINKS = 256  # gcollective._node.MAX_ANNOUNCED_LINKS (0.4.2 has none)
    configured_port = free_port()  # configured, never up: dialled forever, as always
    # sync_interval 2: a link is forgotten no sooner than 6 s after the member's HELLO, so
    # all of them are there together however slowly this machine makes the connections.
    a = nodes(free_port(), [configured_port], start_timeout=0.5, sync_interval=2.0)
    fakes = [free_port() for _ in range(MAX_ANNOUNCED_LINKS + 40)]
    for index, port in enumerate(fakes):
        announce(a, "127.0.0.1", port, 1000 + index)
    wait_for(lambda: logged(caplog, "links to announced addresses exist already"))
    assert len(dialled(a)) <= MAX_ANNOUNCED_LINKS + 1
    # Own address: refused, never dialled.
    announce(a, "127.0.0.1", a.local[1], 999)
    wait_for(lambda: logged(caplog, "announces this node's own address"))
    wait_for(lambda: dialled(a) == {f"127.0.0.1:{configured_port}"}, timeout=30)
    assert logged(caplog, "forgotten after 5 attempts", level=logging.INFO)
    # The configured peer is still dialled: its attempts go on.
    attempts = a.stats()["peers"][f"127.0.0.1:{configured_port}"]["last_error_at"]
    wait_for(lambda: a.stats()["peers"][f"127.0.0.1:{configured_port}"]["last_error_at"] > attempts)


def test_a_member_only_announced_stays_linked_and_comes_back_after_a_restart(nodes):
    a_port, c_port = free_ports(2)
    a = nodes(a_port)
    c = nodes(c_port, [a_port])  # a does not list c: it learns c from c's HELLO
    c.set("from_c", 1)
    a.set("from_a", 1)
    wait_for(lambda: a.snapshot() == c.snapshot() == {"from_c": 1, "from_a": 1})
    gevent.sleep(2.0)  # many sync intervals: a live announced member is never forgotten
    assert dialled(a) == {f"127.0.0.1:{c_port}"}
    c.stop(timeout=1)
    wait_for(lambda: dialled(a) == set(), timeout=30)  # gone: forgotten
    again = nodes(c_port, [a_port])  # a new incarnation on the same address dials in again
    a.set("later", 2)
    wait_for(lambda: again.get("later") == 2 and again.get("from_a") == 1)
    again.set("from_again", 3)
    wait_for(lambda: a.get("from_again") == 3)
    assert dialled(a) == {f"127.0.0.1:{c_port}"}


# -- 6. identity: an address or an origin claimed twice --------------------------------------------


def impostor(node, secret: str, frames: bytes) -> None:
    """Authenticate to ``node`` with the secret (a member, by the threat model) and send
    ``frames`` (a HELLO first), then wait until the node closes or 1 s passes."""
    sock, last, sealer = authenticate(node, secret)
    try:
        sock.sendall(last + sealer.seal(frames))
        try:
            read_until_closed(sock, timeout=1)
        except gsocket.timeout:
            pass
    finally:
        sock.close()


def test_a_hello_claiming_a_live_members_address_takes_nothing_from_it(nodes, caplog):
    a, b = pair(nodes, {"secret": SECRET}, {"secret": SECRET})
    b_name = f"127.0.0.1:{b.local[1]}"
    b.set("before", 1)
    wait_for(lambda: a.get("before") == 1)
    wait_for(lambda: a.stats()["peers"][b_name]["peer_id"] == f"{b.node_id:x}")
    connects = b.stats()["peers"][f"127.0.0.1:{a.local[1]}"]["connects"]
    claim = encode_hello(0xBAD, "127.0.0.1", b.local[1], 0)  # b's address, another id
    impostor(a, SECRET, claim)  # refused at once (0.4.2 took the link over)
    # The link still belongs to b: its PROGRESS counts, nothing was dropped or swapped.
    assert a.stats()["peers"][b_name]["peer_id"] == f"{b.node_id:x}"
    assert b.stats()["peers"][f"127.0.0.1:{a.local[1]}"]["connects"] == connects
    assert logged(caplog, "claims the address", "which is alive")
    assert a.stats()["refusals"].get("identity") == 1
    a.set("after", 2)
    b.set("from_b", 3)
    wait_for(lambda: a.snapshot() == b.snapshot() == {"before": 1, "after": 2, "from_b": 3})


def test_operations_forged_in_a_members_name_do_not_drop_its_real_writes(nodes, caplog):
    a, b = pair(nodes, {"secret": SECRET}, {"secret": SECRET})
    b.set("real.0", 0)
    wait_for(lambda: a.get("real.0") == 0)
    next_seq = b.stats()["local_ops"] + 1
    hlc = int(time.time() * 1000) << 16
    forged = encode_ops(b.node_id, next_seq, [hlc, hlc + 1], [0, 0], ["forged", "x"], [1, 2])
    impostor(a, SECRET, encode_hello(0xF00, "127.0.0.1", free_port(), 0) + forged)
    wait_for(lambda: a.get("forged") == 1)
    for index in (1, 2, 3):  # the same numbers, then one more: one frame each
        b.set(("real", str(index)), index)
        gevent.sleep(0)
    wait_for(lambda: a.get("real") == {"0": 0, "1": 1, "2": 2, "3": 3})
    assert a.stats()["sequence_clashes"] >= 1
    assert logged(caplog, "two senders claim that origin")


def test_two_members_advertising_one_address_are_reported_and_never_swap(nodes, caplog):
    a_port, c_port, twin_port = free_ports(3)
    a = nodes(a_port)
    c = nodes(c_port, [a_port])
    c.set("from_c", 1)
    wait_for(lambda: a.get("from_c") == 1)
    c_name = f"127.0.0.1:{c_port}"
    wait_for(lambda: a.stats()["peers"][c_name]["peer_id"] == f"{c.node_id:x}")
    # A misconfigured twin announces c's address: refused while c is alive, again and again.
    twin = nodes(twin_port, [a_port], start_timeout=0.5, advertise=c_name)
    a_name = f"127.0.0.1:{a_port}"
    wait_for(lambda: twin.stats()["peers"][a_name]["connects"] >= 3)
    assert a.stats()["peers"][c_name]["peer_id"] == f"{c.node_id:x}"
    assert a.stats()["refusals"]["identity"] >= 2
    assert sum("claims the address" in m for m in messages(caplog)) == 1  # rate-limited
    c.set("still_c", 2)
    wait_for(lambda: a.get("still_c") == 2)
    assert twin.snapshot() == {}


# -- 8. collective.js mode ----------------------------------------------------------------------


def test_collective_js_mode_warns_beyond_loopback_and_closes_silent_strangers(caplog):
    port, other = free_ports(2)
    node = Collective(
        f"0.0.0.0:{port}", [f"127.0.0.1:{other}"], protocol="collective.js", handshake_timeout=0.5
    )
    node.start(timeout=0.5)
    try:
        assert logged(caplog, "in collective.js mode, which has no authentication")
        # A stranger's host (127.0.0.2 is no member's) must speak within the timeout.
        stranger = gsocket.socket()
        stranger.bind(("127.0.0.2", 0))
        stranger.connect(("127.0.0.1", port))
        # A member's host (127.0.0.1) may stay silent: collective.js members do.
        member = gsocket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        try:
            assert read_until_closed(stranger, timeout=5) == b""
            assert time.monotonic() - started < 3
            wait_for(lambda: logged(caplog, "no message within the handshake timeout"))
            member.settimeout(0.5)
            with pytest.raises(gsocket.timeout):
                member.recv(1)  # still open
            member.sendall(b'[2,["k",1,"v",0]]\n')
            wait_for(lambda: node.get("k") == "v")
        finally:
            stranger.close()
            member.close()
        assert node.refused_connections == 1
    finally:
        node.stop(timeout=1)


# -- 9. small ones: the secret in a repr, check_hostname, passphrases ----------------------------


def test_the_gunicorn_settings_never_show_the_secret():
    from gcollective.gunicorn import settings_from_env

    secret = gcollective.generate_secret()
    settings = settings_from_env({"GCOLLECTIVE_SECRET": secret}, 2)
    assert settings.secret == secret
    assert secret not in repr(settings) and secret not in str(settings)


def test_check_hostname_requires_the_certificate_to_name_the_dialled_host(nodes, caplog, tmp_path):
    ca = trustme.CA()
    cafile = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(cafile)

    def member(name: str, host: str) -> dict[str, str]:
        cert = ca.issue_cert(host, common_name=name)
        certfile = str(tmp_path / f"{name}.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(certfile)
        return {"certfile": certfile, "cafile": cafile}

    a_port, b_port, c_port = free_ports(3)
    b = nodes(b_port, **member("b", "127.0.0.1"))  # named for the address it is dialled at
    # The CA signed c's certificate, for another host: c is not dialled, nor heard when it
    # dials and announces 127.0.0.1.
    c = nodes(c_port, [a_port], start_timeout=0.5, **member("c", "elsewhere.example"))
    a = nodes(
        a_port, [b_port, c_port], start_timeout=1, check_hostname=True, **member("a", "127.0.0.1")
    )
    a.set("checked", True)
    wait_for(lambda: b.get("checked") is True)
    wait_for(lambda: logged(caplog, f"127.0.0.1:{c_port}", "IP address mismatch"))
    c.set("from_c", 1)
    b.set("from_b", 1)
    wait_for(lambda: a.get("from_b") == 1)
    wait_for(lambda: logged(caplog, "does not name the host 127.0.0.1 its HELLO announces"))
    assert c.get("checked") is None and a.get("from_c") is None
    assert a.check_hostname is True
    with pytest.raises(ValueError, match="check_hostname needs TLS"):
        Collective(f"127.0.0.1:{free_port()}", check_hostname=True)
    with pytest.raises(ValueError, match="check_hostname"):
        Collective(f"127.0.0.1:{free_port()}", protocol="collective.js", check_hostname=True)


@pytest.mark.parametrize(
    "secret, warning",
    [
        ("correct horse battery staple", "looks like a passphrase"),
        ("mycollectivepassword2024!", "looks like a password"),  # 25 printable characters
        ("hunter2", "shorter than 16 bytes"),
        ("a" * 40, "very few distinct characters"),
    ],
)
def test_a_secret_that_looks_typed_is_warned_about(nodes, caplog, secret, warning):
    nodes(free_port(), secret=secret)
    assert logged(caplog, warning, "guess it offline")
    assert secret not in "\n".join(messages(caplog, logging.DEBUG))


def test_generated_secrets_are_not_warned_about(nodes, caplog):
    for secret in (gcollective.generate_secret(), os.urandom(16), secrets.token_hex(16)):
        nodes(free_port(), secret=secret)
    assert not logged(caplog, "guess it offline")


def test_certificate_name_matching():
    from gcollective._tls import _dns_name_matches

    assert _dns_name_matches("Member-1.Example.org.", "member-1.example.org")
    assert _dns_name_matches("*.example.org", "member-1.example.org")
    assert not _dns_name_matches("*.example.org", "a.b.example.org")
    assert not _dns_name_matches("*.example.org", "example.org")
    assert not _dns_name_matches("member-1.example.org", "member-2.example.org")
