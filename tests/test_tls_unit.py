"""Mutual TLS helpers over real gevent sockets on 127.0.0.1, with certificates from trustme."""

from __future__ import annotations

import subprocess
import sys

import gevent
import pytest
import trustme
from gevent import socket as gsocket
from gevent import ssl as gssl

from gcollective._auth import AcceptorHandshake, AuthenticationError, DialerHandshake
from gcollective._tls import (
    accept_tls,
    client_context,
    connect_tls,
    describe_peer,
    explain_tls_error,
    server_context,
)
from gcollective._wire import FrameDecoder, encode_hello, encode_ops, parse_hello
from gcollective._wire_ops import parse_ops

SECRET = "tls tests secret, long enough to be a real one"


class Files:
    """PEM files for one certificate: separate cert and key, plus both in one file."""

    def __init__(self, directory, name, ca, *identities):
        cert = ca.issue_cert(*identities, common_name=name)
        self.certfile = str(directory / f"{name}.crt")
        self.keyfile = str(directory / f"{name}.key")
        self.combined = str(directory / f"{name}.pem")
        cert.cert_chain_pems[0].write_to_path(self.certfile)
        cert.private_key_pem.write_to_path(self.keyfile)
        cert.private_key_and_cert_chain_pem.write_to_path(self.combined)


@pytest.fixture
def pki(tmp_path):
    """The collective's CA with two member certificates, and an unrelated CA's member."""
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))

    class Pki:
        cafile = str(tmp_path / "ca.pem")
        other_cafile = str(tmp_path / "other-ca.pem")
        a = Files(tmp_path, "member-a", ca, "127.0.0.1", "localhost")
        b = Files(tmp_path, "member-b", ca, "member-b.example")
        stranger = Files(tmp_path, "stranger", other_ca, "127.0.0.1")

    return Pki


def connect_pair(server_ctx, client_ctx, server_hostname="127.0.0.1"):
    """TLS over a real gevent connection: (server result, client result), where a result is
    the TLS socket or the exception the helper raised."""
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        try:
            return accept_tls(conn, server_ctx, timeout=5)
        except Exception as exc:
            return exc

    server = gevent.spawn(serve)
    try:
        with gevent.Timeout(10):
            sock = gsocket.create_connection(listener.getsockname(), timeout=5)
            try:
                client = connect_tls(sock, client_ctx, server_hostname, timeout=5)
            except Exception as exc:
                client = exc
            return server.get(), client
    finally:
        server.kill()
        listener.close()


def test_mutual_tls_round_trip_with_the_secret_handshake_and_sealed_frames(pki):
    server_ctx = server_context(certfile=pki.a.certfile, keyfile=pki.a.keyfile, cafile=pki.cafile)
    client_ctx = client_context(certfile=pki.b.combined, cafile=pki.cafile)
    assert isinstance(server_ctx, gssl.SSLContext) and isinstance(client_ctx, gssl.SSLContext)
    server, client = connect_pair(server_ctx, client_ctx)
    try:
        assert "commonName=member-b" in describe_peer(server)  # the client was verified
        assert "commonName=member-a" in describe_peer(client)
        # The node's sequence on top of TLS: handshake, then sealed batches of frames.
        dialer, acceptor = DialerHandshake(SECRET, "b"), AcceptorHandshake(SECRET, "a")
        with gevent.Timeout(10):
            client.sendall(dialer.start())
            step = acceptor.receive(server.recv(4096))
            server.sendall(step.send)
            step = dialer.receive(client.recv(4096))
            assert step.done
            sealer = dialer.sealer()
            frames = encode_hello(7, "127.0.0.1", 9000) + encode_ops(
                5, 1, [1 << 16], [0], ["k"], [1]
            )
            client.sendall(step.send + sealer.seal(frames))
            client.sendall(sealer.seal(encode_ops(5, 2, [2 << 16], [0], ["k"], [2])))
            client.close()
            while not acceptor.done:
                acceptor.receive(server.recv(4096))
            opener = acceptor.opener()
            decoder = FrameDecoder(1 << 20)
            messages = decoder.feed(b"".join(opener.feed(acceptor.leftover)))
            while True:
                data = server.recv(65536)
                if not data:
                    break
                messages += decoder.feed(b"".join(opener.feed(data)))
            opener.close()
        assert parse_hello(messages[0]).node_id == 7
        assert [parse_ops(m)[5] for m in messages[1:]] == [[1], [2]]
        assert acceptor.peer_info == "b"
    finally:
        server.close()


