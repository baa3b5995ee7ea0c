"""The web workload's WSGI app (issue 20): per request, one ``incr`` of a shared counter and one
``set``, against the store named by ``BENCH_WEB_STORE``:

- ``dict``: a plain dict in each worker process (no sharing: the floor);
- ``gcollective``: the worker's default node (``-k gcollective.gunicorn.GeventWorker``);
- ``redis``: redis-py to the server at ``BENCH_WEB_REDIS_PORT`` on 127.0.0.1.

Routes: ``/hit`` (the measured one; its body has a fixed length, so ``ab`` counts no length
failures) and ``/count`` (JSON: this worker's pid and the counter as it sees it, and for
gcollective the operations and frames it sent and received).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

COUNTER = "hits.total"
_OK = b"ok\n"

StartResponse = Callable[..., Any]


class _DictStore:
    """The same two calls on a plain dict of this process."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    def hit(self, pid_key: str) -> None:
        self.data[COUNTER] = self.data.get(COUNTER, 0) + 1
        self.data[pid_key] = self.data[COUNTER]

    def count(self) -> int:
        return self.data.get(COUNTER, 0)


class _CollectiveStore:
    """``gcollective.incr`` and ``gcollective.set`` on the worker's default node."""

    def __init__(self) -> None:
        import gcollective

        self.gcollective = gcollective

    def hit(self, pid_key: str) -> None:
        total = self.gcollective.incr(COUNTER)
        self.gcollective.set(pid_key, total)

    def count(self) -> int:
        return int(self.gcollective.get(COUNTER, 0))

    def frames(self) -> dict[str, int]:
        """How many operations and frames this worker sent and received: the operations per
        frame show whether a request's writes leave as their own small batch."""
        stats = self.gcollective.default_node().stats()
        peers = stats["peers"].values()
        return {
            "local_ops": stats["local_ops"],
            "received_ops": stats["received_ops"],
            "received_frames": stats["received_frames"],
            "sent_ops": sum(peer["sent_ops"] for peer in peers),
            "sent_frames": sum(peer["sent_frames"] for peer in peers),
            "code": os.path.dirname(self.gcollective.__file__),
        }


class _RedisStore:
    """``INCR`` and ``SET`` through redis-py (one round trip each, as an app would write)."""

    def __init__(self, port: int) -> None:
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=port)

    def hit(self, pid_key: str) -> None:
        total = self.client.incr(COUNTER)
        self.client.set(pid_key, total)

    def count(self) -> int:
        return int(self.client.get(COUNTER) or 0)


_store: Any = None


def store() -> Any:
    """This worker's store, made at its first request (after the worker forked and patched)."""
    global _store
    if _store is None:
        kind = os.environ.get("BENCH_WEB_STORE", "dict")
        if kind == "gcollective":
            _store = _CollectiveStore()
        elif kind == "redis":
            _store = _RedisStore(int(os.environ["BENCH_WEB_REDIS_PORT"]))
        elif kind == "dict":
            _store = _DictStore()
        else:
            raise ValueError(f"BENCH_WEB_STORE: unknown store {kind!r}")
    return _store


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "/")
    if path == "/hit":
        store().hit(f"workers.{os.getpid()}.last")
        body = _OK
        content_type = "text/plain"
    elif path == "/count":
        reply = {"pid": os.getpid(), "count": store().count()}
        if hasattr(store(), "frames"):
            reply["frames"] = store().frames()
        body = json.dumps(reply).encode()
        content_type = "application/json"
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
