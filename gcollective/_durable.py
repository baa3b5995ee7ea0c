"""Durability: a member keeps on disk what it applied, and comes back with it (``data_dir``).

The disk holds frames, the bytes the engine already made or received: one SQLite table
(``frames``) of OPS frames (own batches as they are flushed, received batches as they came),
SNAPSHOT frames and SNAPSHOT_END, in the order applied. A restart replays them through
``Engine.receive``, as if a peer sent them: OPS frames are deduplicated by the progress vector
(and the store applies an operation once, by stamp, whatever the order), SNAPSHOT frames
merge as a joiner merges them. A checkpoint is the member's own snapshot stream
(``Engine.snapshot_stream``) appended the same way, but for the root's plain leaves, which it
writes in columns (ROOT_LEAVES frames, the only frames no member sends); after it, every row
older than the checkpoint's first one is deleted: the rows stay proportional to the live
tree, not to its history.

Writes go in one transaction per ``FLUSH_INTERVAL`` (a writer greenlet drains what was
applied meanwhile), run in gevent's thread pool so that a slow fsync never blocks the hub.
See docs/durability.rst for the promise and the layout.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import sqlite3
import time
from typing import Any, Callable, Iterator

import gevent
import ujson
from gevent.event import Event

from . import _snapshots
from ._columns import LeafColumns, pack_stamps
from ._engine import Engine
from ._errors import DataDirError, DataDirLocked, ProtocolError
from ._peerstate import Inbound
from ._server import _let_others_run
from ._snapshots import without_gc
from ._store import Store
from ._wire import OPS, SNAPSHOT, SNAPSHOT_END, FrameDecoder
from ._wire_snapshot import LEAF_BYTES_GUESS, parse_snapshot_items

__all__ = ["Durability", "FLUSH_INTERVAL", "FSYNC_POLICIES"]

log = logging.getLogger("gcollective")

#: What a member applied reaches the disk at most this long (seconds) after it was applied.
FLUSH_INTERVAL = 0.05
#: ``fsync`` -> SQLite's ``synchronous`` in WAL mode. "always": every transaction is fsynced
#: (a power cut loses nothing written); "interval": the WAL is fsynced at SQLite's own WAL
#: checkpoints (a killed process loses nothing written, a power cut may lose the last
#: transactions); "never": the OS decides (a killed process still loses nothing written).
FSYNC_POLICIES = {"always": "FULL", "interval": "NORMAL", "never": "OFF"}
# A checkpoint is written once the rows appended since the last one hold more bytes than
# this share of the last checkpoint (and at least CHECKPOINT_MIN_BYTES): the table holds at
# most the live tree, this share of it more, plus the minimum. The share bounds the worst
# restore: a byte of OPS frames costs about twice a checkpoint's byte to replay (each
# operation is applied; overwrites pack ~13 bytes each), so with 1 (the table twice the
# tree) a 2,000,000-key member took 23 s to restore, with 1/4 about 8.5 s (3 s once a
# checkpoint kept the root's leaves in columns); a smaller share checkpoints the whole tree
# more often (see docs/durability.rst).
CHECKPOINT_SHARE = 0.25
CHECKPOINT_MIN_BYTES = 8 * 1024 * 1024
# Rows read (in the thread pool) and applied (in the hub, which other greenlets then wait
# for) at a time when restoring: SNAPSHOT frames are up to 1 MiB each.
RESTORE_ROWS = 16
# The format of the directory: a database with another one is refused, never rewritten.
# Version 1 (before ROOT_LEAVES frames) is read as it is; the first checkpoint written into
# it marks it 2, which a reader of version 1 refuses (it could not replay ROOT_LEAVES).
FORMAT = "gcollective-durable"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: A frame only the disk holds (no member sends it; the wire's kinds are small numbers):
#: ``[ROOT_LEAVES, [origins, keys, packed], values]``, top-level plain leaves (each holding
#: a scalar, or none) in the columns a SNAPSHOT gives a full node's leaves (see ``_wire``).
#: A checkpoint writes the root's so: about 30 bytes a key instead of an item of 55, and
#: a restore installs a frame of them at once (``Store.merge_root_leaves``).
ROOT_LEAVES = 100
DATABASE = "gcollective.sqlite3"
LOCK = "gcollective.lock"
_OURS = {DATABASE, LOCK, DATABASE + "-wal", DATABASE + "-shm", DATABASE + "-journal"}
# The frame kinds worth keeping (PROGRESS and requests are about a connection, not data).
# The frames replayed at restore, by their first bytes (as _wire.FRAME_KINDS tells kinds).
_KEPT = tuple(b"[%d," % kind for kind in (OPS, SNAPSHOT, SNAPSHOT_END))

_open_databases: list[Durability] = []
_fork_hook_registered = False


def check_durability(data_dir: Any, fsync: Any) -> Durability | None:
    """The durability of a member with these options (``None`` without ``data_dir``):
    checked now (``TypeError`` / ``ValueError``), opened by ``start()``."""
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
    if data_dir is None:
        return None
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path, not {type(data_dir).__name__}")
    path = os.fspath(data_dir)
    if not path:
        raise ValueError("data_dir must not be empty (pass None to keep nothing on disk)")
    return Durability(os.path.abspath(path), fsync)


def _after_fork_in_child() -> None:
    """A child must never use, nor close, its parent's database: closing a copy of an SQLite
    connection can checkpoint or unlock the parent's files. Keep the copies for good, and
    drop the child's descriptor of the lock (the parent's still holds it)."""
    for durability in _open_databases:
        # Leaked on purpose, for the child's whole life and its exit too (a list would be
        # freed at interpreter shutdown, closing the connection).
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(durability._connection))
        durability._connection = None
        if durability._lock_fd is not None:
            os.close(durability._lock_fd)
            durability._lock_fd = None
    _open_databases.clear()


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


class Durability:
    """One member's data directory: restore at start, then a writer greenlet."""

    def __init__(self, path: str, fsync: str) -> None:
        self.path = path
        self.fsync = fsync
        self._connection: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pending: list[bytes] = []  # frames applied, not yet written
        self._pending_bytes = 0
        self._since_checkpoint = 0  # bytes appended since the last checkpoint
        self._checkpoint_bytes = 0  # bytes of the last checkpoint
        self._closing = False
        self._wake = Event()
        self.greenlet: gevent.Greenlet[Any, Any] | None = None
        self.written_frames = 0
        self.written_bytes = 0  # (checkpoints not counted)
        self.checkpoints = 0
        self.restored_frames = 0
        self._in_flight = 0  # frames being written now
        self._engine: Engine | None = None  # (whose on_applied hook this is, once started)
        self._version = FORMAT_VERSION  # the directory's format version (its meta says)

    def stats(self) -> dict[str, Any]:
        """What ``Collective.stats()`` reports under ``data_dir``."""
        return {
            "path": self.path,
            "fsync": self.fsync,
            "unwritten_frames": len(self._pending) + self._in_flight,
            "written_frames": self.written_frames,
            "written_bytes": self.written_bytes,
            "restored_frames": self.restored_frames,
            "checkpoints": self.checkpoints,
        }

    # -- opening ----------------------------------------------------------------------------

    def open(self) -> None:
        """Take the directory (``DataDirError`` if it is not ours, locked or corrupt)."""
        self._closing = False
        self._wake.clear()
        self.greenlet = None
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)  # (new: only this user reads it)
            names = os.listdir(self.path)
        except OSError as exc:
            raise DataDirError(f"data_dir {self.path} cannot be used: {exc}") from None
        foreign = sorted(set(names) - _OURS)
        if foreign:
            raise DataDirError(
                f"data_dir {self.path} holds files gcollective did not write "
                f"({', '.join(foreign[:5])}): not a gcollective data directory (give an empty "
                "or new directory; nothing was changed)"
            )
        self._lock()
        self._version = FORMAT_VERSION  # (a new database's; an existing one's meta says)
        try:
            self._connection = self._connect()
        except BaseException:
            self._unlock()
            raise
        _register_fork_hook()
        _open_databases.append(self)

    def _lock(self) -> None:
        try:
            fd = os.open(
                os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise DataDirError(f"data_dir {self.path} cannot be used: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DataDirLocked(
                f"data_dir {self.path} is in use by another process (pid {holder}): two "
                "members must never share one directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # (releases the flock)
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        database = os.path.join(self.path, DATABASE)
        existed = os.path.exists(database)
        # (check_same_thread off: the writer runs it in the thread pool, one call at a time.)
        connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        try:
            if existed:
                self._check_format(connection, database)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={FSYNC_POLICIES[self.fsync]}")
            if not existed:
                with connection:
                    connection.execute("BEGIN")
                    connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
                    connection.execute(
                        "CREATE TABLE frames (id INTEGER PRIMARY KEY, frame BLOB NOT NULL)"
                    )
                    connection.executemany(
                        "INSERT INTO meta VALUES (?, ?)",
                        [("format", FORMAT), ("version", FORMAT_VERSION)],
                    )
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise DataDirError(
                f"{database} is not a readable gcollective database ({exc}): refusing to start "
                "on it (nothing was changed; move it away to start empty)"
            ) from None
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_format(self, connection: sqlite3.Connection, database: str) -> None:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("version")
        if meta.get("format") != FORMAT or version not in READABLE_VERSIONS:
            readable = " or ".join(map(str, READABLE_VERSIONS))
            raise DataDirError(
                f"{database} is not a gcollective data directory of format version "
                f"{readable} (found {meta.get('format')!r} version {version!r}): refusing to "
                "start on it (nothing was changed)"
            )
        self._version = version

    # -- restoring --------------------------------------------------------------------------

    def restore(self, engine: Engine) -> None:
        """Apply every stored frame, in order, as frames from a peer (before serving)."""
        connection = self._connection
        assert connection is not None
        started = time.monotonic()
        try:
            cursor = connection.execute("SELECT frame FROM frames ORDER BY id")
            # (Without the cyclic GC, as a joiner merges a snapshot: decoding and merging
            # make masses of young objects that each collection would walk again, and the
            # full ones the whole growing tree: it halves a big restore.)
            without_gc(self._replay_all, cursor, engine)
            self._checkpoint_bytes = self._stored_bytes()
        except sqlite3.DatabaseError as exc:
            raise DataDirError(
                f"{self.path}: the database is corrupt ({exc}): refusing to start on it "
                "(nothing was changed; move the directory away to start empty)"
            ) from None
        if self.restored_frames:
            log.info(
                "restored %d frames from %s in %.3fs",
                self.restored_frames,
                self.path,
                time.monotonic() - started,
            )

    def _replay_all(self, cursor: sqlite3.Cursor, engine: Engine) -> None:
        inbound = Inbound(None, 0, {})
        pool = gevent.get_hub().threadpool
        while True:
            rows = pool.spawn(cursor.fetchmany, RESTORE_ROWS).get()
            if not rows:
                return
            self._replay([row[0] for row in rows], engine, inbound)

    def _replay(self, frames: list[bytes], engine: Engine, inbound: Inbound) -> None:
        decoder = FrameDecoder(1 << 62)  # (our own frames: any size the writer took)
        try:
            messages = decoder.feed(b"\n".join(frames) + b"\n")
            now = time.monotonic()
            start = 0  # the first of the frames not applied yet
            for index, message in enumerate(messages):
                if type(message) is list and message[:1] == [ROOT_LEAVES]:
                    engine.receive(inbound, messages[start:index], frames[start:index], now)
                    _merge_root_leaves(engine, message)
                    start = index + 1
            engine.receive(inbound, messages[start:], frames[start:], now)
        except ProtocolError as exc:
            raise DataDirError(
                f"{self.path}: a stored frame cannot be applied ({exc}): refusing to start on "
                "it (nothing was changed)"
            ) from None
        self.restored_frames += len(frames)

    def _stored_bytes(self) -> int:
        assert self._connection is not None
        row = self._connection.execute("SELECT COALESCE(SUM(LENGTH(frame)), 0) FROM frames")
        return int(row.fetchone()[0])

    # -- writing ----------------------------------------------------------------------------

    def keep(self, frame: bytes) -> None:
        """The engine applied ``frame`` (its hook): write it with the next batch."""
        if frame[:3] in _KEPT:
            if frame[-1:] == b"\n":
                frame = frame[:-1]  # (own frames come with their newline)
            self._pending.append(frame)
            self._pending_bytes += len(frame)

    def start(self, engine: Engine, on_error: Callable[[str], None]) -> None:
        """Keep what the engine applies from now on (after ``restore``)."""
        engine.on_applied = self.keep
        self._engine = engine
        self.greenlet = gevent.spawn(self._writing, engine, on_error)

    def _writing(self, engine: Engine, on_error: Callable[[str], None]) -> None:
        while not self._closing:
            self._wake.wait(FLUSH_INTERVAL)
            if self._closing:
                break
            try:
                self._write_pending()
                if self._since_checkpoint > self.checkpoint_due():
                    self._checkpoint(engine)
            except Exception:
                on_error("the data_dir writer")
                self._wake.wait(1.0)  # (a full disk: retry, not in a tight loop)

    def checkpoint_due(self) -> float:
        """The bytes appended since the last checkpoint past which the next one is written."""
        return max(CHECKPOINT_MIN_BYTES, CHECKPOINT_SHARE * self._checkpoint_bytes)

    def _write_pending(self) -> None:
        frames = self._pending
        if not frames:
            return
        size = self._pending_bytes
        self._pending = []
        self._pending_bytes = 0
        self._in_flight = len(frames)
        try:
            gevent.get_hub().threadpool.spawn(self._append, frames).get()
        except BaseException:
            self._pending[:0] = frames  # written with the next batch
            self._pending_bytes += size
            raise
        finally:
            self._in_flight = 0
        self._since_checkpoint += size
        self.written_frames += len(frames)
        self.written_bytes += size

    def _append(self, frames: list[bytes]) -> int:
        """Append frames in one transaction (in a thread of the pool); the first row's id."""
        connection = self._connection
        assert connection is not None
        with connection:
            connection.execute("BEGIN")
            first = connection.execute("INSERT INTO frames (frame) VALUES (?)", (frames[0],))
            connection.executemany("INSERT INTO frames (frame) VALUES (?)", zip(frames[1:]))
        assert first.lastrowid is not None
        return first.lastrowid

    def _checkpoint(self, engine: Engine) -> None:
        """Append the member's whole state (its snapshot stream, frame by frame as the hub
        can spare time), then delete every row older than it."""
        self._write_pending()  # what was applied before the snapshot's vector: older rows
        pool = gevent.get_hub().threadpool
        if self._version != FORMAT_VERSION:
            pool.spawn(self._mark_version).get()  # (before its first ROOT_LEAVES frame)
        stream = checkpoint_stream(engine, time.monotonic())
        first: int | None = None
        size = 0
        for chunk in _chunks(stream):
            if self._closing:
                return  # an unfinished checkpoint is harmless: nothing was deleted
            start = pool.spawn(self._append, chunk).get()
            first = start if first is None else first
            size += sum(map(len, chunk))
            self._write_pending()
        if first is not None:
            pool.spawn(self._delete_before, first).get()
        self._checkpoint_bytes = size
        self._since_checkpoint = 0
        self.checkpoints += 1

    def _mark_version(self) -> None:
        connection = self._connection
        assert connection is not None
        with connection:
            connection.execute("BEGIN")
            connection.execute("UPDATE meta SET value = ? WHERE key = 'version'", (FORMAT_VERSION,))
        self._version = FORMAT_VERSION

    def _delete_before(self, first: int) -> None:
        connection = self._connection
        assert connection is not None
        with connection:
            connection.execute("BEGIN")
            connection.execute("DELETE FROM frames WHERE id < ?", (first,))

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Write what is pending, then close the database and free the directory."""
        self._closing = True
        self._wake.set()
        if self._engine is not None:
            self._engine.on_applied = None  # (nothing more is kept)
        if self.greenlet is not None:
            self.greenlet.join()
        if self._connection is None:
            return
        try:
            self._write_pending()
        finally:
            self._connection.close()
            self._connection = None
            if self in _open_databases:
                _open_databases.remove(self)
            self._unlock()


def checkpoint_stream(engine: Engine, now: float) -> Iterator[bytes]:
    """The frames of a checkpoint: the member's snapshot stream (``Engine.snapshot_stream``),
    the root's plain leaves first in ROOT_LEAVES frames, each read from the store when it is
    built. An empty frame stands for none (a pause after a stretch of other keys)."""

    def frames_of(keys: list[str], end: bytes) -> Iterator[bytes]:
        others: list[str] = []
        target = min(_snapshots.SNAPSHOT_FRAME_BYTES, engine.max_frame // 2)  # (as a SNAPSHOT's)
        yield from root_leaves_frames(engine.store, keys, others, target)
        yield from engine._snapshot_frames(others, end)

    return engine.snapshot_stream(now, frames_of)[0]


def root_leaves_frames(
    store: Store, keys: list[str], others: list[str], target: int
) -> Iterator[bytes]:
    """ROOT_LEAVES frames of about ``target`` bytes for the plain leaves among the top-level
    ``keys`` (a run of keys at a time, as many as the last frame says fit), each read from
    the store when it is built; the other keys go to ``others``. An empty frame stands for
    none (a run of other keys)."""
    count = max(1, target // LEAF_BYTES_GUESS)
    start = 0
    while start < len(keys):
        run = keys[start : start + count]
        start += len(run)
        names, stamps, values, rest = store.root_leaves(run)
        others += rest
        if not names:
            yield b""
            continue
        origins, packed = pack_stamps(stamps)
        frame = [ROOT_LEAVES, [origins, names, packed], values]
        encoded = ujson.dumps(frame, ensure_ascii=False).encode()  # (as _wire encodes)
        yield encoded
        # (At most twice as many next time: a run mostly of other keys makes a short frame.)
        count = max(1, min(2 * count, int(target * len(run) / len(encoded))))


def parse_root_leaves(message: list[Any]) -> tuple[LeafColumns, dict[str, Any], int]:
    """A decoded ROOT_LEAVES frame, checked whole as the wire checks a full node's leaves
    (``ProtocolError``): ``(leaves, {key: value} of those with one, the newest stamp)``."""
    if len(message) != 3:
        raise ProtocolError("ROOT_LEAVES frame has the wrong length")
    # (A full node with no events of its own, as the root's export would be, no children.)
    node = [None, 0, None, None, [], {}, message[1], message[2]]
    _, newest = parse_snapshot_items([["(the root)", node]])
    return node[6], node[7], newest


def _merge_root_leaves(engine: Engine, message: list[Any]) -> None:
    """Merge a ROOT_LEAVES frame as ``Engine`` merges a SNAPSHOT frame: checked whole first,
    its newest stamp against the clock."""
    leaves, values, newest = parse_root_leaves(message)
    engine.check_clock(newest, "a checkpoint's ROOT_LEAVES frame", None, 0)
    if engine.watches:
        stamps = leaves.stamps
        engine.merge_watched(
            [[k, [s, values[k]] if k in values else s] for k, s in zip(leaves.names, stamps)]
        )
    else:
        engine.store.merge_root_leaves(leaves, values)
    if newest:
        engine.clock.observe(newest)  # our next stamps order after all of it


def _chunks(stream: Iterator[bytes], target: int = 4 * 1024 * 1024) -> Iterator[list[bytes]]:
    """The frames of a checkpoint stream (newlines dropped, empty ones skipped) in lists of
    about ``target`` bytes, yielding to the hub (a whole turn of its loop) between frames.
    Each frame is built with the cyclic GC paused, as a snapshot for a peer is (see
    ``Engine.data_to_send``)."""
    chunk: list[bytes] = []
    size = 0
    while True:
        frame = without_gc(next, stream, None)
        if frame is None:
            break
        if not frame:
            _let_others_run()
            continue
        if frame[-1:] == b"\n":
            frame = frame[:-1]
        chunk.append(frame)
        size += len(frame)
        if size >= target:
            yield chunk
            chunk, size = [], 0
        # (A whole turn of the loop, timers included: with sleep(0) a member's timers, its
        # flushes and heartbeats, waited for a whole chunk of frames, 0.3-0.5 s at 2M keys.)
        _let_others_run()
    if chunk:
        yield chunk
