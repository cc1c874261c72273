"""RetryPolicy and parse_retry_after: pure functions, no network."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import pickle
import random
import threading

import pytest

from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import APIError
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import AuthenticationError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import ConflictError
from flask_meisa.errors import NotFoundError
from flask_meisa.errors import PermissionDeniedError
from flask_meisa.errors import RateLimitError
from flask_meisa.errors import ServerError
from flask_meisa.errors import UnprocessableEntityError
from flask_meisa.errors import ValidationError
from flask_meisa.retry import RetryPolicy
from flask_meisa.retry import parse_retry_after

EP = "POST /emails/trigger/"


def fixed(value: float) -> RetryPolicy:
    return RetryPolicy(random=lambda: value)


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (5, 0.5, 20.0)
    assert (policy.max_retry_after, policy.deadline) == (60.0, 60.0)


@pytest.mark.parametrize(
    "error",
    [
        APIConnectionError(EP, "connection refused"),
        APITimeoutError(EP, "no answer within 1 s"),
        ServerError(EP, 500, "boom"),
        ServerError(EP, 503, "unavailable"),
        RateLimitError(EP, 429, "slow down", retry_after=1.0),
    ],
)
def test_retryable(error: Exception) -> None:
    assert RetryPolicy().is_retryable(error)
    assert fixed(1.0).delay_for(1, error, 0.0) is not None


@pytest.mark.parametrize(
    "error",
    [
        BadRequestError(EP, 400, "invalid"),
        AuthenticationError(EP, 401, "bad key"),
        PermissionDeniedError(EP, 403, "scope"),
        NotFoundError(EP, 404, "missing"),
        ConflictError(EP, 409, "enrolled"),
        UnprocessableEntityError(EP, 422, "suppressed"),
        APIError(EP, 418, "teapot"),
        ValidationError("email", "must not be empty"),
        ConfigurationError("bad"),
        ValueError("plain"),
        RuntimeError("plain"),
    ],
)
def test_not_retryable(error: Exception) -> None:
    assert not RetryPolicy().is_retryable(error)
    assert RetryPolicy().delay_for(1, error, 0.0) is None


def test_connection_error_marked_final_is_not_retried() -> None:
    error = APIConnectionError(EP, "TLS certificate verification failed", retryable=False)
    assert RetryPolicy().delay_for(1, error, 0.0) is None
    copied = pickle.loads(pickle.dumps(error))
    assert (type(copied), copied.reason, copied.retryable) == (
        APIConnectionError,
        error.reason,
        False,
    )
    assert pickle.loads(pickle.dumps(APITimeoutError(EP, "slow"))).retryable is True


@pytest.mark.parametrize(
    "error",
    [
        ValidationError("custom_fields.plan", "must not be empty"),
        ConfigurationError("MEISA_TIMEOUT must be a number"),
        RateLimitError(EP, 429, "slow down", code="rate_limited", body={"a": [1]}, retry_after=2),
        PermissionDeniedError(EP, 403, "Forbidden.", scope="emails:trigger"),
        APITimeoutError(EP, "no answer within 1 s"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_every_error_survives_pickling(error: Exception) -> None:
    copied = pickle.loads(pickle.dumps(error))
    assert (type(copied), str(copied), vars(copied)) == (type(error), str(error), vars(error))


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=20, base_delay=0.5, max_delay=5.0, random=lambda: 1.0)
    delays = [policy.delay_for(n, ServerError(EP, 502, "x"), 0.0) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_full_jitter_scales_the_ceiling() -> None:
    assert fixed(0.25).delay_for(3, ServerError(EP, 500, "x"), 0.0) == 0.5  # 2.0 * 0.25
    assert fixed(0.0).delay_for(1, ServerError(EP, 500, "x"), 0.0) == 0.0


def test_jitter_stays_within_the_ceiling() -> None:
    rng = random.Random(7)
    policy = RetryPolicy(max_attempts=10, random=rng.random)
    for attempt in range(1, 10):
        ceiling = min(20.0, 0.5 * 2 ** (attempt - 1))
        samples = [policy.backoff(attempt) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # spread over the range, not stuck low


def test_huge_attempt_number_does_not_overflow() -> None:
    assert RetryPolicy(random=lambda: 1.0).backoff(100_000) == 20.0


def test_an_attempt_number_below_one_backs_off_like_the_first() -> None:
    policy = RetryPolicy(base_delay=0.5, random=lambda: 1.0)
    assert policy.backoff(0) == policy.backoff(-3) == policy.backoff(1) == 0.5


def test_attempts_exhausted() -> None:
    policy = RetryPolicy(max_attempts=3, random=lambda: 1.0)
    error = ServerError(EP, 503, "x")
    assert policy.delay_for(2, error, 0.0) == 1.0
    assert policy.delay_for(3, error, 0.0) is None


def test_never_makes_one_attempt() -> None:
    policy = RetryPolicy.never()
    assert policy.max_attempts == 1
    assert policy.delay_for(1, ServerError(EP, 503, "x"), 0.0) is None


def test_deadline() -> None:
    policy = RetryPolicy(deadline=10.0, random=lambda: 1.0)
    error = APIConnectionError(EP, "reset")
    assert policy.delay_for(2, error, 9.0) == 1.0  # lands exactly on the deadline
    assert policy.delay_for(2, error, 9.01) is None
    assert RetryPolicy(deadline=None, random=lambda: 1.0).delay_for(2, error, 1e9) == 1.0


def test_retry_after_is_a_floor() -> None:
    assert fixed(0.0).delay_for(1, RateLimitError(EP, 429, "x", retry_after=3.0), 0.0) == 3.0
    # A longer backoff wins over a short Retry-After.
    slow = RateLimitError(EP, 429, "x", retry_after=1.0)
    assert fixed(1.0).delay_for(4, slow, 0.0) == 4.0


def test_retry_after_is_capped() -> None:
    error = RateLimitError(EP, 429, "x", retry_after=3600.0)
    assert fixed(0.0).delay_for(1, error, 0.0) == 60.0
    assert RetryPolicy(max_retry_after=5.0, random=lambda: 0.0).delay_for(1, error, 0.0) == 5.0


def test_retry_after_past_the_deadline_gives_up() -> None:
    error = RateLimitError(EP, 429, "x", retry_after=30.0)
    assert RetryPolicy(deadline=20.0, random=lambda: 0.0).delay_for(1, error, 0.0) is None


def test_a_retry_after_of_zero_or_less_sets_no_floor() -> None:
    for retry_after in (0.0, -5.0):
        error = RateLimitError(EP, 429, "x", retry_after=retry_after)
        assert fixed(0.0).delay_for(1, error, 0.0) == 0.0


def test_retry_after_on_a_503_is_honoured() -> None:
    assert fixed(0.0).delay_for(1, ServerError(EP, 503, "x", retry_after=2.0), 0.0) == 2.0


def test_429_without_retry_after_backs_off() -> None:
    assert fixed(1.0).delay_for(2, RateLimitError(EP, 429, "x"), 0.0) == 1.0


def test_random_left_out_of_eq_and_repr() -> None:
    policy = RetryPolicy(random=lambda: 0.3)
    assert policy == RetryPolicy()
    assert "random" not in repr(policy)
    assert "max_attempts=5" in repr(policy)


def test_a_deadline_under_one_second_is_valid() -> None:
    policy = RetryPolicy(deadline=0.5, random=lambda: 1.0)
    assert policy.delay_for(1, ServerError(EP, 503, "x"), 0.0) == 0.5


def test_zero_delays_are_valid_and_retry_at_once() -> None:
    policy = RetryPolicy(base_delay=0.0, max_delay=0.0, max_retry_after=0.0)
    assert policy.delay_for(1, RateLimitError(EP, 429, "x", retry_after=5.0), 0.0) == 0.0


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_attempts = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"max_attempts": True},
        {"base_delay": -1.0},
        {"max_delay": float("nan")},
        {"max_retry_after": float("inf")},
        {"max_retry_after": 1e20},  # no sleep is that long: the call that waited failed
        {"max_delay": threading.TIMEOUT_MAX * 2},
        {"deadline": 0.0},
        {"deadline": -5.0},
        {"base_delay": True},
        {"max_retry_after": "60"},
        {"deadline": True},
        {"deadline": "60"},
    ],
)
def test_invalid_policy(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


NOW = dt.datetime(2024, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("1.5", 2.0),  # whole seconds, as HTTP has them: a fraction rounds up
        ("0.001", 1.0),
        ("5, 5", 5.0),  # repeated: joined by requests
        ("0", None),  # no wait: the backoff decides
        ("-3", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("1e3", None),
        ("9" * 400, math.ceil(threading.TIMEOUT_MAX)),  # no infinity: the longest wait
        ("-" + "9" * 400, None),
        ("Mon, 01 Jan 2024 12:00:30 GMT", 30.0),
        ("Mon, 01 Jan 2024 11:00:00 GMT", None),
        ("Mon, 99 Foo 2024 12:00:30 GMT", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


def test_parse_retry_after_compares_a_date_with_the_answers_date() -> None:
    # The server's clock is an hour behind this host's: its date is still 30 s away.
    date, retry = "Mon, 01 Jan 2024 11:00:00 GMT", "Mon, 01 Jan 2024 11:00:30 GMT"
    assert parse_retry_after(retry, now=date) == 30.0
    assert parse_retry_after(retry, now="garbage") is None  # the clock: long past


def test_parse_retry_after_naive_now_is_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert parse_retry_after("Mon, 01 Jan 2024 12:01:00 GMT", now=naive) == 60.0


def test_parse_retry_after_defaults_to_the_clock() -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    header = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(header)
    assert seconds is not None
    assert 100.0 < seconds <= 120.0


def test_no_attempt_limit_retries_until_the_deadline_only() -> None:
    policy = RetryPolicy(
        max_attempts=None, base_delay=1.0, max_delay=1.0, deadline=100.0, random=lambda: 1.0
    )
    error = ServerError("POST /contacts/upsert/", 503, "down")
    assert policy.delay_for(10_000, error, elapsed=10.0) is not None
    assert policy.delay_for(10_000, error, elapsed=99.5) is None


def test_a_send_guardrails_retry_after_is_not_capped() -> None:
    # One recipient's window: a retry sooner than it asks is refused again (a 429 and a
    # slot of the key's budget each time), so its whole wait counts against the deadline.
    error = RateLimitError(EP, 429, "x", code="send_guardrail", retry_after=3600.0)
    assert error.about_recipient
    assert fixed(0.0).delay_for(1, error, 0.0) is None  # past the 60 s deadline: give up
    assert RetryPolicy(deadline=None, random=lambda: 0.0).delay_for(1, error, 0.0) == 3600.0
    key = RateLimitError(EP, 429, "x", code="rate_limited", retry_after=3600.0)
    assert not key.about_recipient and fixed(0.0).delay_for(1, key, 0.0) == 60.0
