"""The connections: what a member does with a peer's incoming connection (accept, TLS,
the secret handshake, HELLO and its identity checks, then the read loop that hands frames to
the engine), as a part of ``Collective`` (``_Connections``)."""

from __future__ import annotations

import gc
import logging
import sys
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult

from ._auth import AcceptorHandshake, check_no_auth, encode_refusal
from ._digest import digest_reply
from ._engine import Inbound
from ._errors import AuthenticationError, ProtocolError, refusal
from ._links import _PeerLink, kernel_socket
from ._logcontext import context_of, lend_context, tag_current
from ._peerclock import ClockSkew
from ._server import _handshake_timeout, _recv_before, _send_quietly, current_greenlet
from ._validate import format_address
from ._wire import (
    FRAME_KINDS,
    FrameDecoder,
    Hello,
    digest_buckets,
    encode_status_reply,
    is_status_request,
    parse_hello,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("gcollective")

_RECV_SIZE = 256 * 1024
# A plain connection's reads (see _PlainReader): under the allocator's threshold for mapping
# a block of its own (128 KiB), so a read's bytes object comes from the heap and shrinks in
# place; a 256 KiB one was mapped, shrunk and unmapped, three system calls per read.
_PLAIN_READ_SIZE = 64 * 1024
# After a read that filled ``_PLAIN_READ_SIZE`` (a stream of full frames, a bulk writer's),
# reads of this size, as in 0.4.2: each read costs a callback, a decode and an apply of its
# own, and at 64 KiB a peer writing keys in a loop cost its receivers 4-7 % more CPU per key
# (the throughput scenario) than those three system calls do.
_BULK_READ_SIZE = 256 * 1024
# The most a connection's first frame (HELLO, or a status query) may take: a stranger must not
# make a node buffer and decode megabytes before it has even said who it is.
_FIRST_FRAME_BYTES = 4096
# The first two bytes of a TLS record carrying a handshake (a ClientHello): how a node without
# TLS recognises a peer that speaks it, to say so instead of "not JSON".
_TLS_HANDSHAKE = b"\x16\x03"


def _check_not_tls(data: bytes) -> None:
    """Refuse, with a clear reason, a peer that opens with TLS when this node has none."""
    if data.startswith(_TLS_HANDSHAKE):
        raise AuthenticationError(
            "peer opened with a TLS handshake instead of HELLO: it uses TLS and this node "
            "does not (set certfile, keyfile and cafile on every member)",
            "tls",
        )


class _PlainReader:
    """Reads a plain connection in the event loop: whenever it is readable, one read is
    handed to ``received`` right there, in a callback of the loop, and the connection's
    greenlet only waits for the end. ``run`` returns once ``received`` said the peer closed,
    raises what the read or ``received`` raised, or ``socket.timeout`` once the peer has
    been silent for ``idle_timeout`` seconds.

    ``received`` (decoding and applying a read's frames) never yields, so running it in the
    loop holds nothing up that running it in the greenlet would not. What it saves per
    frame, at a web app's rate one per peer and flush: the greenlet's wait on the
    connection (a waiter, the watcher started and stopped) and the two switches in and out
    of it. One watcher and one timer serve the connection's whole life; each readable turn
    of the loop reads once, so one busy peer does not starve the others.
    """

    def __init__(
        self, sock: Any, idle_timeout: float, received: Callable[[bytes, float], bool]
    ) -> None:
        sock.settimeout(0.0)  # (the loop calls only when readable: a read never waits)
        self._recv = kernel_socket(sock).recv
        self._read_size = _PLAIN_READ_SIZE  # (see _BULK_READ_SIZE)
        self._received = received
        self._hub = gevent.get_hub()
        loop = self._hub.loop
        self._io = loop.io(sock.fileno(), 1)  # (1: readable)
        self._idle_timeout = idle_timeout
        self._heard = time.monotonic()
        self._end: AsyncResult[None] = AsyncResult()
        # Log lines made in the callback are about this connection's peer.
        self._context = context_of(gevent.getcurrent())
        # Fires when the peer would have been silent for idle_timeout since it was last
        # heard (see _check_silence).
        self._timer = loop.timer(idle_timeout)

    def run(self) -> None:
        """Read and hand on until the peer closes (returns) or the connection fails."""
        self._io.start(self._readable)
        self._timer.start(self._check_silence)
        try:
            self._end.get()
        finally:
            self._timer.close()
            self._io.close()

    def _readable(self) -> None:
        """The watcher's callback (in the event loop: never blocks)."""
        hub = self._hub
        lend_context(hub, self._context)
        try:
            data = self._recv(self._read_size)
            self._read_size = _BULK_READ_SIZE if len(data) >= _PLAIN_READ_SIZE else _PLAIN_READ_SIZE
            self._heard = now = time.monotonic()
            if not self._received(data, now):
                self._finish()
        except BlockingIOError:
            pass  # (readable, then read by nobody else: nothing after all)
        except BaseException:
            self._finish(sys.exc_info())  # raised in the greenlet, handled there
        finally:
            lend_context(hub, None)

    def forget(self) -> None:
        """Read no more, at once (a forked child's copy: the connection is the parent's)."""
        self._io.stop()
        self._timer.stop()

    def _finish(self, exc_info: Any = None) -> None:
        """Read no more; ``run`` returns, or raises ``exc_info``'s exception."""
        self.forget()
        if exc_info is None:
            self._end.set()
        else:
            self._end.set_exception(exc_info[1], exc_info)

    def _check_silence(self) -> None:
        """The timer (in the event loop: never blocks): end a reader silent for
        ``idle_timeout``, else set the timer for the next moment that could be so."""
        left = self._heard + self._idle_timeout - time.monotonic()
        if left <= 0:
            self._finish((gsocket.timeout, gsocket.timeout("timed out"), None))
            return
        self._timer.close()
        self._timer = self._hub.loop.timer(left)
        self._timer.start(self._check_silence)


class _Connections:
    """The acceptor's side of a ``Collective``: one greenlet per incoming connection."""

    _links: dict[tuple[str, int], _PeerLink]
    sync_interval: float
    refused_connections: int
    clock_refusals: int
    received_bytes: int  # from peers, as read from the sockets (for metrics)

    if TYPE_CHECKING:  # (the rest of ``Collective``, which this is a part of)

        def __getattr__(self, name: str) -> Any: ...

    def _handle_connection(self, sock: Any, address: tuple[str, int]) -> None:
        current = current_greenlet()
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
        except ClockSkew as exc:
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
                    raise refusal("closed before completing HELLO", "hello")
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
            raise refusal(
                f"peer's certificate ({self._tls.describe_peer(sock)}) does not name the host "
                f"{hello.host} its HELLO announces (check_hostname)",
                "identity",
            )
        sock.settimeout(self.idle_timeout)
        origin = format_address((hello.host, hello.port))
        tag_current(self, origin)  # from now on the peer is known by its address
        self._log_connected(sock, origin, hello, peer, authenticated=opener is not None)
        link = self._link_for(hello, origin)
        if link is not None:
            link.reader = current_greenlet()
        inbound = self._engine.connection_made(link, hello, time.monotonic())
        self._member_said_hello(link, hello)  # (after: a snapshot started replaces the queue)
        self._engine.receive(inbound, messages[1:], decoder.frames[1:], time.monotonic())
        del messages  # (see _read_frames: the GC would walk them for as long as we hold them)
        self._read_frames(sock, feed, decoder, opener, inbound)

    def _log_connected(
        self, sock: Any, origin: str, hello: Hello, peer: str, authenticated: bool
    ) -> None:
        if not authenticated and self._tls is None:
            log.info("peer %s (id %x) connected from %s", origin, hello.node_id, peer)
            return
        security = []
        if self._tls is not None:
            security.append(f"TLS, {self._tls.describe_peer(sock)}")
        if authenticated:
            security.append("authenticated by the secret")
        log.info(
            "peer %s (id %x) connected from %s (%s)",
            origin,
            hello.node_id,
            peer,
            "; ".join(security),
        )

    def _read_frames(
        self,
        sock: Any,
        feed: Callable[[bytes], list[Any]],
        decoder: FrameDecoder,
        opener: Any,
        inbound: Inbound,
    ) -> None:
        """After HELLO: hand what arrives to the engine until the peer closes."""
        try:
            if self._tls is not None:
                # A TLS connection may hold decrypted bytes its descriptor does not show:
                # read, and let gevent wait when there is nothing.
                recv = sock.recv
                received = partial(self._received, feed, decoder, opener, inbound)
                while received(recv(_RECV_SIZE), time.monotonic()):
                    gevent.sleep(0)  # fairness: one busy peer must not starve the others
                return
            # (A partial, not a closure: one Python call less per read.)
            received = partial(self._received, feed, decoder, opener, inbound)
            reader = _PlainReader(sock, self.idle_timeout, received)
            self._loop_readers.add(reader)
            try:
                reader.run()
            finally:
                self._loop_readers.discard(reader)
        except gsocket.timeout:
            raise refusal(f"silent for {self.idle_timeout:g}s", "idle") from None

    def _received(
        self,
        feed: Callable[[bytes], list[Any]],
        decoder: FrameDecoder,
        opener: Any,
        inbound: Inbound,
        data: bytes,
        now: float,
    ) -> bool:
        """Hand one read's bytes, read at ``now`` (monotonic), to the engine; False once the
        peer closed (cleanly: raises ``ProtocolError`` if it stopped inside a frame or
        record)."""
        self.received_bytes += len(data)
        if not data:
            if opener is not None:
                opener.close()  # raises if the stream stopped inside a record
            if decoder.buffered:
                raise ProtocolError(f"closed in the middle of a frame ({decoder.buffered} bytes)")
            return False
        # No cyclic GC while a chunk is decoded and applied (nothing here yields): its
        # decoded frames are alive throughout, a mass of young lists that every collection
        # triggered meanwhile would walk again. They are freed before it resumes (nothing
        # else holds them), so the next collection walks only what the store kept. (A
        # joiner spent ~20 % of its time in the GC otherwise.)
        # (``without_gc``'s pause, inline: two Python calls less per read.)
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            self._engine.receive(inbound, feed(data), decoder.frames, now)
        finally:
            if collecting:
                gc.enable()
        return True

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
            raise refusal("connected to itself", "hello")
        if hello.node_id in self._engine.down_ids:
            raise self._engine.refused_again(hello)
        return hello

    def _link_for(self, hello: Hello, origin: str) -> _PeerLink | None:
        """The link to the member that sent ``hello`` (announcing ``origin``): a new one if
        the address is new to us, ``None`` past the bound on announced links. Raises
        ``ProtocolError`` (category ``identity``) for a HELLO that claims this node's own
        address, or that of another member that is alive: two members must never share one
        address, and a link is never handed from a live member to another."""
        address = (hello.host, hello.port)
        if address == self.local or address == self.advertise:
            raise refusal(
                f"peer (id {hello.node_id:x}) announces this node's own address {origin}: "
                "two members with one address? (not dialling it)",
                "identity",
            )
        link = self._links.get(address)
        if link is None:
            if self._stopping:
                return None
            announced = sum(other.announced for other in self._links.values())
            if announced >= self.max_members:
                self._notices.warning(
                    "announced-limit",
                    "peer %s is new, but %d links to announced addresses exist already: "
                    "not connecting back",
                    origin,
                    announced,
                )
                return None
            log.info("peer %s is new: connecting back", origin)
            added: _PeerLink = self._add_link(address, announced=True)
            return added
        if link.peer_id is not None and link.peer_id != hello.node_id and self._is_live(link):
            raise refusal(
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
                link.dropped = True
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
            reply = encode_status_reply(digest_reply(self, digest))
        if handshake is not None:
            reply = handshake.sealer().seal(reply)
        sock.settimeout(self.handshake_timeout)
        sock.sendall(reply)
