"""Background delivery across a process's life: interpreter exit (memory and file stores),
fork, green-thread monkey-patching, and apps that are closed or dropped.

Exit and fork run in a separate interpreter (``tests/engine_support.py``) talking to the
emulator of the test over loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
import warnings
import weakref
from pathlib import Path

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.mounts import write_locked
from flask_meisa._engine.store import SCHEMA_VERSION
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.errors import ConfigurationError
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from tests.apps import build_app
from tests.engine_support import RecordingHooks
from tests.engine_support import make_engine
from tests.process_support import ROOT
from tests.process_support import STORE_NAME
from tests.process_support import environment
from tests.process_support import wait_until

UPSERT = "/contacts/upsert/"


def run_scenario(
    url: str, key: str, *args: str, flush_timeout: float = 5.0, store: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MEISA_TEST_URL": url,
        "MEISA_TEST_KEY": key,
        "FLUSH_TIMEOUT": str(flush_timeout),
        "PYTHONPATH": str(ROOT),
    }
    if store is not None:
        env["MEISA_TEST_STORE"] = str(store)
    done = run_python(["-m", "tests.engine_support", *args], env)
    assert key not in done.stdout + done.stderr
    return done


def run_python(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A Python child run with ``args`` at the repository's root, importing this tree."""
    env = env or {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def waiting_in(path: Path) -> int:
    """How many operations wait in the store file ``path``."""
    store = Store(path)
    try:
        with store.read() as db:
            return int(
                db.execute("SELECT count(*) FROM meisa_ops WHERE state != 'dead'").fetchone()[0]
            )
    finally:
        store.close()


@pytest.mark.parametrize("where", ["memory", "file"])
def test_exit_delivers_what_is_pending(emulator: Emulator, tmp_path: Path, where: str) -> None:
    store = tmp_path / "store.sqlite3" if where == "file" else None
    done = run_scenario(emulator.url, emulator.live_key, "exit", "25", store=store)
    assert done.returncode == 0, done.stderr
    upserts = emulator.requests_to(UPSERT)
    assert len(upserts) == 25
    assert {r.body["external_id"] for r in upserts} == {f"exit-{n}" for n in range(25)}
    assert "exit outcome delivered 25" in done.stdout
    assert "not delivered" not in done.stderr
    if store is not None:
        assert waiting_in(store) == 0


DROPPED_APP = """
import gc, sys
from flask import Flask
from flask_meisa import Meisa

app = Flask("dropped", instance_path=sys.argv[1])
app.config.update(MEISA_API_KEY="meisa_live_unreachable_0000", MEISA_BASE_URL=sys.argv[2],
                  MEISA_OUTBOX=sys.argv[3] or None, MEISA_SUPPRESS_SEND=False)
meisa = Meisa(app)
with app.app_context():
    for n in range(30):
        meisa.send("receipt", f"user{n}@example.com", background=True)
del app, meisa
gc.collect()  # the app is closed in a thread of its own; the process ends at once
"""


@pytest.mark.parametrize("where", ["memory", "file"])
def test_exit_right_after_an_app_was_dropped_keeps_or_reports_its_work(
    tmp_path: Path, where: str
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/api/v1"
    store = tmp_path / "store.sqlite3"
    done = run_python(["-c", DROPPED_APP, str(tmp_path), url, str(store) * (where == "file")])
    assert done.returncode == 0, done.stderr
    if where == "file":
        assert waiting_in(store) == 30  # for the app's next process
    else:
        assert "30 operations were not delivered before shutdown" in done.stderr


EXITING_APP = """
import sys
from flask import Flask
from flask_meisa import Meisa

app = Flask("exiting", instance_path=sys.argv[1])
app.config.update(MEISA_API_KEY=sys.argv[2], MEISA_BASE_URL=sys.argv[3], MEISA_RATE_LIMIT=None,
                  MEISA_SUPPRESS_SEND=False)
meisa = Meisa(app)
with app.app_context():
    for n in range(10):
        meisa.send("receipt", f"user{n}@example.com", background=True)
"""


def test_exit_delivers_through_connections_it_then_closes(
    emulator: Emulator, tmp_path: Path
) -> None:
    # Unclosed sockets are reported, as the interpreter finalizes them, only in dev mode.
    args = [str(tmp_path), emulator.live_key, emulator.url]
    done = run_python(["-X", "dev", "-W", "error", "-c", EXITING_APP, *args])
    assert done.returncode == 0, done.stderr
    assert len(emulator.requests_to("/emails/trigger/")) == 10
    assert done.stderr == ""


def test_exit_drops_what_a_memory_store_could_not_deliver_and_says_so() -> None:
    url = f"http://127.0.0.1:{closed_port()}/api/v1"
    done = run_scenario(url, "meisa_live_unreachable_0000", "exit", "7", flush_timeout=0.3)
    assert done.returncode == 0, done.stderr
    assert "7 operations were not delivered before shutdown" in done.stderr
    assert "exit outcome dropped:shutdown 7" in done.stdout


def test_exit_of_a_process_refused_by_the_store_for_another_meisa_says_what_and_why(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A process with a test key beside the live server (a test run, a staging worker on
    # the same folder): the store refuses its work, which waits in its memory until exit.
    store = tmp_path / "store.sqlite3"
    live = make_engine(RecordingHooks(), emulator.url, emulator.live_key, store=Store(store))
    try:
        live.submit([Operation("upsert", {"email": "live@example.com"})])
        assert live.flush(10) and live.is_holder  # it delivers, for the live key
        done = run_scenario(
            emulator.url, emulator.test_key, "exit", "3", flush_timeout=0.3, store=store
        )
    finally:
        live.close(0)
    assert done.returncode == 0, done.stderr
    assert "exit outcome dropped:shutdown 3" in done.stdout
    said = [line for line in done.stderr.splitlines() if "before shutdown" in line]
    assert len(said) == 1, done.stderr
    assert "3 operations were not delivered before shutdown" in said[0]
    assert f"delivers from it for {emulator.url} with a live key" in said[0]  # the cause
    assert "give each Meisa a MEISA_OUTBOX of its own" in said[0]  # the fix
    assert emulator.contacts("test") == []


def test_exit_of_a_process_whose_store_takes_no_writes_says_what_and_why(
    tmp_path: Path,
) -> None:
    # The disk is full (or the file is locked, or no longer writable): what the process
    # handed over waits in its memory, and is lost when it exits.
    store = tmp_path / "store.sqlite3"
    url = f"http://127.0.0.1:{closed_port()}/api/v1"
    key = "meisa_live_unreachable_0000"
    done = run_scenario(url, key, "full-disk-exit", "3", flush_timeout=0.3, store=store)
    assert done.returncode == 0, done.stderr
    assert "full-disk-exit store_failed True" in done.stdout, done.stdout + done.stderr
    assert "full-disk-exit outcome dropped:shutdown 3" in done.stdout
    said = [line for line in done.stderr.splitlines() if "before shutdown" in line]
    assert len(said) == 1, done.stderr
    assert said[0].startswith(
        "flask-meisa: 3 operations were not delivered before shutdown: the delivery store "
        f"{store} refused them (disk I/O error): make it writable"
    ), said[0]
    assert said[0].endswith("or set MEISA_OUTBOX to a file it can write")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_exit_of_a_worker_forked_after_a_newer_store_was_put_in_place_says_what_and_why(
    tmp_path: Path,
) -> None:
    # A newer release made the store again; a worker of the running one, forked now, opens
    # the file of a schema it cannot read: its work waits in memory, and is lost at exit.
    store = tmp_path / "store.sqlite3"
    url = f"http://127.0.0.1:{closed_port()}/api/v1"
    key = "meisa_live_unreachable_0000"
    done = run_scenario(url, key, "newer-schema-fork", "3", flush_timeout=0.3, store=store)
    assert done.returncode == 0, done.stderr
    assert "child submitted 3" in done.stdout, done.stdout + done.stderr
    assert "child outcome dropped:shutdown 3" in done.stdout, done.stdout + done.stderr
    assert "writer error" not in done.stderr  # waited in memory, not dropped at once
    said = [line for line in done.stderr.splitlines() if "before shutdown" in line]
    assert len(said) == 1, done.stderr
    assert said[0].startswith(
        "flask-meisa: 3 operations were not delivered before shutdown: the delivery store "
        f"{store} refused them (the delivery store {str(store)!r} was written by a newer "
        f"flask-meisa (schema {SCHEMA_VERSION + 1}; this one reads {SCHEMA_VERSION}): "
        "upgrade flask-meisa here, or set "
        "MEISA_OUTBOX to another file)"
    ), said[0]


def test_exit_of_the_delivering_process_on_a_store_file_it_cannot_follow_says_what_is_left(
    tmp_path: Path,
) -> None:
    # A newer release made the store again while this one delivered: it keeps the file it
    # has open, whose work is lost with it. It said it stayed "for the next start" (info).
    store = tmp_path / "store.sqlite3"
    url = f"http://127.0.0.1:{closed_port()}/api/v1"
    key = "meisa_live_unreachable_0000"
    done = run_scenario(url, key, "newer-schema-exit", "2", store=store)
    assert done.returncode == 0, done.stderr
    assert "newer-schema-exit cannot_move True" in done.stdout, done.stdout + done.stderr
    said = [line for line in done.stderr.splitlines() if "operations are left" in line]
    assert len(said) == 1, done.stderr
    assert said[0].startswith(
        f"flask-meisa: 2 operations are left in the delivery store {store}, deleted or "
        "replaced while this process (pid "
    ), said[0]
    assert f"was written by a newer flask-meisa (schema {SCHEMA_VERSION + 1};" in said[0]
    assert said[0].endswith(
        "Replace the file only with every process stopped, or with one they can all use"
    )
    assert "for the next start" not in done.stderr


RELEASE_ONE_AND_EXIT = """
from tests.served_app import create_app
create_app().test_client().post("/work/1").close()
print("released; exiting")
"""


def test_exit_of_a_process_whose_default_store_is_refused_delivers_from_memory(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A newer release's store in the instance folder: this process falls back to memory
    # at startup, and its exit hook delivers what it holds, as the memory store's does.
    instance = tmp_path / "instance"
    instance.mkdir()
    store = instance / STORE_NAME
    Store(store).close()
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    done = run_python(["-c", RELEASE_ONE_AND_EXIT], environment(emulator, instance))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "released; exiting" in output
    assert "written by a newer flask-meisa" in output
    assert "falls back to memory (the work in it waits there)" in output
    assert "not delivered" not in output
    assert [r.body["external_id"] for r in emulator.requests_to(UPSERT)] == ["u1"]
    assert emulator.live_key not in output


def test_exit_leaves_what_a_file_store_could_not_deliver_for_the_next_start(
    emulator: Emulator, tmp_path: Path
) -> None:
    store = tmp_path / "store.sqlite3"
    emulator.faults.outage(600, drop=True)  # Meisa takes no call
    done = run_scenario(
        emulator.url, emulator.live_key, "exit", "7", flush_timeout=0.3, store=store
    )
    assert done.returncode == 0, done.stderr
    assert "not delivered" not in done.stderr
    assert "dropped" not in done.stdout  # nothing lost, nothing reported lost
    assert waiting_in(store) == 7
    assert emulator.contacts() == []
    emulator.faults.clear()
    done = run_scenario(emulator.url, emulator.live_key, "drain", store=store)
    assert done.returncode == 0, done.stderr
    assert "drain flushed True" in done.stdout
    assert "drain outcome delivered 7" in done.stdout
    assert sorted(contact["external_id"] for contact in emulator.contacts()) == sorted(
        f"exit-{n}" for n in range(7)
    )
    assert waiting_in(store) == 0


def test_exit_with_no_time_to_flush_still_stores_what_was_handed_over(
    emulator: Emulator, tmp_path: Path
) -> None:
    # MEISA_FLUSH_TIMEOUT = 0: no time to deliver, but what a request handed over in
    # memory goes into the store file rather than being lost.
    store = tmp_path / "store.sqlite3"
    emulator.faults.outage(600)
    done = run_scenario(
        emulator.url, emulator.live_key, "exit", "7", flush_timeout=0.0, store=store
    )
    assert done.returncode == 0, done.stderr
    assert "not delivered" not in done.stderr
    assert "dropped" not in done.stdout
    assert waiting_in(store) == 7


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_an_outcome_the_full_disk_did_not_take_leaves_nothing_pending_behind(
    emulator: Emulator, tmp_path: Path
) -> None:
    done = run_scenario(
        emulator.url, emulator.live_key, "full-disk", store=tmp_path / "store.sqlite3"
    )
    assert done.returncode == 0, done.stderr
    assert "full-disk store_failed True" in done.stdout, done.stdout + done.stderr
    # Once the disk has room the upsert is over (Meisa had it: no call), and so is flush().
    assert "full-disk flushed True pending 0" in done.stdout, done.stdout + done.stderr
    assert "full-disk outcome delivered 1" in done.stdout
    assert emulator.requests == []


@pytest.mark.slow
def test_an_answer_stored_after_the_full_disk_counts_its_operations_once(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.faults.set(latency=1.2, paths=[UPSERT])
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    done = run_scenario(
        emulator.url, emulator.live_key, "full-disk-retry", store=tmp_path / "store.sqlite3"
    )
    assert done.returncode == 0, done.stderr
    assert "full-disk-retry store_failed True" in done.stdout, done.stdout + done.stderr
    # Two operations, one call once the disk has room: two delivered, not one more per
    # attempt to store the 503.
    assert "full-disk-retry flushed True delivered 2" in done.stdout, done.stdout + done.stderr
    assert "full-disk-retry outcome delivered 1" in done.stdout
    bodies = [r.body["custom_fields"]["plan"] for r in emulator.requests_to(UPSERT)]
    assert bodies == ["a", "b"]


@pytest.mark.slow
def test_a_full_disk_is_logged_once_and_its_end_once(emulator: Emulator, tmp_path: Path) -> None:
    # Reads work on a full disk: delivery finding nothing to do said the store worked
    # again, and the writer that failed again said it failed, twice a second.
    done = run_scenario(
        emulator.url, emulator.live_key, "full-disk-quiet", store=tmp_path / "store.sqlite3"
    )
    assert done.returncode == 0, done.stderr
    assert "full-disk-quiet while-full (1, 0) flushed True then 1" in done.stdout, (
        done.stdout + done.stderr
    )


def test_a_forked_child_of_a_memory_store_starts_empty_and_both_deliver_their_own(
    emulator: Emulator,
) -> None:
    done = run_scenario(emulator.url, emulator.live_key, "fork", "4", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    parent_pending = int(next(line for line in lines if "pending_at_fork" in line).split()[-1])
    assert parent_pending >= 1, done.stdout  # the budget (2/second) held some at the fork
    assert "child pending_at_start 0 delivered 0" in lines
    assert "child flushed True delivers True" in lines
    assert "child outcome delivered 3" in lines
    assert "parent flushed True child_exit 0" in lines
    assert "parent outcome delivered 4" in lines
    ids = sorted(r.body["external_id"] for r in emulator.requests_to(UPSERT))
    assert ids == sorted([f"parent-{n}" for n in range(4)] + [f"child-{n}" for n in range(3)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("held_by", ["the app", "an engine closing"])
def test_what_a_forked_child_stores_stays_while_its_parent_closes_and_opens_the_store(
    tmp_path: Path, held_by: str
) -> None:
    # SQLite keeps a file's locks once a process: the child's own connection took none while
    # the one it inherited was open, so the parent closing its last one (meisa.close) took
    # the -wal and -shm from under it: what the child stored next was lost, or, mixed into
    # the parent's next -wal, read as a malformed database.
    app = Flask("forked", instance_path=str(tmp_path))
    app.config.update(MEISA_API_KEY="meisa_live_unreachable_0000", TESTING=True)
    meisa = Meisa(app)
    # Open at the fork: the app's store, or one its state let go of already (an engine
    # closing, whose threads still use it).
    store = meisa.state(app).store() if held_by == "the app" else Store(tmp_path / STORE_NAME)
    with store.write() as db:
        Store.set_meta(db, "parent-1", 1)
    stored, go_on = os.pipe(), os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for name in ("child-1", "child-2"):
                with meisa.state(app).store().write() as db:
                    Store.set_meta(db, name, 1)
                os.write(stored[1], b".")
                os.read(go_on[0], 1)
            code = 0
        finally:
            os._exit(code)
    try:
        os.read(stored[0], 1)
        meisa.close(app)
        store.close()
        with meisa.state(app).store().write() as db:
            Store.set_meta(db, "parent-2", 1)
    finally:
        os.write(go_on[1], b"..")
        exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        meisa.close(app)
        for end in (*stored, *go_on):
            os.close(end)
    db = sqlite3.connect(tmp_path / STORE_NAME)
    try:
        check = db.execute("PRAGMA quick_check").fetchall()
        names = {name for (name,) in db.execute("SELECT name FROM meisa_meta")}
    finally:
        db.close()
    print(f"child exit {exit_code}, {check}, {sorted(names)}")
    assert exit_code == 0 and check == [("ok",)]
    assert {"parent-1", "child-1", "parent-2", "child-2"} <= names


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks")
def test_a_child_forked_while_another_thread_makes_the_store_opens_it(tmp_path: Path) -> None:
    # The folder's lock, taken while a store file is checked or made, went with its open file
    # into a child forked meanwhile: opening the store, the child waited for good on the copy
    # it held itself (and the host's other processes opening it waited as long as it ran).
    app = Flask("forked", instance_path=str(tmp_path))
    app.config.update(MEISA_API_KEY="meisa_live_unreachable_0000", TESTING=True)
    meisa = Meisa(app)
    folder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(folder, fcntl.LOCK_EX)  # another process checks the file: this one waits
    made = threading.Thread(target=meisa.state(app).store)  # the app's first use of it
    made.start()
    waiter = f":{os.stat(tmp_path).st_ino} "
    assert wait_until(lambda: any("->" in line and waiter in line for line in locks()), 10)
    released, say_released = os.pipe()
    pids: list[int] = []

    def fork() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            pid = os.fork()
        if pid:
            pids.append(pid)
            return
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a child that waits for good ends
            signal.alarm(5)
            os.read(released, 1)  # the other process let go, the parent's thread locked it
            Store(tmp_path / STORE_NAME).close()
            code = 0
        finally:
            os._exit(code)

    forker = threading.Thread(target=fork)
    forker.start()
    forker.join(0.5)  # forked at once, or once the store is made
    os.close(folder)
    os.write(say_released, b".")
    forker.join()
    made.join()
    meisa.close(app)
    os.close(say_released)
    os.close(released)
    _, status = os.waitpid(pids[0], 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_look_at_the_stores_write_lock_waits_for_the_fork_hook(tmp_path: Path) -> None:
    # Whether another process writes was looked at on a connection of its own, outside the
    # store's lock: a gunicorn master (--preload) forking meanwhile left SQLite's memory
    # mutex held in the worker by no thread, and the worker hung at its next use of SQLite
    # (at its exit, for good: its master stopped, it held the tests' output pipes open).
    store = Store(tmp_path / STORE_NAME)
    looked = threading.Event()

    def look() -> None:
        write_locked(store)
        looked.set()

    store.before_fork()  # what the fork hook holds while os.fork() runs
    looker = threading.Thread(target=look)
    try:
        looker.start()
        assert not looked.wait(0.3)  # no SQLite call while a fork may be under way
    finally:
        store.after_fork_in_parent()
    assert looked.wait(10)
    looker.join()
    store.close()


def locks() -> list[str]:
    """The lines of ``/proc/locks``: every lock held or waited for on this host."""
    return Path("/proc/locks").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_of_a_file_store_writes_and_its_parent_delivers_it_all(
    emulator: Emulator, tmp_path: Path
) -> None:
    store = tmp_path / "store.sqlite3"
    done = run_scenario(emulator.url, emulator.live_key, "fork", "4", "3", store=store)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    parent_pending = int(next(line for line in lines if "pending_at_fork" in line).split()[-1])
    assert parent_pending >= 1, done.stdout
    # The child sees the host's store: the parent's work, waiting there or delivered.
    start = next(line for line in lines if "pending_at_start" in line).split()
    assert int(start[-3]) + int(start[-1]) == 4, done.stdout
    assert "child flushed True delivers False" in lines  # the parent delivered its rows
    assert not any(line.startswith("child outcome") for line in lines), done.stdout
    assert "parent flushed True child_exit 0" in lines
    assert "parent outcome delivered 7" in lines
    ids = sorted(r.body["external_id"] for r in emulator.requests_to(UPSERT))
    assert ids == sorted([f"parent-{n}" for n in range(4)] + [f"child-{n}" for n in range(3)])
    assert waiting_in(store) == 0


@pytest.mark.parametrize(
    ("module", "function", "argument", "library"),
    [
        ("gevent.monkey", "is_module_patched", "threading", "gevent"),
        ("eventlet.patcher", "is_monkey_patched", "thread", "eventlet"),
    ],
)
def test_green_thread_patching_is_refused(
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    argument: str,
    function: str,
    library: str,
) -> None:
    # Neither library is installed here: stand in for a patched one the way its own
    # query would answer, with a module object in sys.modules.
    stub = types.ModuleType(module)
    setattr(stub, function, lambda name: name == argument)
    monkeypatch.setitem(sys.modules, module, stub)
    with pytest.raises(ConfigurationError, match=f"{library} monkey-patching"):
        make_engine(RecordingHooks(), emulator.url, emulator.live_key)
    with pytest.raises(ConfigurationError, match='MEISA_DELIVERY = "sync"'):
        build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    # The engines that need no threads of their own are fine.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="sync"))
    app.test_client().post("/login/1").close()
    assert len(emulator.requests_to(UPSERT)) == 1


def test_unpatched_green_thread_libraries_are_fine(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = types.ModuleType("gevent.monkey")
    stub.is_module_patched = lambda name: False  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gevent.monkey", stub)
    engine = make_engine(RecordingHooks(), emulator.url, emulator.live_key)
    assert engine.close() == 0


# -- apps closed or dropped ------------------------------------------------------------


def meisa_threads() -> list[threading.Thread]:
    """Threads of an app's delivery (the process's one HTTP watchdog is not one)."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("flask-meisa") and t.name != "flask-meisa-watchdog"
    ]


def open_descriptors() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def use_an_app(emulator: Emulator, user: int) -> None:
    """Build an app with the default delivery (the store in its instance folder), log a
    user in and wait for the sync; then let the app go."""
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    app.test_client().post(f"/login/{user}").close()
    with app.app_context():
        assert app.extensions["meisa"].flush(10)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_fifty_dropped_apps_leave_no_thread_and_no_descriptor(emulator: Emulator) -> None:
    use_an_app(emulator, 1)  # imports, loggers and the emulator's first connections
    gc.collect()
    assert wait_until(lambda: not meisa_threads())
    threads, descriptors = threading.enumerate(), open_descriptors()
    for n in range(50):
        use_an_app(emulator, 1 + n % 2)
    gc.collect()
    assert wait_until(lambda: not meisa_threads()), meisa_threads()
    left = [t.name for t in threading.enumerate() if t not in threads]
    assert left == []
    assert wait_until(lambda: len(open_descriptors()) <= len(descriptors)), (
        descriptors,
        open_descriptors(),
    )
    assert len(emulator.requests_to(UPSERT)) >= 2
    print(
        f"\n50 apps dropped: threads {len(threads)} -> {len(threading.enumerate())}, "
        f"descriptors {len(descriptors)} -> {len(open_descriptors())}"
    )


def test_an_app_collected_inside_a_store_transaction_is_closed_after_it(
    emulator: Emulator,
) -> None:
    # The collector runs finalizers in whichever thread it ran in: here (as it may in a
    # delivery thread) one inside a transaction of the app's own store.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    store = app.extensions["meisa"].state(app).store()
    gone = weakref.ref(app)
    with store.write() as db:
        del app
        gc.collect()
        assert gone() is None
        assert db.execute("SELECT count(*) FROM meisa_ops").fetchone() == (0,)  # still open
    assert wait_until(lambda: not meisa_threads()), meisa_threads()


def test_close_stops_an_apps_delivery_at_once(emulator: Emulator) -> None:
    app: Flask = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    path = meisa.state(app).store_path()
    assert path is not None
    emulator.faults.outage(600)
    app.test_client().post("/login/1").close()
    assert emulator.wait_for_requests(1, path=UPSERT)  # in delivery, failing
    assert meisa_threads()
    began = time.monotonic()
    assert meisa.close(app, timeout=0) == 0  # nothing lost: the store keeps it
    took = time.monotonic() - began
    assert not meisa_threads()
    print(f"\nclose(timeout=0) with an operation pending: {took:.2f}s")
    assert took < 3.0  # no flush: at most a call in flight (none: it is paused)
    assert waiting_in(Path(path)) == 1
    requests = len(emulator.requests)
    emulator.faults.clear()
    assert not wait_until(lambda: len(emulator.requests) > requests, timeout=0.5)
    assert meisa.close(app) == 0  # closing again does nothing


def test_a_flush_waiting_as_another_thread_closes_the_app_goes_on_with_its_next_engine(
    emulator: Emulator,
) -> None:
    app: Flask = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    emulator.faults.set(latency=0.5)
    with app.app_context():  # one contact's: delivered one after another, 0.5 s each
        meisa.upsert({"email": "ada@example.com"})
        meisa.track("exported_report", email="ada@example.com")
        meisa.track("exported_report", email="ada@example.com")
    entered, flushed = threading.Event(), []

    def note(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is Delivery.flush.__code__:
            entered.set()  # this flush waits on the engine that close() is about to stop

    def flush() -> None:
        sys.settrace(note)
        try:
            with app.app_context():
                began = time.monotonic()
                flushed.append((meisa.flush(8), time.monotonic() - began))
        finally:
            sys.settrace(None)

    flushing = threading.Thread(target=flush)
    flushing.start()
    assert entered.wait(5)
    assert emulator.wait_for_requests(1, path=UPSERT)
    assert meisa.close(app, timeout=0) == 0  # what is left stays in the store
    flushing.join(10)
    ((done, took),) = flushed
    print(f"\nflush across close(): {done} in {took:.2f}s")
    assert done
    assert len(emulator.requests_to("/events/track/")) == 2


FORKED_FROM_DELIVERY = """
import multiprocessing, os, signal, sys
from flask import Flask
from flask_meisa import Meisa, contact_synced

app = Flask("forking", instance_path=sys.argv[1])
app.config.update(
    MEISA_API_KEY=os.environ["MEISA_TEST_KEY"],
    MEISA_BASE_URL=os.environ["MEISA_TEST_URL"],
    MEISA_RATE_LIMIT=None,
)
meisa = Meisa(app)
children = []

def start_a_job(sender, **kwargs):  # run by a delivery thread of ours
    reader, writer = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=reader.recv)
    child.start()
    children.append((child, writer))

contact_synced.connect(start_a_job, sender=app)
with app.app_context():
    meisa.upsert({"email": "job@example.com", "external_id": "job"})
    assert meisa.flush(10)
child, writer = children[0]
child.terminate()  # SIGTERM, as a pool's terminate() or a server's stop sends
child.join(10)
print("exitcode", child.exitcode, -signal.SIGTERM)
if child.exitcode is None:
    writer.send(None)
"""


def test_a_process_forked_by_a_receiver_in_a_delivery_thread_can_be_stopped(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The signals our threads block are given back in a child forked from one of them: a
    # receiver's job, or a multiprocessing pool it starts, must end on SIGTERM.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MEISA_TEST_KEY": emulator.live_key,
        "MEISA_TEST_URL": emulator.url,
    }
    done = run_python(["-c", FORKED_FROM_DELIVERY, str(tmp_path)], env)
    assert done.returncode == 0, done.stderr
    assert f"exitcode {-signal.SIGTERM} {-signal.SIGTERM}" in done.stdout, done.stdout
