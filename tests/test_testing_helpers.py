"""flask_meisa.testing: the recorder and the pytest fixtures for users' own tests."""

from __future__ import annotations

import logging
import textwrap

import pytest
from flask import Flask
from flask import current_app

from flask_meisa import Meisa
from flask_meisa.testing import record_operations

pytest_plugins = ["pytester"]


def test_record_operations_snapshots_what_would_be_delivered() -> None:
    app = Flask(__name__)
    app.config.update(MEISA_API_KEY="meisa_test_recorder_key_0000", TESTING=True)
    meisa = Meisa(app)
    fields = {"plan": "free"}
    payload = {"email": "ada@example.com", "custom_fields": fields}
    with app.app_context(), record_operations() as recorded:
        meisa.upsert(payload)
        fields["plan"] = "pro"  # the recording is a snapshot
        meisa.track("opened_app", email="ada@example.com")
    assert [op.kind for op in recorded] == ["upsert", "track"]
    assert recorded[0].payload["custom_fields"] == {"plan": "free"}


def test_in_development_with_delivery_off_each_operation_is_logged_once_readably(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False, DEBUG=True)
    meisa = Meisa(app)
    with caplog.at_level(logging.INFO, logger="flask_meisa"), app.app_context():
        meisa.upsert({"email": "ada@example.com", "custom_fields": {"plan": "pro"}})
        meisa.track("opened_app", email="ada@example.com")
        result = meisa.send("password_reset", "ada@example.com", variables={"url": "/r/1"})
    assert result.status == "disabled"
    lines = [r.getMessage() for r in caplog.records if "would" in r.getMessage()]
    assert lines == [
        'meisa (delivery off) would upsert: {"custom_fields": {"plan": "pro"},'
        ' "email": "ada@example.com"}',
        'meisa (delivery off) would track: {"email": "ada@example.com",'
        ' "event_name": "opened_app"}',
        'meisa (delivery off) would send: {"idempotency_key": "'
        + str(result.idempotency_key)
        + '", "to_email": "ada@example.com", "trigger_key": "password_reset",'
        ' "variables": {"url": "/r/1"}}',
    ]
    app.debug = False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flask_meisa"), app.app_context():
        meisa.upsert({"email": "ada@example.com"})
    assert not any("would" in r.getMessage() for r in caplog.records)


def test_record_operations_only_hears_its_own_app() -> None:
    first, second = Flask("first"), Flask("second")
    for app in (first, second):
        app.config.update(MEISA_ENABLED=False)
    meisa = Meisa()
    meisa.init_app(first)
    meisa.init_app(second)
    with record_operations(first) as recorded:
        with second.app_context():
            meisa.upsert({"email": "b@example.com"})
        with first.app_context():
            meisa.upsert({"email": "a@example.com"})
    assert [op.payload["email"] for op in recorded] == ["a@example.com"]


def test_record_operations_given_current_app_hears_the_app_behind_it() -> None:
    # A signal's sender is matched by identity: the proxy is never the sender, and a test
    # asserting "nothing was queued" would pass whatever happened.
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    meisa = Meisa(app)
    with app.app_context(), record_operations(current_app) as recorded:
        meisa.upsert({"email": "ada@example.com"})
    assert [op.kind for op in recorded] == ["upsert"]


def test_the_fixtures_give_an_emulator_and_config_for_a_users_app(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest('pytest_plugins = ["flask_meisa.testing"]')
    pytester.makepyfile(
        textwrap.dedent(
            """
            from flask import Flask
            from flask_meisa import Meisa

            def test_upsert_reaches_the_emulator(meisa_emulator, meisa_config):
                app = Flask(__name__)
                app.config.update(meisa_config)
                meisa = Meisa(app)
                with app.app_context():
                    meisa.upsert({"email": "user@example.com", "external_id": 9})
                assert meisa_emulator.contact(external_id="9")["email"] == "user@example.com"
            """
        )
    )
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
