"""The deterministic simulation (tests/simulation.py) with members restarted from their disk
(issue 22): the convergence contract holds across restarts, including a crash between two
writes to disk (what was applied since the last write is lost, unless a peer holds it).

The disk is the one ``_durable`` keeps, in memory: the frames the engine applied (its
``on_applied`` hook), appended every ``FLUSH_INTERVAL`` (at random moments on top: a loaded
machine), now and then a checkpoint (``_durable.checkpoint_stream``: the member's snapshot
stream, its root's plain leaves in columns, appended a frame at a time while the member runs
on, then the older rows deleted); a restart replays it through
``Durability``'s own replay before the member dials anyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from simulation import SimMember, World, run_and_check, seed_from_env

from gcollective._durable import _KEPT, FLUSH_INTERVAL, Durability, checkpoint_stream


class DiskMember(SimMember):
    """A member with a data_dir: its disk survives its incarnations."""

    def __init__(self, world: World, index: int) -> None:
        super().__init__(world, index)
        self.rows: list[tuple[int, bytes]] = []  # (id, frame): the table
        self.next_id = 1
        self.unwritten: list[bytes] = []
        self.checkpoint: tuple[Any, int] | None = None  # (its frames to come, its first id)
        # The operations whose effect the disk holds (everything held at the last write).
        self.disk_holds: set[tuple[int, int]] = set()

    def start(self) -> None:
        super().start()  # a new incarnation; its dials are scheduled, none happened yet
        engine = self.engine
        assert engine is not None
        self.unwritten = []
        self.checkpoint = None
        if self.rows:
            replayer = Durability("(simulated)", "interval")
            for begin in range(0, len(self.rows), 16):
                chunk = [frame for _, frame in self.rows[begin : begin + 16]]
                replayer._replay(chunk, engine, _inbound())
            self.also_holds = set(self.disk_holds)
        engine.on_applied = self.keep
        self.world.scheduler.after(FLUSH_INTERVAL, lambda: self.write_disk(self.incarnation))

    def keeps(self, origin: int, seq: int) -> bool:
        """Whether the operation survives this member: it holds it, or, while it is down,
        its disk does (it comes back with it)."""
        if self.running:
            return self.holds(origin, seq)
        return (origin, seq) in self.disk_holds

    def wipe(self) -> None:
        self.rows = []
        self.disk_holds = set()

    def keep(self, frame: bytes) -> None:
        if frame[:3] in _KEPT:
            self.unwritten.append(frame[:-1] if frame[-1:] == b"\n" else frame)

    def append(self, frames: list[bytes]) -> int:
        first = self.next_id
        for frame in frames:
            self.rows.append((self.next_id, frame))
            self.next_id += 1
        return first

    def write_disk(self, incarnation: int) -> None:
        """The writer: one transaction of what was applied, a checkpoint's next frame."""
        if not self.running or incarnation != self.incarnation:
            return
        engine = self.engine
        assert engine is not None
        # (As ``Durability._checkpoint``: a checkpoint's first frame goes before anything
        # applied after its vector was taken, and every row before it was applied before.)
        self.step_checkpoint()
        if self.unwritten:
            self.append(self.unwritten)
            self.unwritten = []
        own_flushed = engine.seq
        self.disk_holds = {
            key
            for key in self.world.made
            if self.holds(*key) and not (key[0] == engine.node_id and key[1] > own_flushed)
        }
        delay = FLUSH_INTERVAL + self.world.rng.choice([0.0, 0.0, 0.01, 0.2])
        self.world.scheduler.after(delay, lambda: self.write_disk(incarnation))

    def step_checkpoint(self) -> None:
        engine = self.engine
        assert engine is not None
        if self.checkpoint is None:
            if self.world.rng.random() < 0.1:
                if self.unwritten:
                    self.append(self.unwritten)
                    self.unwritten = []
                stream = checkpoint_stream(engine, self.world.now)
                self.checkpoint = (stream, self.next_id)
            return
        stream, first = self.checkpoint
        frame = next(stream, None)
        while frame == b"":  # (no frame: a pause)
            frame = next(stream, None)
        if frame is None:
            self.rows = [(row_id, kept) for row_id, kept in self.rows if row_id >= first]
            self.checkpoint = None
            return
        self.append([frame[:-1] if frame[-1:] == b"\n" else frame])


def _inbound() -> Any:
    from gcollective._peerstate import Inbound

    return Inbound(None, 0, {})


@dataclass
class DiskWorld(World):
    """A run whose crashes restart members from their disk (sometimes with it lost), and
    once a whole-cluster crash."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.members = [DiskMember(self, index) for index in range(self.size)]

    def restart_empty(self, member: SimMember) -> None:
        assert isinstance(member, DiskMember)
        if not member.running:
            return
        if self.rng.random() < 0.2:
            member.wipe()  # the directory lost too: it comes back empty
        self.crash(member)
        self.scheduler.after(self.rng.uniform(0.05, 1.0), self._start_again(member))

    def crash(self, member: DiskMember) -> None:
        """Killed between two writes: what it held and nobody else keeps is lost unless on
        its disk."""
        others = [other for other in self.members if other is not member]
        for key in self.made:
            if key not in self.lost and member.holds(*key) and key not in member.disk_holds:
                if not any(isinstance(o, DiskMember) and o.keeps(*key) for o in others):
                    self.lost.add(key)
        self.history.append(f"{self.now:.3f} crash m{member.index} ({len(member.rows)} rows)")
        member.stop()

    def crash_all(self) -> None:
        """Every member killed at once, then started again from its disk."""
        members = [m for m in self.members if isinstance(m, DiskMember)]
        running = [m for m in members if m.running]
        for key in self.made:
            # (A member down already comes back with its disk too.)
            on_a_disk = any(m.keeps(*key) and key in m.disk_holds for m in members)
            if key not in self.lost and not on_a_disk and any(m.holds(*key) for m in running):
                self.lost.add(key)
        self.history.append(f"{self.now:.3f} crash all")
        for member in running:
            member.stop()
        for member in running:
            self.scheduler.after(self.rng.uniform(0.05, 1.0), self._start_again(member))

    def run(self, steps: int = 60, span: float = 6.0) -> None:
        self.scheduler.at(self.rng.uniform(span / 3, span), self.crash_all)
        super().run(steps, span)


def simulate_with_disk(seed: int) -> DiskWorld:
    return run_and_check(DiskWorld(seed))


SEEDS = range(120)


@pytest.mark.parametrize("seed", SEEDS)
def test_restarts_from_disk_converge_and_lose_only_what_no_disk_held(seed: int) -> None:
    simulate_with_disk(seed)


def test_replay_a_seed() -> None:
    simulate_with_disk(seed_from_env(1))


def test_without_the_replay_the_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks the check: members that come back without replaying their disk lose what the
    accounting says their disk held, and the run fails."""
    monkeypatch.setattr(Durability, "_replay", lambda self, frames, engine, inbound: None)
    failed = 0
    for seed in range(10):
        try:
            simulate_with_disk(seed)
        except AssertionError:
            failed += 1
    assert failed >= 5
