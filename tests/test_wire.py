"""The wire codec without sockets: framing, limits and message shapes."""

from __future__ import annotations

import gc
from array import array
from typing import Any

import pytest
import ujson
from hypothesis import event, given, settings
from hypothesis import strategies as st
from profiles import examples

from gcollective._columns import full_paths, unpack_stamps
from gcollective._errors import ProtocolError
from gcollective._store import Store
from gcollective._wire import (
    BORN_SHIFT,
    KNOWS_MEMBERS,
    PROTOCOL_VERSION,
    WANTS_SNAPSHOT,
    FrameDecoder,
    encode_hello,
    encode_ops,
    parse_hello,
    wire_path,
)
from gcollective._wire_ops import LAZY_STAMPS_MIN, OpStamps, parse_ops, path_segments
from gcollective._wire_snapshot import encode_snapshot, parse_snapshot_items

HLC = 1 << 16


ORIGIN = 12345


def ops_message(*items, origin=ORIGIN, seq=1, parent="", ttls=None):
    """An OPS message (decoded) of ``items``, each ``(hlc, op, path, value)``: hlcs are
    given whole here and sent as deltas, as ``encode_ops`` does."""
    hlcs, ops, paths, values = (list(column) for column in zip(*items))
    deltas = [hlcs[0], *(b - a for a, b in zip(hlcs, hlcs[1:]))]
    return [1, origin, seq, deltas, ops, parent, paths, values, ttls]


def _fed(decoder: FrameDecoder, chunks: list[bytes]) -> list[Any]:
    """What ``decoder`` gives for each of ``chunks`` in turn (its messages and frames, or
    the ``ProtocolError``'s text, after which it is not fed again)."""
    out: list[Any] = []
    for chunk in chunks:
        try:
            out.append((decoder.feed(chunk), decoder.frames, decoder.buffered))
        except ProtocolError as exc:
            return [*out, str(exc)]
    return out


_LINES = st.sampled_from(
    [
        b'[1,4096,1,[5],1,"",["hits.total"],[1],null]',
        b"[4,[[4096,1,5]],true,5,0]",
        b"[1,",  # (not JSON)
        b"[9,1]",  # (no such kind: refused before it is decoded)
        b'"x"',
        b"",
        b"[1," + b"7," * 40 + b"7]",  # (longer than the decoder's frames may be)
    ]
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(_LINES, min_size=1, max_size=6), st.lists(st.booleans(), max_size=6))
def test_a_lone_whole_frame_is_read_as_the_general_way_reads_it(lines, split):
    """A read of one whole frame (``FrameDecoder.feed``'s shortcut) gives what the general
    way gives (the same frame read in two parts, or with another): the same messages and
    frames, the same refusal."""
    kinds = frozenset({b"[1,", b"[4,"})
    stream = [b"[4,[],true,5,0]\n"] + [line + b"\n" for line in lines]  # (a first frame)
    whole = _fed(FrameDecoder(64, None, kinds), stream)
    parts: list[bytes] = []
    for chunk, halve in zip(stream, split + [False] * len(stream)):
        if halve and len(chunk) > 1:
            parts += [chunk[:-1], chunk[-1:]]  # (the second part ends a buffered frame)
        else:
            parts.append(chunk)
    general = _fed(FrameDecoder(64, None, kinds), parts)
    assert _without_partial_reads(general) == _without_partial_reads(whole)


def _without_partial_reads(reads: list[Any]) -> list[Any]:
    """The reads that gave frames, or the refusal (a read of part of a frame gives none)."""
    return [read for read in reads if type(read) is str or read[0]]


def test_frames_split_across_chunks_and_several_in_one_chunk():
    frames = b"".join(
        encode_ops(ORIGIN, i + 1, [HLC + i], [0], [f"k.{i}"], ["é€\n"]) for i in range(3)
    )
    decoder = FrameDecoder(1 << 20)
    out = []
    for i in range(len(frames)):  # one byte at a time
        out.extend(decoder.feed(frames[i : i + 1]))
    assert [full_paths(parse_ops(m)[7], parse_ops(m)[4]) for m in out] == [
        ["k.0"],
        ["k.1"],
        ["k.2"],
    ]
    assert out[0][7] == ["é€\n"]
    assert decoder.buffered == 0
    assert FrameDecoder(1 << 20).feed(frames) == out


