"""Writers' loops between real members: the batches a receiver applies in bulk (keys under one
parent, said once on the wire) and the ones it must apply key by key."""

from __future__ import annotations

from cluster import free_port, wait_for

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


def test_loops_of_new_keys_overwrites_and_conflicts_converge(members):
    a, b = members(2)
    for i in range(100):  # new keys: b takes them in bulk
        a.set(f"p.k{i}", i)
    wait_for(lambda: b.get("p.k99") == 99)
    b.set("p.k10", "b's")
    wait_for(lambda: a.get("p.k10") == "b's")
    for i in range(50, 150):  # half overwrites, half new: b goes key by key
        a.set(f"p.k{i}", -i)
    b.set("p.k120", "b's")  # concurrent with a's loop: the later stamp wins everywhere
    wait_for(lambda: a.snapshot() == b.snapshot() and b.get("p.k149") == -149)
    expected = {f"k{i}": i if i < 50 else -i for i in range(150)}
    expected["k10"] = "b's"
    expected["k120"] = a.get("p.k120")
    assert expected["k120"] in ("b's", -120)
    assert a.get("p") == expected


def test_a_loop_under_a_parent_the_receiver_replaced_lands_as_one_by_one(members):
    a, b = members(2)
    a.set("p.x", 1)
    wait_for(lambda: b.get("p.x") == 1)
    b.set("p", {"fresh": True})  # replaces p where a's loop is about to write
    wait_for(lambda: a.get("p") == {"fresh": True})
    for i in range(40):
        a.set(f"p.k{i}", i)
    wait_for(lambda: a.snapshot() == b.snapshot() and b.get("p.k39") == 39)
    assert b.get("p") == {"fresh": True, **{f"k{i}": i for i in range(40)}}


def test_a_watch_sees_each_key_of_a_loop_batch(members):
    a, b = members(2)
    seen: list = []
    b.watch("p", lambda key, value, op, origin: seen.append((key, value)))
    for i in range(40):
        a.set(f"p.k{i}", i)
    wait_for(lambda: len(seen) == 40)
    assert seen == [(f"p.k{i}", i) for i in range(40)]


def test_loop_batches_arriving_out_of_order_are_applied_once_whole():
    """A later batch first (its operations wait beyond the gap), then the earlier one, then a
    repeat: every key lands under its parent, once. (Frames fed straight to a member's
    receive path: the order cannot be forced over one connection.)"""
    from gcollective import Collective
    from gcollective._wire import FrameDecoder, encode_ops

    origin, hlc = 4242, 1 << 40
    frames = [
        encode_ops(
            origin,
            1 + 20 * n,
            [hlc + 20 * n + i for i in range(20)],
            [0] * 20,
            [f"p.k{20 * n + i}" for i in range(20)],
            [20 * n + i for i in range(20)],
        )
        for n in range(2)
    ]
    node = Collective(f"127.0.0.1:{free_port()}")
    node.start()
    try:
        decoder = FrameDecoder(1 << 20)
        for frame in (frames[1], frames[0], frames[1]):
            (message,) = decoder.feed(frame)
            node._engine.apply_ops(message, decoder.frames[0])
        assert node.get("p") == {f"k{i}": i for i in range(40)}
        assert node.applied_ops == 40
    finally:
        node.stop()
