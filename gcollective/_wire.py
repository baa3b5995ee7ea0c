"""The native wire protocol, sans-IO: bytes in, messages out, and the encoders.

Every message is one line: a JSON array followed by ``\\n`` (the JSON codec escapes newlines
inside strings, so a newline only ever ends a frame). The first frame on a connection must be
HELLO; after it, the sender streams OPS, SNAPSHOT and SNAPSHOT_END frames. Connections are
one-way, as in collective.js: a node sends on the connections it dials and only reads the
connections it accepts.

=================  ======================================================================
HELLO              ``["gcollective", version, node_id, host, port, flags]``: ``flags`` bit 0
                   asks for a snapshot, bit 1 says the sender reads MEMBERS frames, bits 8
                   and up give the millisecond its incarnation was born (0: not said)
OPS                ``[1, origin, seq, hlcs, ops, parent, paths, values, ttls]``: a batch of
                   operations of one origin, numbered ``seq``, ``seq + 1``, ... (every origin
                   numbers its operations 1, 2, 3, ...), in columns. Operation ``i`` has the
                   stamp ``(hlc_i << 64) | origin``, where ``hlcs[0]`` is the first hlc and
                   each later element is how much the next one grows (at least 1); the kind
                   ``ops[i]`` (``ops`` is one kind for all when they are the same); the path
                   ``paths[i]`` and the value ``values[i]`` (null for DELETE). A path is a
                   dotted string, or a list of segments when a segment holds a dot. When
                   ``parent`` is not ``""``, it is a dotted path and each element of
                   ``paths`` a single segment (no dot) under it. ``ttls`` is null, or each
                   operation's ttl in milliseconds (0 for none). (Columns, small deltas and
                   the common parent said once make a writer's batch cheap to decode.)
SNAPSHOT           ``[2, items]``: a slice of ``Store.export()``, except that the leaves of a
                   full node travel as columns: ``[a, av, d, imax, incs, children, [origins,
                   keys, packed], values(, ttls)]``. ``keys`` are the node's leaves, those
                   with a value first (``values`` lists them in the same order); ``packed``
                   holds each leaf's stamp as ``hlc * len(origins) + i`` where ``origins[i]``
                   is its low 64 bits, or the stamp itself when ``origins`` is empty. (Small
                   ints: a JSON codec reads and writes them three times faster than 128-bit
                   stamps, and a big tree is mostly leaves.) A subtree too long for one
                   frame comes as several items of its top-level key, each a piece of it on
                   its path (``Store.export_pieces``, ``encode_snapshot_parts``); a merge
                   takes their union.
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
DIGEST_REQUEST     ``["gcollective-status", version, "digest", [bucket, ...]]``
                   (``python -m gcollective verify``): the reply is one JSON object too,
                   the node's version vector and digests of its tree (``_digest``), with
                   the digest of every key in the listed buckets
=================  ======================================================================

That is the only time a node writes on a connection it accepted, besides refusals.
"""

from __future__ import annotations

import math
from itertools import islice
from operator import sub
from typing import Any, NamedTuple, Sequence

import ujson

from ._clock import NODE_MASK, STAMP_LIMIT
from ._errors import ProtocolError
from ._validate import MAX_DEPTH

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "WANTS_SNAPSHOT",
    "OPS",
    "SNAPSHOT",
    "SNAPSHOT_END",
    "Hello",
    "FRAME_KINDS",
    "FrameDecoder",
    "encode_hello",
    "encode_ops",
    "wire_path",
    "SNAPSHOT_REQUEST",
    "PROGRESS",
    "encode_snapshot_end",
    "encode_progress",
    "parse_vector",
    "parse_progress",
    "SNAPSHOT_REQUEST_FRAME",
    "KNOWS_MEMBERS",
    "MEMBERS",
    "MEMBER_ALIVE",
    "MEMBER_LEFT",
    "encode_members",
    "parse_members",
    "parse_hello",
    "MAX_TTL_MS",
    "MAX_SEQ",
    "check_json",
    "JSON_SCALARS",
    "STATUS_MAGIC",
    "STATUS_VERSION",
    "encode_status_request",
    "encode_digest_request",
    "digest_buckets",
    "is_status_request",
    "encode_status_reply",
    "parse_status_reply",
]

