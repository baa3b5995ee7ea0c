"""gcollective: one nested dict shared live by every process of a gevent app.

Each process holds the whole tree in memory. ``set`` / ``incr`` / ``delete`` apply locally at
once and reach every other member asynchronously; ``get`` never touches the network. Replicas
converge: every member applies the same operations as if in one total order (see docs/contract.rst).

Importing this package has no side effects: gevent, sockets and the hub are only touched once a
node starts, so it is safe before ``gevent.monkey.patch_all()`` and in a gunicorn master.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ._errors import (
    AuthenticationError,
    DataDirError,
    DataDirLocked,
    GcollectiveError,
    InvalidKeyError,
    InvalidValueError,
    NotStartedError,
    ProtocolError,
)
from ._validate import Address, Key

if TYPE_CHECKING:
    from ._node import Collective, Watch

__all__ = [
    "Collective",
    "OPERATIONS",
    "Operation",
    "SET",
    "INCREMENT",
    "DELETE",
    "Key",
    "Address",
    "start",
    "stop",
    "get",
    "set",
    "incr",
    "delete",
    "snapshot",
    "watch",
    "Watch",
    "SNAPSHOT_ORIGIN",
    "default_node",
    "generate_secret",
    "AuthenticationError",
    "DataDirError",
    "DataDirLocked",
    "GcollectiveError",
    "InvalidKeyError",
    "InvalidValueError",
    "NotStartedError",
    "ProtocolError",
]

__version__ = "0.4.2"


class Operation(enum.IntEnum):
    """The third argument of ``set``, numbered as in collective.js."""

    SET = 0
    INCREMENT = 1
    DELETE = 2


#: collective.js's name for the operations: ``OPERATIONS.SET`` and so on.
OPERATIONS = Operation
SET = Operation.SET
INCREMENT = Operation.INCREMENT
DELETE = Operation.DELETE

#: The ``origin`` a watch callback gets for changes merged from a peer's snapshot.
SNAPSHOT_ORIGIN = "snapshot"


if not TYPE_CHECKING:
    # Hidden from type checkers, which see the imports above instead: a module __getattr__
    # would make every misspelt ``gcollective.name`` in a user's code an ``Any``, not an error.

    def __getattr__(name: str) -> Any:
        # Collective lives with gevent; import it only when someone asks for it.
        if name == "Collective":
            from ._node import Collective

            return Collective
        if name == "Watch":
            from ._node import Watch

            return Watch
        raise AttributeError(f"module 'gcollective' has no attribute {name!r}")


# -- the drop-in: one default node per process ------------------------------------------------

_default: Collective | None = None


def default_node() -> Collective:
    """The node that ``gcollective.start()`` started in this process.

    Raises ``NotStartedError`` when there is none, including in a child forked from a process
    that had one: nothing of a parent's node survives into a child.
    """
    node = _default
    if node is None or not node.running:
        raise NotStartedError("no gcollective node runs in this process: call gcollective.start()")
    return node


def start(
    local: Address, peers: Iterable[Address] = (), *, timeout: float = 10.0, **options: Any
) -> Collective:
    """Start this process's default node (see ``Collective`` for the arguments) and return it.

    Blocks the calling greenlet until a live peer's state is merged or each peer failed once
    (at most ``timeout`` seconds). ``GCOLLECTIVE_PROTOCOL`` in the environment sets
    ``protocol`` when it is not passed, ``GCOLLECTIVE_SECRET`` sets ``secret`` and
    ``GCOLLECTIVE_DATA_DIR`` sets ``data_dir``.
    """
    global _default
    import os

    from ._node import Collective

    if "protocol" not in options and os.environ.get("GCOLLECTIVE_PROTOCOL"):
        options["protocol"] = os.environ["GCOLLECTIVE_PROTOCOL"]
    if "secret" not in options and os.environ.get("GCOLLECTIVE_SECRET"):
        # From the environment so it stays out of code, config files and process listings.
        options["secret"] = os.environ["GCOLLECTIVE_SECRET"]
    if "data_dir" not in options and os.environ.get("GCOLLECTIVE_DATA_DIR"):
        options["data_dir"] = os.environ["GCOLLECTIVE_DATA_DIR"]
    current = _default
    if current is not None and current.running:
        raise RuntimeError("gcollective.start() was already called in this process")
    node = Collective(local, peers, **options)
    node.start(timeout=timeout)
    _default = node
    return node


def generate_secret() -> str:
    """A fresh random secret (256 bits as URL-safe text) for ``secret=`` or
    ``GCOLLECTIVE_SECRET``. From a shell::

        python -c "import gcollective; print(gcollective.generate_secret())"
    """
    from ._auth import generate_secret as generate

    return generate()


def stop(timeout: float = 5.0) -> None:
    """Flush and stop the default node (at most ``timeout`` seconds); a no-op without one."""
    global _default
    node, _default = _default, None
    if node is not None and node.running:
        node.stop(timeout)


def get(key: Key, default: Any = None) -> Any:
    """``default_node().get(key, default)``: read locally, never over the network."""
    return default_node().get(key, default)


def set(  # noqa: A001 - the collective.js name
    key: Key, value: Any, op: int = SET, ttl: float | None = None
) -> None:
    """``default_node().set(key, value, op, ttl)``; ``ttl`` in seconds makes the key expire."""
    # As a plain int: the node's quick way for a SET tells it by identity (``op is SET``),
    # which ``Operation.SET``, the default here, is not. (``int`` of a member is the plain,
    # cached small int, without the enum's ``value`` property, a Python call.)
    default_node().set(key, value, int(op) if type(op) is Operation else op, ttl)


def incr(key: Key, amount: int | float = 1, ttl: float | None = None) -> int | float:
    """``default_node().incr(key, amount, ttl)``; returns the new local value."""
    return default_node().incr(key, amount, ttl)


def delete(key: Key) -> None:
    """``default_node().delete(key)``."""
    default_node().delete(key)


def snapshot() -> dict[str, Any]:
    """``default_node().snapshot()``: a deep copy of the whole tree."""
    return default_node().snapshot()


def watch(prefix: Key | None, callback: Callable[[Key, Any, Operation, str], object]) -> Watch:
    """``default_node().watch(prefix, callback)``: call ``callback(key, value, op, origin)``
    in its own greenlet for every change at or under ``prefix`` (``""`` for everything), local
    or remote, in the order applied. Returns a handle; ``handle.cancel()`` stops it. See
    ``Collective.watch`` for the exact semantics."""
    return default_node().watch(prefix, callback)
