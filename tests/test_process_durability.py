"""Durability of the default delivery (the store in the instance folder) in app processes
of their own (``tests/served_app.py``) against the emulator: SIGKILL with hundreds of
operations pending during an outage, SIGTERM (with a suppression list fetch in flight), a
send replayed after a crash, a forked child, and a store locked by another connection."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response
from tests.process_support import STORE_NAME
from tests.process_support import Processes
from tests.process_support import drain_without_loss
from tests.process_support import environment
from tests.process_support import no_loss
from tests.process_support import run_app
from tests.process_support import stored
from tests.process_support import stored_kinds
from tests.process_support import tally
from tests.process_support import wait_stored

UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"


@pytest.mark.slow
def test_sigkill_during_an_outage_loses_and_repeats_nothing(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    requests = 200  # 200 upserts (of 20 users), 200 events, 20 sends
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    emu.faults.outage(600)
    app = processes.app(env, "serve", str(requests))
    assert app.wait_for_line("ready"), app.output
    # Handed over in memory, then stored by the writer thread in groups, in the order
    # handed over: the last operation is an event, so once every event is, all are.
    assert wait_stored(instance, "track", requests)
    rows = stored(instance).pending
    assert rows >= requests + requests // 10  # events and sends a row each; upserts merge
    assert emu.wait_for(lambda e: len(e.requests) >= 3)  # it was trying
    app.signal(signal.SIGKILL)
    assert app.wait() == -signal.SIGKILL
    emu.faults.clear()
    output = run_app(env, "drain")
    assert "flushed True" in output
    numbers = tally(emu, requests)
    print(f"\nSIGKILL with {rows} rows stored: {numbers}")
    assert no_loss(numbers), numbers
    assert stored(instance).pending == 0
    assert emu.live_key not in app.output + output


@pytest.mark.slow
def test_sigterm_flushes_within_the_timeout_and_leaves_the_rest_stored(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    requests = 60  # 20 users' upserts, 60 events, 6 sends: over four seconds of calls
    flush_timeout = 1.0
    env = environment(
        emu, instance, MEISA_TEST_RATE="none", MEISA_TEST_FLUSH_TIMEOUT=str(flush_timeout)
    )
    emu.faults.outage(600)
    app = processes.app(env, "serve", str(requests))
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(instance, "track", requests)
    emu.faults.clear()
    emu.faults.set(latency=0.05)  # about twenty calls fit in the flush timeout
    assert emu.wait_for(lambda e: any(r.status in (200, 201) for r in e.requests), 30)

    def answered() -> int:
        return sum(1 for r in emu.requests if r.status in (200, 201))

    before = answered()
    began = time.monotonic()
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    took = time.monotonic() - began
    during = answered() - before
    left = stored(instance)
    print(
        f"\nSIGTERM: exit in {took:.2f}s, {during} calls made while exiting, "
        f"{left.pending} rows left"
    )
    assert during >= 3  # it went on delivering for the flush timeout
    # The flush timeout, one call in flight (2 s of client timeout at most), the exit.
    assert took < flush_timeout + 2.0 + 3.0
    assert left.pending > 0 and left.in_flight == 0  # kept, none stuck in flight
    assert "stay in the store for the next start" in app.output
    drain_without_loss(emu, env, requests)


@pytest.mark.slow
def test_a_send_replayed_after_a_crash_is_not_sent_twice(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    # The send is taken but its answer lost; every later call fails unprocessed.
    emu.faults.drop_next(1, path=TRIGGER, after=True)
    for path in (TRIGGER, UPSERT, TRACK):
        emu.faults.fail_next(10_000, status=503, path=path)
    app = processes.app(env, "serve", "1")
    assert app.wait_for_line("ready"), app.output
    assert emu.wait_for(lambda e: any(r.fault == "drop_after" for r in e.requests), 30)
    app.signal(signal.SIGKILL)
    app.wait()
    assert len(emu.sends()) == 1  # Meisa sent it; the app never learnt so
    drain_without_loss(emu, env, 1)
    triggers = [r for r in emu.requests_to(TRIGGER) if r.fault is None]
    assert [r.body["idempotency_key"] for r in triggers] == ["k0"]
    assert len(emu.sends()) == 1  # the replay carried the same key: not sent again


PARENT_DELIVERS = ["child flushed True delivering parent", "parent flushed True child_exit 0"]


@pytest.mark.parametrize(
    ("moment", "after"),
    [
        ("idle", PARENT_DELIVERS),
        ("mid-write", PARENT_DELIVERS),
        ("parent-dies", ["child flushed True delivering child"]),
    ],
)
def test_a_forked_child_writes_and_its_parent_delivers(
    emu: Emulator, instance: Path, moment: str, after: list[str]
) -> None:
    # "mid-write": another thread of the parent is inside a store transaction at the
    # fork; the child must not wait for a lock that thread (absent in the child) holds.
    # "parent-dies": the parent exits without closing anything; the child takes over, as
    # it may only once it keeps no file of the parent's lock open (a lock goes with the
    # last one).
    env = environment(emu, instance, MEISA_TEST_RATE="none")
    output = run_app(env, "fork", moment)
    lines = [line for line in output.splitlines() if line.startswith(("parent ", "child "))]
    assert lines == ["parent delivers True", *after], output
    assert sorted(e["properties"]["n"] for e in emu.events(event_name="worked")) == list(
        range(1, 7)
    )
    assert emu.live_key not in output


def test_the_work_of_multiprocessing_children_is_stored_before_they_end(
    emu: Emulator, instance: Path
) -> None:
    # A multiprocessing child ends with os._exit once its target returns: no exit hook
    # ran, and what its writer thread had not stored yet was lost with it.
    output = run_app(environment(emu, instance, MEISA_TEST_RATE="none"), "pool", "4")
    assert "pool flushed True exits [0, 0, 0, 0]" in output, output
    numbers = tally(emu, 21)
    print(numbers)
    assert no_loss(numbers), output


@pytest.mark.parametrize("outbox", ["default", "memory"])
def test_delivery_used_again_after_close_is_flushed_at_exit(
    emu: Emulator, instance: Path, outbox: str
) -> None:
    extra = {"MEISA_TEST_RATE": "none"} | (
        {"MEISA_TEST_OUTBOX": outbox} if outbox == "memory" else {}
    )
    output = run_app(environment(emu, instance, **extra), "reuse")
    assert "closed lost 0" in output, output
    numbers = tally(emu, 11)
    print(numbers)
    assert no_loss(numbers), output


def test_delivery_used_again_while_another_thread_closes_it_is_flushed_at_exit(
    emu: Emulator, instance: Path
) -> None:
    # The first call is answered 503, retried after a second: the close flushing it lasts
    # that long, and the ten requests start delivery again meanwhile (in memory: the
    # closing engine took their rows as its own lost ones; a store file keeps them).
    emu.faults.fail_next(1, status=503, retry_after=1)
    extra = {"MEISA_TEST_RATE": "none", "MEISA_TEST_OUTBOX": "memory"}
    output = run_app(environment(emu, instance, **extra), "reuse", "closing")
    assert "reused while closing True" in output, output
    assert "closed lost 0" in output, output
    numbers = tally(emu, 11)
    print(numbers)
    assert no_loss(numbers), output


def test_a_suppression_fetch_retried_after_the_exit_hook_makes_no_engine_again(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    # A worker's exit closes delivery while another thread's suppression list fetch waits
    # for its answer, a 503: its retry must not make the app an engine again, nor call.
    closed = threading.Event()  # the exit hook closed delivery (gave up the host's lock)
    fetching = threading.Event()

    def answer(exchange: Exchange) -> None:
        if not fetching.is_set():
            fetching.set()
            assert closed.wait(30)
            exchange.send(response(503, {"error": {"code": "service_unavailable"}}))
        else:
            exchange.send(response(200, {"emails": [], "as_of": None}))

    with hostile(answer) as server:
        env = environment(emu, instance, MEISA_TEST_URL=server.url)
        app = processes.app(env, "exit-fetch")
        assert app.wait_for_line("delivers True"), app.output
        assert fetching.wait(30), app.output
        lock = os.open(f"{instance / STORE_NAME}.lock", os.O_RDWR)

        def take_the_lock() -> None:  # once the exit hook's close of delivery gave it up
            fcntl.flock(lock, fcntl.LOCK_EX)
            closed.set()

        try:
            locker = threading.Thread(target=take_the_lock, daemon=True)
            locker.start()
            app.signal(signal.SIGTERM)  # a worker's end: sys.exit, then the exit hooks
            assert app.wait() == 0, app.output
            locker.join(10)
        finally:
            os.close(lock)
        calls = list(server.requests)
    assert closed.is_set(), app.output
    assert "engine after exit False" in app.output, app.output
    assert len(calls) == 1, (calls, app.output)  # no attempt after the exit hook
    # Said as it is: an exiting process makes no next attempt.
    assert "could not be loaded (delivery engine is closed" in app.output, app.output
    assert "next attempt" not in app.output, app.output


def test_a_request_served_after_the_exit_hook_is_answered_and_its_work_refused(
    emu: Emulator, instance: Path
) -> None:
    # A server's thread may serve a request while the process exits: delivery, closed by
    # the exit hook, is not started again, and the request does not fail for it.
    output = run_app(environment(emu, instance, MEISA_TEST_RATE="none"), "exit-request")
    assert "late request 200 dropped ['refused', 'refused']" in output, output  # upsert, event
    assert "EngineClosed" not in output, output


def test_a_send_delivered_by_the_exit_flush_to_a_suppressed_address_is_suppressed(
    emu: Emulator, instance: Path
) -> None:
    # One process leaves a send in the store (the host paused); another delivers it in its
    # exit flush, its suppression list not loaded yet: skipped as in normal delivery, not
    # refused by Meisa (422) and reported failed (its list fetch found no engine to count on).
    emu.suppress("gone@example.com")
    env = environment(emu, instance, MEISA_TEST_FLUSH_TIMEOUT="0")
    run_app(env, "exit-paused", "gone@example.com")
    assert stored_kinds(instance)["send"] == 1
    emu.clear_requests()
    output = run_app(environment(emu, instance, MEISA_TEST_FLUSH_TIMEOUT="10"), "exit-paused")
    assert "suppressed gone@example.com" in output, output
    assert "failed" not in output, output
    assert not emu.requests_to("/api/v1" + TRIGGER), output
    status = stored(instance)
    assert (status.pending, status.dead_letters) == (0, 0), output


def test_a_locked_store_never_fails_a_request(
    emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.apps import build_app

    app = build_app(
        {
            "MEISA_API_KEY": emu.live_key,
            "MEISA_BASE_URL": emu.url,
            "MEISA_RATE_LIMIT": None,
            "MEISA_OUTBOX_BUSY_TIMEOUT": 1.5,
        }
    )
    meisa: Meisa = app.extensions["meisa"]
    path = meisa.state(app).store_path()
    assert path is not None and path.startswith(app.instance_path)
    locker = sqlite3.connect(path, isolation_level=None)
    client = app.test_client()
    caplog.set_level(logging.WARNING, logger="flask_meisa")
    try:
        locker.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        for n in range(3):
            began = time.monotonic()
            response = client.post(f"/login/{1 + n % 2}")
            response.close()
            assert response.status_code == 200
            # No wait for the store's lock (that would be its 1.5 s busy timeout).
            assert time.monotonic() - began < 1.0
        client.post("/send-later/receipt/later@example.com").close()
        began = time.monotonic()
        response = client.post("/send/receipt/now@example.com")
        assert response.status_code == 200  # a synchronous send, made now
        assert response.json == {"status": "sent", "reason": None}
        # It waits for the locked store (for a budget slot), then goes without a slot.
        assert time.monotonic() - began < 10.0 + 3.0  # the send's deadline, and slack
        with app.app_context():
            assert not meisa.flush(0.5)  # held in memory until the store takes them
        assert emu.requests_to(UPSERT) == []
        assert "the delivery store failed (database is locked: another process" in caplog.text
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    with app.app_context():
        assert meisa.flush(10)
    assert "the delivery store works again" in caplog.text
    assert [r.status for r in emu.requests_to(UPSERT)] == [201, 201]  # two users, merged
    assert sorted(s["to_email"] for s in emu.sends()) == ["later@example.com", "now@example.com"]
    assert stored(Path(app.instance_path)).pending == 0


def test_a_send_whose_suppression_check_the_exit_flush_cut_short_stays_stored(
    emu: Emulator, instance: Path
) -> None:
    # As above, but the flush's time runs out while the list fetch it started waits for a
    # slow list: the fetch fails (engine closed). The send went out unchecked (Meisa answered
    # 422, a dead letter); now it is not made and stays stored, checked at the next start.
    emu.suppress("gone@example.com")
    env = environment(emu, instance, MEISA_TEST_FLUSH_TIMEOUT="0")
    run_app(env, "exit-paused", "gone@example.com")
    emu.clear_requests()
    emu.faults.set(latency=4.0, paths=["/contacts/api/unsubscribed-emails/"])
    output = run_app(environment(emu, instance, MEISA_TEST_FLUSH_TIMEOUT="3"), "exit-paused")
    assert "engine is closed" in output, output  # (the fetch failed, as it still may)
    assert not emu.requests_to("/api/v1" + TRIGGER), output
    assert stored_kinds(instance)["send"] == 1, output
    emu.faults.set()
    output = run_app(environment(emu, instance, MEISA_TEST_FLUSH_TIMEOUT="10"), "exit-paused")
    assert "suppressed gone@example.com" in output, output
    assert not emu.requests_to("/api/v1" + TRIGGER), output
    assert stored(instance).dead_letters == 0, output
