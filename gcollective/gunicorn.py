"""A gunicorn gevent worker whose processes share one gcollective tree.

Run an app with ``gunicorn -k gcollective.gunicorn.GeventWorker app:app`` (or
``-k egg:gcollective#gevent``). Each worker process becomes a member of the collective and
its module-level default node, so the app just calls ``gcollective.get/set/incr/delete``.

Lifecycle, on top of gunicorn's own gevent worker:

- The node starts in the worker process only, after gunicorn patched the standard library
  and re-initialised the hub, before the app is loaded and before any request is served.
  Nothing runs in the master, and nothing at ``--preload`` import time.
- Each worker claims a *slot*: it listens on the first free address of this server's slot
  list (``GCOLLECTIVE_BASE_PORT + 0 .. SLOTS - 1``). A worker that dies frees its slot and
  its replacement takes it again, so peers reconnect to the same address. While old workers
  of a ``kill -HUP`` still hold every slot, new workers wait for one (heartbeating, so the
  arbiter does not time them out).
- On a graceful exit (SIGTERM, max-requests recycling, HUP, TTOU) the worker first finishes
  its requests, then hands its data on before stopping the node with a flush: it leaves at
  once when a member on another server, or a higher slot on this one, answers; otherwise it
  is the last holder here and waits (``GCOLLECTIVE_HANDOFF_TIMEOUT``) until a new worker has
  taken its state. SIGQUIT / SIGINT (quick shutdown) only flush, and so does SIGTERM when
  gunicorn shuts down (its master closed its listeners: see ``_MasterSockets``), since no
  new worker will come.

Configuration comes from the environment (``gunicorn -e NAME=value`` or ``raw_env``); see
``settings_from_env``. A bad value fails the worker's boot with a message naming the
variable, which stops gunicorn ("Worker failed to boot").
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import gevent
from gevent import socket as gsocket

import gcollective

from ._discovery import is_name
from ._errors import DataDirLocked
from ._options import MAX_MEMBERS_LIMIT, MIN_RESOLVE_INTERVAL
from ._validate import (
    MAX_SECONDS,
    MIN_SECONDS,
    check_seconds,
    format_address,
    is_ascii_digits,
    parse_address,
)

try:
    from gunicorn.workers import ggevent as _ggevent
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "gcollective.gunicorn needs gunicorn: pip install 'gcollective[gunicorn]'"
    ) from exc

if TYPE_CHECKING:
    from gevent.pywsgi import WSGIServer

    from ._node import Collective

__all__ = [
    "DEFAULT_BASE_PORT",
    "DEFAULT_HANDOFF_TIMEOUT",
    "DEFAULT_HOSTS",
    "DEFAULT_START_TIMEOUT",
    "ConfigError",
    "GeventWorker",
    "Settings",
    "parse_count",
    "parse_hosts",
    "parse_peers",
    "parse_port",
    "parse_seconds",
    "settings_from_env",
]

DEFAULT_HOSTS = ("127.0.0.1",)
DEFAULT_BASE_PORT = 9400
DEFAULT_START_TIMEOUT = 10.0
DEFAULT_HANDOFF_TIMEOUT = 5.0

#: Environment variable the worker sets to its slot number, for the app and its logs.
SLOT_VARIABLE = "GCOLLECTIVE_WORKER_SLOT"

_WILDCARDS = {"0.0.0.0", "::", "*"}
_PROBE_TIMEOUT = 0.5  # seconds for one "does anyone listen there?" connection
_REJOINS = 2  # times a worker joins again when connected peers sent it no state
_HANDOFF_SETTLE = 0.3  # seconds a successor must have been seen before it counts
# Seconds kept, before gunicorn's SIGKILL (``graceful_timeout`` after its SIGTERM), for the
# node's final flush and stop and the process's exit. The flush and stop took 0-2 ms with one
# peer at load 6 (2 cores; the "left slot" log line says how long); the margin is for a peer
# whose writer still has a burst to send, the interpreter's exit, and a signal handled late
# by a starved worker (its arrival here is the only start of the countdown it can see).
_STOP_RESERVE = 1.0


class ConfigError(ValueError):
    """A ``GCOLLECTIVE_*`` variable has a bad value; ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


