"""Snapshots streamed in many frames while the holder keeps writing: members in this process."""

from __future__ import annotations

import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator

import gevent
import gevent.event
import pytest
from cluster import HubTicks, LocalMembers, NodeProcess, free_ports, wait_for
from faults import ProxiedMembers

from gcollective import Collective, _engine, _snapshots
from gcollective._clock import new_node_id
from gcollective._peerstate import Snapshot

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


@pytest.fixture
def small_frames(monkeypatch):
    """Snapshot frames of about 2 KB, so a small tree goes out in hundreds of them."""
    monkeypatch.setattr(_snapshots, "SNAPSHOT_FRAME_BYTES", 2048)


def test_a_snapshot_in_many_frames_under_writes_loses_nothing(small_frames):
    holder_port, joiner_port = free_ports(2)
    addresses = [f"127.0.0.1:{holder_port}", f"127.0.0.1:{joiner_port}"]
    holder = Collective(addresses[0], addresses, **FAST)
    holder.start(timeout=1)
    joiner = None
    try:
        for i in range(3000):
            holder.set(("t", str(i % 300), str(i)), i)  # many leaves under one top-level key
            holder.set((f"top{i % 500}", "n"), i)
        holder.incr("counter", 5)
        rng = random.Random(7)
        writing = True

        def keep_writing():
            # New keys, overwrites, deletes and increments on keys the stream has or has
            # not reached yet.
            step = 0
            while writing:
                step += 1
                key = f"top{rng.randrange(600)}"
                choice = rng.randrange(4)
                if choice == 0:
                    holder.set((key, "n"), -step)
                elif choice == 1:
                    holder.delete(key)
                elif choice == 2:
                    holder.incr("counter")
                else:
                    holder.set((key, "deep", str(step)), step)
                gevent.sleep(0.001)

        writer = gevent.spawn(keep_writing)
        joiner = Collective(addresses[1], addresses, **FAST)
        joiner.start(timeout=10)
        assert joiner.synced
        writing = False
        writer.join(5)
        wait_for(lambda: joiner.snapshot() == holder.snapshot(), timeout=20)
        link = holder.stats()["peers"][addresses[1]]
        assert link["snapshots_sent"] == 1
        assert link["sent_frames"] > 15  # it did go out in many frames
    finally:
        holder.stop(timeout=1)
        if joiner is not None:
            joiner.stop(timeout=1)


def test_a_stream_cut_by_a_lost_connection_starts_over(small_frames, monkeypatch):
    holder_port, joiner_port = free_ports(2)
    addresses = [f"127.0.0.1:{holder_port}", f"127.0.0.1:{joiner_port}"]
    holder = Collective(addresses[0], addresses, **FAST)
    holder.start(timeout=1)
    joiner = None
    cut: list[int] = []
    frames_of = _engine.Engine._snapshot_frames

    def cut_after_five(self, keys, end):
        # The first stream loses its connection after five frames went out.
        for number, frame in enumerate(frames_of(self, keys, end)):
            if number == 5 and not cut:
                cut.append(number)
                self.peers[("127.0.0.1", joiner_port)].drop_connection()
            yield frame

    monkeypatch.setattr(_engine.Engine, "_snapshot_frames", cut_after_five)
    try:
        for i in range(2000):
            holder.set((f"k{i}", "v"), i)
        joiner = Collective(addresses[1], addresses, **FAST)
        joiner.start(timeout=10)
        wait_for(lambda: joiner.snapshot() == holder.snapshot(), timeout=20)
        assert cut, "the stream was never cut"
        assert holder.stats()["peers"][addresses[1]]["snapshots_sent"] == 2
    finally:
        holder.stop(timeout=1)
        if joiner is not None:
            joiner.stop(timeout=1)


