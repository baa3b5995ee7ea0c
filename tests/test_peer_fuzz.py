"""No single bad member can wedge a collective: frames of a member that passed its HELLO (a
buggy or older build, a corrupted stream, a member with the secret and bad intent), made by
changing one field of real frames (OPS, PROGRESS, SNAPSHOT, SNAPSHOT_END, SNAPSHOT_REQUEST,
MEMBERS), fed to a real engine without sockets (``peer_fuzz``).

Each frame is applied or refused with ``ProtocolError`` (nothing else escapes); a refused one
changes nothing (the replica and its metadata, the version vector, the log, what is staged);
and after any of them the engine still takes a good member's snapshot and operations and
converges with it, its own state exported whole. Valid frames delivered out of order,
repeated or lost, across connections, leave the replica as the reference model folds them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model import DELETE, INCREMENT, SET, Op, first_difference, fold
from peer_fuzz import (
    MAX_FRAME,
    MUTATIONS,
    Clock,
    Wire,
    hlc_at,
    make_engine,
    mutate,
    nasty_values,
    staged_of,
    state_of,
    sweep,
)
from profiles import examples

from gcollective._clock import NODE_BITS, STAMP_LIMIT
from gcollective._columns import full_paths
from gcollective._engine import Engine, Peer
from gcollective._errors import ProtocolError
from gcollective._wire import (
    FRAME_KINDS,
    MAX_SEQ,
    SNAPSHOT,
    SNAPSHOT_END,
    SNAPSHOT_REQUEST_FRAME,
    FrameDecoder,
    Hello,
    encode_members,
    encode_snapshot_end,
    parse_members,
)
from gcollective._wire_ops import parse_ops, path_segments

RECEIVER, GOOD, BAD = 0x1111, 0x2222, 0x3333

paths = st.sampled_from(
    [("a",), ("b",), ("a", "x"), ("a", "y"), ("c", "d", "e"), ("s", "k.1"), ("n",), ("d.e",)]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.text("ab", max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("xy", max_size=1), inner),
    max_leaves=5,
)
operations = st.one_of(
    st.tuples(st.just(SET), paths, json_values, st.sampled_from([0, 0, 60_000])),
    st.tuples(st.just(INCREMENT), paths, st.integers(-5, 5) | st.floats(-2, 2), st.just(0)),
    st.tuples(st.just(DELETE), paths, st.none(), st.just(0)),
)
batches = st.lists(st.lists(operations, min_size=1, max_size=20), min_size=1, max_size=4)


def write(engine: Engine, clock: Clock, batch: list[Any], made: list[Op] | None = None) -> None:
    """``engine``'s own operations, flushed as one batch (``made``: the model's record)."""
    for op, path, value, ttl_ms in batch:
        stamp = engine.clock.stamp()
        wire = list(path) if any("." in s for s in path) else ".".join(path)
        engine.apply_local(stamp, op, path, value, wire, ttl_ms)
        if made is not None:
            made.append(Op(stamp, op, path, value, ttl_ms or None))
    engine.flush(clock.now)


def valid_frames(bad: Engine, receiver: Engine, clock: Clock, writes: list[Any]) -> list[bytes]:
    """Real frames of ``bad`` to ``receiver``, made by its engine: OPS of each batch, a
    PROGRESS, a whole SNAPSHOT stream with its end, a SNAPSHOT_REQUEST and a MEMBERS frame."""
    wire = Wire(bad, receiver, clock)  # (just for ``bad``'s peer and what it queues)
    frames: list[bytes] = []
    for batch in writes:
        write(bad, clock, batch)
        frames += wire.outgoing()
    bad.resync(wire.peer, clock.now)
    frames += wire.outgoing()
    frames.append(bad.progress_frame(clock.now))
    frames.append(SNAPSHOT_REQUEST_FRAME)
    frames.append(encode_members([(BAD, "127.0.0.1", 7003, 0), (GOOD, "127.0.0.1", 7002, 1)]))
    wire.close()
    return [frame if frame.endswith(b"\n") else frame + b"\n" for frame in frames]


def three_engines(clock: Clock) -> tuple[Engine, Engine, Engine]:
    receiver = make_engine(RECEIVER, 7001, clock)
    # The shell checks a MEMBERS frame's entries when it reads one: so does this one.
    receiver.on_members = lambda inbound, message: parse_members(message, 8)
    return receiver, make_engine(GOOD, 7002, clock), make_engine(BAD, 7003, clock)


def connect(source: Engine, target: Engine, clock: Clock) -> Wire | None:
    """A new connection, or None if ``target`` refuses ``source``'s HELLO (as the shell
    does: an incarnation declared down)."""
    if source.node_id in target.down_ids:
        return None
    return Wire(source, target, clock)


def still_converges(receiver: Engine, good: Engine, clock: Clock) -> None:
    """``good`` joins ``receiver`` (its snapshot), both write, and each gets the other's
    operations: the whole trees end equal."""
    inbound, outbound = Wire(good, receiver, clock), Wire(receiver, good, clock)
    write(good, clock, [(SET, ("live", "good"), 1, 0)])
    write(receiver, clock, [(SET, ("live", "receiver"), 2, 0)])
    for _ in range(6):
        clock.advance(0.1)
        for wire in (inbound, outbound):
            wire.peer.progress_due = True
            wire.pump()
    assert receiver.store.get(("live", "good")) == 1
    assert good.store.get(("live", "receiver")) == 2
    assert good.synced
    difference = first_difference(receiver.store.to_dict(), good.store.to_dict())
    assert difference is None, difference


def deliver_checked(wire: Wire, data: bytes) -> bool:
    """Deliver ``data``: applied (True), or refused with ``ProtocolError`` having changed
    nothing (False). Anything else escaping fails the test."""
    receiver = wire.target
    before, staged = state_of(receiver), staged_of(wire.inbound)
    try:
        wire.deliver(data)
    except ProtocolError:
        after = state_of(receiver)
        assert after == before, "a refused frame changed the receiver"
        assert staged_of(wire.inbound) == staged
        wire.close()
        return False
    return True


actions = st.lists(
    st.tuples(
        st.integers(0, 1000),  # which frame
        st.sampled_from((None, *MUTATIONS)),  # how it is changed (None: not at all)
        st.integers(0, 10**6),  # where
        st.integers(0, 10**6),  # to what
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(own=batches, writes=batches, steps=actions)
def test_mutated_frames_are_applied_or_refused_and_never_wedge_the_receiver(
    own: list[Any], writes: list[Any], steps: list[Any]
) -> None:
    check_mutated_frames(own, writes, steps)


@pytest.mark.soak
@settings(max_examples=examples(3000), deadline=None, suppress_health_check=list(HealthCheck))
@given(own=batches, writes=batches, steps=actions)
def test_mutated_frames_soak(own: list[Any], writes: list[Any], steps: list[Any]) -> None:
    check_mutated_frames(own, writes, steps)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(own=batches, writes=batches, steps=actions)
def test_mutated_ops_frames_are_applied_or_refused_and_never_wedge_the_receiver(
    own: list[Any], writes: list[Any], steps: list[Any]
) -> None:
    """The same, OPS frames only: the frames every member reads most, their every column."""
    check_mutated_frames(own, writes, steps, only=b"[1,")


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(own=batches, writes=batches, steps=actions)
def test_mutated_snapshot_frames_are_applied_or_refused_and_never_wedge_the_receiver(
    own: list[Any], writes: list[Any], steps: list[Any]
) -> None:
    """The same, SNAPSHOT frames only (with ``valid_frames``' SNAPSHOT_END after them, which
    merges what they staged): each node's events, children, leaf columns and values."""
    check_mutated_frames(own, writes, steps, only=b"[2,", then=b"[3,")


