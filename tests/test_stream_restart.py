"""A snapshot asked for again while its stream is part-way out (the joiner heard nothing of
it for ``SNAPSHOT_PATIENCE``: a holder starved of CPU) starts over on a new connection, not
after the old stream's frames on the same one: a joiner stages a connection's SNAPSHOT frames
until their SNAPSHOT_END, so it would hold both streams at once, up to twice the state (seen
once in CI: 291 against 174 B/key). The holder's engine alone, without I/O (its hooks are
what the shell plays: ``drop_connection`` ends the connection, ``stream_lost`` and
``link_up`` follow)."""

from __future__ import annotations

from engines import new_engine

from gcollective._engine import Engine, Peer
from gcollective._store import SET, Store
from gcollective._wire import SNAPSHOT, SNAPSHOT_END

WALL_NS = 1_800_000_000 * 10**9
KEYS = 200  # a state of several SNAPSHOT frames at ``max_frame`` 1024


class RecordingPeer(Peer):
    """A peer whose connection ends when the engine asks (as ``_PeerLink``'s, at once)."""

    drops = 0

    def drop_connection(self) -> None:
        self.drops += 1


def holder() -> Engine:
    node_id = 7
    store = Store()
    for index in range(KEYS):
        store.apply((1 << 80) + index, SET, ("sessions", f"s{index:03d}"), {"u": index})
    return new_engine(node_id, lambda: WALL_NS, store=store, max_frame=1024, down_timeout=0.0)


def snapshot_frames(engine: Engine, peer: Peer, now: float, most: int = 10_000) -> list[bytes]:
    """The SNAPSHOT and SNAPSHOT_END frames the writer takes, up to ``most`` turns (until
    nothing is left, as the writer does)."""
    frames: list[bytes] = []
    for _ in range(most):
        batch, _ = engine.data_to_send(peer, now)
        if not batch:
            break
        frames += [
            frame
            for frame in batch
            if frame.startswith(b"[%d," % SNAPSHOT) or frame.startswith(b"[%d," % SNAPSHOT_END)
        ]
    return frames


def test_a_stream_asked_again_part_way_starts_over_on_a_new_connection() -> None:
    engine = holder()
    peer = RecordingPeer(("127.0.0.1", 7001), 0.0, engine.max_queue_bytes)
    engine.add_peer(peer)
    engine.link_up(peer, 0.0)
    engine.resync(peer, 0.0)  # (as a SNAPSHOT_REQUEST makes it)
    whole = snapshot_frames(engine, peer, 0.0)  # (sent whole)
    assert len(whole) > 4 and whole[-1].startswith(b"[%d," % SNAPSHOT_END)
    assert peer.drops == 0

    engine.resync(peer, 1.0)  # asked again: it streams again on this connection
    assert peer.drops == 0  # (the last stream ended: the peer staged nothing of it)
    part = snapshot_frames(engine, peer, 1.0, most=2)
    assert 0 < len(part) < len(whole)

    engine.resync(peer, 7.0)  # asked again part-way
    assert peer.drops == 1  # the connection that carries the part ends
    engine.stream_lost(peer)  # (the writer's send failed: what the shell does then)
    engine.link_up(peer, 7.5)  # the next connection streams it from its start
    again = snapshot_frames(engine, peer, 7.5)
    assert len(again) == len(whole) and again[-1].startswith(b"[%d," % SNAPSHOT_END)
    assert peer.drops == 1


def test_a_stream_asked_again_before_its_first_frame_keeps_the_connection() -> None:
    engine = holder()
    peer = RecordingPeer(("127.0.0.1", 7001), 0.0, engine.max_queue_bytes)
    engine.add_peer(peer)
    engine.link_up(peer, 0.0)
    engine.resync(peer, 0.0)
    engine.resync(peer, 0.5)  # nothing of the first went out: nothing to undo
    assert peer.drops == 0
    frames = snapshot_frames(engine, peer, 0.5)
    assert frames[-1].startswith(b"[%d," % SNAPSHOT_END)
