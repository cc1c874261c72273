"""Result parsing is defensive: any 2xx body gives a result, never an exception."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from flask_meisa.results import BulkEnrollOutcome
from flask_meisa.results import BulkEnrollResult
from flask_meisa.results import Contact
from flask_meisa.results import ContactEnrollments
from flask_meisa.results import Enrollment
from flask_meisa.results import PingResult
from flask_meisa.results import Sequence
from flask_meisa.results import TagResult
from flask_meisa.results import TrackResult
from flask_meisa.results import TriggerResult
from flask_meisa.results import UnsubscribedEmails

ODD_BODIES: list[Any] = [
    None,
    "",
    "not json",
    0,
    [],
    [1, "x", None],
    {},
    {"status": 5, "tags": "vip", "emails": "a@x.io", "scopes": {"a": 1}, "results": 3},
    {"contact": [], "sequence": "x", "enrollment": 7, "product": ["p"], "custom_fields": []},
    {"created_at": "yesterday", "timestamp": 12, "as_of": "2024-13-45T99:00:00Z"},
]


@pytest.mark.parametrize("body", ODD_BODIES)
def test_odd_bodies_never_crash(body: Any) -> None:
    ping = PingResult.from_body(body)
    assert ping.environment is None or isinstance(ping.environment, str)
    contact = Contact.from_body(body, 201)
    assert contact.created is True
    assert isinstance(contact.custom_fields, dict) and isinstance(contact.tags, tuple)
    assert contact.created_at is None
    assert TrackResult.from_body(body).timestamp is None
    assert TagResult.from_body(body, "c-1", "vip").contact_id == "c-1"
    unsubscribed = UnsubscribedEmails.from_body(body)
    assert unsubscribed.emails == frozenset() and unsubscribed.as_of is None
    assert Enrollment.from_body(body, "onboarding").sequence_slug == "onboarding"
    bulk = BulkEnrollResult.combine("onboarding", [body, body])
    assert (bulk.enrolled, bulk.skipped, bulk.results) == (0, 0, ())
    assert Sequence.list_from_body(body) == ()
    assert ContactEnrollments.from_body(body, "a@x.io").enrollments == ()
    trigger = TriggerResult.from_body(body, 200, "k")
    assert trigger.status in ("sent", "skipped")
    assert trigger.idempotency_key == "k"
    assert trigger.raw is body


def test_contact_full_body() -> None:
    body = {
        "id": "c-1",
        "email": "ada@example.com",
        "external_id": 42,
        "first_name": "Ada",
        "custom_fields": {"plan": "pro"},
        "tags": [{"id": "t1", "name": "vip"}, "beta", {"id": "t3"}],
        "status": "subscribed",
        "source": "signup",
        "created_at": "2024-05-01T12:00:00Z",
        "updated_at": "2024-05-01T12:00:00.123456+00:00",
    }
    contact = Contact.from_body(body, 200)
    assert contact.external_id == "42"
    assert contact.tags == ("vip", "beta")
    assert contact.created is False
    assert contact.created_at == dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc)
    assert contact.updated_at is not None and contact.updated_at.microsecond == 123456
    assert "raw" not in repr(contact) and "status='subscribed'" in repr(contact)
    assert hash(contact) == hash(Contact.from_body(dict(body), 200))
    assert Contact.from_body({"contact": body}).email == "ada@example.com"  # wrapped


def test_trigger_status_inference() -> None:
    assert TriggerResult.from_body({}, 202).status == "scheduled"
    assert TriggerResult.from_body({"reason": "conditions_not_met"}, 200).status == "skipped"
    assert TriggerResult.from_body({"status": "weird"}, 200).status == "sent"
    given = TriggerResult.from_body({"status": "skipped", "idempotency_key": "srv"}, 200, "mine")
    assert (given.status, given.idempotency_key) == ("skipped", "srv")


def test_unsubscribed_lowercases_and_counts() -> None:
    result = UnsubscribedEmails.from_body({"emails": [" A@X.io ", "b@x.io", 3], "count": "2"})
    assert result.emails == frozenset({"a@x.io", "b@x.io"})
    assert result.count == 2  # a non-integer count falls back to the list's size
    assert "B@X.IO" in result and 3 not in result


def test_unsubscribed_puts_each_domain_in_nfc() -> None:
    result = UnsubscribedEmails.from_body({"emails": ["Zoe@Exa\u0308mple.com"]})
    assert result.emails == frozenset({"zoe@ex\u00e4mple.com"})
    assert "zoe@exa\u0308mple.com" in result and "zoe@ex\u00e4mple.com" in result


def test_bulk_combine_counts_from_outcomes_when_totals_are_missing() -> None:
    first = {"results": [{"email": "A@x.io", "status": "enrolled"}, {"status": "enrolled"}]}
    second = {"results": [{"email": "b@x.io", "status": "suppressed", "code": "unsub"}]}
    combined = BulkEnrollResult.combine("s", [first, second])
    assert combined.results == (
        BulkEnrollOutcome("a@x.io", "enrolled"),
        BulkEnrollOutcome("b@x.io", "suppressed", "unsub"),
    )
    assert (combined.enrolled, combined.skipped) == (1, 1)
    assert combined.raw == (first, second)


def test_sequences_from_a_bare_list_or_wrapped() -> None:
    items = [{"slug": "a", "name": "A", "status": "active"}, "junk"]
    assert Sequence.list_from_body(items) == (Sequence("a", "A", "active"),)
    assert Sequence.list_from_body({"sequences": items})[0].slug == "a"


def test_enrollment_nested_shapes() -> None:
    body = {"enrollment": {"id": "e1", "status": "active", "contact_id": "c1"}}
    enrollment = Enrollment.from_body({**body, "sequence": {"slug": "s"}})
    assert (enrollment.enrollment_id, enrollment.status, enrollment.contact_id) == (
        "e1",
        "active",
        "c1",
    )
    assert enrollment.sequence_slug == "s"
    nested = ContactEnrollments.from_body(
        [{"sequence": {"slug": "s", "name": "S"}, "status": "paused", "created_at": "2024-01-01"}]
    )
    assert nested.enrollments[0].sequence_name == "S"
    assert nested.enrollments[0].enrolled_at == dt.datetime(2024, 1, 1)
