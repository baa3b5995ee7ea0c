"""The replicated tree: a sans-IO, convergent store of nested JSON data.

``Store`` composes the store's concerns, one module each (read them in this order):

=============  ============================================================================
``_tree``      the contract, what a path remembers (``_Node``), reading, shared state
``_rebuild``   the reference: a subtree's values recomputed from its metadata
``_ttl``       expiring keys: ttl events, firing them (``advance``), making them permanent
``_apply``     one stamped operation (``apply``): the fast paths and the general way
``_way``       the way cache: a node's own operations in a writer's loop, in a few steps
``_batch``     a batch of one origin's operations (``apply_batch``)
``_collect``   forgetting metadata below the stability frontier (``collect``)
``_export``    the whole state with its metadata (``export``, ``export_item``)
``_merge``     merging another replica's export (``merge``)
=============  ============================================================================

Each concern is a mixin over ``_tree.Tree`` that only calls what it builds on (its base
classes and the pure functions of ``_tree`` and ``_rebuild``); its methods are looked up on
the one ``Store`` class, so composing them costs the hot paths nothing.
"""

from __future__ import annotations

from ._batch import Batches
from ._collect import Collector
from ._export import Exporter
from ._merge import Merger
from ._tree import DELETE, INCREMENT, MISSING, SET, copy_value, is_number, read_path

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


class Store(Batches, Merger, Exporter, Collector):
    """A nested dict that converges under operations delivered in any order, with repeats.

    Pure Python, no I/O. ``apply`` takes one stamped operation (``apply_batch`` an origin's
    batch; ``assign_key``, ``increment_key`` and ``delete_key`` a node's own in a loop);
    ``export`` / ``merge`` move the whole state (metadata included) between replicas;
    ``advance`` / ``expire`` run the ttl clock and ``collect`` forgets what no operation can
    need any more. Read the tree through ``get`` or ``to_dict``; ``data`` is the live root for
    callers that promise not to mutate it.
    """
