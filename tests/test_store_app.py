"""The delivery store in an app: ``MEISA_OUTBOX``, the checks at ``init_app`` (a damaged
file set aside and salvaged, a folder that cannot be made, a newer schema), what an
earlier run left, ``flask meisa dead-letters``, and no file under ``TESTING``."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa import delivery_dropped
from flask_meisa._engine import known
from flask_meisa._engine import pending
from flask_meisa._engine.host import HostLock
from flask_meisa._engine.mounts import sqlite_files
from flask_meisa._engine.store import SCHEMA_VERSION
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.errors import ConfigurationError
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from tests.apps import build_app
from tests.engine_support import RecordingHooks
from tests.engine_support import make_engine
from tests.engine_support import upsert
from tests.process_support import ROOT
from tests.process_support import environment
from tests.process_support import stored_kinds

UPSERT = "/contacts/upsert/"
STORE_FILE = "meisa-outbox.sqlite3"
PAGE = 4096


def thread_app(emulator: Emulator, **config: Any) -> Flask:
    """The test app delivering in the background through its store (by default the file
    in its own instance folder)."""
    settings = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_RETRY_BASE_DELAY=0.01)
    return build_app({**settings, **config})


def meisa_of(app: Flask) -> Meisa:
    extension: Meisa = app.extensions["meisa"]
    return extension


def invoke(app: Flask, *args: str, input: str | None = None) -> Any:
    return app.test_cli_runner().invoke(args=["meisa", *args], input=input)


def leave_rows(path: Path, count: int, **fields: Any) -> list[str]:
    """Store ``count`` upserts in a store file at ``path``, as an earlier run would leave
    them; their external ids."""
    store = Store(path)
    with store.write() as db:
        for n in range(count):
            payload = {"email": f"left{n}@example.com", "external_id": f"left-{n}", **fields}
            pending.add(db, Operation("upsert", payload), LANE_ROUTINE)
    store.close()  # the last connection: the file holds everything, no WAL left
    return [f"left-{n}" for n in range(count)]


def delivered_ids(emulator: Emulator) -> set[str]:
    return {
        str(r.body["external_id"])
        for r in emulator.requests_to(UPSERT)
        if r.status in (200, 201) and "external_id" in r.body
    }


def test_instance_names_a_file_in_the_instance_folder(emulator: Emulator, tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    app.config["MEISA_OUTBOX"] = "instance:  shared.sqlite3 "
    meisa = Meisa(app)
    path = tmp_path / "instance" / "shared.sqlite3"
    assert path.is_file()  # made (and checked) at init_app
    state = meisa.state(app)
    assert state.store_path() == str(path) and state.store().path == str(path)
    with app.app_context():
        meisa.upsert({"email": "ada@example.com"})
        assert meisa.flush(5)
        assert meisa.status().durable


def test_a_relative_path_names_a_file_in_the_instance_folder_from_any_folder(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `flask meisa status` or `sync-users` run from another folder than the workers' must
    # use their store: relative to the working directory, it made and used one of its own.
    config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX="var/outbox.db")
    paths = []
    (tmp_path / "instance").mkdir()  # (only the store's own folder is made)
    for folder in ("server", "admin"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config.update(config)
        paths.append(Meisa(app).state(app).store().path)
    assert paths == [str(tmp_path / "instance" / "var" / "outbox.db")] * 2


def test_the_default_store_is_a_file_in_the_instance_folder(emulator: Emulator) -> None:
    app = thread_app(emulator)
    path = Path(app.instance_path) / STORE_FILE
    assert app.config["MEISA_OUTBOX"] == f"instance:{STORE_FILE}"
    assert path.is_file()
    assert meisa_of(app).state(app).store().path == str(path)


def test_the_store_files_it_makes_are_the_owners_alone(emulator: Emulator, tmp_path: Path) -> None:
    # They hold users' addresses and fields, and mail waiting (reset links, codes): under the
    # usual umask every user of the host could read them, and lock the host's delivery out
    # by taking the lock file's flock. A file made beforehand keeps the mode it was given.
    umask = os.umask(0o022)
    try:
        modes = {}
        for made, outbox in ((None, STORE_FILE), (0o660, str(tmp_path / "shared.sqlite3"))):
            if made is not None:
                Path(outbox).touch(made)
                Path(outbox).chmod(made)
            app = thread_app(emulator, MEISA_OUTBOX=outbox)
            path = meisa_of(app).state(app).store_path()
            with app.app_context():
                meisa_of(app).upsert({"email": "ada@example.com"})
                assert meisa_of(app).flush(5) and meisa_of(app).delivering
            files = [Path(name) for name in sqlite_files(path or "")]
            modes[made] = [stat.S_IMODE(file.stat().st_mode) for file in files]
            modes[made].append(stat.S_IMODE(Path(f"{path}.lock").stat().st_mode))
            meisa_of(app).close()
    finally:
        os.umask(umask)
    assert modes == {None: [0o600] * 4, 0o660: [0o660, 0o660, 0o660, 0o600]}


@pytest.mark.parametrize("value", [None, "memory", " Memory "])
def test_none_or_memory_keeps_delivery_in_memory(emulator: Emulator, value: Any) -> None:
    app = thread_app(emulator, MEISA_OUTBOX=value)
    meisa = meisa_of(app)
    with app.app_context():
        meisa.upsert({"email": "ada@example.com"})
        assert meisa.flush(5)
        assert not meisa.status().durable
    assert meisa.state(app).store_path() is None
    assert os.listdir(app.instance_path) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "MEISA_OUTBOX must be a SQLite file path"),
        ("   ", "MEISA_OUTBOX must be a SQLite file path"),
        (5, "MEISA_OUTBOX must be a SQLite file path"),
        (b"outbox.sqlite3", "MEISA_OUTBOX must be a SQLite file path"),
        ("instance:", "names no file"),
        ("instance:  ", "names no file"),
        (":memory:", 'for memory only, set None or "memory"'),
        ("false", 'for memory only, set None or "memory"'),
        ("True", "for the default file, leave it unset"),
        ("1", "for the default file, leave it unset"),
    ],
)
def test_invalid_values_are_refused(value: Any, message: str) -> None:
    app = Flask(__name__)
    app.config.update(MEISA_API_KEY="meisa_live_x", MEISA_OUTBOX=value)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Meisa(app)


def damage_one_page(path: Path) -> bytes:
    """Overwrite one 4 KB page holding operations (in the middle of them) with garbage;
    the file's new bytes."""
    data = bytearray(path.read_bytes())
    pages = [
        number
        for number in range(1, len(data) // PAGE)
        if data[number * PAGE] == 0x0D  # a table's leaf page...
        and b'"external_id"' in data[number * PAGE : (number + 1) * PAGE]  # ...of operations
    ]
    assert len(pages) > 4
    number = pages[len(pages) // 2]
    data[number * PAGE : (number + 1) * PAGE] = bytes(range(256)) * (PAGE // 256)
    path.write_bytes(data)
    return bytes(data)


def set_aside(path: Path) -> list[Path]:
    pattern = re.compile(re.escape(path.name) + r"\.damaged-\d{8}T\d{6}-" + str(os.getpid()) + "$")
    return [found for found in path.parent.iterdir() if pattern.match(found.name)]


def test_a_store_with_a_damaged_page_is_set_aside_and_what_can_be_read_is_delivered(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "instance" / STORE_FILE
    path.parent.mkdir()
    left = leave_rows(path, 120, custom_fields={"note": "x" * 200})
    damaged = damage_one_page(path)
    caplog.set_level(logging.ERROR, logger="flask_meisa.engine")
    app = Flask(__name__, instance_path=str(path.parent))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)  # init_app does not fail
    (aside,) = set_aside(path)
    assert aside.read_bytes() == damaged  # kept as it was, for inspection
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{path} is damaged" in error and str(aside) in error
    assert "Keep the damaged file for inspection, or delete it" in error
    salvaged = int(re.search(r"with the (\d+) operations", error).group(1))  # type: ignore[union-attr]
    assert 100 <= salvaged < 120
    with app.app_context():
        assert meisa.flush(10)
        status = meisa.status()
    assert (status.delivered, status.pending, status.durable) == (salvaged, 0, True)
    assert len(delivered_ids(emulator)) == salvaged
    assert delivered_ids(emulator) <= set(left)


def test_the_default_store_file_that_is_not_a_database_is_set_aside_and_a_fresh_store_used(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "instance" / STORE_FILE  # the default's own file, its header damaged
    path.parent.mkdir()
    path.write_bytes(b"these bytes are no database " * 100)
    caplog.set_level(logging.ERROR, logger="flask_meisa.engine")
    app = Flask(__name__, instance_path=str(path.parent))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    (aside,) = set_aside(path)
    assert aside.read_bytes() == b"these bytes are no database " * 100
    fresh = sqlite3.connect(path)  # checked as a new store is: WAL, this schema
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert fresh.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    fresh.close()
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in error and "with the 0 operations" in error
    assert emulator.live_key not in error
    with app.app_context():
        meisa.upsert({"email": "ada@example.com", "external_id": "fresh"})
        assert meisa.flush(5)
    assert delivered_ids(emulator) == {"fresh"}


@pytest.mark.parametrize("content", [b"SECRET=1\n", b"SQLite format 2\x00" + bytes(100)])
def test_an_outbox_naming_a_file_that_is_not_a_database_is_refused_and_left_alone(
    emulator: Emulator, tmp_path: Path, content: bytes
) -> None:
    # A careless MEISA_OUTBOX (the app's .env, say) was renamed aside as a damaged store.
    path = tmp_path / ".env"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match="which is not a SQLite database") as raised:
        thread_app(emulator, MEISA_OUTBOX=str(path))
    assert str(path) in str(raised.value) and emulator.live_key not in str(raised.value)
    assert [found.name for found in tmp_path.iterdir()] == [".env"]
    assert path.read_bytes() == content


def test_a_damaged_store_behind_a_link_is_set_aside_beside_its_target(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The store file a link to one on a volume: the link itself was moved aside, so the
    # damaged file stayed where every process's link still led, and the fresh store was
    # made beside the link, on the container's own disk.
    target, path = tmp_path / "volume" / STORE_FILE, tmp_path / "instance" / STORE_FILE
    target.parent.mkdir()
    path.parent.mkdir()
    target.write_bytes(b"these bytes are no database " * 100)
    path.symlink_to(target)
    app = Flask(__name__, instance_path=str(path.parent))  # the default's own file
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    assert path.is_symlink() and path.resolve() == target
    (aside,) = set_aside(target)
    assert aside.read_bytes() == b"these bytes are no database " * 100
    with sqlite3.connect(target) as fresh:
        assert fresh.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    fresh.close()
    with app.app_context():
        meisa.upsert({"email": "ada@example.com", "external_id": "fresh"})
        assert meisa.flush(5)
    assert delivered_ids(emulator) == {"fresh"}


def open_together(path: str, barrier: Any, results: Any) -> None:
    """In a process of its own: open the store at ``path`` once every process is ready (as
    gunicorn's workers each run ``init_app`` at once); put the rows it reads, or the error."""
    barrier.wait()
    try:
        store = Store(path)
        with store.read() as db:
            results.put(db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0])
        store.close()
    except Exception as error:
        results.put(repr(error))


@pytest.mark.slow
def test_processes_starting_together_on_a_damaged_store_share_one_fresh_store(
    tmp_path: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    for number in range(4):  # each round is a race: on main, most rounds lose the operations
        path = tmp_path / str(number) / STORE_FILE
        path.parent.mkdir()
        leave_rows(path, 120, custom_fields={"note": "x" * 200})
        damage_one_page(path)
        barrier, results = context.Barrier(6), context.Queue()
        started = [
            context.Process(target=open_together, args=(str(path), barrier, results))
            for _ in range(6)
        ]
        for process in started:
            process.start()
        seen = [results.get(timeout=60) for _ in started]
        for process in started:
            process.join(10)
        with sqlite3.connect(path) as db:
            (kept,) = db.execute("SELECT count(*) FROM meisa_ops").fetchone()
        db.close()
        # Set aside once: every process uses the one fresh store, with what was salvaged.
        assert 100 <= kept < 120 and seen == [kept] * 6, seen
        assert len(list(path.parent.glob(f"{STORE_FILE}.damaged-*[0-9]"))) == 1


def test_a_store_file_this_process_cannot_write_is_refused_at_startup() -> None:
    # A file made by another user (`sudo flask meisa ...`) in a folder the app may write:
    # it reads, so it passed the check, then every write failed: nothing was delivered.
    folder = Path(tempfile.mkdtemp(prefix="meisa-readonly-"))
    try:
        Store(folder / STORE_FILE).close()
        as_root = os.geteuid() == 0
        folder_mode, file_mode = (0o777, 0o644) if as_root else (0o755, 0o444)
        for name in folder.iterdir():
            name.chmod(file_mode)
        folder.chmod(folder_mode)
        drop = "os.setgid(65534); os.setuid(65534); " if as_root else ""
        child = subprocess.run(
            [sys.executable, "-c", "import os; from flask_meisa._engine.store import Store; "
             f"{drop}Store({str(folder / STORE_FILE)!r})"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert child.returncode == 1, child.stderr
    assert "ConfigurationError" in child.stderr and "cannot be used" in child.stderr
    assert "not writable" in child.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files for another user")
def test_a_linked_store_whose_wal_this_process_cannot_write_is_refused_at_startup() -> None:
    # The link's -wal and -shm were checked beside the link, where SQLite never keeps them:
    # another user's, beside the target, passed, and every write then failed.
    base = Path(tempfile.mkdtemp(prefix="meisa-linked-"))
    try:
        base.chmod(0o755)
        volume, instance = base / "volume", base / "instance"
        for folder in (volume, instance):
            folder.mkdir(mode=0o777)
            folder.chmod(0o777)
        held = Store(volume / STORE_FILE)  # open: its -wal and -shm stay, root's
        with held.write() as db:
            db.execute("INSERT INTO meisa_meta (name, value) VALUES ('held', '1')")
        (volume / STORE_FILE).chmod(0o666)
        (instance / STORE_FILE).symlink_to(volume / STORE_FILE)
        child = subprocess.run(
            [sys.executable, "-c", "import os; from flask_meisa._engine.store import Store; "
             f"os.setgid(65534); os.setuid(65534); Store({str(instance / STORE_FILE)!r})"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        held.close()
    finally:
        shutil.rmtree(base)
    assert child.returncode == 1, child.stderr
    assert f"{volume / STORE_FILE}-wal is not writable" in child.stderr, child.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files for another user")
def test_a_store_and_lock_root_makes_in_the_apps_folder_stay_the_apps() -> None:
    # `sudo flask db upgrade` (any command: init_app opens the store), or `sudo flask meisa
    # flush` taking delivery over, in an instance folder of the app's user: root's files
    # turned every worker of the app to memory, or kept all of them from delivering.
    folder = Path(tempfile.mkdtemp(prefix="meisa-apps-"))
    try:
        os.chown(folder, 65534, 65534)
        path = str(folder / STORE_FILE)
        store = Store(path)
        lock = HostLock(f"{path}.lock")
        assert lock.try_acquire()
        lock.release()
        store.close()
        child = subprocess.run(
            [sys.executable, "-c", "import os, sys; from flask_meisa._engine.store import "
             "Store; from flask_meisa._engine.host import HostLock; os.setgid(65534); "
             f"os.setuid(65534); Store({path!r}).close(); "
             f"sys.exit(0 if HostLock({path + '.lock'!r}).try_acquire() else 2)"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert child.returncode == 0, child.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root acts as another user")
def test_store_files_made_in_a_folder_shared_with_a_group_stay_the_groups() -> None:
    # Two users of one group run the app from a setgid folder (umask 002): the store a
    # deploy deleted, made again by the process moving its work into it, was its user's
    # alone, and the other user's processes could no longer deliver nor start on it.
    folder = Path(tempfile.mkdtemp(prefix="meisa-group-"))
    path = str(folder / STORE_FILE)
    prelude = (
        "import os, sys; from flask_meisa._engine.store import Store; from flask_meisa."
        "_engine.host import HostLock; from flask_meisa._engine import pending; from flask_"
        "meisa.operations import Operation; os.umask(0o002); os.setgroups([4242]); "
        "os.setgid(4242); os.setuid(int(sys.argv[1])); store = Store(sys.argv[2])\n"
        "with store.write() as db: pending.add(db, Operation('upsert', {'email': "
        "f'{os.getpid()}@example.com'}), 1)\n"
        "assert HostLock(sys.argv[2] + '.lock').try_acquire()\n"
    )
    deploy = "os.unlink(sys.argv[2]); assert store.moved(); print(store.follow())\n"
    try:
        folder.chmod(0o755)
        os.chown(folder, 65534, 4242)
        folder.chmod(0o2770)
        runs = [
            subprocess.run(
                [sys.executable, "-c", prelude + then, str(uid), path],
                capture_output=True,
                text=True,
                timeout=60,
            )
            for uid, then in ((65534, ""), (65533, ""), (65534, deploy), (65533, ""))
        ]
        modes = [stat.S_IMODE(os.stat(name).st_mode) for name in (path, f"{path}.lock")]
        kinds = stored_kinds(folder)
    finally:
        shutil.rmtree(folder)
    assert [run.returncode for run in runs] == [0] * 4, [run.stderr for run in runs]
    assert runs[2].stdout == "3\n"  # what waited, moved into the file made again
    assert modes == [0o660, 0o660] and kinds == {"upsert": 4}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root acts as another user")
def test_flask_meisa_run_by_another_user_than_the_apps_says_so(emulator: Emulator) -> None:
    # An operator of the app's group, not its user: the default store fell back to memory,
    # and status reported an empty host (exit 0), flush "nothing pending", dead-letters
    # none, and sync-users sent every user from memory, outside the host's budget.
    base = Path(tempfile.mkdtemp(prefix="meisa-operator-"))
    try:
        base.chmod(0o755)
        instance = base / "instance"
        instance.mkdir()
        left = leave_rows(instance / STORE_FILE, 3)  # the app's, waiting for its next start
        for name in (instance, instance / STORE_FILE):
            os.chown(name, 65534, 65534)
        script = (
            "import os, sys, click.testing, flask.testing, flask_meisa._engine.delivery, "
            "tests.served_app; os.setgid(65534); os.setuid(65533); "
            "result = tests.served_app.create_app().test_cli_runner().invoke(args=sys.argv[1:]); "
            "print(result.output); sys.exit(result.exit_code)"
        )
        env = environment(emulator, instance, MEISA_TEST_RATE="none")
        runs = [
            subprocess.run(
                [sys.executable, "-c", script, "meisa", *command],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            for command in (["status"], ["flush"], ["dead-letters"], ["sync-users"])
        ]
        still = stored_kinds(instance)
    finally:
        shutil.rmtree(base)
    for run in runs:
        assert run.returncode == 1, run.stdout + run.stderr
        assert (
            f"this process cannot use the delivery store '{instance / STORE_FILE}'" in run.stdout
        )
        assert "Run it as the user the app runs as (sudo -u nobody flask meisa ...)" in run.stdout
    assert emulator.requests_to(UPSERT) == []  # nothing sent from the operator's memory
    assert still == {"upsert": len(left)}


def test_a_default_store_that_cannot_be_made_falls_back_to_memory_with_one_warning(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    caplog.set_level(logging.WARNING)
    app = Flask(__name__, instance_path=str(tmp_path / "a-file" / "instance"))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert str(tmp_path / "a-file" / "instance" / STORE_FILE) in warnings[0]
    assert "falls back to memory:" in warnings[0] and "set MEISA_OUTBOX" in warnings[0]
    with app.app_context():
        meisa.upsert({"email": "ada@example.com", "external_id": "kept"})
        assert meisa.flush(5)
        assert not meisa.status().durable
    assert delivered_ids(emulator) == {"kept"}
    result = invoke(app, "status")  # no user's store: the host is in memory, as this process
    assert result.exit_code == 0 and "store: memory of this process" in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="only root mounts a small disk")
def test_an_app_started_on_a_full_disk_keeps_its_store_and_delivers_once_space_returns(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A redeploy while the disk was full: every worker fell back to memory for its life
    # (a budget of its own, its work lost at its stop), and what the file held waited
    # unseen until the next restart.
    instance = tmp_path / "instance"
    instance.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", instance], check=True)
    try:
        left = leave_rows(instance / STORE_FILE, 1)
        filler = os.open(instance / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, bytes(PAGE)):
                pass
        except OSError:
            pass  # the disk is full
        finally:
            os.close(filler)
        caplog.set_level(logging.WARNING)
        app = Flask(__name__, instance_path=str(instance))
        app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
        meisa = Meisa(app)
        try:
            assert not any("falls back to memory" in r.getMessage() for r in caplog.records)
            with app.app_context():
                meisa.upsert({"email": "ada@example.com", "external_id": "new"})
                assert not meisa.flush(0.5)  # it waits in memory meanwhile
                status = meisa.status()  # the file cannot even be read: what memory holds
                assert status.durable and status.pending == 1
                os.unlink(instance / "filler")
                assert meisa.flush(10)
                assert meisa.status().durable
        finally:
            meisa.close(app, 0.0)
        upserts = [r.body["external_id"] for r in emulator.requests_to(UPSERT)]
        assert sorted(upserts) == sorted([*left, "new"])  # each once
    finally:
        subprocess.run(["umount", instance], check=True)


# A folder is made for it in one that exists only: a path whose folders are missing (a typo,
# an old release's deleted folder) is said at the start, not made.
@pytest.mark.parametrize("where", ["a-file/store.sqlite3", "a-folder", "none/none/store.sqlite3"])
def test_an_explicit_store_that_cannot_be_made_fails_init_app(
    emulator: Emulator, tmp_path: Path, where: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    path = tmp_path / where
    app = Flask(__name__)
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(path)))
    with pytest.raises(ConfigurationError, match="cannot be used") as caught:
        Meisa(app)
    assert str(path) in str(caught.value) and "MEISA_OUTBOX" in str(caught.value)
    assert emulator.live_key not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]


def test_two_apps_of_one_process_share_a_store_only_with_one_account(
    emulator_factory: Any, tmp_path: Path
) -> None:
    first, second = emulator_factory(rate_limit=None), emulator_factory(rate_limit=None)
    shared = {"MEISA_DELIVERY": "thread", "MEISA_OUTBOX": str(tmp_path / "shared.sqlite3")}
    mine = Flask("mine")
    mine.config.update(emulator_config(first, **shared))
    meisa = Meisa(mine)
    same_account = Flask("same_account")
    same_account.config.update(emulator_config(first, **shared))
    Meisa(same_account)
    other = Flask("other")
    other.config.update(emulator_config(second, **shared))
    with pytest.raises(ConfigurationError, match="another MEISA_API_KEY") as caught:
        Meisa(other)
    assert "'mine'" in str(caught.value) or "'same_account'" in str(caught.value)
    assert "MEISA_OUTBOX" in str(caught.value)
    for key in (first.live_key, second.live_key):
        assert key not in str(caught.value)
    # Nothing half-done: the refused app is not registered, and fixed, it can be.
    assert "meisa" not in other.extensions
    other.config["MEISA_OUTBOX"] = str(tmp_path / "other.sqlite3")
    theirs = Meisa(other)
    with mine.app_context():
        meisa.upsert({"email": "ada@example.com", "external_id": "ada"})
        assert meisa.flush(5)
    with other.app_context():
        theirs.upsert({"email": "bob@example.com", "external_id": "bob"})
        assert theirs.flush(5)
    assert delivered_ids(first) == {"ada"} and delivered_ids(second) == {"bob"}


def newer(path: Path) -> None:
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()


def test_a_store_of_a_newer_schema_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    newer(path)
    app = Flask(__name__)
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(path)))
    with pytest.raises(ConfigurationError, match="newer flask-meisa") as caught:
        Meisa(app)
    assert str(path) in str(caught.value)
    assert set_aside(path) == []


def test_the_apps_own_database_named_as_the_store_is_refused_and_left_alone(
    emulator: Emulator, tmp_path: Path
) -> None:
    # MEISA_OUTBOX = "instance:app.db": the app's SQLite database is not taken for a new
    # store (put in WAL mode, given the store's tables, checked page by page at every
    # start, and moved aside as damaged if one of its pages is).
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    db.execute("INSERT INTO users (email) VALUES ('ada@example.com')")
    db.commit()
    db.close()
    before = path.read_bytes()
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(
        emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX="instance:app.db")
    )
    with pytest.raises(ConfigurationError, match="holds a table of another program") as caught:
        Meisa(app)
    assert "'users'" in str(caught.value) and "MEISA_OUTBOX" in str(caught.value)
    assert path.read_bytes() == before and set_aside(path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app.db-")) == []


def test_a_default_store_of_a_newer_schema_is_left_alone(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / STORE_FILE
    newer(path)
    before = path.read_bytes()
    caplog.set_level(logging.WARNING)
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    assert any("newer flask-meisa" in r.getMessage() for r in caplog.records)
    with app.app_context():
        assert not meisa.status().durable  # memory, this time
    assert path.read_bytes() == before and set_aside(path) == []


def test_init_app_picks_up_what_an_earlier_run_left(emulator: Emulator, tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    left = leave_rows(path, 5)
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    Meisa(app)
    assert emulator.wait_for(lambda e: delivered_ids(e) == set(left))


def test_under_the_flask_cli_the_first_request_picks_up_what_an_earlier_run_left(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "true")
    path = tmp_path / STORE_FILE
    left = leave_rows(path, 5)
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(path)))
    state = meisa_of(app).state(app)
    assert state.store().path == str(path)  # opened and checked at init_app...
    assert state.dispatcher.status().delivering_pid is None  # ...and nobody delivers yet
    app.test_client().get("/nothing-here").close()
    assert emulator.wait_for(lambda e: delivered_ids(e) == set(left))


# -- flask meisa dead-letters ----------------------------------------------------------


def make_dead_letters(app: Flask, count: int) -> None:
    with app.app_context():
        meisa = meisa_of(app)
        for n in range(count):
            meisa.send("launch_day", f"buyer{n}@example.com", background=True)
        assert meisa.flush(5)
        assert meisa.status().dead_letters == count


def test_dead_letters_list_show_retry_and_purge(emulator: Emulator) -> None:
    app = thread_app(emulator)
    assert invoke(app, "dead-letters").output == "no dead letters\n"
    make_dead_letters(app, 3)

    listed = invoke(app, "dead-letters", "list")
    assert listed.exit_code == 0, listed.output
    rows = listed.output.splitlines()
    assert rows[-1] == "3 dead letter(s)"
    ids = [int(row.split("\t")[0]) for row in rows[:-1]]
    assert all("\tsend launch_day (" in row for row in rows[:-1])
    assert all(
        "\tHTTP 400 [invalid_trigger] Unknown or inactive trigger_key.\t1 attempt(s)\t" in row
        for row in rows[:-1]
    )
    assert "buyer" not in listed.output  # no payload values in the listing

    shown = invoke(app, "dead-letters", "show", str(ids[0]))
    assert shown.exit_code == 0, shown.output
    assert '"to_email": "buyer0@example.com"' in shown.output
    assert '"code": "invalid_trigger"' in shown.output and '"status": 400' in shown.output
    missing = invoke(app, "dead-letters", "show", "999")
    assert missing.exit_code == 1 and "no dead letter with ID 999" in missing.output

    emulator.add_trigger("launch_day")
    retried = invoke(app, "dead-letters", "retry", str(ids[0]), "--timeout", "5")
    assert retried.exit_code == 0, retried.output
    assert "1 operation(s) queued again" in retried.output
    assert "done; 2 dead letter(s) left" in retried.output
    assert [s["to_email"] for s in emulator.sends()] == ["buyer0@example.com"]

    status = invoke(app, "status").output
    assert "waiting to retry: 0  dead letters: 2" in status
    flushed = invoke(app, "flush")
    assert flushed.exit_code == 0, flushed.output
    assert flushed.output == "nothing pending; 2 dead letter(s): see 'flask meisa dead-letters'\n"
    assert f"store: {Path(app.instance_path) / STORE_FILE} (every process of this host)" in status

    purged = invoke(app, "dead-letters", "purge", str(ids[1]))
    assert purged.output == "1 dead letter(s) deleted\n"
    refused = invoke(app, "dead-letters", "purge", "--all", input="n\n")
    assert refused.exit_code == 1 and "Delete all 1 dead letters?" in refused.output
    everything = invoke(app, "dead-letters", "purge", "--all", "--yes")
    assert everything.output == "1 dead letter(s) deleted\n"
    assert "dead letters: 0" in invoke(app, "status").output
    assert invoke(app, "dead-letters", "list").output == "no dead letters\n"


def test_retry_all_and_wrong_ids(emulator: Emulator) -> None:
    app = thread_app(emulator)
    make_dead_letters(app, 2)
    unknown = invoke(app, "dead-letters", "retry", "999")
    assert unknown.exit_code == 1 and "no dead letter with ID 999" in unknown.output
    both = invoke(app, "dead-letters", "retry", "1", "--all")
    assert both.exit_code == 2 and "not both" in both.output
    neither = invoke(app, "dead-letters", "purge")
    assert neither.exit_code == 2 and "or --all" in neither.output
    emulator.add_trigger("launch_day")
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "5")
    assert "2 operation(s) queued again" in retried.output, retried.output
    assert "done; 0 dead letter(s) left" in retried.output
    assert len(emulator.sends()) == 2


@pytest.mark.parametrize("seq", [2**63, 2**70])
def test_an_id_too_large_for_the_store_is_an_unknown_dead_letter(
    emulator: Emulator, seq: int
) -> None:
    app = thread_app(emulator)
    make_dead_letters(app, 1)
    for args in (["show", str(seq)], ["retry", "1", str(seq)], ["purge", str(seq)]):
        result = invoke(app, "dead-letters", *args)
        assert result.exit_code == 1, result.output
        assert f"no dead letter with ID {seq}" in result.output
        assert isinstance(result.exception, SystemExit)  # handled: no traceback
    assert "dead letters: 1" in invoke(app, "status").output


def test_dead_letter_commands_on_a_store_another_process_writes_say_so(
    emulator: Emulator,
) -> None:
    app = thread_app(emulator)
    make_dead_letters(app, 1)
    writer = sqlite3.connect(Path(app.instance_path) / STORE_FILE, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # a writer holding its lock past the busy timeout
    try:
        for args in (["purge", "1"], ["retry", "--all", "--timeout", "0"]):
            result = invoke(app, "dead-letters", *args)
            assert result.exit_code == 1, result.output
            assert "the delivery store failed (database is locked)" in result.output
            assert isinstance(result.exception, SystemExit)  # handled: no traceback
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "1 dead letter(s)" in invoke(app, "dead-letters", "list").output


def test_retry_refuses_a_timeout_that_is_not_a_number(emulator: Emulator) -> None:
    # flush(nan) never ends: no deadline is ever reached, and the wait does not block.
    app = thread_app(emulator)
    result = invoke(app, "dead-letters", "retry", "--all", "--timeout", "nan")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--timeout'" in result.output


def test_a_dead_upsert_whose_contact_was_synced_since_is_not_retried_unless_forced(
    emulator: Emulator,
) -> None:
    app = thread_app(emulator)

    def upsert(plan: str) -> None:
        contact = {"email": "ada@example.com", "external_id": "ada"}
        with app.app_context():
            meisa_of(app).upsert({**contact, "custom_fields": {"plan": plan}})
            assert meisa_of(app).flush(5)

    def plan() -> Any:
        contact = emulator.contact(external_id="ada")
        return None if contact is None else contact["custom_fields"]["plan"]

    emulator.faults.fail_next(1, status=422, path="/contacts/upsert/")
    upsert("pro")  # refused: a dead letter
    upsert("free")  # the contact's state since, delivered
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "5")
    assert retried.exit_code == 0, retried.output
    assert (
        "1 upsert(s) kept (" in retried.output and "would put older values back" in retried.output
    )
    assert "0 operation(s) queued again" in retried.output
    assert plan() == "free"
    forced = invoke(app, "dead-letters", "retry", "--all", "--force", "--timeout", "5")
    assert "1 operation(s) queued again" in forced.output, forced.output
    assert "done; 0 dead letter(s) left" in forced.output
    assert plan() == "pro"


def test_a_dead_upsert_is_kept_when_its_contact_was_put_back_unchanged_since(
    emulator: Emulator,
) -> None:
    # free delivered; pro refused; back to free: Meisa has free, so no call is needed, but
    # the app's state is free, newer than the dead pro.
    app = thread_app(emulator)
    contact = {"email": "ada@example.com", "external_id": "ada"}

    def upsert(plan: str) -> None:
        with app.app_context():
            meisa_of(app).upsert({**contact, "custom_fields": {"plan": plan}})
            assert meisa_of(app).flush(5)

    upsert("free")
    emulator.faults.fail_next(1, status=422, path="/contacts/upsert/")
    upsert("pro")  # refused: a dead letter
    upsert("free")  # the contact's state since
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "5")
    assert retried.exit_code == 0, retried.output
    assert "1 upsert(s) kept (" in retried.output, retried.output
    synced = emulator.contact(external_id="ada")
    assert synced is not None and synced["custom_fields"]["plan"] == "free"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"seats": "3"}),  # another field, delivered since
        ({"plan": "free"}, {}),  # its field, delivered only before it failed
    ],
)
def test_a_dead_upsert_of_fields_no_later_upsert_set_is_retried(
    emulator: Emulator, before: dict[str, str], after: dict[str, str]
) -> None:
    app = thread_app(emulator)
    contact = {"email": "ada@example.com", "external_id": "ada"}

    def upsert(**fields: str) -> None:
        with app.app_context():
            meisa_of(app).upsert({**contact, "custom_fields": fields})
            assert meisa_of(app).flush(5)

    if before:
        upsert(**before)
    emulator.faults.fail_next(1, status=422, path="/contacts/upsert/")
    upsert(plan="pro")  # refused: a dead letter
    if after:
        upsert(**after)
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "5")
    assert retried.exit_code == 0, retried.output
    assert "1 operation(s) queued again" in retried.output, retried.output
    synced = emulator.contact(external_id="ada")
    assert synced is not None and synced["custom_fields"]["plan"] == "pro"


def test_retry_without_waiting_only_queues(emulator: Emulator) -> None:
    app = thread_app(emulator)
    make_dead_letters(app, 1)
    emulator.add_trigger("launch_day")
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "0")
    assert retried.output == "1 operation(s) queued again\n"
    with app.app_context():
        assert meisa_of(app).flush(5)
    assert len(emulator.sends()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters"],
        ["dead-letters", "list"],
        ["dead-letters", "show", "1"],
        ["dead-letters", "retry", "--all"],
        ["dead-letters", "purge", "--all", "--yes"],
    ],
)
def test_dead_letter_commands_say_when_there_is_no_store(
    emulator: Emulator, args: list[str]
) -> None:
    app = build_app(emulator_config(emulator))  # MEISA_DELIVERY = "sync"
    result = invoke(app, *args)
    assert result.exit_code == 1
    kept_by = """dead letters are kept by MEISA_DELIVERY = "thread" or "celery", not 'sync'"""
    assert kept_by in result.output
    assert os.listdir(app.instance_path) == []


