"""The node: ``Collective``, the public API and life cycle of a member, around its parts.

Shape (see docs/design-engine.rst):

- ``_engine.Engine`` is the replication protocol without I/O: the outbox of own operations
  (encoded once as OPS frames, at most every millisecond while writes keep coming), what
  arrives from peers, catch-up from the log, snapshots, progress, frontiers and members
  declared down. It never reads a clock or touches a socket: this shell hands it the time,
  the frames that arrive and the connections' events, and sends what it queues per peer.
- ``_links._PeerLink``: one per peer, the engine's ``Peer`` with a writer greenlet that dials
  it (TLS and the secret handshake, if configured), says HELLO and sends what is queued.
- ``_connections._Connections``: the acceptor's side, one greenlet per incoming connection
  (TLS, the secret handshake, HELLO's checks, then the read loop feeding the engine).
- ``_watches``: watches and their index; ``_server``: the member life cycle and the writer
  skeleton both protocols (this one and the collective.js mode, ``_legacy``) share.
- ``set()`` applies an operation to the store and adds it to the engine's outbox, never
  waiting for the network; expiring keys, the housekeeping sweep and the merge of a peer's
  state run in their own greenlets, in slices (``_background._Background``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from math import inf
from typing import Any, Callable, Iterable

import gevent
from gevent.event import Event

from . import Operation
from ._auth import secret_weakness
from ._background import _Background
from ._clock import HybridClock, new_node_id
from ._connections import _Connections
from ._data import _Data
from ._discovery import Discovery, split_names
from ._durable import check_durability
from ._engine import Engine
from ._heap import HeapTrimmer
from ._links import ANNOUNCED_ATTEMPTS, MAX_ANNOUNCED_LINKS, _PeerLink
from ._logcontext import install as install_log_context
from ._members import MemberList
from ._membership import _Membership
from ._options import MAX_MEMBERS_LIMIT, check_resolve_interval, check_security
from ._server import (
    RefusalLog,
    _is_loopback,
    _Member,
)
from ._store import Store
from ._validate import (
    MAX_BYTES,
    Key,
    check_positive,
    check_seconds,
    check_sizes,
    format_address,
)
from ._watches import Watch, _watch_prefix, _Watching

__all__ = ["Collective", "Watch"]

log = logging.getLogger("gcollective")


class Collective(_Data, _Connections, _Membership, _Watching, _Background, _Member):
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
        log_bytes: bytes of recent operations kept to catch peers up (16 MiB); a peer that
            missed more than the log holds gets a full snapshot instead. What every peer
            not declared down has applied is dropped sooner (see "Catch-up" in the README),
            so the log fills only while a peer is silent: this bounds what that costs.
        sync_interval: seconds between version-vector reports to each peer (1).
        down_timeout: seconds of silence after which a peer is declared down (600). Until
            then, tombstones and old increments are kept in case it comes back with writes
            nobody has seen; after it, they are forgotten, and that incarnation of the peer
            is refused if it comes back (restart it empty: its unsent writes are dropped).
        clock_skew: the most that members' wall clocks may disagree, in seconds (10, at
            most a year). A frame carrying a stamp (an operation's, or a peer's clock) more
            than this ahead of this node's wall clock is refused with its connection.
        max_members: how many members learnt from others (from their HELLOs and member lists,
            not in ``peers``) this member keeps and dials at most (256; see
            docs/membership.rst).
        resolve_interval: seconds between two resolutions of each DNS name in ``peers`` (5):
            a name (not an IP address) stands for every address it resolves to, each
            dialled, and addresses new in the answer are dialled as they appear (see
            docs/membership.rst).
        protocol: ``"gcollective"`` (default) or ``"collective.js"``, which makes this a
            ``LegacyCollective`` speaking collective.js 0.3.1's wire protocol (see
            docs/collectivejs.rst for what that mode does not guarantee).
        handshake_timeout: seconds an incoming connection has to send HELLO (5).
        idle_timeout: seconds an incoming connection may stay silent after HELLO (60).
        stall_timeout: seconds data sent to a peer may stay unacknowledged (by its TCP stack)
            once retransmitted before the link is dropped and redialled (2; Linux only,
            ``TCP_INFO``). A peer alive but not reading (its window shut) is allowed
            ``send_timeout`` instead.
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
        log_bytes: int = 16 * 1024 * 1024,
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
        data_dir: str | os.PathLike[str] | None = None,
        fsync: str = "interval",
        max_members: int = MAX_ANNOUNCED_LINKS,
        resolve_interval: float = 5.0,
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
        check_sizes(
            log_bytes=(log_bytes, 0, MAX_BYTES), max_members=(max_members, 1, MAX_MEMBERS_LIMIT)
        )
        self.max_members = max_members
        self.resolve_interval = check_resolve_interval(resolve_interval)
        self.sync_interval = float(sync_interval)
        self.handshake_timeout = float(handshake_timeout)
        self.idle_timeout = float(idle_timeout)
        self.stall_timeout = float(stall_timeout)
        self.down_timeout = float(down_timeout)
        # (At most ``MAX_SECONDS``, a year, as every option in seconds: stamps within it of
        # the wall clock stay far below what the wire carries.)
        self.clock_skew = float(clock_skew)
        self._secret, self._tls_files = check_security(
            secret, certfile, keyfile, cafile, check_hostname
        )
        self.check_hostname = check_hostname
        self._durable = check_durability(data_dir, fsync)  # (None: nothing touches the disk)
        self._init_state(log_bytes)

    def _init_state(self, log_bytes: int) -> None:
        """Everything a new member holds besides its options (``__init__``'s second half)."""
        self._tls: Any = None  # the _tls module, imported by start() when TLS is configured
        self._server_tls: Any = None  # ssl contexts, built by start()
        self._client_tls: Any = None
        # Says who we are in the handshake (authenticated, not secret): the advertised address.
        self._info = format_address(self.advertise)
        self._init_fits()
        #: This incarnation's id: fresh on every construction, so a restart is a new origin.
        self.node_id = new_node_id()
        install_log_context(self)  # node id, peer and reason on every log record
        self._store = Store()
        self._data = self._store.data  # the live tree (the same dict for the store's life)
        self._clock = HybridClock(self.node_id)
        self._housekeeper: gevent.Greenlet[Any, Any] | None = None
        self._merger: gevent.Greenlet[Any, Any] | None = None  # (see _schedule_merge)
        self._merge_contexts: deque[Any] = deque()  # (the log context of each stream due)
        self._heap_trimmer = HeapTrimmer()  # (see _Background._housekeep)
        self._discovery: Discovery | None = None  # the names in peers (made by start())
        # Expiring keys: a greenlet sleeps until the store's next expiry (wall-clock ms in
        # _next_due, inf when none); a sooner one wakes it. Reads check _next_due too, so a
        # read just after an expiry never sees the key.
        self._expirer: gevent.Greenlet[Any, Any] | None = None
        self._next_due = self._next_due_float = inf
        self._expiry_wake = Event()
        self._writable = False  # started and not stopping (one test on the hot path)
        self._flushing_full = False  # a full outbox is being flushed (see _flush_outbox)
        self.received_bytes = 0  # from peers, as read from the sockets (for metrics)
        self.refused_connections = 0
        self.clock_refusals = 0  # frames refused for a stamp beyond clock_skew
        self._refusals = RefusalLog()
        self._notices = RefusalLog()  # other warnings a stranger could repeat at will
        self._members = MemberList(self.max_members)
        self._engine = engine = self._new_engine(log_bytes)
        self._links = engine.peers  # (the engine's peers are the links)
        # Own operations not yet encoded (see ``Engine.outbox``): the hot paths add to them.
        self._outbox = engine.outbox
        self._out_special = engine.out_special
        self._out_increments = engine.out_increments
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
        engine.schedule_merge = self._schedule_merge
        engine.on_internal_error = self._internal_error
        engine.notice = self._notices.warning
        engine.on_members = self._members_received
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
        if self._durable is not None:
            self._restore()
        try:
            self._start_serving()
        except BaseException:
            if self._durable is not None:
                self._durable.close()  # (free for whoever holds the address)
            raise
        self._writable = True
        self._warn_if_exposed()
        addresses, names = split_names(self.peers)
        for address in addresses:
            self._members.configured(address)
            self._add_link(address)
        self._discovery = Discovery(self, names, self.resolve_interval)
        self._discovery.start()  # (resolves every name once before start() waits)
        self._housekeeper = gevent.spawn(self._housekeeping)
        self._advance()
        self._expirer = gevent.spawn(self._expiring)
        self._check_ready()
        if not self._ready.wait(timeout) and not self._stopping:
            log.warning(
                "started without a peer's state after %.1fs; carrying on (it merges later)",
                timeout,
            )

    def _restore(self) -> None:
        """Open ``data_dir`` and apply what it holds (before serving), then keep writing."""
        durable = self._durable
        assert durable is not None
        durable.open()
        try:
            durable.restore(self._engine)  # (again after a failed bind: repeats are skipped)
        except BaseException:
            durable.close()  # (the directory is left as it was, and free)
            raise
        durable.start(self._engine, self._internal_error)

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
        self._say_goodbye()
        self._writable = False
        self._stop_serving()
        self._engine.stopping = self._engine.ready = True  # (as _stop_serving's events)
        self._stop_links(timeout)
        if self._merger is not None:
            # (Between two steps: a stream not merged whole is neither stored nor counted.)
            self._merger.kill(block=True, timeout=1)
        if self._durable is not None:
            self._durable.close()  # (after the links: nothing more is applied)
        if self._housekeeper is not None:
            self._housekeeper.kill(block=True, timeout=1)
        if self._expirer is not None:
            self._expirer.kill(block=True, timeout=1)
        if self._discovery is not None:
            self._discovery.stop()
        watches, self._watches = self._watches, []
        self._engine.watches = self._watches
        self._watch_at, self._watch_below = {}, {}
        for watch in watches:
            watch._close()  # what is queued is still delivered
        log.info("node %s stopped", format_address(self.local))

    def _background_greenlets(self) -> list[gevent.Greenlet[Any, Any] | None]:
        return [
            self._housekeeper,
            self._merger,
            self._expirer,
            self._discovery.greenlet if self._discovery is not None else None,
            self._durable.greenlet if self._durable is not None else None,
            *(watch._greenlet for watch in self._watches),
        ]

    def _check_ready(self) -> None:
        if self._ready.is_set():
            return
        asked = self._engine.snapshot_peer
        if self._synced.is_set() or all(
            link.attempted and link is not asked for link in self._links.values()
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
        self._members.forget(link.address, link.down)
        log.info(
            "peer %s: forgotten after %d attempts without hearing from it (it was only "
            "announced; it is dialled again if it connects)",
            link.name,
            ANNOUNCED_ATTEMPTS,
        )
        self._check_ready()

    # -- observing ------------------------------------------------------------------------

    def _members_stats(self) -> dict[str, Any]:
        """Every member known, by address: incarnation, state (alive, left, down) and how
        it was learnt (configured, announced, gossip)."""
        down = self._engine.down_ids
        return {
            format_address(address): member.as_stats(member.node_id in down)
            for address, member in self._members.members.items()
        }

    def _peers_stats(self) -> dict[str, dict[str, Any]]:
        """``stats()["peers"]`` alone: each link's state and counters, without the node's
        member, DNS and store views (the gunicorn worker reads it in its exit signal's
        handler and every half second)."""
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
        return peers

    def stats(self) -> dict[str, Any]:
        """A cheap, JSON-serialisable picture of this node and each of its peers."""
        now = time.time()
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
            "data_dir": None if self._durable is None else self._durable.stats(),
            "peers": self._peers_stats(),
            "members": self._members_stats(),
            "dns": {} if self._discovery is None else self._discovery.stats(),
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
