"""The reference rebuild: a subtree's values recomputed from its metadata.

``rebuild`` is the definition of what a path's value is (see ``_tree``'s docstring); every
fast path of the store must agree with it, and anything arriving late (or a ttl event) is
recorded first and then rebuilt here. It is a pure function of a subtree, the reset above it
and the store's now: it also forgets what can no longer matter (events older than a reset).

Expiries (see ``_ttl``): an expiry that fired acts, if its event still owns the path, as a
DELETE at its derived stamp for the *materialized* value only. So a node has two views of
its own events: the real ones (``base``: its assignment, or the reset inherited from above),
which decide what is forgotten, and the visible ones (``visible_base``, ``visible_reset``,
...), which an expiry that fired here or above may move later, and which decide the value.
Values hidden that way are kept, since an operation older than the expiry may still arrive
and cancel it, and a member whose clock is behind still shows them if it joins now: a bare
child's value in ``_Node.hidden`` of its parent when that has ttl events (a fired session's
members), else in a node of its own (a bare int's value would be lost with the hidden dict).
"""

from __future__ import annotations

from typing import Any

from ._clock import MILLIS_SHIFT
from ._tree import DICT, MISSING, NEVER, Entry, _Node, is_number, is_plain, place, set_folded

__all__ = [
    "rebuild",
    "rebuild_at",
    "fire_session",
    "own_state",
    "materialize",
    "owners",
    "prune_children",
]

Stamp = Any  # an int stamp or NEVER (a float): compared, never computed with


def rebuild_at(parent: _Node, key: str, node: _Node, now_ms: float | int) -> None:
    """Recompute ``node`` (a child of ``parent``) from its metadata, and place the result."""
    if rebuild(node, parent.reset, now_ms):
        place(parent, key, node.value)
    else:
        del parent.entries[key]
        place(parent, key, MISSING)


def fire_session(parent: _Node, key: str, node: _Node, now_ms: float | int) -> bool:
    """``rebuild_at(parent, key, node, now_ms)`` then ``fold_members(node)`` in a few steps,
    for the common node whose expiry fired (issue 20: a churning member fires thousands a
    second, 14 us each through the general rebuild): a session, a dict set with a ttl, its
    one ttl event its own, nothing newer at or below it, each member a bare stamp, the
    session's, with a value. Returns False, having changed nothing, for any other node (the
    caller then takes the general way). ``tests/test_ttl_fold.py`` compares the two."""
    ttls = node.ttls
    s = node.assigned
    if (
        ttls is None
        or len(ttls) != 1
        or node.assigned_value is not DICT
        or node.runs is not None
        or node.hidden is not None
        or node.incs
        or node.incremented != NEVER
        or node.written_below != NEVER
        or s < parent.reset  # (the reset above overtook it: ``own_state`` forgets it)
    ):
        return False
    if type(s) is not int:
        return False  # (NEVER: not assigned; DICT assigned is a real stamp)
    expiry = ttls.get(s)
    if expiry is None or expiry <= s or expiry >> MILLIS_SHIFT > now_ms:
        return False  # (not its own event, or it hides nothing yet)
    value, entries = node.value, node._entries
    if (
        not entries
        or type(value) is not dict
        or list(entries.values()).count(s) != len(entries)  # (a node never equals an int)
        or not entries.keys() <= value.keys()  # (a member without a value: a tombstone)
    ):
        return False
    # What the general way leaves: the session's value hidden, its members' values kept
    # (in the order of its entries) and folded, nothing newer than its own stamp.
    set_folded(node, (*entries, *map(value.__getitem__, entries)), s)
    node.value = MISSING
    node.reset = node.newest = s
    place(parent, key, MISSING)
    return True


def rebuild(
    node: _Node, parent_reset: Stamp, now_ms: float | int, parent_visible_reset: Stamp = NEVER
) -> bool:
    """Recompute a node's value from its metadata; drop what can no longer matter.

    This is the reference the fast paths agree with. Returns False when nothing in the
    subtree is newer than the reset inherited from above (the node can be forgotten).
    ``parent_visible_reset`` is the visible reset from above, when an expiry that fired above
    makes it later than ``parent_reset``: what is older stays recorded (a late operation may
    still cancel that expiry) but is not visible.
    """
    is_dict, base, base_value = own_state(node, parent_reset)
    visible = _visible(node, is_dict, base, base_value, parent_visible_reset, now_ms)
    old_value = node.value
    old_dict = old_value if type(old_value) is dict else None
    new_dict: dict[str, Any] | None = None
    if visible[0]:
        new_dict = old_dict if old_dict is not None else {}
    newest = max(node.assigned, node.incremented, node.written_below)
    if node.entries:
        newest = _rebuild_children(node, new_dict, old_dict, visible[5], newest, now_ms)
    elif node.hidden is not None:
        node.hidden = None
    if new_dict is not None and len(new_dict) > len(node.entries):
        # Drop leftovers that no entry accounts for (possible only after a reset).
        for k in [k for k in new_dict if k not in node.entries]:
            del new_dict[k]
    materialize(node, base, new_dict, visible)
    node.newest = newest
    return bool(newest != NEVER and newest >= parent_reset)


