"""``flask meisa sync-users`` and logins under Celery, end to end (a real Redis, real
``celery worker`` processes, the emulator): a backfill published on the backfill queue a
chunk at a time with back-pressure, resumable, within its share of the shared budget and
behind live work, skipping the users Meisa already has; and logins that change nothing
synced make no call."""

from __future__ import annotations

import collections
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery  # type: ignore[import-untyped]
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine import backfill
from flask_meisa._engine import dead
from flask_meisa._engine.celery_worker import lane_queues
from flask_meisa._engine.redis_store import RedisDeliveryStore
from flask_meisa.emulator import Emulator
from flask_meisa.testing import emulator_config
from tests.backfill_app import create_app
from tests.backfill_app import hold_after_first_chunk
from tests.backfill_app import interrupt_first_run
from tests.backfill_app import live_sync_retried
from tests.backfill_app import upgrade_while_read
from tests.celery_support import HUNG
from tests.celery_support import StartWorker
from tests.celery_support import make_celery
from tests.celery_support import outcomes
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.celery_support import start_worker_fixture  # noqa: F401
from tests.process_support import wait_until

UPSERT = "/contacts/upsert/"
#: A worker's refused upserts retried at once (a stopped run takes REFUSALS_TO_STOP).
QUICK_RETRY = json.dumps({"MEISA_RETRY_MAX_DELAY": 0.01})

MakeApp = Callable[..., Flask]


@pytest.fixture
def make_app(emulator: Emulator, redis_url: str) -> Iterator[MakeApp]:
    """``make_app(users, **config)``: the backfill app delivering through Celery on the
    test's Redis; closed after."""
    made: list[tuple[Flask, Celery]] = []

    def make(users: int, **config: Any) -> Flask:
        celery_app = make_celery(redis_url)
        settings = emulator_config(
            emulator, MEISA_DELIVERY="celery", MEISA_CELERY_APP=celery_app, **config
        )
        app = create_app(settings, users=users)
        made.append((app, celery_app))
        return app

    yield make
    for app, celery_app in made:
        app.extensions["meisa"].close(app, timeout=0)
        celery_app.close()


