"""What every kind of member's shell shares: the serve/retry skeleton (gevent's
``baseserver`` plays the same part for servers).

``_Member`` is the lifecycle template (options every member has, the acceptor started and
stopped, the writers stopped, use as a context manager, the guard against use from a forked
child); ``_Writer`` the outgoing side of a link (a supervised writer greenlet that dials and
sends, with the backoff between attempts written once). ``Collective`` (``_node``) and
``LegacyCollective`` (``_legacy``, the collective.js mode) are both built on them, so neither
imports the other's module.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import sys
import time
import weakref
from math import inf
from typing import Any, Callable, Iterable, TypeVar, cast

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from ._errors import NotStartedError, ProtocolError, refusal
from ._validate import MAX_BYTES, check_positive, check_sizes, parse_members

log = logging.getLogger("gcollective")

# Background work that may be large (a burst of 50,000 expiries, a sweep over millions of
# entries) goes in steps of at most this many items, and yields to the hub after about
# _SLICE_SECONDS of them: each slice holds every other greenlet (and delivery) while it runs.
_STEP = 100
_SLICE_SECONDS = 0.005

_fork_hook_registered = False
# Nodes started in this process (either kind): in a forked child (hook registered by the
# first start()) each is marked stale (``_Member._stale``), so it can tell cheaply that it
# was inherited from the parent and must not be used.
_started_nodes: weakref.WeakSet[Any] = weakref.WeakSet()
# Nodes running in this process, so that a forked child can silence its copies.
_running_nodes: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for node in list(_started_nodes):
        node._stale = True
    _started_nodes.clear()
    nodes = list(_running_nodes)
    _running_nodes.clear()
    for node in nodes:
        node._forget_after_fork()


def _in_slices(step: Callable[[], bool]) -> None:
    """Call ``step`` (a bounded amount of work; True once there is no more) until it is done,
    yielding to the hub after every ``_SLICE_SECONDS`` of it."""
    began = time.monotonic()
    while not step():
        if time.monotonic() - began > _SLICE_SECONDS:
            _let_others_run()
            began = time.monotonic()


def _let_others_run() -> None:
    """Yield to every other greenlet, those waiting on a timer or on I/O included: a
    ``sleep(0)`` only lets those already ready run (the event loop runs its callbacks and
    comes straight back, so a 2 ms timer waited for the whole burst), a timer goes through a
    whole turn of the loop."""
    gevent.sleep(0.000_001)


def current_greenlet() -> gevent.Greenlet[Any, Any]:
    """The running greenlet: in a connection handler or a writer, the ``gevent.Greenlet`` the
    pool or ``spawn`` made (``gevent.getcurrent()`` is typed as a plain greenlet)."""
    return cast("gevent.Greenlet[Any, Any]", gevent.getcurrent())


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Seconds to wait before reconnecting after ``failures`` failures in a row: doubling from
    ``low`` up to ``high``, with jitter so that peers restarted together do not stampede."""
    return float(min(high, low * (2 ** min(failures, 20))) * random.uniform(0.5, 1.0))


class RefusalLog:
    """WARNING lines that a stranger (or a misconfigured member) can cause at will, such as
    refused connections: at most one per category (a fixed word, never the text, which may
    echo what a stranger sent) every ``interval`` seconds; the rest go to debug level and the
    next WARNING of that category says how many there were. ``counts`` counts every one per
    category (``stats()`` shows the refusals')."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, category: str, message: str, *args: Any) -> None:
        """Log ``message % args`` for a refusal of ``category``, rate-limited."""
        self.counts[category] = self.counts.get(category, 0) + 1
        now = time.monotonic()
        last = self._last.get(category)
        if last is not None and now - last < self.interval:
            self._quiet[category] = self._quiet.get(category, 0) + 1
            log.debug(message, *args, extra={"reason": category})
            return
        self._last[category] = now
        quiet = self._quiet.pop(category, 0)
        if quiet:
            message += f" ({quiet} more of these ({category}) since, at debug level)"
        else:
            message += f" (more of these ({category}) within {self.interval:g}s: debug level)"
        log.warning(message, *args, extra={"reason": category})  # (see _logcontext)


def _handshake_timeout(what: str) -> ProtocolError:
    return refusal(f"no {what} within the handshake timeout", "handshake-timeout")


def _recv_before(sock: Any, deadline: float, what: str) -> bytes:
    """One read of a connection still introducing itself, or ``ProtocolError`` once the
    handshake deadline (``time.monotonic()``) has passed without ``what``."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        sock.settimeout(remaining)
        try:
            data: bytes = sock.recv(4096)
            return data
        except gsocket.timeout:
            pass
    raise _handshake_timeout(what)


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _send_quietly(sock: Any, data: bytes) -> None:
    """Best effort, to a connection about to be closed: tell the peer's log why."""
    if data:
        try:
            sock.settimeout(1.0)
            sock.sendall(data)
        except OSError:
            pass


