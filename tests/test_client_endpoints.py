"""MeisaClient against the emulator over loopback HTTP: every endpoint and its errors."""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterator
from typing import Any

import pytest

from flask_meisa.client import BULK_ENROLL_LIMIT
from flask_meisa.client import MeisaClient
from flask_meisa.errors import AuthenticationError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ConflictError
from flask_meisa.errors import NotFoundError
from flask_meisa.errors import PermissionDeniedError
from flask_meisa.errors import RateLimitError
from flask_meisa.errors import UnprocessableEntityError
from flask_meisa.errors import ValidationError
from flask_meisa.results import BulkEnrollOutcome
from flask_meisa.retry import RetryPolicy
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, deadline=5.0)


@pytest.fixture
def client(emulator: Any) -> Iterator[MeisaClient]:
    with MeisaClient(emulator.live_key, emulator.url, retry=FAST) as meisa:
        yield meisa


@pytest.fixture
def sequence(emulator: Any) -> str:
    emulator.add_sequence("onboarding", name="Onboarding")
    return "onboarding"


@pytest.fixture
def trigger(emulator: Any) -> str:
    emulator.add_trigger("verify_email")
    return "verify_email"


def last_body(emulator: Any, path: str) -> Any:
    return emulator.requests_to(path)[-1].body


# -- ping ------------------------------------------------------------------------------


def test_ping_live(client: MeisaClient) -> None:
    result = client.ping()
    assert result.environment == "live"
    assert {"contacts:write", "emails:trigger", "sequences:read"} <= set(result.scopes)
    assert result.product_name
    assert result.raw["status"] == "ok"


def test_ping_test_key(emulator: Any) -> None:
    with MeisaClient(emulator.test_key, emulator.url) as meisa:
        assert meisa.ping().environment == "test"


def test_wrong_key_is_401(emulator: Any) -> None:
    bogus = "meisa_live_" + "0" * 32
    with MeisaClient(bogus, emulator.url) as meisa, pytest.raises(AuthenticationError) as info:
        meisa.ping()
    assert info.value.status == 401
    assert info.value.code == "authentication_failed"
    assert info.value.endpoint == "GET /ping/"
    assert len(emulator.requests_to("/ping/")) == 1


def test_missing_scope_is_403(emulator: Any) -> None:
    key = emulator.create_key(scopes=["contacts:read"])
    with MeisaClient(key, emulator.url) as meisa:
        assert meisa.ping().scopes == ("contacts:read",)
        with pytest.raises(PermissionDeniedError) as info:
            meisa.upsert_contact("ada@example.com")
    assert info.value.status == 403
    assert info.value.endpoint == "POST /contacts/upsert/"
    assert emulator.contact(email="ada@example.com") is None


CONTACT_ID = "00000000-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("call", "scope"),
    [
        (lambda c: c.upsert_contact("ada@example.com"), "contacts:write"),
        (lambda c: c.add_tag(CONTACT_ID, tag_name="vip"), "contacts:write"),
        (lambda c: c.remove_tag(CONTACT_ID, tag_name="vip"), "contacts:write"),
        (lambda c: c.unsubscribed_emails(), "contacts:read"),
        (lambda c: c.track_event("opened", email="ada@example.com"), "events:track"),
        (lambda c: c.list_sequences(), "sequences:read"),
        (lambda c: c.contact_enrollments("ada@example.com"), "sequences:read"),
        (lambda c: c.enroll("ada@example.com", "onboarding"), "sequences:enroll"),
        (lambda c: c.bulk_enroll("onboarding", ["ada@example.com"]), "sequences:enroll"),
        (lambda c: c.trigger_email("verify_email", "ada@example.com"), "emails:trigger"),
    ],
    ids=[
        "upsert",
        "add_tag",
        "remove_tag",
        "unsubscribed",
        "track",
        "list",
        "enrollments",
        "enroll",
        "bulk_enroll",
        "trigger",
    ],
)
def test_a_403_names_the_scope_the_endpoint_needs(emulator: Any, call: Any, scope: str) -> None:
    key = emulator.create_key(scopes=[])
    with (
        MeisaClient(key, emulator.url, retry=FAST) as meisa,
        pytest.raises(PermissionDeniedError) as info,
    ):
        call(meisa)
    error = info.value
    assert error.scope == scope
    assert f"'{scope}'" in error.message  # the emulator says which scope it wanted
    assert str(error).endswith(f"(this call needs the key scope {scope})")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.scope, str(copy), copy.code) == (scope, str(error), "missing_scope")


