"""Lanes by significance under Celery, end to end (a real Redis, two real ``celery worker``
processes, the emulator): behind 600 routine syncs at a budget of 60/second, a plan
change, a signup and an event each reach Meisa ahead of all but the routine syncs already
under way, every routine sync arrives, each contact's order holds, and the status tells
each lane's age and latency."""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from tests.celery_support import StartWorker
from tests.celery_support import producer_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.celery_support import start_worker_fixture  # noqa: F401
from tests.process_support import wait_until

UPSERT = "/contacts/upsert/"
BUDGET = "60/second"


def user(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "email": f"user{n}@example.com",
        "external_id": str(n),
        "custom_fields": {"plan": "free", **fields},
    }


def test_urgent_changes_overtake_600_routine_syncs_with_two_workers(
    emulator_factory: Callable[..., Emulator],
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
) -> None:
    emulator = emulator_factory(rate_limit=None)
    # Meisa first learns of 600 users (without a budget), so that their next syncs are
    # routine: they change last_active only.
    first = [start_worker(emulator, wait=False, concurrency=4) for _ in range(2)]
    for worker in first:
        worker.wait_ready()
    dispatcher = producer(emulator, rate_limit=BUDGET)
    for n in range(600):
        dispatcher.publish(Operation("upsert", user(n)))
    assert dispatcher.flush(timeout=90)
    for worker in first:
        worker.stop()
    emulator.clear_requests()
    emulator.set_rate_limit(BUDGET)

    # The routine syncs wait before the workers start, so that how long publishing takes
    # (seconds on a loaded machine) does not decide how many are left.
    for n in range(600):
        dispatcher.publish(Operation("upsert", user(n, last_active=f"t{n}")))
    assert dispatcher.status().queued["routine"] == 600
    launch = functools.partial(start_worker, emulator, wait=False, MEISA_TEST_RATE_LIMIT=BUDGET)
    workers = [launch(), launch()]
    for worker in workers:
        worker.wait_ready()
    status = dispatcher.status()
    assert status.queued["routine"] > 300  # at least 5 s of routine work waits
    assert status.queued["automation"] == 0
    released = time.time()
    plan = Operation("upsert", user(599, plan="pro"), priority="high")  # surely waiting
    signup = Operation(
        "upsert", {"email": "new@example.com", "external_id": "new", "source": "signup"}
    )
    event = Operation("track", {"event_name": "exported_report", "external_id": "450"})
    for op in (plan, signup, event):
        dispatcher.publish(op)

    def arrived(match: Callable[[Any], bool]) -> float:
        assert emulator.wait_for(lambda e: any(match(r) for r in e.requests), timeout=15)
        return next(r.time for r in emulator.requests if match(r)) - released

    def routine_before(wait: float) -> int:
        """Routine syncs Meisa got after the urgent work was published and before ``wait``."""
        return sum(
            1
            for r in emulator.requests_to(UPSERT)
            if 0 < r.time - released < wait
            and "last_active" in r.body.get("custom_fields", {})
            and r.body["custom_fields"].get("plan") != "pro"
        )

    waits = {
        "plan change": arrived(
            lambda r: (
                r.path.endswith(UPSERT) and r.body.get("custom_fields", {}).get("plan") == "pro"
            )
        ),
        "signup": arrived(lambda r: r.path.endswith(UPSERT) and r.body["external_id"] == "new"),
        "event": arrived(lambda r: r.path.endswith("/events/track/")),
    }
    print("time to Meisa:", {k: round(v, 3) for k, v in waits.items()})
    # Counted in calls, not seconds: a loaded machine slows the calls, not their order.
    # In FIFO order each would have waited for the 300 or more routine syncs queued.
    overtaken = {name: routine_before(wait) for name, wait in waits.items()}
    print("routine syncs before each:", overtaken)
    assert all(count < 100 for count in overtaken.values()), (overtaken, waits)
    status = dispatcher.status()
    assert status.oldest_wait["routine"] > 0.5  # the routine syncs still wait, and age
    assert dispatcher.flush(timeout=60)
    status = dispatcher.status()
    # Counters are Redis's: the first 600 are counted too.
    assert (status.delivered, status.dropped, status.failed) == (1203, 0, 0)
    (automation_p50, automation_p99) = status.latency["automation"]
    (routine_p50, routine_p99) = status.latency["routine"]
    print("latency p50/p99:", status.latency)
    assert routine_p50 <= routine_p99 and routine_p99 > 5.0  # the last waited ~10 s
    assert automation_p50 <= automation_p99
    assert 429 not in [r.status for r in emulator.requests]
    # Every routine sync arrived, and user 599's routine change went with its plan change
    # (merged into one call, not after it with the old plan).
    contacts = {c["external_id"]: c for c in emulator.contacts()}
    assert all(contacts[str(n)]["custom_fields"]["last_active"] == f"t{n}" for n in range(600))
    assert contacts["599"]["custom_fields"]["plan"] == "pro"
    calls_for_599 = [r for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "599"]
    assert len(calls_for_599) == 1
    # The event of user 450 went after user 450's routine sync, never before.
    mine = [r.path for r in emulator.requests if (r.body or {}).get("external_id") == "450"]
    assert mine == ["/api/v1" + UPSERT, "/api/v1/events/track/"]


