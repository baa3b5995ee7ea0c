"""Digests of a member's tree per top-level key, for ``python -m gcollective verify``.

A member answers a digest query (see ``_wire``'s status query) with its version vector and
one digest per *bucket* of top-level keys (a key's bucket depends on its name only, so the
same key falls in the same bucket everywhere); asked for some buckets in detail, it adds the
digest of every key in them. Comparing members costs a few kilobytes, then a little more for
the buckets that differ: the tree itself never crosses the network.

A key's digest is BLAKE2b over its name and its value's digest (``value_digest``: a leaf's
canonical JSON hashed, a dict's made of its entries' in no particular order); a bucket's is
the XOR of its keys', so it does not depend on the order keys were made in. Computed on
demand, in slices: the walk yields to the hub every ``_SLICE_SECONDS`` (the node's) so that a
2M-key tree delays the member's other work by a few milliseconds at a time (figures in
docs/operations.rst).
"""

from __future__ import annotations

import time
import zlib
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Iterable

import ujson

from ._node import _SLICE_SECONDS, _let_others_run
from ._validate import format_address
from ._wire import DIGEST_BUCKETS

if TYPE_CHECKING:
    from ._node import Collective

__all__ = ["BUCKETS", "bucket_of", "digest_reply", "key_digest", "value_digest"]

#: Buckets of top-level keys in a digest reply (the wire checks requests against it).
BUCKETS = DIGEST_BUCKETS
# Keys digested between two looks at the clock.
_CHECK_EVERY = 256
_MISSING = object()


def bucket_of(key: str) -> int:
    """The bucket of a top-level key (from its name only)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS


class Slicer:
    """Yields to the hub whenever the walk has run ``_SLICE_SECONDS`` since the last yield;
    remembers the longest stretch it ran without yielding."""

    __slots__ = ("began", "count", "longest")

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.count = 0
        self.longest = 0.0

    def tick(self) -> None:
        self.count += 1
        if self.count % _CHECK_EVERY:
            return
        now = time.perf_counter()
        if now - self.began >= _SLICE_SECONDS:
            self.longest = max(self.longest, now - self.began)
            _let_others_run()  # (a whole turn of the loop: timers and sockets too)
            self.began = time.perf_counter()

    def finish(self) -> float:
        return max(self.longest, time.perf_counter() - self.began)


def _hash(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=16).digest(), "big")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def value_digest(value: object, slicer: Slicer | None = None) -> int:
    """The digest of a value: a leaf's canonical JSON, hashed; a dict's, the hash of the
    XOR of its entries' hashes (name and child digest), so that no order is needed and a
    dict of millions of entries is walked in slices (``slicer``) rather than in one go."""
    if type(value) is not dict:
        if slicer is not None:
            slicer.tick()
        return _hash(_encode(ujson.dumps(value, sort_keys=True, ensure_ascii=False)))
    combined = 0
    missing = _MISSING
    # A copy of the names (not of the items: 2M new tuples would wake the cyclic GC), as
    # the walk may yield and the dict change meanwhile (then ``settled`` is false).
    for name in list(value):
        child = value.get(name, missing)
        if child is missing:
            continue
        child_digest = value_digest(child, slicer)
        combined ^= _hash(_encode(name) + b"\0" + child_digest.to_bytes(16, "big"))
    return _hash(b"{" + combined.to_bytes(16, "big") + len(value).to_bytes(8, "big"))


def key_digest(key: str, value: object, slicer: Slicer | None = None) -> int:
    """The digest of one top-level key and its whole subtree, as an int (XOR-able)."""
    return _hash(_encode(key) + b"\0" + value_digest(value, slicer).to_bytes(16, "big"))


def _vector(node: Collective) -> list[list[str | int]]:
    """The version vector: ``[origin (hex), sequence number, stamp]`` for each origin."""
    progress = node._progress
    return [
        [f"{origin:x}", seq, progress.stamps.get(origin, 0)]
        for origin, seq in sorted(progress.applied.items())
    ]


def _walk(data: dict[str, Any], detail: set[int]) -> tuple[list[int], dict[str, str], float]:
    """Bucket digests, the digests of keys in ``detail`` buckets, and the longest slice (in
    seconds) the walk ran without yielding."""
    buckets = [0] * BUCKETS
    keys: dict[str, str] = {}
    slicer = Slicer()
    missing = _MISSING
    for key in list(data):  # a copy: the tree may change while the walk yields
        value = data.get(key, missing)
        if value is missing:
            continue  # deleted meanwhile
        digest = key_digest(key, value, slicer)
        bucket = bucket_of(key)
        buckets[bucket] ^= digest
        if bucket in detail:
            keys[key] = f"{digest:032x}"
    return buckets, keys, slicer.finish()


def digest_reply(node: Collective, detail: Iterable[int] = ()) -> dict[str, Any]:
    """What a member answers to a digest query: its version vector (taken before and after
    the walk: ``settled`` says whether it stayed the same), the digest of every bucket, and
    the digest of every key of the ``detail`` buckets."""
    began = time.perf_counter()
    node._flush_outbox()  # own operations made so far are in the version vector
    before = _vector(node)
    data = node._store.data
    buckets, keys, longest = _walk(data, set(detail))
    node._flush_outbox()
    after = _vector(node)
    return {
        "node_id": f"{node.node_id:x}",
        "address": format_address(node.local),
        "vector": after,
        "settled": before == after,
        "top_level_keys": len(data),
        "buckets": [f"{digest:032x}" for digest in buckets],
        "keys": keys,
        "seconds": time.perf_counter() - began,
        "longest_slice_seconds": longest,
    }