def check_mutated_frames(
    own: list[Any],
    writes: list[Any],
    steps: list[Any],
    only: bytes = b"[",
    then: bytes | None = None,
) -> None:
    """``steps`` (frame, mutation, where, what) of ``bad``'s real frames (those starting
    with ``only``), mutated, to a receiver holding ``own``: each applied or refused without
    a trace, and the receiver still converges with a good member."""
    clock = Clock()
    receiver, good, bad = three_engines(clock)
    for batch in own:
        write(receiver, clock, batch)
    frames = valid_frames(bad, receiver, clock, writes)
    pool = [frame for frame in frames if frame.startswith(only)]
    ends = [frame for frame in frames if then is not None and frame.startswith(then)]
    nasty = nasty_values(clock, [RECEIVER, GOOD, BAD])
    wire = connect(bad, receiver, clock)
    for which, how, where, pick in steps:
        if wire is None:
            break  # refused for good (declared down)
        frame = pool[which % len(pool)]
        data = frame if how is None else mutate(frame, how, where, pick, nasty)
        # (A SNAPSHOT frame taken is followed by its stream's end, when ``then`` asks.)
        if not deliver_checked(wire, data) or (ends and not deliver_checked(wire, ends[0])):
            wire = connect(bad, receiver, clock)
        clock.advance(0.01)
        housekeep(receiver, clock)
    if wire is not None:
        wire.close()
    sweep(receiver, clock)  # (what it took, folded or forgotten, still travels)
    clock.advance(0.1)
    still_converges(receiver, good, clock)


