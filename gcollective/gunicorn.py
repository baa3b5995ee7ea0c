"""A gunicorn gevent worker whose processes share one gcollective tree.

Run an app with ``gunicorn -k gcollective.gunicorn.GeventWorker app:app`` (or
``-k egg:gcollective#gevent``). Each worker process becomes a member of the collective and
its module-level default node, so the app just calls ``gcollective.get/set/incr/delete``.

Lifecycle, on top of gunicorn's own gevent worker:

- The node starts in the worker process only, after gunicorn patched the standard library
  and re-initialised the hub, before the app is loaded and before any request is served.
  Nothing runs in the master, and nothing at ``--preload`` import time.
- Each worker claims a *slot*: it listens on the first free address of this server's slot
  list (``GCOLLECTIVE_BASE_PORT + 0 .. SLOTS - 1``). A worker that dies frees its slot and
  its replacement takes it again, so peers reconnect to the same address. While old workers
  of a ``kill -HUP`` still hold every slot, new workers wait for one (heartbeating, so the
  arbiter does not time them out).
- On a graceful exit (SIGTERM, max-requests recycling, HUP, TTOU) the worker first finishes
  its requests, then hands its data on before stopping the node with a flush: it leaves at
  once when a member on another server, or a higher slot on this one, answers; otherwise it
  is the last holder here and waits (``GCOLLECTIVE_HANDOFF_TIMEOUT``) until a new worker has
  taken its state. SIGQUIT / SIGINT (quick shutdown) only flush, and so does SIGTERM when
  gunicorn shuts down (its master closed its listeners: see ``_handoff._MasterSockets``),
  since no new worker will come.

Its parts: the configuration (``_worker_settings``: the environment parsed without gunicorn),
what the handoff watches (``_handoff``), and the worker class here.

Configuration comes from the environment (``gunicorn -e NAME=value`` or ``raw_env``); see
``settings_from_env``. A bad value fails the worker's boot with a message naming the
variable, which stops gunicorn ("Worker failed to boot").
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket as gsocket

import gcollective

from ._errors import DataDirLocked
from ._handoff import _connected_peers, _MasterSockets, _PeerAges, _SuccessorWatch
from ._validate import format_address
from ._worker_settings import (
    DEFAULT_BASE_PORT,
    DEFAULT_HANDOFF_TIMEOUT,
    DEFAULT_HOSTS,
    DEFAULT_START_TIMEOUT,
    ConfigError,
    Settings,
    parse_count,
    parse_hosts,
    parse_peers,
    parse_port,
    parse_seconds,
    settings_from_env,
)

try:
    from gunicorn.workers import ggevent as _ggevent
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "gcollective.gunicorn needs gunicorn: pip install 'gcollective[gunicorn]'"
    ) from exc

if TYPE_CHECKING:
    from gevent.pywsgi import WSGIServer

    from ._node import Collective

__all__ = [
    "DEFAULT_BASE_PORT",
    "DEFAULT_HANDOFF_TIMEOUT",
    "DEFAULT_HOSTS",
    "DEFAULT_START_TIMEOUT",
    "ConfigError",
    "GeventWorker",
    "Settings",
    "parse_count",
    "parse_hosts",
    "parse_peers",
    "parse_port",
    "parse_seconds",
    "settings_from_env",
]

#: Environment variable the worker sets to its slot number, for the app and its logs.
SLOT_VARIABLE = "GCOLLECTIVE_WORKER_SLOT"

_PROBE_TIMEOUT = 0.5  # seconds for one "does anyone listen there?" connection
_REJOINS = 2  # times a worker joins again when connected peers sent it no state
# Seconds kept, before gunicorn's SIGKILL (``graceful_timeout`` after its SIGTERM), for the
# node's final flush and stop and the process's exit. The flush and stop took 0-2 ms with one
# peer at load 6 (2 cores; the "left slot" log line says how long); the margin is for a peer
# whose writer still has a burst to send, the interpreter's exit, and a signal handled late
# by a starved worker (its arrival here is the only start of the countdown it can see).
_STOP_RESERVE = 1.0


def _serve_metrics(node: Collective, address: tuple[str, int]) -> WSGIServer:
    """The worker's metrics endpoint (``GCOLLECTIVE_METRICS_PORT`` + slot), started."""
    try:
        from ._metrics import serve_metrics

        return serve_metrics(node, address)
    except (ImportError, OSError) as exc:
        gcollective.stop(1.0)
        raise ConfigError(
            "GCOLLECTIVE_METRICS_PORT", f"cannot serve metrics on {format_address(address)}: {exc}"
        ) from exc


