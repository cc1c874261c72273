"""The Celery engine end to end: a real Redis, real ``celery worker`` processes and the
emulator. Operations from a Flask app reach Meisa; two workers share one budget; a send
overtakes queued syncs; a 503 is retried by the task with the same idempotency key; a
refusal is reported by the worker's signals; a worker killed whole (main process and
pool) with sends in flight loses nothing and sends each email once; upserts queued behind
a stopped worker make one call."""

from __future__ import annotations

import collections
import functools
import json
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from flask_meisa.operations import merge_upsert_payloads
from tests.celery_support import HUNG
from tests.celery_support import StartWorker
from tests.celery_support import make_celery
from tests.celery_support import outcomes
from tests.celery_support import producer_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.celery_support import start_worker_fixture  # noqa: F401

UPSERT = "/api/v1/contacts/upsert/"
TRACK = "/api/v1/events/track/"
TRIGGER = "/api/v1/emails/trigger/"
#: A worker with short call timeouts, so that a short visibility timeout is accepted.
QUICK_VISIBILITY = 9.0
QUICK = {
    "MEISA_TEST_CONFIG": json.dumps({"MEISA_TIMEOUT": 1.5, "MEISA_CONNECT_TIMEOUT": 0.5}),
    "MEISA_TEST_VISIBILITY": str(QUICK_VISIBILITY),
}


def signals(redis_url: str, name: str) -> list[dict[str, Any]]:
    return [entry for entry in outcomes(redis_url) if entry["signal"] == name]


def upsert(n: int, **fields: Any) -> Operation:
    return Operation("upsert", {"email": f"user{n}@example.com", "external_id": f"u{n}", **fields})


def receipt(to: str = "buyer@example.com") -> Operation:
    body = {"trigger_key": "receipt", "to_email": to, "idempotency_key": f"receipt-{to}"}
    return Operation("send", body)


@pytest.fixture
def app(emulator: Emulator, redis_url: str) -> Iterator[Flask]:
    """A Flask app delivering through Celery on the test's Redis; closed after."""
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=emulator.live_key, MEISA_BASE_URL=emulator.url, MEISA_DELIVERY="celery"
    )
    app.extensions["celery"] = make_celery(redis_url)
    Meisa(app)
    yield app
    app.extensions["meisa"].state(app).close(timeout=0)
    app.extensions["celery"].close()


def test_operations_from_a_flask_app_reach_meisa_through_a_worker(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, app: Flask
) -> None:
    meisa: Meisa = app.extensions["meisa"]

    @app.post("/signup")
    def signup() -> str:
        meisa.upsert({"email": "ada@example.com", "external_id": 7, "first_name": "Ada"})
        meisa.track("signed_up", external_id=7, properties={"plan": "pro"})
        meisa.send("receipt", "ada@example.com", background=True)
        return "ok"

    start_worker(emulator)
    assert app.test_client().post("/signup").status_code == 200
    with app.app_context():
        assert meisa.flush(timeout=15)
        status = meisa.status()
    assert status.engine == "celery"
    assert status.delivered == 3
    contact = emulator.contact(external_id="7")
    assert contact is not None
    assert contact["first_name"] == "Ada"
    assert [e["event_name"] for e in emulator.events()] == ["signed_up"]
    assert len(emulator.sends(trigger_key="receipt")) == 1
    # The worker's own app reported the outcomes, through its signals.
    reported = {entry["signal"] for entry in outcomes(redis_url)}
    assert reported == {"contact_synced", "event_tracked", "email_sent"}


def test_an_outage_longer_than_the_retry_deadline_loses_nothing_kept_as_dead_letters(
    emulator: Emulator, start_worker: StartWorker, app: Flask
) -> None:
    meisa: Meisa = app.extensions["meisa"]
    cli = app.test_cli_runner()
    start_worker(emulator, MEISA_TEST_CONFIG=json.dumps({"MEISA_RETRY_DEADLINE": 1.0}))
    emulator.faults.fail_next(10_000, 503)  # Meisa is down for longer than that
    with app.app_context():
        meisa.upsert({"email": "ada@example.com", "external_id": 7, "first_name": "Ada"})
        meisa.track("signed_up", external_id=7)
        assert meisa.flush(timeout=15)  # both failed: none left pending
        assert (meisa.status().failed, meisa.status().dead_letters) == (2, 2)
    listed = cli.invoke(args=["meisa", "dead-letters", "list"]).output.splitlines()
    described = sorted(line.split("\t")[1].split(" (")[0] for line in listed[:2])
    assert (described, listed[2:]) == (["track signed_up", "upsert"], ["2 dead letter(s)"])
    emulator.faults.clear()  # Meisa is back
    retried = cli.invoke(args=["meisa", "dead-letters", "retry", "--all", "--timeout", "15"])
    assert retried.output.splitlines() == [
        "2 operation(s) queued again",
        "done; 0 dead letter(s) left",
    ]
    contact = emulator.contact(external_id="7")
    assert contact is not None and contact["first_name"] == "Ada"
    assert [e["event_name"] for e in emulator.events()] == ["signed_up"]