def start_workers(start_worker: StartWorker, emulator: Emulator, **env: str) -> None:
    workers = [start_worker(emulator, wait=False, concurrency=4, **env) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()


def upserts_by_user(emulator: Emulator) -> collections.Counter[str]:
    return collections.Counter(
        r.body["external_id"] for r in emulator.requests_to(UPSERT) if r.status in (200, 201)
    )


def sync_users(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["meisa", "sync-users", *args])


def test_a_backfill_goes_a_chunk_at_a_time_and_a_rerun_makes_no_call(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    start_workers(start_worker, emulator)
    app = make_app(1_500)
    meisa: Meisa = app.extensions["meisa"]
    most_waiting = 0
    watching = True

    def watch() -> None:
        nonlocal most_waiting
        with app.app_context():
            while watching:
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
    assert result.output.splitlines()[0] == "1,500 users, no budget set: as fast as Meisa answers"
    assert "1,500 of 1,500 users done" in result.output.splitlines()[-1]
    print("most backfill upserts waiting at once:", most_waiting)
    assert 0 < most_waiting <= backfill.HIGH_WATER + backfill.CHUNK
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 1_500 and set(by_user.values()) == {1}
    with app.app_context():
        status = meisa.status()
    assert (status.dropped, status.failed, status.pending) == (0, 0, 0)
    assert status.backfill is not None
    assert (status.backfill["state"], status.backfill["position"]) == ("done", 1_500)
    shown = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert "backfill: done, 1500 of 1500 users read, 0 unchanged, 0 failed" in shown

    emulator.clear_requests()
    again = sync_users(app)
    assert again.exit_code == 0, again.output
    assert "1,500 unchanged" in again.output
    assert emulator.requests == []  # Meisa has every user's state: no call at all


def test_an_interrupted_backfill_goes_on_where_it_stopped(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    start_workers(start_worker, emulator)
    app = make_app(1_000)
    interrupt_first_run(app, at=700)  # Ctrl-C while the fourth chunk is read
    first = sync_users(app)
    assert first.exit_code == 130, first.output
    assert "run the command again" in first.output
    second = sync_users(app)
    assert second.exit_code == 0, second.output
    assert "1,000 of 1,000 users done" in second.output.splitlines()[-1]
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 1_000 and set(by_user.values()) == {1}


def test_users_that_cannot_be_mapped_or_were_refused_are_counted_and_listed(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    start_workers(start_worker, emulator)
    app = make_app(50)
    people = app.config["PEOPLE"]
    people[7].email = None
    people[9].plan = {"not", "json"}
    emulator.faults.fail_next(1, 400, path=UPSERT)  # and Meisa refuses one upsert
    result = sync_users(app)
    assert result.exit_code == 1
    assert "50 of 50 users done" in result.output and "3 failed" in result.output
    assert "flask meisa sync-users --failures" in result.output
    assert len(upserts_by_user(emulator)) == 47
    listed = sync_users(app, "--failures").output.splitlines()
    assert listed[:2] == [
        "user 7: email: the user object has None as its email",
        "user 9: custom_fields.plan: cannot be sent as JSON (set)",
    ]
    assert re.fullmatch(r"user \d+: HTTP 400 \[injected_fault\] .* \(dead letter \d+\)", listed[2])
    assert len(listed) == 3
    # 'flask meisa status' counts the same failures as the run said.
    shown = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert "backfill: done, 50 of 50 users read, 0 unchanged, 3 failed" in shown, shown


def test_a_refusal_counts_in_its_own_run_after_an_earlier_runs_refusal(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    start_workers(start_worker, emulator)
    app = make_app(2)
    for _ in range(2):  # the second run upserts the user the first could not: refused again
        emulator.faults.fail_next(1, 400, path=UPSERT)
        result = sync_users(app)
        assert result.exit_code == 1 and "1 failed" in result.output, result.output
    assert len(upserts_by_user(emulator)) == 1


def test_a_backfill_stops_once_meisa_refuses_an_upsert_for_its_key_in_a_row(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # A key without contacts:write refuses every upsert: the run stops once one is refused
    # REFUSALS_TO_STOP times; the upserts published and not yet sent are not sent, nor
    # dead letters.
    key = emulator.create_key(["events:track", "emails:trigger", "contacts:read"])
    env = {"MEISA_TEST_KEY": key, "MEISA_TEST_CONFIG": QUICK_RETRY}
    workers = [start_worker(emulator, wait=False, concurrency=4, **env) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    app = make_app(1_500, MEISA_API_KEY=key)
    result = sync_users(app)
    assert result.exit_code == 1, result.output
    assert (
        "the key (MEISA_API_KEY) of the Celery workers (they call Meisa) has no" in result.output
    )
    assert "contacts:write scope, so it would refuse every user" in result.output
    assert "Fix it there, restart them, then run 'flask meisa sync-users' again" in result.output
    with app.app_context():
        assert app.extensions["meisa"].flush(30)
        status = app.extensions["meisa"].status()
    assert (status.dead_letters, status.pending) == (0, 0)
    assert status.backfill is not None
    http, code, _, user = status.backfill["refused"]  # as the docs say, under both engines
    assert (http, code) == (403, "missing_scope") and user.isdigit(), status.backfill
    shown = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert re.search(
        r"backfill: stopped at user \d+ \(.*\): Meisa refused its upserts \(HTTP 403", shown
    )
    # One upsert refused that many times; others, taken meanwhile, fewer.
    calls = collections.Counter(r.body["external_id"] for r in emulator.requests_to(UPSERT))
    assert max(calls.values()) == dead.REFUSALS_TO_STOP, calls
    for worker in workers:
        worker.stop()

    start_workers(start_worker, emulator)  # the key fixed
    again = sync_users(make_app(1_500))
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1].startswith("1,500 of 1,500 users done")
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 1_500 and set(by_user.values()) == {1}


def test_the_upsert_that_stops_the_run_is_no_failure_and_its_user_is_named(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp, redis_url: str
) -> None:
    # Meisa refuses user 1's upsert for the key until the run stops: no dead letter, and
    # no refused upsert either (the next run reads that user again); both messages say so.
    emulator.faults.fail_next(dead.REFUSALS_TO_STOP, 403, path=UPSERT, match={"external_id": "1"})
    start_worker(emulator, concurrency=1, MEISA_TEST_CONFIG=QUICK_RETRY)
    app = make_app(3)
    result = sync_users(app)
    assert result.exit_code == 1, result.output
    at = "at user 1 (not synced, not failed: the next run reads it again)"
    assert f"The run stopped {at}; nothing more was sent" in result.output, result.output
    shown = app.test_cli_runner().invoke(args=["meisa", "status"]).output
    assert f"backfill: stopped {at}: Meisa refused its upserts (HTTP 403" in shown, shown
    client = redis.Redis.from_url(redis_url)
    try:
        assert RedisDeliveryStore(client, "meisa").counters().get("backfill_refused", 0) == 0
    finally:
        client.close()


def test_a_refusal_for_a_moment_is_retried_and_the_backfill_goes_on(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # A proxy answers 401 for a moment, as during a deploy: the upsert refused is retried
    # until it is accepted, the run goes on, and nothing is lost or a dead letter.
    start_workers(start_worker, emulator, MEISA_TEST_CONFIG=QUICK_RETRY)
    app = make_app(300)
    left = dead.REFUSALS_TO_STOP - 1
    emulator.faults.fail_next(left, 401, path=UPSERT, match={"external_id": "7"})
    result = sync_users(app)
    with app.app_context():
        after = app.extensions["meisa"].status()
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("300 of 300 users done"), result.output
    assert [r.status for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "7"] == [
        *[401] * left,
        201,
    ]
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 300 and set(by_user.values()) == {1}
    assert (after.dead_letters, after.pending) == (0, 0)
    assert after.backfill is not None and "refused" not in after.backfill


def test_only_the_keys_refusals_in_a_row_stop_a_backfill(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # As on the thread engine: an upsert's failures of another kind (503) are no refusals
    # and break a row of them, so it goes on its ninth attempt and the run ends.
    start_workers(start_worker, emulator, MEISA_TEST_CONFIG=QUICK_RETRY)
    app = make_app(3)
    bad = {"path": UPSERT, "match": {"external_id": "2"}}
    for n, status in ((2, 503), (dead.REFUSALS_TO_STOP - 1, 401), (1, 503), (1, 403)):
        emulator.faults.fail_next(n, status, **bad)  # type: ignore[arg-type]
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    tried = [r.status for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "2"]
    assert tried == [503, 503, *[401] * (dead.REFUSALS_TO_STOP - 1), 503, 403, 201]
    assert upserts_by_user(emulator) == {"0": 1, "1": 1, "2": 1}


def test_a_second_run_is_refused_while_another_runs_and_the_first_goes_on(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # Two 'sync-users' at once on one Redis: the second is refused, saying when the first
    # last noted it runs; the first goes on undisturbed.
    app = make_app(600)
    meisa: Meisa = app.extensions["meisa"]
    go_on = hold_after_first_chunk(meisa)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(sync_users(app)))
    first.start()
    try:
        with app.app_context():
            assert wait_until(lambda: (meisa.status().backfill or {}).get("position") == 200)
            before = meisa.status().backfill
        second = sync_users(make_app(600))
        with app.app_context():
            after = meisa.status().backfill
    finally:
        go_on.set()
    start_workers(start_worker, emulator)
    first.join(60)
    assert second.exit_code == 1, second.output
    assert "another 'flask meisa sync-users' runs the backfill" in second.output
    assert "from another, once it has not noted it runs for 90 s" in second.output
    assert after == before
    assert results[0].exit_code == 0, results[0].output
    assert results[0].output.splitlines()[-1].startswith("600 of 600 users done")
    by_user = upserts_by_user(emulator)
    assert len(by_user) == 600 and set(by_user.values()) == {1}


def test_of_two_runs_started_at_the_same_moment_one_starts(make_app: MakeApp) -> None:
    # Each run reads in Redis that none runs, then notes it runs: two started at once both
    # read none, both started, and both moved the run's position.
    apps = [make_app(10), make_app(10)]
    targets = []
    for app in apps:
        with app.app_context():
            targets.append(app.extensions["meisa"].state().dispatcher.backfill())
    both = 0
    barrier = threading.Barrier(2)
    started: list[backfill.Target] = []

    def start(target: backfill.Target) -> None:
        barrier.wait(10)
        with contextlib.suppress(backfill.AlreadyRunning):
            target.save(backfill.Run(time.time(), alive_at=time.time()), start=True)
            started.append(target)

    for _ in range(30):
        targets[0].save(backfill.Run(started_at=time.time()))  # none runs
        started.clear()
        threads = [threading.Thread(target=start, args=(target,)) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert started
        both += len(started) == 2
    assert both == 0


def test_a_finished_backfills_dead_letter_retried_with_a_refused_key_stays_a_dead_letter(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # The run is over: none reads the user again, so the retry refused for the key keeps
    # the letter, with Meisa's answer, instead of dropping it unsent.
    worker = start_worker(emulator)
    emulator.faults.fail_next(1, 400, path=UPSERT)
    app = make_app(3)
    assert sync_users(app).exit_code == 1
    emulator.faults.clear()
    worker.stop()
    key = emulator.create_key(["events:track", "emails:trigger", "contacts:read"])
    start_worker(emulator, MEISA_TEST_KEY=key)
    bad = make_app(3, MEISA_API_KEY=key)
    retried = bad.test_cli_runner().invoke(args=["meisa", "dead-letters", "retry", "--all"])
    assert retried.output.splitlines()[-1] == "done; 1 dead letter(s) left", retried.output
    listed = bad.test_cli_runner().invoke(args=["meisa", "dead-letters", "list"]).output
    assert "HTTP 403 [missing_scope]" in listed
    assert len(upserts_by_user(emulator)) == 2


def test_a_live_sync_coalesced_with_a_backfill_upsert_is_sent_though_the_run_stopped(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # Meisa refuses the first backfill upsert for the key (a 403 each time it is retried):
    # the run stops, and the workers skip its upserts published. A user's live sync joined
    # to one of them is no backfill's: it goes to Meisa (the key works again), not skipped.
    app = make_app(3)
    meisa: Meisa = app.extensions["meisa"]
    refusals = dead.REFUSALS_TO_STOP
    emulator.faults.fail_next(refusals, 403, path=UPSERT, match={"external_id": "0"})
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(sync_users(app)))
    runner.start()  # no worker yet: its three upserts wait in the backfill queue
    with app.app_context():
        assert wait_until(lambda: meisa.status().queued["backfill"] == 3)
        user = app.config["PEOPLE"][2]
        user.plan = "pro"
        meisa.upsert(user)  # the web app syncs the upgrade: joined to the backfill's upsert
    # A worker of the backfill queue takes the run's upserts first.
    backfill_queue = lane_queues()["backfill"]
    start_worker(emulator, concurrency=1, queues=backfill_queue, MEISA_TEST_CONFIG=QUICK_RETRY)
    runner.join(60)
    assert "has no contacts:write scope" in results[0].output, results[0].output
    start_worker(emulator)
    with app.app_context():
        assert meisa.flush(30)
    contact = emulator.contact(external_id="2")
    assert contact is not None and contact["custom_fields"]["plan"] == "pro"


def test_the_share_option_keeps_part_of_the_budget_for_live_work(
    emulator_factory: Callable[..., Emulator], start_worker: StartWorker, make_app: MakeApp
) -> None:
    emulator = emulator_factory(rate_limit=None)
    start_workers(start_worker, emulator, MEISA_TEST_RATE_LIMIT="40/second")
    app = make_app(60, MEISA_RATE_LIMIT="40/second")
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


def test_live_work_goes_ahead_of_a_backfill_at_the_full_budget(
    emulator_factory: Callable[..., Emulator], start_worker: StartWorker, make_app: MakeApp
) -> None:
    emulator = emulator_factory(rate_limit="20/second")
    start_workers(start_worker, emulator, MEISA_TEST_RATE_LIMIT="20/second")
    app = make_app(200, MEISA_RATE_LIMIT="20/second")
    meisa: Meisa = app.extensions["meisa"]
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(sync_users(app)))
    runner.start()
    try:
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 60, timeout=30)
        # A login sync of a new user and a password reset, made while the budget is spent.
        with app.app_context():
            login_at = time.time()
            meisa.upsert({"email": "live@example.com", "external_id": "live"})
            reset_at = time.time()
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
    login_wait, reset_wait = login_arrived - login_at, reset_arrived - reset_at
    print("waits behind the backfill:", round(login_wait, 3), round(reset_wait, 3))
    # Not behind the backlog (140 upserts, 7 s of the budget): counted in calls, as the
    # time a task takes to reach a worker depends on how busy the machine is, and the
    # backfill goes on at its pace meanwhile. Fewer than a second's worth went first.
    for asked, arrived in ((login_at, login_arrived), (reset_at, reset_arrived)):
        ahead = [
            r
            for r in emulator.requests_to(UPSERT)
            if asked < r.time < arrived and r.body["external_id"] != "live"
        ]
        assert len(ahead) < 20, (len(ahead), login_wait, reset_wait)
    assert 429 not in [r.status for r in emulator.requests]
    assert len(upserts_by_user(emulator)) == 201


def test_logins_that_change_no_synced_field_cost_nothing(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, make_app: MakeApp
) -> None:
    start_workers(start_worker, emulator)
    app = make_app(200)
    meisa: Meisa = app.extensions["meisa"]
    client = app.test_client()
    for _ in range(10):
        for number in range(200):
            client.post(f"/login/{number}", buffered=True)
        with app.app_context():
            assert meisa.flush(60)
    assert len(emulator.requests_to(UPSERT)) == 200  # the first login of each user only
    synced = [e["unchanged"] for e in outcomes(redis_url) if e["signal"] == "contact_synced"]
    assert synced.count(False) == 200 and synced.count(True) == 1_800
    with app.app_context():
        assert meisa.status().unchanged == 1_800


# -- what attacks on the backfill beside live syncs found ----------------------------------


def plan_in_meisa(app: Flask, emulator: Emulator, external_id: str) -> Any:
    """The plan Meisa holds for the user once everything pending is delivered."""
    with app.app_context():
        assert app.extensions["meisa"].flush(30)
    contact = emulator.contact(external_id=external_id)
    return None if contact is None else contact["custom_fields"]["plan"]


def test_a_backfill_upsert_coalesced_into_a_waiting_live_sync_never_undoes_it(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # The backfill read user 5 ("free") just before the upgrade; the live sync ("pro")
    # waits to retry after a 503 when the backfill's snapshot is coalesced into its record.
    slow_retry = '{"MEISA_RETRY_BASE_DELAY": 1.0, "MEISA_RETRY_MAX_DELAY": 1.0}'
    start_worker(emulator, MEISA_TEST_CONFIG=slow_retry)
    app = make_app(10)
    meisa: Meisa = app.extensions["meisa"]

    upgrade_while_read(app, live_sync_retried(meisa, emulator))
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "pro"


def test_a_login_of_a_user_whose_backfill_upsert_waits_goes_ahead_of_the_backfill(
    emulator_factory: Callable[..., Emulator], start_worker: StartWorker, make_app: MakeApp
) -> None:
    # Meisa knows every user (a first run): a login of one is a routine sync, coalesced
    # into the user's backfill upsert of a second run that re-sends every user.
    emulator = emulator_factory(rate_limit="20/second")
    resync = '{"MEISA_RESYNC_AFTER": 1}'
    start_workers(
        start_worker, emulator, MEISA_TEST_RATE_LIMIT="20/second", MEISA_TEST_CONFIG=resync
    )
    app = make_app(100, MEISA_RATE_LIMIT="20/second", MEISA_RESYNC_AFTER=1)
    assert sync_users(app).exit_code == 0
    time.sleep(1.1)
    emulator.clear_requests()
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(sync_users(app)))
    runner.start()
    try:
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) >= 30, timeout=30)
        # The backfill goes about in the users' order, not exactly (on a busy machine,
        # users 75-90 were seen delivered before 19): the login is of the last user
        # whose upsert still waits.
        synced = upserts_by_user(emulator)
        user = str(max(n for n in range(100) if str(n) not in synced))
        login_at = time.time()
        app.test_client().post(f"/login/{user}", buffered=True)
        assert emulator.wait_for(lambda e: user in upserts_by_user(e), timeout=30)
        arrived = next(
            r.time for r in emulator.requests_to(UPSERT) if r.body["external_id"] == user
        )
        behind = len(upserts_by_user(emulator))
    finally:
        runner.join(60)
    assert outcome and outcome[0].exit_code == 0, outcome and outcome[0].output
    print("the login waited", round(arrived - login_at, 3), "s;", behind, "users synced by then")
    # Ahead of the backlog (some 70 upserts, over 3 s of the budget): counted in calls, as
    # the time a task takes to reach a worker depends on how busy the machine is, and the
    # backfill goes on at its pace meanwhile. Fewer than a second's worth went first.
    ahead = [
        r
        for r in emulator.requests_to(UPSERT)
        if login_at < r.time < arrived and r.body["external_id"] != user
    ]
    assert len(ahead) < 20, (len(ahead), arrived - login_at, behind)
    assert upserts_by_user(emulator)[user] == 1


def test_a_refused_upsert_coalesced_from_a_backfill_and_a_live_sync_is_one_refusal(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # User 5's live sync waits to retry after a 503 when the backfill's upsert of user 5
    # joins its record; Meisa refuses the one call made of both.
    slow_retry = '{"MEISA_RETRY_BASE_DELAY": 1.0, "MEISA_RETRY_MAX_DELAY": 2.0}'
    start_worker(emulator, MEISA_TEST_CONFIG=slow_retry)
    app = make_app(6)
    meisa: Meisa = app.extensions["meisa"]

    def live_sync_then_refuse(user: Any) -> None:
        # Its first call answered 503 with Retry-After: it waits 2 s to retry, however
        # busy the machine, for the backfill's upsert to join it (a backoff's jitter alone
        # can be a few ms).
        emulator.faults.fail_next(1, 503, path=UPSERT, retry_after=2.0)
        meisa.upsert(user, priority="high")
        assert emulator.wait_for(lambda e: len(e.requests_to(UPSERT)) == 1, 10)
        emulator.faults.fail_next(1, 400, path=UPSERT, match={"external_id": "5"})

    upgrade_while_read(app, live_sync_then_refuse)
    result = sync_users(app)
    assert [r.status for r in emulator.requests_to(UPSERT)].count(400) == 1
    assert len(emulator.requests_to(UPSERT)) == 7  # the 503, users 0-4, user 5 refused
    assert result.exit_code == 1, result.output
    assert "1 users were not synced" in result.output, result.output
    (listed,) = sync_users(app, "--failures").output.splitlines()  # the backfill's
    assert re.fullmatch(r"user 5: HTTP 400 \[injected_fault\] .* \(dead letter \d+\)", listed)


def test_a_refusal_counts_when_the_worker_that_got_it_dies_reporting_it(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp, redis_url: str
) -> None:
    # The worker hangs in the failure signal, after the claim is settled, and is killed: the
    # upsert's task runs again on another worker and finds its call made.
    timeouts = {"MEISA_TIMEOUT": 1.5, "MEISA_CONNECT_TIMEOUT": 0.5}
    quick = {"MEISA_TEST_VISIBILITY": "9", "MEISA_TEST_CONFIG": json.dumps(timeouts)}
    doomed = start_worker(
        emulator, pool="prefork", concurrency=1, MEISA_TEST_HANG_AFTER_FAILURE="1", **quick
    )
    app = make_app(3)
    emulator.faults.fail_next(1, 400, path=UPSERT, match={"external_id": "1"})
    done: list[Any] = []
    run = threading.Thread(target=lambda: done.append(sync_users(app)))
    run.start()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.blpop([HUNG], timeout=30) is not None
    finally:
        client.close()
    doomed.kill()
    start_worker(emulator, **quick)
    run.join(60)
    (result,) = done
    assert result.exit_code == 1, result.output
    assert "1 users were not synced" in result.output, result.output
    assert len(emulator.requests_to(UPSERT)) == 3


def test_a_live_sync_meisa_accepts_while_a_chunk_is_read_is_not_undone(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    start_worker(emulator)
    app = make_app(10)
    meisa: Meisa = app.extensions["meisa"]

    def live_sync(user: Any) -> None:  # reaches Meisa before the chunk is queued
        meisa.upsert(user, priority="high")
        assert meisa.flush(10)

    upgrade_while_read(app, live_sync)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "pro"


def test_a_live_sync_in_flight_as_its_users_backfill_upsert_is_queued_is_not_undone(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp
) -> None:
    # The user is read, then upgraded and synced live; that call is still in flight when
    # the chunk is queued: the backfill's upsert joins the live one's record (not yet
    # settled), the live fields winning, so no call carries the older plan.
    start_worker(emulator)
    app = make_app(10)
    meisa: Meisa = app.extensions["meisa"]

    def live_sync(user: Any) -> None:
        emulator.faults.set(latency=1.0)  # this call only: the rest are made after it
        meisa.upsert(user, priority="high")
        assert wait_until(lambda: meisa.status().in_flight == 1, 10)
        emulator.faults.set(latency=0.0)

    upgrade_while_read(app, live_sync)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "pro"
    sent = [r.body for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "5"]
    assert {body["custom_fields"]["plan"] for body in sent} == {"pro"}, sent


class HoldingProxy:
    """A TCP proxy to the Redis of ``redis_url``: once a client sends a command naming
    ``marker``, ``seen`` is set and that connection's next command waits until ``go_on`` is
    set (the reply to the marked one goes through meanwhile). Closed by :meth:`close`."""

    def __init__(self, redis_url: str, marker: bytes) -> None:
        self.upstream = redis.connection.parse_url(redis_url)
        self.marker, self.seen, self.go_on = marker, threading.Event(), threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                upstream = socket.create_connection((self.upstream["host"], self.upstream["port"]))
                self.sockets += [client, upstream]
                threading.Thread(target=self._pipe, args=(client, upstream, True)).start()
                threading.Thread(target=self._pipe, args=(upstream, client, False)).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, commands: bool) -> None:
        held = False
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if held:
                    self.go_on.wait(60)
                    held = False
                sink.sendall(data)
                if commands and self.marker in data and not self.seen.is_set():
                    self.seen.set()
                    held = True
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Let everything through and close every connection."""
        self.go_on.set()
        for each in self.sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()


@contextlib.contextmanager
def run_as_user_5_changes(
    emulator: Emulator,
    start_worker: StartWorker,
    make_app: MakeApp,
    redis_url: str,
    change: Callable[[Any], None],
) -> Iterator[Flask]:
    """Run ``sync-users`` of 10 users, holding it once it has read what Meisa has of user
    5 (nothing) until the user was changed by ``change`` and that sync delivered; the app
    (its Redis behind the proxy, open until the block's end)."""
    start_worker(emulator)
    client = redis.Redis.from_url(redis_url)
    contact = RedisDeliveryStore(client, "meisa").contact_of({"external_id": "5"})
    client.close()
    proxy = HoldingProxy(redis_url, f"meisa:meisa:known:{{{contact}}}".encode())
    results: list[Any] = []
    try:
        app = make_app(10, MEISA_CELERY_REDIS_URL=proxy.url)
        meisa: Meisa = app.extensions["meisa"]
        runner = threading.Thread(target=lambda: results.append(sync_users(app)))
        runner.start()
        try:
            assert proxy.seen.wait(30)
            user = app.config["PEOPLE"][5]
            change(user)
            with app.app_context():
                meisa.upsert(user, priority="high")
                assert meisa.flush(10)
        finally:
            proxy.go_on.set()
            runner.join(60)
        assert results and results[0].exit_code == 0, results and results[0].output
        yield app
    finally:
        proxy.close()


def test_a_live_sync_meisa_accepts_as_its_users_backfill_upsert_is_queued_is_not_undone(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp, redis_url: str
) -> None:
    # The run has read what Meisa has of user 5 (nothing), as it queues the chunk that read
    # user 5 on the free plan; then the user upgrades, and the live sync is answered and
    # its record settled before the backfill's upsert joins the record.
    def upgrade(user: Any) -> None:
        user.plan = "pro"

    with run_as_user_5_changes(emulator, start_worker, make_app, redis_url, upgrade) as app:
        assert plan_in_meisa(app, emulator, "5") == "pro", [
            r.body for r in emulator.requests_to(UPSERT) if r.body.get("external_id") == "5"
        ]


def test_a_user_who_moved_address_as_their_backfill_upsert_is_queued_keeps_the_new_one(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp, redis_url: str
) -> None:
    # As above, the live sync also moves user 5 to another address: nothing of the
    # backfill's upsert is newer than it, so none goes (not the former address alone).
    def move(user: Any) -> None:
        user.plan, user.email = "pro", "moved5@example.com"

    with run_as_user_5_changes(emulator, start_worker, make_app, redis_url, move) as app:
        assert plan_in_meisa(app, emulator, "5") == "pro"
    sent = [r.body for r in emulator.requests_to(UPSERT) if r.body.get("external_id") == "5"]
    moved = emulator.contact(external_id="5")
    assert moved is not None and moved["email"] == "moved5@example.com", sent


def test_an_upsert_left_out_as_it_is_queued_counts_as_unchanged_not_queued(
    emulator: Emulator, start_worker: StartWorker, make_app: MakeApp, redis_url: str
) -> None:
    # Meisa accepted user 5's upgrade after the run read the user, before its upsert joined
    # the record: nothing of it is newer, none is sent, and the run's counts say so.
    def upgrade(user: Any) -> None:
        user.plan = "pro"

    changed = run_as_user_5_changes(emulator, start_worker, make_app, redis_url, upgrade)
    with changed as app, app.app_context():
        run = app.extensions["meisa"].status().backfill
    assert run is not None and (run["queued"], run["skipped"]) == (9, 1), run


def step_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """This process's clock (the command's host's), ``seconds`` off the workers' and Redis's."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_a_run_on_a_host_whose_clock_is_ahead_never_undoes_a_live_sync(
    emulator: Emulator,
    start_worker: StartWorker,
    make_app: MakeApp,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The live sync Meisa accepted after the run read user 5 is dated by a worker's clock,
    # two minutes behind the command's: it seemed older than the read.
    def upgrade(user: Any) -> None:
        user.plan = "pro"

    step_clock(monkeypatch, 120.0)
    with run_as_user_5_changes(emulator, start_worker, make_app, redis_url, upgrade) as app:
        assert plan_in_meisa(app, emulator, "5") == "pro"


def test_a_run_on_a_host_whose_clock_is_behind_sends_what_changed_since_a_live_sync(
    emulator: Emulator,
    start_worker: StartWorker,
    make_app: MakeApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Meisa accepted user 5's upgrade before the run; the user changed plan since, unsynced.
    # With the command's clock two minutes behind, the upgrade seemed newer than the read.
    start_worker(emulator)
    app = make_app(10)
    meisa: Meisa = app.extensions["meisa"]
    user = app.config["PEOPLE"][5]
    user.plan = "pro"
    with app.app_context():
        meisa.upsert(user, priority="high")
        assert meisa.flush(10)
    user.plan = "team"
    step_clock(monkeypatch, -120.0)
    result = sync_users(app)
    assert result.exit_code == 0, result.output
    assert plan_in_meisa(app, emulator, "5") == "team"


def test_a_run_is_never_taken_over_while_it_runs_whatever_the_command_hosts_clocks(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run is taken over once its process has not noted it runs for 3 ALIVE_EVERY (90 s),
    # as a killed one: each command host read its own clock, so a run noted by a host two
    # minutes behind, or checked by one two minutes ahead, was taken over while it ran.
    app = make_app(10)
    with app.app_context():
        target = app.extensions["meisa"].state().dispatcher.backfill()
    real, checked = time.time, []

    def users() -> Iterator[Any]:  # read as the run goes on: another command starts then
        for host_ahead_by in (0.0, 120.0):
            monkeypatch.setattr(time, "time", lambda by=host_ahead_by: real() + by)
            with pytest.raises(backfill.AlreadyRunning):
                target.save(backfill.Run(started_at=target.clock()), start=True)
            checked.append(host_ahead_by)
        yield object()

    def unmapped(user: Any) -> Any:
        raise ValueError("nothing to send")

    step_clock(monkeypatch, -120.0)  # the host of the run
    progress = backfill.run(target, users(), unmapped, total=1)
    assert checked == [0.0, 120.0]
    assert (progress.run.state, progress.run.failed) == ("done", 1)


def test_status_on_a_host_whose_clock_is_ahead_shows_a_run_that_runs_running(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(10)
    with app.app_context():
        target = app.extensions["meisa"].state().dispatcher.backfill()
    shown: list[str] = []

    def users() -> Iterator[Any]:  # read as the run goes on: the status is asked then
        step_clock(monkeypatch, 120.0)  # the host `flask meisa status` runs on
        shown.append(app.test_cli_runner().invoke(args=["meisa", "status"]).output)
        yield object()

    def unmapped(user: Any) -> Any:
        raise ValueError("nothing to send")

    backfill.run(target, users(), unmapped, total=1)
    assert "backfill: running" in shown[0], shown[0]


def test_a_second_run_refused_tells_how_long_ago_the_run_noted_it_runs_whatever_its_clock(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(10)
    with app.app_context():
        target = app.extensions["meisa"].state().dispatcher.backfill()
    told: list[str] = []

    def users() -> Iterator[Any]:  # read as the run goes on: another command starts then
        step_clock(monkeypatch, 120.0)  # its host
        with pytest.raises(backfill.AlreadyRunning) as refused:
            target.save(backfill.Run(started_at=target.clock()), start=True)
        told.append(str(refused.value))
        yield object()

    def unmapped(user: Any) -> Any:
        raise ValueError("nothing to send")

    backfill.run(target, users(), unmapped, total=1)
    ago = re.search(r", (\d+) s ago\)", told[0])
    assert ago is not None and int(ago.group(1)) < 30, told[0]  # it noted it at its start
