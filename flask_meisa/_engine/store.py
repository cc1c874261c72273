"""The delivery store: one SQLite database (a file shared by the host, or memory) holding
what waits for Meisa (:mod:`.pending`), the key's budget (:class:`~.budget.Budget`), the
host's counters, and what Meisa already has of each contact (:mod:`.known`)."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import nullcontext
from contextlib import suppress
from typing import Any

from ..errors import ConfigurationError
from .host import at_path
from .host import carry_over
from .host import checking
from .host import identity
from .host import set_aside
from .host import transaction
from .mounts import check_writable
from .mounts import disk_full
from .mounts import home
from .mounts import network_filesystem
from .mounts import opened

#: A clock that reads this much less than the latest time the store noted has stepped back.
CLOCK_STEP = 1.0
#: Every write that stores something notes the time, and :meth:`Store.now` at most this
#: often while nothing does: a step back after a quiet time is measured that much short.
IDLE_NOTE = 60.0
#: Times only stored by a transaction that noted the time first (:meth:`Store.now`): all
#: of them move back with the clock.
_NOTED = {
    "meisa_calls": ("lease_until", "answered_at"),
    "meisa_answers": ("at",),
    "meisa_ops": ("first_attempt",),
}
#: Other times, moved back with the clock when after it (one before it may be stored since).
_UNNOTED = {"meisa_ops": ("ready_at", "created_at", "failed_at")}


class ForAnotherMeisa(Exception):
    """The store is delivered for another Meisa (base URL, or kind of key) than this
    process's: work stored in it would be sent there, with that process's key."""


class OtherSchema(ConfigurationError):
    """The store file was written by another flask-meisa (a newer one, or a development
    version), or holds another program's tables: this one neither reads nor writes it."""


#: What a read or write of the store may raise (locked, full, vanished, foreign, another schema).
STORE_ERRORS = (sqlite3.Error, OSError, ForAnotherMeisa, OtherSchema)

SCHEMA_VERSION = 3
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
    failed_at REAL,
    turn INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS meisa_ops_turns ON meisa_ops (state, lane, turn, seq);
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
CREATE TABLE IF NOT EXISTS meisa_addresses (
    email TEXT PRIMARY KEY,
    ext TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS meisa_addresses_ext ON meisa_addresses (ext);
CREATE TABLE IF NOT EXISTS meisa_answers (lane INTEGER NOT NULL, at REAL NOT NULL, waited REAL);
CREATE INDEX IF NOT EXISTS meisa_answers_at ON meisa_answers (at);
CREATE TABLE IF NOT EXISTS meisa_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: A table that is not this schema's (nor SQLite's own).
_FOREIGN_TABLE = (
    "SELECT name FROM sqlite_master WHERE type = 'table'"
    r" AND name NOT LIKE 'meisa\_%' ESCAPE '\' AND name NOT LIKE 'sqlite\_%' ESCAPE '\'"
)
_PRUNE_INDEXES = """
CREATE INDEX IF NOT EXISTS meisa_known_accepted ON meisa_known (accepted_at);
CREATE INDEX IF NOT EXISTS meisa_addresses_at ON meisa_addresses (at);
"""
# A forked child neither uses nor closes an inherited connection (SQLite's rule): kept here.
_INHERITED: list[sqlite3.Connection] = []
#: Every store of this process, being made or closed too: the fork hook holds them all.
STORES: weakref.WeakSet[Store] = weakref.WeakSet()