def test_no_store_file_under_testing_with_delivery_suppressed(emulator: Emulator) -> None:
    app = build_app(
        {
            **emulator_config(emulator, MEISA_DELIVERY="thread"),
            "TESTING": True,
            "MEISA_SUPPRESS_SEND": None,
        }
    )
    meisa = meisa_of(app)
    client = app.test_client()
    client.post("/login/1").close()
    client.post("/send-later/receipt/ada@example.com").close()
    with app.app_context():
        meisa.track("exported", email="ada@example.com")
        assert meisa.flush(1)
        status = meisa.status()
    assert (status.engine, status.pending, status.durable) == ("thread", 0, False)
    assert "engine: thread" in invoke(app, "status").output
    assert os.listdir(app.instance_path) == []
    assert emulator.requests == []


def test_drops_a_slow_delivery_dropped_receiver_had_not_reached_are_reported_at_close(
    emulator: Emulator,
) -> None:
    # A receiver making a slow call (a synchronous meisa.send to a slow Meisa) held the
    # reporter thread: at close, what it had not reached went unreported and unlogged.
    emulator.faults.outage(60)  # nothing is delivered: the store keeps one upsert
    app = thread_app(emulator, MEISA_QUEUE_SIZE=1)
    meisa, reported, held, release = meisa_of(app), [], threading.Event(), threading.Event()

    def slow_receiver(sender: Flask, operation: Operation, **extra: Any) -> None:
        reported.append((operation.payload["email"], threading.current_thread().name))
        if len(reported) == 1:
            held.set()
            release.wait(10)

    try:
        with delivery_dropped.connected_to(slow_receiver, app), app.app_context():
            for n in range(5):
                meisa.upsert({"email": f"user{n}@example.com"})
            assert held.wait(5)
            meisa.close(timeout=0)
            assert len(reported) == meisa.status().dropped == 4
        assert reported[0][1] == "flask-meisa-reporter"
        assert {thread for _, thread in reported[1:]} == {threading.current_thread().name}
    finally:
        release.set()


