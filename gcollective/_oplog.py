"""What a node knows it has applied, per origin, and a bounded log of recent operations.

Sans-IO bookkeeping for catch-up:

- Every origin (a node incarnation) numbers its operations 1, 2, 3, ... ``Progress`` keeps, per
  origin, the highest sequence number up to which everything was applied (the *version
  vector*), plus the numbers seen beyond a gap, so a repeat is recognised and a gap known.
- ``OpLog`` keeps the encoded frames of recent operations from every origin, bounded in bytes
  and by what every peer has applied (``forget_applied``).
  When a peer reports its version vector, ``missing`` returns the frames it lacks if the log
  still covers the gap, or says that only a full snapshot can.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

__all__ = ["OpLog", "Progress"]


class Progress:
    """Per-origin contiguous high-water marks (a version vector) with gap tracking.

    ``applied[origin]`` is the sequence number up to which every operation of that origin
    was applied; ``stamps[origin]`` the stamp of that operation, so every operation of the
    origin not yet applied has a newer stamp (an origin's stamps grow with its numbers).
    """

    __slots__ = ("applied", "stamps", "_ahead")

    def __init__(self) -> None:
        self.applied: dict[int, int] = {}
        self.stamps: dict[int, int] = {}
        self._ahead: dict[int, dict[int, int]] = {}  # origin -> {seq: stamp} beyond a gap

    def accept(self, origin: int, seq: int, stamp: int) -> bool:
        """Record operation ``seq`` of ``origin``; False if it was seen before (skip it)."""
        done = self.applied.get(origin, 0)
        if seq <= done:
            return False
        if seq == done + 1:
            ahead = self._ahead.get(origin)
            if ahead:
                while seq + 1 in ahead:
                    seq += 1
                    stamp = ahead.pop(seq)
                if not ahead:
                    del self._ahead[origin]
            self.applied[origin] = seq
            self.stamps[origin] = stamp
            return True
        ahead = self._ahead.setdefault(origin, {})
        if seq in ahead:
            return False
        ahead[seq] = stamp
        return True

    def merge(self, vector: Iterable[tuple[int, int, int]]) -> None:
        """Everything up to each given seq is now applied (after merging a snapshot)."""
        for origin, seq, stamp in vector:
            if seq > self.applied.get(origin, 0):
                ahead = self._ahead.get(origin)
                if ahead:
                    ahead = {s: st for s, st in ahead.items() if s > seq}
                    while seq + 1 in ahead:
                        seq += 1
                        stamp = ahead.pop(seq)
                    if ahead:
                        self._ahead[origin] = ahead
                    else:
                        del self._ahead[origin]
                self.applied[origin] = seq
                self.stamps[origin] = stamp

    def skip_gap(self, origin: int) -> int:
        """Count the missing operations before the first ones of ``origin`` held beyond a gap
        as applied (they are lost: see ``Engine.skip_dead_gaps``); the new contiguous mark.
        Nothing is applied: the operations held already move into the vector."""
        ahead = self._ahead.pop(origin)
        seq = min(ahead)
        stamp = ahead.pop(seq)
        while seq + 1 in ahead:
            seq += 1
            stamp = ahead.pop(seq)
        if ahead:
            self._ahead[origin] = ahead
        self.applied[origin] = seq
        self.stamps[origin] = stamp
        return seq

    def gap_origins(self) -> list[int]:
        """The origins of which operations arrived beyond a missing one."""
        return list(self._ahead)

    def vector(self) -> list[list[int]]:
        """The version vector as JSON-ready ``[[origin, seq, stamp], ...]``."""
        stamps = self.stamps
        return [[origin, seq, stamps[origin]] for origin, seq in self.applied.items()]

    def has_gap(self, origin: int) -> bool:
        """True while operations of ``origin`` arrived beyond a missing one."""
        return origin in self._ahead

    def gaps(self) -> int:
        """How many operations were received beyond a gap (waiting for the gap to fill)."""
        return sum(len(s) for s in self._ahead.values())


def _widest_first(entry: tuple[int, int, bytes]) -> tuple[int, int]:
    return entry[0], -entry[1]


class OpLog:
    """Encoded OPS frames of recent operations from every origin, at most ``max_bytes`` in all.

    Each entry is one frame with the range of sequence numbers it carries; oldest entries go
    first. Ranges of one origin may overlap (a batch received again by catch-up): ``missing``
    picks frames that together cover what a peer lacks, and the peer skips repeats.
    """

    __slots__ = ("max_bytes", "bytes", "ops", "_frames", "_order", "_stale", "_stale_count")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.ops = 0  # operations in the logged frames (repeats included)
        # origin -> its entries [first seq, last seq, frame], in the order logged
        self._frames: dict[int, deque[tuple[int, int, bytes]]] = {}
        self._order: deque[int] = deque()  # the origin of every entry, in the order logged
        # Entries ``forget_applied`` dropped ahead of ``_order``: per origin, how many of its
        # first occurrences there name no entry any more (and how many in all).
        self._stale: dict[int, int] = {}
        self._stale_count = 0

    def __len__(self) -> int:
        return len(self._order) - self._stale_count

    def add(self, origin: int, first: int, last: int, frame: bytes) -> None:
        """Log one frame carrying operations ``first`` to ``last`` of ``origin`` (with or
        without its newline: ``missing`` hands frames back as given)."""
        entries = self._frames.get(origin)
        if entries is None:
            entries = self._frames[origin] = deque()
        entries.append((first, last, frame))
        self._order.append(origin)
        self.bytes += len(frame)
        self.ops += last - first + 1
        if self.bytes > self.max_bytes:
            self._trim()

    def _trim(self) -> None:
        order = self._order
        all_frames = self._frames
        while self.bytes > self.max_bytes and order:
            origin = order.popleft()
            if self._drop_stale(origin):
                continue
            entries = all_frames[origin]
            first, last, frame = entries.popleft()
            self.bytes -= len(frame)
            self.ops -= last - first + 1
            if not entries:
                del all_frames[origin]

    def forget_applied(self, applied: dict[int, int]) -> int:
        """Drop, per origin, the oldest entries carrying only operations up to
        ``applied[origin]``: what every peer that may still ask has applied, so no catch-up
        resends it. Returns how many entries went."""
        dropped = 0
        for origin, upto in applied.items():
            entries = self._frames.get(origin)
            count = 0
            while entries and entries[0][1] <= upto:
                first, last, frame = entries.popleft()
                self.bytes -= len(frame)
                self.ops -= last - first + 1
                count += 1
            if count:
                self._stale[origin] = self._stale.get(origin, 0) + count
                dropped += count
                if not entries:
                    del self._frames[origin]
        self._stale_count += dropped
        if self._stale_count * 2 > len(self._order):
            self._compact()
        return dropped

    def _drop_stale(self, origin: int) -> bool:
        """Whether an occurrence of ``origin`` just taken from the front of ``_order`` names
        an entry ``forget_applied`` dropped already (the first ones of each origin do)."""
        stale = self._stale.get(origin)
        if not stale:
            return False
        if stale == 1:
            del self._stale[origin]
        else:
            self._stale[origin] = stale - 1
        self._stale_count -= 1
        return True

    def _compact(self) -> None:
        """Rebuild ``_order`` without the occurrences of dropped entries (when they are most
        of it: it would otherwise grow with every entry ever logged)."""
        kept: deque[int] = deque()
        for origin in self._order:
            if not self._drop_stale(origin):
                kept.append(origin)
        self._order = kept

    def missing(
        self, theirs: dict[int, int], ours: dict[int, int], exclude: int = 0
    ) -> list[bytes] | None:
        """Frames that hold what a peer lacks, oldest first per origin, or None when the log
        cannot cover it (a full snapshot is needed).

        ``theirs`` is the peer's version vector, ``ours`` the bound of what to send (normally
        what we had applied a moment ago, so operations still in flight are not resent).
        Origin ``exclude`` (the peer itself) is skipped: it has all of its own operations.
        """
        out: list[bytes] = []
        for origin, upto in ours.items():
            have = theirs.get(origin, 0)
            if have >= upto or origin == exclude:
                continue
            entries = self._frames.get(origin)
            if not entries:
                return None
            # The frames overlapping (have, upto], by first seq; walk them until covered.
            wanted = sorted((e for e in entries if e[1] > have and e[0] <= upto), key=_widest_first)
            need = have + 1
            for first, last, frame in wanted:
                if first > need:
                    return None  # a hole (not logged, or trimmed already)
                if last >= need:
                    out.append(frame)
                    need = last + 1
                    if need > upto:
                        break
            if need <= upto:
                return None
        return out
