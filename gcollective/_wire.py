"""The native wire protocol, sans-IO: bytes in, messages out, and the encoders.

Every message is one line: a JSON array followed by ``\\n`` (the JSON codec escapes newlines
inside strings, so a newline only ever ends a frame). The first frame on a connection must be
HELLO; after it, the sender streams OP, SNAPSHOT and SNAPSHOT_END frames. Connections are
one-way, as in collective.js: a node sends on the connections it dials and only reads the
connections it accepts.

=================  ======================================================================
HELLO              ``["gcollective", version, node_id, host, port, flags]``
OP                 ``[1, stamp, op, path, value, seq]``: ``value`` is null for DELETE; ``seq``
                   numbers the origin's operations 1, 2, 3, ... (the origin is in the stamp);
                   a SET or INCREMENT with a ttl has a 7th element, the ttl in milliseconds
SNAPSHOT           ``[2, items]``: a slice of ``Store.export()``
SNAPSHOT_END       ``[3, vector]``: the whole state has been sent; ``vector`` is the sender's
                   version vector ``[[origin, seq, stamp], ...]`` at the time of the snapshot
SNAPSHOT_REQUEST   ``[4]``: please send me your whole state (on the reverse link)
PROGRESS           ``[5, vector, complete, promise, frontier]`` every ``sync_interval``: what
                   the sender has applied; ``complete`` is false while it still waits for a
                   snapshot; its future operations have stamps above ``promise``; no
                   operation older than ``frontier`` can still reach it
=================  ======================================================================

Status queries (``python -m gcollective status``) use the same port. The client opens a
connection (and, when the collective has a secret, runs the handshake as a dialer and seals
what it sends, like a member), and sends, in place of HELLO:

=================  ======================================================================
STATUS_REQUEST     ``["gcollective-status", version]``
STATUS_REPLY       one JSON object, the node's ``stats()``, on one line (sealed with the
                   acceptor-to-dialer key when there is a secret); then the node closes
=================  ======================================================================

That is the only time a node writes on a connection it accepted, besides refusals.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import ujson

from ._errors import ProtocolError
from ._validate import MAX_DEPTH

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "WANTS_SNAPSHOT",
    "OP",
    "SNAPSHOT",
    "SNAPSHOT_END",
    "Hello",
    "FrameDecoder",
    "encode_hello",
    "encode_op",
    "encode_snapshot",
    "SNAPSHOT_REQUEST",
    "PROGRESS",
    "encode_snapshot_end",
    "encode_progress",
    "parse_vector",
    "parse_progress",
    "SNAPSHOT_REQUEST_FRAME",
    "parse_hello",
    "parse_op",
    "MAX_TTL_MS",
    "check_snapshot_items",
    "STATUS_MAGIC",
    "STATUS_VERSION",
    "encode_status_request",
    "is_status_request",
    "encode_status_reply",
    "parse_status_reply",
]

PROTOCOL_VERSION = 1
MAGIC = "gcollective"
WANTS_SNAPSHOT = 1  # HELLO flag: send me your whole state

OP = 1
SNAPSHOT = 2
SNAPSHOT_END = 3
SNAPSHOT_REQUEST = 4
PROGRESS = 5

STATUS_MAGIC = "gcollective-status"
STATUS_VERSION = 1

_MAX_STAMP = 1 << 128
_MAX_SEQ = 1 << 63
#: The longest ttl accepted, in milliseconds (about ten years).
MAX_TTL_MS = 10 * 366 * 24 * 3600 * 1000
_DERIVED_BIT = 1 << 63  # set in the origin half of an expiry stamp (see _clock.expiry_stamp)
_ORIGIN_MASK = (1 << 64) - 1
_dumps = ujson.dumps
_loads = ujson.loads


class Hello(NamedTuple):
    """What a connecting peer says about itself."""

    node_id: int
    host: str
    port: int
    flags: int


def encode_hello(node_id: int, host: str, port: int, flags: int = 0) -> bytes:
    """The first frame on every connection a node dials."""
    return (_dumps([MAGIC, PROTOCOL_VERSION, node_id, host, port, flags]) + "\n").encode()


def encode_op(
    stamp: int, op: int, path: tuple[str, ...], value: Any, seq: int, ttl_ms: int = 0
) -> bytes:
    """One operation as one frame; encoded once, the same bytes go to every peer."""
    if ttl_ms:
        frame = [OP, stamp, op, path, value, seq, ttl_ms]
        return (_dumps(frame, ensure_ascii=False) + "\n").encode()
    return (_dumps([OP, stamp, op, path, value, seq], ensure_ascii=False) + "\n").encode()


def encode_snapshot(items: list[Any]) -> bytes:
    """A SNAPSHOT frame carrying a slice of ``Store.export()``."""
    return (_dumps([SNAPSHOT, items], ensure_ascii=False) + "\n").encode()


SNAPSHOT_REQUEST_FRAME = b"[4]\n"


def encode_snapshot_end(vector: list[list[int]]) -> bytes:
    """SNAPSHOT_END with the version vector the snapshot corresponds to."""
    return (_dumps([SNAPSHOT_END, vector]) + "\n").encode()


def encode_progress(vector: list[list[int]], complete: bool, promise: int, frontier: int) -> bytes:
    """A PROGRESS frame: the sender's version vector and clock facts."""
    return (_dumps([PROGRESS, vector, complete, promise, frontier]) + "\n").encode()


