"""A collective.js 0.3.1 member in plain Python, written from docs/collective-js.md.

It is the other side of gcollective's compatibility mode in the tests: independent of the
library (plain blocking sockets and threads, no gevent, no gcollective import), structured
like the Node.js original, and writing the wire format byte for byte as Node's
``JSON.stringify`` does. Its quirks are kept on purpose:

- connections that end or fail are removed and never re-opened;
- a non-null Accept replaces the whole data object (times are not touched);
- SET / DELETE compare millisecond wall-clock times per key string, ties apply;
- INCREMENT ignores time;
- ``get`` of a path through a non-object returns that non-object.

Node runs every callback on one thread; here one lock (``_loop``) plays the event loop: every
handler runs holding it. Two deliberate differences from Node, both about not crashing the test
process: incoming bytes are split on newline bytes before they are decoded (Node decodes each
read on its own), and a line that does not parse is recorded in ``errors`` instead of throwing.
"""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import time
from decimal import Decimal
from typing import Any

TYPES = ["New", "Accept", "Data"]
OPERATIONS = {"SET": 0, "INCREMENT": 1, "DELETE": 2}
DELIMITER = b"\n"


# -- JSON.stringify, byte for byte ------------------------------------------------------------


def js_number(number: float) -> str:
    """``String(number)`` as JavaScript writes a double."""
    if not math.isfinite(number):
        return "null"  # JSON.stringify(NaN) and of infinities
    if number == int(number) and abs(number) < 1e21:
        return str(int(number))  # also -0 -> "0"
    text = repr(number)  # the shortest round-trip digits, as JavaScript picks them
    mantissa, _, exponent = text.partition("e")
    if not exponent:
        return text
    power = int(exponent)
    if -7 < power < 21:
        return format(Decimal(text), "f")  # JavaScript writes these without an exponent
    return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


def _is_array_index(key: str) -> bool:
    return (
        key.isdigit() and key.isascii() and (key == "0" or key[0] != "0") and (int(key) < 2**32 - 1)
    )


