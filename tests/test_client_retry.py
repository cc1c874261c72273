"""The client's retries against real faults injected in the emulator, counted there."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flask_meisa import operations
from flask_meisa.client import MeisaClient
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import APIError
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import RateLimitError
from flask_meisa.errors import ServerError
from flask_meisa.errors import error_for_status
from flask_meisa.retry import RetryPolicy

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, deadline=5.0)


@pytest.fixture
def client(emulator: Any) -> Iterator[MeisaClient]:
    with MeisaClient(emulator.live_key, emulator.url, retry=FAST, timeout=(1.0, 2.0)) as meisa:
        yield meisa


def calls(emulator: Any, path: str) -> int:
    return len(emulator.requests_to(path))


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_then_succeeds(client: MeisaClient, emulator: Any, status: int) -> None:
    emulator.faults.fail_next(2, status=status, path="/ping/")
    assert client.ping().environment == "live"
    assert calls(emulator, "/ping/") == 3


def test_5xx_until_attempts_run_out(client: MeisaClient, emulator: Any) -> None:
    emulator.faults.fail_next(10, status=503, path="/ping/")
    with pytest.raises(ServerError) as info:
        client.ping()
    assert info.value.status == 503
    assert info.value.retryable
    assert calls(emulator, "/ping/") == FAST.max_attempts


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 409, 410, 418, 422])
def test_other_4xx_tried_exactly_once(client: MeisaClient, emulator: Any, status: int) -> None:
    emulator.faults.fail_next(1, status=status, path="/contacts/upsert/")
    with pytest.raises(APIError) as info:
        client.upsert_contact("ada@example.com")
    assert type(info.value) is error_for_status(status)
    assert info.value.status == status
    assert not info.value.retryable
    assert calls(emulator, "/contacts/upsert/") == 1
    assert emulator.contact(email="ada@example.com") is None


def test_never_policy_tries_once(client: MeisaClient, emulator: Any) -> None:
    emulator.faults.fail_next(1, status=503, path="/ping/")
    with pytest.raises(ServerError):
        client.with_options(retry=RetryPolicy.never()).ping()
    assert calls(emulator, "/ping/") == 1
    assert client.ping().environment == "live"  # the original keeps its policy


def test_429_waits_its_retry_after(client: MeisaClient, emulator: Any) -> None:
    emulator.faults.force_429(1, retry_after=1, path="/ping/")
    started = time.monotonic()
    client.ping()
    waited = time.monotonic() - started
    assert calls(emulator, "/ping/") == 2
    assert 0.95 <= waited < 2.5


def test_429_retry_after_capped_by_the_policy(emulator: Any) -> None:
    emulator.faults.force_429(1, retry_after=30, path="/ping/")
    policy = RetryPolicy(base_delay=0.01, max_retry_after=0.2, deadline=5.0)
    with MeisaClient(emulator.live_key, emulator.url, retry=policy) as meisa:
        started = time.monotonic()
        meisa.ping()
        assert 0.19 <= time.monotonic() - started < 2.0
    assert calls(emulator, "/ping/") == 2


def test_429_past_the_deadline_is_raised_at_once(emulator: Any) -> None:
    emulator.faults.force_429(1, retry_after=30, path="/ping/")
    with MeisaClient(emulator.live_key, emulator.url, retry=FAST) as meisa:
        started = time.monotonic()
        with pytest.raises(RateLimitError) as info:
            meisa.ping()
        assert time.monotonic() - started < 1.0
    assert info.value.retry_after == 30.0
    assert calls(emulator, "/ping/") == 1


def test_503_retry_after_is_honoured(client: MeisaClient, emulator: Any) -> None:
    emulator.faults.fail_next(1, status=503, path="/ping/", retry_after=1)
    started = time.monotonic()
    client.ping()
    assert time.monotonic() - started >= 0.95
    assert calls(emulator, "/ping/") == 2


def test_timeout_is_retried(emulator: Any) -> None:
    emulator.faults.set(latency=0.5)
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, deadline=10.0)
    with (
        MeisaClient(emulator.live_key, emulator.url, retry=policy, timeout=(1.0, 0.1)) as meisa,
        pytest.raises(APITimeoutError) as info,
    ):
        meisa.ping()
    assert info.value.reason == "no answer within 0.1 s"
    # The emulator records a request once it has answered, after its latency.
    assert emulator.wait_for_requests(3, "/ping/", timeout=5.0)
    assert calls(emulator, "/ping/") == 3


@contextlib.contextmanager
def full_listener() -> Iterator[str]:
    """A port that takes no more connections: its accept queue is full, new ones hang."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        address, held = listener.getsockname(), []
        try:
            for _ in range(64):  # a kernel that never fills the queue fails, not hangs
                pending = socket.socket()
                pending.settimeout(0.2)
                try:
                    pending.connect(address)
                except TimeoutError:
                    pending.close()
                    break
                held.append(pending)
            else:
                pytest.fail("the listener's accept queue never filled")
            yield f"http://127.0.0.1:{address[1]}"
        finally:
            for connection in held:
                connection.close()


