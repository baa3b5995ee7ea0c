"""Prometheus metrics of a member (``pip install 'gcollective[metrics]'``).

``serve_metrics(node, (host, port))`` serves them from this process; ``metrics_app(node)``
is the WSGI app, ``metrics_registry(node)`` a registry with the node's collector. Why a port
per member, the gunicorn setting and the list of metrics: docs/operations.rst.
"""

from ._metrics import NodeCollector, metrics_app, metrics_registry, serve_metrics

__all__ = ["NodeCollector", "metrics_app", "metrics_registry", "serve_metrics"]
