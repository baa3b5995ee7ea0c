"""gunicorn settings for the example app, every worker a gcollective member.

Run from anywhere::

    gunicorn -c examples/gunicorn.conf.py

then open http://127.0.0.1:8000/ and reload: each worker counts into the same total.
"""

import multiprocessing
import os

# The app module sits next to this file.
chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "app:app"

bind = "127.0.0.1:8000"
workers = min(4, multiprocessing.cpu_count() * 2)
worker_class = "gcollective.gunicorn.GeventWorker"  # or "egg:gcollective#gevent"
worker_connections = 1000

# Workers finish their requests and hand their data on within this when told to stop.
graceful_timeout = 15
# Recycled workers hand their data to the others before they go.
max_requests = 10000
max_requests_jitter = 1000

# gcollective reads these in each worker (gunicorn -e NAME=value works too).
raw_env = [
    # Every server of the collective; this one is found among them by its addresses.
    "GCOLLECTIVE_HOSTS=127.0.0.1",
    # Slot i of each server listens on 9400 + i.
    "GCOLLECTIVE_BASE_PORT=9400",
    # Room for `kill -TTIN` up to 8 workers; the ports 9400-9407 must be free.
    "GCOLLECTIVE_SLOTS=8",
    # Needs gcollective's `secret` option; every member must use the same one.
    # "GCOLLECTIVE_SECRET=change-me",
]