def test_two_workers_share_one_budget(
    emulator_factory: Callable[..., Emulator],
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    emulator = emulator_factory(rate_limit="10/second")
    # A call is repeated when its answer does not come in time: a timeout a busy machine
    # cannot reach, so that every upsert is one call.
    launch = functools.partial(
        start_worker,
        emulator,
        wait=False,
        MEISA_TEST_RATE_LIMIT="10/second",
        MEISA_TEST_CONFIG=json.dumps({"MEISA_TIMEOUT": 30.0}),
    )
    workers = [launch(), launch()]
    for worker in workers:
        worker.wait_ready()
    dispatcher = producer(emulator, rate_limit="10/second")
    for n in range(60):
        dispatcher.publish(upsert(n))
    assert dispatcher.flush(timeout=25)
    requests = emulator.requests_to(UPSERT)
    calls = collections.Counter(r.body["external_id"] for r in requests)
    # On failure: the statuses, and each upsert called more than once (arrival, seconds
    # spent answering, status).
    told = (
        collections.Counter(r.status for r in requests),
        [
            (r.body["external_id"], round(r.time, 3), round(r.duration, 3), r.status)
            for r in requests
            if calls[r.body["external_id"]] > 1
        ],
    )
    assert [r.status for r in requests if r.status == 429] == [], told
    assert len(requests) == 60, told
    assert len(emulator.contacts()) == 60
    by_worker = {entry["worker"] for entry in signals(redis_url, "contact_synced")}
    assert by_worker == {worker.name for worker in workers}
    # 60 calls within 10/second: the first and the last are at least 5 s apart.
    assert requests[-1].time - requests[0].time >= 4.9


def test_a_send_overtakes_queued_syncs(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = producer(emulator)
    for n in range(20):
        dispatcher.publish(upsert(n))
    dispatcher.publish(receipt())
    assert dispatcher.status().queued == {
        "transactional": 1,
        "automation": 20,
        "routine": 0,
        "backfill": 0,
    }
    start_worker(emulator, concurrency=1)
    assert dispatcher.flush(timeout=15)
    paths = [
        r.path for r in emulator.requests if r.path != "/api/v1/contacts/api/unsubscribed-emails/"
    ]
    assert paths[0] == TRIGGER
    assert paths.count(UPSERT) == 20


def test_a_503_is_retried_by_the_task_with_the_same_idempotency_key(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    emulator.faults.fail_next(1, 503, path="/emails/trigger/")
    start_worker(emulator)
    dispatcher = producer(emulator)
    op = receipt()
    dispatcher.publish(op)
    assert dispatcher.flush(timeout=15)
    requests = emulator.requests_to(TRIGGER)
    assert [r.status for r in requests] == [503, 200]
    assert {r.body["idempotency_key"] for r in requests} == {op.payload["idempotency_key"]}
    assert len(emulator.sends()) == 1
    (sent,) = signals(redis_url, "email_sent")
    assert (sent["op"], sent["attempts"]) == (op.id, 2)


def test_a_refusal_is_reported_by_the_workers_signals_and_not_retried(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    start_worker(emulator)
    dispatcher = producer(emulator)
    op = Operation("send", {"trigger_key": "no_such_trigger", "to_email": "a@example.com"})
    dispatcher.publish(op)
    assert dispatcher.flush(timeout=15)
    (failed,) = signals(redis_url, "delivery_failed")
    assert (failed["op"], failed["status"]) == (op.id, 400)
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert dispatcher.status().failed == 1


def test_a_worker_killed_whole_with_sends_in_flight_sends_each_email_once(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    doomed = start_worker(
        emulator, pool="prefork", concurrency=2, MEISA_TEST_HANG_AFTER_SEND="1", **QUICK
    )
    dispatcher = producer(emulator)
    ops = [receipt(f"buyer{n}@example.com") for n in range(6)]
    for op in ops:
        dispatcher.publish(op)
    client = redis.Redis.from_url(redis_url)
    try:
        # Both pool processes made their send, were answered, and hang in a hook with
        # their message not acknowledged.
        for _ in range(2):
            assert client.blpop([HUNG], timeout=15) is not None
    finally:
        client.close()
    assert len(emulator.sends()) == 2
    doomed.kill()  # SIGKILL to the main process and its pool
    started = time.monotonic()
    start_worker(emulator, **QUICK)
    assert dispatcher.flush(timeout=30)
    # The other worker took the two messages back after their visibility timeout (9 s).
    assert time.monotonic() - started < QUICK_VISIBILITY + 10
    requests = emulator.requests_to(TRIGGER)
    assert len(requests) == 8
    sent = sorted(s["to_email"] for s in emulator.sends())
    assert sent == sorted(op.payload["to_email"] for op in ops)  # each email once
    replayed = [e for e in signals(redis_url, "email_sent") if e["duplicate"]]
    assert len(replayed) == 2  # the replays, deduplicated by their idempotency keys


def test_upserts_queued_behind_a_stopped_worker_make_one_call(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    dispatcher = producer(emulator)
    ops = [
        upsert(
            1,
            first_name=f"Name{n}",
            custom_fields={f"field{n}": n, "plan": "pro" if n % 2 else "free"},
            tag_names=[f"tag{n % 3}"],
        )
        for n in range(20)
    ]
    for op in ops:
        dispatcher.publish(op)
    expected: dict[str, Any] = {}
    for op in ops:
        expected = merge_upsert_payloads(expected, op.payload)
    start_worker(emulator)
    assert dispatcher.flush(timeout=15)
    (request,) = emulator.requests_to(UPSERT)
    assert request.body == expected
    contact = emulator.contact(external_id="u1")
    assert contact is not None
    assert contact["first_name"] == "Name19"
    assert contact["custom_fields"]["plan"] == "pro"
    synced = signals(redis_url, "contact_synced")
    assert sorted(entry["op"] for entry in synced) == sorted(op.id for op in ops)


def test_a_dead_upsert_retried_puts_no_older_value_over_a_newer_one_still_pending(
    emulator: Emulator, start_worker: StartWorker, app: Flask
) -> None:
    # Queued as new, the dead upsert would go after the contact's newer upsert that waits
    # (a requeued row of the thread engine keeps its place): kept, as when that one went.
    meisa: Meisa = app.extensions["meisa"]
    cli = app.test_cli_runner()
    contact = {"email": "ada@example.com", "external_id": 7}
    worker = start_worker(emulator)
    emulator.faults.fail_next(1, 400, path=UPSERT)  # refused once
    with app.app_context():
        meisa.upsert({**contact, "custom_fields": {"plan": "pro"}})
        assert meisa.flush(timeout=15)
        assert meisa.status().dead_letters == 1
        worker.stop()  # the newer upsert waits for a worker
        meisa.upsert({**contact, "custom_fields": {"plan": "team"}})
    retried = cli.invoke(args=["meisa", "dead-letters", "retry", "--all", "--timeout", "0"])
    assert retried.output.splitlines()[1:] == ["0 operation(s) queued again"]
    assert retried.output.startswith("1 upsert(s) kept ("), retried.output
    start_worker(emulator)
    with app.app_context():
        assert meisa.flush(timeout=15)
        assert meisa.status().dead_letters == 1
    found = emulator.contact(external_id="7")
    assert found is not None and found["custom_fields"] == {"plan": "team"}


def test_an_event_of_a_worker_killed_in_its_failure_hook_is_no_dead_letter_once_delivered(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    # Meisa is down past the retry deadline: the event fails, and the worker is killed in
    # its delivery_failed hook (a deploy). Meisa is back when the task runs again: the
    # event is tracked, and no dead letter would track it a second time.
    config = {"MEISA_TIMEOUT": 1.5, "MEISA_CONNECT_TIMEOUT": 0.5, "MEISA_RETRY_DEADLINE": 1.0}
    doomed = start_worker(
        emulator,
        pool="prefork",
        concurrency=1,
        MEISA_TEST_HANG_AFTER_FAILURE="1",
        MEISA_TEST_CONFIG=json.dumps(config),
        MEISA_TEST_VISIBILITY=str(QUICK_VISIBILITY),
    )
    dispatcher = producer(emulator)
    dispatcher.publish(upsert(7))
    assert dispatcher.flush(timeout=15)
    emulator.faults.fail_next(10_000, 503, path=TRACK)
    dispatcher.publish(Operation("track", {"event_name": "signed_up", "external_id": "u7"}))
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.blpop([HUNG], timeout=30) is not None
    finally:
        client.close()
    emulator.faults.clear()
    doomed.kill()
    start_worker(emulator, **QUICK)
    assert dispatcher.flush(timeout=30)
    assert [e["event_name"] for e in emulator.events()] == ["signed_up"]
    assert dispatcher.status().dead_letters == 0


def test_a_worker_without_a_rate_limit_delivers_and_honours_a_429s_retry_after(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    # MEISA_RATE_LIMIT = None on the worker (start_worker's default): no budget windows,
    # but Meisa's 429 still pauses every call for its Retry-After (at most the retry
    # ceiling: 0.2 s in the test workers, 5 s here). One thread, so that no other call
    # had taken its slot before the 429 came back.
    config = json.dumps({"MEISA_RETRY_MAX_DELAY": 5.0})
    start_worker(emulator, concurrency=1, MEISA_TEST_CONFIG=config)
    dispatcher = producer(emulator)
    emulator.faults.force_429(1, retry_after=2, path="/contacts/upsert/")
    for n in range(4):
        dispatcher.publish(upsert(n))
    assert dispatcher.flush(timeout=20)
    requests = emulator.requests_to(UPSERT)
    assert [r.status for r in requests].count(429) == 1
    refused = next(r for r in requests if r.status == 429)
    later = [r for r in requests if r.time > refused.time]
    assert later and all(r.time - refused.time >= 1.9 for r in later), [
        (r.status, round(r.time - refused.time, 3)) for r in requests
    ]
    assert [r.status for r in later] == [201] * 4  # each contact's, the refused one's too
