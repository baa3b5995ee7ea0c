"""The wire codec without sockets: framing, limits and message shapes."""

from __future__ import annotations

import pytest
import ujson

from gcollective._errors import ProtocolError
from gcollective._store import Store
from gcollective._wire import (
    PROTOCOL_VERSION,
    FrameDecoder,
    check_snapshot_items,
    encode_hello,
    encode_ops,
    encode_snapshot,
    parse_hello,
    parse_ops,
    path_segments,
    wire_path,
)

HLC = 1 << 16
ORIGIN = 12345


def ops_message(*items, origin=ORIGIN, seq=1):
    """An OPS message (decoded) of ``items``, each ``(hlc, op, path, value)``."""
    return [1, origin, seq, *(list(column) for column in zip(*items))] if items else []


def test_frames_split_across_chunks_and_several_in_one_chunk():
    frames = b"".join(
        encode_ops(ORIGIN, i + 1, [HLC + i], [0], [f"k.{i}"], ["é€\n"]) for i in range(3)
    )
    decoder = FrameDecoder(1 << 20)
    out = []
    for i in range(len(frames)):  # one byte at a time
        out.extend(decoder.feed(frames[i : i + 1]))
    assert [parse_ops(m)[4] for m in out] == [["k.0"], ["k.1"], ["k.2"]]
    assert out[0][6] == ["é€\n"]
    assert decoder.buffered == 0
    assert FrameDecoder(1 << 20).feed(frames) == out


def test_encoded_ops_round_trip_with_the_biggest_values():
    origin, hlc = (1 << 63) - 1, (1 << 64) - 3  # node ids keep the top bit clear
    hlcs, ops, values = [hlc, hlc + 1, hlc + 2], [1, 2, 0], [2.5, None, {"x": [1, None]}]
    paths = [wire_path(("a", "b")), wire_path(("a",)), wire_path(("a.b@c", "d"))]
    assert paths == ["a.b", "a", ["a.b@c", "d"]]
    (message,) = FrameDecoder(1 << 20).feed(encode_ops(origin, 7, hlcs, ops, paths, values))
    assert parse_ops(message) == (origin, 7, hlcs, ops, paths, values, None)
    assert [path_segments(p) for p in paths] == [["a", "b"], ["a"], ["a.b@c", "d"]]


OK = (HLC, 0, "a", 1)


