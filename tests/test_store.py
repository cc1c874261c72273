"""The delivery store and the delivery lock on their own: a file in WAL mode with its
schema, what another connection's commit shows, a schema too new, the error fields dead
letters keep, and one lock holder per file."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from flask_meisa._engine import dead
from flask_meisa._engine import pending
from flask_meisa._engine.host import HostLock
from flask_meisa._engine.host import set_aside
from flask_meisa._engine.store import SCHEMA_VERSION
from flask_meisa._engine.store import Store
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import ValidationError
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation
from tests.engine_support import upsert
from tests.process_support import wait_until

TABLES = {"meisa_ops", "meisa_calls", "meisa_known", "meisa_answers", "meisa_meta"}


def test_a_new_store_is_a_file_in_wal_mode_with_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "folder" / "store.sqlite3"  # its folder made (only it: see test_store_app)
    store = Store(path)
    assert store.durable and store.path == str(path)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert names >= TABLES
    finally:
        db.close()
        store.close()


def test_a_memory_store_is_this_processes_and_starts_empty_again(tmp_path: Path) -> None:
    store = Store(None)
    assert not store.durable and repr(store) == "Store(':memory:')"
    with store.write() as db:
        pending.add(db, upsert(1), LANE_ROUTINE)
    with store.read() as db:
        assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 1
    store.close()
    with store.read() as db:
        assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 0
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_what_one_store_writes_another_on_the_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    writer, reader = Store(path), Store(path)
    try:
        with writer.write() as db:
            pending.add(db, upsert(1), LANE_ROUTINE)
        with reader.read() as db:
            row = pending.next_ready(db, 0.0)
        assert row is not None and row.operation.payload["external_id"] == "t-1"
    finally:
        writer.close()
        reader.close()


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite3")
    with pytest.raises(RuntimeError), store.write() as db:
        pending.add(db, upsert(1), LANE_ROUTINE)
        raise RuntimeError("half way")
    with store.read() as db:
        assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 0
    store.close()


def test_data_version_moves_when_another_connection_commits(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store, other = Store(path), Store(path)
    try:
        before = store.data_version()
        with store.write() as db:  # its own commits do not move it
            pending.add(db, upsert(1), LANE_ROUTINE)
        assert store.data_version() == before
        with other.write() as db:
            pending.add(db, upsert(2), LANE_ROUTINE)
        assert store.data_version() != before
    finally:
        store.close()
        other.close()


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigurationError, match="newer flask-meisa") as caught:
        Store(path)
    assert str(path) in str(caught.value)
    assert path.is_file()  # left as it is, not set aside


def test_a_store_of_a_development_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:  # a table as one version left it
        db.executescript("CREATE TABLE meisa_ops (seq INTEGER); PRAGMA user_version = 2;")
    before = path.read_bytes()
    refused = rf"a development version of flask-meisa \(schema 2; this one reads {SCHEMA_VERSION}"
    with pytest.raises(ConfigurationError, match=rf"{refused}\): delete it") as caught:
        Store(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.sqlite3"]  # not set aside


def test_a_store_file_made_without_the_prunes_indexes_gets_them_once_opened(
    tmp_path: Path,
) -> None:
    # A file made before the indexes of the periodic prune (it scanned every contact Meisa
    # has, holding the write lock) gets them from the processes that open it, several at
    # once as workers start: each opens it, none fails, and its schema version stays.
    path = tmp_path / "store.sqlite3"
    Store(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP INDEX IF EXISTS meisa_known_accepted")
        db.execute("DROP INDEX IF EXISTS meisa_addresses_at")
        rows = [(f"ext:{n}", "[]", "{}", float(n)) for n in range(50_000)]
        db.executemany("INSERT INTO meisa_known VALUES (?, ?, ?, ?)", rows)
        db.commit()
    code = "import sys; from flask_meisa._engine.store import Store; Store(sys.argv[1]).close()"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for child in children:
        said = child.communicate(timeout=60)[1]
        assert child.returncode == 0, said
    with contextlib.closing(sqlite3.connect(path)) as db:
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM meisa_known WHERE accepted_at < 5"
        ).fetchall()
        assert "meisa_known_accepted" in str(plan)
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert "meisa_addresses_at" in indexes
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_file_without_the_prunes_indexes_opens_while_another_process_writes(
    tmp_path: Path,
) -> None:
    # A deploy: the new version starts while the old one holds the write lock longer than
    # the busy timeout. The indexes are the prune's speed, not its reading: it opens, and
    # the next process to open the file when it is free makes them.
    path = tmp_path / "store.sqlite3"
    Store(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute("DROP INDEX meisa_known_accepted")
        old.execute("BEGIN IMMEDIATE")
        store = Store(path, busy_timeout=0.05)
        with store.read() as db:
            assert db.execute("SELECT count(*) FROM meisa_ops").fetchone() == (0,)
    with store.write() as db:
        db.execute("DELETE FROM meisa_ops")
    store.close()
    Store(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "meisa_known_accepted" in names


def event(user: int) -> Operation:
    return Operation("track", {"event_name": "clicked", "external_id": f"t-{user}"})


def test_a_flood_carried_from_a_replaced_store_file_keeps_its_turns(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    with contextlib.closing(Store(path)) as store:
        with store.write() as db:
            for _ in range(20):
                pending.add(db, event(1), LANE_AUTOMATION)
        for suffix in ("", "-wal", "-shm"):  # a deploy script wipes the instance folder
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{path}.gone{suffix}")
        assert store.moved() and store.follow() == 20
        with store.write() as db:
            pending.add(db, event(2), LANE_AUTOMATION)
            order = []
            while (row := pending.next_ready(db, 0.0)) is not None:
                order.append(row.operation.payload["external_id"])
                pending.finish(db, row)
    assert order.index("t-2") == 1  # in its turn, not after all of the flood


def test_a_flood_salvaged_from_a_damaged_store_file_goes_in_turns(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    with contextlib.closing(Store(path)) as store:
        with store.write() as db:
            for user in [1] * 20 + [2]:
                pending.add(db, event(user), LANE_AUTOMATION)
        store.close()
        set_aside(store, sqlite3.DatabaseError("malformed"))
        with store.write() as db:
            order = []
            while (row := pending.next_ready(db, 0.0)) is not None:
                order.append(row.operation.payload["external_id"])
                pending.finish(db, row)
    assert len(order) == 21 and order.index("t-2") == 1  # in its turn, not after the flood


def _failing_commits(db: sqlite3.Connection, table: str, event: str) -> None:
    # A COMMIT that fails and keeps the transaction open (as SQLITE_BUSY can; a deferred
    # constraint here) once ``event`` changed ``table``.
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS child (id REFERENCES parent DEFERRABLE INITIALLY DEFERRED)"
    )
    db.execute(
        f"CREATE TRIGGER orphan AFTER {event} ON {table} BEGIN INSERT INTO child VALUES (1); END"
    )


def test_a_write_whose_commit_fails_is_undone_and_the_store_takes_the_next(tmp_path: Path) -> None:
    with contextlib.closing(Store(tmp_path / "store.sqlite3")) as store:
        with store.read() as db:
            _failing_commits(db, "meisa_ops", "INSERT")
        with pytest.raises(sqlite3.IntegrityError), store.write() as db:
            pending.add(db, upsert(1), LANE_ROUTINE)
        with store.read() as db:
            assert not db.in_transaction
            db.execute("DROP TRIGGER orphan")
        with store.write() as db:
            pending.add(db, upsert(2), LANE_ROUTINE)
        with store.read() as db:
            assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 1


def test_a_store_file_whose_rows_cannot_be_given_up_stays_in_use(tmp_path: Path) -> None:
    # Following fails at the old file's COMMIT: the old file stays in use, as it was.
    path = tmp_path / "store.sqlite3"
    with contextlib.closing(Store(path)) as store:
        with store.write() as db:
            pending.add(db, upsert(1), LANE_ROUTINE)
        with store.read() as db:
            _failing_commits(db, "meisa_ops", "DELETE")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{path}.gone{suffix}")
        assert store.moved()
        with pytest.raises(sqlite3.IntegrityError):
            store.follow()
        with store.write() as db:  # the old file still takes writes
            pending.add(db, upsert(2), LANE_ROUTINE)
        with store.read() as db:
            assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 2


@pytest.mark.parametrize("how", ["carried", "salvaged"])
def test_a_dead_letter_whose_error_reads_like_a_row_state_keeps_it_when_the_file_is_replaced(
    tmp_path: Path, how: str
) -> None:
    # Rows in flight wait again in the file now there: by their state, not by any value.
    path = tmp_path / "store.sqlite3"
    refused = BadRequestError("POST /contacts/upsert/", 400, "flight", code="flight", body={})
    with contextlib.closing(Store(path)) as store:
        with store.write() as db:
            pending.add(db, upsert(1), LANE_ROUTINE)
            row = pending.next_ready(db, 0.0)
            assert row is not None
            dead.bury(db, row, refused)
        if how == "carried":
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{path}.gone{suffix}")
            assert store.moved() and store.follow() == 1
        else:
            store.close()
            set_aside(store, sqlite3.DatabaseError("malformed"))
        with store.read() as db:
            [letter] = dead.dead_letters(db)
    assert (letter.code, letter.message) == ("flight", "flight")


@pytest.mark.parametrize("where", ["under-a-file", "a-folder"])
def test_a_path_that_cannot_be_a_file_is_a_configuration_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    path = tmp_path / "a-file" / "store.sqlite3" if where == "under-a-file" else tmp_path / where
    with pytest.raises(ConfigurationError, match="MEISA_OUTBOX") as caught:
        Store(path)
    assert f"{str(path)!r} cannot be used" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]


def test_a_file_another_process_makes_as_the_store_is_checked_is_not_taken_for_unwritable(
    tmp_path: Path,
) -> None:
    # Another process makes the lock file (its first look at the lock) while this one checks
    # the store: missing when its access was checked, there when its existence was, it was
    # said not writable, and the store refused ("cannot be used").
    path = tmp_path / "store.sqlite3"
    Store(path).close()
    lock = f"{path}.lock"

    def another_process_makes_it(frame: FrameType, event: str, arg: Any) -> None:
        looks = event == "call" and frame.f_code is os.path.exists.__code__
        if looks and frame.f_locals.get("path") == lock:
            Path(lock).touch()  # between this process's two looks at it

    sys.settrace(another_process_makes_it)
    try:
        store = Store(path)
    finally:
        sys.settrace(None)
    store.close()
    assert os.path.exists(lock)


def test_error_fields_hold_no_payload_values() -> None:
    refused = BadRequestError(
        "POST /contacts/upsert/", 400, "Enter a valid email.", code="invalid", body={}
    )
    assert dead.error_fields(refused) == (400, "invalid", "Enter a valid email.")
    timeout = APITimeoutError("POST /events/track/", "no answer within 2 s")
    assert dead.error_fields(timeout) == (None, None, "APITimeoutError: no answer within 2 s")
    invalid = ValidationError("email", "is not an address")
    assert dead.error_fields(invalid) == (None, "validation", "email: is not an address")
    assert dead.error_fields(RuntimeError("secret@example.com")) == (None, None, "RuntimeError")
    long = BadRequestError("POST /contacts/upsert/", 400, "x" * 1000, code="invalid", body={})
    assert len(dead.error_fields(long)[2]) == 300


def open_files(path: str) -> int:
    """How many descriptors of this process have the file at ``path`` open."""
    count, real = 0, os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            count += os.readlink(f"/proc/self/fd/{fd}") == real
    return count


def test_one_holder_per_lock_file(tmp_path: Path) -> None:
    path = str(tmp_path / "store.sqlite3.lock")
    Path(path).write_text("4194304999\n")  # a pid written before, longer than ours
    first, second = HostLock(path), HostLock(path)
    assert HostLock.holder(path) is None
    assert first.try_acquire() and first.try_acquire()  # again: still held
    assert repr(first) == f"HostLock({path!r}, held=True)"
    for _ in range(5):  # a process waiting to deliver tries at every pass
        assert not second.try_acquire()
        assert HostLock.holder(path) == os.getpid()
    if os.path.isdir("/proc/self/fd"):
        assert open_files(path) == 2  # the holder's and the waiting one's
    first.release()
    assert HostLock.holder(path) is None
    assert second.try_acquire() and second.held
    assert not first.try_acquire()
    second.release()
    first.release()  # twice is harmless


def test_a_lock_file_deleted_twice_in_a_row_is_left_to_its_holder(tmp_path: Path) -> None:
    # 'rm instance/meisa*' twice in a row: the holder locked the file made again after the
    # first, and that one went too. A process waiting to deliver, whose own open file was
    # the first one (no longer locked: its holder moved on), took the file at the path
    # before the holder could: the holder stopped delivering, its calls under way were
    # made again by the other one.
    path = str(tmp_path / "store.sqlite3.lock")
    holder, other = HostLock(path), HostLock(path)
    assert holder.try_acquire() and not other.try_acquire()
    os.unlink(path)
    assert holder.moved() and holder.take_again()
    os.unlink(path)  # again, before the holder's next pass
    taken = other.try_acquire()
    print(f"the other process took the lock: {taken}")
    assert not taken
    assert holder.moved() and holder.take_again()  # it delivers on
    assert not other.try_acquire()
    holder.release()  # once it stops, the other one takes over
    assert wait_until(other.try_acquire, 5)
    other.release()


def fork(child: Callable[[], None]) -> int:
    """Run ``child`` in a forked child process; its pid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_neither_takes_nor_keeps_its_parents_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "store.sqlite3.lock")
    lock, other = HostLock(path), HostLock(path)
    assert lock.try_acquire()
    # A child letting go of what it inherited (the engine's fork hook) leaves it held.
    os.waitpid(fork(lambda: lock.release(forked=True)), 0)
    assert not other.try_acquire()
    # A child still running with the parent's file open (a job the app forked) does not
    # keep the lock once the parent lets go.
    read, write = os.pipe()

    def run_until_the_parent_says() -> None:
        os.close(write)
        os.read(read, 1)  # until the parent closes its end

    pid = fork(run_until_the_parent_says)
    try:
        lock.release()
        assert other.try_acquire()
    finally:
        os.close(write)
        os.close(read)
        os.waitpid(pid, 0)
    other.release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_store_file_deleted_right_after_a_fork_keeps_its_rows(tmp_path: Path) -> None:
    # The fork hook closes the file for the fork; reopened only at its next use, a file
    # deleted meanwhile (a deploy wiping the instance folder) took its rows with it.
    path = tmp_path / "store.sqlite3"
    with contextlib.closing(Store(path)) as store:
        with store.write() as db:
            for user in range(5):
                pending.add(db, event(user), LANE_AUTOMATION)
        os.waitpid(fork(lambda: None), 0)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        assert store.moved() and store.follow() == 5
