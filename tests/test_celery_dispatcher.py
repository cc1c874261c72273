"""The Celery engine's publishing side, against a real Redis and no worker: JSON messages
on lane queues, versions of coalesced upserts, status, flush, refusals, and the wiring
from a Flask app's config."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from flask_meisa import Meisa
from flask_meisa.engine.celery import CeleryDispatcher
from flask_meisa.engine.celery import CelerySettings
from flask_meisa.engine.celery import init_celery
from flask_meisa.engine.celery import lane_queues
from flask_meisa.engine.celery import make_dispatcher
from flask_meisa.engine.celery import resolve_celery_app
from flask_meisa.engine.celery_worker import TASK_NAME
from flask_meisa.engine.celery_worker import DeliveryWorker
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import DeliveryError
from flask_meisa.operations import Operation
from tests.celery_support import make_celery
from tests.celery_support import redis_server_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.engine_support import RecordingHooks

KEY = "meisa_live_dispatcher_test_key_42"

MakeDispatcher = Callable[..., CeleryDispatcher]


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def make(redis_url: str, hooks: RecordingHooks) -> Iterator[MakeDispatcher]:
    """``make(broker_url=redis_url, **options)``: a dispatcher with its own Celery app and
    Redis client; all closed after the test."""
    made: list[tuple[CeleryDispatcher, Any]] = []

    def build(broker_url: str = redis_url, **options: Any) -> CeleryDispatcher:
        celery_app = make_celery(broker_url)
        celery_app.conf.broker_connection_max_retries = 0
        celery_app.conf.task_publish_retry = False
        options.setdefault("rate_limit", "60/minute;1000/hour")
        options.setdefault("budget_key", KEY)
        dispatcher = CeleryDispatcher(
            celery_app, redis=redis.Redis.from_url(broker_url), hooks=hooks, **options
        )
        made.append((dispatcher, celery_app))
        return dispatcher

    yield build
    for dispatcher, celery_app in made:
        dispatcher.close()
        celery_app.close()


def messages(client: Any, queue: str) -> list[dict[str, Any]]:
    """The messages waiting on ``queue``, oldest first, with their bodies decoded."""
    found = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu pushes on the left
        message = json.loads(raw)
        assert message["content-type"] == "application/json"
        assert message["properties"]["body_encoding"] == "base64"
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        found.append({"headers": message["headers"], "args": args, "kwargs": kwargs})
    return found


def upsert(n: int = 1, **fields: Any) -> Operation:
    return Operation("upsert", {"email": f"user{n}@example.com", "external_id": str(n), **fields})


def test_operations_go_to_their_lane_queue_as_json(make: MakeDispatcher, client: Any) -> None:
    dispatcher = make()
    ops = [
        Operation("track", {"event_name": "opened", "external_id": "1"}),
        upsert(),
        Operation("send", {"trigger_key": "receipt", "to_email": "a@example.com"}),
    ]
    for op in ops:
        dispatcher.submit(op)
    assert dispatcher.queues == lane_queues("meisa")
    for op, queue in zip(ops, ["meisa.events", "meisa.sync", "meisa.transactional"], strict=True):
        (message,) = messages(client, queue)
        assert message["headers"]["task"] == TASK_NAME
        assert message["headers"]["id"] == op.id  # the task id is the operation id
        assert message["args"] == []
        assert message["kwargs"]["op"] == op.to_dict()
    assert messages(client, "meisa.sync")[0]["kwargs"]["meta"] == {"version": 1}


def test_upserts_of_one_contact_carry_rising_versions(make: MakeDispatcher, client: Any) -> None:
    dispatcher = make()
    for n in range(3):
        dispatcher.submit(upsert(custom_fields={"n": n}))
    assert [m["kwargs"]["meta"] for m in messages(client, "meisa.sync")] == [
        {"version": 1},
        {"version": 2},
        {"version": 3},
    ]
    unmerged = make(queue="plain", coalesce=False)
    unmerged.submit(upsert())
    assert messages(client, "plain.sync")[0]["kwargs"]["meta"] == {}


def test_status_reads_queues_pending_counters_and_budget(make: MakeDispatcher) -> None:
    dispatcher = make()
    dispatcher.submit(upsert(1))
    dispatcher.submit(upsert(2))
    dispatcher.submit(Operation("send", {"trigger_key": "receipt", "to_email": "a@example.com"}))
    status = dispatcher.status()
    assert status.engine == "celery"
    assert status.queued == {"transactional": 1, "sync": 2, "events": 0}
    assert status.pending == 3
    assert (status.in_flight, status.retry_waiting, status.paused_for) == (0, 0, 0.0)
    assert status.budget_left == {"60/minute": 60, "1000/hour": 1000}
    assert (status.delivered, status.failed, status.dropped) == (0, 0, 0)


def test_flush_is_true_once_every_operation_is_finished(make: MakeDispatcher) -> None:
    dispatcher = make()
    ops = [upsert(n) for n in range(3)]
    for op in ops:
        dispatcher.submit(op)
    assert dispatcher.flush(timeout=0.05) is False  # no worker has run them
    dispatcher.store.finish([op.id for op in ops], "delivered", 3)  # as a worker would
    assert dispatcher.flush(timeout=0) is True


def test_a_closed_dispatcher_refuses_sends_and_drops_the_rest(
    make: MakeDispatcher, hooks: RecordingHooks
) -> None:
    dispatcher = make()
    assert dispatcher.close() == 0
    with pytest.raises(DeliveryError, match="closed"):
        dispatcher.submit(Operation("send", {"trigger_key": "receipt", "to_email": "a@b.co"}))
    op = upsert()
    dispatcher.submit(op)
    assert hooks.of("dropped") == [op]
    assert hooks.detail(op) == "closed"


def test_an_unreachable_broker_refuses_sends_and_drops_the_rest(
    make: MakeDispatcher, hooks: RecordingHooks, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(broker_url="redis://:hunter2@127.0.0.1:9/0")  # nothing listens
    with pytest.raises(DeliveryError, match="publishing failed") as refused:
        dispatcher.submit(Operation("send", {"trigger_key": "receipt", "to_email": "a@b.co"}))
    op = upsert()
    dispatcher.submit(op)
    assert hooks.detail(op) == "broker_unavailable"
    assert "hunter2" not in str(refused.value)
    assert "hunter2" not in caplog.text
    assert "user1@example.com" not in caplog.text


def app_with_celery(broker_url: str, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(MEISA_API_KEY=KEY, MEISA_BASE_URL="http://127.0.0.1:9/api/v1", **config)
    app.extensions["celery"] = make_celery(broker_url)
    Meisa(app)
    return app


def test_the_dispatcher_is_made_from_the_apps_config(redis_url: str) -> None:
    app = app_with_celery(redis_url, MEISA_CELERY_QUEUE="billing", MEISA_RATE_LIMIT="5/second")
    dispatcher = make_dispatcher(app.extensions["meisa"].state(app))
    try:
        assert dispatcher.queues == {
            "transactional": "billing.transactional",
            "sync": "billing.sync",
            "events": "billing.events",
        }
        assert dispatcher.status().budget_left == {"5/second": 5}
        assert KEY not in repr(dispatcher)
    finally:
        dispatcher.close()
        app.extensions["celery"].close()


def test_a_broker_other_than_redis_needs_a_redis_url(redis_url: str) -> None:
    app = app_with_celery("amqp://guest@127.0.0.1:9//")
    state = app.extensions["meisa"].state(app)
    try:
        with pytest.raises(ConfigurationError, match="MEISA_CELERY_REDIS_URL"):
            make_dispatcher(state)
        app.config["MEISA_CELERY_REDIS_URL"] = redis_url
        make_dispatcher(state).close()
    finally:
        app.extensions["celery"].close()


def test_settings_are_checked_and_a_celery_app_is_required() -> None:
    assert CelerySettings.from_config({}) == CelerySettings(None, "meisa", None, True)
    with pytest.raises(ConfigurationError, match="MEISA_CELERY_QUEUE"):
        CelerySettings.from_config({"MEISA_CELERY_QUEUE": "two words"})
    with pytest.raises(ConfigurationError, match="MEISA_CELERY_REDIS_URL"):
        CelerySettings.from_config({"MEISA_CELERY_REDIS_URL": 6379})
    app = Flask(__name__)
    with pytest.raises(ConfigurationError, match=r'app.extensions\["celery"\]'):
        resolve_celery_app(app)
    app.config["MEISA_CELERY_APP"] = object()
    with pytest.raises(ConfigurationError, match=r"celery\.Celery"):
        resolve_celery_app(app)


def test_init_celery_gives_the_worker_the_apps_client_budget_and_hooks(redis_url: str) -> None:
    app = app_with_celery(redis_url, MEISA_RATE_LIMIT="7/second")
    celery_app = app.extensions["celery"]
    try:
        init_celery(app)
        assert TASK_NAME in celery_app.tasks
        worker = celery_app._flask_meisa_delivery.get()
        assert isinstance(worker, DeliveryWorker)
        assert worker.budget is not None
        assert [w.label for w in worker.budget.windows] == ["7/second"]
        worker.close()
        worker.store._redis.close()
    finally:
        celery_app.close()
