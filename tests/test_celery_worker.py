"""The delivery task's body, run in this process against the emulator and a real Redis on
the tasks the dispatcher would publish: one call per run, retries as "run again", 404
recovery, budget waits, 429 pauses, coalesced upserts, events behind their contact's
upsert (delivered by a companion on the event's lane), no call for a state Meisa has,
routine work promoted with age, skips; and the task's registration on a Celery app."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine import celery_worker
from flask_meisa._engine import redis_dead
from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa._engine.celery_setup import TASK_NAME
from flask_meisa._engine.celery_setup import register_tasks
from flask_meisa._engine.celery_setup import worker_of
from flask_meisa._engine.celery_worker import DeliveryWorker
from flask_meisa._engine.celery_worker import RunAgain
from flask_meisa._engine.redis_budget import RedisBudget
from flask_meisa._engine.redis_dead import RedisDeadLetters
from flask_meisa._engine.redis_store import RedisDeliveryStore
from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import DeliveryError
from flask_meisa.errors import NotFoundError
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from flask_meisa.signals import delivery_failed
from flask_meisa.testing import emulator_config
from tests.celery_support import make_celery
from tests.celery_support import redis_client_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.engine_support import RecordingHooks

FAST = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2, deadline=30.0)
UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"

MakeWorker = Callable[..., DeliveryWorker]
Task = tuple[dict[str, Any], dict[str, Any]]
Submit = Callable[[Operation], Task]


@pytest.fixture
def dispatcher(redis_url: str, client: Any) -> Iterator[CeleryDispatcher]:
    """A dispatcher whose tasks the tests run themselves (nothing is published)."""
    celery_app = make_celery(redis_url)
    yield CeleryDispatcher(celery_app, redis=client, hooks=RecordingHooks())
    celery_app.close()


@pytest.fixture
def store(dispatcher: CeleryDispatcher) -> RedisDeliveryStore:
    return dispatcher.store


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
        budget = RedisBudget(client, rate_limit, emulator.live_key)
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


@pytest.fixture
def submit(dispatcher: CeleryDispatcher) -> Submit:
    """``submit(op)``: the task the dispatcher would publish for ``op``: ``(op, meta)``."""

    def tasks(op: Operation) -> Task:
        *_, (_, data, meta) = dispatcher.tasks(op)
        return data, meta

    return tasks


def run_through(worker: DeliveryWorker, data: dict[str, Any], meta: dict[str, Any]) -> int:
    """Run the task until it finishes, each time after its countdown (a retry's backoff
    holds for its record's part whichever task asks); returns how many runs it took."""
    runs = 1
    again = worker.run(data, meta)
    while again is not None:
        runs += 1
        assert runs < 10, "the task never finished"
        time.sleep(again.countdown)
        again = worker.run(again.op, again.meta)
    return runs


def test_a_send_is_delivered_and_finished(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    worker = make_worker()
    assert worker.run(*submit(send())) is None
    assert [op.kind for op in hooks.of("delivered")] == ["send"]
    assert len(emulator.sends()) == 1
    assert store.pending() == 0
    assert store.counters()["delivered"] == 1


def test_a_retryable_failure_runs_again_with_the_same_key(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    emulator.faults.fail_next(1, 503, path=TRIGGER)
    worker = make_worker()
    op = send()
    again = worker.run(*submit(op))
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


def test_a_send_retry_run_past_the_idempotency_hour_fails_without_sending_again(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    # Meisa sent the email, its answer was lost; the retry then waited in the queue while
    # every worker was down for over an hour: Meisa's idempotency hour is over, so a call
    # now sends the email a second time.
    emulator.faults.drop_next(1, path=TRIGGER, after=True)
    worker = make_worker()
    again = worker.run(*submit(send()))
    assert isinstance(again, RunAgain)
    emulator.advance_clock(3700.0)
    meta = {**again.meta, "first_attempt": again.meta["first_attempt"] - 3700.0}
    assert worker.run(again.op, meta) is None
    assert len(emulator.sends()) == 1
    assert len(emulator.requests_to(TRIGGER)) == 1
    (failed,) = hooks.of("failed")
    assert failed.kind == "send"
    assert store.pending() == 0


def test_a_send_first_tried_by_a_worker_whose_clock_is_behind_is_retried_by_another(
    make_worker: MakeWorker,
    submit: Submit,
    hooks: RecordingHooks,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its first attempt (a 503) dated by a worker 52 minutes behind, its retry run by one
    # on time a moment later: that one took the idempotency hour as over and failed the
    # email unsent. A worker ahead makes the same mistake the other way: a retry past
    # the hour, sent twice. Both date it by Redis's clock.
    emulator.faults.fail_next(1, 503, path=TRIGGER)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3100.0)
    again = make_worker().run(*submit(send()))
    assert isinstance(again, RunAgain)
    monkeypatch.setattr(time, "time", real)
    assert make_worker().run(again.op, again.meta) is None
    assert len(emulator.sends()) == 1
    assert hooks.of("failed") == []


def test_a_first_published_copy_of_a_send_task_run_past_the_idempotency_hour_fails(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    # Meisa sent the email, its answer was lost. What runs over an hour later need not be
    # the retry (whose meta dates the first attempt) but the task as first published: the
    # message restored after the visibility timeout when its worker died in the call, or
    # the copy the dispatcher publishes again for a retry message the broker lost.
    emulator.faults.drop_next(1, path=TRIGGER, after=True)
    worker = make_worker()
    data, meta = submit(send())
    assert "first_attempt" not in meta
    assert isinstance(worker.run(data, meta), RunAgain)
    emulator.advance_clock(3700.0)
    first = store.first_attempt(data["id"])  # dated by Redis's clock: an hour ago now
    assert first is not None
    store.redis.set(f"{store.prefix}:first:{data['id']}", repr(first - 3700.0))
    assert worker.run(data, meta) is None
    assert len(emulator.sends()) == 1
    assert len(emulator.requests_to(TRIGGER)) == 1
    (failed,) = hooks.of("failed")
    assert failed.kind == "send"
    assert store.pending() == 0
    assert store.first_attempt(failed.id) is None  # forgotten once finished


def test_retries_end_at_the_policy_limit(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    emulator.faults.fail_next(5, 503, path=UPSERT)
    worker = make_worker()
    assert run_through(worker, *submit(Operation("upsert", {"email": "a@b.co"}))) == 3
    (failed,) = hooks.of("failed")
    assert failed.attempts == 3
    assert store.pending() == 0
    assert store.counters()["failed"] == 1


def test_a_refused_call_fails_at_once_and_logs_no_secret(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_meisa")
    worker = make_worker()
    assert worker.run(*submit(send(key="no_such_trigger"))) is None
    (failed,) = hooks.of("failed")
    assert isinstance(hooks.detail(failed), BadRequestError)
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert store.counters()["failed"] == 1
    assert "failed after 1 attempt(s): HTTP 400" in caplog.text
    assert emulator.live_key not in caplog.text
    assert "ada@example.com" not in caplog.text


def test_what_failed_is_kept_as_a_dead_letter_until_retried_or_purged(
    make_worker: MakeWorker,
    submit: Submit,
    dispatcher: CeleryDispatcher,
    store: RedisDeliveryStore,
    emulator: Emulator,
) -> None:
    emulator.faults.fail_next(3, 503, path=UPSERT)  # out of attempts
    emulator.faults.fail_next(1, 400, path=TRIGGER)  # refused
    worker = make_worker()
    upsert = Operation("upsert", {"email": "a@b.co", "custom_fields": {"plan": "pro"}})
    run_through(worker, *submit(send()))
    run_through(worker, *submit(upsert))  # last: its 503s pause the key
    letters = dispatcher.dead_letters
    refused, failed = letters.find()
    assert (refused.operation.kind, refused.status) == ("send", 400)
    assert (failed.operation.id, failed.operation.payload) == (upsert.id, upsert.payload)
    assert (failed.status, failed.operation.attempts) == (503, 3)
    assert failed.seq > refused.seq and letters.find([failed.seq]) == [failed]
    assert dispatcher.status().dead_letters == 2
    # Meisa accepted the contact's plan again since it failed: putting the older one back
    # waits for --force.
    store.remember({"email": "a@b.co", "custom_fields": {"plan": "team"}}, time.time())
    assert letters.retry(None, force=False) == (1, [failed.seq])  # the send only
    assert letters.find() == [failed]
    assert store.pending() == 1  # the send, published again with fresh attempts
    assert letters.purge() == 1
    assert (letters.find(), dispatcher.status().dead_letters) == ([], 0)


def test_dead_letters_go_again_as_new_operations_upserts_first(store: RedisDeliveryStore) -> None:
    # A dead upsert coalesced into a record is dated when it failed: it still goes before
    # the event that waited behind it.
    track = Operation("track", {"event_name": "signed_up", "external_id": "7"})
    upsert = Operation("upsert", {"email": "a@b.co", "external_id": "7"})
    submitted: list[Operation] = []
    letters = RedisDeadLetters(store, submitted.extend)
    letters.bury([track, upsert], BadRequestError("POST /events/track/", 400, "no"))
    assert letters.retry(None, force=True) == (2, [])
    assert [(op.kind, op.payload, op.attempts) for op in submitted] == [
        ("upsert", upsert.payload, 0),
        ("track", track.payload, 0),
    ]
    assert {op.id for op in submitted}.isdisjoint({track.id, upsert.id})
    assert letters.find() == []


def test_dead_letters_the_broker_refuses_again_stay_dead_letters(
    store: RedisDeliveryStore,
) -> None:
    queued: list[Operation] = []

    def publish(operations: list[Operation]) -> None:
        if operations[0].kind == "send":
            raise DeliveryError("publishing failed (ConnectionError)")
        queued.extend(operations)

    letters = RedisDeadLetters(store, publish)
    letters.bury(
        [send(), Operation("upsert", {"email": "a@b.co"})], BadRequestError("x", 400, "no")
    )
    (upsert, refused) = sorted(
        letters.find(), key=lambda letter: letter.operation.kind != "upsert"
    )
    with pytest.raises(DeliveryError):
        letters.retry(None, force=False)
    assert [op.payload for op in queued] == [upsert.operation.payload]
    assert letters.find() == [refused]


def test_dead_letters_past_the_bound_are_only_logged(
    make_worker: MakeWorker,
    submit: Submit,
    dispatcher: CeleryDispatcher,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(redis_dead, "MOST_KEPT", 1)
    emulator.faults.fail_next(2, 400, path=TRIGGER)
    worker = make_worker()
    for to in ("a@b.co", "b@b.co"):
        run_through(worker, *submit(send(to=to)))
    (kept,) = dispatcher.dead_letters.find()
    assert kept.operation.payload["to_email"] == "a@b.co"
    assert f"1 dead letters kept; send receipt ({kept.operation.id}) is not" not in caplog.text
    assert "1 dead letters kept; send receipt (" in caplog.text


def test_an_event_answered_404_upserts_its_contact_then_tracks_again(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    contact = {"email": "new@example.com", "external_id": "new-1", "first_name": "Nova"}
    op = Operation("track", {"event_name": "opened", "external_id": "new-1"}, contact=contact)
    assert run_through(make_worker(), *submit(op)) == 3
    assert [(r.path, r.status) for r in emulator.requests] == [
        ("/api/v1" + TRACK, 404),
        ("/api/v1" + UPSERT, 201),
        ("/api/v1" + TRACK, 200),
    ]
    assert [o.id for o in hooks.of("delivered")] == [op.id]
    assert emulator.contact(external_id="new-1") is not None


def test_an_event_answered_404_without_a_contact_fails(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, hooks: RecordingHooks
) -> None:
    op = Operation("track", {"event_name": "opened", "email": "ghost@example.com"})
    assert make_worker().run(*submit(op)) is None
    (failed,) = hooks.of("failed")
    assert isinstance(hooks.detail(failed), NotFoundError)


def test_an_exhausted_budget_runs_the_task_again_later_without_a_call(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker(rate_limit="1/minute")
    assert worker.run(*submit(Operation("upsert", {"email": "a@b.co"}))) is None
    again = worker.run(*submit(Operation("upsert", {"email": "c@d.co"})))
    assert isinstance(again, RunAgain)
    assert 50.0 < again.countdown <= 60.0
    assert again.op["attempts"] == 0  # waiting spends no attempt
    assert len(emulator.requests) == 1


def test_a_send_takes_the_slot_held_back_for_sends(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker(rate_limit="20/minute")  # one slot of 20 held back for sends
    for n in range(19):
        assert worker.run(*submit(Operation("upsert", {"email": f"u{n}@b.co"}))) is None
    blocked = worker.run(*submit(Operation("upsert", {"email": "late@b.co"})))
    assert isinstance(blocked, RunAgain)
    assert worker.run(*submit(send())) is None
    assert len(emulator.sends()) == 1


@pytest.mark.parametrize("rate_limit", ["100/minute", None])
def test_a_429_pauses_every_worker(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    emulator: Emulator,
    rate_limit: str | None,
) -> None:
    emulator.faults.force_429(1, retry_after=2, path=UPSERT)
    first, second = make_worker(rate_limit=rate_limit), make_worker(rate_limit=rate_limit)
    again = first.run(*submit(Operation("upsert", {"email": "a@b.co"})))
    assert isinstance(again, RunAgain)
    assert again.countdown >= 2.0  # Retry-After is the least wait
    held = second.run(*submit(send()))
    assert isinstance(held, RunAgain)
    assert 1.5 < held.countdown <= 2.0
    assert len(emulator.requests) == 1  # the second worker made no call


@pytest.mark.parametrize("rate_limit", ["100/minute", None])
def test_no_call_leaves_between_a_429_and_its_pause(
    make_worker: MakeWorker, submit: Submit, emulator: Emulator, rate_limit: str | None
) -> None:
    # Another worker thread asks for a slot while the one answered 429 logs its decision,
    # before it settles or signals anything: the key's budget already pauses it.
    emulator.faults.force_429(1, retry_after=2, path=UPSERT)
    first, second = make_worker(rate_limit=rate_limit), make_worker(rate_limit=rate_limit)
    task = submit(Operation("upsert", {"email": "b@b.co"}))
    asked: list[RunAgain | None] = []

    class Meanwhile(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "answered 429" in record.getMessage() and not asked:
                other = threading.Thread(target=lambda: asked.append(second.run(*task)))
                other.start()
                other.join()

    handler = Meanwhile()
    celery_worker.logger.addHandler(handler)
    try:
        first.run(*submit(Operation("upsert", {"email": "a@b.co"})))
    finally:
        celery_worker.logger.removeHandler(handler)
    refused, *later = emulator.requests_to(UPSERT)
    assert refused.status == 429
    assert [round(r.time - refused.time, 3) for r in later] == []  # none inside the pause
    (held,) = asked
    assert isinstance(held, RunAgain)
    assert held.countdown > 1.5


def test_a_send_guardrail_429_delays_only_that_send(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    emulator.set_send_guardrail("1/10 seconds")
    worker = make_worker(rate_limit="100/minute")

    def receipt(n: int, to: str) -> Operation:
        body = {"trigger_key": "receipt", "to_email": to, "idempotency_key": f"r-{n}"}
        return Operation("send", body)

    assert worker.run(*submit(receipt(1, "ada@example.com"))) is None
    again = worker.run(*submit(receipt(2, "ada@example.com")))
    assert isinstance(again, RunAgain)
    assert 9.0 <= again.countdown <= 10.0  # as long as Meisa asks, for this recipient
    assert worker.budget is not None
    assert worker.budget.snapshot()[0] == 0.0  # the key is not paused
    assert worker.run(*submit(receipt(3, "bob@example.com"))) is None  # others go
    assert [r.status for r in emulator.requests_to(TRIGGER)] == [200, 429, 200]


def test_sends_to_an_address_the_guardrail_refused_fail_as_it_did_without_a_call(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    # A worker made a call for each: five queued receipts to one address (guardrail 1/hour)
    # made five, four refused 429. After the first refusal the next ones fail the same way
    # (delivery_failed with the guardrail's 429) without a call; other addresses' go.
    app = Flask(__name__)
    app.config.update(emulator_config(emulator))
    reporter = Meisa(app).state(app).reporter
    emulator.set_send_guardrail("1/hour")
    worker, failed = make_worker(hooks=reporter), []

    def receipt(n: int, to: str) -> Operation:
        body = {"trigger_key": "receipt", "to_email": to, "idempotency_key": f"r-{n}"}
        return Operation("send", body)

    with delivery_failed.connected_to(lambda _, error, **kw: failed.append(error), app):
        for n in range(5):
            assert worker.run(*submit(receipt(n, "ada@example.com"))) is None
        assert worker.run(*submit(receipt(9, "bob@example.com"))) is None
    assert [r.status for r in emulator.requests_to(TRIGGER)] == [200, 429, 200]
    assert [(e.code, 3500 < (e.retry_after or 0) <= 3600) for e in failed] == [
        ("send_guardrail", True)
    ] * 4
    assert RedisDeadLetters(store).count() == 4


def test_failures_in_a_row_pause_every_worker_then_one_probe_goes(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flask_meisa")
    emulator.faults.fail_next(4, 503, path=UPSERT)
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=4.0, deadline=60.0)
    first, second = make_worker(retry=policy), make_worker(retry=policy)
    for n in range(3):
        again = (first, second)[n % 2].run(*submit(Operation("upsert", {"email": f"u{n}@b.co"})))
        assert isinstance(again, RunAgain)
    assert first.budget is not None
    paused, _, _ = first.budget.snapshot()
    assert 1.5 < paused <= 2.0  # the backoff's ceiling after 3 failures: 0.5 * 2 ** 2
    held = second.run(*submit(send()))
    assert isinstance(held, RunAgain)
    assert len(emulator.requests) == 3  # paused: no call
    assert "3 failed calls in a row; pausing delivery for 2.00 s" in caplog.text


def test_sends_refused_without_a_call_between_failures_do_not_hold_the_breaker_shut(
    make_worker: MakeWorker, submit: Submit, emulator: Emulator
) -> None:
    # Meisa down (503s) and, between its failures, receipts to an address the guardrail
    # refused, failed without a call: each counted as Meisa answering, the breaker never
    # opened and the workers never paused. A call not made counts as nothing.
    app = Flask(__name__)
    app.config.update(emulator_config(emulator))
    reporter = Meisa(app).state(app).reporter
    emulator.set_send_guardrail("1/hour")
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=4.0, deadline=60.0)
    worker = make_worker(hooks=reporter, retry=policy)

    def receipt(n: int) -> Operation:
        body = {"trigger_key": "receipt", "to_email": "ada@example.com"}
        return Operation("send", {**body, "idempotency_key": f"r-{n}"})

    for n in range(2):
        assert worker.run(*submit(receipt(n))) is None
    emulator.faults.fail_next(3, 503, path=UPSERT)
    for n in range(3):
        assert worker.run(*submit(receipt(10 + n))) is None  # refused: no call
        again = worker.run(*submit(Operation("upsert", {"email": f"u{n}@b.co"})))
        assert isinstance(again, RunAgain)
    assert [r.status for r in emulator.requests_to(TRIGGER)] == [200, 429]
    assert worker.budget is not None
    paused, _, _ = worker.budget.snapshot()
    assert 1.5 < paused <= 2.0  # the backoff's ceiling after 3 failures: 0.5 * 2 ** 2


def test_a_wait_longer_than_the_longest_countdown_is_made_of_several(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker(rate_limit="1/minute", max_countdown=5.0)
    assert worker.run(*submit(Operation("upsert", {"email": "a@b.co"}))) is None
    again = worker.run(*submit(Operation("upsert", {"email": "c@d.co"})))
    assert isinstance(again, RunAgain)
    assert again.countdown == 5.0
    assert worker.max_countdown == 5.0
    waited = worker.run(again.op, again.meta)  # back early: waits again, makes no call
    assert isinstance(waited, RunAgain)
    assert 0 < waited.countdown <= 5.0
    assert len(emulator.requests) == 1


def test_upserts_waiting_together_make_one_call(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    ops = [
        Operation("upsert", {"email": "ada@example.com", "custom_fields": {f"f{n}": n}})
        for n in range(5)
    ]
    tasks = [submit(op) for op in ops]
    worker = make_worker()
    for task in tasks:
        assert worker.run(*task) is None
    (request,) = emulator.requests_to(UPSERT)
    assert request.body["custom_fields"] == {f"f{n}": n for n in range(5)}
    assert sorted(op.id for op in hooks.of("delivered")) == sorted(op.id for op in ops)
    assert store.pending() == 0


def test_a_contact_in_another_workers_hands_runs_again_soon(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    op = Operation("upsert", {"email": "ada@example.com"})
    task = submit(op)
    store.claim(task[1]["contact"], 1, lease=5.0)  # another worker is calling
    again = make_worker().run(*task)
    assert isinstance(again, RunAgain)
    assert again.countdown <= 0.3
    assert emulator.requests == []


def test_an_event_goes_after_its_contacts_pending_upsert_which_its_lane_delivers(
    make_worker: MakeWorker,
    dispatcher: CeleryDispatcher,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    worker = make_worker()
    known = {"email": "old@example.com", "external_id": "7", "custom_fields": {"n": 1}}
    store.remember(known, time.time())  # Meisa has the contact: its next upsert is routine
    routine = Operation("upsert", {**known, "custom_fields": {"n": 2}})
    ((lane, *upsert_task),) = dispatcher.tasks(routine)
    assert lane == LANE_ROUTINE
    event = Operation("track", {"event_name": "opened", "external_id": "7"})
    (lane, *companion), (event_lane, *event_task) = dispatcher.tasks(event)
    assert lane == event_lane == LANE_AUTOMATION
    assert companion[1]["version"] == 1
    assert isinstance(worker.run(*event_task), RunAgain)  # its contact's upsert is pending
    assert worker.run(*companion) is None  # delivers the upsert on the event's lane
    assert [op.id for op in hooks.of("delivered")] == [routine.id]
    assert worker.run(*event_task) is None
    assert worker.run(*upsert_task) is None  # covered: no call
    assert [r.path for r in emulator.requests] == ["/api/v1" + UPSERT, "/api/v1" + TRACK]
    assert emulator.requests[0].body["custom_fields"] == {"n": 2}
    assert store.pending() == 0


def test_an_event_does_not_wait_for_an_upsert_released_after_it(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    payload = {"email": "old@example.com", "external_id": "7"}
    store.remember(payload, time.time())
    assert make_worker().run(*submit(Operation("upsert", payload, force=True))) is None
    event = submit(Operation("track", {"event_name": "opened", "external_id": "7"}))
    submit(Operation("upsert", {**payload, "first_name": "Later"}))  # pending, routine
    assert make_worker().run(*event) is None  # tracked at once
    assert [r.path for r in emulator.requests] == ["/api/v1" + UPSERT, "/api/v1" + TRACK]


def test_a_retry_that_ends_without_a_call_holds_its_contacts_next_one_no_longer(
    make_worker: MakeWorker, submit: Submit, hooks: RecordingHooks, emulator: Emulator
) -> None:
    # A retry holds its contact's next operation until it is due and a lease more (one
    # call of a contact at a time); skipped when it runs, it makes no call to wait for.
    payload = {"trigger_key": "receipt", "to_email": "ada@example.com"}
    first = Operation("send", {**payload, "idempotency_key": "k-1"})
    second = Operation("send", {**payload, "idempotency_key": "k-2"})
    tasks = [submit(first), submit(second)]
    emulator.faults.fail_next(1, 503, path=TRIGGER)
    worker = make_worker()
    again = worker.run(*tasks[0])
    assert isinstance(again, RunAgain)
    hooks.skip = lambda op: "suppressed" if op.id == first.id else None
    assert worker.run(again.op, again.meta) is None
    assert worker.run(*tasks[1]) is None  # at once, not a lease (8 s) later
    assert [r.status for r in emulator.requests_to(TRIGGER)] == [503, 200]


def test_an_operation_ending_without_a_call_holds_its_contacts_next_one_no_longer(
    make_worker: MakeWorker, submit: Submit, hooks: RecordingHooks, emulator: Emulator
) -> None:
    # The first waits for a slot, then is skipped when it comes back: its place in its
    # contact's order holds nothing, and no late hold (a lease, 8 s) follows it.
    payload = {"trigger_key": "receipt", "to_email": "ada@example.com"}
    first = Operation("send", {**payload, "idempotency_key": "k-1"})
    second = Operation("send", {**payload, "idempotency_key": "k-2"})
    worker = make_worker(rate_limit="2/second")
    assert worker.run(*submit(send(to="bob@example.com"))) is None
    assert worker.run(*submit(send(to="eve@example.com"))) is None
    assert worker.budget is not None  # the places a dispatcher with the budget gives
    places = worker.budget.places([(op.id, "send:ada@example.com") for op in (first, second)])
    submitted = zip(map(submit, (first, second)), places, strict=True)
    tasks = [(op, {**meta, "turn": place}) for (op, meta), place in submitted]
    waited = worker.run(*tasks[0])
    assert isinstance(waited, RunAgain)
    hooks.skip = lambda op: "suppressed" if op.id == first.id else None
    time.sleep(waited.countdown)  # its task's countdown: the slot it waited for is free
    assert worker.run(waited.op, waited.meta) is None
    started, again = time.monotonic(), worker.run(*tasks[1])
    while again is not None:
        assert time.monotonic() - started < 3.0, "held by a waiter that ended"
        time.sleep(again.countdown)
        again = worker.run(again.op, again.meta)
    assert [r.body["idempotency_key"] for r in emulator.requests_to(TRIGGER)][-1] == "k-2"


def test_skip_reasons_and_a_disabled_worker_skip_without_a_call(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    hooks.skip = lambda op: "suppressed"
    assert make_worker().run(*submit(send())) is None
    hooks.skip = lambda op: None
    assert make_worker(enabled=lambda: False).run(*submit(send())) is None
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
    store.add_pending(op, LANE_ROUTINE)
    meta = {"lane": LANE_ROUTINE, "contact": store.contact_of(op.payload), "version": 4}
    assert make_worker().run(op.to_dict(), meta) is None
    (request,) = emulator.requests_to(UPSERT)
    assert request.body["first_name"] == "Ada"


def test_a_state_meisa_has_needs_no_call_unless_forced(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
    emulator: Emulator,
) -> None:
    worker = make_worker()
    payload = {"email": "ada@example.com", "external_id": "1", "custom_fields": {"plan": "free"}}
    for _ in range(3):
        assert worker.run(*submit(Operation("upsert", payload))) is None
    assert worker.run(*submit(Operation("upsert", payload, force=True))) is None
    assert len(emulator.requests_to(UPSERT)) == 2  # the first, and the forced one
    assert [hooks.detail(op) is None for op in hooks.of("delivered")] == [
        False,
        True,
        True,
        False,
    ]
    assert (store.counters()["delivered"], store.counters()["unchanged"]) == (2, 2)
    # A change of one field is a call; a state older than resync_after is sent again.
    assert worker.run(*submit(Operation("upsert", {**payload, "first_name": "A"}))) is None
    assert make_worker(resync_after=0.0).run(*submit(Operation("upsert", payload))) is None
    assert len(emulator.requests_to(UPSERT)) == 4


def test_a_worker_whose_clock_is_behind_resyncs_a_state_older_than_resync_after(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Meisa accepted the state 90 s ago by Redis's clock, longer than resync_after: a
    # worker two minutes behind took it as accepted 30 s ago, and skipped it.
    worker = make_worker(resync_after=60.0)
    payload = {"email": "ada@example.com", "external_id": "1", "custom_fields": {"plan": "free"}}
    store.remember(payload, store.clock() - 90.0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 120.0)
    assert worker.run(*submit(Operation("upsert", payload))) is None
    assert len(emulator.requests_to(UPSERT)) == 1


def test_an_event_answered_404_forgets_what_meisa_had(
    make_worker: MakeWorker, submit: Submit, store: RedisDeliveryStore, emulator: Emulator
) -> None:
    worker = make_worker()
    payload = {"email": "ada@example.com", "external_id": "1"}
    assert worker.run(*submit(Operation("upsert", payload))) is None
    emulator.reset()  # Meisa lost the contact
    event = Operation("track", {"event_name": "opened", "email": "ada@example.com"})
    assert worker.run(*submit(event)) is None  # 404, and no contact to recover with
    assert store.known(store.contact_of(payload)) is None
    assert worker.run(*submit(Operation("upsert", payload))) is None  # sent again
    assert [(r.path, r.status) for r in emulator.requests] == [
        ("/api/v1" + TRACK, 404),
        ("/api/v1" + UPSERT, 201),
    ]


def test_a_routine_operation_waiting_too_long_goes_on_the_automation_lane(
    make_worker: MakeWorker, store: RedisDeliveryStore, dispatcher: CeleryDispatcher
) -> None:
    payload = {"email": "ada@example.com", "external_id": "1"}
    store.remember(payload, time.time())
    made = time.time() - 3661  # on a web host an hour behind, 61 s ago
    old = Operation("upsert", {**payload, "first_name": "A"}, created_at=made)
    ((lane, data, meta),) = dispatcher.tasks(old)
    assert lane == LANE_ROUTINE
    meta["released"] -= 61  # by Redis's clock, as the worker reads it
    worker = make_worker(rate_limit="1/minute", routine_max_age=60.0)
    assert worker.budget is not None
    assert worker.budget.acquire(lease=5.0).token  # the budget is spent
    again = worker.run(data, meta)
    assert isinstance(again, RunAgain)
    assert (again.queue, again.meta["lane"]) == ("meisa.automation", LANE_AUTOMATION)
    assert (store.pending(LANE_ROUTINE), store.pending(LANE_AUTOMATION)) == (0, 1)
    # Promoted, it has waited since its release, not since its creation on that host.
    assert 61.0 <= dispatcher.status().oldest_wait["automation"] < 70.0


def test_a_worker_whose_clock_is_ahead_leaves_a_fresh_routine_operation_in_its_lane(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Released a moment ago by Redis's clock, run by a worker two minutes ahead: it took
    # the operation as waiting for two minutes, and promoted every routine one at once.
    payload = {"email": "ada@example.com", "external_id": "1"}
    store.remember(payload, store.clock())
    data, meta = submit(Operation("upsert", {**payload, "first_name": "A"}))
    assert meta["lane"] == LANE_ROUTINE
    worker = make_worker(rate_limit="1/minute", routine_max_age=60.0)
    assert worker.budget is not None
    assert worker.budget.acquire(lease=5.0).token  # the budget is spent
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120.0)
    again = worker.run(data, meta)
    assert isinstance(again, RunAgain)
    assert (again.queue, again.meta["lane"]) == ("meisa.routine", LANE_ROUTINE)
    assert (store.pending(LANE_ROUTINE), store.pending(LANE_AUTOMATION)) == (1, 0)


def test_an_event_run_by_a_worker_whose_clock_is_ahead_still_waits_for_its_contacts_upsert(
    make_worker: MakeWorker,
    submit: Submit,
    store: RedisDeliveryStore,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An event waits for its contact's pending upsert at most the retry deadline (30 s
    # here) after its release: a worker a minute ahead took it as past it, and tracked
    # the event before Meisa had the contact's new state.
    known = {"email": "ada@example.com", "external_id": "7"}
    store.remember(known, store.clock())
    upsert = submit(Operation("upsert", {**known, "first_name": "Ada"}))
    event = submit(Operation("track", {"event_name": "opened", "external_id": "7"}))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 60.0)
    worker = make_worker()
    assert isinstance(worker.run(*event), RunAgain)  # its contact's upsert is pending
    assert emulator.requests_to(TRACK) == []
    assert worker.run(*upsert) is None
    assert worker.run(*event) is None
    assert [r.path for r in emulator.requests] == ["/api/v1" + UPSERT, "/api/v1" + TRACK]


LOST_AFTER = 1080.0  # about the default's (docs/celery.md: messages the broker loses)


@pytest.mark.parametrize("skewed", ["releasing host", "worker", "sweeping host"])
def test_an_operation_being_worked_on_is_not_published_again_whatever_the_hosts_clocks(
    skewed: str,
    redis_url: str,
    client: Any,
    make_worker: MakeWorker,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send retried after a 503, its task waiting then run: one host two hours off (the
    # web host that released it, or the worker, behind; the web host that sweeps, ahead)
    # took it as unseen by every worker for LOST_AFTER, and published it again: a second
    # task of the send, which could send the email twice.
    real = time.time

    def clock(host: str, by: float) -> None:
        monkeypatch.setattr(time, "time", (lambda: real() + by) if host == skewed else real)

    celery_app = make_celery(redis_url)
    web = CeleryDispatcher(celery_app, redis=client, hooks=RecordingHooks(), lost_after=LOST_AFTER)

    def unseen() -> list[list[Any]]:
        clock("sweeping host", 7200.0)
        client.delete("meisa:meisa:sweep")  # no other host looked lately
        return web.store.unseen(LOST_AFTER)

    emulator.faults.fail_next(1, 503, path=TRIGGER)
    clock("releasing host", -7200.0)
    *_, (_, data, meta) = web.tasks(send())
    assert unseen() == []  # waiting in its queue
    clock("worker", -7200.0)
    again = make_worker().run(data, meta)
    assert isinstance(again, RunAgain)  # its retry runs in a moment
    assert unseen() == []
    monkeypatch.setattr(time, "time", real)
    assert make_worker().run(again.op, again.meta) is None
    assert len(emulator.sends()) == 1
    celery_app.close()


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
        worker_of(celery_app)
        assert built == ["second"]
    finally:
        celery_app.close()


def test_a_backfill_upsert_coalesced_into_a_refused_call_stays_a_backfill_dead_letter(
    make_worker: MakeWorker, submit: Submit, dispatcher: CeleryDispatcher, emulator: Emulator
) -> None:
    # The live sync's task makes the one call of both: the backfill's upsert, kept with
    # it, is still the backfill's ('sync-users --failures' lists it; retried, it goes in
    # the backfill's lane).
    emulator.faults.fail_next(1, 400, path=UPSERT)
    worker = make_worker()
    contact = {"email": "a@b.co", "external_id": "5"}
    live = submit(Operation("upsert", {**contact, "first_name": "Ada"}))
    backfill = Operation("upsert", {**contact, "last_name": "L"}, priority="backfill")
    submit(backfill)
    run_through(worker, *live)
    kept = {letter.operation.id: letter.operation for letter in dispatcher.dead_letters.find()}
    assert kept[backfill.id].priority == "backfill"


def test_a_dead_upsert_is_not_outdated_by_another_field_accepted_since(
    make_worker: MakeWorker, submit: Submit, dispatcher: CeleryDispatcher, emulator: Emulator
) -> None:
    # The plan Meisa refused was not set again since: a login's last_active, accepted
    # after, does not make retrying it put an older plan back (as with the thread engine).
    worker = make_worker()

    def upsert(**fields: Any) -> Operation:
        payload = {"email": "a@b.co", "external_id": "7", "custom_fields": fields}
        return Operation("upsert", payload)

    run_through(worker, *submit(upsert(plan="free")))
    emulator.faults.fail_next(1, 400, path=UPSERT)
    run_through(worker, *submit(upsert(plan="pro")))
    run_through(worker, *submit(upsert(last_active="2026-12-05")))
    assert len(dispatcher.dead_letters.find()) == 1
    assert dispatcher.dead_letters.retry(None, force=False) == (1, [])


def test_a_dead_upsert_is_outdated_by_its_field_set_again_to_what_meisa_has(
    make_worker: MakeWorker, submit: Submit, dispatcher: CeleryDispatcher, emulator: Emulator
) -> None:
    # Plan team, then pro refused, then team again (no call: Meisa has it): retrying pro
    # would put back a plan the app has since left (as with the thread engine).
    worker = make_worker()

    def upsert(plan: str) -> Operation:
        payload = {"email": "a@b.co", "external_id": "7", "custom_fields": {"plan": plan}}
        return Operation("upsert", payload)

    run_through(worker, *submit(upsert("team")))
    emulator.faults.fail_next(1, 400, path=UPSERT)
    run_through(worker, *submit(upsert("pro")))
    run_through(worker, *submit(upsert("team")))
    assert len(emulator.requests_to(UPSERT)) == 2
    (letter,) = dispatcher.dead_letters.find()
    assert dispatcher.dead_letters.retry(None, force=False) == (0, [letter.seq])


def test_a_task_whose_record_expired_sends_nothing_older_than_meisa_has(
    make_worker: MakeWorker,
    submit: Submit,
    client: Any,
    emulator: Emulator,
    hooks: RecordingHooks,
) -> None:
    # A task waits more than a week (its workers down), so its contact's record expires;
    # a newer upsert of the contact, released then, is delivered and its record expires
    # too. The first task's payload, as mapped then, must not put the older plan back.
    worker = make_worker()

    def upsert(**fields: Any) -> Operation:
        payload = {"email": "a@b.co", "external_id": "7", "custom_fields": fields}
        return Operation("upsert", payload)

    old, old_meta = submit(upsert(plan="free", seats=3))
    record = f"meisa:meisa:contact:{{{old_meta['contact']}}}"
    client.delete(record)
    assert run_through(worker, *submit(upsert(plan="pro"))) == 1
    client.delete(record)
    assert run_through(worker, old, old_meta) == 1
    contact = emulator.contact(external_id="7")
    assert contact is not None and contact["custom_fields"] == {"plan": "pro", "seats": 3}
    assert [r.body["custom_fields"] for r in emulator.requests_to(UPSERT)][-1] == {"seats": 3}

    # Nothing of it newer: no call, reported unchanged.
    again, again_meta = submit(upsert(plan="free"))
    client.delete(record)
    assert run_through(worker, *submit(upsert(plan="team"))) == 1
    client.delete(record)
    calls = len(emulator.requests_to(UPSERT))
    assert run_through(worker, again, again_meta) == 1
    assert len(emulator.requests_to(UPSERT)) == calls
    assert emulator.contact(external_id="7")["custom_fields"]["plan"] == "team"  # type: ignore[index]
    assert [op.id for op in hooks.of("delivered")][-1] == again["id"]


def test_a_task_whose_record_expired_released_by_a_host_whose_clock_is_ahead_sends_nothing_older(
    make_worker: MakeWorker, submit: Submit, client: Any, emulator: Emulator
) -> None:
    # As above, the older upsert released by a web host two minutes ahead: its release time
    # (its host's clock) seemed later than the newer plan Meisa accepted (Redis's clock).
    worker = make_worker()

    def upsert(plan: str, ahead: float = 0.0) -> Operation:
        payload = {"email": "a@b.co", "external_id": "7", "custom_fields": {"plan": plan}}
        return Operation("upsert", payload, created_at=time.time() + ahead)

    old, old_meta = submit(upsert("free", ahead=120.0))
    record = f"meisa:meisa:contact:{{{old_meta['contact']}}}"
    client.delete(record)
    assert run_through(worker, *submit(upsert("pro"))) == 1
    client.delete(record)
    calls = len(emulator.requests_to(UPSERT))
    assert run_through(worker, old, old_meta) == 1
    assert len(emulator.requests_to(UPSERT)) == calls
    assert emulator.contact(external_id="7")["custom_fields"]["plan"] == "pro"  # type: ignore[index]


def test_a_task_whose_record_expired_never_moves_its_contact_back_to_a_former_address(
    make_worker: MakeWorker, submit: Submit, client: Any, emulator: Emulator
) -> None:
    # As above, the newer upsert moved the user to another address (and set no seats).
    worker = make_worker()
    old, old_meta = submit(
        Operation("upsert", {"email": "a@b.co", "external_id": "7", "custom_fields": {"seats": 3}})
    )
    record = f"meisa:meisa:contact:{{{old_meta['contact']}}}"
    client.delete(record)
    assert (
        run_through(
            worker, *submit(Operation("upsert", {"email": "new@b.co", "external_id": "7"}))
        )
        == 1
    )
    client.delete(record)
    assert run_through(worker, old, old_meta) == 1
    contact = emulator.contact(external_id="7")
    assert contact is not None and contact["email"] == "new@b.co"


def test_a_dead_upsert_buried_by_a_worker_whose_clock_is_ahead_is_outdated_all_the_same(
    make_worker: MakeWorker,
    submit: Submit,
    dispatcher: CeleryDispatcher,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pro refused by a worker two minutes ahead; team accepted since by one on time: the
    # letter and what Meisa accepted are dated by one clock, Redis's.
    worker = make_worker()

    def upsert(plan: str) -> Operation:
        payload = {"email": "a@b.co", "external_id": "7", "custom_fields": {"plan": plan}}
        return Operation("upsert", payload)

    emulator.faults.fail_next(1, 400, path=UPSERT)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120.0)
    run_through(worker, *submit(upsert("pro")))
    monkeypatch.setattr(time, "time", real)
    run_through(worker, *submit(upsert("team")))
    (letter,) = dispatcher.dead_letters.find()
    assert dispatcher.dead_letters.retry(None, force=False) == (0, [letter.seq])


def test_a_worker_whose_redis_url_allows_one_connection_delivers_an_upsert_and_an_event(
    emulator: Emulator,
    redis_url: str,
    submit: Submit,
    store: RedisDeliveryStore,
    hooks: RecordingHooks,
) -> None:
    # max_connections=1 in MEISA_CELERY_REDIS_URL: each step takes one connection at a
    # time (a contact's transaction too), so a worker thread never waits for a second.
    bounded = redis.Redis.from_url(f"{redis_url}?max_connections=1")
    worker = DeliveryWorker(
        client_factory=lambda: MeisaClient(emulator.live_key, emulator.url, timeout=2.0),
        store=RedisDeliveryStore(bounded, store.namespace),
        budget=RedisBudget(bounded, "60/minute", emulator.live_key),
        call_timeout=3.0,
        retry=FAST,
        hooks=hooks,
    )
    try:
        sync = submit(Operation("upsert", {"email": "ada@example.com", "external_id": "42"}))
        event = submit(Operation("track", {"event_name": "opened", "external_id": "42"}))
        assert run_through(worker, *sync) == 1
        assert run_through(worker, *event) == 1
        assert [op.kind for op in hooks.of("delivered")] == ["upsert", "track"]
        assert store.pending() == 0
    finally:
        worker.close()
        bounded.close()