class Store:
    """The database at ``path`` (``None``: memory), safe from any thread; a forked child
    opens its own connection. A write waits ``busy_timeout`` seconds for another's.

    :raises ConfigurationError: the file cannot be used."""

    def __init__(self, path: str | os.PathLike[str] | None, *, busy_timeout: float = 1.0) -> None:
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.busy_timeout = float(busy_timeout)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._opened: tuple[int, int] | None = None  # the file of the connection (device, inode)
        self._found: str | None = None  # where SQLite found it (kept across a fork: see home)
        self._unchecked = False  # the disk was full: checked at its first use instead
        self.durable = self.path is not None  # a file: shared by the host, kept on restarts
        STORES.add(self)
        if self.path is None:
            return
        try:
            if kind := network_filesystem(os.path.dirname(self.path)):
                held = "; what the file holds waits in it" if os.path.exists(self.path) else ""
                raise OSError(
                    f"its folder is on a network filesystem ({kind}): not safe for SQLite{held}"
                )
            with checking(self.path):
                try:
                    self.check()
                except sqlite3.DatabaseError as error:
                    self.close()
                    if isinstance(error, sqlite3.OperationalError):
                        raise  # cannot be opened, locked, read-only: access, not damage
                    set_aside(self, error)
        except OtherSchema:
            raise  # it says which, and what to do
        except STORE_ERRORS as error:
            # A full disk (no room for the -shm even to read) is freed: not memory for good.
            if disk_full(error, os.path.dirname(self.path)):
                self._unchecked = True
                return
            raise ConfigurationError(
                f"the delivery store {self.path!r} cannot be used ({error}); set MEISA_OUTBOX "
                "to a writable local file, or to None for memory only"
            ) from None

    def __repr__(self) -> str:
        return f"Store({self.path or ':memory:'!r})"

    def before_fork(self) -> None:
        """Hold the store across a fork (a child inheriting a transaction would block), its file
        closed: SQLite keeps a file's locks once a process (a child's own would take none)."""
        self._lock.acquire()
        with suppress(*STORE_ERRORS):  # (then kept open, as before)
            if self.path and (db := self._db) and not (db.in_transaction or self.moved(link=True)):
                # Reopened after it if work waits in it: a deletion meanwhile would take that.
                waits = db.execute("SELECT EXISTS (SELECT 1 FROM meisa_ops)").fetchone()[0]
                self._db, self._opened = None, self._opened if waits else None
                db.close()

    def after_fork_in_parent(self, reopen: bool = True) -> None:
        """In the parent after a fork: the file reopened (its rows moved if it is replaced)."""
        opened, self._opened = self._opened, self._opened if self._db else None
        with suppress(*STORE_ERRORS):  # (else opened on next use)
            if reopen and not self._db and opened and self.path and at_path(self.path, opened):
                self._connect()
        self._lock.release()

    def after_fork(self) -> None:
        """In a forked child: a lock of its own and, on first use, a connection."""
        self._lock = threading.RLock()
        if self._db is not None:
            _INHERITED.append(self._db)
        self._db = self._opened = None

    def _connection(self) -> sqlite3.Connection:
        if self._unchecked:
            self._unchecked = False  # (the check connects through this)
            try:
                with checking(self.path or ""):
                    self.check()
            except BaseException:  # (a connection it made stays: it works)
                self._unchecked = True
                raise
        if self._db is None:
            if self.path and self._found:  # (a forked worker's, its linked folder gone since)
                self.path = home(self.path, self._found)
            path = self.path  # made, when missing, under its folder's lock (see checking)
            with checking(path) if path and not os.path.exists(path) else nullcontext():
                return self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        # Called under the store's lock with no connection yet.
        if self.path is not None and not os.path.exists(self.path):  # users' data: private
            with suppress(OSError):  # (-wal and -shm take its mode; SQLite says what fails)
                os.close(opened(self.path, os.O_WRONLY))
        db = sqlite3.connect(
            self.path or ":memory:",
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            db.execute("PRAGMA synchronous = NORMAL")
            # Another schema than this one's (0: a new file) is refused before the script.
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, SCHEMA_VERSION):
                newer = version > SCHEMA_VERSION
                raise OtherSchema(
                    f"the delivery store {self.path!r} was written by "
                    f"{'a newer' if newer else 'a development version of'} flask-meisa "
                    f"(schema {version}; this one reads {SCHEMA_VERSION}): "
                    + ("upgrade flask-meisa here" if newer else "delete it")
                    + ", or set MEISA_OUTBOX to another file"
                )
            # Not ours to take: the app's own database, say (WAL, checked, set aside if damaged).
            if version == 0 and (table := db.execute(_FOREIGN_TABLE).fetchone()):
                raise OtherSchema(
                    f"the delivery store {self.path!r} holds a table of another program"
                    f" ({table[0]!r}): set MEISA_OUTBOX to a file of its own"
                )
            db.executescript(_SCHEMA)
            with suppress(sqlite3.OperationalError):  # added to schema 3; locked: made later
                db.executescript(_PRUNE_INDEXES)
            if version == 0:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        self._db = db
        if self.path is not None:
            self._opened = identity(os.stat(self.path))
            self._found = db.execute("PRAGMA database_list").fetchone()[2]
        return db

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
            with transaction(db):
                changes = db.total_changes
                yield db
                if db.total_changes != changes:  # no time it stored is later than the note
                    # Noted when later than the note (a step back is Store.now's).
                    now, noted = time.time(), Store.get_meta(db, "clock")
                    if noted is None or now - float(noted) >= CLOCK_STEP:
                        Store.set_meta(db, "clock", now)

    def close(self) -> None:
        """Close this process's connection (a memory database starts empty again)."""
        with self._lock:
            db, self._db, self._opened = self._db, None, None
            if db is not None:
                db.close()

    def refusal(self, error: BaseException) -> str:
        """Why work this store refused with ``error`` was lost, and what to do about it."""
        fix = (
            ""  # its message says what to do
            if isinstance(error, (ForAnotherMeisa, OtherSchema))
            else ": make it writable by this process (disk space, permissions, no other "
            "process holding its write lock), or set MEISA_OUTBOX to a file it can write"
        )
        return f": the delivery store {self.path} refused them ({error}){fix}"

    def moved(self, *, link: bool = False) -> bool:
        """Whether the file this process has open was deleted or replaced (a deploy, a backup
        restored): the other processes of the host see only the file now at the path. With
        ``link``, also when only a link to it went (it is where SQLite found it still)."""
        opened, path, db = self._opened, self.path, self._db  # (none while the fork hook closed)
        if not (db and opened and path) or at_path(path, opened):
            return False
        # Not when only a link went (an old release's instance folder, linked to a shared one,
        # deleted): the file is where SQLite found it still.
        return link or os.path.exists(path) or not at_path(self._found or path, opened)

    def follow(self) -> int:
        """After :meth:`moved`: use the file now at the path (see :func:`home`), with the work
        left in the old one moved into it; how many (on failure the old file stays in use)."""
        with self._lock:
            assert self.path is not None and self._db is not None and self._found is not None
            old, opened, found, path = self._db, self._opened, self._found, self.path
            self._db = None
            try:
                self.path = home(path, found)
                with checking(self.path):
                    self.check()
                # A copy put in its place beside its -wal reads that -wal: its rows are ours.
                carried = 0 if self._reads_wal_of(old) else carry_over(old, self)
            except BaseException:
                self.close()
                self._db, self._opened, self._found, self.path = old, opened, found, path
                raise
            old.close()
            return carried

    def _reads_wal_of(self, old: sqlite3.Connection) -> bool:
        """Whether this connection and ``old`` read one -wal (one sees the other's note)."""
        token = os.urandom(8).hex()
        with self.read() as db:
            Store.set_meta(db, "wal_note", token)
        try:
            return bool(Store.get_meta(old, "wal_note") == token)
        finally:
            with self.read() as db:
                Store.set_meta(db, "wal_note", None)

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
        db.execute("DELETE FROM meisa_meta WHERE name = ?", (name,))
        if value is not None:
            db.execute("INSERT INTO meisa_meta VALUES (?, ?)", (name, json.dumps(value)))

    @staticmethod
    def now(db: sqlite3.Connection) -> float:
        """In a write transaction: the time. Where the clock stepped back since the store
        noted it, the times stored before move back by the step, so that nothing waits as
        long as the step, and no send is retried past Meisa's idempotency hour."""
        now, noted = time.time(), Store.get_meta(db, "clock")
        step = 0.0 if noted is None else float(noted) - now
        if step >= CLOCK_STEP:
            for times, since in ((_NOTED, -math.inf), (_UNNOTED, now)):
                for table, columns in times.items():
                    for column in columns:
                        sql = f"UPDATE {table} SET {column} = {column} - ? WHERE {column} > ?"
                        db.execute(sql, (step, since))
            if (pause := float(Store.get_meta(db, "pause_until", 0.0))) > now:
                Store.set_meta(db, "pause_until", pause - step)
        if noted is None or step >= CLOCK_STEP or -step >= IDLE_NOTE:
            Store.set_meta(db, "clock", now)
        return now

    @staticmethod
    def count(db: sqlite3.Connection, name: str, delta: int) -> None:
        """Add ``delta`` to the counter ``name``."""
        if delta:
            db.execute(
                "INSERT INTO meisa_meta (name, value) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                (name, str(int(delta))),
            )

    def check(self) -> None:
        """Check that this process may write the file (its schema is checked on connecting),
        put it in WAL mode, and check its pages."""
        assert self.path is not None
        check_writable(self.path)
        with self.read() as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
