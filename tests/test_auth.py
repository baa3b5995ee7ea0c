"""Authentication and TLS wired into real nodes: members in this process under gevent, real
sockets on 127.0.0.1.

Every refusal must leave both replicas unchanged and say why in the log, on the side that
refuses and, where the protocol lets it know, on the side that is refused. No test may ever
find a secret in the log.
"""

from __future__ import annotations

import json
import logging
import time

import gevent
import pytest
import trustme
from cluster import free_port, free_ports, started_members, wait_for
from gevent import socket as gsocket

import gcollective
from gcollective import AuthenticationError, Collective, ProtocolError
from gcollective._auth import DialerHandshake
from gcollective._records import HEADER_SIZE
from gcollective._wire import encode_hello, encode_ops

# Generated ones (gcollective.generate_secret()): a typed passphrase is warned about at start.
SECRET = "CpuJr2CbsE6zwNo8Frogj1S-it96hRNc8Co4FMCQtyQ"
OTHER_SECRET = "gMhV-cYJL9j2nn9R5ferahseHI_7aNE-GUtHspxbdbo"
WEAK_SECRET = "hunter2"
SECRETS = (SECRET, OTHER_SECRET, WEAK_SECRET)

FAST = {"sync_interval": 0.05, "backoff_max": 0.2, "handshake_timeout": 1.0}


def messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def logged(caplog, *fragments, level=logging.WARNING):
    """True once some record at ``level`` or above contains every fragment."""
    return any(all(f in m for f in fragments) for m in messages(caplog, level))


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog):
    """Capture everything gcollective logs, and check afterwards that no secret leaked."""
    caplog.set_level(logging.DEBUG, logger="gcollective")
    yield
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def nodes():
    """``make(port, peer_ports, **options)``: a started member; all are stopped afterwards."""

    def make(port, peer_ports=(), host="127.0.0.1", **options):
        return Collective(
            f"{host}:{port}", [f"127.0.0.1:{p}" for p in peer_ports], **{**FAST, **options}
        )

    yield from started_members(make, stop=lambda node: node.stop(timeout=1))


def refused_again(*nodes: Collective, times: int = 1) -> None:
    """Wait until each node refused ``times`` more connections than it has so far: positive
    evidence that the other side kept trying (and got nothing through) meanwhile."""
    before = [node.stats()["refused_connections"] for node in nodes]
    wait_for(
        lambda: all(
            node.stats()["refused_connections"] >= count + times
            for node, count in zip(nodes, before, strict=True)
        ),
        what=f"{times} more refusals on each node",
    )


def pair(make, a_options, b_options):
    ports = free_ports(2)
    return make(ports[0], ports, **a_options), make(ports[1], ports, **b_options)


