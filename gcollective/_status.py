"""Asking a member for its status, and showing it: the client side of ``status`` and ``verify``.

A status query is one line over the peer port (``_wire``'s status request, or a digest
request), answered with one line of JSON. With a secret it goes through the authentication
handshake and sealed records like any connection; a member that refuses says why in a JSON
line in clear (``_auth``'s refusals), which becomes the one-line reason of a
``CommandError``. ``format_status`` lays a member's ``stats()`` out as the table ``status``
prints.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Sequence, TypedDict

from ._validate import format_address

if TYPE_CHECKING:
    from gevent.socket import socket

    from ._records import Opener

__all__ = ["SECRET_ENV", "CommandError", "TlsFiles", "format_status", "query_status"]

SECRET_ENV = "GCOLLECTIVE_SECRET"


class TlsFiles(TypedDict, total=False):
    """The TLS options of ``--certfile``, ``--keyfile`` and ``--cafile``: all three, or none
    when TLS is off (a certificate and a CA always come together)."""

    certfile: str
    keyfile: str | None
    cafile: str


class CommandError(Exception):
    """A failure to report as one line on stderr, with exit code 1."""


def query_status(
    address: tuple[str, int],
    *,
    secret: str | bytes | None = None,
    timeout: float = 5.0,
    tls: TlsFiles | None = None,
    request: bytes | None = None,
) -> dict[str, Any]:
    """The ``stats()`` of the member at ``address``, asked over its peer port (or its answer
    to another status ``request``, such as a digest query). Raises ``CommandError`` with a
    one-line reason when it cannot be had."""
    import gevent

    from ._errors import AuthenticationError, ProtocolError
    from ._wire import encode_status_request, parse_status_reply

    where = format_address(address)
    if request is None:
        request = encode_status_request()
    sock: socket | None = None
    try:
        with gevent.Timeout(timeout, CommandError(f"{where}: no answer within {timeout:g}s")):
            sock = _connect(address, timeout, tls)
            received = _exchange(sock, secret, request)
    except CommandError:
        raise
    except AuthenticationError as exc:
        raise CommandError(f"{where}: {exc}") from None
    except (OSError, ProtocolError) as exc:
        text = str(exc) or type(exc).__name__
        raise CommandError(f"cannot get the status of {where}: {text}") from None
    finally:
        if sock is not None:
            sock.close()
    line = received.split(b"\n", 1)[0]
    if line.startswith(b"["):
        raise CommandError(f"{where}: {_refusal_reason(line, secret)}")
    if not line:
        raise CommandError(
            f"{where} closed the connection without answering (an older version, another "
            "protocol, or a secret or TLS mismatch: see its log)"
        )
    try:
        return parse_status_reply(line)
    except ProtocolError as exc:
        raise CommandError(f"{where}: {exc}") from None


def _connect(address: tuple[str, int], timeout: float, tls: TlsFiles | None) -> socket:
    """A connection to ``address``, wrapped in TLS when ``tls`` names its files."""
    from gevent import socket as gsocket

    sock = gsocket.create_connection(address, timeout=timeout)
    if tls:
        from . import _tls

        context = _tls.client_context(**tls)
        sock = _tls.connect_tls(sock, context, address[0], timeout)
    return sock


def _exchange(sock: socket, secret: str | bytes | None, request: bytes) -> bytes:
    """Send ``request`` (after the handshake when there is a ``secret``) and read until the
    answer's line is complete, or a refusal's line in clear, or the member closes."""
    opener: Opener | None = None
    received = b""
    if secret is None:
        sock.sendall(request)
    else:
        from ._auth import DialerHandshake

        handshake = DialerHandshake(secret, "status")
        sock.sendall(handshake.start())
        while True:
            step = handshake.receive(sock.recv(4096))
            if step.done:
                break
        opener = handshake.opener()
        sock.sendall(step.send + handshake.sealer().seal(request))
        received = b"".join(opener.feed(handshake.leftover))
    while not received.endswith(b"\n"):
        data = sock.recv(65536)
        if not data:
            break
        received += b"".join(opener.feed(data)) if opener is not None else data
        if opener is None and received.startswith(b"[") and b"\n" in received:
            break  # a refusal line, in clear
    return received


def _refusal_reason(line: bytes, secret: str | bytes | None) -> str:
    """Why a member refused the query, from its refusal line."""
    from ._auth import explain_refusal

    try:
        refusal = json.loads(line)
    except ValueError:
        refusal = None
    why = explain_refusal(refusal)
    if secret is None and why is not None and refusal[2] in ("bad-message", "secret-required"):
        # Our plain request reached a node that expected the authentication handshake.
        why = (
            f"it requires the collective's secret: set {SECRET_ENV} or name the "
            "variable holding it with --secret-env"
        )
    return why or "refused the status query"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 86400}d{seconds // 3600 % 24:02d}h"


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""  # pragma: no cover


def format_status(stats: dict[str, Any], now: float | None = None) -> str:
    """A readable table of ``stats()``: the node on top, then one row per peer."""
    now = time.time() if now is None else now
    state = ", ".join(
        word
        for word, on in (
            ("running", stats.get("running")),
            ("stopped", not stats.get("running")),
            ("synced", stats.get("synced")),
        )
        if on
    )
    lines = [
        f"node {stats.get('node_id')} at {stats.get('address')}: {state}, "
        f"up {_duration(stats.get('uptime') or 0)}",
        f"  keys (top level) {stats.get('top_level_keys')}   local ops {stats.get('local_ops')}"
        f"   applied ops {stats.get('applied_ops')}   received frames "
        f"{stats.get('received_frames')}   refused connections "
        f"{stats.get('refused_connections')}   log {stats.get('log_ops')} ops / "
        f"{_size(stats.get('log_bytes') or 0)}",
    ]
    if stats.get("internal_errors"):
        lines.append(
            f"  internal errors {stats['internal_errors']}, the last: "
            f"{stats.get('last_internal_error')}"
        )
    return "\n".join([*lines, *_peer_lines(stats, now), *_member_lines(stats, now)])


def _peer_lines(stats: dict[str, Any], now: float) -> list[str]:
    """One row per peer (a link this node dials)."""
    peers = stats.get("peers") or {}
    if not peers:
        return ["no peers"]
    header = ("PEER", "STATE", "ID", "SECURITY", "QUEUED", "SENT", "CONNECTS", "LAST ERROR")
    rows = [header]
    for name, peer in sorted(peers.items()):
        security = "+".join(
            word
            for word, on in (("secret", peer.get("authenticated")), ("tls", peer.get("tls")))
            if on
        )
        error = peer.get("last_error") or "-"
        if peer.get("last_error_at"):
            error = f"{error[:60]} ({_duration(max(0.0, now - peer['last_error_at']))} ago)"
        rows.append(
            (
                name,
                str(peer.get("state")),
                peer.get("peer_id") or "-",
                security or "-",
                f"{_size(peer.get('queued_bytes') or 0)} / {peer.get('queued_frames')}",
                f"{peer.get('sent_frames')} / {_size(peer.get('sent_bytes') or 0)}",
                str(peer.get("connects")),
                error,
            )
        )
    return _table(rows)


def _member_lines(stats: dict[str, Any], now: float) -> list[str]:
    """One row per member known (``stats()["members"]``; absent before 0.5)."""
    members = stats.get("members")
    if not members:
        return []
    rows = [("MEMBER", "STATE", "ID", "LEARNT", "SINCE")]
    for name, member in sorted(members.items()):
        since = member.get("since")
        rows.append(
            (
                name,
                str(member.get("state")),
                member.get("node_id") or "-",
                str(member.get("learnt")),
                "-" if since is None else f"{_duration(max(0.0, now - since))} ago",
            )
        )
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the header first) in aligned columns, the last one left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines
