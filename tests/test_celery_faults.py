"""The Celery engine under trouble, end to end (real Redis servers, real ``celery worker``
processes, the emulator): synchronous sends and suppression loads share the workers'
budget; a Redis restart with AOF delivers the backlog within the visibility timeout; a
Redis that lost its data has what was pending reported; an outage pauses every worker
together."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa._engine.celery_setup import lost_after
from flask_meisa._engine.celery_worker import lane_queues
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from tests.celery_support import RedisServer
from tests.celery_support import StartWorker
from tests.celery_support import make_celery
from tests.celery_support import own_redis_fixture  # noqa: F401
from tests.celery_support import producer_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.celery_support import start_worker_fixture  # noqa: F401
from tests.engine_support import RecordingHooks
from tests.process_support import wait_until

UPSERT = "/api/v1/contacts/upsert/"
TRACK = "/api/v1/events/track/"
TRIGGER = "/api/v1/emails/trigger/"
#: Workers with short call timeouts, so that a short visibility timeout is accepted.
VISIBILITY = 9.0
QUICK = {
    "MEISA_TEST_CONFIG": json.dumps({"MEISA_TIMEOUT": 1.5, "MEISA_CONNECT_TIMEOUT": 0.5}),
    "MEISA_TEST_VISIBILITY": str(VISIBILITY),
}

MakeProducer = Callable[..., CeleryDispatcher]


def upsert(n: int) -> Operation:
    return Operation("upsert", {"email": f"user{n}@example.com", "external_id": f"u{n}"})


def synced(emulator: Emulator, ops: list[Operation]) -> set[str]:
    """The ids of ``ops`` whose contact Meisa has."""
    return {op.id for op in ops if emulator.contact(external_id=op.payload["external_id"])}


def statuses(emulator: Emulator) -> list[int | None]:
    return [request.status for request in emulator.requests]


def test_synchronous_sends_and_suppression_loads_take_slots_from_the_workers_budget(
    emulator_factory: Callable[..., Emulator], redis_url: str, start_worker: StartWorker
) -> None:
    budget = "30/10 seconds"  # the emulator's and the app's: one slot held for sends
    emulator = emulator_factory(rate_limit=budget)
    workers = [start_worker(emulator, wait=False, MEISA_TEST_RATE_LIMIT=budget) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=emulator.live_key,
        MEISA_BASE_URL=emulator.url,
        MEISA_DELIVERY="celery",
        MEISA_RATE_LIMIT=budget,
        MEISA_SEND_DEADLINE=25.0,
    )
    app.extensions["celery"] = make_celery(redis_url)
    meisa = Meisa(app)
    try:
        with app.app_context():
            for n in range(4):  # each worker process loads the suppression list for these
                meisa.send("receipt", f"buyer{n}@example.com", background=True)
            for n in range(40):
                meisa.upsert({"email": f"user{n}@example.com", "external_id": f"u{n}"})
            # The workers spend the window's budget, then wait on it...
            assert emulator.wait_for_requests(25, path=UPSERT, timeout=30)
            # ... while this process loads the list and sends, each call with its slot.
            results = [
                meisa.send("password_reset", f"reset{n}@example.com", variables={"n": n})
                for n in range(4)
            ]
            assert meisa.flush(timeout=60)
        assert [result.status for result in results] == ["sent"] * 4
        assert statuses(emulator).count(429) == 0
        assert len(emulator.sends()) == 8
        assert len(emulator.requests_to(UPSERT)) == 40
        loads = emulator.requests_to("/api/v1/contacts/api/unsubscribed-emails/")
        assert len(loads) >= 2  # this process's and at least one worker's
    finally:
        meisa.state(app).close(timeout=0)
        app.extensions["celery"].close()


def test_a_retry_the_broker_refused_runs_again_instead_of_being_dropped(
    emulator: Emulator, start_worker: StartWorker, producer: MakeProducer
) -> None:
    start_worker(emulator, MEISA_TEST_UNPUBLISHED_RETRIES="1", **QUICK)
    emulator.faults.fail_next(1, 503, path=UPSERT)
    dispatcher = producer(emulator)
    operation = upsert(1)
    dispatcher.publish(operation)
    # Celery rejects a task whose retry it cannot publish: the message must come back.
    assert dispatcher.flush(timeout=20)
    assert synced(emulator, [operation]) == {operation.id}
    assert [r.status for r in emulator.requests_to(UPSERT)] == [503, 201]


def still_pending(redis_url: str, operations: list[Operation]) -> dict[str, list[str]]:
    """The operations the engine's records count pending, by lane, named by kind and index."""
    names = {op.id: f"{op.kind} {n}" for n, op in enumerate(operations)}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        lanes = {key: client.zrange(key, 0, -1) for key in client.scan_iter("meisa:*:pending:*")}
    finally:
        client.close()
    return {str(key): [names.get(str(i), str(i)) for i in ids] for key, ids in lanes.items()}


