"""Fault injection for tests: a TCP proxy in front of each member that can cut its links.

Every member listens on a real port but advertises its proxy's port, and peers dial proxies.
A proxy reads the first frame (the dialer's HELLO) to learn which member is calling, so links
can be cut one direction at a time: ``proxy.cut(source_port)`` drops that member's
connections to the proxied member and refuses new ones until ``heal``. Threads are fine here:
this is test code, not the library.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from typing import Any

from cluster import NodeProcess, free_port, free_ports, wait_for, wait_until

from gcollective import Collective


class _Link:
    """One connection through a proxy: who dialed, both sockets, and what the proxy holds back
    from the member while the link is held (bytes in flight, lost if the link is cut)."""

    def __init__(self, source: int, client: socket.socket, upstream: socket.socket) -> None:
        self.source = source
        self.client = client
        self.upstream = upstream
        self.held_back = bytearray()


class Proxy:
    """Forwards connections to ``target_port``; links from blocked sources are cut.

    It never does nothing silently: a first frame it cannot read is recorded and fails the
    test at ``check()`` / ``close()``; ``cut`` fails unless it dropped a connection (or is told
    the link may be down); what it drops and refuses is counted (``dropped``,
    ``dropped_bytes``, ``refused``), so a test can show its fault happened."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self.dropped = 0  # connections cut by ``cut``
        self.dropped_bytes = 0  # bytes held back (in flight) on them when they were cut
        self.dropped_op_frames = 0  # OPS frames among those bytes (operations lost in flight)
        self.refused = 0  # connections refused while their source was blocked
        self.refused_from: Counter[int] = Counter()  # the same, by source
        self.accepted = 0  # connections accepted (each vetted by its HELLO after)
        self.errors: list[str] = []
        self._blocked: set[int] = set()
        self._held: set[int] = set()
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def linked(self, source: int) -> int:
        """How many connections from the member advertising ``source`` are open now."""
        with self._lock:
            return sum(link.source == source for link in self._links)

    def held_op_frames(self, source: int) -> int:
        """OPS frames from ``source`` the proxy holds back now (see ``hold``)."""
        with self._lock:
            return sum(_op_frames(link.held_back) for link in self._links if link.source == source)

    def held_bytes(self, source: int) -> int:
        """Bytes from ``source`` the proxy holds back now (see ``hold``)."""
        with self._lock:
            return sum(len(link.held_back) for link in self._links if link.source == source)

    def hold(self, *sources: int) -> None:
        """Stop forwarding what these sources send (the links stay up): it stays in flight,
        in the proxy, until ``cut`` drops it."""
        with self._lock:
            self._held.update(sources)

    def release(self, *sources: int) -> None:
        """Forward again what these sources send (what was held goes first, with their next
        bytes)."""
        with self._lock:
            self._held.difference_update(sources)

    def cut(self, *sources: int, require: bool = True) -> int:
        """Drop and refuse connections from members advertising these ports; returns how many
        were dropped. With ``require`` (the default) dropping none fails: the cut would have
        tested nothing."""
        with self._lock:
            self._blocked.update(sources)
            self._held.difference_update(sources)
            doomed = [link for link in self._links if link.source in sources]
            self.dropped += len(doomed)
            self.dropped_bytes += sum(len(link.held_back) for link in doomed)
            self.dropped_op_frames += sum(_op_frames(link.held_back) for link in doomed)
        for link in doomed:
            _shut(link.client)
            _shut(link.upstream)
        if require and not doomed:
            raise AssertionError(f"cut of {sources} at proxy {self.port}: no link to drop")
        return len(doomed)

    def heal(self, *sources: int) -> None:
        """Let these sources connect again (all of them when none are given): connections
        accepted from now on (see ``_serve``)."""
        with self._lock:
            if sources:
                self._blocked.difference_update(sources)
            else:
                self._blocked.clear()

    def blocking(self) -> bool:
        """True while some source is cut off."""
        with self._lock:
            return bool(self._blocked)

    def check(self) -> None:
        """Fail if the proxy met a connection it could not attribute to a member."""
        if self.errors:
            shown = "; ".join(self.errors[:3])
            raise AssertionError(f"proxy {self.port}, {len(self.errors)} errors: {shown}")

    def close(self) -> None:
        self._closed = True
        _shut(self._listener)
        with self._lock:
            links = list(self._links)
        for link in links:
            _shut(link.client)
            _shut(link.upstream)
        self.check()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                blocked_then = frozenset(self._blocked)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(client, blocked_then), daemon=True).start()

    def _serve(self, client: socket.socket, blocked_then: frozenset[int]) -> None:
        """Vet a connection by its HELLO and forward it. One from a source cut when it was
        accepted stays refused, even if the cut is healed before its HELLO is read (this
        thread may wait for the GIL that long on a loaded machine): its bytes were sent during
        the cut, and a cut loses them. (Forwarded, they brought a member that had died
        meanwhile back to life for one write.)"""
        first = b""
        while b"\n" not in first:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                _shut(client)
                return
            first += data
        source = _hello_source(first.split(b"\n", 1)[0])
        if source is None:
            # Unattributable: a cut could not apply to it, so the test could pass with no
            # fault at all. Refuse it and make the test fail.
            self.errors.append(f"first frame is not a member's HELLO: {first[:200]!r}")
            _shut(client)
            return
        with self._lock:
            blocked = source in self._blocked or source in blocked_then
            if blocked:
                self.refused += 1
                self.refused_from[source] += 1
        if blocked:
            _shut(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _shut(client)
            return
        link = _Link(source, client, upstream)
        with self._lock:
            # Checked again with the append: a cut made since the first check found no link
            # to drop, and this one would have escaped it (up for good, never refused).
            blocked = source in self._blocked
            if blocked:
                self.refused += 1
                self.refused_from[source] += 1
            else:
                self._links.append(link)
        if blocked:
            _shut(client)
            _shut(upstream)
            return
        upstream.sendall(first)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        self._forward(link)
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _forward(self, link: _Link) -> None:
        """Pump what the dialer sends to the member, holding it back while its source is held."""
        try:
            while True:
                data = link.client.recv(65536)
                if not data:
                    break
                with self._lock:
                    held = link.source in self._held
                    if held:
                        link.held_back += data
                if not held:
                    link.upstream.sendall(bytes(link.held_back) + data)
                    link.held_back.clear()
        except OSError:
            pass
        _shut(link.client)
        _shut(link.upstream)


def _op_frames(data: bytes) -> int:
    """How many OPS frames (``[1, ...]``, see ``gcollective._wire``) begin in ``data``."""
    return sum(line.startswith(b"[1,") for line in bytes(data).split(b"\n"))


def _hello_source(line: bytes) -> int | None:
    """The advertised port in a member's HELLO (``["gcollective", version, id, host, port,
    flags]``), or None when ``line`` is not one."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not (isinstance(message, list) and len(message) >= 5 and message[0] == "gcollective"):
        return None
    port = message[4]
    return port if isinstance(port, int) and not isinstance(port, bool) else None


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    _shut(src)
    _shut(dst)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


FAST = {"sync_interval": 0.2, "backoff_max": 0.5}


def cut_links(
    proxies: list[Proxy], public: list[int], links: list[tuple[int, int]], wait: Any
) -> None:
    """Cut each link ``(to, source)`` (member ``source`` dialing member ``to``), after waiting
    (with ``wait``, a ``cluster.wait_until``) until it is up: every cut drops a connection."""
    wait(
        lambda: all(proxies[to].linked(public[source]) for to, source in links),
        what=f"links {links} up",
    )
    for to, source in links:
        proxies[to].cut(public[source])


class ProxiedCluster:
    """Members whose every incoming link runs through their own ``Proxy``."""

    def __init__(self, count: int, **options) -> None:
        self.real = free_ports(count)
        self.public = free_ports(count)
        self.options = {**FAST, **options}
        self.proxies = [Proxy(p, r) for p, r in zip(self.public, self.real)]
        self.nodes: list[NodeProcess | None] = [None] * count

    def launch(self, i: int) -> NodeProcess:
        """Start member ``i`` (again): on a fresh port each time, behind the same proxy, so it
        keeps its address and no port is ever bound twice."""
        if self.nodes[i] is not None:
            self.real[i] = self.proxies[i].target_port = free_port()
        node = NodeProcess(
            self.real[i], self.public, advertise=f"127.0.0.1:{self.public[i]}", **self.options
        )
        self.nodes[i] = node
        node.start()
        return node

    def live(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n is not None and n.proc.poll() is None]

    def partition(self, left: list[int], right: list[int]) -> None:
        """Cut every link between the two sides, once each of them is up (so each cut drops
        a connection: see ``Proxy.cut``)."""
        links = [(i, j) for i in left for j in right] + [(j, i) for i in left for j in right]
        cut_links(self.proxies, self.public, links, wait_until)

    def refused(self) -> int:
        """Connections all proxies refused so far (dialers retrying across a cut)."""
        return sum(proxy.refused for proxy in self.proxies)

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.heal()

    def close(self) -> None:
        for node in self.nodes:
            if node is not None:
                node.stop()
        for proxy in self.proxies:
            proxy.close()


class ProxiedMembers:
    """Members running in this process (under gevent) that all reach each other through
    proxies, so links can be cut; ``options`` go to every ``Collective``."""

    def __init__(self, count: int, **options) -> None:
        self.real = free_ports(count)
        self.public = free_ports(count)
        self.options = options
        self.proxies = [Proxy(p, r) for p, r in zip(self.public, self.real)]
        self.nodes: list[Collective] = []
        for i in range(count):
            self.nodes.append(self.make(i))

    def make(self, i: int) -> Collective:
        node = Collective(
            ("127.0.0.1", self.real[i]),
            [("127.0.0.1", p) for p in self.public],
            advertise=("127.0.0.1", self.public[i]),
            **self.options,
        )
        node.start()
        return node

    def isolate(self, i: int) -> None:
        """Cut member ``i``'s links both ways, once each of them is up."""
        others = [j for j in range(len(self.public)) if j != i]
        links = [(i, j) for j in others] + [(j, i) for j in others]
        cut_links(self.proxies, self.public, links, wait_for)

    def refused(self) -> int:
        """Connections all proxies refused so far (dialers retrying across a cut)."""
        return sum(proxy.refused for proxy in self.proxies)

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.heal()

    def close(self) -> None:
        for node in self.nodes:
            node.stop(timeout=1)
        for proxy in self.proxies:
            proxy.close()
