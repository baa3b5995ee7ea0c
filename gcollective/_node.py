"""The node: a ``Store`` replicated over gevent sockets. The only module that does I/O.

Shape (see docs/design.rst):

- One acceptor (a gevent ``StreamServer``) reads every peer's incoming connection and applies
  what arrives to the store.
- One writer greenlet per peer (``_PeerLink``) dials that peer and sends. ``set()`` applies
  an operation and appends it to the node's outbox; at the next turn of the event loop (or
  every ``_OUTBOX_LIMIT`` operations) the outbox is encoded once as one OPS frame whose bytes
  go to every link's pending list, and a writer sends all that is pending with one
  ``sendall``. ``set()`` never waits for the network.
- Every operation carries its origin's sequence number. Each node keeps a version vector of
  what it applied (``Progress``) and a bounded log of recent frames from every origin
  (``OpLog``). Writers send their node's vector every ``sync_interval``; a node that sees a
  peer lacking operations it holds sends them (its own or anyone's), or a full snapshot when
  its log no longer covers the gap. That heals dropped links, partitions and origins that died
  after reaching only some peers.
- A node starting empty asks one live peer for a snapshot of its whole state, metadata and
  version vector included, and merges it with whatever arrives meanwhile.
- Security (``_auth``, ``_tls``; threat model in ``_auth``'s docstring): with TLS options the
  first thing on a connection is a mutual TLS handshake; with a secret, next comes the
  challenge-response handshake, after which the dialer sends only sealed records. Both run
  under the handshake timeout of an accepted connection, inside the connection pool, before
  a single frame is decoded: the limits apply to strangers too.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import sys
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, TypeVar

import gevent
import ujson
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool
from gevent.queue import Queue
from gevent.server import StreamServer

from . import SNAPSHOT_ORIGIN, Operation, _store
from ._auth import (
    AcceptorHandshake,
    DialerHandshake,
    Sealer,
    check_no_auth,
    encode_refusal,
    explain_refusal,
    secret_weakness,
)
from ._clock import HybridClock, millis_stamp, new_node_id, stamp_millis, stamp_origin
from ._engine import OUTBOX_ITEMS, Engine, Inbound, Peer, refusal, without_gc
from ._engine import ClockSkew as _ClockSkew
from ._errors import (
    AuthenticationError,
    InvalidKeyError,
    InvalidValueError,
    NotStartedError,
    ProtocolError,
)
from ._logcontext import install as install_log_context
from ._logcontext import tag_current
from ._store import DELETE, INCREMENT, SET, Store, copy_value, is_number
from ._validate import (
    INT_BOUND,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_INT_DIGITS,
    Key,
    check_amount,
    check_number,
    check_positive,
    check_seconds,
    check_sizes,
    check_ttl,
    clean_value,
    format_address,
    parse_key,
    parse_members,
)
from ._wire import (
    FRAME_KINDS,
    FrameDecoder,
    Hello,
    digest_buckets,
    encode_status_reply,
    is_status_request,
    parse_hello,
    wire_path,
)

__all__ = ["Collective", "Watch"]

log = logging.getLogger("gcollective")

_RECV_SIZE = 256 * 1024
# The most a connection's first frame (HELLO, or a status query) may take: a stranger must not
# make a node buffer and decode megabytes before it has even said who it is.
_FIRST_FRAME_BYTES = 4096
# The first two bytes of a TLS record carrying a handshake (a ClientHello): how a node without
# TLS recognises a peer that speaks it, to say so instead of "not JSON".
_TLS_HANDSHAKE = b"\x16\x03"
# After a key under another parent than the last, ``set`` takes this many keys the plain way
# before it looks for a loop under one parent again: scattered writes skip that look.
_WAY_SKIPS = 8
_INF = float("inf")
# Background work that may be large (a burst of 50,000 expiries, a sweep over millions of
# entries) goes in steps of at most this many items, and yields to the hub after about
# _SLICE_SECONDS of them: each slice holds every other greenlet (and delivery) while it runs.
_STEP = 100
_SLICE_SECONDS = 0.005


# Links to addresses learnt from HELLOs (not configured): at most this many, each forgotten
# after this many failed attempts in a row without a word from the member. A live member
# holds a connection to us and reports every sync_interval, so it is never forgotten.
MAX_ANNOUNCED_LINKS = 256
ANNOUNCED_ATTEMPTS = 5
# What an operation's frame, or a snapshot frame carrying only its value, holds besides its
# key and value, at most: the frame's head and stamp, and per segment of the key a snapshot's
# node (three stamps, brackets, the packed stamp). ``set`` refuses an operation that would
# not fit in ``max_frame`` with these (see ``Collective._check_fits``).
_OP_BYTES = 256
_LEVEL_BYTES = 160
_INT_LOW = -INT_BOUND  # (made once: ``set`` compares every int with it)
# After a connection attempt to a member reached before timed out (a silent network: a
# partition, a lossy link), the next one comes within this many seconds whatever the backoff
# has grown to: the network may heal any moment, and a retry costs one SYN.
_SILENT_RETRY_SECONDS = 0.5
_TCP_RTO_MAX_MS = 44  # Linux's socket option (linux/tcp.h; Python has no name for it yet)

# Bumped in every child after fork (hook registered by the first start()), so a node can tell
# cheaply that it was inherited from the parent and must not be used.
_fork_generation = 0
_fork_hook_registered = False
# Nodes running in this process (either kind), so that a forked child can silence its copies.
_running_nodes: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
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


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Seconds to wait before reconnecting after ``failures`` failures in a row: doubling from
    ``low`` up to ``high``, with jitter so that peers restarted together do not stampede."""
    return min(high, low * (2 ** min(failures, 20))) * random.uniform(0.5, 1.0)


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


_refusal = refusal


def _handshake_timeout(what: str) -> ProtocolError:
    return _refusal(f"no {what} within the handshake timeout", "handshake-timeout")


