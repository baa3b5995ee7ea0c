"""Checking an OPS frame (the format is in ``_wire``'s docstring), sans-IO: ``parse_ops``
checks every column of a decoded frame in as few C-level passes as it can (a writer's loop
of sessions, a ttl column of one ttl, columns of ints), since a receiver runs it for every
frame of every peer; ``OpStamps`` makes the operations' stamps when they are read."""

from __future__ import annotations

import math
from itertools import accumulate, chain, islice, repeat
from operator import countOf, itemgetter, lshift
from typing import Any, Iterator, Sequence

from ._clock import DERIVED_BIT, HLC_LIMIT, NODE_BITS
from ._errors import ProtocolError
from ._validate import MAX_DEPTH
from ._wire import JSON_SCALARS, MAX_SEQ, MAX_TTL_MS, check_json

__all__ = ["LAZY_STAMPS_MIN", "OpStamps", "path_segments", "parse_ops", "check_op_values"]


_KINDS = {0, 1, 2}
_COUNTS = {0, 1}  # SET and INCREMENT: an int is a good value for both (a web app's counter)
_FLAT = JSON_SCALARS | {dict}  # the types of values ``_flat_dicts_fit`` checks
_SETS = {0}  # the kinds of a frame of SETs only
# The fewest operations whose stamps an OPS frame gives as an ``OpStamps`` (made when read);
# a smaller frame's are a list. At most ``_batch._BULK_MIN``, so the store never keeps a
# small frame's list of stamps in a run (see ``_tree``'s ``_Node.runs``).
LAZY_STAMPS_MIN = 16


def parse_ops(
    message: list[Any],
) -> tuple[
    int, int, Sequence[int], list[int], list[str | list[str]], list[Any], list[int] | None, str
]:
    """Check an OPS frame fully: ``(origin, seq, stamps, ops, paths, values, ttls, parent)``,
    with the stamps (a list, or from ``LAZY_STAMPS_MIN`` operations on an ``OpStamps``: made
    when read) and kinds of every operation, each path
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
    if type(seq) is not int or not 0 < seq < MAX_SEQ - size:
        raise ProtocolError("OPS frame has a bad sequence number")
    kinds: set[Any]  # the kinds of operation, or first their types
    if type(ops) is int and ops in _KINDS:
        kinds = {ops}
        ops = [ops] * size
    elif type(ops) is list:
        # (``_all_ints`` inline, here and for the deltas: a call less per frame)
        kinds = set(ops) if countOf(map(type, ops), int) == len(ops) else set(map(type, ops))
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
    # (Ints: the first positive and the others at least 1 is the least at least 1.)
    if countOf(map(type, deltas), int) != size or min(deltas) <= 0 or sum(deltas) >= HLC_LIMIT:
        raise ProtocolError("OPS frame has a bad stamp")
    stamps = OpStamps(origin, deltas) if size >= LAZY_STAMPS_MIN else _stamps(origin, deltas)
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
        ttls = _check_op_ttls(ttls, ops, kinds)
    _check_values(kinds, ops, paths, values, parent)
    return origin, seq, stamps, ops, paths, values, ttls, parent


def _check_values(
    kinds: set[int], ops: list[int], paths: list[Any], values: list[Any], parent: str
) -> None:
    """``parse_ops``' check of the values (the other columns checked, ``kinds`` those of
    ``ops``): the common frames a column at a time, in C; others one operation at a time
    (``check_op_values``)."""
    if kinds == _SETS and type(values[0]) is dict:
        if _alike_flat_dicts(values) and _dicts_fit(parent, paths):
            return  # a writer's loop of sessions (their types need no pass of their own)
    elif kinds <= _COUNTS and _all_ints(values):
        return  # SETs and INCREMENTs of ints (a web app's counters, distinct keys' numbers)
    value_types = set(map(type, values))
    if kinds == _SETS and value_types <= JSON_SCALARS:
        return  # SETs of plain scalars: nothing more to check
    if (
        kinds == _SETS
        and value_types <= _FLAT
        and _flat_dicts_fit(values, value_types, parent, paths)
    ):
        return  # SETs of scalars and dicts of them, each fitting under MAX_DEPTH
    check_op_values(ops, paths, values, parent)


def check_op_values(ops: list[int], paths: list[Any], values: list[Any], parent: str) -> None:
    """An OPS frame's values checked one operation at a time (``parse_ops``' general way,
    for the frames its column checks do not clear): a SET's JSON, nested no deeper than its
    path allows; an INCREMENT's number; a DELETE's null."""
    # (A value's nesting counts on from its path's segments: see ``MAX_DEPTH``.)
    under = parent.count(".") + 1 if parent else 0
    for op, path, value in zip(ops, paths, values):
        kind = type(value)
        if op == 0:
            if kind not in JSON_SCALARS:
                depth = path.count(".") + 1 if type(path) is str else len(path)
                check_json(value, under + depth)
        elif op == 1:
            if not (kind is int or (kind is float and math.isfinite(value))):
                raise ProtocolError("INCREMENT amount is not a number")
        elif value is not None:
            raise ProtocolError("DELETE carries a value")


def _flat_dicts_fit(
    values: list[Any], value_types: set[type], parent: str, paths: list[Any]
) -> bool:
    """Whether every dict among ``values`` (of SETs at ``paths`` under ``parent``) holds
    only scalars other than floats, none at a path too deep for it (``_dicts_fit``).
    Checked a column at a time, in C; False when not so, without telling where (the general
    check then does)."""
    if not _dicts_fit(parent, paths):
        return False
    dicts = values if len(value_types) == 1 else [v for v in values if type(v) is dict]
    return set(map(type, chain.from_iterable(map(dict.values, dicts)))) <= JSON_SCALARS


def _dicts_fit(parent: str, paths: list[Any]) -> bool:
    """Whether a dict of scalars fits at each of ``paths`` under ``parent``
    (``check_json``'s rule: a dict at ``MAX_DEPTH`` segments or more is too deep); False
    too when some path is given as segments (the general check then decides)."""
    if parent:
        # (Its keys are one segment each, checked before; it is short enough for them.)
        return parent.count(".") + 2 < MAX_DEPTH
    try:
        return max(map(str.count, paths, repeat("."))) + 1 < MAX_DEPTH
    except TypeError:
        return False  # a path given as segments


def _all_ints(column: list[Any]) -> bool:
    """Whether every element of ``column`` is an int (not a bool). (Counted in C: cheaper
    than the set of their types.)"""
    return countOf(map(type, column), int) == len(column)


def _alike_flat_dicts(values: list[Any]) -> bool:
    """Whether ``values`` (the first a dict) are all dicts with the first one's keys (one at
    least) and nothing else, each member a str, or each an int or bool (a writer's loop of
    sessions); False when not so, without telling why (the general checks then decide).
    A column of members a key at a time, each checked by one C-level call, is cheaper than
    a look at the type of each member; and getting a member by a str key from each value
    shows it is a dict (any other JSON value refuses), so that needs no pass either."""
    keys = values[0].keys()
    if not keys:
        return False  # (then nothing here would show the others are dicts)
    try:
        if sum(map(len, values)) != len(keys) * len(values):
            return False  # (with each key of the first in each, then no other key in any)
        for key in keys:
            column = list(map(itemgetter(key), values))  # (KeyError where one lacks it)
            try:
                "".join(column)  # only str joins
            except TypeError:
                if type(sum(column)) is not int:  # (ints and bools only; TypeError else)
                    return False
    except (KeyError, TypeError):
        return False
    return True


def _stamps(origin: int, deltas: list[int]) -> list[int]:
    """The stamps of a small frame's operations, made at once: a list's ``len``, indexing and
    iteration are C-level, where each of ``OpStamps``' is a Python call (a receiver's
    bookkeeping reads a frame's stamps several times; web frames carry a few operations)."""
    if len(deltas) == 1:
        return [(deltas[0] << NODE_BITS) | origin]
    stamps = [*accumulate(map(lshift, deltas, repeat(NODE_BITS)), initial=origin)]
    del stamps[0]  # (the origin alone)
    return stamps


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


