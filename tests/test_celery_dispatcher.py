"""The Celery engine's publishing side, against a real Redis and no worker: JSON messages
on the queue of each operation's lane (by significance: what Meisa has of a contact
decides an upsert's), versions of coalesced upserts, a companion for an event whose
contact's upsert is pending, status, flush, refusals, and the wiring from a Flask app's
config."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa._engine.celery import make_dispatcher
from flask_meisa._engine.celery_setup import DEFAULT_VISIBILITY_TIMEOUT
from flask_meisa._engine.celery_setup import TASK_NAME
from flask_meisa._engine.celery_setup import CelerySettings
from flask_meisa._engine.celery_setup import configure_visibility
from flask_meisa._engine.celery_setup import init_celery
from flask_meisa._engine.celery_setup import lost_after
from flask_meisa._engine.celery_setup import resolve_celery_app
from flask_meisa._engine.celery_setup import worker_of
from flask_meisa._engine.celery_worker import DeliveryWorker
from flask_meisa._engine.celery_worker import lane_queues
from flask_meisa._suppression import SuppressionSet
from flask_meisa.config import DEFAULTS
from flask_meisa.config import MeisaSettings
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import DeliveryError
from flask_meisa.errors import EngineClosed
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import Operation
from tests.celery_support import make_celery
from tests.celery_support import redis_client_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.engine_support import RecordingHooks

KEY = "meisa_live_dispatcher_test_key_42"

MakeDispatcher = Callable[..., CeleryDispatcher]


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


def turn(meta: dict[str, Any] | str) -> int:
    """The turn of a task's ``meta`` (or of a place)."""
    place = meta if isinstance(meta, str) else meta["turn"]
    return int(float(place.split()[1]))


def test_operations_go_to_their_lane_queue_as_json(make: MakeDispatcher, client: Any) -> None:
    dispatcher = make()
    ops = [
        Operation("track", {"event_name": "opened", "external_id": "1"}),
        upsert(),
        Operation("send", {"trigger_key": "receipt", "to_email": "a@example.com"}),
    ]
    for op in ops:
        dispatcher.publish(op)
    assert dispatcher.queues == lane_queues("meisa")
    assert list(dispatcher.queues) == ["transactional", "automation", "routine", "backfill"]
    queues = ["meisa.automation", "meisa.automation", "meisa.transactional"]
    assert [m["kwargs"]["op"] for m in messages(client, "meisa.automation")] == [
        ops[0].to_dict(),
        ops[1].to_dict(),
    ]
    for op, queue in zip(ops, queues, strict=True):
        (message,) = [m for m in messages(client, queue) if m["kwargs"]["op"]["id"] == op.id]
        assert message["headers"]["task"] == TASK_NAME
        assert message["headers"]["id"] == op.id  # the task id is the operation id
        assert message["args"] == []
    meta = messages(client, "meisa.automation")[1]["kwargs"]["meta"]
    assert (meta["lane"], meta["version"]) == (LANE_AUTOMATION, 1)
    assert len(meta["contact"]) == 32  # a digest, not the address


def test_the_lane_of_an_upsert_depends_on_what_meisa_has_of_its_contact(
    make: MakeDispatcher, client: Any
) -> None:
    dispatcher = make(priority_fields=("plan",))
    had = {"email": "ada@example.com", "external_id": "1", "custom_fields": {"plan": "free"}}
    dispatcher.store.remember(had, time.time())
    cases = {
        "a contact Meisa does not have": (upsert(2), "automation"),
        "nothing but routine fields": (
            Operation("upsert", {**had, "custom_fields": {"last_active": "now"}}),
            "routine",
        ),
        "a priority field changed": (
            Operation("upsert", {**had, "custom_fields": {"plan": "pro"}}),
            "automation",
        ),
        "a priority field unchanged": (Operation("upsert", had), "routine"),
        "a plan change": (Operation("upsert", had, priority="high"), "automation"),
        "a signup": (Operation("upsert", {**had, "source": "signup"}), "automation"),
        "a backfill": (Operation("upsert", had, priority="backfill"), "backfill"),
        "an event": (
            Operation("track", {"event_name": "x", "email": "b@example.com"}),
            "automation",
        ),
        "a send": (Operation("send", {"trigger_key": "r", "to_email": "a@b.co"}), "transactional"),
    }
    for case, (op, lane) in cases.items():
        dispatcher.publish(op)
        found = {
            queue.removeprefix("meisa.")
            for queue in dispatcher.queues.values()
            if any(m["kwargs"]["op"]["id"] == op.id for m in messages(client, queue))
        }
        assert found == {lane}, case