def test_a_redis_restart_with_aof_delivers_the_backlog_within_the_visibility_timeout(
    own_redis: Callable[..., RedisServer],
    emulator: Emulator,
    start_worker: StartWorker,
    producer: MakeProducer,
) -> None:
    server = own_redis(appendonly=True)
    budget = "10/2 seconds"  # most of the backlog waits as countdowns held by workers
    start_worker(emulator, redis=server.url, MEISA_TEST_RATE_LIMIT=budget, **QUICK)
    hooks = RecordingHooks()
    # Any message a worker was taking as Redis went down is published again, as an app
    # with the workers' settings would (QUICK: calls of 0.5 + 1.5 s at most).
    after = lost_after(make_celery(server.url, visibility_timeout=VISIBILITY), 2.0)
    dispatcher = producer(
        emulator, rate_limit=budget, redis=server.url, hooks=hooks, lost_after=after
    )
    ops = [upsert(n) for n in range(30)]
    sends = [
        Operation(
            "send",
            {
                "trigger_key": "receipt",
                "to_email": f"b{n}@example.com",
                "idempotency_key": f"k{n}",
            },
        )
        for n in range(5)
    ]
    for op in [*ops, *sends]:
        dispatcher.publish(op)
    assert emulator.wait_for_requests(12, path=UPSERT, timeout=20)
    server.restart()
    restarted = time.monotonic()
    # Celery stops a worker that holds messages when its broker connection drops; a
    # supervisor starts another, as here.
    start_worker(emulator, redis=server.url, MEISA_TEST_RATE_LIMIT=budget, **QUICK)
    flushed = dispatcher.flush(timeout=VISIBILITY + 45)
    took = time.monotonic() - restarted
    # What was still missing, should the backlog ever stay parked (seen once in CI).
    assert flushed, (
        f"after {took:.0f}s: {len(synced(emulator, ops))} of 30 contacts,"
        f" {len(emulator.sends())} of 5 sends, statuses {Counter(statuses(emulator))},"
        f" dropped {len(hooks.of('dropped'))},"
        f" sweep lock {redis.Redis.from_url(server.url).pttl('unacked_mutex')} ms,"
        f" still pending {still_pending(server.url, [*ops, *sends])}"
    )
    assert synced(emulator, ops) == {op.id for op in ops}
    assert sorted(s["to_email"] for s in emulator.sends()) == sorted(
        op.payload["to_email"] for op in sends
    )
    assert hooks.of("dropped") == []  # Redis kept its data: nothing was lost
    # Messages held by the workers came back after the visibility timeout (plus the
    # transport's sweep and the budget's pace), not after an hour.
    assert took < VISIBILITY + 40, took


def three_operations() -> list[Operation]:
    """An upsert, an event of its contact and a send."""
    return [
        upsert(1),
        Operation("track", {"event_name": "exported", "external_id": "u1"}),
        Operation("send", {"trigger_key": "receipt", "to_email": "buyer@example.com"}),
    ]


