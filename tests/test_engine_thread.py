"""The thread engine against the emulator over loopback HTTP: budget, lanes, coalescing,
ordering, 404 recovery, scheduled retries, outages, 429 pauses and a full queue."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest

from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.engine.thread import ThreadDispatcher
from flask_meisa.errors import DeliveryError
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.engine_support import RecordingHooks
from tests.engine_support import upsert

FAST = RetryPolicy(max_attempts=20, base_delay=0.05, max_delay=0.2, deadline=30.0)
UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"

MakeEngine = Callable[..., ThreadDispatcher]


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def make_engine(hooks: RecordingHooks) -> Iterator[MakeEngine]:
    """``make_engine(emulator, **options)``: an engine on that emulator (no budget and fast
    retries unless given); every engine is closed after the test."""
    made: list[ThreadDispatcher] = []

    def make(emu: Emulator, **options: Any) -> ThreadDispatcher:
        options.setdefault("retry", FAST)
        options.setdefault("rate_limit", None)
        engine = ThreadDispatcher(
            client_factory=lambda: MeisaClient(emu.live_key, emu.url, timeout=(1.0, 2.0)),
            hooks=hooks,
            **options,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close(timeout=0)


def track(n: int, name: str = "clicked", tag: str = "t", **extra: Any) -> Operation:
    payload = {"event_name": name, "external_id": f"{tag}-{n}", **extra}
    return Operation("track", payload)


def send(n: int, trigger: str = "receipt") -> Operation:
    return Operation(
        "send",
        {"trigger_key": trigger, "to_email": f"buyer{n}@example.com", "idempotency_key": f"s{n}"},
    )


def statuses(emu: Emulator, path: str | None = None) -> list[int | None]:
    requests = emu.requests if path is None else emu.requests_to(path)
    return [r.status for r in requests]


@pytest.mark.slow
def test_300_operations_at_the_budget_get_no_429(
    emulator_factory: Callable[..., Emulator], make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    # Both sides at 20 calls per 0.2 s (100/s: Meisa's 60/minute, scaled), three workers,
    # and a little latency so that each call reaches the server well after it left.
    emu = emulator_factory(rate_limit="20/0.2s")
    emu.faults.set(latency=0.002)
    engine = make_engine(emu, rate_limit="20/0.2s", workers=3)
    operations = [upsert(n) for n in range(100)]
    operations += [track(n % 100, f"e{n}") for n in range(150)]
    operations += [send(n) for n in range(50)]
    for op in operations:
        engine.submit(op)
    assert hooks.wait_for("delivered", 300, timeout=30)
    assert engine.flush(5)
    assert 429 not in statuses(emu)
    assert all(status in (200, 201) for status in statuses(emu))
    assert len(emu.requests) == 300
    assert (len(emu.events()), len(emu.sends())) == (150, 50)
    assert len(emu.contacts()) == 150  # a send creates its recipient's contact
    assert engine.status().delivered == 300


def test_a_send_behind_200_pending_syncs_goes_first_or_second(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    emulator.faults.set(latency=0.2)  # the first sync is still in flight meanwhile
    engine = make_engine(emulator)
    for n in range(200):
        engine.submit(upsert(n))
    reset = send(1, "password_reset")
    engine.submit(reset)
    assert hooks.wait_for("delivered", 1)
    paths = [r.path for r in emulator.requests]
    assert emulator.wait_for(lambda e: len(e.requests_to(TRIGGER)) == 1)
    position = [r.path for r in emulator.requests].index("/api/v1" + TRIGGER)
    assert position <= 1, paths
    assert engine.status().queued["sync"] >= 190


def test_syncs_never_spend_the_share_of_the_budget_kept_for_sends(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator, rate_limit="20/minute")  # one call of 20 is reserved
    for n in range(25):
        engine.submit(upsert(n))
    assert hooks.wait_for("delivered", 19)
    reset = send(1, "password_reset")
    engine.submit(reset)
    assert hooks.wait_for("delivered", 20)
    assert hooks.of("delivered")[-1] is reset
    status = engine.status()
    assert status.queued["sync"] == 6
    assert status.budget_left == {"20/minute": 0}
    assert len(emulator.requests) == 20


def test_50_upserts_of_one_contact_during_an_outage_make_one_call(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    emulator.faults.outage(60)
    engine = make_engine(emulator)
    for n in range(50):
        fields: dict[str, Any] = {"seq": n, f"field{n}": n}
        engine.submit(upsert(7, **fields))
    # Once an attempt carrying the final state was refused, end the outage.
    assert emulator.wait_for(
        lambda e: any(
            r.status == 503 and r.body["custom_fields"].get("seq") == 49
            for r in e.requests_to(UPSERT)
        )
    )
    assert engine.status().pending == 1
    emulator.faults.clear()
    assert engine.flush(5)
    answered = [r for r in emulator.requests_to(UPSERT) if r.status in (200, 201)]
    assert len(answered) == 1
    fields = answered[0].body["custom_fields"]
    assert fields["seq"] == 49
    assert all(fields[f"field{n}"] == n for n in range(50))
    assert emulator.contact(external_id="t-7")["custom_fields"]["seq"] == 49  # type: ignore[index]
    assert len(hooks.of("delivered")) == 50  # each submitted operation has its outcome


def test_events_never_overtake_their_contacts_upsert(
    emulator_factory: Callable[..., Emulator], make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    emu = emulator_factory(rate_limit=None, fault_seed=3)
    emu.faults.set(error_rate=0.25, error_statuses=[503])
    engine = make_engine(emu, workers=3)
    # Each contact's upsert, then three events; contacts interleaved at random.
    queues = {c: [upsert(c)] + [track(c, f"step{i}") for i in range(3)] for c in range(20)}
    rng = random.Random(5)
    while queues:
        contact = rng.choice(sorted(queues))
        engine.submit(queues[contact].pop(0))
        if not queues[contact]:
            del queues[contact]
    assert engine.flush(15)
    assert len(hooks.of("delivered")) == 80
    assert 404 not in statuses(emu)
    for contact in range(20):
        key = f"t-{contact}"
        mine = [r for r in emu.requests if r.body and r.body.get("external_id") == key]
        created = next(
            i for i, r in enumerate(mine) if r.path.endswith(UPSERT) and r.status == 201
        )
        assert all(r.path.endswith(UPSERT) for r in mine[:created])
        tracked = [
            r.body["event_name"] for r in mine if r.path.endswith(TRACK) and r.status == 200
        ]
        assert tracked == ["step0", "step1", "step2"]


def test_an_event_answered_404_upserts_its_contact_then_tracks_again(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    contact = {"email": "new@example.com", "external_id": "u-404", "first_name": "Nova"}
    event = Operation(
        "track", {"event_name": "signed_up", "external_id": "u-404"}, contact=contact
    )
    engine.submit(event)
    assert engine.flush(5)
    assert [(r.path.removeprefix("/api/v1"), r.status) for r in emulator.requests] == [
        (TRACK, 404),
        (UPSERT, 201),
        (TRACK, 200),
    ]
    assert emulator.contact(external_id="u-404")["first_name"] == "Nova"  # type: ignore[index]
    assert hooks.of("delivered") == [event]
    assert hooks.of("failed") == []


def test_an_event_answered_404_without_a_known_contact_fails(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    event = track(1, tag="nobody")
    engine.submit(event)
    assert engine.flush(5)
    assert statuses(emulator) == [404]
    assert hooks.of("failed") == [event]
    assert engine.failed_operations()[0].error.status == 404  # type: ignore[attr-defined]


def test_a_retrying_contact_does_not_hold_up_the_others(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    with MeisaClient(emulator.live_key, emulator.url) as client:
        for n in (1, 2):
            client.upsert_contact(f"user{n}@example.com", external_id=f"t-{n}")
    emulator.clear_requests()
    slow = RetryPolicy(max_attempts=5, base_delay=0.3, max_delay=1.0, random=lambda: 1.0)
    engine = make_engine(emulator, retry=slow)
    emulator.faults.fail_next(2, status=503, path=UPSERT)
    engine.submit(upsert(0))
    engine.submit(track(1))
    engine.submit(track(2))
    assert engine.flush(5)
    seen = [(r.path.removeprefix("/api/v1"), r.status) for r in emulator.requests]
    assert seen == [(UPSERT, 503), (TRACK, 200), (TRACK, 200), (UPSERT, 503), (UPSERT, 201)]
    assert len(hooks.of("delivered")) == 3


@pytest.mark.slow
def test_an_outage_of_seconds_loses_nothing_and_wastes_little(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    emulator.faults.outage(2.0)
    policy = RetryPolicy(max_attempts=50, base_delay=0.1, max_delay=0.5, deadline=30.0)
    engine = make_engine(emulator, retry=policy)
    contact = {"email": "user{}@example.com"}
    for n in range(10):
        engine.submit(upsert(n))
        payload = {"email": contact["email"].format(n), "external_id": f"t-{n}"}
        engine.submit(Operation("track", {"event_name": "x", "external_id": f"t-{n}"}, payload))
        engine.submit(send(n))
    assert engine.flush(10)
    assert len(hooks.of("delivered")) == 30
    assert hooks.of("failed") == []
    assert (len(emulator.events()), len(emulator.sends())) == (10, 10)
    assert len(emulator.contacts()) == 20  # ten users, ten recipients of the sends
    refused = statuses(emulator).count(503)
    assert 1 <= refused < 20  # not one failed attempt per operation: Meisa was probed


def test_a_429_pauses_every_lane_for_its_retry_after(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    emulator.faults.force_429(1, retry_after=1)
    engine.submit(upsert(1))
    assert emulator.wait_for_requests(1)
    engine.submit(send(1, "password_reset"))  # the top lane waits too
    assert engine.flush(5)
    limited, *after = emulator.requests
    assert limited.status == 429
    assert [r.status for r in after] == [200, 201]
    assert after[0].path.endswith(TRIGGER)
    assert after[0].time - limited.time >= 1.0


def test_a_full_queue_sheds_events_then_syncs_never_sends(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One call a minute: after the first, everything stays queued.
    engine = make_engine(emulator, rate_limit="1/minute", queue_size=3)
    engine.submit(send(0))
    assert hooks.wait_for("delivered", 1)
    first_event, sync_1, second_event = track(1, "first"), upsert(2), track(3, "second")
    for op in (first_event, sync_1, second_event):
        engine.submit(op)
    sync_2 = upsert(4)
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    engine.submit(sync_2)
    assert hooks.of("dropped") == [first_event]
    sends = [send(n) for n in (1, 2, 3)]
    for op in sends:
        engine.submit(op)
    assert hooks.of("dropped") == [first_event, second_event, sync_1, sync_2]
    with pytest.raises(DeliveryError, match="queue is full"):
        engine.submit(send(4))
    late_event = track(5, "late")
    engine.submit(late_event)
    assert hooks.of("dropped")[-1] is late_event
    assert [d for kind, _, d in hooks.outcomes if kind == "dropped"] == ["queue_full"] * 5
    status = engine.status()
    assert status.queued == {"transactional": 3, "sync": 0, "events": 0}
    assert status.dropped == 5
    assert status.budget_left == {"1/minute": 0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(first_event.describe() in line and "queue_full" in line for line in warnings)
    assert not any("example.com" in line for line in warnings)
    assert engine.close(timeout=0) == 3
    assert hooks.of("dropped")[-3:] == sends


def test_flush_says_whether_anything_is_left(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    assert engine.flush(0)  # nothing submitted
    emulator.faults.outage(60)
    engine.submit(upsert(1))
    assert not engine.flush(0.2)
    assert engine.status().pending == 1
    emulator.faults.clear()
    assert engine.flush(5)
    assert engine.status().pending == 0
    assert hooks.of("delivered")[0].attempts >= 2


def test_status_counters_failures_and_skips(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    engine = make_engine(emulator, rate_limit="100/minute;1000/hour")
    status = engine.status()
    assert (status.engine, status.pending, status.paused_for) == ("thread", 0, 0.0)
    assert status.budget_left == {"100/minute": 100, "1000/hour": 1000}
    hooks.skip = lambda op: "suppressed" if op.kind == "send" else None
    emulator.faults.fail_next(1, status=400, path=UPSERT)
    refused, accepted, suppressed = upsert(1), upsert(2), send(3)
    for op in (refused, accepted, suppressed):
        engine.submit(op)
    assert engine.flush(5)
    status = engine.status()
    assert (status.delivered, status.failed, status.dropped) == (1, 1, 0)
    assert status.queued == {"transactional": 0, "sync": 0, "events": 0}
    assert status.budget_left == {"100/minute": 98, "1000/hour": 998}  # no call for a skip
    assert engine.skipped == 1
    assert hooks.of("skipped") == [suppressed]
    assert emulator.requests_to(TRIGGER) == []
    assert hooks.of("failed") == [refused]
    (failure,) = engine.failed_operations()
    assert failure.operation is refused and failure.attempts == 1
    assert failure.error.status == 400  # type: ignore[attr-defined]
    line = next(r.getMessage() for r in caplog.records if "failed after" in r.getMessage())
    assert refused.describe() in line and "HTTP 400" in line
    logged = caplog.text
    assert "user1@example.com" not in logged and emulator.live_key not in logged


def test_a_raising_hook_never_stops_the_worker(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks.raise_in = {"delivered", "skip_reason"}
    engine = make_engine(emulator)
    for n in range(3):
        engine.submit(upsert(n))
    assert engine.flush(5)
    engine.submit(upsert(3))  # the same worker is still there
    assert engine.flush(5)
    assert len(hooks.of("delivered")) == 4
    assert len(emulator.requests_to(UPSERT)) == 4
    assert "the delivered hook raised" in caplog.text
    assert "the skip_reason hook raised" in caplog.text


def test_workers_start_on_the_first_submit_and_stop_at_close(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    before = set(threading.enumerate())
    engine = make_engine(emulator, workers=2)
    assert set(threading.enumerate()) == before
    engine.submit(upsert(1))
    started = set(threading.enumerate()) - before
    assert sorted(t.name for t in started) == ["flask-meisa-delivery-1", "flask-meisa-delivery-2"]
    assert all(t.daemon for t in started)
    assert engine.close() == 0
    assert not any(t.is_alive() for t in started)


def test_submit_after_close(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    engine.close()
    late = upsert(1)
    engine.submit(late)
    assert hooks.of("dropped") == [late]
    with pytest.raises(DeliveryError, match="closed"):
        engine.submit(send(1))
    assert emulator.requests == []