def test_an_event_takes_its_contacts_pending_upsert_to_its_lane(
    make: MakeDispatcher, client: Any
) -> None:
    dispatcher = make()
    had = {"email": "ada@example.com", "external_id": "1"}
    dispatcher.store.remember(had, time.time())
    routine = Operation("upsert", {**had, "first_name": "Ada"})
    dispatcher.publish(routine)
    event = Operation("track", {"event_name": "opened", "email": "ada@example.com"})
    dispatcher.publish(event)  # by email: the same contact
    (queued,) = messages(client, "meisa.routine")
    companion, own = messages(client, "meisa.automation")
    assert own["kwargs"]["op"] == event.to_dict()
    # One contact's turns, each after its last (docs/celery.md: contacts take turns); the
    # companion delivers the upsert waiting, which has its turn: it takes none.
    metas = [task["kwargs"]["meta"] for task in (queued, companion, own)]
    assert [int(float(meta.pop("turn").split()[1])) for meta in metas] == [1, 2, 2]
    meta = queued["kwargs"]["meta"]
    assert own["kwargs"]["meta"]["after"] == [meta["contact"], meta["version"]]
    # Released with the event (Redis's clock), after the upsert.
    assert companion["kwargs"]["meta"]["released"] == own["kwargs"]["meta"]["released"]
    assert meta.pop("released") <= own["kwargs"]["meta"]["released"]
    assert companion["kwargs"]["meta"] == {
        **meta,
        "released": own["kwargs"]["meta"]["released"],
        "lane": 1,
        "companion": True,
    }
    assert dispatcher.store.pending() == 2  # the companion is no operation of its own
    dispatcher.publish(Operation("track", {"event_name": "again", "external_id": "2"}))
    assert len(messages(client, "meisa.automation")) == 3  # nothing pending: no companion


def test_upserts_of_one_contact_carry_rising_versions(make: MakeDispatcher, client: Any) -> None:
    dispatcher = make()
    for n in range(3):
        dispatcher.publish(upsert(custom_fields={"n": n}))
    assert [m["kwargs"]["meta"]["version"] for m in messages(client, "meisa.automation")] == [
        1,
        2,
        3,
    ]


def test_an_upsert_coalesced_into_its_contacts_waiting_one_takes_no_turn(
    make: MakeDispatcher, client: Any
) -> None:
    dispatcher = make()
    for n in range(3):  # logins while the first sync waits: one sync
        dispatcher.publish(upsert(custom_fields={"n": n}))
    dispatcher.publish(Operation("track", {"event_name": "opened", "external_id": "1"}))
    tasks = messages(client, "meisa.automation")
    assert tasks[-1]["kwargs"]["op"]["payload"]["event_name"] == "opened"
    # The contact's next operation is placed as if the logins had been one: the turn after
    # the first (its companion too, which takes none of its own).
    assert [turn(task["kwargs"]["meta"]) for task in tasks] == [1, 2, 2, 2, 2]