def test_operations_whose_messages_the_broker_lost_are_published_again(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: MakeProducer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa")
    dispatcher = producer(emulator, lost_after=1.0)
    ops = three_operations()
    for op in ops:
        dispatcher.publish(op)
    client = redis.Redis.from_url(redis_url)
    assert client.delete(*lane_queues().values()) >= 1  # the broker lost every message
    client.close()
    start_worker(emulator)
    assert dispatcher.flush(timeout=20)
    assert [len(emulator.requests_to(path)) for path in (UPSERT, TRACK, TRIGGER)] == [1, 1, 1]
    assert "unseen by every worker for 1 s: published again" in caplog.text


def test_a_second_copy_of_a_message_makes_no_second_call(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    dispatcher = producer(emulator)
    for op in three_operations():
        dispatcher.publish(op)
    client = redis.Redis.from_url(redis_url)
    try:
        # Each message twice, the copy behind the first, as a sweep that took an operation
        # for lost while its message waited in the queue would leave them.
        queues = list(lane_queues().values())
        copies = {queue: client.lrange(queue, 0, -1) for queue in queues}
        for queue, messages in copies.items():
            if messages:
                client.lpush(queue, *reversed(messages))
        assert sum(map(len, copies.values())) == 4  # with the companion of the event
        start_worker(emulator, concurrency=1)
        assert dispatcher.flush(timeout=20)
        assert wait_until(lambda: sum(client.llen(queue) for queue in queues) == 0)
    finally:
        client.close()
    last = upsert(2)  # the one worker thread runs it once the last copy's run is over
    dispatcher.publish(last)
    assert dispatcher.flush(timeout=20)
    assert [len(emulator.requests_to(path)) for path in (UPSERT, TRACK, TRIGGER)] == [2, 1, 1]


def test_a_redis_that_lost_its_data_has_what_was_pending_reported(
    own_redis: Callable[..., RedisServer],
    emulator: Emulator,
    start_worker: StartWorker,
    producer: MakeProducer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa")
    server = own_redis(appendonly=False)
    budget = "10/2 seconds"
    start_worker(emulator, redis=server.url, MEISA_TEST_RATE_LIMIT=budget, **QUICK)
    hooks = RecordingHooks()
    dispatcher = producer(emulator, rate_limit=budget, redis=server.url, hooks=hooks)
    ops = [upsert(n) for n in range(30)]
    for op in ops:
        dispatcher.publish(op)
    assert emulator.wait_for_requests(10, path=UPSERT, timeout=20)
    assert dispatcher.status().pending >= 10  # a backlog (the app looks now and then)
    server.restart()  # no persistence: every record, queue and countdown is gone
    assert dispatcher.flush(timeout=5) is False
    start_worker(emulator, redis=server.url, MEISA_TEST_RATE_LIMIT=budget, **QUICK)
    dropped = hooks.of("dropped")
    assert {hooks.detail(op) for op in dropped} == {"redis_data_lost"}
    assert "Redis lost the Celery engine's data" in caplog.text
    assert dispatcher.status().dropped == len(dropped)
    # The engine carries on with the new Redis.
    later = upsert(99)
    dispatcher.publish(later)
    assert dispatcher.flush(timeout=30)
    assert synced(emulator, [later]) == {later.id}
    delivered = synced(emulator, ops)
    reported = {op.id for op in dropped}
    assert reported | delivered == {op.id for op in ops}  # nothing vanished unreported
    # Reported and delivered anyway: only what was in a worker's hands (or finished)
    # around the restart.
    assert len(reported & delivered) <= 4, len(reported & delivered)


def test_publishing_resumes_as_soon_as_a_stalled_redis_answers_again(
    own_redis: Callable[..., RedisServer], emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    # After a timeout a process drops what it releases for 10 s, rather than each release
    # waiting out the socket timeout (5 s): those 10 s ran on after Redis was back, so a
    # blip of a second cost every process ten seconds of syncs.
    caplog.set_level(logging.WARNING, logger="flask_meisa")
    server = own_redis()
    assert server.process is not None
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=emulator.live_key, MEISA_BASE_URL=emulator.url, MEISA_DELIVERY="celery"
    )
    app.extensions["celery"] = make_celery(server.url)
    meisa = Meisa(app)

    def release(n: int) -> float:
        started = time.monotonic()
        meisa.upsert({"email": f"user{n}@example.com"})
        return time.monotonic() - started

    dispatcher = meisa.state(app).dispatcher
    assert isinstance(dispatcher, CeleryDispatcher)
    stall = dispatcher.stall
    try:
        with app.app_context():
            release(0)
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                assert release(1) < 7.0  # one socket timeout
                assert release(2) < 0.5  # then dropped at once, the probe waiting on Redis
                child = os.fork()  # (as a server's worker): no probe of its parent's
                if child == 0:
                    code = 1
                    try:  # dropped at once; its own probe ends its stall
                        code = 0 if release(3) < 0.5 and wait_until(lambda: not stall) else 2
                    finally:
                        os._exit(code)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            back = time.monotonic()
            assert wait_until(lambda: not stall, timeout=5.0), "still stalled 5 s on"
            resumed = time.monotonic() - back
            assert os.waitpid(child, 0)[1] == 0
            child_resumed = time.monotonic() - back
            assert release(4) < 0.5
            assert dispatcher.status().pending == 2  # user0, user4
        assert (resumed < 2.0, child_resumed < 3.0) == (True, True), (resumed, child_resumed)
        assert caplog.text.count("broker_unavailable: TimeoutError") == 2  # user1, user2
    finally:
        meisa.state(app).close(timeout=0)
        app.extensions["celery"].close()


def test_an_outage_pauses_every_worker_together(
    emulator: Emulator, start_worker: StartWorker, producer: MakeProducer
) -> None:
    config = {
        "MEISA_RETRY_BASE_DELAY": 1.0,
        "MEISA_RETRY_MAX_DELAY": 8.0,
        "MEISA_RETRY_DEADLINE": 90.0,
    }
    workers = [
        start_worker(emulator, wait=False, MEISA_TEST_CONFIG=json.dumps(config)) for _ in range(2)
    ]
    for worker in workers:
        worker.wait_ready()
    dispatcher = producer(emulator)
    emulator.faults.outage(10)
    ops = [upsert(n) for n in range(30)]
    for op in ops:
        dispatcher.publish(op)
    assert dispatcher.flush(timeout=90)
    answered_503 = statuses(emulator).count(503)
    # Three failures in a row (and the calls already in flight), then one probe at a
    # time after a growing pause: 1 * 2 ** 2 = 4 s, then 8 s.
    assert answered_503 <= 8, answered_503
    assert synced(emulator, ops) == {op.id for op in ops}
    assert dispatcher.status().failed == 0
