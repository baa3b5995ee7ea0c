"""Watches: ``Collective.watch()``'s handles, and the index that finds the watches an
applied operation concerns (``_Watching``, a part of ``Collective``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

import gevent
from gevent.queue import Queue

from . import SNAPSHOT_ORIGIN, Operation, _store
from ._validate import Key, parse_key

if TYPE_CHECKING:
    from ._store import Store

log = logging.getLogger("gcollective")

# -- watching changes -------------------------------------------------------------------------

_MISSING = _store.MISSING
_OPERATIONS = (Operation.SET, Operation.INCREMENT, Operation.DELETE)  # by the store's numbers
_STOP_WATCH = object()  # queued after the last event: the consumer greenlet ends there


def _watch_prefix(prefix: Any) -> tuple[str, ...]:
    """A watch prefix as a path; ``""``, ``()`` and ``None`` watch the whole tree."""
    if prefix is None or prefix == "" or (isinstance(prefix, (tuple, list)) and not prefix):
        return ()
    return parse_key(prefix)


def _key_of(path: tuple[str, ...]) -> Key:
    """The key a callback gets: dotted when that is unambiguous, else the tuple of segments
    (a segment holding a dot, or an empty one from inside a dict value)."""
    for segment in path:
        if not segment or "." in segment:
            return path
    return ".".join(path)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: unlike ``==``, ``1``, ``1.0`` and ``True`` differ."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    return a is b or a == b


def _diff(path: tuple[str, ...], before: Any, after: Any, out: list[Any]) -> None:
    """The changes from ``before`` to ``after`` (``_MISSING`` when absent) at ``path``, as
    ``(path, value, op)``: down to the keys that differ where both are dicts."""
    if _same(before, after):
        return
    if type(before) is dict and type(after) is dict:
        for key in sorted(before.keys() | after.keys()):
            _diff((*path, key), before.get(key, _MISSING), after.get(key, _MISSING), out)
    elif after is _MISSING:
        out.append((path, None, Operation.DELETE))
    else:
        out.append((path, after, Operation.SET))


class Watch:
    """A handle on one ``Collective.watch()`` registration; ``cancel()`` ends it.

    Events wait in an unbounded queue until the watch's own greenlet hands them to the
    callback, one at a time and in the order they were applied.
    """

    def __init__(self, node: _Watching, prefix: tuple[str, ...], callback: Any) -> None:
        self.node = node
        #: The watched path (``()`` for the whole tree).
        self.prefix = prefix
        self.callback = callback
        self.delivered = 0
        self.failures = 0
        self._queue: Queue[Any] = Queue()
        self._cancelled = False
        self._closing = False  # the end mark is queued behind the last events
        self._greenlet = gevent.spawn(self._consume)

    @property
    def active(self) -> bool:
        """False once cancelled (or its node stopped and everything was delivered)."""
        return not self._cancelled and not self._greenlet.dead

    @property
    def pending(self) -> int:
        """Events queued but not yet handed to the callback."""
        if self._cancelled or self._greenlet.dead:
            return 0  # (what may be left is the end mark)
        return self._queue.qsize() - self._closing

    def cancel(self) -> None:
        """Stop delivering, including events already queued. Idempotent; safe to call from
        inside the callback."""
        if self._cancelled:
            return
        self._cancelled = True
        self.node._remove_watch(self)
        self._drop_queued()  # dropped, not delivered
        self._queue.put(_STOP_WATCH)

    def _drop_queued(self) -> None:
        queue = self._queue
        while not queue.empty():
            queue.get_nowait()

    def _close(self) -> None:
        """The node stopped: deliver what is queued, then end."""
        self._closing = True
        self._queue.put(_STOP_WATCH)

    def _consume(self) -> None:
        try:
            self._deliver()
        except BaseException as exc:
            # Ended by what must end a greenlet (SystemExit, KeyboardInterrupt, a kill): the
            # watch must not stay registered with nobody consuming its queue.
            if not self._cancelled and not isinstance(exc, gevent.GreenletExit):
                log.error(
                    "watch %r: callback raised %s: the watch is cancelled",
                    self._name,
                    type(exc).__name__,
                    exc_info=True,
                )
            self.cancel()
            self._drop_queued()  # (its end mark too: nobody consumes it any more)
            raise

    def _deliver(self) -> None:
        get = self._queue.get
        while True:
            event = get()
            if event is _STOP_WATCH or self._cancelled:
                return
            try:
                self.callback(*event)
            except (gevent.GreenletExit, KeyboardInterrupt, SystemExit):
                raise
            except BaseException:
                # Any other exception, BaseException subclasses included, is the callback's
                # failure on this one change: logged, and the watch goes on.
                self.failures += 1
                log.exception(
                    "watch %r: callback failed on a change at %r (the watch goes on)",
                    self._name,
                    event[0],
                )
            self.delivered += 1

    @property
    def _name(self) -> Key:
        return _key_of(self.prefix) if self.prefix else ""

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<gcollective.Watch {_key_of(self.prefix) if self.prefix else ''!r} {state}>"


class _Watching:
    """The watches of a ``Collective``: registered by prefix, told of what is applied."""

    if TYPE_CHECKING:  # (the rest of ``Collective``, which this is a part of)

        def __getattr__(self, name: str) -> Any: ...

    _store: Store
    _watches: list[Watch]
    _watch_at: dict[tuple[str, ...], list[Watch]]
    _watch_below: dict[tuple[str, ...], list[Watch]]

    def _index_keys(self, prefix: tuple[str, ...]) -> Iterator[tuple[dict[Any, Any], Any]]:
        """Where a watch on ``prefix`` is indexed: under its prefix in ``_watch_at``, and
        under each ancestor of it (but the root) in ``_watch_below``. So an operation finds
        the watches it concerns with one lookup per segment of its path, whatever the number
        of watches. (Index lists change in place: nothing that walks them yields.)"""
        yield self._watch_at, prefix
        for size in range(1, len(prefix)):
            yield self._watch_below, prefix[:size]

    def _remove_watch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches = self._engine.watches = [w for w in self._watches if w is not watch]
            for index, key in self._index_keys(watch.prefix):
                watches = index[key]
                watches.remove(watch)
                if not watches:
                    del index[key]

    def _notify(self, path: tuple[str, ...], op: int, origin: int) -> None:
        """Queue one applied operation for the watches it concerns: those at or above its
        path, and those below it (a change above a prefix is reported at the prefix)."""
        get = self._store.get
        who = f"{origin:x}"
        watch_at = self._watch_at
        for size in range(len(path) + 1):
            watches = watch_at.get(path[:size])
            if watches:
                key, operation = _key_of(path), _OPERATIONS[op]
                for watch in watches:
                    watch._queue.put((key, get(path), operation, who))
        for watch in self._watch_below.get(path, ()):
            prefix = watch.prefix
            value = get(prefix, _MISSING)
            if value is _MISSING:
                watch._queue.put((_key_of(prefix), None, Operation.DELETE, who))
            else:
                watch._queue.put((_key_of(prefix), value, Operation.SET, who))

    def _merge_watched(self, items: list[Any]) -> None:
        """``Store.merge`` for watched nodes: compare what each concerned watch sees before
        and after, and queue the differences."""
        top = {key for key, _ in items}
        watches = [w for w in self._watches if not w.prefix or w.prefix[0] in top]
        if not watches:
            self._store.merge(items)
            return
        get = self._store.get

        def look(prefix: tuple[str, ...]) -> Any:
            if prefix:
                return get(prefix, _MISSING)
            # The whole tree: only the top-level keys in this slice can change.
            return {key: get((key,), _MISSING) for key in top}

        before = [look(w.prefix) for w in watches]
        self._store.merge(items)
        for watch, old in zip(watches, before):
            changes: list[Any] = []
            _diff(watch.prefix, old, look(watch.prefix), changes)
            for path, value, op in changes:
                watch._queue.put((_key_of(path), value, op, SNAPSHOT_ORIGIN))