def test_an_owed_snapshot_is_settled_by_a_complete_report_and_catch_up_resumes() -> None:
    """A peer that reports complete has merged a snapshot, ours or another member's: ours is
    no longer owed even when its vector does not cover ours (the other snapshot lacked an
    origin only we held, say), and catch-up from the log takes over. (It used to stay owed
    for good: no catch-up for that peer, and a full snapshot again on every new connection.)"""
    members = LocalMembers(**FAST)
    try:
        a, b = members(2)
        link = a._links[b.local]
        wait_for(lambda: link.peer_id is not None and link.reports > 0 and b.synced)
        # As if b had asked a for a snapshot and then merged another member's instead.
        link.snapshot = Snapshot.OWED
        link.snapshot_vector = {new_node_id(): 5}
        sent = link.snapshots_sent
        link.wake.set()  # (the writer is due to run: the flush queues the frame, not sends it)
        a.set("missed", 1)
        a._flush_outbox()
        link.drop_pending()  # that frame never reaches b: only catch-up can bring it
        wait_for(lambda: not a.stats()["peers"][link.name]["snapshot_owed"])
        wait_for(lambda: b.get("missed") == 1)
        assert link.snapshots_sent == sent and link.relayed_frames > 0
    finally:
        members.stop()


def test_a_joiner_writes_after_what_its_snapshot_held() -> None:
    """A joiner's clock moves past the newest stamp of the snapshot it merges: its first write
    of a key it received wins, even when the holder's clock runs ahead of the joiner's (within
    clock_skew: further ahead, the snapshot would be refused, see tests/test_clock_skew.py)."""
    members = LocalMembers(**FAST, clock_skew=120)
    try:
        (holder,) = members(1)
        ahead = time.time_ns
        holder._clock._now = lambda: ahead() + 60 * 10**9  # a minute ahead of everyone
        for i in range(50):
            holder.set(f"deep.parent.k{i}", i)  # (leaves: they travel packed)
        holder.set("top", 1)
        joiner = members.join()
        wait_for(lambda: joiner.synced and joiner.get("top") == 1)
        joiner.set("deep.parent.k7", "mine")
        joiner.set("top", "mine")
        assert joiner.get("deep.parent.k7") == "mine" and joiner.get("top") == "mine"
        wait_for(lambda: holder.get("deep.parent.k7") == "mine" and holder.get("top") == "mine")
    finally:
        members.stop()


