"""Digests of a member's tree per top-level key, for ``python -m gcollective verify``.

A member answers a digest query (see ``_wire``'s status query) with its version vector and
one digest per *bucket* of top-level keys (a key's bucket depends on its name only, so the
same key falls in the same bucket everywhere); asked for some buckets in detail, it adds the
digest of every key in them. Comparing members costs a few kilobytes, then a little more for
the buckets that differ: the tree itself never crosses the network.

A key's digest is BLAKE2b over the canonical JSON of ``[key, value]``; a bucket's is the XOR
of its keys', so it does not depend on the order keys were made in. Computed on demand, in
slices: the walk yields to the hub every ``SLICE_SECONDS`` so that a 2M-key tree delays the
member's other work by a few milliseconds at a time (docs/operations.rst has the figures).
"""

from __future__ import annotations

import time
import zlib
from hashlib import blake2b
from typing import Any, Iterable

import gevent
import ujson

__all__ = ["BUCKETS", "bucket_of", "digest_reply", "key_digest"]

#: Buckets of top-level keys in a digest reply.
BUCKETS = 256
#: The longest stretch the walk runs without yielding to the hub.
SLICE_SECONDS = 0.005
# Keys digested between two looks at the clock.
_CHECK_EVERY = 256


def bucket_of(key: str) -> int:
    """The bucket of a top-level key (from its name only)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS


def key_digest(key: str, value: Any) -> int:
    """The digest of one top-level key and its whole subtree, as an int (XOR-able)."""
    canonical = ujson.dumps([key, value], sort_keys=True, ensure_ascii=False)
    text = canonical.encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(text, digest_size=16).digest(), "big")


def _vector(node: Any) -> list[list[Any]]:
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
    longest = 0.0
    began = time.perf_counter()
    names = list(data)  # a copy: the tree may change while the walk yields
    missing = object()
    for index, key in enumerate(names):
        value = data.get(key, missing)
        if value is not missing:
            digest = key_digest(key, value)
            bucket = bucket_of(key)
            buckets[bucket] ^= digest
            if bucket in detail:
                keys[key] = f"{digest:032x}"
        if index % _CHECK_EVERY == 0:
            now = time.perf_counter()
            if now - began >= SLICE_SECONDS:
                longest = max(longest, now - began)
                gevent.sleep(0)
                began = time.perf_counter()
    longest = max(longest, time.perf_counter() - began)
    return buckets, keys, longest


def digest_reply(node: Any, detail: Iterable[int] = ()) -> dict[str, Any]:
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
        "address": node.stats()["address"],
        "vector": after,
        "settled": before == after,
        "top_level_keys": len(data),
        "buckets": [f"{digest:032x}" for digest in buckets],
        "keys": keys,
        "seconds": time.perf_counter() - began,
        "longest_slice_seconds": longest,
    }
