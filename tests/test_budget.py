"""The key's rate budget on its own: parsing, and sliding windows in the store counted from
each call's answer (explicit times), shared by every store on one file."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_meisa._engine.base import decide
from flask_meisa._engine.budget import Budget
from flask_meisa._engine.store import Store
from flask_meisa._values import RateWindow
from flask_meisa._values import parse_rate_limit
from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.emulator import RateLimiter as ServerLimiter
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import RateLimitError
from flask_meisa.errors import ServerError
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import LANE_TRANSACTIONAL
from flask_meisa.retry import RetryPolicy

#: Longer than any call of these tests: no lease runs out unless a test wants it to.
LEASE = 1000.0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "60/minute;1000/hour",
            [RateWindow(60, 60.0, "60/minute"), RateWindow(1000, 3600.0, "1000/hour")],
        ),
        ("10/second", [RateWindow(10, 1.0, "10/second")]),
        ("10 per second", [RateWindow(10, 1.0, "10/second")]),
        ("10/seconds", [RateWindow(10, 1.0, "10/second")]),
        ("5 / 10 seconds", [RateWindow(5, 10.0, "5/10 seconds")]),
        ("2/days, 3/hrs", [RateWindow(2, 86400.0, "2/day"), RateWindow(3, 3600.0, "3/hour")]),
        (
            "1/s;4/min;7/h;9/d",
            [
                RateWindow(1, 1.0, "1/second"),
                RateWindow(4, 60.0, "4/minute"),
                RateWindow(7, 3600.0, "7/hour"),
                RateWindow(9, 86400.0, "9/day"),
            ],
        ),
        (" 60/Minute ; ", [RateWindow(60, 60.0, "60/minute")]),
    ],
)
def test_parse(spec: str, expected: list[RateWindow]) -> None:
    assert list(parse_rate_limit(spec)) == expected


@pytest.mark.parametrize(
    "spec",
    [
        *("", " ; ", "sixty/minute", "0/minute", "10", "10/ms", "10/fortnight", "10/0 seconds"),
        # Past what delivery can count or wait: a limit no float holds (every delivery
        # pass raised OverflowError, nothing was delivered), an endless period.
        *(f"1{'0' * 400}/second", f"1/1{'0' * 400} seconds", "1/1000000 days"),
    ],
)
def test_parse_refuses(spec: str) -> None:
    with pytest.raises(ConfigurationError, match="rate limit"):
        parse_rate_limit(spec)


def test_a_refusal_names_the_malformed_part_counting_from_one() -> None:
    with pytest.raises(ConfigurationError, match=r"\(part 2\)"):
        parse_rate_limit("60/minute; lots/hour")


def test_a_budget_that_is_no_string_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        parse_rate_limit(60)  # type: ignore[arg-type]


@pytest.fixture
def store() -> Iterator[Store]:
    """A fresh memory store."""
    made = Store(None)
    yield made
    made.close()


class Calls:
    """Calls against ``budget`` at explicit times, each in its own write transaction."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def take(self, now: float, lane: int = LANE_AUTOMATION, share: float = 1.0) -> str | None:
        """A slot's token, or ``None`` when the call must wait."""
        return self.wait_and_token(now, lane, share)[0]

    def wait(self, now: float, lane: int = LANE_AUTOMATION, share: float = 1.0) -> float | None:
        """How long a call must wait (``0.0``: it was let through and holds a slot)."""
        return self.wait_and_token(now, lane, share)[1]

    def wait_and_token(
        self, now: float, lane: int = LANE_AUTOMATION, share: float = 1.0
    ) -> tuple[str | None, float | None]:
        with self.budget.store.write() as db:
            return self.budget.take(db, now, lane, share)

    def settle(self, token: str | None, now: float, *, made: bool = True) -> None:
        assert token is not None
        with self.budget.store.write() as db:
            self.budget.settle(db, token, made=made, now=now)

    def call(self, start: float, answer: float, lane: int = LANE_AUTOMATION) -> None:
        """One call let through at ``start`` and answered at ``answer``."""
        token = self.take(start, lane)
        assert token is not None, f"no slot at {start}"
        self.settle(token, answer)