def js_stringify(value: Any) -> str:
    """``JSON.stringify(value)``: compact, raw UTF-8, integer-like object keys first."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return js_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(js_stringify(v) for v in value) + "]"
    if isinstance(value, dict):
        # A JavaScript object lists array-index keys first, ascending, then the others in
        # insertion order.
        indexes = sorted((k for k in value if _is_array_index(k)), key=int)
        others = [k for k in value if not _is_array_index(k)]
        return (
            "{"
            + ",".join(
                json.dumps(k, ensure_ascii=False) + ":" + js_stringify(value[k])
                for k in indexes + others
            )
            + "}"
        )
    raise TypeError(f"cannot stringify a {type(value).__name__}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the member -----------------------------------------------------------------------------


class LegacyPeer:
    """``new Collective(local, all_hosts, callback)``; ``start()`` returns where collective.js
    would call the callback: listening, every member tried, New sent."""

    def __init__(self, local: dict[str, Any], all_hosts: list[dict[str, Any]]) -> None:
        self.local = dict(local)
        self.remote = [
            h
            for h in all_hosts
            if h["host"] != self.local["host"] or h["port"] != self.local["port"]
        ]
        self.connections: dict[str, socket.socket] = {}
        self.active = 0
        self.active_remote = 0
        self.data: dict[str, Any] = {}
        self.history: dict[str, Any] = {}
        self._loop = threading.RLock()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._closed = False
        # For the tests: what arrived, and what did not parse.
        self.received: list[list[Any]] = []
        self.errors: list[str] = []
        #: Lines received whose bytes differ from what JSON.stringify writes for their value.
        self.foreign_lines: list[bytes] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, connect_timeout: float = 2.0) -> LegacyPeer:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.local["host"], self.local["port"]))
        server.listen(128)
        self._server = server
        self._thread(self._accept_loop)
        # makeConnections: try every member, then notifyConnections.
        for item in self.remote:
            self.make_connection(item["host"], item["port"], connect_timeout)
        with self._loop:
            self.notify_connections()
        return self

    def stop(self) -> None:
        """Kill the process, as far as its peers can tell: every socket closes."""
        self._closed = True
        with self._loop:
            sockets = [*self._sockets, *self.connections.values()]
            self.connections.clear()
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    @staticmethod
    def _thread(target: Any, *args: Any) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    # -- connections ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._closed:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with self._loop:
                self._sockets.append(connection)
            self._thread(self.listen_data, connection)

    def make_connection(self, host: str, port: int, connect_timeout: float = 2.0) -> None:
        """Open the outgoing (send-only) connection to ``host:port`` unless there is one."""
        ident = self.make_ident(host, port)
        with self._loop:
            if ident in self.connections:
                return
        try:
            connection = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError:
            return  # 'error': removeConnection, nothing to remove
        connection.settimeout(None)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # setKeepAlive(true)
        with self._loop:
            if self._closed:
                connection.close()
                return
            self.connections[ident] = connection
            self.active += 1
            if host != self.local["host"]:
                self.active_remote += 1
        self._thread(self._watch_end, ident, connection)

    def _watch_end(self, ident: str, connection: socket.socket) -> None:
        # Node's 'end' / 'error' events on an outgoing connection: it is removed for good.
        try:
            while connection.recv(4096):
                pass
        except OSError:
            pass
        with self._loop:
            self.remove_connection(ident, connection)

    def remove_connection(self, ident: str, connection: socket.socket | None = None) -> None:
        current = self.connections.get(ident)
        if current is not None and (connection is None or current is connection):
            del self.connections[ident]
            self.active -= 1
            if ident.rsplit(":", 1)[0] != self.local["host"]:
                self.active_remote -= 1
            current.close()

    def notify_connections(self) -> None:
        """New on every connection; ``wants_data`` on one, picked at random, preferring
        members on other hosts when any are connected."""
        command = [self.local["host"], self.local["port"], False]
        i = 0
        random_connection = (
            math.floor(random.random() * self.active_remote)
            if (self.active_remote)
            else math.floor(random.random() * self.active)
        )
        for ident in list(self.connections):
            command[2] = False
            host = ident.rsplit(":", 1)[0]
            if host != self.local["host"] or self.active_remote == 0:
                if i == random_connection:
                    command[2] = True
                i += 1
            self.send_message(ident, 0, command)

    def send_message(self, ident: str, kind: int, data: Any) -> None:
        connection = self.connections.get(ident)
        if connection is None:
            return
        try:
            connection.sendall((js_stringify([kind, data]) + "\n").encode())
        except OSError:
            self.remove_connection(ident, connection)

    @staticmethod
    def make_ident(host: str, port: int) -> str:
        return f"{host}:{port}"

    # -- receiving ------------------------------------------------------------------------------

    def listen_data(self, connection: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while DELIMITER in buffer:
                line, buffer = buffer.split(DELIMITER, 1)
                try:
                    command = json.loads(line.decode())
                    handler = getattr(self, "parse_" + TYPES[command[0]])
                except (ValueError, IndexError, TypeError, KeyError) as exc:
                    self.errors.append(f"{line!r}: {exc}")
                    continue
                if (js_stringify(command) + "\n").encode() != line + DELIMITER:
                    self.foreign_lines.append(line)
                if handler == self.parse_New:
                    handler(command)  # connects back, which must not hold the loop
                    continue
                with self._loop:
                    self.received.append(command)
                    handler(command)

    def parse_New(self, command: list[Any]) -> None:
        host, port = command[1][0], command[1][1]
        with self._loop:
            self.received.append(command)
        self.make_connection(host, port)
        with self._loop:
            ident = self.make_ident(host, port)
            if ident in self.connections:
                local_data = self.data if command[1][2] is True else None
                self.send_message(ident, 1, local_data)

    def parse_Data(self, command: list[Any]) -> None:
        payload = command[1]
        operation = payload[3] if len(payload) > 3 else None
        self.assign(payload[0], payload[1], payload[2], operation)

    def parse_Accept(self, command: list[Any]) -> None:
        if command[1] is not None:
            self.data = command[1]

    # -- data -----------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        with self._loop:
            notations = key.split(".")
            obj: Any = self.data
            while isinstance(obj, dict) and notations:
                obj = obj.get(notations.pop(0))
            return json.loads(json.dumps(obj))  # a copy, so the test reads a stable value

    def snapshot(self) -> dict[str, Any]:
        with self._loop:
            return json.loads(json.dumps(self.data))

    def set(self, key: str, value: Any, operation: int | None = None) -> None:
        with self._loop:
            operation = operation or OPERATIONS["SET"]
            now = int(time.time() * 1000)  # +new Date()
            self.assign(key, now, value, operation)
            for ident in list(self.connections):
                self.send_message(ident, 2, [key, now, value, operation])

    def traverse(self, key: str) -> tuple[dict[str, Any], str]:
        notations = key.split(".")
        obj = self.data
        while len(notations) > 1:
            i = notations.pop(0)
            if not isinstance(obj.get(i), dict):
                obj[i] = {}  # writing through a non-object makes it an object
            obj = obj[i]
        return obj, notations[0]

    def assign(self, key: str, time_ms: Any, value: Any, operation: Any) -> None:
        obj, leaf = self.traverse(key)
        if operation == OPERATIONS["INCREMENT"]:
            current = obj.get(leaf, 0)
            obj[leaf] = (current if _number(current) else 0) + value
        elif operation == OPERATIONS["DELETE"]:
            if key not in self.history:
                self.history[key] = time_ms
            if self.history[key] <= time_ms:
                del self.history[key]
                obj.pop(leaf, None)
        else:
            if key in self.history and self.history[key] > time_ms:
                return
            self.history[key] = time_ms
            obj[leaf] = value