def _building_a_snapshot_frame() -> bool:
    """Whether the code running now (a GC callback's caller) is building a snapshot frame."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _snapshots.snapshot_frames.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("enabled", [True, False])
def test_a_holder_builds_snapshot_frames_without_the_gc_and_gives_its_setting_back(enabled):
    """Exporting and encoding a node of small dicts makes a mass of young lists: a collection
    triggered meanwhile walks them (and a full one the whole store) again and again, most of
    a holder's time for such a snapshot. The holder pauses the cyclic GC while it builds a
    frame, and leaves it as the app had it."""
    holder_port, joiner_port = free_ports(2)
    addresses = [f"127.0.0.1:{holder_port}", f"127.0.0.1:{joiner_port}"]
    holder = Collective(addresses[0], addresses, **FAST)
    holder.start(timeout=1)
    joiner = None
    during_frames: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start" and _building_a_snapshot_frame():
            during_frames.append(info["generation"])

    was = gc.isenabled()
    try:
        for i in range(6000):
            holder.set((f"g{i % 3}", f"s{i % 60}", str(i)), {"n": i, "tag": "x"})
        if not enabled:
            gc.disable()
        gc.callbacks.append(record)
        joiner = Collective(addresses[1], addresses, **FAST)
        joiner.start(timeout=30)
        assert joiner.synced
        gc.callbacks.remove(record)
        assert joiner.get(("g2", "s59", "5999")) == {"n": 5999, "tag": "x"}
        assert joiner.snapshot() == holder.snapshot()
        assert during_frames == []  # (thousands of lists per frame: many without the pause)
        assert gc.isenabled() is enabled
    finally:
        if record in gc.callbacks:
            gc.callbacks.remove(record)
        if was:
            gc.enable()
        if joiner is not None:
            joiner.stop()
        holder.stop()


def _snapshots_sent_to(member: Collective, address: str) -> int:
    return sum(
        peer["snapshots_sent"] for name, peer in member.stats()["peers"].items() if address in name
    )


def test_a_joiner_waits_for_a_long_snapshot_that_keeps_coming(small_frames, monkeypatch):
    """A joiner asks another peer for a snapshot when the one it asked does not answer; not
    when that one is answering, only at length: a second holder would export and send it all
    again, sharing the CPU with the first, and the joiner would merge both."""
    patience = 0.3
    monkeypatch.setattr(_engine, "SNAPSHOT_PATIENCE", patience)
    frames_of = _engine.Engine._snapshot_frames
    frames_sent: list[int] = []

    def slow_frames(self, keys, end):
        # Each frame comes a while after the last: the whole snapshot takes several patiences
        # however fast this machine is (a fast one once sent it all within three).
        for frame in frames_of(self, keys, end):
            frames_sent.append(1)
            gevent.sleep(patience / 10)
            yield frame

    monkeypatch.setattr(_engine.Engine, "_snapshot_frames", slow_frames)
    options = {"sync_interval": patience / 10, "backoff_max": 0.2}
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    holder = Collective(addresses[0], addresses[:2], **options)
    holder.start(timeout=1)
    other = joiner = None
    try:
        for i in range(800):
            holder.set((f"g{i % 20}", f"s{i % 100}", str(i)), {"n": i, "tag": "x"})
        other = Collective(addresses[1], addresses[:2], **options)
        other.start(timeout=60)
        assert other.synced
        frames_sent.clear()
        began = time.monotonic()
        joiner = Collective(addresses[2], addresses, **options)
        joiner.start(timeout=60)
        assert joiner.synced
        # (A snapshot that came within the patience proves nothing.)
        assert len(frames_sent) >= 40  # (each a tenth of the patience after the last)
        assert time.monotonic() - began > 3 * patience
        sent = [_snapshots_sent_to(member, addresses[2]) for member in (holder, other)]
        assert sorted(sent) == [0, 1]
        assert joiner.snapshot() == holder.snapshot()
    finally:
        for member in (joiner, other, holder):
            if member is not None:
                member.stop()


def test_a_snapshot_to_a_synced_peer_that_fell_behind_is_not_restarted_by_its_reports(
    small_frames, monkeypatch
):
    """A synced peer whose queue overflowed gets a snapshot; it keeps reporting (complete,
    as a synced member always does) while the snapshot streams. Each report used to start
    the stream over (the report settled it, and the catch-up then found too much to resend
    from the log): a stream longer than the report interval never finished, and the peer
    never caught up (CI saw it once, on a loaded machine, in test_hostile.py)."""
    frames_of = _engine.Engine._snapshot_frames
    streams: list[int] = []

    def slow_frames(self, keys, end):
        streams.append(1)
        for frame in frames_of(self, keys, end):
            gevent.sleep(0.01)  # longer than the report interval, whatever the machine
            yield frame

    monkeypatch.setattr(_engine.Engine, "_snapshot_frames", slow_frames)
    members = LocalMembers(sync_interval=0.02, backoff_max=0.2, max_queue_bytes=64 * 1024)
    try:
        writer, behind = members(2)
        wait_for(lambda: writer.synced and behind.synced)
        streams.clear()
        for i in range(2000):  # ~260 KB at once: the queue to ``behind`` overflows
            writer.set(("k", str(i)), "x" * 100)
        wait_for(lambda: behind.get(("k", "1999")) == "x" * 100, timeout=30)
        wait_for(lambda: behind.snapshot() == writer.snapshot(), timeout=30)
        assert 1 <= len(streams) <= 3, len(streams)
    finally:
        members.stop()


def _churn_one_top_level_key(holder: Collective, rng: random.Random, step: int) -> None:
    """One operation under "sessions", on a key the stream has or has not reached yet: a new
    key, an overwrite, a delete, an increment, a leaf replaced by a subtree, a subtree by a
    leaf, a subtree deleted or made anew."""
    group = ("sessions", f"u{rng.randrange(20)}")
    leaf = (*group, "n", str(rng.randrange(200)))
    choice = rng.randrange(8)
    if choice == 0:
        holder.set(("sessions", f"s{rng.randrange(1200)}"), step)
    elif choice == 1:
        holder.delete(("sessions", f"s{rng.randrange(1200)}"))
    elif choice == 2 and type(holder.get(leaf, 0)) is int:
        holder.incr(leaf)  # (a leaf becomes a counter; only a number can be incremented)
    elif choice in (2, 3):
        holder.set(leaf, {"user": step, "seen": {"at": step}})
    elif choice == 4:
        holder.delete(leaf)
    elif choice == 5:
        holder.set(leaf, step)
    elif choice == 6:
        holder.set((*group, "n", f"new{step}"), step)
    elif rng.random() < 0.01:
        holder.set(("sessions", "u0"), -step)  # (a whole subtree replaced by a leaf, at times)
    else:
        holder.set((*leaf, "deeper"), step)


def test_a_joiner_syncs_while_one_long_top_level_key_keeps_changing(small_frames, monkeypatch):
    """A top-level key much longer than a frame goes out in pieces over many frames while
    the holder keeps writing, deleting and replacing under it (leaves by subtrees, subtrees
    by leaves): each piece is read from the store when its frame is built, so the stream
    goes through once and the joiner ends equal. (The item used to be exported once and
    encoded lazily from the store's own dicts: a change between two of its frames broke the
    writer, KeyError or TypeError, and the stream failed and started over for as long as
    writes went on.)"""
    frames_of = _engine.Engine._snapshot_frames

    def frames_of_a_busy_holder(self, keys, end):
        # The hub runs other greenlets between two frames, as it does whenever the socket's
        # buffer is full (a joiner that reads slower than the holder builds frames).
        for frame in frames_of(self, keys, end):
            gevent.sleep(0.001)
            yield frame

    monkeypatch.setattr(_engine.Engine, "_snapshot_frames", frames_of_a_busy_holder)
    members = LocalMembers(**FAST)
    try:
        (holder,) = members(1)
        # Plain leaves at first (the bulk of a big tree: exported as the store holds them),
        # and a subtree of them.
        for i in range(1000):
            holder.set(("sessions", f"s{i}"), i)
        for j in range(20):
            holder.set(("sessions", f"u{j}"), {"n": {str(i): i for i in range(200)}})
        rng = random.Random(11)
        writing = True

        def keep_writing() -> None:
            step = 0
            while writing:
                step += 1
                _churn_one_top_level_key(holder, rng, step)
                gevent.sleep(0.0002)  # (a few operations between two frames)

        writer = gevent.spawn(keep_writing)
        joiner = members.join()
        wait_for(lambda: joiner.synced, timeout=60)
        writing = False
        writer.join(5)
        wait_for(lambda: joiner.snapshot() == holder.snapshot(), timeout=30)
        stats = holder.stats()
        assert stats["internal_errors"] == 0, stats["last_internal_error"]
        assert _snapshots_sent_to(holder, members.addresses[-1]) == 1
        sent = sum(peer["sent_frames"] for peer in stats["peers"].values())
        assert sent > 20  # (it did go out in many frames, under the writes)
    finally:
        members.stop()


def _paused_at_a_frame(
    number: int, halfway: gevent.event.AsyncResult, resume: gevent.event.Event
) -> Callable[..., Iterator[bytes]]:
    """An ``Engine._snapshot_frames`` whose first stream to reach its frame ``number`` sets
    ``halfway`` to its engine and waits for ``resume`` before it goes on: the pieces of the
    frames after are read from the store as it is then."""
    frames_of = _engine.Engine._snapshot_frames

    def frames_paused(self, keys, end):
        for index, frame in enumerate(frames_of(self, keys, end)):
            if index == number and not halfway.ready():
                halfway.set(self)
                resume.wait(60)
            yield frame

    return frames_paused


@pytest.mark.parametrize("path", [("t", "d"), ("t",)], ids=["the dict", "the dict above it"])
def test_a_dict_assigned_anew_while_it_goes_in_frames_reaches_a_joiner_whole(
    small_frames, monkeypatch, path
):
    """A long dict goes to a joiner in many frames; between two of them, another member
    assigns it (or the dict above it, with one more key) anew, the same members at a later
    stamp, and its operation reaches the joiner after the snapshot (its link to the joiner
    held back): the joiner ends equal. (The frames after said the node was assigned at that
    stamp, holding only some of its members: the joiner took the stamp for the whole
    assignment and dropped the operation when it came, losing the members sent before, and
    the key above.)"""
    halfway = gevent.event.AsyncResult()
    resume = gevent.event.Event()
    members = ProxiedMembers(3, **FAST)
    try:
        holders = members.nodes[:2]
        members_of_d = {f"k{i}": i for i in range(2000)}
        value = members_of_d if path == ("t", "d") else {"d": members_of_d, "y": 1}
        holders[0].set(("t", "d"), members_of_d)
        others = members.nodes[1:]
        wait_for(lambda: all(node.get(("t", "d", "k1999")) == 1999 for node in others), timeout=30)
        members.nodes[2].stop(timeout=1)  # back later, empty: it joins by snapshot
        proxy = members.proxies[2]
        wait_for(lambda: not any(proxy.linked(port) for port in members.public[:2]), timeout=30)
        monkeypatch.setattr(
            _engine.Engine, "_snapshot_frames", _paused_at_a_frame(5, halfway, resume)
        )

        def assign_anew_halfway() -> tuple[Collective, Collective, int]:
            streaming = halfway.get()
            (holder,) = [node for node in holders if node._engine is streaming]
            (writer,) = [node for node in holders if node is not holder]
            source = members.public[members.nodes.index(writer)]
            # (Once its link to the joiner is up: a proxy forwards a link's first bytes, its
            # HELLO and maybe more, before it knows where they come from.)
            wait_for(lambda: proxy.linked(source) > 0, timeout=30)
            proxy.hold(source)  # (its operation reaches the joiner after the snapshot)
            writer.set(path, value)
            writer.set("after", 1)
            wait_for(lambda: holder.get("after") == 1, timeout=30)
            resume.set()
            return holder, writer, source

        assigning = gevent.spawn(assign_anew_halfway)
        members.nodes[2] = joiner = members.make(2)
        holder, writer, source = assigning.get(timeout=60)
        wait_for(lambda: joiner.synced, timeout=60)
        proxy.release(source)  # (what was held goes with what it sends next)
        writer.set("last", 1)
        wait_for(lambda: joiner.get("last") == 1, timeout=30)
        wait_for(lambda: joiner.snapshot() == holder.snapshot(), timeout=20)
        assert holder.get(path) == value
        assert _snapshots_sent_to(holder, f"127.0.0.1:{members.public[2]}") == 1
    finally:
        resume.set()
        members.close()


def test_a_stream_whose_holder_dies_before_its_end_leaves_nothing_behind(monkeypatch):
    """A joiner gets a snapshot's frames from a holder, which then dies before SNAPSHOT_END;
    the joiner merges another member's state instead. The frames carried a write that only
    the dead holder had (its link to the other member was cut): merged as they came, that
    write lived on in the joiner alone, beyond its version vector, so no catch-up ever sent
    it on and the two members never converged. A stream's frames are now merged at its end:
    the write is lost with its only holder, everywhere alike.

    (The write must reach the joiner in the stream alone. It is queued at the holder for the
    joiner's address too, and a holder's link that reached the new joiner before its HELLO
    reached the holder brought it as an operation: the joiner kept it and relayed it to the
    other, as it must, and the test failed once in CI. So the holder's links reach the
    joiner only once the stream replaced that queue.)"""
    members = ProxiedMembers(3, **FAST)
    joiner = None
    try:
        holder, other, old_joiner = members.nodes
        public = members.public
        joiner_address = f"127.0.0.1:{public[2]}"
        holder.set("shared", 1)
        wait_for(lambda: other.get("shared") == old_joiner.get("shared") == 1, timeout=30)
        old_joiner.stop(timeout=1)  # back later, empty: it joins by snapshot
        members.proxies[1].cut(public[0])  # the holder's writes no longer reach the other
        members.proxies[1].cut(public[2], require=False)  # nor can the joiner reach it, or
        members.proxies[2].cut(public[1], require=False)  # it reach the joiner, for now
        members.proxies[2].cut(public[0], require=False)  # (the holder's link: see above)
        holder.set(("only", "holder"), 2)
        streams_before = _snapshots_sent_to(holder, joiner_address)
        frames_of = _engine.Engine._snapshot_frames

        def without_its_end(self, keys, end):
            for frame in frames_of(self, keys, end):
                if self is holder._engine and frame is end:
                    return  # (the holder dies before it sends SNAPSHOT_END)
                yield frame

        monkeypatch.setattr(_engine.Engine, "_snapshot_frames", without_its_end)
        received = gevent.event.Event()
        receive_snapshot = _engine.Engine._receive_snapshot

        def noting_frames(self, message, frame, *args):
            result = receive_snapshot(self, message, frame, *args)
            if joiner is not None and self is joiner._engine and b'"only"' in frame:
                received.set()  # (a frame carrying the write)
            return result

        monkeypatch.setattr(_engine.Engine, "_receive_snapshot", noting_frames)
        joiner = Collective(
            ("127.0.0.1", members.real[2]),
            [("127.0.0.1", port) for port in public],
            advertise=("127.0.0.1", public[2]),
            **FAST,
        )
        members.nodes[2] = joiner
        starting = gevent.spawn(joiner.start, timeout=60)
        wait_for(lambda: _snapshots_sent_to(holder, joiner_address) > streams_before, timeout=30)
        # Its stream replaced what was queued; a connection made before, with what was queued
        # then, may still wait in the proxy. The holder dials one at a time, each after the
        # last was refused: once one is refused from now on, none made before is left.
        refused = members.proxies[2].refused_from[public[0]]
        wait_for(lambda: members.proxies[2].refused_from[public[0]] > refused, timeout=30)
        members.proxies[2].heal(public[0])
        assert received.wait(30), "the holder's frames never reached the joiner"
        assert not joiner.synced
        assert joiner.received_ops == 0  # (the write came in the stream, not as an operation)
        holder.stop(timeout=1)
        members.proxies[1].heal(public[2])  # (the dead holder's bytes stay cut)
        members.proxies[2].heal()
        wait_for(lambda: joiner.synced, timeout=30)
        starting.join(timeout=30)
        assert other.get(("only", "holder")) is None  # (it reached nobody but the holder)
        wait_for(
            lambda: joiner.snapshot() == other.snapshot(),
            timeout=10,
            what="the joiner holds what the other member holds",
        )
        assert joiner.get("shared") == 1
    finally:
        members.close()


def test_a_joiner_merges_a_big_state_without_holding_the_hub(monkeypatch):
    """A stream is merged at its SNAPSHOT_END (see the test above), from the reader's
    event-loop callback, which cannot yield: in one go, the hub was held for the whole
    state's merge (here, with a watch on everything, 0.45-1.2 s) and every other
    greenlet of the joiner's process stalled. The merge now runs in slices of a frame's items
    from a greenlet: a greenlet ticking in the joiner's process never waits much longer than a
    frame's work."""
    # (Frames of 64 KiB: a frame's work, exporting and checking it, is a few ms here.)
    monkeypatch.setattr(_snapshots, "SNAPSHOT_FRAME_BYTES", 64 * 1024)
    holder_port, joiner_port = free_ports(2)
    addresses = [f"127.0.0.1:{holder_port}", f"127.0.0.1:{joiner_port}"]
    holder = Collective(addresses[0], addresses)
    holder.start(timeout=0.5)
    joiner = None
    was_enabled = gc.isenabled()
    try:
        keys = 500_000  # (about 0.5-1 s of merge in one go, with the watch below)
        for i in range(keys):
            holder.set(f"g{i // 10_000}.s{(i // 100) % 100}.k{i % 100}", i)

        # (The collector's full passes over the new objects hold the hub too, as long as
        # they like: measure ours alone.)
        gc.collect()
        gc.disable()
        ticks = HubTicks()
        joiner = Collective(addresses[1], addresses)
        joiner.watch("", lambda *event: None)  # (a merge tells it every difference)
        joiner.start(timeout=60)
        wait_for(lambda: joiner.synced, timeout=60)
        # (In CPU time: on a loaded machine the process also waits for a core, for longer
        # than a slice's work, and that is not a hold of the hub.)
        longest = ticks.longest(cpu=True)
        if was_enabled:
            gc.enable()
        assert joiner.get("g49.s99.k99") == keys - 1
        assert longest < 0.15, sorted(ticks.cpu_gaps)[-5:]  # (0.29-0.69 s in one go; 0.05 now)
    finally:
        if was_enabled:
            gc.enable()
        holder.stop(timeout=1)
        if joiner is not None:
            joiner.stop(timeout=1)