def test_encoded_ops_round_trip_with_the_biggest_values():
    origin, hlc = (1 << 63) - 1, (1 << 64) - 3  # node ids keep the top bit clear
    hlcs, ops, values = [hlc, hlc + 1, hlc + 2], [1, 2, 0], [2.5, None, {"x": [1, None]}]
    paths = [wire_path(("a", "b")), wire_path(("a",)), wire_path(("a.b@c", "d"))]
    assert paths == ["a.b", "a", ["a.b@c", "d"]]
    (message,) = FrameDecoder(1 << 20).feed(encode_ops(origin, 7, hlcs, ops, paths, values))
    stamps = [(hlc << 64) | origin for hlc in hlcs]
    assert parse_ops(message) == (origin, 7, stamps, ops, paths, values, None, "")
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
        ([1, ORIGIN, 1, [], [], "", [], [], None], "no operations"),
        ([1, ORIGIN, 1, [HLC], [0], ["a"], [1]], "wrong length"),
        ([1, ORIGIN, 1, [HLC], [0], "", ["a"], [1], 0], "bad ttl column"),
        ([1, ORIGIN, 1, [HLC], [0], "", ["a"], [1], [0], 0], "wrong length"),
        ([1, ORIGIN, 1, [HLC], [0, 0], "", ["a"], [1], None], "different lengths"),
        ([1, ORIGIN, 1, [HLC], [0], "", "a", [1], None], "different lengths"),
        ([1, ORIGIN, 1, [HLC], 0, "", ["a", "b"], [1, 1], None], "different lengths"),
        ([1, ORIGIN, 1, [HLC], 3, "", ["a"], [1], None], "unknown operation"),
        ([1, ORIGIN, 1, [HLC], True, "", ["a"], [1], None], "unknown operation"),
        ([1, ORIGIN, 1, [HLC], "0", "", ["a"], [1], None], "unknown operation"),
        ([1, ORIGIN, 1, [HLC, 0], 0, "", ["a", "b"], [1, 1], None], "bad stamp"),
        ([1, ORIGIN, 1, [HLC, -1], 0, "", ["a", "b"], [1, 1], None], "bad stamp"),
        ([1, ORIGIN, 1, [HLC, 1 << 64], 0, "", ["a", "b"], [1, 1], None], "bad stamp"),
        (ops_message(OK, parent=5), "bad parent"),
        (ops_message(OK, parent=["p"]), "bad parent"),
        (ops_message(OK, parent="p..q"), "path segment"),
        (ops_message(OK, parent="p."), "path segment"),
        (ops_message(OK, parent=".".join("x" * 100)), "bad path"),
        (ops_message((HLC, 0, "a.b", 1), parent="p"), "bad key under its parent"),
        (ops_message((HLC, 0, "", 1), parent="p"), "bad key under its parent"),
        (ops_message((HLC, 0, ["a"], 1), parent="p"), "bad key under its parent"),
        (ops_message((HLC, 0, 7, 1), parent="p"), "bad key under its parent"),
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
        # A counter's frame (SETs and INCREMENTs of ints) passes without a look at each
        # operation; one odd value in it must still be seen.
        (ops_message((HLC, 1, "a", 1), (HLC + 1, 0, "b", 2), (HLC + 2, 1, "a", True)), "number"),
        (ops_message((HLC, 1, "a", 1), (HLC + 1, 1, "a", "1")), "not a number"),
        (ops_message((HLC, 1, "a", 1), (HLC + 1, 2, "b", 1)), "carries a value"),
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
    parse_ops(ops_message(OK, parent=".".join("x" * 99)))


def nested_value(kind: type, levels: int):
    value = 0
    for _ in range(levels):
        value = [value] if kind is list else {"k": value}
    return value


