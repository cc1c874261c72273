"""Properties of payloads.py and bodies.py: any input gives plain JSON the emulator takes,
or a ValidationError naming the field; nothing else ever escapes."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_meisa._payloads import MAX_EMAIL_LENGTH
from flask_meisa._payloads import MAX_TEXT_LENGTH
from flask_meisa._payloads import json_object
from flask_meisa._payloads import normalize_email
from flask_meisa._payloads import normalize_external_id
from flask_meisa._payloads import require_text
from flask_meisa._payloads import text_list
from flask_meisa._payloads import to_json_value
from flask_meisa._payloads import track_body
from flask_meisa._payloads import trigger_body
from flask_meisa._payloads import unique_emails
from flask_meisa._payloads import upsert_body
from flask_meisa.emulator.call import Payload
from flask_meisa.emulator.call import is_valid_email
from flask_meisa.errors import ValidationError
from flask_meisa.operations import Operation
from tests import property_strategies as s
from tests.test_payloads import BrokenOffset

FAST = settings(deadline=None, max_examples=150)
BODIES = settings(deadline=None, max_examples=120)
#: The size limit is the request body's, checked by the body functions, not per value.
UNLIMITED = 1 << 30


def _server_string_ok(value: str) -> bool:
    """Whether the emulator's string field reader takes ``value``."""
    payload = Payload({"f": value})
    return payload.string("f") == value and not payload.errors


@FAST
@given(s.values)
# Each example once escaped as something other than a ValidationError, or was accepted and
# then failed in json.dumps or the UTF-8 encoding of the body.
@example(Decimal("1E+5000"))  # int past Python's 4,300-digit limit
@example(dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=5))))  # OverflowError
@example(dt.datetime(2024, 1, 1, tzinfo=BrokenOffset()))  # ValueError
@example({"\ud800": 1})  # a key with no UTF-8 form
def test_to_json_value_gives_stable_json_or_names_the_field(value: Any) -> None:
    try:
        converted = to_json_value(value, "custom_fields")
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field.startswith("custom_fields")
        s.assert_no_values_in(error, value)
        return
    s.assert_sendable({"custom_fields": converted}, max_bytes=UNLIMITED)
    assert to_json_value(converted, "custom_fields") == converted


@FAST
@given(s.objects)
def test_json_object_takes_mappings_only(value: Any) -> None:
    try:
        converted = json_object(value, "properties")
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field.startswith("properties")
        return
    assert converted is None or isinstance(converted, dict)
    s.assert_sendable({"properties": converted}, max_bytes=UNLIMITED)


@FAST
@given(s.emails)
@example("a\ud800@example.com")  # accepted; no UTF-8 form
@example("a\u200b@example.com")  # accepted; Meisa refuses invisible characters
@example("İ" * 60 + "@" + "x" * 180 + ".com")  # 300 characters once lowercased
def test_an_accepted_email_is_one_the_server_accepts(value: Any) -> None:
    try:
        email = normalize_email(value, "to_email")
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field == "to_email"
        s.assert_no_values_in(error, value)
        return
    assert len(email) <= MAX_EMAIL_LENGTH
    assert email == email.strip() == email.lower()
    assert normalize_email(email) == email
    assert is_valid_email(email), "the client accepts an address Meisa refuses"
    email.encode("utf-8")


@FAST
@given(s.labels)
@example("opened\udfff")  # accepted; no UTF-8 form
def test_an_accepted_text_is_one_the_server_accepts(value: Any) -> None:
    try:
        text = require_text(value, "event_name")
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field == "event_name"
        return
    assert 1 <= len(text) <= MAX_TEXT_LENGTH
    assert text == text.strip()
    assert require_text(text, "event_name") == text
    text.encode("utf-8")
    assert _server_string_ok(text)


@FAST
@given(s.external_ids)
@example(10**300)  # accepted; 301 characters, Meisa takes 255
def test_an_accepted_external_id_is_a_string_the_server_accepts(value: Any) -> None:
    try:
        external_id = normalize_external_id(value)
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field == "external_id"
        return
    assert isinstance(external_id, str)
    assert normalize_external_id(external_id) == external_id
    external_id.encode("utf-8")
    assert _server_string_ok(external_id)


@FAST
@given(st.one_of(st.lists(s.labels, max_size=5), s.labels))
def test_text_list_checks_every_item(value: Any) -> None:
    try:
        items = text_list(value, "tag_names")
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field.startswith("tag_names")
        return
    assert isinstance(value, (list, tuple)) and len(items) == len(value)
    assert all(_server_string_ok(item) for item in items)


@FAST
@given(st.one_of(st.lists(s.emails, max_size=5), s.emails, st.sets(s.valid_emails, max_size=3)))
def test_unique_emails_normalises_and_deduplicates(value: Any) -> None:
    try:
        addresses = unique_emails(value, "emails")
    except ValidationError as error:
        s.assert_validation_error(error)
        assert error.field.startswith("emails")
        return
    assert len(addresses) == len(set(addresses))
    assert all(is_valid_email(address) for address in addresses)


@BODIES
@given(s.upsert_payloads())
@example({"email": "a@example.com", "custom_fields": {"x": "x" * 600_000}})  # over 512 KiB
def test_upsert_body_is_json_and_stable(fields: dict[Any, Any]) -> None:
    try:
        body = upsert_body(fields)
        # The size is checked once, when the operation is made (the extension's calls).
        Operation.checked("upsert", body)
    except ValidationError as error:
        s.assert_validation_error(error)
        s.assert_no_values_in(error, fields)
        return
    s.assert_sendable(body)
    assert upsert_body(body) == body


@BODIES
@given(s.labels, s.emails, s.external_ids, s.objects)
def test_track_body_is_json_and_stable(
    event_name: Any, email: Any, external_id: Any, properties: Any
) -> None:
    try:
        body = track_body(event_name, email=email, external_id=external_id, properties=properties)
    except ValidationError as error:
        s.assert_validation_error(error)
        s.assert_no_values_in(error, [email, properties])
        return
    s.assert_sendable(body)
    assert track_body(**body) == body


@BODIES
@given(s.labels, s.emails, s.objects, s.objects, st.one_of(st.none(), s.labels))
def test_trigger_body_is_json_and_carries_an_idempotency_key(
    trigger_key: Any, to_email: Any, variables: Any, recipient: Any, idempotency_key: Any
) -> None:
    try:
        body = trigger_body(
            trigger_key,
            to_email,
            variables=variables,
            recipient=recipient,
            idempotency_key=idempotency_key,
        )
    except ValidationError as error:
        s.assert_validation_error(error)
        s.assert_no_values_in(error, [to_email, variables, recipient])
        return
    s.assert_sendable(body)
    assert isinstance(body["idempotency_key"], str) and body["idempotency_key"]
    assert trigger_body(**body) == body
