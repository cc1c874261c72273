"""``flask meisa sync-users``: a streamed, resumable backfill in the lowest lane of the
shared budget, that never sends a state Meisa already has."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_meisa import DeliveryStatus
from flask_meisa import Meisa
from flask_meisa import _cli_text
from flask_meisa import contact_synced
from flask_meisa._engine import backfill
from flask_meisa._engine import dead
from flask_meisa._engine import pending
from flask_meisa._engine.delivery import StoreBackfill
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from tests.backfill_app import create_app
from tests.backfill_app import hold_after_first_chunk
from tests.backfill_app import interrupt_first_run
from tests.backfill_app import live_sync_retried
from tests.backfill_app import sync_users_process
from tests.backfill_app import upgrade_while_read
from tests.engine_support import query
from tests.process_support import store_path
from tests.process_support import wait_until

UPSERT = "/contacts/upsert/"
#: Refused upserts retried at once (a stopped run takes REFUSALS_TO_STOP of them).
QUICK_RETRY = {"MEISA_RETRY_MAX_DELAY": 0.01}


def make_app(emulator: Emulator, users: int, **config: Any) -> Flask:
    settings = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_CUSTOM_FIELDS=["plan"])
    settings.update(config)
    return create_app(settings, users=users)


def upserts_by_user(emulator: Emulator) -> collections.Counter[str]:
    return collections.Counter(
        r.body["external_id"] for r in emulator.requests_to(UPSERT) if r.status in (200, 201)
    )


def refusals(emulator: Emulator, period: float) -> str:
    """Each 429 and the requests that reached Meisa in the ``period`` before it (arrival,
    seconds spent answering, path, status): what its window held when it refused."""
    lines = []
    for refused in (r for r in emulator.requests if r.status == 429):
        lines.append(f"429 to {refused.path} at {refused.time:.3f}, after:")
        lines += [
            f"  {r.time:.3f} +{r.duration:.3f} {r.path} {r.status}"
            for r in emulator.requests
            if refused.time - period <= r.time < refused.time
        ]
    return "\n".join(lines)


def sync_users(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["meisa", "sync-users", *args])


def plan_in_meisa(app: Flask, emulator: Emulator, external_id: str) -> Any:
    """The plan Meisa holds for the user once everything pending is delivered."""
    with app.app_context():
        assert app.extensions["meisa"].flush(15)
    contact = emulator.contact(external_id=external_id)
    return None if contact is None else contact["custom_fields"]["plan"]


def test_a_backfill_reads_users_a_chunk_at_a_time_and_never_sheds(emulator: Emulator) -> None:
    app = make_app(emulator, 3_000, MEISA_QUEUE_SIZE=200)
    read = 0
    most_waiting = 0
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]

    def counted() -> Any:
        nonlocal read
        for user in query():
            read += 1
            yield user

    meisa.users_to_sync(counted, count=count)
    watching = True

    def watch() -> None:
        nonlocal most_waiting
        while watching:
            with app.app_context():
                status = meisa.status()
            most_waiting = max(most_waiting, status.queued["backfill"] + status.in_flight)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = sync_users(app)
    finally:
        watching = False
        watcher.join()
    assert result.exit_code == 0, result.output
    assert read == 3_000
    assert most_waiting <= backfill.HIGH_WATER + backfill.CHUNK
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 3_000 and set(by_user.values()) == {1}
    with app.app_context():
        status = meisa.status()
    assert (status.dropped, status.failed, status.pending) == (0, 0, 0)
    assert status.backfill is not None and status.backfill["state"] == "done"


def test_live_work_goes_ahead_of_a_backfill_at_the_full_budget(
    emulator_factory: Callable[..., Emulator],
) -> None:
    emulator = emulator_factory(rate_limit="20/second")
    app = make_app(emulator, 400, MEISA_RATE_LIMIT="20/second")
    meisa: Meisa = app.extensions["meisa"]
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(sync_users(app)))
    runner.start()
    try:
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 60, timeout=30)
        # A login sync of a new user and a password reset, made while the budget is spent.
        login_at = time.monotonic()
        with app.test_request_context("/"):
            meisa.upsert({"email": "live@example.com", "external_id": "live"})
        reset_at = time.monotonic()
        with app.app_context():
            meisa.send("password_reset", "user3@example.com", background=True)

        # Requests, not the contact or the send: the emulator logs a request once it has
        # answered it.
        def logins(e: Emulator) -> list[Any]:
            return [r for r in e.requests_to(UPSERT) if r.body["external_id"] == "live"]

        assert emulator.wait_for(lambda e: bool(logins(e)))
        login_arrived = logins(emulator)[0].time
        assert emulator.wait_for(lambda e: len(e.requests_to("/emails/trigger/")) == 1)
        reset_arrived = emulator.requests_to("/emails/trigger/")[0].time
    finally:
        runner.join(60)
    assert outcome and outcome[0].exit_code == 0, outcome and outcome[0].output
    # Counted in calls, what a busy machine cannot blur (the waits, about one slot of
    # 20/second each, are printed): Meisa saw at most one backfill upsert (the slot already
    # taken, or the call already in flight) ahead of each live call.
    wall = time.time() - time.monotonic()
    print(
        "waits behind the backfill:",
        login_arrived - login_at - wall,
        reset_arrived - reset_at - wall,
    )
    for asked, arrived in ((login_at + wall, login_arrived), (reset_at + wall, reset_arrived)):
        ahead = [
            r
            for r in emulator.requests_to(UPSERT)
            if asked < r.time < arrived and r.body["external_id"] != "live"
        ]
        assert len(ahead) <= 1, len(ahead)
    assert 429 not in [r.status for r in emulator.requests], refusals(emulator, 1.0)
    assert len(upserts_by_user(emulator)) == 401


def test_the_share_option_keeps_part_of_the_budget_for_live_work(
    emulator_factory: Callable[..., Emulator],
) -> None:
    emulator = emulator_factory(rate_limit=None)
    app = make_app(emulator, 60, MEISA_RATE_LIMIT="40/second")
    started = time.monotonic()
    result = sync_users(app, "--max-share", "0.5")
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert "60 users at ~68,400/hour" in result.output  # (40 - 2 reserved) * 3600 * 0.5
    # 19 calls a second at most: 60 upserts take over 2 s (a full budget would take 1.5).
    times = sorted(r.time for r in emulator.requests_to(UPSERT))
    in_one_second = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert in_one_second <= 19
    assert took >= 2.0
    # Over a second long: the summary gives the rate, 60 users in the time the run took,
    # between 2 s and all the time the command took.
    rate = re.search(r"60 of 60 users done \(([\d,]+)/hour\)", result.output.splitlines()[-1])
    assert rate and 60 * 3600 / took <= int(rate[1].replace(",", "")) <= 60 * 3600 / 2.0


def test_running_a_finished_backfill_again_makes_no_call(emulator: Emulator) -> None:
    app = make_app(emulator, 300)
    assert sync_users(app).exit_code == 0
    assert len(emulator.requests_to(UPSERT)) == 300
    emulator.clear_requests()
    again = sync_users(app)
    assert again.exit_code == 0, again.output
    assert "300 unchanged" in again.output
    assert emulator.requests == []


def test_logins_that_change_no_synced_field_cost_nothing(emulator: Emulator) -> None:
    app = make_app(emulator, 200)
    meisa: Meisa = app.extensions["meisa"]
    synced: list[bool] = []
    client = app.test_client()
    with contact_synced.connected_to(
        lambda sender, unchanged, **extra: synced.append(unchanged), sender=app
    ):
        for _ in range(10):
            for number in range(200):
                client.post(f"/login/{number}", buffered=True)
            with app.app_context():
                assert meisa.flush(30)
    assert len(emulator.requests_to(UPSERT)) == 200  # the first login of each user only
    assert synced.count(False) == 200 and synced.count(True) == 1_800
    with app.app_context():
        assert meisa.status().unchanged == 1_800


def test_force_and_an_event_answered_404_send_the_state_again(emulator: Emulator) -> None:
    app = make_app(emulator, 1)
    meisa: Meisa = app.extensions["meisa"]
    contact = {"email": "user0@example.com", "external_id": "0", "custom_fields": {"plan": "free"}}
    with app.app_context():
        meisa.upsert(contact)
        assert meisa.flush(5)
        meisa.upsert(contact)  # Meisa has it: no call
        assert meisa.flush(5)
        assert len(emulator.requests_to(UPSERT)) == 1
        meisa.upsert(contact, force=True)  # Meisa's copy was changed by hand
        assert meisa.flush(5)
        assert len(emulator.requests_to(UPSERT)) == 2
        # Meisa lost the contact: an event of it is answered 404, which forgets the
        # digest, so the same state is sent again.
        emulator.reset()
        meisa.track("opened", email="user0@example.com")
        assert meisa.flush(5)
        meisa.upsert(contact)
        assert meisa.flush(5)
        assert paths(emulator) == [("/events/track/", 404), (UPSERT, 201)]
        # An event that knows its contact upserts it itself, then goes again.
        emulator.reset()
        meisa.track("opened", user=app.config["PEOPLE"][0])
        assert meisa.flush(5)
        assert paths(emulator) == [("/events/track/", 404), (UPSERT, 201), ("/events/track/", 200)]


def test_meisa_is_told_an_unchanged_state_again_after_resync_after(
    emulator: Emulator, tmp_path: Path
) -> None:
    store = str(tmp_path / "store.sqlite3")
    contact = {"email": "user0@example.com", "external_id": "0", "custom_fields": {"plan": "free"}}
    day = make_app(emulator, 1, MEISA_OUTBOX=store)  # the default: a day
    with day.app_context():
        day.extensions["meisa"].upsert(contact)
        assert day.extensions["meisa"].flush(5)
        day.extensions["meisa"].upsert(contact)  # within the day: no call
        assert day.extensions["meisa"].flush(5)
    assert len(emulator.requests_to(UPSERT)) == 1
    day.extensions["meisa"].close(day)
    # The same host store, delivered by an app for which the digest is already too old.
    soon = make_app(emulator, 1, MEISA_OUTBOX=store, MEISA_RESYNC_AFTER=0.001)
    with soon.app_context():
        soon.extensions["meisa"].upsert(contact)
        assert soon.extensions["meisa"].flush(5)
        assert soon.extensions["meisa"].status().unchanged == 1  # the one skipped above
    assert len(emulator.requests_to(UPSERT)) == 2


def paths(emulator: Emulator) -> list[tuple[str, int | None]]:
    return [(r.path.removeprefix("/api/v1"), r.status) for r in emulator.requests]


def test_the_plan_the_dry_run_and_the_progress_tell_the_truth(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 100_000, MEISA_RATE_LIMIT="60/minute;1000/hour")
    dry = sync_users(app, "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.output.splitlines()
    assert lines[0] == "100,000 users at ~950/hour: about 4 days 9 hours"
    first = json.loads(lines[1])
    assert first == {
        "custom_fields": {"plan": "free"},
        "email": "user0@example.com",
        "external_id": "0",
    }
    assert len(lines) == 4
    assert emulator.requests == []
    with app.app_context():
        assert app.extensions["meisa"].status().backfill is None  # nothing was started

    small = make_app(emulator, 30)
    result = sync_users(small)
    assert result.exit_code == 0, result.output
    assert "30 of 30 users done" in result.output.splitlines()[-1]
    status = small.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert "backfill: done, 30 of 30 users read, 0 unchanged, 0 failed" in status


def test_the_progress_line_gives_the_rate_and_what_is_left() -> None:
    run = backfill.Run(started_at=0.0, position=1_200, total=100_000, skipped=150, failed=2)
    line = _cli_text.progress_line(
        backfill.Progress(run, waiting=200, refused=1, rate=1_000.0, elapsed=3_600.0, left=98_800)
    )
    # 98,800 left to read and 200 waiting, at 1,000 an hour: 99 hours.
    assert line == (
        "1,000 of 100,000 users done (1,000/hour), 150 unchanged, 3 failed, 200 waiting,"
        " about 4 days 3 hours left"
    )
    unknown = backfill.Progress(run, waiting=0, refused=0, rate=0.0, elapsed=0.5, left=98_800)
    assert "(rate not yet known)" in _cli_text.progress_line(unknown)
    assert "left" not in _cli_text.progress_line(unknown)
    finished = backfill.Progress(run, waiting=0, refused=0, rate=9_000.0, elapsed=9.0, left=0)
    assert "left" not in _cli_text.progress_line(finished)
    almost = backfill.Progress(run, waiting=10, refused=0, rate=9_000.0, elapsed=9.0, left=0)
    assert _cli_text.progress_line(almost).endswith(", 10 waiting, under a minute left")


def test_the_status_says_a_run_whose_process_was_killed_stopped() -> None:
    # A redeploy kills the command: its run must not look as if it went on.
    now = time.time()

    def state(**run: Any) -> str:
        status = DeliveryStatus(engine="thread", backfill={"started_at": now - 3_600, **run})
        line = _cli_text.status_report(status, None, time.time()).splitlines()[-1]
        return line.split(",")[0].removeprefix("backfill: ")

    assert state(state="running", alive_at=now - 10) == "running"
    killed = now - 3 * backfill.ALIVE_EVERY - 1
    assert state(state="running", alive_at=killed).startswith("stopped (run 'flask meisa sync")
    assert state(state="running", alive_at=None).startswith("stopped")  # interrupted
    assert state(state="done", alive_at=killed) == "done"


def test_the_status_of_a_finished_run_over_no_users_says_0_not_unknown(
    emulator: Emulator,
) -> None:
    # A run over no users counts them: 0 of 0, not "0 of ?" (an unknown number).
    app = make_app(emulator, 0)
    assert sync_users(app).exit_code == 0
    status = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert "backfill: done, 0 of 0 users read" in status


def test_ctrl_c_while_a_stop_at_a_refused_key_is_saved_ends_with_the_keys_error(
    tmp_path: Path,
) -> None:
    # Meisa refused the key: the run stops, and Ctrl+C comes as it saves that it no longer
    # runs. The key's error, which says how to go on, is what the command ends with, not
    # "interrupted" (run it again to go on: it would stop at the key again).
    store = Store(str(tmp_path / "store.sqlite3"))

    def ctrl_c_as_the_stop_is_saved(db: Any) -> None:  # called in each write of the run
        if isinstance(sys.exc_info()[1], backfill.KeyRefused):
            raise KeyboardInterrupt

    target = StoreBackfill(store, ctrl_c_as_the_stop_is_saved)
    people = [{"email": f"user{n}@example.com", "external_id": str(n)} for n in range(400)]

    def users() -> Any:
        yield from people[: backfill.CHUNK]
        with store.write() as db:  # as the process delivering keeps Meisa's refusal
            Store.set_meta(db, "backfill_refused", [401, None, "Invalid API key."])
        yield from people[backfill.CHUNK :]

    def to_operation(user: dict[str, str]) -> Operation:
        return Operation.checked("upsert", dict(user), priority="backfill")

    ended: BaseException | None = None
    try:
        backfill.run(target, users(), to_operation, total=400)
    except BaseException as error:  # a KeyboardInterrupt must not end the test session
        ended = error
    assert isinstance(ended, backfill.KeyRefused), repr(ended)
    assert target.refused() == [401, None, "Invalid API key."]
    kept = target.load()  # its note that it runs was not cleared, yet the next run starts
    assert kept is not None and kept.alive_at is not None
    target.save(kept, start=True)


def test_ctrl_c_as_a_chunk_is_stored_keeps_the_position_of_the_chunks_stored(
    tmp_path: Path,
) -> None:
    # Ctrl+C lands in the write of the second chunk: its rows are not stored, so the run
    # goes on from the first chunk's end, not past users none of whose upserts was kept.
    store = Store(str(tmp_path / "store.sqlite3"))
    interrupted: list[bool] = []

    def ctrl_c_as_the_second_chunk_is_stored(db: Any) -> None:  # in each write of the run
        stored = db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0]
        if stored == backfill.CHUNK and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    target = StoreBackfill(store, ctrl_c_as_the_second_chunk_is_stored)
    people = [{"email": f"user{n}@example.com", "external_id": str(n)} for n in range(400)]

    def to_operation(user: dict[str, str]) -> Operation:
        return Operation.checked("upsert", dict(user), priority="backfill")

    with pytest.raises(KeyboardInterrupt):
        backfill.run(target, people, to_operation, total=400)
    assert interrupted
    assert target.backlog() == (backfill.CHUNK, 0)
    assert (run := target.load()) is not None and run.position == backfill.CHUNK


def test_a_restart_behind_the_upserts_an_earlier_run_left_counts_none_done() -> None:
    # An interrupted run left 400 upserts waiting; --restart starts from the first user.
    run = backfill.Run(started_at=0.0, position=0, total=600)
    progress = backfill.Progress(run, waiting=400, refused=0, rate=0.0, elapsed=0.5, left=600)
    assert _cli_text.progress_line(progress).startswith("0 of 600 users done"), progress


def test_a_run_that_goes_on_behind_its_waiting_upserts_gives_its_rate_once_some_are_done(
    tmp_path: Path,
) -> None:
    # A redeployed host: the run goes on with the upserts it stored before still waiting
    # (an hour's worth at the default budget).
    target = StoreBackfill(Store(str(tmp_path / "store.sqlite3")))
    people = [{"email": f"user{n}@example.com", "external_id": str(n)} for n in range(400)]

    def to_operation(user: dict[str, str]) -> Operation:
        return Operation.checked("upsert", dict(user), priority="backfill")

    def stopped() -> Any:
        yield from people[: backfill.CHUNK]
        raise KeyboardInterrupt  # as the second chunk is read

    with pytest.raises(KeyboardInterrupt):
        backfill.run(target, stopped(), to_operation, total=400)
    reports: list[tuple[int, int, float]] = []  # done, waiting, rate

    def answer_some(progress: backfill.Progress) -> None:
        """Meisa answers 100 upserts at each report once a rate can be given (after 1 s)."""
        reports.append((progress.done, progress.waiting, progress.rate))
        with target.store.write() as db:
            for _ in range(100 if progress.elapsed > 1 else 0):
                if row := pending.next_ready(db, time.time()):
                    pending.finish(db, row)

    backfill.run(target, people, to_operation, total=400, report=answer_some, every=0.2)
    answered = [rate for done, _, rate in reports if done]
    assert answered and all(answered), reports


def test_an_interrupted_run_shows_in_status_and_restart_starts_from_the_first_user(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 600)
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]
    runs: list[int] = []

    def interrupted() -> Any:
        runs.append(0)
        for read, person in enumerate(query(), start=1):
            runs[-1] = read
            if len(runs) == 1 and read == 450:
                raise KeyboardInterrupt  # Ctrl-C while the third chunk is read
            yield person

    meisa.users_to_sync(interrupted, count=count)
    first = sync_users(app)
    assert first.exit_code == 130, first.output
    # Ctrl-C ends with the summary so far, then how to go on.
    *_, summary, how = first.output.splitlines()
    counts = re.match(r"(\d+) of 600 users done .* failed, (\d+) waiting", summary)
    assert counts and int(counts[1]) + int(counts[2]) == 400, first.output  # two whole chunks
    assert how.startswith("interrupted: run the command again"), first.output
    status = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    found = re.search(
        r"backfill: stopped \(run '.*' again to go on\), (\d+) of 600 users read", status
    )
    assert found and 0 < int(found[1]) < 600, status

    again = sync_users(app, "--restart")
    assert again.exit_code == 0, again.output
    assert runs[-1] == 600  # read from the first user, not from where the first run stopped
    last = again.output.splitlines()[-1]
    assert last.startswith("600 of 600 users done"), last
    # Read again, users Meisa had (or that were still waiting) cost no second call.
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 600 and set(by_user.values()) == {1}


def test_users_that_cannot_be_mapped_are_skipped_counted_and_listed(emulator: Emulator) -> None:
    app = make_app(emulator, 50)
    people = app.config["PEOPLE"]
    people[7].email = None
    people[9].plan = {"not", "json"}
    people[11].plan = "x" * 600_000  # more than one request body may carry
    result = sync_users(app)
    assert result.exit_code == 1
    assert "47 users" not in result.output  # the summary counts every user read
    assert "50 of 50 users done" in result.output and "3 failed" in result.output
    assert "flask meisa sync-users --failures" in result.output
    assert len(upserts_by_user(emulator)) == 47
    listed = sync_users(app, "--failures").output.splitlines()
    assert listed == [
        "user 7: email: the user object has None as its email",
        "user 9: custom_fields.plan: cannot be sent as JSON (set)",
        "user 11: custom_fields: makes the request body 600101 bytes, over the 524288-byte limit",
    ]


def test_upserts_meisa_refused_or_never_answered_are_listed_as_dead_letters(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 2, MEISA_RETRY_DEADLINE=0.5, MEISA_RETRY_BASE_DELAY=0.05)
    emulator.faults.fail_next(1, 400, path=UPSERT)  # one upsert refused,
    emulator.faults.drop_next(10_000, path=UPSERT)  # the other never answered
    try:
        result = sync_users(app)
    finally:
        emulator.faults.clear()
        app.extensions["meisa"].state(app).close(5)
    assert result.exit_code == 1, result.output
    assert "2 of 2 users done" in result.output and "2 failed" in result.output
    listed = sync_users(app, "--failures").output.splitlines()
    # Each names its user (external_id), with the dead letter's ID to retry it by.
    found = [re.fullmatch(r"user (\d+): (.*) \(dead letter (\d+)\)", line) for line in listed]
    assert len(found) == 2 and all(found), listed
    users, errors, ids = zip(*(match.groups() for match in found if match), strict=True)
    assert sorted(users) == ["0", "1"], listed
    assert sorted(errors) == [
        "APIConnectionError: the server closed the connection unanswered",  # no status, no code
        "HTTP 400 [injected_fault] Emulated fault (injected_fault).",
    ]
    # 'flask meisa status' counts the same failures as the run said.
    status = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert "backfill: done, 2 of 2 users read, 0 unchanged, 2 failed" in status, status
    retry = ["meisa", "dead-letters", "retry", *ids, "--timeout", "0"]
    assert "2 operation(s) queued again" in app.test_cli_runner().invoke(args=retry).output


def test_a_runs_refused_upserts_count_whatever_happens_to_dead_letters_since(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 3)
    emulator.faults.fail_next(2, 400, path=UPSERT)  # a first run: two upserts refused
    try:
        assert "2 failed" in sync_users(app).output
        # The next run, from the first user (their plans changed): Meisa refuses one of
        # its upserts. Then the dead letters are purged.
        for person in app.config["PEOPLE"].values():
            person.plan = "changed"
        emulator.faults.fail_next(1, 400, path=UPSERT)
        result = sync_users(app, "--restart")
        cli = app.test_cli_runner()
        purged = cli.invoke(args=["meisa", "dead-letters", "purge", "--all", "--yes"])
        assert purged.exit_code == 0, purged.output
    finally:
        emulator.faults.clear()
        app.extensions["meisa"].state(app).close(5)
    assert "3 of 3 users done" in result.output and "1 failed" in result.output, result.output
    # The run's count, whatever happened to its dead letters since, as under Celery.
    status = cli.invoke(args=["meisa", "status"]).output
    assert "backfill: done, 3 of 3 users read, 0 unchanged, 1 failed" in status, status


def test_a_second_run_is_refused_while_another_runs_and_the_first_goes_on(
    emulator: Emulator, tmp_path: Path
) -> None:
    # Two 'sync-users' at once on one store: the second would clear the first's notes and
    # move its position too. It is refused, saying when the first last noted it runs and
    # how to go on; the first goes on undisturbed.
    app = make_app(emulator, 600, MEISA_OUTBOX=str(tmp_path / "meisa-outbox.sqlite3"))
    meisa: Meisa = app.extensions["meisa"]
    go_on = hold_after_first_chunk(meisa)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(sync_users(app)))
    first.start()
    try:
        with app.app_context():
            assert wait_until(lambda: (meisa.status().backfill or {}).get("position") == 200)
            before = meisa.status().backfill
        process = sync_users_process(emulator.url, emulator.live_key, 600, tmp_path)
        second = subprocess.run(**process, capture_output=True, text=True, timeout=60)
        with app.app_context():
            after = meisa.status().backfill
    finally:
        go_on.set()
        first.join(60)
        meisa.close(app)
    assert second.returncode == 1, second.stderr
    error = second.stderr.splitlines()[-1]
    assert re.search(
        r"another 'flask meisa sync-users' runs the backfill \(its process last"
        r" noted it runs at \d\d:\d\d:\d\d UTC, \d+ s ago\): wait",
        error,
    ), error
    taken = "taken over at once on its host; from another, once it has not noted it runs for 90 s"
    assert taken in error, error
    assert after == before
    assert results[0].exit_code == 0, results[0].output
    assert results[0].output.splitlines()[-1].startswith("600 of 600 users done")
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 600 and set(by_user.values()) == {1}


def test_a_run_taken_over_while_slow_stops_and_leaves_the_others_notes(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A run reading a chunk noted nothing for 90 s (a slow query): a second one took it
    # over, as from a killed run. The first, going on, stops at its next write, and leaves
    # the second's notes as they are (it went on writing its own over them, to the end).
    outbox = tmp_path / "meisa-outbox.sqlite3"
    app = make_app(emulator, 600, MEISA_OUTBOX=str(outbox))
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]
    go_on = threading.Event()

    def users() -> Any:
        for read, person in enumerate(query()):
            if read == backfill.CHUNK:  # the first chunk stored: the run is slow here
                assert go_on.wait(60)
            yield person

    meisa.users_to_sync(users, count=count)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(sync_users(app)))
    first.start()
    try:
        with app.app_context():
            assert wait_until(lambda: (meisa.status().backfill or {}).get("position") == 200)
        target = StoreBackfill(Store(str(outbox)))
        slow = target.load()
        assert slow is not None and slow.alive_at is not None
        slow.alive_at -= 3 * backfill.ALIVE_EVERY + 1
        target.save(slow)
        process = sync_users_process(emulator.url, emulator.live_key, 600, tmp_path)
        second = subprocess.run(**process, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        taken = target.load()
    finally:
        go_on.set()
        first.join(60)
        meisa.close(app)
    assert results[0].exit_code == 1, results[0].output
    assert "another 'flask meisa sync-users' runs the backfill" in results[0].output
    assert taken is not None and taken.state == "done" and taken.alive_at is not None
    assert target.load() == taken
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 600 and set(by_user.values()) == {1}


@pytest.mark.slow
def test_a_backfill_killed_at_any_moment_goes_on_where_it_stopped(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    emulator = emulator_factory(rate_limit=None)
    emulator.faults.set(latency=0.002)
    process = sync_users_process(emulator.url, emulator.live_key, 3000, tmp_path / "instance")
    first = subprocess.Popen(**process, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 1_000, timeout=60)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(30)
    killed_at = len(emulator.requests_to(UPSERT))
    # Its note says it ran a moment ago, but its process is gone from this host: the rerun
    # takes it over at once (not 3 ALIVE_EVERY later), and goes on where it stopped.
    target = StoreBackfill(Store(str(tmp_path / "instance" / "meisa-outbox.sqlite3")))
    killed = target.load()
    assert killed is not None and killed.alive_at is not None and killed.position > 0
    assert not backfill.alive(dataclasses.asdict(killed), time.time())
    second = subprocess.run(**process, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert " done, " in second.stdout.splitlines()[0], second.stdout  # the plan goes on
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 3_000
    extra = sum(by_user.values()) - 3_000
    assert extra <= 30, (killed_at, extra)  # only what was in flight at the kill


# -- what attacks on the backfill found ----------------------------------------------------


def test_a_backfill_never_sends_a_state_older_than_a_live_sync_of_the_same_user(
    emulator_factory: Callable[..., Emulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Users are rows read from the database: an ORM object is a snapshot of its row. A
    # chunk read, then held while the backlog drains, would be sent as it was then: after
    # the user's upgrade, synced live, Meisa would be told "free" again.
    monkeypatch.setattr(backfill, "HIGH_WATER", 50)
    monkeypatch.setattr(backfill, "CHUNK", 20)
    emulator = emulator_factory(rate_limit=None)
    app = make_app(emulator, 140, MEISA_RATE_LIMIT="60/second")
    meisa: Meisa = app.extensions["meisa"]
    people = app.config["PEOPLE"]
    _, count = meisa.user_source  # type: ignore[misc]
    in_last_chunk = threading.Event()

    def rows() -> Any:
        for number in sorted(people):
            if number == 120:
                in_last_chunk.set()  # the first of the last chunk, 120-139
            yield copy.copy(people[number])  # the row as it is when read

    meisa.users_to_sync(rows, count=count)
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(sync_users(app)))
    runner.start()
    try:
        assert in_last_chunk.wait(60)
        people[130].plan = "pro"  # the upgrade, committed and synced by the web app
        with app.app_context():
            meisa.upsert(people[130], priority="high")
    finally:
        runner.join(60)
    assert outcome and outcome[0].exit_code == 0, outcome and outcome[0].output
    assert plan_in_meisa(app, emulator, "130") == "pro"


def test_a_backfill_upsert_merged_into_a_waiting_live_sync_never_undoes_it(
    emulator: Emulator,
) -> None:
    # The backfill read user 5 ("free") just before the upgrade; the live sync ("pro")
    # waits to retry after a 503 when the backfill's snapshot joins it.
    app = make_app(emulator, 10, MEISA_RETRY_BASE_DELAY=1.0)
    meisa: Meisa = app.extensions["meisa"]

    upgrade_while_read(app, live_sync_retried(meisa, emulator))
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "pro"


def test_a_mapper_that_raises_for_one_user_does_not_stop_the_backfill_for_good(
    emulator: Emulator,
) -> None:
    # As a login's sync: a mapper reading a relation one user lacks is that user's failure.
    app = make_app(emulator, 50)
    meisa: Meisa = app.extensions["meisa"]

    @meisa.contact_mapper
    def to_contact(user: Any) -> dict[str, Any]:
        profile = None if user.id == 7 else {"company": "Acme"}
        return {
            "email": user.email,
            "external_id": user.id,
            "custom_fields": {"company": profile["company"]},  # type: ignore[index]
        }

    for result in (sync_users(app), sync_users(app)):  # "run it again to go on"
        assert result.exit_code == 1, result.output
        assert "1 failed" in result.output, result.output
    assert len(upserts_by_user(emulator)) == 49
    listed = sync_users(app, "--failures").output.splitlines()
    assert len(listed) == 1 and listed[0].startswith("user 7: TypeError"), listed  # this run's


def run_with_one_upsert_refused(emulator: Emulator, app: Flask) -> None:
    """Run ``sync-users`` once while Meisa refuses one upsert (a dead letter)."""
    emulator.faults.fail_next(1, 400, path=UPSERT)
    try:
        first = sync_users(app)
    finally:
        emulator.faults.clear()
    assert first.exit_code == 1 and "1 failed" in first.output, first.output


def test_a_dead_letter_of_an_earlier_run_is_not_a_failure_of_this_one(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 2, MEISA_RETRY_DEADLINE=0.5, MEISA_RETRY_BASE_DELAY=0.05)
    run_with_one_upsert_refused(emulator, app)
    second = sync_users(app)  # syncs that user: both are in Meisa now
    assert len(upserts_by_user(emulator)) == 2
    assert second.exit_code == 0 and "0 failed" in second.output, second.output


def test_dead_letters_purged_while_a_run_waits_to_go_on_are_no_failures(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "CHUNK", 20)
    app = make_app(emulator, 40, MEISA_RETRY_DEADLINE=0.5, MEISA_RETRY_BASE_DELAY=0.05)
    run_with_one_upsert_refused(emulator, app)
    interrupt_first_run(app, at=25)  # the next run counts that dead letter as before it
    assert sync_users(app).exit_code == 130
    purged = app.test_cli_runner().invoke(
        args=["meisa", "dead-letters", "purge", "--all", "--yes"]
    )
    assert purged.output == "1 dead letter(s) deleted\n", purged.output
    again = sync_users(app)
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1].startswith("40 of 40 users done"), again.output
    assert ", 0 failed," in again.output.splitlines()[-1], again.output
    assert len(upserts_by_user(emulator)) == 40


@pytest.mark.parametrize("value", ["0", "1.5", "-1", "nan", "-nan"])
def test_a_max_share_out_of_range_is_refused(emulator: Emulator, value: str) -> None:
    app = make_app(emulator, 10, MEISA_RATE_LIMIT="60/minute;1000/hour")
    result = sync_users(app, "--max-share", value)
    assert result.exit_code == 2, (result.exit_code, repr(result.exception))
    refusal = "nan is not a number" if "nan" in value else "is not in the range"
    assert refusal in result.output, result.output
    assert emulator.requests == []


def test_a_full_disk_midway_stops_the_run_with_a_message_and_the_next_run_goes_on(
    emulator: Emulator, tmp_path: Path
) -> None:
    # SQLite's own limit on the store file: the same "database or disk is full".
    app = make_app(emulator, 500, MEISA_OUTBOX=str(tmp_path / "store.sqlite3"))
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]
    full: list[Any] = []

    def users() -> Any:
        for read, person in enumerate(query(), start=1):
            if read == 250 and not full:
                db = meisa.state().store()._connection()
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                db.execute(f"PRAGMA max_page_count = {pages}")
                full.append(db)
            yield person

    meisa.users_to_sync(users, count=count)
    result = sync_users(app)
    assert full
    full[0].execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert result.exit_code == 1, repr(result.exception)
    assert "full" in result.output and "run the command again" in result.output, result.output
    again = sync_users(app)
    assert again.exit_code == 0, again.output
    assert len(upserts_by_user(emulator)) == 500


def test_the_plan_of_a_run_that_goes_on_counts_only_the_users_left(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "CHUNK", 20)
    store = str(tmp_path / "store.sqlite3")
    app = make_app(emulator, 300, MEISA_OUTBOX=store)
    meisa: Meisa = app.extensions["meisa"]
    interrupt_first_run(app, at=285)
    emulator.faults.outage(3600)  # the 280 users read wait in the store, none answered
    assert sync_users(app).exit_code == 130
    meisa.close(app, timeout=0)

    def plan(*options: str) -> str:
        later = make_app(emulator, 300, MEISA_OUTBOX=store, MEISA_RATE_LIMIT="60/minute")
        try:
            return str(sync_users(later, "--dry-run", *options).output.splitlines()[0])
        finally:
            later.extensions["meisa"].close(later, timeout=0)

    # The users read whose upserts still wait are left to do, as the progress counts them.
    assert plan() == "300 users at ~3,420/hour: about 5 minutes", plan()
    emulator.faults.clear()
    flusher = make_app(emulator, 300, MEISA_OUTBOX=store)
    with flusher.app_context():
        assert flusher.extensions["meisa"].flush(30)
    flusher.extensions["meisa"].close(flusher, timeout=0)
    assert plan() == "300 users, 280 done, 20 left at ~3,420/hour: under a minute", plan()
    assert plan("--restart") == "300 users at ~3,420/hour: about 5 minutes", plan("--restart")


# The user now where the last one mapped was (user 44) cannot be mapped: nothing tells it
# is not that one.
@pytest.mark.parametrize("unmappable", [(), (44,)])
def test_a_run_that_goes_on_after_users_were_deleted_skips_none_of_the_others(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, unmappable: tuple[int, ...]
) -> None:
    monkeypatch.setattr(backfill, "CHUNK", 20)
    app = make_app(emulator, 100)
    people = app.config["PEOPLE"]
    interrupt_first_run(app, at=45)  # two whole chunks read: the run stops at user 40
    assert sync_users(app).exit_code == 130
    for number in range(5):
        del people[number]  # deleted before the resume: user 40 is now the 35th
    for number in unmappable:
        people[number].email = None
    again = sync_users(app)
    assert again.exit_code == (1 if unmappable else 0), again.output
    assert "the users changed since the last run stopped" in again.output
    summary = next(line for line in reversed(again.output.splitlines()) if "users done" in line)
    assert summary.startswith("95 of 95 users done"), again.output
    synced = set(upserts_by_user(emulator))
    assert synced == {str(number) for number in range(100) if number not in unmappable}


def test_a_run_that_goes_through_the_users_again_sends_none_it_sent_however_long_ago(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the default budget 100,000 users take days, past MEISA_RESYNC_AFTER (a day): a
    # run that goes through the users again (some were deleted) sent its first days again.
    monkeypatch.setattr(backfill, "CHUNK", 20)
    app = make_app(emulator, 100, MEISA_RESYNC_AFTER=0.001)  # what it sent is already old
    interrupt_first_run(app, at=45)  # two whole chunks read: the run stops at user 40
    assert sync_users(app).exit_code == 130
    with app.app_context():
        assert app.extensions["meisa"].flush(15)
    del app.config["PEOPLE"][0]
    again = sync_users(app)
    assert again.exit_code == 0, again.output
    assert "the users changed since the last run stopped" in again.output
    assert upserts_by_user(emulator) == {str(number): 1 for number in range(100)}
    # A run of its own is no run going on: it tells Meisa again what is older than that.
    emulator.clear_requests()
    assert sync_users(app, "--restart").exit_code == 0
    assert upserts_by_user(emulator) == {str(number): 1 for number in range(1, 100)}


def test_users_with_nothing_but_their_names_to_sync_are_upserted(emulator: Emulator) -> None:
    app = make_app(emulator, 5, MEISA_CUSTOM_FIELDS=[])
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert upserts_by_user(emulator) == {str(number): 1 for number in range(5)}
    assert {r.body["email"] for r in emulator.requests_to(UPSERT)} == {
        f"user{number}@example.com" for number in range(5)
    }


def test_users_whose_number_is_unknown_are_all_upserted(emulator: Emulator) -> None:
    app = make_app(emulator, 30)
    meisa: Meisa = app.extensions["meisa"]
    query, _ = meisa.user_source  # type: ignore[misc]
    meisa.users_to_sync(lambda: (user for user in query()))  # a stream, and no count
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    # Counted once the query is done.
    assert result.output.splitlines()[-1].startswith("30 of 30 users done"), result.output
    assert upserts_by_user(emulator) == {str(number): 1 for number in range(30)}


def stopped_after_failures(emulator: Emulator, failing: tuple[int, ...], at: int) -> Flask:
    """An app of 100 users, read 20 at a time, whose first ``sync-users`` run was
    interrupted at user ``at`` after failing to map the users ``failing``."""
    app = make_app(emulator, 100)
    for number in failing:
        app.config["PEOPLE"][number].email = None
    interrupt_first_run(app, at=at)
    assert sync_users(app).exit_code == 130
    listed = sync_users(app, "--failures").output.splitlines()
    assert [line.split(":")[0] for line in listed] == [f"user {n}" for n in failing], listed
    return app


@pytest.mark.parametrize(
    ("failing", "interrupted_at"),
    [
        # The last two of the chunk the run stopped after: its last user mapped (the 38th)
        # is still in place once they are gone.
        ((38, 39), 45),  # two whole chunks read: the run stops at user 40
        # The whole first chunk: the run stops having mapped no user at all.
        (tuple(range(20)), 25),  # one whole chunk read: the run stops at user 20
    ],
)
def test_a_run_that_goes_on_after_its_failed_users_were_deleted_skips_none_of_the_others(
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    failing: tuple[int, ...],
    interrupted_at: int,
) -> None:
    # The users a run could not map are the ones an admin deletes after '--failures':
    # going on from the position would skip as many others.
    monkeypatch.setattr(backfill, "CHUNK", 20)
    app = stopped_after_failures(emulator, failing, interrupted_at)
    for number in failing:
        del app.config["PEOPLE"][number]
    again = sync_users(app)
    assert again.exit_code == 0, again.output
    synced = set(upserts_by_user(emulator))
    assert synced == {str(number) for number in range(100) if number not in failing}


@pytest.mark.parametrize(
    ("failing", "interrupted_at"),
    [
        ((5, 39), 45),  # user 5 failed before the last user mapped: it is not read again
        (tuple(range(20)), 25),  # every user the run read failed: all are read again
    ],
)
def test_users_that_still_fail_when_a_run_goes_on_are_counted_and_listed_once(
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    failing: tuple[int, ...],
    interrupted_at: int,
) -> None:
    monkeypatch.setattr(backfill, "CHUNK", 20)
    app = stopped_after_failures(emulator, failing, interrupted_at)
    again = sync_users(app)
    assert again.exit_code == 1, again.output
    assert "the users changed" not in again.output  # it goes on: the users are as they were
    summary = again.output.splitlines()[-2]  # before the pointer to '--failures'
    assert re.match(rf"100 of 100 users done .*, {len(failing)} failed", summary), summary
    listed = sync_users(app, "--failures").output.splitlines()
    assert [line.split(":")[0] for line in listed] == [f"user {n}" for n in failing], listed
    synced = set(upserts_by_user(emulator))
    assert synced == {str(number) for number in range(100) if number not in failing}


def test_a_live_sync_meisa_accepts_while_a_chunk_is_read_is_not_undone(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 10)
    meisa: Meisa = app.extensions["meisa"]
    app.config["PEOPLE"][5].first_name = "Ada"

    def live_sync(user: Any) -> None:  # reaches Meisa before the chunk is queued
        meisa.upsert({"email": user.email, "custom_fields": {"plan": "pro"}})
        assert meisa.flush(10)

    upgrade_while_read(app, live_sync)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "pro"
    # The fields the live sync did not set are still sent.
    contact = emulator.contact(external_id="5")
    assert contact is not None and contact["first_name"] == "Ada"


def test_a_user_a_live_sync_sent_in_full_while_a_chunk_is_read_costs_no_backfill_call(
    emulator: Emulator,
) -> None:
    app = make_app(emulator, 10)
    meisa: Meisa = app.extensions["meisa"]

    def live_sync(user: Any) -> None:  # every field the backfill would send, accepted first
        meisa.upsert(user)
        assert meisa.flush(10)

    upgrade_while_read(app, live_sync)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert "1 unchanged" in result.output, result.output
    assert upserts_by_user(emulator) == {str(number): 1 for number in range(10)}
    assert plan_in_meisa(app, emulator, "5") == "pro"


def test_a_backfill_for_another_meisa_than_the_store_is_delivered_for_stores_nothing(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The server delivers from the host's store with the live key; the command runs beside
    # it with a test key in its environment: its upserts must not be sent to live Meisa.
    server = make_app(emulator, 0, MEISA_OUTBOX=str(tmp_path / "meisa-outbox.sqlite3"))
    meisa: Meisa = server.extensions["meisa"]
    try:
        with server.app_context():
            meisa.upsert({"email": "server@example.com", "external_id": "server"})
            assert meisa.flush(5)
        process = sync_users_process(emulator.url, emulator.test_key, 3, tmp_path)
        result = subprocess.run(**process, capture_output=True, text=True, timeout=60)
        with server.app_context():
            assert meisa.flush(5)
        assert [c["external_id"] for c in emulator.contacts("live")] == ["server"]
        assert result.returncode == 1, result.stderr
        assert "give each Meisa a MEISA_OUTBOX of its own" in result.stderr
    finally:
        meisa.close(server)


def test_a_backfill_after_a_switch_to_another_meisa_takes_delivery_over_first(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store was last delivered for a test key; no process delivers now; the command,
    # the host's first for the live key, starts delivery itself (as under the Flask CLI).
    outbox = str(tmp_path / "meisa-outbox.sqlite3")
    staging = make_app(emulator, 0, MEISA_API_KEY=emulator.test_key, MEISA_OUTBOX=outbox)
    with staging.app_context():
        staging.extensions["meisa"].upsert({"email": "s@example.com", "external_id": "s"})
        assert staging.extensions["meisa"].flush(5)
    staging.extensions["meisa"].close(staging)
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "true")
    app = make_app(emulator, 3, MEISA_OUTBOX=outbox)
    try:
        result = sync_users(app)
        assert result.exit_code == 0, result.output
        with app.app_context():
            assert app.extensions["meisa"].flush(5)
        assert upserts_by_user(emulator) == {"s": 1, "0": 1, "1": 1, "2": 1}
        assert sorted(c["external_id"] for c in emulator.contacts("live")) == ["0", "1", "2"]
    finally:
        app.extensions["meisa"].close(app)


@pytest.mark.parametrize("refused", ["revoked", "without contacts:write"])
def test_a_backfill_stops_once_meisa_refuses_an_upsert_for_its_key_in_a_row(
    emulator: Emulator, tmp_path: Path, refused: str
) -> None:
    # A revoked key (401), or one without contacts:write (403), refuses every upsert: the
    # run stops once one is refused REFUSALS_TO_STOP times, and what it had not sent is no
    # dead letter.
    if refused == "revoked":
        key, lacks = "meisa_live_revoked0000000000000000", "is revoked or invalid"
    else:
        key = emulator.create_key(["events:track", "emails:trigger", "contacts:read"])
        lacks = "has no contacts:write scope"
    outbox = str(tmp_path / "meisa-outbox.sqlite3")
    app = make_app(emulator, 3_000, MEISA_API_KEY=key, MEISA_OUTBOX=outbox, **QUICK_RETRY)
    try:
        result = sync_users(app)
        with app.app_context():
            status: DeliveryStatus = app.extensions["meisa"].status()
        shown = app.test_cli_runner().invoke(args=["meisa", "status"]).output
        listed = sync_users(app, "--failures").output
        planned = sync_users(app, "--dry-run").output.splitlines()[0]
    finally:
        app.extensions["meisa"].close(app)
    assert result.exit_code == 1, result.output
    assert f"the key (MEISA_API_KEY) {lacks}, so it would refuse every user" in result.output
    assert "Fix the key ('flask meisa ping' checks it), then run 'flask meisa sync-users'" in (
        result.output
    )
    # Who looks a day later sees why the run stopped, at which user, and what to do; as
    # under Celery, Meisa's answer is [status, code, message, user].
    assert status.backfill is not None
    http, _, _, user = status.backfill["refused"]
    assert http == (401 if refused == "revoked" else 403)
    assert user == "0", status.backfill["refused"]  # one delivery thread: the first user
    at = f"at user {user} (not synced, not failed: the next run reads it again)"
    assert f"The run stopped {at}; nothing more was sent" in result.output
    assert f"backfill: stopped {at}: Meisa refused its upserts (HTTP {http}" in shown
    assert f"the key {lacks}: fix it ('flask meisa ping' checks it)" in shown
    # '--failures' says it too, rather than "no failures".
    assert listed.startswith(f"the run stopped {at}: Meisa refused its upserts (HTTP "), listed
    assert f"the key {lacks}: fix it" in listed
    assert planned.startswith("3,000 users") and "done" not in planned, planned  # all again
    assert key not in shown
    assert "nothing more was sent, and its upserts not sent are no dead letters" in result.output
    assert key not in result.output
    calls = collections.Counter(r.body["external_id"] for r in emulator.requests_to(UPSERT))
    # One delivery thread: one upsert refused that many times, the others waiting for its
    # retries (not each refused in turn: a call a user for a key Meisa refuses them all).
    assert list(calls.values()) == [dead.REFUSALS_TO_STOP], calls
    assert (status.dead_letters, status.pending) == (0, 0)
    assert status.backfill is not None and not backfill.alive(status.backfill, time.time())

    fixed = make_app(emulator, 3_000, MEISA_OUTBOX=outbox)  # the live key, all its scopes
    try:
        again = sync_users(fixed)
        with fixed.app_context():
            after = fixed.extensions["meisa"].status().backfill
    finally:
        fixed.extensions["meisa"].close(fixed)
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1].startswith("3,000 of 3,000 users done")
    assert after is not None and "refused" not in after
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 3_000 and set(by_user.values()) == {1}


def test_a_user_source_that_raises_midway_stops_with_one_line_and_the_next_run_goes_on(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The query behind @meisa.users_to_sync fails at its 451st user (the database went
    # away): no traceback, nor "the delivery store failed" for an OSError of the query's,
    # but one line naming what raised and where; the chunks stored are kept, and the next
    # run goes on from them.
    app = make_app(emulator, 1000, MEISA_OUTBOX=str(tmp_path / "meisa-outbox.sqlite3"))
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]

    def users() -> Any:
        for read, person in enumerate(query(), start=1):
            if read == 451:
                raise ConnectionError("server closed the connection\n(background: ...)")
            yield person

    meisa.users_to_sync(users, count=count)
    try:
        result = sync_users(app)
        meisa.users_to_sync(query, count=count)
        again = sync_users(app)
    finally:
        meisa.close(app)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        "Error: @meisa.users_to_sync raised ConnectionError (server closed the connection)"
        " reading user #451: the run stopped there, what it stored is kept. Fix it, then run"
        " 'flask meisa sync-users' again to go on from where it stopped."
    )
    assert again.exit_code == 0, again.output
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 1000 and set(by_user.values()) == {1}


def database_down() -> Any:
    raise ConnectionError("could not connect to server\nIs the server running?")


@pytest.mark.parametrize("fails", ["query", "count", "len"])
def test_a_user_source_that_raises_before_the_run_stops_with_one_line_and_nothing_done(
    emulator: Emulator, tmp_path: Path, fails: str
) -> None:
    # The database is down as the command starts: the query, its count, or the len() of
    # what the query returned raises. One line naming it (no traceback), exit code 1, no
    # run kept; the next run, the source working again, syncs every user.
    app = make_app(emulator, 300, MEISA_OUTBOX=str(tmp_path / "meisa-outbox.sqlite3"))
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]
    sized = type("Sized", (list,), {"__len__": lambda users: database_down()})
    broken = {
        "query": (database_down, count),
        "count": (query, database_down),
        "len": (lambda: sized(query()), None),
    }
    meisa.users_to_sync(broken[fails][0], count=broken[fails][1])
    try:
        result = sync_users(app)
        with app.app_context():
            kept = meisa.status().backfill
        meisa.users_to_sync(query, count=count)
        again = sync_users(app)
    finally:
        meisa.close(app)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    what = "@meisa.users_to_sync" if fails == "query" else "the count of @meisa.users_to_sync"
    assert result.output == (
        f"Error: {what} raised ConnectionError (could not connect to server) before the run"
        " started: nothing was done. Fix it, then run 'flask meisa sync-users' again.\n"
    )
    assert kept is None and again.exit_code == 0, again.output
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 300 and set(by_user.values()) == {1}


def test_a_revoked_key_stops_a_backfill_in_seconds_at_the_default_retry_delay(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A revoked key is no fault that passes: at the default MEISA_RETRY_MAX_DELAY (30 s)
    # its refusals in a row kept the run at "0 done" for two minutes. It stops in seconds,
    # naming the status (not the key), and exits non-zero; the next run goes on.
    key, outbox = "meisa_live_revoked0000000000000000", str(tmp_path / "meisa-outbox.sqlite3")
    app = make_app(emulator, 300, MEISA_API_KEY=key, MEISA_OUTBOX=outbox)
    began = time.monotonic()
    try:
        result = sync_users(app)
    finally:
        app.extensions["meisa"].close(app)
    took = time.monotonic() - began
    assert result.exit_code == 1, result.output
    assert "(HTTP 401 [authentication_failed]" in result.output and key not in result.output
    assert took < (dead.REFUSALS_TO_STOP - 1) * dead.REFUSAL_DELAY + 5, took
    fixed = make_app(emulator, 300, MEISA_OUTBOX=outbox)
    try:
        again = sync_users(fixed)
    finally:
        fixed.extensions["meisa"].close(fixed)
    assert again.output.splitlines()[-1].startswith("300 of 300 users done"), again.output


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusal_for_a_moment_is_retried_and_the_backfill_goes_on(
    emulator: Emulator, status: int
) -> None:
    # A proxy answers 401 (or 403) for a moment, as during a deploy: the upsert refused is
    # retried until it is accepted, the run goes on, and nothing is lost or a dead letter.
    app = make_app(emulator, 300, **QUICK_RETRY)
    left = dead.REFUSALS_TO_STOP - 1
    emulator.faults.fail_next(left, status, path=UPSERT, match={"external_id": "7"})
    try:
        result = sync_users(app)
        with app.app_context():
            after = app.extensions["meisa"].status()
    finally:
        app.extensions["meisa"].close(app)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("300 of 300 users done"), result.output
    assert [r.status for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "7"] == [
        *[status] * left,
        201,
    ]
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 300 and set(by_user.values()) == {1}
    assert (after.dead_letters, after.pending) == (0, 0)
    assert after.backfill is not None and "refused" not in after.backfill


def test_a_key_refused_in_the_server_delivering_is_named_as_that_processs(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The key was fixed where the command runs, but the server delivering from the host's
    # store still has the old one: it is the key Meisa refuses, and the one to fix.
    key = emulator.create_key(["events:track", "emails:trigger", "contacts:read"])
    outbox = str(tmp_path / "meisa-outbox.sqlite3")
    server = make_app(emulator, 0, MEISA_API_KEY=key, MEISA_OUTBOX=outbox, **QUICK_RETRY)
    meisa: Meisa = server.extensions["meisa"]
    try:
        with server.app_context():
            meisa.track("opened", email="server@example.com")  # the server delivers
            assert meisa.flush(5)
        # The command's key has every scope.
        process = sync_users_process(emulator.url, emulator.live_key, 3, tmp_path)
        result = subprocess.run(**process, capture_output=True, text=True, timeout=60)
    finally:
        meisa.close(server)
    assert result.returncode == 1, result.stderr
    assert "has no contacts:write scope" in result.stderr, result.stderr
    assert f"the process delivering from the store (pid {os.getpid()})" in result.stderr
    assert "restart it" in result.stderr
    assert key not in result.stderr and emulator.live_key not in result.stderr


def test_a_finished_backfills_dead_letter_retried_with_a_refused_key_stays_a_dead_letter(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The run is over: no run stops, and none reads the user again; a retry refused for
    # the key leaves the letter where it was, with Meisa's answer, not deleted unsent.
    outbox = str(tmp_path / "meisa-outbox.sqlite3")
    app = make_app(emulator, 3, MEISA_OUTBOX=outbox)
    emulator.faults.fail_next(1, 400, path=UPSERT)
    try:
        assert sync_users(app).exit_code == 1
    finally:
        emulator.faults.clear()
        app.extensions["meisa"].close(app)
    key = emulator.create_key(["events:track", "emails:trigger", "contacts:read"])
    bad = make_app(emulator, 3, MEISA_API_KEY=key, MEISA_OUTBOX=outbox)
    try:
        retried = bad.test_cli_runner().invoke(args=["meisa", "dead-letters", "retry", "--all"])
        listed = bad.test_cli_runner().invoke(args=["meisa", "dead-letters", "list"]).output
    finally:
        bad.extensions["meisa"].close(bad)
    assert retried.output.splitlines()[-1] == "done; 1 dead letter(s) left", retried.output
    assert "HTTP 403 [missing_scope]" in listed
    assert len(upserts_by_user(emulator)) == 2


def test_a_stopped_runs_dead_letter_retried_with_a_refused_key_is_read_again_and_said_so(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The run stopped at a refused key, unfinished: a dead letter of it retried with the
    # key goes as its other upserts went, and the next run reads its user again; the
    # retry says so rather than a bare "0 dead letter(s) left".
    outbox = str(tmp_path / "meisa-outbox.sqlite3")
    key = emulator.create_key(["events:track", "emails:trigger", "contacts:read"])
    emulator.faults.fail_next(1, 400, path=UPSERT, match={"external_id": "0"})
    emulator.faults.fail_next(dead.REFUSALS_TO_STOP, 403, path=UPSERT, match={"external_id": "2"})
    app = make_app(emulator, 3, MEISA_OUTBOX=outbox, **QUICK_RETRY)
    try:
        assert "has no contacts:write scope" in sync_users(app).output
    finally:
        app.extensions["meisa"].close(app)
    bad = make_app(emulator, 3, MEISA_API_KEY=key, MEISA_OUTBOX=outbox, **QUICK_RETRY)
    try:
        retried = bad.test_cli_runner().invoke(args=["meisa", "dead-letters", "retry", "--all"])
    finally:
        bad.extensions["meisa"].close(bad)
    last = retried.output.splitlines()[-1]
    assert last.startswith("done; 0 dead letter(s) (the backfill stopped at an upsert"), last
    assert "the next 'flask meisa sync-users' reads their users again" in last
    fixed = make_app(emulator, 3, MEISA_OUTBOX=outbox)
    try:
        assert sync_users(fixed).exit_code == 0
    finally:
        fixed.extensions["meisa"].close(fixed)
    assert upserts_by_user(emulator) == {"0": 1, "1": 1, "2": 1}


def test_only_the_keys_refusals_in_a_row_stop_a_backfill(emulator: Emulator) -> None:
    # Two 503s, then the key refused one upsert four times, a 503, and a fifth refusal
    # after it: its failures of another kind are no refusals and break a row of them, so
    # the upsert goes on its ninth attempt and the run ends, nothing lost.
    bad = {"path": UPSERT, "match": {"external_id": "2"}}
    for n, status in ((2, 503), (dead.REFUSALS_TO_STOP - 1, 401), (1, 503), (1, 403)):
        emulator.faults.fail_next(n, status, **bad)  # type: ignore[arg-type]
    app = make_app(emulator, 3, **QUICK_RETRY)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    tried = [r.status for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "2"]
    assert tried == [503, 503, *[401] * (dead.REFUSALS_TO_STOP - 1), 503, 403, 201]
    assert upserts_by_user(emulator) == {"0": 1, "1": 1, "2": 1}


def test_a_refused_upserts_count_goes_with_it_when_a_live_sync_joins_it(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The key refused user 2's backfill upsert once; while it waits for its retry, the web
    # app syncs the user, which joins that row (live now), then delivered: the count of
    # its refusals kept in the store goes with it (it stayed, one more each such time).
    outbox = tmp_path / "meisa-outbox.sqlite3"
    app = make_app(emulator, 3, MEISA_OUTBOX=str(outbox), MEISA_RETRY_MAX_DELAY=1.0)
    meisa: Meisa = app.extensions["meisa"]
    emulator.faults.fail_next(1, 401, path=UPSERT, match={"external_id": "2"})
    joined = threading.Event()

    def live_sync() -> None:
        if emulator.wait_for(lambda e: 401 in [r.status for r in e.requests_to(UPSERT)], 10):
            with app.app_context():
                meisa.upsert(app.config["PEOPLE"][2], priority="high")
            joined.set()

    thread = threading.Thread(target=live_sync)
    thread.start()
    try:
        result = sync_users(app)
        thread.join()
        with app.app_context():
            assert meisa.flush(10)
    finally:
        meisa.close(app)
    assert joined.is_set() and result.exit_code == 0, result.output
    assert upserts_by_user(emulator) == {"0": 1, "1": 1, "2": 1}
    assert query(outbox, "SELECT * FROM meisa_meta WHERE name = 'backfill_refusals'") == []


def test_a_restart_after_a_run_stopped_at_a_refused_key_tells_meisa_again(
    emulator: Emulator,
) -> None:
    # '--restart' starts a run of its own, past MEISA_RESYNC_AFTER Meisa is told again:
    # a run stopped at a refused key is no run going on that it would go through again.
    app = make_app(emulator, 3, MEISA_RESYNC_AFTER=0.001, **QUICK_RETRY)  # sent: already old
    emulator.faults.fail_next(dead.REFUSALS_TO_STOP, 403, path=UPSERT, match={"external_id": "2"})
    stopped = sync_users(app)
    assert "has no contacts:write scope" in stopped.output, stopped.output
    assert upserts_by_user(emulator) == {"0": 1, "1": 1}
    again = sync_users(app, "--restart")
    assert again.exit_code == 0, again.output
    assert upserts_by_user(emulator) == {"0": 2, "1": 2, "2": 1}


@pytest.mark.parametrize("other", ["--dry-run", "--restart"])
def test_failures_refuses_the_options_of_a_run(emulator: Emulator, other: str) -> None:
    # '--failures' lists what the last run could not sync: it neither starts a run over
    # nor prints a plan, so an option of a run given with it is a mistake, not ignored.
    app = make_app(emulator, 3)
    result = sync_users(app, "--failures", other)
    assert result.exit_code == 2, result.output
    assert f"--failures only lists the last run's failures: no {other}" in result.output
    assert emulator.requests_to(UPSERT) == []


def test_a_backfill_stopped_by_a_refused_key_names_a_user_mapped_without_external_id(
    emulator: Emulator, tmp_path: Path
) -> None:
    outbox = str(tmp_path / "meisa-outbox.sqlite3")
    key = "meisa_live_revoked0000000000000000"
    app = make_app(emulator, 3, MEISA_API_KEY=key, MEISA_OUTBOX=outbox, **QUICK_RETRY)
    app.extensions["meisa"].contact_mapper(lambda user: {"email": user.email})
    try:
        result = sync_users(app)
        with app.app_context():
            status: DeliveryStatus = app.extensions["meisa"].status()
    finally:
        app.extensions["meisa"].close(app)
    assert result.exit_code == 1, result.output
    assert status.backfill is not None
    assert status.backfill["refused"][3] == "user0@example.com", status.backfill["refused"]
    assert "The run stopped at user user0@example.com (not synced" in result.output


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["term", "hup"])
def test_a_backfill_stopped_with_sigterm_is_noted_stopped_and_a_rerun_starts_at_once(
    emulator_factory: Callable[..., Emulator], tmp_path: Path, stop: int
) -> None:
    # SIGTERM (a redeploy, kill, docker stop) and SIGHUP (the SSH session of a run that
    # takes days closed) are stops as Ctrl+C is: the run is noted stopped, so the next
    # one goes on at once rather than being refused for 90 s.
    emulator = emulator_factory(rate_limit=None)
    emulator.faults.set(latency=0.002)
    process = sync_users_process(emulator.url, emulator.live_key, 1000, tmp_path / "instance")
    first = subprocess.Popen(**process, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 100, timeout=60)
        first.send_signal(stop)
        _, stopped = first.communicate(timeout=30)
    finally:
        first.kill()
        first.wait(30)
    assert first.returncode == 130 and b"interrupted" in stopped, (first.returncode, stopped)
    second = subprocess.run(**process, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert len(upserts_by_user(emulator)) == 1000


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["pipe-closed", "then-ctrl-c"])
def test_a_backfill_whose_output_reader_is_gone_stops_noted_stopped_and_a_rerun_goes_on(
    emulator_factory: Callable[..., Emulator], tmp_path: Path, ctrl_c: bool
) -> None:
    # 'flask meisa sync-users 2>&1 | head -1': the reader of its progress lines is gone,
    # maybe with a Ctrl+C (head dies of it first). The run stops at its next line, as
    # at a closed terminal, noted stopped (not left "running" with its summary unwritten),
    # with exit code 1; the next run goes on, each user sent once.
    emulator = emulator_factory(rate_limit=None)
    emulator.faults.set(latency=0.002)
    process = sync_users_process(emulator.url, emulator.live_key, 1000, tmp_path / "instance")
    first = subprocess.Popen(**process, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert first.stderr is not None and b"users done" in first.stderr.readline()
        first.stderr.close()  # the next progress line (a second on) meets a broken pipe
        if ctrl_c:
            first.send_signal(signal.SIGINT)
        first.wait(30)
    finally:
        first.kill()
        first.wait(30)
    assert first.returncode == 1  # (the reader gone, "interrupted" cannot be said either)
    run = StoreBackfill(Store(str(store_path(tmp_path / "instance")))).load()
    assert run is not None and run.state == "running" and run.alive_at is None, run
    second = subprocess.run(**process, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 1000 and set(by_user.values()) == {1}


@pytest.mark.parametrize("stderr", ["2</dev/null", "2>&-"], ids=["read-only", "closed"])
def test_a_backfill_whose_stderr_takes_no_line_runs_to_its_end(
    emulator: Emulator, tmp_path: Path, stderr: str
) -> None:
    # 'flask meisa sync-users 2</dev/null' (for 2>/dev/null): each progress line failed
    # (EBADF), taken for a store failure; the run stopped at user 0, and so did every
    # rerun. A stderr that takes no line is as 2>/dev/null (closed, it already was): the
    # run goes on to its end.
    process = sync_users_process(emulator.url, emulator.live_key, 300, tmp_path / "instance")
    process["args"] = ["sh", "-c", f'exec "$@" {stderr}', "sh", *process["args"]]
    done = subprocess.run(**process, stdout=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1].startswith("300 of 300 users done"), done.stdout
    assert len(upserts_by_user(emulator)) == 300


def test_a_second_ctrl_c_as_the_exit_hook_delivers_ends_the_command_without_a_traceback(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    # Ctrl+C: "interrupted", then the exit hook delivers what waits for up to
    # MEISA_FLUSH_TIMEOUT (60 s here). A second Ctrl+C there ended it with a traceback from
    # the atexit callback; it ends it at once with one line, and the next run goes on.
    emulator = emulator_factory(rate_limit=None)
    emulator.faults.set(latency=0.02)
    process = sync_users_process(emulator.url, emulator.live_key, 300, tmp_path / "instance")
    process["env"]["BACKFILL_FLUSH_TIMEOUT"] = "60"
    first = subprocess.Popen(**process, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 20, timeout=60)
        emulator.faults.set(latency=0.5)  # the run cannot end before the Ctrl+C, however slow
        first.send_signal(signal.SIGINT)  # this test process is on a loaded machine
        assert first.stderr is not None
        while b"interrupted" not in (line := first.stderr.readline()):
            assert line, "no 'interrupted' line"
        answered = len(emulator.requests_to(UPSERT))  # the exit hook then answers more
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= answered + 3, 30)
        first.send_signal(signal.SIGINT)
        _, said = first.communicate(timeout=15)
    finally:
        first.kill()
        first.wait(30)
        if first.stderr is not None:  # (left open by a failure, it warns in a later test)
            first.stderr.close()
    assert first.returncode == 130 and b"Traceback" not in said, said.decode()
    assert said.decode().splitlines() == [
        "meisa: exit interrupted: what is pending stays in a file outbox only"
    ]
    emulator.faults.set(latency=0.0)
    second = subprocess.run(**process, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert len(upserts_by_user(emulator)) == 300


def test_a_live_sync_in_flight_while_a_chunk_is_queued_is_not_undone(
    emulator: Emulator,
) -> None:
    # The user is read, then upgraded and synced live; that call is still in flight when
    # the chunk is queued: the backfill's upsert, read before it, must not go after it.
    app = make_app(emulator, 10)
    meisa: Meisa = app.extensions["meisa"]

    def live_sync(user: Any) -> None:
        emulator.faults.set(latency=1.0)  # this call only: the rest are made after it
        meisa.upsert(user, priority="high")
        assert wait_until(lambda: meisa.status().in_flight == 1, 10)
        emulator.faults.set(latency=0.0)

    upgrade_while_read(app, live_sync)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "pro", [
        r.body for r in emulator.requests_to(UPSERT) if r.body.get("external_id") == "5"
    ]


def test_a_live_sync_between_a_page_read_and_its_chunk_is_not_undone(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The query reads a page of users ahead of the chunks (500 a page, as integrating.md
    # shows, against chunks of 200): user 25 is upgraded and synced live while the first
    # chunk is read, after its page was; its chunk, read later, holds it as it was.
    monkeypatch.setattr(backfill, "CHUNK", 20)
    app = make_app(emulator, 40)
    meisa: Meisa = app.extensions["meisa"]
    people = app.config["PEOPLE"]
    _, count = meisa.user_source  # type: ignore[misc]

    def users() -> Any:
        page = [copy.copy(people[n]) for n in sorted(people)]
        for read, row in enumerate(page):
            if read == 5:
                people[25].plan = "pro"
                with app.app_context():
                    meisa.upsert(people[25])
                    assert meisa.flush(10)
            yield row

    meisa.users_to_sync(users, count=count)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "25") == "pro"


def test_a_backfill_at_the_default_budget_stores_minutes_of_upserts_not_hours(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    # 950 backfill calls an hour: 1,000 rows stored ahead would wait an hour, and be sent
    # as the users were then. No more than 5 minutes' calls (79 rows) wait before a chunk.
    emulator = emulator_factory(rate_limit=None)
    process = sync_users_process(emulator.url, emulator.live_key, 3000, tmp_path / "instance")
    process["env"]["BACKFILL_RATE_LIMIT"] = "60/minute;1000/hour"
    run = subprocess.Popen(**process, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None and "3,000 users at ~950/hour" in run.stdout.readline()
        # The first calls, paced: by the second the run has read all it may (or 1,200).
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 2, timeout=30)
        target = StoreBackfill(Store(str(tmp_path / "instance" / "meisa-outbox.sqlite3")))
        kept = target.load()
        waiting, _ = target.backlog()
    finally:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
    assert kept is not None
    assert kept.position <= 2 * 79, kept.position
    assert waiting <= 2 * 79


@pytest.mark.parametrize("counted", [300, 800])
def test_a_count_that_is_not_the_number_of_users_is_not_reported_as_such(
    emulator: Emulator, counted: int
) -> None:
    # A count of other rows than the query's (active users only, or a join that repeats
    # some): 500 users read were "500 of 300 done", with no time left while some were.
    app = make_app(emulator, 500)
    meisa: Meisa = app.extensions["meisa"]
    query, _ = meisa.user_source  # type: ignore[misc]
    meisa.users_to_sync(query, count=lambda: counted)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(f"{counted} users")
    for line in result.output.splitlines()[1:]:
        done = re.match(r"([\d,]+) of ([\d,]+) users done", line)
        assert done is None or int(done[1].replace(",", "")) <= int(done[2].replace(",", ""))
    assert result.output.splitlines()[-1].startswith("500 of 500 users done")
    status = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert "backfill: done, 500 of 500 users read" in status
    assert len(upserts_by_user(emulator)) == 500