def read_until_closed(sock, timeout=5.0) -> bytes:
    """Everything the node sends until it closes the connection."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def fake_member(node_id: int, seq_start: int = 1):
    """A HELLO and OP frames from an invented member whose address nobody listens on."""
    port = free_port()

    def op(path, value, seq):
        hlc = int(time.time() * 1000) << 16
        return encode_ops(node_id, seq, [hlc], [0], [path], [value])

    return encode_hello(node_id, "127.0.0.1", port, 0), op


def authenticate(node: Collective, secret: str):
    """Drive the dialer's handshake from the test against ``node``: returns the connected
    socket, the last handshake message (to send with the first record) and the sealer."""
    sock = gsocket.create_connection(node.local, timeout=5)
    handshake = DialerHandshake(secret, "test")
    sock.sendall(handshake.start())
    while True:
        step = handshake.receive(sock.recv(4096))
        if step.done:
            return sock, step.send, handshake.sealer()


# -- the secret -------------------------------------------------------------------------------


def test_right_secret_replicates_both_ways(nodes, caplog):
    a, b = pair(nodes, {"secret": SECRET}, {"secret": SECRET.encode()})  # str and bytes agree
    a.set("users.1", {"name": "ann"})
    b.incr("hits", 3)
    wait_for(lambda: a.snapshot() == b.snapshot() == {"users": {"1": {"name": "ann"}}, "hits": 3})
    for node in (a, b):
        (peer,) = node.stats()["peers"].values()
        assert peer["state"] == "connected"
        assert peer["authenticated"] is True and peer["tls"] is False
        assert node.stats()["refused_connections"] == 0
    assert logged(caplog, "authenticated by the secret", level=logging.INFO)
    assert messages(caplog) == []  # a strong secret on loopback: nothing to warn about


def test_wrong_secret_is_refused_both_ways_with_one_line_each(nodes, caplog):
    a, b = pair(nodes, {"secret": SECRET}, {"secret": OTHER_SECRET})
    a.set("from_a", 1)
    b.set("from_b", 1)
    # Each dialer finds the acceptor's proof wrong; each acceptor hears why it was refused.
    wait_for(lambda: sum("has a different secret" in m for m in messages(caplog)) == 2)
    wait_for(lambda: sum("the secrets differ" in m for m in messages(caplog)) == 2)
    refused_again(a, b, times=3)  # several more retries: still refused, and not logged again
    assert sum("has a different secret" in m for m in messages(caplog)) == 2
    assert sum("the secrets differ" in m for m in messages(caplog)) == 2
    assert a.snapshot() == {"from_a": 1} and b.snapshot() == {"from_b": 1}
    for node in (a, b):
        (peer,) = node.stats()["peers"].values()
        assert peer["state"] != "connected" and peer["authenticated"] is False
        assert "different secret" in peer["last_error"]
        assert node.stats()["refused_connections"] >= 3


def test_mixed_secret_and_no_secret_refuse_each_other(nodes, caplog):
    a, b = pair(nodes, {"secret": SECRET}, {})
    a.set("from_a", 1)
    b.set("from_b", 1)
    a_name, b_name = f"peer {a.local[0]}:{a.local[1]}", f"peer {b.local[0]}:{b.local[1]}"
    # b dials a with a plain HELLO: a refuses it and tells it why.
    wait_for(lambda: logged(caplog, "refused", "plain HELLO", "this node requires one"))
    wait_for(lambda: logged(caplog, a_name, "requires a secret and this node has none"))
    # a dials b with AUTH1: b refuses it and tells it why.
    wait_for(lambda: logged(caplog, "refused", "wants to authenticate", "this node has none"))
    wait_for(lambda: logged(caplog, b_name, "it has no secret configured and this node has one"))
    refused_again(a, b)  # each retried since, and was refused again
    assert a.snapshot() == {"from_a": 1} and b.snapshot() == {"from_b": 1}
    assert not a.stats()["peers"][b_name[5:]]["authenticated"]


def test_a_plain_hello_and_op_to_a_secret_node_is_refused(nodes, caplog):
    a = nodes(free_port(), secret=SECRET)
    a.set("kept", 1)
    hello, op = fake_member(0xABCDEF)
    sock = gsocket.create_connection(a.local)
    sock.sendall(hello + op("evil", "written", 1))
    reply = read_until_closed(sock)
    sock.close()
    assert json.loads(reply) == ["auth", 0, "secret-required"]  # why, for the peer's log
    assert logged(caplog, "skipped authentication")
    assert a.snapshot() == {"kept": 1} and a.stats()["peers"] == {}  # no link to it either


def test_a_replayed_handshake_is_refused(nodes, caplog):
    a = nodes(free_port(), secret=SECRET)
    recorder = Recorder(a.local)
    try:
        b = nodes(free_port(), [recorder.port], secret=SECRET)
        b.set("captured", 1)
        wait_for(lambda: a.get("captured") == 1)
        b.stop(timeout=1)
        wait_for(lambda: recorder.sent and recorder.done[0])
        captured = bytes(recorder.sent[0])  # AUTH1, then AUTH3 and the sealed records
    finally:
        recorder.close()
    auth1, rest = captured.split(b"\n", 1)
    assert json.loads(auth1)[:2] == ["auth", 1] and b"captured" in rest
    fresh = nodes(free_port(), secret=SECRET)
    for target in (fresh, a):  # a new member, and the one the handshake was made with
        before = target.snapshot()
        sock = gsocket.create_connection(target.local)
        sock.sendall(auth1 + b"\n")
        sock.settimeout(5)
        assert json.loads(sock.recv(4096))[:2] == ["auth", 2]  # with a fresh nonce
        sock.sendall(rest)
        reply = read_until_closed(sock)
        sock.close()
        assert json.loads(reply) == ["auth", 0, "wrong-secret"]
        assert target.snapshot() == before
    assert fresh.snapshot() == {}
    assert sum("replayed or altered a handshake" in m for m in messages(caplog)) == 2


@pytest.mark.parametrize("where", ["payload", "counter", "tag"])
def test_a_tampered_record_after_a_good_handshake_is_rejected(nodes, caplog, where):
    a = nodes(free_port(), secret=SECRET)
    hello, op = fake_member(0x5EC12E7)
    # Control: the same steps, untampered, are accepted (the test speaks the protocol).
    sock, auth3, sealer = authenticate(a, SECRET)
    sock.sendall(auth3 + sealer.seal(hello + op("genuine", 1, 1)))
    wait_for(lambda: a.get("genuine") == 1)
    sock.close()
    # Now a record with one bit flipped after a good handshake and HELLO.
    sock, auth3, sealer = authenticate(a, SECRET)
    sock.sendall(auth3 + sealer.seal(hello))
    record = bytearray(sealer.seal(op("tampered", "evil", 2)))
    index = {
        "payload": record.index(b"evil"),
        "counter": HEADER_SIZE - 1,
        "tag": len(record) - 1,
    }[where]
    record[index] ^= 1
    sock.sendall(bytes(record))
    read_until_closed(sock)  # the node hangs up
    sock.close()
    reason = "arrived where 1 was due" if where == "counter" else "fails authentication"
    wait_for(lambda: logged(caplog, "refused", "sealed record", reason))
    assert a.get("tampered") is None
    assert a.snapshot() == {"genuine": 1}


def test_limits_apply_before_authentication(nodes, caplog):
    a = nodes(free_port(), secret=SECRET, handshake_timeout=0.5)
    started = time.monotonic()
    silent = gsocket.create_connection(a.local)
    silent.sendall(b'["auth",1,')  # half an AUTH1, then nothing
    read_until_closed(silent)
    silent.close()
    assert time.monotonic() - started < 3
    assert logged(caplog, "no authentication within the handshake timeout")
    huge = gsocket.create_connection(a.local)
    try:
        huge.sendall(b"[" * 10000)
    except OSError:
        pass
    read_until_closed(huge)
    huge.close()
    wait_for(lambda: logged(caplog, "longer than 4096 bytes"))
    assert a.snapshot() == {}


def test_gcollective_secret_from_the_environment(nodes, monkeypatch):
    a_port, b_port = free_ports(2)
    b = nodes(b_port, [a_port], secret=SECRET)
    monkeypatch.setenv("GCOLLECTIVE_SECRET", SECRET)
    a = gcollective.start(f"127.0.0.1:{a_port}", [f"127.0.0.1:{b_port}"], timeout=3, **FAST)
    try:
        gcollective.set("from_env_node", 1)
        b.set("from_b", 2)
        wait_for(lambda: a.snapshot() == b.snapshot() == {"from_env_node": 1, "from_b": 2})
        assert all(p["authenticated"] for p in a.stats()["peers"].values())
    finally:
        gcollective.stop(timeout=1)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The collective's CA and member certificates, and a member of an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    cafile = str(directory / "ca.pem")
    ca.cert_pem.write_to_path(cafile)

    def member(name, issuer, combined=False):
        cert = issuer.issue_cert("127.0.0.1", common_name=name)
        certfile = str(directory / f"{name}.crt")
        if combined:  # key and certificate in one file: no keyfile
            cert.private_key_and_cert_chain_pem.write_to_path(certfile)
            return {"certfile": certfile, "cafile": cafile}
        keyfile = str(directory / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(certfile)
        cert.private_key_pem.write_to_path(keyfile)
        return {"certfile": certfile, "keyfile": keyfile, "cafile": cafile}

    return {
        "a": member("member-a", ca),
        "b": member("member-b", ca, combined=True),
        "c": member("member-c", ca),
        "stranger": member("stranger", other_ca),  # trusts our CA; its certificate is not ours
    }


def test_tls_round_trip_and_a_certificate_from_another_ca_is_refused(nodes, caplog, pki):
    a, b = pair(nodes, pki["a"], pki["b"])
    a.set("over", "tls")
    b.incr("hits")
    wait_for(lambda: a.snapshot() == b.snapshot() == {"over": "tls", "hits": 1})
    for node in (a, b):
        (peer,) = node.stats()["peers"].values()
        assert peer["tls"] is True and peer["authenticated"] is False
    assert logged(caplog, "TLS, ", "commonName=member-b", level=logging.INFO)
    before = a.snapshot()
    stranger = nodes(free_port(), [a.local[1]], start_timeout=1, **pki["stranger"])
    stranger.set("intruder", True)
    wait_for(lambda: logged(caplog, "refused", "TLS handshake failed", "not signed by a CA"))
    # TLS 1.3 tells the dialer only on its next read: it learns from the alert.
    wait_for(lambda: logged(caplog, "peer rejected our certificate"))
    refused_again(a)  # the stranger retried since, and was refused again
    assert a.snapshot() == before == b.snapshot()
    assert f"127.0.0.1:{stranger.local[1]}" not in a.stats()["peers"]


def test_tls_and_plain_nodes_refuse_each_other(nodes, caplog, pki):
    a, b = pair(nodes, pki["a"], {})
    a.set("from_a", 1)
    b.set("from_b", 1)
    wait_for(lambda: logged(caplog, "refused", "did not open with TLS"))
    wait_for(lambda: logged(caplog, "it requires TLS and this node has none"))
    wait_for(lambda: logged(caplog, "refused", "peer opened with a TLS handshake"))
    refused_again(a, b)  # each retried since, and was refused again
    assert a.snapshot() == {"from_a": 1} and b.snapshot() == {"from_b": 1}


def test_tls_with_a_secret_needs_both(nodes, caplog, pki):
    a_port, b_port, c_port = free_ports(3)
    a = nodes(a_port, [b_port], secret=SECRET, **pki["a"])
    b = nodes(b_port, [a_port], secret=SECRET, **pki["b"])
    a.set("both", True)
    wait_for(lambda: b.get("both") is True)
    b.set("back", 1)
    wait_for(lambda: a.get("back") == 1)
    for node in (a, b):
        (peer,) = node.stats()["peers"].values()
        assert peer["tls"] is True and peer["authenticated"] is True
    # A valid certificate with the wrong secret is not enough.
    c = nodes(c_port, [a_port], start_timeout=1, secret=OTHER_SECRET, **pki["c"])
    c.set("intruder", True)
    wait_for(lambda: logged(caplog, "has a different secret"))
    refused_again(a)  # c retried since, and was refused again
    assert a.snapshot() == b.snapshot() == {"both": True, "back": 1}
    assert c.snapshot() == {"intruder": True}


# -- configuration ------------------------------------------------------------------------------


def test_options_are_checked(tmp_path, pki):
    local = f"127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="missing: cafile"):
        Collective(local, certfile=pki["a"]["certfile"])
    with pytest.raises(ValueError, match="missing: certfile, cafile"):
        Collective(local, keyfile=pki["a"]["keyfile"])
    with pytest.raises(TypeError, match="secret must be str or bytes"):
        Collective(local, secret=12345)
    with pytest.raises(ValueError, match="must not be empty"):
        Collective(local, secret="")
    with pytest.raises(ValueError, match=r"collective\.js' has no authentication"):
        Collective(local, protocol="collective.js", secret=SECRET)
    # Files are only read at start(), which names the one that is missing; nothing listens.
    node = Collective(local, **{**pki["a"], "cafile": str(tmp_path / "missing.pem")})
    with pytest.raises(ValueError, match=r"missing\.pem"):
        node.start(timeout=1)
    assert not node.running
    assert issubclass(AuthenticationError, ProtocolError)
    assert len(gcollective.generate_secret()) >= 40


def test_warnings_at_start(nodes, caplog):
    nodes(free_port(), secret=WEAK_SECRET)
    assert logged(caplog, "secret is shorter than 16 bytes")
    nodes(free_port())  # loopback without a secret: fine
    assert not logged(caplog, "without a secret")
    nodes(free_port(), host="0.0.0.0", secret=SECRET)  # all interfaces, with a secret: fine
    assert not logged(caplog, "without a secret")
    nodes(free_port(), host="0.0.0.0")
    assert sum("without a secret or TLS" in m for m in messages(caplog)) == 1


# -- a recording relay ----------------------------------------------------------------------------


class Recorder:
    """A TCP relay to ``target`` that keeps every byte each client sent (an eavesdropper)."""

    def __init__(self, target):
        self.target = target
        self.listener = gsocket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sent: list[bytearray] = []
        self.done: list[bool] = []
        self.greenlets = [gevent.spawn(self._accept)]
        self.sockets = [self.listener]

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            self.greenlets.append(gevent.spawn(self._relay, client))

    def _relay(self, client):
        index = len(self.sent)
        self.sent.append(bytearray())
        self.done.append(False)
        upstream = gsocket.create_connection(self.target)
        self.sockets += [client, upstream]
        self.greenlets.append(gevent.spawn(self._pump, upstream, client, None))
        self._pump(client, upstream, self.sent[index])
        self.done[index] = True

    @staticmethod
    def _pump(source, sink, record):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record is not None:
                    record += data
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(gsocket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        gevent.killall(self.greenlets, timeout=1)
        for sock in self.sockets:
            sock.close()
