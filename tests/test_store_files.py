"""The store's files changing under running app processes (``tests/served_app.py``), as
deploy scripts and admins change them: the delivery lock file deleted or replaced, the
store file deleted (with its folder) or replaced."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from flask_meisa._engine.host import HostLock
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from tests.process_support import Process
from tests.process_support import Processes
from tests.process_support import environment
from tests.process_support import no_loss
from tests.process_support import run_app
from tests.process_support import store_path
from tests.process_support import tally
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
    emu.faults.clear()
    assert "flushed True" in run_app(env, "drain")
    numbers = tally(emu, requests)
    assert no_loss(numbers), numbers
    assert emu.live_key not in app.output


def test_work_left_by_a_release_says_where_it_waits(
    emu: Emulator, tmp_path: Path, processes: Processes
) -> None:
    # Release directories, each with its own instance folder: what the old release's
    # workers leave pending is read by no later start; their log says where it is.
    old_release = tmp_path / "releases" / "1" / "instance"
    env = environment(emu, old_release, MEISA_TEST_RATE="none", MEISA_TEST_FLUSH_TIMEOUT="0")
    emu.faults.outage(600)
    app = processes.app(env, "serve", "5")
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(old_release, "track", 5)
    assert app.wait_for_line(DELIVERS), app.output  # (only the delivering process says it)
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    assert f"stay in the store for the next start ({store_path(old_release)})" in app.output