def test_a_bare_403_still_names_the_scope() -> None:
    def forbidden(exchange: Exchange) -> None:
        exchange.send(response(403, {"detail": "Forbidden."}))

    with (
        hostile(forbidden) as server,
        MeisaClient("meisa_live_" + "n0sc0pe" * 5, server.url, retry=FAST) as meisa,
    ):
        with pytest.raises(PermissionDeniedError) as info:
            meisa.track_event("opened", email="ada@example.com")
        with pytest.raises(PermissionDeniedError) as bare:
            meisa.ping()  # ping needs no scope, so its 403 names none
    assert str(info.value) == (
        "POST /events/track/ answered 403: Forbidden. (this call needs the key scope events:track)"
    )
    assert bare.value.scope is None
    assert str(bare.value) == "GET /ping/ answered 403: Forbidden."


def test_rate_limited_key_is_429(emulator: Any) -> None:
    key = emulator.create_key(rate_limit="1/minute")
    with MeisaClient(key, emulator.url, retry=RetryPolicy.never()) as meisa:
        meisa.ping()
        with pytest.raises(RateLimitError) as info:
            meisa.ping()
    assert info.value.status == 429
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 60


# -- contacts --------------------------------------------------------------------------


def test_upsert_creates_then_updates(client: MeisaClient, emulator: Any) -> None:
    created = client.upsert_contact(
        " Ada@Example.com ",
        external_id=42,
        first_name="Ada",
        source="signup",
        custom_fields={"plan": "free", "mrr": 0},
        tag_names=["trial"],
    )
    assert created.created is True
    assert created.email == "ada@example.com"
    assert created.external_id == "42"
    assert created.first_name == "Ada"
    assert created.source == "signup"
    assert created.tags == ("trial",)
    assert created.custom_fields == {"plan": "free", "mrr": 0}
    assert created.created_at is not None and created.created_at.tzinfo is not None
    assert created.id is not None and re.fullmatch(r"[0-9a-f-]{36}", created.id)

    updated = client.upsert_contact(
        "ada@example.com", external_id="42", custom_fields={"plan": "pro"}
    )
    assert updated.created is False
    assert updated.id == created.id
    assert updated.custom_fields == {"plan": "pro", "mrr": 0}  # merged, not replaced
    assert updated.first_name == "Ada"
    assert updated.source == "signup"  # kept from creation


def test_an_address_typed_with_a_decomposed_domain_is_the_same_contact(
    client: MeisaClient, emulator: Any
) -> None:
    created = client.upsert_contact("zoe@ex\u00e4mple.com", first_name="Zoe")
    again = client.upsert_contact("zoe@exa\u0308mple.com", last_name="Adams")
    assert again.created is False
    assert again.id == created.id
    assert last_body(emulator, "/contacts/upsert/")["email"] == "zoe@ex\u00e4mple.com"


def test_upsert_body_drops_none_fields(client: MeisaClient, emulator: Any) -> None:
    client.upsert_contact("grace@example.com", external_id="7", last_name=None)
    assert last_body(emulator, "/contacts/upsert/") == {
        "email": "grace@example.com",
        "external_id": "7",
    }


def test_track_event(client: MeisaClient, emulator: Any) -> None:
    contact = client.upsert_contact("ada@example.com", external_id="u1")
    by_email = client.track_event("exported_report", email="ADA@example.com", properties={"n": 3})
    assert by_email.contact_id == contact.id
    assert by_email.event_name == "exported_report"
    assert by_email.timestamp is not None
    by_id = client.track_event("logged_in", external_id="u1")
    assert by_id.contact_id == contact.id
    assert last_body(emulator, "/events/track/") == {
        "event_name": "logged_in",
        "external_id": "u1",
    }


