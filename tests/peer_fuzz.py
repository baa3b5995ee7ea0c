"""Engines wired by hand, without sockets, and frames of a member that passed its HELLO made
wrong one field at a time: the harness of ``test_peer_fuzz`` (sans-IO, like
``tests/simulation.py``, but driven step by step by a test rather than by a seeded world).

A ``Wire`` is one connection from one engine to another: the dialler's ``link_up`` bytes, then
whatever its ``data_to_send`` gives, through a real ``FrameDecoder`` into the acceptor's
``receive``, as the shell does. ``mutate`` changes one place of a decoded frame (a value
replaced by one from ``NASTY``, an element dropped, repeated or added, a list cut short) and
encodes it again.
"""

from __future__ import annotations

import json
from typing import Any

from engines import new_engine

from gcollective._clock import HLC_LIMIT, MILLIS_SHIFT, NODE_BITS, STAMP_LIMIT
from gcollective._engine import Engine, Inbound, Peer
from gcollective._errors import ProtocolError
from gcollective._validate import MAX_DEPTH
from gcollective._wire import (
    FRAME_KINDS,
    MAX_SEQ,
    MAX_TTL_MS,
    FrameDecoder,
    parse_hello,
)

WALL_MS = 1_800_000_000_000  # the wall clock every engine reads (ms), moved by ``Clock``
MAX_FRAME = 1 << 16
CLOCK_SKEW = 1.0


class Clock:
    """The wall clock (ns) and the monotonic one (s) of a test, moved by hand."""

    def __init__(self) -> None:
        self.wall = WALL_MS * 1_000_000
        self.now = 0.0

    def wall_ns(self) -> int:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += int(seconds * 1e9)


def make_engine(node_id: int, port: int, clock: Clock) -> Engine:
    """An engine at ``127.0.0.1:port``, its clocks ``clock``'s."""
    return new_engine(
        node_id,
        clock.wall_ns,
        port=port,
        log_bytes=1 << 20,
        max_frame=MAX_FRAME,
        max_queue_bytes=1 << 22,
        down_timeout=60.0,
        clock_skew=CLOCK_SKEW,
    )


def peer_of(engine: Engine, other: Engine, now: float) -> Peer:
    """``engine``'s ``Peer`` for ``other`` (added as a configured peer the first time)."""
    peer = engine.peers.get(other.advertise)
    if peer is None:
        peer = Peer(other.advertise, now, engine.max_queue_bytes)
        engine.add_peer(peer)
    return peer


class Wire:
    """A connection from ``source`` to ``target``, up (HELLO read) once made."""

    def __init__(self, source: Engine, target: Engine, clock: Clock) -> None:
        self.source = source
        self.target = target
        self.clock = clock
        self.peer = peer_of(source, target, clock.now)  # (the dialler's)
        peer_of(target, source, clock.now)
        self.decoder = FrameDecoder(MAX_FRAME, kinds=FRAME_KINDS)
        first = source.link_up(self.peer, clock.now)
        messages = self.decoder.feed(first)
        hello = parse_hello(messages[0])
        self.inbound: Inbound = target.connection_made(
            target.peers.get((hello.host, hello.port)), hello, clock.now
        )
        target.receive(self.inbound, messages[1:], self.decoder.frames[1:], clock.now)

    def outgoing(self) -> list[bytes]:
        """What the dialler would write now (every frame, a snapshot stream to its end)."""
        frames: list[bytes] = []
        while True:
            batch, _ = self.source.data_to_send(self.peer, self.clock.now)
            if not batch:
                return frames
            frames += batch

    def deliver(self, data: bytes) -> None:
        """Bytes arriving at the acceptor (``ProtocolError``: the shell closes the connection)."""
        messages = self.decoder.feed(data)
        self.target.receive(self.inbound, messages, self.decoder.frames, self.clock.now)

    def pump(self) -> None:
        for frame in self.outgoing():
            self.deliver(frame)

    def close(self) -> None:
        """The connection ended (both sides see it)."""
        self.source.stream_lost(self.peer)
        self.source.link_failed(self.peer, self.clock.now)


