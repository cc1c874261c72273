"""meisa.send: suppression first, synchronous outcomes, background delivery."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from flask import Flask

from flask_meisa import APIConnectionError
from flask_meisa import APITimeoutError
from flask_meisa import Meisa
from flask_meisa import RateLimitError
from flask_meisa import UnprocessableEntityError
from flask_meisa import ValidationError
from flask_meisa._suppression import SuppressionSet
from flask_meisa.signals import delivery_failed
from flask_meisa.signals import email_sent
from flask_meisa.signals import email_suppressed
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests.apps import build_app
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response
from tests.process_support import wait_until

TRIGGER = "/emails/trigger/"
UNSUBSCRIBED = "/contacts/api/unsubscribed-emails/"
UPSERT = "/contacts/upsert/"


@pytest.fixture
def app(emulator: Any) -> Flask:
    return build_app(emulator_config(emulator))


@pytest.fixture
def meisa(app: Flask) -> Meisa:
    extension: Meisa = app.extensions["meisa"]
    return extension


def test_a_synchronous_send_returns_sent_with_its_ids(
    emulator: Any, app: Flask, meisa: Meisa
) -> None:
    with app.app_context(), email_sent.connected_to(sent := _Collector(), sender=app):
        result = meisa.send("verification_code", "  Ada@Example.com ", variables={"code": "1"})
    assert result.status == "sent"
    assert result.to_email == "ada@example.com"
    assert result.email_send_id
    assert result.contact_created is True
    (send,) = emulator.sends()
    assert send["to_email"] == "ada@example.com"
    assert send["idempotency_key"] == result.idempotency_key
    assert sent.calls[0]["result"] == result


def test_scheduled_and_skipped_statuses(emulator: Any, app: Flask, meisa: Meisa) -> None:
    with app.app_context():
        assert meisa.send("welcome_delayed", "ada@example.com").status == "scheduled"
        skipped = meisa.send("pro_only", "ada@example.com")
    assert skipped.status == "skipped"
    assert skipped.reason == "conditions_not_met"


def test_a_suppressed_address_is_not_sent_and_is_signalled(
    emulator: Any, app: Flask, meisa: Meisa
) -> None:
    emulator.suppress("gone@example.com")
    with app.app_context(), email_suppressed.connected_to(seen := _Collector(), sender=app):
        result = meisa.send("password_reset", "GONE@example.com")
    assert result.status == "suppressed"
    assert emulator.requests_to(TRIGGER) == []
    assert seen.calls == [
        {"trigger_key": "password_reset", "to_email": "gone@example.com", "operation": None}
    ]


def test_a_422_recipient_suppressed_raises_and_joins_the_local_set(
    emulator: Any, app: Flask, meisa: Meisa
) -> None:
    with app.app_context():
        assert not meisa.is_suppressed("late@example.com")  # loads the set
        emulator.suppress("late@example.com")  # Meisa learns it after the load
        with pytest.raises(UnprocessableEntityError) as raised:
            meisa.send("password_reset", "late@example.com")
        assert raised.value.code == "recipient_suppressed"
        assert meisa.is_suppressed("late@example.com")
        assert meisa.send("password_reset", "late@example.com").status == "suppressed"
    assert len(emulator.requests_to(TRIGGER)) == 1


def test_a_4xx_raises_the_typed_error(emulator: Any, app: Flask, meisa: Meisa) -> None:
    emulator.set_sender(False)
    with app.app_context(), pytest.raises(UnprocessableEntityError) as raised:
        meisa.send("receipt", "ada@example.com")
    assert raised.value.code == "no_sender"


def test_a_503_after_the_send_is_retried_without_a_second_email(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, MEISA_RETRY_BASE_DELAY=0.0))
    meisa: Meisa = app.extensions["meisa"]
    emulator.faults.fail_next(1, status=503, path=TRIGGER, after=True)
    with app.app_context():
        result = meisa.send("receipt", "ada@example.com", idempotency_key="receipt-42")
    assert result.status == "sent"
    assert result.duplicate is True
    assert len(emulator.sends()) == 1
    assert [r.body["idempotency_key"] for r in emulator.requests_to(TRIGGER)] == [
        "receipt-42",
        "receipt-42",
    ]


def test_background_send_is_queued_and_delivered_after_the_response(
    emulator: Any, app: Flask
) -> None:
    response = app.test_client().post("/send-later/invite/grace@example.com", buffered=True)
    assert response.get_json() == {"status": "queued"}
    (send,) = emulator.sends()
    assert send["trigger_key"] == "invite"


def test_background_send_skips_a_suppressed_address_at_delivery(
    emulator: Any, app: Flask, meisa: Meisa
) -> None:
    emulator.suppress("gone@example.com")
    with app.app_context(), email_suppressed.connected_to(seen := _Collector(), sender=app):
        result = meisa.send("invite", "gone@example.com", background=True)
        assert result.status in ("queued", "suppressed")
    assert emulator.requests_to(TRIGGER) == []
    assert len(seen.calls) == 1


def test_suppression_is_refreshed_after_the_ttl_without_a_sender_waiting(
    emulator: Any, app: Flask, meisa: Meisa
) -> None:
    now = [0.0]
    state = meisa.state(app)
    state.suppression = SuppressionSet(
        state.client.unsubscribed_emails, ttl=60.0, clock=lambda: now[0]
    )
    state.reporter.suppression = state.suppression
    with app.app_context():
        assert not meisa.is_suppressed("new@example.com")
        emulator.suppress("new@example.com")
        emulator.faults.set(latency=0.5)
        now[0] = 61.0
        # Stale: the answer comes from the old set at once, the refresh runs behind it.
        assert not meisa.is_suppressed("new@example.com")
        assert state.suppression.wait_for_refresh(5.0)
        assert meisa.is_suppressed("new@example.com")
    state.suppression.close()


def test_a_list_meisa_failed_to_give_is_not_asked_for_again_by_every_check(
    emulator: Any, app: Flask, meisa: Meisa
) -> None:
    # Each check would otherwise wait on a Meisa that is down, for every send.
    emulator.suppress("gone@example.com")
    emulator.faults.fail_next(1, status=400, path=UNSUBSCRIBED)
    with app.app_context():
        assert not meisa.is_suppressed("gone@example.com")  # nothing loaded: fails open
        assert not meisa.is_suppressed("gone@example.com")
    assert [r.status for r in emulator.requests_to(UNSUBSCRIBED)] == [400]


def test_under_testing_nothing_is_sent_but_everything_is_recorded(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, TESTING=True, MEISA_SUPPRESS_SEND=None))
    meisa: Meisa = app.extensions["meisa"]
    with app.app_context(), record_operations() as recorded:
        result = meisa.send("verification_code", "ada@example.com", idempotency_key="k1")
    assert result.status == "disabled"
    assert result.reason == "delivery_suppressed"
    assert recorded[0].payload["idempotency_key"] == "k1"
    assert emulator.requests == []


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("", "ada@example.com"), {}, "trigger_key"),
        (("receipt", "not-an-address"), {}, "to_email"),
        (("receipt", "ada@example.com\r\nBcc: x@y.z"), {}, "to_email"),
        (("receipt", "ada@example.com"), {"variables": {"when": object()}}, "variables.when"),
        (("receipt", "ada@example.com"), {"variables": ["a"]}, "variables"),
        (("receipt", "ada@example.com"), {"idempotency_key": ""}, "idempotency_key"),
        (("receipt", "ada@example.com"), {"background": "yes"}, "background"),
    ],
)
def test_bad_input_to_send_raises_at_the_call_site_and_queues_nothing(
    emulator: Any, app: Flask, meisa: Meisa, args: tuple[Any, ...], kwargs: Any, field: str
) -> None:
    with (
        app.app_context(),
        record_operations() as recorded,
        pytest.raises(ValidationError) as raised,
    ):
        meisa.send(*args, **kwargs)
    assert raised.value.field == field
    assert recorded == []
    assert emulator.requests == []


@pytest.mark.parametrize("background", [False, True])
def test_a_body_too_large_is_refused_whether_or_not_the_address_is_suppressed(
    emulator: Any, app: Flask, meisa: Meisa, background: bool
) -> None:
    # It was reported suppressed (signalled, no error) to a suppressed address, and raised
    # for any other: the same bad call answered by the data, after the list was loaded.
    emulator.suppress("gone@example.com")
    variables = {"log": "x" * 600_000}
    with app.app_context(), email_suppressed.connected_to(seen := _Collector(), sender=app):
        for address in ("gone@example.com", "here@example.com"):
            with pytest.raises(ValidationError) as raised:
                meisa.send("receipt", address, variables=variables, background=background)
            assert raised.value.field == "variables"
    assert seen.calls == []
    assert emulator.requests == []


class _Collector:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.calls.append(kwargs)


@pytest.mark.parametrize("email", ["", "two@@example.com", None, 42])
def test_is_suppressed_refuses_what_is_not_an_address(
    emulator: Any, app: Flask, meisa: Meisa, email: Any
) -> None:
    with app.app_context(), pytest.raises(ValidationError):
        meisa.is_suppressed(email)
    assert emulator.requests == []


def test_synchronous_sends_spend_the_engines_budget_so_nothing_draws_a_429(
    emulator_factory: Any,
) -> None:
    emulator = emulator_factory(seed="demo", rate_limit="10/second")
    config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_RATE_LIMIT="10/second")
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    try:
        with app.app_context():
            for n in range(20):
                meisa.upsert({"email": f"user{n}@example.com"})
            results = [meisa.send("receipt", f"buyer{n}@example.com") for n in range(3)]
            assert meisa.flush(10.0)
        assert [r.status for r in results] == ["sent"] * 3
        statuses = [r.status for r in emulator.requests]
        assert 429 not in statuses
        assert len(statuses) == 20 + 3 + 1  # upserts, sends, the suppression list
    finally:
        meisa.state(app).close(5.0)


def test_each_attempt_of_a_synchronous_send_spends_a_slot_of_the_budget(
    emulator_factory: Any,
) -> None:
    # Meisa counts every call that reaches it, a retried one too: two sends whose first
    # attempts were processed, then cut off, are six calls, not two, and the background
    # work after them must not be let through to a 429.
    emulator = emulator_factory(seed="demo", rate_limit="8/minute")
    config = emulator_config(
        emulator, MEISA_DELIVERY="thread", MEISA_RATE_LIMIT="8/minute", MEISA_RETRY_BASE_DELAY=0.01
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    try:
        with app.app_context():
            for n in range(2):
                emulator.faults.drop_next(2, path=TRIGGER, after=True)
                assert meisa.send("receipt", f"buyer{n}@example.com").status == "sent"
            for n in range(3):
                meisa.upsert({"email": f"user{n}@example.com"})
            # One upsert goes; the window has no room for the others.
            assert wait_until(lambda: meisa.status().budget_left == {"8/minute": 0}, 10)
            assert not meisa.flush(0.2)  # the other two wait for the window
        assert 429 not in [r.status for r in emulator.requests]
    finally:
        meisa.state(app).close(0.0)


def test_a_429_for_the_key_met_by_a_synchronous_send_pauses_background_delivery(
    emulator: Any,
) -> None:
    # The host's delivery waits out the Retry-After of a 429 met outside it, as of its own,
    # rather than draw another 429; the send guardrail's, about one recipient, pauses nothing.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_MAX_ATTEMPTS=1))
    meisa: Meisa = app.extensions["meisa"]
    emulator.set_send_guardrail("1/hour")
    try:
        with app.app_context():
            meisa.send("receipt", "ada@example.com")
            with pytest.raises(RateLimitError, match="send_guardrail"):
                meisa.send("receipt", "ada@example.com")
            meisa.upsert({"email": "grace@example.com"})
            assert meisa.flush(5)  # the guardrail's Retry-After (an hour) is not waited
            emulator.faults.force_429(1, retry_after=2, path=TRIGGER)
            with pytest.raises(RateLimitError, match="rate_limited"):
                meisa.send("receipt", "linus@example.com")
            meisa.upsert({"email": "linus@example.com"})
            assert meisa.flush(5)
        sends, upserts = emulator.requests_to(TRIGGER), emulator.requests_to(UPSERT)
        assert [r.status for r in sends] == [200, 429, 429] and len(upserts) == 2
        assert upserts[0].time - sends[1].time < 1.0
        assert upserts[1].time - sends[2].time >= 2.0
    finally:
        meisa.state(app).close(0.0)


def test_sends_in_a_loop_to_one_address_past_the_guardrail_call_meisa_no_more(
    emulator: Any,
) -> None:
    # A careless loop: once Meisa's guardrail refused an address, the next sends to it fail
    # the same way without a call until its Retry-After has passed (each call spent a slot
    # of the key's budget: 70 sends left none for a minute of everyone's work).
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    emulator.set_send_guardrail("2/hour")
    outcomes: list[str] = []
    try:
        with app.app_context():
            for _ in range(10):
                try:
                    outcomes.append(meisa.send("receipt", "Loop@Example.com ").status)
                except RateLimitError as error:
                    assert (
                        error.code == "send_guardrail" and 3500 < (error.retry_after or 0) <= 3600
                    )
                    outcomes.append(error.code)
            assert meisa.send("receipt", "other@example.com").status == "sent"
        assert outcomes == ["sent"] * 2 + ["send_guardrail"] * 8
        assert [r.status for r in emulator.requests_to(TRIGGER)] == [200, 200, 429, 200]
    finally:
        meisa.state(app).close(0.0)


@pytest.mark.parametrize(
    ("retry_after", "held"), [(None, 60), ("0", 60), ("abc", 60), ("999999999", 3600)]
)
def test_a_guardrail_refusal_holds_its_address_a_minute_untold_and_at_most_an_hour(
    retry_after: str | None, held: float
) -> None:
    # Meisa need not say how long (the emulator always does): 20 sends made 20 calls, each
    # refused and each spending a slot of the key's budget. Now one, then a minute's wait;
    # and a wait past Meisa's longest window (an hour) is not kept for 31 years.
    def answer(exchange: Exchange) -> None:
        if exchange.path.endswith(UNSUBSCRIBED):
            exchange.send(response(200, {"as_of": None, "count": 0, "emails": []}))
            return
        refused = {"detail": "Too many emails to this recipient", "code": "send_guardrail"}
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        exchange.send(response(429, refused, headers))

    with hostile(answer) as server:
        app = build_app(
            {
                "MEISA_API_KEY": "meisa_live_" + "g" * 24,
                "MEISA_BASE_URL": server.url,
                "MEISA_SUPPRESS_SEND": False,
                "MEISA_MAX_ATTEMPTS": 1,
            }
        )
        meisa: Meisa = app.extensions["meisa"]
        with app.app_context():
            for _ in range(20):
                with pytest.raises(RateLimitError, match="send_guardrail") as refused:
                    meisa.send("receipt", "ada@example.com")
        meisa.state(app).close(0.0)
    assert held - 1 < (refused.value.retry_after or 0) <= held
    assert [path for _, path in server.requests].count("/api/v1" + TRIGGER) == 1


@pytest.mark.parametrize("engine", ["thread", "sync"])
def test_background_sends_in_a_loop_past_the_guardrail_end_as_the_refused_one_without_a_call(
    emulator: Any, engine: str
) -> None:
    # Queued, each made its call: 10 to one address (guardrail 2/hour) made 10, 8 refused
    # 429 (each a slot of the key's budget). After the first refusal the next ones fail as
    # it did (delivery_failed with the guardrail's 429, a dead letter) without a call.
    config = emulator_config(emulator, MEISA_DELIVERY=engine, MEISA_RATE_LIMIT="60/minute")
    app = build_app(config)  # (sync: the client's retry waits no less than Meisa asks)
    meisa: Meisa = app.extensions["meisa"]
    emulator.set_send_guardrail("2/hour")
    failed: list[Any] = []
    try:
        with (
            delivery_failed.connected_to(lambda _, error, **kw: failed.append(error), sender=app),
            app.app_context(),
        ):
            for _ in range(10):
                assert meisa.send("receipt", "loop@example.com", background=True).status
            meisa.send("receipt", "other@example.com", background=True)
            assert meisa.flush(10)
            status = meisa.status()
        assert sorted(r.status for r in emulator.requests_to(TRIGGER)) == [200, 200, 200, 429]
        assert [e.code for e in failed] == ["send_guardrail"] * 8
        assert all(3500 < (e.retry_after or 0) <= 3600 for e in failed)
        assert (status.delivered, status.failed) == (3, 8)
        if engine == "thread":
            # The four calls and the suppression list's load: 5 slots (before: 12).
            assert status.dead_letters == 8 and status.budget_left == {"60/minute": 55}
    finally:
        meisa.state(app).close(0.0)


def test_sends_refused_without_a_call_do_not_hide_an_outage(emulator: Any) -> None:
    # Meisa down (every upsert 503) and, between its failures, sends to an address the
    # guardrail refused, ended with its 429 without a call: they counted as Meisa
    # answering, each ending the failures in a row, and delivery never paused. A call not
    # made counts as nothing: the third failure in a row pauses delivery.
    config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_RATE_LIMIT="60/minute")
    app = build_app({**config, "MEISA_RETRY_DEADLINE": 0.001})  # no retry: the 503s fail
    meisa: Meisa = app.extensions["meisa"]
    emulator.set_send_guardrail("1/hour")
    failed: list[Any] = []
    try:
        with (
            delivery_failed.connected_to(lambda _, error, **kw: failed.append(error), sender=app),
            app.app_context(),
        ):
            for _ in range(2):
                meisa.send("receipt", "loop@example.com", background=True)
                assert meisa.flush(10)
            emulator.faults.fail_next(3, status=503, path=UPSERT)
            for n in range(3):
                meisa.send("receipt", "loop@example.com", background=True)
                assert meisa.flush(10)
                meisa.upsert({"email": f"user{n}@example.com", "external_id": f"u{n}"})
                assert meisa.flush(10)
            status = meisa.status()
        assert sorted(r.status for r in emulator.requests_to(TRIGGER)) == [200, 429]
        assert [r.status for r in emulator.requests_to(UPSERT)] == [503] * 3
        assert [getattr(e, "code", None) for e in failed].count("send_guardrail") == 4
        assert status.paused_for > 0
    finally:
        meisa.state(app).close(0.0)


@pytest.mark.slow
@pytest.mark.parametrize("background", [True, False])
def test_a_send_that_got_no_answer_in_time_holds_its_slot_until_its_lease_ends(
    emulator_factory: Any, background: bool
) -> None:
    # Meisa counts a call when it reaches it: one whose answer did not come in time may
    # have reached it after the timeout (here a second late), so its slot cannot be dated
    # by the timeout. The lease (both timeouts and 5 s) is the longest a call can take.
    emulator = emulator_factory(seed="demo", rate_limit="1/second")
    emulator.faults.set(latency=1.0, paths=[TRIGGER])
    config = emulator_config(
        emulator,
        MEISA_DELIVERY="thread",
        MEISA_RATE_LIMIT="1/second",
        MEISA_TIMEOUT=0.3,
        MEISA_CONNECT_TIMEOUT=0.3,
        MEISA_RETRY_BASE_DELAY=0.01,
        MEISA_MAX_ATTEMPTS=1,  # a synchronous send's; background delivery retries
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    try:
        with app.app_context():
            if background:
                meisa.send("receipt", "buyer@example.com", background=True)
                assert emulator.wait_for(lambda e: len(e.requests_to(TRIGGER)) == 1, timeout=10)
                emulator.faults.clear()  # the send's retry is answered, then the upsert
            else:
                with pytest.raises(APITimeoutError):
                    meisa.send("receipt", "buyer@example.com")
            meisa.upsert({"email": "user@example.com"})
            assert meisa.flush(15.0)
        answered = [(r.path, r.status, round(r.time + r.duration, 3)) for r in emulator.requests]
        assert 429 not in [status for _, status, _ in answered], answered
        # Sent once: Meisa answered late; a retry (in the background) kept its idempotency key.
        assert len(emulator.sends()) == 1
    finally:
        meisa.state(app).close(0.0)


@pytest.mark.parametrize(
    ("latency", "budget", "deadline"),
    [
        # The window is full for a minute: waiting out the deadline for a slot left the
        # call 50 ms, less than Meisa takes to answer.
        (0.3, "3/minute", 2.0),
        # The window's first slot frees about 3.4 s into a 4 s deadline: waiting for it
        # left the call 0.6 s, less than Meisa takes to answer (1 s).
        (1.0, "3/5.5 seconds", 4.0),
    ],
)
def test_a_send_waits_for_a_slot_at_most_half_its_deadline(
    emulator_factory: Any, latency: float, budget: str, deadline: float
) -> None:
    # A call left too little time was cut off after Meisa had it (the email sent) and
    # raised APITimeoutError. Past half the deadline, a slot is not waited for: the call
    # goes at once (made without one, as under the Celery engine).
    emulator = emulator_factory(seed="demo")
    emulator.faults.set(latency=latency, paths=[TRIGGER])
    config = emulator_config(
        emulator, MEISA_DELIVERY="thread", MEISA_RATE_LIMIT=budget, MEISA_SEND_DEADLINE=deadline
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    try:
        with app.app_context():
            for n in range(2):  # with the suppression list load: the window's 3 calls
                assert meisa.send("receipt", f"buyer{n}@example.com").status == "sent"
            assert meisa.status().budget_left == {budget: 0}
            result = meisa.send("receipt", "buyer2@example.com")
        assert result.status == "sent"
        assert len(emulator.sends()) == 3
    finally:
        meisa.state(app).close(0.0)


def test_the_suppression_list_is_preloaded_at_init_only_when_asked(emulator: Any) -> None:
    build_app(emulator_config(emulator))
    preloading = build_app(emulator_config(emulator, MEISA_SUPPRESSION_PRELOAD="true"))
    assert emulator.wait_for_requests(1, UNSUBSCRIBED)
    assert len(emulator.requests_to(UNSUBSCRIBED)) == 1  # that app's, before any send
    with preloading.app_context():
        assert preloading.extensions["meisa"].is_suppressed("ada@example.com") is False
    assert len(emulator.requests_to(UNSUBSCRIBED)) == 1  # and no second load


def test_a_base_url_whose_host_does_not_resolve_fails_a_send_within_its_deadline(
    caplog: pytest.LogCaptureFixture, unresolvable: str
) -> None:
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY="meisa_live_" + "n0Dns" * 6,
        MEISA_BASE_URL=f"https://{unresolvable}",
        MEISA_SEND_DEADLINE=2.0,
        MEISA_OUTBOX=None,
    )
    meisa = Meisa(app)
    with app.app_context(), caplog.at_level(logging.WARNING, logger="flask_meisa"):
        started = time.monotonic()
        with pytest.raises(APIConnectionError) as raised:
            meisa.send("welcome", "ada@example.com")
        elapsed = time.monotonic() - started
        meisa.close(timeout=0)
    assert elapsed < 2.0 + 0.5, elapsed  # the deadline, and no resolver timeout past it
    assert raised.value.retryable
    assert "meisa.invalid" in str(raised.value)
    assert "not resolved" in str(raised.value)


@pytest.mark.parametrize("retry_after", ["0", "-5", "Thu, 01 Jan 1970 00:00:00 GMT", "0.001"])
@pytest.mark.parametrize("code", ["send_guardrail", "rate_limited"])
def test_a_429_asking_for_no_wait_is_not_retried_at_once_again_and_again(
    retry_after: str, code: str
) -> None:
    # A Retry-After of no wait (0, below 0, a date past), or of a millisecond, was taken
    # as asked: one
    # queued send to a recipient over the guardrail was retried ~1,000 times a second
    # until the send deadline, and a key over its budget paused nothing (each send backed
    # off alone: 20 of them made ~80 calls in 1.5 s).
    def answer(exchange: Exchange) -> None:
        if "unsubscribed" in exchange.path:
            exchange.send(response(200, {"as_of": None, "count": 0, "emails": []}))
        else:
            body = {"detail": "Too many.", "code": code}
            exchange.send(response(429, body, {"Retry-After": retry_after}))

    with hostile(answer) as server:
        app = Flask(__name__)
        app.config.update(
            MEISA_API_KEY="meisa_live_" + "n0wait" * 4,
            MEISA_BASE_URL=server.url,
            MEISA_OUTBOX=None,
            MEISA_RATE_LIMIT=None,
        )
        meisa = Meisa(app)
        with app.app_context():
            for n in range(1 if code == "send_guardrail" else 20):  # one address, or the key
                meisa.send("verify_email", f"ada{n}@example.com", background=True)
            assert not meisa.flush(1.5)  # a bounded look at how often it is tried
            triggers = sum("/emails/trigger/" in path for _, path in server.requests)
            meisa.close(app, timeout=0)
    assert 1 <= triggers <= 10, triggers
