"""Exceptions raised by gcollective."""

from __future__ import annotations

__all__ = [
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


class ProtocolError(GcollectiveError):
    """A peer sent bytes that break the wire protocol; its connection is closed."""
