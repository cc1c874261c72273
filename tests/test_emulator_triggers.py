"""The emulator over real HTTP: /emails/trigger/ outcomes, idempotency and the guardrail."""

from __future__ import annotations

from datetime import datetime

import pytest


def trigger(api, key="", **payload):
    """Fire a trigger (``key=""``: the helper's own key)."""
    return api.post("/emails/trigger/", payload, key=key)


def test_sent_creates_the_contact_and_records_the_send(emulator, emulator_api):
    answer = trigger(
        emulator_api,
        trigger_key="verification_code",
        to_email="ada@example.com",
        variables={"code": "123456"},
        recipient={"external_id": "u1", "first_name": "Ada", "custom_fields": {"plan": "free"}},
        idempotency_key="verify:u1:123456",
    )
    assert answer.status_code == 200
    body = answer.json()
    contact = emulator.contact(external_id="u1")
    assert contact is not None
    assert contact["first_name"] == "Ada"
    assert contact["custom_fields"] == {"plan": "free"}
    assert body == {
        "status": "sent",
        "email_send_id": body["email_send_id"],
        "contact_id": contact["id"],
        "contact_created": True,
    }
    [send] = emulator.sends()
    assert send["id"] == body["email_send_id"]
    assert send["trigger_key"] == "verification_code"
    assert send["to_email"] == "ada@example.com"
    assert send["variables"] == {"code": "123456"}
    assert send["recipient"]["external_id"] == "u1"
    assert send["status"] == "sent"
    assert send["idempotency_key"] == "verify:u1:123456"
    assert send["environment"] == "live"
    datetime.fromisoformat(send["created_at"])
    again = trigger(emulator_api, trigger_key="receipt", to_email="ada@example.com")
    assert again.json()["contact_created"] is False


def test_delayed_trigger_is_scheduled_202(emulator, emulator_api):
    answer = trigger(emulator_api, trigger_key="welcome_delayed", to_email="ada@example.com")
    assert answer.status_code == 202
    assert answer.json()["status"] == "scheduled"
    assert emulator.sends()[0]["status"] == "scheduled"


def test_conditions_decide_between_skipped_and_sent(emulator, emulator_api):
    skipped = trigger(emulator_api, trigger_key="pro_only", to_email="ada@example.com")
    assert skipped.status_code == 200
    assert skipped.json()["status"] == "skipped"
    assert skipped.json()["reason"] == "conditions_not_met"
    assert emulator.sends() == []
    sent = trigger(
        emulator_api,
        trigger_key="pro_only",
        to_email="ada@example.com",
        recipient={"custom_fields": {"plan": "pro"}},
    )
    assert sent.json()["status"] == "sent"
    assert len(emulator.sends(trigger_key="pro_only")) == 1


@pytest.mark.parametrize("trigger_key", ["nope", "legacy_digest"])
def test_unknown_or_inactive_trigger_is_400(emulator, emulator_api, trigger_key):
    answer = trigger(emulator_api, trigger_key=trigger_key, to_email="ada@example.com")
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_trigger"
    assert emulator.contacts() == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"to_email": "ada@example.com"}, "trigger_key"),
        ({"trigger_key": "receipt"}, "to_email"),
        ({"trigger_key": "receipt", "to_email": "a@example.com, b@example.com"}, "to_email"),
        ({"trigger_key": "receipt", "to_email": "a@example.com", "variables": "x"}, "variables"),
        (
            {"trigger_key": "receipt", "to_email": "a@example.com", "recipient": "a@example.com"},
            "recipient",
        ),
        (
            {
                "trigger_key": "receipt",
                "to_email": "a@example.com",
                "recipient": {"custom_fields": 3},
            },
            "recipient.custom_fields",
        ),
    ],
)
def test_trigger_validation(emulator, emulator_api, payload, field):
    answer = emulator_api.post("/emails/trigger/", payload)
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid"
    assert list(answer.json()["errors"]) == [field]
    assert emulator.sends() == []