def budget(store: Store, spec: str | None) -> Calls:
    return Calls(Budget(store, spec, lease=LEASE))


def test_none_means_no_budget(store: Store) -> None:
    calls = budget(store, None)
    for _ in range(1000):
        assert calls.wait_and_token(0.0) == ("", 0.0)
    calls.settle("", 0.0)
    assert calls.budget.remaining() == {}
    with store.read() as db:
        assert db.execute("SELECT count(*) FROM meisa_calls").fetchone()[0] == 0


def test_a_slot_is_dated_by_the_answer(store: Store) -> None:
    calls = budget(store, "2/10 seconds")
    calls.call(0.0, 1.0)  # answered at 1: counted until 11, not 10
    calls.call(1.0, 2.0)
    assert calls.wait(5.0) == pytest.approx(6.0)
    assert calls.wait(10.5) == pytest.approx(0.5)
    assert calls.wait(11.0) == 0.0


def test_a_call_in_flight_holds_its_slot_until_answered(store: Store) -> None:
    calls = budget(store, "1/second")
    token = calls.take(0.0)
    with store.read() as db:
        held = db.execute("SELECT token, lease_until, answered_at FROM meisa_calls").fetchall()
    assert held == [(token, LEASE, None)]
    assert calls.wait_and_token(100.0) == (None, None)  # only its answer can free it
    calls.settle(token, 100.0)
    assert calls.wait(100.5) == pytest.approx(0.5)
    assert calls.wait(101.0) == 0.0


def test_a_call_that_got_no_answer_in_time_is_dated_by_the_end_of_its_lease(
    store: Store,
) -> None:
    calls = budget(store, "1/second")
    token = calls.take(0.0)
    assert token is not None
    with store.write() as db:  # it timed out: Meisa may count it until its lease ends
        calls.budget.settle(db, token, made=True, now=2.0, timed_out=True)
    assert calls.wait(2.0) == pytest.approx(LEASE + 1.0 - 2.0)
    assert calls.wait(LEASE + 1.0) == 0.0


def test_a_call_never_made_gives_its_slot_back(store: Store) -> None:
    calls = budget(store, "1/minute")
    now = time.time()
    token = calls.take(now)
    assert calls.budget.remaining() == {"1/minute": 0}
    calls.settle(token, now, made=False)
    assert calls.budget.remaining() == {"1/minute": 1}
    assert calls.take(now) is not None


def test_every_window_applies(store: Store) -> None:
    calls = budget(store, "3/10 seconds;4/minute")
    start = time.time() - 15.0
    for offset in (0.0, 0.1, 0.2):
        calls.call(start + offset, start + offset)
    assert calls.wait(start + 0.3) == pytest.approx(9.7)  # the ten seconds are full
    calls.call(start + 10.0, start + 10.0)
    assert calls.wait(start + 10.5) == pytest.approx(49.5)  # now the minute is
    # Now (start + 15): one answer in the last ten seconds, four in the minute.
    assert calls.budget.remaining() == {"3/10 seconds": 2, "4/minute": 0}


def test_the_transactional_lane_may_use_the_reserve(store: Store) -> None:
    calls = budget(store, "20/minute;1000/hour")  # 1 of 20 and 50 of 1000 held back
    start = time.time() - 1.0
    for _ in range(19):
        calls.call(start, start, LANE_AUTOMATION)
    for lane in (LANE_AUTOMATION, LANE_ROUTINE, LANE_BACKFILL):
        assert calls.wait(start, lane) == pytest.approx(60.0)
    calls.call(start, start, LANE_TRANSACTIONAL)
    assert calls.wait(start, LANE_TRANSACTIONAL) == pytest.approx(60.0)
    assert calls.budget.remaining() == {"20/minute": 0, "1000/hour": 980}


def test_the_hour_reserve_holds_when_the_minute_has_room(store: Store) -> None:
    calls = budget(store, "1000/minute;100/hour")  # 95 of the hour for live work
    for _ in range(95):
        calls.call(0.0, 0.0)
    assert calls.wait(120.0) == pytest.approx(3480.0)
    assert calls.wait(120.0, LANE_TRANSACTIONAL) == 0.0


