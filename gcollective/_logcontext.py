"""Structured context on every record of the ``gcollective`` loggers, for JSON formatters.

Every record carries three attributes (``None`` when they do not apply), which a JSON log
formatter picks up like any ``extra=`` field (docs/operations.rst has an example):

- ``node_id``: the member's id, in hex as in ``stats()``;
- ``peer``: the peer's address (the one dialled, or where an accepted connection came from);
- ``reason``: why a connection failed, was closed or refused.

``reason`` is passed with ``extra=`` where such a line is logged. ``node_id`` and ``peer``
come from the greenlet that logs: a member's greenlets (one writer per peer, one handler per
accepted connection, its housekeeping) are tagged when they start, so a record made in one
says which member and which peer it is about. In a process with a single member (the usual
case) its id is on every record, including those logged from the application's greenlets.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Protocol

from gevent import getcurrent

if TYPE_CHECKING:
    from greenlet import greenlet as RawGreenlet  # what gevent.getcurrent() returns

__all__ = ["FIELDS", "context_of", "install", "lend_context", "tag_current", "tag_greenlet"]

#: The attributes every record of the ``gcollective`` loggers carries.
FIELDS = ("node_id", "peer", "reason")
#: The greenlet attribute holding its context.
_ATTRIBUTE = "gcollective_log_context"
_LOGGERS = ("gcollective", "gcollective.legacy")


class Member(Protocol):
    """What the log context reads of a member."""

    @property
    def node_id(self) -> int: ...


#: A greenlet's context: ``{"node_id": hex, "peer": address or None}``.
Context = dict[str, str | None]

_nodes: weakref.WeakSet[Member] = weakref.WeakSet()


class ContextFilter(logging.Filter):
    """Fills in ``FIELDS`` a record was not given with ``extra=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = getattr(getcurrent(), _ATTRIBUTE, None) or _only_node()
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        return True


def _only_node() -> Context:
    nodes = list(_nodes)
    if len(nodes) == 1:
        return {"node_id": f"{nodes[0].node_id:x}"}
    return {}


_FILTER = ContextFilter()


def install(node: Member) -> None:
    """Put the filter on the ``gcollective`` loggers (once) and count ``node`` among the
    members of this process."""
    _nodes.add(node)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def tag_greenlet(greenlet: RawGreenlet, node: Member, peer: str | None = None) -> None:
    """Records logged in ``greenlet`` are about ``node`` (and ``peer``)."""
    setattr(greenlet, _ATTRIBUTE, {"node_id": f"{node.node_id:x}", "peer": peer})


def tag_current(node: Member, peer: str | None = None) -> None:
    """``tag_greenlet`` for the running greenlet."""
    tag_greenlet(getcurrent(), node, peer)


def context_of(greenlet: RawGreenlet) -> Context | None:
    """The context ``greenlet`` was tagged with (None: none)."""
    return getattr(greenlet, _ATTRIBUTE, None)


def lend_context(greenlet: RawGreenlet, context: Context | None) -> None:
    """Records logged in ``greenlet`` (the hub, running a member's callback) carry
    ``context`` until it is lent None again."""
    setattr(greenlet, _ATTRIBUTE, context)
