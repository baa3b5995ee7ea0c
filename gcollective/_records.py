"""Sealed records: how a connection's bytes are authenticated once its handshake is done
(``_auth``), sans-IO. The handshake derives one key per direction; a ``Sealer`` wraps what one
side sends, an ``Opener`` checks and unwraps it on the other.


``length (4 bytes) | counter (8 bytes) | payload (length bytes) | tag (32 bytes)``, integers
big-endian, ``tag = HMAC-SHA256(direction key, length | counter | payload)``. The counter
numbers the records of one direction 0, 1, 2, ... and the receiver requires exactly the next
one, so a record that is altered, replayed (from this or any other connection), reordered,
dropped and followed by later ones, or moved to the other direction is rejected. One record
carries a whole batch of frames (the node sends what is pending with one ``sendall``), so the
cost is one MAC per batch, not per frame; frames may span records.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import TYPE_CHECKING

from ._errors import AuthenticationError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["RECORD_SIZE", "HEADER_SIZE", "TAG_SIZE", "OVERHEAD", "Sealer", "Opener"]

#: Payload bytes per sealed record: bigger payloads are split. The opener's ``max_record``
#: must be at least the sealer's ``record_size``.
RECORD_SIZE = 1 << 20
TAG_SIZE = 32
_HEADER = struct.Struct(">IQ")  # payload length, record counter
HEADER_SIZE = _HEADER.size
OVERHEAD = HEADER_SIZE + TAG_SIZE
_MAX_COUNTER = 1 << 64

_compare = hmac.compare_digest
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from


class _Mac:
    """HMAC-SHA256 (RFC 2104) under one fixed key, with the padded key hashed once.

    Equal to ``hmac.digest(key, b"".join(parts), "sha256")`` (the tests check it), but copying
    two pre-keyed SHA-256 states costs about 1.6 us for a small record where OpenSSL's one-shot
    HMAC costs about 4 us (its per-call key setup), and nothing is concatenated to MAC a
    header and a payload together.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if not 16 <= len(key) <= 64:  # longer keys would have to be hashed first
            raise ValueError("MAC key must be 16 to 64 bytes")
        block = key.ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def tag(self, *parts: ReadableBuffer) -> bytes:
        """The HMAC of the concatenation of ``parts`` (bytes-like)."""
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class Sealer:
    """Turns payloads into sealed records for one direction of one connection.

    Seal in the order the records are sent (one writer): the receiver requires consecutive
    counters. Payloads longer than ``record_size`` become several records.
    """

    __slots__ = ("_mac", "_counter", "record_size")

    def __init__(self, key: bytes, record_size: int = RECORD_SIZE) -> None:
        if not isinstance(record_size, int) or not 1 <= record_size < (1 << 32):
            raise ValueError(f"record_size must be an int from 1 to 2**32 - 1, not {record_size!r}")
        self._mac = _Mac(key)
        self._counter = 0
        self.record_size = record_size

    @property
    def counter(self) -> int:
        """How many records were sealed so far (the next record's counter)."""
        return self._counter

    def seal(self, payload: bytes) -> bytes:
        """The record(s) carrying ``payload``; ``b""`` for an empty payload."""
        size = self.record_size
        if len(payload) <= size:
            return self._seal_one(payload) if payload else b""
        view = memoryview(payload)
        return b"".join([self._seal_one(view[i : i + size]) for i in range(0, len(payload), size)])

    def _seal_one(self, chunk: bytes | memoryview) -> bytes:
        counter = self._counter
        if counter >= _MAX_COUNTER:
            raise AuthenticationError("record counter exhausted: reconnect", "bad-record")
        self._counter = counter + 1
        header = _pack_header(len(chunk), counter)
        return b"".join((header, chunk, self._mac.tag(header, chunk)))


class Opener:
    """Checks and unwraps sealed records for one direction of one connection, incrementally.

    ``feed`` takes bytes as read (records may be split across reads, several may come in one)
    and returns the payloads of the records it completed. A record announcing more than
    ``max_record`` payload bytes is refused as soon as its header is in, before buffering it.
    Any bad record raises ``AuthenticationError`` (reason ``bad-record``), and so does every
    later call: nothing from a bad record or after it is ever released.
    """

    __slots__ = ("_mac", "_counter", "_buffer", "_error", "max_record")

    def __init__(self, key: bytes, max_record: int = RECORD_SIZE) -> None:
        if not isinstance(max_record, int) or not 1 <= max_record < (1 << 32):
            raise ValueError(f"max_record must be an int from 1 to 2**32 - 1, not {max_record!r}")
        self._mac = _Mac(key)
        self._counter = 0
        self._buffer = bytearray()
        self._error: AuthenticationError | None = None
        self.max_record = max_record

    @property
    def counter(self) -> int:
        """How many records were opened so far (the counter expected next)."""
        return self._counter

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete record held so far."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Payloads of every record completed by ``data``, in order (empty records give none).

        When it raises, the payloads of good records earlier in the same ``data`` are dropped
        too: the connection is closed anyway, and the catch-up resends what they held.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if buffer:
            buffer += data
            data = buffer
        # else: work on the caller's bytes directly; the common case (whole records per
        # read) then copies nothing but the payloads it returns.
        size = len(data)
        out: list[bytes] = []
        position = 0
        tag_of = self._mac.tag
        expected = self._counter
        try:
            with memoryview(data) as view:
                while size - position >= HEADER_SIZE:
                    length, counter = _unpack_header(view, position)
                    if length > self.max_record:
                        raise _too_long(expected, length, self.max_record)
                    end = position + HEADER_SIZE + length
                    if size < end + TAG_SIZE:
                        break
                    if counter != expected:
                        raise _out_of_turn(counter, expected)
                    tag = tag_of(view[position:end])
                    if not _compare(tag, view[end : end + TAG_SIZE]):
                        raise _forged(expected)
                    if length:
                        out.append(bytes(view[position + HEADER_SIZE : end]))
                    expected += 1
                    position = end + TAG_SIZE
                if position < size and not buffer:
                    self._buffer = bytearray(view[position:])
        except AuthenticationError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise
        self._counter = expected
        if buffer and position:
            del buffer[:position]  # O(1) amortized: CPython's bytearray moves its start
        return out

    def close(self) -> None:
        """Call at end of stream: raises ``AuthenticationError`` (reason ``truncated``) if the
        stream stopped inside a record (whose bytes were never released)."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            raise AuthenticationError(
                f"stream ended inside sealed record {self._counter} "
                f"({len(self._buffer)} bytes held): truncated",
                "truncated",
            )


# The reasons ``Opener.feed`` refuses a record (kept out of its loop, which runs per record).


def _too_long(counter: int, length: int, max_record: int) -> AuthenticationError:
    return AuthenticationError(
        f"sealed record {counter} announces {length} bytes, more than {max_record}: "
        "altered, or not a gcollective stream",
        "bad-record",
    )


def _out_of_turn(counter: int, expected: int) -> AuthenticationError:
    return AuthenticationError(
        f"sealed record {counter} arrived where {expected} was due: "
        "replayed, reordered, dropped or altered",
        "bad-record",
    )


def _forged(counter: int) -> AuthenticationError:
    return AuthenticationError(
        f"sealed record {counter} fails authentication: altered, or "
        "sealed with another key (replayed from another connection)",
        "bad-record",
    )