@pytest.mark.parametrize("kind", [list, dict])
@pytest.mark.parametrize("segments", [1, 2, 60, 99])
def test_one_depth_rule_for_set_ops_and_snapshots(kind, segments):
    """A key's segments plus its value's nesting: what ``clean_value`` (``set``) accepts,
    the OPS and SNAPSHOT decoders accept (a joiner too); one level more, none does."""
    from gcollective._errors import InvalidValueError
    from gcollective._validate import clean_value

    key = [f"s{i}" for i in range(segments)]
    deepest = nested_value(kind, 100 - segments)
    clean_value(deepest, segments)
    with pytest.raises(InvalidValueError, match="together"):
        clean_value(nested_value(kind, 101 - segments), segments)
    frame = encode_ops(ORIGIN, 1, [HLC], [0], [".".join(key)], [deepest])
    parse_ops(FrameDecoder(1 << 20).feed(frame)[0])
    if segments > 1:  # (the same under a parent said once)
        parse_ops(ops_message(*[(HLC + i, 0, ".".join(key), deepest) for i in range(16)]))
    store = Store()
    store.apply(1 << 64 | 5, 0, tuple(key), deepest)
    parse_snapshot_items(FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))[0][1])
    too_deep = nested_value(kind, 101 - segments)
    frame = encode_ops(ORIGIN, 1, [HLC], [0], [".".join(key)], [too_deep])
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse_ops(FrameDecoder(1 << 20).feed(frame)[0])
    store = Store()
    store.apply(1 << 64 | 5, 0, tuple(key), too_deep)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse_snapshot_items(FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))[0][1])


_MANY_HLCS = [5, 6, 900, 901, *range(1000, 1000 + LAZY_STAMPS_MIN), (1 << 63) + 2, (1 << 64) - 1]


@pytest.mark.parametrize(
    "hlcs", [[7], [1, 2, 3], [5, 6, 900, 901, (1 << 63) + 2, (1 << 64) - 1], _MANY_HLCS]
)
def test_op_stamps_are_made_when_read_and_read_like_a_list(hlcs):
    """``parse_ops`` gives the stamps of a frame of ``LAZY_STAMPS_MIN`` operations or more as
    an ``OpStamps`` (made from the deltas when read), a smaller frame's as a list: whichever
    way they are read, they are the list of ``(hlc << 64) | origin``."""
    origin = (1 << 63) - 1  # the widest origin: no carry into the hlc half
    message = ops_message(*((hlc, 0, f"k{i}", i) for i, hlc in enumerate(hlcs)), origin=origin)
    stamps = parse_ops(message)[2]
    expected = [(hlc << 64) | origin for hlc in hlcs]
    assert type(stamps) is (OpStamps if len(hlcs) >= LAZY_STAMPS_MIN else list)
    assert list(stamps) == list(stamps) == expected  # (iterable more than once)
    assert len(stamps) == len(expected) and stamps == expected
    assert (stamps[0], stamps[-1]) == (expected[0], expected[-1])
    if type(stamps) is OpStamps:
        assert (stamps.first, stamps.last) == (expected[0], expected[-1])
    assert [stamps[i] for i in range(-len(hlcs), len(hlcs))] == expected * 2
    assert stamps[1:] == expected[1:] and list(reversed(stamps)) == expected[::-1]
    with pytest.raises(IndexError):
        stamps[len(hlcs)]


