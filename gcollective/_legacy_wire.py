"""collective.js 0.3.1's wire protocol and data rules, without I/O (the sans-IO half of the
collective.js compatibility mode; ``_legacy.LegacyCollective`` is its gevent node).

Wire protocol (newline-delimited JSON, one ``[type, payload]`` array per line):

=========  =====================================================================================
New (0)    ``[0, [host, port, wants_data]]``: sent by a starting member on each outgoing
           connection once every member was tried; ``wants_data`` is true on exactly one.
Accept (1) ``[1, data]``: the answer to New, on the answerer's connection to the New sender:
           its whole data object if ``wants_data`` was true, else null. A non-null Accept
           replaces the receiver's whole data object.
Data (2)   ``[2, [key, time, value, operation]]``: one change; ``key`` is a dotted string,
           ``time`` the sender's wall clock in milliseconds, ``operation`` 0 SET, 1 INCREMENT,
           2 DELETE (the value is null).
=========  =====================================================================================

Every member dials every other one and only *sends* on the connections it dials; it only
*reads* the connections it accepts. So two members share two one-way connections.

Here: the codec (``encode_*``, ``LineDecoder``, ``parse_*``), key handling (``wire_key``) and
``LegacyStore``, collective.js's data object and its rules. No gevent, no sockets.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import ujson

from ._errors import InvalidKeyError, InvalidValueError, ProtocolError
from ._store import is_number, read_path
from ._validate import Key, parse_address, parse_key
from ._wire import MAGIC, check_json

__all__ = [
    "PROTOCOL",
    "NEW",
    "ACCEPT",
    "DATA",
    "SET",
    "INCREMENT",
    "DELETE",
    "MixedProtocolError",
    "LineDecoder",
    "encode_new",
    "encode_accept",
    "encode_data",
    "parse_message",
    "parse_new",
    "parse_data",
    "wire_key",
    "now_ms",
    "LegacyStore",
]

#: The value of ``protocol`` that selects this mode.
PROTOCOL = "collective.js"

# Message types, numbered as collective.js's TYPES array.
NEW = 0
ACCEPT = 1
DATA = 2

# Operations, numbered as collective.js's OPERATIONS.
SET = 0
INCREMENT = 1
DELETE = 2


class MixedProtocolError(ProtocolError):
    """A native gcollective node talked to a node in collective.js mode (or the reverse)."""


# -- the codec (sans-IO) -------------------------------------------------------------------------


def _encode(message: list[Any]) -> bytes:
    # Compact and with raw UTF-8, as JSON.stringify writes it; "/" is not escaped either.
    text = ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False)
    try:
        return (text + "\n").encode()
    except UnicodeEncodeError:
        # A lone surrogate: no UTF-8 for it, and Node would turn it into U+FFFD anyway.
        raise InvalidValueError("a str holds a lone surrogate, which UTF-8 cannot carry") from None


def encode_new(host: str, port: int, wants_data: bool) -> bytes:
    """The New message a starting member sends on each of its outgoing connections."""
    return _encode([NEW, [host, port, bool(wants_data)]])


def encode_accept(data: dict[str, Any] | None) -> bytes:
    """The answer to New: the whole data object when the sender wants it, else null."""
    return _encode([ACCEPT, data])


def encode_data(key: str, time_ms: int | float, value: Any, op: int) -> bytes:
    """One change. ``value`` must be None for DELETE (collective.js sends null there)."""
    return _encode([DATA, [key, time_ms, value, op]])


class LineDecoder:
    """Splits a byte stream into lines (without the newline); raises ``ProtocolError`` when a
    line, or the unterminated tail, grows past ``max_line`` bytes.

    Several lines may come in one chunk and one line may span many chunks: the pieces of an
    unterminated line are kept in a list and joined once its newline arrives, so a large
    Accept costs one copy, not one per read. Splitting happens on bytes, before decoding: a
    newline byte never occurs inside a multi-byte UTF-8 character.
    """

    __slots__ = ("max_line", "_parts", "_size")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def buffered(self) -> int:
        """Bytes of an unterminated line held so far."""
        return self._size

    def feed(self, data: bytes) -> list[bytes]:
        """Every line completed by ``data``, in order."""
        newline = data.find(b"\n")
        if newline < 0:
            self._size += len(data)
            if self._size > self.max_line:
                raise ProtocolError(f"line exceeds {self.max_line} bytes")
            if data:
                self._parts.append(data)
            return []
        if self._parts:
            self._parts.append(data[:newline])
            first = b"".join(self._parts)
            self._parts = []
        else:
            first = data[:newline]
        self._size = 0
        lines = data[newline + 1 :].split(b"\n")
        tail = lines.pop()
        lines.insert(0, first)
        limit = self.max_line
        if len(data) + len(first) > limit and max(map(len, lines)) > limit:
            raise ProtocolError(f"line exceeds {limit} bytes")
        if tail:
            if len(tail) > limit:
                raise ProtocolError(f"line exceeds {limit} bytes")
            self._parts.append(tail)
            self._size = len(tail)
        return lines


def parse_message(line: bytes) -> tuple[int, Any]:
    """``(type, payload)`` of one line, or ``ProtocolError`` (``MixedProtocolError`` for a
    native gcollective frame)."""
    try:
        message = ujson.loads(line)
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(f"line is not valid JSON ({exc})") from None
    if type(message) is not list or not message:
        raise ProtocolError("line is not a [type, payload] array")
    kind = message[0]
    if kind == MAGIC:
        where = ""
        if len(message) == 6:
            where = f" (from a node listening on {message[3]}:{message[4]})"
        raise MixedProtocolError(
            f"it speaks gcollective's native protocol{where}, but this node runs in "
            f"collective.js 0.3.1 compatibility mode (protocol={PROTOCOL!r}); every member of "
            "a collective must use the same protocol"
        )
    if len(message) < 2:
        raise ProtocolError("line is not a [type, payload] array")
    if type(kind) is not int or kind not in (NEW, ACCEPT, DATA):
        raise ProtocolError(f"unknown message type {kind!r}")
    return kind, message[1]


def parse_new(payload: Any) -> tuple[str, int, bool]:
    """``(host, port, wants_data)`` of a New payload, or ``ProtocolError``."""
    if type(payload) is not list or len(payload) < 2:
        raise ProtocolError("New payload is not [host, port, wants_data]")
    try:
        host, port = parse_address((payload[0], payload[1]))
    except ValueError as exc:
        raise ProtocolError(f"New carries a bad address: {exc}") from None
    # collective.js tests `true === wants_data`: anything else means no.
    wants = len(payload) > 2 and payload[2] is True
    return host, port, wants


def parse_data(payload: Any) -> tuple[str, tuple[str, ...], int | float, Any, int]:
    """``(key, path, time, value, op)`` of a Data payload, or ``ProtocolError``.

    As in collective.js, an operation other than INCREMENT or DELETE (or none) is a SET. The
    value is checked to be JSON that can be sent on (no NaN or infinity, bounded nesting).
    """
    if type(payload) is not list or len(payload) < 3:
        raise ProtocolError("Data payload is not [key, time, value, operation]")
    key, time_ms, value = payload[0], payload[1], payload[2]
    if type(key) is not str:
        raise ProtocolError(f"Data key {key!r} is not a string")
    try:
        path = parse_key(key)
    except InvalidKeyError as exc:
        raise ProtocolError(f"Data key: {exc}") from None
    if not is_number(time_ms) or not _finite(time_ms):
        raise ProtocolError(f"Data time {time_ms!r} is not a number")
    op = payload[3] if len(payload) > 3 else None
    if type(op) in (int, float) and op in (INCREMENT, DELETE):
        op = int(op)
    else:
        op = SET
    if op == INCREMENT:
        if not is_number(value) or not _finite(value):
            raise ProtocolError(f"INCREMENT amount {value!r} is not a number")
    elif op == DELETE:
        value = None
    else:
        check_json(value, len(path))
    return key, path, time_ms, value, op


def _finite(number: int | float) -> bool:
    # math.isfinite would turn a huge int into a float and overflow.
    return type(number) is int or math.isfinite(number)


def wire_key(key: Key) -> tuple[tuple[str, ...], str]:
    """``(path, dotted key)`` of a caller's key, or ``InvalidKeyError``.

    collective.js keys are dotted strings, so a segment cannot contain a dot here.
    """
    if type(key) is str:
        return parse_key(key), key
    path = parse_key(key)
    for segment in path:
        if "." in segment:
            raise InvalidKeyError(
                f"key segment {segment!r} contains '.', which collective.js keys cannot carry"
            )
    return path, ".".join(path)


def now_ms() -> int:
    """The wall clock in milliseconds, as collective.js's ``+new Date()``."""
    return int(time.time() * 1000)


