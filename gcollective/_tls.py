"""Mutual TLS for gcollective connections, through gevent's cooperative ssl.

Imported only when TLS options are given: ``import gcollective`` does not load this module.

Both ends present a certificate and verify the other's against ``cafile``: the accepting side
requires a client certificate, the dialing side checks the acceptor's. Every certificate the
CA signs is a member, so ``cafile`` should hold a CA dedicated to the collective (not a public
or company-wide one). Host names are not checked by default, because members are commonly
addressed by IP and membership is what the CA vouches for; ``check_hostname=True`` makes a
dialer also require that the acceptor's certificate names the address it dialed (and the node
makes an acceptor require that the dialer's certificate names the host its HELLO announces,
with ``names_host``).

With TLS 1.3 a client learns that the server rejected its certificate only when it next
reads: ``connect_tls`` returns, and the refusal surfaces as an ``ssl.SSLError`` (an
``OSError``) on the first ``recv`` (with a secret, the read of AUTH2; ``explain_tls_error``
words it), or as a reset on a later send. The acceptor's ``accept_tls`` always reports it.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Union, cast

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl

from ._auth import AuthenticationError

__all__ = [
    "server_context",
    "client_context",
    "accept_tls",
    "connect_tls",
    "describe_peer",
    "explain_tls_error",
    "names_host",
]

SSLError = gssl.SSLError

#: A file option: a path as text or an ``os.PathLike`` (checked at run time by ``_check_file``).
Path = Union[str, os.PathLike[str], os.PathLike[bytes]]

#: ``(kind, value)`` pairs, as ``getpeercert()`` gives a certificate's names.
Names = tuple[tuple[str, str], ...]
#: What ``getpeercert()`` returns for a verified peer: typeshed types each value as the union of
#: every key's shape (text, ``Names`` or a tuple of ``Names``), so the readers below cast.
Certificate = dict[str, Union[str, Names, tuple[Names, ...]]]


def _check_file(option: str, path: object) -> str | bytes:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{option} must be a path, not {type(path).__name__}")
    checked = os.fspath(path)
    if not os.path.isfile(checked):
        raise ValueError(f"{option} {checked!r} does not exist or is not a file")
    return checked


def _configure(
    context: gssl.SSLContext, certfile: Path, keyfile: Path | None, cafile: Path
) -> None:
    certificate = _check_file("certfile", certfile)
    key = None if keyfile is None else _check_file("keyfile", keyfile)
    authorities = _check_file("cafile", cafile)
    try:
        context.load_cert_chain(certificate, key)
    except (SSLError, OSError) as exc:
        # The ssl module's own message ("[SSL] PEM lib") names neither file nor cause.
        raise ValueError(
            f"cannot load the certificate {certificate!r} with the key "
            f"{key or certificate!r} (not PEM, or they do not match): {exc}"
        ) from None
    try:
        context.load_verify_locations(cafile=authorities)
    except (SSLError, OSError) as exc:
        raise ValueError(f"cannot load CA certificates from {authorities!r}: {exc}") from None
    context.verify_mode = gssl.CERT_REQUIRED
    context.minimum_version = gssl.TLSVersion.TLSv1_2


def server_context(*, certfile: Path, cafile: Path, keyfile: Path | None = None) -> gssl.SSLContext:
    """An ``ssl.SSLContext`` (gevent's) for accepted connections: presents ``certfile`` (with
    ``keyfile``, or the key inside ``certfile``) and requires a client certificate signed by
    a CA in ``cafile``. Raises ``ValueError`` naming the file that is missing or unusable."""
    context = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    _configure(context, certfile, keyfile, cafile)
    return context


def client_context(
    *, certfile: Path, cafile: Path, keyfile: Path | None = None, check_hostname: bool = False
) -> gssl.SSLContext:
    """An ``ssl.SSLContext`` (gevent's) for dialed connections: presents ``certfile`` and
    requires the acceptor's certificate to be signed by a CA in ``cafile`` (and, with
    ``check_hostname``, to name the dialed host)."""
    context = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    _configure(context, certfile, keyfile, cafile)
    context.check_hostname = bool(check_hostname)
    return context


def explain_tls_error(exc: BaseException) -> str:
    """A log-friendly reason for an ``ssl.SSLError``: which side rejected what. Also useful
    for errors a dialer meets on its first read (see the module docstring on TLS 1.3)."""
    verify = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None)
    if verify:
        hint = " (not signed by a CA in cafile)" if "issuer" in verify else ""
        return f"peer certificate rejected: {verify}{hint}"
    if reason:
        text = str(reason).lower().replace("_", " ")
        if "alert" in text:
            return f"peer rejected our certificate or TLS settings ({text})"
        return text
    return str(exc) or type(exc).__name__


def _handshake(tls: gssl.SSLSocket, timeout: float) -> gssl.SSLSocket:
    # One deadline for the whole handshake: a socket timeout bounds each read only, so a
    # peer dripping a byte now and then would keep the handshake (and a connection slot)
    # forever.
    deadline = gevent.Timeout(timeout, gsocket.timeout("TLS handshake timed out"))
    deadline.start()
    try:
        tls.do_handshake()
    except SSLError as exc:
        tls.close()
        raise AuthenticationError(
            f"TLS handshake failed: {explain_tls_error(exc)}", "tls"
        ) from None
    except BaseException:
        tls.close()
        raise
    finally:
        deadline.close()
    return tls


def accept_tls(sock: gsocket.socket, context: gssl.SSLContext, timeout: float) -> gssl.SSLSocket:
    """Run the server side of the TLS handshake on an accepted gevent socket, within
    ``timeout`` seconds in all; returns the TLS socket (use it instead of ``sock`` from then
    on).

    A peer without a certificate, or with one the CA did not sign, raises
    ``AuthenticationError`` (reason ``tls``); a timeout raises ``socket.timeout``. Either way
    the connection is closed.
    """
    sock.settimeout(timeout)
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return _handshake(tls, timeout)


def connect_tls(
    sock: gsocket.socket, context: gssl.SSLContext, server_hostname: str, timeout: float
) -> gssl.SSLSocket:
    """Run the client side of the TLS handshake on a dialed gevent socket, within
    ``timeout`` seconds in all; returns the TLS socket. ``server_hostname`` is the dialed
    host (sent as SNI when it is a name, and checked if the context has ``check_hostname``).

    An acceptor whose certificate does not verify raises ``AuthenticationError`` (reason
    ``tls``); the connection is then closed.
    """
    sock.settimeout(timeout)
    tls = context.wrap_socket(
        sock, server_side=False, do_handshake_on_connect=False, server_hostname=server_hostname
    )
    return _handshake(tls, timeout)


def describe_peer(tls: gssl.SSLSocket) -> str:
    """The verified peer certificate's subject and alternative names, for log lines."""
    cert = tls.getpeercert() or {}
    parts = []
    for rdn in _subject(cert):
        for name, value in rdn:
            if name in ("commonName", "organizationName", "organizationalUnitName"):
                parts.append(f"{name}={value}")
    for kind, value in _alt_names(cert):
        parts.append(f"{kind}:{value}")
    return ", ".join(parts) or "no certificate"


