"""Merging state exported by another replica (a snapshot, in pieces, among live operations).

Where nothing is known locally, an exported entry is built in one pass (``_install``: what
makes joining fast). Where something is, its events are recorded and the top-level subtree
rebuilt (``_merge_entry``), unless the piece only brings more of a big dict's children and
leaves (``_graft``), which costs the piece's size, not the subtree's.
"""

from __future__ import annotations

from itertools import compress
from typing import Any, Iterable, Sequence

from ._columns import LeafColumns, Run, unpack_stamps
from ._rebuild import materialize, own_state, rebuild, rebuild_at
from ._tree import DICT, MISSING, NEVER, Entry, _Node, bare_if_plain, is_plain, place, record_assign
from ._ttl import Expiries

__all__ = ["Merger", "decode_assigned"]

Path = tuple[str, ...]
Stamp = Any  # an int stamp or NEVER
Built = tuple[Any, Any]  # an installed entry (a stamp or a node) and its value (or MISSING)
# The values a checkpoint keeps in the root's columns: those a full node's values may hold at
# any depth (a list's nesting is checked against its own depth: it goes as an item).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def decode_assigned(encoded: Any) -> Any:
    """An exported node's assigned value: ``[value]``, 0 (deleted) or 1 (a dict)."""
    if type(encoded) is int:
        return DICT if encoded == 1 else MISSING
    return encoded[0]


def _install_leaves(
    node: _Node,
    leaves: LeafColumns | dict[str, int],
    values: dict[str, Any],
    new_dict: dict[str, Any] | None,
    newest: Stamp,
) -> tuple[dict[str, Entry], dict[str, Any] | None, Run | None, Stamp]:
    """The plain leaves of a node being installed (after ``own_state``; ``new_dict`` its
    dict, None when it is not one; ``newest`` its newest stamp so far): ``(entries, new_dict,
    run, newest)``, the leaves that stand recorded in the entries or in the run."""
    reset = node.reset
    if type(leaves) is LeafColumns:
        # As a SNAPSHOT brings them: when every leaf stands and holds a value, the keys and
        # the (unmade) stamps wait on the node as a run (see ``_Node.runs``).
        if new_dict is not None and leaves and leaves.lowest >= reset and not leaves.tombstones():
            # (``values``: the wire's, decoded for this merge, see LeafColumns)
            return {}, values, leaves.as_run(), max(newest, leaves.newest)
        leaves = leaves.as_dict()
    if not leaves:
        return {}, new_dict, None, newest
    stamps = leaves.values()
    if min(stamps) >= reset:
        # The common case: every leaf stands. The decoded dicts become the node's own
        # (copied, in C: the caller's data stays its own).
        newest = max(newest, max(stamps))
        return dict(leaves), None if new_dict is None else dict(values), None, newest
    entries: dict[str, Entry] = {}
    for k, stamp in leaves.items():
        if stamp >= reset:
            entries[k] = stamp
            if stamp > newest:
                newest = stamp
            if new_dict is not None and k in values:
                new_dict[k] = values[k]
    return entries, new_dict, None, newest


def _split_columns(leaves: LeafColumns, known: set[str]) -> tuple[LeafColumns, dict[str, int]]:
    """``leaves`` without the keys in ``known`` (still columns, in their order), and
    ``{key: stamp}`` of those."""
    names, column = leaves.names, leaves.packed
    packed: Sequence[int] = memoryview(column).cast("Q") if type(column) is bytes else column
    inside = [name in known for name in names]
    outside = [not taken for taken in inside]
    stamps = unpack_stamps(list(compress(packed, inside)), leaves.origins)
    rest = LeafColumns(
        list(compress(names, outside)),
        leaves.origins,
        list(compress(packed, outside)),
        sum(outside[: leaves.valued]),
        leaves.lowest,  # (bounds of them all: bounds of the rest too)
        leaves.newest,
    )
    return rest, dict(zip(compress(names, inside), stamps))