def test_a_member_stopped_while_it_merges_a_stream_never_says_it_merged(monkeypatch):
    """``stop()`` between two slices of a stream's merge ends the merge there: the member
    never counts the stream merged, nor says it is synced, and nothing fails."""
    monkeypatch.setattr(_snapshots, "SNAPSHOT_FRAME_BYTES", 64 * 1024)
    holder_port, joiner_port = free_ports(2)
    addresses = [f"127.0.0.1:{holder_port}", f"127.0.0.1:{joiner_port}"]
    holder = Collective(addresses[0], addresses)
    holder.start(timeout=0.5)
    try:
        for i in range(200_000):
            holder.set(f"g{i // 10_000}.s{(i // 100) % 100}.k{i % 100}", i)
        joiner = Collective(addresses[1], addresses)
        joiner.watch("", lambda *event: None)  # (a slower merge: more slices to stop in)
        starting = gevent.spawn(joiner.start, timeout=60)
        wait_for(lambda: joiner._engine.merges_due, timeout=60, interval=0.001)
        joiner.stop(timeout=1)
        starting.join(timeout=10)
        assert starting.successful()
        assert joiner._engine.merges_due  # (stopped before its end)
        assert not joiner.synced and joiner.snapshots_merged == 0
        assert joiner.internal_errors == 0
    finally:
        holder.stop(timeout=1)