def test_a_backfill_uses_at_most_its_share_and_never_blocks_live_work(store: Store) -> None:
    calls = budget(store, "20/minute")  # 19 for all but sends; 9 of them for the backfill
    spacing = 60.0 / 9  # a backfill's calls are spread out at its share's pace
    for n in range(9):
        assert calls.take(n * spacing, LANE_BACKFILL, share=0.5) is not None
    assert calls.wait(9 * spacing, LANE_BACKFILL, share=0.5) is None  # 9 of 19 in flight
    for _ in range(10):
        assert calls.take(9 * spacing, LANE_AUTOMATION) is not None
    assert calls.wait(9 * spacing, LANE_AUTOMATION) is None
    assert calls.take(9 * spacing, LANE_TRANSACTIONAL) is not None


def test_routine_calls_are_paced_by_the_window_that_allows_the_fewest_a_second(
    store: Store,
) -> None:
    calls = budget(store, "60/minute;1000/hour")  # 57 a minute, but 950 an hour
    assert calls.take(0.0, LANE_ROUTINE) is not None
    assert calls.wait(0.0, LANE_ROUTINE) == pytest.approx(3600 / 950)


def test_routine_and_backfill_calls_are_spread_out_and_urgent_ones_are_not(
    store: Store,
) -> None:
    # 57 of 60 a minute for all but sends: a routine call at most every 60/57 s, so that a
    # burst of routine work never spends the window ahead of a plan change.
    calls = budget(store, "60/minute")
    assert calls.take(0.0, LANE_ROUTINE) is not None
    assert calls.wait(0.0, LANE_ROUTINE) == pytest.approx(60 / 57)
    assert calls.wait(0.0, LANE_BACKFILL) == pytest.approx(60 / 57)
    assert calls.take(0.0, LANE_AUTOMATION) is not None
    assert calls.take(0.0, LANE_TRANSACTIONAL) is not None
    assert calls.wait(0.5, LANE_ROUTINE) == pytest.approx(60 / 57 - 0.5)
    assert calls.take(60 / 57, LANE_ROUTINE) is not None


def test_a_backfill_share_never_rounds_down_to_nothing(store: Store) -> None:
    calls = budget(store, "20/minute")
    assert calls.take(0.0, LANE_BACKFILL, share=0.001) is not None
    assert calls.wait(0.0, LANE_BACKFILL, share=0.001) is None


def test_a_lease_that_ran_out_counts_as_answered_at_its_end(store: Store) -> None:
    # A process died mid-call: its slot is neither held forever nor given back early.
    calls = Calls(Budget(store, "1/minute", lease=10.0))
    assert calls.take(0.0) is not None
    assert calls.wait_and_token(9.0) == (None, None)
    assert calls.wait(10.0) == pytest.approx(60.0)  # answered at 10, the lease's end
    assert calls.wait(69.0) == pytest.approx(1.0)
    assert calls.take(70.0) is not None


def test_old_answers_leave_the_table(store: Store) -> None:
    calls = budget(store, "5/second;10/minute")
    for n in range(5):
        calls.call(float(n), float(n))
    assert calls.take(100.0) is not None  # the minute is the horizon: all but this go
    with store.read() as db:
        assert db.execute("SELECT count(*) FROM meisa_calls").fetchone()[0] == 1


def test_two_stores_on_one_file_share_one_budget(tmp_path: Path) -> None:
    # Two processes' views of the host: what one spends, the other cannot.
    path = tmp_path / "store.sqlite3"
    first, second = Store(path), Store(path)
    try:
        mine, theirs = budget(first, "2/minute"), budget(second, "2/minute")
        now = time.time()
        token = mine.take(now)
        theirs.call(now, now)
        assert mine.wait(now) == pytest.approx(60.0)  # one answered, one in flight
        assert theirs.budget.remaining() == {"2/minute": 0}
        mine.settle(token, now + 1.0)
        assert theirs.wait(now + 2.0) == pytest.approx(58.0)
        third = Store(path)
        assert Budget(third, "2/minute", lease=LEASE).remaining() == {"2/minute": 0}
        third.close()
    finally:
        first.close()
        second.close()


