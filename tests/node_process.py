"""A gcollective member in its own process, driven by JSON lines on stdin (test harness).

Run as ``python tests/node_process.py``; every command line gets exactly one reply line on
stdout. The process is a monkey-patched gevent app, like the ones gcollective serves.

Commands (``{"cmd": ..., ...}``):
  start {local, peers, options}    start the node           -> {"synced": bool}
  set/incr/delete/get {key, ...}   the data API             -> {"value": ...}; a value or
                                   amount {"build": kind, "size": n} is made here (see build);
                                   a write also -> {"stamp": the stamp the node gave it}
                                   (see StampRecorder)
  write_keys {prefix, count, start, yield_every, flat} SET prefix.<i>.v = i (prefix.<i> = i
                                   when flat) for i in range, without yielding (or yielding
                                   every yield_every operations)
  incr_many {key, count}           INCREMENT key by 1, count times, without yielding
  summary                          -> {"digest": sha256 of canonical JSON, "leaves": int}
  stats                            -> node.stats()
  snapshot                         -> {"value": whole tree}
  wait_leaves {count, timeout}     wait until at least count leaves -> {"leaves", "seconds"}
  metadata                         -> {"entries": metadata entries held (stamps, tombstones)}
  clock_offset {seconds}           move this process's wall clock (needs the variable below)
  serve_metrics {port}             serve Prometheus metrics on 127.0.0.1:port (_metrics)
  tamper {key, value}              TEST ONLY: put value under top-level key straight into the
                                   store's tree, behind replication's back (no operation, no
                                   stamp): a replica made to differ, for ``verify``

With GCOLLECTIVE_TEST_CLOCK_OFFSET=<seconds> in the environment, the process's wall clock
(``time.time`` and ``time.time_ns``, before gcollective is imported) runs that far ahead (or
behind, if negative): a member with a wrong clock, for the clock-skew tests. The library's
own clock source stays as it is in production.
  stop {timeout}                   flush and stop, then exit
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.fileobject import FileObjectPosix  # noqa: E402

# The gcollective to run: this checkout's, or another release's (``NodeProcess(root=...)``).
sys.path.insert(
    0,
    os.environ.get("GCOLLECTIVE_TEST_ROOT")
    or os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
)


def offset_wall_clock(seconds):
    """Make ``time.time``/``time.time_ns`` run ``seconds`` off from now on; returns the setter
    for a new offset. (Before gcollective is imported, so its default clock takes it too.)"""
    offset_ns = [int(seconds * 1e9)]
    real_time_ns = time.time_ns
    time.time_ns = lambda: real_time_ns() + offset_ns[0]
    time.time = lambda: time.time_ns() / 1e9

    def set_offset(new_seconds):
        offset_ns[0] = int(new_seconds * 1e9)

    return set_offset


_OFFSET = os.environ.get("GCOLLECTIVE_TEST_CLOCK_OFFSET")
set_clock_offset = offset_wall_clock(float(_OFFSET)) if _OFFSET is not None else None

import gcollective  # noqa: E402


def count_leaves(tree):
    if type(tree) is not dict:
        return 1
    return sum(count_leaves(v) for v in tree.values())


def live_tree(node):
    """The node's tree without copying it (read-only here): keeps polling cheap."""
    return node._store.data


def summary(node):
    tree = live_tree(node)
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return {"digest": hashlib.sha256(canonical.encode()).hexdigest(), "leaves": count_leaves(tree)}


def build(spec):
    """A value JSON lines cannot carry, or that is long to write out: ``{"build": kind,
    "size": n}`` for an int of n digits (all nines), a str of n characters, a list or dict
    nested n levels; anything else is itself, with what it holds built."""
    if type(spec) is list:
        return [build(item) for item in spec]
    if type(spec) is not dict:
        return spec
    if "build" not in spec:
        return {key: build(item) for key, item in spec.items()}
    kind, size = spec["build"], spec["size"]
    if kind == "digits":
        return 10**size - 1
    if kind == "text":
        return "v" * size
    value = 0
    for _ in range(size):
        value = [value] if kind == "nested_list" else {"k": value}
    return value