def test_only_a_timed_out_request_that_was_sent_is_raised_in_its_slot(emulator: Any) -> None:
    # Meisa may count a late request after its timeout; one that never connected, never.
    seen: list[BaseException | None] = []

    @contextlib.contextmanager
    def slot(seconds: float) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            seen.append(error)
            raise
        seen.append(None)

    emulator.faults.set(latency=0.5, paths=["/ping/"])
    with full_listener() as url:
        for base, late in ((url, False), (emulator.url, True)):
            with (
                MeisaClient(emulator.live_key, base, retry=RetryPolicy.never()) as client,
                pytest.raises(APITimeoutError) as info,
            ):
                client.with_options(timeout=(0.2, 0.1), slot=slot).ping()
            assert info.value.sent is late
            assert seen.pop() is (info.value if late else None)
            made = operations.Attempt(error=info.value, made=True)
            assert made.timed_out is late  # the engines date its slot by its lease's end


def test_dropped_connection_is_retried(client: MeisaClient, emulator: Any) -> None:
    emulator.faults.drop_next(2, path="/ping/")
    assert client.ping().environment == "live"
    assert calls(emulator, "/ping/") == 3


def test_dropped_connection_until_attempts_run_out(client: MeisaClient, emulator: Any) -> None:
    emulator.faults.drop_next(10, path="/ping/")
    with pytest.raises(APIConnectionError) as info:
        client.ping()
    assert info.value.retryable
    assert info.value.endpoint == "GET /ping/"


def test_deadline_holds_during_an_outage(emulator: Any) -> None:
    emulator.faults.outage(30)
    policy = RetryPolicy(max_attempts=1000, base_delay=0.05, max_delay=0.1, deadline=1.0)
    with MeisaClient(emulator.live_key, emulator.url, retry=policy) as meisa:
        started = time.monotonic()
        with pytest.raises((ServerError, APIConnectionError)):
            meisa.ping()
        elapsed = time.monotonic() - started
    assert elapsed <= 1.4
    assert calls(emulator, "/ping/") >= 3


def test_deadline_cuts_a_slow_attempt_short(emulator: Any) -> None:
    emulator.faults.set(latency=3.0)
    policy = RetryPolicy(base_delay=0.01, deadline=0.5)
    with MeisaClient(emulator.live_key, emulator.url, retry=policy, timeout=(1.0, 10.0)) as meisa:
        started = time.monotonic()
        with pytest.raises(APITimeoutError):
            meisa.ping()
        elapsed = time.monotonic() - started
    emulator.faults.set(latency=0)
    assert 0.45 <= elapsed < 1.2


def test_lost_answer_after_a_send_sends_once(client: MeisaClient, emulator: Any) -> None:
    emulator.add_trigger("verify_email")
    emulator.faults.fail_next(1, status=503, path="/emails/trigger/", after=True)
    result = client.trigger_email("verify_email", "ada@example.com", variables={"code": "1"})
    attempts = emulator.requests_to("/emails/trigger/")
    assert len(attempts) == 2
    keys = {a.body["idempotency_key"] for a in attempts}
    assert keys == {result.idempotency_key}
    assert result.status == "sent"
    assert result.duplicate is True  # the retry was recognised, nothing sent again
    assert len(emulator.sends()) == 1


def test_dropped_answer_after_a_send_sends_once(client: MeisaClient, emulator: Any) -> None:
    emulator.add_trigger("verify_email")
    emulator.faults.drop_next(1, path="/emails/trigger/", after=True)
    result = client.trigger_email("verify_email", "ada@example.com", idempotency_key="otp:1")
    assert result.idempotency_key == "otp:1"
    assert len(emulator.sends()) == 1
    assert len(emulator.requests_to("/emails/trigger/")) == 2


def test_retries_are_logged_without_secrets(
    client: MeisaClient, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.faults.fail_next(1, status=503, path="/ping/")
    with caplog.at_level(logging.DEBUG, logger="flask_meisa.client"):
        client.ping()
    retry = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(retry) == 1
    message = retry[0].getMessage()
    assert message.startswith(
        "GET /ping/ answered 503 [service_unavailable] on attempt 1; retrying in "
    )
    assert emulator.live_key not in caplog.text


def test_giving_up_is_a_warning(
    client: MeisaClient, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.faults.fail_next(10, status=502, path="/ping/")
    with caplog.at_level(logging.DEBUG, logger="flask_meisa.client"), pytest.raises(ServerError):
        client.ping()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["GET /ping/ answered 502 [bad_gateway] on attempt 4; giving up"]