def test_a_writers_batch_travels_compactly_and_comes_back_whole():
    """A loop's batch (one kind, keys under one parent) sends the kind once, the parent once
    and small stamp deltas; ``parse_ops`` gives back every stamp and kind, and the keys with
    their parent."""
    hlcs = [(HLC << 20) + i * i for i in range(1, 17)]
    keys = ["é", *(f"k{i}" for i in range(1, 16))]
    paths = [f"users.42.{key}" for key in keys]
    values = list(range(16))
    frame = encode_ops(ORIGIN, 3, hlcs, [0] * 16, paths, values)
    (message,) = FrameDecoder(1 << 20).feed(frame)
    deltas = [hlcs[0], *(2 * i + 1 for i in range(1, 16))]
    assert message[3:7] == [deltas, 0, "users.42", keys]
    parsed = parse_ops(message)
    stamps = [(hlc << 64) | ORIGIN for hlc in hlcs]
    assert parsed == (ORIGIN, 3, stamps, [0] * 16, keys, values, None, "users.42")
    assert full_paths(parsed[7], parsed[4]) == paths
    # Any character but a dot may be in a key; one holding a NUL (the encoder's separator)
    # makes its batch travel with full paths.
    odd = ["a|b", "|", "a b", "é", *keys[4:]]
    odd_paths = [f"users.42.{key}" for key in odd]
    frame = encode_ops(ORIGIN, 3, hlcs, [0] * 16, odd_paths, values)
    (message,) = FrameDecoder(1 << 20).feed(frame)
    assert message[5:7] == ["users.42", odd]
    for nul in ("a\0b", "\0", "\0users.42.b"):
        nul_paths = [*odd_paths[:15], f"users.42.{nul}"]
        (message,) = FrameDecoder(1 << 20).feed(
            encode_ops(ORIGIN, 3, hlcs, [0] * 16, nul_paths, values)
        )
        assert message[5:7] == ["", nul_paths]
    # A few operations travel with their full paths: a bulk apply would not pay off.
    (message,) = FrameDecoder(1 << 20).feed(
        encode_ops(ORIGIN, 3, hlcs[:15], [0] * 15, paths[:15], values[:15])
    )
    assert message[5:7] == ["", paths[:15]]


@pytest.mark.parametrize(
    "paths",
    [
        ["a", "b"],  # the top level: nothing to say once
        ["u.a", "v.b"],  # two parents
        ["u.a", "u.a.b"],  # a key below another
        ["u.a", ["u", "a.b"]],  # a segment with a dot travels as a list
        ["u.a", "u1.a"],  # a parent that is a prefix of another's name
        ["ab.c", "a"],  # a path shorter than the parent
        ["u.a", "u\0u.b"],  # the encoder's separator inside a path
        ["u.a\0u.b", "u.c"],  # ... so that it splits like two paths
    ],
)
def test_a_batch_without_one_parent_travels_with_full_paths(paths):
    paths = [paths[0]] * 15 + [paths[1]]  # enough operations to say a parent once
    hlcs = [HLC + i for i in range(16)]
    ops, values = [0] * 15 + [2], [1] * 15 + [None]
    (message,) = FrameDecoder(1 << 20).feed(encode_ops(ORIGIN, 1, hlcs, ops, paths, values))
    stamps = [(hlc << 64) | ORIGIN for hlc in hlcs]
    assert parse_ops(message) == (ORIGIN, 1, stamps, ops, paths, values, None, "")


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
        ["gcollective", PROTOCOL_VERSION, 77, "h", 1, -1],
        ["gcollective", PROTOCOL_VERSION, 77, "h", 1, 1 << (BORN_SHIFT + 48)],
        ["other", PROTOCOL_VERSION, 77, "h", 1, 0],
        "gcollective",
    ):
        with pytest.raises(ProtocolError):
            parse_hello(bad)


def test_a_hello_tells_its_incarnations_birth_in_its_flags():
    """The birth rides in the flags' high bits, beside the flag bits; a HELLO of a build that
    does not say it (0.4.2's flags are 0 to 3) reads as born 0 (not said)."""
    born_ms = 1_800_000_000_123
    (message,) = FrameDecoder(4096).feed(encode_hello(77, "h", 1, WANTS_SNAPSHOT, born_ms))
    hello = parse_hello(message)
    assert hello.born_ms == born_ms
    assert hello.flags & WANTS_SNAPSHOT and not hello.flags & KNOWS_MEMBERS
    old = parse_hello(["gcollective", PROTOCOL_VERSION, 77, "h", 1, WANTS_SNAPSHOT | KNOWS_MEMBERS])
    assert old.born_ms == 0


