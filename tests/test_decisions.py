"""The one decision every engine asks after a call: outcome in, decision out."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from flask_meisa._engine.base import OUTAGE_THRESHOLD
from flask_meisa._engine.base import Decision
from flask_meisa._engine.base import call_for
from flask_meisa._engine.base import decide
from flask_meisa._engine.base import log_decision
from flask_meisa._engine.base import pause_for
from flask_meisa._engine.base import settle
from flask_meisa._engine.base import too_late
from flask_meisa.client import MeisaClient
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import DeliveryError
from flask_meisa.errors import NotFoundError
from flask_meisa.errors import RateLimitError
from flask_meisa.errors import ServerError
from flask_meisa.errors import UnprocessableEntityError
from flask_meisa.errors import ValidationError
from flask_meisa.operations import MAX_BODY_BYTES
from flask_meisa.operations import Operation
from flask_meisa.operations import attempt
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


def test_a_send_is_not_retried_once_meisa_may_have_forgotten_its_idempotency_key():
    send = Operation("send", {"trigger_key": "otp", "to_email": "ada@example.com"})
    upsert = Operation("upsert", {"email": "ada@example.com"})
    assert too_late(send, None, 1e9) is None  # never attempted
    assert too_late(send, 1000.0, 1000.0 + 3000.0) is None
    error = too_late(send, 1000.0, 1000.0 + 3000.5)
    assert isinstance(error, DeliveryError)
    assert "idempotency hour" in str(error)
    assert "ada@example.com" not in str(error)
    assert too_late(upsert, 1000.0, 1e9) is None  # replaying an upsert is harmless
    assert decide("send", error, attempts=2, elapsed=3000.5, policy=POLICY).action == "fail"


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


def _event() -> Operation:
    contact = {"email": "a@b.co", "first_name": "Ada"}
    return Operation("track", {"email": "a@b.co", "event_name": "x"}, contact, attempts=1)


def test_settling_an_event_that_answered_404_upserts_its_contact_then_the_event_again():
    event, missing = _event(), NotFoundError("POST /events/track/", 404, "no such contact")
    first = settle(event, missing, recovering=False, recovered=False, elapsed=0.0, policy=POLICY)
    assert (first.step, first.accepted, first.decision.unknown_contact) == (
        "upsert_contact",
        None,
        True,
    )
    call = call_for(event, True)
    assert (call.kind, call.payload, call.id) == ("upsert", event.contact, event.id)
    upserted = settle(event, None, recovering=True, recovered=False, elapsed=0.1, policy=POLICY)
    assert (upserted.step, upserted.accepted) == ("event_again", event.contact)
    again = settle(event, missing, recovering=False, recovered=True, elapsed=0.2, policy=POLICY)
    assert again.step == "failed"  # an event is recovered once


def test_settling_an_upsert_says_what_meisa_now_has_and_maps_every_action_to_a_step():
    upsert = Operation("upsert", {"email": "a@b.co"}, attempts=1)
    assert call_for(upsert, False) is upsert
    done = settle(upsert, None, recovering=False, recovered=False, elapsed=0.0, policy=POLICY)
    assert (done.step, done.accepted) == ("delivered", upsert.payload)
    down = ServerError("POST /contacts/upsert/", 503, "down")
    retry = settle(upsert, down, recovering=False, recovered=False, elapsed=0.0, policy=POLICY)
    assert (retry.step, retry.accepted) == ("retry", None)
    bad = BadRequestError("POST /contacts/upsert/", 400, "bad")
    failed = settle(upsert, bad, recovering=False, recovered=False, elapsed=0.0, policy=POLICY)
    assert failed.step == "failed"


def test_the_pause_is_the_429s_then_the_backoffs_ceiling_once_meisa_looks_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("flask_meisa.engine")
    outage, limited = Decision("retry", delay=1.0, outage=True), Decision("retry", pause=3.0)
    assert pause_for(outage, OUTAGE_THRESHOLD - 1, POLICY, logger) == 0.0
    assert pause_for(limited, 0, POLICY, logger) == 3.0
    with caplog.at_level(logging.INFO, logger="flask_meisa.engine"):
        assert pause_for(outage, OUTAGE_THRESHOLD, POLICY, logger) == 4.0  # 1.0 * 2 ** 2
    assert "3 failed calls in a row; pausing delivery for 4.00 s" in caplog.text
    assert pause_for(outage, 30, POLICY, logger) == 8.0  # capped by max_delay


def test_attempt_captures_the_outcome_and_whether_a_request_may_have_gone_out(
    emulator: Any,
) -> None:
    def no_client() -> MeisaClient:
        raise ConfigurationError("api_key is not set")

    upsert = Operation("upsert", {"email": "ada@example.com"})
    failed = attempt(no_client, upsert)
    assert (failed.made, type(failed.error), failed.result) == (False, ConfigurationError, None)
    with MeisaClient(emulator.live_key, emulator.url) as client:
        done = attempt(lambda: client, upsert)
        assert (done.made, done.error) == (True, None) and done.result is not None
        huge = Operation(
            "upsert", {"email": "a@b.co", "custom_fields": {"x": "x" * MAX_BODY_BYTES}}
        )
        refused = attempt(lambda: client, huge)
        assert (refused.made, type(refused.error)) == (False, ValidationError)
        unknown = {"trigger_key": "no-such-trigger", "to_email": "a@b.co", "idempotency_key": "k"}
        answered = attempt(lambda: client, Operation("send", unknown))
        assert (answered.made, type(answered.error)) == (True, BadRequestError)
