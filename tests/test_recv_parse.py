"""``parse_ops``' column-at-a-time checks (a frame of sessions, a ttl column) against the check
of each operation in turn they stand in for: the same frames are accepted, the same refused,
with the same error."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from gcollective._errors import ProtocolError
from gcollective._validate import MAX_DEPTH
from gcollective._wire import MAX_TTL_MS, FrameDecoder, encode_ops
from gcollective._wire_ops import check_op_values, parse_ops

HLC = 1 << 16
ORIGIN = 12345


def reference_check(
    ops: list[int], paths: list[Any], values: list[Any], parent: str, ttls: list[Any] | None
) -> None:
    """What ``parse_ops`` checked of the ttls and values one operation at a time (before the
    column checks), given columns that pass every other check."""
    if ttls is not None:
        if set(map(type, ttls)) != {int}:
            raise ProtocolError("OPS frame has a bad ttl column")
        for op, ttl in zip(ops, ttls):
            if ttl and (not 0 < ttl <= MAX_TTL_MS or op == 2):
                raise ProtocolError("OPS frame has a bad ttl")
    check_op_values(ops, paths, values, parent)  # (the general way, kept for other frames)


def outcome(call: Any, *args: Any) -> str | None:
    """None when ``call`` returns, else its ``ProtocolError``'s message."""
    try:
        call(*args)
    except ProtocolError as exc:
        return str(exc)
    return None


scalars = st.one_of(
    st.integers(-5, 5),
    st.text("ab", max_size=2),
    st.booleans(),
    st.none(),
    st.sampled_from([1.5, math.nan, math.inf]),
)
flat_dicts = st.dictionaries(st.text("uvw", max_size=1), scalars, max_size=3)
values = st.one_of(
    scalars,
    flat_dicts,
    flat_dicts.map(lambda d: {**d, "n": {"x": 1}}),
    flat_dicts.map(lambda d: {**d, "l": [1, math.nan]}),
    st.lists(scalars, max_size=2),
)
ttl_values = st.one_of(
    st.sampled_from([0, 60_000, 1, 2, MAX_TTL_MS, MAX_TTL_MS + 1, -1]),
    st.sampled_from([1.5, 60_000.0, True, False, None, "1", [60_000]]),
)
# A member of a dict of a writer's loop: its key's members alike (all str, all ints), or with
# odd ones among them.
member_columns = st.sampled_from(
    [st.text("ab", max_size=2), st.integers(-5, 5), st.integers(-5, 5) | st.booleans()]
)
odd_members = st.sampled_from([None, 1.5, math.nan, -math.inf, True, "x", 7, {"x": 1}, [1], {}])


@st.composite
def alike_dicts(draw: Any, size: int) -> list[Any]:
    """``size`` dicts of the same keys (a writer's loop of sessions), now and then one with
    an odd member, a key missing or one more (``_alike_flat_dicts``' cases)."""
    keys = draw(st.lists(st.text("uvw", max_size=1), max_size=3, unique=True))
    columns = {key: draw(member_columns) for key in keys}
    dicts = [{key: draw(columns[key]) for key in keys} for _ in range(size)]
    for _ in range(draw(st.integers(0, 2))):
        index = draw(st.integers(0, size - 1))
        change = draw(st.sampled_from(["odd", "drop", "add"]))
        if change == "odd" and keys:
            dicts[index][draw(st.sampled_from(keys))] = draw(odd_members)
        elif change == "drop" and keys:
            dicts[index].pop(draw(st.sampled_from(keys)), None)
        elif change == "add":
            dicts[index]["z"] = draw(odd_members | columns.get("u", st.none()))
    return dicts


@st.composite
def ttl_columns(draw: Any, size: int) -> list[Any]:
    """A ttl column: of one value (a writer's loop), or of 0 and 60,000, with an odd value in
    it now and then."""
    if draw(st.booleans()):
        return [draw(ttl_values)] * size
    ttls = draw(st.lists(st.sampled_from([0, 60_000]), min_size=size, max_size=size))
    if draw(st.booleans()):
        ttls[draw(st.integers(0, size - 1))] = draw(ttl_values)
    return ttls


@st.composite
def frames(draw: Any) -> tuple[list[Any], ...]:
    size = draw(st.integers(1, 20))
    if draw(st.booleans()):
        # keys of one segment under a parent, up to the deepest a parent may be
        levels = draw(st.sampled_from([1, 2, MAX_DEPTH - 3, MAX_DEPTH - 2, MAX_DEPTH - 1]))
        parent = ".".join(["p"] * levels)
        paths: list[Any] = [f"k{i}" for i in range(size)]
    else:
        parent = ""
        depths = st.sampled_from([1, 2, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH])
        paths = [
            ["x.y", *["s"] * (d - 1)] if draw(st.integers(0, 9)) == 0 else ".".join(["s"] * d)
            for d in draw(st.lists(depths, min_size=size, max_size=size))
        ]
    kinds = draw(st.sampled_from([[0], [0], [0, 1], [0, 2], [1]]))
    ops = draw(st.lists(st.sampled_from(kinds), min_size=size, max_size=size))
    if draw(st.booleans()):
        drawn = draw(alike_dicts(size))
    else:
        drawn = draw(st.lists(values, min_size=size, max_size=size))
    column = [None if op == 2 else value for op, value in zip(ops, drawn)]
    ttls = draw(ttl_columns(size)) if draw(st.booleans()) else None
    return ops, paths, column, parent, ttls


