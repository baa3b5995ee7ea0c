"""The gunicorn worker's configuration (``gcollective.gunicorn``): the environment's
``GCOLLECTIVE_*`` variables parsed and checked into ``Settings``, without gunicorn (see
``settings_from_env``). A bad value raises ``ConfigError`` naming the variable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from gevent import socket as gsocket

from ._discovery import is_name
from ._options import MAX_MEMBERS_LIMIT, MIN_RESOLVE_INTERVAL
from ._validate import (
    MAX_SECONDS,
    MIN_SECONDS,
    check_seconds,
    is_ascii_digits,
    parse_address,
)

DEFAULT_HOSTS = ("127.0.0.1",)
DEFAULT_BASE_PORT = 9400
DEFAULT_START_TIMEOUT = 10.0
DEFAULT_HANDOFF_TIMEOUT = 5.0

_WILDCARDS = {"0.0.0.0", "::", "*"}


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
