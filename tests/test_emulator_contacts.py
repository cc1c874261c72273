"""The emulator over real HTTP: auth, scopes, environments, upsert, events, tags, suppressions."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from flask_meisa.emulator import SCOPES


def upsert(api, key="", **payload):
    """Upsert ``payload`` (``key=""``: the helper's own key)."""
    return api.post("/contacts/upsert/", payload, key=key)


# Auth, scopes, routing


def test_ping_reports_environment_scopes_and_product(emulator, emulator_api):
    live = emulator_api.get("/ping/")
    test = emulator_api.get("/ping/", key=emulator.test_key)
    assert live.status_code == 200
    assert live.json() == {
        "status": "ok",
        "environment": "live",
        "scopes": sorted(SCOPES),
        "product": {"id": live.json()["product"]["id"], "name": "Demo SaaS"},
    }
    assert test.json()["environment"] == "test"
    assert live.headers["Content-Type"] == "application/json"


def test_ping_answers_any_key_even_without_scopes(emulator, emulator_api):
    key = emulator.create_key(scopes=[])
    answer = emulator_api.get("/ping/", key=key)
    assert answer.status_code == 200
    assert answer.json()["scopes"] == []


@pytest.mark.parametrize("key", [None, "meisa_live_unknown_0000"])
def test_missing_or_unknown_key_is_401(emulator_api, key):
    answer = emulator_api.get("/ping/", key=key)
    assert answer.status_code == 401
    assert answer.json()["code"] == "authentication_failed"
    assert answer.json()["detail"]


def test_key_outside_its_scopes_is_403_and_changes_nothing(emulator, emulator_api):
    readonly = emulator.keys["demo-readonly"]
    answer = upsert(emulator_api, email="ada@example.com", key=readonly)
    assert answer.status_code == 403
    assert answer.json()["code"] == "missing_scope"
    assert emulator.contacts() == []
    assert emulator_api.get("/contacts/api/unsubscribed-emails/", key=readonly).status_code == 200


def test_unknown_path_is_404_and_wrong_method_405(emulator_api):
    assert emulator_api.get("/nope/").status_code == 404
    assert emulator_api.get("/ping").status_code == 404  # every path ends with "/"
    wrong = emulator_api.get("/contacts/upsert/")
    assert wrong.status_code == 405
    assert wrong.json()["code"] == "method_not_allowed"


def test_malformed_json_and_non_object_bodies_are_400(emulator_api):
    bad = emulator_api.post(
        "/contacts/upsert/", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400
    assert bad.json()["code"] == "parse_error"
    listed = emulator_api.post("/contacts/upsert/", ["ada@example.com"])
    assert listed.status_code == 400
    assert listed.json()["code"] == "invalid"


def test_environments_keep_separate_contacts(emulator, emulator_api):
    assert upsert(emulator_api, email="ada@example.com").status_code == 201
    assert upsert(emulator_api, email="ada@example.com", key=emulator.test_key).status_code == 201
    upsert(emulator_api, email="bob@example.com", key=emulator.test_key)
    assert [c["email"] for c in emulator.contacts()] == ["ada@example.com"]
    assert len(emulator.contacts("test")) == 2
    assert emulator.contact(email="bob@example.com") is None
    assert emulator.contact(email="bob@example.com", environment="test") is not None


# Upsert


def test_upsert_creates_with_the_full_contact(emulator, emulator_api):
    answer = upsert(
        emulator_api,
        email="ada@example.com",
        external_id="u1",
        first_name="Ada",
        last_name="Lovelace",
        display_name="Ada L.",
        source="signup",
        custom_fields={"plan": "free", "mrr": 0},
        tag_names=["beta"],
    )
    assert answer.status_code == 201
    contact = answer.json()
    uuid.UUID(contact["id"])
    datetime.fromisoformat(contact["created_at"])
    datetime.fromisoformat(contact["updated_at"])
    assert {k: contact[k] for k in contact if k not in ("id", "created_at", "updated_at")} == {
        "email": "ada@example.com",
        "external_id": "u1",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "display_name": "Ada L.",
        "custom_fields": {"plan": "free", "mrr": 0},
        "tags": [{"id": contact["tags"][0]["id"], "name": "beta"}],
        "status": "subscribed",
        "source": "signup",
    }
    assert emulator.contact(external_id="u1") == contact


def test_upsert_updates_merging_fields_adding_tags_keeping_source(emulator_api):
    first = upsert(
        emulator_api,
        email="ada@example.com",
        external_id="u1",
        first_name="Ada",
        source="signup",
        custom_fields={"plan": "free", "mrr": 0},
        tag_names=["beta"],
    ).json()
    second = upsert(
        emulator_api,
        email="ADA@example.com",
        source="import",
        custom_fields={"plan": "pro"},
        tag_names=["paying", "beta"],
    )
    assert second.status_code == 200
    contact = second.json()
    assert contact["id"] == first["id"]
    assert contact["custom_fields"] == {"plan": "pro", "mrr": 0}
    assert [t["name"] for t in contact["tags"]] == ["beta", "paying"]
    assert contact["source"] == "signup"
    assert contact["first_name"] == "Ada"  # omitted fields are kept
    assert contact["external_id"] == "u1"


def test_upsert_matched_by_external_id_takes_the_new_email(emulator, emulator_api):
    first = upsert(emulator_api, email="old@example.com", external_id="u1").json()
    moved = upsert(emulator_api, email="new@example.com", external_id="u1")
    assert moved.status_code == 200
    assert moved.json()["id"] == first["id"]
    assert moved.json()["email"] == "new@example.com"
    assert emulator.contact(email="old@example.com") is None
    assert len(emulator.contacts()) == 1


def test_upsert_rekeying_onto_a_taken_email_is_409(emulator, emulator_api):
    upsert(emulator_api, email="ada@example.com", external_id="u1")
    upsert(emulator_api, email="bob@example.com", external_id="u2")
    answer = upsert(emulator_api, email="bob@example.com", external_id="u1")
    assert answer.status_code == 409
    assert answer.json()["code"] == "email_conflict"
    assert emulator.contact(external_id="u1")["email"] == "ada@example.com"


def test_upsert_matched_by_email_takes_the_new_external_id(emulator, emulator_api):
    first = upsert(emulator_api, email="ada@example.com").json()
    answer = upsert(emulator_api, email="ada@example.com", external_id="u9")
    assert answer.status_code == 200
    assert answer.json()["id"] == first["id"]
    assert emulator.contact(external_id="u9")["id"] == first["id"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "email"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "two@@example.com"}, "email"),
        ({"email": "ada@localhost"}, "email"),
        ({"email": "ada @example.com"}, "email"),
        ({"email": "ada@example.com\r\nBcc: x@example.com"}, "email"),
        ({"email": "ada@example.com", "custom_fields": ["plan"]}, "custom_fields"),
        ({"email": "ada@example.com", "tag_names": "beta"}, "tag_names"),
        ({"email": "ada@example.com", "tag_names": ["beta", 3]}, "tag_names"),
        ({"email": "ada@example.com", "source": "webhook"}, "source"),
        ({"email": "ada@example.com", "external_id": 12}, "external_id"),
        ({"email": "ada@example.com", "status": "unsubscribed"}, "status"),
        ({"email": "ada@example.com", "tags": [{"name": "x"}]}, "tags"),
    ],
)
def test_upsert_validation_errors_name_the_field(emulator, emulator_api, payload, field):
    answer = emulator_api.post("/contacts/upsert/", payload)
    assert answer.status_code == 400
    body = answer.json()
    assert body["code"] == "invalid"
    assert list(body["errors"]) == [field]
    assert all(isinstance(m, str) for m in body["errors"][field])
    assert emulator.contacts() == []