def test_dead_letters_retried_from_a_shell_for_another_meisa_are_not_sent_to_the_server_s(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The server delivers from the store with the live key; a shell with a test key in its
    # environment retries its dead letters: requeued, the server would send them live.
    path = tmp_path / STORE_FILE
    server = make_engine(RecordingHooks(), emulator.url, emulator.live_key, store=Store(path))
    try:
        server.submit([Operation("send", {"trigger_key": "launch_day", "to_email": "a@x.io"})])
        assert server.flush(5) and server.status().dead_letters == 1
        app = thread_app(emulator, MEISA_API_KEY=emulator.test_key, MEISA_OUTBOX=str(path))
        emulator.add_trigger("launch_day")
        result = invoke(app, "dead-letters", "retry", "--all", "--timeout", "0")
        assert result.exit_code == 1, result.output
        assert "give each Meisa a MEISA_OUTBOX of its own" in result.output
        assert server.flush(5) and server.status().dead_letters == 1
        assert emulator.sends() == []
    finally:
        server.close(0)


def test_retry_all_of_more_dead_letters_than_sqlite_takes_variables(emulator: Emulator) -> None:
    # A backfill of a large user base with a bad key: more dead upserts than a statement
    # takes variables (32,766 by default, 250,000 as some systems build SQLite), one of
    # them kept (its contact was synced since it failed), so the others are retried by ID.
    count = 250_002
    app = thread_app(emulator, MEISA_ENABLED=False)
    store = Store(Path(app.instance_path) / STORE_FILE)
    with store.write() as db:
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) "
            "INSERT INTO meisa_ops (id, kind, lane, ext, email, payload, priority, created_at, "
            "state, attempts, error_status, failed_at) "
            "SELECT 'op-' || i, 'upsert', ?, 'user-' || i, 'user' || i || '@example.com', "
            "json_object('email', 'user' || i || '@example.com', 'external_id', 'user-' || i, "
            "'custom_fields', json_object('plan', 'pro')), 'backfill', 0, 'dead', 1, 401, 1 "
            "FROM n",
            (count, LANE_BACKFILL),
        )
        synced = {"email": "user0@example.com", "external_id": "user-0"}
        known.remember(db, {**synced, "custom_fields": {"plan": "free"}}, 2.0)
    store.close()
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "0")
    assert retried.exit_code == 0, retried.output
    assert retried.output.startswith("1 upsert(s) kept (1): ")
    assert retried.output.endswith(f"\n{count - 1} operation(s) queued again\n")
    with app.app_context():
        assert meisa_of(app).status().dead_letters == 1