PROTOCOL_VERSION = 4
MAGIC = "gcollective"
WANTS_SNAPSHOT = 1  # HELLO flag: send me your whole state
# HELLO flag: this member reads MEMBERS frames. A member of 0.4.2 never sets it (so it is
# never sent one: it would refuse the frame kind) and ignores it in a HELLO it receives.
KNOWS_MEMBERS = 2
# HELLO flags from this bit up: the wall-clock millisecond the sender's incarnation was
# born (its clock's promise when it started), so every operation it makes is stamped later;
# 0 when not said (0.4.2 and the builds before this field). In the flags, not a new field: a
# member of 0.4.2 tests its own bits and reads the HELLO as before.
BORN_SHIFT = 8
_BORN_LIMIT = 1 << 48  # (a millisecond below this makes a stamp the wire carries)

OPS = 1
SNAPSHOT = 2
SNAPSHOT_END = 3
SNAPSHOT_REQUEST = 4
PROGRESS = 5
MEMBERS = 6  # the members the sender knows (see encode_members)
MEMBER_ALIVE = 0
MEMBER_LEFT = 1

STATUS_MAGIC = "gcollective-status"
STATUS_VERSION = 1

_PARENT_MIN = 16  # the fewest operations an OPS frame says the parent of once
MAX_SEQ = 1 << 63
#: The longest ttl accepted, in milliseconds (about ten years).
MAX_TTL_MS = 10 * 366 * 24 * 3600 * 1000
_dumps = ujson.dumps
_loads = ujson.loads


class Hello(NamedTuple):
    """What a connecting peer says about itself."""

    node_id: int
    host: str
    port: int
    flags: int

    @property
    def born_ms(self) -> int:
        """The millisecond the sender's incarnation was born (0: not said): every operation
        of it is stamped later (see ``BORN_SHIFT``)."""
        return self.flags >> BORN_SHIFT


def encode_hello(node_id: int, host: str, port: int, flags: int = 0, born_ms: int = 0) -> bytes:
    """The first frame on every connection a node dials (``born_ms``: see ``BORN_SHIFT``)."""
    flags |= born_ms << BORN_SHIFT
    return (_dumps([MAGIC, PROTOCOL_VERSION, node_id, host, port, flags]) + "\n").encode()


def encode_ops(
    origin: int,
    seq: int,
    hlcs: Sequence[int],
    ops: Sequence[int],
    paths: Sequence[str | Sequence[str]],
    values: Sequence[Any],
    ttls: Sequence[int] | None = None,
) -> bytes:
    """An OPS frame: operations ``seq``, ``seq + 1``, ... of ``origin``, in columns (``hlcs``
    growing; ``ttls`` only when some operation has one). Encoded once per batch; the same
    bytes go to every peer."""
    deltas = [hlcs[0], *map(sub, islice(hlcs, 1, None), hlcs)]
    kinds = set(ops)
    parent, paths = _common_parent(paths)
    frame = [
        OPS,
        origin,
        seq,
        deltas,
        ops[0] if len(kinds) == 1 else ops,
        parent,
        paths,
        values,
        ttls,
    ]
    return (_dumps(frame, ensure_ascii=False) + "\n").encode()


def _common_parent(paths: Sequence[Any]) -> tuple[str, Sequence[Any]]:
    """``(parent, keys)`` when every path is a dotted string made of one parent, a dot and a
    key without dots (a writer's loop); else ``("", paths)``. Only for a batch big enough
    to gain: a receiver's bulk apply of a few operations costs more than it saves."""
    first = paths[0]
    if type(first) is not str or len(paths) < _PARENT_MIN:
        return "", paths
    parent = first.rpartition(".")[0]
    if not parent or "\0" in parent:
        return "", paths
    try:
        # C-level: split the paths, joined with NULs, at each NUL + parent + ".". With one
        # piece more than paths and no NUL left in any, every NUL was a seam and every path
        # the parent and a key. (A key holding a NUL, rare, keeps its batch's full paths.)
        keys = ("\0" + "\0".join(paths)).split("\0" + parent + ".")
    except TypeError:
        return "", paths  # some path is a list of segments
    if len(keys) == len(paths) + 1:
        del keys[0]  # ("" before the first seam)
        rest = "".join(keys)
        if "." not in rest and "\0" not in rest:
            return parent, keys
    return "", paths


def wire_path(path: Sequence[str]) -> str | list[str]:
    """How a path travels in OPS frames: dotted, unless a segment holds a dot."""
    for segment in path:
        if "." in segment:
            return list(path)
    return ".".join(path)


SNAPSHOT_REQUEST_FRAME = b"[4]\n"
# How every frame after HELLO starts (the kind, as ``_dumps`` writes it): a frame starting
# otherwise is refused before it is decoded (``FrameDecoder``).
FRAME_KINDS = frozenset(
    b"[%d," % kind for kind in (OPS, SNAPSHOT, SNAPSHOT_END, PROGRESS, MEMBERS)
) | {SNAPSHOT_REQUEST_FRAME[:3]}


