"""Property tests: convergence holds under the clock-skew rule (see tests/test_clock_skew.py
for the same rule between real members).

Replicas are the real sans-IO parts, a ``HybridClock`` on a fake wall clock of its own and a
``Store``, exchanging operations the way members do, with the node's rule: a receiver
refuses an operation, or a sender whose clock (its promise), is more than ``clock_skew``
ahead of its own wall clock. Some wall clocks run beyond ``clock_skew`` of the others, and
forged stamps come in. Meanwhile no clock ever runs more than ``clock_skew`` ahead of its own
wall (so ttls fire at most that late, and no stamp outgrows the wire); once the clocks are
fixed, every refused operation gets through, every replica equals the reference fold of
every operation made, expiries included, and the metadata sweep leaves no tombstone.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_store_property import (
    Op,
    _settings,
    assert_tree,
    deliver,
    fold,
    narrow_paths,
    new_store,
    paths,
    ttl_bodies,
)

from gcollective._clock import HybridClock, millis_stamp, stamp_lead

SKEW_MS = 10
SKEW = SKEW_MS / 1000  # clock_skew, in seconds as the node has it
MEMBERS = 3


class Replica:
    """One member's clock, store and the operations it holds."""

    def __init__(self, index: int, offset_ms: int) -> None:
        self.offset_ms = offset_ms
        self.time_ms = 1_000  # the true time, shared by the simulation
        self.clock = HybridClock(index + 1, self.now_ns)
        self.store = new_store()
        self.held: dict[int, Op] = {}

    def wall_ms(self) -> int:
        return self.time_ms + self.offset_ms

    def now_ns(self) -> int:
        return self.wall_ms() * 1_000_000

    def refuses(self, stamp: int) -> bool:
        """The node's rule (``Collective._check_clock``)."""
        return stamp_lead(stamp, self.now_ns()) > SKEW

    def receive(self, operation: Op) -> None:
        deliver(self.store, [operation])
        self.held[operation.stamp] = operation
        self.clock.observe(operation.stamp)

    def advance(self) -> None:
        """What the node's expirer does: fire expiries due by the wall clock, and move the
        clock past them."""
        now_ms = self.wall_ms()
        if self.store.advance(now_ms):
            self.clock.observe(millis_stamp(now_ms))


def send(sender: Replica, receiver: Replica, operation: Op) -> bool:
    """One operation over a connection: refused (False) if it, or the sender's clock, is
    beyond clock_skew of the receiver's wall clock."""
    if receiver.refuses(sender.clock.promise()) or receiver.refuses(operation.stamp):
        return False
    if operation.stamp not in receiver.held:
        receiver.receive(operation)
    return True


def check_clocks(replicas: list[Replica]) -> None:
    """No clock is more than clock_skew ahead of its own (unchanged) wall clock."""
    for replica in replicas:
        assert stamp_lead(replica.clock._last, replica.now_ns()) <= SKEW


step_strategy = st.one_of(
    st.tuples(st.just("write"), st.integers(0, MEMBERS - 1)),
    st.tuples(
        st.just("send"),
        st.integers(0, MEMBERS - 1),
        st.integers(0, MEMBERS - 1),
        st.integers(0, 20),
    ),
    st.tuples(st.just("tick"), st.integers(0, 8)),
    st.tuples(st.just("forge"), st.integers(0, MEMBERS - 1), st.sampled_from([1, 2, 400])),
)


