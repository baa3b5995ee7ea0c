"""What a gunicorn worker (``gcollective.gunicorn``) watches while it hands its data on at
exit: its peers' connections and incarnations (``_PeerAges``, ``_SuccessorWatch``), and its
master's listening sockets, which tell a shutdown from a reload (``_MasterSockets``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent

from ._validate import format_address

if TYPE_CHECKING:
    from ._node import Collective

_HANDOFF_SETTLE = 0.3  # seconds a successor must have been seen before it counts


def _peer_views(node: Collective) -> dict[str, dict[str, Any]]:
    """Per-peer state, as in ``node.stats()["peers"]`` (empty if this core has no
    ``stats()``). Read in the exit signal's handler and every half second, so from the
    peers-only view where the node has one: the whole ``stats()`` also builds the member,
    DNS and store views (the watch took 18-20 us of CPU, now 9.4-9.6: 7 peers, 20,000 keys)."""
    peers_stats = getattr(node, "_peers_stats", None)
    stats = getattr(node, "stats", None)
    try:
        if peers_stats is not None:
            peers = peers_stats()
        elif stats is not None:
            peers = stats().get("peers", {})
        else:
            return {}
    except Exception:  # a view for a wait with a timeout: never worth failing the exit
        return {}
    return peers if isinstance(peers, dict) else {}


def _connected_peers(node: Collective) -> list[str]:
    return [name for name, view in _peer_views(node).items() if view.get("state") == "connected"]


def _incarnation(view: dict[str, Any]) -> tuple[object, object]:
    # A new process at an address has a new node id; a new connection bumps `connects`.
    return view.get("peer_id"), view.get("connects")


def _given(view: dict[str, Any]) -> int:
    return int(view.get("relayed_frames") or 0) + int(view.get("snapshots_sent") or 0)


class _PeerAges:
    """Since when each peer's current incarnation has been connected to this node.

    A member that joined moments ago may not hold the data yet (its catch-up takes a few
    version-vector reports), so the handoff trusts only peers that have been around a while.
    """

    def __init__(self, node: Collective) -> None:
        self.node = node
        self.since: dict[str, tuple[object, float]] = {}
        interval = getattr(node, "sync_interval", 1.0)
        self.settled = 2.5 * (interval if isinstance(interval, (int, float)) else 1.0)

    def sample(self) -> None:
        now = time.monotonic()
        for name, view in _peer_views(self.node).items():
            peer = view.get("peer_id")
            if view.get("state") != "connected" or peer is None:
                self.since.pop(name, None)
            elif self.since.get(name, (None, 0.0))[0] != peer:
                self.since[name] = (peer, now)

    def run(self) -> None:
        while self.node.running:
            self.sample()
            gevent.sleep(0.5)

    def settled_peers(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Those of ``addresses`` whose member has been connected long enough to be caught up."""
        self.sample()
        now = time.monotonic()
        return [
            address
            for address in addresses
            if now - self.since.get(format_address(address), (None, now))[1] >= self.settled
        ]


class _SuccessorWatch:
    """Tells when a member that connected after the watch began has caught up with this node.

    A successor counts once it is connected, nothing is queued for it, and either this node
    sent it operations or a snapshot since it appeared, or long enough passed (a few version
    vector reports) for it to have asked for anything it lacked.

    The watch must begin when the worker is told to exit (``handle_exit``), not when its
    handoff starts: gunicorn's run loop notices the exit only after up to a second (more on
    a busy machine) and then drains requests, and meanwhile a lower slot's worker may leave
    and its successor connect and merge this node's state. Begun later, the watch counts
    that successor among the members that were already there and waits for another.
    """

    def __init__(self, node: Collective) -> None:
        self.node = node
        views = _peer_views(node)
        self.baseline = {name: _incarnation(view) for name, view in views.items()}
        self.given = {name: _given(view) for name, view in views.items()}
        self.first_seen: dict[str, float] = {}
        interval = getattr(node, "sync_interval", 1.0)
        self.quiet = 2.5 * (interval if isinstance(interval, (int, float)) else 1.0)

    def caught_up(self) -> bool:
        now = time.monotonic()
        for name, view in _peer_views(self.node).items():
            if view.get("peer_id") is None or _incarnation(view) == self.baseline.get(name):
                continue
            seen_at = self.first_seen.setdefault(name, now)
            if view.get("state") != "connected" or view.get("queued_frames"):
                continue
            if _given(view) > self.given.get(name, 0) and now - seen_at >= _HANDOFF_SETTLE:
                return True
            if now - seen_at >= self.quiet:
                return True
        return False