def test_suppressed_recipient_and_missing_sender_are_422(emulator, emulator_api):
    suppressed = trigger(emulator_api, trigger_key="receipt", to_email="Complained@example.com")
    assert suppressed.status_code == 422
    assert suppressed.json()["code"] == "recipient_suppressed"
    emulator.set_sender(False)
    no_sender = trigger(emulator_api, trigger_key="receipt", to_email="ada@example.com")
    assert no_sender.status_code == 422
    assert no_sender.json()["code"] == "no_sender"
    emulator.set_sender(True)
    assert trigger(emulator_api, trigger_key="receipt", to_email="ada@example.com").ok
    assert len(emulator.sends()) == 1


def test_idempotency_key_repeats_the_first_answer_within_the_hour(emulator, emulator_api):
    payload = {
        "trigger_key": "verification_code",
        "to_email": "ada@example.com",
        "idempotency_key": "verify:1",
    }
    first = trigger(emulator_api, **payload)
    repeat = trigger(emulator_api, **payload)
    assert repeat.status_code == first.status_code == 200
    assert repeat.json() == {**first.json(), "duplicate": True}
    assert len(emulator.sends()) == 1
    emulator.advance_clock(3599)
    assert trigger(emulator_api, **payload).json()["duplicate"] is True
    emulator.advance_clock(2)
    fresh = trigger(emulator_api, **payload)
    assert "duplicate" not in fresh.json()
    assert fresh.json()["email_send_id"] != first.json()["email_send_id"]
    assert len(emulator.sends()) == 2


def test_idempotency_repeats_scheduled_and_422_answers_and_is_per_environment(
    emulator, emulator_api
):
    scheduled = {"trigger_key": "welcome_delayed", "to_email": "a@example.com"}
    assert trigger(emulator_api, idempotency_key="k1", **scheduled).status_code == 202
    assert trigger(emulator_api, idempotency_key="k1", **scheduled).status_code == 202
    refused = {"trigger_key": "receipt", "to_email": "bounced@example.com"}
    assert trigger(emulator_api, idempotency_key="k2", **refused).status_code == 422
    emulator.unsuppress("bounced@example.com")
    repeat = trigger(emulator_api, idempotency_key="k2", **refused)
    assert repeat.status_code == 422
    assert repeat.json()["duplicate"] is True
    in_test = trigger(emulator_api, key=emulator.test_key, idempotency_key="k1", **scheduled)
    assert "duplicate" not in in_test.json()
    assert len(emulator.sends()) == 1
    assert len(emulator.sends("test")) == 1


def test_send_guardrail_per_recipient(emulator_factory, emulator_api_factory):
    emu = emulator_factory(rate_limit="3/minute", send_guardrail="1/hour")
    api = emulator_api_factory(emu)
    assert trigger(api, trigger_key="receipt", to_email="ada@example.com").status_code == 200
    refused = trigger(api, trigger_key="receipt", to_email="ada@example.com")
    assert refused.status_code == 429
    assert refused.json()["code"] == "send_guardrail"
    assert 3500 <= int(refused.headers["Retry-After"]) <= 3600
    # the guardrail's 429 does not count against the key's own limit (3/minute)
    assert trigger(api, trigger_key="receipt", to_email="bob@example.com").status_code == 200
    assert api.get("/ping/").status_code == 200
    assert api.get("/ping/").json()["code"] == "rate_limited"
    emu.advance_clock(3600)
    assert trigger(api, trigger_key="receipt", to_email="ada@example.com").status_code == 200
    assert len(emu.sends()) == 3


def test_demo_seed_guardrail_and_override(emulator_factory, emulator_api_factory):
    emu = emulator_factory(rate_limit=None)
    assert emu.state()["send_guardrail"] == "100/hour"
    emu.set_send_guardrail(None)
    api = emulator_api_factory(emu)
    for _ in range(3):
        assert trigger(api, trigger_key="receipt", to_email="ada@example.com").status_code == 200
