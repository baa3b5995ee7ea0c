"""The wire codec without sockets: framing, limits and message shapes."""

from __future__ import annotations

import pytest
import ujson

from gcollective._errors import ProtocolError
from gcollective._store import Store
from gcollective._wire import (
    FrameDecoder,
    check_snapshot_items,
    encode_hello,
    encode_op,
    encode_snapshot,
    parse_hello,
    parse_op,
)

STAMP = (1 << 80) | 12345


def test_frames_split_across_chunks_and_several_in_one_chunk():
    frames = b"".join(encode_op(STAMP + i, 0, ("k", str(i)), "é€\n", i + 1) for i in range(3))
    decoder = FrameDecoder(1 << 20)
    out = []
    for i in range(len(frames)):  # one byte at a time
        out.extend(decoder.feed(frames[i : i + 1]))
    assert [m[3] for m in out] == [["k", "0"], ["k", "1"], ["k", "2"]]
    assert out[0][4] == "é€\n"
    assert decoder.buffered == 0
    assert FrameDecoder(1 << 20).feed(frames) == out


def test_encoded_op_round_trips_with_big_stamps():
    (message,) = FrameDecoder(1 << 20).feed(encode_op(STAMP, 1, ("a", "b"), 2.5, 7))
    assert parse_op(message) == (STAMP, 1, ["a", "b"], 2.5, 7)


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
        [1, STAMP, 0, ["a"], 1],
        ["gcollective", 2, 77, "h", 1, 0],
        ["gcollective", 1, -1, "h", 1, 0],
        ["gcollective", 1, 77, "", 1, 0],
        ["gcollective", 1, 77, "h", 70000, 0],
        ["gcollective", 1, 77, "h", 1, "x"],
        ["other", 1, 77, "h", 1, 0],
        "gcollective",
    ):
        with pytest.raises(ProtocolError):
            parse_hello(bad)


@pytest.mark.parametrize(
    "message",
    [
        [1, STAMP, 0, ["a"], 1],
        [1, STAMP, 0, ["a"], 1, 0],
        [1, STAMP, 0, ["a"], 1, -1],
        [1, STAMP, 0, ["a"], 1, "1"],
        [1, 1 << 70, 0, ["a"], 1, 1],
        [1, 0, 0, ["a"], 1, 1],
        [1, -5, 0, ["a"], 1, 1],
        [1, 1 << 129, 0, ["a"], 1, 1],
        [1, "1", 0, ["a"], 1, 1],
        [1, STAMP, 0, [], 1, 1],
        [1, STAMP, 0, "a", 1, 1],
        [1, STAMP, 0, ["a", ""], 1, 1],
        [1, STAMP, 0, ["a", 1], 1, 1],
        [1, STAMP, 0, ["a"], float("nan"), 1],
        [1, STAMP, 0, ["a"], {"x": [float("inf")]}, 1],
        [1, STAMP, 1, ["a"], "1", 1],
        [1, STAMP, 1, ["a"], True, 1],
        [1, STAMP, 2, ["a"], 1, 1],
        [1, STAMP, 3, ["a"], 1, 1],
        [1, STAMP, True, ["a"], 1, 1],
    ],
)
def test_ops_of_the_wrong_shape_are_refused(message):
    with pytest.raises(ProtocolError):
        parse_op(message)


def test_snapshot_items_are_checked_before_merging():
    store = Store()
    store.apply(STAMP, 0, ("a", "b"), {"c": [1]})
    store.apply(STAMP + 1, 1, ("n",), 2)
    store.apply(STAMP + 2, 2, ("gone",), None)
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
        [["a", [None, 0, None, None, [], {}, 1]]],
        [["a", [5, [float("nan")], None, None, [], {}]]],
        [["a", [5, 7, None, None, [], {}]]],
        [["a", [5, 0, None, None, [[5, "x"]], {}]]],
        [["a", [5, 0, None, None, [], {"b": "x"}]]],
        [["a", [-1, 1]]],
    ):
        with pytest.raises(ProtocolError):
            check_snapshot_items(ujson.loads(ujson.dumps(bad)))