def test_track_unknown_contact_is_404(client: MeisaClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.track_event("logged_in", email="nobody@example.com")
    assert info.value.code == "contact_not_found"
    assert info.value.endpoint == "POST /events/track/"
    assert "nobody@example.com" not in str(info.value)


def test_add_and_remove_tag(client: MeisaClient) -> None:
    contact = client.upsert_contact("ada@example.com")
    assert contact.id is not None
    added = client.add_tag(contact.id, tag_name="vip")
    assert added.contact_id == contact.id
    assert added.tag_name == "vip"
    assert added.tags == ("vip",)
    removed = client.remove_tag(contact.id, tag_name="vip")
    assert removed.tags == ()


def test_tag_unknown_contact_is_404(client: MeisaClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.add_tag("00000000-0000-0000-0000-000000000000", tag_name="vip")
    assert info.value.endpoint == "POST /contacts/{id}/add_tag/"


@pytest.mark.parametrize("contact_id", ["/", "a/b", ".", ".."])
def test_a_contact_id_that_is_not_one_path_segment_is_refused_before_a_request(
    client: MeisaClient, emulator: Any, contact_id: str
) -> None:
    emulator.clear_requests()
    with pytest.raises(ValidationError) as info:
        client.remove_tag(contact_id, tag_name="vip")
    assert info.value.field == "contact_id"
    assert emulator.requests == []


def test_tag_unknown_tag_id_is_404(client: MeisaClient) -> None:
    contact = client.upsert_contact("ada@example.com")
    assert contact.id is not None
    with pytest.raises(NotFoundError) as info:
        client.add_tag(contact.id, tag_id="no-such-tag")
    assert info.value.code == "tag_not_found"


def test_unsubscribed_emails(client: MeisaClient, emulator: Any) -> None:
    emulator.suppress("Gone@Example.com")
    result = client.unsubscribed_emails()
    assert "gone@example.com" in result.emails
    assert "GONE@example.com" in result
    assert "here@example.com" not in result
    assert result.count == len(result.emails)
    assert result.as_of is not None


# -- sequences -------------------------------------------------------------------------


def test_enroll(client: MeisaClient, sequence: str) -> None:
    result = client.enroll("ada@example.com", sequence, metadata={"plan": "pro"})
    assert result.status == "enrolled"
    assert result.sequence_slug == sequence
    assert result.enrollment_id and result.contact_id


def test_enroll_twice_is_409(client: MeisaClient, sequence: str, emulator: Any) -> None:
    client.enroll("ada@example.com", sequence)
    with pytest.raises(ConflictError) as info:
        client.enroll("ada@example.com", sequence)
    assert info.value.code == "already_enrolled"
    assert len(emulator.requests_to("/sequences/enroll/")) == 2


def test_enroll_suppressed(client: MeisaClient, sequence: str, emulator: Any) -> None:
    emulator.suppress("gone@example.com")
    with pytest.raises(UnprocessableEntityError) as info:
        client.enroll("gone@example.com", sequence)
    assert info.value.code == "recipient_suppressed"
    forced = client.enroll("gone@example.com", sequence, override_unsubscribe=True)
    assert forced.status == "enrolled"
    assert last_body(emulator, "/sequences/enroll/")["override_unsubscribe"] is True


def test_enroll_unknown_sequence_is_404(client: MeisaClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.enroll("ada@example.com", "no-such-sequence")
    assert info.value.code == "sequence_not_found"


def test_enroll_inactive_sequence_is_400(client: MeisaClient, emulator: Any) -> None:
    emulator.add_sequence("winter", status="paused")
    with pytest.raises(BadRequestError) as info:
        client.enroll("ada@example.com", "winter")
    assert info.value.code == "sequence_inactive"


def test_bulk_enroll_splits_and_combines(
    client: MeisaClient, sequence: str, emulator: Any
) -> None:
    emails = [f"user{i}@example.com" for i in range(1200)]
    client.enroll(emails[0], sequence)  # already enrolled → skipped
    emulator.suppress(emails[700])  # suppressed → skipped
    result = client.bulk_enroll(sequence, [*emails, "USER5@example.com"])  # a repeat
    calls = emulator.requests_to("/sequences/api/bulk-enroll/")
    assert [len(call.body["emails"]) for call in calls] == [BULK_ENROLL_LIMIT, 500, 200]
    assert result.sequence_slug == sequence
    assert (result.enrolled, result.skipped) == (1198, 2)
    assert len(result.results) == 1200 and len(result.raw) == 3
    assert result.results[0] == BulkEnrollOutcome("user0@example.com", "already_enrolled")
    assert result.results[700].status == "suppressed"
    assert result.results[1199] == BulkEnrollOutcome("user1199@example.com", "enrolled")


def test_bulk_enroll_nothing_makes_no_call(client: MeisaClient, emulator: Any) -> None:
    result = client.bulk_enroll("onboarding", [])
    assert (result.enrolled, result.skipped, result.results) == (0, 0, ())
    assert emulator.requests == []


def test_list_sequences(client: MeisaClient, emulator: Any) -> None:
    emulator.add_sequence("onboarding", name="Onboarding")
    emulator.add_sequence("winback", name="Win back", status="paused")
    active = {s.slug for s in client.list_sequences()}
    assert "onboarding" in active and "winback" not in active
    every = {s.slug: s for s in client.list_sequences(status="all")}
    assert every["winback"].status == "paused"
    assert every["winback"].name == "Win back"
    assert [s.slug for s in client.list_sequences(status="all", search="win")] == ["winback"]


def test_list_sequences_bad_status_is_400_with_field_errors(client: MeisaClient) -> None:
    with pytest.raises(BadRequestError) as info:
        client.list_sequences(status="bogus")
    assert info.value.code == "invalid"
    assert list(info.value.field_errors) == ["status"]
    assert info.value.field_errors["status"]


def test_contact_enrollments(client: MeisaClient, sequence: str) -> None:
    client.enroll("ada@example.com", sequence)
    result = client.contact_enrollments("ADA@example.com")
    assert result.email == "ada@example.com"
    assert [(e.sequence_slug, e.status) for e in result.enrollments] == [(sequence, "active")]
    assert result.enrollments[0].enrolled_at is not None


def test_contact_enrollments_unknown_is_404(client: MeisaClient) -> None:
    with pytest.raises(NotFoundError):
        client.contact_enrollments("nobody@example.com")


# -- transactional email ---------------------------------------------------------------


def test_trigger_sent(client: MeisaClient, trigger: str, emulator: Any) -> None:
    result = client.trigger_email(
        trigger, "Ada@Example.com", variables={"code": "123456"}, recipient={"first_name": "Ada"}
    )
    assert result.status == "sent"
    assert result.http_status == 200
    assert result.email_send_id and result.contact_id
    assert result.contact_created is True
    assert result.duplicate is False
    assert result.idempotency_key and re.fullmatch(r"[0-9a-f]{32}", result.idempotency_key)
    assert last_body(emulator, "/emails/trigger/")["idempotency_key"] == result.idempotency_key
    assert len(emulator.sends()) == 1


def test_trigger_repeat_key_is_deduplicated(
    client: MeisaClient, trigger: str, emulator: Any
) -> None:
    first = client.trigger_email(trigger, "ada@example.com", idempotency_key="otp:42:123456")
    again = client.trigger_email(trigger, "ada@example.com", idempotency_key="otp:42:123456")
    assert first.idempotency_key == again.idempotency_key == "otp:42:123456"
    assert again.duplicate is True
    assert again.email_send_id == first.email_send_id
    assert len(emulator.sends()) == 1


def test_trigger_scheduled(client: MeisaClient, emulator: Any) -> None:
    emulator.add_trigger("nudge", delay_seconds=3600)
    result = client.trigger_email("nudge", "ada@example.com")
    assert (result.status, result.http_status) == ("scheduled", 202)


def test_trigger_skipped(client: MeisaClient, emulator: Any) -> None:
    emulator.add_trigger("pro_only", conditions=[{"field": "first_name", "equals": "Pro"}])
    result = client.trigger_email("pro_only", "ada@example.com")
    assert (result.status, result.reason) == ("skipped", "conditions_not_met")
    assert emulator.sends() == []


def test_trigger_suppressed_is_422(client: MeisaClient, trigger: str, emulator: Any) -> None:
    emulator.suppress("gone@example.com")
    with pytest.raises(UnprocessableEntityError) as info:
        client.trigger_email(trigger, "gone@example.com")
    assert info.value.code == "recipient_suppressed"
    assert "gone@example.com" not in str(info.value)
    assert emulator.sends() == []


def test_trigger_without_sender_is_422(client: MeisaClient, trigger: str, emulator: Any) -> None:
    emulator.set_sender(False)
    with pytest.raises(UnprocessableEntityError) as info:
        client.trigger_email(trigger, "ada@example.com")
    assert info.value.code == "no_sender"


def test_trigger_unknown_key_is_400(client: MeisaClient, emulator: Any) -> None:
    with pytest.raises(BadRequestError) as info:
        client.trigger_email("no_such_trigger", "ada@example.com")
    assert info.value.status == 400
    assert "trigger_key" in info.value.field_errors
    assert len(emulator.requests_to("/emails/trigger/")) == 1


# -- the wire --------------------------------------------------------------------------


def test_headers_and_compact_json(client: MeisaClient, emulator: Any) -> None:
    client.upsert_contact("ada@example.com", custom_fields={"plan": "pro"})
    [request] = emulator.requests_to("/contacts/upsert/")
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert re.fullmatch(r"flask-meisa/\d+\.\d+\.\d+\S* python-requests/\S+", headers["user-agent"])
    assert headers["accept"] == "application/json"
    assert headers["content-type"] == "application/json"
    assert request.key == emulator.live_key
    assert headers["content-length"] == str(
        len(b'{"email":"ada@example.com","custom_fields":{"plan":"pro"}}')
    )


def test_one_pooled_connection_serves_many_calls(
    client: MeisaClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        for _ in range(5):
            client.ping()
    opened = [r for r in caplog.records if "Starting new HTTP connection" in r.getMessage()]
    assert len(opened) == 1
