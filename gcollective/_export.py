"""Exporting the whole state, metadata included, one top-level key at a time.

``export_item`` is the format (the wire's SNAPSHOT carries it, its leaves as columns: see
``_wire``); ``_merge`` installs and merges it.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Iterator, Sequence, cast

from ._columns import Run, unpack_stamps
from ._tree import DICT, MISSING, NEVER, Tree, _Node, copy_value

__all__ = ["Exporter"]

Path = tuple[str, ...]
# Where the keys of a node being exported in pieces were listed from: its entries (None), or
# one of its pending runs, with the keys as listed.
_Source = tuple[Run | None, Sequence[str]]
# A full node's assignment as pieces after its first tell it (see ``_assignment``).
_Assignment = tuple[int | None, int]

_LEAF_TYPES = {int}
_LEAF_TYPE_SET = frozenset(_LEAF_TYPES)
_CONTAINERS = (dict, list)


class Exporter(Tree):
    """``export`` and ``export_item`` (see the module docstring)."""

    def export(self) -> list[Any]:
        """The whole state with its metadata, as JSON-serialisable data (see ``merge``).

        One item per top-level key (``export_item``).
        """
        export_item = self.export_item
        return [item for item in map(export_item, self.top_level_keys()) if item is not None]

    def top_level_keys(self) -> list[str]:
        """Every top-level key with metadata (tombstones too): what ``export`` goes over."""
        return list(self._root.entries)

    def export_item(self, key: str, copy: bool = True) -> list[Any] | None:
        """The export of one top-level key: ``[key, entry]``, or None if there is no such key
        (any more). An entry is an int (a tombstone), a ``[stamp, value]`` pair (a plain
        assignment), or ``[a, av, d, imax, incs, children, leaves, values]`` for a full node:
        its ``_Node`` fields ``assigned``, ``assigned_value`` (``av``: ``[value]``, ``0``
        deleted, or ``1`` a dict), ``written_below``, ``incremented`` and ``incs`` (as
        ``[[stamp, amount], ...]``), stamps that are unset ``None``; ``children`` maps keys
        to the entries of full nodes, ``leaves`` maps the keys of plain assignments (and
        tombstones) to their stamps, and ``values`` maps those of ``leaves`` that hold a
        value to it. A node with ttl events has a ninth element, ``[[stamp, expiry stamp],
        ...]``.

        Each item is a consistent copy (taken without yielding), so a snapshot can be built
        and sent one slice at a time while operations go on. With ``copy=False`` its dicts
        may be the store's own: read it before the store changes, and never change it (a
        snapshot encodes each item at once).
        """
        self._flush_way()
        root = self._root
        entry = root.entries.get(key)
        if entry is None:
            return None
        if type(entry) is not _Node:
            value = root.value.get(key, MISSING)
            return [key, entry if value is MISSING else [entry, copy_value(value)]]
        return [key, self._export_node(entry, copy)]

    def export_pieces(self, key: str, budget: list[int]) -> Iterator[list[Any]]:
        """The export of one top-level key in items of about ``budget[0]`` leaves each (the
        caller may change it between items): the whole item when it is that small, else
        pieces of it on their paths, which merge to the same as the whole (see
        ``_wire_snapshot.encode_snapshot_parts``).

        Each item is read from the store as it is when it is made, and shares the store's
        values: encode it before the store can change (before the next item is asked for).
        Between two items, operations may change anything: each piece's leaves and children
        are taken from the tree as it is then (a node replaced, deleted, turned into a leaf
        or a leaf into a node, keys added or deleted), never from what was read before. So
        every piece holds true events of the state, which is all a merge needs (it takes the
        union of the events, by stamp); what changed since the first piece came after the
        snapshot's vector and reaches the peer as operations. A node is listed once (its
        keys only: no copy of the tree up front) and read one chunk at a time.

        But a piece says each node it lies in was assigned what it was when that node's
        first piece was read (``_assignment``), never a newer assignment made since: the
        pieces would hold only some of that assignment's members, and a peer takes a stamp
        for a whole event (it would drop the operation that brings the rest). A dict
        assigned since is told as a write below at its stamp (``_small_head``).
        """
        self._flush_way()
        entry = self._root.entries.get(key)
        if entry is None:
            return
        if type(entry) is not _Node or _weight_upto(entry, budget[0]) <= budget[0]:
            item = self.export_item(key, copy=False)
            if item is not None:
                yield item
            return
        yield from self._node_pieces((key,), budget)

    def _node_at(self, path: Path) -> tuple[list[_Node], _Node] | None:
        """The nodes on the way to ``path`` (the root excluded) and the full node there now,
        or None if there is none (it became a leaf, was deleted, or forgotten)."""
        self._flush_way()
        node = self._root
        way: list[_Node] = []
        for segment in path:
            way.append(node)
            entry = node._entries.get(segment)  # (a full node is never in a pending run)
            if type(entry) is not _Node:
                return None
            node = entry
        return way[1:], node

    def _node_pieces(
        self, path: Path, budget: list[int], above: tuple[_Assignment, ...] = ()
    ) -> Iterator[list[Any]]:
        """The pieces of the full node at ``path`` (see ``export_pieces``): its own events,
        then its leaves and small children in chunks, then each long child's pieces.
        ``above``: the ``_assignment`` of each node above it (the top-level key's first), as
        read with that node's first piece."""
        found = self._node_at(path)
        if found is None:
            return
        way, node = found
        # (read with the first piece, before the hub can run: see ``export_pieces``)
        assignment = _assignment(node)
        yield _on_path(path, way, above, [*_own_events(node), {}, {}, {}, *_ttl_events(node)])
        if node.has_sessions():
            node.record_runs()  # (their sessions are nodes: ``_chunk`` reads a run as leaves)
        sources: list[_Source] = [(None, list(node._entries))]
        sources += [(run, run[0]) for run in node.runs or ()]
        long_children: list[str] = []
        for run, keys in sources:
            start = 0
            while start < len(keys):
                end = start + max(1, budget[0])
                found = self._node_at(path)
                if found is None:
                    return  # no longer a node: what made it so came after the vector
                way, node = found
                below = self._chunk(node, run, keys, start, end, budget[0], long_children)
                if below[0] or below[1]:
                    piece = [*_small_head(node, assignment), *below]
                    yield _on_path(path, way, above, piece)
                start = end
        above = (*above, assignment)
        for name in long_children:
            yield from self._node_pieces((*path, name), budget, above)

    def _chunk(
        self,
        node: _Node,
        run: Run | None,
        keys: Sequence[str],
        start: int,
        end: int,
        budget: int,
        long_children: list[str],
    ) -> list[Any]:
        """What ``node`` holds now of ``keys[start:end]`` (listed from ``run``, or from its
        entries when None), as a piece's ``[children, leaves, values]``; the names of
        children too long for one piece go to ``long_children`` instead."""
        names = keys[start:end]
        data = _leaf_values(node)
        pending = node.runs
        if run is not None and pending is not None and any(r is run for r in pending):
            # Still pending, so unchanged: its leaves, all with a value (see ``_Node.runs``).
            stamps: list[Any] = _run_stamps(run, start, end)
        else:
            stamps = list(map(node._entries.get, names))
            if pending is not None and stamps.count(None):
                # Packed into a run since listed (``pack_leaves``): recorded again to be read.
                stamps = list(map(node.entries.get, names))
        if _LEAF_TYPE_SET.issuperset(map(type, stamps)):
            # Only plain leaves (the bulk of a big tree): read in C, no loop in Python.
            got = list(map(data.get, names, repeat(MISSING)))
            if got.count(MISSING):
                values = {k: v for k, v in zip(names, got) if v is not MISSING}
            else:
                values = dict(zip(names, got))
            return [{}, dict(zip(names, stamps)), values]
        leaves: dict[str, int] = {}
        values = {}
        children: dict[str, Any] = {}
        for name, entry in zip(names, stamps):
            if entry is None:
                continue  # gone (a node assigned anew, a tombstone forgotten): nothing to tell
            if type(entry) is not _Node:
                leaves[name] = entry
                value = data.get(name, MISSING)
                if value is not MISSING:
                    values[name] = value
            elif _weight_upto(entry, budget) <= budget:
                children[name] = self._export_node(entry, False)
            else:
                long_children.append(name)
        return [children, leaves, values]

    def _export_node(self, node: _Node, copy: bool) -> list[Any]:
        data = _leaf_values(node)
        entries = node.entries_copy() if copy or node.runs is not None else node._entries
        children: dict[str, Any] = {}
        if set(map(type, entries.values())) <= _LEAF_TYPES:
            # Only plain leaves (the bulk of a big tree): the dicts as they are (copied in C).
            leaves = entries
            if not copy:
                values = data
            elif _has_containers(data):
                values = {k: copy_value(v) for k, v in data.items()}
            else:
                values = dict(data)
        else:
            export_node = self._export_node
            leaves = {}
            values = {}
            for k, e in entries.items():
                if type(e) is not _Node:
                    leaves[k] = e
                    v = data.get(k, MISSING)
                    if v is not MISSING:
                        values[k] = copy_value(v) if copy else v
                else:
                    children[k] = export_node(e, copy)
        return [*_own_events(node), children, leaves, values, *_ttl_events(node)]


def _leaf_values(node: _Node) -> dict[str, Any]:
    """The values of a full node's bare-stamp children that hold one: those of its dict,
    and those an expiry hides (``_Node.hidden``), which a member whose clock is behind
    shows."""
    value = node.value
    data = value if type(value) is dict else {}
    hidden = node.hidden_values()  # (folded ones too: see ``_tree.fold_members``)
    return data if hidden is None else {**data, **hidden}


def _own_events(node: _Node) -> list[Any]:
    """A full node's own events as exported: ``[a, av, d, imax, incs]``."""
    av = node.assigned_value
    encoded_av: Any = 1 if av is DICT else (0 if av is MISSING else [copy_value(av)])
    # By stamp: arrival order (a late increment goes last) must not show in an export.
    incs = [[st, n] for st, n in sorted(node.incs.items())] if node.incs else []
    return [_enc(node.assigned), encoded_av, _enc(node.written_below), _enc(node.incremented), incs]


def _ttl_events(node: _Node) -> list[Any]:
    """A full node's ttl events as exported: the ninth element, if it has any."""
    return [[[st, expiry] for st, expiry in node.ttls.items()]] if node.ttls else []


def _assignment(node: _Node) -> _Assignment:
    """A full node's assignment as a piece after its first tells it (``_small_head``): its
    stamp where it is a dict or a delete (else None), and 1 for a dict (else 0)."""
    av = node.assigned_value
    small = av is DICT or av is MISSING
    return _enc(node.assigned) if small else None, 1 if av is DICT else 0


def _small_head(node: _Node, assignment: _Assignment) -> list[Any]:
    """What a piece of a node after its first says of the node itself: enough to make it a
    dict where it is one (for the leaves the piece holds), with no stamp a peer would take
    for an event the pieces hold only part of. Its assignment as read with the first piece
    (``export_pieces``), and its latest write below as it is now (the piece may hold what
    that wrote; a peer does not take this stamp for the write itself, so it still applies
    the operation). (Its own leaf value, increments and ttls go with the first. Not the
    stamp of its latest increment either: read later than the first piece, it may be one
    that piece lacks, and a stamp without its amount is no event.)"""
    below = node.written_below
    if node.assigned_value is DICT and node.assigned > below:
        stamp = _enc(node.assigned)
        if stamp != assignment[0]:
            # Assigned a dict anew since: the piece may hold some of its members, which
            # need the node to be a dict at the peer. Told as a write below at that stamp
            # (which the assignment overtakes when its operation comes).
            below = node.assigned
    return [*assignment, _enc(below), None, []]


def _on_path(
    path: Path, way: list[_Node], above: tuple[_Assignment, ...], piece: list[Any]
) -> list[Any]:
    """A piece of the node at ``path`` as an item of its top-level key (``way``: the nodes
    above it, under the top-level key's; ``above``: their ``_assignment``)."""
    for name, node, assignment in zip(reversed(path[1:]), reversed(way), reversed(above)):
        piece = [*_small_head(node, assignment), {name: piece}, {}, {}]
    return [path[0], piece]


def _weight_upto(node: _Node, cap: int) -> int:
    """A full node's size in units of about one leaf (itself, its leaves, its children's,
    recursively), counted only until it passes ``cap`` (more than ``cap``: it is long)."""
    weight = 1 + len(node._entries) + sum(len(run[0]) for run in node.runs or ())
    if weight > cap:
        return weight
    for entry in node._entries.values():
        if type(entry) is _Node:
            weight += _weight_upto(entry, cap - weight + 1) - 1
            if weight > cap:
                break
    return weight


def _run_stamps(run: Run, start: int, end: int) -> list[int]:
    """The stamps of a pending run's leaves ``start:end`` (see ``_Node.runs``)."""
    _, stamps, origins = run
    if origins is None:
        stamps = stamps if isinstance(stamps, (list, tuple)) else list(stamps)
        return list(stamps[start:end])
    if type(stamps) is bytes:
        stamps = memoryview(stamps).cast("Q")
    return unpack_stamps(cast(Sequence[int], stamps[start:end]), origins)


def _has_containers(data: dict[str, Any]) -> bool:
    """True if some value of ``data`` is a dict or list (to be copied, not shared)."""
    return not set(map(type, data.values())).isdisjoint(_CONTAINERS)


def _enc(stamp: float | int) -> int | None:
    return None if stamp == NEVER else stamp  # type: ignore[return-value]  # (NEVER: the one float)