def sweep(engine: Engine, clock: Clock) -> None:
    """The store's metadata sweep, to the wall clock's stamp now: what the shell runs once
    every member's frontier passed it (the tests that call it make nothing older after)."""
    frontier = hlc_at(clock.wall // 1_000_000) << NODE_BITS
    while not engine.store.collect(frontier):
        pass


def state_of(engine: Engine) -> Any:
    """What a refused frame must leave as it was: the replica with its metadata, the version
    vector and what is held beyond gaps, the log, and what is staged or due to merge."""
    log = engine.log
    return json.dumps(
        [
            engine.store.export(),
            sorted(engine.progress.applied.items()),
            sorted(engine.progress.stamps.items()),
            sorted((o, sorted(a.items())) for o, a in engine.progress._ahead.items()),
            {o: [list(e[:2]) for e in entries] for o, entries in log._frames.items()},
            len(engine.merges_due),
            engine.store.next_expiry,
        ],
        default=repr,
        sort_keys=True,
    )


def staged_of(inbound: Inbound) -> int:
    return -1 if inbound.staged is None else len(inbound.staged)


def hlc_at(wall_ms: int, ahead_ms: int = 0) -> int:
    return (wall_ms + ahead_ms) << (MILLIS_SHIFT - NODE_BITS)


def nasty_values(clock: Clock, ids: list[int]) -> list[Any]:
    """Values a field of a frame is replaced by: wrong types, ints at and past the wire's
    limits, stamps ahead of the clock, other members' ids, deep and long values."""
    wall_ms = clock.wall // 1_000_000
    deep: Any = 1
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    nasty: list[Any] = [
        0,
        -1,
        1,
        2,
        3,
        True,
        False,
        None,
        "",
        "a",
        "a.b",
        ".",
        "a..b",
        "\0",
        [],
        {},
        [[]],
        [0],
        [1, 1],
        {"": 1},
        {"a": {"b": None}},
        1.5,
        -0.0,
        1e308,
        -1e308,
        float("nan"),
        float("inf"),
        2**31,
        2**53 + 1,
        2**63 - 1,
        2**63,
        2**64 - 1,
        2**64,
        2**127,
        STAMP_LIMIT - 1,
        STAMP_LIMIT,
        -(2**63),
        HLC_LIMIT - 1,
        MAX_SEQ - 1,
        MAX_SEQ,
        MAX_TTL_MS,
        MAX_TTL_MS + 1,
        hlc_at(wall_ms),
        hlc_at(wall_ms, 10_000),
        hlc_at(wall_ms, -10_000),
        (hlc_at(wall_ms) << NODE_BITS) | ids[0],
        (hlc_at(wall_ms, 10_000) << NODE_BITS) | ids[0],
        [[ids[1], MAX_SEQ - 1, STAMP_LIMIT - 1]],  # (a vector entry for another member)
        [[ids[1], 2**40, (hlc_at(wall_ms) << NODE_BITS) | ids[1]]],
        [[ids[0], 2**40, (hlc_at(wall_ms) << NODE_BITS) | ids[0]]],
        deep,
        "x" * 5000,
        list(range(200)),
    ]
    nasty += ids
    return nasty


def places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded frame, as the keys and indexes leading to it (not the
    frame's kind, which ``FrameDecoder`` already checks)."""
    found = [path] if path else []
    if type(value) is list:
        for index, item in enumerate(value):
            if path or index:
                found += places(item, (*path, index))
    elif type(value) is dict:
        for key, item in value.items():
            found += places(item, (*path, key))
    return found


def container_at(frame: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        frame = frame[step]
    return frame


MUTATIONS = ("replace", "drop", "repeat", "append", "cut", "swap", "rename")


def mutate(frame: bytes, kind: str, where: int, pick: int, nasty: list[Any]) -> bytes:
    """``frame`` (without or with its newline) with one place changed (see the module
    docstring), encoded again with a newline."""
    message = json.loads(frame)
    spots = places(message)
    if not spots:
        return frame.rstrip(b"\n") + b"\n"
    # A field of the frame first, then a place in it: each field as likely as another,
    # however long (a column of a thousand values is one field, as the origin is).
    fields = sorted({spot[0] for spot in spots})
    field = fields[where % len(fields)]
    inside = [spot for spot in spots if spot[0] == field]
    path = inside[(where // len(fields)) % len(inside)]
    holder = container_at(message, path)
    key = path[-1]
    replacement = nasty[pick % len(nasty)]
    if kind == "replace":
        holder[key] = replacement
    elif kind == "drop":
        del holder[key]
    elif kind == "repeat":
        if type(holder) is list:
            holder.insert(key, holder[key])
        else:
            holder[f"{key}~"] = holder[key]
    elif kind == "append":
        target = holder[key]
        if type(target) is list:
            target.append(replacement)
        elif type(target) is dict:
            target["k~"] = replacement
        else:
            holder[key] = [target, replacement]
    elif kind == "cut":
        target = holder[key]
        if type(target) is list:
            del target[len(target) // 2 :]
        elif type(target) is str:
            holder[key] = target[: len(target) // 2]
        elif type(target) is int and not isinstance(target, bool):
            holder[key] = target // 2
    elif kind == "swap":
        if type(holder) is list and len(holder) > 1:
            other = (key + 1) % len(holder) or (1 if len(holder) > 2 else 0)
            holder[key], holder[other] = holder[other], holder[key]
    elif kind == "rename" and type(holder) is dict:
        holder[str(replacement)] = holder.pop(key)
    return json.dumps(message, ensure_ascii=False).encode() + b"\n"


__all__ = [
    "CLOCK_SKEW",
    "MUTATIONS",
    "Clock",
    "ProtocolError",
    "Wire",
    "make_engine",
    "mutate",
    "nasty_values",
    "staged_of",
    "state_of",
    "sweep",
]
