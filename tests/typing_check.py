"""A user's program written against gcollective's public API, for ``mypy --strict``.

``tests/test_typing.py`` type-checks this file as a user's project would see an installed
gcollective (the package's ``py.typed``): every name used here must be exported with a real
type, so a typo or a wrong argument in a user's code is an error, not an ``Any`` that hides it.
It is never run; each line only has to make sense to the type checker.
"""

from __future__ import annotations

import gcollective
from gcollective import (
    DELETE,
    INCREMENT,
    OPERATIONS,
    SET,
    SNAPSHOT_ORIGIN,
    Address,
    AuthenticationError,
    Collective,
    GcollectiveError,
    InvalidKeyError,
    InvalidValueError,
    Key,
    NotStartedError,
    Operation,
    ProtocolError,
    Watch,
)


def on_change(key: Key, value: object, op: Operation, origin: str) -> None:
    print(key, value, op.name, origin == SNAPSHOT_ORIGIN)


def default_node_walk() -> None:
    """The drop-in functions, on the process's default node."""
    peers: list[Address] = ["127.0.0.1:9002", ("127.0.0.1", 9003), {"host": "::1", "port": 9004}]
    node: Collective = gcollective.start("127.0.0.1:9001", peers, timeout=5.0)
    same: Collective = gcollective.default_node()
    assert node is same
    gcollective.set("users.42.name", "Ada")
    gcollective.set(("users", "a.b@c.d"), {"visits": 1}, SET, ttl=60)
    gcollective.set("users.42.visits", 2, OPERATIONS.INCREMENT)
    total: int | float = gcollective.incr("users.42.visits", 1.5, ttl=None)
    name: object = gcollective.get("users.42.name", default="nobody")
    tree: dict[str, object] = gcollective.snapshot()
    handle: Watch = gcollective.watch("users", on_change)
    still_active: bool = handle.active
    waiting: int = handle.pending
    handle.cancel()
    gcollective.delete("users.42")
    secret: str = gcollective.generate_secret()
    print(total, name, tree, still_active, waiting, secret, INCREMENT, DELETE)
    gcollective.stop(timeout=1.0)


def own_node_walk(secret: str) -> None:
    """A ``Collective`` of one's own, as a context manager, with the options a user passes."""
    with Collective(
        ("127.0.0.1", 9001),
        [{"host": "127.0.0.1", "port": 9002}],
        secret=secret,
        sync_interval=0.5,
        max_connections=64,
    ) as node:
        node.set("a.b", [1, 2, 3])
        count: int | float = node.incr("a.count")
        running: bool = node.running
        synced: bool = node.synced
        stats: dict[str, object] = node.stats()
        watch: Watch = node.watch(None, on_change)
        watch.cancel()
        print(count, running, synced, stats, node.get("a.b"))
    node.stop()


def errors_walk() -> None:
    """Every public exception is a ``GcollectiveError`` a user can catch by name."""
    errors: list[type[GcollectiveError]] = [
        AuthenticationError,
        InvalidKeyError,
        InvalidValueError,
        NotStartedError,
        ProtocolError,
    ]
    try:
        gcollective.get("a")
    except NotStartedError as error:
        print(error, errors)
