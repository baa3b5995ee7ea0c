"""collective.js 0.3.1 compatibility mode: speak its wire protocol, keep its semantics.

A ``LegacyCollective`` is a member of a collective.js collective: Node.js processes running
collective.js 0.3.1 and gcollective processes in this mode can share one object. It has the
public API of ``Collective``, but none of gcollective's own guarantees (stamps, convergence,
catch-up): on the wire and in the store it does what collective.js does.

The wire protocol and collective.js's data rules are in ``_legacy_wire`` (sans-IO); this
module is the gevent node. It imports gevent at import time: ``gcollective`` imports it only
when this mode is asked for.

What this node does beyond collective.js 0.3.1, without changing a byte of the wire format:

- A link that fails or drops is re-dialed with capped exponential backoff plus jitter, for
  as long as the node runs (collective.js drops it for good). Operations made meanwhile are
  queued for that member (at most ``max_queue_bytes``; past that the queue is dropped with a
  warning) and sent once it is back, in order. The first message on every connection after
  the first is ``New [host, port, false]``, which makes a collective.js member that lost its
  own connection to us connect back (it answers with a harmless ``Accept null``).
- A New from a member tells us it (re)started: a link in backoff dials it at once, and a
  link that looks connected is redialed (our connection may lead to its previous process,
  gone without a FIN, where its Accept would be lost). That redial sends no New of its own,
  so two members cannot set each other off.
- A joining node whose chosen member goes away before its Accept asks another connected
  member, or carries on alone (collective.js would simply never get the data).
- A member that closes every connection at once (a native gcollective node refusing New) is
  redialed at ``backoff_max`` intervals, not in a tight loop.
- Incoming bytes are split on newline bytes *before* UTF-8 decoding, so a character split
  across reads survives (collective.js decodes each read on its own).
- Lines that cannot be used (bad JSON, unknown type, bad payload) are skipped with a warning
  instead of crashing the process; only a line longer than ``max_frame`` closes the connection.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Iterable

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from . import _server
from ._errors import InvalidValueError, ProtocolError
from ._legacy_wire import (
    DATA,
    DELETE,
    INCREMENT,
    NEW,
    PROTOCOL,
    SET,
    LegacyStore,
    LineDecoder,
    MixedProtocolError,
    encode_accept,
    encode_data,
    encode_new,
    now_ms,
    parse_data,
    parse_message,
    parse_new,
    wire_key,
)
from ._options import MAX_MEMBERS_LIMIT, check_resolve_interval
from ._store import MISSING, copy_value, is_number
from ._validate import (
    MAX_BYTES,
    Key,
    check_amount,
    check_positive,
    check_seconds,
    check_sizes,
    clean_value,
    format_address,
    parse_key,
)
from ._wire import check_json

__all__ = ["LegacyCollective"]

log = logging.getLogger("gcollective.legacy")

# -- the node ------------------------------------------------------------------------------------

_RECV_SIZE = 256 * 1024

# Options of the native Collective that mean nothing here. They are accepted (and ignored) so
# that one set of options works in both modes.
_NATIVE_ONLY_OPTIONS = frozenset(
    {
        "log_bytes",
        "sync_interval",
        "idle_timeout",
        "check_hostname",  # only False gets here (Collective refuses True in this mode)
        "stall_timeout",
        "down_timeout",
        "clock_skew",
        "max_members",
        "resolve_interval",
    }
)


class _PeerClosed(Exception):
    """The member closed (or wrote on) a connection we only send on."""


class _Retire(Exception):
    """The member sent New: redial it, as our connection may lead to its previous process."""


class _Link(_server._Writer):
    """The outgoing side of one member: what is pending for it and the writer that sends it."""

    def __init__(self, node: LegacyCollective, address: tuple[str, int], new_flag: bool | None):
        self.node = node
        self.address = address
        self.name = format_address(address)
        self.pending: list[bytes] = []
        self.pending_bytes = 0  # Data and New only: an Accept is never dropped
        self.wake = Event()  # something is pending (or the node is stopping)
        self.kick = Event()  # the member is known to be up: skip the rest of the backoff
        self.state = "connecting"
        self.attempted = False  # one connection attempt finished (either way)
        #: ``wants_data`` of the New to send first on the next connection; None: send none.
        self.new_flag = new_flag
        self.greenlet: gevent.Greenlet[Any, Any] | None = None
        self._sock: Any = None
        self._peer_closed = False
        self.retire = False  # end the connection after the current send and redial at once
        self.connects = 0
        self.sent_frames = 0
        self.sent_bytes = 0
        self.overflows = 0  # times queued Data was dropped
        self.dropped_frames = 0
        self.accepts_sent = 0  # Accepts carrying our data
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def enqueue(self, message: bytes, counted: bool = True) -> None:
        """Queue one message; never blocks. Past ``max_queue_bytes`` of Data queued for a
        member that is away or slow, that Data is dropped (collective.js would not have sent
        it at all)."""
        self.pending.append(message)
        if counted:
            self.pending_bytes += len(message)
            if self.pending_bytes > self.node.max_queue_bytes:
                kept = [m for m in self.pending if m.startswith(b"[1,")]  # Accepts stay
                self.overflows += 1
                self.dropped_frames += len(self.pending) - len(kept)
                log.warning(
                    "member %s: more than %d bytes queued; dropping %d queued messages "
                    "(collective.js has no way to resend them)",
                    self.name,
                    self.node.max_queue_bytes,
                    len(self.pending) - len(kept),
                )
                self.pending = kept
                self.pending_bytes = 0
        if not self.wake.is_set():
            self.wake.set()

    def _run(self) -> None:
        node = self.node
        failures = 0
        while not node._stopping:
            self.state = "connecting"
            try:
                sock = gsocket.create_connection(self.address, timeout=node.connect_timeout)
            except OSError as exc:
                self._failed(f"connect: {exc}")
                failures += 1
                self._backoff(failures)
                continue
            connected_at = time.monotonic()
            try:
                self._serve(sock)
            except _Retire:
                log.info("member %s announced itself: reconnecting to it", self.name)
                failures = 0
            except (OSError, _PeerClosed) as exc:
                self._failed(str(exc) or type(exc).__name__)
                # Only a connection that lasted resets the backoff: a member that closes every
                # connection at once (a native node refusing New) is not redialed in a loop.
                if time.monotonic() - connected_at >= node.backoff_max:
                    failures = 0
                failures += 1
                if not node._stopping:
                    self._backoff(failures)
            finally:
                self._sock = None
                sock.close()
        self.state = "stopped"

    def _failed(self, reason: str) -> None:
        if self.state == "connected":
            log.info("member %s: connection lost (%s); reconnecting", self.name, reason)
        elif not self.attempted:
            log.debug("member %s: not reachable yet (%s)", self.name, reason)
        was_connected = self.state == "connected"
        self.state = "backoff"
        self.last_error = reason
        self.last_error_at = time.time()
        self.attempted = True
        self.node._link_attempted()
        if was_connected and self is self.node._join_link:
            self.node._join_lost(self)

    def _watch(self, sock: Any) -> None:
        """Notice at once when the member closes the connection (as Node's 'end' event does),
        instead of on a later send whose bytes would be lost."""
        while self._sock is sock:
            try:
                data = sock.recv(4096)
            except gsocket.timeout:
                continue
            except OSError:
                break
            if data:
                log.warning(
                    "member %s wrote on a connection that collective.js only sends on; closing it",
                    self.name,
                )
            break
        if self._sock is not sock:
            return  # that connection is over already
        self._peer_closed = True
        try:
            sock.shutdown(gsocket.SHUT_RDWR)  # a sendall blocked in the writer fails now
        except OSError:
            pass
        self.wake.set()

    def _serve(self, sock: Any) -> None:
        """Send New (when due), then everything that becomes pending."""
        node = self.node
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
        sock.settimeout(node.send_timeout)
        self._sock = sock
        self._peer_closed = False
        self.retire = False
        self.connects += 1
        self.state = "connected"
        self.attempted = True
        log.info("member %s: connected", self.name)
        node._link_attempted()
        # collective.js sends New only once every member was tried; nothing goes out before.
        while not node._announced.is_set():
            node._announced.wait()
        watcher = gevent.spawn(self._watch, sock)
        try:
            head: list[bytes] = []
            if self.new_flag is not None:
                host, port = node.advertise
                head.append(encode_new(host, port, self.new_flag))
            wake = self.wake
            while True:
                if self._peer_closed:
                    raise _PeerClosed("closed by the member")
                if self.retire:
                    self.retire = False
                    raise _Retire
                if not head and not self.pending:
                    if node._stopping:
                        return
                    wake.clear()
                    wake.wait()
                    continue
                if node._stale:
                    return  # a copy in a forked child: the connection is the parent's
                batch = head + self.pending
                head = []
                self.pending = []
                self.pending_bytes = 0
                data = b"".join(batch)
                sock.sendall(data)
                # Every later connection opens with New [host, port, false]: see the module
                # docstring.
                self.new_flag = False
                self.sent_frames += len(batch)
                self.sent_bytes += len(data)
        finally:
            watcher.kill()


def _refuse_ttl(ttl: Any) -> None:
    if ttl is not None:
        raise ValueError(
            "ttl is not supported with protocol='collective.js': collective.js has no expiring "
            "keys (use protocol 'gcollective')"
        )


class LegacyCollective(_server._Member):
    """A member of a collective.js 0.3.1 collective, with ``Collective``'s public API.

    ``local`` is this member's listening address and ``peers`` every member's (``local`` may
    be among them; it is skipped), as for ``Collective``. Use the spelling of each address that
    the members use for themselves (collective.js identifies members by ``host:port`` string).
    Nothing happens until ``start()``. Usable as a context manager.

    The semantics are collective.js's (see ``LegacyStore`` and docs/collectivejs.rst):
    last-writer-wins per key string on millisecond wall-clock times, increments applied as
    they arrive, the joiner's data replaced by one member's snapshot.

    Options:
        protocol: must be ``"collective.js"`` when given (lets callers pass it through).
        connect_timeout: seconds for one connection attempt (default 2).
        send_timeout: seconds one batched send (an Accept included) may take (30).
        backoff_min, backoff_max: bounds of the reconnect delay in seconds (0.05, 2).
        max_frame: longest line accepted from a member, in bytes (256 MiB); a longer one
            closes its connection.
        max_queue_bytes: bytes of Data queued for one member that is away or slow before that
            Data is dropped (64 MiB).
        max_connections: incoming connections served at once (1024).
        advertise: the address sent in New, when members reach this node at another address
            than ``local`` (a proxy, NAT or container port); default ``local``.
        handshake_timeout: seconds a connection from a host that is not a member's has to
            send its first line (5); connections from members' hosts may stay silent, as
            collective.js members' connections do until they have something to send.
        log_bytes, sync_interval, idle_timeout, stall_timeout, down_timeout, clock_skew,
            check_hostname, max_members, resolve_interval: accepted (and checked) and ignored,
            so that the native options work unchanged in this mode.
    """

    _links: dict[tuple[str, int], _Link]

    def __init__(
        self,
        local: Any,
        peers: Iterable[Any] = (),
        *,
        protocol: str = PROTOCOL,
        connect_timeout: float = 2.0,
        send_timeout: float = 30.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        max_frame: int = 256 * 1024 * 1024,
        max_queue_bytes: int = 64 * 1024 * 1024,
        max_connections: int = 1024,
        advertise: Any = None,
        handshake_timeout: float = 5.0,
        **native_only: Any,
    ) -> None:
        if protocol != PROTOCOL:
            raise ValueError(f"LegacyCollective speaks protocol {PROTOCOL!r}, not {protocol!r}")
        unknown = set(native_only) - _NATIVE_ONLY_OPTIONS
        if unknown:
            raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
        if native_only.get("check_hostname"):
            raise ValueError("check_hostname: protocol 'collective.js' has no TLS")
        # Ignored here, but checked as the native mode would: one configuration, one verdict.
        log_bytes = native_only.get("log_bytes", 0)
        max_members = native_only.get("max_members", 1)
        check_sizes(
            log_bytes=(log_bytes, 0, MAX_BYTES), max_members=(max_members, 1, MAX_MEMBERS_LIMIT)
        )
        if "resolve_interval" in native_only:
            check_resolve_interval(native_only["resolve_interval"])
        sized = {"log_bytes", "max_members", "resolve_interval"}
        check_positive(**{k: v for k, v in native_only.items() if k not in sized})
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
        check_positive(handshake_timeout=handshake_timeout)
        self.handshake_timeout = float(handshake_timeout)
        self.protocol = PROTOCOL
        self._store = LegacyStore()
        self._attempted = Event()  # every member in ``peers`` was tried once
        self._announced = Event()  # New was queued (writers send nothing before)
        self._join_link: _Link | None = None
        self.received_messages = 0
        self.received_bytes = 0
        self.applied_ops = 0
        self.skipped_messages = 0
        self.accepts_applied = 0
        self.refused_connections = 0
        self._refusals = _server.RefusalLog()
        self._member_hosts: set[str] = set()  # see _first_line_deadline

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Listen, dial every member, send New, and wait for the chosen member's Accept.

        As collective.js does, New goes out once every member was tried; it asks one
        connected member (picked at random, preferring other hosts) for its data. Returns once
        that member's Accept replaced the local data, or right away when no member could be
        reached, or after ``timeout`` seconds. Raises ``OSError`` if the address cannot be
        bound. Blocks the calling greenlet only.
        """
        if self._started:
            raise RuntimeError("this LegacyCollective was already started; create a new one")
        # Members' hosts are known before anything is accepted (see _first_line_deadline).
        for host in {self.local[0], self.advertise[0], *(peer[0] for peer in self.peers)}:
            self._note_member_host(host)
        timeout = check_seconds("timeout", timeout, 0.0)
        self._start_serving()
        self._warn_if_exposed()
        deadline = time.monotonic() + timeout
        for address in self.peers:
            self._add_link(address, new_flag=False)
        self._link_attempted()
        self._attempted.wait(max(0.0, deadline - time.monotonic()))
        if self._stopping:
            return  # stopped meanwhile
        self._announce()
        if not self._ready.wait(max(0.0, deadline - time.monotonic())):
            chosen = self._join_link.name if self._join_link is not None else "?"
            log.warning(
                "no Accept from %s within %.1fs; carrying on with the local data",
                chosen,
                timeout,
            )

    def _warn_if_exposed(self) -> None:
        """One warning at start when listening beyond loopback: this mode cannot be secured."""
        host = self._server.socket.getsockname()[0] if self._server is not None else ""
        if not _server._is_loopback(host):
            log.warning(
                "listening on %s in collective.js mode, which has no authentication or "
                "encryption: anyone who can reach this port can read and change all the data; "
                "keep it on loopback or a trusted private network (or use protocol "
                "'gcollective' with a secret)",
                format_address(self.local),
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued to reachable members (waiting at most ``timeout`` seconds), then
        close every connection. Reads keep working on the local copy afterwards."""
        if not self._started or self._stopping:
            return
        self._stop_serving()
        self._attempted.set()  # a start() still waiting (in another greenlet) returns now
        self._announced.set()  # writers still waiting for it must see the stop
        self._stop_links(timeout)
        log.info("node %s (collective.js mode) stopped", format_address(self.local))

    def _add_link(self, address: tuple[str, int], new_flag: bool | None) -> _Link:
        link = self._links.get(address)
        if link is None:
            if address[0] not in self._member_hosts:
                self._note_member_host(address[0])
            link = self._links[address] = _Link(self, address, new_flag)
            link.start()
        return link

    def _link_attempted(self) -> None:
        if not self._attempted.is_set() and all(
            self._links[address].attempted for address in self.peers
        ):
            self._attempted.set()

    def _announce(self) -> None:
        """Queue New on every connection: ``wants_data`` on one connected member, picked at
        random among those on other hosts when there are any."""
        if self._announced.is_set():
            return
        links = list(self._links.values())
        connected = [link for link in links if link.state == "connected"]
        remote = [link for link in connected if link.address[0] != self.advertise[0]]
        chosen = random.choice(remote or connected) if connected else None
        self._join_link = chosen
        for link in links:
            link.new_flag = link is chosen
        if chosen is None:
            self._ready.set()  # nobody to ask: we are the first member up
        else:
            log.info("asking %s for its data", chosen.name)
        self._announced.set()

    def _join_lost(self, link: _Link) -> None:
        """The member asked for its data went away before its Accept came: ask another
        connected member, or carry on without (collective.js would wait forever)."""
        if self._ready.is_set() or self._stopping:
            return
        link.new_flag = False  # its reconnection must not ask again
        others = [other for other in self._links.values() if other.state == "connected"]
        remote = [other for other in others if other.address[0] != self.advertise[0]]
        if not others:
            log.warning("%s went away before sending its data; carrying on without", link.name)
            self._join_link = None
            self._ready.set()
            return
        chosen = self._join_link = random.choice(remote or others)
        log.info("%s went away before sending its data; asking %s", link.name, chosen.name)
        chosen.enqueue(encode_new(*self.advertise, True))

    def stats(self) -> dict[str, Any]:
        """A cheap, JSON-serialisable picture of this node and each of its members, shaped
        like ``Collective.stats()`` (what has no meaning here is None or 0)."""
        now = time.time()
        peers = {}
        for link in list(self._links.values()):
            peers[link.name] = {
                "state": link.state,
                "peer_id": None,  # collective.js members have no identity
                "queued_bytes": link.pending_bytes,
                "queued_frames": len(link.pending),
                "sent_frames": link.sent_frames,
                "sent_bytes": link.sent_bytes,
                "connects": link.connects,
                "overflows": link.overflows,
                "dropped_frames": link.dropped_frames,
                "snapshots_sent": link.accepts_sent,
                "relayed_frames": 0,
                "last_error": link.last_error,
                "last_error_at": link.last_error_at,
            }
        return {
            "protocol": PROTOCOL,
            "node_id": None,
            "address": format_address(self.local),
            "advertise": format_address(self.advertise),
            "running": self.running,
            "synced": self.synced,
            "uptime": 0.0 if self.started_at is None else now - self.started_at,
            "top_level_keys": len(self._store.data),
            "history_keys": len(self._store.history),
            "received_frames": self.received_messages,
            "received_bytes": self.received_bytes,
            "applied_ops": self.applied_ops,
            "skipped_frames": self.skipped_messages,
            "accepts_applied": self.accepts_applied,
            "refused_connections": self.refused_connections,
            "refusals": dict(self._refusals.counts),
            "internal_errors": self.internal_errors,  # (its writers' only: see _Writer)
            "last_internal_error": self.last_internal_error,
            "last_internal_error_at": self.last_internal_error_at,
            "peers": peers,
        }

    # -- the data API ----------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value at ``key``, or ``default``; never touches the network.

        Containers come back as copies: changing them changes nothing shared.
        """
        if self._stale:
            self._check_writable()
        if type(key) is str and key and ".." not in key and key[0] != "." and key[-1] != ".":
            return self._store.get(key.split("."), default)
        return self._store.get(parse_key(key), default)

    def set(self, key: Key, value: Any, op: int = SET, ttl: float | None = None) -> None:
        """Set ``key`` to ``value`` here and send it to every member, stamped with the wall
        clock in milliseconds. ``ttl`` is refused: collective.js has no expiring keys.

        ``op`` is collective.js's third argument: ``INCREMENT`` adds ``value``, ``DELETE``
        removes the key (``value`` is ignored). Bad keys and values raise before anything is
        applied or sent. As in collective.js, a SET older than the last SET of the same key
        (the wall clock went back) is not applied, here either.
        """
        if isinstance(op, bool) or not isinstance(op, int):
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")
        _refuse_ttl(ttl)
        if op == SET:
            self._check_writable()
            path, key_text = wire_key(key)
            value = clean_value(value)
            time_ms = now_ms()
            message = encode_data(key_text, time_ms, value, SET)
            self._store.apply(key_text, path, time_ms, SET, value)
            self._broadcast(message)
        elif op == INCREMENT:
            self.incr(key, value)
        elif op == DELETE:
            self.delete(key)
        else:
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")

    def incr(self, key: Key, amount: int | float = 1, ttl: float | None = None) -> int | float:
        """Add ``amount`` to the number at ``key`` (missing counts as 0); returns the new local
        value. Every member adds it when it arrives, whatever happened to the key meanwhile.
        ``ttl`` is refused: collective.js has no expiring keys."""
        _refuse_ttl(ttl)
        self._check_writable()
        path, key_text = wire_key(key)
        amount = check_amount(amount)
        current = self._store.get(path, MISSING)
        if current is not MISSING and not is_number(current):
            raise InvalidValueError(
                f"cannot increment {key!r}: it holds a {type(current).__name__}, not a number"
            )
        time_ms = now_ms()
        message = encode_data(key_text, time_ms, amount, INCREMENT)
        self._store.apply(key_text, path, time_ms, INCREMENT, amount)
        self._broadcast(message)
        result: int | float = self._store.get(path)
        return result

    def delete(self, key: Key) -> None:
        """Remove ``key`` (and everything below it) here and on every member."""
        self._check_writable()
        path, key_text = wire_key(key)
        time_ms = now_ms()
        message = encode_data(key_text, time_ms, None, DELETE)
        self._store.apply(key_text, path, time_ms, DELETE, None)
        self._broadcast(message)

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the whole object."""
        if self._stale:
            self._check_writable()
        tree: dict[str, Any] = copy_value(self._store.data)
        return tree

    def _broadcast(self, message: bytes) -> None:
        # Queued for every member, connected or not: a link that is down sends it once it is
        # back (collective.js sends only on the connections it has at that moment).
        for link in self._links.values():
            link.enqueue(message)

    # -- receiving ----------------------------------------------------------------------------

    def _handle_connection(self, sock: Any, address: tuple[str, int]) -> None:
        current = _server.current_greenlet()
        self._handlers.add(current)
        peer = f"{address[0]}:{address[1]}"
        try:
            self._read_connection(sock, peer, self._first_line_deadline(address[0]))
        except MixedProtocolError as exc:
            self.refused_connections += 1
            self._refusals.warning("protocol", "refusing connection from %s: %s", peer, exc)
        except ProtocolError as exc:
            self.refused_connections += 1
            self._refusals.warning(exc.category, "connection from %s closed: %s", peer, exc)
        except OSError as exc:
            log.info("connection from %s closed: %s", peer, exc or type(exc).__name__)
        finally:
            self._handlers.discard(current)
            sock.close()

    def _first_line_deadline(self, host: str) -> float | None:
        """When a connection from ``host`` must have sent its first line: ``None`` (never)
        from a member's host, whose connection may stay silent for as long as it has
        nothing to say (a collective.js member starting up, a redial with nothing queued:
        collective.js never reconnects, so cutting one would lose that member for good)."""
        members = self._member_hosts
        if host in members or host.split("%", 1)[0].removeprefix("::ffff:") in members:
            return None
        return time.monotonic() + self.handshake_timeout

    def _note_member_host(self, host: str) -> None:
        """Remember ``host`` as a member's, with the addresses it resolves to (a member
        listed by name dials from its address)."""
        self._member_hosts.add(host)
        try:
            infos = gsocket.getaddrinfo(host, None, 0, gsocket.SOCK_STREAM)
        except OSError:
            return  # unknown for now: its connections get the stranger's deadline
        self._member_hosts.update(str(info[4][0]) for info in infos)

    def _read_connection(self, sock: Any, peer: str, deadline: float | None = None) -> None:
        decoder = LineDecoder(self.max_frame)
        recv = sock.recv
        while deadline is not None:
            # A stranger's host: its first line within the handshake timeout.
            data = _server._recv_before(sock, deadline, "message")
            if not data:
                return
            self.received_bytes += len(data)
            lines = decoder.feed(data)
            if lines:
                sock.settimeout(None)
                deadline = None
            for line in lines:
                self._dispatch(line, peer)
        while True:
            data = recv(_RECV_SIZE)
            if not data:
                return
            self.received_bytes += len(data)
            for line in decoder.feed(data):
                self._dispatch(line, peer)
            gevent.sleep(0)  # fairness: one busy member must not starve the others

    def _dispatch(self, line: bytes, peer: str) -> None:
        """Apply one line; an unusable one is skipped (and logged), not fatal."""
        if not line.strip():
            return
        try:
            kind, payload = parse_message(line)
            if kind == DATA:
                key, path, time_ms, value, op = parse_data(payload)
                self.received_messages += 1
                if self._store.apply(key, path, time_ms, op, value):
                    self.applied_ops += 1
            elif kind == NEW:
                host, port, wants = parse_new(payload)
                self.received_messages += 1
                self._on_new(host, port, wants)
            else:
                self.received_messages += 1
                self._on_accept(payload, peer)
        except MixedProtocolError:
            raise
        except ProtocolError as exc:
            self.skipped_messages += 1
            log.warning("skipped a message from %s: %s", peer, exc)

    def _on_new(self, host: str, port: int, wants: bool) -> None:
        """A member started: connect back if we have no link to it, then answer with Accept."""
        address = (host, port)
        if address in (self.local, self.advertise) or self._stopping:
            return
        link = self._links.get(address)
        if link is None:
            log.info("member %s is new: connecting back", format_address(address))
            link = self._add_link(address, new_flag=None)
        else:
            # New is sent by a member that just (re)started, or redialed us: it has a
            # connection to us, so our next connection needs no New of its own (and two
            # members reconnecting cannot set each other off in a loop).
            if link.new_flag is not True:  # unless our own join request is still unsent
                link.new_flag = None
            if link.state == "connected":
                # Our connection may lead to its previous process (gone without a FIN, or
                # its FIN not seen yet), where the Accept would be lost: use a fresh one.
                # What was already sent on it is delivered before its FIN.
                link.retire = True
            link.kick.set()
        # Encoded now, in one go: the member gets the data as of now, followed by the Data of
        # every later change, already queued behind it.
        link.enqueue(encode_accept(self._store.data if wants else None), counted=False)
        if wants:
            link.accepts_sent += 1
            log.info("sending our data to %s", link.name)

    def _on_accept(self, payload: Any, peer: str) -> None:
        if payload is None:
            return
        if type(payload) is not dict:
            raise ProtocolError(f"Accept carries a {type(payload).__name__}, not an object")
        check_json(payload, 0)
        self._store.replace(payload)
        self.accepts_applied += 1
        log.info(
            "replaced the local data with the snapshot from %s (%d top-level keys)",
            peer,
            len(payload),
        )
        self._synced.set()
        self._ready.set()
