"""The native wire protocol, sans-IO: bytes in, messages out, and the encoders.

Every message is one line: a JSON array followed by ``\\n`` (the JSON codec escapes newlines
inside strings, so a newline only ever ends a frame). The first frame on a connection must be
HELLO; after it, the sender streams OPS, SNAPSHOT and SNAPSHOT_END frames. Connections are
one-way, as in collective.js: a node sends on the connections it dials and only reads the
connections it accepts.

=================  ======================================================================
HELLO              ``["gcollective", version, node_id, host, port, flags]``
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
from itertools import accumulate, chain, islice, repeat
from operator import lshift, sub
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import ujson

from ._clock import DERIVED_BIT, HLC_LIMIT, MILLIS_SHIFT, NODE_BITS, NODE_MASK, STAMP_LIMIT
from ._columns import (
    MAX_LEAF_ORIGINS,
    LeafColumns,
    full_paths,
    pack_stamps,
    packed_column,
    unpack_stamps,
)
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
    "OpStamps",
    "wire_path",
    "full_paths",
    "path_segments",
    "encode_snapshot",
    "encode_snapshot_item",
    "encode_snapshot_parts",
    "learn_piece_size",
    "LEAF_BYTES_GUESS",
    "PIECE_FILL",
    "join_snapshot",
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
    "parse_ops",
    "check_op_values",
    "MAX_TTL_MS",
    "parse_snapshot_items",
    "LeafColumns",
    "unpack_stamps",
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
_MAX_SEQ = 1 << 63
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


def encode_hello(node_id: int, host: str, port: int, flags: int = 0) -> bytes:
    """The first frame on every connection a node dials."""
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


def encode_snapshot(items: list[Any]) -> bytes:
    """A SNAPSHOT frame carrying a slice of ``Store.export()``."""
    return join_snapshot([encode_snapshot_item(item) for item in items])


def encode_snapshot_item(item: list[Any]) -> bytes:
    """One item of ``Store.export()``, encoded for ``join_snapshot`` (a full node's leaves as
    columns: see the module docstring)."""
    key, entry = item
    if type(entry) is list and len(entry) >= 8:
        item = [key, _leaves_as_columns(entry)]
    return _dumps(item, ensure_ascii=False).encode()


def encode_snapshot_parts(item: list[Any], limit: int) -> Iterator[bytes]:
    """One item of ``Store.export()`` encoded for ``join_snapshot`` in parts of at most
    ``limit`` bytes each, where it can be (a single value longer than that stays whole).

    A full node too long for one part goes as several items of the same key, each the path
    down to some of its leaves or children: the first with the node's own events (its
    assignment, increments, ttls), the others with only what tells that it is a dict. They
    merge to the same as the whole (a merge takes the union of the events; the joiner
    grafts each piece, see ``_merge``), and each carries its leaves as columns."""
    key, entry = item

    def wrap(piece: list[Any]) -> list[Any]:
        return [key, piece]

    if type(entry) is list and len(entry) >= 8:
        weight = _weight(entry)
        if weight * _LEAF_BYTES_AT_LEAST > limit:  # too long whatever it holds: no need to try
            yield from _node_parts(entry, wrap, limit, [LEAF_BYTES_GUESS])
            return
    part = encode_snapshot_item(item)
    if len(part) <= limit or type(entry) is not list or len(entry) < 8:
        yield part
    else:
        yield from _node_parts(entry, wrap, limit, [len(part) / weight])


# A leaf of a snapshot's node hardly takes fewer bytes than the first figure as it travels (a
# key in quotes, a packed stamp of a wall-clock hlc, 17 digits, and a value), and usually
# about the second. (A node guessed too long is only cut in pieces it did not need.)
_LEAF_BYTES_AT_LEAST = 8
LEAF_BYTES_GUESS = 40
PIECE_FILL = 0.75  # parts are aimed at this much of their limit (leaves vary in size)
# Puts a piece of a node back on its path (to the top-level item).
_Wrap = Callable[[list[Any]], list[Any]]
# Puts a piece of a node's children (and leaves, values) back on the node's path.
_Within = Callable[..., list[Any]]


def learn_piece_size(budget: list[int], item: list[Any], encoded: list[bytes], limit: int) -> None:
    """Set ``budget[0]``, the leaves a piece of a long item should hold (``Store.export_pieces``),
    from the last one: ``item``, ``encoded`` in parts of at most ``limit`` bytes."""
    entry = item[1]
    if type(entry) is list and len(entry) >= 8:
        scale = max(1.0, sum(map(len, encoded)) / _weight(entry))
        budget[0] = max(1, int(limit * PIECE_FILL / scale))


def _weight(entry: list[Any]) -> int:
    """A full node's size in units of about one leaf: its leaves, and itself and its
    children's, recursively."""
    return 1 + len(entry[6]) + sum(map(_weight, entry[5].values()))


