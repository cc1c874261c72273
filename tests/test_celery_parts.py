"""The Celery budget's turns for coalesced records (one waiter per part, under its first
member's id, at the earliest of its tasks' places; a joined upsert's and a companion's
place taking no turn; the members' places forgotten once the part is delivered; an event
waiting for its contact's upsert, held among the waiters, never waited for by a task
delivering that upsert), against a real Redis, the emulator, and the delivery task's body
run in this process."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest

from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa._engine.celery_worker import DeliveryWorker
from flask_meisa._engine.celery_worker import RunAgain
from flask_meisa._engine.redis_budget import RedisBudget
from flask_meisa._engine.redis_records import _digest
from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.celery_support import make_celery
from tests.celery_support import redis_client_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.engine_support import RecordingHooks

FAST = RetryPolicy(max_attempts=5, base_delay=0.05, max_delay=0.2, deadline=30.0)
UPSERT = "/contacts/upsert/"

Task = tuple[dict[str, Any], dict[str, Any]]


def user(n: int, **fields: Any) -> dict[str, Any]:
    return {"email": f"user{n}@example.com", "external_id": str(n), "custom_fields": fields}


@pytest.fixture
def make_dispatcher(
    redis_url: str, client: Any, emulator: Emulator
) -> Iterator[Callable[..., CeleryDispatcher]]:
    """A dispatcher on the emulator's key whose tasks the tests run themselves."""
    made: list[Any] = []

    def make(rate_limit: str) -> CeleryDispatcher:
        celery_app = make_celery(redis_url)
        made.append(celery_app)
        return CeleryDispatcher(
            celery_app,
            redis=client,
            hooks=RecordingHooks(),
            rate_limit=rate_limit,
            budget_key=emulator.live_key,
        )

    yield make
    for celery_app in made:
        celery_app.close()


@pytest.fixture
def make_worker(emulator: Emulator, client: Any) -> Iterator[Callable[..., DeliveryWorker]]:
    """A worker on the dispatcher's store and key."""
    made: list[Any] = []

    def make(
        dispatcher: CeleryDispatcher, rate_limit: str, retry: RetryPolicy = FAST
    ) -> DeliveryWorker:
        worker = DeliveryWorker(
            client_factory=lambda: MeisaClient(emulator.live_key, emulator.url, timeout=2.0),
            hooks=RecordingHooks(),
            retry=retry,
            store=dispatcher.store,
            budget=RedisBudget(client, rate_limit, emulator.live_key),
            call_timeout=3.0,
        )
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def own_task(dispatcher: CeleryDispatcher, op: Operation) -> Task:
    *_, (_, data, meta) = dispatcher.tasks(op)
    return data, meta


def a_recovering_event(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
) -> tuple[CeleryDispatcher, DeliveryWorker, RunAgain]:
    """A dispatcher and worker, and event e0 of user 1 answered 404 (Meisa has no such
    contact): its task, run again, recovers it (its contact's upsert, then the event)."""
    dispatcher = make_dispatcher("100/second")
    worker = make_worker(dispatcher, "100/second")
    event = {"event_name": "e0", "external_id": "1"}
    recover = worker.run(*own_task(dispatcher, Operation("track", event, contact=user(1))))
    assert recover is not None and recover.meta.get("recover"), recover
    return dispatcher, worker, recover


def run_until_done(runs: dict[str, tuple[Any, ...]], seconds: float) -> dict[str, Any]:
    """Run each ``(worker, data, meta)`` task, each again when it asks, until every one is
    finished or ``seconds`` have passed; the tasks still running."""
    started = time.monotonic()
    due = dict.fromkeys(runs, started)
    while runs and time.monotonic() - started < seconds:
        name = min(due, key=due.__getitem__)
        time.sleep(max(due[name] - time.monotonic(), 0.0))
        worker, data, meta = runs[name]
        again = worker.run(data, meta)
        if again is None:
            del runs[name], due[name]
        else:
            runs[name] = (worker, again.op, again.meta)
            due[name] = time.monotonic() + again.countdown
    return runs


def test_a_joined_logins_task_keeps_its_parts_place_ahead_of_later_releases(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    client: Any,
    emulator: Emulator,
) -> None:
    # User 1's first sync is released, then user 2's, then user 1 logs in again (it joins
    # user 1's waiting sync and takes no turn: placed after it). The budget is spent, so
    # every task waits. User 1's part waits as one waiter, under its first member's id:
    # its place is its first member's (ahead of user 2's), not whichever of its tasks
    # asked last.
    dispatcher = make_dispatcher("1/second")
    worker = make_worker(dispatcher, "1/second")
    budget = worker.budget
    assert budget is not None
    spent = budget.acquire(lease=5.0, lane=LANE_AUTOMATION)
    assert spent.token is not None
    budget.finish(spent.token)

    first = Operation("upsert", user(1, plan="free"))
    other = Operation("upsert", user(2, plan="free"))
    login = Operation("upsert", user(1, last_active="t1"))
    tasks = [own_task(dispatcher, op) for op in (first, other, login)]
    assert [meta["lane"] for _, meta in tasks] == [LANE_AUTOMATION] * 3
    waits = [worker.run(*task) for task in tasks]  # each asks once, and is told to wait
    assert all(isinstance(again, RunAgain) for again in waits), waits
    turns = f"{budget._prefix}:turns:automation"
    ranked = [as_text(name) for name in client.zrange(turns, 0, -1)]
    assert ranked == [first.id, other.id], ranked

    # Seen from Meisa: once the window frees, user 2's task asks first and finds user 1's
    # part ahead of it: it leaves the one free slot to it.
    time.sleep(1.05)
    again = worker.run(*tasks[1])
    made = [r.body.get("external_id") for r in emulator.requests_to(UPSERT)]
    assert isinstance(again, RunAgain) and made == [], made


def test_a_contacts_last_turn_is_kept_only_a_lease_once_its_part_takes_its_slot(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    client: Any,
    emulator: Emulator,
) -> None:
    # docs/celery.md: a contact's last turn is kept "a lease and a grace past the slot its
    # last waiter takes", not a day.
    # User 1's sync is its contact's last; a login joins it (no turn of its own). The
    # login's task, asking for the part under the sync's id, takes the slot and delivers.
    dispatcher = make_dispatcher("100/second")
    worker = make_worker(dispatcher, "100/second")
    assert worker.budget is not None
    first = Operation("upsert", user(1, plan="free"))
    login = Operation("upsert", user(1, last_active="t1"))
    tasks = [own_task(dispatcher, op) for op in (first, login)]
    contact = tasks[0][1]["contact"]
    last = worker.budget._last(_digest(contact))
    assert as_text(client.get(last)).endswith(f" {first.id}")
    assert worker.run(*tasks[1]) is None  # delivered the part
    assert len(emulator.requests_to(UPSERT)) == 1
    assert 0 < client.pttl(last) <= (worker._lease + 1) * 1000, client.pttl(last)


def test_a_parts_other_tasks_wait_out_the_backoff_its_failed_call_was_given(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    emulator: Emulator,
) -> None:
    # User 1's sync and a login that joins it: one part, one call. Meisa answers it 503,
    # and the task that made it runs again after its backoff (about 1 s here). The login's
    # task, run meanwhile, delivers the same part: it waits out that backoff too.
    dispatcher = make_dispatcher("100/second")
    slow = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=1.0, random=lambda: 0.99)
    worker = make_worker(dispatcher, "100/second", retry=slow)
    first = Operation("upsert", user(1, plan="free"))
    login = Operation("upsert", user(1, last_active="t1"))
    first_task, login_task = (own_task(dispatcher, op) for op in (first, login))
    emulator.faults.fail_next(1, 503, path=UPSERT)
    failed = worker.run(*first_task)
    assert isinstance(failed, RunAgain) and failed.countdown > 0.9, failed
    started = time.monotonic()
    again = worker.run(*login_task)
    made = emulator.requests_to(UPSERT)
    assert len(made) == 1, f"called again {time.monotonic() - started:.3f} s after the 503"
    assert isinstance(again, RunAgain) and again.countdown > 0.5, again


def test_a_parts_task_does_not_wait_for_an_event_that_waits_for_that_part(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    emulator: Emulator,
) -> None:
    # User 1's sync waits; an event of user 1 is released (it waits for the sync, noted
    # among its lane's waiters meanwhile), then a login that joins the sync (placed after
    # the event). The sync's own task and the event's companion are held by a worker that
    # died (their messages come back only after the visibility timeout). The login's task
    # delivers the part the event waits for: it must not wait for the event.
    dispatcher = make_dispatcher("100/second")
    worker = make_worker(dispatcher, "100/second")
    sync = Operation("upsert", user(1, plan="free"))
    event = Operation("track", {"event_name": "exported", "external_id": "1"})
    login = Operation("upsert", user(1, last_active="t1"))
    own_task(dispatcher, sync)  # lost
    companion, event_task = dispatcher.tasks(event)  # the companion lost too
    assert companion[2].get("companion")
    runs = {"event": (worker, *event_task[1:]), "login": (worker, *own_task(dispatcher, login))}
    left = run_until_done(runs, 2.0)
    made = [r.path.rsplit("/", 2)[-2] for r in emulator.requests]
    assert made == ["upsert", "track"], f"in 2 s: {made} (still running: {sorted(left)})"


def test_an_events_recovery_and_the_later_upsert_it_waits_for_do_not_wait_for_each_other(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    emulator: Emulator,
) -> None:
    # The app tracks user 1's signup event, then syncs user 1 (a first upsert: the
    # automation lane too, placed after the event). Meisa has no contact yet: the event is
    # answered 404, and its recovery finds the newer upsert released since: it waits for
    # it (noted among its lane's waiters meanwhile). That upsert's task must not wait for
    # the event in turn.
    dispatcher = make_dispatcher("100/second")
    worker = make_worker(dispatcher, "100/second")
    event = Operation("track", {"event_name": "signed_up", "external_id": "1"}, contact=user(1))
    event_task = own_task(dispatcher, event)
    sync_task = own_task(dispatcher, Operation("upsert", user(1, plan="free")))
    assert [meta["lane"] for _, meta in (event_task, sync_task)] == [LANE_AUTOMATION] * 2
    # The event's task runs first (its 404), and again (it finds the sync to wait for)
    # before the sync's task first asks for its slot.
    recover = worker.run(*event_task)
    assert recover is not None and recover.meta.get("recover"), recover
    held = worker.run(recover.op, recover.meta)
    assert held is not None and held.countdown < 1.0, held
    runs = {"event": (worker, held.op, held.meta), "sync": (worker, *sync_task)}
    left = run_until_done(runs, 3.0)
    made = [(r.path.rsplit("/", 2)[-2], r.status) for r in emulator.requests]
    assert made == [("track", 404), ("upsert", 201), ("track", 200)], (made, sorted(left))


def test_an_event_behind_the_upsert_a_recovering_event_waits_for_goes_after_that_event(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    emulator: Emulator,
) -> None:
    # User 1's event is tracked before user 1's first sync; its call is answered 404 (the
    # sync and another event released meanwhile): it waits for the sync, and so must the
    # other event, behind the sync.
    dispatcher, worker, recover = a_recovering_event(make_dispatcher, make_worker)
    sync = own_task(dispatcher, Operation("upsert", user(1, plan="free")))
    event = {"event_name": "e1", "external_id": "1"}
    second = own_task(dispatcher, Operation("track", event, contact=user(1)))
    runs = {
        "first": (worker, recover.op, recover.meta),
        "sync": (worker, *sync),
        "second": (worker, *second),
    }
    left = run_until_done(runs, 3.0)
    made = [(r.path.rsplit("/", 2)[-2], r.status) for r in emulator.requests]
    assert [e["event_name"] for e in emulator.events()] == ["e0", "e1"], (made, sorted(left))


def test_an_event_behind_an_upsert_a_companion_delivered_goes_after_the_recovering_event(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    emulator: Emulator,
) -> None:
    # As above, but the sync is delivered by the companion of the later event, not by its
    # own task: the later event, behind the sync, still waits for the recovering one.
    dispatcher, worker, recover = a_recovering_event(make_dispatcher, make_worker)
    sync = own_task(dispatcher, Operation("upsert", user(1, plan="free")))
    event = {"event_name": "e1", "external_id": "1"}
    (_, *companion), (_, *second) = dispatcher.tasks(Operation("track", event, contact=user(1)))
    held = worker.run(recover.op, recover.meta)
    assert held is not None and not held.meta.get("recovered"), held
    assert run_until_done({"companion": (worker, *companion)}, 2.0) == {}  # the sync
    runs = {"second": (worker, *second), "first": (worker, held.op, held.meta)}
    runs["sync"] = (worker, *sync)
    left = run_until_done(runs, 3.0)
    made = [(r.path.rsplit("/", 2)[-2], r.status) for r in emulator.requests]
    assert [e["event_name"] for e in emulator.events()] == ["e0", "e1"], (made, sorted(left))


def test_an_event_behind_the_upsert_waits_for_a_recovering_event_a_busy_worker_runs_late(
    make_dispatcher: Callable[..., CeleryDispatcher],
    make_worker: Callable[..., DeliveryWorker],
    emulator: Emulator,
) -> None:
    # As above, but the first event's recovery runs late (its worker's threads are busy):
    # the sync goes, and the other event waits for the first all the same.
    dispatcher, worker, recover = a_recovering_event(make_dispatcher, make_worker)
    sync = own_task(dispatcher, Operation("upsert", user(1, plan="free")))
    event = {"event_name": "e1", "external_id": "1"}
    second = own_task(dispatcher, Operation("track", event, contact=user(1)))
    time.sleep(1.2)  # the recovery's due time and a grace pass
    left = run_until_done({"sync": (worker, *sync), "second": (worker, *second)}, 1.0)
    assert sorted(left) == ["second"] and emulator.events() == [], emulator.events()
    left = run_until_done({"first": (worker, recover.op, recover.meta), **left}, 3.0)
    assert [e["event_name"] for e in emulator.events()] == ["e0", "e1"], sorted(left)
