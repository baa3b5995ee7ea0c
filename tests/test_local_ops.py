"""The writer's fast paths (``Collective.set`` of a session's dict, with or without a ttl)
agree with the general path: the same stored value, the same refusal, a private copy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cluster import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcollective import Collective

# Keys and members a session's dict may hold, and the ones ``clean_flat_dict`` leaves to the
# general check (non-ASCII, a lone surrogate, an int key, big and non-finite numbers, nesting).
_dict_keys = st.one_of(
    st.sampled_from(["u", "user", "n", "", "é", "\ud800", "a.b"]),
    st.text(max_size=4),
    st.integers(-2, 2),
)
_members = st.one_of(
    st.integers(-(10**19), 10**19),
    st.sampled_from([10**18, -(10**18), 10**4300, True, False, None, float("nan"), 1.5]),
    st.sampled_from([2**30 - 1, 2**30, -(2**30) + 1, -(2**30), 10**18 - 1, -(10**18) + 1]),
    st.text(max_size=6),
    st.sampled_from(["\ud800", "é", "ascii"]),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def fast_and_general():
    """Two lone members: the first takes ``set``'s fast path; the second has a watch, which
    sends every ``set`` down the general one."""
    nodes = [Collective(f"127.0.0.1:{free_port()}") for _ in range(2)]
    for node in nodes:
        node.start()
    nodes[1].watch("elsewhere", lambda *args: None)
    yield nodes
    for node in nodes:
        node.stop()


def _outcome(node: Collective, key: str, value: Any, ttl: float | None) -> Any:
    try:
        node.set(key, value, ttl=ttl)
    except Exception as exc:  # (compared with the other path's: the same class and text)
        return type(exc), str(exc)
    return None


def _typed(value: Any) -> str:
    """A text that tells apart what ``==`` does not (True from 1, 1.0 from 1)."""
    return json.dumps(value, sort_keys=True, default=repr) + repr(type(value))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, 5),
    st.dictionaries(_dict_keys, _members, max_size=4),
    st.sampled_from([None, 60, 0, -1, float("nan"), True]),
)
def test_a_session_set_takes_the_general_paths_outcome(
    fast_and_general: list[Collective], leaf: int, value: dict, ttl: Any
) -> None:
    fast, general = fast_and_general
    key = f"sessions.s{leaf}"
    expected = _outcome(general, key, value, ttl)
    assert _outcome(fast, key, value, ttl) == expected
    assert _typed(fast.get(key)) == _typed(general.get(key))
    if expected is None and value:
        value[next(iter(value))] = "changed by the caller"
        assert fast.get(key) == general.get(key)  # a private copy
    assert fast.snapshot() == general.snapshot()


def _incr_outcome(node: Collective, key: str, amount: Any, ttl: Any) -> Any:
    try:
        return _typed(node.incr(key, amount, ttl=ttl))
    except Exception as exc:
        return type(exc), str(exc)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, 3),
    st.one_of(
        st.integers(-(2**31), 2**31),
        st.sampled_from(
            [2**30 - 1, 2**30, -(2**30) + 1, -(2**30), 10**4299, 10**4300, True, 1.5, None]
        ),
    ),
    st.sampled_from([None, 60, 0, True, 2.5]),
)
def test_an_incr_takes_the_general_paths_outcome(
    fast_and_general: list[Collective], leaf: int, amount: Any, ttl: Any
) -> None:
    """``incr``'s fast path (an int amount, whole-second ttl inline) returns and refuses what
    the general path does, around the one-digit and the 4,300-digit bounds too."""
    fast, general = fast_and_general
    key = f"counters.c{leaf}"
    assert _incr_outcome(fast, key, amount, ttl) == _incr_outcome(general, key, amount, ttl)
    assert _typed(fast.get(key)) == _typed(general.get(key))


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**63 - 1), st.integers(-(2**40), 2**40))
def test_the_expiry_stamp_has_its_layout(hlc: int, origin: int, ttl_ms: int) -> None:
    """``expiry_stamp``'s four operations give the layout its docstring spells out: the
    expiry's millisecond, counter 0, bit 63 set over the origin's id."""
    from gcollective._clock import DERIVED_BIT, MILLIS_SHIFT, NODE_BITS, expiry_stamp

    stamp = (hlc << NODE_BITS) | origin
    expires = (stamp >> MILLIS_SHIFT) + ttl_ms
    assert expiry_stamp(stamp, ttl_ms) == (expires << MILLIS_SHIFT) | DERIVED_BIT | origin


def _scramble(value: Any) -> None:
    """Change every container in ``value`` (a value ``get`` returned) in place."""
    if type(value) is dict:
        for member in list(value.values()):
            _scramble(member)
        value["changed by the caller"] = 1
    elif type(value) is list:
        for member in value:
            _scramble(member)
        value.append("changed by the caller")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, 5),
    st.one_of(st.dictionaries(st.sampled_from(["u", "n", "x"]), _members, max_size=3), _members),
    st.sampled_from([None, 60]),
)
def test_a_get_returns_what_the_general_read_does_as_a_private_copy(
    fast_and_general: list[Collective], leaf: int, value: Any, ttl: Any
) -> None:
    """``get`` of a session's dict (copied inline, a dict of leaves, or through
    ``copy_value`` when a member is a container) returns what a full read of the tree
    (``snapshot``) holds there, and a copy: changing it at any depth changes nothing stored."""
    node = fast_and_general[0]
    key = f"reads.r{leaf}"
    if _outcome(node, key, value, ttl) is not None:
        return  # (refused: ``test_a_session_set_takes_the_general_paths_outcome``'s case)
    expected = _typed(node.snapshot()["reads"][f"r{leaf}"])
    got = node.get(key)
    assert _typed(got) == expected
    _scramble(got)
    assert _typed(node.get(key)) == expected
    assert _typed(node.snapshot()["reads"][f"r{leaf}"]) == expected


@pytest.mark.parametrize(
    "number",
    [
        2**30 - 1,
        2**30,
        -(2**30) + 1,
        -(2**30),
        10**18 - 1,
        10**18,
        -(10**18),
        10**4300,
        -(10**4300),
    ],
    ids=lambda number: f"{number.bit_length()}-bit{'-' if number < 0 else ''}",
)
@pytest.mark.parametrize("ttl", [None, 60])
def test_a_session_int_at_a_bound_takes_the_general_paths_outcome(
    fast_and_general: list[Collective], number: int, ttl: Any
) -> None:
    """``clean_flat_dict``'s int test (a one-digit int first, then the 18-digit bounds) at
    each of its bounds, and past the JSON limit either way: what the general path does."""
    fast, general = fast_and_general
    key = "sessions.bound"
    value = {"u": number, "v": "x"}
    assert _outcome(fast, key, value, ttl) == _outcome(general, key, value, ttl)
    assert _typed(fast.get(key)) == _typed(general.get(key))