def housekeep(engine: Engine, clock: Clock) -> None:
    """The shell's housekeeping round: the engine's, then the store's sweeps to the frontier
    it returns (which the frames it took moved: forged reports too)."""
    frontier = engine.housekeep(clock.now)
    engine.store.expire(frontier)
    while not engine.store.collect(frontier):
        pass


def applied_ops(frame: bytes) -> list[Op]:
    """The operations of a (valid) OPS frame, for the model."""
    _, _, stamps, ops, wire_paths, values, ttls, parent = parse_ops(json.loads(frame))
    return [
        Op(stamp, op, tuple(path_segments(path)), value, ttl or None)
        for stamp, op, path, value, ttl in zip(
            stamps, ops, full_paths(parent, wire_paths), values, ttls or [0] * len(ops)
        )
    ]


@settings(max_examples=examples(100), deadline=None)
@given(
    own=batches,
    writes=batches,
    order=st.lists(st.tuples(st.integers(0, 1000), st.booleans()), min_size=1, max_size=16),
)
def test_valid_frames_in_any_order_repeated_or_cut_fold_as_the_model(
    own: list[Any], writes: list[Any], order: list[tuple[int, bool]]
) -> None:
    """A member's real frames, in any order, some twice, the connection cut after some
    (``True``): each applied (or a repeat skipped), the replica as the model folds every
    operation delivered, and the receiver still converges with another member."""
    clock = Clock()
    receiver, good, bad = three_engines(clock)
    made: list[Op] = []
    for batch in own:
        write(receiver, clock, batch, made)
    pool = [
        frame
        for frame in valid_frames(bad, receiver, clock, writes)
        # (A stream's operations are in the OPS frames; its end, alone, would say they
        # are all applied.)
        if not frame.startswith((b"[%d," % SNAPSHOT, b"[%d," % SNAPSHOT_END))
    ]
    wire = connect(bad, receiver, clock)
    assert wire is not None
    for which, cut in order:
        frame = pool[which % len(pool)]
        wire.deliver(frame)
        if frame.startswith(b"[1,"):
            made += applied_ops(frame)
        if cut:
            wire.close()
            wire = connect(bad, receiver, clock)
            assert wire is not None
        clock.advance(0.01)
    difference = first_difference(receiver.store.to_dict(), fold(made))
    assert difference is None, difference
    wire.close()
    still_converges(receiver, good, clock)


