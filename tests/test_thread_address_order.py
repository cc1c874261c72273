"""The thread engine on addresses handed from one user to another: an upsert taking an
address waits for the earlier work of the user Meisa has at that address (who may be
leaving it), so Meisa never gives that user's contact to the new one, and a swap through a
spare address meets no conflict; and a user's move waits for the earlier work of the
address Meisa has for them (an event tracked by that address alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask_meisa._engine import pending
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.engine_support import MakeEngine
from tests.engine_support import RecordingHooks

UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"


def upsert(**payload: Any) -> Operation:
    return Operation("upsert", payload)


def deliver(make_engine: MakeEngine, emulator: Emulator, ops: list[Operation]) -> None:
    engine = make_engine(emulator, RecordingHooks())
    engine.submit(ops)
    assert engine.flush(timeout=20)
    engine.close()  # the next engine of the store delivers, with its own retry policy


def hand_over(make_engine: MakeEngine, emulator: Emulator) -> dict[str, Any]:
    """User 1 moves from a@ to b@ (a 503 first) as user 2 takes a@; user 1's contact after."""
    emulator.faults.fail_next(1, 503, path=UPSERT, match={"email": "b@example.com"})
    ops = [
        upsert(email="b@example.com", external_id="u1"),
        upsert(email="a@example.com", external_id="u2"),
    ]
    deliver(make_engine, emulator, ops)
    one = emulator.contact(external_id="u1")
    assert one is not None
    return one


def test_an_address_handed_over_reaches_its_new_user_after_the_old_user_left_it(
    make_engine: MakeEngine, emulator: Emulator
) -> None:
    deliver(make_engine, emulator, [upsert(email="a@example.com", external_id="u1")])
    first = emulator.contact(external_id="u1")
    assert first is not None
    one = hand_over(make_engine, emulator)
    assert one["id"] == first["id"]  # not user 1's contact re-keyed to u2, and a new one
    assert len(emulator.contacts()) == 2


def test_addresses_swapped_through_a_spare_one_reach_meisa_without_a_conflict(
    make_engine: MakeEngine, emulator: Emulator
) -> None:
    ops = [
        upsert(email="a@example.com", external_id="u1"),
        upsert(email="b@example.com", external_id="u2"),
    ]
    deliver(make_engine, emulator, ops)
    emulator.faults.fail_next(1, 503, path=UPSERT, match={"email": "spare@example.com"})
    swap = [
        upsert(email="spare@example.com", external_id="u1"),
        upsert(email="a@example.com", external_id="u2"),
        upsert(email="b@example.com", external_id="u1"),
    ]
    deliver(make_engine, emulator, swap)
    assert [r.status for r in emulator.requests_to(UPSERT) if r.status == 409] == []


def test_an_address_handed_over_while_its_old_user_had_it_pending_waits_for_the_move(
    make_engine: MakeEngine, emulator: Emulator
) -> None:
    # User 1's first upsert, at a@, is not delivered yet when they move to b@ (whose
    # upsert fails once) and user 2 takes a@.
    emulator.faults.fail_next(1, 503, path=UPSERT, match={"email": "b@example.com"})
    ops = [
        upsert(email="a@example.com", external_id="u1"),
        upsert(email="b@example.com", external_id="u1"),
        upsert(email="a@example.com", external_id="u2"),
    ]
    deliver(make_engine, emulator, ops)
    one, two = emulator.contact(external_id="u1"), emulator.contact(external_id="u2")
    assert one is not None and two is not None
    assert (one["email"], two["email"]) == ("b@example.com", "a@example.com")
    assert one["created_at"] < two["created_at"]  # not user 1's contact given to user 2
    assert len(emulator.contacts()) == 2


def test_an_event_by_address_is_not_overtaken_by_its_users_later_move(
    make_engine: MakeEngine, emulator: Emulator
) -> None:
    deliver(make_engine, emulator, [upsert(email="a@example.com", external_id="u1")])
    emulator.faults.fail_next(1, 503, path="/events/track/")
    event = Operation("track", {"event_name": "opened_report", "email": "a@example.com"})
    deliver(make_engine, emulator, [event, upsert(email="b@example.com", external_id="u1")])
    assert [e["event_name"] for e in emulator.events()] == ["opened_report"]
    one = emulator.contact(external_id="u1")
    assert one is not None and one["email"] == "b@example.com"