@_settings(max_examples=300)
@given(st.data())
def test_convergence_under_the_clock_skew_rule(data: st.DataObject) -> None:
    # Within clock_skew of each other, just beyond it, and far beyond it.
    offset = st.one_of(
        st.sampled_from([0, 3, -7, SKEW_MS, SKEW_MS + 1, -SKEW_MS - 1, 25, -25]),
        st.integers(-3 * SKEW_MS, 3 * SKEW_MS),
    )
    offsets = data.draw(
        st.lists(offset, min_size=MEMBERS, max_size=MEMBERS), label="wall clock offsets (ms)"
    )
    replicas = [Replica(i, offset) for i, offset in enumerate(offsets)]
    narrow = data.draw(st.booleans(), label="narrow paths")
    bodies = ttl_bodies(narrow_paths if narrow else paths)
    made: list[Op] = []
    refusals = 0
    for step in data.draw(st.lists(step_strategy, min_size=8, max_size=50), label="steps"):
        if step[0] == "write":
            writer = replicas[step[1]]
            op, path, value, ttl = data.draw(bodies, label="operation")
            operation = Op(writer.clock.stamp(), op, path, value, ttl)
            writer.receive(operation)
            made.append(operation)
        elif step[0] == "send":
            sender, receiver = replicas[step[1]], replicas[step[2]]
            if sender is not receiver and sender.held:
                held = sorted(sender.held)
                refusals += not send(sender, receiver, sender.held[held[step[3] % len(held)]])
        elif step[0] == "tick":
            for replica in replicas:
                replica.time_ms += step[1]
                replica.advance()
        else:
            # A forged operation: far ahead (up to the last hlc the wire carries), or just
            # beyond clock_skew of the receiver.
            receiver = replicas[step[1]]
            if step[2] == 400:
                stamp = (((1 << 64) - 1) << 64) | 99
            else:
                stamp = millis_stamp(receiver.wall_ms() + SKEW_MS + step[2]) | 99
            assert receiver.refuses(stamp)
        check_clocks(replicas)
    event(f"operations refused: {'some' if refusals else 'none'}")
    # The clocks are fixed (within clock_skew of each other), and time passes: whatever was
    # refused gets through now, and every replica ends up with every operation.
    fixed = data.draw(
        st.lists(st.integers(0, SKEW_MS), min_size=MEMBERS, max_size=MEMBERS),
        label="fixed offsets (ms)",
    )
    for replica, offset in zip(replicas, fixed):
        replica.offset_ms = offset
        replica.time_ms += 4 * SKEW_MS + 20  # past every stamp made and every ttl (<= 12 ms)
    for _ in range(MEMBERS):  # relaying: enough rounds for an operation to reach everyone
        for sender in replicas:
            for receiver in replicas:
                for operation in list(sender.held.values()):
                    assert send(sender, receiver, operation), "refused after the fix"
    for replica in replicas:
        replica.advance()
        assert sorted(replica.held) == sorted(o.stamp for o in made)
        assert_tree(
            replica.store.to_dict(),
            fold(made, replica.wall_ms()),
            f"offsets {offsets}, then {fixed}; {refusals} refused",
        )
    # The sweep: no operation older than every clock's promise can arrive any more.
    frontier = min(replica.clock.promise() for replica in replicas)
    for replica in replicas:
        tree = replica.store.to_dict()
        replica.store.expire(frontier)
        while not replica.store.collect(frontier):
            pass
        replica.store.collect(frontier)
        assert_tree(replica.store.to_dict(), tree, "the sweep changed the tree")
        assert leftovers(replica.store._root, tree) == 0, "tombstones or increments were kept"


def leftovers(meta: Any, data: Any) -> int:
    """Tombstones (stamps of keys without a value) and pending increments kept under
    ``meta``, whose visible tree is ``data``."""
    data = data if type(data) is dict else {}
    count = len(meta.incs or ())
    for key, entry in meta.entries.items():
        if type(entry) is int:
            count += key not in data
        else:
            count += leftovers(entry, data.get(key))
    return count


def test_without_the_rule_one_forged_stamp_wedges_a_clock() -> None:
    """Why the rule: a clock that observed the last hlc the wire carries issues stamps the
    wire cannot carry (what issue 17 saw); the rule refuses that stamp, and the clock itself
    refuses an hlc that would leave it no room."""
    replica = Replica(0, 0)
    forged = (((1 << 64) - 1) << 64) | 99
    assert replica.refuses(forged)
    unguarded = HybridClock(1, replica.now_ns)
    unguarded._last = forged  # what observe() did before the rule
    assert unguarded.stamp() >> 64 >= 1 << 64
    with pytest.raises(ValueError, match="wire"):
        replica.clock.observe(forged)
