"""The links: the outgoing side of each peer (``_PeerLink``), which dials it, secures the
connection, says HELLO and sends what the engine queues for it, redialling after a backoff."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from functools import partial
from math import inf
from typing import Any, Callable

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from ._auth import DialerHandshake, explain_refusal, refused_as_down
from ._engine import Peer
from ._errors import AuthenticationError
from ._logcontext import tag_current
from ._records import Sealer
from ._server import _Writer

log = logging.getLogger("gcollective")

# Links to addresses learnt from HELLOs (not configured): at most this many, each forgotten
# after this many failed attempts in a row without a word from the member. A live member
# holds a connection to us and reports every sync_interval, so it is never forgotten.
MAX_ANNOUNCED_LINKS = 256
ANNOUNCED_ATTEMPTS = 5

# After a connection attempt to a member reached before timed out (a silent network: a
# partition, a lossy link), the next one comes within this many seconds whatever the backoff
# has grown to: the network may heal any moment, and a retry costs one SYN.
_SILENT_RETRY_SECONDS = 0.5
_TCP_RTO_MAX_MS = 44  # Linux's socket option (linux/tcp.h; Python has no name for it yet)


def _limit_unacknowledged(sock: Any, stall_timeout: float, send_timeout: float) -> None:
    """Have the kernel end the connection once data sent on it makes no progress for
    ``send_timeout`` (Linux's ``TCP_USER_TIMEOUT``; elsewhere nothing changes), and retry
    often enough that ``unanswered`` tells lost packets from a peer that reads slowly
    within ``stall_timeout``.

    The kernel's timeout covers a zero window too (a peer alive but not reading, its
    buffer full): ``send_timeout`` is what such a peer is allowed, as for any stalled
    send. Lost packets are noticed sooner, by the writer's PROGRESS timer
    (``_PeerLink._progress_tick``, which asks ``unanswered``): without that a link that
    lost packets would wait for TCP's retransmissions, whose backoff doubles up to minutes,
    long after the network is fine again.
    """
    option = getattr(gsocket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return
    allowed_ms = max(1, int(max(send_timeout, stall_timeout) * 1000))
    sock.setsockopt(gsocket.IPPROTO_TCP, option, allowed_ms)
    # Linux 6.15 and later also cap the retransmission timeout (1 s at the least), which
    # also spaces zero-window probes: retry at least twice per ``stall_timeout``, so a link
    # whose losses ended recovers within a second, and a live peer answers that often.
    if not sys.platform.startswith("linux"):
        return
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, _TCP_RTO_MAX_MS, int(_retry_cap(stall_timeout) * 1000))
    except OSError:
        pass  # an older kernel


def _retry_cap(stall_timeout: float) -> float:
    """The longest wait between two retransmissions (or zero-window probes), in seconds."""
    return max(1.0, stall_timeout / 2)


# struct tcp_info (linux/tcp.h): byte 2, tcpi_retransmits (timeouts of the oldest data
# unacknowledged since the last acknowledgement); byte 3, tcpi_probes (zero-window probes
# unanswered); at byte 56, tcpi_last_ack_recv (milliseconds since the last acknowledgement).
_TCP_INFO_SIZE = 60
_LAST_ACK_RECV = struct.Struct("=I")
_LAST_ACK_RECV_OFFSET = 56


def unanswered(sock: Any, stall_timeout: float) -> str | None:
    """Why the peer's TCP stack counts as gone (packets lost, or the peer down), or ``None``.

    Gone: the kernel retransmitted data and heard nothing for ``stall_timeout``, or probed
    a zero window and heard nothing for ``stall_timeout`` plus the longest wait between two
    probes (each answer resets the count). A peer that is alive but does not read answers
    every probe, however long its window stays shut, so only lost packets (or a peer that
    is gone) pass this. ``None`` where ``TCP_INFO`` is not Linux's.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        info = sock.getsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None  # (closed meanwhile)
    retransmitting, probing = info[2], info[3]
    if not (retransmitting or probing) or len(info) < _TCP_INFO_SIZE:
        return None  # (nothing waits for an answer: an idle link, or data on its way)
    silent = _LAST_ACK_RECV.unpack_from(info, _LAST_ACK_RECV_OFFSET)[0] / 1000
    if retransmitting:
        if silent < stall_timeout:
            return None
        what = "data retransmitted"
    else:
        if silent < stall_timeout + _retry_cap(stall_timeout):
            return None
        what = "zero-window probes"
    return f"no acknowledgement for {silent:.1f} s ({what}; stall_timeout {stall_timeout:g} s)"