@settings(max_examples=examples(600))
@given(frames())
def test_column_checks_accept_and_refuse_as_one_by_one(frame: tuple[list[Any], ...]) -> None:
    ops, paths, column, parent, ttls = frame
    message = [1, ORIGIN, 1, [HLC] + [1] * (len(ops) - 1), ops, parent, paths, column, ttls]
    expected = outcome(reference_check, ops, paths, column, parent, ttls)
    assert outcome(parse_ops, message) == expected, frame


@pytest.mark.parametrize("levels", [MAX_DEPTH - 2, MAX_DEPTH - 1])
def test_a_session_under_the_deepest_parents(levels: int) -> None:
    """A dict of scalars under a parent of ``levels`` segments: one level under the limit it
    is accepted, at the limit refused, as ``check_json`` says."""
    parent = ".".join(["p"] * levels)
    size = 16
    message = [
        1,
        ORIGIN,
        1,
        [HLC] + [1] * (size - 1),
        0,
        parent,
        [f"s{i}" for i in range(size)],
        [{"u": i, "w": "x"} for i in range(size)],
        [60_000] * size,
    ]
    if levels + 1 < MAX_DEPTH:
        parse_ops(message)
    else:
        with pytest.raises(ProtocolError, match="nested too deeply"):
            parse_ops(message)


def writers_loop(values: list[Any], ttls: list[Any] | None) -> list[Any]:
    """An OPS message of SETs of ``values`` under one parent, as a writer's loop sends them."""
    size = len(values)
    keys = [f"s{i}" for i in range(size)]
    return [1, ORIGIN, 1, [HLC] + [1] * (size - 1), 0, "p", keys, values, ttls]


def sessions(size: int = 16) -> list[Any]:
    return [{"u": i, "w": "x", "b": i % 2 == 0} for i in range(size)]


def with_member(key: str, member: Any, index: int = 7) -> list[Any]:
    values = sessions()
    values[index][key] = member
    return values


@pytest.mark.parametrize(
    "values",
    [
        sessions(),
        with_member("u", math.nan),  # among ints
        with_member("w", math.inf),  # among strs
        with_member("b", -math.inf),  # among bools
        with_member("u", 1.5),  # finite: accepted, by the general check
        with_member("u", {"x": [1]}),
        with_member("z", math.nan),  # a key more
        with_member("z", 1, index=0),  # a key more in the first
        [{"w": "x", "b": True} if i == 3 else d for i, d in enumerate(sessions())],  # a key less
        # Not dicts, as many members as the others: a str (accepted), a list (with a NaN)
        [d if i != 5 else "abc" for i, d in enumerate(sessions())],
        [d if i != 5 else ["a", "b", math.nan] for i, d in enumerate(sessions())],
        [d if i != 5 else [{"x": 1}] * 3 for i, d in enumerate(sessions())],
    ],
)
@pytest.mark.parametrize(
    "ttls",
    [
        None,
        [60_000] * 16,
        [60_000] * 15 + [60_000.0],  # equal to the others, a float
        [True] * 16,
        [1] * 16,
        [MAX_TTL_MS + 1] * 16,
        [60_000] * 15 + [0],
    ],
)
def test_a_writers_loop_of_sessions_as_one_by_one(values: list[Any], ttls: list[Any]) -> None:
    """The fast ways for a writer's loop (dicts with the same keys, one ttl for all) accept
    and refuse what the check of each operation does."""
    message = writers_loop(values, ttls)
    expected = outcome(reference_check, [0] * 16, message[6], values, "p", ttls)
    assert outcome(parse_ops, message) == expected


def test_a_writers_loop_of_one_ttl_shares_it() -> None:
    """A column of one ttl comes back as that int repeated: a store keeping a run of sessions
    holds one int for their ttls, not one each (28 bytes an operation)."""
    keys = [f"p.s{i}" for i in range(16)]
    frame = encode_ops(ORIGIN, 1, range(HLC, HLC + 16), [0] * 16, keys, sessions(), [60_000] * 16)
    [message] = FrameDecoder(1 << 20).feed(frame)
    assert message[8][0] is not message[8][1]  # (as decoded: an int each)
    ttls = parse_ops(message)[6]
    assert ttls == [60_000] * 16
    assert all(ttl is ttls[0] for ttl in ttls)