def test_contact_status_follows_the_suppression_list(emulator, emulator_api):
    contact = upsert(emulator_api, email="Bounced@Example.com").json()
    assert contact["status"] == "bounced"
    emulator.suppress("ada@example.com", reason="complained")
    assert upsert(emulator_api, email="ada@example.com").json()["status"] == "complained"


# Events


def test_track_records_an_event_for_a_contact(emulator, emulator_api):
    contact = upsert(emulator_api, email="ada@example.com", external_id="u1").json()
    answer = emulator_api.post(
        "/events/track/",
        {"event_name": "exported_report", "email": "ada@example.com", "properties": {"n": 2}},
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "tracked"
    assert body["contact_id"] == contact["id"]
    assert body["event_name"] == "exported_report"
    datetime.fromisoformat(body["timestamp"])
    events = emulator.events()
    assert [(e["event_name"], e["properties"], e["contact_id"]) for e in events] == [
        ("exported_report", {"n": 2}, contact["id"])
    ]


def test_track_matches_external_id_first_and_does_not_dedup(emulator, emulator_api):
    ada = upsert(emulator_api, email="ada@example.com", external_id="u1").json()
    upsert(emulator_api, email="bob@example.com", external_id="u2")
    payload = {"event_name": "login", "external_id": "u1", "email": "bob@example.com"}
    for _ in range(2):
        assert emulator_api.post("/events/track/", payload).json()["contact_id"] == ada["id"]
    assert len(emulator.events(event_name="login")) == 2


def test_track_unknown_contact_is_404(emulator, emulator_api):
    answer = emulator_api.post(
        "/events/track/", {"event_name": "login", "email": "nobody@example.com"}
    )
    assert answer.status_code == 404
    assert answer.json()["code"] == "contact_not_found"
    assert emulator.events() == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"email": "ada@example.com"}, "event_name"),
        ({"event_name": "login"}, "email"),
        ({"event_name": "login", "email": "ada@example.com", "properties": [1]}, "properties"),
    ],
)
def test_track_validation(emulator_api, payload, field):
    upsert(emulator_api, email="ada@example.com")
    answer = emulator_api.post("/events/track/", payload)
    assert answer.status_code == 400
    assert field in answer.json()["errors"]