#: What is visible of a node's own events (see the module docstring), without an expiry that
#: fired the real ones: ``(is_dict, base, base_value, written_below, incremented, reset)``,
#: ``base`` being the visible assignment or reset, ``base_value`` its value (MISSING once an
#: expiry hid it) and ``reset`` the visible reset for the children. (A plain tuple: a rebuild
#: makes one per node, and a joiner installs hundreds of thousands of nodes.)
Visible = tuple[bool, Stamp, Any, Stamp, Stamp, Stamp]


def _visible(
    node: _Node,
    is_dict: bool,
    base: Stamp,
    base_value: Any,
    parent_visible_reset: Stamp,
    now_ms: float | int,
) -> Visible:
    """What is visible of a node's own events (``own_state`` applied first)."""
    visible_base = parent_visible_reset if parent_visible_reset > base else base
    if node.ttls is not None:
        fired = _fired_expiry(node, parent_visible_reset, now_ms)
        if fired > visible_base:
            visible_base = fired
    below, incremented = node.written_below, node.incremented
    if visible_base == base:
        return is_dict, base, base_value, below, incremented, node.reset
    # An expiry (here or above) acts as a DELETE at visible_base for what is visible.
    visible_incremented = incremented if incremented > visible_base else NEVER
    visible_below = below if below > visible_base else NEVER
    visible_reset = visible_base if visible_incremented == NEVER else visible_incremented
    is_dict = False
    if visible_incremented != NEVER or visible_below != NEVER:
        is_dict = visible_below > visible_incremented
    return is_dict, visible_base, MISSING, visible_below, visible_incremented, visible_reset


def _rebuild_children(
    node: _Node,
    new_dict: dict[str, Any] | None,
    old_dict: dict[str, Any] | None,
    visible_reset: Stamp,
    newest: Stamp,
    now_ms: float | int,
) -> Stamp:
    """Rebuild each child of ``node`` (after ``own_state``), forget those overtaken by its
    reset, put their values in ``new_dict`` (the node's dict, if it is one), and give back
    the newest stamp of the subtree (``newest`` being that of the node's own events)."""
    reset = node.reset
    keep: dict[str, Entry] = {}
    # A node with ttl events keeps the values its expiries hide of its bare children in
    # ``hidden`` (issue 20: a fired session's members, until the expiry is permanent), not
    # a node each; others give such a child a node of its own.
    was_hidden = node.hidden
    can_hide = node.ttls is not None
    hidden: dict[str, Any] | None = None
    for k, e in node.entries.items():
        if type(e) is not _Node:
            if e < reset:
                if new_dict is not None:
                    new_dict.pop(k, None)
                continue
            value = _bare_value(k, old_dict, was_hidden)
            if value is MISSING or (new_dict is not None and e >= visible_reset):
                # A tombstone, or a value to show: it goes to (or stays in) new_dict.
                if value is not MISSING and new_dict is not None:
                    new_dict[k] = value
                keep[k] = e
                if e > newest:
                    newest = e
                continue
            if can_hide:
                if hidden is None:
                    hidden = {}
                hidden[k] = value  # a value about to be hidden, kept beside its stamp
                keep[k] = e
                if e > newest:
                    newest = e
                if new_dict is not None:
                    new_dict.pop(k, None)
                continue
            # A value about to be hidden: it lives in this node's dict, so give it a node
            # of its own to keep it while it is hidden.
            child = _Node()
            child.assigned = child.newest = e
            child.assigned_value = child.value = value
            child.reset = max(e, reset)
            e = child
        if rebuild(e, reset, now_ms, visible_reset):
            if e.newest > newest:
                newest = e.newest
            child_value = e.value
            if new_dict is not None:
                if child_value is MISSING:
                    new_dict.pop(k, None)
                else:
                    new_dict[k] = child_value
            if is_plain(e) and (
                e.assigned_value is MISSING if child_value is MISSING else new_dict is not None
            ):
                keep[k] = e.assigned  # type: ignore[assignment]  # (plain: a stamp, not NEVER)
            elif can_hide and child_value is MISSING and is_plain(e):
                # A plain leaf hidden from above (``is_plain``: no ttl of its own hides it).
                if hidden is None:
                    hidden = {}
                hidden[k] = e.assigned_value
                keep[k] = e.assigned  # type: ignore[assignment]
            else:
                keep[k] = e
        elif new_dict is not None:
            new_dict.pop(k, None)
    node.entries = keep
    node.hidden = hidden  # (after: replacing ``entries`` drops the old ones)
    return newest


