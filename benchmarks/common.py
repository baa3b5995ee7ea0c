"""Small helpers shared by the orchestrator and the member processes (no side effects)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Any


def fill_key(index: int, fanout: int) -> str:
    """The 3-level key of fill index ``index``: ``g<a>.s<b>.k<c>``, ``fanout`` wide below."""
    return f"g{index // (fanout * fanout)}.s{(index // fanout) % fanout}.k{index % fanout}"


def count_leaves(tree: Any) -> int:
    """Leaves of a JSON tree (a non-dict counts one, an empty dict none)."""
    if type(tree) is not dict:
        return 1
    total = 0
    stack = [tree]
    while stack:
        node = stack.pop()
        for value in node.values():
            if type(value) is dict:
                stack.append(value)
            else:
                total += 1
    return total


def memory() -> dict[str, int]:
    """Current and peak resident set size of this process, in bytes (Linux /proc)."""
    result = {"rss": 0, "peak_rss": 0}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    result["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    result["peak_rss"] = int(line.split()[1]) * 1024
    except OSError:  # not Linux: the peak is all there is
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["rss"] = result["peak_rss"] = peak if sys.platform == "darwin" else peak * 1024
    return result


def tree_digest(tree: Any) -> str:
    """sha256 of a JSON tree's canonical form: equal digests mean identical data, which equal
    leaf counts do not."""
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


#: Multiplier of ``scrambled_index``: a prime (Knuth's multiplicative hash), so coprime to any
#: key count below it, and consecutive positions land far apart.
_SCRAMBLE = 2_654_435_761


def scrambled_index(position: int, total: int) -> int:
    """The fill index written at ``position`` in the mixed workload: a permutation of
    ``range(total)`` (for any ``total`` below the multiplier) that scatters consecutive
    positions over every parent."""
    return position * _SCRAMBLE % total


def mixed_value(index: int) -> Any:
    """The value of fill index ``index`` in the mixed workload: an int, a str or a small dict."""
    kind = index % 3
    if kind == 0:
        return index
    if kind == 1:
        return f"v{index}"
    return {"n": index, "tag": "x"}


def live_key(prefix: str, name: str, seq: int, cycle: int, parents: list[int] | None) -> str:
    """The key of a pacer's write number ``seq`` (one definition for the writer and for the
    joiner that waits for it).

    With ``parents`` (``[groups, fanout]`` of the fill) the writes go into the fill's own
    parents, a new leaf each, spread over all of them; otherwise under ``prefix.name``,
    overwriting a cycle of ``cycle`` keys (0: a new key each)."""
    if parents:
        groups, fanout = parents
        return f"g{seq % groups}.s{(seq // groups) % fanout}.L{name}x{seq}"
    if cycle:
        return f"{prefix}.{name}.k{seq % cycle}"
    return f"{prefix}.{name}.{seq}"


#: What a churn writer's operation ``seq`` does (``seq % 6``): a web app's mix (issue 20) of
#: sessions that expire, scratch keys set and deleted again, and counters shared by everyone.
CHURN_STEPS = ("session", "scratch", "counter", "unscratch", "counter", "counter")

#: The counters every churn writer bumps (``churn.c.k<i>``).
CHURN_COUNTERS = 100


def churn_counter(seq: int) -> int:
    """Which counter a churn writer's operation ``seq`` (a ``counter`` step) bumps: ``seq``
    modulo ``CHURN_COUNTERS`` (the steps at 2, 4 and 5 of 6 reach every counter)."""
    return seq % CHURN_COUNTERS


def malloc_stats_lines() -> list[str]:
    """The lines of Python's small-object allocator report (``sys._debugmallocstats``, which
    writes to file descriptor 2: read back through a temporary file)."""
    with tempfile.TemporaryFile("w+") as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        return out.read().splitlines()
