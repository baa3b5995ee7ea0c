"""Exporting the whole state, metadata included, one top-level key at a time.

``export_item`` is the format (the wire's SNAPSHOT carries it, its leaves as columns: see
``_wire``); ``_merge`` installs and merges it.
"""

from __future__ import annotations

from typing import Any

from ._tree import DICT, MISSING, NEVER, Tree, _Node, copy_value

__all__ = ["Exporter"]

_LEAF_TYPES = {int}
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

    def _export_node(self, node: _Node, copy: bool) -> list[Any]:
        av = node.assigned_value
        encoded_av: Any = 1 if av is DICT else (0 if av is MISSING else [copy_value(av)])
        # By stamp: arrival order (a late increment goes last) must not show in an export.
        incs = [[st, n] for st, n in sorted(node.incs.items())] if node.incs else []
        value = node.value
        data = value if type(value) is dict else {}
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
        out = [
            _enc(node.assigned),
            encoded_av,
            _enc(node.written_below),
            _enc(node.incremented),
            incs,
            children,
        ]
        out += (leaves, values)
        if node.ttls:
            out.append([[st, expiry] for st, expiry in node.ttls.items()])
        return out


def _has_containers(data: dict[str, Any]) -> bool:
    """True if some value of ``data`` is a dict or list (to be copied, not shared)."""
    return not set(map(type, data.values())).isdisjoint(_CONTAINERS)


def _enc(stamp: float | int) -> int | None:
    return None if stamp == NEVER else stamp  # type: ignore[return-value]  # (NEVER: the one float)