def test_a_slot_for_a_call_outside_the_engine_is_waited_for_only_within_its_timeout(
    store: Store,
) -> None:
    limited = Budget(store, "1/minute", lease=LEASE)
    with limited.slot(1.0) as got:
        assert got
        assert limited.remaining() == {"1/minute": 0}
    # Over with its call: dated by its answer, not held in flight until its lease ends.
    assert Calls(limited).wait(time.time()) == pytest.approx(60.0, abs=1.0)
    began = time.monotonic()
    with limited.slot(5.0) as got:
        # The minute is spent: a slot free only past the timeout is not waited for (the
        # call would be left no time), the call goes at once without one.
        assert not got
    assert time.monotonic() - began < 1.0
    # Made over the budget, it counts all the same: Meisa counts it if it takes it.
    assert limited.remaining() == {"1/minute": 0}
    assert Calls(limited).wait(time.time()) == pytest.approx(60.0, abs=1.0)
    with pytest.raises(RateLimitError), limited.slot(5.0) as got:
        assert not got
        raise RateLimitError("POST /emails/trigger/", 429, "throttled", code="rate_limited")
    with store.read() as db:
        (count,) = db.execute("SELECT count(*) FROM meisa_calls").fetchone()
    assert count == 2  # the one Meisa refused over the budget, which it did not count, is not
    with store.write() as db:  # that 429 paused the host: not what follows is about
        Store.set_meta(db, "pause_until", None)
    quick = Budget(store, "2/second", lease=LEASE)
    with quick.slot(1.0) as got:
        assert got  # one of the minute's and this one: the second's two
    with quick.slot(5.0) as got:
        assert got  # free within the timeout: waited for
    assert time.monotonic() - began >= 0.5


def test_a_call_made_over_the_budget_that_meisa_takes_keeps_the_next_slot_from_a_429(
    store: Store, emulator_factory: Callable[..., Emulator]
) -> None:
    emu = emulator_factory(rate_limit="1/2 seconds")
    client = MeisaClient(emu.live_key, emu.url, retry=RetryPolicy.never())
    limited = Budget(store, "1/2 seconds", lease=0.2)
    # The slot of a process killed before its call reached Meisa (a SIGKILL): the host counts
    # it until its lease ends and a period after; Meisa never saw it.
    Calls(limited).take(time.time() - 1.0)
    with limited.slot(0.01) as got:
        assert not got  # full for another second: not waited for, the call goes anyway
        client.ping()  # and Meisa takes it
    # The killed call's slot leaves the window a second before this call leaves Meisa's: the
    # next slot must wait for Meisa's window, or every process would be let through to a 429.
    with limited.slot(5.0) as got:
        assert got
        client.ping()
    assert [r.status for r in emu.requests] == [200, 200]


def test_calls_made_over_the_budget_that_meisa_refuses_give_their_slots_back(
    store: Store, emulator_factory: Callable[..., Emulator]
) -> None:
    emu = emulator_factory(rate_limit="1/minute")
    limited = Budget(store, "1/minute", lease=LEASE)
    base = MeisaClient(emu.live_key, emu.url, retry=RetryPolicy.never())
    client = base.with_options(slot=limited.slot)
    client.ping()  # the minute's one, in both windows
    for _ in range(3):  # over the budget: made anyway, and refused; the rest not made
        with pytest.raises(RateLimitError):  # while the host is paused for its Retry-After
            client.ping()
    assert [r.status for r in emu.requests] == [200, 429]
    # Meisa counted none of them: counted, each would keep every process's window shut a
    # period past Meisa's.
    with store.read() as db:
        (count,) = db.execute("SELECT count(*) FROM meisa_calls").fetchone()
    assert count == 1