# -- telling a shutdown from a reload ----------------------------------------------------------
#
# A worker gets SIGTERM both when gunicorn shuts down and when a HUP reload (or TTOU) retires
# it, and only a reload brings new workers to hand the data to. gunicorn's arbiter tells them
# apart by the order it acts in: ``Arbiter.stop()`` closes its listening sockets
# (``sock.close_sockets(self.LISTENERS, ...)``) *before* it signals the workers, while
# ``reload()`` keeps them (or opens new ones when the bind address changed) and spawns the
# new workers first. The worker shares the master's listeners (inherited at fork), so it
# reads the master's open sockets in /proc/<master>/fd: when the master no longer holds any
# of them, nor any socket it did not hold when this worker booted, it is shutting down.
# Anything this cannot see keeps the handoff: no /proc (not Linux), a master this worker
# may not inspect (gunicorn ``--user``), workers with their own sockets (``reuse_port``: the
# master never held this worker's listener), and a USR2 re-exec: the old master closes its
# listeners when it is stopped, but the new master it started keeps serving and its
# workers may be waiting for the slots the old ones free, so they need the handoff.


def _socket_inodes(pid: int) -> frozenset[int] | None:
    """The inodes of the sockets process ``pid`` holds (None if /proc cannot tell)."""
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            target = os.readlink(f"{directory}/{name}")
        except OSError:
            continue  # (closed meanwhile)
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[8:-1]))
    return frozenset(inodes)


def _own_inodes(sockets: list[Any]) -> frozenset[int]:
    inodes = set()
    for sock in sockets:
        try:
            inodes.add(os.fstat(sock.fileno()).st_ino)
        except (OSError, ValueError):
            continue
    return frozenset(inodes)


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None  # (gone meanwhile)


def _has_reexecuted_child(master: int) -> bool | None:
    """True if a child of ``master`` is a master it re-executed (USR2: gunicorn gives the
    new master ``GUNICORN_PID=<old master>``); None if /proc cannot tell."""
    marker = b"GUNICORN_PID=%d" % master
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if _parent_of(pid) != master:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if marker in environ.read().split(b"\0"):
                    return True
        except (FileNotFoundError, ProcessLookupError):
            continue  # (gone meanwhile, or a zombie: a worker that just exited)
        except OSError:
            return None
    return False


@dataclass(frozen=True)
class _MasterSockets:
    """What the master held when this worker booted: the shutdown check's baseline."""

    master: int
    #: This worker's listeners that the master held too.
    listeners: frozenset[int]
    #: Every socket the master held.
    held: frozenset[int]

    @classmethod
    def observe(cls, master: int, sockets: list[Any]) -> _MasterSockets | None:
        """The baseline, or None if the check cannot be made (see above)."""
        held = _socket_inodes(master)
        if held is None:
            return None
        listeners = _own_inodes(sockets) & held
        return cls(master, listeners, held) if listeners else None

    def may_kill(self) -> bool:
        """False only while the master still holds this worker's listeners (a reload or
        TTOU: gunicorn then never kills a worker that heartbeats); True once it closed them
        (``Arbiter.stop()``, which SIGKILLs the workers still there after
        ``graceful_timeout``: a shutdown, or the old master's stop after a USR2), or when
        /proc cannot tell."""
        now = _socket_inodes(self.master)
        return now is None or not now & self.listeners

    def shutting_down(self) -> bool:
        """True only if the master closed its listeners for good: gunicorn stops."""
        now = _socket_inodes(self.master)
        if now is None or now & self.listeners or not now <= self.held:
            return False
        return _has_reexecuted_child(self.master) is False


# -- the worker --------------------------------------------------------------------------------