def _check_op_ttls(ttls: Any, ops: list[int], kinds: set[int]) -> list[int]:
    """The ttl column: one int per operation, 0 (none) or a ttl in ms on a SET or INCREMENT
    (``kinds``: those of ``ops``). Checked a column at a time, in C. Returns the column, as
    one int repeated when every operation has the same ttl (a writer's loop: ``_same_ttls``)."""
    if type(ttls) is not list or len(ttls) != len(ops):
        raise ProtocolError("OPS frame has a bad ttl column")
    same = _same_ttls(ttls)
    if same is not None:
        if 2 in kinds:
            raise ProtocolError("OPS frame has a bad ttl")  # (a DELETE carries none)
        return same
    if not _all_ints(ttls):
        raise ProtocolError("OPS frame has a bad ttl column")
    if min(ttls) < 0 or max(ttls) > MAX_TTL_MS:
        raise ProtocolError("OPS frame has a bad ttl")
    if 2 in kinds and any(ttl for op, ttl in zip(ops, ttls) if op == 2):
        raise ProtocolError("OPS frame has a bad ttl")  # (a DELETE carries none)
    return ttls


def _same_ttls(ttls: list[Any]) -> list[int] | None:
    """``[ttl] * len(ttls)`` when every element of ``ttls`` is the same good ttl, an int from
    2 to ``MAX_TTL_MS`` (a writer's loop); None when not so (the caller's general checks
    decide). Two C-level passes where the general way takes four: ``count`` finds them all
    equal to the first, so each is that int, a bool only if it is 0 or 1, or an equal float,
    which ``sum`` shows (a float makes the sum one). The repeated int the store keeps (with
    a run of sessions) takes no memory per operation."""
    ttl = ttls[0]
    if (
        type(ttl) is int
        and 1 < ttl <= MAX_TTL_MS
        and ttls.count(ttl) == len(ttls)
        and type(sum(ttls)) is int
    ):
        return [ttl] * len(ttls)
    return None


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
