"""Instructions per call of the ``local_ops.WEB_ROWS`` (a steadier figure than ns on a loaded
machine): ``python -m benchmarks.local_ops_icount ROW OPS [PEERS]`` runs ``OPS`` calls of
``ROW`` after an unrecorded warm-up batch and leaves at once (nothing yields after the
measured loop, so the peers apply nothing of it); ROW may also be ``get_dict``, a read of a
small dict set with a ttl (a session's). Run it under
``valgrind --tool=callgrind`` with two values of ``OPS``: the difference in total
instructions over the difference in ``OPS`` is the cost of one call, the node's own flushes
included. (Set ``PYTHONHASHSEED`` alike in both runs: string hashes move dict collisions. The
``delete`` row sets its keys first, and its peers apply them, which varies from run to run:
measure it with ``PEERS`` 0.)

The measured loop runs inside a ``functools.reduce`` call (a C function nothing else calls
here), so ``--toggle-collect=functools_reduce`` counts the loop only: without it, the
warm-up's settle (the peers applying the warm-up batch, the hub's loop meanwhile) varies by
millions of instructions from run to run, which moved the per-call figure with 7 peers by
5-10 % between runs; with it, by about 1 %."""

from __future__ import annotations

import functools
import gc
import os
import sys

from gevent import monkey

monkey.patch_all()

from benchmarks.local_ops import _Bench, _web_runner  # noqa: E402

_DELETE_KEYS = 25_000  # the keys the delete row sets first (OPS at most this)


def main() -> None:
    row, ops = sys.argv[1], int(sys.argv[2])
    peers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    bench = _Bench(peers)
    tree: dict = {}
    run = _web_runner(row, bench.node, tree)
    if row == "delete":
        if ops > _DELETE_KEYS:
            raise SystemExit(f"delete: OPS is at most {_DELETE_KEYS}")
        # The same keys set whatever ``OPS`` is: a setup that grew with it (the peers
        # applying every key too) would count in the difference.
        keys = [f"web.{row}.k{j}" for j in range(2000 + _DELETE_KEYS)]
        for key in keys:
            bench.node.set(key, 1)
        bench.settle()
        run(keys[:2000])
        bench.settle()
        keys = keys[2000 : 2000 + ops]
    else:
        keys = [f"web.{row}.k{j % 1000}" for j in range(max(ops, 2000))]
        if row == "get_dict":  # (reads of the small dicts ``set_dict_ttl`` sets)
            _web_runner("set_dict_ttl", bench.node, tree)(keys[:1000])
            bench.settle()
        run(keys[:2000])
        bench.settle()
        keys = keys[:ops]
    gc.collect()
    gc.disable()  # (as in the timed batches)
    functools.reduce(lambda _first, _second: run(keys), [0, 0])  # (the loop: see above)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
