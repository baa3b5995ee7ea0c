"""Membership that spreads, as a part of ``Collective`` (``_Membership``): a member tells
each peer whose HELLO says it reads them the members it knows (a MEMBERS frame), dials the
members it learns of, and says it left when it stops (see docs/membership.rst)."""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

from ._links import _PeerLink
from ._members import MemberList
from ._peerstate import Inbound
from ._validate import format_address
from ._wire import KNOWS_MEMBERS, MEMBER_LEFT, Hello, encode_members, parse_members

log = logging.getLogger("gcollective")


class _Membership:
    """The member list of a ``Collective`` and what goes with it on the wire."""

    _links: dict[tuple[str, int], _PeerLink]
    _members: MemberList
    max_members: int

    if TYPE_CHECKING:  # (the rest of ``Collective``, which this is a part of)

        def __getattr__(self, name: str) -> Any: ...

    def _members_frame(self) -> bytes:
        own = (self.node_id, self.advertise[0], self.advertise[1])
        return encode_members(self._members.entries(own, self._reached))

    def _reached(self, address: tuple[str, int]) -> bool:
        link = self._links.get(address)
        return link is not None and link.connects > 0

    def _member_said_hello(self, link: _PeerLink | None, hello: Hello) -> None:
        """A peer's HELLO (identity checked): note it, send it the members we know if it
        reads them, and tell the others of a member new to us."""
        new = self._members.heard((hello.host, hello.port), hello.node_id)
        if self._discovery is not None:
            self._discovery.check_alias((hello.host, hello.port))
        if link is not None:
            link.knows_members = bool(hello.flags & KNOWS_MEMBERS)
            if link.knows_members:
                link.enqueue(self._members_frame())
                link.data_ready()
        if new:
            self._tell_members(self._members_frame(), but=link)

    def _tell_members(self, frame: bytes, but: _PeerLink | None = None) -> None:
        """Queue ``frame`` for every connected peer that reads MEMBERS frames."""
        for link in list(self._links.values()):
            if link is not but and link.knows_members and link.connected:
                link.enqueue(frame)
                link.data_ready()

    def _gossip_round(self) -> None:
        """Every ``sync_interval``: the member list to one connected peer picked at random,
        which heals a list lost with a connection (or replaced by a snapshot stream) and one
        that changed during a partition, at the cost of one frame per interval."""
        readers = [link for link in self._links.values() if link.knows_members and link.connected]
        if readers:
            link = random.choice(readers)
            link.enqueue(self._members_frame())
            link.data_ready()

    def _members_received(self, inbound: Inbound, message: list[Any]) -> None:
        """A MEMBERS frame from a peer (authenticated like every frame on its connection,
        when the collective has a secret or TLS): dial the members new to us, stop dialling
        those that left."""
        own = {self.local, self.advertise}
        down = self._engine.down_ids
        for node_id, host, port, state in parse_members(message, self.max_members + 1):
            address = (host, port)
            if node_id == self.node_id or address in own:
                continue
            if state == MEMBER_LEFT:
                if self._members.left(node_id, address):
                    self._member_left(address, node_id)
            elif node_id not in down and not self._stopping:
                if self._members.learn(node_id, address):
                    log.info("member %s learnt from a peer: connecting", format_address(address))
                    self._add_link(address, announced=True)

    def _discovered(self, address: tuple[str, int]) -> None:
        """A name in ``peers`` newly resolves to ``address``: dial it as a configured member
        (at once, should it be waiting out a backoff: a new answer is often a new member)."""
        if self._stopping or address in self.peers:
            return  # (an address configured as such is dialled already)
        self._members.discovered(address)
        link = self._links.get(address)
        if link is None:
            log.info("member %s found by DNS: connecting", format_address(address))
            self._add_link(address)
        else:
            link.announced = False  # dialled while the name resolves to it
            if not link.connected:
                link.redial_now()

    def _undiscovered(self, address: tuple[str, int]) -> None:
        """No name in ``peers`` resolves to ``address`` any more: it is no longer dialled as
        a configured member, but as one learnt (see ``_links._PeerLink._unanswered``): a
        member alive stays, membership (down_timeout, a leave) decides when it goes."""
        link = self._links.get(address)
        if link is not None and address not in self.peers:
            link.announced = True

    def _member_left(self, address: tuple[str, int], node_id: int) -> None:
        """The member at ``address`` stopped for good: stop dialling it at once."""
        link = self._links.get(address)
        if link is None or (link.peer_id is not None and link.peer_id != node_id):
            return
        log.info("peer %s left the collective: no longer dialling it", link.name)
        self._stop_dialling(link)

    def _stop_dialling(self, link: _PeerLink) -> None:
        """Drop ``link``: its writer ends, its connection closes, the engine forgets it."""
        if self._links.get(link.address) is link:
            del self._links[link.address]
        link.dropped = True
        link.stop()
        link.drop_connection()
        self._engine.forget_peer(link, time.monotonic())
        self._check_ready()

    def _alias_found(self, address: tuple[str, int], name: tuple[str, int]) -> None:
        """The member announcing itself as ``name`` is the one a name in ``peers`` gave as
        ``address``: dial it once, under its own name. (A link to ``address`` would send it
        everything a second time, and never hear from it: a member never heard from holds
        back what every member may forget, see ``Engine.own_frontier``.)"""
        link = self._links.get(address)
        if link is None or name not in self._links or self._stopping:
            return
        log.info(
            "member %s found by DNS announces itself as %s: dialling it once, by that name",
            format_address(address),
            format_address(name),
        )
        self._members.members.pop(address, None)
        self._stop_dialling(link)

    def _say_goodbye(self) -> None:
        """Stopping: tell every peer that reads MEMBERS frames that this member left (what is
        queued goes out before the links close, see ``stop``)."""
        host, port = self.advertise
        self._tell_members(encode_members([(self.node_id, host, port, MEMBER_LEFT)]))