# -- configuration: pure functions over the environment ---------------------------------------


def parse_hosts(text: str, variable: str = "GCOLLECTIVE_HOSTS") -> list[str]:
    """Comma-separated host names or addresses (IPv6 may be bracketed), no ports."""
    hosts: list[str] = []
    for raw in text.split(","):
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ConfigError(variable, f"empty host in {text!r}")
        if host.count(":") == 1:
            raise ConfigError(
                variable,
                f"{raw.strip()!r} has a port: list hosts only (ports come from "
                "GCOLLECTIVE_BASE_PORT), or give full addresses in GCOLLECTIVE_PEERS",
            )
        if any(ch.isspace() for ch in host) or "/" in host:
            raise ConfigError(variable, f"{raw.strip()!r} is not a host name or address")
        if host in hosts:
            raise ConfigError(variable, f"{host!r} is listed twice")
        hosts.append(host)
    return hosts


def parse_port(text: str, variable: str) -> int:
    """A TCP port number, 1-65535."""
    value = text.strip()
    if not is_ascii_digits(value) or not 0 < int(value) < 65536:
        raise ConfigError(variable, f"{text!r} is not a port number (1-65535)")
    return int(value)


def parse_count(text: str, variable: str) -> int:
    """A whole number of at least 1."""
    value = text.strip()
    if not is_ascii_digits(value) or int(value) < 1:
        raise ConfigError(variable, f"{text!r} is not a whole number of at least 1")
    return int(value)


def parse_seconds(text: str, variable: str, *, least: float = MIN_SECONDS) -> float:
    """A finite number of seconds from ``least`` (by default the least every option in
    seconds has, see ``check_seconds``) to ``MAX_SECONDS``."""
    try:
        return check_seconds(variable, float(text.strip()), least)
    except ValueError:
        raise ConfigError(
            variable, f"{text!r} is not a number of seconds from {least:g} to {MAX_SECONDS:g}"
        ) from None


def parse_peers(text: str, variable: str = "GCOLLECTIVE_PEERS") -> list[tuple[str, int]]:
    """Comma-separated ``host:port`` addresses (``[v6]:port`` for IPv6), each once."""
    peers: list[tuple[str, int]] = []
    for raw in text.split(","):
        if not raw.strip():
            raise ConfigError(variable, f"empty address in {text!r}")
        try:
            address = parse_address(raw.strip())
        except ValueError as exc:
            raise ConfigError(variable, str(exc)) from None
        if address in peers:
            raise ConfigError(variable, f"{raw.strip()!r} is listed twice")
        peers.append(address)
    return peers


@dataclass(frozen=True)
class Settings:
    """What a worker needs to join: where it may listen and whom it talks to."""

    #: The host this server's workers bind and advertise.
    bind: str
    #: This server's addresses in slot order; a worker listens on the first free one.
    slots: tuple[tuple[str, int], ...]
    #: Every member's address on every server (this server's slots included).
    peers: tuple[tuple[str, int], ...]
    #: Passed to ``gcollective.start`` as ``secret=`` when set (never shown by ``repr``).
    secret: str | None = field(default=None, repr=False)
    #: Seconds ``gcollective.start`` may wait for a live peer's state.
    start_timeout: float = DEFAULT_START_TIMEOUT
    #: Seconds the last holder of the data on this server waits on exit for a successor.
    handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT
    #: With ``GCOLLECTIVE_METRICS_PORT``: slot i serves its Prometheus metrics on this + i.
    metrics_port: int | None = None
    #: With ``GCOLLECTIVE_DATA_DIR``: slot i keeps its data in its subdirectory ``slot-<i>``.
    data_dir: str | None = None
    #: ``GCOLLECTIVE_RESOLVE_INTERVAL`` and ``GCOLLECTIVE_MAX_MEMBERS``, passed on when set.
    resolve_interval: float | None = None
    max_members: int | None = None


