"""Significance decides the lane: changes that start Meisa's automations never wait behind
routine syncs, yet every routine sync arrives and each contact's order holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa import contact_synced
from flask_meisa import delivery_dropped
from flask_meisa import delivery_failed
from flask_meisa import email_sent
from flask_meisa import event_tracked
from flask_meisa._engine import pending
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.errors import ValidationError
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests.apps import build_app
from tests.engine_support import RecordingHooks
from tests.engine_support import make_engine

UPSERT = "/contacts/upsert/"


def user(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "email": f"user{n}@example.com",
        "external_id": str(n),
        "custom_fields": {"plan": "free", **fields},
    }


def test_urgent_changes_overtake_600_routine_syncs_and_nothing_is_lost(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    emulator = emulator_factory(rate_limit=None)
    path = tmp_path / "store.sqlite3"
    # Meisa first learns of 600 users (without a budget), so that their next syncs are
    # routine: they change last_active only.
    first = make_engine(RecordingHooks(), emulator.url, emulator.live_key, store=Store(path))
    first.submit([Operation("upsert", user(n)) for n in range(600)])
    assert first.flush(60)
    first.close(0)
    emulator.clear_requests()
    emulator.set_rate_limit("60/second")

    engine = make_engine(
        RecordingHooks(),
        emulator.url,
        emulator.live_key,
        store=Store(path),
        rate_limit="60/second",
    )
    try:
        engine.submit([Operation("upsert", user(n, last_active=f"t{n}")) for n in range(600)])
        assert emulator.wait_for(lambda e: len(e.requests) >= 20)
        assert engine.status().queued["routine"] > 500
        released = time.time()
        plan = Operation("upsert", user(300, plan="pro"), priority="high")
        signup = Operation(
            "upsert", {"email": "new@example.com", "external_id": "new", "source": "signup"}
        )
        event = Operation("track", {"event_name": "exported_report", "external_id": "450"})
        engine.submit([plan, signup, event])

        def arrived(match: Callable[[Any], bool]) -> float:
            assert emulator.wait_for(lambda e: any(match(r) for r in e.requests), timeout=10)
            return next(r.time for r in emulator.requests if match(r)) - released

        waits = {
            "plan change": arrived(
                lambda r: r.path.endswith(UPSERT) and r.body["custom_fields"].get("plan") == "pro"
            ),
            "signup": arrived(
                lambda r: r.path.endswith(UPSERT) and r.body["external_id"] == "new"
            ),
            "event": arrived(lambda r: r.path.endswith("/events/track/")),
        }
        print("time to Meisa:", {k: round(v, 3) for k, v in waits.items()})
        assert all(wait < 1.0 for wait in waits.values()), waits
        assert engine.flush(30)
        status = engine.status()
        # The store's counters are the host's: the first 600 are counted too.
        assert (status.delivered, status.dropped, status.failed) == (1203, 0, 0)
    finally:
        engine.close(0)
    assert 429 not in [r.status for r in emulator.requests]
    # Every routine sync arrived, and user 300's routine change went with its plan change
    # (merged into one call, not after it with the old plan).
    contacts = {c["external_id"]: c for c in emulator.contacts()}
    assert all(contacts[str(n)]["custom_fields"]["last_active"] == f"t{n}" for n in range(600))
    assert contacts["300"]["custom_fields"]["plan"] == "pro"
    calls_for_300 = [r for r in emulator.requests_to(UPSERT) if r.body["external_id"] == "300"]
    assert len(calls_for_300) == 1
    # The event of user 450 went after user 450's routine sync, never before.
    mine = [r.path for r in emulator.requests if (r.body or {}).get("external_id") == "450"]
    assert mine == ["/api/v1" + UPSERT, "/api/v1/events/track/"]


def test_status_shows_each_lanes_oldest_wait_and_latency(
    emulator_factory: Callable[..., Emulator],
) -> None:
    emulator = emulator_factory(rate_limit=None)
    engine = make_engine(RecordingHooks(), emulator.url, emulator.live_key, rate_limit="10/second")
    try:
        engine.submit([Operation("upsert", user(n)) for n in range(15)])
        assert emulator.wait_for(lambda e: len(e.requests) >= 10)
        status = engine.status()
        assert status.queued["automation"] == 5  # first upserts of new contacts
        assert 0.0 < status.oldest_wait["automation"] < 5.0
        assert engine.flush(10)
        p50, p99 = engine.status().latency["automation"]
        # The first ten went at once; the last five waited for them to leave the second.
        assert 0.0 < p50 < 0.5 <= p99 < 5.0
    finally:
        engine.close(0)


def test_every_operation_of_a_request_ends_somewhere_even_when_the_queue_is_full(
    emulator: Emulator,
) -> None:
    # During an outage, a full queue (3 live operations) and a request making a background
    # send, an upsert and an event: each ends delivered, failed or dropped (signalled).
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=emulator.live_key,
        MEISA_BASE_URL=emulator.url,
        MEISA_RATE_LIMIT=None,
        MEISA_QUEUE_SIZE=3,
        MEISA_RETRY_BASE_DELAY=0.05,
        MEISA_RETRY_MAX_DELAY=0.2,
    )
    meisa = Meisa(app)
    outcomes: dict[str, str] = {}

    def on(name: str) -> Callable[..., None]:
        def record(sender: Flask, operation: Any = None, **extra: Any) -> None:
            if operation is not None:
                outcomes[operation.id] = name

        return record

    receivers = [
        (contact_synced, on("synced")),
        (event_tracked, on("tracked")),
        (email_sent, on("sent")),
        (delivery_failed, on("failed")),
        (delivery_dropped, on("dropped")),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, sender=app)
    emulator.faults.outage(60)
    made: list[str] = []

    @app.post("/busy")
    def busy() -> str:
        for n in range(4):
            meisa.upsert(user(n, last_active="x"))
        meisa.send("password_reset", "user9@example.com", background=True)
        meisa.upsert(user(5))
        meisa.track("opened", email="user5@example.com")
        return "ok"

    with app.app_context():
        from flask_meisa.testing import record_operations

        with record_operations(app) as recorded:
            app.test_client().post("/busy", buffered=True)
        made = [op.id for op in recorded]
        time.sleep(0)  # nothing to wait for: the queue is full now
    emulator.faults.clear()
    with app.app_context():
        assert meisa.flush(15)
    for signal, receiver in receivers:
        signal.disconnect(receiver, sender=app)
    assert len(made) == 7
    assert set(made) == set(outcomes), "every operation has an outcome"
    assert list(outcomes.values()).count("sent") == 1
    with app.app_context():
        status = meisa.status()
    assert status.dropped == list(outcomes.values()).count("dropped") > 0


def test_a_plan_change_asks_for_the_automation_lane_and_a_login_does_not(
    emulator: Emulator,
) -> None:
    app = build_app(emulator_config(emulator))
    with record_operations(app) as recorded, app.test_client() as client:
        client.post("/plan/2/pro", buffered=True)
        client.post("/login/2", buffered=True)
    plan, login = recorded
    assert plan.payload["custom_fields"]["plan"] == "pro"
    assert (plan.priority, plan.lane) == ("high", LANE_AUTOMATION)
    # A login is routine until the engine finds that Meisa does not have the contact yet.
    assert login.lane == LANE_ROUTINE


def test_an_upsert_asked_for_with_high_priority_takes_the_automation_lane(
    emulator: Emulator,
) -> None:
    app = build_app(emulator_config(emulator))
    meisa: Meisa = app.extensions["meisa"]
    with record_operations(app) as recorded, app.test_request_context():
        meisa.upsert({"email": "ada@example.com"}, priority="high")
        meisa.upsert({"email": "bob@example.com"})
        with pytest.raises(ValidationError, match="priority"):
            meisa.upsert({"email": "eve@example.com"}, priority="urgent")  # type: ignore[arg-type]
    high, normal = recorded  # the refused one queued nothing
    assert (high.priority, high.lane) == ("high", LANE_AUTOMATION)
    assert (normal.priority, normal.lane) == (None, LANE_ROUTINE)


def test_a_routine_sync_older_than_the_bound_goes_ahead_of_younger_urgent_work(
    emulator: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite3"
    store, now = Store(path), time.time()
    with store.write() as db:  # a store left by a process that was stopped with a backlog
        old = Operation("upsert", user(0, last_active="old"), created_at=now - 7200)
        pending.add(db, old, LANE_ROUTINE)
        for n in range(1, 21):
            pending.add(db, Operation("upsert", user(n), created_at=now), LANE_AUTOMATION)
        young = Operation("upsert", user(99, last_active="young"), created_at=now)
        pending.add(db, young, LANE_ROUTINE)
    store.close()
    engine = make_engine(
        RecordingHooks(),
        emulator.url,
        emulator.live_key,
        store=Store(path),
        rate_limit="20/second",
        routine_max_age=3600.0,
    )
    try:
        assert engine.flush(30)
    finally:
        engine.close(0)
    order = [r.body["external_id"] for r in emulator.requests_to(UPSERT)]
    assert len(order) == 22
    # Two hours old: promoted ahead of the 20 urgent upserts; the young one still waits.
    assert order.index("0") < 3 and order.index("99") >= 19, order
