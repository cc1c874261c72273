"""The durable outbox: operations waiting for delivery, kept in a SQLite file.

Every operation the outbox engine accepts is a row here until Meisa took it (the row is
deleted) or refused it for good (the row becomes a *dead letter*, with the error's status,
code and message). Rows are ``pending`` (written, not yet held by a delivering process),
``claimed`` (loaded into the delivering process's memory) or ``dead``.

- ``seq`` (the rowid) orders rows: a new row always gets a larger one than every row
  left, so loading by ``seq`` keeps each contact's order across processes and restarts.
- An upsert merges into its contact's latest upsert row while that row is still
  ``pending`` (:func:`~flask_meisa.operations.merge_upsert_payloads`), in the same
  ``BEGIN IMMEDIATE`` transaction that looked it up, so two writers never both merge.
- A send's ``idempotency_key`` is part of its payload, so a replay after a crash reuses it.

Only stdlib :mod:`sqlite3`, in WAL mode (writers never wait on readers) with
``synchronous = NORMAL``: a committed row survives the process being killed (SIGKILL,
OOM); an operating-system crash or power cut may lose the last commits. The file must be
on a local filesystem (WAL needs shared memory; network filesystems break it).

Connections belong to one process: each process opens its own, from a small pool that any
thread borrows one from at a time. In a forked child the parent's connections are never
used nor closed (SQLite forbids both); they are set aside and new ones opened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..operations import Operation

__all__ = ["OUTBOX_ERRORS", "Outbox", "OutboxCounts", "operation_of"]

#: What a read or write of the outbox may raise (a locked, full, unreadable or vanished
#: file): callers on a request's path catch these and fall back.
OUTBOX_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

SCHEMA_VERSION = 1
_IDLE_CONNECTIONS = 4
#: Connections inherited from a parent process: never used, never closed (SQLite's rule
#: for a forked child), kept referenced so that nothing finalises them either.
_INHERITED: list[sqlite3.Connection] = []

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meisa_outbox (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    lane INTEGER NOT NULL,
    contact_key TEXT,
    payload TEXT NOT NULL,
    contact TEXT,
    created_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    merged INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    failed_at REAL
);
CREATE INDEX IF NOT EXISTS meisa_outbox_ready ON meisa_outbox (state, lane, seq);
CREATE INDEX IF NOT EXISTS meisa_outbox_contact ON meisa_outbox (contact_key, seq)
    WHERE contact_key IS NOT NULL;
"""
#: The columns :func:`operation_of` reads, first in a ``SELECT``.
COLUMNS = "seq, id, kind, payload, contact, created_at, attempts"


@dataclass(frozen=True)
class OutboxCounts:
    """Rows by state: ``pending`` (not held by any process), ``claimed`` (held by the
    delivering process) and ``dead`` (dead letters)."""

    pending: int = 0
    claimed: int = 0
    dead: int = 0


def _state_error(path: str, error: BaseException) -> ConfigurationError:
    name = getattr(error, "sqlite_errorname", type(error).__name__)
    return ConfigurationError(
        f"MEISA_OUTBOX {path!r} cannot be used as the outbox ({name}: {error}). If the "
        "file is damaged, move it aside (its pending operations stay in it) and start "
        "again; if it is locked, find the process holding it."
    )


