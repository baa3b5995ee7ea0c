"""A small TCP proxy that can cut and restore a member's links (the partition benchmark).

Run as ``python -m benchmarks.proxy``; driven by JSON lines on stdin like ``benchmarks.member``.

To partition member P from the others, P's traffic in both directions goes through here:
P dials the others at their proxy ports ``X_i`` (forwarded to their real ports ``L_i``) and the
others dial P at ``X_P`` (forwarded to ``L_P``). A member names itself in the HELLO frame that
opens each connection, and the receiver looks its link up by that address; so the first line
of every proxied connection is rewritten from the real port to the proxy port (``L -> X``).
Then every member sees P only as ``X_P`` and P sees the others only as ``X_i``.

``cut`` closes every listener and every proxied connection: both sides see their connections
drop and their reconnects refused, as with a peer that is down. ``restore`` listens again.

``cut {isolate: X_P}`` cuts only P's links: the connections others open to ``X_P`` and those
whose HELLO names ``X_P`` (P dialing out), new ones refused alike until ``restore``. Use it
when every member advertises its proxy port (the ``advertise`` option) and dials the others'
proxy ports: then every address a member learns (from HELLOs, and from the member lists that
members pass on) is a proxy port, and no member can reach P around the proxy.

Commands: ``route {listen, target}``, ``rename {ports: {real: proxy}}``, ``cut [{isolate}]``,
``restore``, ``stats``, ``stop``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.fileobject import FileObjectPosix  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HOST = "127.0.0.1"
_CHUNK = 256 * 1024
_MAX_HELLO = 4096


class PartitionProxy:
    """Forwards listening ports to targets; rewrites HELLO ports; cuts and restores."""

    def __init__(self) -> None:
        self.routes: dict[int, int] = {}  # listen port -> target port
        self.servers: dict[int, StreamServer] = {}
        self.renames: dict[int, int] = {}  # real member port -> its proxy port
        self.sockets: set[socket.socket] = set()
        self.cut_now = False
        self.isolated: int | None = None  # the proxy port of the member cut off, if one is
        # proxied connection -> (the port it was made to, the port its dialer advertises)
        self.links: dict[socket.socket, tuple[int, int | None]] = {}
        self.bytes_forwarded = 0
        self.connections = 0

    def route(self, listen: int, target: int) -> None:
        self.routes[listen] = target
        self._listen(listen)

    def _listen(self, port: int) -> None:
        target = self.routes[port]
        server = StreamServer((HOST, port), lambda sock, addr: self._handle(sock, target, port))
        server.start()
        self.servers[port] = server

    def cut(self) -> None:
        """Close every listener and every proxied connection."""
        self.cut_now = True
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        for sock in list(self.sockets):
            self._close(sock)

    def isolate(self, port: int) -> None:
        """Cut the links of the member whose proxy port is ``port`` (see the docstring)."""
        self.isolated = port
        for sock, ends in list(self.links.items()):
            if port in ends:
                self._close(sock)

    def _isolates(self, listen: int, dialer: int | None) -> bool:
        return self.isolated is not None and self.isolated in (listen, dialer)

    def restore(self) -> None:
        """Listen again on every route."""
        self.cut_now = False
        self.isolated = None
        for port in self.routes:
            if port not in self.servers:
                self._listen(port)

    def _close(self, sock: socket.socket) -> None:
        self.sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _rewrite_hello(self, line: bytes) -> tuple[bytes, int | None]:
        """The HELLO with its port renamed, and the port it names (None: not a HELLO)."""
        try:
            hello = json.loads(line)
        except ValueError:
            return line, None
        if type(hello) is list and len(hello) == 6 and hello[0] == "gcollective":
            port = self.renames.get(hello[4])
            if port is not None:
                hello[4] = port
                return (json.dumps(hello, separators=(",", ":")) + "\n").encode(), port
            return line, hello[4]
        return line, None

    def _handle(self, client: socket.socket, target: int, listen: int) -> None:
        if self.cut_now or self._isolates(listen, None):
            client.close()
            return
        try:
            upstream = socket.create_connection((HOST, target), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self.connections += 1
        self.sockets.update((client, upstream))
        try:
            head = b""
            while b"\n" not in head and len(head) < _MAX_HELLO:
                data = client.recv(_CHUNK)
                if not data:
                    return
                head += data
            line, sep, rest = head.partition(b"\n")
            hello, dialer = self._rewrite_hello(line + sep)
            if self._isolates(listen, dialer):
                return
            self.links[client] = (listen, dialer)
            upstream.sendall(hello + rest)
            self.bytes_forwarded += len(head)
            back = gevent.spawn(self._pump, upstream, client)
            self._pump(client, upstream)
            back.kill()
        except OSError:
            pass
        finally:
            self.links.pop(client, None)
            self._close(client)
            self._close(upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    return
                sink.sendall(data)
                self.bytes_forwarded += len(data)
        except OSError:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    options = parser.parse_args()
    gevent.spawn_later(options.max_seconds, os._exit, 3)
    proxy = PartitionProxy()
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    while True:
        line = stdin.readline()
        if not line:
            break
        request: dict[str, Any] = json.loads(line)
        cmd = request["cmd"]
        reply: dict[str, Any] = {"ok": True}
        try:
            if cmd == "route":
                proxy.route(request["listen"], request["target"])
            elif cmd == "rename":
                proxy.renames.update({int(k): v for k, v in request["ports"].items()})
            elif cmd == "cut" and request.get("isolate") is not None:
                proxy.isolate(request["isolate"])
            elif cmd == "cut":
                proxy.cut()
            elif cmd == "restore":
                proxy.restore()
            elif cmd == "stats":
                reply.update(bytes=proxy.bytes_forwarded, connections=proxy.connections)
            elif cmd == "stop":
                proxy.cut()
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd == "stop":
            break
    os._exit(0)


if __name__ == "__main__":
    main()
