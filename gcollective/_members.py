"""The member list: every member this one knows of (address, incarnation, state, how it was
learnt). Members tell each other theirs in MEMBERS frames, so a member started with one seed's
address ends linked to every member directly (see docs/membership.rst). No I/O here: the shell
(``_membership``) dials what this says to and sends what it encodes."""

from __future__ import annotations

import time
from typing import Any, Callable

from ._wire import MEMBER_ALIVE, MEMBER_LEFT

ALIVE = "alive"
LEFT = "left"  # it said so when it stopped: not dialled again
DOWN = "down"  # silent past down_timeout (declared down by the engine)

CONFIGURED = "configured"  # in this member's ``peers``
ANNOUNCED = "announced"  # from its own HELLO (it dialled us)
GOSSIP = "gossip"  # from another member's MEMBERS frame
DNS = "dns"  # an address a name in ``peers`` resolves to (see _discovery)


class Member:
    """What this member knows about another."""

    __slots__ = ("address", "node_id", "state", "learnt", "since")

    def __init__(self, address: tuple[str, int], node_id: int | None, learnt: str) -> None:
        self.address = address
        self.node_id = node_id
        self.state = ALIVE
        self.learnt = learnt
        self.since = time.time()  # (wall clock, for stats())

    def as_stats(self, down: bool) -> dict[str, Any]:
        return {
            "node_id": None if self.node_id is None else f"{self.node_id:x}",
            "state": DOWN if down and self.state != LEFT else self.state,
            "learnt": self.learnt,
            "since": self.since,
        }


class MemberList:
    """Members by address, at most ``limit`` of them (configured ones always count)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.members: dict[tuple[str, int], Member] = {}
        # Incarnations that left: an older list still naming them alive is not believed.
        self.left_ids: set[int] = set()

    def configured(self, address: tuple[str, int]) -> None:
        self.members.setdefault(address, Member(address, None, CONFIGURED))

    def discovered(self, address: tuple[str, int]) -> None:
        """A name in ``peers`` resolves to ``address``: dialled as if configured, for as
        long as the name resolves to it (each answer is bounded by ``limit`` already)."""
        member = self.members.get(address)
        if member is None or member.state != ALIVE:
            self.members[address] = Member(address, None, DNS)
        elif member.learnt != CONFIGURED:
            member.learnt = DNS

    def full(self) -> bool:
        """No room for one more member alive (those that left or are down keep their entries
        for stats(), up to ``limit`` more, the oldest dropped first)."""
        alive = sum(member.state == ALIVE for member in self.members.values())
        return alive >= self.limit

    def _prune(self) -> None:
        gone = [member for member in self.members.values() if member.state != ALIVE]
        if len(gone) > self.limit:
            gone.sort(key=lambda member: member.since)
            for member in gone[: len(gone) - self.limit]:
                del self.members[member.address]

    def heard(self, address: tuple[str, int], node_id: int) -> bool:
        """A HELLO from ``node_id`` announcing ``address``: True if the member is new to us
        (then the others should hear of it)."""
        member = self.members.get(address)
        if member is None:
            if self.full():
                return False
            self.members[address] = Member(address, node_id, ANNOUNCED)
            return True
        if member.node_id != node_id or member.state != ALIVE:
            member.node_id = node_id
            member.state = ALIVE
            member.since = time.time()
        return False

    def learn(self, node_id: int, address: tuple[str, int]) -> bool:
        """A member another one says is alive: True if it is new to us (dial it)."""
        known = self.members.get(address)
        if known is not None and (known.state == ALIVE or known.node_id == node_id):
            return False  # (or a new incarnation where one left or went down: learnt anew)
        if node_id in self.left_ids or self.full():
            return False
        self.members[address] = Member(address, node_id, GOSSIP)
        return True

    def left(self, node_id: int, address: tuple[str, int]) -> bool:
        """``node_id`` at ``address`` left: True if that is news about the incarnation we
        know there (stop dialling it)."""
        if len(self.left_ids) < 4 * self.limit:
            self.left_ids.add(node_id)
        member = self.members.get(address)
        if member is None or member.state == LEFT:
            return False
        if member.node_id is not None and member.node_id != node_id:
            return False  # an older incarnation left; the one there now has not
        member.node_id = node_id
        member.state = LEFT
        member.since = time.time()
        self._prune()
        return True

    def forget(self, address: tuple[str, int], down: bool) -> None:
        """No longer dialled: kept as down if it was declared down, else (an address that
        never answered) dropped."""
        member = self.members.get(address)
        if member is None or member.state != ALIVE or member.learnt == CONFIGURED:
            return
        if down:
            member.state = DOWN
            member.since = time.time()
            self._prune()
        else:
            del self.members[address]

    def entries(
        self, own: tuple[int, str, int], reached: Callable[[tuple[str, int]], bool]
    ) -> list[tuple[int, str, int, int]]:
        """What a MEMBERS frame says: this member, every member that left, and every member
        alive that we ``reached`` (an address only announced, that never answered, is not
        passed on: the others would dial it, and hold metadata for it, in turn)."""
        listed = [(own[0], own[1], own[2], MEMBER_ALIVE)]
        for member in self.members.values():
            if member.node_id is None or member.state == DOWN:
                continue
            if member.state == LEFT or reached(member.address):
                state = MEMBER_LEFT if member.state == LEFT else MEMBER_ALIVE
                listed.append((member.node_id, member.address[0], member.address[1], state))
        return listed