def encode_snapshot_end(vector: list[list[int]]) -> bytes:
    """SNAPSHOT_END with the version vector the snapshot corresponds to."""
    return (_dumps([SNAPSHOT_END, vector]) + "\n").encode()


def encode_progress(vector: list[list[int]], complete: bool, promise: int, frontier: int) -> bytes:
    """A PROGRESS frame: the sender's version vector and clock facts."""
    return (_dumps([PROGRESS, vector, complete, promise, frontier]) + "\n").encode()


def encode_members(entries: Sequence[tuple[int, str, int, int]]) -> bytes:
    """A MEMBERS frame: ``(node_id, host, port, state)`` of members the sender knows
    (``MEMBER_ALIVE`` or ``MEMBER_LEFT``: it stopped and will not come back). Sent only to a
    peer whose HELLO has ``KNOWS_MEMBERS``."""
    return (_dumps([MEMBERS, [list(entry) for entry in entries]]) + "\n").encode()


def parse_members(message: Any, limit: int) -> list[tuple[int, str, int, int]]:
    """The entries of a MEMBERS frame (at most ``limit`` of them), or ``ProtocolError``."""
    if len(message) != 2 or type(message[1]) is not list:
        raise ProtocolError("MEMBERS frame is malformed")
    entries = message[1]
    if len(entries) > limit:
        raise ProtocolError(f"MEMBERS frame lists {len(entries)} members, more than {limit}")
    parsed = []
    for entry in entries:
        if type(entry) is not list or len(entry) != 4:
            raise ProtocolError("MEMBERS frame has a malformed entry")
        node_id, host, port, state = entry
        if type(node_id) is not int or not 0 < node_id <= NODE_MASK:
            raise ProtocolError("MEMBERS frame has a bad node id")
        if type(host) is not str or not host or len(host) > 255:
            raise ProtocolError("MEMBERS frame has a bad host")
        if type(port) is not int or not 0 < port < 65536:
            raise ProtocolError("MEMBERS frame has a bad port")
        if state not in (MEMBER_ALIVE, MEMBER_LEFT) or type(state) is not int:
            raise ProtocolError("MEMBERS frame has a bad state")
        parsed.append((node_id, host, port, state))
    return parsed


class FrameDecoder:
    """Splits a byte stream into frames and decodes them; raises ``ProtocolError``.

    Several frames may come in one chunk and one frame may span chunks. A frame (or an
    unterminated tail) longer than ``max_frame`` bytes is refused before it is buffered further;
    the first frame of the stream (a stranger's HELLO) may be at most ``first_frame`` bytes.
    With ``kinds`` (the bytes a frame may start with, such as ``b"[1,"``), every frame after
    the first that starts otherwise is refused before it is decoded: decoding is what costs
    memory (a Python object per JSON value), so junk must not get that far.
    """

    __slots__ = ("max_frame", "_limit", "_first", "_kinds", "_parts", "_size", "frames")

    def __init__(
        self,
        max_frame: int,
        first_frame: int | None = None,
        kinds: frozenset[bytes] | None = None,
    ) -> None:
        self.max_frame = max_frame
        # The limit of the frame being read: ``first_frame`` until the first one completed.
        self._limit = max_frame if first_frame is None else min(first_frame, max_frame)
        self._first = True  # the first frame has not completed yet
        self._kinds = kinds
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
        # The common read: one whole frame after the first, nothing buffered (a web app's
        # frames, each read on its own), decoded without the general way's steps.
        if (
            not self._size
            and len(data) - 1 == data.find(b"\n") >= 0  # (one newline, at the end)
            and len(data) <= self.max_frame
            and not self._first
            and (self._kinds is None or data[:3] in self._kinds)
        ):
            frame = data[:-1]
            self.frames = [frame]
            try:
                return [_loads(frame)]
            except (ValueError, OverflowError) as exc:
                raise ProtocolError(f"frame is not valid JSON ({exc})") from None
        if b"\n" not in data:
            self._size += len(data)
            if self._size > self._limit:
                what = "first frame" if self._first else "frame"
                raise ProtocolError(f"{what} exceeds {self._limit} bytes")
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
        first = self._first
        if first:
            if len(frames[0]) > self._limit:
                raise ProtocolError(f"first frame exceeds {self._limit} bytes")
            self._first = False
            self._limit = self.max_frame
        self._size = len(rest)
        if rest:
            self._parts.append(rest)
        self.frames = frames
        if len(data) > self.max_frame:
            if len(rest) > self.max_frame or max(map(len, frames)) > self.max_frame:
                raise ProtocolError(f"frame exceeds {self.max_frame} bytes")
        kinds = self._kinds
        if kinds is not None:
            for frame in frames[1:] if first else frames:
                if frame[:3] not in kinds:
                    raise ProtocolError(
                        f"unknown message type (a frame starting {frame[:8]!r}, refused before "
                        "decoding)"
                    )
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
    if type(node_id) is not int or not 0 < node_id <= NODE_MASK:
        raise ProtocolError("HELLO has a bad node id")
    if type(host) is not str or not host or len(host) > 255:
        raise ProtocolError("HELLO has a bad host")
    if type(port) is not int or not 0 < port < 65536:
        raise ProtocolError("HELLO has a bad port")
    if type(flags) is not int or not 0 <= flags >> BORN_SHIFT < _BORN_LIMIT:
        raise ProtocolError("HELLO has bad flags")
    return Hello(node_id, host, port, flags)


