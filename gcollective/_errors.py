"""Exceptions raised by gcollective."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "DataDirError",
    "DataDirLocked",
    "GcollectiveError",
    "InvalidKeyError",
    "InvalidValueError",
    "NotStartedError",
    "ProtocolError",
]


class GcollectiveError(Exception):
    """Base class of every error gcollective raises on purpose."""


class InvalidKeyError(GcollectiveError, ValueError):
    """A key is empty, has an empty segment, or is not a str / tuple of str."""


class InvalidValueError(GcollectiveError, ValueError):
    """A value cannot travel as JSON, or an INCREMENT amount or target is not a number."""


class NotStartedError(GcollectiveError, RuntimeError):
    """The node (or the module-level default node) is not running in this process."""


class DataDirError(GcollectiveError, RuntimeError):
    """The ``data_dir`` cannot be used: another process holds it, it is not a gcollective
    data directory, or its database is corrupt. Nothing in it was changed."""


class DataDirLocked(DataDirError):
    """Another process (or member) holds the ``data_dir``."""


class ProtocolError(GcollectiveError):
    """A peer sent bytes that break the wire protocol; its connection is closed.

    ``category`` is a fixed word saying what kind of refusal it is (``frame``, ``hello``,
    ``handshake-timeout``, ...): logs are rate-limited per category, never per message, since
    a message may echo what a stranger sent.
    """

    category = "frame"


class AuthenticationError(ProtocolError):
    """A connection failed or skipped authentication, or a sealed record is not authentic.

    ``reason`` is a short code for logs and tests: ``bad-proof`` (a different secret, or a
    replayed or altered handshake), ``missing-handshake`` (the peer sent a plain HELLO: it has
    no secret), ``no-secret`` (the peer wants to authenticate and this node has no secret),
    ``refused`` (the peer sent REFUSE; the message says why), ``bad-message``, ``version``,
    ``closed`` (the peer hung up during the handshake), ``bad-record`` (a sealed record is
    altered, replayed, reordered or oversized), ``truncated`` or ``tls`` (the TLS handshake
    failed).

    ``reply`` is a REFUSE line worth sending to the peer before closing (best effort; it tells
    the peer's log why), or ``b""``.
    """

    def __init__(self, message: str, reason: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reason = reason
        self.reply = reply


def refusal(message: str, category: str) -> ProtocolError:
    """A ``ProtocolError`` of ``category`` (see ``RefusalLog``)."""
    error = ProtocolError(message)
    error.category = category
    return error
