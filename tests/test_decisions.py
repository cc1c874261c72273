"""The one decision every engine asks after a call: outcome in, decision out."""

from __future__ import annotations

import logging

import pytest

from flask_meisa._decisions import Decision
from flask_meisa._decisions import decide
from flask_meisa._decisions import log_decision
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import NotFoundError
from flask_meisa.errors import RateLimitError
from flask_meisa.errors import ServerError
from flask_meisa.errors import UnprocessableEntityError
from flask_meisa.errors import ValidationError
from flask_meisa.retry import RetryPolicy

POLICY = RetryPolicy(
    max_attempts=None, base_delay=1.0, max_delay=8.0, max_retry_after=30.0, deadline=600.0,
    random=lambda: 0.5,
)  # fmt: skip


def _429(code: str | None, retry_after: float | None = 5.0) -> RateLimitError:
    return RateLimitError(
        "POST /emails/trigger/", 429, "slow down", code=code, retry_after=retry_after
    )


def test_success_is_done():
    assert decide("upsert", None, attempts=1, elapsed=0.0, policy=POLICY) == Decision("done")


def test_a_5xx_or_no_answer_is_retried_and_counts_toward_an_outage():
    for error in (
        ServerError("POST /contacts/upsert/", 503, "down"),
        APIConnectionError("POST /contacts/upsert/", "connection reset"),
        APITimeoutError("POST /contacts/upsert/", "no answer within 2 s"),
    ):
        decision = decide("upsert", error, attempts=3, elapsed=1.0, policy=POLICY)
        assert decision.action == "retry"
        assert decision.delay == pytest.approx(2.0)  # 4 s ceiling, jitter 0.5
        assert decision.outage and not decision.answered and not decision.pause


def test_other_4xx_fail_at_once_and_end_an_outage():
    for error in (
        BadRequestError("POST /contacts/upsert/", 400, "bad", code="invalid"),
        UnprocessableEntityError("POST /emails/trigger/", 422, "no", code="recipient_suppressed"),
    ):
        decision = decide("send", error, attempts=1, elapsed=0.0, policy=POLICY)
        assert decision == Decision("fail", answered=True)


def test_a_refusal_before_any_request_fails_without_an_answer():
    decision = decide(
        "upsert", ValidationError("email", "bad"), attempts=1, elapsed=0, policy=POLICY
    )
    assert decision.action == "fail" and not decision.answered and not decision.outage


def test_an_event_answered_404_is_recovered_once():
    error = NotFoundError("POST /events/track/", 404, "no such contact")
    first = decide("track", error, attempts=1, elapsed=0.0, policy=POLICY, can_recover=True)
    assert first == Decision("recover", unknown_contact=True)
    again = decide("track", error, attempts=2, elapsed=0.0, policy=POLICY, can_recover=False)
    assert again == Decision("fail", unknown_contact=True)
    assert decide(
        "upsert", error, attempts=1, elapsed=0, policy=POLICY, can_recover=True
    ).action == ("fail")


def test_a_429_of_the_key_pauses_every_call_capped_and_retries_after_the_pause():
    decision = decide("upsert", _429("rate_limited", 90.0), attempts=1, elapsed=0, policy=POLICY)
    assert decision.action == "retry"
    assert decision.pause == 30.0 and decision.delay >= 30.0 and not decision.recipient


def test_a_429_with_an_unknown_code_or_no_body_is_the_keys():
    for error in (_429(None), _429("something_else")):
        decision = decide("send", error, attempts=1, elapsed=0, policy=POLICY)
        assert decision.pause == 5.0 and not decision.recipient


def test_the_send_guardrail_delays_only_its_recipient_for_as_long_as_asked():
    decision = decide("send", _429("send_guardrail", 120.0), attempts=1, elapsed=0, policy=POLICY)
    assert decision == Decision("retry", delay=120.0, recipient=True)


def test_the_send_guardrail_past_the_deadline_fails_without_wasting_calls():
    decision = decide("send", _429("send_guardrail", 3600.0), attempts=1, elapsed=0, policy=POLICY)
    assert decision == Decision("fail", recipient=True)


def test_retries_end_at_the_deadline():
    error = ServerError("POST /contacts/upsert/", 500, "oops")
    assert decide("upsert", error, attempts=50, elapsed=599.5, policy=POLICY).action == "fail"


def test_each_decision_logs_one_line_with_no_payload(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("flask_meisa.test")
    error = _429("rate_limited", 10.0)
    decision = decide("upsert", error, attempts=2, elapsed=0, policy=POLICY)
    with caplog.at_level(logging.INFO, logger="flask_meisa.test"):
        log_decision(logger, decision, "upsert (abc)", error, 2)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "flask-meisa: Meisa answered 429 for the key; pausing delivery for 10.0 s",
        "flask-meisa: upsert (abc): HTTP 429 [rate_limited] on attempt 2; retrying in 10.00 s",
    ]
