"""The replicated tree: a sans-IO, convergent store of nested JSON data.

Every operation carries a *stamp*, a unique int (see ``_clock``). The contract: the materialized
tree always equals the result of applying every distinct operation received, in ascending stamp
order, to an empty dict, with these rules:

- SET p v: non-dicts (or nothing) met on the way to p are replaced by dicts; p becomes v.
- DELETE p: p is removed if the way to it consists of dicts; otherwise nothing happens.
- INCREMENT p n: the way is made of dicts as for SET; a number (not a bool) at p grows by n,
  anything else at p (or nothing) becomes n.

Operations may arrive in any order and more than once. Rather than replaying a log, each path
keeps a small summary of the events that can still matter to it:

- ``a`` / ``av``: its own latest assignment (SET or DELETE at exactly this path). A SET of a dict
  is recorded as an assignment of DICT here plus an assignment of each member below, all with
  the same stamp.
- ``incs``: increments that are not yet overtaken, by stamp (so a repeat is applied once).
- ``d``: the latest SET or INCREMENT strictly below this path; such a write turns this path
  into a dict ("ensure dict").
- ``imax``: the latest increment here. Together with the assignment it forms ``r``, the reset
  stamp of the children: a child event older than ``r`` can never matter again and is dropped.

The value of a path follows from these: after the effective assignment (its own, or a newer
reset of an ancestor), the latest of {increment here, write below} decides whether it is a
number or a dict. In-order writes (the normal case) take short paths that touch only the path
written; anything arriving late records its event and recomputes the affected subtree with
``_rebuild``, which is the definition the fast paths must agree with.

A path whose only metadata is one assignment is stored as a bare int stamp in its parent's
``entries``: its value is in the parent's materialized dict, or absent for a tombstone. That
keeps the cost of the common leaf to one dict slot and one int.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = [
    "Store",
    "SET",
    "INCREMENT",
    "DELETE",
    "MISSING",
    "is_number",
    "copy_value",
    "read_path",
]

SET = 0
INCREMENT = 1
DELETE = 2

NEVER = float("-inf")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING: Any = _Marker("MISSING")
DICT: Any = _Marker("DICT")


def is_number(value: object) -> bool:
    """True for int and float values; bool is not a number in JSON."""
    return type(value) is int or type(value) is float


def copy_value(value: Any) -> Any:
    """Copy a JSON value deeply, keeping every type exactly (faster than ``copy.deepcopy``)."""
    kind = type(value)
    if kind is dict:
        return {k: copy_value(v) for k, v in value.items()}
    if kind is list:
        return [copy_value(v) for v in value]
    return value


def read_path(data: dict[str, Any], path: Iterable[str], default: Any = None) -> Any:
    """The value at ``path`` in a plain nested dict (containers copied), or ``default`` when
    there is none (also when the way to it goes through something that is not a dict)."""
    node: Any = data
    try:
        for segment in path:
            node = node[segment]
    except (KeyError, TypeError):
        return default  # missing, or the way goes through a list, str or number (all JSON)
    kind = type(node)
    if kind is dict or kind is list:
        return copy_value(node)
    return node


class _Node:
    """Metadata of one path that is more than a single assignment (see the module docstring)."""

    __slots__ = ("a", "av", "d", "imax", "incs", "r", "top", "entries", "value")

    def __init__(self) -> None:
        self.a: float | int = NEVER  # own assignment stamp
        self.av: Any = MISSING  # own assignment: leaf value, DICT or MISSING (a DELETE)
        self.d: float | int = NEVER  # latest write strictly below
        self.imax: float | int = NEVER  # latest increment here
        self.incs: dict[int, int | float] | None = None  # increments still relevant
        self.r: float | int = NEVER  # reset stamp for the children
        self.top: float | int = NEVER  # latest stamp anywhere in this subtree
        self.entries: dict[str, int | _Node] = {}
        self.value: Any = MISSING  # materialized value (a dict object when it is a dict)


class Store:
    """A nested dict that converges under operations delivered in any order, with repeats.

    Pure Python, no I/O. ``apply`` takes one stamped operation; ``export`` / ``merge`` move the
    whole state (metadata included) between replicas. Read the tree through ``get`` or
    ``to_dict``; ``data`` is the live root for callers that promise not to mutate it.
    """

    def __init__(self) -> None:
        root = _Node()
        root.value = {}
        self._root = root
        self.data: dict[str, Any] = root.value
        # Where the incremental collection (``collect``) stands: a stack of
        # [node, its reset stamp, its children still to visit, entries dropped, parent, key].
        self._sweep: list[list[Any]] = []
        #: Tombstones and increments dropped or folded by ``collect`` so far.
        self.collected = 0
        # False while nothing can have left metadata for ``collect`` since its last pass: the
        # fast paths of ``apply`` (new keys, newer values of plain leaves) leave none, so a
        # store that only ever sees those is never swept.
        self._untidy = False

    # -- reading ---------------------------------------------------------------------------

    def get(self, path: Iterable[str], default: Any = None) -> Any:
        """The value at ``path`` (containers copied), or ``default`` when there is none."""
        return read_path(self.data, path, default)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the whole tree."""
        return copy_value(self.data)

    # -- applying one operation -------------------------------------------------------------

    def apply(self, stamp: int, op: int, path: tuple[str, ...] | list[str], value: Any) -> None:
        """Apply one stamped operation; a repeat of a stamp already applied changes nothing.

        ``value`` is the SET value (trusted: a fresh JSON value the store may keep) or the
        INCREMENT amount; it is ignored for DELETE. ``path`` must be non-empty.
        """
        s = stamp
        node = self._root
        last = len(path) - 1
        writes = op != DELETE
        for i in range(last):
            if s < node.r:
                return  # overtaken by a newer reset above: no effect on anything below
            key = path[i]
            child = node.entries.get(key)
            if child is None and writes:
                # The common way down to a new key: a fresh, empty dict written below.
                child = _Node()
                child.d = child.top = s
                child.r = node.r
                child.value = fresh = {}
                node.entries[key] = child
                if type(node.value) is dict:
                    node.value[key] = fresh
                node = child
                continue
            if type(child) is not _Node:
                child = self._promote(node, key, child)
            # ``d`` never exceeds ``top`` (a write below is in the subtree): the newest event
            # of a subtree, the usual case, is one comparison.
            if s > child.top:
                child.top = s
                if writes:
                    child.d = s
                    if type(child.value) is not dict:
                        self._write_below(node, key, child, s)
            elif writes and s > child.d:
                child.d = s
                if type(child.value) is not dict:
                    self._write_below(node, key, child, s)
            node = child
        key = path[last]
        if s < node.r:
            return
        if op == SET:
            entries = node.entries
            entry = entries.get(key)
            if type(value) is not dict and (entry is None or (type(entry) is int and s > entry)):
                # The hot path: a leaf written where there is nothing newer.
                entries[key] = s
                data = node.value
                if type(data) is dict:
                    data[key] = value
                return
            self._set(node, key, s, value)
        elif op == INCREMENT:
            self._increment(node, key, s, value)
        else:
            self._delete(node, key, s)

    def apply_batch(
        self,
        stamps: list[int],
        ops: list[int],
        paths: list[str | list[str]],
        values: list[Any],
    ) -> None:
        """``apply`` each operation in turn (stamps growing, as in one origin's batch), with
        the same result, faster: a run of plain SETs under one parent finds that parent
        once and raises its ancestors' summaries once, at the end of the run.

        A path is a dotted string (segments without dots) or a list of segments.
        """
        apply = self.apply
        parent: _Node | None = None  # the last path's parent, while the way to it is settled
        prefix: str | None = None  # its dotted path ("" for the root)
        ancestors: list[_Node] = []
        raised = NEVER  # newest stamp of the run, not yet recorded on the ancestors
        for s, op, path, value in zip(stamps, ops, paths, values):
            if type(path) is str:
                above, _, key = path.rpartition(".")
                if above == prefix and parent is not None and op == SET and type(value) is not dict:
                    if s < parent.r:
                        raised = s  # overtaken by a reset above: only the ancestors learn of it
                        continue
                    entries = parent.entries
                    entry = entries.get(key)
                    if entry is None or (type(entry) is int and s > entry):
                        entries[key] = s
                        parent.value[key] = value
                        raised = s
                        continue
                segments = path.split(".")
            else:
                above = None
                segments = path
            if raised != NEVER:
                _raise(ancestors, raised)
                raised = NEVER
            apply(s, op, segments, value)
            parent = None
            if above is not None and op == SET and type(value) is not dict:
                parent, ancestors = self._settled_way(segments, s)
                prefix = above
        if raised != NEVER:
            _raise(ancestors, raised)

    def _settled_way(self, path: list[str], s: int) -> tuple[_Node | None, list[_Node]]:
        """The parent of ``path`` and the nodes on the way, if a later plain SET there (with a
        newer stamp than ``s``) takes the fast path at every level."""
        node = self._root
        ancestors = []
        for i in range(len(path) - 1):
            if s < node.r:
                return None, ancestors
            child = node.entries.get(path[i])
            if type(child) is not _Node or type(child.value) is not dict:
                return None, ancestors
            ancestors.append(child)
            node = child
        return node, ancestors

    def _write_below(self, parent: _Node, key: str, node: _Node, s: int) -> None:
        """A write at stamp ``s`` (already recorded in ``node.d``) landed below a non-dict."""
        self._untidy = True
        if s > node.r:
            # Newest event here: the path becomes an empty dict (older children are overtaken).
            self._prune_children(node, node.r)
            node.value = {}
            node.incs = None
            self._place(parent, key, node.value)
        else:
            # Between the assignment and the latest increment: the number changes.
            self._rebuild_at(parent, key, node)

    def _set(self, parent: _Node, key: str, s: int, value: Any) -> None:
        self._untidy = True
        entry = parent.entries.get(key)
        if entry is None or (type(entry) is int and s > entry):
            fresh = True
        elif type(entry) is int:
            return  # older than (or the same as) the assignment there
        else:
            fresh = s > entry.top
            if not fresh:
                if s <= entry.a:
                    return
                self._record_assign(parent.entries, key, s, value)
                self._rebuild_at(parent, key, entry)
                return
        if type(value) is dict:
            node = self._build(value, s)
            parent.entries[key] = node
            self._place(parent, key, node.value)
        else:
            parent.entries[key] = s
            self._place(parent, key, value)

    def _delete(self, parent: _Node, key: str, s: int) -> None:
        self._untidy = True
        entry = parent.entries.get(key)
        if entry is None or (type(entry) is int and s > entry):
            parent.entries[key] = s
            if type(parent.value) is dict:
                parent.value.pop(key, None)
        elif type(entry) is int:
            return
        elif s > entry.top:
            parent.entries[key] = s
            if type(parent.value) is dict:
                parent.value.pop(key, None)
        elif s > entry.a:
            entry.a = s
            entry.av = MISSING
            self._rebuild_at(parent, key, entry)

    def _increment(self, parent: _Node, key: str, s: int, amount: int | float) -> None:
        self._untidy = True
        entry = parent.entries.get(key)
        if entry is None:
            node = _Node()
            node.incs = {s: amount}
            node.imax = node.r = node.top = s
            node.value = amount
            parent.entries[key] = node
            self._place(parent, key, amount)
            return
        if type(entry) is int:
            if s < entry:
                return  # the assignment there is newer
            entry = self._promote(parent, key, entry)
        incs = entry.incs
        if incs is not None and s in incs:
            return  # a repeat
        if s < entry.a:
            return  # overtaken by the assignment here
        if incs is None:
            entry.incs = incs = {}
        incs[s] = amount
        if s > entry.top:
            # Newest event in the subtree: a number grows, anything else becomes the amount.
            entry.top = entry.imax = entry.r = s
            current = entry.value
            if is_number(current):
                result = current + amount
            else:
                result = amount
                if entry.entries:
                    entry.entries = {}
            entry.value = result
            self._place(parent, key, result)
        else:
            # Late (other members' increments interleave): for ints the sum does not depend
            # on the order, so a number only grows; anything else is recomputed.
            if s > entry.imax:
                entry.imax = s
                if s > entry.r:
                    entry.r = s
            current = entry.value
            if type(current) is int and type(amount) is int and entry.imax > entry.d:
                if s > entry.d:
                    entry.value = current + amount
                    self._place(parent, key, entry.value)
            else:
                self._rebuild_at(parent, key, entry)

    # -- building blocks --------------------------------------------------------------------

    def _place(self, parent: _Node, key: str, value: Any) -> None:
        """Put a path's new materialized value into its parent's dict (if that is a dict)."""
        if type(parent.value) is dict:
            if value is MISSING:
                parent.value.pop(key, None)
            else:
                parent.value[key] = value

    def _promote(self, parent: _Node, key: str, entry: int | None) -> _Node:
        """Turn a bare-stamp entry (or nothing) into a full metadata node."""
        self._untidy = True
        node = _Node()
        if entry is None:
            node.r = parent.r
        else:
            node.a = node.top = entry
            pv = parent.value
            node.av = pv.get(key, MISSING) if type(pv) is dict else MISSING
            node.value = node.av
            node.r = max(entry, parent.r)
        parent.entries[key] = node
        return node

    def _build(self, value: dict[str, Any], s: int) -> _Node:
        """A fresh node for a dict assigned at stamp ``s``, its members assigned at ``s`` too."""
        node = _Node()
        node.a = node.r = node.top = s
        node.av = DICT
        data: dict[str, Any] = {}
        entries: dict[str, int | _Node] = {}
        for k, v in value.items():
            if type(v) is dict:
                child = self._build(v, s)
                entries[k] = child
                data[k] = child.value
            else:
                entries[k] = s
                data[k] = v
        node.entries = entries
        node.value = data
        return node

    def _record_assign(self, entries: dict[str, int | _Node], key: str, s: int, value: Any) -> None:
        """Record an assignment (leaf, dict or MISSING) without touching materialized values.

        Leaf assignments are recorded as full nodes carrying their value, since the parent's
        materialized dict may not exist; ``_rebuild`` then places them.
        """
        entry = entries.get(key)
        if type(entry) is int:
            if entry >= s:
                return
            entry = None
        if entry is None:
            entry = _Node()
            entries[key] = entry
        elif entry.a >= s:
            return
        entry.a = s
        if s > entry.top:
            entry.top = s
        if type(value) is dict:
            entry.av = DICT
            for k, v in value.items():
                self._record_assign(entry.entries, k, s, v)
        else:
            entry.av = value

    def _prune_children(self, node: _Node, r: float | int) -> None:
        """Forget children whose every event is older than the reset ``r``."""
        entries = node.entries
        if not entries:
            return
        keep: dict[str, int | _Node] = {}
        for k, e in entries.items():
            if type(e) is int:
                if e >= r:
                    keep[k] = e
            elif e.top >= r:
                self._rebuild(e, r)
                keep[k] = e
        node.entries = keep

    def _rebuild_at(self, parent: _Node, key: str, node: _Node) -> None:
        """Recompute ``node`` (a child of ``parent``) from its metadata, and place the result."""
        if self._rebuild(node, parent.r):
            self._place(parent, key, node.value)
        else:
            del parent.entries[key]
            self._place(parent, key, MISSING)

    def _settle(self, node: _Node, parent_r: float | int) -> tuple[bool, Any, Any]:
        """Fix a node's own events against the reset above it: ``(is_dict, base, bv)``.

        ``base`` / ``bv`` are the effective assignment (its own, or the reset inherited from
        above, which leaves nothing). Sets ``node.r``; forgets overtaken own events.
        """
        if node.a >= parent_r:
            base = node.a
            bv = node.av
        else:
            base = parent_r
            bv = MISSING
            node.a = NEVER
            node.av = MISSING
        if node.imax <= base:
            node.imax = NEVER
        if node.d <= base:
            node.d = NEVER
        imax = node.imax
        d = node.d
        node.r = base if imax == NEVER else imax
        if imax == NEVER and d == NEVER:
            return bv is DICT, base, bv
        return d > imax, base, bv

    def _finish(self, node: _Node, base: Any, bv: Any, new_dict: dict[str, Any] | None) -> None:
        """Set a node's materialized value once its children are settled (see ``_rebuild``)."""
        imax = node.imax
        d = node.d
        if new_dict is not None:
            node.value = new_dict
        elif imax != NEVER and imax > d:
            # A number: the increments after the latest assignment or write below, in order.
            lower = base if d == NEVER else d
            incs = node.incs or {}
            result: Any = bv if (d == NEVER and is_number(bv)) else MISSING
            kept: dict[int, int | float] = {}
            for st in sorted(incs):
                if st > lower:
                    amount = incs[st]
                    kept[st] = amount
                    result = amount if result is MISSING else result + amount
            node.incs = kept
            node.value = result
            return
        else:
            node.value = bv
        if node.incs:
            # Increments older than the latest write below (or the assignment) are overtaken.
            lower = base if d == NEVER else max(base, d)
            node.incs = {st: n for st, n in node.incs.items() if st > lower} or None

    @staticmethod
    def _is_plain(node: _Node) -> bool:
        """True when a node is just one assignment of a leaf (or a tombstone)."""
        return not (
            node.entries
            or node.incs
            or node.av is DICT
            or node.d != NEVER
            or node.imax != NEVER
            or node.a == NEVER
        )

    def _rebuild(self, node: _Node, parent_r: float | int) -> bool:
        """Recompute a node's value from its metadata; drop what can no longer matter.

        This is the reference the fast paths agree with. Returns False when nothing in the
        subtree is newer than the reset inherited from above (the node can be forgotten).
        """
        is_dict, base, bv = self._settle(node, parent_r)
        r = node.r
        old_value = node.value
        old_dict = old_value if type(old_value) is dict else None
        new_dict: dict[str, Any] | None = None
        if is_dict:
            new_dict = old_dict if old_dict is not None else {}
        top = max(node.a, node.imax, node.d)
        entries = node.entries
        if entries:
            keep: dict[str, int | _Node] = {}
            for k, e in entries.items():
                if type(e) is int:
                    if e < r:
                        if new_dict is not None:
                            new_dict.pop(k, None)
                        continue
                    keep[k] = e  # its value (if not a tombstone) is already in new_dict
                    if e > top:
                        top = e
                elif self._rebuild(e, r):
                    if e.top > top:
                        top = e.top
                    child_value = e.value
                    if new_dict is not None:
                        if child_value is MISSING:
                            new_dict.pop(k, None)
                        else:
                            new_dict[k] = child_value
                    if self._is_plain(e) and (child_value is MISSING or new_dict is not None):
                        keep[k] = e.a  # a plain assignment: back to a bare stamp
                    else:
                        keep[k] = e
                elif new_dict is not None:
                    new_dict.pop(k, None)
            node.entries = keep
        if new_dict is not None and len(new_dict) > len(node.entries):
            # Drop leftovers that no entry accounts for (possible only after a reset).
            for k in [k for k in new_dict if k not in node.entries]:
                del new_dict[k]
        self._finish(node, base, bv, new_dict)
        node.top = top
        return top != NEVER and top >= parent_r

    def _install(self, encoded: Any, parent_r: float | int) -> tuple[Any, Any] | None:
        """Build an exported entry where nothing is known locally: ``(entry, value)``, or
        None if all of it is overtaken by ``parent_r``. The same result as recording the
        entry's events and rebuilding, in one pass (this is what makes joining fast)."""
        if type(encoded) is int:
            return (encoded, MISSING) if encoded >= parent_r else None
        if len(encoded) == 2:
            stamp = encoded[0]
            return (stamp, encoded[1]) if stamp >= parent_r else None
        a, av, d, imax, incs, children, leaves, values = encoded
        node = _Node()
        if a is not None:
            node.a = a
            node.av = DICT if av == 1 and type(av) is int else (MISSING if av == 0 else av[0])
        if d is not None:
            node.d = d
        if imax is not None:
            node.imax = imax
        if incs:
            node.incs = {st: n for st, n in incs}
        is_dict, base, bv = self._settle(node, parent_r)
        r = node.r
        top = max(node.a, node.imax, node.d)
        new_dict: dict[str, Any] | None = {} if is_dict else None
        entries: dict[str, int | _Node] = {}
        if leaves:
            stamps = leaves.values()
            if min(stamps) >= r:
                # The common case: every leaf stands. The decoded dicts become the node's own
                # (copied, in C: the caller's data stays its own).
                entries = dict(leaves)
                newest = max(stamps)
                if newest > top:
                    top = newest
                if new_dict is not None:
                    new_dict = dict(values)
            else:
                for k, stamp in leaves.items():
                    if stamp >= r:
                        entries[k] = stamp
                        if stamp > top:
                            top = stamp
                        if new_dict is not None and k in values:
                            new_dict[k] = values[k]
        install = self._install
        for k, child in children.items():
            built = install(child, r)
            if built is None:
                continue
            entry, value = built
            if type(entry) is int:
                if entry > top:
                    top = entry
            else:
                if entry.top > top:
                    top = entry.top
                if self._is_plain(entry) and (value is MISSING or new_dict is not None):
                    entry = entry.a  # a plain assignment: a bare stamp
            entries[k] = entry
            if new_dict is not None and value is not MISSING:
                new_dict[k] = value
        node.entries = entries
        self._finish(node, base, bv, new_dict)
        node.top = top
        if top == NEVER or top < parent_r:
            return None
        return node, node.value

    # -- forgetting what can no longer matter ------------------------------------------------

    def collect(self, frontier: int, budget: int = 10000) -> bool:
        """Forget metadata older than ``frontier``, visiting at most ``budget`` entries.

        ``frontier`` must be a stamp below which no operation will ever arrive again, at this
        replica or at any other (the node derives it from every member's progress). Then a
        tombstone older than it can never overtake anything, and increments older than it can
        be folded into one assignment. Call repeatedly; returns True when a full pass over the
        tree has finished (the next call starts another).
        """
        sweep = self._sweep
        if not sweep:
            if not self._untidy:
                return True  # nothing to look at since the last pass
            self._untidy = False
            root = self._root
            sweep.append([root, root.r, list(root.entries.items()), 0, None, None])
        visited = 0
        while sweep and visited < budget:
            frame = sweep[-1]
            node, r, todo = frame[0], frame[1], frame[2]
            if not todo:
                sweep.pop()
                if frame[3] > len(node.entries):
                    self._shrink(node, frame[4], frame[5])
                continue
            key, entry = todo.pop()
            visited += 1
            if node.entries.get(key) is not entry:
                continue  # changed since the list was taken: the next pass sees it
            if type(entry) is int:
                if type(node.value) is not dict or key not in node.value:
                    if entry < frontier:
                        del node.entries[key]  # a tombstone nothing older can reach any more
                        frame[3] += 1
                        self.collected += 1
                    else:
                        self._untidy = True  # for a later pass
                continue
            if entry.incs:
                self._fold_increments(entry, r, frontier)
                if entry.incs:
                    self._untidy = True
                if (
                    not entry.incs
                    and not entry.entries
                    and entry.d == NEVER
                    and NEVER < entry.imax <= entry.a
                    and type(node.value) is dict
                    and key in node.value
                ):
                    node.entries[key] = entry.a  # the folded counter is now a plain value
                    continue
            if entry.entries:
                sweep.append([entry, entry.r, list(entry.entries.items()), 0, node, key])
            elif entry.value is MISSING and not entry.incs:
                if max(entry.a, entry.d, entry.imax) < frontier:
                    del node.entries[key]  # metadata of nothing (left by deletes of absent paths)
                    frame[3] += 1
                    self.collected += 1
                else:
                    self._untidy = True
        return not sweep

    def _shrink(self, node: _Node, parent: _Node | None, key: str | None) -> None:
        """Give back the memory of a node's dicts after many of their entries were dropped
        (a Python dict never shrinks by itself)."""
        node.entries = dict(node.entries)
        old = node.value
        if type(old) is dict and parent is not None and key is not None:
            pv = parent.value
            if type(pv) is dict and pv.get(key) is old:
                node.value = pv[key] = dict(old)

    def _fold_increments(self, node: _Node, parent_r: Any, frontier: int) -> None:
        """Fold the increments older than ``frontier`` into one assignment of their result."""
        incs = node.incs
        assert incs is not None
        old = sorted(st for st in incs if st < frontier)
        if not old:
            return
        newest = old[-1]
        base = node.a if node.a >= parent_r else parent_r
        d = node.d if node.d > base else NEVER
        lower = base if d == NEVER else d
        if newest <= lower or newest < parent_r:
            for st in old:  # overtaken already
                del incs[st]
        else:
            bv = node.av if node.a >= parent_r else MISSING
            result: Any = bv if (d == NEVER and is_number(bv)) else MISSING
            for st in old:
                amount = incs.pop(st)
                if st > lower:
                    result = amount if result is MISSING else result + amount
            # As if one SET of the running total had happened at the newest folded stamp:
            # every event still to come is newer, so the outcome is the same.
            node.a = newest
            node.av = result
            if node.d <= newest:
                node.d = NEVER
        self.collected += len(old)
        if not incs:
            node.incs = None

    # -- whole-state transfer ----------------------------------------------------------------

    def export(self) -> list[Any]:
        """The whole state with its metadata, as JSON-serialisable data (see ``merge``).

        One item per top-level key (``export_item``).
        """
        export_item = self.export_item
        return [item for item in map(export_item, self.top_level_keys()) if item is not None]

    def top_level_keys(self) -> list[str]:
        """Every top-level key with metadata (tombstones too): what ``export`` goes over."""
        return list(self._root.entries)

    def export_item(self, key: str) -> list[Any] | None:
        """The export of one top-level key: ``[key, entry]``, or None if there is no such key
        (any more). An entry is an int (a tombstone), a ``[stamp, value]`` pair (a plain
        assignment), or ``[a, av, d, imax, incs, children, leaves, values]`` for a full node,
        where ``av`` is ``[value]``, ``0`` (deleted) or ``1`` (a dict), stamps that are unset
        are ``None``, ``children`` maps keys to the entries of full nodes, ``leaves`` maps the
        keys of plain assignments (and tombstones) to their stamps, and ``values`` maps those
        of ``leaves`` that hold a value to it.

        Each item is a consistent copy (taken without yielding), so a snapshot can be built
        and sent one slice at a time while operations go on.
        """
        root = self._root
        entry = root.entries.get(key)
        if entry is None:
            return None
        if type(entry) is int:
            value = root.value.get(key, MISSING)
            return [key, entry if value is MISSING else [entry, copy_value(value)]]
        return [key, self._export_node(entry)]

    def _export_node(self, node: _Node) -> list[Any]:
        av = node.av
        encoded_av: Any = 1 if av is DICT else (0 if av is MISSING else [copy_value(av)])
        incs = [[st, n] for st, n in node.incs.items()] if node.incs else []
        value = node.value
        data = value if type(value) is dict else {}
        entries = node.entries
        children: dict[str, Any] = {}
        if set(map(type, entries.values())) <= _LEAF_TYPES:
            # Only plain leaves (the bulk of a big tree): the dicts as they are, copied in C.
            leaves = dict(entries)
            values = (
                {k: copy_value(v) for k, v in data.items()} if _has_containers(data) else dict(data)
            )
        else:
            export_node = self._export_node
            leaves = {}
            values = {}
            for k, e in entries.items():
                if type(e) is int:
                    leaves[k] = e
                    v = data.get(k, MISSING)
                    if v is not MISSING:
                        values[k] = copy_value(v)
                else:
                    children[k] = export_node(e)
        return [
            _enc(node.a),
            encoded_av,
            _enc(node.d),
            _enc(node.imax),
            incs,
            children,
            leaves,
            values,
        ]

    def merge(self, exported: Iterable[Any]) -> None:
        """Merge state exported by another replica: the result is as if this replica had
        received every operation that one had received, too.

        Accepts the whole ``export()`` list or any slice of it, so a snapshot can arrive in
        chunks interleaved with live operations.
        """
        root = self._root
        self._untidy = True
        for key, encoded in exported:
            if key not in root.entries:
                built = self._install(encoded, root.r)
                if built is not None:
                    entry, value = built
                    if type(entry) is _Node and self._is_plain(entry):
                        entry = entry.a
                    root.entries[key] = entry
                    self._place(root, key, value)
                continue
            self._merge_entry(root, key, encoded)
            entry = root.entries[key]
            if type(entry) is _Node:
                self._rebuild_at(root, key, entry)

    def _merge_entry(self, parent: _Node, key: str, encoded: Any) -> None:
        """Record the events of one exported entry into ``parent.entries[key]`` (no rebuild)."""
        entries = parent.entries
        if type(encoded) is int:
            self._record_assign(entries, key, encoded, MISSING)
            return
        if len(encoded) == 2:
            stamp, value = encoded
            self._record_assign(entries, key, stamp, value)
            return
        a, av, d, imax, incs, children, leaves, values = encoded
        if a is not None:
            if av == 1 and type(av) is int:
                value: Any = DICT
            elif av == 0 and type(av) is int:
                value = MISSING
            else:
                value = av[0]
            if value is DICT:
                self._record_assign(entries, key, a, {})
                # the members of that dict come as children with the same stamp
            else:
                self._record_assign(entries, key, a, value)
        node = entries.get(key)
        if type(node) is not _Node:
            node = self._promote(parent, key, node)
        if d is not None and d > node.d:
            node.d = d
        if imax is not None and imax > node.imax:
            node.imax = imax
        if incs:
            current = node.incs
            if current is None:
                node.incs = current = {}
            for st, n in incs:
                current.setdefault(st, n)
        for st in (d, imax):
            if st is not None and st > node.top:
                node.top = st
        record_assign = self._record_assign
        for k, stamp in leaves.items():
            record_assign(node.entries, k, stamp, values.get(k, MISSING))
            if stamp > node.top:
                node.top = stamp
        for k, child in children.items():
            self._merge_entry(node, k, child)
            ce = node.entries[k]
            ctop = ce if type(ce) is int else ce.top
            if ctop > node.top:
                node.top = ctop


def _raise(ancestors: list[_Node], s: int) -> None:
    """Record a write at stamp ``s`` below each of ``ancestors`` (what ``apply`` does on its
    way down, for a write whose way is all dicts)."""
    for node in ancestors:
        if s > node.top:
            node.top = s
        if s > node.d:
            node.d = s


_LEAF_TYPES = {int}
_CONTAINERS = (dict, list)


def _has_containers(data: dict[str, Any]) -> bool:
    """True if some value of ``data`` is a dict or list (to be copied, not shared)."""
    return not set(map(type, data.values())).isdisjoint(_CONTAINERS)


def _enc(stamp: float | int) -> int | None:
    return None if stamp == NEVER else stamp  # type: ignore[return-value]
