"""Prometheus metrics of a member, read from the node when scraped (``pip install
'gcollective[metrics]'``).

Design (see docs/operations.rst): every member serves its own metrics on a port of its own,
``serve_metrics(node, (host, port))``, a gevent WSGI server in the member's process. Under the
gunicorn worker the metrics port of a worker is ``GCOLLECTIVE_METRICS_PORT + slot``, so the
scrape targets of a server are as fixed and known as its peer addresses; no multiprocess
directory is needed, because each process answers for itself. ``metrics_app(node)`` is the
same endpoint as a WSGI app, for a standalone process that already runs a web server (not for
gunicorn workers: a request to the app's port reaches one worker at random).

Nothing is counted for the metrics: the collector reads the counters the node keeps anyway
(those of ``stats()``) at scrape time, so ``set()`` costs the same with or without them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "gcollective metrics need prometheus_client: pip install 'gcollective[metrics]'"
    ) from exc

from ._clock import stamp_millis
from ._digest import Slicer
from ._validate import format_address

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication
    from gevent.pywsgi import WSGIServer

    from ._links import _PeerLink
    from ._node import Collective
    from ._store import Store

__all__ = ["NodeCollector", "metrics_app", "metrics_registry", "serve_metrics"]

#: The states of a peer link (``stats()["peers"][...]["state"]``), one series each.
PEER_STATES = ("connecting", "connected", "backoff", "stopped")


def metadata_entries(store: Store) -> int:
    """Entries of metadata the store holds (stamps, tombstones, pending increments), counted
    in slices with a pause for the hub between them: a 2M-key tree does not stall the
    member."""
    count = 0
    stack = [store._root]
    slicer = Slicer()
    while stack:
        meta = stack.pop()
        children = meta.child_entries()  # a copy: the tree may change at each pause
        count += len(children) + len(meta.incs or ())
        for child in children:
            if not isinstance(child, int):  # a subtree (an int is a leaf's stamp)
                stack.append(child)
            slicer.tick()
    return count


def _lag(node: Collective, link: _PeerLink) -> tuple[int, float]:
    """How far the peer's last reported progress is behind ours: operations it lacks, and
    the milliseconds between the stamps of our newest and its newest operation of the
    origin on which it is furthest behind."""
    progress = node._progress
    theirs, their_stamps = link.peer_vector, link.peer_stamps
    operations, millis = 0, 0
    for origin, seq in list(progress.applied.items()):
        have = theirs.get(origin, 0)
        if seq <= have or origin == link.peer_id:
            continue
        operations += seq - have
        ours = stamp_millis(progress.stamps.get(origin, 0))
        theirs_at = their_stamps.get(origin)
        behind = ours - stamp_millis(theirs_at) if theirs_at else 0
        millis = max(millis, behind)
    return operations, millis


class NodeCollector(Collector):
    """Reads one node's counters at scrape time (a ``prometheus_client`` custom collector)."""

    def __init__(self, node: Collective) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        stats = node.stats()
        yield from self._node_metrics(stats)
        yield from self._peer_metrics(stats)

    def _node_metrics(self, stats: dict[str, Any]) -> Iterator[Metric]:
        from . import __version__

        node = self.node
        info = InfoMetricFamily("gcollective", "This member: its id, address and version.")
        info.add_metric(
            [],
            {"node_id": stats["node_id"], "address": stats["address"], "version": __version__},
        )
        yield info
        gauges = [
            ("running", "1 while the member runs.", int(bool(stats["running"]))),
            ("synced", "1 once the member holds a peer's state.", int(bool(stats["synced"]))),
            ("uptime_seconds", "Seconds since the member started.", stats["uptime"]),
            ("keys", "Top-level keys in the tree.", stats["top_level_keys"]),
            (
                "metadata_entries",
                "Metadata entries held (stamps, tombstones, increments).",
                metadata_entries(node._store),
            ),
            ("log_bytes", "Bytes of operations kept for catch-up.", stats["log_bytes"]),
            ("log_frames", "Frames of operations kept for catch-up.", stats["log_ops"]),
            ("pending_expiries", "Keys with a TTL still to expire.", stats["pending_expiries"]),
            ("origins", "Origins (member incarnations) in the version vector.", stats["origins"]),
            ("gap_operations", "Operations received beyond a gap.", stats["gaps"]),
            (
                "frontier_age_seconds",
                "Age of the metadata frontier (older: less is forgotten).",
                self._frontier_age(),
            ),
        ]
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"gcollective_{name}", text, value=value)
        counters = [
            ("operations_made", "Operations this member made.", stats["local_ops"]),
            ("operations_received", "Operations received from peers.", stats["received_ops"]),
            ("operations_applied", "Received operations applied.", stats["applied_ops"]),
            (
                "clock_refusals",
                "Frames refused for a stamp beyond clock_skew.",
                stats["clock_refusals"],
            ),
            ("connections_refused", "Incoming connections refused.", stats["refused_connections"]),
            ("received_frames", "Frames received from peers.", stats["received_frames"]),
            ("received_bytes", "Bytes received from peers.", stats["received_bytes"]),
            ("expired", "Keys expired by their TTL.", stats["expired"]),
            (
                "snapshots_merged",
                "Whole states received from peers and merged.",
                stats["snapshots_merged"],
            ),
        ]
        for name, text, value in counters:
            yield CounterMetricFamily(f"gcollective_{name}", text, value=value)

    def _frontier_age(self) -> float:
        frontier = self.node._frontier
        if not frontier:
            return float("nan")  # no frontier yet: nothing was forgotten
        return max(0.0, time.time() - stamp_millis(frontier) / 1000)

    def _peer_metrics(self, stats: dict[str, Any]) -> Iterator[Metric]:
        labels = ["peer"]
        state = GaugeMetricFamily(
            "gcollective_peer_state", "1 for the link's current state.", labels=[*labels, "state"]
        )
        gauges = {
            "queued_bytes": GaugeMetricFamily(
                "gcollective_peer_queued_bytes", "Bytes queued for the peer.", labels=labels
            ),
            "queued_frames": GaugeMetricFamily(
                "gcollective_peer_queued_frames", "Frames queued for the peer.", labels=labels
            ),
        }
        counters = {
            key: CounterMetricFamily(f"gcollective_peer_{name}", text, labels=labels)
            for key, name, text in (
                ("sent_frames", "sent_frames", "Frames sent to the peer."),
                ("sent_bytes", "sent_bytes", "Bytes sent to the peer."),
                ("sent_ops", "sent_operations", "Operations sent to the peer."),
                ("connects", "connects", "Connections made to the peer (reconnects)."),
                ("overflows", "overflows", "Times the peer's queue overflowed."),
                ("snapshots_sent", "snapshots_sent", "Snapshots sent to the peer."),
                ("relayed_frames", "catch_up_frames", "Frames resent to the peer by catch-up."),
            )
        }
        lag_ops = GaugeMetricFamily(
            "gcollective_peer_lag_operations",
            "Operations we hold that the peer's last progress report lacks.",
            labels=labels,
        )
        lag_seconds = GaugeMetricFamily(
            "gcollective_peer_lag_seconds",
            "How far behind the peer's newest operation is ours, in stamp time.",
            labels=labels,
        )
        links = {link.name: link for link in list(self.node._links.values())}
        for name, peer in sorted(stats["peers"].items()):
            for known in PEER_STATES:
                state.add_metric([name, known], int(peer["state"] == known))
            for key, family in gauges.items():
                family.add_metric([name], peer[key])
            for key, counter in counters.items():
                counter.add_metric([name], peer[key])
            link = links.get(name)
            if link is not None:
                operations, millis = _lag(self.node, link)
                lag_ops.add_metric([name], operations)
                lag_seconds.add_metric([name], millis / 1000)
        yield state
        yield from gauges.values()
        yield from counters.values()
        yield lag_ops
        yield lag_seconds


def metrics_registry(node: Collective) -> CollectorRegistry:
    """A registry holding only this node's collector (not the process-wide default one)."""
    if not hasattr(node, "_progress"):
        raise TypeError("metrics need a member speaking the gcollective protocol")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


def metrics_app(node: Collective) -> WSGIApplication:
    """A WSGI app answering with this node's metrics in the Prometheus text format."""
    return make_wsgi_app(metrics_registry(node))


def serve_metrics(node: Collective, address: tuple[str, int]) -> WSGIServer:
    """Serve the node's metrics on ``address`` (HTTP, any path) from a gevent WSGI server in
    this process; returns the started server (``server.stop()`` ends it). Raises ``OSError``
    when the address cannot be bound."""
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(address, metrics_app(node), log=None, error_log=None)
    server.start()
    return server


def describe(address: tuple[str, int]) -> str:
    """``http://HOST:PORT/metrics`` for the logs."""
    return f"http://{format_address(address)}/metrics"
