"""The scheduler's rules on their own: lanes, per-contact order, coalescing, shedding,
timers and 404 recovery (no threads, explicit times)."""

from __future__ import annotations

from typing import Any

import pytest

from flask_meisa.engine.scheduler import Entry
from flask_meisa.engine.scheduler import EntryState
from flask_meisa.engine.scheduler import QueueFull
from flask_meisa.engine.scheduler import Scheduler
from flask_meisa.operations import Operation


def upsert(user: int, **fields: Any) -> Operation:
    return Operation(
        "upsert", {"email": f"u{user}@example.com", "external_id": str(user), **fields}
    )


def track(user: int, name: str = "clicked", contact: dict[str, Any] | None = None) -> Operation:
    return Operation("track", {"event_name": name, "external_id": str(user)}, contact=contact)


def send(n: int = 0) -> Operation:
    return Operation(
        "send",
        {"trigger_key": "reset", "to_email": f"s{n}@example.com", "idempotency_key": str(n)},
    )


def drain_order(scheduler: Scheduler, now: float = 0.0) -> list[Entry]:
    taken = []
    while (entry := scheduler.take(now)) is not None:
        taken.append(entry)
        scheduler.finish(entry)
    return taken


def test_lanes_in_priority_order() -> None:
    scheduler = Scheduler(100)
    scheduler.add(track(1))
    scheduler.add(upsert(2))
    scheduler.add(send())
    kinds = [entry.call.kind for entry in drain_order(scheduler)]
    assert kinds == ["send", "upsert", "track"]
    assert len(scheduler) == 0


def test_waiting_upserts_coalesce_into_one_call() -> None:
    scheduler = Scheduler(100)
    first = upsert(1, custom_fields={"plan": "free", "a": 1}, tag_names=["x"])
    scheduler.add(first)
    outcome = scheduler.add(upsert(1, custom_fields={"plan": "pro"}, tag_names=["y"]))
    assert outcome.merged is not None and outcome.entry is None
    assert len(scheduler) == 1
    (entry,) = drain_order(scheduler)
    assert entry.call.payload["custom_fields"] == {"plan": "pro", "a": 1}
    assert entry.call.payload["tag_names"] == ["x", "y"]
    assert len(entry.members) == 2
    assert first.payload["custom_fields"] == {"plan": "free", "a": 1}  # not mutated


def test_an_upsert_in_flight_is_not_merged_into_and_blocks_the_next() -> None:
    scheduler = Scheduler(100)
    scheduler.add(upsert(1, first_name="A"))
    flying = scheduler.take(0.0)
    assert flying is not None
    scheduler.add(upsert(1, first_name="B"))
    scheduler.add(upsert(1, last_name="C"))  # merges into the waiting second one
    assert len(scheduler) == 2
    assert scheduler.take(0.0) is None  # one upsert per contact at a time
    scheduler.finish(flying)
    (second,) = drain_order(scheduler)
    assert second.call.payload["first_name"] == "B"
    assert second.call.payload["last_name"] == "C"


def test_a_retried_upsert_absorbs_the_one_that_waited_behind_it() -> None:
    scheduler = Scheduler(100)
    scheduler.add(upsert(1, first_name="A", last_name="Old"))
    flying = scheduler.take(0.0)
    assert flying is not None
    scheduler.add(upsert(1, first_name="B"))
    scheduler.retry_at(flying, 5.0)
    assert len(scheduler) == 1
    assert scheduler.take(4.0) is None
    assert scheduler.next_due() == 5.0
    again = scheduler.take(5.0)
    assert again is flying
    assert again.attempts == 2
    assert again.call.payload["first_name"] == "B"
    assert again.call.payload["last_name"] == "Old"
    assert len(again.members) == 2


def test_events_wait_for_their_contacts_upsert_and_keep_their_order() -> None:
    scheduler = Scheduler(100)
    scheduler.add(track(1, "first"))
    scheduler.add(upsert(1))  # submitted after the event, still goes first
    scheduler.add(track(1, "second"))
    scheduler.add(track(2, "other"))
    order = [(e.call.kind, e.call.payload.get("event_name")) for e in drain_order(scheduler)]
    assert order == [
        ("upsert", None),
        ("track", "other"),
        ("track", "first"),
        ("track", "second"),
    ]


