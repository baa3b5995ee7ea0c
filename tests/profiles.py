"""Hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE`` (see docs/testing.rst):

- ``fixed`` (default): derandomized, the same examples every run, for reproducible CI;
- ``random``: new examples every run from a seed printed in pytest's header (replay with
  ``HYPOTHESIS_SEED=<seed>``); CI runs the hypothesis files once this way too;
- ``long``: random, and every test's example count times ``LONG_SCALE``, for a bug hunt.
"""

from __future__ import annotations

import os
import random

from hypothesis import settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fixed")
LONG_SCALE = 20

settings.register_profile("fixed", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("random", derandomize=False, deadline=None, print_blob=True)
settings.register_profile("long", parent=settings.get_profile("random"))
settings.load_profile(PROFILE)  # raises for an unknown name: no silent default

# The seed of a random run: given, or drawn now (and printed by conftest's report header).
SEED: int | None = None
if PROFILE != "fixed":
    SEED = int(os.environ.get("HYPOTHESIS_SEED") or random.randrange(1 << 32))


def examples(count: int) -> int:
    """A test's ``max_examples``: ``count``, scaled up under the ``long`` profile."""
    return count * LONG_SCALE if PROFILE == "long" else count