def test_an_address_taken_by_a_signup_does_not_wait_behind_a_backfill(
    make_engine: MakeEngine, emulator: Emulator, path: Path
) -> None:
    # A backfill stored x1, x2 and user 1 (who moved from a@ to b@) when user 2 signs up
    # at a@: user 2's signup waits for user 1's backfill row, which goes no later than it
    # (as a contact's own earlier rows do), not behind the rest of the backfill.
    deliver(make_engine, emulator, [upsert(email="a@example.com", external_id="u1")])
    moves = [("x1@example.com", "x1"), ("x2@example.com", "x2"), ("b@example.com", "u1")]
    backfill = [
        Operation("upsert", {"email": email, "external_id": ext}, priority="backfill")
        for email, ext in moves
    ]
    signup = upsert(email="a@example.com", external_id="u2", source="signup")
    store = Store(path)
    with store.write() as db:
        for op in [*backfill, signup]:
            pending.add(db, op, op.lane)
    assert make_engine(emulator, RecordingHooks(), store=store).flush(timeout=20)
    order = [r.body["external_id"] for r in emulator.requests_to(UPSERT)][1:]
    assert order[:2] == ["u1", "u2"]
    assert sorted(order[2:]) == ["x1", "x2"]
    one = emulator.contact(external_id="u1")
    assert one is not None and one["email"] == "b@example.com"


def test_an_upsert_without_the_address_moves_its_users_row_and_the_old_users_ahead(
    make_engine: MakeEngine, emulator: Emulator, path: Path
) -> None:
    # As above, but user 2's row at a@ is the backfill's too, and what moves it ahead is a
    # later upsert naming user 2 by external id alone, merged into it: user 1's backfill
    # row, which user 2's waits for, goes no later than it either.
    deliver(make_engine, emulator, [upsert(email="a@example.com", external_id="u1")])
    moves = [("x1", "x1@example.com"), ("x2", "x2@example.com"), ("u1", "b@example.com")]
    backfill = [
        Operation("upsert", {"email": email, "external_id": ext}, priority="backfill")
        for ext, email in [*moves, ("u2", "a@example.com")]
    ]
    later = Operation("upsert", {"external_id": "u2", "first_name": "Ada"}, priority="high")
    store = Store(path)
    with store.write() as db:
        for op in [*backfill, later]:
            pending.add(db, op, op.lane)
    assert make_engine(emulator, RecordingHooks(), store=store).flush(timeout=20)
    order = [r.body["external_id"] for r in emulator.requests_to(UPSERT)][1:]
    assert order == ["u1", "u2", "x1", "x2"]
    two = emulator.contact(external_id="u2")
    assert two is not None and (two["email"], two["first_name"]) == ("a@example.com", "Ada")


def test_an_address_its_user_left_for_another_makes_its_next_user_wait_for_nothing(
    make_engine: MakeEngine, emulator: Emulator, path: Path
) -> None:
    # User 1 moved from a@ to b@, and Meisa accepted it: user 3 taking a@ later does not
    # wait for user 1's event that Meisa answers 503 (retried a second later).
    moves = [upsert(email="a@example.com", external_id="u1")]
    deliver(make_engine, emulator, moves)
    deliver(make_engine, emulator, [upsert(email="b@example.com", external_id="u1")])
    emulator.faults.fail_next(1, 503, path=TRACK)
    event = Operation("track", {"event_name": "signed_in", "external_id": "u1"})
    signup = upsert(email="a@example.com", external_id="u3", source="signup")
    store = Store(path)
    with store.write() as db:
        for op in (event, signup):
            pending.add(db, op, op.lane)
    second_apart = RetryPolicy(base_delay=1.0, max_delay=1.0, deadline=30.0, random=lambda: 0.999)
    engine = make_engine(emulator, RecordingHooks(), store=store, retry=second_apart)
    assert engine.flush(timeout=20)
    assert engine.is_holder  # it delivered, its retries a second apart
    calls = [(r.path.endswith(UPSERT), r.status) for r in emulator.requests][-3:]
    assert calls == [(False, 503), (True, 201), (False, 200)]  # the event, the signup