def _is_local_host(host: str) -> bool:
    """True if this machine can listen on ``host`` (so it is one of its addresses)."""
    try:
        infos = gsocket.getaddrinfo(host, 0, 0, gsocket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with gsocket.socket(family, kind, proto) as sock:
                sock.bind(sockaddr)
            return True
        except OSError:
            continue
    return False


def _choose_bind(
    env: Mapping[str, str], hosts: list[str], source: str, is_local: Callable[[str], bool]
) -> str:
    bind = env.get("GCOLLECTIVE_BIND", "").strip()
    if bind:
        if bind.startswith("[") and bind.endswith("]"):
            bind = bind[1:-1]
        if bind in _WILDCARDS:
            raise ConfigError(
                "GCOLLECTIVE_BIND",
                f"{bind!r} is a wildcard; give the address peers reach this server at",
            )
        if bind not in hosts and not any(map(is_name, hosts)):
            # (A DNS name among the hosts, such as a headless service, stands for this
            # server's address too: the bind is then one of its addresses.)
            raise ConfigError(
                "GCOLLECTIVE_BIND", f"{bind!r} is not among the hosts of {source} ({hosts})"
            )
        return bind
    if len(hosts) == 1:
        return hosts[0]
    local = [host for host in hosts if is_local(host)]
    if len(local) == 1:
        return local[0]
    if not local:
        raise ConfigError(
            "GCOLLECTIVE_BIND",
            f"not set, and none of the hosts of {source} ({hosts}) is an address of this "
            "machine; set it to this server's host as spelled there",
        )
    raise ConfigError(
        "GCOLLECTIVE_BIND",
        f"not set, and several hosts of {source} are addresses of this machine ({local}); "
        "set it to the one this server uses",
    )


def settings_from_env(
    env: Mapping[str, str],
    workers: int,
    *,
    is_local: Callable[[str], bool] = _is_local_host,
) -> Settings:
    """Read the ``GCOLLECTIVE_*`` variables of ``env`` for a server running ``workers``.

    - ``GCOLLECTIVE_HOSTS``: every server, comma-separated (default ``127.0.0.1``).
    - ``GCOLLECTIVE_BASE_PORT``: the port of slot 0 (default 9400); slot i is base + i.
    - ``GCOLLECTIVE_SLOTS``: slots per server (minimum: ``workers``; default ``workers``, and
      2 for a single worker, whose successor needs a free slot on a HUP). Set it to the most
      workers any server runs, TTIN included.
    - ``GCOLLECTIVE_PEERS``: every member's ``host:port`` instead of the three above; this
      server's slots are the entries whose host is ``GCOLLECTIVE_BIND``, in order.
    - ``GCOLLECTIVE_BIND``: this server's host as spelled in the list; needed only when
      several listed hosts are addresses of this machine or none is.
    - ``GCOLLECTIVE_SECRET``: passed on as ``secret=`` when set.
    - ``GCOLLECTIVE_START_TIMEOUT`` (default 10) and ``GCOLLECTIVE_HANDOFF_TIMEOUT``
      (default 5, 0 disables the wait): seconds, see ``Settings``.
    - ``GCOLLECTIVE_METRICS_PORT``: when set, the worker in slot i serves its Prometheus
      metrics on this server's host at this port + i (needs ``gcollective[metrics]``).
    - ``GCOLLECTIVE_DATA_DIR``: when set, the worker in slot i keeps its data in
      ``slot-<i>`` under it (``data_dir``), and hands nothing over when it leaves.
    - ``GCOLLECTIVE_RESOLVE_INTERVAL`` and ``GCOLLECTIVE_MAX_MEMBERS``: passed on as
      ``resolve_interval`` and ``max_members`` when set. A host in ``GCOLLECTIVE_HOSTS`` or
      ``GCOLLECTIVE_PEERS`` may be a DNS name standing for several servers (a headless
      service); ``GCOLLECTIVE_BIND`` is then this server's address, which need not be listed.

    Raises ``ConfigError`` naming the variable at fault.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int of at least 1, not {workers!r}")
    if _set(env, "GCOLLECTIVE_PEERS") is not None:
        bind, slots, peers = _addresses_from_peers(env, workers, is_local)
    else:
        bind, slots, peers = _addresses_from_hosts(env, workers, is_local)
    secret = env.get("GCOLLECTIVE_SECRET")
    if secret is not None and not secret:
        raise ConfigError("GCOLLECTIVE_SECRET", "is set but empty")
    start_text = _set(env, "GCOLLECTIVE_START_TIMEOUT")
    handoff_text = _set(env, "GCOLLECTIVE_HANDOFF_TIMEOUT")
    return Settings(
        bind=bind,
        slots=tuple(slots),
        peers=tuple(peers),
        secret=secret,
        start_timeout=(
            parse_seconds(start_text, "GCOLLECTIVE_START_TIMEOUT")
            if start_text is not None
            else DEFAULT_START_TIMEOUT
        ),
        handoff_timeout=(
            parse_seconds(handoff_text, "GCOLLECTIVE_HANDOFF_TIMEOUT", least=0.0)
            if handoff_text is not None
            else DEFAULT_HANDOFF_TIMEOUT
        ),
        metrics_port=_metrics_port(_set(env, "GCOLLECTIVE_METRICS_PORT"), len(slots)),
        data_dir=_set(env, "GCOLLECTIVE_DATA_DIR"),
        **_membership_settings(
            _set(env, "GCOLLECTIVE_RESOLVE_INTERVAL"), _set(env, "GCOLLECTIVE_MAX_MEMBERS")
        ),
    )


_Addresses = tuple[str, list[tuple[str, int]], list[tuple[str, int]]]


def _set(env: Mapping[str, str], name: str) -> str | None:
    """The variable's text, or None where it is unset or blank (blank counts as unset)."""
    text = env.get(name)
    return None if text is None or not text.strip() else text


def _addresses_from_peers(
    env: Mapping[str, str], workers: int, is_local: Callable[[str], bool]
) -> _Addresses:
    """Bind, this server's slots and every peer from ``GCOLLECTIVE_PEERS``."""
    clashing = [
        name
        for name in ("GCOLLECTIVE_HOSTS", "GCOLLECTIVE_BASE_PORT", "GCOLLECTIVE_SLOTS")
        if _set(env, name) is not None
    ]
    if clashing:
        raise ConfigError(
            "GCOLLECTIVE_PEERS",
            f"lists every address itself; do not also set {', '.join(clashing)}",
        )
    peers = parse_peers(env["GCOLLECTIVE_PEERS"])
    hosts = list(dict.fromkeys(host for host, _ in peers))
    bind = _choose_bind(env, hosts, "GCOLLECTIVE_PEERS", is_local)
    slots = [address for address in peers if address[0] == bind]
    if bind not in hosts:  # (one of a DNS name's addresses: its ports are the slots)
        slots = [(bind, port) for port in dict.fromkeys(p for h, p in peers if is_name(h))]
    if len(slots) < workers:
        raise ConfigError(
            "GCOLLECTIVE_PEERS",
            f"lists {len(slots)} address(es) for {bind} but gunicorn runs {workers} "
            "workers here: list one per worker",
        )
    return bind, slots, peers


def _addresses_from_hosts(
    env: Mapping[str, str], workers: int, is_local: Callable[[str], bool]
) -> _Addresses:
    """Bind, this server's slots and every peer from ``GCOLLECTIVE_HOSTS``,
    ``GCOLLECTIVE_BASE_PORT`` and ``GCOLLECTIVE_SLOTS``."""
    hosts_text = _set(env, "GCOLLECTIVE_HOSTS")
    hosts = parse_hosts(hosts_text) if hosts_text is not None else list(DEFAULT_HOSTS)
    base_text = _set(env, "GCOLLECTIVE_BASE_PORT")
    base = (
        parse_port(base_text, "GCOLLECTIVE_BASE_PORT")
        if base_text is not None
        else DEFAULT_BASE_PORT
    )
    slots_text = _set(env, "GCOLLECTIVE_SLOTS")
    count = parse_count(slots_text, "GCOLLECTIVE_SLOTS") if slots_text is not None else 0
    # Never fewer slots than workers: each worker needs one. By default one more for a
    # single worker: on a HUP its successor needs a free slot to take the data over.
    count = max(count, workers if slots_text is not None else max(workers, 2))
    if base + count - 1 > 65535:
        raise ConfigError(
            "GCOLLECTIVE_BASE_PORT",
            f"{base} + {count} slots runs past port 65535",
        )
    bind = _choose_bind(env, hosts, "GCOLLECTIVE_HOSTS", is_local)
    peers = [(host, base + i) for host in hosts for i in range(count)]
    slots = [(bind, base + i) for i in range(count)]
    return bind, slots, peers


def _metrics_port(text: str | None, slots: int) -> int | None:
    """``GCOLLECTIVE_METRICS_PORT`` checked to leave room for every slot, or None."""
    if text is None:
        return None
    port = parse_port(text, "GCOLLECTIVE_METRICS_PORT")
    if port + slots - 1 > 65535:
        raise ConfigError("GCOLLECTIVE_METRICS_PORT", f"{port} + {slots} slots runs past 65535")
    return port


def _membership_settings(interval_text: str | None, members_text: str | None) -> dict[str, Any]:
    """``GCOLLECTIVE_RESOLVE_INTERVAL`` and ``GCOLLECTIVE_MAX_MEMBERS`` as ``Settings``
    fields (those set only), checked as the options they become."""
    settings: dict[str, Any] = {}
    if interval_text is not None:
        settings["resolve_interval"] = parse_seconds(
            interval_text, "GCOLLECTIVE_RESOLVE_INTERVAL", least=MIN_RESOLVE_INTERVAL
        )
    if members_text is not None:
        count = parse_count(members_text, "GCOLLECTIVE_MAX_MEMBERS")
        if count > MAX_MEMBERS_LIMIT:
            raise ConfigError(
                "GCOLLECTIVE_MAX_MEMBERS", f"{count} is more than {MAX_MEMBERS_LIMIT}"
            )
        settings["max_members"] = count
    return settings


def _serve_metrics(node: Collective, address: tuple[str, int]) -> WSGIServer:
    """The worker's metrics endpoint (``GCOLLECTIVE_METRICS_PORT`` + slot), started."""
    try:
        from ._metrics import serve_metrics

        return serve_metrics(node, address)
    except (ImportError, OSError) as exc:
        gcollective.stop(1.0)
        raise ConfigError(
            "GCOLLECTIVE_METRICS_PORT", f"cannot serve metrics on {format_address(address)}: {exc}"
        ) from exc


def _accepts_secret() -> bool:
    from ._node import Collective

    parameters = inspect.signature(Collective.__init__).parameters
    return "secret" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


# -- handoff helpers ---------------------------------------------------------------------------


def _answers(address: tuple[str, int]) -> bool:
    """True if something listens at ``address`` (a member that has not left)."""
    try:
        sock = gsocket.create_connection(address, timeout=_PROBE_TIMEOUT)
    except OSError:
        return False
    sock.close()
    return True


def _any_answers(addresses: list[tuple[str, int]]) -> bool:
    if not addresses:
        return False
    probes = [gevent.spawn(_answers, address) for address in addresses]
    gevent.joinall(probes, timeout=_PROBE_TIMEOUT + 0.5)
    gevent.killall(probes, block=False)
    return any(probe.successful() and probe.value for probe in probes)


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


class GeventWorker(_ggevent.GeventWorker):
    """gunicorn's gevent worker, plus a gcollective member per worker process.

    After boot, ``gcollective_slot`` is this worker's slot number, ``gcollective_node`` its
    node (also ``gcollective.default_node()``), and ``GCOLLECTIVE_WORKER_SLOT`` in
    ``os.environ`` holds the slot for the app.
    """

    gcollective_settings: Settings | None = None
    gcollective_slot: int | None = None
    gcollective_node: Collective | None = None
    _gcollective_start_took = 0.0
    _gcollective_master: _MasterSockets | None = None  # (None: cannot tell a shutdown)
    _gcollective_successors: _SuccessorWatch | None = None  # (from the exit signal on)
    # When gunicorn may SIGKILL this worker (monotonic; None until a SIGTERM): see
    # _gcollective_kill_at.
    _gcollective_signalled_at: float | None = None

    def init_process(self) -> None:
        """Run gunicorn's gevent worker; the node stops when the worker leaves, however it
        leaves (its run loop ends, or SystemExit from a signal or a parent change)."""
        self._gcollective_quick = False
        try:
            # Patches, re-initialises the hub, installs signals, then load_wsgi(), then run().
            super().init_process()
        finally:
            self._gcollective_leave()

    def load_wsgi(self) -> None:
        """Read the configuration and join the collective, then load the app (which may use
        gcollective at import). A bad value raises here, before the worker counts as
        booted, so gunicorn stops with "Worker failed to boot"."""
        env = dict(os.environ)
        env.update(self.cfg.env or {})
        self.gcollective_settings = settings_from_env(env, self.cfg.workers)
        self._gcollective_join()
        # (Now, while the master surely holds its listeners: see _MasterSockets.)
        self._gcollective_master = _MasterSockets.observe(self.ppid, self.sockets)
        super().load_wsgi()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM (HUP reload, TTOU, a stop): a graceful exit; watch for a successor now."""
        if self._gcollective_signalled_at is None:  # (a second SIGTERM moves no deadline)
            self._gcollective_signalled_at = time.monotonic()
        self._gcollective_watch_successors()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """SIGQUIT / SIGINT: a quick exit; flush, but do not wait for a successor."""
        self._gcollective_quick = True
        super().handle_quit(sig, frame)

    # -- joining -------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        # The arbiter kills a worker that stays silent for `timeout` seconds; joining and
        # handing off can take a while, so keep telling it we are alive.
        while True:
            self.notify()
            gevent.sleep(1.0)

    def _gcollective_join(self) -> None:
        settings = self.gcollective_settings
        assert settings is not None
        options: dict[str, Any] = {}  # the options beyond the addresses: secret, ...
        for name in ("resolve_interval", "max_members"):
            if getattr(settings, name) is not None:
                options[name] = getattr(settings, name)
        if settings.secret is not None:
            if not _accepts_secret():
                raise ConfigError(
                    "GCOLLECTIVE_SECRET",
                    "is set, but this gcollective has no secret option yet; upgrade "
                    "gcollective or unset it",
                )
            options["secret"] = settings.secret
        beat = gevent.spawn(self._heartbeat)
        try:
            slot, node = self._claim(settings, options)
            for _ in range(_REJOINS):
                timed_out = self._gcollective_start_took >= settings.start_timeout * 0.9
                if node.synced or not timed_out or not _connected_peers(node):
                    break
                # Peers answered but their state never came: a snapshot can be lost on a
                # connection a peer still held to this slot's previous worker. Joining again
                # as a new incarnation makes every peer start a fresh connection.
                self.log.warning(
                    "gcollective: worker %s got no state from its connected peers within "
                    "%.1fs; joining again",
                    self.pid,
                    settings.start_timeout,
                )
                gcollective.stop(1.0)
                slot, node = self._claim(settings, options)
        finally:
            beat.kill()
        self.gcollective_slot = slot
        self.gcollective_node = node
        self._gcollective_peers = _PeerAges(node)
        gevent.spawn(self._gcollective_peers.run)
        os.environ[SLOT_VARIABLE] = str(slot)
        if settings.metrics_port is not None:
            self._gcollective_metrics = _serve_metrics(
                node, (settings.bind, settings.metrics_port + slot)
            )
        self.log.info(
            "gcollective: worker %s has slot %d (%s), %s",
            self.pid,
            slot,
            format_address(node.local),
            "state merged from a peer" if node.synced else "no peer state yet",
        )

    def _claim(self, settings: Settings, options: dict[str, Any]) -> tuple[int, Collective]:
        """Start the node on the first free slot; wait while every slot is taken.

        Binding is the claim: two workers racing for a slot cannot both get it. Old workers
        of a HUP keep their slots until they have finished their requests, which takes at
        most ``graceful_timeout``.
        """
        deadline = time.monotonic() + self.cfg.graceful_timeout + 10.0
        waiting_logged = False
        while True:
            for slot, address in enumerate(settings.slots):
                began = time.monotonic()
                if settings.data_dir is not None:  # (each slot its own: one process each)
                    options["data_dir"] = os.path.join(settings.data_dir, f"slot-{slot}")
                try:
                    node = gcollective.start(
                        address, settings.peers, timeout=settings.start_timeout, **options
                    )
                except DataDirLocked:
                    continue  # the slot's previous worker is still leaving
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue
                    variable = (
                        "GCOLLECTIVE_BASE_PORT" if exc.errno == errno.EACCES else "GCOLLECTIVE_BIND"
                    )
                    raise ConfigError(
                        variable, f"cannot listen on {format_address(address)}: {exc}"
                    ) from exc
                self._gcollective_start_took = time.monotonic() - began
                return slot, node
            if not self.alive:
                # Told to exit while still waiting (a second HUP, a shutdown): just go.
                raise SystemExit(0)
            if time.monotonic() > deadline:
                self.log.error(
                    "gcollective: every slot of this server (%s) stayed taken; set "
                    "GCOLLECTIVE_SLOTS to the most workers this server runs",
                    ", ".join(format_address(a) for a in settings.slots),
                )
                # Not a boot error (that would halt gunicorn): the arbiter retries later.
                raise SystemExit(1)
            if not waiting_logged:
                waiting_logged = True
                self.log.info(
                    "gcollective: worker %s waits for a free slot (old workers still exiting)",
                    self.pid,
                )
            gevent.sleep(random.uniform(0.03, 0.1))

    # -- leaving -------------------------------------------------------------------------

    def _gcollective_watch_successors(self) -> None:
        # Runs in the signal handler, so before this node handles anything from a member
        # that connects after the signal: gunicorn signals all old workers in one loop, so
        # a successor can only come once one of them has left (see _SuccessorWatch).
        # (The peers' view only reads; a second signal keeps the first watch.)
        node = self.gcollective_node
        if node is not None and self._gcollective_successors is None:
            self._gcollective_successors = _SuccessorWatch(node)

    def _gcollective_leave(self) -> None:
        node = self.gcollective_node
        if node is None:  # interrupted between starting it and recording it
            try:
                node = gcollective.default_node()
            except gcollective.NotStartedError:
                return
        metrics = getattr(self, "_gcollective_metrics", None)
        if metrics is not None:
            metrics.stop()
        settings = self.gcollective_settings
        if settings is None or not node.running:
            return
        try:
            # (With a data_dir, the data is on disk: nothing to hand over.)
            if (
                not self._gcollective_quick
                and settings.handoff_timeout > 0
                and not settings.data_dir
                and not self._gcollective_shutdown()
            ):
                beat = gevent.spawn(self._heartbeat)
                try:
                    self._handoff(node, settings)
                finally:
                    beat.kill()
        finally:
            stopping = time.monotonic()
            gcollective.stop(self._gcollective_stop_timeout())
            self.log.info(
                "gcollective: worker %s left slot %s (the final flush and stop took %.3fs)",
                self.pid,
                self.gcollective_slot,
                time.monotonic() - stopping,
            )

    def _gcollective_kill_at(self) -> float | None:
        """When gunicorn may SIGKILL this worker (``time.monotonic()``), or None if it will not.

        ``Arbiter.stop()`` (a master's SIGTERM, or the old master's after a USR2) SIGKILLs
        the workers still there ``graceful_timeout`` seconds after it signalled them; the
        signal's arrival here is the closest this worker can tell (a starved worker handles
        it late: ``_STOP_RESERVE`` covers that). A reload or TTOU does not kill: None when the
        master's listeners show one (see ``_MasterSockets.may_kill``; a worker that cannot see
        them keeps to the deadline). A worker that leaves by itself (max_requests) got no
        signal and is not killed.
        """
        if self._gcollective_signalled_at is None:
            return None
        master = self._gcollective_master
        if master is not None and not master.may_kill():
            return None
        return self._gcollective_signalled_at + float(self.cfg.graceful_timeout)

    def _gcollective_stop_timeout(self) -> float:
        """Seconds the final flush may take: 1 to 5, within graceful_timeout, and, after a
        SIGTERM, ending before gunicorn's SIGKILL (with half the reserve for the exit)."""
        timeout = max(1.0, min(5.0, float(self.cfg.graceful_timeout)))
        kill_at = self._gcollective_kill_at()
        if kill_at is not None:
            left = kill_at - time.monotonic() - _STOP_RESERVE / 2
            timeout = max(0.1, min(timeout, left))
        return timeout

    def _handoff_deadline(self, settings: Settings) -> float:
        """When the handoff gives up: ``handoff_timeout`` from now, but early enough for the
        final flush to run before gunicorn's SIGKILL (logged when that cuts it short)."""
        now = time.monotonic()
        deadline = now + settings.handoff_timeout
        kill_at = self._gcollective_kill_at()
        if kill_at is None or kill_at - _STOP_RESERVE >= deadline:
            return deadline
        capped = max(now, kill_at - _STOP_RESERVE)
        self.log.info(
            "gcollective: worker %s waits at most %.1fs for a successor, not %.1fs "
            "(GCOLLECTIVE_HANDOFF_TIMEOUT): gunicorn kills it %ss (graceful_timeout) after "
            "its exit signal, and the final flush needs the last %.1fs",
            self.pid,
            capped - now,
            settings.handoff_timeout,
            self.cfg.graceful_timeout,
            _STOP_RESERVE,
        )
        return capped

    def _gcollective_shutdown(self) -> bool:
        """True if gunicorn is shutting down (no new worker will come to take the data)."""
        master = self._gcollective_master
        if master is None or not master.shutting_down():
            return False
        self.log.info(
            "gcollective: worker %s leaves at once: gunicorn is shutting down (its master "
            "closed its listeners), so no new worker will take the data over",
            self.pid,
        )
        return True

    def _handoff(self, node: Collective, settings: Settings) -> None:
        """Return once stopping this node loses nothing, or after ``handoff_timeout``.

        Members that stay hold everything this one sent them (``stop()`` flushes). When all
        of this server's workers leave at once (HUP, shutdown), they rank by slot: each
        leaves as soon as a higher slot answers, and the highest one, the last holder here,
        waits for a new worker to connect and take its state. A member on another server
        that answers holds the data too.
        """
        began = time.monotonic()
        deadline = self._handoff_deadline(settings)
        slots = list(settings.slots)
        mine = slots.index(node.local) if node.local in slots else len(slots)
        higher = slots[mine + 1 :]
        others = [address for address in settings.peers if address[0] != settings.bind]
        # (A worker that ends by itself, max_requests, got no signal: watch from now on.)
        watch = self._gcollective_successors or _SuccessorWatch(node)
        ages = getattr(self, "_gcollective_peers", None) or _PeerAges(node)
        while True:
            # Only members connected for a while count: they have caught up with this one.
            if _any_answers(ages.settled_peers(higher + others)):
                return
            if watch.caught_up():
                self.log.info("gcollective: worker %s handed its state on", self.pid)
                return
            now = time.monotonic()
            if now >= deadline:
                # Expected when gunicorn shuts down; after a HUP, data may be lost.
                self.log.warning(
                    "gcollective: worker %s is the last here holding the data and no new "
                    "worker took it over within %.1fs (%s); leaving",
                    self.pid,
                    now - began,
                    "GCOLLECTIVE_HANDOFF_TIMEOUT"
                    if deadline - began >= settings.handoff_timeout
                    else "cut short by gunicorn's graceful_timeout",
                )
                return
            gevent.sleep(0.1)
