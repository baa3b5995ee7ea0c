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
from gcollective._wire import MAX_TTL_MS, check_op_values, parse_ops

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
    st.sampled_from([0, 60_000, 1, MAX_TTL_MS, MAX_TTL_MS + 1, -1]),
    st.sampled_from([1.5, True, None, "1"]),
)


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
    drawn = draw(st.lists(values, min_size=size, max_size=size))
    column = [None if op == 2 else value for op, value in zip(ops, drawn)]
    ttls = None
    if draw(st.booleans()):
        ttls = draw(st.lists(st.sampled_from([0, 60_000]), min_size=size, max_size=size))
        if draw(st.booleans()):
            ttls[draw(st.integers(0, size - 1))] = draw(ttl_values)
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
    is accepted, at the limit refused, as ``_check_json`` says."""
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