def test_retry_all_leaves_the_work_released_for_another_meisa(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The store kept work released for another Meisa: 'retry --all' retries the app's
    # failures; that work goes to this Meisa only when retried by ID, on purpose.
    path = tmp_path / STORE_FILE
    elsewhere = make_engine(
        RecordingHooks(), "http://127.0.0.1:9/api/v1", emulator.live_key, store=Store(path)
    )
    elsewhere.submit([upsert(1), upsert(2)])
    elsewhere.close(0)
    app = thread_app(emulator, MEISA_OUTBOX=str(path))
    with app.app_context():  # a send refused here, and those two set aside meanwhile
        meisa_of(app).send("launch_day", "buyer@example.com", background=True)
        assert meisa_of(app).flush(5) and meisa_of(app).status().dead_letters == 3
    listed = invoke(app, "dead-letters", "list").output
    aside = [int(row.split("\t")[0]) for row in listed.splitlines() if "[other_meisa]" in row]
    assert len(aside) == 2, listed
    emulator.add_trigger("launch_day")
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "5")
    assert retried.exit_code == 0, retried.output
    assert "1 operation(s) queued again" in retried.output
    assert (
        f"2 dead letter(s) released for another Meisa left ({aside[0]}, {aside[1]}): to send"
        " them to this one, retry them by ID" in retried.output
    )
    assert len(emulator.sends()) == 1 and emulator.requests_to(UPSERT) == []
    on_purpose = invoke(app, "dead-letters", "retry", *map(str, aside), "--timeout", "5")
    assert "done; 0 dead letter(s) left" in on_purpose.output, on_purpose.output
    assert len(emulator.requests_to(UPSERT)) == 2