# Tags


def test_add_and_remove_tags_by_name_and_id(emulator, emulator_api):
    contact = upsert(emulator_api, email="ada@example.com", tag_names=["beta"]).json()
    path = f"/contacts/{contact['id']}/"
    added = emulator_api.post(path + "add_tag/", {"tag_name": "vip"})
    assert added.status_code == 200
    assert [t["name"] for t in added.json()["tags"]] == ["beta", "vip"]
    beta_id = contact["tags"][0]["id"]
    removed = emulator_api.post(path + "remove_tag/", {"tag_id": beta_id})
    assert [t["name"] for t in removed.json()["tags"]] == ["vip"]
    again = emulator_api.post(path + "add_tag/", {"tag_id": beta_id})
    assert [t["name"] for t in again.json()["tags"]] == ["vip", "beta"]
    noop = emulator_api.post(path + "remove_tag/", {"tag_name": "never-made"})
    assert noop.status_code == 200
    assert [t["name"] for t in emulator.contact(email="ada@example.com")["tags"]] == [
        "vip",
        "beta",
    ]


def test_tag_errors(emulator_api):
    contact = upsert(emulator_api, email="ada@example.com").json()
    unknown_contact = emulator_api.post(f"/contacts/{uuid.uuid4()}/add_tag/", {"tag_name": "x"})
    assert unknown_contact.status_code == 404
    assert unknown_contact.json()["code"] == "contact_not_found"
    neither = emulator_api.post(f"/contacts/{contact['id']}/add_tag/", {})
    assert neither.status_code == 400
    assert neither.json()["code"] == "invalid"
    unknown_tag = emulator_api.post(
        f"/contacts/{contact['id']}/remove_tag/", {"tag_id": str(uuid.uuid4())}
    )
    assert unknown_tag.status_code == 404
    assert unknown_tag.json()["code"] == "tag_not_found"


# Suppression list


def test_unsubscribed_emails_lists_every_suppressed_address(emulator, emulator_api):
    emulator.suppress("later@example.com")
    answer = emulator_api.get("/contacts/api/unsubscribed-emails/")
    assert answer.status_code == 200
    body = answer.json()
    assert body["emails"] == [
        "bounced@example.com",
        "complained@example.com",
        "later@example.com",
        "unsubscribed@example.com",
    ]
    assert body["count"] == 4
    datetime.fromisoformat(body["as_of"])
    emulator.unsuppress("later@example.com", environment="test")
    test_list = emulator_api.get("/contacts/api/unsubscribed-emails/", key=emulator.test_key)
    assert test_list.json()["count"] == 3