def test_a_contacts_next_operation_is_placed_as_if_its_coalesced_logins_were_one(
    make: MakeDispatcher,
) -> None:
    dispatcher = make()
    store, budget = dispatcher.store, dispatcher.budget
    assert budget is not None

    def release(op: Operation) -> str:
        """Publish ``op``; its task's place."""
        return str(dispatcher.tasks(op)[-1][2]["turn"])

    def event(n: int) -> Operation:
        return Operation("track", {"event_name": "opened", "external_id": str(n)})

    # Logins named by the address alone join the waiting upsert that names both.
    one = turn(release(upsert(1)))
    release(Operation("upsert", {"email": "user1@example.com", "first_name": "Ada"}))
    release(upsert(1, last_name="L"))
    assert turn(release(event(1))) == one + 1
    assert turn(release(event(1))) == one + 2  # each event a turn, not two (its companion)

    # As a worker would: the first's call in flight (it took its turn) when a login joins
    # it; then delivered (the login's own call is to come) or to run again after a 503 (with
    # its turn: it delivers both). The login goes after it, and the event with the login (it
    # waits for its version anyway), not after a turn of its own.
    for n, delivered in ((2, True), (3, False), (4, None)):
        first = upsert(n)
        place = release(first)
        contact = store.contact_of(first.payload) or ""
        claim = store.claim(contact, 1, lease=5.0)
        got = budget.acquire(lease=5.0, lane=LANE_AUTOMATION, waiter=first.id, place=place)
        assert claim.state == "deliver" and got.token is not None
        budget.finish(got.token)
        if delivered is None:  # delivered before the login: the login is a sync of its own
            store.settle(claim)
            store.finish([first.id], "delivered", 1)
        login = turn(release(upsert(n, last_name="L")))
        if delivered is not None:
            store.settle(claim, delivered=delivered)
        assert login == turn(place) + 1
        assert turn(release(event(n))) == login + (delivered is None)


def test_status_reads_lanes_pending_counters_and_budget(make: MakeDispatcher) -> None:
    dispatcher = make()
    dispatcher.publish(upsert(1))
    dispatcher.publish(upsert(2))
    dispatcher.publish(Operation("send", {"trigger_key": "receipt", "to_email": "a@example.com"}))
    status = dispatcher.status()
    assert status.engine == "celery"
    assert status.queued == {"transactional": 1, "automation": 2, "routine": 0, "backfill": 0}
    assert status.pending == 3
    assert 0.0 <= status.oldest_wait["automation"] < 5.0
    assert (status.in_flight, status.retry_waiting, status.paused_for) == (0, 0, 0.0)
    assert status.budget_left == {"60/minute": 60, "1000/hour": 1000}
    assert (status.delivered, status.failed, status.dropped, status.unchanged) == (0, 0, 0, 0)
    assert status.backfill is None


