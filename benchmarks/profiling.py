"""Profiling member processes over a measured window (``python -m benchmarks --profile``).

With py-spy available (``pip install py-spy``; it needs permission to ptrace the members), every
member is sampled from outside and the collapsed stacks are aggregated into the share of samples
per function, both *self* (the function was running) and *inclusive* (it was on the stack).
Without py-spy the members run cProfile over the window instead and write ``.prof`` files (read
them with ``python -m pstats``); cProfile slows small functions down a lot, so prefer py-spy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from benchmarks.procs import Member, broadcast

SAMPLE_RATE = 250  # samples per second and process
_LINE_NUMBER = re.compile(r":\d+\)")


def find_py_spy() -> str | None:
    """py-spy next to this interpreter, or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


def aggregate(paths: list[str], top: int = 20) -> dict[str, Any]:
    """Percent of busy samples per function over py-spy raw (collapsed-stack) files.

    Samples whose innermost frame is the gevent hub's loop are the process waiting for I/O:
    they are counted apart as ``idle_samples``, not in the shares.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for path in paths:
        try:
            with open(path) as lines:
                for line in lines:
                    stack, _, count = line.rstrip().rpartition(" ")
                    if not stack or not count.isdigit():
                        continue
                    samples = int(count)
                    frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
                    if frames[-1].startswith("Hub.run "):
                        idle += samples  # the gevent hub waiting for I/O
                        continue
                    total += samples
                    own[frames[-1]] += samples
                    for frame in set(frames):
                        inclusive[frame] += samples
        except OSError:
            continue
    if not total:
        return {"samples": 0, "idle_samples": idle}
    return {
        "samples": total,
        "idle_samples": idle,
        "self_percent": {f: round(100 * n / total, 1) for f, n in own.most_common(top)},
        "inclusive_percent": {f: round(100 * n / total, 1) for f, n in inclusive.most_common(top)},
    }


class WindowProfiler:
    """Profiles a set of members between ``start()`` and ``stop()``; no-op when disabled."""

    def __init__(self, directory: str | None, label: str, members: list[Member]) -> None:
        self.directory = directory
        self.label = label
        self.members = members
        self.py_spy = find_py_spy() if directory else None
        self.spies: list[subprocess.Popen[bytes]] = []
        self.paths: list[str] = []

    def start(self) -> None:
        if not self.directory:
            return
        if self.py_spy is None:
            broadcast(self.members, "profile_start")
            return
        for i, member in enumerate(self.members):
            path = os.path.join(self.directory, f"{self.label}-m{i}.txt")
            self.paths.append(path)
            self.spies.append(
                subprocess.Popen(
                    [
                        self.py_spy,
                        "record",
                        "--pid",
                        str(member.pid),
                        "--rate",
                        str(SAMPLE_RATE),
                        "--format",
                        "raw",
                        "--output",
                        path,
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)  # let py-spy attach before the window begins

    def stop(self) -> dict[str, Any] | None:
        """Stop profiling; the aggregated py-spy figures, or the cProfile file paths."""
        if not self.directory:
            return None
        if self.py_spy is None:
            paths = []
            for i, member in enumerate(self.members):
                path = os.path.join(self.directory, f"{self.label}-m{i}.prof")
                member.call("profile_stop", path=path)
                paths.append(path)
            return {"tool": "cProfile", "files": paths}
        for spy in self.spies:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(10)
        result = aggregate(self.paths)
        result.update(tool="py-spy", files=self.paths)
        if not result["samples"]:
            result["note"] = "py-spy recorded nothing (no permission to ptrace the members?)"
        return result