def _accepts_secret() -> bool:
    from ._node import Collective

    parameters = inspect.signature(Collective.__init__).parameters
    return "secret" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


# -- handoff helpers ---------------------------------------------------------------------------


def _answers(address: tuple[str, int]) -> bool:
    """True if something listens at ``address`` (a member that has not left)."""
    try:
        sock = gsocket.create_connection(address, timeout=_PROBE_TIMEOUT)
    except OSError:
        return False
    sock.close()
    return True


def _any_answers(addresses: list[tuple[str, int]]) -> bool:
    if not addresses:
        return False
    probes = [gevent.spawn(_answers, address) for address in addresses]
    gevent.joinall(probes, timeout=_PROBE_TIMEOUT + 0.5)
    gevent.killall(probes, block=False)
    return any(probe.successful() and probe.value for probe in probes)


class GeventWorker(_ggevent.GeventWorker):
    """gunicorn's gevent worker, plus a gcollective member per worker process.

    After boot, ``gcollective_slot`` is this worker's slot number, ``gcollective_node`` its
    node (also ``gcollective.default_node()``), and ``GCOLLECTIVE_WORKER_SLOT`` in
    ``os.environ`` holds the slot for the app.
    """

    gcollective_settings: Settings | None = None
    gcollective_slot: int | None = None
    gcollective_node: Collective | None = None
    _gcollective_start_took = 0.0
    _gcollective_master: _MasterSockets | None = None  # (None: cannot tell a shutdown)
    _gcollective_successors: _SuccessorWatch | None = None  # (from the exit signal on)
    # When gunicorn may SIGKILL this worker (monotonic; None until a SIGTERM): see
    # _gcollective_kill_at.
    _gcollective_signalled_at: float | None = None

    def init_process(self) -> None:
        """Run gunicorn's gevent worker; the node stops when the worker leaves, however it
        leaves (its run loop ends, or SystemExit from a signal or a parent change)."""
        self._gcollective_quick = False
        try:
            # Patches, re-initialises the hub, installs signals, then load_wsgi(), then run().
            super().init_process()
        finally:
            self._gcollective_leave()

    def load_wsgi(self) -> None:
        """Read the configuration and join the collective, then load the app (which may use
        gcollective at import). A bad value raises here, before the worker counts as
        booted, so gunicorn stops with "Worker failed to boot"."""
        env = dict(os.environ)
        env.update(self.cfg.env or {})
        self.gcollective_settings = settings_from_env(env, self.cfg.workers)
        self._gcollective_join()
        # (Now, while the master surely holds its listeners: see _MasterSockets.)
        self._gcollective_master = _MasterSockets.observe(self.ppid, self.sockets)
        super().load_wsgi()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM (HUP reload, TTOU, a stop): a graceful exit; watch for a successor now."""
        if self._gcollective_signalled_at is None:  # (a second SIGTERM moves no deadline)
            self._gcollective_signalled_at = time.monotonic()
        self._gcollective_watch_successors()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """SIGQUIT / SIGINT: a quick exit; flush, but do not wait for a successor."""
        self._gcollective_quick = True
        super().handle_quit(sig, frame)

    # -- joining -------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        # The arbiter kills a worker that stays silent for `timeout` seconds; joining and
        # handing off can take a while, so keep telling it we are alive.
        while True:
            self.notify()
            gevent.sleep(1.0)

    def _gcollective_join(self) -> None:
        settings = self.gcollective_settings
        assert settings is not None
        options: dict[str, Any] = {}  # the options beyond the addresses: secret, ...
        for name in ("resolve_interval", "max_members"):
            if getattr(settings, name) is not None:
                options[name] = getattr(settings, name)
        if settings.secret is not None:
            if not _accepts_secret():
                raise ConfigError(
                    "GCOLLECTIVE_SECRET",
                    "is set, but this gcollective has no secret option yet; upgrade "
                    "gcollective or unset it",
                )
            options["secret"] = settings.secret
        beat = gevent.spawn(self._heartbeat)
        try:
            slot, node = self._claim(settings, options)
            for _ in range(_REJOINS):
                timed_out = self._gcollective_start_took >= settings.start_timeout * 0.9
                if node.synced or not timed_out or not _connected_peers(node):
                    break
                # Peers answered but their state never came: a snapshot can be lost on a
                # connection a peer still held to this slot's previous worker. Joining again
                # as a new incarnation makes every peer start a fresh connection.
                self.log.warning(
                    "gcollective: worker %s got no state from its connected peers within "
                    "%.1fs; joining again",
                    self.pid,
                    settings.start_timeout,
                )
                gcollective.stop(1.0)
                slot, node = self._claim(settings, options)
        finally:
            beat.kill()
        self.gcollective_slot = slot
        self.gcollective_node = node
        self._gcollective_peers = _PeerAges(node)
        gevent.spawn(self._gcollective_peers.run)
        os.environ[SLOT_VARIABLE] = str(slot)
        if settings.metrics_port is not None:
            self._gcollective_metrics = _serve_metrics(
                node, (settings.bind, settings.metrics_port + slot)
            )
        self.log.info(
            "gcollective: worker %s has slot %d (%s), %s",
            self.pid,
            slot,
            format_address(node.local),
            "state merged from a peer" if node.synced else "no peer state yet",
        )

    def _claim(self, settings: Settings, options: dict[str, Any]) -> tuple[int, Collective]:
        """Start the node on the first free slot; wait while every slot is taken.

        Binding is the claim: two workers racing for a slot cannot both get it. Old workers
        of a HUP keep their slots until they have finished their requests, which takes at
        most ``graceful_timeout``.
        """
        deadline = time.monotonic() + self.cfg.graceful_timeout + 10.0
        waiting_logged = False
        while True:
            for slot, address in enumerate(settings.slots):
                began = time.monotonic()
                if settings.data_dir is not None:  # (each slot its own: one process each)
                    options["data_dir"] = os.path.join(settings.data_dir, f"slot-{slot}")
                try:
                    node = gcollective.start(
                        address, settings.peers, timeout=settings.start_timeout, **options
                    )
                except DataDirLocked:
                    continue  # the slot's previous worker is still leaving
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue
                    variable = (
                        "GCOLLECTIVE_BASE_PORT" if exc.errno == errno.EACCES else "GCOLLECTIVE_BIND"
                    )
                    raise ConfigError(
                        variable, f"cannot listen on {format_address(address)}: {exc}"
                    ) from exc
                self._gcollective_start_took = time.monotonic() - began
                return slot, node
            if not self.alive:
                # Told to exit while still waiting (a second HUP, a shutdown): just go.
                raise SystemExit(0)
            if time.monotonic() > deadline:
                self.log.error(
                    "gcollective: every slot of this server (%s) stayed taken; set "
                    "GCOLLECTIVE_SLOTS to the most workers this server runs",
                    ", ".join(format_address(a) for a in settings.slots),
                )
                # Not a boot error (that would halt gunicorn): the arbiter retries later.
                raise SystemExit(1)
            if not waiting_logged:
                waiting_logged = True
                self.log.info(
                    "gcollective: worker %s waits for a free slot (old workers still exiting)",
                    self.pid,
                )
            gevent.sleep(random.uniform(0.03, 0.1))

    # -- leaving -------------------------------------------------------------------------

    def _gcollective_watch_successors(self) -> None:
        # Runs in the signal handler, so before this node handles anything from a member
        # that connects after the signal: gunicorn signals all old workers in one loop, so
        # a successor can only come once one of them has left (see _SuccessorWatch).
        # (The peers' view only reads; a second signal keeps the first watch.)
        node = self.gcollective_node
        if node is not None and self._gcollective_successors is None:
            self._gcollective_successors = _SuccessorWatch(node)

    def _gcollective_leave(self) -> None:
        node = self.gcollective_node
        if node is None:  # interrupted between starting it and recording it
            try:
                node = gcollective.default_node()
            except gcollective.NotStartedError:
                return
        metrics = getattr(self, "_gcollective_metrics", None)
        if metrics is not None:
            metrics.stop()
        settings = self.gcollective_settings
        if settings is None or not node.running:
            return
        try:
            # (With a data_dir, the data is on disk: nothing to hand over.)
            if (
                not self._gcollective_quick
                and settings.handoff_timeout > 0
                and not settings.data_dir
                and not self._gcollective_shutdown()
            ):
                beat = gevent.spawn(self._heartbeat)
                try:
                    self._handoff(node, settings)
                finally:
                    beat.kill()
        finally:
            stopping = time.monotonic()
            gcollective.stop(self._gcollective_stop_timeout())
            self.log.info(
                "gcollective: worker %s left slot %s (the final flush and stop took %.3fs)",
                self.pid,
                self.gcollective_slot,
                time.monotonic() - stopping,
            )

    def _gcollective_kill_at(self) -> float | None:
        """When gunicorn may SIGKILL this worker (``time.monotonic()``), or None if it will not.

        ``Arbiter.stop()`` (a master's SIGTERM, or the old master's after a USR2) SIGKILLs
        the workers still there ``graceful_timeout`` seconds after it signalled them; the
        signal's arrival here is the closest this worker can tell (a starved worker handles
        it late: ``_STOP_RESERVE`` covers that). A reload or TTOU does not kill: None when the
        master's listeners show one (see ``_MasterSockets.may_kill``; a worker that cannot see
        them keeps to the deadline). A worker that leaves by itself (max_requests) got no
        signal and is not killed.
        """
        if self._gcollective_signalled_at is None:
            return None
        master = self._gcollective_master
        if master is not None and not master.may_kill():
            return None
        return self._gcollective_signalled_at + float(self.cfg.graceful_timeout)

    def _gcollective_stop_timeout(self) -> float:
        """Seconds the final flush may take: 1 to 5, within graceful_timeout, and, after a
        SIGTERM, ending before gunicorn's SIGKILL (with half the reserve for the exit)."""
        timeout = max(1.0, min(5.0, float(self.cfg.graceful_timeout)))
        kill_at = self._gcollective_kill_at()
        if kill_at is not None:
            left = kill_at - time.monotonic() - _STOP_RESERVE / 2
            timeout = max(0.1, min(timeout, left))
        return timeout

    def _handoff_deadline(self, settings: Settings) -> float:
        """When the handoff gives up: ``handoff_timeout`` from now, but early enough for the
        final flush to run before gunicorn's SIGKILL (logged when that cuts it short)."""
        now = time.monotonic()
        deadline = now + settings.handoff_timeout
        kill_at = self._gcollective_kill_at()
        if kill_at is None or kill_at - _STOP_RESERVE >= deadline:
            return deadline
        capped = max(now, kill_at - _STOP_RESERVE)
        self.log.info(
            "gcollective: worker %s waits at most %.1fs for a successor, not %.1fs "
            "(GCOLLECTIVE_HANDOFF_TIMEOUT): gunicorn kills it %ss (graceful_timeout) after "
            "its exit signal, and the final flush needs the last %.1fs",
            self.pid,
            capped - now,
            settings.handoff_timeout,
            self.cfg.graceful_timeout,
            _STOP_RESERVE,
        )
        return capped

    def _gcollective_shutdown(self) -> bool:
        """True if gunicorn is shutting down (no new worker will come to take the data)."""
        master = self._gcollective_master
        if master is None or not master.shutting_down():
            return False
        self.log.info(
            "gcollective: worker %s leaves at once: gunicorn is shutting down (its master "
            "closed its listeners), so no new worker will take the data over",
            self.pid,
        )
        return True

    def _handoff(self, node: Collective, settings: Settings) -> None:
        """Return once stopping this node loses nothing, or after ``handoff_timeout``.

        Members that stay hold everything this one sent them (``stop()`` flushes). When all
        of this server's workers leave at once (HUP, shutdown), they rank by slot: each
        leaves as soon as a higher slot answers, and the highest one, the last holder here,
        waits for a new worker to connect and take its state. A member on another server
        that answers holds the data too.
        """
        began = time.monotonic()
        deadline = self._handoff_deadline(settings)
        slots = list(settings.slots)
        mine = slots.index(node.local) if node.local in slots else len(slots)
        higher = slots[mine + 1 :]
        others = [address for address in settings.peers if address[0] != settings.bind]
        # (A worker that ends by itself, max_requests, got no signal: watch from now on.)
        watch = self._gcollective_successors or _SuccessorWatch(node)
        ages = getattr(self, "_gcollective_peers", None) or _PeerAges(node)
        while True:
            # Only members connected for a while count: they have caught up with this one.
            if _any_answers(ages.settled_peers(higher + others)):
                return
            if watch.caught_up():
                self.log.info("gcollective: worker %s handed its state on", self.pid)
                return
            now = time.monotonic()
            if now >= deadline:
                # Expected when gunicorn shuts down; after a HUP, data may be lost.
                self.log.warning(
                    "gcollective: worker %s is the last here holding the data and no new "
                    "worker took it over within %.1fs (%s); leaving",
                    self.pid,
                    now - began,
                    "GCOLLECTIVE_HANDOFF_TIMEOUT"
                    if deadline - began >= settings.handoff_timeout
                    else "cut short by gunicorn's graceful_timeout",
                )
                return
            gevent.sleep(0.1)
