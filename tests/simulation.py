"""A deterministic simulation of a collective: real engines, no sockets, no wall clock.

``N`` members, each a real ``Engine`` over a real ``Store`` speaking the real wire format, are
wired through a simulated network of ordered byte streams, one per dialled link (as TCP
connections are), and a simulated clock. One seeded ``random.Random`` drives everything:
which member writes what, delays (so frames on different connections arrive in any order,
and a stream arrives cut in arbitrary pieces), connections cut with their bytes in flight
lost (as a reset loses them), partitions, members paused and resumed with their state,
members restarted empty (a new incarnation, joining by snapshot), members joining while
others write, and each member's wall clock skewed within ``clock_skew``.

At the end the network heals and the run goes on until every member holds the same tree,
and that tree must equal ``model.fold`` of the operations no member lost (an operation is
lost only with a member restarted empty before anyone else held it). The log and gaps must
be empty then, and the metadata bounded by the data. A seed replays exactly: nothing here
reads the real clock, the OS's randomness or the order of a set.

The shell's parts the engine leaves out (dialling, backoff, the progress ticker, the
housekeeping timer, HELLO checks) are played here by ``SimMember`` in the simplest way that
keeps their contract.
"""

from __future__ import annotations

import copy
import heapq
import json
import os
from dataclasses import dataclass, field
from random import Random
from typing import Any, Callable, TypeVar

from model import DELETE, INCREMENT, SET, Op, first_difference, fold

from gcollective._clock import HybridClock, millis_stamp
from gcollective._engine import Engine, Inbound, Peer
from gcollective._errors import ProtocolError
from gcollective._frontier import DeclaredDown
from gcollective._store import MISSING, Store, is_number
from gcollective._wire import SNAPSHOT, SNAPSHOT_END, FrameDecoder, parse_hello, wire_path

SEGMENTS = ("a", "b", "c")
WALL_BASE = 1_800_000_000.0  # the simulated wall clock at time 0 (seconds)
SYNC_INTERVAL = 0.1
CLOCK_SKEW = 1.0  # members' clocks differ by less than this
SHORT_TTLS_MS = (50, 200, 400)  # expired long before the final check
LONG_TTL_MS = 3_600_000  # never expires during a run