@pytest.mark.parametrize("origins", [1, 3, 64, 65, 70])
def test_snapshot_leaves_travel_as_columns(origins: int) -> None:
    """A node's leaves, written by one origin or many (packed stamps up to 64 origins, the
    stamps themselves beyond), tombstones among them, arrive as they were."""
    store = Store()
    for i in range(200):
        stamp = (HLC + 7 * i) << 64 | (ORIGIN + i % origins)
        if i % 5 == 3:
            store.apply(stamp, 2, ("p", "q", f"k{i - 1}"), None)  # a tombstone
        else:
            store.apply(stamp, 0, ("p", "q", f"k{i}"), [i] if i % 7 else i)
    store.apply((HLC + 5000) << 64 | ORIGIN, 2, ("p", "gone"), None)
    store.apply((HLC + 5001) << 64 | ORIGIN, 2, ("p", "q", "k0"), None)
    exported = store.export()
    frame = encode_snapshot(exported)
    (message,) = FrameDecoder(1 << 20).feed(frame)
    items, newest = parse_snapshot_items(message[1])
    assert items == exported
    assert newest == (HLC + 5001) << 64 | ORIGIN
    other = Store()
    other.merge(items)
    assert other.export() == exported
    assert other.to_dict() == store.to_dict()
    if origins == 1:
        assert b"%d" % (HLC << 64 | ORIGIN) not in frame  # no 128-bit stamp per leaf


@pytest.mark.parametrize("origins", [1, 3, 0])
def test_a_snapshot_nodes_leaves_are_kept_packed_and_out_of_the_gcs_way(origins):
    """A node installed from a snapshot keeps its leaves' keys and packed stamps in tuples
    and bytes (``LeafColumns.as_run``), which the cyclic GC stops tracking, and makes the
    same stamps from them when read."""
    store = Store()
    for i in range(70):
        origin = ORIGIN + i % (origins or 70)  # (0: 70 origins, too many to pack)
        store.apply((HLC + i) << 64 | origin, 0, ("n", f"k{i}"), i)
    (message,) = FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))
    other = Store()
    other.merge(parse_snapshot_items(message[1])[0])
    node = other._root._entries["n"]
    (run,) = node.runs
    gc.collect()  # (untracks the inner tuples, then the run)
    gc.collect()
    assert not gc.is_tracked(run), run
    assert (type(run[1]) is bytes) == (origins > 0), run  # (else a tuple of full stamps)
    assert other.export() == store.export()  # (reads the run, which stays pending)
    assert node.runs == [run]
    assert node.entries == store._root._entries["n"].entries  # (records it)
    assert node.runs is None


def test_packed_stamps_unpack_from_any_form():
    origins = [ORIGIN, ORIGIN + 7]
    stamps = [(HLC + 5) << 64 | ORIGIN, (HLC + 9) << 64 | (ORIGIN + 7)]
    packed = [(HLC + 5) * 2, (HLC + 9) * 2 + 1]
    assert unpack_stamps(packed, origins) == stamps
    assert unpack_stamps(tuple(packed), tuple(origins)) == stamps
    assert unpack_stamps(array("Q", packed).tobytes(), origins) == stamps
    assert unpack_stamps([HLC + 5], [ORIGIN]) == stamps[:1]
    assert unpack_stamps(stamps, ()) == stamps


def test_snapshot_leaves_older_than_their_nodes_reset_stay_out():
    """A snapshot's leaves are kept as they come (unread: see ``_store``'s runs) only when
    none is older than its node's reset; a leaf that is (which no honest export holds) is
    dropped as from the dict form of the same export."""
    for origins in (1, 2):  # (the stamps packed with one origin, or with several)

        def stamp(hlc: int, origin: int = 0, origins: int = origins) -> int:
            return hlc << 64 | (ORIGIN + origin % origins)

        leaves = {"k1": stamp(HLC + 50, 1), "k2": stamp(HLC + 150)}
        values = {"k1": 1, "k2": 2}
        entry = [stamp(HLC + 100), 1, stamp(HLC + 150), None, [], {}, leaves, values]
        exported = [["p", entry]]
        (message,) = FrameDecoder(1 << 20).feed(encode_snapshot(exported))
        through_the_wire, as_dicts = Store(), Store()
        through_the_wire.merge(parse_snapshot_items(message[1])[0])
        as_dicts.merge(ujson.loads(ujson.dumps(exported)))
        assert through_the_wire.to_dict() == as_dicts.to_dict() == {"p": {"k2": 2}}
        assert through_the_wire.export() == as_dicts.export()