def _recv_before(sock: Any, deadline: float, what: str) -> bytes:
    """One read of a connection still introducing itself, or ``ProtocolError`` once the
    handshake deadline (``time.monotonic()``) has passed without ``what``."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        sock.settimeout(remaining)
        try:
            return sock.recv(4096)
        except gsocket.timeout:
            pass
    raise _handshake_timeout(what)


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


def _check_secret(secret: Any) -> bytes | None:
    """The secret as bytes (str is UTF-8), or ``None``; ``TypeError`` / ``ValueError`` if it
    cannot be one. Never put the secret itself in a message."""
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    elif isinstance(secret, (bytes, bytearray)):
        secret = bytes(secret)
    else:
        raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")
    if not secret:
        raise ValueError("secret must not be empty (pass None for no authentication)")
    return secret


def _check_tls_files(certfile: Any, keyfile: Any, cafile: Any) -> dict[str, Any] | None:
    """The TLS options as ``_tls``'s context builders take them, or ``None`` without TLS.

    All or nothing: half a TLS configuration is a mistake, never a request for no TLS.
    """
    given = {"certfile": certfile, "keyfile": keyfile, "cafile": cafile}
    if all(value is None for value in given.values()):
        return None
    for name, value in given.items():
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path, not {type(value).__name__}")
    missing = [name for name in ("certfile", "cafile") if given[name] is None]
    if missing:
        raise ValueError(
            f"TLS needs certfile (this member's certificate) and cafile (the collective's "
            f"CA), and keyfile unless the key is in certfile; missing: {', '.join(missing)}"
        )
    return given


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _check_not_tls(data: bytes) -> None:
    """Refuse, with a clear reason, a peer that opens with TLS when this node has none."""
    if data.startswith(_TLS_HANDSHAKE):
        raise AuthenticationError(
            "peer opened with a TLS handshake instead of HELLO: it uses TLS and this node "
            "does not (set certfile, keyfile and cafile on every member)",
            "tls",
        )


def _limit_unacknowledged(sock: Any, seconds: float) -> None:
    """Have the kernel end the connection once data sent on it stays unacknowledged for
    ``seconds`` (Linux's ``TCP_USER_TIMEOUT``; elsewhere nothing changes).

    Without it a link that lost packets waits for TCP's retransmissions, whose backoff doubles
    up to minutes, long after the network is fine again; the kernel would give up only after
    about 15 minutes. A writer always has something recent in flight (PROGRESS every
    ``sync_interval``), so a link stuck either way is noticed: the writer's next send fails
    and it redials, with a fresh connection and no backoff; catch-up resends what was lost.
    A peer that is alive but reads slowly still acknowledges (its window probes): that is
    ``send_timeout``'s business, not this.
    """
    option = getattr(gsocket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return
    sock.setsockopt(gsocket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
    # Linux 6.15 and later also cap the retransmission timeout (1 s at the least): retry at
    # least twice per ``seconds``, so a link whose losses ended recovers within a second.
    if not sys.platform.startswith("linux"):
        return
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, _TCP_RTO_MAX_MS, max(1000, int(seconds * 500)))
    except OSError:
        pass  # an older kernel


def _send_quietly(sock: Any, data: bytes) -> None:
    """Best effort, to a connection about to be closed: tell the peer's log why."""
    if data:
        try:
            sock.settimeout(1.0)
            sock.sendall(data)
        except OSError:
            pass


# -- watching changes -------------------------------------------------------------------------

_MISSING = _store.MISSING
_OPERATIONS = (Operation.SET, Operation.INCREMENT, Operation.DELETE)  # by the store's numbers
_STOP_WATCH = object()  # queued after the last event: the consumer greenlet ends there


def _watch_prefix(prefix: Any) -> tuple[str, ...]:
    """A watch prefix as a path; ``""``, ``()`` and ``None`` watch the whole tree."""
    if prefix is None or prefix == "" or (isinstance(prefix, (tuple, list)) and not prefix):
        return ()
    return parse_key(prefix)


def _key_of(path: tuple[str, ...]) -> Key:
    """The key a callback gets: dotted when that is unambiguous, else the tuple of segments
    (a segment holding a dot, or an empty one from inside a dict value)."""
    for segment in path:
        if not segment or "." in segment:
            return path
    return ".".join(path)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: unlike ``==``, ``1``, ``1.0`` and ``True`` differ."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    return a is b or a == b


def _diff(path: tuple[str, ...], before: Any, after: Any, out: list[Any]) -> None:
    """The changes from ``before`` to ``after`` (``_MISSING`` when absent) at ``path``, as
    ``(path, value, op)``: down to the keys that differ where both are dicts."""
    if _same(before, after):
        return
    if type(before) is dict and type(after) is dict:
        for key in sorted(before.keys() | after.keys()):
            _diff((*path, key), before.get(key, _MISSING), after.get(key, _MISSING), out)
    elif after is _MISSING:
        out.append((path, None, Operation.DELETE))
    else:
        out.append((path, after, Operation.SET))


class Watch:
    """A handle on one ``Collective.watch()`` registration; ``cancel()`` ends it.

    Events wait in an unbounded queue until the watch's own greenlet hands them to the
    callback, one at a time and in the order they were applied.
    """

    def __init__(self, node: Collective, prefix: tuple[str, ...], callback: Any) -> None:
        self.node = node
        #: The watched path (``()`` for the whole tree).
        self.prefix = prefix
        self.callback = callback
        self.delivered = 0
        self.failures = 0
        self._queue: Queue = Queue()
        self._cancelled = False
        self._closing = False  # the end mark is queued behind the last events
        self._greenlet = gevent.spawn(self._consume)

    @property
    def active(self) -> bool:
        """False once cancelled (or its node stopped and everything was delivered)."""
        return not self._cancelled and not self._greenlet.dead

    @property
    def pending(self) -> int:
        """Events queued but not yet handed to the callback."""
        if self._cancelled or self._greenlet.dead:
            return 0  # (what may be left is the end mark)
        return self._queue.qsize() - self._closing

    def cancel(self) -> None:
        """Stop delivering, including events already queued. Idempotent; safe to call from
        inside the callback."""
        if self._cancelled:
            return
        self._cancelled = True
        self.node._remove_watch(self)
        self._drop_queued()  # dropped, not delivered
        self._queue.put(_STOP_WATCH)

    def _drop_queued(self) -> None:
        queue = self._queue
        while not queue.empty():
            queue.get_nowait()

    def _close(self) -> None:
        """The node stopped: deliver what is queued, then end."""
        self._closing = True
        self._queue.put(_STOP_WATCH)

    def _consume(self) -> None:
        try:
            self._deliver()
        except BaseException as exc:
            # Ended by what must end a greenlet (SystemExit, KeyboardInterrupt, a kill): the
            # watch must not stay registered with nobody consuming its queue.
            if not self._cancelled and not isinstance(exc, gevent.GreenletExit):
                log.error(
                    "watch %r: callback raised %s: the watch is cancelled",
                    self._name,
                    type(exc).__name__,
                    exc_info=True,
                )
            self.cancel()
            self._drop_queued()  # (its end mark too: nobody consumes it any more)
            raise

    def _deliver(self) -> None:
        get = self._queue.get
        while True:
            event = get()
            if event is _STOP_WATCH or self._cancelled:
                return
            try:
                self.callback(*event)
            except (gevent.GreenletExit, KeyboardInterrupt, SystemExit):
                raise
            except BaseException:
                # Any other exception, BaseException subclasses included, is the callback's
                # failure on this one change: logged, and the watch goes on.
                self.failures += 1
                log.exception(
                    "watch %r: callback failed on a change at %r (the watch goes on)",
                    self._name,
                    event[0],
                )
            self.delivered += 1

    @property
    def _name(self) -> Key:
        return _key_of(self.prefix) if self.prefix else ""

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<gcollective.Watch {_key_of(self.prefix) if self.prefix else ''!r} {state}>"


class _Writer:
    """What the outgoing side of every kind of link shares: a writer greenlet that dials the
    member and sends what is pending (``_run``, in the subclass), waiting between attempts."""

    node: Any
    name: str  # the member's address, for log lines
    greenlet: gevent.Greenlet | None
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

    def _backoff(self, failures: int, cap: float = _INF) -> None:
        """Wait before the next attempt (at most ``cap`` seconds), or until kicked."""
        node = self.node
        high = max(node.backoff_min, min(cap, node.backoff_max))
        self.kick.clear()
        self.kick.wait(backoff_delay(failures, node.backoff_min, high))


class _PeerLink(_Writer, Peer):
    """One peer: its protocol state (``Peer``, the engine's) and the writer greenlet that
    dials it and sends what the engine queues for it."""

    def __init__(self, node: Collective, address: tuple[str, int], announced: bool = False) -> None:
        Peer.__init__(self, node._engine, address, time.monotonic())
        self.node = node
        # Learnt from a HELLO, not configured: forgotten if it never answers (see ``_run``).
        self.announced = announced
        self.unheard = 0  # attempts in a row that ended without a word from the member
        self.wake = Event()  # something is pending (or the node is stopping)
        self.kick = Event()  # the peer is known to be up: skip the rest of the backoff
        self.state = "connecting"
        self.attempted = False  # one connection attempt finished (either way)
        self.reader: gevent.Greenlet | None = None  # the greenlet reading its connection
        self.is_self = False  # the address turned out to be this node's own (see _run)
        self.greenlet: gevent.Greenlet | None = None
        self._sock: Any = None
        self._dialling: Any = None  # the socket of a connection attempt in progress
        self.sent_frames = 0
        self.sent_bytes = 0
        self.sent_ops = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        # The current connection passed the secret handshake / runs over TLS (for stats()).
        self.authenticated = False
        self.tls = False
        self._phase = "connect"  # what the writer is doing, for failure messages
        # Security problems already logged at WARNING: a misconfigured peer fails the same way
        # on every retry, and one line per retry would bury the rest of the log.
        self._warned: set[str] = set()

    busy = Peer.busy  # (not _Writer's: a snapshot stream is queued work too)

    def data_ready(self) -> None:
        if not self.wake.is_set():
            self.wake.set()

    def drop_connection(self) -> None:
        """End the current connection (the writer reconnects after its backoff)."""
        sock = self._sock
        if sock is not None:
            # Shut down (not just close) so a sendall blocked in the writer fails now. On a TLS
            # socket this also drops the TLS state, but the descriptor is shut for writing,
            # so nothing can leave in clear afterwards.
            try:
                sock.shutdown(gsocket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        node = self.node
        tag_current(node, self.name)  # (see _logcontext)
        failures = 0
        while not node._stopping and not self.is_self:
            self.state = "connecting"
            self._phase = "connect"
            heard = self.last_heard
            try:
                sock = self._dial()
            except OSError as exc:
                if self.kick.is_set() and not node._stopping:
                    self.kick.clear()  # (once: a kick left from earlier must not spin us)
                    continue  # the peer just dialled us: try again at once (see redial_now)
                self._failed(f"connect: {exc}")
                failures += 1
                if self._unanswered(heard):
                    break
                silent = self.connects > 0 and isinstance(exc, gsocket.timeout)
                self._backoff(failures, _SILENT_RETRY_SECONDS if silent else _INF)
                continue
            self._sock = sock
            try:
                self._serve(sock)
            except AuthenticationError as exc:
                # "closed" is a peer hanging up mid-handshake (restarting, overloaded): as
                # transient as a refused connect. Anything else is a configuration problem
                # (or an attack) worth one warning.
                problem = None if exc.reason == "closed" else str(exc)
                self._failed(f"{self._phase}: {exc}", problem)
                failures += 1
            except OSError as exc:
                # A peer that refused us may have said why (a REFUSE line, a TLS alert) before
                # closing; a TLS error explains itself.
                problem = self._tls_problem(exc) or self._peer_said(self._sock)
                if self.state == "connected" and problem is None:
                    failures = 0  # it worked: retry soon, as after any lost connection
                self._failed(f"{self._phase}: {problem or exc}", problem)
                failures += 1
            finally:
                node._engine.stream_lost(self)  # (frames of a stream went down with it)
                current, self._sock = self._sock, None
                if current is not None and current is not sock:
                    current.close()  # the TLS socket wrapping ``sock``
                sock.close()
                self.authenticated = self.tls = False
            if self._unanswered(heard):
                break
            if not node._stopping and not self.is_self:
                self._backoff(failures)
        self.state = "stopped"

    def _unanswered(self, heard: float) -> bool:
        """After an attempt that failed or ended (``heard``: ``last_heard`` before it): True,
        and the link is forgotten, if it is an announced link whose last
        ``ANNOUNCED_ATTEMPTS`` attempts all went by without a word from the member: an
        address someone made up, or a member gone for good (one that comes back dials in and
        announces itself again)."""
        self.unheard = self.unheard + 1 if self.last_heard == heard else 0
        if not self.announced or self.unheard < ANNOUNCED_ATTEMPTS or self.node._stopping:
            return False
        if time.monotonic() - self.last_heard < max(3 * self.node.sync_interval, 1.0):
            return False
        self.node._forget_link(self)
        return True

    def _dial(self) -> Any:
        """A new connection to the peer (like ``create_connection``), or ``OSError``."""
        host, port = self.address
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, where in gsocket.getaddrinfo(
            host, port, 0, gsocket.SOCK_STREAM
        ):
            sock = gsocket.socket(family, kind, proto)
            self._dialling = sock
            try:
                sock.settimeout(self.node.connect_timeout)
                sock.connect(where)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            finally:
                self._dialling = None
        raise error

    def redial_now(self) -> None:
        """The peer is up (it just dialled us): skip the rest of the backoff, and give up an
        attempt in progress (its SYN may have been lost while the network was down, and the
        kernel would resend it only after a second or more) for a fresh one."""
        self.kick.set()
        attempt = self._dialling
        if attempt is not None:
            attempt.close()  # the writer's connect fails at once

    def _failed(self, reason: str, problem: str | None = None) -> None:
        node = self.node
        if problem is not None and problem not in self._warned:
            self._warned.add(problem)
            log.warning(
                "peer %s: %s (retrying; logged once)", self.name, reason, extra={"reason": reason}
            )
        elif self.state == "connected":
            if problem is None:
                # An ordinary loss after a connection that worked: should a security problem
                # come up next, it is news again. (Not cleared on connecting: without a secret
                # the refusal only shows after "connected".)
                self._warned.clear()
            log.info("peer %s: connection lost (%s)", self.name, reason, extra={"reason": reason})
        elif not self.attempted:
            log.debug(
                "peer %s: not reachable yet (%s)", self.name, reason, extra={"reason": reason}
            )
        self.state = "backoff"
        self.last_error = reason
        self.last_error_at = time.time()
        self.attempted = True
        node._engine.link_failed(self, time.monotonic())
        node._check_ready()

    def _tls_problem(self, exc: OSError) -> str | None:
        """A TLS error's explanation (e.g. the acceptor rejected our certificate, which TLS 1.3
        reports on the first read after the handshake), or ``None`` for other errors."""
        tls = self.node._tls
        if tls is None or not isinstance(exc, tls.SSLError):
            return None
        if isinstance(exc, (tls.gssl.SSLEOFError, tls.gssl.SSLZeroReturnError)):
            return None  # the peer just went away, as a plain connection would
        return f"TLS: {tls.explain_tls_error(exc)}"

    def _peer_said(self, sock: Any) -> str | None:
        """After a connection failed: why the peer refused it, if it said so before closing.

        Only an acceptor that refuses us writes anything on our connection: a REFUSE line
        (it requires a secret, or TLS, and this node has none) or, over TLS, an alert (it
        rejected our certificate). Reads what is already there without waiting.
        """
        if sock is None:
            return None
        try:
            sock.settimeout(0.0)
            data = sock.recv(4096)
        except OSError as exc:
            tls = self.node._tls
            if tls is not None and isinstance(
                exc, (tls.gssl.SSLWantReadError, tls.gssl.SSLWantWriteError)
            ):
                return None  # nothing there
            return self._tls_problem(exc)
        for line in data.split(b"\n")[:-1]:
            try:
                why = explain_refusal(json.loads(line))
            except ValueError:
                continue
            if why is not None:
                return why
        return None

    def _secure(self, sock: Any) -> tuple[Any, Sealer | None, bytes]:
        """Run the TLS and secret handshakes the node is configured for, as the dialer.

        Returns the socket to use from then on (the TLS one, if any), the sealer for what
        follows (``None`` without a secret) and the last handshake message, which goes out
        with the first sealed record. Raises ``AuthenticationError`` or ``OSError``.
        """
        node = self.node
        deadline = time.monotonic() + node.handshake_timeout
        if node._client_tls is not None:
            self._phase = "TLS handshake"
            sock = node._tls.connect_tls(
                sock, node._client_tls, self.address[0], node.handshake_timeout
            )
            self._sock = sock  # drop_connection() must reach this one
            self.tls = True
        if node._secret is None:
            return sock, None, b""
        self._phase = "authentication"
        handshake = DialerHandshake(node._secret, node._info)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(handshake.start())
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(4096)
            try:
                step = handshake.receive(data)
            except AuthenticationError as exc:
                if exc.reply:
                    try:
                        sock.sendall(exc.reply)  # tell the peer's log why, if it listens
                    except OSError:
                        pass
                raise
            if step.done:
                self.authenticated = True
                return sock, handshake.sealer(), step.send

    def _serve(self, sock: Any) -> None:
        """Secure the connection as configured, then send HELLO and everything that becomes
        pending, plus PROGRESS regularly."""
        node = self.node
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
        _limit_unacknowledged(sock, node.stall_timeout)
        sock, sealer, last_handshake_message = self._secure(sock)
        self._phase = "send"
        sock.settimeout(node.send_timeout)
        self.state = "connected"
        self.attempted = True
        if sealer is None and not self.tls:
            log.info("peer %s: connected", self.name)
        else:
            log.info("peer %s: connected (%s)", self.name, self._security())
        first = node._engine.link_up(self, time.monotonic())  # HELLO and PROGRESS
        if sealer is None:
            sock.sendall(first)
        else:
            # One sendall for AUTH3 and the first record: the acceptor reads them together.
            sock.sendall(last_handshake_message + sealer.seal(first))
        # PROGRESS every sync_interval: a repeating timer of the event loop raises a flag and
        # wakes us, so waiting for work takes no timeout (a Timeout object per wake-up, ~5 %
        # of a member's time at 10k sets/s).
        ticker = gevent.get_hub().loop.timer(node.sync_interval, node.sync_interval)
        self.progress_due = False
        ticker.start(self._progress_tick)
        try:
            self._send_pending(sock, sealer)
        finally:
            ticker.close()

    def _progress_tick(self) -> None:
        """The connection's timer: PROGRESS is due (runs in the event loop: never blocks)."""
        self.progress_due = True
        if not self.wake.is_set():
            self.wake.set()

    def _send_pending(self, sock: Any, sealer: Any) -> None:
        """Send whatever becomes pending, until the node stops or the connection fails."""
        node = self.node
        wake = self.wake
        take = node._engine.data_to_send
        monotonic = time.monotonic
        while True:
            batch, ops = take(self, monotonic())
            if not batch:
                if node._stopping:
                    return
                wake.clear()
                wake.wait()
                continue
            data = b"".join(batch)
            # Sealed here, in the one greenlet that sends, so records go out in counter order.
            sock.sendall(data if sealer is None else sealer.seal(data))
            self.sent_frames += len(batch)
            self.sent_bytes += len(data)
            self.sent_ops += ops

    def _security(self) -> str:
        """How the current connection is protected, for log lines."""
        parts = []
        if self.tls:
            parts.append(f"TLS, {self.node._tls.describe_peer(self._sock)}")
        if self.authenticated:
            parts.append("authenticated by the secret")
        return "; ".join(parts) or "no authentication"


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
        self._handlers: set[gevent.Greenlet] = set()
        self._synced = Event()
        self._ready = Event()  # start() may return
        self._started = False
        self._stopping = False
        self._pid = 0
        self._generation = -1
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
        self._generation = _fork_generation
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
            self._generation = -1
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
        greenlets = [
            *(link.greenlet for link in self._links.values()),
            *self._handlers,
            *self._background_greenlets(),
        ]
        gevent.killall([g for g in greenlets if g is not None], block=False)

    def _background_greenlets(self) -> list[gevent.Greenlet | None]:
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
            gevent.killall(list(self._handlers), block=True, timeout=1)

    def __enter__(self: _MemberT) -> _MemberT:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``, in the process that started it."""
        return self._started and not self._stopping and self._generation == _fork_generation

    @property
    def synced(self) -> bool:
        """True once another member's whole state has been merged (or taken over, in the
        collective.js mode)."""
        return self._synced.is_set()

    def _check_writable(self) -> None:
        if not self._started:
            raise NotStartedError("the node is not running: call start() first")
        if self._generation != _fork_generation:
            raise NotStartedError(
                f"this node belongs to process {self._pid}; start a new one after fork"
            )
        if self._stopping:
            raise NotStartedError("the node was stopped: start a new one")


class Collective(_Member):
    """One member of a collective: a local replica of the shared tree plus its links.

    ``local`` is this member's listening address and ``peers`` every member's (``local`` may
    be among them; it is skipped). Addresses are ``"host:port"``, ``(host, port)`` or
    ``{"host": ..., "port": ...}``. Nothing happens until ``start()``. Usable as a context
    manager, which starts and stops it.

    Options:
        connect_timeout: seconds for one connection attempt (default 2).
        send_timeout: seconds a peer may stall one send before its link is dropped (30).
        backoff_min, backoff_max: bounds of the reconnect delay in seconds (0.05, 2).
        max_frame: largest frame accepted from a peer, in bytes (256 MiB).
        max_queue_bytes: bytes queued for one peer before it counts as unable to keep up and
            its link is dropped, to be caught up later (64 MiB).
        log_bytes: bytes of recent operations kept to catch peers up (64 MiB); a peer that
            missed more than the log holds gets a full snapshot instead. What every peer
            not declared down has applied is dropped sooner (see "Catch-up" in the README).
        sync_interval: seconds between version-vector reports to each peer (1).
        down_timeout: seconds of silence after which a peer is declared down (600). Until
            then, tombstones and old increments are kept in case it comes back with writes
            nobody has seen; after it, they are forgotten, and that incarnation of the peer
            is refused if it comes back (restart it empty: its unsent writes are dropped).
        clock_skew: the most that members' wall clocks may disagree, in seconds (10, at
            most a year). A frame carrying a stamp (an operation's, or a peer's clock) more
            than this ahead of this node's wall clock is refused with its connection.
        protocol: ``"gcollective"`` (default) or ``"collective.js"``, which makes this a
            ``LegacyCollective`` speaking collective.js 0.3.1's wire protocol (see
            docs/collectivejs.rst for what that mode does not guarantee).
        handshake_timeout: seconds an incoming connection has to send HELLO (5).
        idle_timeout: seconds an incoming connection may stay silent after HELLO (60).
        stall_timeout: seconds data sent to a peer may stay unacknowledged (by its TCP stack)
            before the link is dropped and redialled (2; Linux only, ``TCP_USER_TIMEOUT``).
        max_connections: incoming connections served at once (1024).
        advertise: the address announced to peers, when they reach this node at another
            address than ``local`` (a proxy, NAT or container port); default ``local``.
        secret: the collective's shared secret (str or bytes; the same on every member), or
            ``None``. Every connection then starts with a mutual challenge-response and every
            frame after it is authenticated (not encrypted): only holders of the secret can
            write or read. Use a random one: ``gcollective.generate_secret()``.
            ``gcollective.start()`` takes it from ``GCOLLECTIVE_SECRET`` when not passed.
        certfile, keyfile, cafile: mutual TLS (encryption, and membership by certificate):
            this member's certificate (PEM), its key (omit it if ``certfile`` holds the key
            too) and the collective's own CA. Both ends verify the other's certificate
            against ``cafile``, so every certificate that CA signs is a member. Combine with
            ``secret`` to require both.
        check_hostname: with TLS, a dialer also requires the acceptor's certificate to name
            the host it dialed, and an acceptor requires the dialer's certificate to name the
            host its HELLO announces (as a DNS name or IP address in its subjectAltName), so
            a member cannot claim another's address; off by default, since membership is
            what the CA vouches for (False).
    """

    _links: dict[tuple[str, int], _PeerLink]

    def __new__(cls, *args: Any, protocol: str = "gcollective", **options: Any) -> Any:
        if protocol == "collective.js":
            secured = [
                name
                for name in ("secret", "certfile", "keyfile", "cafile", "check_hostname")
                if options.get(name) not in (None, False)
            ]
            if secured:
                # Fail closed: running unauthenticated when a secret was asked for would be
                # worse than not running.
                raise ValueError(
                    f"{', '.join(secured)}: protocol 'collective.js' has no authentication "
                    "or encryption; use protocol 'gcollective' to secure a collective"
                )
            from ._legacy import LegacyCollective

            return LegacyCollective(*args, protocol=protocol, **options)
        if protocol != "gcollective":
            raise ValueError(f"protocol must be 'gcollective' or 'collective.js', not {protocol!r}")
        return super().__new__(cls)

    def __init__(
        self,
        local: Any,
        peers: Iterable[Any] = (),
        *,
        protocol: str = "gcollective",
        connect_timeout: float = 2.0,
        send_timeout: float = 30.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        max_frame: int = 256 * 1024 * 1024,
        max_queue_bytes: int = 64 * 1024 * 1024,
        log_bytes: int = 64 * 1024 * 1024,
        sync_interval: float = 1.0,
        handshake_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        stall_timeout: float = 2.0,
        max_connections: int = 1024,
        advertise: Any = None,
        down_timeout: float = 600.0,
        clock_skew: float = 10.0,
        secret: str | bytes | None = None,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        cafile: str | os.PathLike[str] | None = None,
        check_hostname: bool = False,
    ) -> None:
        super().__init__(
            local,
            peers,
            advertise,
            connect_timeout=connect_timeout,
            send_timeout=send_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            max_frame=max_frame,
            max_queue_bytes=max_queue_bytes,
            max_connections=max_connections,
        )
        check_positive(
            sync_interval=sync_interval,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout,
            stall_timeout=stall_timeout,
            down_timeout=down_timeout,
            clock_skew=clock_skew,
        )
        check_sizes(log_bytes=(log_bytes, 0, MAX_BYTES))
        self.sync_interval = float(sync_interval)
        self.handshake_timeout = float(handshake_timeout)
        self.idle_timeout = float(idle_timeout)
        self.stall_timeout = float(stall_timeout)
        self.down_timeout = float(down_timeout)
        # (At most ``MAX_SECONDS``, a year, as every option in seconds: stamps within it of
        # the wall clock stay far below what the wire carries.)
        self.clock_skew = float(clock_skew)
        self._secret = _check_secret(secret)
        self._tls_files = _check_tls_files(certfile, keyfile, cafile)
        if type(check_hostname) is not bool:
            raise TypeError(f"check_hostname must be a bool, not {type(check_hostname).__name__}")
        if check_hostname and self._tls_files is None:
            raise ValueError("check_hostname needs TLS (certfile, keyfile and cafile)")
        self.check_hostname = check_hostname
        self._tls: Any = None  # the _tls module, imported by start() when TLS is configured
        self._server_tls: Any = None  # ssl contexts, built by start()
        self._client_tls: Any = None
        # Says who we are in the handshake (authenticated, not secret): the advertised address.
        self._info = format_address(self.advertise)
        # Keys and str values shorter than this together (in characters) fit in a frame
        # whatever they hold (at most 6 bytes each as JSON): ``set`` measures only longer ones.
        self._fits_chars = (max_frame - _OP_BYTES - _LEVEL_BYTES * MAX_DEPTH) // 6
        #: This incarnation's id: fresh on every construction, so a restart is a new origin.
        self.node_id = new_node_id()
        install_log_context(self)  # node id, peer and reason on every log record
        self._store = Store()
        self._data = self._store.data  # the live tree (the same dict for the store's life)
        self._clock = HybridClock(self.node_id)
        self._way_wanted: str | None = None  # the parent of the last key set (see ``set``)
        self._way_skips = 0  # sets to make before looking for a loop again (see ``set``)
        self._housekeeper: gevent.Greenlet | None = None
        # Expiring keys: a greenlet sleeps until the store's next expiry (wall-clock ms in
        # _next_due, inf when none); a sooner one wakes it. Reads check _next_due too, so a
        # read just after an expiry never sees the key.
        self._expirer: gevent.Greenlet | None = None
        self._next_due = _INF
        self._expiry_wake = Event()
        self._writable = False  # started and not stopping (one test on the hot path)
        self.received_bytes = 0  # from peers, as read from the sockets (for metrics)
        self.refused_connections = 0
        self.clock_refusals = 0  # frames refused for a stamp beyond clock_skew
        self._refusals = RefusalLog()
        self._notices = RefusalLog()  # other warnings a stranger could repeat at will
        self._engine = engine = self._new_engine(log_bytes)
        self._links = engine.peers  # (the engine's peers are the links)
        # Own operations not yet encoded (see ``Engine.outbox``): the hot paths add to them.
        self._outbox = engine.outbox
        self._out_special = engine.out_special
        self._progress = engine.progress
        self._log = engine.log
        # Replaced, never changed in place, so a loop over it survives (un)watching; empty
        # means nobody watches, and then the data paths skip the watch code entirely.
        self._watches: list[Watch] = []
        # The same watches by prefix (see _index_keys).
        self._watch_at: dict[tuple[str, ...], list[Watch]] = {}
        self._watch_below: dict[tuple[str, ...], list[Watch]] = {}

    def _new_engine(self, log_bytes: int) -> Engine:
        """The replication engine of this member, its hooks into this shell set."""
        engine = Engine(
            self.node_id,
            self._store,
            self._clock,
            wall_ns=time.time_ns,
            advertise=self.advertise,
            log_bytes=log_bytes,
            max_frame=self.max_frame,
            max_queue_bytes=self.max_queue_bytes,
            sync_interval=self.sync_interval,
            down_timeout=self.down_timeout,
            clock_skew=self.clock_skew,
        )
        engine.notify = self._notify
        engine.merge_watched = self._merge_watched
        engine.due_by = self._due_by
        engine.schedule_flush = self._schedule_flush
        engine.flush_now = self._flush_outbox
        engine.on_synced = self._merged_a_state
        engine.on_internal_error = self._internal_error
        engine.notice = self._notices.warning
        return engine

    # The engine's counters and state, by the names stats(), the metrics and tests read.
    received_frames = property(lambda self: self._engine.received_frames)
    received_ops = property(lambda self: self._engine.received_ops)
    snapshots_merged = property(lambda self: self._engine.snapshots_merged)
    applied_ops = property(lambda self: self._engine.applied_ops)
    sequence_clashes = property(lambda self: self._engine.sequence_clashes)
    _frontier = property(lambda self: self._engine.frontier)
    _snapshot_link = property(lambda self: self._engine.snapshot_peer)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Listen, dial every peer, and wait until one live peer's state is merged.

        Returns as soon as a snapshot from a peer is merged, or once every peer failed one
        connection attempt (so the first member up does not wait), or after ``timeout``
        seconds, or when ``stop()`` is called, whichever comes first. Raises ``OSError`` if
        the address cannot be bound, and then leaves the node as it was (it can be started
        again). Blocks the calling greenlet only.
        """
        if self._started:
            raise RuntimeError("this Collective was already started; create a new one")
        timeout = check_seconds("timeout", timeout, 0.0)
        if self._tls_files is not None and self._tls is None:
            # Built here, not at import or construction: loading keys is I/O, and a bad file
            # should fail the start (with a ValueError naming it), before anything listens.
            from . import _tls

            files = self._tls_files
            self._server_tls = _tls.server_context(**files)
            self._client_tls = _tls.client_context(**files, check_hostname=self.check_hostname)
            self._tls = _tls
        self._start_serving()
        self._writable = True
        self._warn_if_exposed()
        for address in self.peers:
            self._add_link(address)
        self._housekeeper = gevent.spawn(self._housekeeping)
        self._advance()
        self._expirer = gevent.spawn(self._expiring)
        self._check_ready()
        if not self._ready.wait(timeout) and not self._stopping:
            log.warning(
                "started without a peer's state after %.1fs; carrying on (it merges later)",
                timeout,
            )

    def _warn_if_exposed(self) -> None:
        """One warning at start for a configuration that leaves the data open."""
        weakness = None if self._secret is None else secret_weakness(self._secret)
        if weakness is not None:
            log.warning(
                "%s: an attacker who records one handshake, or just asks this node for one, "
                "can guess it offline; use a random one (gcollective.generate_secret())",
                weakness,
            )
        if self._secret is None and self._tls is None:
            host = self._server.socket.getsockname()[0] if self._server is not None else ""
            if not _is_loopback(host):
                log.warning(
                    "listening on %s without a secret or TLS: anyone who can reach this port "
                    "can read and change all the data; set the same secret= (or "
                    "GCOLLECTIVE_SECRET) on every member",
                    format_address(self.local),
                )

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued to reachable peers (waiting at most ``timeout`` seconds), then
        close every connection. Reads keep working on the local copy afterwards."""
        if not self._started or self._stopping:
            return
        self._flush_outbox()
        self._writable = False
        self._stop_serving()
        self._engine.stopping = self._engine.ready = True  # (as _stop_serving's events)
        self._stop_links(timeout)
        if self._housekeeper is not None:
            self._housekeeper.kill(block=True, timeout=1)
        if self._expirer is not None:
            self._expirer.kill(block=True, timeout=1)
        watches, self._watches = self._watches, []
        self._engine.watches = self._watches
        self._watch_at, self._watch_below = {}, {}
        for watch in watches:
            watch._close()  # what is queued is still delivered
        log.info("node %s stopped", format_address(self.local))

    def _background_greenlets(self) -> list[gevent.Greenlet | None]:
        return [
            self._housekeeper,
            self._expirer,
            *(watch._greenlet for watch in self._watches),
        ]

    def _check_ready(self) -> None:
        if self._ready.is_set():
            return
        if self._synced.is_set() or all(
            link.attempted and not link.requested_snapshot for link in self._links.values()
        ):
            self._engine.ready = True
            self._ready.set()

    def _merged_a_state(self) -> None:
        """The engine merged a peer's whole state: the node is synced."""
        self._synced.set()
        self._check_ready()

    def _add_link(self, address: tuple[str, int], announced: bool = False) -> _PeerLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _PeerLink(self, address, announced)
            link.start()
        return link

    def _forget_link(self, link: _PeerLink) -> None:
        """Stop dialling an announced address that never answers (its writer ends)."""
        self._engine.forget_peer(link, time.monotonic())
        log.info(
            "peer %s: forgotten after %d attempts without hearing from it (it was only "
            "announced; it is dialled again if it connects)",
            link.name,
            ANNOUNCED_ATTEMPTS,
        )
        self._check_ready()

    # -- observing ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A cheap, JSON-serialisable picture of this node and each of its peers."""
        now = time.time()
        peers = {}
        for link in self._links.values():
            peers[link.name] = {
                "state": link.state,
                "peer_id": None if link.peer_id is None else f"{link.peer_id:x}",
                "queued_bytes": link.pending_bytes,
                "queued_frames": len(link.pending),
                "queued_ops": link.pending_ops,
                "sent_frames": link.sent_frames,
                "sent_ops": link.sent_ops,
                "sent_bytes": link.sent_bytes,
                "connects": link.connects,
                "overflows": link.overflows,
                "snapshots_sent": link.snapshots_sent,
                "snapshot_owed": link.snapshot_owed,
                "relayed_frames": link.relayed_frames,
                "last_error": link.last_error,
                "last_error_at": link.last_error_at,
                "authenticated": link.authenticated,
                "tls": link.tls,
            }
        return {
            "node_id": f"{self.node_id:x}",
            "address": format_address(self.local),
            "advertise": format_address(self.advertise),
            "running": self.running,
            "synced": self.synced,
            "uptime": 0.0 if self.started_at is None else now - self.started_at,
            "top_level_keys": len(self._store.data),
            "local_ops": self._engine.seq + len(self._outbox) // 3,
            "received_frames": self.received_frames,
            "received_ops": self.received_ops,
            "received_bytes": self.received_bytes,
            "snapshots_merged": self.snapshots_merged,
            "applied_ops": self.applied_ops,
            "refused_connections": self.refused_connections,
            "internal_errors": self.internal_errors,
            "last_internal_error": self.last_internal_error,
            "last_internal_error_at": self.last_internal_error_at,
            "clock_refusals": self.clock_refusals,
            "refusals": dict(self._refusals.counts),
            "sequence_clashes": self.sequence_clashes,
            "origins": len(self._progress.applied),
            "gaps": self._progress.gaps(),
            "log_ops": len(self._log),
            "log_bytes": self._log.bytes,
            "pending_expiries": self._store.pending_expiries,
            "expired": self._store.expired,
            "peers": peers,
        }

    def watch(
        self, prefix: Key | None, callback: Callable[[Key, Any, Operation, str], Any]
    ) -> Watch:
        """Call ``callback(key, value, op, origin)`` for every change at or under ``prefix``
        (``""`` watches everything), local or from a peer, in the order applied; returns a
        ``Watch`` whose ``cancel()`` stops it. May be called before ``start()`` to see the
        state merged while joining.

        - ``key``: the changed path, as a dotted str, or as a tuple of segments when one
          of them contains a dot. A change above the prefix (``set('a', ...)`` for a watch on
          ``'a.b'``) is reported at the prefix.
        - ``value``: a private copy of what is at ``key`` now (``None`` when nothing is).
          It is read when the change is applied, so a later change does not alter it.
        - ``op``: ``SET``, ``INCREMENT`` or ``DELETE``, the operation applied at ``key``. A
          change above the prefix is a ``DELETE`` when the prefix no longer holds anything,
          else a ``SET``; so is each difference a snapshot merge made.
        - ``origin``: the node id (hex) of the member that made the change, this node's
          own for local ones, or ``"snapshot"`` (``SNAPSHOT_ORIGIN``) for a merged snapshot.

        Every operation applied at or under the prefix is reported, even one that changes
        nothing (``value`` then shows what stays). A snapshot merge is reported as its
        differences: one event per key whose value it changed, down to the first level where
        the old and new values are not both dicts.

        The callback runs in the watch's own greenlet, one event at a time, so a slow or
        failing one never holds up replication; an exception (a ``BaseException`` subclass
        too) is logged and the watch goes on, but ``SystemExit`` and ``KeyboardInterrupt``
        cancel it (logged) and go on to the main greenlet. Events wait in an unbounded queue
        meanwhile (``Watch.pending``). Without any watch, nothing is spent on watching; a
        change costs only the watches at, above or below its path. ``NotStartedError`` once
        the node was stopped, or in a child forked after it started.
        """
        if self._started:
            self._check_writable()  # stopped, or inherited through a fork
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        watch = Watch(self, _watch_prefix(prefix), callback)
        self._watches = self._engine.watches = [*self._watches, watch]
        for index, key in self._index_keys(watch.prefix):
            index.setdefault(key, []).append(watch)
        return watch

    def _index_keys(self, prefix: tuple[str, ...]) -> Iterator[tuple[dict[Any, Any], Any]]:
        """Where a watch on ``prefix`` is indexed: under its prefix in ``_watch_at``, and
        under each ancestor of it (but the root) in ``_watch_below``. So an operation finds
        the watches it concerns with one lookup per segment of its path, whatever the number
        of watches. (Index lists change in place: nothing that walks them yields.)"""
        yield self._watch_at, prefix
        for size in range(1, len(prefix)):
            yield self._watch_below, prefix[:size]

    def _remove_watch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches = self._engine.watches = [w for w in self._watches if w is not watch]
            for index, key in self._index_keys(watch.prefix):
                watches = index[key]
                watches.remove(watch)
                if not watches:
                    del index[key]

    def _notify(self, path: tuple[str, ...], op: int, origin: int) -> None:
        """Queue one applied operation for the watches it concerns: those at or above its
        path, and those below it (a change above a prefix is reported at the prefix)."""
        get = self._store.get
        who = f"{origin:x}"
        watch_at = self._watch_at
        for size in range(len(path) + 1):
            watches = watch_at.get(path[:size])
            if watches:
                key, operation = _key_of(path), _OPERATIONS[op]
                for watch in watches:
                    watch._queue.put((key, get(path), operation, who))
        for watch in self._watch_below.get(path, ()):
            prefix = watch.prefix
            value = get(prefix, _MISSING)
            if value is _MISSING:
                watch._queue.put((_key_of(prefix), None, Operation.DELETE, who))
            else:
                watch._queue.put((_key_of(prefix), value, Operation.SET, who))

    def _merge_watched(self, items: list[Any]) -> None:
        """``Store.merge`` for watched nodes: compare what each concerned watch sees before
        and after, and queue the differences."""
        top = {key for key, _ in items}
        watches = [w for w in self._watches if not w.prefix or w.prefix[0] in top]
        if not watches:
            self._store.merge(items)
            return
        get = self._store.get

        def look(prefix: tuple[str, ...]) -> Any:
            if prefix:
                return get(prefix, _MISSING)
            # The whole tree: only the top-level keys in this slice can change.
            return {key: get((key,), _MISSING) for key in top}

        before = [look(w.prefix) for w in watches]
        self._store.merge(items)
        for watch, old in zip(watches, before):
            changes: list[Any] = []
            _diff(watch.prefix, old, look(watch.prefix), changes)
            for path, value, op in changes:
                watch._queue.put((_key_of(path), value, op, SNAPSHOT_ORIGIN))

    # -- the data API ----------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value at ``key``, or ``default``; never touches the network.

        Containers come back as copies: changing them changes nothing shared.
        """
        if self._generation != _fork_generation:
            self._check_writable()
        due = self._next_due
        if due < _INF and due <= time.time() * 1000:
            self._advance()  # (inline: this is the hot path; see _advance_if_due)
        # read_path's walk, inline (a call costs 10-20 % of a get here). It walks first and
        # checks the key fully only when nothing is found: a dotted key that leads to a value
        # is a valid one, unless it went through the one kind of key a valid path never
        # holds but a dict value may, "".
        try:
            value = self._data
            segments = key.split(".")  # type: ignore[union-attr]  # (a tuple: below)
            for segment in segments:
                value = value[segment]
        except (KeyError, TypeError, AttributeError):
            return self._store.get(parse_key(key), default)
        if "" in segments:
            parse_key(key)  # raises: an empty segment
        kind = type(value)
        if kind is dict or kind is list:
            return copy_value(value)
        return value

    def set(self, key: Key, value: Any, op: int = SET, ttl: float | None = None) -> None:
        """Set ``key`` to ``value`` here at once and on every peer soon after.

        ``op`` keeps collective.js's third argument: ``INCREMENT`` adds ``value``, ``DELETE``
        removes the key (``value`` is ignored). Bad keys and values raise before anything is
        applied or sent.

        ``ttl`` (seconds, SET and INCREMENT only) makes the key expire: from the operation's
        stamp time plus ``ttl`` on, every member reads it (and everything under it) as
        missing, unless a newer SET without ttl (or with a new ttl) of it came first. See
        "Expiring keys" in docs/guide.rst.
        """
        if op is not SET or not self._writable or self._watches or type(key) is not str:
            self._set_otherwise(key, value, op, ttl)
            return
        # The common call, a SET of a dotted key (a session's with a ttl too), with the checks
        # it needs and no more: this is the hot path. (``_writable`` is also how it knows the
        # node was not inherited through a fork: the fork hook clears it.)
        kind = type(value)
        if not ((kind is int and _INT_LOW < value < INT_BOUND) or kind is bool or value is None):
            if kind is str:
                value = clean_value(value)
                if len(key) + len(value) > self._fits_chars:
                    self._check_fits(key, value, key.count(".") + 1)
            else:
                depth = key.count(".") + 1
                value = clean_value(value, depth)
                self._check_fits(key, value, depth)
        elif len(key) > self._fits_chars:
            self._check_fits(key, value, key.count(".") + 1)
        ttl_ms = 0 if ttl is None else check_ttl(ttl)
        stamp = self._clock.stamp()
        # A writer's loop sets keys under one parent: the store remembers the way to that
        # parent, so such a key is checked and applied in a few steps.
        store = self._store
        applied = False
        path = None
        if self._way_skips:
            self._way_skips -= 1  # scattered over parents: look for a loop again later
        else:
            above, _, leaf = key.rpartition(".")
            if above == store.way_key and leaf and leaf.isascii():
                # (The parent was checked when it was cached.)
                applied = (
                    store.assign_leaf(stamp, leaf, value, ttl_ms)
                    if ttl_ms
                    else store.set_leaf(stamp, leaf, value)
                )
            else:
                path = parse_key(key)  # raises for a bad key
                if above != self._way_wanted:
                    self._way_wanted = above
                    self._way_skips = _WAY_SKIPS
                elif store.cache_way(above, path[:-1], stamp):
                    # The second key in a row under this parent: likely a loop.
                    applied = (
                        store.assign_leaf(stamp, leaf, value, ttl_ms)
                        if ttl_ms
                        else store.set_leaf(stamp, leaf, value)
                    )
                else:
                    self._way_wanted = None  # no fast way there now: try again later
        if not applied:
            store.apply(stamp, SET, path or parse_key(key), value, ttl_ms)
        if ttl_ms:
            self._due_by(stamp_millis(stamp) + ttl_ms)
            self._out_special.append((len(self._outbox) // 3, SET, ttl_ms))
        # ``_send_own(stamp, SET, key, value, ttl_ms)``, inline: the call would cost a tenth
        # of a set.
        outbox = self._outbox
        outbox += (stamp, key, value)
        if len(outbox) == 3:
            self._schedule_flush()
        elif len(outbox) >= OUTBOX_ITEMS:
            self._flush_outbox()

    def _set_otherwise(self, key: Key, value: Any, op: Any, ttl: float | None) -> None:
        """``set`` of all but a plain SET of a dotted key on a running node without watches."""
        if isinstance(op, bool) or not isinstance(op, int):
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")
        if op == SET:
            self._check_writable()
            path = parse_key(key)
            value = clean_value(value, len(path))
            self._check_fits(key, value, len(path))
            ttl_ms = 0 if ttl is None else check_ttl(ttl)
            self._apply_local(self._clock.stamp(), SET, path, value, key, ttl_ms)
        elif op == INCREMENT:
            self.incr(key, value, ttl)
        elif op == DELETE:
            if ttl is not None:
                raise InvalidValueError("a DELETE cannot have a ttl")
            self.delete(key)
        else:
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")

    def incr(self, key: Key, amount: int | float = 1, ttl: float | None = None) -> int | float:
        """Add ``amount`` to the number at ``key`` (missing counts as 0); returns the new local
        value. Concurrent increments on all members all count.

        With ``ttl`` (seconds) the key expires ``ttl`` after this increment, replacing any
        earlier expiry of it: ``incr(k, ttl=60)`` on every hit drops ``k`` 60 s after the
        last hit. An increment without ttl keeps the expiry the key has."""
        if (
            type(amount) is int
            and type(key) is str
            and self._writable
            and not self._watches
            and _INT_LOW < amount < INT_BOUND
            and len(key) + MAX_INT_DIGITS <= self._fits_chars  # (``_check_fits``'s first test)
        ):
            # The common call (a counter hit in a loop), the way ``set`` takes: under the
            # store's cached way, a new stamp and a few dict updates.
            ttl_ms = 0 if ttl is None else check_ttl(ttl)
            due = self._next_due
            if due < _INF and due <= time.time() * 1000:
                self._advance()  # (``_advance_if_due``, inline: count from what a get reads)
            above, _, leaf = key.rpartition(".")
            stamp = self._clock.stamp()
            store = self._store
            if (above == store.way_key and leaf and leaf.isascii()) or self._on_way(
                key, parse_key(key), stamp
            ):
                result = store.incr_leaf(stamp, leaf, amount, ttl_ms)
                if result is not None:
                    if ttl_ms:
                        self._due_by(stamp_millis(stamp) + ttl_ms)
                    # ``_send_own(stamp, INCREMENT, key, amount, ttl_ms)``, inline (as in set)
                    outbox = self._outbox
                    self._out_special.append((len(outbox) // 3, INCREMENT, ttl_ms))
                    outbox += (stamp, key, amount)
                    if len(outbox) == 3:
                        self._schedule_flush()
                    elif len(outbox) >= OUTBOX_ITEMS:
                        self._flush_outbox()
                    return result
            # Not that case: the general way below, with the stamp already taken (nothing
            # yields meanwhile, so it still orders after everything applied here).
        else:
            stamp = 0
        self._check_writable()
        path = parse_key(key)
        amount = check_amount(amount)
        ttl_ms = 0 if ttl is None else check_ttl(ttl)
        self._check_fits(key, amount, len(path))
        self._advance_if_due()  # counts from what a get reads now, expiries included
        current = self._store.get(path, _store.MISSING)
        if current is not _store.MISSING:
            if not is_number(current):
                raise InvalidValueError(
                    f"cannot increment {key!r}: it holds a {type(current).__name__}, not a number"
                )
            try:
                check_number(current + amount)
            except (InvalidValueError, OverflowError) as exc:  # (a big int plus a float)
                raise InvalidValueError(
                    f"cannot increment {key!r} by {amount!r}: the result would not be a JSON "
                    f"number ({exc})"
                ) from None
        if not stamp:
            stamp = self._clock.stamp()
        self._apply_local(stamp, INCREMENT, path, amount, key, ttl_ms)
        return self._store.get(path)

    def _on_way(self, key: str, path: tuple[str, ...], stamp: int) -> bool:
        """Whether the store's cached way leads to the parent of ``key`` (``path``, valid), so
        that an operation there at ``stamp`` may take the store's ``*_leaf`` fast paths;
        caches it on the second key in a row under one parent (a loop), as ``set`` does."""
        above = key.rpartition(".")[0]
        store = self._store
        if above == store.way_key:
            return True
        if self._way_skips:
            self._way_skips -= 1  # scattered over parents: look for a loop again later
            return False
        if above != self._way_wanted:
            self._way_wanted = above
            self._way_skips = _WAY_SKIPS
            return False
        if store.cache_way(above, path[:-1], stamp):
            return True
        self._way_wanted = None  # no fast way there now: try again later
        return False

    def delete(self, key: Key) -> None:
        """Remove ``key`` (and everything below it) here and on every peer."""
        if (
            type(key) is str
            and self._writable
            and not self._watches
            and len(key) + MAX_INT_DIGITS <= self._fits_chars
        ):
            # A loop deleting keys under one parent: the way ``set`` takes.
            above, _, leaf = key.rpartition(".")
            stamp = self._clock.stamp()
            store = self._store
            if (
                (above == store.way_key and leaf and leaf.isascii())
                or self._on_way(key, parse_key(key), stamp)
            ) and store.delete_leaf(stamp, leaf):
                self._engine.send_own(stamp, DELETE, key, None)
                return
            # Not that case: the general way, with the stamp taken (nothing yielded since).
        else:
            stamp = 0
        self._check_writable()
        path = parse_key(key)
        self._check_fits(key, None, len(path))
        self._apply_local(stamp or self._clock.stamp(), DELETE, path, None, key)

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the whole tree."""
        if self._generation != _fork_generation:
            self._check_writable()
        self._advance_if_due()
        return self._store.to_dict()

    def _check_fits(self, key: Key, value: Any, depth: int) -> None:
        """Refuse an operation (key, checked value, the key's segments) that no peer could
        accept: its OPS frame, or a snapshot frame holding its value alone, would be longer
        than ``max_frame`` (the same on every member, presumably). Measures only what might
        be that long (a character takes at most 6 bytes as JSON, 4 unescaped)."""
        chars = len(key) if isinstance(key, str) else sum(map(len, key)) + 4 * len(key)
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind is dict or kind is list:
            text = ujson.dumps(value, ensure_ascii=False)  # (escaped: 4 bytes a character)
            chars += len(text)
        else:
            chars += MAX_INT_DIGITS  # (a number, or None)
        if chars <= self._fits_chars:
            return
        limit = self.max_frame - _OP_BYTES - _LEVEL_BYTES * depth
        wire = str(key) if isinstance(key, str) else list(key)
        key_bytes = len(ujson.dumps(wire, ensure_ascii=False).encode())
        if key_bytes > limit:
            raise InvalidKeyError(
                f"key is {key_bytes} bytes long, too long for a frame peers accept "
                f"(max_frame={self.max_frame})"
            )
        if kind is not dict and kind is not list:
            text = ujson.dumps(value, ensure_ascii=False)
        if key_bytes + 4 * len(text) <= limit:
            return
        value_bytes = len(text.encode())
        if key_bytes + value_bytes > limit:
            raise InvalidValueError(
                f"value is {value_bytes} bytes as JSON, too long for a frame peers accept "
                f"(max_frame={self.max_frame}, with the key {key_bytes} bytes and "
                f"{self.max_frame - limit} for the frame around them)"
            )

    def _apply_local(
        self, stamp: int, op: int, path: tuple[str, ...], value: Any, key: Any, ttl_ms: int = 0
    ) -> None:
        """Apply an own operation, put it in the outbox and tell the watches. ``key`` is the
        caller's key: a plain str is already the path's wire form."""
        if ttl_ms:
            self._due_by(stamp_millis(stamp) + ttl_ms)
        wire = key if type(key) is str else wire_path(path)
        self._engine.apply_local(stamp, op, path, value, wire, ttl_ms)

    def _schedule_flush(self) -> None:
        """Have the outbox, which just got its first operation, sent once this greenlet
        yields (a burst of sets becomes one frame), or a moment later if a batch just went
        out."""
        wait = self._engine.flush_at() - time.monotonic()
        loop = gevent.get_hub().loop
        if wait > 0:
            # A timer of the event loop, not a greenlet: spawning one per flush cost more
            # than the flush. (The loop holds it until it fires; one that fires after its
            # outbox went out finds it empty.)
            loop.timer(wait).start(self._flush_outbox)
        else:
            loop.run_callback(self._flush_outbox)

    def _flush_outbox(self) -> None:
        """Have the engine encode and queue the outbox (see ``Engine.flush``). Runs as an
        event-loop callback (so it must never block) or inline."""
        if self._outbox and self._generation == _fork_generation:
            # (A callback scheduled before a fork runs in the child too: not its node.)
            self._engine.flush(time.monotonic())

    def _handle_connection(self, sock: Any, address: tuple[str, int]) -> None:
        current = gevent.getcurrent()
        self._handlers.add(current)
        peer = f"{address[0]}:{address[1]}"
        tag_current(self, peer)  # (see _logcontext)
        conn = sock  # the TLS socket once TLS is up
        try:
            # One deadline for TLS, authentication and HELLO: a stranger gets no more time
            # (nor connection-pool slot) than a plain connection would.
            deadline = time.monotonic() + self.handshake_timeout
            if self._server_tls is not None:
                try:
                    if not self._expect_tls(sock, deadline):
                        return  # left without a word
                    remaining = max(0.001, deadline - time.monotonic())
                    conn = self._tls.accept_tls(sock, self._server_tls, remaining)
                except gsocket.timeout:
                    raise _handshake_timeout("TLS handshake") from None
            self._read_connection(conn, peer, deadline)
        except AuthenticationError as exc:
            self.refused_connections += 1
            self._refusals.warning(exc.reason, "connection from %s refused: %s", peer, exc)
            _send_quietly(conn, exc.reply)
        except _ClockSkew as exc:
            self.refused_connections += 1
            self.clock_refusals += 1
            self._refusals.warning("clock-skew", "connection from %s refused: %s", peer, exc)
            _send_quietly(conn, exc.reply)
        except ProtocolError as exc:
            self.refused_connections += 1
            self._refusals.warning(exc.category, "connection from %s closed: %s", peer, exc)
            _send_quietly(conn, getattr(exc, "reply", b""))
        except (OSError, gevent.Timeout) as exc:
            if self._tls is not None and isinstance(exc, self._tls.SSLError):
                # After the handshake, a TLS error means a corrupted or forged record.
                log.warning(
                    "connection from %s closed: TLS error: %s",
                    peer,
                    exc,
                    extra={"reason": f"TLS error: {exc}"},
                )
            else:
                why = str(exc) or type(exc).__name__
                log.info("connection from %s closed: %s", peer, why, extra={"reason": why})
        except Exception:
            # A bug: the connection is closed (below); the peer dials again and the
            # exchange of progress catches up whatever this one lost.
            self._internal_error(f"reader from {peer}")
        finally:
            self._handlers.discard(current)
            if conn is not sock:
                conn.close()
            sock.close()

    def _expect_tls(self, sock: Any, deadline: float) -> bool:
        """Wait for the first byte (by ``deadline``) and refuse a peer that does not open
        with TLS: a plain member gets a REFUSE line it can log, instead of an OpenSSL "wrong
        version number" here and a reset there. False if the peer closed."""
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        first = sock.recv(1, gsocket.MSG_PEEK)  # peek: the TLS handshake reads it again
        if not first:
            return False
        if first != _TLS_HANDSHAKE[:1]:
            raise AuthenticationError(
                "peer did not open with TLS: it has no TLS configured and this node requires "
                "it (set certfile, keyfile and cafile on every member)",
                "tls",
                encode_refusal("tls-required"),
            )
        return True

    def _authenticate(self, sock: Any, deadline: float) -> AcceptorHandshake | None:
        """The acceptor's side of the secret handshake, within ``deadline``.

        Returns the completed handshake, or ``None`` if the peer left without sending a
        byte (a port probe, like a plain connection that closes at once). Raises
        ``AuthenticationError`` (with a REFUSE reply for the peer) or ``ProtocolError``.
        """
        assert self._secret is not None
        handshake = AcceptorHandshake(self._secret, self._info)
        first = True
        while True:
            data = _recv_before(sock, deadline, "authentication")
            if first:
                if not data:
                    return None
                if self._tls is None:
                    _check_not_tls(data)
                first = False
            step = handshake.receive(data)
            if step.send:
                sock.sendall(step.send)
            if step.done:
                return handshake

    def _read_connection(self, sock: Any, peer: str, deadline: float | None = None) -> None:
        decoder = FrameDecoder(self.max_frame, _FIRST_FRAME_BYTES, FRAME_KINDS)
        messages: list[Any] = []
        if deadline is None:
            deadline = time.monotonic() + self.handshake_timeout
        feed = decoder.feed
        opener = None
        handshake = None
        if self._secret is not None:
            handshake = self._authenticate(sock, deadline)
            if handshake is None:
                return
            opener = handshake.opener()
            open_records = opener.feed

            def feed(data: bytes) -> list[Any]:
                # Only payloads of authentic records reach the decoder; a bad record
                # raises before anything in it (or after it) is decoded.
                return decoder.feed(b"".join(open_records(data)))

            # The first record may have come in the same read as AUTH3.
            messages = feed(handshake.leftover)
        first = True
        while not messages:
            data = _recv_before(sock, deadline, "HELLO")
            if not data:
                if opener is not None:
                    opener.close()
                if decoder.buffered:
                    raise _refusal("closed before completing HELLO", "hello")
                return
            if first and opener is None and self._tls is None:
                _check_not_tls(data)
            first = False
            self.received_bytes += len(data)
            try:
                messages = feed(data)
            except ProtocolError as exc:
                exc.category = "hello"
                raise
        if is_status_request(messages[0]):
            self._answer_status(sock, peer, handshake, digest_buckets(messages[0]))
            return
        hello = self._check_hello(messages[0], sock, authenticated=opener is not None)
        if self.check_hostname and not self._tls.names_host(sock, hello.host):
            raise _refusal(
                f"peer's certificate ({self._tls.describe_peer(sock)}) does not name the host "
                f"{hello.host} its HELLO announces (check_hostname)",
                "identity",
            )
        sock.settimeout(self.idle_timeout)
        origin = format_address((hello.host, hello.port))
        tag_current(self, origin)  # from now on the peer is known by its address
        if opener is None and self._tls is None:
            log.info("peer %s (id %x) connected from %s", origin, hello.node_id, peer)
        else:
            security = []
            if self._tls is not None:
                security.append(f"TLS, {self._tls.describe_peer(sock)}")
            if opener is not None:
                security.append("authenticated by the secret")
            log.info(
                "peer %s (id %x) connected from %s (%s)",
                origin,
                hello.node_id,
                peer,
                "; ".join(security),
            )
        link = self._link_for(hello, origin)
        if link is not None:
            link.reader = gevent.getcurrent()
        receive = self._engine.receive
        inbound = self._engine.connection_made(link, hello, time.monotonic())
        receive(inbound, messages[1:], decoder.frames[1:], time.monotonic())
        del messages  # (see below: the GC would walk them for as long as we hold them)
        recv = sock.recv
        while True:
            try:
                data = recv(_RECV_SIZE)
            except gsocket.timeout:
                raise _refusal(f"silent for {self.idle_timeout:g}s", "idle") from None
            self.received_bytes += len(data)
            if not data:
                if opener is not None:
                    opener.close()  # raises if the stream stopped inside a record
                if decoder.buffered:
                    raise ProtocolError(
                        f"closed in the middle of a frame ({decoder.buffered} bytes)"
                    )
                return
            # No cyclic GC while a chunk is decoded and applied (nothing here yields): its
            # decoded frames are alive throughout, a mass of young lists that every
            # collection triggered meanwhile would walk again. They are freed before it
            # resumes (nothing else holds them), so the next collection walks only what
            # the store kept. (A joiner spent ~20 % of its time in the GC otherwise.)
            without_gc(self._receive_read, feed, data, decoder, inbound)
            gevent.sleep(0)  # fairness: one busy peer must not starve the others

    def _check_hello(self, message: Any, sock: Any, authenticated: bool) -> Hello:
        """The first frame of a connection as a HELLO this node accepts, or ``ProtocolError``
        (category ``hello``, or ``AuthenticationError``)."""
        if not authenticated:
            # A peer with a secret opens with AUTH1: say that, not "not a HELLO".
            check_no_auth(message)
        try:
            hello = parse_hello(message)
        except ProtocolError as exc:
            exc.category = "hello"
            raise
        if hello.node_id == self.node_id:
            self._forget_own_alias(sock)
            raise _refusal("connected to itself", "hello")
        if hello.node_id in self._engine.down_ids:
            raise _refusal(
                f"incarnation {hello.node_id:x} was declared down after {self.down_timeout:g}s "
                "of silence; restart it to rejoin (its unsent writes are dropped)",
                "down",
            )
        return hello

    def _link_for(self, hello: Hello, origin: str) -> _PeerLink | None:
        """The link to the member that sent ``hello`` (announcing ``origin``): a new one if
        the address is new to us, ``None`` past the bound on announced links. Raises
        ``ProtocolError`` (category ``identity``) for a HELLO that claims this node's own
        address, or that of another member that is alive: two members must never share one
        address, and a link is never handed from a live member to another."""
        address = (hello.host, hello.port)
        if address == self.local or address == self.advertise:
            raise _refusal(
                f"peer (id {hello.node_id:x}) announces this node's own address {origin}: "
                "two members with one address? (not dialling it)",
                "identity",
            )
        link = self._links.get(address)
        if link is None:
            if self._stopping:
                return None
            announced = sum(other.announced for other in self._links.values())
            if announced >= MAX_ANNOUNCED_LINKS:
                self._notices.warning(
                    "announced-limit",
                    "peer %s is new, but %d links to announced addresses exist already: "
                    "not connecting back",
                    origin,
                    announced,
                )
                return None
            log.info("peer %s is new: connecting back", origin)
            return self._add_link(address, announced=True)
        if link.peer_id is not None and link.peer_id != hello.node_id and self._is_live(link):
            raise _refusal(
                f"peer (id {hello.node_id:x}) claims the address {origin} of member "
                f"{link.peer_id:x}, which is alive: two members with one address? (the link "
                "stays with the member that had it)",
                "identity",
            )
        return link

    def _is_live(self, link: _PeerLink) -> bool:
        """True while the member ``link`` knows is connected to us and reporting: its
        connection is open and its PROGRESS came within a few ``sync_interval``."""
        reader = link.reader
        if reader is None or reader.dead:
            return False
        patience = max(3 * self.sync_interval, 1.0)
        return time.monotonic() - link.last_heard < patience

    def _forget_own_alias(self, sock: Any) -> None:
        """A connection of ours came back to us: the peer address one of our writers dialled
        is this node under another spelling (``localhost:P`` for ``127.0.0.1:P``). That link
        stops dialling and leaves the peers, with one warning; the rest of the connection's
        handling refuses it as usual."""
        try:
            dialler = sock.getpeername()[:2]
        except OSError:
            return
        for address, link in list(self._links.items()):
            raw = link._sock
            try:
                ours = raw is not None and raw.getsockname()[:2] == dialler
            except OSError:
                ours = False
            if ours:
                log.warning(
                    "peer %s is this node itself (its own address spelled differently): no "
                    "longer dialling it; list one spelling of each address on every member",
                    link.name,
                )
                del self._links[address]
                link.is_self = True
                link.stop()
                link.drop_connection()
                self._check_ready()

    def _answer_status(
        self,
        sock: Any,
        peer: str,
        handshake: AcceptorHandshake | None,
        digest: list[int] | None = None,
    ) -> None:
        """Reply to a status query (``python -m gcollective status``) with ``stats()``, or
        to a digest query (``verify``) with ``_digest.digest_reply``: one line, sealed when
        the collective has a secret (the asker authenticated like a member, and the reply
        must be authentic too). The caller then closes."""
        log.debug("%s query from %s", "status" if digest is None else "digest", peer)
        if digest is None:
            reply = encode_status_reply(self.stats())
        else:
            from ._digest import digest_reply

            reply = encode_status_reply(digest_reply(self, digest))
        if handshake is not None:
            reply = handshake.sealer().seal(reply)
        sock.settimeout(self.handshake_timeout)
        sock.sendall(reply)

    def _receive_read(
        self,
        feed: Callable[[bytes], list[Any]],
        data: bytes,
        decoder: FrameDecoder,
        inbound: Inbound,
    ) -> None:
        """Decode one read's bytes (``feed``) and hand its frames to the engine."""
        self._engine.receive(inbound, feed(data), decoder.frames, time.monotonic())

    # -- housekeeping: down peers and forgetting old metadata ---------------------------------

    def _housekeeping(self) -> None:
        """Every ``sync_interval``: declare silent peers down, then let the store forget
        what no operation can reach any more, a slice at a time."""
        tag_current(self)  # (see _logcontext)
        while not self._stopping:
            gevent.sleep(self.sync_interval)
            try:
                self._housekeep()
            except Exception:
                self._internal_error("the housekeeping sweep")  # and again next interval

    def _housekeep(self) -> None:
        """One round of ``_housekeeping``: the engine's, then the store's sweeps in slices."""
        frontier = self._engine.housekeep(time.monotonic())
        # Expiries every member has passed become real deletes; collect then forgets them.
        self._advance()
        store = self._store

        def expire_step() -> bool:
            store.expire(frontier, _STEP)
            return not store.expirable(frontier)

        steps_left = iter(range(50_000 // _STEP))  # a big tree is swept over several rounds

        def collect_step() -> bool:
            return store.collect(frontier, _STEP) or next(steps_left, None) is None

        _in_slices(expire_step)
        _in_slices(collect_step)

    def _due_by(self, due_ms: float) -> None:
        """An expiry is due at ``due_ms``: wake the expirer if that is sooner than it knew."""
        if due_ms < self._next_due:
            self._next_due = due_ms
            self._expiry_wake.set()

    def _advance_if_due(self) -> None:
        """Let expiries due by now fire before the caller reads (one float compare when none
        is due)."""
        due = self._next_due
        if due < _INF and due <= time.time() * 1000:
            self._advance()

    def _advance(self) -> None:
        """Let the store's expiries due by now fire, and tell the watches."""
        store = self._store
        now_ms = int(time.time() * 1000)
        fired = store.advance(now_ms, _STEP)
        self._next_due = store.next_expiry  # still due if the slice did not finish
        if fired:
            # Whatever this node does after seeing a key expire must order after the expiry
            # (derived stamps sit at counter 0 of their millisecond), or it would expire too.
            self._clock.observe(millis_stamp(now_ms))
        if fired and self._watches:
            get = store.get
            for path, stamp in fired:
                op = DELETE if get(path, _MISSING) is _MISSING else SET
                self._notify(path, op, stamp_origin(stamp))

    def _expiring(self) -> None:
        """Sleep until the next expiry (or until a sooner one is registered), then fire it."""
        wake = self._expiry_wake
        while not self._stopping:
            wake.clear()
            due = self._next_due
            if due == _INF:
                wake.wait()
            else:
                delay = (due - time.time() * 1000) / 1000
                if delay > 0:
                    wake.wait(delay)
                else:
                    _let_others_run()  # between slices of a burst
            try:
                self._advance()
            except Exception:
                self._internal_error("the expirer")
                gevent.sleep(self.sync_interval)  # a bug: do not retry in a tight loop
