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

from cluster import NodeProcess, free_ports

from gcollective import Collective


class Proxy:
    """Forwards connections to ``target_port``; links from blocked sources are cut."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self._blocked: set[int] = set()
        self._conns: list[tuple[int, socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, *sources: int) -> None:
        """Drop and refuse connections from members advertising these ports."""
        with self._lock:
            self._blocked.update(sources)
            doomed = [c for c in self._conns if c[0] in sources]
        for _, a, b in doomed:
            _shut(a)
            _shut(b)

    def heal(self, *sources: int) -> None:
        """Let these sources connect again (all of them when none are given)."""
        with self._lock:
            if sources:
                self._blocked.difference_update(sources)
            else:
                self._blocked.clear()

    def close(self) -> None:
        self._closed = True
        _shut(self._listener)
        with self._lock:
            conns = list(self._conns)
        for _, a, b in conns:
            _shut(a)
            _shut(b)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
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
        try:
            source = json.loads(first.split(b"\n", 1)[0])[4]
        except (ValueError, IndexError, TypeError):
            source = None
        with self._lock:
            blocked = source in self._blocked
        if blocked:
            _shut(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _shut(client)
            return
        entry = (source, client, upstream)
        with self._lock:
            self._conns.append(entry)
        upstream.sendall(first)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)
        with self._lock:
            if entry in self._conns:
                self._conns.remove(entry)


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


class ProxiedCluster:
    """Members whose every incoming link runs through their own ``Proxy``."""

    def __init__(self, count: int, **options) -> None:
        self.real = free_ports(count)
        self.public = free_ports(count)
        self.options = {**FAST, **options}
        self.proxies = [Proxy(p, r) for p, r in zip(self.public, self.real)]
        self.nodes: list[NodeProcess | None] = [None] * count

    def launch(self, i: int) -> NodeProcess:
        node = NodeProcess(
            self.real[i], self.public, advertise=f"127.0.0.1:{self.public[i]}", **self.options
        )
        self.nodes[i] = node
        node.start()
        return node

    def live(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n is not None and n.proc.poll() is None]

    def partition(self, left: list[int], right: list[int]) -> None:
        for i in left:
            self.proxies[i].cut(*(self.public[j] for j in right))
        for j in right:
            self.proxies[j].cut(*(self.public[i] for i in left))

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
        others = [p for j, p in enumerate(self.public) if j != i]
        self.proxies[i].cut(*others)
        for j, proxy in enumerate(self.proxies):
            if j != i:
                proxy.cut(self.public[i])

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.heal()

    def close(self) -> None:
        for node in self.nodes:
            node.stop(timeout=1)
        for proxy in self.proxies:
            proxy.close()