class Scheduler:
    """Simulated time: actions run in order of their time (ties in the order scheduled)."""

    def __init__(self, rng: Random) -> None:
        self.rng = rng
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._count = 0

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._count += 1
        heapq.heappush(self._queue, (max(when, self.now), self._count, action))

    def after(self, delay: float, action: Callable[[], None]) -> None:
        self.at(self.now + delay, action)

    def run_until(self, end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= end:
            when, _, action = heapq.heappop(queue)
            self.now = when
            action()
        self.now = max(self.now, end)


class Connection:
    """One dialled link's byte stream, from ``source`` to ``target``: what is written arrives
    in order, in pieces, after a delay; a cut loses whatever is still in flight."""

    def __init__(self, world: World, source: SimMember, target: SimMember) -> None:
        self.world = world
        self.source = source
        self.target = target
        self.open = True
        self.arrives = 0.0  # the time the last piece arrives (later pieces come after it)
        self.decoder = FrameDecoder(1 << 24)
        self.inbound: Inbound | None = None
        self.sent = 0  # bytes written so far
        self.read = 0  # bytes arrived and handled so far
        # (end offset, operations) of each SNAPSHOT frame sent: the operations whose effect
        # the frame carries, held by the receiver once it handled the stream's SNAPSHOT_END
        # (for that frame: its vector, origin -> seq; the receiver stages a stream's frames
        # until then).
        self.captured: list[tuple[int, set[tuple[int, int]] | dict[int, int]]] = []
        self.staged: set[tuple[int, int]] = set()  # (what arrived of an unfinished stream)

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        rng = self.world.rng
        while data:
            cut = rng.randint(1, len(data)) if rng.random() < 0.3 else len(data)
            piece, data = data[:cut], data[cut:]
            self.arrives = max(self.arrives, self.world.now + self.world.latency())
            self.world.scheduler.at(self.arrives, lambda piece=piece: self._arrive(piece))

    def _arrive(self, piece: bytes) -> None:
        if self.open and self.target.read(self, piece):
            self.read += len(piece)
            while self.captured and self.captured[0][0] <= self.read:
                self._handled(self.captured.pop(0)[1])

    def _handled(self, carried: set[tuple[int, int]] | dict[int, int]) -> None:
        """A SNAPSHOT frame (the operations it carries) or a SNAPSHOT_END (its vector) was
        handled."""
        if isinstance(carried, dict):  # (the stream is queued for merge_step: see holds)
            self.target.merging.append((self.staged, carried))
            self.staged = set()
        else:
            self.staged |= carried

    def refused_after(self, ends: int) -> None:
        """The connection was refused in the middle of a piece, after its first ``ends``
        SNAPSHOT_END frames were handled (each queued its stream for merge_step)."""
        while ends and self.captured:
            carried = self.captured.pop(0)[1]
            self._handled(carried)
            ends -= isinstance(carried, dict)

    def cut(self) -> None:
        """Reset: bytes in flight are lost; the dialler notices a moment later."""
        if not self.open:
            return
        self.open = False
        self.world.cuts += 1
        source = self.source
        self.world.scheduler.after(self.world.rng.uniform(0, 0.3), lambda: source.lost(self))


class SimPeer(Peer):
    """A member's peer: the engine's state of it, and the hooks played by ``SimMember``."""

    member: SimMember
    connection: Connection | None = None
    turn_scheduled = False
    attempted = False
    failures = 0

    def data_ready(self) -> None:
        self.member.wake_writer(self)

    def drop_connection(self) -> None:
        if self.connection is not None:
            self.connection.cut()

    def redial_now(self) -> None:
        self.member.dial_soon(self, 0.0)


class SimMember:
    """One member: an engine and what the gevent shell does around it, simulated."""

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index
        self.address = (f"127.0.0.{index + 1}", 7000)
        self.skew = world.rng.uniform(-0.45 * CLOCK_SKEW, 0.45 * CLOCK_SKEW)  # (+ latency)
        self.running = False
        self.paused = False
        self.incarnation = 0
        self.engine: Engine | None = None
        # Operations merged through a snapshot beyond what its version vector says (a holder
        # exports what it has when it builds each frame, which may be more).
        self.also_holds: set[tuple[int, int]] = set()
        # What each stream queued for merge_step carries, and its vector, in order (see
        # merge_slice).
        self.merging: list[tuple[set[tuple[int, int]], dict[int, int]]] = []
        self.merge_scheduled = False

    # -- life cycle --------------------------------------------------------------------------

    def wall_ns(self) -> int:
        return int((WALL_BASE + self.world.now + self.skew) * 1e9)

    def start(self) -> None:
        """Start a new, empty incarnation: it joins by snapshot."""
        world = self.world
        self.incarnation += 1
        self.also_holds = set()
        self.merging = []
        self.merge_scheduled = False
        node_id = world.rng.randrange(1, 1 << 63)
        store = Store()
        engine = Engine(
            node_id,
            store,
            HybridClock(node_id, now=self.wall_ns),
            wall_ns=self.wall_ns,
            advertise=self.address,
            log_bytes=world.rng.choice([512, 64 * 1024]),  # a small log: snapshots instead
            # Small frames: snapshots in many frames, batches of operations halved.
            max_frame=1024 if world.small_frames else 1 << 24,
            max_queue_bytes=1 << 20,
            sync_interval=SYNC_INTERVAL,
            down_timeout=world.down_timeout,
            clock_skew=CLOCK_SKEW,
        )
        engine.schedule_flush = lambda: world.scheduler.at(engine.flush_at(), self.flush)
        engine.flush_now = self.flush
        engine.on_synced = self.check_ready
        engine.schedule_merge = lambda: self.schedule_merge(self.incarnation)
        self.engine = engine
        self.running = True
        self.paused = False
        for other in world.members:
            if other is not self:
                peer = SimPeer(other.address, world.now, engine.max_queue_bytes)
                peer.member = self
                engine.add_peer(peer)
                self.dial_soon(peer, 0.0)
        self.tick(self.incarnation)

    def schedule_merge(self, incarnation: int) -> None:
        """The shell's merging greenlet: ``merge_step`` as its own events, so operations,
        frames and faults come between slices."""
        if not self.merge_scheduled:
            self.merge_scheduled = True
            delay = self.world.merge_rng.uniform(0, 0.003)
            self.world.scheduler.after(delay, lambda: self.merge_slice(incarnation))

    def merge_slice(self, incarnation: int) -> None:
        engine = self.engine
        if not self.running or incarnation != self.incarnation or engine is None:
            return  # (a crash drops what was not merged)
        self.merge_scheduled = False
        merged = engine.snapshots_merged
        done = engine.merge_step()
        if engine.snapshots_merged > merged and self.merging:
            self.also_holds |= self.merging.pop(0)[0]
        if not done:
            self.schedule_merge(incarnation)

    def stop(self) -> None:
        """Gone (a crash): every connection to or from it is cut."""
        self.running = False
        self.world.cut_all(self)

    def pause(self) -> None:
        """Unreachable for a while, its state kept (a stopped process, a lost network)."""
        self.paused = True
        self.world.cut_all(self)

    def resume(self) -> None:
        self.paused = False
        for peer in self.peers():
            self.dial_soon(peer, 0.0)

    @property
    def up(self) -> bool:
        return self.running and not self.paused

    def peers(self) -> list[SimPeer]:
        assert self.engine is not None
        return list(self.engine.peers.values())

    def tick(self, incarnation: int) -> None:
        """Every sync_interval: PROGRESS on every link, and housekeeping."""
        if not self.running or incarnation != self.incarnation:
            return
        if not self.paused:
            for peer in self.peers():
                if peer.connection is not None:
                    peer.progress_due = True
                    self.wake_writer(peer)
            self.housekeep()
        self.world.scheduler.after(SYNC_INTERVAL, lambda: self.tick(incarnation))

    def housekeep(self) -> None:
        engine = self.engine
        assert engine is not None
        frontier = engine.housekeep(self.world.now)
        self.advance()
        store = engine.store
        store.expire(frontier)
        while not store.collect(frontier, 10_000):
            pass

    def advance(self) -> None:
        """Fire the expiries due by this member's wall clock (the shell's ``_advance``)."""
        engine = self.engine
        assert engine is not None
        now_ms = self.wall_ns() // 1_000_000
        while True:
            fired = engine.store.advance(now_ms, 10_000)
            if not fired:
                return
            engine.clock.observe(millis_stamp(now_ms))

    def check_ready(self) -> None:
        """The shell's start() returns (and reports may say complete) once synced, or once
        every link was tried and none waits for a snapshot."""
        engine = self.engine
        assert engine is not None
        if not engine.ready and (
            engine.synced
            or all(peer.attempted and peer is not engine.snapshot_peer for peer in self.peers())
        ):
            engine.ready = True

    def flush(self) -> None:
        if self.running and self.engine is not None:
            self.engine.flush(self.world.now)

    # -- the writer side of each link ----------------------------------------------------

    def dial_soon(self, peer: SimPeer, delay: float) -> None:
        incarnation = self.incarnation
        self.world.scheduler.after(delay, lambda: self.dial(peer, incarnation))

    def dial(self, peer: SimPeer, incarnation: int) -> None:
        if not self.up or incarnation != self.incarnation or peer.connection is not None:
            return
        if self.engine is None or self.engine.peers.get(peer.address) is not peer:
            return
        world = self.world
        target = world.member_at(peer.address)
        if not target.up or world.blocked(self, target):
            peer.failures += 1
            self.failed(peer)
            backoff = min(2.0, 0.05 * 2 ** min(peer.failures, 10)) * world.rng.uniform(0.5, 1)
            self.dial_soon(peer, backoff)
            return
        peer.failures = 0
        peer.attempted = True
        connection = peer.connection = Connection(world, self, target)
        world.connections.append(connection)
        connection.send(self.engine.link_up(peer, world.now))
        self.check_ready()
        self.wake_writer(peer)

    def failed(self, peer: SimPeer) -> None:
        assert self.engine is not None
        peer.attempted = True
        self.engine.link_failed(peer, self.world.now)
        self.check_ready()

    def lost(self, connection: Connection) -> None:
        """Our connection ``connection`` was cut: the writer notices, and redials."""
        for peer in self.peers() if self.running and self.engine else ():
            if peer.connection is connection:
                peer.connection = None
                self.engine.stream_lost(peer)
                self.failed(peer)
                self.dial_soon(peer, self.world.rng.uniform(0.02, 0.2))

    def wake_writer(self, peer: SimPeer) -> None:
        if not peer.turn_scheduled and peer.connection is not None:
            peer.turn_scheduled = True
            self.world.scheduler.after(self.world.rng.uniform(0, 0.002), lambda: self.write(peer))

    def write(self, peer: SimPeer) -> None:
        peer.turn_scheduled = False
        connection = peer.connection
        if connection is None or self.engine is None:
            return
        # (Into a connection that was cut too, until the writer notices: those bytes are lost.)
        batch, _ = self.engine.data_to_send(peer, self.world.now)
        if batch:
            end = connection.sent
            for frame in batch:
                end += len(frame)
                if frame.startswith(b"[%d," % SNAPSHOT):
                    connection.captured.append((end, self.captured(json.loads(frame)[1])))
                elif frame.startswith(b"[%d," % SNAPSHOT_END):
                    vector = json.loads(frame)[1]
                    connection.captured.append((end, {o: seq for o, seq, _ in vector}))
            connection.send(b"".join(batch))
            if peer.busy or peer.snapshot_stream is not None:
                self.wake_writer(peer)

    def captured(self, items: list[Any]) -> set[tuple[int, int]]:
        """The operations whose effect a SNAPSHOT frame's ``items`` carry: those we hold whose
        path's entry is in one of them (a piece of a long item carries only some of its
        children and leaves)."""
        made = self.world.made
        return {
            key
            for key, op in made.items()
            if self.holds(*key)
            and any(name == op.path[0] and carries(entry, op.path[1:]) for name, entry in items)
        }

    # -- the reader side ---------------------------------------------------------------------

    def read(self, connection: Connection, data: bytes) -> bool:
        """Bytes arrived on a connection from a peer: HELLO first, then frames. False if the
        connection was refused."""
        engine = self.engine
        if not self.up or engine is None:
            connection.cut()
            return False
        decoder = connection.decoder
        queued = len(engine.merges_due)
        try:
            messages = decoder.feed(data)
            frames = decoder.frames
            if connection.inbound is None:
                if not messages:
                    return True
                connection.inbound = self.hello(messages[0])
                messages, frames = messages[1:], frames[1:]
            engine.receive(connection.inbound, messages, frames, self.world.now)
            return True
        except ProtocolError as exc:
            connection.cut()
            connection.refused_after(len(engine.merges_due) - queued)
            if exc.category == "down":
                # Refused for good: its operator restarts it empty (see the down_timeout
                # option), which drops what only it held; and it hears so first where the
                # refusal says (the REFUSE line the shell sends).
                self.world.down_refusals += 1
                told = isinstance(exc, DeclaredDown) and bool(exc.reply)
                self.world.refused_as_down(connection.source, by=self, told=told)
            else:
                self.world.refusals.append(f"m{self.index}: {exc}")
            return False

    def hello(self, message: Any) -> Inbound:
        engine = self.engine
        assert engine is not None
        hello = parse_hello(message)
        if hello.node_id == engine.node_id:
            raise ProtocolError("connected to itself")
        if hello.node_id in engine.down_ids:
            raise engine.refused_again(hello)
        peer = engine.peers.get((hello.host, hello.port))
        return engine.connection_made(peer, hello, self.world.now)

    # -- writes --------------------------------------------------------------------------------

    def write_op(self, op: int, path: tuple[str, ...], value: Any, ttl_ms: int) -> Op | None:
        """Make one operation as the node's API does; the ``Op`` made, or None if refused."""
        engine = self.engine
        assert engine is not None
        self.advance()  # (the API fires due expiries before it reads or writes)
        if op == INCREMENT:
            current = engine.store.get(path, MISSING)
            if current is not MISSING and not is_number(current):
                return None  # refused: not a number
        stamp = engine.clock.stamp()
        wire = wire_path(path) if self.world.rng.random() < 0.5 else list(path)
        engine.apply_local(stamp, op, path, copy.deepcopy(value), wire, ttl_ms)
        seq = engine.seq + len(engine.outbox) // 3
        made = Op(stamp, op, path, None if op == DELETE else value, ttl_ms or None)
        self.world.made[(engine.node_id, seq)] = made
        return made

    def holds(self, origin: int, seq: int) -> bool:
        """Whether this member applied operation ``seq`` of ``origin`` (or made it)."""
        engine = self.engine
        if engine is None or not self.running:
            return False
        if origin == engine.node_id or (origin, seq) in self.also_holds:
            return True
        # (Merged unless it crashes first, and then it held them; and the stream's vector
        # counts them applied from then on, their effect carried or overwritten.)
        for carried, vector in self.merging:
            if (origin, seq) in carried or seq <= vector.get(origin, 0):
                return True
        progress = engine.progress
        return seq <= progress.applied.get(origin, 0) or seq in progress._ahead.get(origin, {})


def carries(entry: Any, path: tuple[str, ...]) -> bool:
    """Whether an exported ``entry`` (as a SNAPSHOT frame has it) holds the entry at ``path``
    below it: a full node's child or leaf, and so on down. (Below a plain leaf or a tombstone
    there is nothing: an operation there was overwritten, and the frame carries what did.)"""
    if not path:
        return True
    if type(entry) is not list or len(entry) < 8:
        return False
    children, leaves = entry[5], entry[6]
    if path[0] in children:
        return carries(children[path[0]], path[1:])
    return len(path) == 1 and path[0] in leaves[1]  # (leaves: [origins, keys, packed])


@dataclass
class World:
    """One seeded run (see the module docstring)."""

    seed: int
    size: int = 3
    # max_frame 1024 (the least allowed) instead of 16 MiB: snapshots in many frames, items
    # split across them (see test_simulation.py: a known bug in streaming big items)
    small_frames: bool = False
    # Seconds of silence after which a member is declared down (then refused until it
    # restarts empty): by default longer than any run.
    down_timeout: float = 3600.0
    down_refusals: int = 0
    rng: Random = field(init=False)
    scheduler: Scheduler = field(init=False)
    members: list[SimMember] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    made: dict[tuple[int, int], Op] = field(default_factory=dict)  # (origin, seq) -> Op
    lost: set[tuple[int, int]] = field(default_factory=set)
    partition: frozenset[int] = frozenset()  # the members on one side of a partition
    history: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    cuts: int = 0

    def __post_init__(self) -> None:
        self.rng = Random(self.seed)
        # The merge slices' delays: their own stream, so the rest of a seed's run (its
        # operations and faults) stays what it was before merges came in slices.
        self.merge_rng = Random(-1 - self.seed)
        self.scheduler = Scheduler(self.rng)
        self.members = [SimMember(self, index) for index in range(self.size)]

    @property
    def now(self) -> float:
        return self.scheduler.now

    def latency(self) -> float:
        return self.rng.choice([0.0002, 0.001, 0.005, 0.03])

    def member_at(self, address: tuple[str, int]) -> SimMember:
        return next(member for member in self.members if member.address == address)

    def blocked(self, one: SimMember, other: SimMember) -> bool:
        return (one.index in self.partition) != (other.index in self.partition)

    def cut_all(self, member: SimMember) -> None:
        for connection in self.live_connections():
            if member in (connection.source, connection.target):
                connection.cut()

    def live_connections(self) -> list[Connection]:
        self.connections = [c for c in self.connections if c.open]
        return list(self.connections)

    # -- the faults and writes a run is made of ------------------------------------------

    def random_write(self) -> None:
        writers = [member for member in self.members if member.up]
        if not writers:
            return
        member = self.rng.choice(writers)
        roll = self.rng.random()
        path = tuple(self.rng.choice(SEGMENTS) for _ in range(self.rng.randint(1, 3)))
        ttl_ms = 0
        if roll < 0.45:
            op, value = SET, self.random_value()
        elif roll < 0.75:
            op, value = INCREMENT, self.rng.choice([1, 2, -1, 5, 0.5])
        else:
            op, value = DELETE, None
        if op != DELETE and self.rng.random() < 0.2:
            ttl_ms = self.rng.choice([*SHORT_TTLS_MS, LONG_TTL_MS])
        made = member.write_op(op, path, value, ttl_ms)
        self.history.append(f"{self.now:.3f} m{member.index} {made!r}")

    def random_value(self) -> Any:
        rng = self.rng
        choice = rng.randrange(6)
        if choice == 0:
            return rng.randint(-3, 3)
        if choice == 1:
            return rng.choice(["x", "y", ""])
        if choice == 2:
            return {rng.choice(SEGMENTS): rng.randint(0, 9)}
        if choice == 3:
            return {rng.choice(SEGMENTS): {rng.choice(SEGMENTS): "deep"}}
        if choice == 4:
            return [rng.randint(0, 3), None]
        return rng.choice([None, True, 0.5, -1.5])

    def random_fault(self) -> None:
        rng = self.rng
        roll = rng.random()
        live = self.live_connections()
        if roll < 0.35 and live:
            connection = rng.choice(live)
            self.history.append(
                f"{self.now:.3f} cut m{connection.source.index}->m{connection.target.index}"
            )
            connection.cut()
        elif roll < 0.55:
            self.partition = frozenset(rng.sample(range(self.size), rng.randint(1, self.size - 1)))
            self.history.append(f"{self.now:.3f} partition {sorted(self.partition)}")
            for connection in live:
                if self.blocked(connection.source, connection.target):
                    connection.cut()
        elif roll < 0.7:
            self.heal()
        elif roll < 0.85:
            member = rng.choice(self.members)
            if member.up:
                self.history.append(f"{self.now:.3f} pause m{member.index}")
                member.pause()
                self.scheduler.after(rng.uniform(0.1, 2.0), member.resume)
        else:
            self.restart_empty(rng.choice(self.members))

    def restart_empty(self, member: SimMember) -> None:
        """Crash ``member`` and start it again empty, a moment later: what nobody else held
        of what it had is lost with it (and only that)."""
        if not member.running:
            return
        for key in self.made:
            if key not in self.lost and member.holds(*key):
                if not any(other.holds(*key) for other in self.members if other is not member):
                    self.lost.add(key)
        self.history.append(f"{self.now:.3f} restart m{member.index} empty")
        member.stop()
        self.scheduler.after(self.rng.uniform(0.05, 1.0), self._start_again(member))

    def refused_as_down(self, member: SimMember, by: SimMember, told: bool) -> None:
        """``member`` was refused as declared down (``by`` that one): if ``told``, it hears
        so a moment later; and it is restarted empty (once per incarnation)."""
        engine = member.engine
        if engine is not None and told:
            peer = engine.peers[by.address]
            hears = lambda: engine.declared_down_by_peer(peer)  # noqa: E731
            self.scheduler.after(self.latency(), hears)
        self.restart_when_refused(member)

    def restart_when_refused(self, member: SimMember) -> None:
        """``member`` was refused as declared down: restart it empty, once per incarnation."""
        incarnation = member.incarnation

        def restart() -> None:
            if member.running and member.incarnation == incarnation:
                self.restart_empty(member)

        self.scheduler.after(self.rng.uniform(0.05, 0.5), restart)

    def heal(self) -> None:
        self.partition = frozenset()
        self.history.append(f"{self.now:.3f} heal")
        for member in self.members:
            if member.running and member.paused:
                member.resume()

    # -- a run -----------------------------------------------------------------------------------

    def run(self, steps: int = 60, span: float = 6.0) -> None:
        """``steps`` writes and faults spread over ``span`` seconds, members joining at random
        times in the first half; then heal and run until the members agree."""
        scheduler = self.scheduler
        self.members[0].start()
        for member in self.members[1:]:
            scheduler.at(self.rng.uniform(0, span / 2), self._start_once(member))
        for _ in range(steps):
            action = self.random_write if self.rng.random() < 0.75 else self.random_fault
            scheduler.at(self.rng.uniform(0, span), action)
        scheduler.run_until(span)
        self.heal()
        for member in self.members:
            if not member.running:
                member.start()
        deadline = span + 120.0
        while (self.differences() or self.unsettled()) and self.now < deadline:
            scheduler.run_until(self.now + 1.0)

    def _start_again(self, member: SimMember) -> Callable[[], None]:
        incarnation = member.incarnation

        def start() -> None:
            if not member.running and member.incarnation == incarnation:
                member.start()

        return start

    def _start_once(self, member: SimMember) -> Callable[[], None]:
        def start() -> None:
            if not member.running and member.incarnation == 0:
                member.start()

        return start

    def expected(self) -> dict[str, Any]:
        kept = [op for key, op in self.made.items() if key not in self.lost]
        now_ms = min(member.wall_ns() for member in self.members) // 1_000_000
        return fold(kept, now_ms=now_ms)

    def differences(self) -> list[str]:
        """How the members differ from the model's fold (empty: they all equal it)."""
        expected = self.expected()
        found = []
        for member in self.members:
            member.advance()
            assert member.engine is not None
            difference = first_difference(member.engine.store.to_dict(), expected)
            if difference:
                found.append(f"m{member.index}: {difference}")
        return found

    def unsettled(self) -> list[str]:
        """What is still on its way once the members agree (empty: nothing): every link up,
        every snapshot asked for merged and none owed, no gaps, the logs forgotten (every
        peer reported it holds what they held), nobody declared down."""
        found = []
        for member in self.members:
            engine = member.engine
            assert engine is not None
            name = f"m{member.index}"
            if not engine.synced and member.incarnation > 1:
                found.append(f"{name} never merged a state")
            if engine.progress.gaps():
                found.append(f"{name} has gaps")
            if len(engine.log):
                found.append(f"{name} logs {len(engine.log)} operations")
            for peer in member.peers():
                if peer.connection is None or peer.snapshot_owed or peer.down:
                    found.append(f"{name}: {peer.name} {peer.snapshot.value}, down {peer.down}")
        return found

    def check(self) -> None:
        """Everything the run must end with (see the module docstring)."""
        # (All of them at once: what is unsettled often says why the trees differ.)
        problems = self.differences() + self.unsettled()
        # Clocks within clock_skew and well-formed frames: nothing may be refused.
        if self.refusals:
            problems.append("refused")
        assert not problems, self.report(problems)

    def report(self, problems: list[str]) -> str:
        steps = "\n  ".join(self.history[-40:])
        return (
            f"simulation failed, seed {self.seed}: replay with SIM_SEED={self.seed} "
            f"pytest tests/test_simulation.py -k replay\nproblems: {problems}\n"
            f"refusals: {self.refusals[-5:]}\nlast steps:\n  {steps}"
        )


def simulate(seed: int, **options: Any) -> World:
    """Run seed ``seed`` and check it; the world, for more checks."""
    settings = {
        name: options.pop(name)
        for name in ("size", "small_frames", "down_timeout")
        if name in options
    }
    return run_and_check(World(seed, **settings), **options)


W = TypeVar("W", bound=World)


def run_and_check(world: W, **options: Any) -> W:
    """Run ``world`` and check it; an unexpected exception fails with the run's report."""
    try:
        world.run(**options)
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(world.report([f"{type(exc).__name__}: {exc}"])) from exc
    world.check()
    return world


def seed_from_env(default: int) -> int:
    return int(os.environ.get("SIM_SEED", default))