def test_status_reads_waits_and_latency_alike_on_a_host_whose_clock_is_an_hour_ahead(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher, real = make(), time.time
    dispatcher.publish(upsert(1))
    dispatcher.store.finish([], answer=(LANE_AUTOMATION, 0.25, dispatcher.store.clock()))
    on_time = dispatcher.status()
    assert on_time.latency["automation"] == (0.25, 0.25)
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # `flask meisa status` there
    ahead = dispatcher.status()
    assert ahead.oldest_wait["automation"] < 5.0
    assert ahead.latency.get("automation") == (0.25, 0.25)


def test_status_reads_the_wait_of_operations_a_web_host_an_hour_behind_released_just_now(
    make: MakeDispatcher,
) -> None:
    # Each was scored by its creation on the web host that released it: one an hour
    # behind showed operations 0 s old as waiting an hour, to whichever host asked.
    dispatcher, made = make(), time.time() - 3600.0  # that host's clock
    sync = Operation("upsert", upsert(1).payload, created_at=made)  # into its record
    receipt = {"trigger_key": "receipt", "to_email": "a@b.co"}
    for op in (sync, Operation("send", receipt, created_at=made)):
        dispatcher.publish(op)
    status = dispatcher.status()
    assert status.oldest_wait["automation"] < 5.0
    assert status.oldest_wait["transactional"] < 5.0


def test_flush_is_true_once_every_operation_is_finished(make: MakeDispatcher) -> None:
    dispatcher = make()
    ops = [upsert(n) for n in range(3)]
    for op in ops:
        dispatcher.publish(op)
    assert dispatcher.flush(timeout=0.05) is False  # no worker has run them
    dispatcher.store.finish([op.id for op in ops], "delivered", 3)  # as a worker would
    assert dispatcher.flush(timeout=0) is True


def test_a_closed_dispatcher_takes_nothing(make: MakeDispatcher, hooks: RecordingHooks) -> None:
    dispatcher = make()
    assert dispatcher.close() == 0
    with pytest.raises(DeliveryError, match="closed"):
        dispatcher.publish(Operation("send", {"trigger_key": "receipt", "to_email": "a@b.co"}))
    # Reported by none: the extension hands it to the app's next engine.
    with pytest.raises(EngineClosed, match="closed"):
        dispatcher.publish(upsert())
    assert hooks.of("dropped") == []


def test_an_unreachable_broker_refuses_sends_and_drops_the_rest(
    make: MakeDispatcher, hooks: RecordingHooks, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(broker_url="redis://:hunter2@127.0.0.1:9/0")  # nothing listens
    with pytest.raises(DeliveryError, match="publishing failed") as refused:
        dispatcher.publish(Operation("send", {"trigger_key": "receipt", "to_email": "a@b.co"}))
    op = upsert()
    dispatcher.publish(op)
    assert hooks.detail(op) == "broker_unavailable"
    assert "hunter2" not in str(refused.value)
    assert "hunter2" not in caplog.text
    assert "user1@example.com" not in caplog.text


def test_flush_is_false_at_once_while_redis_cannot_be_read(
    make: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(broker_url="redis://127.0.0.1:9/0")  # nothing listens
    started = time.monotonic()
    assert dispatcher.flush(30.0) is False
    assert time.monotonic() - started < 10.0  # not the flush's timeout
    assert "cannot read the pending count from Redis" in caplog.text


def test_what_could_not_be_published_is_neither_pending_nor_kept(
    redis_url: str, client: Any, hooks: RecordingHooks
) -> None:
    celery_app = make_celery("redis://127.0.0.1:9/0")  # a broker nothing listens on
    celery_app.conf.broker_connection_max_retries = 0
    celery_app.conf.task_publish_retry = False
    dispatcher = CeleryDispatcher(
        celery_app, redis=redis.Redis.from_url(redis_url), hooks=hooks, lost_after=1.0
    )
    try:
        with pytest.raises(DeliveryError, match="publishing failed"):
            dispatcher.publish(Operation("send", {"trigger_key": "receipt", "to_email": "a@b.co"}))
        dispatcher.publish(upsert())
        assert hooks.detail(hooks.of("dropped")[0]) == "broker_unavailable"
        # Nothing a later sweep could publish: the send reported not sent stays unsent.
        assert dispatcher.store.pending() == 0
        assert not client.exists("meisa:meisa:tasks", "meisa:meisa:seen")
    finally:
        dispatcher.close()
        celery_app.close()


def test_a_sweep_that_fails_never_drops_the_operation_being_published(
    make: MakeDispatcher, client: Any, hooks: RecordingHooks, caplog: pytest.LogCaptureFixture
) -> None:
    # A pending operation whose kept task the sweep cannot publish (no such lane).
    broken = Operation("track", {"event_name": "e", "email": "a@example.com"})
    client.zadd("meisa:meisa:pending:automation", {broken.id: broken.created_at})
    client.zadd("meisa:meisa:seen", {broken.id: broken.created_at - 60})
    client.hset("meisa:meisa:tasks", broken.id, json.dumps([9, broken.to_dict(), {}]))
    dispatcher = make(lost_after=1.0)
    op = upsert()
    dispatcher.publish(op)  # its first look at Redis sweeps
    assert hooks.of("dropped") == []
    assert [m["kwargs"]["op"]["id"] for m in messages(client, "meisa.automation")] == [op.id]
    assert "publishing lost operations again failed (KeyError)" in caplog.text


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
            "automation": "billing.automation",
            "routine": "billing.routine",
            "backfill": "billing.backfill",
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
        # A scheme in capitals is still Redis's (the config accepts it; so does redis-py).
        app.config["MEISA_CELERY_REDIS_URL"] = redis_url.replace("redis://", "REDIS://", 1)
        make_dispatcher(state).close()
    finally:
        app.extensions["celery"].close()


def test_settings_are_checked_and_a_celery_app_is_required() -> None:
    assert CelerySettings.from_config({}) == CelerySettings(None, "meisa", None)
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
    app = app_with_celery(redis_url, MEISA_DELIVERY="celery", MEISA_RATE_LIMIT="7/second")
    celery_app = app.extensions["celery"]
    try:
        init_celery(app, app.extensions["meisa"].state(app).settings)
        assert TASK_NAME in celery_app.tasks
        worker = worker_of(celery_app)
        assert isinstance(worker, DeliveryWorker)
        assert worker.budget is not None
        assert [w.label for w in worker.budget.windows] == ["7/second"]
        worker.close()
        worker.store.redis.close()
    finally:
        celery_app.close()


def test_the_celery_engine_warns_about_an_unknown_key_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="flask_meisa"):
        app = app_with_celery(redis_url, MEISA_DELIVERY="celery", MEISA_QUEUE_SIZ=5)
    try:
        warned = [r for r in caplog.records if "MEISA_QUEUE_SIZ" in r.getMessage()]
        assert len(warned) == 1  # init_celery uses the settings, not the config again
    finally:
        app.extensions["celery"].close()


def test_a_worker_process_makes_its_own_worker_again_after_a_fork(redis_url: str) -> None:
    app = app_with_celery(redis_url, MEISA_DELIVERY="celery")
    celery_app = app.extensions["celery"]
    try:
        worker = worker_of(celery_app)
        assert worker_of(celery_app) is worker  # one per process, shared by its threads
        app.extensions["meisa"].state(app).dispatcher.after_fork()  # as in a forked child
        assert worker_of(celery_app) is not worker
    finally:
        app.extensions["meisa"].close(app, timeout=0)
        celery_app.close()


def test_the_visibility_timeout_is_set_and_checked_against_the_idempotency_hour(
    redis_url: str,
) -> None:
    app = app_with_celery(redis_url, MEISA_DELIVERY="celery")  # no visibility_timeout set
    options = app.extensions["celery"].conf.broker_transport_options
    assert options["visibility_timeout"] == DEFAULT_VISIBILITY_TIMEOUT == 600.0
    assert options["queue_order_strategy"] == "priority"  # the app's own options kept
    app.extensions["celery"].close()
    for visibility, config, refused in [
        # 3600 s, less 600 s of margin, the retry deadline and kombu's sweep (0.25 s here)
        (3600.0, {}, "and 2399.75 s"),
        (2000.0, {"MEISA_RETRY_DEADLINE": 1000.0}, "and 1999.75 s"),
        (50.0, {}, "between 53.2 s"),  # 4 x (3.05 + 10) + 1: a run may outlast it
    ]:
        celery_app = make_celery(redis_url, visibility_timeout=visibility)
        app = Flask(__name__)
        app.config.update(MEISA_API_KEY=KEY, MEISA_DELIVERY="celery", **config)
        app.extensions["celery"] = celery_app
        with pytest.raises(ConfigurationError, match=refused):
            Meisa(app)
        celery_app.close()


def test_the_longest_countdown_fits_in_the_visibility_timeout(redis_url: str) -> None:
    fast = MeisaSettings.from_config(
        {**DEFAULTS, "MEISA_API_KEY": KEY, "MEISA_TIMEOUT": 1.5, "MEISA_CONNECT_TIMEOUT": 0.5}
    )
    for visibility, longest in [(600.0, 300.0), (20.0, 12.0)]:
        celery_app = make_celery(redis_url, visibility_timeout=visibility)
        assert configure_visibility(celery_app, fast) == longest
        celery_app.close()
    amqp = make_celery("amqp://guest@127.0.0.1:9//")  # no visibility timeout to set
    assert configure_visibility(amqp, fast) == 300.0
    assert "visibility_timeout" not in amqp.conf.broker_transport_options
    assert lost_after(amqp, 2.0) is None  # nothing to take back: nothing taken for lost
    amqp.close()


def test_a_message_is_taken_for_lost_once_kombu_would_have_given_it_back(
    redis_url: str,
) -> None:
    celery_app = make_celery(redis_url, visibility_timeout=20.0)
    # The visibility timeout, kombu's sweep (0.25 x 1 s here), its lock (3 s), 4 runs.
    assert lost_after(celery_app, 2.0) == 20.0 + 0.25 + 3.0 + 8.0
    celery_app.conf.broker_transport_options = {}  # kombu's defaults, the engine's timeout
    assert lost_after(celery_app, 13.05) == 600.0 + 100.0 + 300.0 + 52.2
    celery_app.close()


def test_a_budget_slot_waits_for_the_shared_budget(make: MakeDispatcher) -> None:
    dispatcher = make(rate_limit="3/2 seconds")
    other = make(rate_limit="3/2 seconds")  # another process on the same key
    held = [other.budget.acquire(lease=5.0, lane=0) for _ in range(3)]  # type: ignore[union-attr]
    for got in held:
        assert got.token is not None
        other.budget.finish(got.token)  # type: ignore[union-attr]
    with dispatcher.budget_slot(0.1) as taken:
        assert taken is False  # the window is spent: no slot within 0.1 s
    started = time.monotonic()
    with dispatcher.budget_slot(5.0) as taken:
        assert taken is True
        waited = time.monotonic() - started
    assert 1.0 < waited < 2.5  # until the first answer left the 2 s window


def silent_redis_app(
    silent: socket.socket, redis_url: str, emulator: Any, **config: Any
) -> tuple[Flask, Meisa]:
    """An app on the Celery engine whose Redis is ``silent`` (it listens, never answers)."""
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=emulator.live_key,
        MEISA_BASE_URL=emulator.url,
        MEISA_DELIVERY="celery",
        MEISA_CELERY_REDIS_URL=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
        **config,
    )
    app.extensions["celery"] = make_celery(redis_url)
    return app, Meisa(app)


def test_a_redis_that_never_answers_holds_a_synchronous_send_only_so_long(
    redis_url: str, emulator: Any
) -> None:
    # A Redis behind a network partition, or stalled: the connection is made (the kernel
    # completes it), no answer ever comes. A send in a request must not wait for ever on
    # its budget slot (nor a response's release on publishing).
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        app, meisa = silent_redis_app(silent, redis_url, emulator, MEISA_SEND_DEADLINE=1.0)
        results: list[Any] = []

        def send() -> None:
            with app.app_context():
                results.append(meisa.send("receipt", "ada@example.com"))

        thread = threading.Thread(target=send, daemon=True)
        try:
            thread.start()
            thread.join(30.0)
            assert [result.status for result in results] == ["sent"]
        finally:
            silent.close()  # what still waits on it gets a reset
            thread.join(30.0)
            meisa.close()
            app.extensions["celery"].close()


def test_a_redis_that_never_answers_costs_a_retried_send_its_wait_once(
    redis_url: str, emulator: Any
) -> None:
    # Each attempt takes its own slot: where Redis cannot give one (each ask waits out
    # the socket timeout, 5 s), asking again for every retry spent the deadline on Redis
    # and failed a send that Meisa would have taken on its third attempt.
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        app, meisa = silent_redis_app(
            silent, redis_url, emulator, MEISA_SEND_DEADLINE=9.0, MEISA_RETRY_BASE_DELAY=0.1
        )
        state = meisa.state(app)
        state.suppression.close()
        state.suppression = state.reporter.suppression = SuppressionSet(
            lambda: SimpleNamespace(emails=(), as_of=None)  # loaded without the budget
        )
        assert state.suppression.load()
        emulator.faults.fail_next(2, status=503, path="/emails/trigger/")
        results: list[Any] = []

        def send() -> None:
            with app.app_context():
                try:
                    results.append(meisa.send("receipt", "ada@example.com").status)
                except Exception as error:
                    results.append(error)

        thread = threading.Thread(target=send, daemon=True)
        try:
            thread.start()
            thread.join(30.0)
            assert results == ["sent"]
            assert len(emulator.requests_to("/emails/trigger/")) == 3
        finally:
            silent.close()  # what still waits on it gets a reset
            thread.join(30.0)
            meisa.close()
            state.suppression.close()
            app.extensions["celery"].close()


def test_a_redis_that_never_answers_holds_a_release_once_not_per_operation(
    redis_url: str, emulator: Any
) -> None:
    # Each publish asked Redis twice (its records, then their cleanup on the drop), each
    # ask waiting out the 5 s socket timeout: a response's release of three operations
    # held its worker for 30 s, then (the others dropped at once) 10 s; and a send made
    # next waited 5 s more on its budget slot, which kept a stall of its own.
    from flask_meisa import delivery_dropped

    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        app, meisa = silent_redis_app(silent, redis_url, emulator)
        dropped: list[str] = []

        def on_dropped(sender: Flask, operation: Operation, reason: str, **extra: Any) -> None:
            dropped.append(reason)

        try:
            with delivery_dropped.connected_to(on_dropped, sender=app), app.app_context():
                started = time.monotonic()
                for n in range(3):
                    meisa.upsert({"email": f"user{n}@example.com"})
                took = time.monotonic() - started
                started = time.monotonic()
                sent = meisa.send("receipt", "ada@example.com").status
                took_send = time.monotonic() - started
            assert dropped == ["broker_unavailable"] * 3
            assert took < 7.0, took  # one socket timeout (5 s)
            assert (sent, took_send < 2.0) == ("sent", True), took_send
        finally:
            silent.close()
            meisa.close()
            app.extensions["celery"].close()


def test_a_broker_that_never_answers_holds_a_release_once_and_is_named(
    redis_url: str, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker on a Redis of its own, stalled: kombu waits for ever on a publish unless
    # told otherwise, so a response's release of three operations held its thread for good.
    from flask_meisa import delivery_dropped

    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        app = Flask(__name__)
        app.config.update(
            MEISA_API_KEY=emulator.live_key,
            MEISA_BASE_URL=emulator.url,
            MEISA_DELIVERY="celery",
            MEISA_CELERY_REDIS_URL=redis_url,
        )
        app.extensions["celery"] = make_celery(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        meisa = Meisa(app)
        dropped: list[str] = []
        released = threading.Event()

        def on_dropped(sender: Flask, operation: Operation, reason: str, **extra: Any) -> None:
            dropped.append(reason)

        def release() -> None:
            with delivery_dropped.connected_to(on_dropped, sender=app), app.app_context():
                for n in range(3):
                    meisa.upsert({"email": f"user{n}@example.com"})
            released.set()

        thread = threading.Thread(target=release, daemon=True)
        started = time.monotonic()
        try:
            thread.start()
            assert released.wait(30.0), "the release still waits on the broker"
            # One socket timeout (5 s), then the others dropped at once.
            assert time.monotonic() - started < 12.0
            assert dropped == ["broker_unavailable"] * 3
            assert "(broker_unavailable: TimeoutError)" in caplog.text
            with app.app_context():  # the records Redis answers: nothing dropped is left pending
                assert meisa.flush(timeout=1)
        finally:
            silent.close()  # what still waits on it gets a reset
            thread.join(30.0)
            meisa.close()
            app.extensions["celery"].close()


def test_a_redis_that_lost_its_data_has_what_was_pending_reported(
    make: MakeDispatcher, hooks: RecordingHooks, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make()
    ops = [upsert(n) for n in range(3)]
    for op in ops:
        dispatcher.publish(op)
    dispatcher.store.finish([ops[0].id], "delivered", 1)  # as a worker would
    dispatcher.status()  # it looks now and then, and finds ops[0] finished
    client.flushall()  # as a restart without persistence does
    assert dispatcher.flush(timeout=1) is False
    assert [op.id for op in hooks.of("dropped")] == [ops[1].id, ops[2].id]
    assert {hooks.detail(op) for op in hooks.of("dropped")} == {"redis_data_lost"}
    assert "2 operation(s) this process submitted were pending" in caplog.text
    assert dispatcher.status().dropped == 2
    assert dispatcher.flush(timeout=0) is True  # reported once; the new Redis is empty
    dispatcher.publish(upsert(9))  # and the engine carries on
    assert dispatcher.store.pending() == 1
    assert len(hooks.of("dropped")) == 2


def test_a_data_loss_reports_nothing_that_a_flush_found_finished(
    make: MakeDispatcher, hooks: RecordingHooks, client: Any
) -> None:
    # The ledger was pruned of what it asked Redis about, once a second: a flush that found
    # nothing pending within that second left its operations there, and a data loss later
    # reported them dropped though Meisa had them.
    dispatcher = make()
    ops = [upsert(n) for n in range(3)]
    for op in ops:
        dispatcher.publish(op)
    dispatcher.store.finish([op.id for op in ops], "delivered", 3)  # as a worker would
    assert dispatcher.flush(timeout=1)
    later = upsert(9)
    dispatcher.publish(later)  # pending as Redis loses its data
    client.flushall()  # as a restart without persistence does
    assert dispatcher.flush(timeout=1) is False
    assert [op.id for op in hooks.of("dropped")] == [later.id]


def test_a_data_loss_counts_what_the_full_ledger_forgot_without_naming_it(
    make: MakeDispatcher, hooks: RecordingHooks, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(ledger_size=2)
    ops = [upsert(n) for n in range(5)]
    for op in ops:
        dispatcher.publish(op)
    client.flushall()  # as a restart without persistence does
    assert dispatcher.flush(timeout=1) is False
    # The ledger keeps the newest (up to its size), the older ones are a count.
    assert [op.id for op in hooks.of("dropped")] == [ops[3].id, ops[4].id]
    assert (
        "5 operation(s) this process submitted were pending and are reported dropped"
        " (3 of them, over the ledger's size, not one by one)" in caplog.text
    )
    assert dispatcher.status().dropped == 5


def test_dead_letters_an_unreachable_broker_does_not_take_stay_dead_letters(
    redis_url: str, client: Any, hooks: RecordingHooks
) -> None:
    # The records in Redis, the broker elsewhere and down: a retry queues nothing, and
    # loses no dead letter (an upsert or event publish() drops, unlike a send it refuses).
    celery_app = make_celery("redis://127.0.0.1:9/0")  # a broker nothing listens on
    celery_app.conf.broker_connection_max_retries = 0
    celery_app.conf.task_publish_retry = False
    dispatcher = CeleryDispatcher(celery_app, redis=redis.Redis.from_url(redis_url), hooks=hooks)
    try:
        letters = dispatcher.dead_letters
        track = Operation("track", {"event_name": "signed_up", "external_id": "7"})
        letters.bury([upsert(), track], DeliveryError("the retry deadline passed"))
        before = letters.find()
        assert len(before) == 2
        with pytest.raises(DeliveryError):
            letters.retry(None, force=True)
        assert letters.find() == before
        assert hooks.of("dropped") == []
    finally:
        dispatcher.close()
        celery_app.close()


def test_dead_letters_are_taken_one_at_a_time_as_they_are_queued_again(
    redis_url: str, hooks: RecordingHooks
) -> None:
    # A broker that stalls (the retry is then killed, or times out): only the letter being
    # queued is out of Redis, not all of them, taken before the first was queued.
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        silent.settimeout(30.0)
        celery_app = make_celery(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        celery_app.conf.broker_connection_max_retries = 0
        celery_app.conf.task_publish_retry = False
        dispatcher = CeleryDispatcher(
            celery_app, redis=redis.Redis.from_url(redis_url), hooks=hooks
        )
        letters = dispatcher.dead_letters
        letters.bury([upsert(n) for n in range(3)], DeliveryError("the retry deadline passed"))
        errors: list[BaseException] = []

        def retry() -> None:
            try:
                letters.retry(None, force=True)
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=retry, daemon=True)
        try:
            thread.start()
            connection, _ = silent.accept()  # the first letter is being queued
            try:
                assert len(letters.find()) == 2
            finally:
                connection.close()  # what waits on it gets a reset
        finally:
            silent.close()
            thread.join(30.0)
            dispatcher.close()
            celery_app.close()
    assert [type(error) for error in errors] == [DeliveryError]
    assert len(letters.find()) == 3
