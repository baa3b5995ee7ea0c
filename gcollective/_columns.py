"""The column forms that the wire codec and the store share.

A SNAPSHOT carries a full node's plain leaves as columns (see ``_wire``'s table): the keys,
and their stamps *packed* into small ints (``pack_stamps``). The codec checks them into a
``LeafColumns``; the store keeps the packed column as it is, unread, until something asks
for a leaf's stamp (``_Node.runs`` in ``_tree``), and unpacks it then (``unpack_stamps``).
An OPS frame may name the parent of its paths once (``full_paths`` puts it back).

This module depends on nothing but the stamp layout (``_clock``), so that the store and the
codec can both import it without importing each other.
"""

from __future__ import annotations

from array import array
from itertools import repeat
from operator import and_, rshift
from typing import Any, Sequence, final

from ._clock import NODE_BITS, NODE_MASK

__all__ = [
    "LeafColumns",
    "MAX_LEAF_ORIGINS",
    "Run",
    "full_paths",
    "pack_stamps",
    "packed_column",
    "unpack_stamps",
]

# The most distinct low halves (origins) among one node's leaves whose stamps are packed: the
# packed ints stay below 2**63 (ujson's fast range) while hlcs are below 2**57 (wall-clock
# milliseconds below 2**41: until 2039; later ones are bigger ints, as correct, a bit slower).
MAX_LEAF_ORIGINS = 64
_UINT64_MAX = (1 << 64) - 1  # what an array("Q") holds

#: Leaves kept unread on a node: ``(keys, stamps, origins)``. Either the stamps themselves
#: (a list, or a frame's ``OpStamps``, made when iterated) and origins None, or a packed
#: column (a sequence of ints or uint64 ``bytes``) and its origins, for ``unpack_stamps``; or
#: new sessions, their stamps and a ``_tree.Sessions`` (their ttls).
Run = tuple[Sequence[str], Any, Any]


def full_paths(parent: str, paths: list[Any]) -> list[Any]:
    """The paths of an OPS frame (as ``parse_ops`` returns them) with their parent put back."""
    if not parent:
        return paths
    head = parent + "."
    return [head + key for key in paths]


def pack_stamps(stamps: list[int]) -> tuple[list[int], list[int]]:
    """``(origins, packed)`` for a leaf column: each stamp as ``hlc * len(origins) + i``
    where ``origins[i]`` is its origin half, or the stamps themselves (and no origins) when
    they have more than ``MAX_LEAF_ORIGINS`` origins. (Small ints: a JSON codec reads and
    writes them three times faster than 128-bit stamps.)"""
    origins = list(set(map(and_, stamps, repeat(NODE_MASK))))
    if len(origins) == 1:  # (the usual case: one writer's keys)
        return origins, list(map(rshift, stamps, repeat(NODE_BITS)))
    if len(origins) <= MAX_LEAF_ORIGINS:
        count = len(origins)
        index = {origin: i for i, origin in enumerate(origins)}
        shift = NODE_BITS
        return origins, [(stamp >> shift) * count + index[stamp & NODE_MASK] for stamp in stamps]
    return [], stamps


def unpack_stamps(packed: Sequence[int] | bytes, origins: Sequence[int]) -> list[int]:
    """A leaf column's stamps from their packed form (``pack_stamps``): ``packed`` a
    sequence of ints, or ``bytes`` of native uint64 (``LeafColumns.as_run``)."""
    if type(packed) is bytes:
        packed = memoryview(packed).cast("Q")
    count = len(origins)
    shift = NODE_BITS  # (a local: read once per leaf of a joiner's millions)
    if count == 1:
        origin = origins[0]
        return [hlc << shift | origin for hlc in packed]
    if count:
        return [(p // count) << shift | origins[p % count] for p in packed]
    return list(packed)  # (full stamps)


def packed_column(packed: list[int] | bytes, origins: Sequence[int]) -> list[int] | bytes:
    """A packed column (``pack_stamps``) as it is kept: native uint64 ``bytes`` when it fits,
    8 bytes a leaf instead of an int object and a list slot; else as it is (full stamps)."""
    if type(packed) is bytes or not origins:
        return packed
    if len(origins) == 1 or max(packed) <= _UINT64_MAX:  # (one origin: an hlc fits)
        return array("Q", packed).tobytes()
    return packed


@final
class LeafColumns:
    """A full node's plain leaves as a SNAPSHOT brings them (checked): ``names`` (the keys
    with a value first, then the tombstones) and their stamps in the same order, packed
    (``unpack_stamps``; the codec keeps them as ``packed_column`` does, so that a stream
    staged until its end holds 8 bytes a stamp, not an int object); ``as_dict()`` is the
    ``{key: stamp}`` of ``Store.export()``. A store installing a new node keeps them packed
    (``as_run``, see ``_Node.runs``), and the node's values dict that came with them as it
    is (made by ``parse_snapshot_items`` for this one merge): making a 128-bit int and a
    dict entry per leaf was most of a joiner's work."""

    __slots__ = ("names", "origins", "packed", "valued", "lowest", "newest")

    def __init__(
        self,
        names: list[str],
        origins: list[int],
        packed: list[int] | bytes,
        valued: int,
        lowest: int,
        newest: int,
    ) -> None:
        self.names = names
        self.origins = origins  # (none: ``packed`` holds full stamps)
        self.packed = packed
        self.valued = valued  # how many of ``names`` hold a value (the first ones)
        self.lowest = lowest  # no stamp is below this
        self.newest = newest  # the newest stamp (0 when there are none)

    @property
    def stamps(self) -> list[int]:
        """The stamps, in the order of ``names``."""
        return unpack_stamps(self.packed, self.origins)

    def as_run(self, count: int | None = None) -> Run:
        """``(names, packed stamps, origins)`` of the first ``count`` leaves (all by default)
        to keep, for ``unpack_stamps`` (origins None for full stamps). Only atomic objects
        in tuples, which the cyclic GC stops tracking: it visits every item of a list on
        each full collection, a cache miss each, and a joiner's 2M leaves kept in lists cost
        it more time than they saved. The column is uint64 bytes when it fits (see
        ``packed_column``)."""
        names, origins, packed = tuple(self.names), self.origins, self.packed
        if count is not None and count < len(names):
            names = names[:count]
            packed = packed[: count * 8] if type(packed) is bytes else packed[:count]
        if not packed:
            return names, (), None
        if not origins:
            return names, tuple(packed), None
        packed = packed_column(packed, origins)
        return names, packed if type(packed) is bytes else tuple(packed), tuple(origins)

    def tombstones(self) -> list[str]:
        """The names of the leaves without a value."""
        return self.names[self.valued :]

    def as_dict(self) -> dict[str, int]:
        """``{key: stamp}``."""
        return dict(zip(self.names, self.stamps))

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LeafColumns):
            other = other.as_dict()
        if not isinstance(other, dict):
            return NotImplemented
        return self.as_dict() == other

    def __repr__(self) -> str:
        return f"LeafColumns({self.as_dict()!r})"
