"""Small helpers shared by the orchestrator and the member processes (no side effects)."""

from __future__ import annotations

import sys
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
