"""The host's wall clock stepping back (NTP at boot, an admin fixing the date) while work
waits in the store, against the emulator over loopback: the store keeps ``time.time()``
values (answers, leases, pauses, retries, first attempts), and none of them may hold
delivery back for as long as the clock stepped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flask_meisa._engine import dead
from flask_meisa._engine.budget import Budget
from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.engine_support import SLOW
from tests.engine_support import MakeEngine
from tests.engine_support import RecordingHooks
from tests.engine_support import query
from tests.engine_support import upsert
from tests.process_support import wait_until

UPSERT = "/contacts/upsert/"
TRIGGER = "/emails/trigger/"
HOUR = 3600.0


class SteppedClock:
    """``time.time`` of this process, plus an offset the test steps."""

    def __init__(self) -> None:
        self.real = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self.real() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    stepped = SteppedClock()
    monkeypatch.setattr(time, "time", stepped)
    return stepped


def test_a_429_pause_ends_on_time_when_the_clock_steps_back_during_it(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    emulator.faults.force_429(1, retry_after=2, path=UPSERT)
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, rate_limit="60/minute")
    engine.submit([upsert(1)])
    assert wait_until(lambda: engine.status().paused_for > 0)
    clock.step(-HOUR)
    assert engine.flush(10)
    assert len(hooks.of("delivered")) == 1
    assert engine.status().paused_for == 0.0


def test_a_retry_comes_due_on_time_when_the_clock_stepped_back_over_a_restart(
    emulator: Emulator, make_engine: MakeEngine, path: Path, clock: SteppedClock
) -> None:
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    slow = RetryPolicy(base_delay=2.0, max_delay=2.0, deadline=None, random=lambda: 0.999)
    first = make_engine(emulator, RecordingHooks(), retry=slow)
    first.submit([upsert(1)])
    waiting = "SELECT count(*) FROM meisa_ops WHERE attempts = 1 AND state = 'pending'"
    assert wait_until(lambda: query(path, waiting)[0][0] == 1)
    first.close(0)
    assert len(emulator.requests_to(UPSERT)) == 1
    clock.step(-HOUR)  # the host restarts, its clock stepped back an hour
    hooks = RecordingHooks()
    assert make_engine(emulator, hooks, retry=slow).flush(5)
    assert len(hooks.of("delivered")) == 1


def test_routine_syncs_are_paced_not_stalled_when_the_clock_steps_back(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, rate_limit="60/minute")
    engine.submit([upsert(1, login=1)])  # its first: automation lane
    assert engine.flush(5)
    clock.step(-HOUR)
    engine.submit([upsert(1, login=2)])  # routine: paced after the last call
    assert engine.flush(5)
    assert len(hooks.of("delivered")) == 2


def test_answers_leave_the_window_on_time_when_the_clock_steps_back(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, rate_limit="2/2 seconds")
    engine.submit([upsert(1), upsert(2)])
    assert engine.flush(5)
    clock.step(-HOUR)
    engine.submit([upsert(3)])
    assert engine.flush(5)
    assert len(hooks.of("delivered")) == 3


def send(n: int) -> Operation:
    payload = {"trigger_key": "receipt", "to_email": f"buyer{n}@example.com"}
    return Operation("send", {**payload, "idempotency_key": f"s{n}"})


def a_send_whose_answer_was_lost(
    emulator: Emulator, make_engine: MakeEngine
) -> tuple[Delivery, RecordingHooks, Operation]:
    """An engine retrying a send once a minute, the send's first attempt made (it reached
    Meisa; its answer was lost), and its retry waiting."""
    emulator.faults.drop_next(1, path=TRIGGER, after=True)
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, retry=SLOW)
    operation = send(1)
    engine.submit([operation])
    assert wait_until(lambda: engine.status().retry_waiting == 1)
    return engine, hooks, operation


def step_back_then_wait(
    emulator: Emulator,
    engine: Delivery,
    hooks: RecordingHooks,
    clock: SteppedClock,
    step: float,
    then: float,
) -> None:
    """Step the clock back by ``step`` (delivery goes on), let ``then`` seconds pass, and
    wait for what delivery does then."""
    clock.step(-step)
    engine.submit([upsert(9)])
    assert hooks.wait_for("delivered", 1)  # delivery went on after the step
    emulator.advance_clock(then)
    clock.step(then)
    assert engine.flush(5)


def test_a_send_is_not_retried_past_meisas_idempotency_hour_after_the_clock_stepped_back(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    # The first attempt reached Meisa, its answer was lost; then the clock stepped back an
    # hour, and an hour went by before the retry: Meisa has forgotten the idempotency key.
    engine, hooks, operation = a_send_whose_answer_was_lost(emulator, make_engine)
    step_back_then_wait(emulator, engine, hooks, clock, HOUR, then=HOUR + 100)
    assert len(emulator.sends()) == 1
    assert len(emulator.requests_to(TRIGGER)) == 1
    assert [op.id for op in hooks.of("failed")] == [operation.id]


def test_the_status_still_shows_how_long_work_waited_after_the_clock_stepped_back(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    emulator.faults.fail_next(1, status=503, path=UPSERT)
    engine = make_engine(emulator, RecordingHooks(), retry=SLOW)
    released = time.time() - 600  # waiting for ten minutes
    engine.submit([Operation("upsert", {"email": "a@example.com"}, created_at=released)])
    assert wait_until(lambda: engine.status().retry_waiting == 1)
    assert engine.status().oldest_wait["automation"] == pytest.approx(600, abs=5)
    clock.step(-HOUR)
    assert wait_until(lambda: engine.status().oldest_wait["automation"] > 595)


def test_a_dead_upsert_is_kept_from_a_retry_after_a_later_state_came_across_a_step_back(
    emulator: Emulator, make_engine: MakeEngine, path: Path, clock: SteppedClock
) -> None:
    emulator.faults.fail_next(1, status=400, path=UPSERT)
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.submit([upsert(1, plan="pro")])
    assert hooks.wait_for("failed", 1)  # a dead letter
    clock.step(-HOUR)
    engine.submit([upsert(9)])
    assert hooks.wait_for("delivered", 1)  # delivery went on after the step
    clock.step(10.0)  # ten seconds later, the user's next plan, accepted by Meisa
    engine.submit([upsert(1, plan="free")])
    assert engine.flush(5)
    with engine.store.read() as db:
        letters = dead.dead_letters(db)
        # Retrying it ('flask meisa dead-letters retry') would put the older plan back.
        assert dead.outdated(db, letters) == [letters[0].seq]


def test_the_slot_of_a_call_whose_process_died_frees_at_its_lease_end_after_a_step_back(
    emulator: Emulator, make_engine: MakeEngine, path: Path, clock: SteppedClock
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, rate_limit="2/2 seconds")
    engine.submit([upsert(0)])
    assert engine.flush(5)
    # A web worker took a slot for a synchronous send and was killed mid-call: its slot
    # counts until its lease ends. Then the clock stepped back an hour.
    worker = Store(path)
    with worker.write() as db:
        token, _ = Budget(worker, "2/2 seconds", lease=2.0).take(db, time.time(), LANE_AUTOMATION)
    worker.close()
    assert token
    clock.step(-HOUR)
    engine.submit([upsert(1)])
    assert engine.flush(10)
    assert len(hooks.of("delivered")) == 2


def test_a_send_first_attempted_long_before_a_step_back_is_not_retried_past_the_hour(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    # As above, but the step (20 minutes) is shorter than the send's age at the step (45):
    # Meisa forgets the key 60 minutes after the first attempt, 40 after the step.
    engine, hooks, operation = a_send_whose_answer_was_lost(emulator, make_engine)
    emulator.faults.fail_next(1, status=503, path=TRIGGER)  # the first retry
    emulator.advance_clock(45 * 60)  # 45 minutes go by; the retry answered 503
    clock.step(45 * 60)
    assert wait_until(lambda: len(emulator.requests_to(TRIGGER)) == 2)
    assert wait_until(lambda: engine.status().retry_waiting == 1)
    # 65 minutes after the first attempt:
    step_back_then_wait(emulator, engine, hooks, clock, 20 * 60, then=20 * 60)
    assert len(emulator.sends()) == 1
    assert len(emulator.requests_to(TRIGGER)) == 2
    assert [op.id for op in hooks.of("failed")] == [operation.id]


def test_a_full_window_frees_on_time_when_the_clock_steps_back_less_than_its_period(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    # Answered before the step by more than the step, a call looked that much younger
    # and left the window that much later: with the window full (a backfill keeps the
    # hour's full), nothing went for as long as the step.
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks, rate_limit="4/minute")
    engine.submit([upsert(1)])
    assert engine.flush(5)
    clock.step(40.0)
    engine.submit([upsert(2), upsert(3)])
    assert engine.flush(5)
    clock.step(-30.0)
    engine.submit([upsert(4)])  # the window's last call
    assert engine.flush(5)
    clock.step(20.0)  # a minute after the first call: it left Meisa's window
    engine.submit([upsert(5)])
    assert engine.flush(5)


def test_the_latency_in_the_status_covers_the_last_minutes_after_the_clock_stepped_back(
    emulator: Emulator, make_engine: MakeEngine, clock: SteppedClock
) -> None:
    engine = make_engine(emulator, RecordingHooks())
    released = time.time() - 600  # it waited ten minutes
    engine.submit([Operation("upsert", {"email": "a@example.com"}, created_at=released)])
    assert engine.flush(5)
    assert engine.status().latency["automation"] == pytest.approx((600, 600), abs=5)
    clock.step(-HOUR)
    engine.submit([upsert(9)])
    assert engine.flush(5)
    clock.step(16 * 60)  # both answers left the status's 15 minutes
    assert "automation" not in engine.status().latency