def _node_parts(entry: list[Any], wrap: _Wrap, limit: int, scale: list[float]) -> Iterator[bytes]:
    """The parts of a full node (see ``encode_snapshot_parts``); ``wrap`` puts a piece of it
    back on its path, ``scale`` (bytes per unit of ``_weight``) is learnt as parts are
    made."""
    a, av, d, imax, incs, children, leaves, values, *ttls = entry
    yield encode_snapshot_item(wrap([a, av, d, imax, incs, {}, {}, {}, *ttls]))
    # What the other pieces say of the node: enough to make it a dict where it is one. (Its
    # own leaf value, if it held one before the writes below, goes with the first only.)
    small = type(av) is int
    head = [a if small else None, av if small else 0, d, imax, []]

    def within(
        piece_children: dict[str, Any],
        piece_leaves: dict[str, int] | None = None,
        piece_values: dict[str, Any] | None = None,
    ) -> list[Any]:
        return wrap([*head, piece_children, piece_leaves or {}, piece_values or {}])

    # The leaves in chunks of about the limit (how many is learnt as they go), in the order
    # they travel in: those with a value in the order of ``values``, then the tombstones.
    names = list(values)
    valued = len(names)
    if valued < len(leaves):
        names += [k for k in leaves if k not in values]
    # (Read in order, not looked up one by one: a lookup in a big dict is a cache miss.)
    stamps = list(leaves.values()) if names == list(leaves) else [leaves[k] for k in names]
    data = list(values.values())
    count = max(1, int(limit * PIECE_FILL / scale[0]))
    start = 0
    while start < len(names):
        end = min(start + count, len(names))
        keys = names[start:end]
        piece_values = dict(zip(keys, data[start:end])) if start < valued else {}
        part = encode_snapshot_item(within({}, dict(zip(keys, stamps[start:end])), piece_values))
        if len(part) > limit and end - start > 1:
            count = max(1, (end - start) // 2)
            continue
        yield part
        scale[0] = len(part) / (end - start)
        count = max(1, min(2 * count, int(limit * PIECE_FILL / scale[0])))
        start = end
    group: dict[str, Any] = {}
    weight = 0
    for name, child in children.items():
        child_weight = _weight(child)
        if child_weight * scale[0] > limit * PIECE_FILL:
            yield from _child_parts(name, child, within, limit, scale)
            continue
        group[name] = child
        weight += child_weight
        if weight * scale[0] >= limit * PIECE_FILL:
            yield from _group_parts(group, weight, within, limit, scale)
            group = {}
            weight = 0
    if group:
        yield from _group_parts(group, weight, within, limit, scale)


def _child_parts(
    name: str, child: list[Any], within: _Within, limit: int, scale: list[float]
) -> Iterator[bytes]:
    """The parts of one child of a node being split (``within`` wraps it)."""

    def wrap(piece: list[Any]) -> list[Any]:
        return within({name: piece})

    yield from _node_parts(child, wrap, limit, scale)


def _group_parts(
    group: dict[str, Any], weight: int, within: _Within, limit: int, scale: list[float]
) -> Iterator[bytes]:
    """Children of a node being split, as one part, or halves when that is too long."""
    part = encode_snapshot_item(within(group))
    if len(part) <= limit:
        scale[0] = len(part) / weight
        yield part
    elif len(group) == 1:
        [(name, child)] = group.items()
        yield from _child_parts(name, child, within, limit, scale)
    else:
        names = list(group)
        for half in (names[: len(names) // 2], names[len(names) // 2 :]):
            part_group = {name: group[name] for name in half}
            yield from _group_parts(
                part_group, sum(map(_weight, part_group.values())), within, limit, scale
            )


def _leaves_as_columns(node: list[Any]) -> list[Any]:
    """A full node of ``Store.export()`` as it travels (its children too)."""
    a, av, d, imax, incs, children, leaves, values, *ttls = node
    if children:
        children = {key: _leaves_as_columns(child) for key, child in children.items()}
    # (The keys of ``values`` are among those of ``leaves``: the same when as many.)
    keys = list(values)
    if len(keys) != len(leaves):
        keys += [key for key in leaves if key not in values]  # tombstones last
    if keys == list(leaves):  # (the usual order: compared by identity first, in C)
        stamps = list(leaves.values())
    else:
        stamps = list(map(leaves.__getitem__, keys))
    origins, packed = pack_stamps(stamps)
    return [a, av, d, imax, incs, children, [origins, keys, packed], [*values.values()], *ttls]


def join_snapshot(parts: list[bytes]) -> bytes:
    """A SNAPSHOT frame of items encoded one by one (so a node can size its frames)."""
    return b"[2,[" + b",".join(parts) + b"]]\n"


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
    if type(flags) is not int or flags < 0:
        raise ProtocolError("HELLO has bad flags")
    return Hello(node_id, host, port, flags)


_SCALARS = {str, int, bool, type(None)}
_KINDS = {0, 1, 2}
_COUNTS = {0, 1}  # SET and INCREMENT: an int is a good value for both (a web app's counter)
_INT = {int}
_FLAT = _SCALARS | {dict}  # the types of values ``_flat_dicts_fit`` checks


def parse_ops(
    message: list[Any],
) -> tuple[int, int, OpStamps, list[int], list[str | list[str]], list[Any], list[int] | None, str]:
    """Check an OPS frame fully: ``(origin, seq, stamps, ops, paths, values, ttls, parent)``,
    with the stamps (an ``OpStamps``: made when read) and kinds of every operation, each path
    as it travels (dotted, or a list of segments when one holds a dot; ``path_segments``
    turns it into segments) and relative to ``parent`` (``full_paths`` puts it back),
    ``ttls`` None when no operation has one; or ``ProtocolError`` (before anything in it is
    applied).

    The common case (dotted paths, scalar values) is checked a column at a time, in C.
    """
    if len(message) != 9:
        raise ProtocolError("OPS frame has the wrong length")
    _, origin, seq, deltas, ops, parent, paths, values, ttls = message
    # Node ids have the top bit clear; stamps with it set are derived (expiries), never sent.
    if type(origin) is not int or not 0 < origin < DERIVED_BIT:
        raise ProtocolError("OPS frame has a bad origin")
    if type(deltas) is not list or not deltas:
        raise ProtocolError("OPS frame has no operations")
    size = len(deltas)
    if type(seq) is not int or not 0 < seq < _MAX_SEQ - size:
        raise ProtocolError("OPS frame has a bad sequence number")
    kinds: set[Any]  # the kinds of operation, or first their types
    if type(ops) is int and ops in _KINDS:
        kinds = {ops}
        ops = [ops] * size
    elif type(ops) is list:
        kinds = set(map(type, ops))
        if kinds == {int}:
            kinds = set(ops)
        if not kinds <= _KINDS:
            bad = next(op for op in ops if type(op) is not int or op not in _KINDS)
            raise ProtocolError(f"unknown operation {bad!r}")
    else:
        raise ProtocolError(f"unknown operation {ops!r}")
    if not (type(paths) is list and type(values) is list) or not (
        len(ops) == len(paths) == len(values) == size
    ):
        raise ProtocolError("OPS frame has columns of different lengths")
    # Ints growing along the batch, as an origin's stamps do: what ``Progress`` relies on.
    if (
        set(map(type, deltas)) != {int}
        or deltas[0] <= 0
        or (size > 1 and min(islice(deltas, 1, None)) <= 0)
    ):
        raise ProtocolError("OPS frame has a bad stamp")
    stamps = OpStamps(origin, deltas)
    if stamps.last >> NODE_BITS >= HLC_LIMIT:
        raise ProtocolError("OPS frame has a bad stamp")
    if type(parent) is not str:
        raise ProtocolError("OPS frame has a bad parent")
    if parent:
        _check_paths([parent])
        if parent.count(".") + 1 >= MAX_DEPTH:
            raise ProtocolError("OPS frame has a bad path")
        try:
            if "" in paths or "." in "".join(paths):
                raise ProtocolError("OPS frame has a bad key under its parent")
        except TypeError:
            raise ProtocolError("OPS frame has a bad key under its parent") from None
    else:
        _check_paths(paths)
    if ttls is not None:
        _check_op_ttls(ttls, ops, kinds)
    value_types = set(map(type, values))
    if value_types <= _SCALARS and (kinds == {0} or (value_types <= _INT and kinds <= _COUNTS)):
        pass  # SETs of plain scalars, or SETs and INCREMENTs of ints: nothing more to check
    elif (
        kinds == {0}
        and value_types <= _FLAT
        and _flat_dicts_fit(values, value_types, parent, paths)
    ):
        pass  # SETs of scalars and dicts of them (sessions), each fitting under MAX_DEPTH
    else:
        check_op_values(ops, paths, values, parent)
    return origin, seq, stamps, ops, paths, values, ttls, parent


def check_op_values(ops: list[int], paths: list[Any], values: list[Any], parent: str) -> None:
    """An OPS frame's values checked one operation at a time (``parse_ops``' general way,
    for the frames its column checks do not clear): a SET's JSON, nested no deeper than its
    path allows; an INCREMENT's number; a DELETE's null."""
    # (A value's nesting counts on from its path's segments: see ``MAX_DEPTH``.)
    under = parent.count(".") + 1 if parent else 0
    for op, path, value in zip(ops, paths, values):
        kind = type(value)
        if op == 0:
            if kind not in _SCALARS:
                depth = path.count(".") + 1 if type(path) is str else len(path)
                _check_json(value, under + depth)
        elif op == 1:
            if not (kind is int or (kind is float and math.isfinite(value))):
                raise ProtocolError("INCREMENT amount is not a number")
        elif value is not None:
            raise ProtocolError("DELETE carries a value")


def _flat_dicts_fit(
    values: list[Any], value_types: set[type], parent: str, paths: list[Any]
) -> bool:
    """Whether every dict among ``values`` (of SETs at ``paths`` under ``parent``) holds
    only scalars other than floats, none at a path too deep for it (``_check_json``'s rule:
    a dict at ``MAX_DEPTH`` segments or more is too deep). Checked a column at a time, in
    C; False when not so, without telling where (the general check then does)."""
    if parent:
        # (Its keys are one segment each, checked before; it is short enough for them.)
        depth = parent.count(".") + 2
    else:
        try:
            depth = max(map(str.count, paths, repeat("."))) + 1
        except TypeError:
            return False  # a path given as segments
    if depth >= MAX_DEPTH:
        return False
    dicts = values if len(value_types) == 1 else [v for v in values if type(v) is dict]
    return set(map(type, chain.from_iterable(map(dict.values, dicts)))) <= _SCALARS


class OpStamps(Sequence[int]):
    """The stamps of an OPS frame's operations, each made when read: a store keeps a bulk
    of new keys' stamps unread for as long as nothing asks (see ``_tree``), and a 128-bit
    int costs two big-int operations to make. ``first`` and ``last`` are at hand."""

    __slots__ = ("origin", "deltas", "first", "last")

    def __init__(self, origin: int, deltas: list[int]) -> None:
        self.origin = origin
        self.deltas = deltas  # (checked by ``parse_ops``: ints, each >= 1)
        self.first = (deltas[0] << NODE_BITS) | origin
        self.last = (sum(deltas) << NODE_BITS) | origin

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self) -> Iterator[int]:
        # Each stamp is (hlc << NODE_BITS) | origin = origin + the deltas so far, shifted: C-level.
        return islice(
            accumulate(map(lshift, self.deltas, repeat(NODE_BITS)), initial=self.origin), 1, None
        )

    def __getitem__(self, index: Any) -> Any:
        if index == 0:
            return self.first
        if index == -1:
            return self.last
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"OpStamps({list(self)!r})"


def _check_op_ttls(ttls: Any, ops: list[int], kinds: set[int]) -> None:
    """The ttl column: one int per operation, 0 (none) or a ttl in ms on a SET or INCREMENT
    (``kinds``: those of ``ops``). Checked a column at a time, in C."""
    if type(ttls) is not list or len(ttls) != len(ops) or set(map(type, ttls)) != _INT:
        raise ProtocolError("OPS frame has a bad ttl column")
    if min(ttls) < 0 or max(ttls) > MAX_TTL_MS:
        raise ProtocolError("OPS frame has a bad ttl")
    if 2 in kinds and any(ttl for op, ttl in zip(ops, ttls) if op == 2):
        raise ProtocolError("OPS frame has a bad ttl")  # (a DELETE carries none)


def path_segments(path: str | list[str]) -> list[str]:
    """The segments of a path as ``parse_ops`` returns it."""
    return path.split(".") if isinstance(path, str) else path


def _check_paths(paths: list[Any]) -> None:
    """``ProtocolError`` unless every path is a good dotted string or list of segments."""
    try:
        joined = ".".join(paths)
    except TypeError:
        joined = ""  # some path is a list (or junk): checked one by one below
    # Joined with dots, an empty path or segment anywhere shows as ".." or a dot at an end.
    if joined and ".." not in joined and joined[0] != "." and joined[-1] != ".":
        # Too deep means MAX_DEPTH dots or more, so (no segment being empty) at least twice
        # as many characters: only a long path needs its dots counted.
        if (
            joined.count(".") >= MAX_DEPTH
            and max(map(len, paths)) > 2 * MAX_DEPTH
            and max(p.count(".") for p in paths) >= MAX_DEPTH
        ):
            raise ProtocolError("OPS frame has a bad path")
        return
    for path in paths:
        if type(path) is str:
            if not path or ".." in path or path[0] == "." or path[-1] == ".":
                raise ProtocolError("OPS frame has a bad path segment")
            depth = path.count(".") + 1
        elif type(path) is list and path:
            for segment in path:
                if type(segment) is not str or not segment:
                    raise ProtocolError("OPS frame has a bad path segment")
            depth = len(path)
        else:
            raise ProtocolError("OPS frame has a bad path")
        if depth > MAX_DEPTH:
            raise ProtocolError("OPS frame has a bad path")


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
        if type(seq) is not int or not 0 <= seq < _MAX_SEQ:
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


def parse_snapshot_items(items: Any) -> tuple[list[Any], int]:
    """Check a SNAPSHOT frame's payload fully before any of it is merged, and turn it (in
    place) into items of ``Store.export()`` for ``Store.merge`` (a full node's values back
    into a dict, its leaves' stamps a ``LeafColumns``): ``(items, the newest stamp of an
    operation in them)`` (0 when there is none). The items are for one merge: the store
    keeps such a node's values dict as its own."""
    if type(items) is not list:
        raise ProtocolError("SNAPSHOT payload is not a list")
    newest = 0
    for item in items:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not str or not item[0]:
            raise ProtocolError("SNAPSHOT item is not [key, entry]")
        newest = max(newest, _check_entry(item[1], 1))
    return items, newest


def _check_stamp(stamp: Any, optional: bool) -> int:
    """``stamp`` (0 for an optional one that is None), or ``ProtocolError``."""
    if stamp is None and optional:
        return 0
    if type(stamp) is not int or not 0 < stamp < STAMP_LIMIT:
        raise ProtocolError("SNAPSHOT entry has a bad stamp")
    return stamp


def _check_entry(entry: Any, depth: int) -> int:
    """Check (and convert, see ``parse_snapshot_items``) one entry; its newest stamp."""
    if depth > MAX_DEPTH:
        raise ProtocolError("SNAPSHOT entry is nested too deeply")
    if type(entry) is int:
        return _check_stamp(entry, False)
    if type(entry) is not list:
        raise ProtocolError("SNAPSHOT entry has the wrong shape")
    if len(entry) == 2:
        _check_json(entry[1], depth)
        return _check_stamp(entry[0], False)
    if len(entry) == 9:
        _check_ttls(entry[8])
    elif len(entry) != 8:
        raise ProtocolError("SNAPSHOT entry has the wrong shape")
    a, av, d, imax, incs, children, leaves, values = entry[:8]
    # (The expiries of ttl events are derived stamps, not operations: not among the newest.)
    newest = max(_check_stamp(a, True), _check_stamp(d, True), _check_stamp(imax, True))
    if type(av) is list and len(av) == 1:
        _check_json(av[0], depth)
    elif not (type(av) is int and av in (0, 1)):
        raise ProtocolError("SNAPSHOT entry has a bad assignment")
    if type(incs) is not list:
        raise ProtocolError("SNAPSHOT entry has bad increments")
    for inc in incs:
        if type(inc) is not list or len(inc) != 2:
            raise ProtocolError("SNAPSHOT entry has bad increments")
        newest = max(newest, _check_stamp(inc[0], False))
        kind = type(inc[1])
        if not (kind is int or (kind is float and math.isfinite(inc[1]))):
            raise ProtocolError("SNAPSHOT increment is not a number")
    if type(children) is not dict:
        raise ProtocolError("SNAPSHOT entry has bad children")
    for child in children.values():  # keys may be "" (from a dict value), never a path
        if type(child) is not list or len(child) not in (8, 9):
            raise ProtocolError("SNAPSHOT entry has a child that is not a full node")
        newest = max(newest, _check_entry(child, depth + 1))
    # Checked a column at a time, in C: a big tree is mostly leaves.
    leaves, values = _leaves_from_columns(leaves, values)
    if leaves and depth >= MAX_DEPTH:  # (its leaves' paths are one segment longer)
        raise ProtocolError("SNAPSHOT entry is nested too deeply")
    entry[6] = leaves
    entry[7] = values
    if leaves and not (
        values.keys().isdisjoint(children) and children.keys().isdisjoint(leaves.tombstones())
    ):
        raise ProtocolError("SNAPSHOT entry has a key that is both a leaf and a node")
    if not set(map(type, values.values())) <= _SCALARS:
        for value in values.values():
            _check_json(value, depth + 1)
    return max(newest, leaves.newest)


_NO_LEAVES = LeafColumns([], [], [], 0, 0, 0)


def _leaves_from_columns(columns: Any, values: Any) -> tuple[LeafColumns, dict[str, Any]]:
    """The leaves of a full node from their columns, checked (each key once, a stamp in
    range, no more values than keys): their ``LeafColumns`` and ``{key: value}`` for those
    with a value. C-level passes but one."""
    if type(columns) is not list or len(columns) != 3 or type(values) is not list:
        raise ProtocolError("SNAPSHOT entry has bad leaves")
    origins, keys, packed = columns
    if not (type(origins) is list and type(keys) is list and type(packed) is list) or not (
        len(keys) == len(packed) >= len(values)
    ):
        raise ProtocolError("SNAPSHOT entry has bad leaves")
    if not keys:
        return _NO_LEAVES, {}
    try:
        "".join(keys)  # only str joins
    except TypeError:
        raise ProtocolError("SNAPSHOT entry has a bad leaf key") from None
    if set(map(type, packed)) != {int}:
        raise ProtocolError("SNAPSHOT entry has a bad stamp")
    count = len(origins)
    # Real low halves (origins, or derived ones) are never 0, so no stamp below is 0.
    if count and (
        count > MAX_LEAF_ORIGINS
        or set(map(type, origins)) != {int}
        or min(origins) <= 0
        or max(origins) > NODE_MASK
        or len(set(origins)) != count
    ):
        raise ProtocolError("SNAPSHOT entry has bad leaf origins")
    low, high = min(packed), max(packed)
    if low < (0 if count else 1) or high >= (HLC_LIMIT * count if count else STAMP_LIMIT):
        raise ProtocolError("SNAPSHOT entry has a bad stamp")
    if count == 1:
        lowest = low << NODE_BITS | origins[0]
        newest = high << NODE_BITS | origins[0]
    elif count:
        lowest = (low // count) << NODE_BITS  # (below the real lowest: no origin is 0)
        newest = max(unpack_stamps(packed, origins))
    else:
        lowest = low
        newest = high
    valued = dict(zip(keys, values))
    tombstones = keys[len(values) :]
    if len(valued) != len(values) or (
        tombstones
        and (len(set(tombstones)) != len(tombstones) or not valued.keys().isdisjoint(tombstones))
    ):
        raise ProtocolError("SNAPSHOT entry has a leaf twice")
    column = packed_column(packed, origins)  # (the ints freed now, not when merged)
    return LeafColumns(keys, origins, column, len(values), lowest, newest), valued


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
            stamp & DERIVED_BIT
            or expiry & NODE_MASK != DERIVED_BIT | (stamp & NODE_MASK)
            or not 0 < (expiry >> MILLIS_SHIFT) - (stamp >> MILLIS_SHIFT) <= MAX_TTL_MS
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
