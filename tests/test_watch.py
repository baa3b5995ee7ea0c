"""Change listeners (``Collective.watch``): members run in this process under gevent."""

from __future__ import annotations

import copy
import logging

import gevent
import pytest
from cluster import free_ports, wait_for

import gcollective
from gcollective import DELETE, INCREMENT, SET, Collective

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


class Recorder:
    """A callback that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __call__(self, key, value, op, origin) -> None:
        self.events.append((key, value, op, origin))

    def changes(self):
        """The events without their origins."""
        return [event[:3] for event in self.events]


def test_local_and_remote_changes_reach_a_watch_with_their_origin(members):
    a, b = members(2)
    mine, theirs = Recorder(), Recorder()
    a.watch("users", mine)
    b.watch("users", theirs)
    a.set("users.1", {"name": "ann"})
    a.incr("users.1.visits", 2)
    a.delete("users.1.name")
    a.set("other", 1)  # not under the prefix
    expected = [
        ("users.1", {"name": "ann"}, SET),
        ("users.1.visits", 2, INCREMENT),
        ("users.1.name", None, DELETE),
    ]
    wait_for(lambda: len(mine.events) == 3 and len(theirs.events) == 3)
    assert mine.changes() == theirs.changes() == expected
    origin = f"{a.node_id:x}"
    assert {e[3] for e in mine.events} == {e[3] for e in theirs.events} == {origin}
    assert all(type(e[2]) is gcollective.Operation for e in theirs.events)
    b.incr("users.2", 5)
    wait_for(lambda: len(mine.events) == 4)
    assert mine.events[3] == ("users.2", 5, INCREMENT, f"{b.node_id:x}")


def test_prefix_semantics_both_directions(members):
    (a,) = members(1)
    deep, shallow, everything, other = Recorder(), Recorder(), Recorder(), Recorder()
    a.watch("a.b", deep)
    a.watch("a", shallow)
    a.watch("", everything)
    a.watch("ab", other)  # a prefix of the segment text, not of the path: never concerned
    a.set("a.b.c", 1)  # under both
    a.set("a", {"b": 7, "z": 1})  # above 'a.b': reported at 'a.b' with its new value
    a.set("a.z", 2)  # a sibling of 'a.b': only 'a' sees it
    a.delete("a")  # above 'a.b': it now holds nothing
    a.set(("a", "b", "x.y"), True)  # a segment with a dot: the key is a tuple
    wait_for(lambda: len(everything.events) == 5)
    wait_for(lambda: len(deep.events) == 4)
    assert deep.changes() == [
        ("a.b.c", 1, SET),
        ("a.b", 7, SET),
        ("a.b", None, DELETE),
        (("a", "b", "x.y"), True, SET),
    ]
    assert shallow.changes() == [
        ("a.b.c", 1, SET),
        ("a", {"b": 7, "z": 1}, SET),
        ("a.z", 2, SET),
        ("a", None, DELETE),
        (("a", "b", "x.y"), True, SET),
    ]
    assert everything.changes() == shallow.changes()
    assert other.events == []


def test_a_joining_member_sees_what_the_snapshot_merge_changed(members):
    # No spare: c joins on an address a and b do not list, so nothing they wrote waits in a
    # queue for it and everything reaches it by the snapshot (with a listed spare, their
    # queued writes race it: see the next test).
    a, b = members(2)
    a.set("users.1", {"name": "ann", "tags": ["x"]})
    a.set("users.2", "bob")
    b.set("hits", 3)
    wait_for(lambda: a.snapshot() == b.snapshot() and b.get("users.2") == "bob")
    users, everything = Recorder(), Recorder()
    c = members.join(users=users, **{"": everything})
    wait_for(lambda: c.synced and len(users.events) == 1 and len(everything.events) == 2)
    # 'users' was missing before the merge: one SET of the whole new value at the prefix.
    merged = {"1": {"name": "ann", "tags": ["x"]}, "2": "bob"}
    assert users.changes() == [("users", merged, SET)]
    assert sorted(everything.changes()) == [("hits", 3, SET), ("users", merged, SET)]
    assert {e[3] for e in everything.events} == {gcollective.SNAPSHOT_ORIGIN}
    # After the merge, ordinary operations come as themselves.
    a.delete("users.2")
    wait_for(lambda: len(users.events) == 2)
    assert users.events[1] == ("users.2", None, DELETE, f"{a.node_id:x}")


def _replay(events: list[tuple]) -> dict:
    """The tree that a watch on everything describes, rebuilt from its events."""
    tree: dict = {}
    for key, value, op, _ in events:
        path = key.split(".") if isinstance(key, str) else list(key)
        parent = tree
        for segment in path[:-1]:
            parent = parent.setdefault(segment, {})
        if op == DELETE:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = copy.deepcopy(value)  # the tree is changed in place later
    return tree


def test_a_listed_joiner_sees_each_change_whichever_way_it_arrives(members):
    """A joiner the others list gets their writes made before it was up from their queues,
    as ordinary operations, as well as from the snapshot: either may come first, and its watch
    reports what each one changed, so the events still add up to the state."""
    a, b = members(2, spare=1)
    a.set("users.1", {"name": "ann"})
    a.set("users.2", "bob")
    b.set("hits", 3)
    wait_for(lambda: a.snapshot() == b.snapshot() and b.get("users.2") == "bob")
    everything = Recorder()
    c = members.join(**{"": everything})
    wait_for(lambda: c.synced and _replay(everything.events) == a.snapshot() == c.snapshot())
    origins = {f"{a.node_id:x}", f"{b.node_id:x}", gcollective.SNAPSHOT_ORIGIN}
    assert {e[3] for e in everything.events} <= origins


def test_snapshot_differences_include_deleted_keys():
    """A merge that removes keys under the prefix reports each as a DELETE (at the level
    where old and new stop being dicts), and one that changes nothing reports nothing."""
    from gcollective._watches import _diff

    out: list = []
    _diff(("a",), {"x": 1, "y": {"p": 1}, "z": 2}, {"x": 1, "y": 5}, out)
    assert out == [(("a", "y"), 5, SET), (("a", "z"), None, DELETE)]
    out = []
    _diff(("a",), {"x": 1}, {"x": 1.0}, out)  # 1 and 1.0 are different JSON
    assert out == [(("a", "x"), 1.0, SET)]
    out = []
    _diff(("a",), {"x": [1, {"q": 2}]}, {"x": [1, {"q": 2}]}, out)
    assert out == []


def test_events_arrive_in_the_order_applied(members):
    a, b = members(2)
    seen = Recorder()
    b.watch("counter", seen)
    for i in range(200):
        a.set("counter", i)
        if i % 50 == 0:
            gevent.sleep(0)
    wait_for(lambda: len(seen.events) == 200)
    assert [e[1] for e in seen.events] == list(range(200))


def test_a_slow_callback_does_not_stall_replication(members):
    a, b = members(2)
    release = gevent.event.Event()
    calls = []

    def slow(key, value, op, origin):
        calls.append(key)
        release.wait()

    handle = b.watch("k", slow)
    for i in range(50):
        a.set(("k", str(i)), i)
    wait_for(lambda: len(b.get("k", {})) == 50)  # replicated though the callback blocks
    b.set("k.local", 1)  # and local writes do not wait either
    assert calls == ["k.0"] and handle.pending == 50
    release.set()
    wait_for(lambda: len(calls) == 51)
    assert handle.pending == 0


def test_a_raising_callback_is_logged_and_the_watch_goes_on(members, caplog):
    (a,) = members(1)
    seen = []

    def flaky(key, value, op, origin):
        if value == "boom":
            raise RuntimeError("callback bug")
        seen.append(value)

    handle = a.watch("x", flaky)
    with caplog.at_level(logging.ERROR, logger="gcollective"):
        a.set("x", 1)
        a.set("x", "boom")
        a.set("x", 2)
        wait_for(lambda: seen == [1, 2])
    failures = [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert handle.failures == 1 and handle.active


def test_cancel_stops_delivery_even_of_queued_events(members):
    a, b = members(2)
    seen = Recorder()
    handle = b.watch("x", seen)
    a.set("x", 1)
    wait_for(lambda: len(seen.events) == 1)
    witness = Recorder()
    witness_handle = b.watch("x", witness)
    handle.cancel()
    handle.cancel()  # idempotent
    assert not handle.active
    a.set("x", 2)
    wait_for(lambda: len(witness.events) == 1)  # the change reached b's watches
    wait_for(lambda: handle._greenlet.dead)  # the cancelled one's deliverer ended: no more
    assert len(seen.events) == 1
    witness_handle.cancel()
    assert b._watches == []  # nothing left to check on the data paths

    # Cancelling from inside the callback drops what was queued behind it.
    calls = []

    def once(key, value, op, origin):
        calls.append(value)
        inner.cancel()

    inner = b.watch("y", once)
    for i in range(5):
        b.set("y", i)
    wait_for(lambda: inner._greenlet.dead)  # its deliverer ended: nothing more can come
    assert calls == [0]


def test_module_level_watch_uses_the_default_node():
    (port,) = free_ports(1)
    gcollective.start(f"127.0.0.1:{port}")
    try:
        seen = Recorder()
        handle = gcollective.watch("a", seen)
        gcollective.set("a.b", 1)
        wait_for(lambda: seen.changes() == [("a.b", 1, SET)])
        handle.cancel()
    finally:
        gcollective.stop()
    with pytest.raises(gcollective.NotStartedError):
        gcollective.watch("a", seen)
    with pytest.raises(TypeError):
        Collective(f"127.0.0.1:{port}").watch("a", None)