def _subject(cert: Certificate) -> tuple[Names, ...]:
    # getpeercert()'s documented shape for "subject": relative distinguished names of pairs.
    return cast(tuple[Names, ...], cert.get("subject", ()))


def _alt_names(cert: Certificate) -> Names:
    # getpeercert()'s documented shape for "subjectAltName": ("DNS", name), ("IP Address", ...).
    return cast(Names, cert.get("subjectAltName", ()))


def _dns_name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 in short: equal ignoring case, or ``*.rest`` matching one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*.") and "." in host:
        label, rest = host.split(".", 1)
        return bool(label) and rest == pattern[2:]
    return False


def names_host(tls: gssl.SSLSocket, host: str) -> bool:
    """True if the verified peer certificate of ``tls`` names ``host`` in its
    subjectAltName (an IP address entry for an address, a DNS entry for a name): how an
    acceptor with ``check_hostname`` binds the address a member announces to its
    certificate, as a dialer does for the address it dials."""
    cert = tls.getpeercert() or {}
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        address = None
    for kind, value in _alt_names(cert):
        if address is not None and kind == "IP Address":
            try:
                if ipaddress.ip_address(value.strip()) == address:
                    return True
            except ValueError:
                continue
        elif address is None and kind == "DNS" and _dns_name_matches(value, host):
            return True
    return False