def knowing_users(
    emulator: Emulator,
    start_worker: StartWorker,
    producer: Callable[..., CeleryDispatcher],
    numbers: Iterable[int] = (1, 2),
    rate_limit: str = "10/second",
) -> CeleryDispatcher:
    """A producer at ``rate_limit`` whose Meisa has learnt the users ``numbers`` (through
    a worker without a budget, stopped since), with no request recorded."""
    first = start_worker(emulator)
    dispatcher = producer(emulator, rate_limit=rate_limit)
    for n in numbers:
        dispatcher.publish(Operation("upsert", user(n)))
    assert dispatcher.flush(timeout=20)
    first.stop()
    emulator.clear_requests()
    return dispatcher


def test_one_contacts_flood_delays_no_other_contacts_event_or_signup(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    # Meisa already knows both users, so that their events need no upsert.
    dispatcher = knowing_users(emulator, start_worker, producer)

    # A script on user 1's account tracks 40 events; then user 2 tracks one and user 3
    # signs up. All wait before the worker starts: how long publishing takes decides nothing.
    for n in range(40):
        dispatcher.publish(Operation("track", {"event_name": f"flood{n}", "external_id": "1"}))
    dispatcher.publish(Operation("track", {"event_name": "other", "external_id": "2"}))
    signup = {"email": "new@example.com", "external_id": "3", "source": "signup"}
    dispatcher.publish(Operation("upsert", signup))
    start_worker(emulator, concurrency=1, MEISA_TEST_RATE_LIMIT="10/second")
    assert dispatcher.flush(timeout=60)

    calls = [(r.path.rsplit("/", 2)[-2], r.body) for r in emulator.requests]
    assert len(calls) == 42, calls
    other = next(i for i, (_, body) in enumerate(calls) if body.get("event_name") == "other")
    joined = next(i for i, (_, body) in enumerate(calls) if body.get("external_id") == "3")
    # A slot's worth of the flood took the free budget (10 calls) before anybody else
    # waited; then each contact takes a turn, so neither waits behind the rest of it.
    assert other <= 13 and joined <= 13, (other, joined)
    flood = [body["event_name"] for _, body in calls if body.get("external_id") == "1"]
    assert flood == [f"flood{n}" for n in range(40)]  # user 1's own order holds


def test_a_users_coalesced_logins_do_not_push_back_their_next_operation(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    # Meisa already knows both users: their logins are routine syncs.
    dispatcher = knowing_users(emulator, start_worker, producer)

    # User 1 logs in 30 times while the first sync waits (one sync, coalesced); then a
    # script on user 2's account tracks 40 events, and user 1 exports a report. All wait
    # before the worker starts.
    for n in range(30):
        dispatcher.publish(Operation("upsert", user(1, last_active=f"t{n}")))
    for n in range(40):
        dispatcher.publish(Operation("track", {"event_name": f"flood{n}", "external_id": "2"}))
    dispatcher.publish(Operation("track", {"event_name": "exported", "external_id": "1"}))
    start_worker(emulator, concurrency=1, MEISA_TEST_RATE_LIMIT="10/second")
    assert dispatcher.flush(timeout=60)

    calls = [(r.path.rsplit("/", 2)[-2], r.body) for r in emulator.requests]
    assert len(calls) == 42, calls  # the 30 logins made one call
    mine = [(path, body) for path, body in calls if body.get("external_id") == "1"]
    assert [path for path, _ in mine] == ["upsert", "track"]
    assert mine[0][1]["custom_fields"]["last_active"] == "t29"
    exported = next(i for i, (_, body) in enumerate(calls) if body.get("event_name") == "exported")
    # The free budget's 10 calls, then user 1's sync and event take their turns with the
    # flood, as if user 1 had logged in once: not 30 turns behind.
    assert exported <= 14, exported


def test_a_new_users_merged_logins_behind_a_flood_leave_no_slot_idle(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    # Meisa first learns of user 2 (no budget), so that its events need no upsert.
    dispatcher = knowing_users(emulator, start_worker, producer, [2])

    # A script on user 2's account tracks 40 events, then a new user logs in 30 times (one
    # sync: the 29 later logins' tasks find it delivered, or deliver it themselves). All
    # wait before the worker starts.
    for n in range(40):
        dispatcher.publish(Operation("track", {"event_name": f"flood{n}", "external_id": "2"}))
    for n in range(30):
        dispatcher.publish(Operation("upsert", user(1, last_active=f"t{n}")))
    start_worker(emulator, concurrency=1, MEISA_TEST_RATE_LIMIT="10/second")
    assert dispatcher.flush(timeout=60)

    times = [r.time for r in emulator.requests]
    assert len(times) == 41, [r.body for r in emulator.requests]
    # A window's worth takes the free budget; each later call goes once the call a window's
    # worth before it is a period old: 4 periods in all (and a moment for the countdowns).
    # The later logins' tasks that asked for a slot hold none once their sync is delivered,
    # not each until it would have come back (3 s more).
    assert times[-1] - times[0] <= 4 * 1.0 + 0.6, " ".join(f"{t - times[0]:.2f}" for t in times)


def test_the_companions_of_a_users_events_behind_a_flood_leave_no_slot_idle(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = knowing_users(emulator, start_worker, producer)

    # Behind user 2's flood, user 1 logs in (a routine sync) and tracks 10 events: each
    # event's companion delivers the sync on the events' lane, and one call does.
    for n in range(40):
        dispatcher.publish(Operation("track", {"event_name": f"flood{n}", "external_id": "2"}))
    dispatcher.publish(Operation("upsert", user(1, last_active="t")))
    for n in range(10):
        dispatcher.publish(Operation("track", {"event_name": f"mine{n}", "external_id": "1"}))
    start_worker(emulator, concurrency=1, MEISA_TEST_RATE_LIMIT="10/second")
    assert dispatcher.flush(timeout=60)

    times = [r.time for r in emulator.requests]
    assert len(times) == 51, [r.body for r in emulator.requests]
    # 5 periods, as above: the companions whose sync another task delivered hold no slot.
    assert times[-1] - times[0] <= 5 * 1.0 + 0.6, " ".join(f"{t - times[0]:.2f}" for t in times)


def test_a_users_events_that_waited_for_their_sync_reach_meisa_in_their_order(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = knowing_users(emulator, start_worker, producer)

    # Behind user 2's flood, user 1 logs in (a routine sync) and tracks 6 events: each
    # waits for the sync, then they go in the order they were made. All wait before the
    # worker starts.
    for n in range(20):
        dispatcher.publish(Operation("track", {"event_name": f"flood{n}", "external_id": "2"}))
    dispatcher.publish(Operation("upsert", user(1, last_active="t")))
    for n in range(6):
        dispatcher.publish(Operation("track", {"event_name": f"mine{n}", "external_id": "1"}))
    start_worker(emulator, concurrency=2, MEISA_TEST_RATE_LIMIT="10/second")
    assert dispatcher.flush(timeout=60)

    mine = [
        (r.body.get("event_name") or "upsert")
        for r in emulator.requests
        if r.body.get("external_id") == "1"
    ]
    assert mine == ["upsert", *(f"mine{n}" for n in range(6))], mine


def overlap(a: Any, b: Any) -> bool:
    """Whether two recorded requests were being answered at the same moment."""
    return bool(a.time < b.time + b.duration and b.time < a.time + a.duration)


def test_a_users_events_reach_meisa_one_at_a_time_in_order_while_others_go_beside_them(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = knowing_users(emulator, start_worker, producer)
    # Slow answers, free slots (no limit) and four threads: the calls could overlap.
    emulator.faults.set(latency=0.5, paths=["/events/track/"])
    start_worker(emulator, concurrency=4)
    track = functools.partial(Operation, "track")
    dispatcher.publish(track({"event_name": "mine0", "external_id": "1"}))
    # User 1's later events are released while its first is in flight.
    assert wait_until(lambda: dispatcher.status().in_flight == 1, timeout=10)
    for n in range(1, 6):
        dispatcher.publish(track({"event_name": f"mine{n}", "external_id": "1"}))
    dispatcher.publish(track({"event_name": "other", "external_id": "2"}))
    assert dispatcher.flush(timeout=30)

    calls = sorted(emulator.requests_to("/events/track/"), key=lambda r: r.time)
    mine = [r for r in calls if r.body["external_id"] == "1"]
    arrivals = [(r.body["event_name"], round(r.time - calls[0].time, 3)) for r in mine]
    # Meisa dates an event by its arrival: user 1's arrive in their order, each once the
    # one before it was answered.
    assert [name for name, _ in arrivals] == [f"mine{n}" for n in range(6)], arrivals
    assert not any(overlap(a, b) for a, b in itertools.pairwise(mine)), arrivals
    # User 2's event took a free slot while one of user 1's calls was in flight.
    other = next(r for r in calls if r.body["external_id"] == "2")
    assert any(overlap(other, r) for r in mine), (arrivals, other.time - calls[0].time)


def test_a_users_event_retried_after_a_503_is_not_overtaken_by_their_next_ones(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = knowing_users(emulator, start_worker, producer)
    emulator.faults.set(latency=0.3, paths=["/events/track/"])
    emulator.faults.fail_next(1, 503, path="/events/track/", match={"event_name": "mine0"})
    start_worker(emulator, concurrency=4)
    track = functools.partial(Operation, "track")
    dispatcher.publish(track({"event_name": "mine0", "external_id": "1"}))
    assert wait_until(lambda: dispatcher.status().in_flight == 1, timeout=10)
    for n in range(1, 4):
        dispatcher.publish(track({"event_name": f"mine{n}", "external_id": "1"}))
    assert dispatcher.flush(timeout=30)

    calls = sorted(emulator.requests_to("/events/track/"), key=lambda r: r.time)
    arrivals = [(r.body["event_name"], r.status, round(r.time - calls[0].time, 3)) for r in calls]
    # Its retry, after a backoff, goes before the user's later events, as its first try did.
    tracked = [name for name, status, _ in arrivals if status != 503]
    assert tracked == [f"mine{n}" for n in range(4)], arrivals


def test_a_users_event_retried_while_the_workers_are_busy_is_not_overtaken(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = knowing_users(emulator, start_worker, producer, range(1, 6))
    # Slow answers, and two threads that four other users' events keep busy: a retry that
    # is due waits for a thread, longer than a second.
    emulator.faults.set(latency=1.5, paths=["/events/track/"])
    emulator.faults.fail_next(1, 503, path="/events/track/", match={"event_name": "mine0"})
    start_worker(emulator, concurrency=2)
    track = functools.partial(Operation, "track")
    dispatcher.publish(track({"event_name": "mine0", "external_id": "1"}))
    assert wait_until(lambda: dispatcher.status().in_flight == 1, timeout=10)
    for n in range(1, 3):
        dispatcher.publish(track({"event_name": f"mine{n}", "external_id": "1"}))
        for other in range(2, 6):
            dispatcher.publish(track({"event_name": f"busy{n}", "external_id": str(other)}))
    assert dispatcher.flush(timeout=60)

    calls = sorted(emulator.requests_to("/events/track/"), key=lambda r: r.time)
    arrivals = [
        (r.body["event_name"], r.body["external_id"], r.status, round(r.time - calls[0].time, 2))
        for r in calls
    ]
    tracked = [
        r.body["event_name"] for r in calls if r.body["external_id"] == "1" and r.status != 503
    ]
    assert tracked == ["mine0", "mine1", "mine2"], arrivals


def test_a_users_events_held_behind_their_retry_leave_the_budget_to_other_users(
    emulator: Emulator, start_worker: StartWorker, producer: Callable[..., CeleryDispatcher]
) -> None:
    dispatcher = knowing_users(emulator, start_worker, producer, range(1, 5), "2/second")
    # User 1's first event is answered 503, retry in 10 s: their next three wait for it.
    match = {"event_name": "e0", "external_id": "1"}
    emulator.faults.fail_next(1, 503, path="/events/track/", match=match, retry_after=10)
    track = functools.partial(Operation, "track")
    for k in range(4):
        for n in range(1, 5):
            dispatcher.publish(track({"event_name": f"e{k}", "external_id": str(n)}))
    config = json.dumps({"MEISA_RETRY_MAX_DELAY": 12})
    start_worker(
        emulator, concurrency=4, MEISA_TEST_RATE_LIMIT="2/second", MEISA_TEST_CONFIG=config
    )
    assert dispatcher.flush(timeout=60)

    calls = sorted(emulator.requests_to("/events/track/"), key=lambda r: r.time)
    arrivals = [
        (r.body["external_id"], r.body["event_name"], r.status, r.time - calls[0].time)
        for r in calls
    ]
    # The other users' 12 events take the budget meanwhile (13 calls at 2/second: 6 s), all
    # before user 1's retry; user 1's go after it, in order.
    mine = [(name, status, at) for who, name, status, at in arrivals if who == "1"]
    assert [(name, status) for name, status, _ in mine] == [
        ("e0", 503),
        *((f"e{k}", 200) for k in range(4)),
    ], arrivals
    assert all(at < mine[1][2] for who, _, _, at in arrivals if who != "1"), arrivals
