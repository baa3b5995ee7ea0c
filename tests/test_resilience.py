"""A node's own failures and its lifecycle: no background greenlet dies silently, a failed
start can be retried, a member listed under another spelling of its own address stops being
dialled. Members run in this process under gevent, over real sockets."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import gevent
import pytest
from cluster import ROOT, free_port, free_ports, wait_for

from gcollective import Collective, NotStartedError, _engine

FAST = {"sync_interval": 0.05, "backoff_max": 0.2}


class Fault:
    """Makes ``owner.name`` raise once (in ``greenlet()``'s greenlet only, if given), then
    behave as before; counts the calls after the failure."""

    def __init__(
        self,
        monkeypatch: Any,
        owner: Any,
        name: str,
        greenlet: Callable[[], Any] | None = None,
    ) -> None:
        self.original = getattr(owner, name)
        self.greenlet = greenlet
        self.failed = False
        self.calls_after = 0
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            self.calls_after += 1
        elif self.greenlet is None or gevent.getcurrent() is self.greenlet():
            self.failed = True
            raise RuntimeError("injected fault")
        return self.original(*args, **kwargs)


def _inject(where: str, monkeypatch: Any, a: Collective, b: Collective) -> Fault:
    """A fault in ``a``'s ``where`` (``b``'s reader of ``a`` for "reader")."""
    if where == "writer":  # PROGRESS is built in the writer's loop, every sync_interval
        link = a._links[b.local]
        return Fault(monkeypatch, a._engine, "progress_frame", lambda: link.greenlet)
    if where == "reader":
        return Fault(monkeypatch, b._engine, "apply_ops")
    if where == "flush":
        return Fault(monkeypatch, _engine, "encode_batch")
    if where == "sweep":
        return Fault(monkeypatch, a._store, "collect")
    assert where == "expirer"
    return Fault(monkeypatch, a._store, "advance", lambda: a._expirer)


@pytest.mark.parametrize("where", ["writer", "reader", "flush", "sweep", "expirer"])
def test_an_unexpected_error_is_logged_counted_and_replication_resumes(
    members, caplog, monkeypatch, where
):
    a, b = members(2)
    a.set("before", 1)
    wait_for(lambda: b.get("before") == 1, what="the first set")
    deleted: list[Any] = []
    a.watch("during", lambda key, value, op, origin: deleted.append(op.name))
    connects = a.stats()["peers"][b.stats()["address"]]["connects"]
    fault = _inject(where, monkeypatch, a, b)
    with caplog.at_level(logging.ERROR, logger="gcollective"):
        a.set("during", 1, ttl=0.3 if where == "expirer" else None)
        wait_for(lambda: fault.failed, what=f"the fault in the {where}")
        errors = wait_for(
            lambda: [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info],
            what="an ERROR with its traceback",
        )
    assert "injected fault" in str(errors[0].exc_info[1])
    erring = b if where == "reader" else a
    stats = erring.stats()
    assert stats["internal_errors"] == 1
    assert "RuntimeError: injected fault" in stats["last_internal_error"]

    # Replication goes on, what the failure held up included, and a member joining later
    # gets all of it.
    a.set("after", 2)
    wait_for(lambda: b.get("after") == 2, what="a set after the fault")
    if where == "expirer":
        wait_for(lambda: "DELETE" in deleted, what="the expiry, with nobody reading")
        wait_for(lambda: b.get("during") is None, what="the expiry on the other member")
    else:
        wait_for(lambda: b.get("during") == 1, what="the set the fault held up")
    if where == "writer":
        peer = a.stats()["peers"][b.stats()["address"]]
        assert peer["connects"] > connects and "internal error" in peer["last_error"]
        wait_for(lambda: a._links[b.local].state == "connected", what="the writer redialled")
    if where == "sweep":
        wait_for(lambda: fault.calls_after >= 2, what="the sweep running again")
    c = members.join()
    expected = {"before": 1, "after": 2}
    if where != "expirer":
        expected["during"] = 1
    wait_for(lambda: c.snapshot() == expected == a.snapshot() == b.snapshot(), what="joiner")


# -- lifecycle --------------------------------------------------------------------------------


def test_a_start_that_fails_leaves_a_node_that_can_start_again():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    node = Collective(f"127.0.0.1:{port}", **FAST)
    with pytest.raises(OSError):
        node.start(timeout=1)
    assert not node.running
    for write in (lambda: node.set("a", 1), lambda: node.incr("a"), lambda: node.delete("a")):
        with pytest.raises(NotStartedError, match="not running"):
            write()
    node.stop()  # a no-op, not an error
    taken.close()
    node.start(timeout=1)
    try:
        assert node.running
        node.set("a", 1)
        assert node.get("a") == 1
    finally:
        node.stop()
    assert not node.running


def test_a_never_started_node_says_so():
    node = Collective(f"127.0.0.1:{free_port()}")
    with pytest.raises(NotStartedError) as refused:
        node.set("a", 1)
    assert "start()" in str(refused.value) and "process" not in str(refused.value)


@pytest.mark.parametrize("protocol", ["gcollective", "collective.js"])
def test_stop_releases_a_start_still_waiting_for_a_peer(protocol):
    silent = socket.socket()  # takes connections (the kernel's backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    peers = [silent.getsockname()]
    node = Collective(f"127.0.0.1:{free_port()}", peers, protocol=protocol, **FAST)
    try:
        starting = gevent.spawn(node.start, timeout=20)
        # Connected, and asked for its state: a snapshot (native) or an Accept (New sent).
        if protocol == "gcollective":
            asked = lambda: node._snapshot_link  # noqa: E731
        else:
            asked = node._announced.is_set
        wait_for(asked, what="asking the peer for its state")
        assert not starting.dead  # waiting for an answer that never comes
        began = time.monotonic()
        node.stop()
        starting.join(timeout=5)
        assert starting.dead and starting.successful()
        assert time.monotonic() - began < 3
    finally:
        node.stop()
        silent.close()


@pytest.mark.parametrize("protocol", ["gcollective", "collective.js"])
def test_stop_returns_when_a_connection_handler_is_slow_to_die(protocol):
    # A handler busy in its cleanup (a saturated machine, 64 members) outlived the second
    # stop() gives it, and the kill's timeout escaped from stop() as gevent.Timeout.
    node = Collective(f"127.0.0.1:{free_port()}", protocol=protocol, **FAST)
    node.start(timeout=0)

    def slow_to_die() -> None:
        try:
            gevent.sleep(30)
        except gevent.GreenletExit:
            gevent.sleep(1.5)

    handler = gevent.spawn(slow_to_die)
    node._handlers.add(handler)
    gevent.sleep(0)  # (it runs, and sleeps)
    began = time.monotonic()
    try:
        node.stop()
        assert time.monotonic() - began < 5 and not node.running
    finally:
        handler.kill(block=False)


def test_watch_is_refused_on_a_stopped_node():
    with Collective(f"127.0.0.1:{free_port()}") as node:
        node.watch("a", lambda *event: None)
    with pytest.raises(NotStartedError):
        node.watch("a", lambda *event: None)


def test_watch_is_refused_in_a_forked_child():
    code = (
        "import os, gcollective\n"
        f"node = gcollective.Collective('127.0.0.1:{free_port()}')\n"
        "node.start()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        node.watch('a', print)\n"
        "    except gcollective.NotStartedError:\n"
        "        os._exit(0)\n"
        "    os._exit(1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0\n"
        "node.watch('a', print).cancel()\n"
        "node.stop()\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)


def test_a_member_listed_under_another_spelling_of_its_own_address_stops_dialling_it(caplog):
    # (An address, not a name: a name resolving to the member's own address is skipped before
    # any dial, see tests/test_discovery.py. Listening on every interface, the member is
    # reached at 127.0.0.1 too.)
    port, other = free_ports(2)
    spellings = [f"127.0.0.1:{port}", f"127.0.0.1:{other}"]
    with caplog.at_level(logging.INFO, logger="gcollective"):
        a = Collective(f"0.0.0.0:{port}", spellings, **FAST)
        b = Collective(f"127.0.0.1:{other}", [f"127.0.0.1:{port}"], **FAST)
        a.start(timeout=5)
        b.start(timeout=5)
        try:
            alias = ("127.0.0.1", port)
            link = a._links.get(alias)
            if link is not None:  # (it may have been found out during start() already)
                wait_for(lambda: link.greenlet.dead, what="the writer to itself ending")
            assert alias not in a._links and alias not in a.stats()["peers"]
            a.set("x", 1)
            wait_for(lambda: b.get("x") == 1, what="replication to the real peer")
            b.set("y", 2)
            wait_for(lambda: a.get("y") == 2, what="replication from the real peer")
        finally:
            a.stop()
            b.stop()
    itself = [r for r in caplog.records if "is this node itself" in r.getMessage()]
    assert len(itself) == 1 and itself[0].levelno == logging.WARNING
    refused = [r for r in caplog.records if "connected to itself" in r.getMessage()]
    assert len(refused) == 1