def parse_vector(vector: Any) -> list[tuple[int, int, int]]:
    """Check a version vector ``[[origin, seq, stamp], ...]``."""
    if type(vector) is not list:
        raise ProtocolError("version vector is not a list")
    out = []
    for entry in vector:
        if type(entry) is not list or len(entry) != 3:
            raise ProtocolError("version vector entry is not [origin, seq, stamp]")
        origin, seq, stamp = entry
        if type(origin) is not int or not 0 < origin <= NODE_MASK:
            raise ProtocolError("version vector has a bad origin")
        if type(seq) is not int or not 0 <= seq < MAX_SEQ:
            raise ProtocolError("version vector has a bad sequence number")
        if type(stamp) is not int or not 0 <= stamp < STAMP_LIMIT:
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
        if type(stamp) is not int or not 0 <= stamp < STAMP_LIMIT:
            raise ProtocolError("PROGRESS frame has a bad stamp")
    return parse_vector(vector), complete, promise, frontier


#: The types of a JSON scalar as the decoder makes them (floats are checked apart: NaN).
JSON_SCALARS = {str, int, bool, type(None)}


def check_json(value: Any, depth: int) -> None:
    """``ProtocolError`` unless ``value`` is JSON a member may hold: finite numbers, at most
    ``MAX_DEPTH`` levels below ``depth``."""
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
            check_json(v, depth + 1)
    elif kind is list:
        for v in value:
            check_json(v, depth + 1)
    else:  # pragma: no cover - the JSON decoder yields nothing else
        raise ProtocolError("value is not JSON")


def encode_status_request() -> bytes:
    """STATUS_REQUEST: the first frame of a status query, instead of HELLO."""
    return (_dumps([STATUS_MAGIC, STATUS_VERSION]) + "\n").encode()


def is_status_request(message: Any) -> bool:
    """True if a connection's first frame asks for the node's status; ``ProtocolError`` if
    it is a status request this node cannot answer."""
    if type(message) is not list or not message or message[0] != STATUS_MAGIC:
        return False
    if len(message) == 4 and message[2] == DIGEST_QUERY:
        message = message[:2]
    if len(message) != 2 or type(message[1]) is not int or message[1] != STATUS_VERSION:
        raise ProtocolError(
            f"status request of an unknown version ({message[1:]!r}); this node speaks "
            f"version {STATUS_VERSION}"
        )
    return True


#: What a digest query names after the version (see DIGEST_REQUEST above).
DIGEST_QUERY = "digest"
#: Buckets of top-level keys in a digest (``_digest`` puts each top-level key in one).
DIGEST_BUCKETS = 256


def encode_digest_request(buckets: Sequence[int] = ()) -> bytes:
    """DIGEST_REQUEST: a status query for digests, with every key of ``buckets`` in detail."""
    return (_dumps([STATUS_MAGIC, STATUS_VERSION, DIGEST_QUERY, list(buckets)]) + "\n").encode()


def digest_buckets(message: list[Any]) -> list[int] | None:
    """For a status request (checked by ``is_status_request``): None when it asks for the
    stats, else the buckets a digest query wants in detail."""
    if len(message) == 2:
        return None
    buckets = message[3]
    if type(buckets) is not list or not all(
        type(b) is int and 0 <= b < DIGEST_BUCKETS for b in buckets
    ):
        raise ProtocolError("digest request has bad buckets")
    return buckets


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