def test_one_event_of_a_contact_at_a_time() -> None:
    scheduler = Scheduler(100)
    scheduler.add(track(1, "a"))
    scheduler.add(track(1, "b"))
    first = scheduler.take(0.0)
    assert first is not None and scheduler.take(0.0) is None
    scheduler.retry_at(first, 1.0)
    assert scheduler.take(0.5) is None  # "b" still waits behind the retrying "a"
    assert scheduler.take(1.0) is first


def test_recovery_upserts_then_retries_the_event_once() -> None:
    scheduler = Scheduler(100)
    contact = {"email": "u1@example.com", "external_id": "1", "first_name": "Ada"}
    scheduler.add(track(1, contact=contact))
    event = scheduler.take(0.0)
    assert event is not None
    assert scheduler.recover(event)
    recovery = scheduler.take(0.0)
    assert recovery is not None and recovery.call.kind == "upsert"
    assert recovery.call.payload == contact
    assert recovery.members == [] and recovery.recovery_for is event
    assert scheduler.take(0.0) is None  # the event waits for it
    scheduler.finish(recovery)
    assert scheduler.take(0.0) is event
    assert not scheduler.recover(event)  # only once


def test_recovery_uses_the_latest_remembered_upsert() -> None:
    scheduler = Scheduler(100)
    scheduler.add(upsert(1, first_name="Ada"))
    drain_order(scheduler)
    scheduler.add(track(1))
    event = scheduler.take(0.0)
    assert event is not None and scheduler.recover(event)
    recovery = scheduler.take(0.0)
    assert recovery is not None and recovery.call.payload["first_name"] == "Ada"


def test_recovery_without_a_payload_is_refused() -> None:
    scheduler = Scheduler(100)
    scheduler.add(track(1))
    event = scheduler.take(0.0)
    assert event is not None
    assert not scheduler.recover(event)
    scheduler.forget_upsert("ext:1")


def test_full_queue_sheds_the_oldest_event_first() -> None:
    scheduler = Scheduler(3)
    old_event = track(1, "old")
    scheduler.add(old_event)
    scheduler.add(upsert(2))
    scheduler.add(track(3, "newer"))
    outcome = scheduler.add(send())
    assert outcome.shed == [old_event]
    outcome = scheduler.add(upsert(4))
    assert [op.payload["event_name"] for op in outcome.shed] == ["newer"]
    assert len(scheduler) == 3


def test_full_queue_sheds_syncs_after_events_and_refuses_a_new_lowest() -> None:
    scheduler = Scheduler(2)
    oldest = upsert(1)
    scheduler.add(oldest)
    scheduler.add(send(1))
    newcomer = track(2)
    assert scheduler.add(newcomer).shed == [newcomer]  # an event never pushes out a sync
    assert scheduler.add(send(2)).shed == [oldest]
    late = upsert(3)
    assert scheduler.add(late).shed == [late]
    with pytest.raises(QueueFull):
        scheduler.add(send(3))
    assert [e.call.kind for e in scheduler.entries()] == ["send", "send"]


def test_merging_takes_no_slot_when_full() -> None:
    scheduler = Scheduler(1)
    scheduler.add(upsert(1, first_name="A"))
    outcome = scheduler.add(upsert(1, first_name="B"))
    assert outcome.shed == [] and outcome.merged is not None


def test_in_flight_entries_are_never_shed() -> None:
    scheduler = Scheduler(1)
    scheduler.add(track(1))
    assert scheduler.take(0.0) is not None
    newcomer = track(2)
    assert scheduler.add(newcomer).shed == [newcomer]
    with pytest.raises(QueueFull):
        scheduler.add(send())


def test_counts_and_drain() -> None:
    scheduler = Scheduler(100)
    scheduler.add(send())
    scheduler.add(upsert(1))
    scheduler.add(track(1))
    scheduler.add(track(2))
    flying = scheduler.take(0.0)
    assert flying is not None
    waiting = scheduler.take(0.0)
    assert waiting is not None
    scheduler.retry_at(waiting, 10.0)
    counts = scheduler.counts()
    assert counts.queued == {"transactional": 0, "sync": 0, "events": 2}
    assert (counts.in_flight, counts.waiting) == (1, 1)
    drained = scheduler.drain()
    assert len(drained) == 4
    assert all(entry.state is EntryState.DONE for entry in drained)
    assert len(scheduler) == 0 and scheduler.next_due() is None
