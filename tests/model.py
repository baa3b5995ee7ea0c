"""Reference model of the replicated store's consistency contract.

The model is deliberately naive: a replica's tree is *defined* as the result of folding every
distinct operation it received, once, in ascending stamp order, over an empty dict. The real
store (``gcollective._store``) may use any clever metadata it likes, but its observable tree must
always equal :func:`fold` of the operations it has seen. Nothing here is optimised; clarity is
the point, because the property tests trust this file as the oracle.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

# Operation codes; they must match the store's public constants.
SET = 0
INCREMENT = 1
DELETE = 2

OP_NAMES = {SET: "SET", INCREMENT: "INCREMENT", DELETE: "DELETE"}

Path = tuple[str, ...]


class Op(NamedTuple):
    """One replicated operation.

    ``value`` is the JSON value for SET, the (non-bool) int/float amount for INCREMENT and
    ``None`` for DELETE. The stamp identifies the operation: two ``Op``s with the same stamp are
    the same operation delivered twice.
    """

    stamp: int
    op: int
    path: Path
    value: Any = None
    ttl: int | None = None  # milliseconds, SET and INCREMENT only

    def __repr__(self) -> str:
        # Compact form so hypothesis falsifying examples read like the contract's notation.
        name = OP_NAMES.get(self.op, str(self.op))
        ttl = "" if self.ttl is None else f", ttl={self.ttl}"
        return f"Op({self.stamp}, {name}, {self.path!r}, {self.value!r}{ttl})"


class _Missing:
    """Sentinel type for "no value at this path" (distinct from a stored ``None``)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def is_number(value: Any) -> bool:
    """Return True for ints and floats, excluding bools (``True`` is an ``int`` in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _walk_creating(tree: dict, parents: Path) -> dict:
    """Walk ``parents`` from ``tree``, replacing missing or non-dict children with ``{}``."""
    node = tree
    for segment in parents:
        child = node.get(segment)
        if not isinstance(child, dict):
            child = {}
            node[segment] = child
        node = child
    return node


def apply_op(tree: dict, op: int, path: Path, value: Any = None) -> None:
    """Apply one operation to ``tree`` in place, exactly as the contract specifies."""
    if not path:
        raise ValueError("path must be a non-empty tuple")
    parents, leaf = path[:-1], path[-1]
    if op == SET:
        node = _walk_creating(tree, parents)
        # Deep copy so later mutation of the caller's value (or of the tree) cannot alias.
        node[leaf] = copy.deepcopy(value)
    elif op == INCREMENT:
        if not is_number(value):
            raise TypeError(f"INCREMENT amount must be int or float, got {value!r}")
        node = _walk_creating(tree, parents)
        current = node.get(leaf)
        node[leaf] = current + value if is_number(current) else value
    elif op == DELETE:
        node = tree
        for segment in parents:
            child = node.get(segment)
            if not isinstance(child, dict):
                return  # Nothing to delete below a missing or non-dict ancestor.
            node = child
        node.pop(leaf, None)
    else:
        raise ValueError(f"unknown op code {op!r}")


def distinct_ops(ops: Iterable[Op]) -> list[Op]:
    """Return one ``Op`` per stamp, sorted by stamp (duplicates are the same operation)."""
    by_stamp: dict[int, Op] = {}
    for operation in ops:
        by_stamp.setdefault(operation.stamp, operation)
    return [by_stamp[stamp] for stamp in sorted(by_stamp)]


EXPIRE = 3  # the derived operation of a ttl operation, at its derived stamp


def expiry_of(stamp: int, ttl_ms: int) -> tuple[int, int]:
    """``(E, D)``: the expiry time in milliseconds of an operation at ``stamp`` with a ttl of
    ``ttl_ms``, and the derived stamp of its EXPIRE, ``((E << 16) << 64) | 2**63 | origin``.
    Written out here independently of ``gcollective._clock`` on purpose."""
    expires = (stamp >> 80) + ttl_ms
    return expires, ((expires << 16) << 64) | (1 << 63) | (stamp & ((1 << 64) - 1))


def _under(path: Path, prefix: Path) -> bool:
    return path[: len(prefix)] == prefix


def fold(ops: Iterable[Op], now_ms: float | None = None) -> dict:
    """Materialise the tree a replica must hold after receiving ``ops`` (any order, any dups)
    when its clock reads ``now_ms`` (None: no expiry has fired yet).

    Each ttl operation X implies an EXPIRE at its derived stamp D(X), part of the fold once
    ``now_ms`` reaches X's expiry time. Along the fold each path has at most one expiry
    owner: SET and DELETE at p clear the owners at and under p (a SET with ttl then owns p);
    INCREMENT at p clears the owners strictly under p and, with a ttl, owns p; writes below
    p leave p's owner alone. EXPIRE D(X) deletes p (as a DELETE at D(X)) only if X still
    owns p.
    """
    events: list[tuple[int, int, Path, Any, Any]] = []
    for operation in distinct_ops(ops):
        events.append((operation.stamp, operation.op, operation.path, operation.value, None))
        if operation.ttl is not None and now_ms is not None:
            expires, derived = expiry_of(operation.stamp, operation.ttl)
            if expires <= now_ms:
                events.append((derived, EXPIRE, operation.path, None, operation.stamp))
    events.sort(key=lambda event: event[0])
    tree: dict = {}
    owner: dict[Path, int] = {}
    ttl_stamps = {o.stamp for o in distinct_ops(ops) if o.ttl is not None}

    def clear(prefix: Path, strictly: bool) -> None:
        for path in [p for p in owner if _under(p, prefix)]:
            if not (strictly and path == prefix):
                del owner[path]

    for stamp, op, path, value, origin_op in events:
        if op == EXPIRE:
            if owner.get(path) == origin_op:
                apply_op(tree, DELETE, path)
                clear(path, strictly=False)
            continue
        apply_op(tree, op, path, value)
        if op in (SET, DELETE):
            clear(path, strictly=False)
            if op == SET and stamp in ttl_stamps:
                owner[path] = stamp
        else:  # INCREMENT
            clear(path, strictly=True)
            if stamp in ttl_stamps:
                owner[path] = stamp
    return tree


def lookup(tree: dict, path: Path, default: Any = None) -> Any:
    """Return the value at ``path`` or ``default`` when it, or any ancestor dict, is missing.

    A non-dict intermediate (list, number, ...) also yields ``default``: paths only descend
    through dicts.
    """
    node: Any = tree
    for segment in path:
        if not isinstance(node, dict) or segment not in node:
            return default
        node = node[segment]
    return node


def strict_equal(left: Any, right: Any) -> bool:
    """Type-strict structural equality.

    Plain ``==`` conflates ``1``, ``1.0`` and ``True`` (and ``0.0`` with ``-0.0``); a store that
    turned an int counter into a float, or stored ``True`` for ``1``, would slip through. Floats
    are compared bit-for-bit via ``float.hex`` so the exact summation order is checked too.
    """
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(
            strict_equal(left[key], right[key]) for key in left
        )
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(
            strict_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, float):
        if math.isnan(left) or math.isnan(right):
            return math.isnan(left) and math.isnan(right)
        return left.hex() == right.hex()
    return left == right


def first_difference(left: Any, right: Any, where: str = "") -> str | None:
    """Describe the first place where ``strict_equal`` fails, for readable assertion messages."""
    if type(left) is not type(right):
        left_type, right_type = type(left).__name__, type(right).__name__
        return f"at {where or '<root>'}: {left!r} ({left_type}) != {right!r} ({right_type})"
    if isinstance(left, dict):
        for key in sorted(left.keys() | right.keys(), key=repr):
            if key not in left:
                return f"at {where}/{key}: missing on the left, right has {right[key]!r}"
            if key not in right:
                return f"at {where}/{key}: left has {left[key]!r}, missing on the right"
            found = first_difference(left[key], right[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(left, (list, tuple)):
        if len(left) != len(right):
            return f"at {where or '<root>'}: lengths {len(left)} != {len(right)}"
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            found = first_difference(a, b, f"{where}[{index}]")
            if found:
                return found
        return None
    if not strict_equal(left, right):
        return f"at {where or '<root>'}: {left!r} != {right!r}"
    return None