class StampRecorder:
    """Test-only: stands in for the node's clock (``node._clock``) and keeps the stamps issued
    during the current command, so a write's reply can say which stamp the node gave it (the
    model check folds every write by its stamp). The library is untouched: this wraps the
    clock from outside, in this test process only."""

    # ``Collective.set`` and ``delete`` take the clock's common case inline when the wall
    # clock is before ``_ms_end``; never before this one: every stamp comes through ``stamp``.
    _ms_end = -1

    def __init__(self, clock):
        self.clock = clock
        self.issued = []
        self._now = clock._now  # (read by that inline case)

    def stamp(self):
        stamp = self.clock.stamp()
        self.issued.append(stamp)
        return stamp

    def promise(self):
        return self.clock.promise()

    def observe(self, stamp):
        self.clock.observe(stamp)


def issued_stamp(node, retakes=0):
    """The stamp the node issued for the write just made: exactly one, or the hook missed a
    write or saw another. An ``incr`` whose stamp finds an expiry due fires it and takes a
    new stamp after it (``retakes=1``): the write's is the last."""
    issued = node._clock.issued
    if not 1 <= len(issued) <= 1 + retakes:
        raise AssertionError(f"expected one stamp for one write, saw {len(issued)}")
    return issued[-1]


def handle(node, request):
    cmd = request["cmd"]
    for name in ("value", "amount"):
        if name in request:
            request[name] = build(request[name])
    if cmd == "start":
        node = gcollective.start(
            request["local"],
            request.get("peers", []),
            timeout=request.get("timeout", 10.0),
            **request.get("options", {}),
        )
        node._clock = StampRecorder(node._clock)
        return node, {"synced": node.synced, "node_id": node.node_id}
    if node is not None:
        node._clock.issued.clear()
    if cmd == "set":
        node.set(request["key"], request["value"], ttl=request.get("ttl"))
        return node, {"stamp": issued_stamp(node)}
    if cmd == "incr":
        amount = request.get("amount", 1)
        value = node.incr(request["key"], amount, ttl=request.get("ttl"))
        return node, {"value": value, "stamp": issued_stamp(node, retakes=1)}
    if cmd == "delete":
        node.delete(request["key"])
        return node, {"stamp": issued_stamp(node)}
    if cmd == "get":
        return node, {"value": node.get(request["key"])}
    if cmd == "write_keys":
        prefix, begin = request["prefix"], request.get("start", 0)
        every = request.get("yield_every", 0)  # like an app serving requests in between
        form = "{}.{}" if request.get("flat") else "{}.{}.v"
        for i in range(begin, begin + request["count"]):
            node.set(form.format(prefix, i), i)
            if every and i % every == 0:
                gevent.sleep(0)
        return node, {}
    if cmd == "incr_many":
        for _ in range(request["count"]):
            node.incr(request["key"], request.get("amount", 1))
        return node, {}
    if cmd == "summary":
        return node, summary(node)
    if cmd == "stats":
        return node, node.stats()
    if cmd == "snapshot":
        return node, {"value": node.snapshot()}
    if cmd == "wait_leaves":
        began = time.monotonic()
        deadline = began + request.get("timeout", 30.0)
        leaves = count_leaves(live_tree(node))
        while leaves < request["count"] and time.monotonic() < deadline:
            gevent.sleep(0.05)
            leaves = count_leaves(live_tree(node))
        return node, {"leaves": leaves, "seconds": time.monotonic() - began}
    if cmd == "metadata":
        from test_gc import metadata_size

        return node, {"entries": metadata_size(node)}
    if cmd == "serve_metrics":
        from gcollective.metrics import serve_metrics

        serve_metrics(node, ("127.0.0.1", request["port"]))
        return node, {}
    if cmd == "tamper":
        live_tree(node)[request["key"]] = request["value"]
        return node, {}
    if cmd == "clock_offset":
        if set_clock_offset is None:
            raise RuntimeError("started without GCOLLECTIVE_TEST_CLOCK_OFFSET")
        set_clock_offset(request["seconds"])
        return node, {}
    if cmd == "stop":
        gcollective.stop(request.get("timeout", 5.0))
        return None, {"stopped": True}
    raise ValueError(f"unknown command {cmd!r}")


def main():
    level = os.environ.get("GCOLLECTIVE_TEST_LOG")
    if level:
        import logging

        logging.basicConfig(
            level=level, stream=sys.stderr, format=f"%(asctime)s {os.getpid()} %(message)s"
        )
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    node = None
    while True:
        line = stdin.readline()
        if not line:
            break
        request = json.loads(line)
        try:
            node, reply = handle(node, request)
            reply["ok"] = True
        except Exception as exc:  # reported to the test, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if request["cmd"] == "stop":
            break


if __name__ == "__main__":
    main()