def test_client_without_a_certificate_is_refused(pki):
    server_ctx = server_context(certfile=pki.a.combined, cafile=pki.cafile)
    no_cert = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cafile=pki.cafile)
    server, client = connect_pair(server_ctx, no_cert)
    assert isinstance(server, AuthenticationError) and server.reason == "tls"
    assert "certificate" in str(server)
    if not isinstance(client, Exception):  # TLS 1.3: the client hears of it on its next read
        with pytest.raises(OSError) as caught:  # the alert, or a reset if it was lost
            client.recv(1)
        if isinstance(caught.value, gssl.SSLError):
            assert "certificate required" in explain_tls_error(caught.value)
        client.close()


def test_client_certificate_from_another_ca_is_refused(pki):
    server_ctx = server_context(certfile=pki.a.combined, cafile=pki.cafile)
    client_ctx = client_context(certfile=pki.stranger.combined, cafile=pki.cafile)
    server, client = connect_pair(server_ctx, client_ctx)
    assert isinstance(server, AuthenticationError)
    assert "rejected: unable to get local issuer certificate (not signed by a CA" in str(server)
    if not isinstance(client, Exception):
        client.close()


def test_server_certificate_from_another_ca_is_refused_by_the_dialer(pki):
    server_ctx = server_context(certfile=pki.stranger.combined, cafile=pki.cafile)
    client_ctx = client_context(certfile=pki.b.combined, cafile=pki.cafile)
    server, client = connect_pair(server_ctx, client_ctx)
    assert isinstance(client, AuthenticationError) and client.reason == "tls"
    assert "certificate verify failed" in str(client) or "rejected" in str(client)
    assert isinstance(server, AuthenticationError)  # and the acceptor logs the refusal too


def test_check_hostname_requires_the_dialed_name(pki):
    client_ctx = client_context(certfile=pki.b.combined, cafile=pki.cafile, check_hostname=True)
    good = server_context(certfile=pki.a.combined, cafile=pki.cafile)
    server, client = connect_pair(good, client_ctx, "127.0.0.1")
    assert not isinstance(client, Exception), client
    client.close()
    server.close()
    wrong_name = server_context(certfile=pki.b.combined, cafile=pki.cafile)  # member-b.example
    server, client = connect_pair(wrong_name, client_ctx, "127.0.0.1")
    assert isinstance(client, AuthenticationError)
    assert "mismatch" in str(client) or "match" in str(client)


def test_unusable_files_give_errors_that_name_them(pki, tmp_path):
    with pytest.raises(ValueError, match=r"missing\.pem"):
        server_context(certfile=str(tmp_path / "missing.pem"), cafile=pki.cafile)
    with pytest.raises(ValueError, match="cafile"):
        client_context(certfile=pki.a.combined, cafile=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="do not match"):
        server_context(certfile=pki.a.certfile, keyfile=pki.b.keyfile, cafile=pki.cafile)
    with pytest.raises(ValueError, match="CA certificates"):
        client_context(certfile=pki.a.combined, cafile=pki.a.keyfile)
    with pytest.raises(TypeError):
        client_context(certfile=None, cafile=pki.cafile)


def test_importing_gcollective_does_not_load_the_tls_module():
    code = "import sys, gcollective; assert 'gcollective._tls' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
