"""Background delivery against the emulator over loopback HTTP: budget, lanes, coalescing,
ordering, 404 recovery, scheduled retries, outages, 429 pauses and a full queue."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.pending import FAIR_SHARE
from flask_meisa._engine.store import Store
from flask_meisa.client import MeisaClient
from flask_meisa.config import MeisaSettings
from flask_meisa.emulator import Emulator
from flask_meisa.errors import DeliveryError
from flask_meisa.errors import EngineClosed
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.engine_support import FAST
from tests.engine_support import SLOW
from tests.engine_support import MakeEngine
from tests.engine_support import RecordingHooks
from tests.engine_support import make_engine as build_engine
from tests.engine_support import query
from tests.engine_support import upsert
from tests.hostile import hostile
from tests.process_support import wait_until

UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"

SETTINGS = MeisaSettings.from_config({"MEISA_ENABLED": False})


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def make_engine(hooks: RecordingHooks) -> Iterator[MakeEngine]:
    """``make_engine(emulator, **options)``: an engine on that emulator (a memory store, no
    budget and fast retries unless given); every engine is closed after the test."""
    made: list[Delivery] = []

    def make(emu: Emulator, **options: Any) -> Delivery:
        options.setdefault("retry", FAST)
        engine = build_engine(hooks, emu.url, emu.live_key, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close(timeout=0)


def track(n: int, name: str = "clicked", tag: str = "t", **extra: Any) -> Operation:
    return Operation("track", {"event_name": name, "external_id": f"{tag}-{n}", **extra})


def send(n: int, trigger: str = "receipt", to: str | None = None) -> Operation:
    return Operation(
        "send",
        {
            "trigger_key": trigger,
            "to_email": to or f"buyer{n}@example.com",
            "idempotency_key": f"s{n}",
        },
    )


def statuses(emu: Emulator, path: str | None = None) -> list[int | None]:
    requests = emu.requests if path is None else emu.requests_to(path)
    return [r.status for r in requests]


def ids(operations: list[Operation]) -> list[str]:
    return [op.id for op in operations]


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
    engine.submit(operations)
    assert engine.flush(30)
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
    engine.submit([upsert(n) for n in range(200)])
    assert emulator.wait_for_requests(1)
    engine.submit([send(1, "password_reset")])
    assert emulator.wait_for(lambda e: len(e.requests_to(TRIGGER)) == 1)
    position = [r.path for r in emulator.requests].index("/api/v1" + TRIGGER)
    assert position <= 2
    assert engine.status().queued["automation"] >= 190  # first upserts of new contacts


def test_syncs_never_spend_the_share_of_the_budget_kept_for_sends(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator, rate_limit="20/minute")  # one call of 20 is reserved
    engine.submit([upsert(n) for n in range(25)])
    assert hooks.wait_for("delivered", 19)
    reset = send(1, "password_reset")
    engine.submit([reset])
    assert hooks.wait_for("delivered", 20)
    assert hooks.of("delivered")[-1].id == reset.id
    status = engine.status()
    assert status.queued["automation"] == 6
    assert status.budget_left == {"20/minute": 0}
    assert len(emulator.requests) == 20


def test_50_upserts_of_one_contact_during_an_outage_make_one_call(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    emulator.faults.outage(60)
    engine = make_engine(emulator)
    for n in range(50):
        fields: dict[str, Any] = {"seq": n, f"field{n}": n}
        engine.submit([upsert(7, **fields)])
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
    assert engine.status().delivered == 50  # every submitted operation is counted


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
        engine.submit([queues[contact].pop(0)])
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


def test_an_event_by_email_waits_for_its_contacts_upsert_by_external_id(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    # One contact, named by both in the upsert and by email only in the event: one 503 on
    # the upsert must not let the event go first (it would be answered 404 and lost).
    engine = make_engine(emulator)
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    engine.submit(
        [
            Operation("upsert", {"email": "ada@example.com", "external_id": "u1"}),
            Operation("track", {"event_name": "exported", "email": "ada@example.com"}),
        ]
    )
    assert engine.flush(5)
    seen = [(r.path.removeprefix("/api/v1"), r.status) for r in emulator.requests]
    assert seen == [(UPSERT, 503), (UPSERT, 201), (TRACK, 200)]
    assert hooks.of("failed") == []


def test_a_stale_upsert_never_wins_over_a_later_one_by_another_name(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    with emulator_client(emulator) as client:
        client.upsert_contact("ada@example.com", external_id="u1")
    emulator.clear_requests()
    engine = make_engine(emulator)
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    engine.submit(
        [
            Operation(
                "upsert",
                {
                    "email": "ada@example.com",
                    "external_id": "u1",
                    "custom_fields": {"plan": "free"},
                },
            ),
        ]
    )
    assert emulator.wait_for_requests(1)  # the first attempt was refused; it waits to retry
    engine.submit(
        [Operation("upsert", {"email": "ada@example.com", "custom_fields": {"plan": "pro"}})]
    )
    assert engine.flush(5)
    assert emulator.contact(external_id="u1")["custom_fields"]["plan"] == "pro"  # type: ignore[index]


def emulator_client(emulator: Emulator) -> Any:
    return MeisaClient(emulator.live_key, emulator.url)


def test_an_event_answered_404_upserts_its_contact_then_tracks_again(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(emulator)
    contact = {"email": "new@example.com", "external_id": "u-404", "first_name": "Nova"}
    event = Operation(
        "track", {"event_name": "signed_up", "external_id": "u-404"}, contact=contact
    )
    engine.submit([event])
    assert engine.flush(5)
    assert [(r.path.removeprefix("/api/v1"), r.status) for r in emulator.requests] == [
        (TRACK, 404),
        (UPSERT, 201),
        (TRACK, 200),
    ]
    assert emulator.contact(external_id="u-404")["first_name"] == "Nova"  # type: ignore[index]
    assert ids(hooks.of("delivered")) == [event.id]
    assert hooks.of("failed") == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_an_event_answered_404_without_a_known_contact_fails_as_a_dead_letter(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    from flask_meisa._engine import dead

    engine = make_engine(emulator)
    event = track(1, tag="nobody")
    engine.submit([event])
    assert engine.flush(5)
    assert statuses(emulator) == [404]
    assert ids(hooks.of("failed")) == [event.id]
    with engine.store.read() as db:
        (letter,) = dead.dead_letters(db)
    assert (letter.operation.id, letter.status, letter.operation.attempts) == (event.id, 404, 1)
    assert engine.status().dead_letters == 1


def test_a_retrying_contact_does_not_hold_up_the_others(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    with emulator_client(emulator) as client:
        for n in (1, 2):
            client.upsert_contact(f"user{n}@example.com", external_id=f"t-{n}")
    emulator.clear_requests()
    slow = RetryPolicy(max_attempts=5, base_delay=0.3, max_delay=1.0, random=lambda: 1.0)
    engine = make_engine(emulator, retry=slow)
    emulator.faults.fail_next(2, status=503, path=UPSERT)
    engine.submit([upsert(0), track(1), track(2)])
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
    for n in range(10):
        payload = {"email": f"user{n}@example.com", "external_id": f"t-{n}"}
        event = Operation("track", {"event_name": "x", "external_id": f"t-{n}"}, payload)
        engine.submit([upsert(n), event, send(n)])
    assert engine.flush(10)
    assert len(hooks.of("delivered")) == 30
    assert hooks.of("failed") == []
    assert (len(emulator.events()), len(emulator.sends())) == (10, 10)
    assert len(emulator.contacts()) == 20  # ten users, ten recipients of the sends
    refused = statuses(emulator).count(503)
    assert 1 <= refused < 20  # not one failed attempt per operation: Meisa was probed


@pytest.mark.parametrize("delays", [(0.0, 30.0), (0.5, 0.0), (1e-9, 0.01)])
def test_retry_delays_of_zero_never_retry_a_failing_meisa_in_a_tight_loop(
    emulator: Emulator, make_engine: MakeEngine, delays: tuple[float, float]
) -> None:
    # MEISA_RETRY_BASE_DELAY = 0 (or MEISA_RETRY_MAX_DELAY = 0) made about 700 calls a
    # second against a Meisa answering 503: once it looks down it is probed once a second.
    base_delay, max_delay = delays
    emulator.faults.outage(60)
    policy = RetryPolicy(max_attempts=None, base_delay=base_delay, max_delay=max_delay)
    make_engine(emulator, retry=policy).submit([upsert(1), upsert(2), track(3)])
    assert emulator.wait_for_requests(5, timeout=10)
    times = [r.time for r in emulator.requests[:5]]
    assert times[3] - times[2] >= 0.99 and times[4] - times[3] >= 0.99


def test_a_429_pauses_every_lane_for_its_retry_after(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    emulator.faults.force_429(1, retry_after=1)
    engine.submit([upsert(1)])
    assert emulator.wait_for_requests(1)
    engine.submit([send(1, "password_reset")])  # the top lane waits too
    assert engine.flush(5)
    limited, *after = emulator.requests
    assert limited.status == 429
    assert [r.status for r in after] == [200, 201]
    assert after[0].path.endswith(TRIGGER)
    assert after[0].time - limited.time >= 1.0


def test_the_send_guardrail_of_one_recipient_delays_nobody_else(
    emulator_factory: Callable[..., Emulator], make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    # Four resets to one address against a guardrail of 3 an hour: the fourth waits (an
    # hour: past the retry deadline, it fails at once), and 20 syncs and another user's
    # email go through without any pause.
    emu = emulator_factory(rate_limit=None, send_guardrail="3/hour")
    engine = make_engine(emu)
    flood = [send(n, "password_reset", to="target@example.com") for n in range(4)]
    others = [upsert(n) for n in range(20)] + [send(99, "verification_code")]
    engine.submit(flood + others)
    assert engine.flush(10)
    recipients = [sent["to_email"] for sent in emu.sends()]
    assert recipients.count("target@example.com") == 3
    assert recipients.count("buyer99@example.com") == 1
    assert len(emu.contacts()) >= 21
    assert statuses(emu).count(429) == 1
    assert engine.status().paused_for == 0.0
    assert ids(hooks.of("failed")) == [flood[3].id]
    assert hooks.detail(hooks.of("failed")[0]).code == "send_guardrail"


def test_a_full_queue_sheds_routine_then_other_live_work_never_sends(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One call a minute: after the first, everything stays queued.
    engine = make_engine(emulator, rate_limit="1/minute", queue_size=3)
    engine.submit([send(0)])
    assert hooks.wait_for("delivered", 1)
    caplog.set_level(logging.WARNING, logger="flask_meisa.engine")
    first_event, second_event = track(1, "first"), track(3, "second")
    sync_1, sync_2 = upsert(2), upsert(4)
    engine.submit([first_event, sync_1, second_event, sync_2])
    assert hooks.wait_for("dropped", 1)
    assert ids(hooks.of("dropped")) == [first_event.id]  # all automation-lane: oldest first
    sends = [send(n) for n in (1, 2, 3)]
    engine.submit(sends)
    assert hooks.wait_for("dropped", 4)
    assert sorted(ids(hooks.of("dropped"))) == sorted(
        ids([first_event, sync_1, second_event, sync_2])
    )
    assert [d for kind, _, d in hooks.outcomes if kind == "dropped"] == ["queue_full"] * 4
    status = engine.status()
    assert status.queued == {"transactional": 3, "automation": 0, "routine": 0, "backfill": 0}
    assert status.dropped == 4
    assert status.budget_left == {"1/minute": 0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(first_event.describe() in line and "queue_full" in line for line in warnings)
    assert not any("example.com" in line for line in warnings)
    assert engine.close(timeout=0) == 3  # a memory store: the sends are lost, and said so
    assert sorted(ids(hooks.of("dropped")[-3:])) == sorted(ids(sends))


def test_one_contacts_flood_delays_no_other_contact(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    # One user's 40 events, then another user's event and a third's first sync, all in
    # the automation lane: contacts take turns, so the two go right after the flood's
    # first, not after all 40.
    engine = make_engine(emulator)
    engine.submit([upsert(1), upsert(2)])
    assert engine.flush(10)
    flood = [track(1, f"clicked-{n}") for n in range(40)]
    engine.submit([*flood, track(2, "signed_up"), upsert(3)])
    assert engine.flush(15)
    calls = [request.body for request in emulator.requests[2:]]
    assert len(calls) == 42
    others = [n for n, body in enumerate(calls) if body["external_id"] in ("t-2", "t-3")]
    assert others == [1, 2]
    clicked = [e["event_name"] for e in emulator.events() if e["event_name"] != "signed_up"]
    assert clicked == [f"clicked-{n}" for n in range(40)]  # the user's own order kept


def test_a_full_queue_sheds_a_floods_last_turns_not_other_contacts_earlier_work(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator, rate_limit="1/minute", queue_size=FAIR_SHARE + 10)
    engine.submit([send(0)])
    assert hooks.wait_for("delivered", 1)  # the budget is spent: everything else waits
    others = [track(2, "signed_up"), upsert(3)]
    engine.submit(others)
    flood = [track(1, f"clicked-{n}") for n in range(FAIR_SHARE + 10)]
    engine.submit(flood)
    assert hooks.wait_for("dropped", 2)
    assert ids(hooks.of("dropped")) == ids([flood[-1], flood[-2]])  # the last turn first
    assert engine.status().queued["automation"] == FAIR_SHARE + 10


def test_a_flush_waits_for_the_hooks_of_earlier_work_shed_from_the_store_by_later_work(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    # The budget is spent: an upsert waits in the store. Work handed over after the flush
    # began fills the queue and sheds it; it is over once its dropped hook ran, not once
    # its row is gone.
    entered, release = hooks.hold("dropped")
    engine = make_engine(emulator, rate_limit="1/minute", queue_size=1)
    engine.submit([send(0)])
    assert hooks.wait_for("delivered", 1)  # the minute's one call is spent
    earlier, later = upsert(1), upsert(2)
    engine.submit([earlier])
    assert wait_until(lambda: engine.status().pending == 1)
    read, reads = engine.store.read, []

    @contextlib.contextmanager
    def read_then_hand_more_over() -> Iterator[sqlite3.Connection]:
        with read() as db:
            yield db
        if threading.current_thread() is threading.main_thread():
            reads.append(1)
            if len(reads) == 1:  # the flush read its target: later work sheds the earlier
                engine.submit([later])
                assert entered.wait(5)

    engine.store.read = read_then_hand_more_over  # type: ignore[method-assign]
    try:
        assert not engine.flush(0.3)  # the earlier upsert's dropped hook still runs
    finally:
        release.set()
    engine.store.read = read  # type: ignore[method-assign]
    assert hooks.wait_for("dropped", 1)
    assert ids(hooks.of("dropped")) == [earlier.id]


def test_flush_says_whether_anything_is_left(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    assert engine.flush(0)  # nothing submitted
    emulator.faults.outage(60)
    engine.submit([upsert(1)])
    assert engine.flush(0.3) is False
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
    engine.submit([refused, accepted, suppressed])
    assert engine.flush(5)
    status = engine.status()
    assert (status.delivered, status.failed, status.dropped) == (1, 1, 0)
    assert status.pending == 0 and status.dead_letters == 1
    assert status.budget_left == {"100/minute": 98, "1000/hour": 998}  # no call for a skip
    assert ids(hooks.of("skipped")) == [suppressed.id]
    assert emulator.requests_to(TRIGGER) == []
    (failed,) = hooks.of("failed")
    assert failed.id == refused.id and failed.attempts == 1
    assert hooks.detail(failed).status == 400
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
    engine.submit([upsert(n) for n in range(3)] + [send(1)])
    assert engine.flush(5)
    engine.submit([upsert(3)])  # the same worker is still there
    assert engine.flush(5)
    assert len(hooks.of("delivered")) == 5
    assert len(emulator.requests_to(UPSERT)) == 4
    assert "the delivered hook raised" in caplog.text
    assert "the skip_reason hook raised" in caplog.text


def test_threads_start_on_the_first_submit_and_stop_at_close(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    before = set(threading.enumerate())
    engine = make_engine(emulator, workers=2)
    assert set(threading.enumerate()) == before
    engine.submit([upsert(1)])
    started = set(threading.enumerate()) - before
    assert sorted(t.name for t in started) == [
        "flask-meisa-delivery-1",
        "flask-meisa-delivery-2",
        "flask-meisa-writer",
    ]
    assert all(t.daemon for t in started)
    assert engine.close() == 0
    assert not any(t.is_alive() for t in started)
    assert engine.close() == 0  # closed already: nothing more lost


def test_close_keeps_its_deadline_however_many_threads_are_in_a_call(
    tmp_path: Path, hooks: RecordingHooks
) -> None:
    # Meisa takes the calls and never answers; the client would wait 30 s for each.
    before = set(threading.enumerate())
    with hostile(lambda exchange: exchange.stall()) as server:
        engine = Delivery(
            store=Store(tmp_path / "store.sqlite3"),
            client_factory=lambda: MeisaClient("meisa_live_x", server.url, timeout=(0.5, 30)),
            hooks=hooks,
            retry=FAST,
            settings=replace(SETTINGS, timeout=30.0, workers=4, rate_limit=None),
        )
        engine.submit([upsert(n) for n in range(4)])
        assert wait_until(lambda: engine.status().in_flight == 4)
        began = time.monotonic()
        assert engine.close(timeout=0.5) == 0  # the file keeps them for the next start
        took = time.monotonic() - began
    assert took < 3.5, took  # the deadline, and at most 2 s for the threads to stop
    # Those it left in their calls end once the server is gone (logging the call's end),
    # not during a later test. (The process's call watchdog, started by a first call, stays.)
    new = set(threading.enumerate()) - before
    left = [t for t in new if t.name.startswith("flask-meisa-") and "watchdog" not in t.name]
    assert wait_until(lambda: not any(thread.is_alive() for thread in left))


def test_a_waiting_flush_looks_now_and_then_not_in_a_loop(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    emulator.faults.outage(60)
    engine = make_engine(emulator, retry=SLOW)  # the upsert waits a minute to retry
    engine.submit([upsert(1)])
    assert emulator.wait_for_requests(1)
    read, looks = engine.store.read, []

    def counted() -> Any:
        if threading.current_thread() is threading.main_thread():
            looks.append(1)
        return read()

    engine.store.read = counted  # type: ignore[method-assign]
    assert engine.flush(0.5) is False
    engine.store.read = read  # type: ignore[method-assign]
    # Once a poll (0.1 s) and once a writer's pass (as often): some ten looks, not a loop's
    # thousands; twice that leaves room for a busy machine's late wake-ups.
    assert len(looks) <= 20


def test_submit_after_close(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    engine.close()
    # Taken by none, reported by none: the extension hands them to the app's next engine.
    with pytest.raises(EngineClosed, match="closed"):
        engine.submit([upsert(1)])
    with pytest.raises(DeliveryError, match="closed"):
        engine.submit([send(1)])
    assert hooks.of("dropped") == []
    assert emulator.requests == []


def test_two_big_upserts_of_one_contact_are_not_merged_past_the_body_limit(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks, tmp_path: Any
) -> None:
    # About 300 KB each: merged they would be refused (512 KiB); they go one after another.
    engine = make_engine(emulator, store=Store(tmp_path / "store.sqlite3"))
    engine.start()
    emulator.faults.outage(60)  # nothing leaves until both are stored
    big = "x" * 300_000
    first, second = upsert(1, a=big), upsert(1, b=big)
    engine.submit([first, second])
    assert not engine.flush(0.5)
    emulator.faults.clear()
    assert engine.flush(10)
    answered = [r for r in emulator.requests_to(UPSERT) if r.status in (200, 201)]
    assert len(answered) == 2
    fields = emulator.contact(external_id="t-1")["custom_fields"]  # type: ignore[index]
    assert fields["a"] == big and fields["b"] == big
    assert hooks.of("failed") == []


def test_a_flush_from_a_hook_on_the_writers_thread_answers_at_once(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator, rate_limit="1/minute", queue_size=1)
    engine.submit([send(0)])
    assert hooks.wait_for("delivered", 1)  # the minute's one call is spent
    answers: list[bool] = []
    answered = threading.Event()
    record = hooks.dropped

    def dropped(operation: Operation, reason: str) -> None:
        record(operation, reason)
        answers.append(engine.flush(60))  # on the writer's thread: it must not wait on itself
        answered.set()

    hooks.dropped = dropped  # type: ignore[method-assign]
    engine.submit([track(1, "first"), track(3, "second")])  # one more than the queue holds
    assert answered.wait(20)
    assert answers == [False]  # the other event still waits for the budget


def test_a_hook_may_close_the_engine_whose_delivery_thread_runs_it(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    answers: list[object] = []
    answered = threading.Event()
    record = hooks.delivered

    def delivered(operation: Operation, result: Any) -> None:
        record(operation, result)
        try:
            answers.append(engine.close(0))  # it must not wait for its own thread to end
        except Exception as error:  # the answer is what the test looks at
            answers.append(error)
        answered.set()

    hooks.delivered = delivered  # type: ignore[method-assign]
    engine.submit([upsert(1)])
    assert answered.wait(10)
    assert answers == [0]


def test_what_the_writer_fails_to_store_is_reported_dropped_and_the_rest_of_its_group_stored(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(emulator, store=Store(tmp_path / "store.sqlite3"))
    # Made without Operation.checked, so its body is first encoded by the writer: too big.
    good, unstorable = upsert(2), upsert(1, a="x" * 600_000)
    engine.submit([good, unstorable])  # one group
    assert hooks.wait_for("dropped", 1)
    assert hooks.detail(unstorable) == "writer_error"
    assert "delivery writer error; carrying on" in caplog.text
    assert engine.flush(10)
    assert [op.id for op in hooks.of("delivered")] == [good.id]
    assert engine.status().dropped == 1


def test_a_dropped_hook_of_what_the_writer_failed_to_store_may_close_the_engine(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks, tmp_path: Any
) -> None:
    # Run on the writer's thread, the hook's close() would wait its whole allowance for the
    # one thread that stores: the very thread running it.
    engine = make_engine(emulator, store=Store(tmp_path / "store.sqlite3"), flush_timeout=30.0)
    answers: list[int] = []
    record = hooks.dropped

    def dropped(operation: Operation, reason: str) -> None:
        record(operation, reason)
        answers.append(engine.close())

    hooks.dropped = dropped  # type: ignore[method-assign]
    began = time.monotonic()
    engine.submit([upsert(2), upsert(1, a="x" * 600_000)])  # one group: the second too big
    assert hooks.wait_for("dropped", 1, timeout=60)
    assert wait_until(lambda: bool(answers), timeout=60)
    assert time.monotonic() - began < 10  # not the close's allowance: 30 s
    assert answers == [0]
    assert [hooks.detail(op) for op in hooks.of("dropped")] == ["writer_error"]


def test_what_the_writer_stores_again_one_by_one_waits_in_memory_while_the_store_fails(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks, tmp_path: Any
) -> None:
    class FailingOnce(Store):
        """A store whose second write transaction fails (the group's first one by one)."""

        writes = 0

        def write(self) -> Any:
            self.writes += 1
            if self.writes == 2:
                raise sqlite3.OperationalError("disk I/O error")
            return super().write()

    engine = make_engine(emulator, store=FailingOnce(tmp_path / "store.sqlite3"))
    good, unstorable = upsert(2), upsert(1, a="x" * 600_000)
    engine.submit([good, unstorable])  # one group: its bug, then the store's failure
    assert hooks.wait_for("dropped", 1)
    assert engine.flush(10)
    assert [op.id for op in hooks.of("delivered")] == [good.id]
    assert [op.id for op in hooks.of("dropped")] == [unstorable.id]


def test_an_upsert_meisa_has_makes_no_call_until_an_event_answered_404_says_it_lost_it(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    engine = make_engine(emulator)
    engine.submit([upsert(1)])
    assert engine.flush(5)
    again = upsert(1)
    engine.submit([again])
    assert engine.flush(5)
    assert statuses(emulator) == [201]
    assert ids(hooks.of("delivered"))[-1] == again.id
    emulator.reset()  # the contact was deleted in Meisa's dashboard
    engine.submit([track(1)])  # no contact to recover it with: it fails
    assert engine.flush(5)
    engine.submit([upsert(1)])
    assert engine.flush(5)
    assert statuses(emulator) == [404, 201]
    assert emulator.contact(external_id="t-1") is not None


def test_a_retry_is_logged_once_and_nothing_as_an_error(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flask_meisa.engine")
    engine = make_engine(emulator)
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    operation = upsert(1)
    engine.submit([operation])
    assert engine.flush(5)
    assert statuses(emulator) == [503, 201]
    refused, accepted = emulator.requests
    assert accepted.time - refused.time < 0.8  # when due (at most 0.2 s), not at the next look
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 1
    assert operation.describe() in retries[0] and "HTTP 503" in retries[0]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_meisa_is_probed_after_an_outage_that_follows_an_upsert_needing_no_call(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    # An upsert Meisa already had is never left counted as a call in flight: were it, the
    # probe that ends an outage would wait for its answer forever.
    engine = make_engine(emulator)
    for _ in range(2):
        engine.submit([upsert(1)])
        assert engine.flush(5)
    emulator.faults.fail_next(3, status=503, path=UPSERT)  # Meisa looks down
    engine.submit([upsert(2)])
    assert engine.flush(5)
    assert statuses(emulator) == [201, 503, 503, 503, 201]


@pytest.mark.parametrize(
    ("waiting_for", "more"),
    [("nothing", 0), ("a retry", 0), ("a 429 pause", 0), ("the budget", 0), ("the budget", 5)],
)
def test_a_delivery_thread_waiting_looks_at_the_store_now_and_then_not_in_a_loop(
    emulator: Emulator,
    make_engine: MakeEngine,
    hooks: RecordingHooks,
    waiting_for: str,
    more: int,
) -> None:
    engine = make_engine(emulator, retry=SLOW, rate_limit="1/minute")
    if waiting_for == "a retry":
        emulator.faults.fail_next(1, status=503, path=UPSERT)
    elif waiting_for == "a 429 pause":
        emulator.faults.force_429(1, retry_after=60)
    engine.submit([upsert(1)] + ([upsert(2)] if waiting_for == "the budget" else []))
    assert emulator.wait_for_requests(1)
    assert wait_until(lambda: engine.status().in_flight == 0)
    write, looks = engine.store.write, []

    def counted() -> Any:
        looks.append(1)
        return write()

    engine.store.write = counted  # type: ignore[method-assign]
    # The span over which the looks are counted. More work of the lane held back by the
    # budget (first upserts, as the one waiting) could go no sooner: it wakes nobody.
    for n in range(5):
        if n < more:
            engine.submit([upsert(10 + n)])
        time.sleep(0.1)
    engine.store.write = write  # type: ignore[method-assign]
    assert len(looks) <= 2 + more  # about once a second (at most), and what is stored


def test_an_upsert_needing_no_call_does_not_put_off_its_contacts_resync(
    emulator: Emulator, make_engine: MakeEngine, hooks: RecordingHooks
) -> None:
    # Meisa is told a contact's state again once resync_after passed since it last accepted
    # it, however often the app set that same state in between.
    engine = make_engine(emulator, resync_after=150.0)

    def age_what_meisa_accepted(seconds: float) -> None:
        with engine.store.write() as db:
            db.execute("UPDATE meisa_known SET accepted_at = accepted_at - ?", (seconds,))

    engine.submit([upsert(1)])
    assert engine.flush(5)
    age_what_meisa_accepted(100.0)
    engine.submit([upsert(1)])  # accepted 100 s ago: no call
    assert engine.flush(5)
    age_what_meisa_accepted(100.0)
    engine.submit([upsert(1)])  # 200 s ago: told again
    assert engine.flush(5)
    assert statuses(emulator) == [201, 200]
    assert len(hooks.of("delivered")) == 3


def test_work_for_a_host_that_does_not_resolve_is_retried_and_kept(
    hooks: RecordingHooks, tmp_path: Path, caplog: pytest.LogCaptureFixture, unresolvable: str
) -> None:
    key = "meisa_live_" + "n0Dns" * 6
    path = tmp_path / "outbox.sqlite3"
    engine = build_engine(hooks, f"https://{unresolvable}", key, store=Store(path), retry=FAST)
    try:
        with caplog.at_level(logging.INFO, logger="flask_meisa"):
            engine.submit([upsert(1)])
            unresolved = "APIConnectionError (host meisa.invalid not resolved)"
            assert wait_until(lambda: caplog.text.count(unresolved) >= 3, timeout=10)
    finally:
        engine.close(timeout=0)
    assert (hooks.of("failed"), hooks.of("dropped")) == ([], [])
    # Kept for the next start to deliver: pending, no dead letter.
    assert query(path, "SELECT kind, state != 'dead' FROM meisa_ops") == [("upsert", 1)]


def test_a_name_that_resolves_slowly_delays_delivery_and_loses_nothing(
    emulator: Emulator,
    hooks: RecordingHooks,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A resolver that does not answer until ``answered``: each attempt gives up on it at
    # the connect timeout (0.5 s) and is retried; once the name resolves, it is delivered.
    resolve, answered = socket.getaddrinfo, threading.Event()

    def stuck(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            answered.wait(10.0)
        return resolve(host, *args, **kwargs)

    url = emulator.url.replace("127.0.0.1", "localhost")
    engine = build_engine(hooks, url, emulator.live_key, retry=FAST)
    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    try:
        with caplog.at_level(logging.INFO, logger="flask_meisa"):
            engine.submit([upsert(1)])
            assert wait_until(lambda: caplog.text.count("no connection within") >= 2, timeout=10)
        assert emulator.requests == []
        answered.set()
        assert engine.flush(5)
    finally:
        answered.set()
        engine.close(timeout=0)
    assert len(hooks.of("delivered")) == 1
    assert (hooks.of("failed"), hooks.of("dropped")) == ([], [])
    assert len(emulator.requests_to(UPSERT)) == 1
