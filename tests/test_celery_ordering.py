"""The Celery engine's per-contact ordering across the names of a contact: upserts that name
one contact by its address, then by its external id too, and users that hand an address
over, reach Meisa in the order they were made, whatever a 5xx and its retry do to the order
the workers run them in; Meisa ends with the last state of each user."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import redis

from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from tests.celery_support import StartWorker
from tests.celery_support import outcomes
from tests.celery_support import producer_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401
from tests.celery_support import start_worker_fixture  # noqa: F401
from tests.process_support import wait_until

UPSERT = "/api/v1/contacts/upsert/"
MakeProducer = Callable[..., CeleryDispatcher]
#: Users of the mixed stream.
USERS = 6


def upsert(**payload: Any) -> Operation:
    return Operation("upsert", payload)


def failures(redis_url: str) -> list[dict[str, Any]]:
    return [entry for entry in outcomes(redis_url) if entry["signal"] == "delivery_failed"]


def test_an_upsert_by_address_is_not_overtaken_by_a_later_one_naming_the_external_id_too(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    # The first call fails once (503): its retry must not land after the later state.
    emulator.faults.fail_next(1, 503, path=UPSERT, match={"first_name": "Old"})
    dispatcher = producer(emulator)
    dispatcher.publish(upsert(email="ada@example.com", first_name="Old"))
    dispatcher.publish(upsert(email="ada@example.com", external_id="u1", first_name="New"))
    start_worker(emulator, concurrency=1)
    assert dispatcher.flush(timeout=20)
    contact = emulator.contact(external_id="u1")
    assert contact is not None
    assert (contact["email"], contact["first_name"]) == ("ada@example.com", "New")
    assert failures(redis_url) == []


def test_an_address_handed_over_reaches_its_new_user_after_the_old_user_left_it(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    start_worker(emulator, concurrency=1)
    dispatcher = producer(emulator)
    dispatcher.publish(upsert(email="a@example.com", external_id="u1", custom_fields={"n": 1}))
    assert dispatcher.flush(timeout=15)
    first = emulator.contact(external_id="u1")
    assert first is not None
    # User 1 moves to b@ (its call fails once), then user 2 signs up with a@.
    emulator.faults.fail_next(1, 503, path=UPSERT, match={"email": "b@example.com"})
    dispatcher.publish(upsert(email="b@example.com", external_id="u1"))
    dispatcher.publish(upsert(email="a@example.com", external_id="u2", custom_fields={"n": 2}))
    assert dispatcher.flush(timeout=20)
    one, two = emulator.contact(external_id="u1"), emulator.contact(external_id="u2")
    assert one is not None and two is not None
    assert one["id"] == first["id"]  # the same contact, not one made again
    assert (one["email"], one["custom_fields"]) == ("b@example.com", {"n": 1})
    assert (two["email"], two["custom_fields"]) == ("a@example.com", {"n": 2})
    assert len(emulator.contacts()) == 2
    assert failures(redis_url) == []


def test_an_address_taken_over_waits_for_its_old_user_on_its_own_lane_not_behind_a_backlog(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    dispatcher = producer(emulator)
    worker = start_worker(emulator, concurrency=1)
    users = [upsert(email=f"user{n}@example.com", external_id=f"u{n}") for n in range(3, 33)]
    for op in [upsert(email="a@example.com", external_id="u1"), *users]:
        dispatcher.publish(op)
    assert dispatcher.flush(timeout=20)
    worker.stop()
    # A backlog of routine syncs, then user 1 leaves a@ (routine too: Meisa knows user 1),
    # then user 2 signs up with a@ (a first upsert: ahead of routine syncs).
    for op in users:
        dispatcher.publish(upsert(**op.payload, first_name="Again"))
    dispatcher.publish(upsert(email="b@example.com", external_id="u1"))
    dispatcher.publish(upsert(email="a@example.com", external_id="u2"))
    emulator.clear_requests()
    start_worker(emulator, concurrency=1)
    assert dispatcher.flush(timeout=30)
    order = [r.body["external_id"] for r in emulator.requests_to(UPSERT)]
    # User 1's move went first, on user 2's lane, then user 2's: not after the backlog.
    assert order[:2] == ["u1", "u2"]
    assert failures(redis_url) == []
    one, two = emulator.contact(external_id="u1"), emulator.contact(external_id="u2")
    assert one is not None and two is not None
    assert (one["email"], two["email"]) == ("b@example.com", "a@example.com")


@pytest.mark.parametrize("fault", [False, True], ids=["in_order", "first_step_retried"])
def test_addresses_swapped_through_a_spare_one_reach_meisa_without_a_conflict(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: MakeProducer,
    fault: bool,
) -> None:
    dispatcher = producer(emulator)
    dispatcher.publish(upsert(email="a@example.com", external_id="u1"))
    dispatcher.publish(upsert(email="b@example.com", external_id="u2"))
    worker = start_worker(emulator, concurrency=1)
    assert dispatcher.flush(timeout=15)
    worker.stop()
    # Users 1 and 2 swap addresses, user 1 through a spare one: each step valid at Meisa
    # in this order (no two contacts ever hold one address); queued while no worker runs.
    dispatcher.publish(upsert(email="spare@example.com", external_id="u1"))
    dispatcher.publish(upsert(email="a@example.com", external_id="u2"))
    dispatcher.publish(upsert(email="b@example.com", external_id="u1"))
    if fault:  # the first step's call fails once: the others wait for its retry
        emulator.faults.fail_next(1, 503, path=UPSERT, match={"email": "spare@example.com"})
    start_worker(emulator, concurrency=2)
    assert dispatcher.flush(timeout=20)
    assert failures(redis_url) == []
    one, two = emulator.contact(external_id="u1"), emulator.contact(external_id="u2")
    assert one is not None and two is not None
    assert (one["email"], two["email"]) == ("b@example.com", "a@example.com")
    assert [r.status for r in emulator.requests_to(UPSERT) if r.status == 409] == []


def test_upserts_whose_merge_one_call_cannot_carry_are_delivered_one_after_the_other(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    dispatcher = producer(emulator)
    half = "x" * (300 * 1024)  # each alone fits in a request; both do not
    ops = [
        upsert(email="ada@example.com", external_id="u1", custom_fields={"one": half}),
        upsert(email="ada@example.com", external_id="u1", custom_fields={"two": half}),
        upsert(email="ada@example.com", external_id="u1", first_name="Ada"),
    ]
    for op in ops:
        dispatcher.publish(op)
    start_worker(emulator, concurrency=2)
    assert dispatcher.flush(timeout=20)
    assert failures(redis_url) == []
    contact = emulator.contact(external_id="u1")
    assert contact is not None
    assert (contact["first_name"], sorted(contact["custom_fields"])) == ("Ada", ["one", "two"])
    synced = [e["op"] for e in outcomes(redis_url) if e["signal"] == "contact_synced"]
    assert sorted(synced) == sorted(op.id for op in ops)
    assert len(emulator.requests_to(UPSERT)) == 2


def test_an_event_for_a_contact_meisa_lacks_does_not_upsert_an_older_state_over_a_later_one(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    # A view tracks an event for a user Meisa has not got yet, then syncs the user's new
    # plan: the event's 404 upserts the user as the event saw it, which must not land
    # over the later sync.
    dispatcher = producer(emulator)
    user = {"email": "ada@example.com", "external_id": "u1"}
    before = {**user, "custom_fields": {"plan": "free"}}
    dispatcher.publish(Operation("track", {"event_name": "upgraded", "external_id": "u1"}, before))
    dispatcher.publish(upsert(**user, custom_fields={"plan": "pro"}))
    start_worker(emulator, concurrency=2)
    assert dispatcher.flush(timeout=20)
    contact = emulator.contact(external_id="u1")
    assert contact is not None
    assert contact["custom_fields"] == {"plan": "pro"}
    assert [e["event_name"] for e in emulator.events()] == ["upgraded"]
    assert failures(redis_url) == []


def test_an_address_taken_over_keeps_pointing_to_its_new_user_when_the_old_state_lands(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    dispatcher = producer(emulator)
    first = start_worker(emulator, concurrency=2)
    dispatcher.publish(upsert(email="c@example.com", external_id="u1"))
    assert dispatcher.flush(timeout=15)
    first.stop()
    # User 2 at a@ moves to b@, then user 1 moves from c@ to a@ (its calls fail a while).
    dispatcher.publish(upsert(email="a@example.com", external_id="u2", first_name="Two"))
    dispatcher.publish(upsert(email="b@example.com", external_id="u2"))
    dispatcher.publish(upsert(email="a@example.com", external_id="u1"))
    emulator.faults.fail_next(6, 503, path=UPSERT, match={"external_id": "u1"})
    start_worker(emulator, concurrency=2)

    def moved(emulator: Emulator) -> bool:
        return (emulator.contact(external_id="u2") or {}).get("email") == "b@example.com"

    # User 2's old state at a@ was accepted, then its move: user 1's upsert still waits.
    assert emulator.wait_for(moved, timeout=15)
    # An upsert of user 1 by its address alone belongs with user 1's, not user 2's.
    dispatcher.publish(upsert(email="a@example.com", last_name="One"))
    assert dispatcher.flush(timeout=20)
    assert failures(redis_url) == []
    one = emulator.contact(external_id="u1")
    assert one is not None
    assert (one["email"], one["last_name"]) == ("a@example.com", "One")
    assert len(emulator.contacts()) == 2


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "live"])
def test_a_mixed_stream_of_syncs_and_events_ends_with_each_users_last_state(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: MakeProducer,
    queued: bool,
) -> None:
    # Users change fields and addresses (taking ones others left), upserts name some by
    # address alone, events follow their upserts (or come first, for a user Meisa has not
    # got yet: their 404 upserts the user, unless a newer upsert goes instead); a quarter
    # of the calls fail with a 5xx; two worker processes of three threads each deliver
    # (started after everything was queued, or before).
    chooser = random.Random(7)
    dispatcher = producer(emulator)
    emulator.faults.set(error_rate=0.25, error_statuses=(500, 503))
    if not queued:
        for _ in range(2):
            start_worker(emulator, concurrency=3)
    addresses = {n: f"u{n}-0@example.com" for n in range(USERS)}
    expected: dict[int, dict[str, Any]] = {n: {} for n in range(USERS)}
    events: list[str] = []
    left: list[str] = []  # addresses users moved away from, free to take
    named: set[str] = set()
    for step in range(100):
        n = chooser.randrange(USERS)
        # Meisa matches by external_id first: a user moves once it has given Meisa one.
        moved = f"u{n}" in named and chooser.random() < 0.2
        if moved:
            left.append(addresses[n])
            taken = left.pop(0) if len(left) > 1 and chooser.random() < 0.5 else None
            addresses[n] = taken or f"u{n}-{step}@example.com"
        payload: dict[str, Any] = {"email": addresses[n], "external_id": f"u{n}"}
        if not moved and chooser.random() < 0.2:
            # By address alone: a new user's first upsert, or an address the user has.
            del payload["external_id"]
        else:
            named.add(f"u{n}")
        if not expected[n] and chooser.random() < 0.5:  # tracked before the first sync
            early = {"email": addresses[n], "external_id": f"u{n}"}
            body = {"event_name": f"x{step}", **early}
            dispatcher.publish(Operation("track", body, {**early, "first_name": "Early"}))
            events.append(f"x{step}")
        payload[chooser.choice(["first_name", "last_name"])] = f"v{step}"
        payload["custom_fields"] = {f"k{chooser.randrange(3)}": step}
        dispatcher.publish(upsert(**payload))
        fields = {**expected[n].get("custom_fields", {}), **payload["custom_fields"]}
        expected[n] = {**expected[n], **payload, "external_id": f"u{n}", "custom_fields": fields}
        if chooser.random() < 0.4:
            name = f"e{step}"
            contact = {"email": addresses[n], "external_id": f"u{n}"}
            if f"u{n}" not in named or chooser.random() < 0.5:  # as track(name, user=...)
                event = Operation("track", {"event_name": name, **contact}, contact)
            else:  # as meisa.track(name, external_id=...), once Meisa has it
                event = Operation("track", {"event_name": name, "external_id": f"u{n}"})
            dispatcher.publish(event)
            events.append(name)
    if queued:
        for _ in range(2):
            start_worker(emulator, concurrency=3)
    assert dispatcher.flush(timeout=60)
    emulator.faults.clear()
    assert failures(redis_url) == []
    assert len(emulator.contacts()) == USERS
    for n, state in expected.items():
        found = emulator.contact(external_id=f"u{n}")
        assert found is not None
        assert {name: found[name] for name in state} == state, n
    tracked = [e["event_name"] for e in emulator.events()]
    assert sorted(tracked) == sorted(events)


def test_an_upsert_by_an_address_accepted_after_another_user_took_it_is_not_credited_to_them(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    dispatcher = producer(emulator)
    first = start_worker(emulator, concurrency=1)
    dispatcher.publish(upsert(email="a@example.com", external_id="u2"))
    dispatcher.publish(upsert(email="c@example.com", external_id="u1"))
    assert dispatcher.flush(timeout=15)
    first.stop()
    # User 2, at a@, is upserted by its address alone, then moves to b@; then user 1 moves
    # from c@ to a@. Meisa's answer to the first must not count as user 1's state.
    dispatcher.publish(upsert(email="a@example.com", first_name="Two"))
    dispatcher.publish(upsert(email="b@example.com", external_id="u2"))
    dispatcher.publish(upsert(email="a@example.com", external_id="u1"))
    start_worker(emulator, concurrency=1)
    assert dispatcher.flush(timeout=20)
    assert failures(redis_url) == []
    one, two = emulator.contact(external_id="u1"), emulator.contact(external_id="u2")
    assert one is not None and two is not None
    assert (two["email"], two["first_name"]) == ("b@example.com", "Two")
    assert (one["email"], one["first_name"]) == ("a@example.com", None)


def test_events_by_each_name_follow_the_upserts_by_address_then_by_both(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    # Every first call fails (503): each retry must keep the order the app made them in.
    for field in ({"first_name": "Old"}, {"first_name": "New"}):
        emulator.faults.fail_next(1, 503, path=UPSERT, match=field)
    emulator.faults.fail_next(2, 503, path="/api/v1/events/track/")
    dispatcher = producer(emulator)
    ops = [
        upsert(email="ada@example.com", first_name="Old", custom_fields={"a": 1}),
        Operation("track", {"event_name": "by_address", "email": "ada@example.com"}),
        upsert(email="ada@example.com", external_id="u1", first_name="New"),
        Operation("track", {"event_name": "by_id", "external_id": "u1"}),
    ]
    for op in ops:
        dispatcher.publish(op)
    start_worker(emulator, concurrency=3)
    assert dispatcher.flush(timeout=20)
    assert failures(redis_url) == []
    contact = emulator.contact(external_id="u1")
    assert contact is not None
    assert (contact["first_name"], contact["custom_fields"]) == ("New", {"a": 1})
    assert sorted(e["event_name"] for e in emulator.events()) == ["by_address", "by_id"]
    assert len(emulator.contacts()) == 1


def test_a_worker_killed_mid_call_leaves_a_swap_of_addresses_in_order(
    emulator: Emulator, redis_url: str, start_worker: StartWorker, producer: MakeProducer
) -> None:
    quick = {
        "MEISA_TEST_CONFIG": json.dumps({"MEISA_TIMEOUT": 1.5, "MEISA_CONNECT_TIMEOUT": 0.5}),
        "MEISA_TEST_VISIBILITY": "9",
    }
    dispatcher = producer(emulator)
    doomed = start_worker(emulator, pool="prefork", concurrency=2, **quick)
    dispatcher.publish(upsert(email="a@example.com", external_id="u1"))
    dispatcher.publish(upsert(email="b@example.com", external_id="u2"))
    assert dispatcher.flush(timeout=15)
    emulator.faults.set(latency=1.2, paths=[UPSERT])
    swap = [
        upsert(email="spare@example.com", external_id="u1"),
        upsert(email="a@example.com", external_id="u2"),
        upsert(email="b@example.com", external_id="u1"),
    ]
    for op in swap:
        dispatcher.publish(op)
    contact = dispatcher.store.contact_of(swap[0].payload)
    lease = f"meisa:meisa:lease:{{{contact}}}"
    client = redis.Redis.from_url(redis_url)
    try:  # user 1's first step is in flight: its worker dies, its lease stays
        assert wait_until(lambda: bool(client.exists(lease)), timeout=15)
    finally:
        client.close()
    doomed.kill()
    emulator.faults.clear()
    start_worker(emulator, concurrency=2, **quick)
    assert dispatcher.flush(timeout=40)
    assert failures(redis_url) == []
    one, two = emulator.contact(external_id="u1"), emulator.contact(external_id="u2")
    assert one is not None and two is not None
    assert (one["email"], two["email"]) == ("b@example.com", "a@example.com")
    assert [r.status for r in emulator.requests_to(UPSERT) if r.status == 409] == []
    synced = [e["op"] for e in outcomes(redis_url) if e["signal"] == "contact_synced"]
    assert sorted(set(synced[2:])) == sorted(op.id for op in swap)


@pytest.mark.parametrize(
    ("first", "after"),
    [
        ({"external_id": "u1"}, [("b", "u1")]),
        ({"external_id": "u1"}, [("b", "u1"), ("a", "u2")]),
        ({"first_name": "Ada"}, [("a", "u1"), ("b", "u1")]),
    ],
    ids=["its-user-moves", "and-another-takes-the-address", "first-upserted-by-address-alone"],
)
def test_an_event_by_address_reaches_its_user_whatever_moves_follow_it(
    emulator: Emulator,
    redis_url: str,
    start_worker: StartWorker,
    producer: MakeProducer,
    first: dict[str, str],
    after: list[tuple[str, str]],
) -> None:
    # An event by a@ alone fails once; the upserts after it, each a@ or b@ with an external
    # id, must not overtake it: Meisa finds its contact by a@ when it goes again.
    dispatcher = producer(emulator)
    start_worker(emulator, concurrency=2)
    dispatcher.publish(upsert(email="a@example.com", **first))
    assert dispatcher.flush(timeout=15)
    emulator.faults.fail_next(1, 503, path="/api/v1/events/track/")
    dispatcher.publish(Operation("track", {"event_name": "viewed", "email": "a@example.com"}))
    for local, external_id in after:
        dispatcher.publish(upsert(email=f"{local}@example.com", external_id=external_id))
    assert dispatcher.flush(timeout=20)
    assert failures(redis_url) == []
    one = emulator.contact(external_id="u1")
    assert one is not None
    assert (one["email"], one.get("first_name")) == ("b@example.com", first.get("first_name"))
    assert [(e["event_name"], e["contact_id"]) for e in emulator.events()] == [
        ("viewed", one["id"])
    ]
