"""The delivery task's body, run in this process against the emulator and a real Redis:
one call per run, retries as "run again", 404 recovery, budget waits, 429 pauses,
coalesced upserts, events behind their contact's upsert, skips; and the task's
registration on a Celery app."""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.engine.celery_worker import TASK_NAME
from flask_meisa.engine.celery_worker import DeliveryWorker
from flask_meisa.engine.celery_worker import RunAgain
from flask_meisa.engine.celery_worker import register_tasks
from flask_meisa.engine.redis_budget import RedisBudget
from flask_meisa.engine.redis_budget import budget_prefix
from flask_meisa.engine.redis_store import RedisDeliveryStore
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import NotFoundError
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.celery_support import make_celery
from tests.celery_support import redis_server_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.engine_support import RecordingHooks

FAST = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2, deadline=30.0)
UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"

MakeWorker = Callable[..., DeliveryWorker]


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def store(client: Any) -> RedisDeliveryStore:
    return RedisDeliveryStore(client, "meisa")


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def make_worker(
    emulator: Emulator, store: RedisDeliveryStore, client: Any, hooks: RecordingHooks
) -> Iterator[MakeWorker]:
    """``make_worker(rate_limit=None, **options)``: a worker on the emulator with the
    shared budget, pause and breaker (without a limit unless given); closed after."""
    made: list[DeliveryWorker] = []

    def make(rate_limit: str | None = None, **options: Any) -> DeliveryWorker:
        budget = RedisBudget(client, rate_limit, prefix=budget_prefix(emulator.live_key))
        options.setdefault("retry", FAST)
        options.setdefault("hooks", hooks)
        worker = DeliveryWorker(
            client_factory=lambda: MeisaClient(emulator.live_key, emulator.url, timeout=2.0),
            store=store,
            budget=budget,
            call_timeout=3.0,
            **options,
        )
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


def send(key: str = "receipt", to: str = "ada@example.com") -> Operation:
    return Operation("send", {"trigger_key": key, "to_email": to, "idempotency_key": "k-1"})


def submitted(store: RedisDeliveryStore, op: Operation) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the dispatcher would publish for ``op``: the task's ``op`` and ``meta``."""
    meta: dict[str, Any] = {}
    contact = op.contact_key
    if op.kind == "upsert" and contact is not None:
        meta["version"] = store.coalesce(op, contact)
    else:
        store.add_pending(op)
    return op.to_dict(), meta


def run_through(worker: DeliveryWorker, data: dict[str, Any], meta: dict[str, Any]) -> int:
    """Run the task until it finishes, at once each time (the countdowns are checked by
    the tests that care); returns how many runs it took."""
    runs = 1
    again = worker.run(data, meta)
    while again is not None:
        runs += 1
        assert runs < 10, "the task never finished"
        again = worker.run(again.op, again.meta)
    return runs


def test_a_send_is_delivered_and_finished(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks, emulator: Emulator
) -> None:
    worker = make_worker()
    assert worker.run(*submitted(store, send())) is None
    assert [op.kind for op in hooks.of("delivered")] == ["send"]
    assert len(emulator.sends()) == 1
    assert store.pending() == 0
    assert store.counters()["delivered"] == 1


def test_a_retryable_failure_runs_again_with_the_same_key(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks, emulator: Emulator
) -> None:
    emulator.faults.fail_next(1, 503, path=TRIGGER)
    worker = make_worker()
    op = send()
    again = worker.run(*submitted(store, op))
    assert isinstance(again, RunAgain)
    assert 0.0 <= again.countdown <= 0.05  # FAST's first backoff, never slept on here
    assert again.op["id"] == op.id
    assert again.op["attempts"] == 1
    assert store.pending() == 1
    assert worker.run(again.op, again.meta) is None
    requests = emulator.requests_to(TRIGGER)
    assert [r.status for r in requests] == [503, 200]
    assert {r.body["idempotency_key"] for r in requests} == {"k-1"}
    assert len(emulator.sends()) == 1
    (delivered,) = hooks.of("delivered")
    assert (delivered.id, delivered.attempts) == (op.id, 2)


def test_retries_end_at_the_policy_limit(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks, emulator: Emulator
) -> None:
    emulator.faults.fail_next(5, 503, path=UPSERT)
    worker = make_worker()
    assert run_through(worker, *submitted(store, Operation("upsert", {"email": "a@b.co"}))) == 3
    (failed,) = hooks.of("failed")
    assert failed.attempts == 3
    assert store.pending() == 0
    assert store.counters()["failed"] == 1


