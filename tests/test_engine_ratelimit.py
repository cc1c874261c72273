"""The engine's rate budget: parsing, and sliding windows counted from each answer."""

from __future__ import annotations

import random

import pytest

from flask_meisa._ratelimit import RateWindow
from flask_meisa._ratelimit import SlidingWindowLimiter
from flask_meisa._ratelimit import parse_rate_limit
from flask_meisa.emulator import RateLimiter as ServerLimiter
from flask_meisa.errors import ConfigurationError


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
    "spec", ["", " ; ", "sixty/minute", "0/minute", "10", "10/ms", "10/fortnight", "10/0 seconds"]
)
def test_parse_refuses(spec: str) -> None:
    with pytest.raises(ConfigurationError, match="rate limit"):
        parse_rate_limit(spec)


def test_none_means_no_budget() -> None:
    assert SlidingWindowLimiter.from_spec(None) is None


def test_slot_is_dated_by_the_answer() -> None:
    limiter = SlidingWindowLimiter(parse_rate_limit("2/10 seconds"))
    limiter.start(0.0)
    limiter.finish(1.0)  # answered at 1: counted until 11, not 10
    limiter.start(1.0)
    limiter.finish(2.0)
    assert limiter.delay(5.0) == pytest.approx(6.0)
    assert limiter.delay(10.5) == pytest.approx(0.5)
    assert limiter.delay(11.0) == 0.0
    assert limiter.remaining(11.0) == {"2/10 seconds": 1}


def test_a_call_in_flight_holds_its_slot_until_answered() -> None:
    limiter = SlidingWindowLimiter(parse_rate_limit("1/second"))
    limiter.start(0.0)
    assert limiter.delay(100.0) is None
    with pytest.raises(RuntimeError):
        limiter.start(100.0)
    limiter.finish(100.0)
    assert limiter.delay(100.5) == pytest.approx(0.5)


def test_a_call_never_made_gives_its_slot_back() -> None:
    limiter = SlidingWindowLimiter(parse_rate_limit("1/minute"))
    limiter.start(0.0)
    limiter.finish(0.5, made=False)
    assert limiter.delay(0.5) == 0.0
    assert limiter.remaining(0.5) == {"1/minute": 1}


def test_every_window_applies() -> None:
    limiter = SlidingWindowLimiter(parse_rate_limit("3/second;4/minute"))
    for t in (0.0, 0.1, 0.2):
        limiter.start(t)
        limiter.finish(t)
    assert limiter.delay(0.3) == pytest.approx(0.7)  # the second is full
    limiter.start(1.0)
    limiter.finish(1.0)
    assert limiter.delay(1.5) == pytest.approx(58.5)  # now the minute is
    assert limiter.remaining(1.5) == {"3/second": 2, "4/minute": 0}


def _simulate(date_by_answer: bool) -> tuple[int, int]:
    """Three workers start calls whenever the limiter allows; each reaches the server after
    a random delay and is answered later still. Returns (calls made, calls the server's
    own sliding window refused)."""
    rng = random.Random(7)
    spec = "5/second;40/minute"
    limiter = SlidingWindowLimiter(parse_rate_limit(spec))
    in_flight: list[tuple[float, float]] = []  # (started, answered)
    arrivals: list[float] = []
    now = 0.0
    while now < 300.0:
        for call in sorted(in_flight, key=lambda c: c[1]):
            if call[1] <= now:
                in_flight.remove(call)
                limiter.finish(call[1] if date_by_answer else call[0])
        delay = limiter.delay(now)
        if delay == 0.0 and len(in_flight) < 3:
            limiter.start(now)
            arrival = now + rng.uniform(0.0, 0.3)
            arrivals.append(arrival)
            in_flight.append((now, arrival + rng.uniform(0.0, 0.3)))
            continue
        wakes = [call[1] for call in in_flight]
        if delay:
            wakes.append(now + delay)
        now = min(wakes)
    server = ServerLimiter(spec)
    refused = sum(server.acquire(t) is not None for t in sorted(arrivals))
    return len(arrivals), refused


def test_the_server_never_sees_the_window_overrun() -> None:
    calls, refused = _simulate(date_by_answer=True)
    assert calls >= 190  # the minute window is the binding one: 40 x 5
    assert refused == 0


def test_dating_slots_by_the_send_time_would_overrun() -> None:
    _, refused = _simulate(date_by_answer=False)
    assert refused > 0


def test_priority_calls_may_use_the_reserve() -> None:
    limiter = SlidingWindowLimiter(parse_rate_limit("20/minute;1000/hour"), reserve=0.05)
    for _ in range(19):
        limiter.start(0.0)
        limiter.finish(0.0)
    assert limiter.delay(0.0) == pytest.approx(60.0)  # one of 20 is held back
    with pytest.raises(RuntimeError):
        limiter.start(0.0)
    assert limiter.delay(0.0, priority=True) == 0.0
    limiter.start(0.0, priority=True)
    limiter.finish(0.0)
    assert limiter.delay(0.0, priority=True) == pytest.approx(60.0)
    assert limiter.remaining(0.0) == {"20/minute": 0, "1000/hour": 980}


@pytest.mark.parametrize("reserve", [-0.1, 1.0])
def test_reserve_must_be_a_fraction(reserve: float) -> None:
    with pytest.raises(ConfigurationError, match="reserve"):
        SlidingWindowLimiter(parse_rate_limit("20/minute"), reserve=reserve)