class _Writer:
    """What the outgoing side of every kind of link shares: a writer greenlet that dials the
    member and sends what is pending (``_run``, in the subclass), waiting between attempts."""

    node: Any
    name: str  # the member's address, for log lines
    greenlet: gevent.Greenlet[Any, Any] | None
    wake: Event  # something is pending (or the node is stopping)
    kick: Event  # the member is known to be up: skip the rest of the backoff
    pending: list[bytes]

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._supervise)

    def _supervise(self) -> None:
        """Run the writer. An unexpected exception (a bug, never a network error: ``_run``
        handles those) must not end it silently: it is logged with its traceback and counted
        (``stats()``), its connection was closed on the way out, and the writer dials again
        after a backoff, so the member is caught up as after any lost connection."""
        failures = 0
        while True:
            try:
                self._run()
                return
            except Exception as exc:
                failures += 1
                self.node._internal_error(f"writer to {self.name}")
                self._failed(f"internal error: {type(exc).__name__}: {exc}")
                if self.node._stopping:
                    self.state = "stopped"
                    return
                self._backoff(failures)

    def _failed(self, reason: str) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Wake the writer so it notices the node is stopping."""
        self.wake.set()
        self.kick.set()

    @property
    def busy(self) -> bool:
        """True while something is queued for the member."""
        return bool(self.pending)

    def _run(self) -> None:
        raise NotImplementedError

    def _backoff(self, failures: int, cap: float = inf) -> None:
        """Wait before the next attempt (at most ``cap`` seconds), or until kicked."""
        node = self.node
        high = max(node.backoff_min, min(cap, node.backoff_max))
        self.kick.clear()
        self.kick.wait(backoff_delay(failures, node.backoff_min, high))


_MemberT = TypeVar("_MemberT", bound="_Member")


class _Member:
    """The lifecycle every kind of member shares (``Collective``, and ``LegacyCollective`` of
    the collective.js mode): the options every member has, its acceptor and writers started
    and stopped, use as a context manager, and the guard against using it from a forked
    child. A subclass implements ``start`` and ``stop`` with these helpers and serves accepted
    connections in ``_handle_connection``."""

    def __init__(
        self,
        local: Any,
        peers: Iterable[Any],
        advertise: Any,
        *,
        connect_timeout: float,
        send_timeout: float,
        backoff_min: float,
        backoff_max: float,
        max_frame: int,
        max_queue_bytes: int,
        max_connections: int,
    ) -> None:
        """Check and keep the options every kind of member has (``ValueError`` / ``TypeError``
        for a bad one); nothing starts."""
        self.local, self.advertise, self.peers = parse_members(local, peers, advertise)
        check_positive(
            connect_timeout=connect_timeout,
            send_timeout=send_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
        )
        check_sizes(
            max_frame=(max_frame, 1024, MAX_BYTES),
            max_queue_bytes=(max_queue_bytes, 1024, MAX_BYTES),
            max_connections=(max_connections, 1, 1 << 20),
        )
        self.connect_timeout = float(connect_timeout)
        self.send_timeout = float(send_timeout)
        self.backoff_min = float(backoff_min)
        self.backoff_max = max(float(backoff_max), self.backoff_min)
        self.max_frame = max_frame
        self.max_queue_bytes = max_queue_bytes
        self.max_connections = max_connections
        self._links: dict[tuple[str, int], Any] = {}
        self._server: StreamServer | None = None
        self._handlers: set[gevent.Greenlet[Any, Any]] = set()
        # Connections read by a watcher of the event loop, not by their handler greenlet:
        # each has ``forget()``, which a forked child calls (see _forget_after_fork).
        self._loop_readers: set[Any] = set()
        self._synced = Event()
        self._ready = Event()  # start() may return
        self._started = False
        self._stopping = False
        self._pid = 0
        # Not started in this process: never, or before a fork (see _after_fork_in_child).
        self._stale = True
        self.started_at: float | None = None
        # Unexpected exceptions (bugs) caught in a background greenlet (see _internal_error).
        self.internal_errors = 0
        self.last_internal_error: str | None = None
        self.last_internal_error_at: float | None = None

    def start(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def _internal_error(self, where: str) -> None:
        """Log the exception being handled, a bug in ``where`` (a writer, a reader, the flush,
        the sweep, the expirer), at ERROR with its traceback, and count it for ``stats()``.
        The caller then carries on: no background greenlet may die silently."""
        exc = sys.exc_info()[1]
        self.internal_errors += 1
        self.last_internal_error = f"{where}: {type(exc).__name__}: {exc}"
        self.last_internal_error_at = time.time()
        log.exception("%s failed unexpectedly (carrying on)", where)

    def stop(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    def _handle_connection(self, sock: Any, address: Any) -> None:
        raise NotImplementedError

    def _start_serving(self) -> None:
        """Mark the member started in this process and start listening; ``OSError`` if the
        address cannot be bound."""
        _register_fork_hook()
        self._started = True
        self._pid = os.getpid()
        self._stale = False
        _started_nodes.add(self)
        self.started_at = time.time()
        self._server = StreamServer(
            self.local, self._handle_connection, spawn=Pool(self.max_connections)
        )
        try:
            self._server.start()
        except BaseException:
            # Nothing else started yet: back to a node that was never started, which can be
            # started again (once the port is free) and refuses writes meanwhile.
            self._server = None
            self._started = False
            self._stale = True
            _started_nodes.discard(self)
            self.started_at = None
            raise
        _running_nodes.add(self)

    def _stop_serving(self) -> None:
        """Mark the member stopping and stop listening (the caller checked it is running)."""
        self._stopping = True
        self._ready.set()  # a start() still waiting (in another greenlet) returns now
        _running_nodes.discard(self)
        if self._server is not None:
            self._server.close()

    def _forget_after_fork(self) -> None:
        """In a forked child, silence this copy of the parent's member: stop accepting and
        kill its greenlets, which would otherwise run in the child's hub and read from or
        write on the parent's connections (the descriptors are shared). Nothing is sent or
        shut down: only the child's copies of the descriptors are closed."""
        self._stopping = True
        self._writable = False
        if self._server is not None:
            self._server.close()
        # At once, not through the kills below: the fork may have come in the middle of a
        # turn of the loop, whose ready watchers the child's hub then runs before any kill,
        # and a read there would take bytes of the parent's connection.
        for reader in list(self._loop_readers):
            reader.forget()
        greenlets = [
            *(link.greenlet for link in self._links.values()),
            *self._handlers,
            *self._background_greenlets(),
        ]
        gevent.killall([g for g in greenlets if g is not None], block=False)

    def _background_greenlets(self) -> list[gevent.Greenlet[Any, Any] | None]:
        """The subclass's own greenlets besides the writers and connection handlers."""
        return []

    def _stop_links(self, timeout: float) -> None:
        """Let the writers send what is queued for connected members, within ``timeout``
        seconds in all, then end them and every accepted connection."""
        deadline = time.monotonic() + timeout
        links = list(self._links.values())
        for link in links:
            link.stop()
        for link in links:
            if link.greenlet is None:
                continue
            if link.state == "connected" and link.busy:
                link.greenlet.join(max(0.0, deadline - time.monotonic()))
            if not link.greenlet.dead:
                link.greenlet.kill(block=True, timeout=1)
        if self._handlers:
            # (killall's own timeout would raise out of stop(): joinall's gives up quietly.)
            handlers = list(self._handlers)
            gevent.killall(handlers, block=False)
            gevent.joinall(handlers, timeout=1)

    def __enter__(self: _MemberT) -> _MemberT:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``, in the process that started it."""
        return self._started and not self._stopping and not self._stale

    @property
    def synced(self) -> bool:
        """True once another member's whole state has been merged (or taken over, in the
        collective.js mode)."""
        return self._synced.is_set()

    def _check_writable(self) -> None:
        if not self._started:
            raise NotStartedError("the node is not running: call start() first")
        if self._stale:
            raise NotStartedError(
                f"this node belongs to process {self._pid}; start a new one after fork"
            )
        if self._stopping:
            raise NotStartedError("the node was stopped: start a new one")