def test_snapshot_items_are_checked_before_merging():
    store = Store()
    store.apply(HLC << 64 | ORIGIN, 0, ("a", "b"), {"c": [1]})
    store.apply((HLC + 1) << 64 | ORIGIN, 1, ("n",), 2)
    store.apply((HLC + 2) << 64 | ORIGIN, 2, ("gone",), None)
    (message,) = FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))
    items, newest = parse_snapshot_items(message[1])
    assert newest == (HLC + 2) << 64 | ORIGIN
    other = Store()
    other.merge(items)
    assert other.to_dict() == store.to_dict()
    no_leaves = [[], [], []]
    for bad in (
        {"a": 1},
        [["a"]],
        [["", 5]],
        [["a", "x"]],
        [["a", [None, 0, None, None, [], {}, no_leaves]]],
        [["a", [None, 0, None, None, [], {}, no_leaves, [], 1]]],
        [["a", [5, [float("nan")], None, None, [], {}, no_leaves, []]]],
        [["a", [5, 7, None, None, [], {}, no_leaves, []]]],
        [["a", [5, 0, None, None, [[5, "x"]], {}, no_leaves, []]]],
        [["a", [5, 0, None, None, [], {"b": "x"}, no_leaves, []]]],
        [["a", [5, 0, None, None, [], {"b": [5, 1]}, no_leaves, []]]],
        [["a", [5, 0, None, None, [], {}, {"b": 5}, {}]]],  # leaves as a dict: not how they travel
        [["a", [5, 0, None, None, [], {}, no_leaves, {}]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"]], []]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], []], []]]],
        [["a", [5, 0, None, None, [], {}, [[], [1], [5]], []]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b", "b"], [5, 6]], []]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], ["x"]], []]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], [0]], []]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], [1 << 128]], []]]],
        [["a", [5, 0, None, None, [], {}, [[7], ["b"], [-1]], []]]],
        [["a", [5, 0, None, None, [], {}, [[7], ["b"], [1 << 64]], []]]],
        [["a", [5, 0, None, None, [], {}, [[7, 8], ["b"], [1 << 65]], []]]],
        [["a", [5, 0, None, None, [], {}, [[7], ["b"], [1.5]], []]]],
        [["a", [5, 0, None, None, [], {}, [[7], ["b"], [True]], []]]],
        [["a", [5, 0, None, None, [], {}, [[0], ["b"], [5]], []]]],
        [["a", [5, 0, None, None, [], {}, [[7, 7], ["b"], [5]], []]]],
        [["a", [5, 0, None, None, [], {}, [[1 << 64], ["b"], [5]], []]]],
        [["a", [5, 0, None, None, [], {}, [["x"], ["b"], [5]], []]]],
        [["a", [5, 0, None, None, [], {}, [list(range(1, 66)), ["b"], [5]], []]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], [5]], [1, 2]]]],  # a value without a stamp
        [["a", [5, 0, None, None, [], {}, no_leaves, [1]]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], [5]], [float("inf")]]]],
        [["a", [5, 0, None, None, [], {}, [[], ["b"], [5]], [{"x": [float("nan")]}]]]],
        [
            [
                "a",
                [
                    *[5, 0, None, None, []],
                    {"b": [5, 0, None, None, [], {}, no_leaves, []]},
                    [[], ["b"], [5]],
                    [],
                ],
            ]
        ],
        [["a", [-1, 1]]],
    ):
        with pytest.raises(ProtocolError):
            parse_snapshot_items(ujson.loads(ujson.dumps(bad)))


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 130), max_value=1 << 130)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)


