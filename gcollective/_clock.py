"""Stamps: hybrid-logical-clock time plus the origin's node id, packed into one int.

A stamp is ``(hlc << 64) | node_id``. ``hlc`` is wall-clock milliseconds shifted left by 16 bits
plus a logical counter, so stamps track real time closely yet never repeat or go backwards on a
node, and a node's clock moves past every stamp it receives: an operation made after seeing
another is ordered after it. Node ids are random 63-bit ints, so two nodes never tie. Comparing
two stamps is comparing two ints.
"""

from __future__ import annotations

import os
import time
from typing import Callable

__all__ = [
    "HybridClock",
    "new_node_id",
    "stamp_origin",
    "stamp_millis",
    "millis_stamp",
    "expiry_stamp",
    "stamp_lead",
    "NODE_BITS",
    "NODE_MASK",
    "MILLIS_SHIFT",
    "DERIVED_BIT",
    "HLC_LIMIT",
    "STAMP_LIMIT",
    "ONE_TICK",
    "NOT_COUNTER",
]

# The stamp layout, defined here only (the store and the wire codec import it):
#
#   bit 127 ............ 80 79 ........ 64 63 ...................... 0
#   [ wall-clock millis    | logical count | node id (bit 63 clear)     ]
#   [            hlc                       | the origin half            ]
#
# An expiry's derived stamp sets bit 63 in the origin half (``expiry_stamp``).
NODE_BITS = 64  # the origin half: a stamp >> NODE_BITS is its hlc
NODE_MASK = (1 << NODE_BITS) - 1  # stamp & NODE_MASK is its origin half
_LOGICAL_BITS = 16
MILLIS_SHIFT = NODE_BITS + _LOGICAL_BITS  # stamp >> MILLIS_SHIFT is its wall-clock millis
DERIVED_BIT = 1 << 63  # marks a derived (expiry) stamp; never set in a node id
HLC_LIMIT = 1 << 64  # the wire carries hlcs below this
STAMP_LIMIT = HLC_LIMIT << NODE_BITS  # so every stamp is below this


def new_node_id() -> int:
    """A fresh random non-zero 63-bit node id (a new one for every incarnation)."""
    while True:
        node_id = int.from_bytes(os.urandom(8), "big") >> 1
        if node_id:
            return node_id


def stamp_origin(stamp: int) -> int:
    """The node id that made ``stamp``."""
    return stamp & NODE_MASK


def stamp_millis(stamp: int) -> int:
    """The wall-clock milliseconds part of ``stamp`` (approximately when it was made)."""
    return stamp >> MILLIS_SHIFT


def millis_stamp(millis: int) -> int:
    """The smallest stamp of wall-clock millisecond ``millis`` (below every real one made then)."""
    return millis << MILLIS_SHIFT


def stamp_lead(stamp: int, now_ns: int) -> float:
    """How many seconds ``stamp`` is ahead of the wall-clock time ``now_ns`` (negative if it
    is behind), to the millisecond."""
    return (stamp_millis(stamp) - now_ns // 1_000_000) / 1000


def expiry_stamp(stamp: int, ttl_ms: int) -> int:
    """The stamp of the expiry implied by an operation at ``stamp`` with a ttl of ``ttl_ms``.

    It sits at the expiry time (``stamp_millis(stamp) + ttl_ms``, logical counter 0) with bit
    63 set in the node-id half: real node ids are below 2**63, so a derived stamp never equals
    a real one, orders after every real stamp of an earlier millisecond or of the same
    millisecond with counter 0, and before every later one. The origin's id keeps the derived
    stamps of two origins distinct.
    """
    # ``((stamp_millis(stamp) + ttl_ms) << MILLIS_SHIFT) | DERIVED_BIT | stamp_origin(stamp)``
    # in four operations on 128-bit ints, not six (one per ttl operation, sent or received):
    # adding at the millisecond bits leaves the origin half as it is; the counter is cleared.
    return ((stamp + (ttl_ms << MILLIS_SHIFT)) & NOT_COUNTER) | DERIVED_BIT


class HybridClock:
    """Issues this node's stamps; ``observe`` every stamp received from others."""

    __slots__ = ("node_id", "_last", "_ms_end", "_now")

    def __init__(self, node_id: int, now: Callable[[], int] = time.time_ns) -> None:
        if not 0 < node_id <= NODE_MASK:
            raise ValueError("node_id must be a positive 64-bit int")
        self.node_id = node_id
        # The greatest stamp issued, observed or promised so far, in this node's name.
        self._last = node_id
        # The end (in wall-clock ns) of the millisecond of the last stamp taken from the wall
        # clock: until then, the next stamp is simply the last one plus one (the common,
        # cheap case).
        self._ms_end = -1
        self._now = now

    def stamp(self) -> int:
        """A new stamp, greater than every stamp issued or observed so far: the wall-clock
        millisecond (with a counter of 0), or the last stamp plus one if that is later."""
        now = self._now()
        if now < self._ms_end:
            # Within the millisecond of the last wall-clock stamp (or before it: the wall
            # clock stepped back), so the last stamp plus one is the later: no division
            # (dividing ``now``, a 3-digit int, costs ~100 ns: a tenth of a ``set``).
            # (``Collective.set`` and ``delete`` take this branch inline.)
            stamp = self._last = self._last + ONE_TICK
            return stamp
        ms = now // 1_000_000
        self._ms_end = (ms + 1) * 1_000_000
        hlc = ms << _LOGICAL_BITS
        last = self._last >> NODE_BITS
        if hlc <= last:
            hlc = last + 1
        stamp = self._last = (hlc << NODE_BITS) | self.node_id
        return stamp

    def promise(self) -> int:
        """A stamp that every later stamp of this clock will exceed: now, or the last stamp
        issued or observed if that is later. (The clock moves up to it, so the promise holds
        even if the wall clock steps back.)"""
        now = ((self._now() // 1_000_000) << MILLIS_SHIFT) | self.node_id
        if now > self._last:
            self._last = now
        return self._last

    def observe(self, stamp: int) -> None:
        """Move past a received stamp, so later local stamps order after it.

        ``ValueError`` for a stamp so far ahead that the stamps after it would outgrow the
        64-bit hlc of the wire: the caller refuses stamps far ahead of its wall clock
        (``clock_skew``) long before that; this is the last guard, so that a node never
        issues a stamp the wire cannot carry.
        """
        if stamp >> NODE_BITS >= _MAX_OBSERVED_HLC:
            raise ValueError("stamp too far ahead: the stamps after it would not fit the wire")
        seen = (stamp >> NODE_BITS << NODE_BITS) | self.node_id
        if seen > self._last:
            self._last = seen


ONE_TICK = 1 << NODE_BITS  # one step of the logical counter, in a stamp
#: Every bit of a stamp but its logical counter's: two stamps equal there (the same
#: millisecond and origin) have the same expiry stamp for the same ttl (``expiry_stamp``).
NOT_COUNTER = ~(((1 << _LOGICAL_BITS) - 1) << NODE_BITS)
# The wire carries hlcs below 2**64; past an observed hlc below 2**63, a clock would have to
# tick 2**63 times to get there (and wall-clock hlcs reach 2**63 in the year 4.4 million).
_MAX_OBSERVED_HLC = 1 << 63
