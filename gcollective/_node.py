"""The node: a ``Store`` replicated over gevent sockets. The only module that does I/O.

Shape (see the README's design section):

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

import gc
import ipaddress
import json
import logging
import os
import random
import sys
import time
import weakref
from itertools import repeat
from operator import rshift
from typing import Any, Callable, Iterable, Iterator, TypeVar

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool
from gevent.queue import Queue
from gevent.server import StreamServer

from . import SNAPSHOT_ORIGIN, Operation, _store
from ._auth import (
    MIN_SECRET_BYTES,
    AcceptorHandshake,
    DialerHandshake,
    Sealer,
    check_no_auth,
    encode_refusal,
    explain_refusal,
    secret_is_weak,
)
from ._clock import (
    NODE_BITS,
    HybridClock,
    millis_stamp,
    new_node_id,
    stamp_millis,
    stamp_origin,
)
from ._errors import AuthenticationError, InvalidValueError, NotStartedError, ProtocolError
from ._oplog import OpLog, Progress
from ._store import DELETE, INCREMENT, SET, Store, copy_value, is_number
from ._validate import (
    Key,
    check_amount,
    check_positive,
    check_sizes,
    check_ttl,
    clean_value,
    format_address,
    parse_key,
    parse_members,
)
from ._wire import (
    OPS,
    PROGRESS,
    SNAPSHOT,
    SNAPSHOT_END,
    SNAPSHOT_REQUEST,
    SNAPSHOT_REQUEST_FRAME,
    WANTS_SNAPSHOT,
    FrameDecoder,
    encode_hello,
    encode_ops,
    encode_progress,
    encode_snapshot_end,
    encode_snapshot_item,
    encode_status_reply,
    full_paths,
    is_status_request,
    join_snapshot,
    parse_hello,
    parse_ops,
    parse_progress,
    parse_snapshot_items,
    parse_vector,
    path_segments,
    wire_path,
)

__all__ = ["Collective", "Watch"]

log = logging.getLogger("gcollective")

_RECV_SIZE = 256 * 1024
# The first two bytes of a TLS record carrying a handshake (a ClientHello): how a node without
# TLS recognises a peer that speaks it, to say so instead of "not JSON".
_TLS_HANDSHAKE = b"\x16\x03"
# A snapshot goes out in SNAPSHOT frames of about this size, each built when the previous one
# was sent: the holder exports, the wire carries and the joiner merges at the same time.
_SNAPSHOT_FRAME_BYTES = 1 << 20
# A greenlet that sets without yielding gets its operations sent in batches of this many.
_OUTBOX_LIMIT = 1024
_OUTBOX_ITEMS = 3 * _OUTBOX_LIMIT  # (the outbox holds three items per operation)
# After a batch went out, the next one waits until this much time has passed, so a steady
# stream of sets goes out in a few frames per millisecond rather than one frame per set (each
# frame costs a wake-up and a syscall per peer, and a decode on each peer). An idle node sends
# at once.
_COALESCE_SECONDS = 0.001
# After a key under another parent than the last, ``set`` takes this many keys the plain way
# before it looks for a loop under one parent again: scattered writes skip that look.
_WAY_SKIPS = 8
_INF = float("inf")
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


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Seconds to wait before reconnecting after ``failures`` failures in a row: doubling from
    ``low`` up to ``high``, with jitter so that peers restarted together do not stampede."""
    return min(high, low * (2 ** min(failures, 20))) * random.uniform(0.5, 1.0)


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
    raise ProtocolError(f"no {what} within the handshake timeout")


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
        self._greenlet = gevent.spawn(self._consume)

    @property
    def active(self) -> bool:
        """False once cancelled (or its node stopped and everything was delivered)."""
        return not self._cancelled and not self._greenlet.dead

    @property
    def pending(self) -> int:
        """Events queued but not yet handed to the callback."""
        return self._queue.qsize()

    def cancel(self) -> None:
        """Stop delivering, including events already queued. Idempotent; safe to call from
        inside the callback."""
        if self._cancelled:
            return
        self._cancelled = True
        self.node._remove_watch(self)
        self._queue.put(_STOP_WATCH)

    def _close(self) -> None:
        """The node stopped: deliver what is queued, then end."""
        self._queue.put(_STOP_WATCH)

    def _consume(self) -> None:
        get = self._queue.get
        while True:
            event = get()
            if event is _STOP_WATCH or self._cancelled:
                return
            try:
                self.callback(*event)
            except Exception:
                self.failures += 1
                log.exception(
                    "watch %r: callback failed on a change at %r (the watch goes on)",
                    _key_of(self.prefix) if self.prefix else "",
                    event[0],
                )
            self.delivered += 1

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<gcollective.Watch {_key_of(self.prefix) if self.prefix else ''!r} {state}>"


class _Writer:
    """What the outgoing side of every kind of link shares: a writer greenlet that dials the
    member and sends what is pending (``_run``, in the subclass), waiting between attempts."""

    node: Any
    greenlet: gevent.Greenlet | None
    wake: Event  # something is pending (or the node is stopping)
    kick: Event  # the member is known to be up: skip the rest of the backoff
    pending: list[bytes]

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

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


