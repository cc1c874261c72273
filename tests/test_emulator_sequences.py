"""The emulator over real HTTP: enroll, bulk enroll, list sequences, a contact's enrollments."""

from __future__ import annotations

from datetime import datetime

import pytest


def enroll(api, email, slug="onboarding", **extra):
    return api.post("/sequences/enroll/", {"email": email, "sequence_slug": slug, **extra})


def test_enroll_creates_the_contact_and_an_active_enrollment(emulator, emulator_api):
    answer = enroll(emulator_api, "ada@example.com", metadata={"from": "signup"})
    assert answer.status_code == 201
    body = answer.json()
    contact = emulator.contact(email="ada@example.com")
    assert contact is not None
    assert body == {
        "status": "enrolled",
        "enrollment_id": body["enrollment_id"],
        "contact_id": contact["id"],
        "sequence_slug": "onboarding",
        "email": "ada@example.com",
    }
    [enrollment] = emulator.enrollments()
    assert enrollment["status"] == "active"
    assert enrollment["metadata"] == {"from": "signup"}
    assert enrollment["trigger_source"] == "api"


def test_enroll_twice_is_409(emulator, emulator_api):
    enroll(emulator_api, "ada@example.com")
    again = enroll(emulator_api, "ADA@example.com")
    assert again.status_code == 409
    assert again.json()["code"] == "already_enrolled"
    assert enroll(emulator_api, "ada@example.com", "trial_expiry").status_code == 201
    assert len(emulator.enrollments()) == 2


@pytest.mark.parametrize(
    ("slug", "status", "code"),
    [
        ("nope", 404, "sequence_not_found"),
        ("winback", 400, "sequence_inactive"),
        ("legacy", 400, "sequence_inactive"),
    ],
)
def test_enroll_needs_an_active_sequence(emulator, emulator_api, slug, status, code):
    answer = enroll(emulator_api, "ada@example.com", slug)
    assert answer.status_code == status
    assert answer.json()["code"] == code
    assert emulator.enrollments() == []


def test_enroll_refuses_suppressed_unless_overridden(emulator, emulator_api):
    refused = enroll(emulator_api, "unsubscribed@example.com")
    assert refused.status_code == 422
    assert refused.json()["code"] == "recipient_suppressed"
    assert emulator.enrollments() == []
    forced = enroll(emulator_api, "unsubscribed@example.com", override_unsubscribe=True)
    assert forced.status_code == 201


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"sequence_slug": "onboarding"}, "email"),
        ({"email": "ada@example.com"}, "sequence_slug"),
        ({"email": "bad", "sequence_slug": "onboarding"}, "email"),
        ({"email": "a@example.com", "sequence_slug": "onboarding", "metadata": 1}, "metadata"),
        (
            {"email": "a@example.com", "sequence_slug": "onboarding", "override_unsubscribe": 1},
            "override_unsubscribe",
        ),
    ],
)
def test_enroll_validation(emulator_api, payload, field):
    answer = emulator_api.post("/sequences/enroll/", payload)
    assert answer.status_code == 400
    assert list(answer.json()["errors"]) == [field]


def test_bulk_enroll_reports_each_address(emulator, emulator_api):
    enroll(emulator_api, "old@example.com")
    answer = emulator_api.post(
        "/sequences/api/bulk-enroll/",
        {
            "sequence_slug": "onboarding",
            "emails": [
                "new@example.com",
                "old@example.com",
                "bounced@example.com",
                "not-an-address",
                "new@example.com",
            ],
        },
    )
    assert answer.status_code == 200
    assert answer.json() == {
        "sequence_slug": "onboarding",
        "enrolled": 1,
        "skipped": 4,
        "results": [
            {"email": "new@example.com", "status": "enrolled"},
            {"email": "old@example.com", "status": "already_enrolled"},
            {"email": "bounced@example.com", "status": "suppressed"},
            {"email": "not-an-address", "status": "invalid"},
            {"email": "new@example.com", "status": "already_enrolled"},
        ],
    }
    assert {e["email"] for e in emulator.enrollments()} == {"old@example.com", "new@example.com"}


def test_bulk_enroll_override_and_limits(emulator_api):
    forced = emulator_api.post(
        "/sequences/api/bulk-enroll/",
        {
            "sequence_slug": "onboarding",
            "emails": ["bounced@example.com"],
            "override_unsubscribe": True,
        },
    )
    assert forced.json()["enrolled"] == 1
    too_many = emulator_api.post(
        "/sequences/api/bulk-enroll/",
        {"sequence_slug": "onboarding", "emails": [f"u{i}@example.com" for i in range(501)]},
    )
    assert too_many.status_code == 400
    assert "emails" in too_many.json()["errors"]
    inactive = emulator_api.post(
        "/sequences/api/bulk-enroll/", {"sequence_slug": "winback", "emails": []}
    )
    assert inactive.json()["code"] == "sequence_inactive"


def test_list_sequences_filters_by_status_and_search(emulator, emulator_api):
    active = emulator_api.get("/sequences/api/list/").json()
    assert [s["slug"] for s in active["results"]] == ["onboarding", "trial_expiry"]
    assert active["count"] == 2
    assert active["results"][0] == {
        "slug": "onboarding",
        "name": "Onboarding",
        "status": "active",
        "steps": 5,
    }
    everything = emulator_api.get("/sequences/api/list/", params={"status": "all"}).json()
    assert [s["status"] for s in everything["results"]] == [
        "active",
        "active",
        "paused",
        "archived",
    ]
    found = emulator_api.get("/sequences/api/list/", params={"status": "all", "search": "WIN"})
    assert [s["slug"] for s in found.json()["results"]] == ["winback"]
    emulator.add_sequence("spring_promo", name="Spring promo")
    assert emulator_api.get("/sequences/api/list/").json()["count"] == 3
    bad = emulator_api.get("/sequences/api/list/", params={"status": "deleted"})
    assert bad.status_code == 400


def test_contact_enrollments(emulator_api):
    enroll(emulator_api, "ada@example.com")
    enroll(emulator_api, "ada@example.com", "trial_expiry")
    answer = emulator_api.get(
        "/sequences/api/contact-enrollments/", params={"email": "Ada@example.com"}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["email"] == "ada@example.com"
    assert body["count"] == 2
    assert [(r["sequence_slug"], r["status"]) for r in body["results"]] == [
        ("onboarding", "active"),
        ("trial_expiry", "active"),
    ]
    datetime.fromisoformat(body["results"][0]["enrolled_at"])


def test_contact_enrollments_errors(emulator_api):
    unknown = emulator_api.get(
        "/sequences/api/contact-enrollments/", params={"email": "nobody@example.com"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "contact_not_found"
    missing = emulator_api.get("/sequences/api/contact-enrollments/")
    assert missing.status_code == 400
    assert "email" in missing.json()["errors"]


def test_sequence_endpoints_need_their_scopes(emulator, emulator_api):
    key = emulator.create_key(scopes=["sequences:read"])
    assert emulator_api.get("/sequences/api/list/", key=key).status_code == 200
    refused = emulator_api.post(
        "/sequences/enroll/",
        {"email": "ada@example.com", "sequence_slug": "onboarding"},
        key=key,
    )
    assert refused.status_code == 403
    assert emulator.contacts() == []