def _bare_value(key: str, old_dict: dict[str, Any] | None, hidden: dict[str, Any] | None) -> Any:
    """The value of a bare-stamp child ``key`` before a rebuild: in the node's dict
    (``old_dict``), or among the values an expiry hid (``hidden``), or MISSING (a
    tombstone)."""
    if old_dict is not None:
        value = old_dict.get(key, MISSING)
        if value is not MISSING:
            return value
    return MISSING if hidden is None else hidden.get(key, MISSING)


def own_state(node: _Node, parent_reset: Stamp) -> tuple[bool, Stamp, Any]:
    """Fix a node's own events against the reset above it: ``(is_dict, base, base_value)``.

    ``base`` / ``base_value`` are the effective assignment (its own, or the reset inherited
    from above, which leaves nothing). Sets ``node.reset``; forgets overtaken own events.
    """
    if node.assigned >= parent_reset:
        base = node.assigned
        base_value = node.assigned_value
    else:
        base = parent_reset
        base_value = MISSING
        node.assigned = NEVER
        node.assigned_value = MISSING
    if node.incremented <= base:
        node.incremented = NEVER
    if node.written_below <= base:
        node.written_below = NEVER
    if node.ttls is not None:
        _prune_ttls(node, base)
    incremented = node.incremented
    below = node.written_below
    node.reset = base if incremented == NEVER else incremented
    if incremented == NEVER and below == NEVER:
        return base_value is DICT, base, base_value
    return below > incremented, base, base_value


def materialize(
    node: _Node, base: Stamp, new_dict: dict[str, Any] | None, visible: Visible
) -> None:
    """Set a node's materialized value once its children are rebuilt (see ``rebuild``).

    ``base`` is the real assignment or reset (what is older is forgotten); ``visible`` what
    is visible, which an expiry that fired here or above (a DELETE at its derived stamp, for
    materialization only) may make later than ``base``.
    """
    _, visible_base, visible_value, visible_below, visible_incremented, _ = visible
    below = node.written_below
    lower = base if below == NEVER else max(base, below)  # increments older are overtaken
    if new_dict is not None:
        node.value = new_dict
    elif visible_incremented != NEVER and visible_incremented > visible_below:
        # A number: the increments after the latest assignment or write below, in order.
        visible_lower = visible_base if visible_below == NEVER else visible_below
        incs = node.incs or {}
        result: Any = (
            visible_value if (visible_below == NEVER and is_number(visible_value)) else MISSING
        )
        kept: dict[int, int | float] = {}
        for stamp in sorted(incs):
            amount = incs[stamp]
            if stamp > lower:
                kept[stamp] = amount
            if stamp > visible_lower:
                result = amount if result is MISSING else result + amount
        node.incs = kept
        node.value = result
        return
    else:
        node.value = visible_value
    if node.incs:
        node.incs = {stamp: n for stamp, n in node.incs.items() if stamp > lower} or None


def prune_children(node: _Node, reset: Stamp, now_ms: float | int) -> None:
    """Forget children whose every event is older than the reset ``reset``."""
    entries = node.entries
    if not entries:
        return
    keep: dict[str, Entry] = {}
    for k, e in entries.items():
        if type(e) is not _Node:
            if e >= reset:
                keep[k] = e
        elif e.newest >= reset:
            rebuild(e, reset, now_ms)
            keep[k] = e
    hidden = node.hidden
    node.entries = keep
    if hidden is not None:
        node.hidden = {k: v for k, v in hidden.items() if k in keep} or None


def _prune_ttls(node: _Node, base: Stamp) -> None:
    """Forget ttl events older than the assignment or reset here (a SET-with-ttl is the
    assignment itself): those can never fire."""
    ttls = node.ttls
    assert ttls is not None
    if min(ttls) < base:
        node.set_ttls({stamp: expiry for stamp, expiry in ttls.items() if stamp >= base} or None)


def owners(ttls: dict[int, int]) -> list[tuple[int, int]]:
    """The ttl events that own their path at their expiry as far as this path goes: no
    other ttl event here came between (which would have become the owner)."""
    stamps = sorted(ttls)
    last = len(stamps) - 1
    return [
        (stamp, ttls[stamp])
        for index, stamp in enumerate(stamps)
        if index == last or stamps[index + 1] > ttls[stamp]
    ]


def _fired_expiry(node: _Node, parent_visible_reset: Stamp, now_ms: float | int) -> Stamp:
    """The stamp of the latest expiry here that has fired (``now_ms`` reached its time) and
    still owns the path, or NEVER. An owner here loses the path anyway if the visible reset
    from above (a newer reset, or an ancestor's expiry) came after it."""
    assert node.ttls is not None
    fired: Stamp = NEVER
    for stamp, expiry in owners(node.ttls):
        if stamp > parent_visible_reset and expiry > fired and expiry >> MILLIS_SHIFT <= now_ms:
            fired = expiry
    return fired
