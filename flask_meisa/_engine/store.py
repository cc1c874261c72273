"""The delivery store: one SQLite database holding what waits for Meisa, the key's budget,
what Meisa already has, and the host's counters; a file shared by every process of the
host, or memory for this process alone. The one process of the host that delivers holds
its lock (:class:`HostLock`)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import suppress
from typing import Any

from ..errors import ConfigurationError
from ..operations import LANE_NAMES
from .base import LATENCY_WINDOW
from .base import DeliveryStatus

__all__ = ["STORE_ERRORS", "HostLock", "Store"]

logger = logging.getLogger("flask_meisa.engine")

#: What a read or write of the store may raise (locked, full, unreadable or vanished).
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meisa_ops (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    lane INTEGER NOT NULL,
    ext TEXT,
    email TEXT,
    payload TEXT NOT NULL,
    contact TEXT,
    priority TEXT,
    force INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    ready_at REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt REAL,
    recover INTEGER NOT NULL DEFAULT 0,
    merged INTEGER NOT NULL DEFAULT 1,
    error_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    failed_at REAL
);
CREATE INDEX IF NOT EXISTS meisa_ops_next ON meisa_ops (state, lane, seq);
CREATE INDEX IF NOT EXISTS meisa_ops_ext ON meisa_ops (ext, seq) WHERE ext IS NOT NULL;
CREATE INDEX IF NOT EXISTS meisa_ops_email ON meisa_ops (email, seq) WHERE email IS NOT NULL;
CREATE TABLE IF NOT EXISTS meisa_calls (
    token TEXT PRIMARY KEY,
    lease_until REAL NOT NULL,
    answered_at REAL
);
CREATE INDEX IF NOT EXISTS meisa_calls_answered ON meisa_calls (answered_at);
CREATE TABLE IF NOT EXISTS meisa_known (
    key TEXT PRIMARY KEY,
    names TEXT NOT NULL,
    fields TEXT NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meisa_answers (lane INTEGER NOT NULL, at REAL NOT NULL, waited REAL);
CREATE INDEX IF NOT EXISTS meisa_answers_at ON meisa_answers (at);
CREATE TABLE IF NOT EXISTS meisa_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# A forked child must neither use nor close its parent's connection (SQLite's rule): kept
# referenced here so that nothing finalises it either.
_INHERITED: list[sqlite3.Connection] = []


class Store:
    """The database, safe from any thread; a forked child opens its own connection
    (:meth:`after_fork`, called by the app's fork hook).

    :param path: the SQLite file (its folder is made when missing), or ``None`` for memory.
    :param busy_timeout: seconds a write waits for another process's write.
    :raises ConfigurationError: the file cannot be used.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, busy_timeout: float = 1.0) -> None:
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.busy_timeout = float(busy_timeout)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:
            if self.path is not None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._prepare()
        except STORE_ERRORS as error:
            raise ConfigurationError(
                f"the delivery store {self.path!r} cannot be used ({error}); set MEISA_OUTBOX "
                "to a writable local file, or to None for memory only"
            ) from None

    def __repr__(self) -> str:
        return f"Store({self.path or ':memory:'!r})"

    @property
    def durable(self) -> bool:
        """Whether the store is a file (shared by the host, kept across restarts)."""
        return self.path is not None

    def before_fork(self) -> None:
        """Before a fork: hold the store across it, so that the child inherits no
        transaction in progress (its record of the parent's locks would block the child)."""
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        """After a fork, in the parent: let go of the lock :meth:`before_fork` took."""
        self._lock.release()

    def after_fork(self) -> None:
        """In a forked child: a lock of its own and, on first use, a connection."""
        self._lock = threading.RLock()
        if self._db is not None:
            _INHERITED.append(self._db)
        self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(
                self.path or ":memory:",
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                db.execute("PRAGMA synchronous = NORMAL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, for reads (and single autocommit writes)."""
        with self._lock:
            yield self._connection()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding the database's write lock from its start."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with suppress(sqlite3.Error):  # the original error says more
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection (a memory database starts empty again)."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection (any process) commits."""
        with self.read() as db:
            return int(db.execute("PRAGMA data_version").fetchone()[0])

    @staticmethod
    def get_meta(db: sqlite3.Connection, name: str, default: Any = None) -> Any:
        """A JSON value kept under ``name``."""
        row = db.execute("SELECT value FROM meisa_meta WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    @staticmethod
    def set_meta(db: sqlite3.Connection, name: str, value: Any) -> None:
        """Keep ``value`` (JSON) under ``name``; ``None`` deletes it."""
        if value is None:
            db.execute("DELETE FROM meisa_meta WHERE name = ?", (name,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO meisa_meta (name, value) VALUES (?, ?)",
                (name, json.dumps(value)),
            )

    @staticmethod
    def count(db: sqlite3.Connection, name: str, delta: int) -> None:
        """Add ``delta`` to the counter ``name``."""
        if delta:
            db.execute(
                "INSERT INTO meisa_meta (name, value) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                (name, str(int(delta))),
            )

    @staticmethod
    def describe(db: sqlite3.Connection, now: float, status: DeliveryStatus) -> None:
        """Fill ``status`` with what the store holds: work per lane and its age, in flight,
        waiting to retry, dead letters, latency, counters, pause and the backfill run."""
        status.queued = dict.fromkeys(LANE_NAMES.values(), 0)
        for lane, state, due, count, oldest in db.execute(
            "SELECT lane, state, ready_at > ?, count(*), min(created_at) FROM meisa_ops "
            "GROUP BY lane, state, ready_at > ?",
            (now, now),
        ):
            name = LANE_NAMES.get(lane, str(lane))
            if state == "dead":
                status.dead_letters += count
                continue
            if state == "flight":
                status.in_flight += count
            elif due:
                status.retry_waiting += count
            else:
                status.queued[name] += count
            waited = max(now - oldest, 0.0)
            status.oldest_wait[name] = max(status.oldest_wait.get(name, 0.0), waited)
        for lane, name in LANE_NAMES.items():
            query = "SELECT waited FROM meisa_answers WHERE lane = ? AND at >= ?"
            status.add_latency(
                name, (float(w) for (w,) in db.execute(query, (lane, now - LATENCY_WINDOW)))
            )
        for name in ("delivered", "failed", "dropped", "unchanged"):
            setattr(status, name, int(Store.get_meta(db, name, 0)))
        status.paused_for = max(float(Store.get_meta(db, "pause_until", 0.0)) - now, 0.0)
        status.backfill = Store.get_meta(db, "backfill")

    def _prepare(self) -> None:
        try:
            self._check()
        except sqlite3.DatabaseError as error:
            self.close()
            if isinstance(error, sqlite3.OperationalError):
                raise  # cannot be opened, locked, read-only: a problem of access, not damage
            self._set_aside(error)

    def _check(self) -> None:
        with self.read() as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the delivery store {self.path!r} was written by a newer flask-meisa "
                    f"(schema {version}; this one reads {SCHEMA_VERSION})"
                )
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _set_aside(self, error: BaseException) -> None:
        assert self.path is not None
        damaged = f"{self.path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.replace(self.path + suffix, damaged + suffix)
        rows = _salvage(damaged)
        self._check()
        with self.write() as db:
            db.executemany(
                f"INSERT INTO meisa_ops ({_SALVAGED}) "
                f"VALUES ({', '.join('?' * len(_SALVAGED.split(',')))})",
                rows,
            )
        logger.error(
            "flask-meisa: the delivery store %s is damaged (%s); it was moved to %s and a "
            "fresh one started with the %d operations that could still be read. Keep the "
            "damaged file for inspection, or delete it.",
            self.path,
            error,
            damaged,
            len(rows),
        )


# The columns salvaged from a damaged store.
_SALVAGED = (
    "seq, id, kind, lane, ext, email, payload, contact, priority, force, created_at, state, "
    "attempts, merged, error_status, error_code, error_message, failed_at"
)


def _salvage(path: str) -> list[tuple[Any, ...]]:
    """The operations that can still be read from a damaged store, skipping bad pages."""
    rows: list[tuple[Any, ...]] = []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows
    query = f"SELECT {_SALVAGED} FROM meisa_ops WHERE seq > ? ORDER BY seq"
    after, skip = -1, 1
    try:
        while skip < 1 << 40:
            try:
                for row in db.execute(query, (after,)):
                    rows.append(tuple("pending" if v == "flight" else v for v in row))
                    after, skip = row[0], 1
                break
            except sqlite3.DatabaseError:
                after, skip = after + skip, skip * 2  # jump past the damage
    finally:
        db.close()
    return rows


class HostLock:
    """The delivery lock: an exclusive, non-blocking ``flock`` on ``path`` (``<store>.lock``).
    The kernel releases it when its holder exits or is killed, so the next process to try
    takes over; the holder writes its pid into the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._held = False

    def __repr__(self) -> str:
        return f"HostLock({self.path!r}, held={self._held})"

    @property
    def held(self) -> bool:
        """Whether this process holds the lock through this object."""
        return self._held

    def try_acquire(self) -> bool:
        """Take the lock if no other open file holds it; never waits."""
        if self._held:
            return True
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        self._held = True
        with suppress(OSError):  # the pid is only informative
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        """Let go of the lock (when held) and close the file."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._held:  # a forked child may still share the open file: unlock it
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._held = False
            os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking it (the
        child shares the parent's open file: unlocking would release the parent's lock)."""
        fd, self._fd, self._held = self._fd, None, False
        if fd is not None:
            with suppress(OSError):
                os.close(fd)

    @staticmethod
    def holder(path: str) -> int | None:
        """The pid written by the process holding the lock on ``path``, or ``None`` when
        nobody holds it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