@pytest.mark.parametrize(
    "message, reason",
    [
        (ops_message(OK, origin=0), "bad origin"),
        (ops_message(OK, origin=1 << 64), "bad origin"),
        (ops_message(OK, origin=1 << 63), "bad origin"),
        (ops_message(OK, origin=-5), "bad origin"),
        (ops_message(OK, origin="1"), "bad origin"),
        (ops_message(OK, seq=0), "bad sequence"),
        (ops_message(OK, seq=-1), "bad sequence"),
        (ops_message(OK, seq="1"), "bad sequence"),
        ([1, ORIGIN, 1, [], [], [], []], "no operations"),
        ([1, ORIGIN, 1, [HLC], [0], ["a"]], "wrong length"),
        ([1, ORIGIN, 1, [HLC], [0], ["a"], [1], 0], "bad ttl column"),
        ([1, ORIGIN, 1, [HLC], [0], ["a"], [1], [0], 0], "wrong length"),
        ([1, ORIGIN, 1, [HLC], [0, 0], ["a"], [1]], "different lengths"),
        ([1, ORIGIN, 1, [HLC], [0], "a", [1]], "different lengths"),
        (ops_message((0, 0, "a", 1)), "bad stamp"),
        (ops_message((1 << 64, 0, "a", 1)), "bad stamp"),
        (ops_message((True, 0, "a", 1)), "bad stamp"),
        (ops_message((1.5, 0, "a", 1)), "bad stamp"),
        (ops_message(OK, (HLC, 0, "b", 1)), "bad stamp"),
        (ops_message((HLC, 0, [], 1)), "bad path"),
        (ops_message((HLC, 0, 7, 1)), "bad path"),
        (ops_message((HLC, 0, "", 1)), "path segment"),
        (ops_message(OK, (HLC + 1, 0, "a..b", 1)), "path segment"),
        (ops_message(OK, (HLC + 1, 0, ".a", 1)), "path segment"),
        (ops_message((HLC - 1, 0, "a.", 1), OK), "path segment"),
        (ops_message((HLC, 0, ["a", ""], 1)), "path segment"),
        (ops_message((HLC, 0, ["a", 1], 1)), "path segment"),
        (ops_message((HLC, 0, ".".join("x" * 101), 1)), "bad path"),
        (ops_message((HLC, 0, ["x"] * 101, 1)), "bad path"),
        (ops_message(OK, (HLC + 1, 0, ".".join("x" * 101), 1)), "bad path"),
        (ops_message(OK, (HLC + 1, 0, ".".join(["long" * 30] * 101), 1)), "bad path"),
        (ops_message((HLC, 0, "a", float("nan"))), "non-finite"),
        (ops_message((HLC, 0, "a", {"x": [float("inf")]})), "non-finite"),
        (ops_message((HLC, 1, "a", "1")), "not a number"),
        (ops_message((HLC, 1, "a", True)), "not a number"),
        (ops_message((HLC, 2, "a", 1)), "carries a value"),
        (ops_message((HLC, 3, "a", 1)), "unknown operation"),
        (ops_message((HLC, True, "a", 1)), "unknown operation"),
        (ops_message((HLC, [0], "a", 1)), "unknown operation"),
    ],
)
def test_bad_ops_frames_are_refused(message, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_ops(message)


def test_paths_as_deep_as_allowed_are_accepted():
    deepest = ".".join("x" * 100)
    parse_ops(ops_message(OK, (HLC + 1, 0, deepest, 1), (HLC + 2, 0, "long" * 60, 1)))


def test_oversized_frame_and_oversized_tail_are_refused():
    decoder = FrameDecoder(1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(b"[" + b"1," * 1000 + b"1]\n")
    decoder = FrameDecoder(1024)
    decoder.feed(b"[" + b"1," * 400)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(b"1," * 400)


@pytest.mark.parametrize("junk", [b"\x00\xff\xfe\n", b"not json\n", b"[1,2\n", b"[1],[2]\n"])
def test_non_json_frames_are_refused(junk):
    with pytest.raises(ProtocolError):
        FrameDecoder(1 << 20).feed(junk)


def test_hello_round_trip_and_bad_hellos():
    (message,) = FrameDecoder(4096).feed(encode_hello(77, "127.0.0.1", 9000, 1))
    hello = parse_hello(message)
    assert (hello.node_id, hello.host, hello.port, hello.flags) == (77, "127.0.0.1", 9000, 1)
    for bad in (
        [1, ORIGIN, 1, [[HLC, 0, ["a"], 1]]],
        ["gcollective", PROTOCOL_VERSION + 1, 77, "h", 1, 0],
        ["gcollective", PROTOCOL_VERSION, -1, "h", 1, 0],
        ["gcollective", PROTOCOL_VERSION, 77, "", 1, 0],
        ["gcollective", PROTOCOL_VERSION, 77, "h", 70000, 0],
        ["gcollective", PROTOCOL_VERSION, 77, "h", 1, "x"],
        ["other", PROTOCOL_VERSION, 77, "h", 1, 0],
        "gcollective",
    ):
        with pytest.raises(ProtocolError):
            parse_hello(bad)


def test_snapshot_items_are_checked_before_merging():
    store = Store()
    store.apply(HLC << 64 | ORIGIN, 0, ("a", "b"), {"c": [1]})
    store.apply((HLC + 1) << 64 | ORIGIN, 1, ("n",), 2)
    store.apply((HLC + 2) << 64 | ORIGIN, 2, ("gone",), None)
    (message,) = FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))
    items = check_snapshot_items(message[1])
    other = Store()
    other.merge(items)
    assert other.to_dict() == store.to_dict()
    for bad in (
        {"a": 1},
        [["a"]],
        [["", 5]],
        [["a", "x"]],
        [["a", [None, 0, None, None, [], {}, {}]]],
        [["a", [None, 0, None, None, [], {}, {}, {}, 1]]],
        [["a", [5, [float("nan")], None, None, [], {}, {}, {}]]],
        [["a", [5, 7, None, None, [], {}, {}, {}]]],
        [["a", [5, 0, None, None, [[5, "x"]], {}, {}, {}]]],
        [["a", [5, 0, None, None, [], {"b": "x"}, {}, {}]]],
        [["a", [5, 0, None, None, [], {"b": [5, 1]}, {}, {}]]],
        [["a", [5, 0, None, None, [], {}, {"b": "x"}, {}]]],
        [["a", [5, 0, None, None, [], {}, {"b": 0}, {}]]],
        [["a", [5, 0, None, None, [], {}, {"b": 1 << 128}, {}]]],
        [["a", [5, 0, None, None, [], {}, {"b": 5}, {"c": 1}]]],
        [["a", [5, 0, None, None, [], {}, {}, {"c": 1}]]],
        [["a", [5, 0, None, None, [], {}, {"b": 5}, {"b": float("inf")}]]],
        [["a", [5, 0, None, None, [], {}, {"b": 5}, {"b": {"x": [float("nan")]}}]]],
        [["a", [5, 0, None, None, [], {"b": [5, 0, None, None, [], {}, {}, {}]}, {"b": 5}, {}]]],
        [["a", [-1, 1]]],
    ):
        with pytest.raises(ProtocolError):
            check_snapshot_items(ujson.loads(ujson.dumps(bad)))
