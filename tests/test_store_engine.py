"""Background delivery through a store file, against the emulator over loopback: rows
written on submit and removed once delivered, left for the next engine, coalesced and
ordered across restarts, dead letters, one delivering engine per file, stores whose
writes fail, and the host's status seen from another engine."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_meisa._engine import dead
from flask_meisa._engine import known
from flask_meisa._engine import pending
from flask_meisa._engine import writer
from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.host import HostLock
from flask_meisa._engine.host import set_aside
from flask_meisa._engine.store import SCHEMA_VERSION
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.errors import DeliveryError
from flask_meisa.errors import EngineClosed
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.engine_support import SLOW
from tests.engine_support import MakeEngine
from tests.engine_support import RecordingHooks
from tests.engine_support import make_engine as build_engine
from tests.engine_support import query
from tests.engine_support import upsert

UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"


@pytest.fixture
def lock(path: Path) -> Iterator[HostLock]:
    """The host's delivery lock, held by the test: engines on ``path`` only write until
    the test releases it."""
    held = HostLock(f"{path}.lock")
    assert held.try_acquire()
    yield held
    held.release()


def track(n: int, name: str = "clicked", tag: str = "t") -> Operation:
    return Operation("track", {"event_name": name, "external_id": f"{tag}-{n}"})


def send(n: int, trigger: str = "receipt") -> Operation:
    return Operation(
        "send",
        {"trigger_key": trigger, "to_email": f"buyer{n}@example.com", "idempotency_key": f"s{n}"},
    )


def answered(emu: Emulator, path: str) -> list[Any]:
    return [r for r in emu.requests_to(path) if r.status is not None and r.status < 300]


def seen(emu: Emulator) -> list[tuple[str, int | None]]:
    return [(r.path.removeprefix("/api/v1"), r.status) for r in emu.requests]


def waiting(path: Path) -> int:
    return int(query(path, "SELECT count(*) FROM meisa_ops WHERE state != 'dead'")[0][0])


def letters(path: Path) -> list[dead.DeadLetter]:
    store = Store(path)
    try:
        with store.read() as db:
            return dead.dead_letters(db)
    finally:
        store.close()


def uses_the_file_now_there(store: Store) -> bool:
    """Whether ``store`` follows the file now at its path, its move (if any) over."""
    with store.read():  # once a move under way (holding the store) is over
        return not store.moved()


def call_under_way(
    emulator: Emulator, make_engine: MakeEngine, operation: Operation, **options: Any
) -> tuple[Delivery, RecordingHooks, threading.Event]:
    """An engine making the call of ``operation`` (after its contact's upsert): its row in
    flight, the call held until the event returned is set."""
    called, go_on = threading.Event(), threading.Event()
    hooks = RecordingHooks()

    def under_way(operation: Operation) -> None:
        called.set()
        assert go_on.wait(30)

    engine = make_engine(emulator, hooks, **options)
    engine.submit([upsert(1)])  # the event's contact
    assert engine.flush(5)
    hooks.skip = under_way
    engine.submit([operation])
    assert called.wait(5)
    return engine, hooks, go_on


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_rows_are_written_on_submit_and_removed_once_delivered(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    emulator.faults.outage(60)
    engine = make_engine(emulator, hooks)
    engine.submit([upsert(n) for n in range(5)] + [send(1)])
    assert eventually(lambda: waiting(path) == 6)  # on disk before any call succeeded
    emulator.faults.clear()
    assert engine.flush(5)
    assert query(path, "SELECT count(*) FROM meisa_ops") == [(0,)]
    assert len(hooks.of("delivered")) == 6
    assert len(answered(emulator, UPSERT)) == 5
    status = engine.status()
    assert (status.engine, status.durable, status.pending, status.delivered) == (
        "thread",
        True,
        0,
        6,
    )
    assert status.delivering_pid == os.getpid()
    assert status.budget_left is None  # no budget: none to show


@pytest.fixture
def quiet_writer(
    emulator: Emulator,
    make_engine: MakeEngine,
    lock: HostLock,
    monkeypatch: pytest.MonkeyPatch,
) -> Delivery:
    """A started engine whose writer thread stores nothing for a minute (its group window
    and its poll) but for a flush, while another process delivers (the test's lock): no
    delivery thread of this process uses the store."""
    monkeypatch.setattr(writer, "GROUP_WINDOW", 60.0)
    engine = make_engine(emulator, RecordingHooks(), poll_interval=60.0)
    assert engine.first_pass(10)
    return engine


def test_work_handed_over_waits_for_its_groups_window_but_not_a_flush(
    quiet_writer: Delivery, path: Path
) -> None:
    engine = quiet_writer
    engine.submit([upsert(1)])
    engine.submit([upsert(2)])
    assert waiting(path) == 0  # handing over stores nothing: the writer stores the group
    assert engine.flush(0.5) is False  # the window is no wait for a flush
    assert waiting(path) == 2


def test_the_writer_looks_every_window_while_work_comes_and_sleeps_once_it_stops(
    emulator: Emulator,
    make_engine: MakeEngine,
    lock: HostLock,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under steady load no request's thread wakes the writer: it looks every window by
    # itself. A quiet spell after its last group it sleeps until woken: an idle worker
    # does not wake a hundred times a second.
    monkeypatch.setattr(writer, "TICKING", 0.5)
    engine = make_engine(emulator, RecordingHooks(), poll_interval=60.0)
    assert engine.first_pass(10)
    thread = next(t for t in engine._threads if t.name == "flask-meisa-writer")

    def wakes() -> int:
        with open(f"/proc/self/task/{thread.native_id}/status") as status:
            lines = [line.split() for line in status]
        return next(int(line[1]) for line in lines if line[0] == "voluntary_ctxt_switches:")

    engine.submit([upsert(1)])
    assert eventually(lambda: waiting(path) == 1)
    before = wakes()
    time.sleep(0.25)  # (observed, not waited for)
    assert wakes() - before >= 10  # a window is 10 ms
    engine.submit([upsert(2)])  # stored by a tick, unprompted
    assert eventually(lambda: waiting(path) == 2, timeout=0.5)
    time.sleep(0.6)  # the quiet spell
    before = wakes()
    time.sleep(0.5)
    assert wakes() - before <= 1
    engine.submit([upsert(3)])  # woken for it
    assert eventually(lambda: waiting(path) == 3)


def test_under_steady_load_the_writer_stores_once_a_window_not_after_every_pass(
    emulator: Emulator, make_engine: MakeEngine, lock: HostLock, path: Path
) -> None:
    # Work handed over while a pass stores waits for the writer's next tick: the group
    # commit holds under load (one transaction per window), not a pass after every pass.
    engine = make_engine(emulator, RecordingHooks(), poll_interval=60.0)
    assert engine.first_pass(10)
    handed, began, passes = 0, time.monotonic(), engine._passes
    while time.monotonic() - began < 0.5:  # a request about every 0.2 ms
        engine.submit([upsert(handed)])
        handed += 1
        time.sleep(0.0002)  # (paces the load; nothing waits on it)
    windows = (time.monotonic() - began) / writer.GROUP_WINDOW
    assert engine._passes - passes <= windows * 1.3 + 2  # (a pass after every pass: 80-105)
    assert eventually(lambda: waiting(path) == handed)  # each stored, once


def test_the_writers_look_at_the_hosts_files_leaves_a_group_to_the_end_of_its_window(
    emulator: Emulator,
    make_engine: MakeEngine,
    lock: HostLock,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The look, every poll, stored the group it found: a group cut short at a random
    # moment, in a thread woken for it, while requests run.
    monkeypatch.setattr(writer, "GROUP_WINDOW", 60.0)
    engine = make_engine(emulator, RecordingHooks(), poll_interval=0.01)
    assert engine.first_pass(10)
    looks, data_version = threading.Semaphore(0), engine.store.data_version

    def looking() -> int:
        looks.release()
        return data_version()

    monkeypatch.setattr(engine.store, "data_version", looking)
    engine.submit([upsert(1)])
    for _ in range(3):  # two looks, at least, began after the hand-over
        assert looks.acquire(timeout=10)
    assert waiting(path) == 0
    assert engine.flush(0.5) is False  # stored at once
    assert waiting(path) == 1


def test_a_flush_during_a_look_that_left_the_group_waits_for_the_pass_that_stores_it(
    emulator: Emulator, make_engine: MakeEngine, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The look takes nothing yet counts as a pass that stored all it took: a flush begun
    # while it runs must wait for the next pass, which takes the group at once.
    monkeypatch.setattr(writer, "GROUP_WINDOW", 60.0)
    engine = make_engine(emulator, RecordingHooks(), poll_interval=0.01)
    assert engine.first_pass(10)
    looking, go_on, data_version = threading.Event(), threading.Event(), engine.store.data_version

    def held_look() -> int:
        if not go_on.is_set():
            looking.set()
            go_on.wait(10)
        return data_version()

    monkeypatch.setattr(engine.store, "data_version", held_look)
    looking.clear()
    engine.submit([upsert(1)])
    assert looking.wait(10)  # a look runs and the group, not due for a minute, waits
    asked, at_once = threading.Event(), engine._store_at_once

    def asking() -> None:
        at_once()
        asked.set()

    monkeypatch.setattr(engine, "_store_at_once", asking)
    flushed: list[bool] = []
    flushing = threading.Thread(target=lambda: flushed.append(engine.flush(10)))
    flushing.start()
    assert asked.wait(10)  # the flush counted the passes begun, the look among them
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the next pass waits for another process's write
    go_on.set()
    flushing.join(0.5)
    assert flushing.is_alive(), flushed  # it waits for that pass, not the look's end
    other.execute("COMMIT")
    other.close()
    flushing.join(20)
    assert flushed == [True]
    assert len(answered(emulator, UPSERT)) == 1


def test_work_handed_over_is_stored_within_its_window_while_the_writer_looks(
    emulator: Emulator,
    make_engine: MakeEngine,
    lock: HostLock,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No further request comes: the writer stores at the end of the window, its looks
    # (every 5 ms here, inside the 10 ms windows) notwithstanding.
    engine = make_engine(emulator, RecordingHooks(), poll_interval=0.005)
    assert engine.first_pass(10)
    waited = []
    for n in range(1, 41):
        handed = time.monotonic()
        engine.submit([upsert(n)])
        stored = functools.partial(lambda n: waiting(path) == n, n)
        assert engine._wait_until(stored, time.monotonic() + 5)
        waited.append(time.monotonic() - handed)
    assert max(waited) < 1.0, waited


def test_a_look_that_fails_leaves_the_group_it_did_not_take_to_the_end_of_its_window(
    emulator: Emulator,
    make_engine: MakeEngine,
    lock: HostLock,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A look that took nothing and failed (a read of the store) backed off a whole poll:
    # the group it left waited that long in memory, not its window.
    monkeypatch.setattr(writer, "GROUP_WINDOW", 0.3)
    engine = make_engine(emulator, RecordingHooks(), poll_interval=60.0)
    failed, data_version = threading.Event(), engine.store.data_version

    def failing_once() -> int:
        if not failed.is_set():
            failed.set()
            raise sqlite3.OperationalError("disk I/O error")
        return data_version()

    monkeypatch.setattr(engine.store, "data_version", failing_once)
    engine.submit([upsert(1)])  # starts the writer: its first pass looks, the group not due
    assert failed.wait(10)
    assert engine._wait_until(lambda: waiting(path) == 1, time.monotonic() + 10)


def test_a_thread_handing_work_over_never_waits_for_the_store(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, store=Store(path, busy_timeout=60.0))
    assert engine.first_pass(10)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writes
    try:
        handing_over = threading.Thread(target=engine.submit, args=([upsert(1)],))
        handing_over.start()
        handing_over.join(10)  # a wait would be the busy timeout: a minute
        assert not handing_over.is_alive()
    finally:
        other.execute("COMMIT")
        other.close()
    assert engine.flush(10)  # the writer stored it once the store was free
    assert len(answered(emulator, UPSERT)) == 1
    assert len(hooks.of("delivered")) == 1


def test_the_next_engine_delivers_what_a_closed_one_left(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    first_hooks, second_hooks = RecordingHooks(), RecordingHooks()
    emulator.faults.outage(60)
    first = make_engine(emulator, first_hooks, flush_timeout=0.1)
    operations = [upsert(n) for n in range(20)] + [track(n) for n in range(20)] + [send(9)]
    first.submit(operations)
    assert first.close() == 0  # nothing lost: it all stays in the store
    assert first_hooks.of("dropped") == []
    assert waiting(path) == 41
    emulator.faults.clear()
    second = make_engine(emulator, second_hooks)
    assert second.flush(10)
    assert len(second_hooks.of("delivered")) == 41
    assert {op.id for op in second_hooks.of("delivered")} == {op.id for op in operations}
    assert len(answered(emulator, TRACK)) == 20
    assert [r.body["idempotency_key"] for r in answered(emulator, TRIGGER)] == ["s9"]
    assert len(emulator.sends()) == 1


def test_closing_at_once_keeps_what_was_just_handed_over(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.submit([upsert(n) for n in range(50)])
    assert engine.close(0) == 0  # stored for the next start, not lost
    assert hooks.outcomes == []
    assert waiting(path) == 50


def test_a_writing_process_closes_without_waiting_for_its_work_to_be_delivered(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The process delivering for the host (here, the test) delivers it when it can.
    caplog.set_level(logging.INFO, logger="flask_meisa.engine")
    engine = make_engine(emulator, RecordingHooks())
    engine.submit([upsert(n) for n in range(5)])
    assert eventually(lambda: waiting(path) == 5)  # nothing left in its memory
    closing = threading.Thread(target=engine.close, args=(60.0,), daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive()
    assert waiting(path) == 5
    assert "stay in the store" not in caplog.text  # not left for the next start


def test_coalescing_and_order_hold_across_a_restart(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    emulator.faults.outage(60)
    first = make_engine(emulator, RecordingHooks(), flush_timeout=0)
    first.submit([upsert(1, a=1), track(1, "first"), upsert(1, b=2), track(1, "second")])
    assert first.close() == 0
    assert waiting(path) == 3
    emulator.faults.clear()
    emulator.clear_requests()
    second = make_engine(emulator, RecordingHooks())
    assert second.flush(5)
    assert seen(emulator) == [(UPSERT, 201), (TRACK, 200), (TRACK, 200)]
    assert emulator.requests[0].body["custom_fields"] == {"tag": "t", "a": 1, "b": 2}
    assert [r.body["event_name"] for r in emulator.requests[1:]] == ["first", "second"]
    assert second.status().delivered == 4


def test_an_upsert_merges_into_its_contacts_stored_row_while_it_waits(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.submit([upsert(1, a=1)])
    assert eventually(lambda: waiting(path) == 1)
    engine.submit([upsert(1, b=2)])
    engine.submit([upsert(2)])
    assert eventually(lambda: waiting(path) == 2)
    rows = query(path, "SELECT payload, merged FROM meisa_ops ORDER BY seq")
    assert [merged for _, merged in rows] == [2, 1]
    assert '"a":1' in rows[0][0] and '"b":2' in rows[0][0]
    lock.release()  # the engine takes over and delivers
    assert engine.flush(5)
    assert [r.body["custom_fields"] for r in answered(emulator, UPSERT)] == [
        {"tag": "t", "a": 1, "b": 2},
        {"tag": "t"},
    ]
    assert engine.status().delivered == 3


def test_sends_are_delivered_first_behind_a_backlog(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    for n in range(5):
        engine.submit([upsert(n), track(n)])
    engine.submit([send(1)])
    assert eventually(lambda: waiting(path) == 11)
    lock.release()
    assert engine.flush(5)
    assert seen(emulator)[0] == (TRIGGER, 200)
    assert len(hooks.of("delivered")) == 11


def test_refused_operations_become_dead_letters_without_payload_values(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    bad = send(1, trigger="no_such_trigger")
    engine.submit([bad, upsert(3)])
    assert engine.flush(5)
    assert [op.id for op in hooks.of("failed")] == [bad.id]
    (letter,) = letters(path)
    assert (letter.status, letter.code, letter.operation.attempts) == (400, "invalid_trigger", 1)
    assert letter.operation == Operation(
        "send", bad.payload, id=bad.id, created_at=bad.created_at, attempts=1
    )  # kept whole, idempotency key too
    errors = query(path, "SELECT error_status, error_code, error_message FROM meisa_ops")
    assert "buyer1" not in repr(errors)
    status = engine.status()
    assert (status.dead_letters, status.failed, status.delivered, status.pending) == (1, 1, 1, 0)


def test_a_send_retried_after_meisa_forgot_its_idempotency_key_fails_without_a_call(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The first attempt reached Meisa, its answer was lost; the host then stayed down for
    # over an hour, so Meisa has forgotten the idempotency key: a call now sends it twice.
    emulator.faults.drop_next(1, path=TRIGGER, after=True)
    engine = make_engine(emulator, RecordingHooks(), retry=SLOW)
    operation = send(1)
    engine.submit([operation])
    retrying = "SELECT count(*) FROM meisa_ops WHERE state = 'pending' AND attempts = 1"
    assert eventually(lambda: query(path, retrying)[0][0] == 1)
    engine.close(0)
    assert len(emulator.sends()) == 1
    emulator.advance_clock(3700.0)
    store = Store(path)
    with store.write() as db:
        db.execute("UPDATE meisa_ops SET first_attempt = first_attempt - 3700, ready_at = 0")
    store.close()
    hooks = RecordingHooks()
    assert make_engine(emulator, hooks, retry=SLOW).flush(5)
    assert len(emulator.sends()) == 1
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert [op.id for op in hooks.of("failed")] == [operation.id]
    assert isinstance(hooks.detail(hooks.of("failed")[0]), DeliveryError)
    (letter,) = letters(path)
    assert letter.operation.id == operation.id  # kept: retrying it is the user's choice


def test_work_released_for_another_meisa_waits_as_dead_letters_not_delivered_here(
    emulator: Emulator, make_engine: MakeEngine, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The instance folder kept work released for another Meisa (the emulator in
    # development, a test key): delivered here, test data could email real people.
    elsewhere = build_engine(
        RecordingHooks(), "http://127.0.0.1:9/api/v1", emulator.live_key, store=Store(path)
    )
    elsewhere.submit([upsert(n) for n in range(3)])
    assert eventually(lambda: waiting(path) == 3)
    elsewhere.close(0)
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.start()
    assert eventually(lambda: engine.status().dead_letters == 3)
    assert engine.flush(5) and emulator.requests_to(UPSERT) == []
    messages = {letter.message for letter in letters(path)}
    assert messages == {"released for http://127.0.0.1:9/api/v1 with a live key"}

    def said() -> list[str]:  # by the writer's thread, once it committed the dead letters
        return [r.getMessage() for r in caplog.records if "for another Meisa" in r.getMessage()]

    assert eventually(lambda: bool(said()))
    with engine.store.write() as db:  # the user's choice: flask meisa dead-letters retry
        assert dead.requeue(db) == 3
    assert engine.flush(5)
    assert len(emulator.requests_to(UPSERT)) == 3
    # Said once, by the process that found them (not by the first to use the file).
    assert len(said()) == 1 and said()[0].startswith("flask-meisa: 3 operations released")


def test_work_released_after_a_switch_to_another_meisa_goes_to_it_in_full(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The folder's store last served a test key (staging); this start has the live key.
    staging = build_engine(RecordingHooks(), emulator.url, emulator.test_key, store=Store(path))
    staging.submit([upsert(1)])
    assert staging.flush(5)
    staging.close(0)
    engine = make_engine(emulator, RecordingHooks())
    engine.submit([upsert(1), upsert(2)])  # before the engine's first pass
    assert engine.flush(5)
    # Neither set aside as released for the test key, nor taken as known to live Meisa.
    assert letters(path) == []
    live = sorted(contact["email"] for contact in emulator.contacts("live"))
    assert live == ["user1@example.com", "user2@example.com"]


def test_work_for_another_meisa_waits_while_the_store_is_delivered_for_its_own(
    emulator: Emulator, make_engine: MakeEngine, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A live process delivers from the store; one beside it has a test key (a test run
    # next to the server, workers of a reload that goes live): its work must not be
    # stored there, where the live process would send it with the live key.
    live = make_engine(emulator, RecordingHooks())
    live.submit([upsert(1)])
    assert live.flush(5) and live.is_holder
    staging = build_engine(RecordingHooks(), emulator.url, emulator.test_key, store=Store(path))
    try:
        staging.submit([upsert(2)])
        assert not staging.flush(0.5)
        assert "give each Meisa a MEISA_OUTBOX of its own" in caplog.text
        live.submit([upsert(3)])
        assert live.flush(5)
        assert sorted(c["email"] for c in emulator.contacts("live")) == [
            "user1@example.com",
            "user3@example.com",
        ]
        live.close(0)  # the test process takes delivery over, and stores its own work
        assert staging.flush(5) and staging.is_holder
        assert [c["email"] for c in emulator.contacts("test")] == ["user2@example.com"]
        assert len(emulator.contacts("live")) == 2
    finally:
        staging.close(0)


def test_work_stored_before_any_process_delivered_is_not_sent_to_another_meisa(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    # A fresh store, whose first delivering process is still starting (the test holds the
    # lock): a process with a test key stores its work first, and stops. The live process
    # then takes delivery over: the test key's work must not reach live Meisa.
    staging = build_engine(RecordingHooks(), emulator.url, emulator.test_key, store=Store(path))
    staging.submit([upsert(1)])
    assert eventually(lambda: waiting(path) == 1)
    staging.close(0)
    lock.release()
    live = make_engine(emulator, RecordingHooks())
    live.submit([upsert(2)])
    assert live.flush(5) and live.is_holder
    assert [c["email"] for c in emulator.contacts("live")] == ["user2@example.com"]
    assert [(letter.code, letter.operation.payload["email"]) for letter in letters(path)] == [
        ("other_meisa", "user1@example.com")
    ]


def test_a_send_salvaged_from_a_damaged_store_keeps_the_time_of_its_first_attempt(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # As above, but the store was found damaged at the restart: what was salvaged from it
    # still knows when the send was first attempted (and so that Meisa forgot its key).
    emulator.faults.drop_next(1, path=TRIGGER, after=True)
    engine = make_engine(emulator, RecordingHooks(), retry=SLOW)
    engine.submit([send(1)])
    retrying = "SELECT count(*) FROM meisa_ops WHERE state = 'pending' AND attempts = 1"
    assert eventually(lambda: query(path, retrying)[0][0] == 1)
    engine.close(0)
    emulator.advance_clock(3700.0)
    store = Store(path)
    with store.write() as db:
        db.execute("UPDATE meisa_ops SET first_attempt = first_attempt - 3700, ready_at = 0")
    store.close()
    set_aside(store, sqlite3.DatabaseError("malformed"))
    store.close()
    assert make_engine(emulator, RecordingHooks(), retry=SLOW).flush(5)
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert len(emulator.sends()) == 1


def test_running_out_of_retries_makes_a_dead_letter(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    emulator.faults.outage(60)
    hooks = RecordingHooks()
    retry = RetryPolicy(max_attempts=None, base_delay=0.01, max_delay=0.05, deadline=0.5)
    engine = make_engine(emulator, hooks, retry=retry)
    operation = upsert(1)
    engine.submit([operation])
    assert engine.flush(10)  # a dead letter is finished
    (letter,) = letters(path)
    assert (letter.status, letter.code) == (503, "service_unavailable")
    assert letter.operation.attempts >= 2 and letter.operation.id == operation.id
    assert [op.id for op in hooks.of("failed")] == [operation.id]
    assert hooks.detail(hooks.of("failed")[0]).status == 503


def test_dead_letters_are_requeued_and_purged_from_another_process(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.submit([send(n, trigger="launch_day") for n in range(3)])  # not configured: 400
    assert engine.flush(5)
    buried = letters(path)
    assert [letter.code for letter in buried] == ["invalid_trigger"] * 3
    emulator.add_trigger("launch_day")
    other = Store(path)  # e.g. the CLI
    try:
        with other.write() as db:
            assert dead.requeue(db, [buried[0].seq]) == 1
        assert engine.flush(5)
        assert [s["to_email"] for s in emulator.sends()] == ["buyer0@example.com"]
        with other.write() as db:
            assert dead.purge(db, [buried[1].seq, buried[0].seq]) == 1  # only dead ones go
            assert [letter.seq for letter in dead.dead_letters(db)] == [buried[2].seq]
            assert dead.requeue(db, [buried[1].seq]) == 0
            assert dead.purge(db) == 1
            assert dead.dead_letters(db) == []
    finally:
        other.close()
    assert engine.status().dead_letters == 0


def test_a_requeued_event_may_recover_its_contact_again(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # Answered 404 twice: its contact was upserted once, then it failed. Requeued later,
    # it starts afresh: a 404 leads to its contact's upsert again, not straight back.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    contact = {"email": "ada@example.com", "external_id": "u1"}
    event = Operation("track", {"event_name": "x", "external_id": "u1"}, contact=contact)
    emulator.faults.fail_next(2, status=404, path=TRACK)
    engine.submit([event])
    assert engine.flush(5)
    assert seen(emulator) == [(TRACK, 404), (UPSERT, 201), (TRACK, 404)]
    assert [op.id for op in hooks.of("failed")] == [event.id]
    emulator.clear_requests()
    emulator.faults.fail_next(1, status=404, path=TRACK)
    with engine.store.write() as db:
        assert dead.requeue(db) == 1
    assert engine.flush(5)
    assert seen(emulator) == [(TRACK, 404), (UPSERT, 200), (TRACK, 200)]
    assert [op.id for op in hooks.of("delivered")] == [event.id]


def test_a_flush_waits_for_the_hooks_of_a_call_that_ends_while_it_looks(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # A flush adds the work reporting in memory to the work the store holds: a call that
    # ends between the two looks must not seem over before its hooks ran.
    hooks = RecordingHooks()
    entered, release = hooks.hold("delivered")
    emulator.faults.set(latency=0.3)
    engine = make_engine(emulator, hooks)
    engine.submit([upsert(1)])
    flying = "SELECT count(*) FROM meisa_ops WHERE state = 'flight'"
    assert eventually(lambda: query(path, flying)[0][0] == 1)
    read, reads = engine.store.read, []

    @contextlib.contextmanager
    def read_once_the_hook_started() -> Iterator[sqlite3.Connection]:
        if threading.current_thread() is threading.main_thread():
            reads.append(1)
            if len(reads) == 2:  # the flush's look at the store: the call ends meanwhile
                assert entered.wait(5)
        with read() as db:
            yield db

    engine.store.read = read_once_the_hook_started  # type: ignore[method-assign]
    assert not engine.flush(0.5)  # the hook still runs
    release.set()
    assert engine.flush(5)
    assert len(hooks.of("delivered")) == 1


def test_a_flush_in_a_process_that_keeps_handing_work_over_waits_only_for_earlier_work(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    # Steady load: each of the writer's passes finds new work handed over while it wrote,
    # so memory is never empty when a flush looks. Work handed over after the flush began
    # does not hold the flush back.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    loaded, more = threading.Event(), iter(range(1, 100_000))
    write = engine.store.write

    @contextlib.contextmanager
    def write_while_more_comes() -> Iterator[sqlite3.Connection]:
        if loaded.is_set() and threading.current_thread().name == "flask-meisa-writer":
            engine.submit([upsert(next(more), tag="later")])
        with write() as db:
            yield db

    engine.store.write = write_while_more_comes  # type: ignore[method-assign]
    first = upsert(0)
    engine.submit([first])
    loaded.set()
    try:
        assert engine.flush(5)
    finally:
        loaded.clear()
    assert first.id in [op.id for op in hooks.of("delivered")]
    assert engine._unstored()  # later work was still in memory: the load was real


def test_a_flush_waits_for_no_later_work_given_the_seq_of_a_row_over_since(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    # Each delivered hook hands the next operation over, stored before it returns: the
    # store is empty then, and SQLite gives the new row the seq of the row just over (the
    # largest rowid is reused). That later work does not hold the flush back.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    chained, more = threading.Event(), iter(range(1, 100_000))
    store_batch, stored = engine._store_batch, threading.Event()

    def store_and_say(batch: list[Operation]) -> tuple[int, list[Any]]:
        done = store_batch(batch)
        stored.set()
        return done

    engine._store_batch = store_and_say  # type: ignore[method-assign]
    delivered, given = hooks.delivered, []

    def delivered_then_more(operation: Operation, result: Any) -> None:
        delivered(operation, result)
        if chained.is_set():
            stored.clear()
            later = upsert(next(more), tag="later")
            engine.submit([later])
            assert stored.wait(5)
            given.append(query(path, "SELECT seq FROM meisa_ops WHERE id = ?", later.id))

    hooks.delivered = delivered_then_more  # type: ignore[method-assign]
    first = upsert(0)
    engine.submit([first])
    assert eventually(lambda: waiting(path) == 1)  # the test holds the delivery lock
    seq = query(path, "SELECT seq FROM meisa_ops")
    read, reads = engine.store.read, []

    @contextlib.contextmanager
    def read_then_deliver() -> Iterator[sqlite3.Connection]:
        with read() as db:
            yield db
        if threading.current_thread() is threading.main_thread():
            reads.append(1)
            if len(reads) == 1:  # the flush read what it waits for: delivery may start
                lock.release()

    engine.store.read = read_then_deliver  # type: ignore[method-assign]
    chained.set()
    try:
        assert engine.flush(5)
    finally:
        chained.clear()
    assert hooks.of("delivered")[0].id == first.id
    assert given[0] == seq  # the later work came, given the seq of the first


def test_a_flush_waits_for_work_another_process_carried_out_of_the_file_it_reads(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    # The store is deleted while a flush looks: another process follows first, and moves
    # the rows out of the file this one still has open into the file now at the path.
    # That work is not over because the file this process reads is empty.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    first = upsert(1)
    engine.submit([first])
    assert eventually(lambda: waiting(path) == 1)  # the test holds the delivery lock
    other = Store(path)  # another process of the host
    other.data_version()  # its connection is open
    behind = threading.Event()  # this process's writer has not seen the move yet
    moved = engine.store.moved

    def moved_unless_behind(*, link: bool = False) -> bool:
        if behind.is_set() and threading.current_thread().name == "flask-meisa-writer":
            return False
        return moved(link=link)

    engine.store.moved = moved_unless_behind  # type: ignore[method-assign]
    read, reads = engine.store.read, []

    @contextlib.contextmanager
    def read_then_move() -> Iterator[sqlite3.Connection]:
        with read() as db:
            yield db
        if threading.current_thread() is threading.main_thread():
            reads.append(1)
            if len(reads) == 1:  # the flush read what it waits for
                for end in ("", "-wal", "-shm"):
                    Path(f"{path}{end}").unlink()
                assert other.follow() == 1

    engine.store.read = read_then_move  # type: ignore[method-assign]
    behind.set()
    try:
        assert not engine.flush(0.3)  # the upsert waits in the file now at the path
    finally:
        behind.clear()
        other.close()
    engine.store.read = read  # type: ignore[method-assign]
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    lock.release()
    assert engine.flush(5)
    assert [op.id for op in hooks.of("delivered")] == [first.id]


def test_one_engine_per_file_delivers_and_takes_the_others_rows(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    holder_hooks, writer_hooks = RecordingHooks(), RecordingHooks()
    holder = make_engine(emulator, holder_hooks)
    holder.submit([upsert(0, tag="h")])
    assert holder.flush(5)
    writer = make_engine(emulator, writer_hooks)  # another process's engine on the file
    writer.submit([upsert(n, tag="w") for n in range(10)])
    assert writer.flush(5)  # the holder delivered them
    assert holder.flush(5)  # and its hooks ran
    assert [holder.is_holder, writer.is_holder] == [True, False]
    assert writer_hooks.outcomes == []
    assert len(holder_hooks.of("delivered")) == 11
    assert writer.status().delivered == 11
    # The holder leaves; the writer takes over and delivers what comes next.
    holder.close()
    writer.submit([upsert(99, tag="w")])
    assert writer.flush(5)
    assert writer.is_holder
    assert [op.payload["external_id"] for op in writer_hooks.of("delivered")] == ["w-99"]


def test_a_call_outliving_its_engines_close_never_settles_a_row_taken_back_since(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    called, go_on = threading.Event(), threading.Event()
    late_hooks, hooks = RecordingHooks(), RecordingHooks()

    def stall(operation: Operation) -> None:  # the call is under way, and slow
        called.set()
        go_on.wait(30)

    late_hooks.skip = stall
    late = make_engine(emulator, late_hooks)
    late.submit([upsert(1)])
    assert called.wait(5)
    late.close(timeout=0)  # its call outlives the allowance; the next engine takes it back
    taking_over = make_engine(emulator, hooks)
    taking_over.start()
    assert taking_over.flush(10)
    assert len(hooks.of("delivered")) == 1
    go_on.set()
    for thread in late._threads:
        thread.join(10)
    # The late call's answer is not its to settle: the row is counted once, reported once.
    assert late_hooks.outcomes == []
    assert taking_over.status().delivered == 1


def test_a_call_outliving_its_engines_close_never_settles_a_newer_row_given_its_seq(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The row taken back is delivered and deleted; the next operation stored gets its seq
    # (SQLite reuses the largest rowid) and, on its first attempt, is in flight with the
    # same attempts when the late call answers: the late call settled the newer row.
    called, go_on = threading.Event(), threading.Event()
    newer_called, newer_go_on = threading.Event(), threading.Event()
    late_hooks, hooks = RecordingHooks(), RecordingHooks()

    def stall(operation: Operation) -> None:
        called.set()
        go_on.wait(30)

    def stall_newer(operation: Operation) -> None:
        if operation.payload["external_id"] == "t-2":
            newer_called.set()
            newer_go_on.wait(30)

    late_hooks.skip = stall
    late = make_engine(emulator, late_hooks)
    late.submit([upsert(1)])
    assert called.wait(5)
    late.close(timeout=0)
    taking_over = make_engine(emulator, hooks)
    taking_over.start()
    assert taking_over.flush(10)
    hooks.skip = stall_newer
    taking_over.submit([upsert(2)])
    assert newer_called.wait(5)
    go_on.set()
    for thread in late._threads:
        thread.join(10)
    newer_go_on.set()
    assert taking_over.flush(10)
    assert late_hooks.outcomes == []
    delivered = [op.payload["external_id"] for op in hooks.of("delivered")]
    assert delivered == ["t-1", "t-2"]
    assert taking_over.status().delivered == 2


def test_a_send_after_close_is_refused(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.submit([upsert(0)])
    assert engine.flush(5)
    engine.close()
    with pytest.raises(DeliveryError, match="closed"):
        engine.submit([send(1)])
    with pytest.raises(EngineClosed, match="closed"):
        engine.submit([upsert(1)])
    assert hooks.of("dropped") == []
    assert query(path, "SELECT count(*) FROM meisa_ops") == [(0,)]
    assert len(emulator.requests) == 1


# -- a store whose writes fail ---------------------------------------------------------


def _full(store: Store, path: Path) -> Callable[[], None]:
    """The disk is full: the store's connection may not grow the file."""
    with store.read() as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")

    def mend() -> None:
        with store.read() as db:
            db.execute("PRAGMA max_page_count = 1073741823")

    return mend


def _read_only(store: Store, path: Path) -> Callable[[], None]:
    """The file can be read, not written."""
    with store.read() as db:
        db.execute("PRAGMA query_only = 1")

    def mend() -> None:
        with store.read() as db:
            db.execute("PRAGMA query_only = 0")

    return mend


def _locked(store: Store, path: Path) -> Callable[[], None]:
    """Another process holds the write lock longer than the store waits for it."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    def mend() -> None:
        other.execute("COMMIT")
        other.close()

    return mend


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "store failed" in r.getMessage()]


@pytest.mark.parametrize(
    "fault", [_full, _read_only, _locked], ids=["full", "read-only", "locked"]
)
def test_operations_wait_in_memory_while_the_store_fails_and_are_stored_after(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
    fault: Callable[[Store, Path], Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    store = Store(path, busy_timeout=0.05)
    engine = make_engine(emulator, hooks, store=store)
    engine.submit([upsert(0)])
    assert eventually(lambda: waiting(path) == 1)
    mend = fault(store, path)
    try:
        engine.submit([upsert(n, note="x" * 5000) for n in range(1, 11)])
        assert eventually(lambda: len(failures(caplog)) == 1)
        assert engine.flush(0.3) is False  # the writer tries again and again meanwhile
        assert len(failures(caplog)) == 1  # once per run of failures, not once per attempt
        assert "example.com" not in failures(caplog)[0]
        status = engine.status()  # the rest waits in this process's memory, counted
        assert (status.pending, status.queued["routine"]) == (11, 10)
        assert 0 < status.oldest_wait["routine"] < 60  # since it was handed over
    finally:
        mend()
    lock.release()
    assert engine.flush(10)
    assert len(hooks.of("delivered")) == 11
    assert hooks.of("dropped") == []
    assert {r.body["external_id"] for r in answered(emulator, UPSERT)} == {
        f"t-{n}" for n in range(11)
    }
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_store_that_stays_unwritable_is_logged_once_not_said_to_work_between_failures(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The delivering process's threads fail each time they look for work (a full disk, a
    # write lock held): the writer thread's reads, which still work, prove nothing.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    engine = make_engine(emulator, RecordingHooks(), store=Store(path, busy_timeout=0.05))
    engine.start()
    assert eventually(lambda: engine.is_holder)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        assert eventually(lambda: len(failures(caplog)) == 1)
        # The delivery threads look again at least once a second.
        assert not eventually(lambda: "works again" in caplog.text, timeout=2.5)
        assert len(failures(caplog)) == 1
    finally:
        other.execute("COMMIT")
        other.close()
    engine.submit([upsert(1)])
    assert engine.flush(5)
    assert "works again" in caplog.text


def test_an_answer_that_comes_while_the_store_is_locked_is_kept_until_it_is_stored(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, store=Store(path, busy_timeout=0.05))
    emulator.faults.set(latency=0.5, paths=[UPSERT])
    engine.submit([upsert(1), track(1)])  # the event waits for its contact's upsert
    assert eventually(lambda: engine.status().in_flight == 1)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # held while Meisa answers, and a while after
    try:
        assert eventually(lambda: len(failures(caplog)) == 1)
    finally:
        other.execute("COMMIT")
        other.close()
    assert engine.flush(5), engine.status()
    assert len(emulator.requests_to(UPSERT)) == 1  # not made again
    assert len(answered(emulator, TRACK)) == 1
    assert len(hooks.of("delivered")) == 2


def test_memory_stays_bounded_while_the_store_takes_nothing(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    store = Store(path, busy_timeout=0.05)
    engine = make_engine(emulator, hooks, store=store, queue_size=5)
    engine.start()
    mend = _locked(store, path)
    try:
        engine.submit([upsert(99)])  # the store refuses it: memory is bounded from here on
        assert eventually(lambda: len(failures(caplog)) == 1)
        hooks.outcomes.clear()
        syncs = [upsert(n) for n in range(8)]
        resets = [send(n, "password_reset") for n in range(3)]
        engine.submit(syncs[:4] + resets + syncs[4:])
        # The oldest syncs go (the first one refused included); sends never do.
        dropped = sorted(op.id for op in hooks.of("dropped"))
        assert len(dropped) == 7 and set(op.id for op in syncs[:6]) <= set(dropped)
        assert {hooks.detail(op) for op in hooks.of("dropped")} == {"queue_full"}
        assert engine.status().dropped == 7
    finally:
        mend()
    lock.release()
    assert engine.flush(10)
    assert len(answered(emulator, "/emails/trigger/")) == 3
    assert {r.body["external_id"] for r in answered(emulator, UPSERT)} == {"t-6", "t-7"}
    assert sum("queue_full" in r.getMessage() for r in caplog.records) == 7


@pytest.mark.parametrize("stored", [False, True], ids=["refused", "stored-after-all"])
def test_memory_stays_bounded_while_the_writer_tries_the_failing_store(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
    stored: bool,
) -> None:
    # The writer holds upsert 1 while it waits up to a second for the store's write lock:
    # it counts against the bound, and is the oldest, so it goes first.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    store = Store(path, busy_timeout=1.0)
    engine = make_engine(emulator, hooks, store=store, queue_size=2)
    engine.start()
    mend = _locked(store, path)
    try:
        first = upsert(1)
        engine.submit([first])
        assert eventually(lambda: len(failures(caplog)) == 1)
        assert eventually(lambda: engine._writing == [first])  # trying again
        engine.submit([upsert(2), upsert(3), upsert(4)])
        assert engine._unstored() == 2
        if stored:  # the writer gets the lock: what it held is stored, not dropped here
            mend()
        assert hooks.wait_for("dropped", 2)
    finally:
        if not stored:
            mend()
    lock.release()
    assert engine.flush(10)  # nothing counted twice, nor left waiting for its report
    # Stored after all, upsert 1 was then the oldest of three rows, and the store shed it.
    assert {r.body["external_id"] for r in answered(emulator, UPSERT)} == {"t-3", "t-4"}
    dropped = sorted(op.payload["external_id"] for op in hooks.of("dropped"))
    assert dropped == ["t-1", "t-2"]
    assert {hooks.detail(op) for op in hooks.of("dropped")} == {"queue_full"}
    assert engine.status().dropped == 2
    held = [r.getMessage() for r in caplog.records if "the store takes nothing" in r.getMessage()]
    assert len(held) == (1 if stored else 2)


def test_a_close_while_the_writer_waits_for_a_locked_store_gives_up_on_what_it_holds(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The writer holds two events while it waits for a store another process keeps locked,
    # longer than the threads' allowance at a close: they are given up on with the rest,
    # each reported dropped and counted, not put back in memory after the close took it.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    store = Store(path, busy_timeout=3.0)
    engine = make_engine(emulator, hooks, store=store)
    engine.start()
    mend = _locked(store, path)
    try:
        held, later = [track(n) for n in range(2)], [track(n) for n in range(2, 5)]
        engine.submit(held)
        assert eventually(lambda: len(failures(caplog)) == 1, 10)
        assert eventually(lambda: engine._writing == held)  # trying again
        engine.submit(later)
        lost = engine.close(0.1)
    finally:
        mend()
    assert lost == 5
    assert sorted(op.id for op in hooks.of("dropped")) == sorted(op.id for op in held + later)
    assert {hooks.detail(op) for op in hooks.of("dropped")} == {"shutdown"}
    assert "5 operations were not delivered before shutdown" in caplog.text


def test_a_flush_waits_for_the_hooks_of_work_shed_from_memory_by_another_thread(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The test holds the delivery lock until the store works again: the writer is then the
    # only thread that writes, so the one that says the store failed (delivery threads
    # would say it too, and it is said once).
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    entered, release = hooks.hold("dropped")
    store = Store(path, busy_timeout=0.05)
    engine = make_engine(emulator, hooks, store=store, queue_size=1)
    engine.start()
    mend = _locked(store, path)
    submitting = threading.Thread(target=engine.submit, args=([upsert(2), upsert(3)],))
    said, go_on = threading.Event(), threading.Event()

    class HoldTheWriter(logging.Handler):  # as it says the store failed: upsert 1 waits
        def handle(self, record: logging.LogRecord) -> bool:  # without the handler's lock
            writer = threading.current_thread().name == "flask-meisa-writer"
            if writer and "store failed" in record.getMessage():
                said.set()
                go_on.wait(5)
            return True

    holding = HoldTheWriter()
    logging.getLogger("flask_meisa.engine").addHandler(holding)
    try:
        engine.submit([upsert(1)])
        assert said.wait(5)
        submitting.start()  # sheds the two oldest, and reports the first one
        assert entered.wait(5)
    finally:
        logging.getLogger("flask_meisa.engine").removeHandler(holding)
        go_on.set()
        mend()
    lock.release()
    try:
        assert hooks.wait_for("delivered", 1)  # the one kept
        assert not engine.flush(0.2)
    finally:
        release.set()
        submitting.join(5)
    assert engine.flush(5)
    assert len(hooks.of("dropped")) == 2


def test_what_the_store_never_took_is_reported_at_close(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    store = Store(path, busy_timeout=1.0)
    engine = make_engine(emulator, hooks, store=store)
    engine.start()
    mend = _locked(store, path)
    try:
        operations = [track(n) for n in range(3)]
        engine.submit(operations)
        assert eventually(lambda: len(failures(caplog)) == 1)
        assert not engine.flush(0.3)  # the writer holds them, trying the store again
        assert engine.close(0) == 3
        writers = [t for t in threading.enumerate() if t.name == "flask-meisa-writer"]
        assert not any(t.is_alive() for t in writers)
    finally:
        mend()
    assert sorted(op.id for op in hooks.of("dropped")) == sorted(op.id for op in operations)
    assert {hooks.detail(op) for op in hooks.of("dropped")} == {"shutdown"}
    assert waiting(path) == 0
    said = [r.getMessage() for r in caplog.records if "shutdown" in r.getMessage()]
    assert said == [  # once, with why and what to do
        "flask-meisa: 3 operations were not delivered before shutdown: the delivery store "
        f"{path} refused them (database is locked): make it writable by this process (disk "
        "space, permissions, no other process holding its write lock), or set MEISA_OUTBOX "
        "to a file it can write"
    ]


def test_a_flush_during_close_waits_for_the_hooks_of_what_close_drops(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What close gives up on is over once its dropped hooks ran, not once close took it.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    entered, release = hooks.hold("dropped")
    store = Store(path, busy_timeout=0.05)
    engine = make_engine(emulator, hooks, store=store)
    engine.start()
    mend = _locked(store, path)
    closing = threading.Thread(target=engine.close, args=(0,))
    try:
        engine.submit([track(n) for n in range(2)])
        assert eventually(lambda: len(failures(caplog)) == 1)
        closing.start()
        assert entered.wait(5)  # close took them, and reports the first one
        assert not engine.flush(0.2)
    finally:
        release.set()
        closing.join(5)
        mend()
    assert len(hooks.of("dropped")) == 2


def test_a_flush_during_close_waits_for_the_hooks_of_what_close_takes_from_memory(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    # A store in memory: close takes what it holds out of it, then reports it dropped.
    hooks = RecordingHooks()
    entered, release = hooks.hold("dropped")
    emulator.faults.set(error_rate=1.0, error_statuses=[503])  # it waits to retry
    engine = make_engine(emulator, hooks, store=Store(None))
    engine.submit([track(n) for n in range(2)])
    assert eventually(lambda: len(emulator.requests_to(TRACK)) >= 2)
    closing = threading.Thread(target=engine.close, args=(0,))
    closing.start()
    try:
        assert entered.wait(5)  # close took them, and reports the first one
        assert not engine.flush(0.2)
    finally:
        release.set()
        closing.join(5)
    assert len(hooks.of("dropped")) == 2


def test_a_process_that_takes_the_lock_while_the_store_is_locked_still_delivers(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Taking over means handing back what an earlier process left in flight, a write: when
    # that write fails, the lock must not stay taken by a process that never delivers.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks = RecordingHooks()
    store = Store(path, busy_timeout=0.05)
    mend = _locked(store, path)
    try:
        engine = make_engine(emulator, hooks, store=store)
        engine.start()
        assert eventually(lambda: len(failures(caplog)) == 1)
    finally:
        mend()
    engine.submit([upsert(1)])
    assert engine.flush(5)
    assert [op.payload["external_id"] for op in hooks.of("delivered")] == ["t-1"]
    assert engine.is_holder


def test_a_process_that_takes_the_lock_back_delivers_with_its_threads_of_before(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    engine = make_engine(emulator, RecordingHooks(), workers=2)
    engine.start()
    assert eventually(lambda: engine.is_holder)
    # The lock file replaced by one another process holds; that process then stops.
    taken = HostLock(f"{path}.lock.new")
    assert taken.try_acquire()
    Path(taken.path).replace(f"{path}.lock")
    assert eventually(lambda: "this process stops delivering" in caplog.text)
    taken.release()
    assert eventually(lambda: engine.is_holder)
    engine.submit([upsert(1)])
    assert engine.flush(5)
    assert sorted(t.name for t in engine._threads) == [
        "flask-meisa-delivery-1",
        "flask-meisa-delivery-2",
        "flask-meisa-writer",
    ]


def test_a_writing_process_closes_when_its_store_can_no_longer_be_read(
    emulator: Emulator, make_engine: MakeEngine, tmp_path: Path
) -> None:
    folder = tmp_path / "gone"
    store = Store(folder / "store.sqlite3")
    engine = make_engine(emulator, RecordingHooks(), store=store)
    store.close()
    shutil.rmtree(folder)  # the next connection cannot be opened
    assert not engine.is_holder
    assert engine.close() == 0


# -- the host's status from another process --------------------------------------------


def test_the_status_seen_from_another_engine_is_the_hosts(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    slow = RetryPolicy(
        max_attempts=10, base_delay=60.0, max_delay=60.0, deadline=None, random=lambda: 1.0
    )
    holder = make_engine(emulator, hooks, rate_limit="3/hour", retry=slow)
    holder.submit([send(1, trigger="no_such_trigger")])  # call 1: a dead letter
    assert hooks.wait_for("failed", 1)
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    holder.submit([upsert(1)])  # call 2: waits a minute to retry
    assert emulator.wait_for_requests(2)
    assert eventually(lambda: holder.status().retry_waiting == 1)
    emulator.faults.set(latency=2.0, paths=[TRIGGER])
    holder.submit([send(2)])  # call 3: in flight for two seconds
    assert eventually(lambda: holder.status().in_flight == 1)
    with holder.store.write() as db:
        known.remember(db, {"external_id": "t-5", "custom_fields": {"tag": "t"}}, time.time())
    viewer = make_engine(emulator, RecordingHooks(), rate_limit="3/hour")  # another process
    viewer.submit(
        [
            send(3),
            track(4),
            upsert(5, seen=1),
            Operation("upsert", {"email": "b@example.com"}, priority="backfill"),
        ]
    )
    assert eventually(lambda: viewer.status().pending == 6)
    status = viewer.status()
    assert status.queued == {"transactional": 1, "automation": 1, "routine": 1, "backfill": 1}
    assert (status.in_flight, status.retry_waiting, status.dead_letters) == (1, 1, 1)
    assert (status.delivering_pid, status.durable, status.failed) == (os.getpid(), True, 1)
    assert status.budget_left == {"3/hour": 0}
    assert not viewer.is_holder
    assert eventually(lambda: holder.status().in_flight == 0, 10.0)


def put_a_newer_store_in_place(path: Path) -> None:
    """Replace the store's files with a store of a newer schema (a newer release's)."""
    newer = path.with_name("newer.sqlite3")
    Store(newer).close()
    with contextlib.closing(sqlite3.connect(newer)) as db:
        db.execute("PRAGMA user_version = 99")
    for end in ("-wal", "-shm"):
        Path(f"{path}{end}").unlink()
    newer.replace(path)


def test_a_store_file_this_version_cannot_follow_neither_floods_the_log_nor_stops_takeover(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A newer release's process made the store again (its schema is newer) while this
    # release's processes run: they cannot follow it, and carry on with the file they have.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    first = make_engine(emulator, RecordingHooks())
    first.start()
    assert eventually(lambda: first.is_holder)
    hooks = RecordingHooks()
    second = make_engine(emulator, hooks)
    second.start()
    put_a_newer_store_in_place(path)

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "newer flask-meisa" in r.getMessage()]

    assert eventually(lambda: len(said()) == 2)  # once by each process
    # The delivering process stops (a worker restarted): the other one takes over.
    first.close(timeout=0)
    assert eventually(lambda: second.is_holder)
    second.submit([upsert(1)])
    assert second.flush(5)
    assert len(hooks.of("delivered")) == 1
    assert len(said()) == 2


def test_an_idle_delivering_engine_writes_nothing_to_the_store(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    engine = make_engine(emulator, RecordingHooks())
    engine.submit([upsert(1)])
    assert engine.flush(5)
    watcher = sqlite3.connect(path, isolation_level=None)
    try:
        seen = watcher.execute("PRAGMA data_version").fetchone()[0]
        # Its delivery threads look for work at least once a second: a commit changing
        # nothing writes nothing (the disk of an idle host stays idle).
        assert not eventually(
            lambda: watcher.execute("PRAGMA data_version").fetchone()[0] != seen, timeout=2.5
        )
    finally:
        watcher.close()


def test_a_row_in_flight_in_the_file_that_replaced_the_store_is_delivered(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # A copy of the store taken while a call was in flight (a backup), put in place of
    # the store's files while the delivering process runs: nobody's call is in flight
    # on it, and its row waits again, as the rows of the file it had open do.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.start()
    assert eventually(lambda: engine.is_holder)
    copy = Store(path.with_name("copy.sqlite3"))
    with copy.write() as db:
        pending.add(db, upsert(1, plan="pro"), LANE_AUTOMATION)
        row = pending.next_ready(db, time.time())
        assert row is not None
        pending.take(db, row, time.time())
    copy.close()
    for end in ("-wal", "-shm"):
        Path(f"{path}{end}").unlink()
    path.with_name("copy.sqlite3").replace(path)
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    assert eventually(lambda: len(hooks.of("delivered")) == 1)  # at the holder's next call
    engine.submit([upsert(1, plan="free")])  # the user's next state
    assert engine.flush(5)
    plans = [r.body["custom_fields"]["plan"] for r in emulator.requests_to(UPSERT)]
    assert plans == ["pro", "free"]


def test_a_retry_carried_into_the_file_at_the_path_still_waits_its_turn(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    engine = make_engine(emulator, RecordingHooks(), retry=SLOW)
    engine.submit([upsert(1)])
    assert eventually(lambda: engine.status().retry_waiting == 1)
    for end in ("", "-wal", "-shm"):  # the store deleted (a deploy script)
        Path(f"{path}{end}").unlink()
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    # Meisa asked for time: the carried row waits its minute, as it did in the old file.
    assert engine.status().retry_waiting == 1
    assert not emulator.wait_for_requests(2, timeout=1.0)


def _file_in_place_of(folder: Path, away: Path) -> None:
    """Move ``folder`` to ``away`` and put a file where it was (the engine, following its
    store, may make the folder again in between: moved away too)."""
    folder.rename(away)
    for again in itertools.count(1):
        try:
            folder.write_text("")
            return
        except IsADirectoryError:
            folder.rename(away.with_name(f"{away.name} {again}"))


def test_a_lock_file_that_cannot_be_made_again_is_said_once_not_as_the_store_failing(
    emulator: Emulator,
    make_engine: MakeEngine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    instance = tmp_path / "instance"
    engine = make_engine(emulator, RecordingHooks(), store=Store(instance / "store.sqlite3"))
    engine.start()
    assert eventually(lambda: engine.is_holder)
    # The folder gone (moved away whole: the engine may be writing in it), and a file put
    # where it was: neither the store nor its lock can be made again, while the file the
    # process has open takes its work.
    _file_in_place_of(instance, tmp_path / "gone")
    assert eventually(lambda: "cannot move to the file now there" in caplog.text)
    assert eventually(lambda: "delivery lock" in caplog.text)
    for n in range(5):
        engine.submit([upsert(n)])
        assert engine.flush(5)
    assert engine.is_holder
    assert "works again" not in caplog.text, caplog.text
    assert "delivers on with the one it holds" in caplog.text
    # The folder made again, then gone again: said again.
    instance.unlink()
    instance.mkdir()
    assert eventually(lambda: "locked the new file and delivers on" in caplog.text)
    _file_in_place_of(instance, tmp_path / "gone again")
    assert eventually(lambda: caplog.text.count("delivers on with the one it holds") == 2)


def test_a_file_at_the_store_path_that_cannot_be_used_is_tried_again_once_it_changes(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A store of a newer schema put in place of the store (a backup restored): each try
    # to move to it reads the whole file, so it is not tried at every pass of the writer.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    engine = make_engine(emulator, RecordingHooks())
    engine.start()
    assert eventually(lambda: engine.is_holder)
    checks, check, looked = [], engine.store.check, threading.Semaphore(0)
    moved = engine.store.moved

    def counted_check() -> None:
        checks.append(1)
        check()

    def counted_moved(*, link: bool = False) -> bool:
        looked.release()
        return moved(link=link)

    engine.store.check = counted_check  # type: ignore[method-assign]
    engine.store.moved = counted_moved  # type: ignore[method-assign]
    put_a_newer_store_in_place(path)
    assert eventually(lambda: "cannot move to the file now there" in caplog.text)
    while looked.acquire(blocking=False):  # passes before that
        pass
    for _ in range(5):  # five more passes of the writer
        assert looked.acquire(timeout=5)
    assert len(checks) == 1
    engine.submit([upsert(1)])
    assert engine.flush(5)  # the file it has open takes its work meanwhile
    # The file there changes (a copy with the user_version put back, renamed into place in
    # one step from another folder: the writer sees one change): moved to at the next pass.
    fixed = tmp_path_factory.mktemp("fixed") / path.name
    shutil.copy(path, fixed)
    with contextlib.closing(sqlite3.connect(fixed)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    fixed.replace(path)
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    assert len(checks) == 2
    engine.submit([upsert(2)])
    assert engine.flush(5)
    assert len(emulator.requests_to(UPSERT)) == 2
    put_a_newer_store_in_place(path)  # and again (another restore): said again
    assert eventually(lambda: caplog.text.count("cannot move to the file now there") == 2)


def test_a_deleted_lock_file_is_locked_again_by_the_process_that_held_it(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another process that locked the new file first would take back the rows in flight
    # of the one still delivering (calls it makes: two calls for one row).
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    holder = make_engine(emulator, RecordingHooks(), poll_interval=0.5)
    holder.start()
    assert eventually(lambda: holder.is_holder)
    other = make_engine(emulator, RecordingHooks())  # looks more often than the holder
    other.start()
    waiting = other._host_lock
    assert waiting is not None
    assert eventually(lambda: waiting._fd is not None)  # it tried the file, held by the holder
    Path(f"{path}.lock").unlink()
    assert eventually(lambda: "locked the new file and delivers on" in caplog.text), caplog.text
    assert holder.is_holder and not other.is_holder
    # Once it stops, the process that had the deleted file open takes over.
    holder.close(timeout=0)
    assert eventually(lambda: other.is_holder)


def test_work_carried_into_a_file_whose_clock_note_is_ahead_keeps_its_times(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The file put in place of the store noted a time an hour ahead of the host's clock
    # (copied before the clock was set back, or from a host whose clock is fast): its own
    # times move back by the hour, those of the work carried into it do not.
    emulator.faults.fail_next(1, status=503, path=TRIGGER)
    slow = RetryPolicy(base_delay=2.0, max_delay=2.0, deadline=None, random=lambda: 0.999)
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, retry=slow)
    engine.submit([send(1)])
    assert eventually(lambda: engine.status().retry_waiting == 1)
    copy = Store(path.with_name("copy.sqlite3"))
    with copy.write() as db:
        Store.set_meta(db, "clock", time.time() + 3600.0)
    copy.close()
    for end in ("-wal", "-shm"):
        Path(f"{path}{end}").unlink()
    path.with_name("copy.sqlite3").replace(path)
    assert engine.flush(10)
    assert [op.kind for op in hooks.of("delivered")] == ["send"], hooks.of("failed")


def test_work_in_both_a_restored_copy_and_the_file_it_replaced_is_delivered_once(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    emulator.faults.outage(600)  # nothing is delivered: everything waits in the store
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.submit([track(n) for n in range(3)])
    assert eventually(lambda: len(emulator.requests_to(TRACK)) == 3)  # all tried once
    # A backup of the store (sqlite3's online backup), restored over it while it runs.
    copy = sqlite3.connect(path.with_name("copy.sqlite3"))
    source = sqlite3.connect(path)
    source.backup(copy)
    source.close()
    copy.close()
    for end in ("-wal", "-shm"):
        Path(f"{path}{end}").unlink()
    path.with_name("copy.sqlite3").replace(path)
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    emulator.faults.clear()
    emulator.clear_requests()
    assert engine.flush(10)
    assert len(emulator.requests_to(TRACK)) == 3


def test_meisas_pause_and_the_backfill_run_are_carried_into_the_file_at_the_path(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    emulator.faults.force_429(1, retry_after=60, path=UPSERT)
    engine = make_engine(emulator, RecordingHooks(), rate_limit="60/minute")
    engine.submit([upsert(1)])
    assert eventually(lambda: engine.status().paused_for > 50)
    run = {"started_at": time.time(), "position": 400, "max_share": 0.1}
    with engine.store.write() as db:  # a 'flask meisa sync-users --max-share 0.1' going on
        Store.set_meta(db, "backfill", run)
    for end in ("", "-wal", "-shm"):  # the store deleted (a deploy script)
        Path(f"{path}{end}").unlink()
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    status = engine.status()
    assert status.paused_for > 50  # Meisa asked for a minute: no call before
    assert status.backfill == {**run, "refused_upserts": 0}  # none of its upserts refused
    assert len(emulator.requests_to(UPSERT)) == 1


def test_work_one_process_carried_out_of_a_deleted_store_is_not_carried_again_by_another(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    other = Store(path)  # another process of the host, with the file open
    emulator.faults.outage(600)  # nothing is delivered: everything waits in the store
    engine = make_engine(emulator, RecordingHooks())
    engine.submit([track(n) for n in range(3)])
    assert eventually(lambda: len(emulator.requests_to(TRACK)) == 3)
    for end in ("", "-wal", "-shm"):  # the store deleted (a deploy script)
        Path(f"{path}{end}").unlink()
    assert eventually(lambda: uses_the_file_now_there(engine.store))
    emulator.faults.clear()
    emulator.clear_requests()
    assert engine.flush(10)
    assert other.moved() and other.follow() == 0  # the old file has nothing left
    other.close()
    assert engine.flush(5)
    assert len(emulator.requests_to(TRACK)) == 3  # each tried once more, not twice


@pytest.mark.parametrize("kind", ["track", "send"])
@pytest.mark.parametrize("first", ["this process", "another process", "answered first"])
def test_a_call_under_way_as_the_store_file_is_deleted_is_made_once(
    emulator: Emulator, make_engine: MakeEngine, path: Path, kind: str, first: str
) -> None:
    # The store is deleted (a deploy's 'rm instance/meisa*') while the delivering process
    # makes a call. Whichever process moves the rows into the file now at the path first,
    # and whether the call is answered before the delivering process looks at the path,
    # the row stays in flight there and the call's answer settles it: it was made again
    # (an event tracked twice, Meisa does not deduplicate them; a send called twice).
    # Answered first: this process's writer looks at the path only every 30 s.
    poll_interval = 30 if first == "answered first" else 0.02
    other = Store(path)  # another process of the host, with the file open
    other.data_version()
    operation = track(1) if kind == "track" else send(1)
    engine, hooks, go_on = call_under_way(
        emulator, make_engine, operation, poll_interval=poll_interval
    )
    # This process holds its store: it follows once every file is gone (one made again
    # meanwhile would lose its -wal), and after the other process when that one is first.
    with engine.store.read():
        for end in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{end}").unlink()
        if first != "this process":
            assert other.moved() and other.follow() == 1
    if first != "answered first":
        assert eventually(lambda: uses_the_file_now_there(engine.store))
    if first == "this process":
        assert other.moved() and other.follow() == 0  # this process moved the row
    go_on.set()
    try:
        assert engine.flush(10)
    finally:
        other.close()
    calls = emulator.requests_to(TRACK if kind == "track" else TRIGGER)
    print(f"{kind}: {len(calls)} calls, {len(hooks.of('delivered'))} delivered")
    assert len(calls) == 1
    assert len(hooks.of("delivered")) == 2 and engine.status().delivered == 2
    if kind == "send":
        assert len(emulator.sends()) == 1
    else:
        assert len(emulator.events(event_name="clicked")) == 1
    assert waiting(path) == 0 and not engine.store.moved()


def killed_in_a_call_then_deleted(path: Path) -> Store:
    """A process took upsert 1 (in flight) and was killed; the store's files were then
    deleted. Returns another process's store, which had the old file open."""
    with contextlib.closing(Store(path)) as killed:
        with killed.write() as db:
            pending.add(db, upsert(1), LANE_AUTOMATION)
            row = pending.next_ready(db, time.time())
            assert row is not None
            pending.take(db, row, time.time())
        other = Store(path)
        other.data_version()
        for end in ("", "-wal", "-shm"):
            Path(f"{path}{end}").unlink()
    return other


def test_a_row_in_flight_whose_caller_is_gone_is_made_again_in_the_file_now_there(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    # The delivering process took a row and was killed (its lock released by the kernel);
    # the store was deleted meanwhile, and another process moved its rows into the file
    # now there. The process that takes delivery over makes the call again.
    other = killed_in_a_call_then_deleted(path)
    assert other.moved() and other.follow() == 1
    other.close()
    lock.release()  # the kernel's, as the killed process goes
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.start()
    assert engine.flush(10)
    assert len(emulator.requests_to(UPSERT)) == 1
    assert len(hooks.of("delivered")) == 1 and waiting(path) == 0


def test_the_refusals_of_a_backfill_upsert_shed_once_a_live_sync_joined_it_are_not_kept(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The key's refusals in a row of a backfill upsert are kept by id in the store's meta
    # until its row is settled. Joined by a live sync, the row is live work, and the bound
    # may shed it: it leaves without being settled, and its count stayed for good.
    hooks = RecordingHooks()
    retry = RetryPolicy(max_attempts=10, base_delay=0.05, max_delay=600.0, deadline=3600.0)
    engine = make_engine(emulator, hooks, retry=retry, queue_size=3)
    assert engine.first_pass(5)  # it delivers

    def refusals() -> Any:
        with engine.store.read() as db:
            return Store.get_meta(db, "backfill_refusals")

    def refused_once(user: int) -> Operation:  # a backfill upsert, refused for the key once
        emulator.faults.fail_next(1, 401, path=UPSERT, match={"external_id": f"t-{user}"})
        operation = Operation("upsert", upsert(user).payload, priority="backfill")
        with engine.store.write() as db:  # as 'flask meisa sync-users' queues it
            Store.set_meta(db, "backfill", {"state": "running"})
            Store.set_meta(db, "backfill_held", None)  # the last refusal's retry is due
            pending.add(db, operation, LANE_BACKFILL)
        engine.kick()
        return operation

    first = refused_once(1)
    assert eventually(lambda: refusals() == {first.id: 1})  # retried in 600 s
    emulator.faults.outage(600)  # live work waits too
    engine.submit([upsert(1, plan="pro")])  # the user's live sync joins it: live work now
    joined = "SELECT priority, merged FROM meisa_ops WHERE id = ?"
    assert eventually(lambda: query(path, joined, first.id) == [(None, 2)])
    engine.submit([upsert(n) for n in range(2, 6)])  # past the bound: the oldest go
    assert eventually(lambda: first.id in {op.id for op in hooks.of("dropped")})
    emulator.faults.clear()
    second = refused_once(9)
    assert eventually(lambda: second.id in (refusals() or {}))
    assert refusals() == {second.id: 1}


def test_a_row_in_flight_whose_caller_is_gone_moved_in_after_a_takeover_is_made_again(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    # The delivering process took a row and was killed; the store was deleted, and a
    # process started since took delivery over in the file now there before another
    # process, which had the old file open, moved the killed one's row into it (in
    # flight: that process cannot know whose call it is). It stayed in flight for good,
    # and its contact's later work waited behind it.
    other = killed_in_a_call_then_deleted(path)
    lock.release()  # the kernel's, as the killed process goes
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    assert engine.first_pass(5) and engine.is_holder  # in the file now there
    try:
        assert other.moved() and other.follow() == 1
    finally:
        other.close()
    engine.submit([upsert(1, plan="pro")])  # the user's next state, behind it
    delivered = engine.flush(5)
    print(f"{len(emulator.requests_to(UPSERT))} upserts, {waiting(path)} rows left")
    assert delivered and len(emulator.requests_to(UPSERT)) >= 1
    assert len(hooks.of("delivered")) == 2 and waiting(path) == 0


def test_a_call_under_way_as_another_process_moves_the_rows_holding_the_new_file_is_made_once(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The store is deleted while the delivering process makes a call; another process moves
    # the rows into the file now there, and holds its write lock past the busy timeout (a
    # long move, a big transaction) as the delivering process tries to follow. That try
    # was taken for a file it cannot use: no delivery for a minute, and the call's answer,
    # its row no longer found, was dropped: the call was made again a minute later.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    other = Store(path)  # another process of the host, with the file open
    other.data_version()
    engine, hooks, go_on = call_under_way(emulator, make_engine, track(1), poll_interval=0.02)
    # This process holds its store until every file is gone and the other process holds
    # the new one's write lock: it follows only then.
    held = contextlib.ExitStack()
    held.enter_context(engine.store.read())
    try:
        for end in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{end}").unlink()
        assert other.moved() and other.follow() == 1
        with other.write():  # held while this process tries to follow
            held.close()
            assert eventually(lambda: "database is locked" in caplog.text)
        go_on.set()  # then the call is answered
        engine.submit([upsert(2), track(2)])
        delivered = engine.flush(5)
    finally:
        held.close()
        other.close()
    calls = [r.body["external_id"] for r in emulator.requests_to(TRACK)]
    left = waiting(path)
    print(f"{calls} tracked, {len(hooks.of('delivered'))} delivered, {left} left in the file")
    assert delivered and calls == ["t-1", "t-2"]
    assert len(hooks.of("delivered")) == 4 and left == 0


def test_a_call_under_way_as_this_process_loses_delivery_and_takes_it_back_is_made_once(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The lock file is deleted while this process makes a call; another process locks the
    # file made again, then stops: this process takes delivery back, its call still under
    # way. That call's row stays in flight for its answer: it is not made a second time.
    engine, hooks, go_on = call_under_way(emulator, make_engine, track(1), poll_interval=0.02)
    for _ in range(100):  # until the other locks it first (the holder does within a poll)
        Path(f"{path}.lock").unlink(missing_ok=True)
        other = HostLock(f"{path}.lock")  # another process, started now
        if other.try_acquire():
            break
        other.release()
    assert other.held
    assert eventually(lambda: not engine.is_holder)
    other.release()
    assert eventually(lambda: engine.is_holder)
    go_on.set()
    assert engine.flush(10)
    assert len(emulator.requests_to(TRACK)) == 1
    assert len(emulator.events(event_name="clicked")) == 1
    assert len(hooks.of("delivered")) == 2 and waiting(path) == 0


def test_a_lock_file_made_again_while_the_holder_waits_for_a_busy_store_is_left_to_it(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # The lock file is deleted twice in a row while the delivering process's writer waits
    # for the store's write lock (another process holding it: a long move, a big batch),
    # its busy timeout long. A process that had the first file open locked the file made
    # again once a second passed: it took delivery over, and the rows of the calls under
    # way of the process still delivering were made again.
    store = Store(path, busy_timeout=3.0)
    engine, hooks, go_on = call_under_way(emulator, make_engine, track(1), store=store)
    assert engine.is_holder
    held = engine._host_lock
    assert held is not None
    waiting = HostLock(f"{path}.lock", 3.0)  # another process of the app, started before
    assert not waiting.try_acquire()
    Path(f"{path}.lock").unlink()
    assert eventually(lambda: Path(f"{path}.lock").exists() and not held.moved())
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's long write
        engine.submit([upsert(2)])

        def writer_waits() -> bool:  # for the store, past its pass's look at the lock
            if engine.store._lock.acquire(blocking=False):
                engine.store._lock.release()
                return False
            return True

        assert eventually(writer_waits)
        Path(f"{path}.lock").unlink()
        took = eventually(lambda: waiting.try_acquire() or (held.held and not held.moved()))
        print(f"waiting process locked it: {waiting.held}; holder: {held.held}")
        assert took and not waiting.held and held.held
    finally:
        other.execute("ROLLBACK")
        other.close()
        waiting.release()
    go_on.set()
    assert engine.flush(10)
    assert len(emulator.requests_to(TRACK)) == 1 and len(hooks.of("delivered")) == 3


def test_a_live_sync_that_joins_a_waiting_backfill_upsert_is_timed_from_its_own_release(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    # A backfill upsert queued a minute ago still waits when its user logs in: the login's
    # sync joins its row. The status times the lane by the login's wait, not the minute.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    queued = Operation("upsert", upsert(1).payload, priority="backfill")
    queued.created_at -= 60
    engine.submit([queued, upsert(1, seen=1)])
    assert engine.flush(10)
    assert len(answered(emulator, UPSERT)) == 1  # both in one call
    status = engine.status()
    assert status.latency.keys() == {"automation"}
    assert status.latency["automation"][1] < 30, status.latency


def test_the_first_housekeeping_forgets_all_that_meisa_accepted_too_long_ago(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    # A host down for weeks: 1,500 contacts past KEEP_FOR. An entry left to a later pass
    # (30 s each) is folded into its contact's next acceptance, and an upsert of a field
    # Meisa accepted 35 days ago is then skipped as unchanged.
    store = Store(path)
    with store.write() as db:
        for n in range(1500):
            contact = {"email": f"old{n}@example.com", "external_id": f"old-{n}"}
            known.remember(db, contact, time.time() - known.KEEP_FOR - 5 * 86400)
    store.close()
    engine = make_engine(emulator, RecordingHooks())
    engine.submit([upsert(1)])
    assert engine.flush(5)

    def left() -> int:
        sql = "SELECT count(*) FROM meisa_known WHERE accepted_at < ?"
        return int(query(path, sql, time.time() - known.KEEP_FOR)[0][0])

    assert eventually(lambda: left() == 0), left()


def test_a_hook_on_the_writers_thread_may_close_the_engine_storing_what_waits_in_memory(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    lock: HostLock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A dropped hook (a track shed as the writer stores, queue_size 1) closes the engine
    # while another thread's work waits in memory. That work is stored for the next engine,
    # at once: not waited for over the close's allowance (when the hook ran on the writer's
    # thread, the one thread that stores was the one waiting), then reported lost.
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    hooks, answers, handed = RecordingHooks(), [], threading.Event()
    record = hooks.dropped

    def hand_over() -> None:
        engine.submit([send(1)])
        handed.set()

    def dropped(operation: Operation, reason: str) -> None:
        record(operation, reason)
        if not handed.is_set():  # another request's thread hands work over meanwhile
            threading.Thread(target=hand_over).start()
            assert handed.wait(10)
            answers.append(engine.close())

    hooks.dropped = dropped  # type: ignore[method-assign]
    engine = make_engine(emulator, hooks, store=Store(path), queue_size=1, flush_timeout=30.0)
    assert engine.first_pass(10)
    began = time.monotonic()
    engine.submit([track(1), track(2)])
    assert hooks.wait_for("dropped", 2, timeout=60)
    writers = [t for t in engine._threads if t.name == "flask-meisa-writer"]
    assert eventually(lambda: not any(t.is_alive() for t in writers), timeout=60)
    # The close reports the shed track the reporter thread (in the hook) had not reached.
    assert eventually(lambda: answers == [0])
    assert time.monotonic() - began < 10  # not the close's allowance: 30 s
    # The send stored, the other track shed by it then (the bound is one operation).
    assert [hooks.detail(op) for op in hooks.of("dropped")] == ["queue_full"] * 2
    assert query(path, "SELECT kind FROM meisa_ops") == [("send",)]
    assert "not delivered before shutdown" not in caplog.text
    assert engine.store._db is None  # not opened again by the rest of the pass


def test_a_slow_dropped_receiver_does_not_hold_up_storing_what_other_threads_hand_over(
    emulator: Emulator, make_engine: MakeEngine, path: Path, lock: HostLock
) -> None:
    # The writer alone stores: were what the store's bound sheds (queue_size 1) reported on
    # its thread, a receiver that takes its time (an alert sent per operation) would hold
    # every thread's released work in memory, unbounded, past the ~10 ms SIGKILL window.
    hooks = RecordingHooks()
    entered, release = hooks.hold("dropped")
    engine = make_engine(emulator, hooks, queue_size=1)
    try:
        assert engine.first_pass(10)
        engine.submit([track(1), track(2)])
        assert entered.wait(10)  # the receiver of the track shed runs, and takes its time
        engine.submit([send(1)])  # another request's thread hands a send over
        assert eventually(lambda: ("send",) in query(path, "SELECT kind FROM meisa_ops"), 2.0)
    finally:
        release.set()
        engine.close(0)


def test_a_store_file_deleted_with_nothing_left_in_it_is_followed_saying_so(
    emulator: Emulator, make_engine: MakeEngine, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    engine = make_engine(emulator, RecordingHooks(), store=Store(path))
    assert engine.first_pass(10)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)
    assert eventually(lambda: "uses the file now there" in caplog.text), caplog.text
    assert "(nothing was left in the old one)" in caplog.text
    assert "moved the 0 operations" not in caplog.text