# -- the store (sans-IO) -------------------------------------------------------------------------


class LegacyStore:
    """collective.js's data object and its ``history``, with collective.js's rules.

    - Per full key string, the time of the last SET that applied is remembered. A SET or
      DELETE applies when its time is later than or equal to the remembered one (or none is
      remembered). A DELETE that applies forgets the remembered time, so an older SET that
      arrives later brings the key back.
    - INCREMENT ignores time: it adds to the number there; missing (or not a number) counts
      as starting from 0.
    - Times are compared per exact key string: 'a' and 'a.b' never compare.
    - Every operation first walks to the parent of its key, making every step on the way an
      object: a missing step or one holding anything but an object becomes ``{}`` - also for a
      DELETE, and also when the operation then loses on time, as collective.js does.
    - ``replace`` swaps the whole data object (a non-null Accept) and keeps the history.
    """

    __slots__ = ("data", "history")

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        #: Full key string -> time of its last SET that applied.
        self.history: dict[str, int | float] = {}

    def get(self, path: Iterable[str], default: Any = None) -> Any:
        """The value at ``path`` (containers copied), or ``default``."""
        return read_path(self.data, path, default)

    def apply(
        self, key: str, path: tuple[str, ...], time_ms: int | float, op: int, value: Any
    ) -> bool:
        """Apply one operation; True unless a SET or DELETE lost on time.

        ``key`` must be ``".".join(path)``. ``value`` is kept as is (the caller passes a
        private copy).
        """
        node = self.data
        for segment in path[:-1]:
            child = node.get(segment)
            if type(child) is not dict:
                child = node[segment] = {}
            node = child
        leaf = path[-1]
        if op == INCREMENT:
            current = node.get(leaf)
            node[leaf] = current + value if is_number(current) else value
            return True
        remembered = self.history.get(key)
        if remembered is not None and time_ms < remembered:
            return False
        if op == DELETE:
            self.history.pop(key, None)
            node.pop(leaf, None)
        else:
            self.history[key] = time_ms
            node[leaf] = value
        return True

    def replace(self, data: dict[str, Any]) -> None:
        """Swap the whole data object, as a non-null Accept does (the history stays)."""
        self.data = data