class FrameDecoder:
    """Splits a byte stream into frames and decodes them; raises ``ProtocolError``.

    Several frames may come in one chunk and one frame may span chunks. A frame (or an
    unterminated tail) longer than ``max_frame`` bytes is refused before it is buffered further.
    """

    __slots__ = ("max_frame", "_parts", "_size", "frames")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        # An unterminated frame, as the chunks it came in: joined once, when it completes,
        # so a 100 MB frame arriving in 64 KB reads costs linear time, not quadratic.
        self._parts: list[bytes] = []
        self._size = 0
        #: The raw bytes (without the newline) of the frames the last ``feed`` decoded.
        self.frames: list[bytes] = []

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held so far."""
        return self._size

    def feed(self, data: bytes) -> list[Any]:
        """Decoded JSON of every frame completed by ``data``, in order."""
        if b"\n" not in data:
            self._size += len(data)
            if self._size > self.max_frame:
                raise ProtocolError(f"frame exceeds {self.max_frame} bytes")
            if data:
                self._parts.append(data)
            self.frames = []
            return []
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
        frames = data.split(b"\n")
        rest = frames.pop()
        self._size = len(rest)
        if rest:
            self._parts.append(rest)
        self.frames = frames
        if len(data) > self.max_frame:
            if len(rest) > self.max_frame or max(map(len, frames)) > self.max_frame:
                raise ProtocolError(f"frame exceeds {self.max_frame} bytes")
        try:
            return list(map(_loads, frames))
        except (ValueError, OverflowError) as exc:
            raise ProtocolError(f"frame is not valid JSON ({exc})") from None


def parse_hello(message: Any) -> Hello:
    """Check the first frame of a connection."""
    if type(message) is not list or len(message) != 6 or message[0] != MAGIC:
        if type(message) is list and len(message) == 2 and message[0] == 0:
            raise ProtocolError(
                "first frame is not a gcollective HELLO: it looks like collective.js's New; "
                "the peer runs in collective.js mode (protocol='collective.js')"
            )
        raise ProtocolError("first frame is not a gcollective HELLO")
    _, version, node_id, host, port, flags = message
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    if type(node_id) is not int or not 0 < node_id < (1 << 64):
        raise ProtocolError("HELLO has a bad node id")
    if type(host) is not str or not host or len(host) > 255:
        raise ProtocolError("HELLO has a bad host")
    if type(port) is not int or not 0 < port < 65536:
        raise ProtocolError("HELLO has a bad port")
    if type(flags) is not int or flags < 0:
        raise ProtocolError("HELLO has bad flags")
    return Hello(node_id, host, port, flags)


def parse_op(message: list[Any]) -> tuple[int, int, list[str], Any, int]:
    """Check an OP frame's shape: ``(stamp, op, path, value, seq)`` or ``ProtocolError``.

    A frame with a ttl (a 7th element, ``message[6]``) is checked here too.
    """
    if len(message) != 6:
        if len(message) != 7:
            raise ProtocolError("OP frame has the wrong length")
        _check_ttl(message)
        message = message[:6]
    _, stamp, op, path, value, seq = message
    if type(stamp) is not int or not 0 < stamp < _MAX_STAMP or not stamp & _ORIGIN_MASK:
        raise ProtocolError("OP frame has a bad stamp")
    if type(seq) is not int or not 0 < seq < _MAX_SEQ:
        raise ProtocolError("OP frame has a bad sequence number")
    if type(path) is not list or not path or len(path) > MAX_DEPTH:
        raise ProtocolError("OP frame has a bad path")
    for segment in path:
        if type(segment) is not str or not segment:
            raise ProtocolError("OP frame has a bad path segment")
    if op == 0 and type(op) is int:
        kind = type(value)
        if not (kind is str or kind is int or kind is bool or value is None):
            _check_json(value, 0)
    elif op == 1 and type(op) is int:
        kind = type(value)
        if not (kind is int or (kind is float and math.isfinite(value))):
            raise ProtocolError("INCREMENT amount is not a number")
    elif op == 2 and type(op) is int:
        if value is not None:
            raise ProtocolError("DELETE carries a value")
    else:
        raise ProtocolError(f"unknown operation {op!r}")
    return stamp, op, path, value, seq


def _check_ttl(message: list[Any]) -> None:
    ttl = message[6]
    if type(ttl) is not int or not 0 < ttl <= MAX_TTL_MS:
        raise ProtocolError("OP frame has a bad ttl")
    if message[2] not in (0, 1) or type(message[2]) is not int:
        raise ProtocolError("OP frame has a ttl on an operation other than SET or INCREMENT")
    stamp = message[1]
    if type(stamp) is int and stamp & _DERIVED_BIT:
        raise ProtocolError("OP frame with a ttl has a bad stamp")


def parse_vector(vector: Any) -> list[tuple[int, int, int]]:
    """Check a version vector ``[[origin, seq, stamp], ...]``."""
    if type(vector) is not list:
        raise ProtocolError("version vector is not a list")
    out = []
    for entry in vector:
        if type(entry) is not list or len(entry) != 3:
            raise ProtocolError("version vector entry is not [origin, seq, stamp]")
        origin, seq, stamp = entry
        if type(origin) is not int or not 0 < origin <= _ORIGIN_MASK:
            raise ProtocolError("version vector has a bad origin")
        if type(seq) is not int or not 0 <= seq < _MAX_SEQ:
            raise ProtocolError("version vector has a bad sequence number")
        if type(stamp) is not int or not 0 <= stamp < _MAX_STAMP:
            raise ProtocolError("version vector has a bad stamp")
        out.append((origin, seq, stamp))
    return out


def parse_progress(message: list[Any]) -> tuple[list[tuple[int, int, int]], bool, int, int]:
    """Check a PROGRESS frame: ``(vector, complete, promise, frontier)``."""
    if len(message) != 5:
        raise ProtocolError("PROGRESS frame has the wrong length")
    _, vector, complete, promise, frontier = message
    if type(complete) is not bool:
        raise ProtocolError("PROGRESS frame has a bad completeness flag")
    for stamp in (promise, frontier):
        if type(stamp) is not int or not 0 <= stamp < _MAX_STAMP:
            raise ProtocolError("PROGRESS frame has a bad stamp")
    return parse_vector(vector), complete, promise, frontier


def _check_json(value: Any, depth: int) -> None:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return
    if kind is float:
        if not math.isfinite(value):
            raise ProtocolError("value holds a non-finite number")
        return
    if depth >= MAX_DEPTH:
        raise ProtocolError("value is nested too deeply")
    if kind is dict:
        for v in value.values():
            _check_json(v, depth + 1)
    elif kind is list:
        for v in value:
            _check_json(v, depth + 1)
    else:  # pragma: no cover - the JSON decoder yields nothing else
        raise ProtocolError("value is not JSON")


def check_snapshot_items(items: Any) -> list[Any]:
    """Check a SNAPSHOT frame's payload fully before any of it is merged."""
    if type(items) is not list:
        raise ProtocolError("SNAPSHOT payload is not a list")
    for item in items:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not str or not item[0]:
            raise ProtocolError("SNAPSHOT item is not [key, entry]")
        _check_entry(item[1], 1)
    return items