def test_a_staged_stream_holds_no_more_than_the_state_it_becomes(monkeypatch):
    """A joiner stages a stream's frames until its SNAPSHOT_END (see above): what it holds
    then is about what the merged state holds after, not more (traced by tracemalloc in the
    joiner's process, the holder in its own: steady where RSS is not). Staged as decoded,
    each leaf's packed stamp stayed an int object in a list until the end: 1.3x the merged
    state, and the joiner's RSS after a join ~35 bytes a key more than when frames merged
    as they came (the ``join`` benchmark: 191 instead of 156).

    (The holder does not know the joiner's address before it connects: it queued its writes
    for that address otherwise, and a holder's link that reached the joiner before its HELLO
    reached the holder brought them all as operations, applied before the stream ended: the
    process then held the state twice over, staged 291 B/key against 174 merged, and the
    test failed once in CI, and twice in 40 runs at load 10-15; every time with the joiner's
    first dial delayed 3 s: 200,000 operations received, 285-292 B/key staged.)"""
    keys, parents = 200_000, 20
    holder_port, joiner_port = free_ports(2)
    holder = NodeProcess(holder_port, [holder_port])  # (the joiner is met when it connects)
    joiner = None
    at_the_end: list[int] = []
    receive_end = _engine.Engine._receive_snapshot_end

    def noting_what_is_staged(self, *args):
        if not at_the_end:
            gc.collect()
            at_the_end.append(tracemalloc.get_traced_memory()[0])
        return receive_end(self, *args)

    monkeypatch.setattr(_engine.Engine, "_receive_snapshot_end", noting_what_is_staged)
    tracemalloc.start()
    try:
        holder.start(timeout=0.5)
        for parent in range(parents):
            holder.call("write_keys", prefix=f"g{parent}", count=keys // parents, flat=True)
        joiner = Collective(f"127.0.0.1:{joiner_port}", holder.peers)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        joiner.start(timeout=60)
        wait_for(lambda: joiner.synced, timeout=60)
        assert joiner.get(f"g{parents - 1}.{keys // parents - 1}") == keys // parents - 1
        assert joiner.received_ops == 0  # (all of it came in the stream)
        gc.collect()
        merged = tracemalloc.get_traced_memory()[0] - before
        staged = at_the_end[0] - before
        assert staged < 1.1 * merged, (staged / keys, merged / keys)
    finally:
        tracemalloc.stop()
        holder.stop()
        if joiner is not None:
            joiner.stop(timeout=1)