def test_a_refused_call_fails_at_once_and_logs_no_secret(
    make_worker: MakeWorker,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_meisa")
    worker = make_worker()
    assert worker.run(*submitted(store, send(key="no_such_trigger"))) is None
    (failed,) = hooks.of("failed")
    assert isinstance(hooks.detail(failed), BadRequestError)
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert store.counters()["failed"] == 1
    assert "failed after 1 attempt(s): HTTP 400" in caplog.text
    assert emulator.live_key not in caplog.text
    assert "ada@example.com" not in caplog.text


def test_an_event_answered_404_upserts_its_contact_then_tracks_again(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks, emulator: Emulator
) -> None:
    contact = {"email": "new@example.com", "external_id": "new-1", "first_name": "Nova"}
    op = Operation("track", {"event_name": "opened", "external_id": "new-1"}, contact=contact)
    assert run_through(make_worker(), *submitted(store, op)) == 3
    assert [(r.path, r.status) for r in emulator.requests] == [
        ("/api/v1" + TRACK, 404),
        ("/api/v1" + UPSERT, 201),
        ("/api/v1" + TRACK, 200),
    ]
    assert [o.id for o in hooks.of("delivered")] == [op.id]
    assert emulator.contact(external_id="new-1") is not None


def test_an_event_answered_404_without_a_contact_fails(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks
) -> None:
    op = Operation("track", {"event_name": "opened", "email": "ghost@example.com"})
    assert make_worker().run(*submitted(store, op)) is None
    (failed,) = hooks.of("failed")
    assert isinstance(hooks.detail(failed), NotFoundError)


def test_an_exhausted_budget_runs_the_task_again_later_without_a_call(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker(rate_limit="1/minute")
    assert worker.run(*submitted(store, Operation("upsert", {"email": "a@b.co"}))) is None
    again = worker.run(*submitted(store, Operation("upsert", {"email": "c@d.co"})))
    assert isinstance(again, RunAgain)
    assert 50.0 < again.countdown <= 60.0
    assert again.op["attempts"] == 0  # waiting spends no attempt
    assert len(emulator.requests) == 1


def test_a_send_takes_the_slot_held_back_for_sends(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker(rate_limit="20/minute")  # one slot of 20 held back for sends
    for n in range(19):
        assert worker.run(*submitted(store, Operation("upsert", {"email": f"u{n}@b.co"}))) is None
    blocked = worker.run(*submitted(store, Operation("upsert", {"email": "late@b.co"})))
    assert isinstance(blocked, RunAgain)
    assert worker.run(*submitted(store, send())) is None
    assert len(emulator.sends()) == 1


def test_a_429_pauses_every_worker(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    emulator.faults.force_429(1, retry_after=2, path=UPSERT)
    first, second = make_worker(rate_limit="100/minute"), make_worker(rate_limit="100/minute")
    again = first.run(*submitted(store, Operation("upsert", {"email": "a@b.co"})))
    assert isinstance(again, RunAgain)
    assert again.countdown >= 2.0  # Retry-After is the least wait
    held = second.run(*submitted(store, send()))
    assert isinstance(held, RunAgain)
    assert 1.5 < held.countdown <= 2.0
    assert len(emulator.requests) == 1  # the second worker made no call


def test_a_send_guardrail_429_delays_only_that_send(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    emulator.set_send_guardrail("1/10 seconds")
    worker = make_worker(rate_limit="100/minute")

    def receipt(n: int, to: str) -> Operation:
        body = {"trigger_key": "receipt", "to_email": to, "idempotency_key": f"r-{n}"}
        return Operation("send", body)

    assert worker.run(*submitted(store, receipt(1, "ada@example.com"))) is None
    again = worker.run(*submitted(store, receipt(2, "ada@example.com")))
    assert isinstance(again, RunAgain)
    assert 9.0 <= again.countdown <= 10.0  # as long as Meisa asks, for this recipient
    assert worker.budget is not None
    assert worker.budget.snapshot()[0] == 0.0  # the key is not paused
    assert worker.run(*submitted(store, receipt(3, "bob@example.com"))) is None  # others go
    assert [r.status for r in emulator.requests_to(TRIGGER)] == [200, 429, 200]


def test_failures_in_a_row_pause_every_worker_then_one_probe_goes(
    make_worker: MakeWorker,
    store: RedisDeliveryStore,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flask_meisa")
    emulator.faults.fail_next(4, 503, path=UPSERT)
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=4.0, deadline=60.0)
    first, second = make_worker(retry=policy), make_worker(retry=policy)
    for n in range(3):
        again = (first, second)[n % 2].run(
            *submitted(store, Operation("upsert", {"email": f"u{n}@b.co"}))
        )
        assert isinstance(again, RunAgain)
    assert first.budget is not None
    paused, _, _ = first.budget.snapshot()
    assert 1.5 < paused <= 2.0  # the backoff's ceiling after 3 failures: 0.5 * 2 ** 2
    held = second.run(*submitted(store, send()))
    assert isinstance(held, RunAgain)
    assert len(emulator.requests) == 3  # paused: no call
    assert "3 failed calls in a row; pausing delivery for 2.00 s" in caplog.text


def test_a_wait_longer_than_the_longest_countdown_is_made_of_several(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker(rate_limit="1/minute", max_countdown=5.0)
    assert worker.run(*submitted(store, Operation("upsert", {"email": "a@b.co"}))) is None
    again = worker.run(*submitted(store, Operation("upsert", {"email": "c@d.co"})))
    assert isinstance(again, RunAgain)
    assert again.countdown == 5.0
    assert worker.max_countdown == 5.0
    waited = worker.run(again.op, again.meta)  # back early: waits again, makes no call
    assert isinstance(waited, RunAgain)
    assert 0 < waited.countdown <= 5.0
    assert len(emulator.requests) == 1


def test_upserts_waiting_together_make_one_call(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks, emulator: Emulator
) -> None:
    ops = [
        Operation("upsert", {"email": "ada@example.com", "custom_fields": {f"f{n}": n}})
        for n in range(5)
    ]
    tasks = [submitted(store, op) for op in ops]
    worker = make_worker()
    for task in tasks:
        assert worker.run(*task) is None
    (request,) = emulator.requests_to(UPSERT)
    assert request.body["custom_fields"] == {f"f{n}": n for n in range(5)}
    assert sorted(op.id for op in hooks.of("delivered")) == sorted(op.id for op in ops)
    assert store.pending() == 0


def test_a_contact_in_another_workers_hands_runs_again_soon(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    op = Operation("upsert", {"email": "ada@example.com"})
    task = submitted(store, op)
    store.claim("email:ada@example.com", 1, lease=5.0)  # another worker is calling
    again = make_worker().run(*task)
    assert isinstance(again, RunAgain)
    assert again.countdown <= 0.3
    assert emulator.requests == []


def test_an_event_waits_behind_its_contacts_pending_upsert(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker()
    upsert_task = submitted(store, Operation("upsert", {"email": "new@example.com"}))
    event = Operation("track", {"event_name": "opened", "email": "new@example.com"})
    event_task = submitted(store, event)
    assert isinstance(worker.run(*event_task), RunAgain)  # its contact is not there yet
    assert worker.run(*upsert_task) is None
    assert worker.run(*event_task) is None
    assert [r.path for r in emulator.requests] == ["/api/v1" + UPSERT, "/api/v1" + TRACK]


def test_skip_reasons_and_a_disabled_worker_skip_without_a_call(
    make_worker: MakeWorker, store: RedisDeliveryStore, hooks: RecordingHooks, emulator: Emulator
) -> None:
    hooks.skip = lambda op: "suppressed"
    assert make_worker().run(*submitted(store, send())) is None
    hooks.skip = lambda op: None
    assert make_worker(enabled=lambda: False).run(*submitted(store, send())) is None
    assert [hooks.detail(op) for op in hooks.of("skipped")] == [
        "suppressed",
        "delivery_suppressed",
    ]
    assert emulator.requests == []
    assert store.counters()["skipped"] == 2
    assert store.pending() == 0


def test_an_upsert_whose_record_was_lost_delivers_its_own_payload(
    make_worker: MakeWorker, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    op = Operation("upsert", {"email": "ada@example.com", "first_name": "Ada"})
    store.add_pending(op)
    assert make_worker().run(op.to_dict(), {"version": 4}) is None
    (request,) = emulator.requests_to(UPSERT)
    assert request.body["first_name"] == "Ada"


def test_the_task_acks_late_takes_json_and_keeps_the_latest_factory(
    redis_url: str, make_worker: MakeWorker
) -> None:
    celery_app = make_celery(redis_url)
    built: list[str] = []

    def factory(label: str) -> Callable[[], DeliveryWorker]:
        def build() -> DeliveryWorker:
            built.append(label)
            return make_worker()

        return build

    try:
        register_tasks(celery_app, factory("first"))
        register_tasks(celery_app, factory("second"))  # no duplicate task, no warning
        registered = celery_app.tasks[TASK_NAME]
        assert registered.acks_late is True
        assert registered.reject_on_worker_lost is True
        assert registered.serializer == "json"
        assert registered.ignore_result is True
        assert registered.max_retries is None
        celery_app._flask_meisa_delivery.get()
        assert built == ["second"]
    finally:
        celery_app.close()