class Outbox:
    """The outbox file (see the module's docstring).

    Opening checks the file at once: it is created with its schema when missing, and a
    file that is not a SQLite database, has a newer schema, or cannot be opened raises.

    :param path: the SQLite file; its folder is created when missing.
    :param busy_timeout: seconds a write waits for another writer before it fails with
        ``database is locked``.
    :param setup: called with every new connection (e.g. to set a ``PRAGMA``).
    :raises ConfigurationError: the file cannot serve as an outbox.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 1.0,
        setup: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.busy_timeout = float(busy_timeout)
        self._setup = setup
        self._fresh()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._check()
        except OUTBOX_ERRORS as error:
            raise _state_error(self.path, error) from None
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Outbox({self.path!r})"

    def _fresh(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._watch: sqlite3.Connection | None = None

    def _check(self) -> None:
        with self.connection() as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"MEISA_OUTBOX {self.path!r} was written by a newer flask-meisa (schema "
                    f"{version}; this one reads {SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            db.execute("SELECT count(*) FROM meisa_outbox WHERE seq < 0").fetchone()

    # -- connections ---------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # transactions are explicit
            check_same_thread=False,  # a pooled connection serves one thread at a time
        )
        try:
            db.execute("PRAGMA synchronous = NORMAL")
            if self._setup is not None:
                self._setup(db)
        except BaseException:
            db.close()
            raise
        return db

    def _check_fork(self) -> None:
        # Checked before taking the lock: a parent thread may have held it at the fork.
        if self._pid != os.getpid():
            _INHERITED.extend(self._idle)
            if self._watch is not None:
                _INHERITED.append(self._watch)
            self._fresh()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow this process's connection (autocommit; rolled back on an error)."""
        self._check_fork()
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._open()
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):  # the original error says more
                    db.execute("ROLLBACK")
            raise
        finally:
            with self._lock:
                keep = len(self._idle) < _IDLE_CONNECTIONS and self._pid == os.getpid()
                if keep:
                    self._idle.append(db)
            if not keep:
                db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its first statement."""
        with self.connection() as db:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connections (the outbox opens new ones when used again)."""
        self._check_fork()
        with self._lock:
            idle, self._idle = self._idle, []
            watch, self._watch = self._watch, None
        for db in [*idle, *([watch] if watch is not None else [])]:
            db.close()

    # -- writing -------------------------------------------------------------------------

    def put(self, operation: Operation) -> int:
        """Store ``operation``; returns its row's ``seq``. An upsert merges into its
        contact's latest upsert row while that row is still pending."""
        key = operation.contact_key
        if operation.kind != "upsert" or key is None:
            with self.connection() as db:
                return self._insert(db, operation, key)
        with self._transaction() as db:
            row = db.execute(
                "SELECT seq, state, payload FROM meisa_outbox WHERE contact_key = ? "
                "AND kind = 'upsert' AND state != 'dead' ORDER BY seq DESC LIMIT 1",
                (key,),
            ).fetchone()
            if row is None or row[1] != "pending":
                return self._insert(db, operation, key)
            merged = Operation("upsert", json.loads(row[2]))
            merged.merge(operation)
            db.execute(
                "UPDATE meisa_outbox SET payload = ?, merged = merged + 1 WHERE seq = ?",
                (_dump(merged.payload), row[0]),
            )
            return int(row[0])

    @staticmethod
    def _insert(db: sqlite3.Connection, operation: Operation, key: str | None) -> int:
        cursor = db.execute(
            "INSERT INTO meisa_outbox (id, kind, lane, contact_key, payload, contact, "
            "created_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                operation.id,
                operation.kind,
                operation.lane,
                key,
                _dump(operation.payload),
                _dump(operation.contact) if operation.contact is not None else None,
                operation.created_at,
                operation.attempts,
            ),
        )
        return int(cursor.lastrowid or 0)

    def claim(self, limit: int) -> list[tuple[int, Operation]]:
        """Take up to ``limit`` pending rows for delivery, transactional sends first, then
        syncs, then events, each lane oldest first; they become ``claimed``."""
        if limit < 1:
            return []
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM meisa_outbox WHERE state = 'pending' "
                "ORDER BY lane, seq LIMIT ?",
                (limit,),
            ).fetchall()
            self.each(db, "UPDATE meisa_outbox SET state = 'claimed' WHERE", [r[0] for r in rows])
        return [(int(row[0]), operation_of(row)) for row in rows]

    def release_claims(self, seqs: Iterable[int] | None = None) -> int:
        """Make claimed rows pending again: those in ``seqs``, or (``None``) every one, as
        a process that just took the delivery lock does with a dead holder's claims."""
        with self.connection() as db:
            if seqs is None:
                cursor = db.execute(
                    "UPDATE meisa_outbox SET state = 'pending' WHERE state = 'claimed'"
                )
                return cursor.rowcount
            return self.each(
                db, "UPDATE meisa_outbox SET state = 'pending' WHERE state = 'claimed' AND", seqs
            )

    def delete(self, seqs: Iterable[int]) -> int:
        """Remove delivered (or deliberately skipped) rows."""
        with self.connection() as db:
            return self.each(db, "DELETE FROM meisa_outbox WHERE", seqs)

    @staticmethod
    def each(db: sqlite3.Connection, statement: str, seqs: Iterable[int]) -> int:
        """Run ``statement`` + ``" seq IN (...)"`` over ``seqs`` in chunks; rows changed."""
        wanted = [int(seq) for seq in seqs]
        done = 0
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            done += db.execute(f"{statement} seq IN ({marks})", chunk).rowcount
        return done

    # -- reading -------------------------------------------------------------------------

    def counts(self) -> OutboxCounts:
        """How many rows are pending, claimed and dead."""
        with self.connection() as db:
            rows = db.execute("SELECT state, count(*) FROM meisa_outbox GROUP BY state")
            found = {str(state): int(n) for state, n in rows.fetchall()}
        return OutboxCounts(found.get("pending", 0), found.get("claimed", 0), found.get("dead", 0))

    def last_seq(self) -> int:
        """The largest ``seq`` in the outbox (0 when it is empty)."""
        with self.connection() as db:
            return int(db.execute("SELECT coalesce(max(seq), 0) FROM meisa_outbox").fetchone()[0])

    def unfinished(self, up_to: int) -> int:
        """Rows not yet delivered nor dead whose ``seq`` is at most ``up_to``."""
        with self.connection() as db:
            row = db.execute(
                "SELECT count(*) FROM meisa_outbox WHERE state != 'dead' AND seq <= ?", (up_to,)
            ).fetchone()
        return int(row[0])

    def data_version(self) -> int:
        """A number that changes whenever another connection (in any process) commits; a
        cheap way to notice rows written elsewhere."""
        self._check_fork()
        with self._lock:
            if self._watch is None:
                self._watch = self._open()
            return int(self._watch.execute("PRAGMA data_version").fetchone()[0])


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def operation_of(row: Any) -> Operation:
    """The operation of a row selected with :data:`COLUMNS` first."""
    return Operation.from_dict(
        {
            "id": row[1],
            "kind": row[2],
            "payload": json.loads(row[3]),
            "contact": json.loads(row[4]) if row[4] else None,
            "created_at": row[5],
            "attempts": row[6],
        }
    )
