"""Giving the C heap's free pages back to the system (issue 20).

glibc's ``malloc`` hands a freed block's pages back only from the top of its heap (and blocks
of their own mapping); pages wholly free in the middle of it stay in the process's RSS until
the heap grows into them again. A churning member frees tens of thousands of nodes' dicts a
second (fired sessions, tombstones, counters' increments) as the stability frontier passes
them, and its RSS kept a few megabytes of such holes (``benchmarks/churn_probe.py`` reports
what ``malloc_trim(0)`` gives back). ``malloc_trim(0)`` returns them (``madvise``: the
addresses stay valid). Elsewhere than on glibc (musl, macOS, Windows) there is no such call
and nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

__all__ = ["HeapTrimmer", "TRIM_AFTER"]

#: How many tombstones, increments and expiries the store forgets (``Store.collected`` and
#: ``Store.expired``) between two trims: a few megabytes of freed blocks (a fired session
#: holds about 600 bytes, a counter's hit about 100). A store that forgets little never pays
#: for a trim; a churning member trims about once a housekeeping round, each trim holding the
#: hub about 0.3-1 ms (``malloc_trim`` walks glibc's free blocks; 9 ms at most in
#: ``tests/test_expiry_burst.py``, after 150,000 expiries at once: see docs/benchmarks.rst).
TRIM_AFTER = 10_000


@functools.cache  # (looked up by the first trim, not at import)
def malloc_trim_function() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_size_t,)
    function.restype = ctypes.c_int
    return function


class HeapTrimmer:
    """Trims the C heap (see the module docstring) once ``TRIM_AFTER`` more things were
    forgotten than at the last trim."""

    __slots__ = ("_forgotten_then", "trims")

    def __init__(self) -> None:
        self._forgotten_then = 0
        #: Trims made so far.
        self.trims = 0

    def after_sweep(self, forgotten: int) -> bool:
        """Trim when ``forgotten`` (a count that only grows: what the store forgot so far)
        passed the last trim's by ``TRIM_AFTER``; whether it did."""
        if forgotten - self._forgotten_then < TRIM_AFTER:
            return False
        malloc_trim = malloc_trim_function()
        if malloc_trim is None:
            return False
        self._forgotten_then = forgotten
        malloc_trim(0)
        self.trims += 1
        return True