def test_a_slot_whose_call_got_no_answer_in_time_is_held_until_its_lease_ends(
    store: Store,
) -> None:
    limited = Budget(store, "1/minute", lease=LEASE)
    with pytest.raises(APITimeoutError), limited.slot(1.0) as got:
        assert got
        raise APITimeoutError("POST /emails/trigger/", "no answer within 0.3 s")
    # Meisa may count it until its lease ends: the minute starts then.
    assert Calls(limited).wait(time.time()) == pytest.approx(LEASE + 60.0, abs=1.0)


def test_a_slot_waiting_on_a_call_in_flight_is_taken_soon_after_that_call_gives_it_back(
    store: Store,
) -> None:
    limited = Budget(store, "1/minute", lease=LEASE)
    in_flight = Calls(limited).take(time.time())
    # The call in flight is never made: its slot comes back a moment after the wait began.
    given_back = threading.Timer(0.2, lambda: Calls(limited).settle(in_flight, 0.0, made=False))
    began = time.monotonic()
    given_back.start()
    with limited.slot(5.0) as got:
        waited = time.monotonic() - began
    given_back.join()
    assert got
    assert 0.2 <= waited < 0.8  # not a second's poll later


def test_three_failures_in_a_row_pause_the_key_then_let_one_probe_through(
    store: Store,
) -> None:
    limited = Budget(store, None, lease=LEASE)
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0, deadline=None)

    def answered(error: Exception, now: float) -> None:
        decision = decide("upsert", error, attempts=1, elapsed=0.0, policy=policy)
        with store.write() as db:
            limited.note(db, decision, now, policy)

    def gate(now: float, calls: int) -> float:
        with store.write() as db:
            return limited.gate(db, now, calls)

    down = ServerError("POST /contacts/upsert/", 503, "down")
    for error in (down, down, BadRequestError("POST /contacts/upsert/", 400, "bad"), down, down):
        answered(error, 0.0)
    assert gate(0.0, calls=1) == 0.0  # two in a row since Meisa last answered
    answered(down, 0.0)
    assert gate(0.0, calls=0) == pytest.approx(4.0)  # the backoff's ceiling at the third
    assert gate(4.0, calls=1) == 1.0  # Meisa looks down: no call beside the one in flight
    assert gate(4.0, calls=0) == 0.0  # the probe
    # A longer pause asked for is never cut short by a shorter one noted after it.
    answered(RateLimitError("POST /contacts/upsert/", 429, "slow", retry_after=30.0), 4.0)
    for _ in range(3):
        answered(down, 5.0)
    assert gate(5.0, calls=0) == pytest.approx(29.0)


def _simulate(date_by_answer: bool) -> tuple[int, int]:
    """Three workers start calls whenever the budget allows; each reaches the server after
    a random delay and is answered later still. Returns (calls made, calls the server's
    own sliding window refused)."""
    rng = random.Random(7)
    spec = "5/second;40/minute"
    calls = budget(Store(None), spec)
    flying: list[tuple[str, float, float]] = []  # (token, started, answered)
    arrivals: list[float] = []
    now = 0.0
    while now < 300.0:
        for call in sorted(flying, key=lambda c: c[2]):
            if call[2] <= now:
                flying.remove(call)
                calls.settle(call[0], call[2] if date_by_answer else call[1])
        token, wait = (
            (None, None)
            if len(flying) >= 3
            else calls.wait_and_token(now, LANE_TRANSACTIONAL)  # the whole budget
        )
        if token is not None:
            arrival = now + rng.uniform(0.0, 0.3)
            arrivals.append(arrival)
            flying.append((token, now, arrival + rng.uniform(0.0, 0.3)))
            continue
        wakes = [call[2] for call in flying]
        if wait:
            wakes.append(now + wait)
        now = min(wakes)
    calls.budget.store.close()
    server = ServerLimiter(spec)
    refused = sum(server.acquire(t) is not None for t in sorted(arrivals))
    return len(arrivals), refused


def test_the_server_never_sees_the_window_overrun() -> None:
    made, refused = _simulate(date_by_answer=True)
    assert made >= 190  # the minute window is the binding one: 40 x 5
    assert refused == 0


def test_dating_slots_by_the_send_time_would_overrun() -> None:
    _, refused = _simulate(date_by_answer=False)
    assert refused > 0
