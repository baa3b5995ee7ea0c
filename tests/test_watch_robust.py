"""Watches that misbehave and many watches: a callback raising a BaseException, a cancel with
events queued, 10,000 watches registered. Members run in this process under gevent."""

from __future__ import annotations

import logging
import sys
import time

import gevent
import pytest
from cluster import wait_for
from gevent.event import Event

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


class Boom(BaseException):
    """Not an Exception: what an app's own control flow might raise."""


def test_a_callback_raising_a_base_exception_is_logged_and_the_watch_goes_on(members, caplog):
    a, b = members(2)
    calls = []

    def callback(key, value, op, origin):
        calls.append(key)
        raise Boom("not an Exception")

    handle = b.watch("k", callback)
    with caplog.at_level(logging.ERROR, logger="gcollective"):
        for i in range(200):
            a.set(f"k.{i}", i)
        wait_for(lambda: len(calls) == 200, what="every change delivered")
    assert handle.active and handle.failures == 200 and handle.pending == 0
    failed = [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert failed and failed[0].exc_info[0] is Boom
    a.set("k.last", 1)  # and it still gets what comes next
    wait_for(lambda: calls[-1] == "k.last", what="a change after the failures")


def test_a_callback_that_exits_cancels_its_watch_and_nothing_piles_up(members, caplog):
    a, b = members(2)

    def callback(key, value, op, origin):
        sys.exit(3)

    handle = b.watch("k", callback)
    with caplog.at_level(logging.ERROR, logger="gcollective"):
        a.set("k.0", 0)
        # gevent hands a greenlet's SystemExit to the main greenlet, as for any greenlet.
        with pytest.raises(SystemExit):
            wait_for(lambda: False, timeout=10, what="the SystemExit")
    assert not handle.active
    assert any("the watch is cancelled" in r.getMessage() for r in caplog.records)
    for i in range(1000):
        a.set(f"k.{i}", i)
    wait_for(lambda: b.get("k.999") == 999, what="replication")
    assert handle.pending == 0 and handle not in b._watches


def test_cancel_drops_what_is_queued(members):
    (a,) = members(1)
    release = Event()
    calls = []

    def slow(key, value, op, origin):
        calls.append(key)
        release.wait()

    handle = a.watch("k", slow)
    for i in range(100):
        a.set(f"k.{i}", i)
    wait_for(lambda: calls, what="the first delivery")
    assert handle.pending == 99
    handle.cancel()
    assert handle.pending == 0  # at once, not as the consumer gets to them
    release.set()
    wait_for(lambda: handle._greenlet.dead, what="the consumer ending")
    assert calls == ["k.0"]


def _set_seconds(node, count: int) -> float:
    began = time.perf_counter()
    for i in range(count):
        node.set(f"other.k{i}", i)
    seconds = time.perf_counter() - began
    gevent.sleep(0)
    return seconds


def test_a_set_costs_the_watches_on_its_path_not_all_of_them(members):
    (a,) = members(1)
    handles = [a.watch(f"w.{i}", lambda *event: None) for i in range(100)]
    few = min(_set_seconds(a, 2000) for _ in range(3))
    handles += [a.watch(f"w.{i}", lambda *event: None) for i in range(100, 10_000)]
    many = min(_set_seconds(a, 2000) for _ in range(3))
    # Scanning every watch made it ~100 times slower; generous for a loaded machine.
    assert many < 5 * few, (few, many)
    seen = []
    last = a.watch("w.5000", lambda *event: seen.append(event[:3]))
    a.set("w", {"5000": 1})  # above the prefix: reported at it
    a.set("w.5000.x", 2)
    wait_for(lambda: len(seen) == 2, what="the events")
    assert [e[0] for e in seen] == ["w.5000", "w.5000.x"]
    for handle in handles:
        handle.cancel()
    assert a._watch_at == {("w", "5000"): [last]} and a._watch_below == {("w",): [last]}
    last.cancel()
    assert not a._watch_at and not a._watch_below  # the index keeps nothing of them
