"""Discovery by DNS, as a part of ``Collective``: an entry of ``peers`` whose host is a name
(not an IP address) stands for every address it resolves to, such as a Kubernetes headless
service's pods. The name is resolved at ``start()`` and again every ``resolve_interval``
seconds, through gevent's resolver in a greenlet of its own; every address new in the answer
is dialled like a configured member, and one gone from it is no longer treated as configured
(membership decides whether it is still alive). See docs/membership.rst."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Iterable

import gevent
from gevent import socket as gsocket

from ._logcontext import tag_current
from ._validate import format_address

log = logging.getLogger("gcollective")

#: Seconds one resolution of a name may take before it counts as failed (the resolver's
#: thread may go on; the answer is dropped). A name then keeps its last good answer.
RESOLVE_TIMEOUT = 5.0


def is_name(host: str) -> bool:
    """True if ``host`` is a DNS name, not an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # (an IPv6 zone is part of an address)
    except ValueError:
        return True
    return False


def split_names(
    peers: Iterable[tuple[str, int]],
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``peers`` as ``(addresses, names)``: the entries dialled as they are, and those whose
    host is a name to resolve."""
    addresses: list[tuple[str, int]] = []
    names: list[tuple[str, int]] = []
    for peer in peers:
        (names if is_name(peer[0]) else addresses).append(peer)
    return addresses, names


def resolve(name: tuple[str, int], family: int = 0) -> list[tuple[str, int]]:
    """Every address ``name`` (host, port) resolves to for TCP, in the resolver's order, of
    one address family only: ``family`` if given, else that of the resolver's first answer (a
    dual-stack name lists each member once per family, and one member must be dialled once).
    Goes through gevent's resolver (the hub's), so only the calling greenlet waits. Raises
    ``OSError`` (``socket.gaierror``) when the name does not resolve, or gives no answer
    within ``RESOLVE_TIMEOUT``."""
    host, port = name
    found: list[tuple[str, int]] = []
    with gevent.Timeout(RESOLVE_TIMEOUT, OSError(f"no answer in {RESOLVE_TIMEOUT:g}s")):
        answers = gsocket.getaddrinfo(host, port, family, gsocket.SOCK_STREAM)
    for answer_family, _, _, _, sockaddr in answers:
        family = family or answer_family
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if answer_family == family and address not in found:
            found.append(address)
    return found


def _family_of(host: str) -> int:
    """The address family to resolve names in for a member listening on ``host``: the one it
    listens on, by gevent's rule (IPv6 for a host with a colon, IPv4 for any other, a name
    included), since its peers presumably listen alike: a member bound to IPv4 cannot be
    reached over IPv6, and a dual-stack name must not have each member dialled twice."""
    return gsocket.AF_INET6 if ":" in host or not host else gsocket.AF_INET


class Discovery:
    """The names among a member's ``peers``, resolved now and every ``interval`` seconds.

    ``answers`` holds each name's last good answer (this member's own address left out): a
    failed resolution keeps it, and is logged at WARNING once per change of error."""

    def __init__(self, node: Any, names: list[tuple[str, int]], interval: float) -> None:
        self.node = node
        self.names = names
        self.interval = interval
        self.family = _family_of(node.local[0])
        self.answers: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.errors: dict[tuple[str, int], str] = {}  # the failure last logged, per name
        # Names members announce themselves by, resolved once each (see ``check_alias``),
        # and the addresses they resolve to: the member there is dialled by its name.
        self.checked: set[tuple[str, int]] = set()
        self.aliases: dict[tuple[str, int], tuple[str, int]] = {}
        self.checking: set[gevent.Greenlet[Any, Any]] = set()  # resolving such names
        self.greenlet: gevent.Greenlet[Any, Any] | None = None

    def start(self) -> None:
        """Resolve every name once, in the calling greenlet (``start()`` then waits for the
        members found like for configured ones), then again in a greenlet of its own."""
        if not self.names:
            return
        try:
            self.resolve_all()
        except Exception:
            self.node._internal_error("DNS discovery")  # (a bug: start() carries on)
        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        for checking in list(self.checking):
            checking.kill(block=False)  # (a resolution in a thread is just no longer awaited)
        if self.greenlet is not None:
            self.greenlet.kill(block=True, timeout=1)

    def stats(self) -> dict[str, Any]:
        """Each name (``host:port``): the addresses it resolves to, and why its last
        resolution failed (``None`` when it worked)."""
        return {
            format_address(name): {
                "addresses": [format_address(address) for address in self.answers.get(name, [])],
                "error": self.errors.get(name),
            }
            for name in self.names
        }

    def listed(self) -> set[tuple[str, int]]:
        """Every address some name resolves to now (by its last good answer)."""
        return {address for answer in self.answers.values() for address in answer}

    def _run(self) -> None:
        tag_current(self.node)  # (see _logcontext)
        while not self.node._stopping:
            gevent.sleep(self.interval)
            try:
                self.resolve_all()
            except Exception:
                self.node._internal_error("DNS discovery")  # and again next interval

    def resolve_all(self) -> None:
        for name in self.names:
            if self.node._stopping:
                return
            self.resolve_name(name)

    def resolve_name(self, name: tuple[str, int]) -> None:
        """Resolve ``name`` once; dial the addresses new in its answer."""
        try:
            found = resolve(name, self.family)
        except OSError as exc:
            self._failed(name, str(exc) or type(exc).__name__)
            return
        if name in self.errors:
            del self.errors[name]
            log.info("peer name %s resolves again", format_address(name))
        node = self.node
        own = (node.local, node.advertise)
        found = [address for address in found if address not in own][: node.max_members]
        self._update(name, found)

    def _failed(self, name: tuple[str, int], error: str) -> None:
        if self.errors.get(name) == error:
            log.debug("peer name %s still does not resolve: %s", format_address(name), error)
            return
        self.errors[name] = error
        kept = self.answers.get(name)
        log.warning(
            "peer name %s does not resolve: %s (%s; trying again every %gs)",
            format_address(name),
            error,
            f"keeping its last {len(kept)} address(es)" if kept else "no address known for it",
            self.interval,
            extra={"reason": "dns"},
        )

    def _update(self, name: tuple[str, int], found: list[tuple[str, int]]) -> None:
        """Take ``found`` as ``name``'s answer: dial what is new, and let go of what left."""
        before = self.answers.get(name, [])
        self.answers[name] = found
        if set(found) == set(before):
            return  # (the same addresses, maybe in another order: a round-robin answer)
        log.info(
            "peer name %s resolves to %s",
            format_address(name),
            ", ".join(map(format_address, found)) or "no other member",
        )
        listed = self.listed()
        for address in found:
            if address not in before and address not in self.aliases:
                self.node._discovered(address)
        for address in before:
            if address not in listed:
                self.node._undiscovered(address)

    def check_alias(self, announced: tuple[str, int]) -> None:
        """A member announced itself as ``announced``: if that is a name (a StatefulSet's
        pod name, say) resolving to an address one of our names gave, both are one member,
        to be dialled once (``_alias_found``). Each name is resolved once, in a greenlet of
        its own; at most ``4 * max_members`` of them."""
        if not self.names or not is_name(announced[0]) or announced in self.checked:
            return
        if len(self.checked) >= 4 * self.node.max_members:
            return
        self.checked.add(announced)
        greenlet = gevent.spawn(self._resolve_alias, announced)
        self.checking.add(greenlet)
        greenlet.link(self.checking.discard)

    def _resolve_alias(self, announced: tuple[str, int]) -> None:
        tag_current(self.node)  # (see _logcontext)
        try:
            found = resolve(announced, self.family)
        except OSError as exc:
            self.checked.discard(announced)  # (tried again when it says HELLO again)
            log.debug("member name %s does not resolve: %s", format_address(announced), exc)
            return
        except Exception:
            self.node._internal_error("DNS discovery")
            return
        listed = self.listed()
        for address in found[: self.node.max_members]:
            self.aliases[address] = announced
            if address in listed:
                self.node._alias_found(address, announced)
