"""The store's files changing under running app processes (``tests/served_app.py``), as
deploy scripts and admins change them: the delivery lock file deleted or replaced, the
store file deleted (with its folder) or replaced."""

from __future__ import annotations

import collections
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flask_meisa._engine import pending
from flask_meisa._engine.host import HostLock
from flask_meisa._engine.mounts import sqlite_files
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.operations import LANE_ROUTINE
from tests.backfill_app import sync_users_process
from tests.engine_support import query
from tests.engine_support import upsert
from tests.process_support import ROOT
from tests.process_support import Process
from tests.process_support import Processes
from tests.process_support import drain_without_loss
from tests.process_support import environment
from tests.process_support import linked_releases
from tests.process_support import store_path
from tests.process_support import wait_stored
from tests.process_support import wait_until

DELIVERS = "now delivers for the host"


def delivers(process: Process) -> bool:
    return DELIVERS in process.output


def test_a_deleted_lock_file_never_makes_a_second_delivering_process(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    lock = f"{store_path(instance)}.lock"
    first = processes.app(env, "serve", "0")
    assert first.wait_for(delivers), first.output
    other = processes.app(env, "serve", "0")
    assert other.wait_for_line("ready"), other.output
    Path(lock).unlink()  # an admin, or a deploy script cleaning the folder
    # The new file at the path is locked again within a pass of a writer thread: by the
    # delivering process, or by the other one, and then the first says it stops.
    assert wait_until(lambda: HostLock.holder(lock) in (first.pid, other.pid), 10)
    holder, waiting = (first, other) if HostLock.holder(lock) == first.pid else (other, first)
    if holder is other:
        assert first.wait_for_line("this process stops delivering", 10), first.output
    late = processes.app(env, "serve", "5")  # a process started after the deletion
    assert late.wait_for_line("ready"), late.output
    assert emu.wait_for(lambda e: len(e.events(event_name="worked")) == 5, 30)
    assert not delivers(late)
    # When the delivering process stops, one of the others takes over.
    holder.signal(signal.SIGTERM)
    assert holder.wait() == 0, holder.output
    assert wait_until(lambda: HostLock.holder(lock) in (waiting.pid, late.pid), 10)
    assert emu.live_key not in first.output + other.output + late.output


def test_a_process_that_lost_its_lock_file_to_another_stops_delivering(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    lock = f"{store_path(instance)}.lock"
    first = processes.app(env, "serve", "0")
    assert first.wait_for(delivers), first.output
    # The lock file replaced by one another process (here, this test) already holds.
    taken = HostLock(f"{lock}.new")
    assert taken.try_acquire()
    Path(taken.path).replace(lock)
    try:
        assert first.wait_for_line("stops delivering", 10), first.output
        late = processes.app(env, "serve", "5")
        assert late.wait_for_line("ready"), late.output
        assert not emu.wait_for(lambda e: len(e.events(event_name="worked")) > 0, 1.0)
    finally:
        taken.release()
    assert emu.wait_for(lambda e: len(e.events(event_name="worked")) == 5, 30)


@pytest.mark.parametrize("how", ["folder wiped", "file replaced"])
def test_work_stored_in_a_deleted_or_replaced_store_file_is_not_lost(
    emu: Emulator, instance: Path, processes: Processes, how: str
) -> None:
    requests = 5
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    emu.faults.outage(600)  # nothing is delivered: everything waits in the store
    app = processes.app(env, "serve", str(requests))
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(instance, "track", requests)
    if how == "folder wiped":  # git clean -xfd, rsync --delete
        shutil.rmtree(instance)
    else:  # a copy put in place of the store's files (a backup restored with rsync)
        copy = instance / "copy.sqlite3"
        Store(copy).close()
        for end in ("-wal", "-shm"):
            Path(f"{store_path(instance)}{end}").unlink()
        copy.replace(store_path(instance))
    # The file every other process, and the next start, sees holds the work.
    assert wait_stored(instance, "track", requests, timeout=10), app.output
    assert app.wait_for_line("it uses the file now there", 10), app.output
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    drain_without_loss(emu, env, requests)
    assert emu.live_key not in app.output


def test_work_in_a_linked_store_file_whose_target_is_deleted_is_not_lost(
    emu: Emulator, tmp_path: Path, processes: Processes
) -> None:
    # The store file a link to one in a shared folder, that file deleted as the app runs:
    # SQLite names the -wal and -shm after the link's target, where the old ones stayed,
    # and read them as the new file's. The process could not move to it ("malformed"),
    # kept the deleted file and lost its work with it; a new one could not open it.
    requests = 5
    instance, shared = tmp_path / "instance", tmp_path / "shared"
    instance.mkdir()
    shared.mkdir()
    store_path(instance).symlink_to(shared / "outbox.sqlite3")
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    emu.faults.outage(600)  # nothing is delivered: everything waits in the store
    app = processes.app(env, "serve", str(requests))
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(instance, "track", requests)
    (shared / "outbox.sqlite3").unlink()
    assert app.wait_for_line("it uses the file now there", 10), app.output
    assert wait_stored(instance, "track", requests, timeout=10), app.output
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    drain_without_loss(emu, env, requests)


@pytest.mark.parametrize("link", ["instance folder", "store file"])
def test_a_store_linked_into_a_shared_folder_not_made_yet_is_made_there(
    emu: Emulator, tmp_path: Path, processes: Processes, link: str
) -> None:
    # A release's instance folder (or its store file) linked into the shared folder before
    # a deploy made it: the store went to memory ("File exists", or "unable to open"), and
    # what waited in it was lost with each process.
    requests = 5
    release, shared = tmp_path / "releases" / "1", tmp_path / "shared" / "instance"
    release.mkdir(parents=True)
    instance = release / "instance"
    if link == "instance folder":
        instance.symlink_to(shared)
        target = shared / store_path(instance).name
    else:
        instance.mkdir()
        target = shared / "outbox.sqlite3"
        store_path(instance).symlink_to(target)
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    emu.faults.outage(600)  # nothing is delivered: everything waits in the store
    app = processes.app(env, "serve", str(requests))
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(instance, "track", requests)
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    assert "falls back to memory" not in app.output
    assert target.is_file() and not target.is_symlink()
    drain_without_loss(emu, env, requests)


def _old_release_deleted_while_serving(
    emu: Emulator, tmp_path: Path, processes: Processes, requests: int
) -> tuple[Process, Path, Path]:
    """Release 1 serving ``requests`` while Meisa is down, its instance folder (as release
    2's) a link to the shared one, then its folder deleted by a deploy's cleanup: its app
    (still running), the shared folder and the releases' folder."""
    shared, releases = linked_releases(tmp_path)
    old = environment(emu, releases / "1" / "instance", MEISA_TEST_RATE="none")
    emu.faults.outage(600)  # nothing is delivered: everything waits in the store
    app = processes.app({**old, "MEISA_TEST_FLUSH_TIMEOUT": "0"}, "serve", str(requests))
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(shared, "track", requests)
    assert app.wait_for_line(DELIVERS), app.output
    shutil.rmtree(releases / "1")
    return app, shared, releases


def test_an_old_release_folder_deleted_as_its_workers_stop_leaves_the_shared_store_alone(
    emu: Emulator, tmp_path: Path, processes: Processes
) -> None:
    # A deploy's cleanup deleted the old release (its instance folder a link to the shared
    # one) while its workers still ran: they took the store as deleted, made the release's
    # folder again and moved every operation of the shared store into a file there.
    requests = 5
    app, _, releases = _old_release_deleted_while_serving(emu, tmp_path, processes, requests)
    # The writer looks at the path every 0.1 s: a second is ten looks.
    assert not wait_until(lambda: (releases / "1").exists(), 1.0), app.output
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    assert not (releases / "1").exists() and "deleted or replaced" not in app.output
    drain_without_loss(emu, environment(emu, releases / "2" / "instance"), requests)


@pytest.mark.parametrize("store", ["deleted", "replaced"])
def test_a_shared_store_gone_with_an_old_release_folder_is_made_again_in_the_shared_one(
    emu: Emulator, tmp_path: Path, processes: Processes, store: str
) -> None:
    # The old release deleted, and the shared store file with it (or replaced: a new one
    # made there): its workers made the release's folder again for a file of their own, and
    # moved every operation of the old one into it, read by no later start (5 events and
    # a send lost).
    requests = 5
    app, shared, releases = _old_release_deleted_while_serving(emu, tmp_path, processes, requests)
    folder = os.open(shared, os.O_RDONLY)
    try:  # the folder's lock, as the store takes it to make a file: its -wal is not one new
        fcntl.flock(folder, fcntl.LOCK_EX)
        for name in sqlite_files(str(store_path(shared))):
            Path(name).unlink(missing_ok=True)
    finally:
        os.close(folder)
    if store == "replaced":
        Store(store_path(shared)).close()
    assert app.wait_for_line("moved the", 10), app.output
    # Named where it is (the release's path, followed by the link, is gone).
    assert f"store {store_path(shared)} was deleted or replaced" in app.output
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    drain_without_loss(emu, environment(emu, releases / "2" / "instance"), requests)


def test_a_process_of_an_old_release_started_after_its_folder_went_leaves_the_shared_store_alone(
    emu: Emulator, tmp_path: Path, processes: Processes
) -> None:
    # The old release's server starts a worker after the deploy's cleanup deleted the
    # release: it made the release's instance folder again, a plain one, for a store of its
    # own (it cannot know the shared one), and the old workers, taking the shared store as
    # replaced, moved every operation of it into that file, read by no later start.
    requests = 20
    app, _, releases = _old_release_deleted_while_serving(emu, tmp_path, processes, requests)
    late = processes.app(environment(emu, releases / "1" / "instance"), "serve", "0")
    assert late.wait_for_line("ready"), late.output
    assert "Delivery falls back to memory" in late.output
    app.signal(signal.SIGTERM)  # stopping, it looks at the store's path once more
    assert app.wait() == 0, app.output
    assert not (releases / "1").exists() and "deleted or replaced" not in app.output
    assert late.stop() == 0, late.output
    drain_without_loss(emu, environment(emu, releases / "2" / "instance"), requests)


def test_work_left_by_a_release_says_where_it_waits(
    emu: Emulator, tmp_path: Path, processes: Processes
) -> None:
    # Release directories, each with its own instance folder: what the old release's
    # workers leave pending is read by no later start; their log says where it is.
    old_release = tmp_path / "releases" / "1" / "instance"
    old_release.parent.mkdir(parents=True)  # (the release's code; the store's folder is made)
    env = environment(emu, old_release, MEISA_TEST_RATE="none", MEISA_TEST_FLUSH_TIMEOUT="0")
    emu.faults.outage(600)
    app = processes.app(env, "serve", "5")
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(old_release, "track", 5)
    assert app.wait_for_line(DELIVERS), app.output  # (only the delivering process says it)
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    assert f"stay in the store for the next start ({store_path(old_release)})" in app.output


@pytest.mark.parametrize("how", ["deleted", "copied"])
def test_a_store_replaced_while_a_process_has_it_open_keeps_every_row(
    tmp_path: Path, how: str
) -> None:
    # The old file's -wal and -shm stay while a process has it open. Deleted: a store made
    # again beside them read them as its own (another process: "disk I/O error", so it
    # could not start; the old one, failing to follow, then saw none of its rows). A copy
    # of the file put in its place reads its -wal, rows and all: the old one, following,
    # moved its rows "into" it and deleted them from itself, the same rows (none left).
    path = str(tmp_path / "meisa-outbox.sqlite3")
    old, child = Store(path), None
    try:
        shutil.copy(path, f"{path}.copy")
        with old.write() as db:
            for n in range(5):
                pending.add(db, upsert(n), LANE_ROUTINE)
        assert os.path.exists(path + "-wal") and os.path.exists(path + "-shm")
        os.unlink(path)
        if how == "copied":
            os.replace(f"{path}.copy", path)
        # Another process makes (or opens) the file now there, and keeps it open.
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; from flask_meisa._engine import pending; "
             "from flask_meisa._engine.store import Store; from tests.engine_support import "
             f"upsert; store = Store({path!r})\nwith store.write() as db:\n"
             "    for n in (5, 6): pending.add(db, upsert(n), 2)\n"
             "print('stored', flush=True); sys.stdin.read(); store.close()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline() != "stored\n":
            child.kill()
            pytest.fail(child.communicate()[1])
        assert old.moved() and old.follow() == (5 if how == "deleted" else 0)
        with old.read() as db:
            assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 7
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        child.stdin.close()
        assert child.wait(60) == 0, child.stderr.read() if child.stderr else ""
    finally:
        old.close()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout, child.stderr) if child is not None else ():
            if stream is not None:
                stream.close()
    assert query(Path(path), "SELECT count(*) FROM meisa_ops") == [(7,)]


def test_a_backfill_whose_store_is_deleted_as_it_runs_upserts_each_user_once(
    emu: Emulator, instance: Path
) -> None:
    # 'rm instance/meisa*' while 'flask meisa sync-users' runs (a deploy), three times: the
    # call under way as the files went was made again once the run had moved to the new
    # file (1,501 upserts for 1,500 users). Meisa answers slowly: a call is most likely
    # under way each time.
    users = 600

    def upserted(count: int) -> bool:
        return len(emu.requests_to("/contacts/upsert/")) >= count

    emu.faults.set(latency=0.01, paths=["/contacts/upsert/"])
    run = subprocess.Popen(
        **sync_users_process(emu.url, emu.live_key, users, instance),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for done in (100, 250, 400):
            assert wait_until(functools.partial(upserted, done), 60)  # the last move over
            for file in instance.glob("meisa*"):
                file.unlink(missing_ok=True)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    calls = collections.Counter(
        r.body["external_id"] for r in emu.requests_to("/contacts/upsert/")
    )
    print(f"{sum(calls.values())} upserts for {len(calls)} users")
    assert err.count("it uses the file now there") == 3, err
    assert len(calls) == users and set(calls.values()) == {1}, calls.most_common(3)
    assert out.splitlines()[-1].startswith(f"{users} of {users} users done"), out
    assert emu.live_key not in out + err
