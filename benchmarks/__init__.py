"""gcollective's benchmark suite (issue 6): speed, memory and scale on one machine.

Run ``python -m benchmarks`` (or ``python benchmarks/run.py``); ``--quick`` for a short run,
``--help`` for the options. Results go to ``benchmarks/results/`` as JSON (and a PNG chart when
matplotlib is importable, e.g. with the ``bench`` extra).

Importing this package has no side effects: ``benchmarks.member`` and ``benchmarks.proxy``
monkey-patch with gevent when run as processes, the orchestrator does not.
"""
