"""The Celery engine end to end: a real Redis, real ``celery worker`` processes and the
emulator. Operations from a Flask app reach Meisa; two workers share one budget; a send
overtakes queued syncs; a 503 is retried by the task with the same idempotency key; a
refusal is reported by the worker's signals; a worker killed mid-task loses nothing and
sends nothing twice; upserts queued behind a stopped worker make one call."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from flask_meisa.engine.celery import CeleryDispatcher
from flask_meisa.operations import Operation
from flask_meisa.operations import merge_upsert_payloads
from tests.celery_support import HUNG
from tests.celery_support import WorkerProcess
from tests.celery_support import make_celery
from tests.celery_support import outcomes
from tests.celery_support import redis_server_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.engine_support import RecordingHooks

UPSERT = "/api/v1/contacts/upsert/"
TRACK = "/api/v1/events/track/"
TRIGGER = "/api/v1/emails/trigger/"

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker(emulator, wait=True, **env)``: a worker process on that emulator
    (extra ``MEISA_TEST_*`` variables in ``env``); every worker is stopped after."""
    started: list[WorkerProcess] = []

    def start(emulator: Emulator, *, wait: bool = True, concurrency: int = 2, **env: str):
        variables = {
            "MEISA_TEST_URL": emulator.url,
            "MEISA_TEST_KEY": emulator.live_key,
            "MEISA_TEST_REDIS_URL": redis_url,
            **env,
        }
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(variables, log, concurrency=concurrency)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def producer(redis_url: str) -> Iterator[Callable[[Emulator], CeleryDispatcher]]:
    """``producer(emulator)``: a dispatcher publishing for that emulator's key."""
    made: list[tuple[CeleryDispatcher, Any]] = []

    def make(emulator: Emulator, rate_limit: str | None = None) -> CeleryDispatcher:
        celery_app = make_celery(redis_url)
        dispatcher = CeleryDispatcher(
            celery_app,
            redis=redis.Redis.from_url(redis_url),
            hooks=RecordingHooks(),
            rate_limit=rate_limit,
            budget_key=emulator.live_key,
        )
        made.append((dispatcher, celery_app))
        return dispatcher

    yield make
    for dispatcher, celery_app in made:
        dispatcher.close()
        celery_app.close()


def signals(redis_url: str, name: str) -> list[dict[str, Any]]:
    return [entry for entry in outcomes(redis_url) if entry["signal"] == name]


def upsert(n: int, **fields: Any) -> Operation:
    return Operation("upsert", {"email": f"user{n}@example.com", "external_id": f"u{n}", **fields})


def receipt(to: str = "buyer@example.com") -> Operation:
    body = {"trigger_key": "receipt", "to_email": to, "idempotency_key": f"receipt-{to}"}
    return Operation("send", body)


def test_operations_from_a_flask_app_reach_meisa_through_a_worker(
    emulator: Emulator, redis_url: str, start_worker: StartWorker
) -> None:
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=emulator.live_key, MEISA_BASE_URL=emulator.url, MEISA_DELIVERY="celery"
    )
    app.extensions["celery"] = make_celery(redis_url)
    meisa = Meisa(app)

    @app.post("/signup")
    def signup() -> str:
        meisa.upsert({"email": "ada@example.com", "external_id": 7, "first_name": "Ada"})
        meisa.track("signed_up", external_id=7, properties={"plan": "pro"})
        meisa.send("receipt", "ada@example.com", background=True)
        return "ok"

    start_worker(emulator)
    try:
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
    finally:
        meisa.state(app).close(timeout=0)
        app.extensions["celery"].close()


def test_two_workers_share_one_budget(
    emulator_factory: Callable[..., Emulator],
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    emulator = emulator_factory(rate_limit="10/second")
    launch = functools.partial(
        start_worker, emulator, wait=False, MEISA_TEST_RATE_LIMIT="10/second"
    )
    workers = [launch(), launch()]
    for worker in workers:
        worker.wait_ready()
    dispatcher = producer(emulator, rate_limit="10/second")
    for n in range(60):
        dispatcher.submit(upsert(n))
    assert dispatcher.flush(timeout=25)
    requests = emulator.requests_to(UPSERT)
    assert len(requests) == 60
    assert [r.status for r in requests if r.status == 429] == []
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
        dispatcher.submit(upsert(n))
    dispatcher.submit(receipt())
    assert dispatcher.status().queued == {"transactional": 1, "sync": 20, "events": 0}
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
    dispatcher.submit(op)
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
    dispatcher.submit(op)
    assert dispatcher.flush(timeout=15)
    (failed,) = signals(redis_url, "delivery_failed")
    assert (failed["op"], failed["status"]) == (op.id, 400)
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert dispatcher.status().failed == 1


def test_a_worker_killed_mid_task_loses_nothing_and_sends_once(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    doomed = start_worker(emulator, MEISA_TEST_HANG_AFTER_SEND="1")
    dispatcher = producer(emulator)
    op = receipt()
    dispatcher.submit(op)
    client = redis.Redis.from_url(redis_url)
    try:
        # The send was made and answered; the worker is in a hook, its task not acked.
        assert client.blpop([HUNG], timeout=15) is not None
    finally:
        client.close()
    assert len(emulator.sends()) == 1
    doomed.kill()
    assert dispatcher.status().pending == 1
    # Another worker takes the message back once it is older than its visibility timeout.
    start_worker(emulator, MEISA_TEST_VISIBILITY="1")
    assert dispatcher.flush(timeout=20)
    requests = emulator.requests_to(TRIGGER)
    assert len(requests) == 2
    assert {r.body["idempotency_key"] for r in requests} == {op.payload["idempotency_key"]}
    assert len(emulator.sends()) == 1  # Meisa deduplicated the replay
    (replayed,) = [e for e in signals(redis_url, "email_sent") if e["duplicate"]]
    assert replayed["op"] == op.id


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
        dispatcher.submit(op)
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
