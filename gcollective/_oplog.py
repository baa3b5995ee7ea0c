"""What a node knows it has applied, per origin, and a bounded log of recent operations.

Sans-IO bookkeeping for catch-up:

- Every origin (a node incarnation) numbers its operations 1, 2, 3, ... ``Progress`` keeps, per
  origin, the highest sequence number up to which everything was applied (the *version
  vector*), plus the numbers seen beyond a gap, so a repeat is recognised and a gap known.
- ``OpLog`` keeps the encoded frames of recent operations from every origin, bounded in bytes.
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


class OpLog:
    """Encoded frames of recent operations from every origin, at most ``max_bytes`` in all.

    Oldest entries go first. ``covered_from[origin]`` is the lowest sequence number from which
    every later operation that was applied here is still in the log (operations that arrived
    inside a snapshot never are).
    """

    __slots__ = ("max_bytes", "bytes", "_frames", "_order", "_floor")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._frames: dict[int, dict[int, bytes]] = {}
        self._order: deque[tuple[int, int, int]] = deque()
        self._floor: dict[int, int] = {}  # origin -> highest seq no longer (or never) logged

    def __len__(self) -> int:
        return len(self._order)

    def add(self, origin: int, seq: int, frame: bytes) -> None:
        """Log one operation's frame (with or without its newline: the caller knows)."""
        frames = self._frames.get(origin)
        if frames is None:
            frames = self._frames[origin] = {}
        frames[seq] = frame
        size = len(frame)
        self._order.append((origin, seq, size))
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._trim()

    def _trim(self) -> None:
        order = self._order
        floor = self._floor
        while self.bytes > self.max_bytes and order:
            origin, seq, size = order.popleft()
            self.bytes -= size
            frames = self._frames[origin]
            frames.pop(seq, None)
            if not frames:
                del self._frames[origin]
            if seq > floor.get(origin, 0):
                floor[origin] = seq

    def not_logged(self, origin: int, upto: int) -> None:
        """Operations of ``origin`` up to ``upto`` were applied without being logged."""
        if upto > self._floor.get(origin, 0):
            self._floor[origin] = upto

    def missing(
        self, theirs: dict[int, int], ours: dict[int, int], exclude: int = 0
    ) -> list[bytes] | None:
        """Frames a peer lacks, oldest first per origin, or None when the log cannot cover
        the gap (a full snapshot is needed).

        ``theirs`` is the peer's version vector, ``ours`` the bound of what to send (normally
        what we had applied a moment ago, so operations still in flight are not resent).
        Origin ``exclude`` (the peer itself) is skipped: it has all of its own operations.
        """
        out: list[bytes] = []
        floor = self._floor
        for origin, upto in ours.items():
            have = theirs.get(origin, 0)
            if have >= upto or origin == exclude:
                continue
            if have < floor.get(origin, 0):
                return None
            frames = self._frames.get(origin, {})
            for seq in range(have + 1, upto + 1):
                frame = frames.get(seq)
                if frame is None:
                    return None
                out.append(frame)
        return out