def _check_stamp(stamp: Any, optional: bool) -> None:
    if stamp is None and optional:
        return
    if type(stamp) is not int or not 0 < stamp < _MAX_STAMP:
        raise ProtocolError("SNAPSHOT entry has a bad stamp")


def _check_entry(entry: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError("SNAPSHOT entry is nested too deeply")
    if type(entry) is int:
        _check_stamp(entry, False)
        return
    if type(entry) is not list:
        raise ProtocolError("SNAPSHOT entry has the wrong shape")
    if len(entry) == 2:
        _check_stamp(entry[0], False)
        _check_json(entry[1], depth)
        return
    if len(entry) == 7:
        _check_ttls(entry[6])
    elif len(entry) != 6:
        raise ProtocolError("SNAPSHOT entry has the wrong shape")
    a, av, d, imax, incs, children = entry[:6]
    _check_stamp(a, True)
    _check_stamp(d, True)
    _check_stamp(imax, True)
    if type(av) is list and len(av) == 1:
        _check_json(av[0], depth)
    elif not (type(av) is int and av in (0, 1)):
        raise ProtocolError("SNAPSHOT entry has a bad assignment")
    if type(incs) is not list:
        raise ProtocolError("SNAPSHOT entry has bad increments")
    for inc in incs:
        if type(inc) is not list or len(inc) != 2:
            raise ProtocolError("SNAPSHOT entry has bad increments")
        _check_stamp(inc[0], False)
        kind = type(inc[1])
        if not (kind is int or (kind is float and math.isfinite(inc[1]))):
            raise ProtocolError("SNAPSHOT increment is not a number")
    if type(children) is not dict:
        raise ProtocolError("SNAPSHOT entry has bad children")
    for child in children.values():  # keys may be "" (from a dict value), never a path
        _check_entry(child, depth + 1)


def _check_ttls(ttls: Any) -> None:
    """The ttl events of a node: ``[[stamp, expiry stamp], ...]``, each expiry derived from
    its stamp (the same origin, later)."""
    if type(ttls) is not list or not ttls:
        raise ProtocolError("SNAPSHOT entry has bad ttls")
    for event in ttls:
        if type(event) is not list or len(event) != 2:
            raise ProtocolError("SNAPSHOT entry has bad ttls")
        stamp, expiry = event
        _check_stamp(stamp, False)
        _check_stamp(expiry, False)
        if (
            stamp & _DERIVED_BIT
            or expiry & _ORIGIN_MASK != _DERIVED_BIT | (stamp & _ORIGIN_MASK)
            or not 0 < (expiry >> 80) - (stamp >> 80) <= MAX_TTL_MS
        ):
            raise ProtocolError("SNAPSHOT entry has a bad expiry")


def encode_status_request() -> bytes:
    """STATUS_REQUEST: the first frame of a status query, instead of HELLO."""
    return (_dumps([STATUS_MAGIC, STATUS_VERSION]) + "\n").encode()


def is_status_request(message: Any) -> bool:
    """True if a connection's first frame asks for the node's status; ``ProtocolError`` if
    it is a status request this node cannot answer."""
    if type(message) is not list or not message or message[0] != STATUS_MAGIC:
        return False
    if len(message) != 2 or type(message[1]) is not int or message[1] != STATUS_VERSION:
        raise ProtocolError(
            f"status request of an unknown version ({message[1:]!r}); this node speaks "
            f"version {STATUS_VERSION}"
        )
    return True


def encode_status_reply(stats: dict[str, Any]) -> bytes:
    """STATUS_REPLY: the stats as one JSON line."""
    return (_dumps(stats, ensure_ascii=False) + "\n").encode()


def parse_status_reply(line: bytes) -> dict[str, Any]:
    """The stats from a STATUS_REPLY line (without or with its newline)."""
    try:
        stats = _loads(line)
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(f"status reply is not valid JSON ({exc})") from None
    if type(stats) is not dict or type(stats.get("node_id")) is not str:
        raise ProtocolError("status reply is not a node's stats")
    return stats