@pytest.mark.parametrize(
    ("amount", "count"),
    [(1e308, 2), (-1e308, 3), (int("9" * 4299), 14)],
    ids=["float-past-max", "float-past-min", "int-past-4300-digits"],
)
def test_a_counter_summed_past_what_json_carries_still_travels_in_snapshots(
    amount: float | int, count: int
) -> None:
    """One frame of increments, each a number JSON carries, adding up to one it does not
    (an infinite float, an int of more than 4,300 digits): once the metadata sweep passed
    them, the holder's snapshot must still encode, and a joiner take it, as the model
    says (the sum kept as its increments: folded into one value, no snapshot could carry
    it, and no member could join from that holder any more)."""
    clock = Clock()
    receiver, good, bad = three_engines(clock)
    made: list[Op] = []
    write(receiver, clock, [(SET, ("other",), 1, 0)], made)
    wire = connect(bad, receiver, clock)
    assert wire is not None
    batch = [(INCREMENT, ("n",), amount, 0)] * count
    write(bad, clock, batch)
    for frame in wire.outgoing():
        wire.deliver(frame)
        if frame.startswith(b"[1,"):
            made += applied_ops(frame)
    wire.close()
    clock.advance(0.1)
    sweep(receiver, clock)
    clock.advance(0.1)
    difference = first_difference(receiver.store.to_dict(), fold(made))
    assert difference is None, difference
    still_converges(receiver, good, clock)


def test_a_snapshot_end_whose_vector_is_stamped_ahead_is_refused() -> None:
    """A SNAPSHOT_END's version vector becomes the receiver's: one stamped far ahead (a
    forged or corrupted one) would have it skip every operation of that origin below the
    stamp as a repeat, with no sequence clash to tell (their stamps are older), and pass
    that on in its own vector. Its stamps are checked against ``clock_skew`` as every other
    stamp received is: refused, nothing changed, and the origin's operations still arrive."""
    clock = Clock()
    receiver, good, bad = three_engines(clock)
    wire = connect(bad, receiver, clock)
    assert wire is not None
    ahead = (hlc_at(clock.wall // 1_000_000, 10_000) << NODE_BITS) | GOOD
    for vector in (
        [[GOOD, MAX_SEQ - 1, STAMP_LIMIT - 1]],
        [[BAD, 1, 5 << NODE_BITS], [GOOD, 9, ahead]],
    ):
        assert not deliver_checked(wire, encode_snapshot_end(vector))
        wire = connect(bad, receiver, clock)
        assert wire is not None
    assert GOOD not in receiver.progress.applied
    wire.close()
    still_converges(receiver, good, clock)


def test_snapshot_requests_repeated_before_the_stream_goes_out_make_one_stream() -> None:
    """A member (a buggy build) repeating SNAPSHOT_REQUEST, four bytes each: a stream lists
    every top-level key when it is made, so each one made anew cost the receiver that much
    (a read of 1000 requests, 2 s of its event loop at 100k keys). One made and not yet
    started serves them all; the peer gets one whole snapshot."""
    clock = Clock()
    receiver, _, bad = three_engines(clock)
    write(receiver, clock, [(SET, (f"k{index}",), index, 0) for index in range(300)])
    wire = connect(bad, receiver, clock)  # (it asks for a snapshot in its HELLO)
    assert wire is not None
    peer = receiver.peers[bad.advertise]
    assert snapshot_ends(sent_to(receiver, peer, clock)) == 1
    made = peer.snapshots_sent
    wire.deliver(SNAPSHOT_REQUEST_FRAME * 1000)
    assert peer.snapshots_sent == made + 1
    frames = sent_to(receiver, peer, clock)
    assert snapshot_ends(frames) == 1
    # And it is whole: a member that merges it holds the same.
    joiner = make_engine(0x4444, 7004, clock)
    inbound = joiner.connection_made(None, Hello(RECEIVER, "127.0.0.1", 7001, 0), clock.now)
    decoder = FrameDecoder(MAX_FRAME, kinds=FRAME_KINDS)
    joiner.receive(inbound, decoder.feed(b"".join(frames)), decoder.frames, clock.now)
    assert joiner.store.to_dict() == receiver.store.to_dict()


def sent_to(engine: Engine, peer: Peer, clock: Clock) -> list[bytes]:
    """What ``engine``'s writer to ``peer`` sends now, each frame with its newline."""
    frames: list[bytes] = []
    while True:
        batch, _ = engine.data_to_send(peer, clock.now)
        if not batch:
            return [frame if frame.endswith(b"\n") else frame + b"\n" for frame in frames]
        frames += batch


def snapshot_ends(frames: list[bytes]) -> int:
    return sum(frame.startswith(b"[%d," % SNAPSHOT_END) for frame in frames)