def kernel_socket(sock: Any) -> Any:
    """The kernel socket under a gevent socket, for a call made where waiting is never
    wanted (a callback of the event loop, a send that must not wait): gevent keeps it
    non-blocking and its own wrapper, a Python call per read or send, only adds the wait.
    ``sock`` itself when it has none (another socket class)."""
    kernel = getattr(sock, "_sock", None)
    if kernel is not None and kernel.gettimeout() == 0.0:
        return kernel
    return sock


def _send_all(sock: Any, data: bytes) -> None:
    """``sock.sendall(data)`` for a plain gevent socket, in one ``send`` when the kernel takes
    it all (a frame of a few operations always fits): gevent's ``sendall`` first asks the
    socket its buffer size (a system call) and makes a memoryview, per frame sent."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


class _PeerLink(_Writer, Peer):
    """One peer: its protocol state (``Peer``, the engine's) and the writer greenlet that
    dials it and sends what the engine queues for it."""

    def __init__(self, node: Any, address: tuple[str, int], announced: bool = False) -> None:
        Peer.__init__(self, address, time.monotonic(), node.max_queue_bytes)
        self.node = node
        # Learnt from a HELLO, not configured: forgotten if it never answers (see ``_run``).
        self.announced = announced
        self.unheard = 0  # attempts in a row that ended without a word from the member
        self.knows_members = False  # its last HELLO said it reads MEMBERS frames
        self.wake = Event()  # something is pending (or the node is stopping)
        self.kick = Event()  # the peer is known to be up: skip the rest of the backoff
        self.state = "connecting"
        self.attempted = False  # one connection attempt finished (either way)
        self.reader: gevent.Greenlet[Any, Any] | None = None  # the greenlet reading its connection
        # No longer one of the node's links (its member left, or it is the node itself): the
        # writer ends, even while it waits for something to send (nothing else wakes it).
        self.dropped = False
        self.greenlet: gevent.Greenlet[Any, Any] | None = None
        # While the writer waits with nothing to send on a plain connection: a send on it
        # that never waits (see ``data_ready``); None otherwise.
        self._idle_send: Callable[[bytes], int] | None = None
        # The head of ``pending`` is the rest of a frame sent in part on the current
        # connection: only that connection may carry it.
        self._rest_pending = False
        self._sock: Any = None
        # Why the PROGRESS timer ended the current connection (``unanswered``), if it did.
        self._silence: str | None = None
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
        """Something is pending: send it at once if the writer is idle and the kernel takes
        it whole, else wake the writer (always for a full outbox's frames: see
        ``Collective._flush_outbox``)."""
        if self.wake.is_set():
            return
        send = self._idle_send
        if send is None or self.node._flushing_full or not self._sent_at_once(send):
            self.wake.set()

    def _sent_at_once(self, send: Callable[[bytes], int]) -> bool:
        """Send the one frame pending on the writer's behalf (it waits, idle, on a plain
        connection), from the flush that queued it: True if the kernel took all of it.

        A frame per flush and peer is what a web worker sends (a few requests' writes),
        and waking the writer for it cost an event, two greenlet switches and a turn of
        its loop each. Sent here only when it goes first (nothing else pending, no PROGRESS
        due, no snapshot streaming) and without waiting: what the kernel does not take now
        (its buffer full, or an error the writer's own send then meets) stays pending, in
        order, for the writer.
        """
        pending = self.pending
        if len(pending) != 1 or self.progress_due or self.snapshot_stream is not None:
            return False
        data = pending[0]
        try:
            sent = send(data)
        except OSError:
            return False  # (nothing sent: the writer sends it, or fails as it would have)
        self.sent_bytes += sent
        if sent < len(data):
            pending[0] = data[sent:]  # the rest first; the writer counts the frame
            self.pending_bytes = len(pending[0])
            self._rest_pending = True
            return False
        self.pending = []
        self.sent_frames += 1
        self.sent_ops += self.pending_ops
        self.pending_bytes = self.pending_ops = 0
        return True

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
        while not node._stopping and not self.dropped:
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
                self._backoff(failures, _SILENT_RETRY_SECONDS if silent else inf)
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
                # closing; a TLS error explains itself. (Not when we ended it: the send that
                # failed then says only that the connection was shut.)
                silence = self._silence
                problem = None
                if silence is None:
                    problem = self._tls_problem(exc) or self._peer_said(self._sock)
                if refused_as_down(problem):
                    node._engine.declared_down_by_peer(self)
                if self.state == "connected" and problem is None:
                    failures = 0  # it worked: retry soon, as after any lost connection
                self._failed(f"{self._phase}: {problem or silence or exc}", problem)
                failures += 1
            finally:
                node._engine.stream_lost(self)  # (frames of a stream went down with it)
                if self._rest_pending:
                    # A frame's rest would make garbage of the next connection's stream:
                    # it goes, with what followed it (catch-up resends what the peer lacks).
                    self._rest_pending = False
                    self.drop_pending()
                current, self._sock = self._sock, None
                if current is not None and current is not sock:
                    current.close()  # the TLS socket wrapping ``sock``
                sock.close()
                self.authenticated = self.tls = False
            if self._unanswered(heard):
                break
            if not node._stopping and not self.dropped:
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
        if self.connects and not self.down:
            # A member we were connected to may just be cut off (a partition): dialled until
            # it is declared down (down_timeout), or says it left.
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
        elif self.state == "connected" and node._stopping:
            # (Ours is stopping: the peer may close first, having heard that we leave.)
            log.debug("peer %s: connection ended as this member stops (%s)", self.name, reason)
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
        _limit_unacknowledged(sock, node.stall_timeout, node.send_timeout)
        self._silence = None
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
        # of a member's time at 10k sets/s). It also checks that the peer answers.
        ticker = gevent.get_hub().loop.timer(node.sync_interval, node.sync_interval)
        self.progress_due = False
        ticker.start(self._progress_tick)
        try:
            self._send_pending(sock, sealer)
        finally:
            ticker.close()

    def _progress_tick(self) -> None:
        """The connection's timer: PROGRESS is due, and the connection ends if the peer's
        TCP stack stopped answering (runs in the event loop: never blocks).

        The kernel itself ends a stalled connection only after ``send_timeout`` (see
        ``_limit_unacknowledged``), which a peer that reads slowly is allowed; lost packets
        are told apart here, by what the kernel saw (``unanswered``), once per
        ``sync_interval``: one system call, whether the writer is idle, sending, or stuck
        in a send (which ``drop_connection`` ends at once).
        """
        self.progress_due = True
        if not self.wake.is_set():
            self.wake.set()
        # (``_sock``: the TLS socket, if any, holds the descriptor; wrapping detached it
        # from the plain one.)
        sock = self._sock
        silence = None if sock is None else unanswered(sock, self.node.stall_timeout)
        if silence is not None and self._silence is None:
            self._silence = silence
            self.drop_connection()

    def _send_pending(self, sock: Any, sealer: Any) -> None:
        """Send whatever becomes pending, until the node stops or the connection fails."""
        node = self.node
        wake = self.wake
        take = node._engine.data_to_send
        monotonic = time.monotonic
        send = sock.sendall if self.tls else partial(_send_all, sock)
        # (Sealed or TLS records must go out through this greenlet, in order.)
        # (A send of the kernel socket never waits: what it does not take the writer sends.)
        send_at_once = kernel_socket(sock).send if sealer is None and not self.tls else None
        while True:
            batch, ops = take(self, monotonic())
            self._rest_pending = False  # (taken: it goes out now, on this connection)
            if not batch:
                if node._stopping or self.dropped:
                    return
                wake.clear()
                self._idle_send = send_at_once  # (see data_ready)
                try:
                    wake.wait()
                finally:
                    self._idle_send = None
                continue
            if node._stale:
                # A copy in a forked child, woken before the fork hook's kill reached it:
                # sending would put a second record under one counter on the parent's
                # connection (the descriptor is shared), which breaks it.
                return
            data = b"".join(batch)
            # Sealed here, in the one greenlet that sends, so records go out in counter order.
            send(data if sealer is None else sealer.seal(data))
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
