"""A synchronous send, including the suppression list load it triggers, ends within
``MEISA_SEND_DEADLINE`` plus one connect timeout, whatever the server does."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa import RateLimitError
from flask_meisa._engine.base import OUTAGE_THRESHOLD
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.testing import emulator_config
from tests.apps import build_app
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response
from tests.process_support import wait_until

DEADLINE, READ, CONNECT = 3.0, 2.0, 1.0
SENT = {"status": "sent", "email_send_id": "e1", "contact_id": "c1"}


def make_app(url: str, **config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY="meisa_live_" + "h" * 24,
        MEISA_BASE_URL=url,
        MEISA_SUPPRESS_SEND=False,
        MEISA_SEND_DEADLINE=DEADLINE,
        MEISA_TIMEOUT=READ,
        MEISA_CONNECT_TIMEOUT=CONNECT,
        MEISA_RATE_LIMIT=None,
    )
    app.config.update(config)
    Meisa(app)
    return app


def four_concurrent_sends(app: Flask, refused: bool = False) -> list[float]:
    """The wall time of each of four sends made at once, as the first of the process
    (``refused``: one may fail for the key's pause after a 429)."""
    times: list[float] = []
    errors: list[BaseException] = []

    def one(number: int) -> None:
        started = time.monotonic()
        try:
            with app.app_context():
                result = app.extensions["meisa"].send(
                    "password_reset", f"user{number}@example.com"
                )
            assert result.status == "sent"
        except RateLimitError as error:
            if not refused or "paused" not in str(error):
                errors.append(error)
        except BaseException as error:
            errors.append(error)
        times.append(time.monotonic() - started)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return times


def list_answers(answer_list: Callable[[Exchange], None]) -> Callable[[Exchange], None]:
    def answer(exchange: Exchange) -> None:
        if exchange.path.endswith("/contacts/api/unsubscribed-emails/"):
            answer_list(exchange)
        else:
            exchange.send(response(200, SENT))

    return answer


@pytest.mark.parametrize(
    "name",
    ["the list always answers 429", "the list never answers", "the list drips"],
)
def test_the_first_sends_end_within_the_deadline_whatever_the_list_does(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    def answer_list(exchange: Exchange) -> None:
        if name == "the list always answers 429":
            limited = {"detail": "slow down", "code": "rate_limited"}
            exchange.send(response(429, limited, {"Retry-After": "30"}))
        elif name == "the list never answers":
            exchange.stall()
        else:
            exchange.drip(response(200, {"as_of": None, "count": 0, "emails": []}), every=0.5)

    with hostile(list_answers(answer_list)) as server, caplog.at_level(logging.WARNING):
        app = make_app(server.url)
        # A 429 for the key pauses every call of the host: no send draws another one.
        times = four_concurrent_sends(app, refused=name == "the list always answers 429")
        app.extensions["meisa"].close(app, 0)
    print(f"{name}: worst send {max(times):.2f} s (deadline {DEADLINE:g} s)")
    assert max(times) <= DEADLINE + CONNECT + 1.0, times
    # Said once way or another: the sends went on without the list.
    assert (
        "suppression list not loaded within 1.5s" in caplog.text
        or "suppression list could not be loaded" in caplog.text
    )


def test_a_send_whose_slot_only_an_answer_frees_goes_over_the_budget_at_its_deadline() -> None:
    # The list fetch in flight holds the one slot of 1/minute until the deadline: the send
    # waits its share of the deadline for it, then is made over the budget. No 429 paused
    # the host: it failed with "calls paused 0.0 s more by a 429", not made.
    with hostile(list_answers(lambda exchange: exchange.stall())) as server:
        app = make_app(server.url, MEISA_RATE_LIMIT="1/minute", MEISA_TIMEOUT=DEADLINE)
        with app.app_context():
            result = app.extensions["meisa"].send("password_reset", "ada@example.com")
        assert result.status == "sent"
        app.extensions["meisa"].close(app, 0)


def test_a_send_after_an_outage_is_made_though_delivery_still_pauses_for_it(
    emulator: Emulator,
) -> None:
    # Three failures in a row pause delivery 4 s (MEISA_RETRY_BASE_DELAY 1 s doubled twice),
    # past the send's deadline; Meisa is back meanwhile. The send is made: it failed at once
    # with a RateLimitError "calls paused 4.0 s more by a 429", though no 429 was seen.
    config = emulator_config(
        emulator, MEISA_DELIVERY="thread", MEISA_SEND_DEADLINE=2.0, MEISA_RETRY_BASE_DELAY=1.0
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    state = meisa.state(app)

    def failures() -> int:
        with state.store().read() as db:
            return int(Store.get_meta(db, "failures", 0))

    try:
        with app.app_context():
            meisa.is_suppressed("ada@example.com")  # the list loaded before the outage
            emulator.faults.outage(60)
            meisa.upsert({"email": "grace@example.com", "external_id": "g1"})
            assert wait_until(lambda: failures() >= OUTAGE_THRESHOLD)
            emulator.faults.clear()
            assert meisa.send("receipt", "ada@example.com").status == "sent"
    finally:
        state.close(0.0)


def test_a_list_that_loads_is_used_and_later_sends_wait_for_nothing() -> None:
    def answer_list(exchange: Exchange) -> None:
        exchange.send(response(200, {"as_of": None, "count": 1, "emails": ["user1@example.com"]}))

    with hostile(list_answers(answer_list)) as server:
        app = make_app(server.url)
        with app.app_context():
            meisa = app.extensions["meisa"]
            assert meisa.send("password_reset", "user1@example.com").status == "suppressed"
            assert meisa.send("password_reset", "user2@example.com").status == "sent"
        app.extensions["meisa"].close(app, 0)
    paths = [path for _, path in server.requests]
    assert paths.count("/api/v1/contacts/api/unsubscribed-emails/") == 1


def test_background_sends_while_the_first_list_loads_log_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A queued send waits for nothing here: delivery checks the list before its call.
    with hostile(list_answers(lambda exchange: exchange.stall())) as server:
        app = make_app(server.url)
        with caplog.at_level(logging.WARNING), app.app_context():
            meisa = app.extensions["meisa"]
            for number in range(5):
                result = meisa.send("receipt", f"user{number}@example.com", background=True)
                assert result.status == "queued"
        app.extensions["meisa"].close(app, 0)
    assert "not loaded within" not in caplog.text


def test_a_send_waits_out_the_hosts_pause_after_a_429_within_its_deadline_else_fails(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    # A 429 met by another call (another worker's) pauses the host (the store's meta): a
    # send then takes its slot once the pause is over, or, the pause outlasting its
    # deadline, fails at once with a RateLimitError, not called (it drew another 429).
    config = emulator_config(
        emulator, MEISA_DELIVERY="thread", MEISA_MAX_ATTEMPTS=1, MEISA_SEND_DEADLINE=DEADLINE
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    try:
        with app.app_context(), caplog.at_level(logging.DEBUG, "flask_meisa.client"):
            for retry_after in (1, 2 * DEADLINE):
                emulator.faults.force_429(1, retry_after=retry_after, path="/emails/trigger/")
                with pytest.raises(RateLimitError, match="Emulated fault"):
                    meisa.send("receipt", "ada@example.com")
                refused = emulator.requests_to("/emails/trigger/")[-1].time
                started = time.monotonic()
                if retry_after == 1:
                    assert meisa.send("receipt", "grace@example.com").status == "sent"
                    assert emulator.requests_to("/emails/trigger/")[-1].time - refused >= 1.0
                else:
                    with pytest.raises(RateLimitError, match=r"past the deadline; not made") as ra:
                        meisa.send("receipt", "linus@example.com")
                    assert ra.value.retry_after == pytest.approx(2 * DEADLINE, abs=0.2)
                    assert time.monotonic() - started < 1.0
                    assert len(emulator.requests_to("/emails/trigger/")) == 3
        # The log tells Meisa's two 429s from the send not made (it said "answered 429").
        assert caplog.text.count("answered 429") == 2, caplog.text
        assert "POST /emails/trigger/ not made: calls paused" in caplog.text, caplog.text
    finally:
        meisa.state(app).close(0.0)