class _PeerLink(_Writer):
    """The outgoing side of one peer: pending frames and the writer greenlet that sends them."""

    def __init__(self, node: Collective, address: tuple[str, int]) -> None:
        self.node = node
        self.address = address
        self.name = format_address(address)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.pending_ops = 0  # own or relayed operations in ``pending`` (not catch-up)
        self.wake = Event()  # something is pending (or the node is stopping)
        self.progress_due = False  # set every sync_interval by the connection's ticker
        self.kick = Event()  # the peer is known to be up: skip the rest of the backoff
        self.state = "connecting"
        self.attempted = False  # one connection attempt finished (either way)
        self.requested_snapshot = False
        self.peer_id: int | None = None  # from the peer's HELLO on its link to us
        # From the peer's latest PROGRESS (see Collective._gc_frontier).
        self.peer_vector: dict[int, int] = {}
        self.peer_promise: int | None = None
        self.peer_frontier = 0
        self.peer_own_seq = 0
        self.reports = 0  # PROGRESS frames received on the peer's current connection
        self.last_heard = time.monotonic()
        self.down = False
        # After a snapshot was queued for the peer: its version vector. The snapshot is owed
        # (and sent again on every new connection) until the peer's PROGRESS shows it has
        # merged it: a sendall that succeeded proves nothing if the connection then broke.
        self.snapshot_vector: dict[int, int] | None = None
        self.snapshot_due = False
        self.snapshot_queued = False  # it is being streamed, not yet all handed to the kernel
        self.snapshot_stream: Iterator[bytes] | None = None  # its frames still to build
        self._overflow_logged_at = -1
        self.greenlet: gevent.Greenlet | None = None
        self._sock: Any = None
        self._dialling: Any = None  # the socket of a connection attempt in progress
        self.sent_frames = 0
        self.sent_bytes = 0
        self.sent_ops = 0
        self.connects = 0
        self.overflows = 0
        self.snapshots_sent = 0
        self.relayed_frames = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        # The current connection passed the secret handshake / runs over TLS (for stats()).
        self.authenticated = False
        self.tls = False
        self._phase = "connect"  # what the writer is doing, for failure messages
        # Security problems already logged at WARNING: a misconfigured peer fails the same way
        # on every retry, and one line per retry would bury the rest of the log.
        self._warned: set[str] = set()

    def enqueue(self, frame: bytes, ops: int = 0) -> None:
        """Queue a frame (carrying ``ops`` operations); never blocks. A peer that lets too
        much pile up is dropped: the catch-up by version vectors (or a snapshot) brings it
        back up to date later."""
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        self.pending_ops += ops
        if self.pending_bytes > self.node.max_queue_bytes:
            self.overflows += 1
            # Once per connection at WARNING: a stuck peer would otherwise repeat it forever.
            (log.warning if self.connects > self._overflow_logged_at else log.debug)(
                "peer %s: more than %d bytes queued; dropping them and the connection "
                "(it catches up once it keeps pace)",
                self.name,
                self.node.max_queue_bytes,
            )
            self._overflow_logged_at = self.connects
            self.pending = []
            self.pending_bytes = self.pending_ops = 0
            self.snapshot_queued = False  # still due: sent again on the next connection
            self.drop_connection()
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

    def resync(self) -> None:
        """Replace what is pending by a full snapshot (which holds all of it, and more).

        The snapshot's frames are built one at a time as the writer sends them (see
        ``Collective._snapshot_stream``); their bytes do not count against
        ``max_queue_bytes``.
        """
        self.snapshot_stream, vector = self.node._snapshot_stream()
        log.info("peer %s: sending a snapshot", self.name)
        self.pending = []
        self.pending_bytes = self.pending_ops = 0
        self.snapshot_vector = vector
        self.snapshot_due = self.snapshot_queued = True
        self.snapshots_sent += 1
        if not self.wake.is_set():
            self.wake.set()

    @property
    def busy(self) -> bool:
        return bool(self.pending) or self.snapshot_stream is not None

    def _run(self) -> None:
        node = self.node
        failures = 0
        while not node._stopping:
            self.state = "connecting"
            self._phase = "connect"
            try:
                sock = self._dial()
            except OSError as exc:
                if self.kick.is_set() and not node._stopping:
                    self.kick.clear()  # (once: a kick left from earlier must not spin us)
                    continue  # the peer just dialled us: try again at once (see redial_now)
                self._failed(f"connect: {exc}")
                failures += 1
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
                if self.snapshot_stream is not None:
                    # Frames of it went down with the connection: a new one starts over.
                    self.snapshot_stream = None
                    self.snapshot_queued = False
                current, self._sock = self._sock, None
                if current is not None and current is not sock:
                    current.close()  # the TLS socket wrapping ``sock``
                sock.close()
                self.authenticated = self.tls = False
            if not node._stopping:
                self._backoff(failures)
        self.state = "stopped"

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
            log.warning("peer %s: %s (retrying; logged once)", self.name, reason)
        elif self.state == "connected":
            if problem is None:
                # An ordinary loss after a connection that worked: should a security problem
                # come up next, it is news again. (Not cleared on connecting: without a secret
                # the refusal only shows after "connected".)
                self._warned.clear()
            log.info("peer %s: connection lost (%s)", self.name, reason)
        elif not self.attempted:
            log.debug("peer %s: not reachable yet (%s)", self.name, reason)
        self.state = "backoff"
        self.last_error = reason
        self.last_error_at = time.time()
        self.attempted = True
        if self.requested_snapshot:
            self.requested_snapshot = False
            node._snapshot_link = None
            node._request_snapshot()
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
        flags = 0
        if not node._synced.is_set() and node._snapshot_link is None:
            flags |= WANTS_SNAPSHOT
            node._snapshot_link = self
            node._snapshot_asked_at = time.monotonic()
            self.requested_snapshot = True
            log.info("peer %s: asking it for a snapshot", self.name)
        hello = encode_hello(node.node_id, node.advertise[0], node.advertise[1], flags)
        self.connects += 1
        self.state = "connected"
        self.attempted = True
        if sealer is None and not self.tls:
            log.info("peer %s: connected", self.name)
        else:
            log.info("peer %s: connected (%s)", self.name, self._security())
        if self.snapshot_due and not self.snapshot_queued:
            self.resync()  # the last one was lost with its connection
        if sealer is None:
            sock.sendall(hello + node._progress_frame())
        else:
            # One sendall for AUTH3 and the first record: the acceptor reads them together.
            sock.sendall(last_handshake_message + sealer.seal(hello + node._progress_frame()))
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
        flush = node._flush_outbox
        while True:
            flush()  # normally done already, by the event loop's callback
            if self.progress_due:
                self.progress_due = False
                self.pending.append(node._progress_frame())
            stream = self.snapshot_stream
            if stream is not None and not self.pending:
                frame = next(stream, None)
                if frame is None:
                    self.snapshot_stream = None
                    self.snapshot_queued = False
                else:
                    self.pending.append(frame)
            if not self.pending:
                if node._stopping:
                    return
                wake.clear()
                wake.wait()
                continue
            batch = self.pending
            ops = self.pending_ops
            self.pending = []
            self.pending_bytes = self.pending_ops = 0
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
            max_frame=(max_frame, 1024),
            max_queue_bytes=(max_queue_bytes, 1024),
            max_connections=(max_connections, 1),
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

    def start(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

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
        self._server.start()
        _running_nodes.add(self)

    def _stop_serving(self) -> None:
        """Mark the member stopping and stop listening (the caller checked it is running)."""
        self._stopping = True
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
        if self._generation != _fork_generation:
            raise NotStartedError(
                f"this node belongs to process {self._pid}; start a new one after fork"
            )
        if not self._started or self._stopping:
            raise NotStartedError("the node is not running: call start() first")


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
            missed more than the log holds gets a full snapshot instead.
        sync_interval: seconds between version-vector reports to each peer (1).
        down_timeout: seconds of silence after which a peer is declared down (600). Until
            then, tombstones and old increments are kept in case it comes back with writes
            nobody has seen; after it, they are forgotten, and that incarnation of the peer
            is refused if it comes back (restart it empty: its unsent writes are dropped).
        clock_skew: the most that members' wall clocks may disagree, in seconds (10).
        protocol: ``"gcollective"`` (default) or ``"collective.js"``, which makes this a
            ``LegacyCollective`` speaking collective.js 0.3.1's wire protocol (see the README
            for what that mode does not guarantee).
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
    """

    _links: dict[tuple[str, int], _PeerLink]

    def __new__(cls, *args: Any, protocol: str = "gcollective", **options: Any) -> Any:
        if protocol == "collective.js":
            secured = [
                name
                for name in ("secret", "certfile", "keyfile", "cafile")
                if options.get(name) is not None
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
        check_sizes(log_bytes=(log_bytes, 0))
        self.sync_interval = float(sync_interval)
        self.handshake_timeout = float(handshake_timeout)
        self.idle_timeout = float(idle_timeout)
        self.stall_timeout = float(stall_timeout)
        self.down_timeout = float(down_timeout)
        self.clock_skew = float(clock_skew)
        self._secret = _check_secret(secret)
        self._tls_files = _check_tls_files(certfile, keyfile, cafile)
        self._tls: Any = None  # the _tls module, imported by start() when TLS is configured
        self._server_tls: Any = None  # ssl contexts, built by start()
        self._client_tls: Any = None
        # Says who we are in the handshake (authenticated, not secret): the advertised address.
        self._info = format_address(self.advertise)
        #: This incarnation's id: fresh on every construction, so a restart is a new origin.
        self.node_id = new_node_id()
        self._store = Store()
        self._data = self._store.data  # the live tree (the same dict for the store's life)
        self._clock = HybridClock(self.node_id)
        self._seq = 0  # own operations numbered (and in the log) so far
        # Own operations applied but not yet encoded, numbered from ``_seq + 1``: stamp, wire
        # path and value of each, in one flat list (one in-place add per operation, the
        # cheapest append there is), and (index, op, ttl_ms) of the few that are not plain
        # SETs. Flushed by a callback of the event loop (see ``_send_own``).
        self._outbox: list[Any] = []
        self._out_special: list[tuple[int, int, int]] = []
        self._flushed_at = 0.0  # when the outbox was last encoded and queued
        self._way_wanted: str | None = None  # the parent of the last key set (see ``set``)
        self._way_skips = 0  # sets to make before looking for a loop again (see ``set``)
        self._progress = Progress()
        self._log = OpLog(log_bytes)
        self._down_ids: set[int] = set()  # incarnations declared down: refused from then on
        self._frontier = 0  # no operation older than this can still reach this node
        self._housekeeper: gevent.Greenlet | None = None
        # Expiring keys: a greenlet sleeps until the store's next expiry (wall-clock ms in
        # _next_due, inf when none); a sooner one wakes it. Reads check _next_due too, so a
        # read just after an expiry never sees the key.
        self._expirer: gevent.Greenlet | None = None
        self._next_due = _INF
        self._expiry_wake = Event()
        self._snapshot_link: _PeerLink | None = None
        self._snapshot_asked_at = 0.0
        self._writable = False  # started and not stopping (one test on the hot path)
        self.received_frames = 0
        self.received_ops = 0
        self.applied_ops = 0
        self.refused_connections = 0
        self._refusals_logged: set[tuple[str, str]] = set()
        # Replaced, never changed in place, so a loop over it survives (un)watching; empty
        # means nobody watches, and then the data paths skip the watch code entirely.
        self._watches: list[Watch] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Listen, dial every peer, and wait until one live peer's state is merged.

        Returns as soon as a snapshot from a peer is merged, or once every peer failed one
        connection attempt (so the first member up does not wait), or after ``timeout``
        seconds, whichever comes first. Raises ``OSError`` if the address cannot be bound.
        Blocks the calling greenlet only.
        """
        if self._started:
            raise RuntimeError("this Collective was already started; create a new one")
        if self._tls_files is not None and self._tls is None:
            # Built here, not at import or construction: loading keys is I/O, and a bad file
            # should fail the start (with a ValueError naming it), before anything listens.
            from . import _tls

            files = self._tls_files
            self._server_tls = _tls.server_context(**files)
            self._client_tls = _tls.client_context(**files)
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
        if not self._ready.wait(timeout):
            log.warning(
                "started without a peer's state after %.1fs; carrying on (it merges later)",
                timeout,
            )

    def _warn_if_exposed(self) -> None:
        """One warning at start for a configuration that leaves the data open."""
        if self._secret is not None and secret_is_weak(self._secret):
            log.warning(
                "the secret is shorter than %d bytes: an attacker who records one handshake, "
                "or just asks this node for one, can guess it offline; use a random one "
                "(gcollective.generate_secret())",
                MIN_SECRET_BYTES,
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
        self._stop_links(timeout)
        if self._housekeeper is not None:
            self._housekeeper.kill(block=True, timeout=1)
        if self._expirer is not None:
            self._expirer.kill(block=True, timeout=1)
        watches, self._watches = self._watches, []
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
            self._ready.set()

    def _request_snapshot(self, avoid: _PeerLink | None = None) -> None:
        """Ask a connected peer for its state (another than ``avoid`` if there is one), after
        the one asked first went away or did not answer in time."""
        if self._synced.is_set() or self._stopping:
            return
        connected = [link for link in self._links.values() if link.state == "connected"]
        others = [link for link in connected if link is not avoid]
        for link in others or connected:
            link.requested_snapshot = True
            self._snapshot_link = link
            self._snapshot_asked_at = time.monotonic()
            log.info("peer %s: asking it for a snapshot", link.name)
            link.enqueue(SNAPSHOT_REQUEST_FRAME)
            return

    def _add_link(self, address: tuple[str, int]) -> _PeerLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _PeerLink(self, address)
            link.start()
        return link

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
                "snapshot_owed": link.snapshot_vector is not None,
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
            "local_ops": self._seq + len(self._outbox) // 3,
            "received_frames": self.received_frames,
            "received_ops": self.received_ops,
            "applied_ops": self.applied_ops,
            "refused_connections": self.refused_connections,
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
        failing one never holds up replication; an exception is logged and the watch goes
        on. Events wait in an unbounded queue meanwhile (``Watch.pending``). Without any
        watch, nothing is spent on watching.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        watch = Watch(self, _watch_prefix(prefix), callback)
        self._watches = [*self._watches, watch]
        return watch

    def _remove_watch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches = [w for w in self._watches if w is not watch]

    def _notify(self, path: tuple[str, ...], op: int, origin: int) -> None:
        """Queue one applied operation for the watches it concerns."""
        get = self._store.get
        size = len(path)
        who = None
        for watch in self._watches:
            prefix = watch.prefix
            if len(prefix) <= size:
                if path[: len(prefix)] != prefix:
                    continue
                event = (_key_of(path), get(path), _OPERATIONS[op])
            elif prefix[:size] == path:
                value = get(prefix, _MISSING)
                if value is _MISSING:
                    event = (_key_of(prefix), None, Operation.DELETE)
                else:
                    event = (_key_of(prefix), value, Operation.SET)
            else:
                continue
            if who is None:
                who = f"{origin:x}"
            watch._queue.put((*event, who))

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
            segments = key.split(".")
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
        "Expiring keys" in the README.
        """
        if (
            op is not SET
            or ttl is not None
            or not self._writable
            or self._watches
            or type(key) is not str
        ):
            self._set_otherwise(key, value, op, ttl)
            return
        # The common call, a plain SET of a dotted key, with the checks it needs and no more:
        # this is the hot path. (``_writable`` is also how it knows the node was not inherited
        # through a fork: the fork hook clears it.)
        kind = type(value)
        if not (kind is int or kind is bool or value is None):
            value = clean_value(value)
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
                applied = store.set_leaf(stamp, leaf, value)
            else:
                path = parse_key(key)  # raises for a bad key
                if above != self._way_wanted:
                    self._way_wanted = above
                    self._way_skips = _WAY_SKIPS
                elif store.cache_way(above, path[:-1], stamp):
                    # The second key in a row under this parent: likely a loop.
                    applied = store.set_leaf(stamp, leaf, value)
                else:
                    self._way_wanted = None  # no fast way there now: try again later
        if not applied:
            store.apply(stamp, SET, path or parse_key(key), value)
        # ``_send_own(stamp, SET, key, value)``, inline: the call would cost a tenth of a set.
        outbox = self._outbox
        outbox += (stamp, key, value)
        if len(outbox) == 3:
            self._schedule_flush()
        elif len(outbox) >= _OUTBOX_ITEMS:
            self._flush_outbox()

    def _set_otherwise(self, key: Key, value: Any, op: Any, ttl: float | None) -> None:
        """``set`` of all but a plain SET of a dotted key on a running node without watches."""
        if isinstance(op, bool) or not isinstance(op, int):
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")
        if op == SET:
            self._check_writable()
            path = parse_key(key)
            value = clean_value(value)
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
        self._check_writable()
        path = parse_key(key)
        amount = check_amount(amount)
        ttl_ms = 0 if ttl is None else check_ttl(ttl)
        self._advance_if_due()  # counts from what a get reads now, expiries included
        current = self._store.get(path, _store.MISSING)
        if current is not _store.MISSING and not is_number(current):
            raise InvalidValueError(
                f"cannot increment {key!r}: it holds a {type(current).__name__}, not a number"
            )
        stamp = self._clock.stamp()
        self._apply_local(stamp, INCREMENT, path, amount, key, ttl_ms)
        return self._store.get(path)

    def delete(self, key: Key) -> None:
        """Remove ``key`` (and everything below it) here and on every peer."""
        self._check_writable()
        path = parse_key(key)
        stamp = self._clock.stamp()
        self._apply_local(stamp, DELETE, path, None, key)

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the whole tree."""
        if self._generation != _fork_generation:
            self._check_writable()
        self._advance_if_due()
        return self._store.to_dict()

    def _apply_local(
        self, stamp: int, op: int, path: tuple[str, ...], value: Any, key: Any, ttl_ms: int = 0
    ) -> None:
        """Apply an own operation, put it in the outbox and tell the watches. ``key`` is the
        caller's key: a plain str is already the path's wire form."""
        if ttl_ms:
            self._store.apply(stamp, op, path, value, ttl_ms)
            self._due_by(stamp_millis(stamp) + ttl_ms)
        else:
            self._store.apply(stamp, op, path, value)
        self._send_own(stamp, op, key if type(key) is str else wire_path(path), value, ttl_ms)
        if self._watches:
            self._notify(path, op, self.node_id)

    def _send_own(self, stamp: int, op: int, wire: Any, value: Any, ttl_ms: int = 0) -> None:
        """Put an own operation, applied already, in the outbox (``wire``: its path as it
        travels). ``set`` does the same inline for plain SETs."""
        outbox = self._outbox
        if op or ttl_ms:
            self._out_special.append((len(outbox) // 3, op, ttl_ms))
        outbox += (stamp, wire, value)
        if len(outbox) == 3:
            self._schedule_flush()
        elif len(outbox) >= _OUTBOX_ITEMS:
            self._flush_outbox()

    def _schedule_flush(self) -> None:
        """Have the outbox, which just got its first operation, sent once this greenlet
        yields (a burst of sets becomes one frame), or a moment later if a batch just went
        out."""
        wait = self._flushed_at + _COALESCE_SECONDS - time.monotonic()
        loop = gevent.get_hub().loop
        if wait > 0:
            # A timer of the event loop, not a greenlet: spawning one per flush cost more
            # than the flush. (The loop holds it until it fires; one that fires after its
            # outbox went out finds it empty.)
            loop.timer(wait).start(self._flush_outbox)
        else:
            loop.run_callback(self._flush_outbox)

    def _flush_outbox(self) -> None:
        """Number the operations of the outbox, encode them as OPS frames (once), log them
        and queue them for every peer; the own entry of the progress moves with them.

        Runs as an event-loop callback (so it must never block) or inline; cheap when the
        outbox is empty, so anything that needs the log, the queues or the own progress
        current calls it first.
        """
        outbox = self._outbox
        if not outbox or self._generation != _fork_generation:
            return  # (a callback scheduled before a fork runs in the child too: not its node)
        self._flushed_at = time.monotonic()
        self._outbox = []
        stamps = outbox[0::3]
        size = len(stamps)
        ops: list[int] = [SET] * size
        ttls: list[int] | None = None
        if self._out_special:
            for index, op, ttl_ms in self._out_special:
                ops[index] = op
                if ttl_ms:
                    if ttls is None:
                        ttls = [0] * size
                    ttls[index] = ttl_ms
            self._out_special = []
        columns: tuple[list[Any], ...] = (
            list(map(rshift, stamps, repeat(NODE_BITS))),
            ops,
            outbox[1::3],
            outbox[2::3],
        )
        if ttls is not None:
            columns += (ttls,)
        numbered_from = self._seq + 1
        self._seq += size
        node_id = self.node_id
        self._progress.applied[node_id] = self._seq
        self._progress.stamps[node_id] = stamps[-1]
        frames: list[tuple[int, int, bytes]] = []
        self._encode_batch(numbered_from, columns, frames)
        links = self._links.values()
        add_to_log = self._log.add
        for first, last, frame in frames:
            add_to_log(node_id, first, last, frame)
            for link in links:
                link.enqueue(frame, last - first + 1)

    def _encode_batch(
        self, first: int, columns: tuple[list[Any], ...], out: list[tuple[int, int, bytes]]
    ) -> None:
        """OPS frames for the operations in ``columns``, numbered from ``first``, halved
        until each frame is well under what a peer accepts (``max_frame``)."""
        size = len(columns[0])
        frame = encode_ops(self.node_id, first, *columns)
        if len(frame) > self.max_frame // 4 and size > 1:
            half = size // 2
            self._encode_batch(first, tuple(c[:half] for c in columns), out)
            self._encode_batch(first + half, tuple(c[half:] for c in columns), out)
        else:
            out.append((first, first + size - 1, frame))

    # -- receiving ----------------------------------------------------------------------------

    def _progress_frame(self) -> bytes:
        self._flush_outbox()  # the own entry of the progress moves when the outbox is flushed
        complete = self._ready.is_set() and (self._synced.is_set() or self._snapshot_link is None)
        return encode_progress(
            self._progress.vector(), complete, self._clock.promise(), self._frontier
        )

    def _snapshot_stream(self) -> tuple[Iterator[bytes], dict[int, int]]:
        """A snapshot of the whole state: an iterator of SNAPSHOT frames ending with
        SNAPSHOT_END, and the version vector it holds at least.

        The vector is taken now; the top-level keys are exported one by one as the frames are
        built, later. The store only ever learns more, so each slice holds everything the
        vector says and maybe more (which the peer then receives twice, harmlessly).
        """
        self._flush_outbox()
        end = encode_snapshot_end(self._progress.vector())
        keys = self._store.top_level_keys()
        return self._snapshot_frames(keys, end), dict(self._progress.applied)

    def _snapshot_frames(self, keys: list[str], end: bytes) -> Iterator[bytes]:
        export_item = self._store.export_item
        parts: list[bytes] = []
        size = 0
        for key in keys:
            item = export_item(key, copy=False)  # (encoded before anything can change)
            if item is None:
                continue  # forgotten since (a tombstone nothing can reach any more)
            part = encode_snapshot_item(item)
            parts.append(part)
            size += len(part)
            if size >= _SNAPSHOT_FRAME_BYTES:
                yield join_snapshot(parts)
                parts = []
                size = 0
        if parts:
            yield join_snapshot(parts)
        yield end

    def _handle_connection(self, sock: Any, address: tuple[str, int]) -> None:
        current = gevent.getcurrent()
        self._handlers.add(current)
        peer = f"{address[0]}:{address[1]}"
        conn = sock  # the TLS socket once TLS is up
        try:
            # One deadline for TLS, authentication and HELLO: a stranger gets no more time
            # (nor connection-pool slot) than a plain connection would.
            deadline = time.monotonic() + self.handshake_timeout
            if self._server_tls is not None:
                try:
                    if not self._expect_tls(sock):
                        return  # left without a word
                    remaining = max(0.001, deadline - time.monotonic())
                    conn = self._tls.accept_tls(sock, self._server_tls, remaining)
                except gsocket.timeout:
                    raise ProtocolError("no TLS handshake within the handshake timeout") from None
            self._read_connection(conn, peer, deadline)
        except AuthenticationError as exc:
            self.refused_connections += 1
            self._log_refusal(address[0], peer, exc)
            _send_quietly(conn, exc.reply)
        except ProtocolError as exc:
            self.refused_connections += 1
            log.warning("connection from %s closed: %s", peer, exc)
            _send_quietly(conn, getattr(exc, "reply", b""))
        except (OSError, gevent.Timeout) as exc:
            if self._tls is not None and isinstance(exc, self._tls.SSLError):
                # After the handshake, a TLS error means a corrupted or forged record.
                log.warning("connection from %s closed: TLS error: %s", peer, exc)
            else:
                log.info("connection from %s closed: %s", peer, exc or type(exc).__name__)
        finally:
            self._handlers.discard(current)
            if conn is not sock:
                conn.close()
            sock.close()

    def _log_refusal(self, host: str, peer: str, exc: AuthenticationError) -> None:
        """One warning per address and reason: a misconfigured member retries forever, and a
        line per attempt would bury the rest of the log (``refused_connections`` counts all)."""
        key = (host, str(exc))
        seen = self._refusals_logged
        if key in seen:
            log.debug("connection from %s refused: %s", peer, exc)
            return
        if len(seen) >= 1024:
            seen.clear()  # bounded: a stranger's messages must not grow memory
        seen.add(key)
        log.warning(
            "connection from %s refused: %s (repeats from %s are logged at debug level)",
            peer,
            exc,
            host,
        )

    def _expect_tls(self, sock: Any) -> bool:
        """Wait for the first byte (within the handshake timeout) and refuse a peer that does
        not open with TLS: a plain member gets a REFUSE line it can log, instead of an
        OpenSSL "wrong version number" here and a reset there. False if the peer closed."""
        sock.settimeout(self.handshake_timeout)
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
        decoder = FrameDecoder(self.max_frame)
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
                    raise ProtocolError("closed before completing HELLO")
                return
            if first and opener is None and self._tls is None:
                _check_not_tls(data)
            first = False
            messages = feed(data)
        if is_status_request(messages[0]):
            self._answer_status(sock, peer, handshake)
            return
        if opener is None:
            # A peer with a secret opens with AUTH1: say that, not "not a HELLO".
            check_no_auth(messages[0])
        hello = parse_hello(messages[0])
        if hello.node_id == self.node_id:
            raise ProtocolError("connected to itself")
        if hello.node_id in self._down_ids:
            raise ProtocolError(
                f"incarnation {hello.node_id:x} was declared down after {self.down_timeout:g}s "
                "of silence; restart it to rejoin (its unsent writes are dropped)"
            )
        sock.settimeout(self.idle_timeout)
        origin = format_address((hello.host, hello.port))
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
        link = self._links.get((hello.host, hello.port))
        if link is None and not self._stopping:
            log.info("peer %s is new: connecting back", origin)
            link = self._add_link((hello.host, hello.port))
        if link is not None:
            if link.peer_id is not None and link.peer_id != hello.node_id:
                # Our connection may still go to the old incarnation, whose kernel would take
                # bytes it will never read: start a new one.
                log.info("peer %s restarted (new incarnation %x)", origin, hello.node_id)
                link.snapshot_vector = None
                link.snapshot_due = False
                link.drop_connection()
            link.peer_id = hello.node_id
            link.reports = 0
            link.down = False
            link.last_heard = time.monotonic()
            link.redial_now()
            # A new connection means the peer may have missed what was in flight on its
            # last one: report our progress now, not at the next tick, so its catch-up
            # starts at once.
            link.progress_due = True
            link.wake.set()
            if hello.flags & WANTS_SNAPSHOT:
                link.resync()
        # What we had when the peer connected bounds the first catch-up: later operations
        # are on their way to it already.
        sent_bound = dict(self._progress.applied)
        frames = decoder.frames[1:]
        sent_bound = self._dispatch(messages[1:], frames, link, hello.node_id, sent_bound)
        del messages  # (see below: the GC would walk them for as long as we hold them)
        recv = sock.recv
        while True:
            try:
                data = recv(_RECV_SIZE)
            except gsocket.timeout:
                raise ProtocolError(f"silent for {self.idle_timeout:g}s") from None
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
            collecting = gc.isenabled()
            if collecting:
                gc.disable()
            try:
                sent_bound = self._dispatch(
                    feed(data), decoder.frames, link, hello.node_id, sent_bound
                )
            finally:
                if collecting:
                    gc.enable()
            gevent.sleep(0)  # fairness: one busy peer must not starve the others

    def _answer_status(self, sock: Any, peer: str, handshake: AcceptorHandshake | None) -> None:
        """Reply to a status query (``python -m gcollective status``) with ``stats()``: one
        line, sealed when the collective has a secret (the asker authenticated like a
        member, and the reply must be authentic too). The caller then closes."""
        log.debug("status query from %s", peer)
        reply = encode_status_reply(self.stats())
        if handshake is not None:
            reply = handshake.sealer().seal(reply)
        sock.settimeout(self.handshake_timeout)
        sock.sendall(reply)

    def _dispatch(
        self,
        messages: list[Any],
        frames: list[bytes],
        link: _PeerLink | None,
        peer_id: int,
        sent_bound: dict[int, int],
    ) -> dict[int, int]:
        """Apply a batch of frames from one peer; returns the next catch-up bound."""
        self.received_frames += len(messages)
        for index, message in enumerate(messages):
            if type(message) is not list or not message:
                raise ProtocolError("frame is not a non-empty JSON array")
            kind = message[0]
            if kind == OPS:
                self._apply_ops(message, frames[index])
            elif kind == PROGRESS:
                vector, complete, promise, frontier = parse_progress(message)
                if link is not None and link.peer_id == peer_id:
                    theirs = {origin: seq for origin, seq, _ in vector}
                    # The previous report on this same connection, to see what stalled.
                    previous = link.peer_vector if link.reports > 0 else None
                    link.reports += 1
                    link.peer_vector = theirs
                    link.peer_promise = promise
                    link.peer_own_seq = theirs.get(peer_id, 0)
                    link.peer_frontier = frontier
                    link.last_heard = time.monotonic()
                    if complete and link.snapshot_vector is not None:
                        # A joiner reports complete once it merged a snapshot, ours or
                        # another member's: ours is no longer owed, and the catch-up below
                        # sends whatever it still lacks (or a snapshot, if the log cannot).
                        link.snapshot_vector = None
                        link.snapshot_due = False
                    if complete:
                        sent_bound = self._catch_up(link, theirs, previous, peer_id, sent_bound)
            elif kind == SNAPSHOT:
                if len(message) != 2:
                    raise ProtocolError("SNAPSHOT frame has the wrong length")
                items, newest = parse_snapshot_items(message[1])
                if self._watches:
                    self._merge_watched(items)
                else:
                    self._store.merge(items)
                if newest:
                    self._clock.observe(newest)  # our next stamps order after all of it
                self._due_by(self._store.next_expiry)
            elif kind == SNAPSHOT_END:
                if len(message) != 2:
                    raise ProtocolError("SNAPSHOT_END frame has the wrong length")
                self._progress.merge(parse_vector(message[1]))
                if not self._synced.is_set():
                    log.info("merged a peer's state")
                    self._synced.set()
                    self._check_ready()
            elif kind == SNAPSHOT_REQUEST:
                if link is not None:
                    link.resync()
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        return sent_bound

    def _apply_ops(self, message: list[Any], frame: bytes) -> None:
        """Apply a received OPS frame (checked whole first), skipping repeats, and log it."""
        origin, first, stamps, ops, paths, values, ttls, parent = parse_ops(message)
        last = first + len(stamps) - 1
        progress = self._progress
        done = progress.applied.get(origin, 0)
        self.received_ops += len(stamps)
        if last <= done:
            return  # all repeats (relayed, or also in a snapshot)
        if ttls is None:
            ttls = [0] * len(stamps)
        elif ttls:
            self._due_by(min(stamp_millis(st) + t for st, t in zip(stamps, ttls) if t))
        apply_one = self._apply_received
        if first == done + 1 and not progress.has_gap(origin):
            # The normal case: the next operations of this origin, in order.
            if self._watches or any(ttls):
                paths = full_paths(parent, paths)
                for stamp, op, path, value, ttl_ms in zip(stamps, ops, paths, values, ttls):
                    apply_one(stamp, op, path, value, ttl_ms, origin)
            else:
                self._store.apply_batch(stamps, ops, paths, values, parent)
            progress.applied[origin] = last
            progress.stamps[origin] = stamps[-1]
            applied = len(stamps)
        else:
            accept = progress.accept
            applied = 0
            paths = full_paths(parent, paths)
            for seq, stamp, op, path, value, ttl_ms in zip(
                range(first, last + 1), stamps, ops, paths, values, ttls
            ):
                if accept(origin, seq, stamp):
                    apply_one(stamp, op, path, value, ttl_ms, origin)
                    applied += 1
        self.applied_ops += applied
        self._clock.observe(stamps[-1])
        self._log.add(origin, first, last, frame)  # without its newline: no copy

    def _apply_received(
        self, stamp: int, op: int, path: str | list[str], value: Any, ttl_ms: int, origin: int
    ) -> None:
        """Apply one received operation (see ``_apply_ops``) and tell the watches."""
        segments = path_segments(path)
        if ttl_ms:
            self._store.apply(stamp, op, segments, value, ttl_ms)
        else:
            self._store.apply(stamp, op, segments, value)
        if self._watches:
            self._notify(tuple(segments), op, origin)

    def _catch_up(
        self,
        link: _PeerLink,
        theirs: dict[int, int],
        previous: dict[int, int] | None,
        peer_id: int,
        bound: dict[int, int],
    ) -> dict[int, int]:
        """Send a peer what it lacks of what we had by ``bound``; return the next bound.

        After the first report on a connection, only origins on which the peer made no
        progress since its previous report are resent: a peer that is merely behind (busy
        applying a burst) gets nothing twice; one whose link from an origin is broken, or
        whose origin died, gets what it lacks.
        """
        if link.snapshot_vector is not None:
            return dict(self._progress.applied)  # it is still merging the snapshot we sent
        self._flush_outbox()  # own operations up to ``bound`` must be in the log
        if previous is not None:
            bound = {o: b for o, b in bound.items() if theirs.get(o, 0) <= previous.get(o, 0)}
        frames = self._log.missing(theirs, bound, exclude=peer_id)
        if frames is not None and sum(map(len, frames)) > self.max_queue_bytes // 2:
            frames = None  # too much to queue: the snapshot bypasses the queue limit
        if frames is None:
            log.info("peer %s missed too much to resend: sending a snapshot", link.name)
            link.resync()
        elif frames:
            log.debug("peer %s: resending %d operations it missed", link.name, len(frames))
            link.relayed_frames += len(frames)
            # Own frames are logged with their newline, received ones without.
            link.enqueue(b"".join(f if f[-1:] == b"\n" else f + b"\n" for f in frames))
        return dict(self._progress.applied)

    # -- housekeeping: down peers and forgetting old metadata ---------------------------------

    def _housekeeping(self) -> None:
        """Every ``sync_interval``: declare silent peers down, then let the store forget
        what no operation can reach any more, a slice at a time."""
        while not self._stopping:
            gevent.sleep(self.sync_interval)
            now = time.monotonic()
            asked = self._snapshot_link
            patience = max(5.0, 10 * self.sync_interval)
            if asked is not None and not self.synced and now - self._snapshot_asked_at > patience:
                # No answer yet (a connection that died unnoticed, a peer that is stuck):
                # ask again, preferably someone else.
                asked.requested_snapshot = False
                self._snapshot_link = None
                self._request_snapshot(avoid=asked)
            for link in self._links.values():
                if not link.down and now - link.last_heard > self.down_timeout:
                    link.down = True
                    if link.peer_id is not None:
                        self._down_ids.add(link.peer_id)
                    log.warning(
                        "peer %s silent for %gs: declared down (metadata it might have needed "
                        "is forgotten; if it comes back it must restart empty)",
                        link.name,
                        self.down_timeout,
                    )
            self._frontier = self._own_frontier()
            frontier = self._gc_frontier()
            # Expiries every member has passed become real deletes; collect then forgets them.
            self._advance()
            self._store.expire(frontier)
            # Small slices: each one holds the hub (and so every delivery) while it runs.
            for _ in range(50):
                if self._store.collect(frontier, budget=1000):
                    break
                gevent.sleep(0)

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
        fired = store.advance(now_ms)
        self._next_due = store.next_expiry
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
            self._advance()

    def _own_frontier(self) -> int:
        """A stamp below which no operation can still reach this node.

        Each member that is not declared down promises that its next operations are newer
        than its clock (trusted once we hold everything it had sent by then); each past
        incarnation limits it while a member holds more of its operations than we do; a
        member never heard from allows nothing; and a member that was never seen cannot
        make operations older than the clocks allow (``clock_skew``).
        """
        progress = self._progress
        floor = millis_stamp(int((time.time() - self.clock_skew) * 1000))
        members = [link for link in self._links.values() if not link.down]
        live = {self.node_id}
        for link in members:
            peer = link.peer_id
            if peer is None or link.peer_promise is None:
                return 0
            live.add(peer)
            if progress.applied.get(peer, 0) >= link.peer_own_seq and not progress.has_gap(peer):
                floor = min(floor, link.peer_promise)
            else:
                floor = min(floor, progress.stamps.get(peer, 0))
        for origin, seq in progress.applied.items():
            if origin in live:
                continue
            if progress.has_gap(origin) or any(
                link.peer_vector.get(origin, 0) > seq for link in members
            ):
                floor = min(floor, progress.stamps.get(origin, 0))
        return floor

    def _gc_frontier(self) -> int:
        """A stamp below which no operation can reach any member (so every replica already
        holds every operation older than it): the minimum of everyone's frontier."""
        frontier = self._frontier
        for link in self._links.values():
            if not link.down:
                frontier = min(frontier, link.peer_frontier)
        return frontier
