"""The ordering rules of the operations table on their own, on a real SQLite store (no
threads, explicit times): lanes, one row of a contact at a time by either name,
coalescing, promotion, ageing, shedding and the status it describes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest

from flask_meisa._engine import dead
from flask_meisa._engine import known
from flask_meisa._engine import pending
from flask_meisa._engine.base import LATENCY_WINDOW
from flask_meisa._engine.base import DeliveryStatus
from flask_meisa._engine.store import Store
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import LANE_NAMES
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import LANE_TRANSACTIONAL
from flask_meisa.operations import MAX_BODY_BYTES
from flask_meisa.operations import Operation
from flask_meisa.operations import Priority
from flask_meisa.operations import identities


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    """A connection to a fresh memory store."""
    store = Store(None)
    with store.read() as connection:
        yield connection
    store.close()


def upsert(user: int, priority: Priority | None = None, **fields: Any) -> Operation:
    payload = {"email": f"u{user}@example.com", "external_id": str(user), **fields}
    return Operation("upsert", payload, priority=priority)


def track(user: int, name: str = "clicked", priority: Priority | None = None) -> Operation:
    return Operation("track", {"event_name": name, "external_id": str(user)}, priority=priority)


def send(n: int = 0, to: str | None = None) -> Operation:
    return Operation(
        "send",
        {
            "trigger_key": "reset",
            "to_email": to or f"s{n}@example.com",
            "idempotency_key": str(n),
        },
    )


def add(db: sqlite3.Connection, operation: Operation, lane: int | None = None) -> int:
    """Store ``operation`` in ``lane`` (default: its own); the row's seq."""
    return pending.add(db, operation, operation.lane if lane is None else lane).seq


def take(db: sqlite3.Connection, now: float = 0.0) -> pending.Row | None:
    """The next row, marked in flight."""
    row = pending.next_ready(db, now)
    if row is not None:
        pending.take(db, row, now)
    return row


def drain(db: sqlite3.Connection, now: float = 0.0) -> list[pending.Row]:
    """Every row in delivery order, each finished before the next is taken."""
    taken = []
    while (row := take(db, now)) is not None:
        taken.append(row)
        pending.finish(db, row)
    return taken


def rows(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0])


def lane_of(db: sqlite3.Connection, seq: int) -> int:
    return int(db.execute("SELECT lane FROM meisa_ops WHERE seq = ?", (seq,)).fetchone()[0])


def describe(row: pending.Row) -> tuple[str, str | None]:
    payload = row.operation.payload
    return row.operation.kind, payload.get("event_name") or payload.get("external_id")


def test_an_operation_asks_for_its_lane_by_kind_priority_and_source() -> None:
    lanes = [
        send().lane,
        track(1).lane,
        upsert(1, priority="high").lane,
        upsert(1, source="signup").lane,
        upsert(1, source="api").lane,
        upsert(1, priority="backfill", source="signup").lane,
    ]
    assert [LANE_NAMES[lane] for lane in lanes] == [
        "transactional",
        "automation",
        "automation",
        "automation",
        "routine",
        "backfill",
    ]
    assert lanes == [LANE_TRANSACTIONAL, *[LANE_AUTOMATION] * 3, LANE_ROUTINE, LANE_BACKFILL]


def test_an_operation_describes_itself_without_payload_values() -> None:
    assert Operation("send", send().payload, id="s1").describe() == "send reset (s1)"
    assert Operation("track", track(1).payload, id="t1").describe() == "track clicked (t1)"
    assert Operation("upsert", upsert(1).payload, id="u1").describe() == "upsert (u1)"


@pytest.mark.parametrize("make", [send, track, upsert])
def test_an_operation_round_trips_through_its_dict(make: Callable[[int], Operation]) -> None:
    operation = make(1)
    operation.contact = {"email": "u1@example.com"} if operation.kind == "track" else None
    operation.attempts, operation.priority, operation.force = 2, "high", True
    assert Operation.from_dict(operation.to_dict()) == operation


def test_an_operation_is_not_forced_unless_asked_and_an_old_dict_reads_as_such() -> None:
    assert upsert(1).force is False
    data = {"id": "1", "kind": "upsert", "payload": {"email": "a@b.co"}, "created_at": 5}
    operation = Operation.from_dict(data)
    assert (operation.attempts, operation.priority, operation.force, operation.contact) == (
        0,
        None,
        False,
        None,
    )
    for bad in ({**data, "kind": "delete"}, {**data, "priority": "urgent"}):
        with pytest.raises(ValueError, match="unknown"):
            Operation.from_dict(bad)


def test_lanes_in_order_whatever_the_order_of_arrival(db: sqlite3.Connection) -> None:
    add(db, upsert(4, priority="backfill"), LANE_BACKFILL)
    add(db, upsert(3), LANE_ROUTINE)
    add(db, track(1))
    add(db, send())
    kinds = [(row.operation.kind, row.lane) for row in drain(db)]
    assert kinds == [
        ("send", LANE_TRANSACTIONAL),
        ("track", LANE_AUTOMATION),
        ("upsert", LANE_ROUTINE),
        ("upsert", LANE_BACKFILL),
    ]
    assert rows(db) == 0


def test_an_operation_comes_back_as_it_went_in(db: sqlite3.Connection) -> None:
    contact = {"email": "ada@example.com", "external_id": "1", "custom_fields": {"n": 1.5}}
    event = Operation(
        "track",
        {"event_name": "ünïcode", "external_id": "1", "properties": {"a": [1, None]}},
        contact=contact,
        priority="high",
        force=True,
    )
    add(db, event)
    row = pending.next_ready(db, 0.0)
    assert row is not None
    assert row.operation == event
    assert (row.lane, row.recover, row.merged, row.first_attempt) == (LANE_AUTOMATION, 0, 1, None)