def test_retry_where_delivery_is_off_queues_and_says_so(
    emulator: Emulator, tmp_path: Path
) -> None:
    store = str(tmp_path / STORE_FILE)
    app = thread_app(emulator, MEISA_OUTBOX=store)
    make_dead_letters(app, 1)
    meisa_of(app).close(timeout=5)
    # A shell of the host whose config turns delivery off (a maintenance config).
    off = thread_app(emulator, MEISA_OUTBOX=store, MEISA_SUPPRESS_SEND=True)
    emulator.add_trigger("launch_day")
    retried = invoke(off, "dead-letters", "retry", "--all", "--timeout", "5")
    assert retried.exit_code == 1, retried.output
    assert "1 operation(s) queued again" in retried.output
    assert "delivery is off here (MEISA_ENABLED / MEISA_SUPPRESS_SEND)" in retried.output
    assert emulator.sends() == []


def test_retry_that_outlasts_its_timeout_says_what_is_left(emulator: Emulator) -> None:
    app = thread_app(emulator)
    make_dead_letters(app, 1)
    emulator.add_trigger("launch_day")
    emulator.faults.set(latency=2.0)  # the retried send is still in flight at the timeout
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "0.3")
    assert retried.exit_code == 1, retried.output
    assert "not all delivered within 0.3s; 0 dead letter(s)" in retried.output
    with app.app_context():
        assert meisa_of(app).flush(10)
    assert len(emulator.sends()) == 1
