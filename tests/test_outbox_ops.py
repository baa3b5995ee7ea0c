"""The op and ttl of each own operation in the outbox's OPS columns (``_outbox.outbox_columns``).

``Collective.incr`` marks an INCREMENT without a ttl by its position in the outbox
(``Engine.out_increments``), every other operation that is not a plain SET by an
``out_special`` entry (the general path, ``Engine.send_own``, among them), and a loop of
``incr`` alone has its ops column made at once: whatever the mix, each operation must go
out with the op and ttl it was made with, as one by one through ``send_own`` gives, and a
receiver must end with the writer's tree (the reference model's, for these operations)."""

from __future__ import annotations

from typing import Any

from cluster import free_port, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from gcollective import Collective
from gcollective._engine import Engine
from gcollective._outbox import outbox_columns
from gcollective._store import DELETE, INCREMENT, SET

# An own operation: (call, key); a few keys under one parent (so the writer's way is
# cached) and one elsewhere. ``incr_float`` takes ``incr``'s general path.
CALLS = ["set", "set_ttl", "incr", "incr", "incr", "incr_ttl", "incr_float", "delete"]
STEPS = st.lists(
    st.tuples(st.sampled_from(CALLS), st.sampled_from(["c.k0", "c.k1", "c.k2"] * 4 + ["top"])),
    max_size=40,
)
# (the op and ttl in ms each call goes out with)
EXPECTED = {
    "set": (SET, 0),
    "set_ttl": (SET, 60_000),
    "incr": (INCREMENT, 0),
    "incr_ttl": (INCREMENT, 60_000),
    "incr_float": (INCREMENT, 0),
    "delete": (DELETE, 0),
}


def _call(node: Collective, call: str, key: str, number: int) -> None:
    if call == "set":
        node.set(key, number)
    elif call == "set_ttl":
        node.set(key, number, ttl=60)
    elif call == "incr":
        node.incr(key)
    elif call == "incr_ttl":
        node.incr(key, 2, ttl=60)
    elif call == "incr_float":
        node.incr(key, 0.5)
    else:
        node.delete(key)


def _one_by_one(node: Collective, steps: list[tuple[str, str]]) -> tuple[list[Any], ...]:
    """The columns of the outbox's operations put in one by one through ``send_own``."""
    engine = Engine.__new__(Engine)  # (only the outbox and its marks: nothing else runs)
    engine.outbox, engine.out_special, engine.out_increments = [], [], []
    engine.schedule_flush = engine.flush_now = lambda: None
    outbox = node._outbox
    for index, (call, _) in enumerate(steps):
        op, ttl_ms = EXPECTED[call]
        stamp, wire, value = outbox[3 * index : 3 * index + 3]
        engine.send_own(stamp, op, wire, value, ttl_ms)
    return outbox_columns(
        engine.outbox[0::3], engine.outbox, engine.out_special, engine.out_increments
    )


def test_each_own_operation_goes_out_with_its_op_and_ttl() -> None:
    node = Collective(f"127.0.0.1:{free_port()}")
    node.start()
    try:

        @settings(max_examples=300, deadline=None)
        @given(STEPS)
        def check(steps: list[tuple[str, str]]) -> None:
            for _ in range(3):
                node.incr("c.w")  # (the way to "c" cached, as in a writer's loop)
            node._flush_outbox()
            for number, (call, key) in enumerate(steps):
                _call(node, call, key, number)
            outbox = node._outbox
            assert len(outbox) == 3 * len(steps)  # (nothing flushed meanwhile)
            expected = _one_by_one(node, steps)
            engine = node._engine
            columns = outbox_columns(
                outbox[0::3], outbox, engine.out_special, engine.out_increments
            )
            assert columns == expected
            ops = [EXPECTED[call][0] for call, _ in steps]
            assert columns[1] == ops
            ttls = [EXPECTED[call][1] for call, _ in steps]
            assert (columns[4] if len(columns) > 4 else [0] * len(steps)) == ttls
            assert not node._engine.out_increments and not node._engine.out_special
            outbox.clear()  # (its columns taken: as ``flush`` leaves it)

        check()
    finally:
        node.stop()


def test_a_receiver_of_loops_of_incr_and_sets_ends_with_the_writers_tree(members) -> None:
    """Loops of ``incr`` alone (one ops column made at once) and mixed with sets, deletes
    and hits with a ttl, received by a peer: both hold the same tree, each counter the hits
    made (the reference model's sums, for these operations)."""
    writer, reader = members(2)
    model: dict[str, Any] = {}
    for _ in range(700):
        writer.incr("hot.hits")
    model["hot"] = {"hits": 700}
    mixed: dict[str, Any] = {}
    for number in range(300):
        counter = f"k{number % 5}"
        writer.incr(f"mixed.{counter}")
        mixed[counter] = mixed.get(counter, 0) + 1
        writer.set(f"mixed.s{number % 3}", number)
        mixed[f"s{number % 3}"] = number
        if number % 7 == 0:
            writer.delete(f"mixed.{counter}")
            del mixed[counter]
        writer.incr(f"mixed.t{number % 2}", 1, ttl=60)
        mixed[f"t{number % 2}"] = mixed.get(f"t{number % 2}", 0) + 1
    model["mixed"] = mixed
    assert writer.snapshot() == model
    wait_for(lambda: reader.snapshot() == model, timeout=30)