def test_waiting_upserts_coalesce_into_one_row(db: sqlite3.Connection) -> None:
    first = upsert(1, custom_fields={"plan": "free", "a": 1}, tag_names=["x"], source="signup")
    seq, merged, _ = pending.add(db, first, LANE_ROUTINE)
    assert not merged
    later = upsert(1, custom_fields={"plan": "pro"}, tag_names=["y"], source="api")
    assert pending.add(db, later, LANE_ROUTINE)[:2] == (seq, True)
    assert rows(db) == 1
    (row,) = drain(db)
    payload = row.operation.payload
    assert payload["custom_fields"] == {"plan": "pro", "a": 1}
    assert payload["tag_names"] == ["x", "y"]
    assert payload["source"] == "signup"  # Meisa keeps a contact's first source
    assert row.merged == 2
    assert row.operation.id == first.id
    assert first.payload["custom_fields"] == {"plan": "free", "a": 1}  # not mutated


def test_a_lane_to_look_up_is_looked_up_only_when_the_row_it_joins_leaves_it_open(
    db: sqlite3.Connection,
) -> None:
    looked_up: list[int] = []

    def lane(answer: int) -> Callable[[], int]:
        def look_up() -> int:
            looked_up.append(answer)
            return answer

        return look_up

    first = pending.add(db, upsert(1), lane(LANE_AUTOMATION))
    assert (first.merged, first.lane, looked_up) == (False, LANE_AUTOMATION, [LANE_AUTOMATION])
    # Merged into a row ahead of routine syncs: the answer could change nothing.
    assert pending.add(db, upsert(1, first_name="A"), lane(LANE_ROUTINE)) == first._replace(
        merged=True
    )
    assert looked_up == [LANE_AUTOMATION]
    big = "x" * (MAX_BODY_BYTES // 2)
    add(db, upsert(2, custom_fields={"a": big}), LANE_ROUTINE)
    # Into a routine row the answer counts; and a row that cannot merge needs its own lane.
    assert pending.add(db, upsert(2, first_name="B"), lane(LANE_AUTOMATION)).lane == (
        LANE_AUTOMATION
    )
    moved = Operation("upsert", {"email": "u1@example.com", "external_id": "another"})
    refused = pending.add(db, moved, lane(LANE_ROUTINE))  # external ids disagree
    assert (refused.merged, refused.lane) == (False, LANE_ROUTINE)
    assert looked_up == [LANE_AUTOMATION, LANE_AUTOMATION, LANE_ROUTINE]


def test_a_merge_keeps_the_more_urgent_priority_and_force(db: sqlite3.Connection) -> None:
    add(db, upsert(1, first_name="A"), LANE_ROUTINE)
    urgent = upsert(1, last_name="B", priority="high")
    urgent.force = True
    add(db, urgent, LANE_AUTOMATION)
    (row,) = drain(db)
    assert (row.lane, row.operation.priority, row.operation.force) == (
        LANE_AUTOMATION,
        "high",
        True,
    )


@pytest.mark.parametrize("in_flight", [False, True], ids=["waiting", "retried"])
def test_a_merge_keeps_the_force_and_lane_of_the_upsert_it_joins(
    db: sqlite3.Connection, in_flight: bool
) -> None:
    first = upsert(1, first_name="A")
    first.force = True
    add(db, first, LANE_AUTOMATION)
    flying = take(db) if in_flight else None
    add(db, upsert(1, last_name="B"), LANE_ROUTINE)
    if flying is not None:
        pending.retry_at(db, flying, 0.0)
    (row,) = drain(db)
    assert (row.lane, row.operation.force, row.merged) == (LANE_AUTOMATION, True, 2)


def test_an_upsert_in_flight_is_not_merged_into_and_blocks_the_next(
    db: sqlite3.Connection,
) -> None:
    add(db, upsert(1, first_name="A"))
    flying = take(db)
    assert flying is not None
    second, merged, _ = pending.add(db, upsert(1, first_name="B"), LANE_ROUTINE)
    assert not merged and second > flying.seq
    assert pending.add(db, upsert(1, last_name="C"), LANE_ROUTINE)[:2] == (second, True)
    assert rows(db) == 2
    assert pending.next_ready(db, 0.0) is None  # one row of a contact at a time
    pending.finish(db, flying)
    (row,) = drain(db)
    assert (row.operation.payload["first_name"], row.operation.payload["last_name"]) == ("B", "C")
    assert row.merged == 2


def test_a_retried_upsert_absorbs_the_ones_that_came_while_it_was_in_flight(
    db: sqlite3.Connection,
) -> None:
    add(db, upsert(1, first_name="A", last_name="Old"), LANE_ROUTINE)
    add(db, upsert(2), LANE_ROUTINE)  # another contact's: untouched
    flying = take(db)
    assert flying is not None
    add(db, upsert(1, first_name="B"), LANE_ROUTINE)
    add(db, track(1, "between"))  # an event is not an upsert: it stays, in its place
    add(db, upsert(1, custom_fields={"c": 3}, priority="high"), LANE_AUTOMATION)
    pending.retry_at(db, flying, 5.0)
    assert rows(db) == 3
    assert flying.operation.payload["first_name"] == "B"
    assert (flying.merged, flying.lane) == (3, LANE_AUTOMATION)
    assert take(db, 4.0) is not None  # contact 2's upsert; contact 1 waits for 5.0
    assert pending.next_ready(db, 4.0) is None
    assert pending.next_due(db, 4.0) == 5.0
    again = take(db, 5.0)
    assert again is not None and again.seq == flying.seq
    assert again.operation.attempts == 2 and again.first_attempt == 0.0
    payload = again.operation.payload
    assert (payload["first_name"], payload["last_name"]) == ("B", "Old")
    assert payload["custom_fields"] == {"c": 3}
    assert (again.merged, again.lane) == (3, LANE_AUTOMATION)
    pending.finish(db, again)
    assert [describe(row) for row in drain(db, 5.0)] == [("track", "between")]


def test_a_retried_upsert_takes_the_priority_and_force_of_those_it_absorbs(
    db: sqlite3.Connection,
) -> None:
    add(db, upsert(1, first_name="A", priority="backfill"), LANE_BACKFILL)
    flying = take(db)
    assert flying is not None
    urgent = upsert(1, last_name="B", priority="high")
    urgent.force = True  # sent even if Meisa has this state: absorbed, it still is
    add(db, urgent, LANE_AUTOMATION)
    pending.retry_at(db, flying, 0.0)
    (row,) = drain(db)
    assert (row.lane, row.operation.priority, row.operation.force) == (
        LANE_AUTOMATION,
        "high",
        True,
    )


def test_a_retried_event_absorbs_no_upsert_of_its_contact(db: sqlite3.Connection) -> None:
    event = track(1, "clicked")
    add(db, event)
    flying = take(db)
    assert flying is not None
    add(db, upsert(1), LANE_ROUTINE)
    pending.retry_at(db, flying, 0.0)
    assert rows(db) == 2 and flying.merged == 1
    first, _ = drain(db)
    assert (first.operation.id, first.operation.payload) == (event.id, event.payload)


@pytest.mark.parametrize(("options", "recover"), [({}, 0), ({"recover": 1}, 1)])
def test_a_retried_row_recovers_its_contact_only_when_told(
    db: sqlite3.Connection, options: dict[str, int], recover: int
) -> None:
    add(db, track(1))
    flying = take(db)
    assert flying is not None
    pending.retry_at(db, flying, 0.0, **options)
    again = take(db)
    assert again is not None and again.recover == recover


def test_a_retried_upsert_absorbs_nothing_past_the_body_limit(db: sqlite3.Connection) -> None:
    big = "x" * (MAX_BODY_BYTES // 2)
    add(db, upsert(1, custom_fields={"a": big}), LANE_ROUTINE)
    flying = take(db)
    assert flying is not None
    add(db, upsert(1, custom_fields={"b": big}), LANE_ROUTINE)
    pending.retry_at(db, flying, 0.0)
    assert rows(db) == 2 and flying.merged == 1
    assert [sorted(row.operation.payload["custom_fields"]) for row in drain(db)] == [["a"], ["b"]]


def test_two_big_upserts_are_not_merged_past_the_body_limit(db: sqlite3.Connection) -> None:
    big = "x" * (MAX_BODY_BYTES // 2)
    first = add(db, upsert(1, custom_fields={"a": big}), LANE_ROUTINE)
    second, merged, _ = pending.add(db, upsert(1, custom_fields={"b": big}), LANE_ROUTINE)
    assert not merged and second > first
    assert pending.add(db, upsert(1, first_name="small"), LANE_ROUTINE)[:2] == (second, True)
    order = [sorted(row.operation.payload) for row in drain(db)]
    assert order == [
        ["custom_fields", "email", "external_id"],
        ["custom_fields", "email", "external_id", "first_name"],
    ]


def test_an_upsert_merges_into_no_row_that_a_later_upsert_of_its_contact_follows(
    db: sqlite3.Connection,
) -> None:
    big = "x" * (MAX_BODY_BYTES // 2)
    ada = {"email": "ada@example.com"}
    first = add(db, Operation("upsert", {**ada, "external_id": "u1", "custom_fields": {"a": big}}))
    # By address only, too big to merge: it waits after the first row.
    basic = Operation("upsert", {**ada, "custom_fields": {"b": big, "plan": "basic"}})
    second, merged, _ = pending.add(db, basic, LANE_ROUTINE)
    assert not merged and second > first
    # By user id only: the first row is its name's latest, but the second one follows it.
    pro = Operation("upsert", {"external_id": "u1", "custom_fields": {"plan": "pro"}})
    third, merged, _ = pending.add(db, pro, LANE_ROUTINE)
    assert not merged and third > second
    plans = [row.operation.payload["custom_fields"].get("plan") for row in drain(db)]
    assert plans == [None, "basic", "pro"]


def test_a_retried_upsert_absorbs_no_upsert_that_another_one_of_its_names_precedes(
    db: sqlite3.Connection,
) -> None:
    big = "x" * (MAX_BODY_BYTES // 2)
    add(db, upsert(1), LANE_ROUTINE)
    flying = take(db)
    assert flying is not None
    bob = {"email": "bob@example.com"}
    add(db, Operation("upsert", {**bob, "custom_fields": {"a": big, "plan": "basic"}}))
    moved = {**bob, "external_id": "1", "custom_fields": {"b": big, "plan": "pro"}}
    add(db, Operation("upsert", moved))  # too big to merge into the one before
    pending.retry_at(db, flying, 0.0)
    assert rows(db) == 3 and flying.merged == 1
    plans = [row.operation.payload.get("custom_fields", {}).get("plan") for row in drain(db)]
    assert plans == [None, "basic", "pro"]


def plan(ext: str | None, email: str | None, value: int, **fields: Any) -> Operation:
    """An upsert by the names given, setting ``plan`` to ``value``."""
    names = {"external_id": ext, "email": email and f"{email}@example.com"}
    custom = {"plan": value, **fields}
    payload = {k: v for k, v in names.items() if v is not None} | {"custom_fields": custom}
    return Operation("upsert", payload)


def final_plan(rows: list[pending.Row]) -> Any:
    """The plan Meisa ends with, the rows delivered in this order."""
    plans = [row.operation.payload.get("custom_fields", {}).get("plan") for row in rows]
    return [value for value in plans if value is not None][-1]


@pytest.mark.parametrize(
    ("between", "late"),
    [(("1", None), (None, "a")), ((None, "a"), ("1", None))],
    ids=["by-email-after-by-id", "by-id-after-by-email"],
)
def test_an_upsert_by_one_name_merges_into_no_row_a_later_upsert_by_the_other_follows(
    db: sqlite3.Connection,
    between: tuple[str | None, str | None],
    late: tuple[str | None, str | None],
) -> None:
    big = "x" * (MAX_BODY_BYTES // 2)
    first = add(db, plan("1", "a", 0, a=big))
    second = add(db, plan(*between, 1, b=big))  # too big to merge: a row of its own
    assert second > first
    assert not pending.add(db, plan(*late, 2), LANE_ROUTINE).merged
    assert final_plan(drain(db)) == 2


def test_an_upsert_merges_past_no_upsert_of_its_contact_in_flight(
    db: sqlite3.Connection,
) -> None:
    add(db, plan("1", None, 0))
    add(db, plan(None, "a", 1), LANE_AUTOMATION)
    flying = take(db)
    assert flying is not None and flying.operation.payload["email"] == "a@example.com"
    assert not pending.add(db, plan("1", "a", 2), LANE_ROUTINE).merged
    pending.retry_at(db, flying, 0.0)
    assert final_plan(drain(db)) == 2


def test_a_retried_upsert_absorbs_nothing_past_an_upsert_of_its_contact_in_flight(
    db: sqlite3.Connection,
) -> None:
    add(db, plan("1", None, 0))
    first = take(db)
    add(db, plan(None, "a", 1), LANE_AUTOMATION)
    second = take(db)
    assert first is not None and second is not None
    add(db, plan("1", "a", 2))
    pending.retry_at(db, first, 0.0)
    assert first.merged == 1
    pending.retry_at(db, second, 0.0)
    assert final_plan(drain(db)) == 2


def test_a_retried_upsert_absorbs_a_later_upsert_by_each_of_its_names(
    db: sqlite3.Connection,
) -> None:
    add(db, plan("1", "a", 0))
    flying = take(db)
    assert flying is not None
    add(db, plan("1", None, 1))
    add(db, plan(None, "a", 2, more=1))  # by the other name: a row of its own
    assert rows(db) == 3
    pending.retry_at(db, flying, 0.0)
    assert rows(db) == 1 and flying.merged == 3
    (row,) = drain(db)
    assert row.operation.payload["custom_fields"] == {"plan": 2, "more": 1}


def test_a_retried_upsert_absorbs_nothing_past_an_upsert_of_a_name_it_took_in(
    db: sqlite3.Connection,
) -> None:
    big = "x" * (MAX_BODY_BYTES // 2)
    add(db, plan("1", None, 0))
    flying = take(db)
    assert flying is not None
    add(db, plan("1", "a", 1, big=big))  # links user 1 to the address
    add(db, plan(None, "a", 2, more=big))  # too big to merge into the one before
    add(db, plan("1", None, 3))
    pending.retry_at(db, flying, 0.0)
    assert flying.merged == 2  # took in the first only
    assert final_plan(drain(db)) == 3


def test_an_address_change_waits_in_its_own_row_so_the_old_address_keeps_its_order(
    db: sqlite3.Connection,
) -> None:
    add(db, plan("2", None, 0))
    add(db, plan("1", "a", 1))
    assert not pending.add(db, plan("1", "b", 2), LANE_ROUTINE).merged  # user 1 moves to b
    add(db, plan("2", "a", 3))  # and user 2 takes a: only once user 1 has left it
    moves = [identities(row.operation.payload) for row in drain(db)]
    assert moves.index(("ext:1", "email:b@example.com")) < moves.index(
        ("ext:2", "email:a@example.com")
    )


def test_events_wait_for_their_contacts_upsert_and_keep_their_order(
    db: sqlite3.Connection,
) -> None:
    add(db, upsert(1), LANE_AUTOMATION)
    add(db, track(1, "first"))
    add(db, track(1, "second"))
    add(db, track(2, "other"))
    flying = take(db)
    assert flying is not None and flying.operation.kind == "upsert"
    other = take(db)  # the contact's events wait; another contact's goes
    assert other is not None and describe(other) == ("track", "other")
    pending.finish(db, other)
    assert pending.next_ready(db, 0.0) is None
    pending.retry_at(db, flying, 10.0)  # a retrying upsert holds its place
    assert pending.next_ready(db, 9.0) is None
    assert [describe(row) for row in drain(db, 10.0)] == [
        ("upsert", "1"),
        ("track", "first"),
        ("track", "second"),
    ]


def test_one_row_of_a_contact_at_a_time(db: sqlite3.Connection) -> None:
    add(db, track(1, "a"))
    add(db, track(1, "b"))
    first = take(db)
    assert first is not None and pending.next_ready(db, 0.0) is None
    pending.retry_at(db, first, 1.0)
    assert pending.next_ready(db, 0.5) is None  # "b" waits behind the retrying "a"
    again = pending.next_ready(db, 1.0)
    assert again is not None and again.seq == first.seq


def test_one_recipients_sends_go_one_at_a_time_in_order(db: sqlite3.Connection) -> None:
    add(db, send(1, to="ada@example.com"))
    add(db, send(2, to="ada@example.com"))
    add(db, send(3, to="bob@example.com"))
    first = take(db)
    assert first is not None and first.operation.payload["idempotency_key"] == "1"
    other = take(db)
    assert other is not None and other.operation.payload["idempotency_key"] == "3"
    assert pending.next_ready(db, 0.0) is None


def test_a_contact_named_by_email_in_one_row_and_by_external_id_in_another_is_one(
    db: sqlite3.Connection,
) -> None:
    add(db, Operation("upsert", {"email": "Ada@Example.com", "external_id": "u1"}))
    add(db, Operation("track", {"event_name": "by_email", "email": "ada@example.com"}))
    add(db, Operation("track", {"event_name": "by_id", "external_id": "u1"}))
    flying = take(db)
    assert flying is not None and flying.operation.kind == "upsert"
    assert pending.next_ready(db, 0.0) is None  # neither event overtakes it
    pending.finish(db, flying)
    assert [describe(row) for row in drain(db)] == [("track", "by_email"), ("track", "by_id")]


def test_an_upsert_by_email_merges_into_the_contacts_upsert_by_both_names(
    db: sqlite3.Connection,
) -> None:
    seq = add(db, Operation("upsert", {"email": "ada@example.com", "external_id": "u1"}))
    later = Operation("upsert", {"email": "ada@example.com", "first_name": "Ada"})
    assert pending.add(db, later, LANE_ROUTINE)[:2] == (seq, True)
    (row,) = drain(db)
    assert row.operation.payload == {
        "email": "ada@example.com",
        "external_id": "u1",
        "first_name": "Ada",
    }


def test_upserts_whose_external_ids_disagree_are_not_merged_but_keep_their_order(
    db: sqlite3.Connection,
) -> None:
    first = add(db, Operation("upsert", {"email": "ada@example.com", "external_id": "u1"}))
    other = Operation("upsert", {"email": "ada@example.com", "external_id": "u2"})
    second, merged, _ = pending.add(db, other, LANE_ROUTINE)
    assert not merged and second > first
    flying = take(db)
    assert flying is not None and flying.seq == first
    assert pending.next_ready(db, 0.0) is None  # they share an address: one at a time


def test_a_row_joining_its_contact_in_a_higher_lane_promotes_the_earlier_rows(
    db: sqlite3.Connection,
) -> None:
    other = add(db, upsert(2), LANE_ROUTINE)
    earlier = add(db, upsert(1, first_name="A"), LANE_ROUTINE)
    add(db, track(1, "upgraded"))
    assert (lane_of(db, earlier), lane_of(db, other)) == (LANE_AUTOMATION, LANE_ROUTINE)
    assert [describe(row) for row in drain(db)] == [
        ("upsert", "1"),
        ("track", "upgraded"),
        ("upsert", "2"),
    ]


def test_a_send_to_a_contacts_address_promotes_nothing_of_the_contact(
    db: sqlite3.Connection,
) -> None:
    earlier = add(db, upsert(1), LANE_ROUTINE)
    add(db, send(to="u1@example.com"))
    assert lane_of(db, earlier) == LANE_ROUTINE


def test_a_merge_into_a_higher_lane_promotes_the_contacts_earlier_rows(
    db: sqlite3.Connection,
) -> None:
    add(db, upsert(1), LANE_ROUTINE)
    flying = take(db)
    assert flying is not None
    event = add(db, track(1, priority="backfill"))
    waiting = add(db, upsert(1, first_name="A"), LANE_ROUTINE)
    # Routine work takes its contact's backfill rows along: it never waits behind the
    # backfill's backlog.
    assert (lane_of(db, event), lane_of(db, waiting)) == (LANE_ROUTINE, LANE_ROUTINE)
    urgent = upsert(1, custom_fields={"plan": "pro"}, priority="high")
    assert pending.add(db, urgent, LANE_AUTOMATION)[:2] == (waiting, True)
    lanes = (lane_of(db, flying.seq), lane_of(db, event), lane_of(db, waiting))
    assert lanes == (LANE_AUTOMATION,) * 3


def test_a_merge_that_adds_a_name_promotes_the_rows_under_that_name(
    db: sqlite3.Connection,
) -> None:
    # An event known by external_id only, in a later lane than the upsert that follows
    # it; the upsert reaches the automation lane by age, which moves nothing else.
    event = add(db, track(1, priority="backfill"))
    waiting = add(db, Operation("upsert", upsert(1).payload, created_at=100.0), LANE_ROUTINE)
    assert pending.age_routine(db, 150.0) == 1
    # An urgent upsert by email alone joins it: the merged row is known by both names,
    # so the event under the external_id moves up too.
    urgent = Operation("upsert", {"email": "u1@example.com", "first_name": "A"}, priority="high")
    assert pending.add(db, urgent, LANE_AUTOMATION)[:2] == (waiting, True)
    assert (lane_of(db, event), lane_of(db, waiting)) == (LANE_AUTOMATION, LANE_AUTOMATION)


def test_age_routine_promotes_old_routine_syncs_only(db: sqlite3.Connection) -> None:
    old = add(db, Operation("upsert", {"email": "a@example.com"}, created_at=100.0), LANE_ROUTINE)
    young = add(
        db, Operation("upsert", {"email": "b@example.com"}, created_at=200.0), LANE_ROUTINE
    )
    backfill = add(
        db,
        Operation("upsert", {"email": "c@example.com"}, created_at=100.0, priority="backfill"),
        LANE_BACKFILL,
    )
    assert pending.age_routine(db, 150.0) == 1
    lanes = (lane_of(db, old), lane_of(db, young), lane_of(db, backfill))
    assert lanes == (LANE_AUTOMATION, LANE_ROUTINE, LANE_BACKFILL)


def test_shedding_takes_routine_then_automation_rows_oldest_first(
    db: sqlite3.Connection,
) -> None:
    add(db, track(9, "flying"))
    assert take(db) is not None  # in flight: never shed
    add(db, send(1))
    add(db, upsert(7, priority="backfill"), LANE_BACKFILL)
    old_event, new_event = track(1, "old"), track(2, "new")
    old_sync, new_sync = upsert(3), upsert(4)
    for operation in (old_event, old_sync, new_event, new_sync):
        add(db, operation)
    # Six live rows: a backfill bounds itself and does not count.
    assert pending.shed(db, 7) == []
    assert pending.shed(db, 6) == []
    assert pending.shed(db, 4) == [old_sync, new_sync]
    assert pending.shed(db, 3) == [old_event]
    # Only a send, a backfill and the row in flight are left: none of them goes.
    assert pending.shed(db, 0) == [new_event]
    assert rows(db) == 3
    kinds = sorted(r[0] for r in db.execute("SELECT kind FROM meisa_ops"))
    assert kinds == ["send", "track", "upsert"]


def test_shedding_counts_every_operation_a_row_stood_for(db: sqlite3.Connection) -> None:
    for n in range(3):
        add(db, upsert(1, first_name=f"v{n}"), LANE_ROUTINE)
    add(db, upsert(2), LANE_ROUTINE)
    (shed,) = pending.shed(db, 1)
    assert shed.payload["first_name"] == "v2"
    assert Store.get_meta(db, "dropped") == 3
    status = DeliveryStatus(engine="thread")
    pending.describe(db, 0.0, status)
    assert (status.dropped, status.pending) == (3, 1)


def test_a_merge_takes_no_room(db: sqlite3.Connection) -> None:
    add(db, upsert(1, first_name="A"), LANE_ROUTINE)
    add(db, upsert(1, first_name="B"), LANE_ROUTINE)
    assert pending.shed(db, 1) == []


def test_a_requeued_dead_letter_waits_again_as_new(db: sqlite3.Connection) -> None:
    add(db, track(1, "a"))
    add(db, track(2, "b"))
    first, second = take(db, 5.0), take(db, 5.0)
    assert first is not None and second is not None
    pending.retry_at(db, first, 6.0, recover=2)  # its contact was upserted once already
    again = take(db, 6.0)
    assert again is not None and again.recover == 2
    dead.bury(db, again, RuntimeError("no"))
    dead.bury(db, second, RuntimeError("no"))
    assert dead.requeue(db, [first.seq]) == 1
    (row,) = drain(db, 7.0)
    assert (row.seq, row.recover, row.operation.attempts, row.first_attempt) == (
        first.seq,
        0,
        1,
        7.0,
    )
    assert [letter.seq for letter in dead.dead_letters(db)] == [second.seq]


def test_dead_letters_neither_block_their_contact_nor_count_as_waiting(
    db: sqlite3.Connection,
) -> None:
    add(db, upsert(1), LANE_AUTOMATION)
    add(db, track(1, "after"))
    refused = take(db)
    assert refused is not None
    dead.bury(db, refused, RuntimeError("refused"))
    assert pending.shed(db, 1) == []  # one waiting row: within capacity
    assert [describe(row) for row in drain(db)] == [("track", "after")]
    (letter,) = dead.dead_letters(db)
    assert (letter.seq, letter.message, letter.operation.attempts) == (
        refused.seq,
        "RuntimeError",
        1,
    )


def test_unfinished_and_waits_count_waiting_flying_and_retrying_rows_not_dead_ones(
    db: sqlite3.Connection,
) -> None:
    for n in range(4):
        add(db, track(n))
    flying, retrying, refused = take(db), take(db), take(db)
    assert flying is not None and retrying is not None and refused is not None
    pending.retry_at(db, retrying, 10.0)
    dead.bury(db, refused, RuntimeError("no"))
    assert pending.unfinished(db) == 3
    assert [pending.waits(db, track(n)) for n in range(5)] == [True, True, False, True, False]
    assert pending.waits(db, upsert(0))  # the same contact, by its external id


def test_tidy_ages_routine_syncs_and_forgets_old_digests_and_answers(
    db: sqlite3.Connection,
) -> None:
    now = 10_000.0
    old = add(db, Operation("upsert", upsert(1).payload, created_at=now - 101), LANE_ROUTINE)
    young = add(db, Operation("upsert", upsert(2).payload, created_at=now - 99), LANE_ROUTINE)
    known.remember(db, upsert(1).payload, now - 501)
    known.remember(db, upsert(2).payload, now - 499)
    for at in (now - LATENCY_WINDOW - 1, now - LATENCY_WINDOW + 1):
        db.execute("INSERT INTO meisa_answers (lane, at, waited) VALUES (?, ?, ?)", (1, at, 0.1))
    pending.tidy(db, now, routine_max_age=100, known_for=500)
    assert (lane_of(db, old), lane_of(db, young)) == (LANE_AUTOMATION, LANE_ROUTINE)
    assert known.lookup(db, upsert(1).payload) is None
    assert known.lookup(db, upsert(2).payload) is not None
    answers = [at for (at,) in db.execute("SELECT at FROM meisa_answers")]
    assert answers == [now - LATENCY_WINDOW + 1]


def test_flights_left_by_a_process_that_died_wait_again(db: sqlite3.Connection) -> None:
    for n in range(3):
        add(db, track(n))
    first, second = take(db), take(db)
    assert first is not None and second is not None
    assert pending.release_flights(db) == 2
    again = take(db)
    assert again is not None and again.seq == first.seq
    assert again.operation.attempts == 2 and again.first_attempt == 0.0


def test_the_status_describes_lanes_flights_retries_and_dead_letters(
    db: sqlite3.Connection,
) -> None:
    add(db, send(), LANE_TRANSACTIONAL)
    add(db, Operation("upsert", {"email": "a@example.com"}, created_at=90.0), LANE_ROUTINE)
    add(db, track(1, "a"))
    add(db, track(2, "b"))
    add(db, track(3, "c"))
    flying, retrying, refused = take(db, 100.0), take(db, 100.0), take(db, 100.0)
    assert flying is not None and retrying is not None and refused is not None
    pending.retry_at(db, retrying, 110.0)
    dead.bury(db, refused, RuntimeError("no"))
    status = DeliveryStatus(engine="thread")
    pending.describe(db, 100.0, status)
    assert status.queued == {"transactional": 0, "automation": 1, "routine": 1, "backfill": 0}
    assert (status.in_flight, status.retry_waiting, status.dead_letters) == (1, 1, 1)
    assert status.pending == 4
    assert status.oldest_wait["routine"] == pytest.approx(10.0)


def test_a_routine_upsert_that_cannot_join_its_contacts_backfill_row_lifts_it(
    db: sqlite3.Connection,
) -> None:
    # The user changed address: the login's sync cannot merge into the backfill's row of
    # the contact, and must not wait behind the whole backfill for it.
    backfilled = add(db, upsert(1, priority="backfill"), LANE_BACKFILL)
    for other in range(2, 5):
        add(db, upsert(other, priority="backfill"), LANE_BACKFILL)
    moved = Operation("upsert", {"email": "moved@example.com", "external_id": "1"})
    login = pending.add(db, moved, LANE_ROUTINE)
    assert not login.merged
    assert (lane_of(db, backfilled), lane_of(db, login.seq)) == (LANE_ROUTINE, LANE_ROUTINE)
    assert [describe(row) for row in drain(db)][:2] == [("upsert", "1"), ("upsert", "1")]


def test_a_backfill_upsert_joining_a_live_one_never_undoes_it(db: sqlite3.Connection) -> None:
    live = add(db, upsert(1, custom_fields={"plan": "pro"}), LANE_ROUTINE)
    snapshot = upsert(1, "backfill", custom_fields={"plan": "free", "seats": 2})
    assert pending.add(db, snapshot, LANE_BACKFILL)[:2] == (live, True)
    flying = take(db)
    assert flying is not None
    assert flying.operation.payload["custom_fields"] == {"plan": "pro", "seats": 2}
    # Taken in by a row that comes back from flight, too.
    pending.add(db, upsert(1, "backfill", custom_fields={"plan": "free"}), LANE_BACKFILL)
    pending.retry_at(db, flying, 0.0)
    (row,) = drain(db)
    assert row.operation.payload["custom_fields"] == {"plan": "pro", "seats": 2}
    assert row.operation.priority is None


def released(at: float, priority: Priority | None = None, **fields: Any) -> Operation:
    """An upsert of user 1 released at ``at``."""
    payload = {"email": "u1@example.com", "external_id": "1", **fields}
    return Operation("upsert", payload, created_at=at, priority=priority)


def test_a_live_sync_merged_into_a_waiting_backfill_row_counts_from_its_own_release(
    db: sqlite3.Connection,
) -> None:
    # The backfill's row waits since 10.0; a login's sync released at 95.0 joins it. The
    # row waits in the login's lane now, as the login: its age and the latency noted at
    # its answer (from the row's created_at) count from 95.0, and it is no routine sync
    # an hour old yet.
    backfilled = add(db, released(10.0, "backfill", first_name="A"), LANE_BACKFILL)
    assert pending.add(db, released(95.0, last_name="B"), LANE_ROUTINE)[:2] == (backfilled, True)
    status = DeliveryStatus(engine="thread")
    pending.describe(db, 100.0, status)
    assert status.oldest_wait == {"routine": pytest.approx(5.0)}
    assert pending.age_routine(db, 90.0) == 0
    # A later backfill upsert of the contact moves it neither way.
    assert pending.add(db, released(99.0, "backfill", first_name="C"), LANE_BACKFILL).merged
    flying = take(db, 100.0)
    assert flying is not None and flying.operation.created_at == 95.0
    # A backfill row taking in, as it comes back from flight, a live sync that came meanwhile.
    pending.finish(db, flying)
    add(db, released(10.0, "backfill", first_name="D"), LANE_BACKFILL)
    flying = take(db, 100.0)
    assert flying is not None
    add(db, released(96.0, last_name="E"), LANE_ROUTINE)
    pending.retry_at(db, flying, 0.0)
    status = DeliveryStatus(engine="thread")
    pending.describe(db, 100.0, status)
    assert status.oldest_wait == {"routine": pytest.approx(4.0)}
    (row,) = drain(db, 100.0)
    assert row.operation.created_at == 96.0 and row.operation.priority is None
    # A live row keeps its own release, whatever joins it.
    live = add(db, released(50.0, last_name="F"), LANE_ROUTINE)
    assert pending.add(db, released(60.0, "backfill", first_name="G"), LANE_BACKFILL).merged
    (row,) = drain(db, 100.0)
    assert (row.seq, row.operation.created_at) == (live, 50.0)


def test_a_live_sync_merged_into_an_earlier_runs_backfill_row_is_one_a_new_run_keeps_clear_of(
    db: sqlite3.Connection,
) -> None:
    # An interrupted run left the user's upsert waiting (10.0); a new run starts at 20.0,
    # the user's login at 30.0 joins that row, which goes in flight: the new run's upsert
    # of the user, read at 20.0, must leave out the login's fields (known.released_after).
    add(db, released(10.0, "backfill", first_name="A"), LANE_BACKFILL)
    pending.add(db, released(30.0, last_name="B"), LANE_ROUTINE)
    assert take(db, 30.0) is not None
    assert "last_name" in known.released_after(db, released(0.0).payload, 20.0)


def test_the_oldest_row_not_over_says_whether_any_row_read_earlier_is_left(
    db: sqlite3.Connection,
) -> None:
    first, second = upsert(1), upsert(2)
    oldest, newest = add(db, first), add(db, second)
    earlier = pending.row_ids(db)
    pending.finish(db, _row(db, newest))
    later = upsert(3)
    assert add(db, later) == newest  # the seq of the row just over, given again
    assert pending.oldest_unfinished(db) == first.id  # read earlier: left
    assert pending.oldest_unfinished(db) in earlier
    pending.finish(db, _row(db, oldest))
    assert pending.oldest_unfinished(db) == later.id
    assert pending.oldest_unfinished(db) not in earlier
    pending.finish(db, _row(db, newest))
    assert pending.oldest_unfinished(db) is None


def _row(db: sqlite3.Connection, seq: int) -> pending.Row:
    values = db.execute(f"SELECT {pending.OP_COLUMNS} FROM meisa_ops WHERE seq = ?", (seq,))
    return pending.row_of(values.fetchone())


def deliver(db: sqlite3.Connection, calls: int) -> list[str]:
    """Make ``calls`` calls: whose row each was (its ``external_id``)."""
    gone = []
    for _ in range(calls):
        row = take(db)
        assert row is not None
        pending.finish(db, row)
        gone.append(str(row.operation.payload["external_id"]))
    return gone


def steady_user(db: sqlite3.Connection) -> list[str]:
    """A user with an event a call, and a newcomer's event a call, for more calls than
    :data:`~flask_meisa._engine.pending.FAIR_SHARE`: whose events are left waiting."""
    add(db, track(1, "steady-0"))
    for n in range(1, pending.FAIR_SHARE + 20):
        add(db, track(1, f"steady-{n}"))
        add(db, track(1000 + n, "signed_up"))
        deliver(db, 2)
    query = (
        "SELECT json_extract(payload, '$.external_id') FROM meisa_ops "
        "WHERE kind = 'track' AND state = 'pending' ORDER BY seq"
    )
    return [name for (name,) in db.execute(query)]


@pytest.mark.parametrize("held", ["backfill", "retrying", "routine"])
def test_work_held_back_makes_no_users_one_event_the_first_shed(
    db: sqlite3.Connection, held: str
) -> None:
    # Work waits while live work comes and goes: `flask meisa sync-users` in the backfill
    # lane, a row waiting to retry, a routine sync behind urgent work. A user with one
    # event waiting is no flood, and a full queue sheds the routine sync.
    if held == "backfill":
        add(db, upsert(7, priority="backfill"), LANE_BACKFILL)
    elif held == "routine":
        add(db, upsert(7), LANE_ROUTINE)
    else:
        add(db, track(7, "retrying"))
        row = take(db)
        assert row is not None
        pending.retry_at(db, row, 1e12)
    assert len([name for name in steady_user(db) if name != "7"]) == 1
    add(db, track(1, "steady-last"))
    add(db, upsert(8), LANE_ROUTINE)
    (shed,) = pending.shed(db, pending.live_count(db) - 1)
    assert shed.kind == "upsert"  # a routine sync, not the user's event


def test_a_requeued_dead_letter_puts_no_waiting_work_behind_later_work(
    db: sqlite3.Connection,
) -> None:
    add(db, track(9, "refused"))
    refused = take(db)
    assert refused is not None
    dead.bury(db, refused, RuntimeError("refused"))
    (waiting,) = steady_user(db)
    assert dead.requeue(db) == 1
    # The event waiting goes before the events of newcomers stored after it...
    for n in range(3):
        add(db, track(2000 + n, "signed_up"))
    assert deliver(db, 2) == ["9", waiting]
    # ... and a full queue sheds a routine sync before the work of a user with one event.
    add(db, track(1, "steady-last"))
    routine = upsert(8)
    add(db, routine, LANE_ROUTINE)
    assert pending.shed(db, pending.live_count(db) - 1) == [routine]