class Merger(Expiries):
    """``merge`` (see the module docstring)."""

    def merge(self, exported: Iterable[Any]) -> None:
        """Merge state exported by another replica: the result is as if this replica had
        received every operation that one had received, too.

        Accepts the whole ``export()`` list or any slice of it, so a snapshot can arrive in
        chunks interleaved with live operations, and pieces of an item (the same key again
        with more of its subtree, see ``_wire_snapshot.encode_snapshot_parts``), which it grafts.
        """
        root = self._root
        self._untidy = True
        self._forget_way()
        for key, encoded in exported:
            if key not in root.entries:
                built = self._install(encoded, root.reset, (key,))
                if built is not None:
                    entry, value = built
                    if type(entry) is _Node and is_plain(entry):
                        entry = entry.assigned
                    root.entries[key] = entry
                    place(root, key, value)
                continue
            existing = root.entries[key]
            if self._can_graft(root, key, existing, encoded):
                # (``_can_graft`` saw that ``existing`` is a _Node)
                self._graft(existing, encoded, (key,), root.reset)  # type: ignore[arg-type]
                continue
            self._merge_entry(root, key, encoded, (key,))
            entry = root.entries[key]
            if type(entry) is _Node:
                rebuild_at(root, key, entry, self.now_ms)
                # (as ``_graft`` does below the top, and an install: the same events make
                # the same metadata, a bare stamp for one assignment, however they came)
                bare_if_plain(root, key)

    def merge_root_leaves(self, leaves: LeafColumns, values: dict[str, Any]) -> None:
        """``merge`` of top-level plain leaves given as columns (as ``root_leaves`` reads
        them, checked as a SNAPSHOT's full node's leaves): the same as merging each as an
        item (``[key, [stamp, value]]``, or ``[key, stamp]`` for a tombstone). Keys new to
        the store (a restore into an empty one) are recorded in one go, as a run on the
        root (see ``_Node.runs``), the others key by key; ``values`` is the store's (to
        keep or change)."""
        self._untidy = True
        self._forget_way()
        root = self._root
        names = leaves.names
        known = root._entries.keys() & names
        known |= root.value.keys() & names  # (a pending run's keys are in the value)
        if known and len(known) < len(names):
            # (A restore meets a few: operations written between two chunks of a checkpoint
            # touch keys of its later frames. They alone go key by key.)
            leaves, known_stamps = _split_columns(leaves, known)
            known_values = {key: values.pop(key) for key in known if key in values}
            self._graft_leaves(root, known_stamps, known_values)
        # (The root is a dict above which there is nothing: what ``_graft`` asks of a node.)
        self._graft_leaves(root, leaves, values)

    def root_leaves(self, keys: Iterable[str]) -> tuple[list[str], list[int], list[Any], list[str]]:
        """Of the top-level ``keys``, those that are plain leaves holding a scalar, or
        tombstones: ``(names, stamps, values, others)``, the names of those with a value first
        (``values`` holds theirs, in order), then the tombstones; and ``others``, the keys
        still there that are anything else (a full node, a list), to export as items (keys no
        longer there are left out). The values are the store's own scalars (nothing to
        copy)."""
        self._flush_way()
        root = self._root
        entries = root.entries
        data = root.value
        names: list[str] = []
        stamps: list[int] = []
        values: list[Any] = []
        tombstones: list[str] = []
        tombstone_stamps: list[int] = []
        others: list[str] = []
        scalars = _SCALARS
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                continue
            if type(entry) is _Node:
                others.append(key)
                continue
            value = data.get(key, MISSING)
            if value is MISSING:
                tombstones.append(key)
                tombstone_stamps.append(entry)
            elif type(value) in scalars:
                names.append(key)
                stamps.append(entry)
                values.append(value)
            else:
                others.append(key)
        return names + tombstones, stamps + tombstone_stamps, values, others

    def _install(self, encoded: Any, parent_reset: Stamp, path: Path) -> Built | None:
        """Build an exported entry (at ``path``) where nothing is known locally:
        ``(entry, value)``, or None if all of it is overtaken by ``parent_reset``. The same
        result as recording the entry's events and rebuilding, in one pass (this is what
        makes joining fast): a full node's own events, then its leaves and children, each
        dropped if the node's reset overtook it."""
        if type(encoded) is int:
            return (encoded, MISSING) if encoded >= parent_reset else None
        if len(encoded) == 2:
            stamp = encoded[0]
            return (stamp, encoded[1]) if stamp >= parent_reset else None
        if len(encoded) == 9:
            return self._install_expiring(encoded, parent_reset, path)
        assigned, assigned_value, below, incremented, incs, children, leaves, values = encoded
        node = _Node()
        if assigned is not None:
            node.assigned = assigned
            node.assigned_value = decode_assigned(assigned_value)
        if below is not None:
            node.written_below = below
        if incremented is not None:
            node.incremented = incremented
        if incs:
            node.incs = {stamp: n for stamp, n in incs}
        is_dict, base, base_value = own_state(node, parent_reset)
        newest = max(node.assigned, node.incremented, node.written_below)
        entries, new_dict, run, newest = _install_leaves(
            node, leaves, values, {} if is_dict else None, newest
        )
        if children:
            newest = self._install_children(node, children, path, entries, new_dict, newest)
        node.entries = entries
        if run is not None:
            node.runs = [run]
        visible = (is_dict, base, base_value, node.written_below, node.incremented, node.reset)
        materialize(node, base, new_dict, visible)  # (nothing fired here: all is visible)
        node.newest = newest
        if newest == NEVER or newest < parent_reset:
            return None
        return node, node.value

    def _install_expiring(
        self, encoded: list[Any], parent_reset: Stamp, path: Path
    ) -> Built | None:
        """``_install`` of a full node with ttl events: record its events and rebuild (the
        general way, which knows about expiries)."""
        holder = _Node()
        holder.reset = parent_reset
        holder.value = {}
        key = path[-1]
        self._merge_entry(holder, key, encoded, path)
        node = holder.entries[key]
        if type(node) is not _Node:
            return (node, MISSING) if node >= parent_reset else None
        if not rebuild(node, parent_reset, self.now_ms):
            return None
        return node, node.value

    def _install_children(
        self,
        node: _Node,
        children: dict[str, Any],
        path: Path,
        entries: dict[str, Entry],
        new_dict: dict[str, Any] | None,
        newest: Stamp,
    ) -> Stamp:
        """Install the full nodes below ``node`` (after ``own_state``) into its ``entries``
        and ``new_dict`` (None when it is not a dict); the newest stamp so far."""
        reset = node.reset
        install = self._install
        for k, child in children.items():
            # (the path matters only to register expiries, found in full nodes)
            built = install(
                child, reset, (*path, k) if type(child) is list and len(child) > 2 else path
            )
            if built is None:
                continue
            entry, value = built
            if type(entry) is int:
                if entry > newest:
                    newest = entry
            else:
                if entry.newest > newest:
                    newest = entry.newest
                if is_plain(entry) and (value is MISSING or new_dict is not None):
                    entry = entry.assigned  # a plain assignment: a bare stamp
            entries[k] = entry
            if new_dict is not None and value is not MISSING:
                new_dict[k] = value
        return newest

    @staticmethod
    def _can_graft(parent: _Node, key: str, node: Any, encoded: Any) -> bool:
        """True if merging ``encoded`` (a full node's export) into ``node``, the existing
        entry ``key`` of ``parent``, cannot change what ``node`` is: it is a dict with no
        ttl events, and ``encoded`` brings no assignment, reset or increment of its own that
        is newer than what ``node`` has. Then only the events below it are new."""
        return (
            type(node) is _Node
            and type(encoded) is list
            and len(encoded) == 8
            and node.ttls is None
            and type(node.value) is dict
            and type(parent.value) is dict
            and parent.value.get(key) is node.value
            and (encoded[0] is None or encoded[0] <= node.assigned)
            and (encoded[3] is None or encoded[3] <= node.reset)
            and not encoded[4]
        )

    def _graft(self, node: _Node, encoded: list[Any], path: Path, parent_reset: Any) -> None:
        """Merge ``encoded`` into ``node`` (``_can_graft`` said yes, and every node above is
        a dict without ttl events; ``parent_reset`` is the reset above it): what
        ``_merge_entry`` and a rebuild would make of it, touching only what ``encoded``
        holds."""
        below, children, leaves, values = encoded[2], encoded[5], encoded[6], encoded[7]
        if (
            below is not None
            and below > node.written_below
            and below > node.assigned
            and below > parent_reset
        ):
            node.written_below = below  # (a dict stays a dict when a write below is newer)
        newest = max(node.newest, node.written_below)
        if leaves:
            newest = max(newest, self._graft_leaves(node, leaves, values))
        data = node.value
        reset = node.reset
        for k, child in children.items():
            entry: Any = node._entries.get(k)
            if entry is None and k not in data:
                built = self._install(child, reset, (*path, k))
                if built is None:
                    continue
                entry, value = built
                if type(entry) is _Node and is_plain(entry):
                    entry = entry.assigned  # a plain assignment: a bare stamp
                node._entries[k] = entry
                if value is not MISSING:
                    data[k] = value
            elif self._can_graft(node, k, entry, child):
                self._graft(entry, child, (*path, k), reset)
            else:
                if node.runs is not None:
                    node.record_runs()
                self._merge_entry(node, k, child, (*path, k))
                entry = node._entries[k]
                rebuild_at(node, k, entry, self.now_ms)
                entry = bare_if_plain(node, k)
                if entry is None:
                    continue
            child_newest = entry.newest if type(entry) is _Node else entry
            if child_newest > newest:
                newest = child_newest
        node.newest = newest

    def _graft_leaves(
        self, node: _Node, leaves: LeafColumns | dict[str, int], values: dict[str, Any]
    ) -> Any:
        """The leaves of a piece (as a SNAPSHOT brings them, or as ``export`` makes them)
        into ``node`` (see ``_graft``); their newest stamp. New keys that all stand are
        recorded the way ``_install`` does (the valued ones as a run)."""
        data = node.value
        entries = node._entries
        if isinstance(leaves, dict):
            pairs: Iterable[tuple[str, int]] = leaves.items()
        elif (
            leaves.lowest >= node.reset
            and entries.keys().isdisjoint(leaves.names)
            and data.keys().isdisjoint(leaves.names)
        ):
            names = leaves.names
            valued = leaves.valued
            if valued:
                run = leaves.as_run(valued)
                node.runs = [run] if node.runs is None else [*node.runs, run]
                data.update(values)
            if valued < len(names):
                entries.update(zip(leaves.tombstones(), leaves.stamps[valued:]))
            return leaves.newest
        else:
            pairs = zip(leaves.names, leaves.stamps)
        if node.runs is not None:
            node.record_runs()
        reset = node.reset
        newest: Any = NEVER
        for k, stamp in pairs:
            if stamp < reset:
                continue  # overtaken by a reset here
            entry: Any = entries.get(k)
            value = values.get(k, MISSING)
            if entry is None or (type(entry) is int and stamp > entry):
                entries[k] = stamp
                place(node, k, value)
            elif type(entry) is _Node:
                record_assign(entries, k, stamp, value)
                rebuild_at(node, k, entry, self.now_ms)
                bare_if_plain(node, k)
            else:
                continue
            if stamp > newest:
                newest = stamp
        return newest

    def _merge_entry(self, parent: _Node, key: str, encoded: Any, path: Path) -> None:
        """Record the events of one exported entry (at ``path``) into ``parent.entries[key]``
        (no rebuild)."""
        entries = parent.entries
        if type(encoded) is int:
            record_assign(entries, key, encoded, MISSING)
            return
        if len(encoded) == 2:
            stamp, value = encoded
            record_assign(entries, key, stamp, value)
            return
        assigned, assigned_value, below, incremented, incs = encoded[:5]
        if assigned is not None:
            value = decode_assigned(assigned_value)
            # (the members of an assigned dict come as children with the same stamp)
            record_assign(entries, key, assigned, {} if value is DICT else value)
        node = entries.get(key)
        if type(node) is not _Node:
            node = self._promote(parent, key, node)
        if below is not None and below > node.written_below:
            node.written_below = below
        if incremented is not None and incremented > node.incremented:
            node.incremented = incremented
        if incs:
            current = node.incs
            if current is None:
                node.incs = current = {}
            for stamp, amount in incs:
                current.setdefault(stamp, amount)
        for stamp in (below, incremented):
            if stamp is not None and stamp > node.newest:
                node.newest = stamp
        if len(encoded) == 9:
            for stamp, expiry in encoded[8]:
                self._add_ttl(node, stamp, expiry, path)
        self._merge_below(node, encoded[5], encoded[6], encoded[7], path)

    def _merge_below(
        self,
        node: _Node,
        children: dict[str, Any],
        leaves: LeafColumns | dict[str, int],
        values: dict[str, Any],
        path: Path,
    ) -> None:
        """Record the events of an exported node's leaves and children (``_merge_entry``)."""
        node_entries = node.entries
        if type(leaves) is LeafColumns:
            leaves = leaves.as_dict()
        for k, stamp in leaves.items():
            record_assign(node_entries, k, stamp, values.get(k, MISSING))
            if stamp > node.newest:
                node.newest = stamp
        for k, child in children.items():
            self._merge_entry(node, k, child, (*path, k))
            entry = node.entries[k]
            newest = entry.newest if type(entry) is _Node else entry
            if newest > node.newest:
                node.newest = newest
