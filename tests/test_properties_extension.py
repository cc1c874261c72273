"""Properties of the extension's public calls (upsert, track, send, the contact mapper):
every call either succeeds or raises a ValidationError at the call site; a refused call
queues nothing, an accepted one queues plain JSON that the client and Meisa accept, and
no input stops the delivery thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_meisa import Meisa
from flask_meisa._contacts import default_contact_mapper
from flask_meisa._contacts import map_contact
from flask_meisa._payloads import track_body
from flask_meisa._payloads import trigger_body
from flask_meisa._payloads import upsert_body
from flask_meisa.emulator import Emulator
from flask_meisa.errors import APIError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ValidationError
from flask_meisa.operations import Operation
from flask_meisa.signals import delivery_failed
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests import property_strategies as s

SETTINGS = settings(deadline=None, max_examples=100)
DELIVERED = settings(deadline=None, max_examples=40)
TRIGGERS = ("verification_code", "receipt", "welcome_delayed", "pro_only")

users = s.mostly(
    st.builds(
        lambda email, user_id: SimpleNamespace(
            email=email, get_id=lambda: user_id, first_name="Ada", plan=s.Plan.PRO
        ),
        s.valid_emails,
        st.integers(1, 10**6),
    ),
    s.user_objects(),
)
event_names = s.mostly(s.names, s.labels)
trigger_keys = s.mostly(st.sampled_from(TRIGGERS), s.labels)
emails = s.mostly(s.valid_emails, s.emails)
objects = s.mostly(s.plain_objects, s.objects)
backgrounds = s.mostly(st.booleans(), st.one_of(st.none(), st.integers(0, 1), s.texts))


def make_app(**config: Any) -> tuple[Flask, Meisa]:
    """An app with the extension (custom field ``plan`` read from the user)."""
    app = Flask(__name__)
    app.config.update(MEISA_CUSTOM_FIELDS={"plan": "plan"}, MEISA_SYNC_ON_LOGIN=False)
    app.config.update(config)
    meisa = Meisa(app)
    return app, meisa


@pytest.fixture(scope="module")
def offline() -> tuple[Flask, Meisa]:
    """An app whose delivery is suppressed (``TESTING``): operations are only recorded."""
    return make_app(TESTING=True, MEISA_API_KEY="meisa_test_offline_properties_0000")


@pytest.fixture(scope="module")
def module_emulator() -> Iterator[Emulator]:
    """One emulator for the module (no rate limit, no send guardrail)."""
    with Emulator(seed="demo", rate_limit=None, send_guardrail=None) as emulator:
        yield emulator


def check_operation(operation: Operation) -> None:
    """A recorded operation holds plain JSON that the client's body functions take as
    it is (so the client accepts it when it is delivered)."""
    s.assert_sendable(operation.payload)
    payload = dict(operation.payload)
    if operation.kind == "upsert":
        assert upsert_body(payload) == payload
    elif operation.kind == "track":
        assert track_body(**payload) == payload
        if operation.contact is not None:
            s.assert_sendable(operation.contact)
            assert upsert_body(operation.contact) == operation.contact
    else:
        assert trigger_body(**payload) == payload


def run_call(app: Flask, in_request: bool, call: Any) -> tuple[Any, list[Operation]]:
    """Run ``call`` in an app context or a request; return its result (or the
    ValidationError it raised) and what was recorded."""
    with ExitStack() as stack:
        recorded = stack.enter_context(record_operations(app))
        stack.enter_context(app.test_request_context() if in_request else app.app_context())
        try:
            result = call()
        except ValidationError as error:
            s.assert_validation_error(error)
            result = error
    return result, recorded


@SETTINGS
@given(st.one_of(s.upsert_payloads(), users, st.none()), st.booleans())
def test_upsert(offline: tuple[Flask, Meisa], user_or_payload: Any, in_request: bool) -> None:
    app, meisa = offline
    result, recorded = run_call(app, in_request, lambda: meisa.upsert(user_or_payload))
    if isinstance(result, ValidationError):
        assert recorded == [], "a refused upsert was queued"
        return
    (operation,) = recorded
    assert operation.kind == "upsert"
    check_operation(operation)


@SETTINGS
@given(
    event_names,
    st.one_of(st.none(), users),
    emails,
    s.mostly(st.none(), s.external_ids),
    objects,
    st.booleans(),
)
def test_track(
    offline: tuple[Flask, Meisa],
    event_name: Any,
    user: Any,
    email: Any,
    external_id: Any,
    properties: Any,
    in_request: bool,
) -> None:
    app, meisa = offline
    if user is not None:
        email = external_id = None
    result, recorded = run_call(
        app,
        in_request,
        lambda: meisa.track(
            event_name, user=user, email=email, external_id=external_id, properties=properties
        ),
    )
    if isinstance(result, ValidationError):
        assert recorded == [], "a refused event was queued"
        return
    (operation,) = recorded
    assert operation.kind == "track"
    check_operation(operation)


@SETTINGS
@given(trigger_keys, emails, objects, objects, s.mostly(st.none(), s.labels), backgrounds)
def test_send(
    offline: tuple[Flask, Meisa],
    trigger_key: Any,
    to_email: Any,
    variables: Any,
    recipient: Any,
    idempotency_key: Any,
    background: Any,
) -> None:
    app, meisa = offline
    result, recorded = run_call(
        app,
        False,
        lambda: meisa.send(
            trigger_key,
            to_email,
            variables=variables,
            recipient=recipient,
            idempotency_key=idempotency_key,
            background=background,
        ),
    )
    if isinstance(result, ValidationError):
        assert recorded == [], "a refused send was queued"
        return
    assert result.status == ("queued" if background else "disabled")
    (operation,) = recorded
    assert operation.kind == "send"
    assert operation.payload["idempotency_key"] == result.idempotency_key
    check_operation(operation)


@SETTINGS
@given(emails)
def test_is_suppressed(offline: tuple[Flask, Meisa], email: Any) -> None:
    app, meisa = offline
    with app.app_context():
        try:
            answer = meisa.is_suppressed(email)
        except ValidationError as error:
            s.assert_validation_error(error)
            return
    assert answer is False


@SETTINGS
@given(users, st.one_of(st.none(), s.labels))
def test_default_contact_mapper(user: Any, source: Any) -> None:
    def mapper(user: Any) -> Any:
        return default_contact_mapper(user, custom_fields={"plan": "plan"}, source=source)

    try:
        payload = map_contact(mapper, user)
    except ValidationError as error:
        s.assert_validation_error(error)
        return
    s.assert_sendable(payload)
    assert upsert_body(payload) == payload


@SETTINGS
@given(st.one_of(s.upsert_payloads(), s.values, users))
def test_a_custom_mapper_may_return_anything(mapped: Any) -> None:
    try:
        payload = map_contact(lambda user: mapped, object())
    except ValidationError as error:
        s.assert_validation_error(error)
        return
    s.assert_sendable(payload)


# -- delivered for real ------------------------------------------------------------------


def _failures(app: Flask) -> Any:
    failures: list[BaseException] = []

    def receiver(sender: Flask, operation: Operation, error: BaseException, **extra: Any) -> None:
        failures.append(error)

    return failures, delivery_failed.connected_to(receiver, sender=app)


ACCEPTABLE = {"contact_not_found", "invalid_trigger", "recipient_suppressed", "email_conflict"}


def assert_acceptable(error: BaseException) -> None:
    """A failure Meisa may answer to valid input; never a refused field or a bug."""
    assert isinstance(error, APIError), repr(error)
    if isinstance(error, BadRequestError) and error.code == "invalid":
        pytest.fail(f"accepted at the call site, refused by Meisa: {error.field_errors}")
    assert error.code in ACCEPTABLE, repr(error)


calls = st.one_of(
    st.tuples(st.just("upsert"), st.one_of(s.upsert_payloads(), users)),
    st.tuples(
        st.just("track"), st.tuples(event_names, emails, st.one_of(st.none(), users), objects)
    ),
    st.tuples(st.just("send"), st.tuples(trigger_keys, emails, objects, objects, st.booleans())),
)


def make_call(meisa: Meisa, call: tuple[str, Any]) -> None:
    """Make one public call described by ``calls``."""
    kind, args = call
    if kind == "upsert":
        meisa.upsert(args)
    elif kind == "track":
        event_name, email, user, properties = args
        if user is not None:
            meisa.track(event_name, user=user, properties=properties)
        else:
            meisa.track(event_name, email=email, properties=properties)
    else:
        trigger_key, to_email, variables, recipient, background = args
        meisa.send(
            trigger_key, to_email, variables=variables, recipient=recipient, background=background
        )


def test_sync_delivery_meisa_accepts_what_the_call_site_accepted(
    module_emulator: Emulator,
) -> None:
    app, meisa = make_app(**emulator_config(module_emulator))
    failures, connected = _failures(app)

    @DELIVERED
    @given(calls)
    def deliver(call: tuple[str, Any]) -> None:
        with app.app_context():
            try:
                make_call(meisa, call)
            except ValidationError as error:
                s.assert_validation_error(error)
            except APIError as error:  # a synchronous send raises Meisa's refusal
                assert_acceptable(error)
        for failure in failures:
            assert_acceptable(failure)
        failures.clear()

    try:
        with connected:
            deliver()
    finally:
        meisa.state(app).close(5)


def _delivery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flask-meisa-delivery")]


def test_no_input_stops_the_delivery_thread(module_emulator: Emulator) -> None:
    app, meisa = make_app(**emulator_config(module_emulator, MEISA_DELIVERY="thread"))
    failures, connected = _failures(app)
    before = set(_delivery_threads())

    @DELIVERED
    @given(calls, st.booleans())
    def enqueue(call: tuple[str, Any], in_request: bool) -> None:
        with app.test_request_context() if in_request else app.app_context():
            try:
                make_call(meisa, call)
            except ValidationError as error:
                s.assert_validation_error(error)
            except APIError as error:
                assert_acceptable(error)

    try:
        with connected:
            enqueue()
            with app.app_context():
                assert meisa.flush(10), "operations left undelivered"
                status = meisa.status()
        threads = [t for t in _delivery_threads() if t not in before]
        assert threads and all(t.is_alive() for t in threads), "the delivery thread died"
        assert status.pending == 0
        for failure in failures:
            assert_acceptable(failure)
    finally:
        meisa.state(app).close(5)
    assert not any(t.is_alive() for t in threads)
