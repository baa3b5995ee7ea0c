"""Instructions per fired session (issue 20): ``python -m benchmarks.fire_icount N run``
receives ``N`` sessions (small dicts with a ttl of 2 s, one by one, as ``churn_probe
--simulate`` applies them), then fires them all with one ``advance``; ``skip`` instead of
``run`` leaves that ``advance`` out. Run both under ``valgrind --tool=callgrind
--callgrind-out-file=/dev/null`` (``PYTHONHASHSEED`` alike): the difference in total
instructions over the sessions fired (printed) is the cost of firing one."""

from __future__ import annotations

import gc
import os
import sys
import time

from gcollective._clock import NODE_BITS
from gcollective._store import SET, Store

_WARM_UP = 2000  # sessions received and fired before the measured ones
_PER_TICK = 60  # sessions per 10 ms: a churning member's rate


def _stamp(millis: int, counter: int, origin: int) -> int:
    return (((millis << 16) | counter) << NODE_BITS) | origin


def main() -> None:
    count, mode = int(sys.argv[1]), sys.argv[2]
    store = Store()
    store.advance(1000)
    for index in range(_WARM_UP + count):
        millis = 1000 + (index // _PER_TICK) * 10
        stamp = _stamp(millis, index % _PER_TICK, 0x1001)
        path = ("churn", "s", "n1", str(index))
        store.apply(stamp, SET, path, {"u": index, "w": "n1"}, 2000)
    store.advance(1000 + (_WARM_UP // _PER_TICK) * 10 + 1999)  # (the warm-up's fire)
    gc.collect()
    gc.disable()
    began = time.perf_counter()
    end = 1000 + ((_WARM_UP + count) // _PER_TICK) * 10 + 3000
    fired = store.advance(end) if mode == "run" else []
    took = time.perf_counter() - began
    print(f"{len(fired)} fired, {took / max(1, len(fired)) * 1e6:.2f} us each")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
