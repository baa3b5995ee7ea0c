"""SNAPSHOT frames (the format is in ``_wire``'s docstring), sans-IO: a slice of
``Store.export()`` encoded, a node too long for one frame cut in pieces, and a received
frame's items checked fully and turned back into items for ``Store.merge``."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import ujson

from ._clock import DERIVED_BIT, HLC_LIMIT, MILLIS_SHIFT, NODE_BITS, NODE_MASK, STAMP_LIMIT
from ._columns import (
    MAX_LEAF_ORIGINS,
    LeafColumns,
    pack_stamps,
    packed_column,
    unpack_stamps,
)
from ._errors import ProtocolError
from ._validate import MAX_DEPTH
from ._wire import JSON_SCALARS, MAX_TTL_MS, check_json

__all__ = [
    "encode_snapshot",
    "encode_snapshot_item",
    "encode_snapshot_parts",
    "learn_piece_size",
    "LEAF_BYTES_GUESS",
    "PIECE_FILL",
    "join_snapshot",
    "parse_snapshot_items",
]

_dumps = ujson.dumps


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
        check_json(entry[1], depth)
        return _check_stamp(entry[0], False)
    if len(entry) == 9:
        _check_ttls(entry[8])
    elif len(entry) != 8:
        raise ProtocolError("SNAPSHOT entry has the wrong shape")
    a, av, d, imax, incs, children, leaves, values = entry[:8]
    # (The expiries of ttl events are derived stamps, not operations: not among the newest.)
    newest = max(_check_stamp(a, True), _check_stamp(d, True), _check_stamp(imax, True))
    if type(av) is list and len(av) == 1:
        check_json(av[0], depth)
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
    if not set(map(type, values.values())) <= JSON_SCALARS:
        for value in values.values():
            check_json(value, depth + 1)
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