@settings(max_examples=examples(300), deadline=None)
@given(data=st.data())
def test_any_change_to_a_snapshot_node_is_refused_or_merges(data: st.DataObject) -> None:
    """Replace any part of a full node of a SNAPSHOT (its leaf columns included) by any JSON:
    parsing refuses it with ProtocolError, or it is the snapshot of some replica's state: it
    merges the same in either order with the original's (so replicas that receive both
    converge), merging it again changes nothing, and what it becomes exports the same tree."""
    store = Store()
    for i in range(6):
        store.apply((HLC + i) << 64 | (ORIGIN + i % 2), 0, ("p", "q", f"k{i}"), i)
    store.apply((HLC + 9) << 64 | ORIGIN, 2, ("p", "q", "k1"), None)
    (message,) = FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))
    node = message[1][0][1]
    child = node[5]["q"]
    columns = child[6]  # [origins, keys, packed]
    places = [node, child, columns, *columns, child[7]]
    target = data.draw(st.sampled_from(places), label="where")
    index = data.draw(st.integers(0, len(target) - 1), label="index")
    target[index] = data.draw(st.one_of(_JSON, st.integers(-1, 1 << 64)), label="replacement")
    mutated = ujson.dumps(message[1])
    try:
        parse_snapshot_items(ujson.loads(mutated))
    except ProtocolError:
        return
    assert_merges_like_a_replica(store, mutated)
    event("accepted")  # (most changes that parse: see --hypothesis-show-statistics)


def test_a_merge_leaves_one_assignment_at_the_top_as_a_bare_stamp() -> None:
    """A snapshot that deletes a top-level dict the store holds (a newer assignment there
    overtakes the dict's children) leaves the same metadata as an install of that snapshot:
    a bare stamp, not a node (the same events make the same state however they came; the
    export a joiner gets from it would differ otherwise)."""
    store = Store()
    for i in range(6):
        store.apply((HLC + i) << 64 | (ORIGIN + i % 2), 0, ("p", "q", f"k{i}"), i)
    (message,) = FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))
    own = ujson.dumps(message[1])
    message[1][0][1][0] = (HLC + 100) << 64 | ORIGIN  # p deleted later: [a, 0 (deleted), ...]
    deleting = ujson.dumps(message[1])
    both = merged(own, deleting)
    (again,) = FrameDecoder(1 << 20).feed(encode_snapshot(both.export()))
    assert (
        both.export()
        == merged(ujson.dumps(again[1])).export()
        == [["p", (HLC + 100) << 64 | ORIGIN]]
    )


def merged(*snapshots: str) -> Store:
    """A fresh store that merged these SNAPSHOT payloads in order (each parsed anew: parsed
    items are for one merge)."""
    store = Store()
    for payload in snapshots:
        store.merge(parse_snapshot_items(ujson.loads(payload))[0])
    return store


def assert_merges_like_a_replica(original: Store, mutated: str) -> None:
    """``mutated`` (an accepted SNAPSHOT payload) behaves as the snapshot of a real state:
    merging it is idempotent, with or without the original's state around it, and the store
    it makes exports itself faithfully (a replica joining from it gets the same tree, and the
    same export: nothing accepted is lost or changed on the way on)."""
    (own,) = FrameDecoder(1 << 20).feed(encode_snapshot(original.export()))
    own_payload = ujson.dumps(own[1])
    alone = merged(mutated)
    assert merged(mutated, mutated).to_dict() == alone.to_dict()
    both = merged(own_payload, mutated)
    assert merged(own_payload, mutated, own_payload, mutated).to_dict() == both.to_dict()
    for store in (alone, both):
        (again,) = FrameDecoder(1 << 20).feed(encode_snapshot(store.export()))
        joined = merged(ujson.dumps(again[1]))
        assert joined.to_dict() == store.to_dict()
        assert joined.export() == store.export()
