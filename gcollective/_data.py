"""The data API of a member (``get``, ``set``, ``incr``, ``delete``, ``snapshot``), a part of
``Collective``: each call checks its input, applies it to the store at once and puts it in
the outbox, which ``_flush_outbox`` hands to the engine once the caller yields (a burst of
calls becomes one frame). ``get`` and the plain ``set`` are the hot paths: their common
cases are written inline, and their comments say what each inlined call would cost.
"""

from __future__ import annotations

import time
from math import inf
from typing import TYPE_CHECKING, Any

import gevent
import ujson

from . import _store
from ._clock import MILLIS_SHIFT, ONE_TICK, HybridClock, stamp_millis
from ._engine import Engine
from ._errors import InvalidKeyError, InvalidValueError
from ._outbox import OUTBOX_ITEMS
from ._store import DELETE, INCREMENT, SET, Store, copy_value, is_number
from ._validate import (
    INT_BOUND,
    INT_LOW,
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_TTL,
    Key,
    check_amount,
    check_number,
    check_ttl,
    clean_flat_dict,
    clean_value,
    parse_key,
)
from ._wire import wire_path

__all__ = ["_Data"]

# The outbox is flushed at once when an operation finds this many items queued before it
# (``OUTBOX_ITEMS`` with its own).
_FLUSH_QUEUED = OUTBOX_ITEMS - 3


# What an operation's frame, or a snapshot frame carrying only its value, holds besides its
# key and value, at most: the frame's head and stamp, and per segment of the key a snapshot's
# node (three stamps, brackets, the packed stamp). ``set`` refuses an operation that would
# not fit in ``max_frame`` with these (see ``Collective._check_fits``).
_OP_BYTES = 256
_LEVEL_BYTES = 160


class _Data:
    """The data API, a part of ``Collective``."""

    max_frame: int
    _store: Store
    _engine: Engine
    _clock: HybridClock
    _data: dict[str, Any]  # the store's live tree
    _writable: bool
    _stale: bool
    _flushing_full: bool
    _next_due: float
    _next_due_float: float
    _outbox: list[Any]  # the engine's
    _out_special: list[tuple[int, int, int]]
    _out_increments: list[int]  # (the engine's ``out_increments``)
    _fits_chars: int
    _fits_number_key: int

    if TYPE_CHECKING:  # (the rest of ``Collective``, which this is a part of)

        def __getattr__(self, name: str) -> Any: ...

    def get(self, key: Key, default: Any = None) -> Any:
        """The value at ``key``, or ``default``; never touches the network.

        Containers come back as copies: changing them changes nothing shared.
        """
        if self._stale:
            self._check_writable()
        due = self._next_due_float  # (a float: see _Background)
        if due < inf and due <= time.time() * 1000:
            self._advance()  # (inline: this is the hot path; see _advance_if_due)
        # read_path's walk, inline (a call costs 10-20 % of a get here). It walks first and
        # checks the key fully only when nothing is found: a dotted key that leads to a value
        # is a valid one, unless it went through the one kind of key a valid path never
        # holds but a dict value may, "".
        try:
            value: Any = self._data
            segments = key.split(".")  # type: ignore[union-attr]  # (a tuple: below)
            for segment in segments:
                value = value[segment]
        except (KeyError, TypeError, AttributeError):
            return self._store.get(parse_key(key), default)
        if "" in segments:
            parse_key(key)  # raises: an empty segment
        kind = type(value)
        if kind is dict:
            # (``copy_value``'s first step, inline: a session's small dict of leaves, read
            # back on every request, is copied in C and takes no call)
            for member in value.values():
                inner = type(member)
                if inner is dict or inner is list:
                    return copy_value(value)
            return value.copy()
        if kind is list:
            return copy_value(value)
        return value

    def set(self, key: Key, value: Any, op: int = SET, ttl: float | None = None) -> None:
        """Set ``key`` to ``value`` here at once and on every peer soon after.

        ``op`` keeps collective.js's third argument: ``INCREMENT`` adds ``value``, ``DELETE``
        removes the key (``value`` is ignored). Bad keys and values raise before anything is
        applied or sent.

        ``ttl`` (seconds, SET and INCREMENT only) makes the key expire: from the operation's
        stamp time plus ``ttl`` on, every member reads it (and everything under it) as
        missing, unless a newer SET without ttl (or with a new ttl) of it came first. See
        "Expiring keys" in docs/guide.rst.
        """
        if op is not SET or not self._writable or self._watches or type(key) is not str:
            self._set_otherwise(key, value, op, ttl)
            return
        # The common call, a SET of a dotted key, with the checks it needs and no more: this
        # is the hot path. (``_writable`` is also how it knows the node was not inherited
        # through a fork: the fork hook clears it.)
        kind = type(value)
        if (
            (
                kind is int
                # (A one-digit int, below 2**30, first: two of the interpreter's fast compares,
                # a third of the cost of comparing with the 4,300-digit bounds.)
                and ((value < 0x3FFFFFFF and value > -0x3FFFFFFF) or INT_LOW < value < INT_BOUND)
            )
            or kind is bool
            or value is None
        ):
            if len(key) > self._fits_chars:
                self._check_fits(key, value, key.count(".") + 1)
        elif kind is str:
            value = clean_value(value)
            if len(key) + len(value) > self._fits_chars:
                self._check_fits(key, value, key.count(".") + 1)
        else:
            self._set_value(key, value, ttl, kind)  # a dict (a session's), a float, a list
            return
        if ttl is not None:
            self._set_value(key, value, ttl)
            return
        # ``self._clock.stamp()``'s common case, inline (the call cost a twentieth of a set):
        # within the millisecond of the last wall-clock stamp, the last stamp plus one.
        clock = self._clock
        if clock._now() < clock._ms_end:
            stamp = clock._last = clock._last + ONE_TICK
        else:
            stamp = clock.stamp()
        # A writer's loop sets keys under one parent: the store remembers the way to that
        # parent, so such a key is checked and applied in a few steps (``Store.set_key``).
        self._store.set_key(stamp, key, value)
        # ``_send_own(stamp, SET, key, value)``, inline: the call would cost a tenth of a set.
        outbox = self._outbox
        queued = len(outbox)  # (the items before this operation's three)
        outbox += (stamp, key, value)
        if not queued:
            self._schedule_flush()
        elif queued >= _FLUSH_QUEUED:
            self._flush_outbox()

    def _set_value(self, key: str, value: Any, ttl: float | None, kind: type | None = None) -> None:
        """``set`` of what its hot path leaves out: a ``value`` of type ``kind`` that is not
        an int, a bool, None or a str (a session's small flat dict, copied and measured in
        one pass, not encoded; anything else through ``_checked_value``), or a ``value``
        checked already (``kind`` None) with a ``ttl``."""
        # (``len(key) // 2 + 1``: the most segments a valid key of that length has, so no
        # count of its dots; a key that is not valid is refused with the way it takes.)
        flat = clean_flat_dict(value, len(key) // 2 + 1) if kind is dict else None
        if flat is not None:
            value, chars = flat
            if len(key) + chars > self._fits_chars:
                self._check_fits(key, value, key.count(".") + 1)
        elif kind is not None:
            value = self._checked_value(key, value)
        if ttl is None:
            ttl_ms = 0
        elif type(ttl) is int and 0 < ttl <= MAX_TTL:
            ttl_ms = ttl * 1000  # (``check_ttl`` of whole seconds, inline: a session's call)
        else:
            ttl_ms = check_ttl(ttl)
        # ``self._clock.stamp()``'s common case, inline (as in ``set``)
        clock = self._clock
        if clock._now() < clock._ms_end:
            stamp = clock._last = clock._last + ONE_TICK
        else:
            stamp = clock.stamp()
        # (``stamp_millis(stamp) + ttl_ms``, shifted once for the store and ``_due_by``: a
        # 128-bit shift makes an int)
        due = (stamp >> MILLIS_SHIFT) + ttl_ms if ttl_ms else 0
        store = self._store
        if flat is None:
            store.assign_key(stamp, key, value, ttl_ms)
        elif not store.assign_flat(stamp, key, value, ttl_ms, due):
            # (``assign_key``'s flat way, its first step taken: the general way is left)
            store.apply(stamp, SET, parse_key(key), value, ttl_ms)
        # ``_send_own(stamp, SET, key, value, ttl_ms)``, inline (as in ``set``)
        outbox = self._outbox
        queued = len(outbox)
        if ttl_ms:
            # (``_due_by(due)``, inline: a session's set pays for each call it makes)
            if due < self._next_due:
                self._due_by(due)
            self._out_special.append((queued // 3, SET, ttl_ms))
        outbox += (stamp, key, value)
        if not queued:
            self._schedule_flush()
        elif queued >= _FLUSH_QUEUED:
            self._flush_outbox()

    def _checked_value(self, key: str, value: Any) -> Any:
        """``set``'s checks of a value that is not a number, str, bool, None or a small flat
        dict (``clean_flat_dict``'s case), at the dotted ``key``: the private copy to store,
        or ``InvalidValueError``."""
        depth = key.count(".") + 1
        value = clean_value(value, depth)
        self._check_fits(key, value, depth)
        return value

    def _set_otherwise(self, key: Key, value: Any, op: Any, ttl: float | None) -> None:
        """``set`` of all but a plain SET of a dotted key on a running node without watches."""
        if isinstance(op, bool) or not isinstance(op, int):
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")
        if op == SET:
            self._check_writable()
            path = parse_key(key)
            value = clean_value(value, len(path))
            self._check_fits(key, value, len(path))
            ttl_ms = 0 if ttl is None else check_ttl(ttl)
            self._apply_local(self._clock.stamp(), SET, path, value, key, ttl_ms)
        elif op == INCREMENT:
            self.incr(key, value, ttl)
        elif op == DELETE:
            if ttl is not None:
                raise InvalidValueError("a DELETE cannot have a ttl")
            self.delete(key)
        else:
            raise ValueError(f"op must be SET, INCREMENT or DELETE (0, 1, 2), not {op!r}")

    def incr(self, key: Key, amount: int | float = 1, ttl: float | None = None) -> int | float:
        """Add ``amount`` to the number at ``key`` (missing counts as 0); returns the new local
        value. Concurrent increments on all members all count.

        With ``ttl`` (seconds) the key expires ``ttl`` after this increment, replacing any
        earlier expiry of it: ``incr(k, ttl=60)`` on every hit drops ``k`` 60 s after the
        last hit. An increment without ttl keeps the expiry the key has."""
        if (
            type(amount) is int
            and type(key) is str
            and self._writable
            and not self._watches
            and ((amount < 0x3FFFFFFF and amount > -0x3FFFFFFF) or INT_LOW < amount < INT_BOUND)
            and len(key) <= self._fits_number_key  # (``_check_fits``'s first test)
        ):
            # The common call (a counter hit in a loop), the way ``set`` takes: under the
            # store's cached way, a new stamp and a few dict updates.
            if ttl is None:
                ttl_ms = 0
            elif type(ttl) is int and 0 < ttl <= MAX_TTL:
                ttl_ms = ttl * 1000  # (``check_ttl`` of whole seconds, inline, as in set)
            else:
                ttl_ms = check_ttl(ttl)
            # (``self._clock.stamp()``'s common case, inline, as in ``set``)
            clock = self._clock
            if clock._now() < clock._ms_end:
                stamp = clock._last = clock._last + ONE_TICK
            else:
                stamp = clock.stamp()
            due = self._next_due
            millis = 0  # (the stamp's millisecond once shifted: a 128-bit shift makes an int)
            if due < inf:
                millis = stamp >> MILLIS_SHIFT
                if millis >= due:
                    # An expiry may be due (none is before the stamp's millisecond, which is
                    # never behind the wall clock's: a hit pays no clock read for the sessions
                    # and counters that expire later): it fires first, as a get would see it,
                    # and the increment takes a stamp after it.
                    self._advance_if_due()
                    stamp = self._clock.stamp()
                    millis = stamp >> MILLIS_SHIFT
            result: int | float | None = self._store.increment_key(
                stamp, key, amount, ttl_ms, millis
            )
            if result is not None:
                # ``_send_own(stamp, INCREMENT, key, amount, ttl_ms)``, inline (as in set)
                outbox = self._outbox
                queued = len(outbox)
                if ttl_ms:
                    # (``_due_by``, inline as in set)
                    due = (millis or stamp >> MILLIS_SHIFT) + ttl_ms
                    if due < self._next_due:
                        self._due_by(due)
                    self._out_special.append((queued // 3, INCREMENT, ttl_ms))
                else:
                    self._out_increments.append(queued)  # (see ``Engine.out_increments``)
                outbox += (stamp, key, amount)
                if not queued:
                    self._schedule_flush()
                elif queued >= _FLUSH_QUEUED:
                    self._flush_outbox()
                return result
            # Not that case: the general way below, with the stamp already taken (nothing
            # yields meanwhile, so it still orders after everything applied here).
        else:
            stamp = 0
        self._check_writable()
        path = parse_key(key)
        amount = check_amount(amount)
        ttl_ms = 0 if ttl is None else check_ttl(ttl)
        self._check_fits(key, amount, len(path))
        self._advance_if_due()  # counts from what a get reads now, expiries included
        current = self._store.get(path, _store.MISSING)
        if current is not _store.MISSING:
            if not is_number(current):
                raise InvalidValueError(
                    f"cannot increment {key!r}: it holds a {type(current).__name__}, not a number"
                )
            try:
                check_number(current + amount)
            except (InvalidValueError, OverflowError) as exc:  # (a big int plus a float)
                raise InvalidValueError(
                    f"cannot increment {key!r} by {amount!r}: the result would not be a JSON "
                    f"number ({exc})"
                ) from None
        if not stamp:
            stamp = self._clock.stamp()
        self._apply_local(stamp, INCREMENT, path, amount, key, ttl_ms)
        total: int | float = self._store.get(path)
        return total

    def delete(self, key: Key) -> None:
        """Remove ``key`` (and everything below it) here and on every peer."""
        if (
            type(key) is str
            and self._writable
            and not self._watches
            and len(key) <= self._fits_number_key
        ):
            # A loop deleting keys under one parent: the way ``set`` takes, its stamp too
            # (``self._clock.stamp()``'s common case inline, as in ``set``).
            clock = self._clock
            if clock._now() < clock._ms_end:
                stamp = clock._last = clock._last + ONE_TICK
            else:
                stamp = clock.stamp()
            if self._store.delete_key(stamp, key):
                # ``_send_own(stamp, DELETE, key, None)``, inline (as in set)
                outbox = self._outbox
                queued = len(outbox)
                self._out_special.append((queued // 3, DELETE, 0))
                outbox += (stamp, key, None)
                if not queued:
                    self._schedule_flush()
                elif queued >= _FLUSH_QUEUED:
                    self._flush_outbox()
                return
            # Not that case: the general way, with the stamp taken (nothing yielded since).
        else:
            stamp = 0
        self._check_writable()
        path = parse_key(key)
        self._check_fits(key, None, len(path))
        self._apply_local(stamp or self._clock.stamp(), DELETE, path, None, key)

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the whole tree."""
        if self._stale:
            self._check_writable()
        self._advance_if_due()
        return self._store.to_dict()

    def _init_fits(self) -> None:
        """The sizes below which ``set``, ``incr`` and ``delete`` need not measure (from
        ``max_frame``)."""
        # Keys and str values shorter than this together (in characters) fit in a frame
        # whatever they hold (at most 6 bytes each as JSON): ``set`` measures only longer ones.
        self._fits_chars = (self.max_frame - _OP_BYTES - _LEVEL_BYTES * MAX_DEPTH) // 6
        # Keys no longer than this fit with any number (or None): ``incr``'s and ``delete``'s
        # one test of ``_check_fits``'s first (made once: each call saves an addition).
        self._fits_number_key = self._fits_chars - MAX_INT_DIGITS

    def _check_fits(self, key: Key, value: Any, depth: int) -> None:
        """Refuse an operation (key, checked value, the key's segments) that no peer could
        accept: its OPS frame, or a snapshot frame holding its value alone, would be longer
        than ``max_frame`` (the same on every member, presumably). Measures only what might
        be that long (a character takes at most 6 bytes as JSON, 4 unescaped)."""
        chars = len(key) if isinstance(key, str) else sum(map(len, key)) + 4 * len(key)
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind is dict or kind is list:
            text = ujson.dumps(value, ensure_ascii=False)  # (escaped: 4 bytes a character)
            chars += len(text)
        else:
            chars += MAX_INT_DIGITS  # (a number, or None)
        if chars <= self._fits_chars:
            return
        limit = self.max_frame - _OP_BYTES - _LEVEL_BYTES * depth
        wire = str(key) if isinstance(key, str) else list(key)
        key_bytes = len(ujson.dumps(wire, ensure_ascii=False).encode())
        if key_bytes > limit:
            raise InvalidKeyError(
                f"key is {key_bytes} bytes long, too long for a frame peers accept "
                f"(max_frame={self.max_frame})"
            )
        if kind is not dict and kind is not list:
            text = ujson.dumps(value, ensure_ascii=False)
        if key_bytes + 4 * len(text) <= limit:
            return
        value_bytes = len(text.encode())
        if key_bytes + value_bytes > limit:
            raise InvalidValueError(
                f"value is {value_bytes} bytes as JSON, too long for a frame peers accept "
                f"(max_frame={self.max_frame}, with the key {key_bytes} bytes and "
                f"{self.max_frame - limit} for the frame around them)"
            )

    def _apply_local(
        self, stamp: int, op: int, path: tuple[str, ...], value: Any, key: Any, ttl_ms: int = 0
    ) -> None:
        """Apply an own operation, put it in the outbox and tell the watches. ``key`` is the
        caller's key: a plain str is already the path's wire form."""
        if ttl_ms:
            self._due_by(stamp_millis(stamp) + ttl_ms)
        wire = key if type(key) is str else wire_path(path)
        self._engine.apply_local(stamp, op, path, value, wire, ttl_ms)

    def _schedule_flush(self) -> None:
        """Have the outbox, which just got its first operation, sent once this greenlet
        yields (a burst of sets becomes one frame), or a moment later if a batch just went
        out."""
        now = time.monotonic()
        wait = self._engine.flush_at(now) - now
        loop = gevent.get_hub().loop
        if wait > 0:
            # A timer of the event loop, not a greenlet: spawning one per flush cost more
            # than the flush. (The loop holds it until it fires; one that fires after its
            # outbox went out finds it empty.)
            loop.timer(wait).start(self._flush_outbox)
        else:
            loop.run_callback(self._flush_outbox)

    def _flush_outbox(self) -> None:
        """Have the engine encode and queue the outbox (see ``Engine.flush``). Runs as an
        event-loop callback (so it must never block) or inline.

        A full outbox is a loop of operations that does not yield: its frames are queued
        for the writers, which send every frame queued meanwhile in one system call per
        peer once the loop yields, rather than sent from here, one call per frame and peer
        inside the loop (``_PeerLink.data_ready`` reads ``_flushing_full``): those calls
        made a loop of 10,000 sets with 7 peers 11 % slower in CPU time."""
        outbox = self._outbox
        if outbox and not self._stale:
            # (A callback scheduled before a fork runs in the child too: not its node.)
            self._flushing_full = len(outbox) >= OUTBOX_ITEMS
            try:
                self._engine.flush(time.monotonic())
            finally:
                self._flushing_full = False
