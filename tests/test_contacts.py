"""User → contact mapping and meisa.upsert input."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa import ValidationError
from flask_meisa import plan_changed
from flask_meisa._contacts import default_contact_mapper
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import Operation
from flask_meisa.operations import Priority
from flask_meisa.operations import by_age
from flask_meisa.operations import encode_body
from flask_meisa.operations import merge_priorities
from flask_meisa.operations import merge_upsert_payloads
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests.apps import Plan
from tests.apps import User
from tests.apps import build_app


def test_default_mapper_reads_identity_names_and_custom_fields() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    user = User(
        7,
        "Ada@Example.com",
        first_name="Ada",
        display_name="Countess",
        plan=Plan.PRO,
        signup_date=dt.datetime(2026, 3, 1, 12, 0, tzinfo=tz),
        mrr=Decimal("49.50"),
        projects=lambda: 3,
    )
    payload = default_contact_mapper(
        user,
        custom_fields={
            "plan": "plan",
            "signup_date": "signup_date",
            "mrr": "mrr",
            "projects_created": "projects",
        },
        source="signup",
    )
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    meisa = Meisa(app)
    with app.app_context():
        assert meisa.map_user(user)["email"] == "ada@example.com"
    from flask_meisa._contacts import upsert_payload

    assert upsert_payload(payload) == {
        "email": "ada@example.com",
        "external_id": "7",
        "first_name": "Ada",
        "display_name": "Countess",
        "source": "signup",
        "custom_fields": {
            "plan": "pro",
            "signup_date": "2026-03-01T10:00:00Z",
            "mrr": 49.5,
            "projects_created": 3,
        },
    }


def test_a_missing_configured_attribute_names_the_field() -> None:
    with pytest.raises(ValidationError) as raised:
        default_contact_mapper(User(1, "a@b.co"), custom_fields={"seats": "seat_count"})
    assert raised.value.field == "custom_fields.seats"


@pytest.mark.parametrize(
    ("user", "says"),
    [(object(), "has no email attribute"), (User(1, None), "has None as its email")],  # type: ignore[arg-type]
)
def test_a_user_without_email_is_refused_saying_which_way(user: Any, says: str) -> None:
    with pytest.raises(ValidationError, match=f"^email: the user object {says}$"):
        default_contact_mapper(user, custom_fields={})


@pytest.mark.parametrize("user_id", [None, ""])
def test_a_user_whose_get_id_has_no_id_is_synced_by_email_alone(user_id: str | None) -> None:
    class Anonymous:
        email = "a@b.co"

        def get_id(self) -> str | None:
            return user_id

    assert default_contact_mapper(Anonymous(), custom_fields={}) == {"email": "a@b.co"}


def test_contact_mapper_decorator_replaces_the_default(emulator: Any) -> None:
    meisa = Meisa()

    @meisa.contact_mapper
    def to_contact(user: User) -> dict[str, Any]:
        return {"email": user.email, "external_id": f"u-{user.id}", "tag_names": ["beta"]}

    app = build_app(emulator_config(emulator), meisa=meisa)
    app.test_client().post("/login/1", buffered=True)
    contact = emulator.contact(external_id="u-1")
    assert [tag["name"] for tag in contact["tags"]] == ["beta"]
    assert contact["custom_fields"] == {}


def test_a_mapper_returning_a_non_mapping_is_a_clear_error() -> None:
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    meisa = Meisa(app, contact_mapper=lambda user: ["not", "a", "mapping"])  # type: ignore[arg-type, return-value]
    with app.app_context(), pytest.raises(ValidationError, match="must return a mapping"):
        meisa.upsert(User(1, "a@b.co"))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "email"),
        ({"email": "no-at-sign"}, "email"),
        ({"email": "a@b.co", "status": "unsubscribed"}, "status"),
        ({"email": "a@b.co", "source": "carrier"}, "source"),
        ({"email": "a@b.co", "custom_fields": [("x", 1)]}, "custom_fields"),
        ({"email": "a@b.co", "custom_fields": {"x": b"bytes"}}, "custom_fields.x"),
        ({"email": "a@b.co", "custom_fields": {"x": float("inf")}}, "custom_fields.x"),
        ({"email": "a@b.co", "custom_fields": {1: "x"}}, "custom_fields"),
        ({"email": "a@b.co", "tag_names": "vip"}, "tag_names"),
        ({"email": "a@b.co", "tag_names": ["ok", ""]}, "tag_names[1]"),
        ({"email": "a@b.co", "first_name": "A\nB"}, "first_name"),
    ],
)
def test_bad_upsert_payloads_raise_naming_the_field_and_queue_nothing(
    payload: dict[Any, Any], field: str
) -> None:
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    meisa = Meisa(app)
    with (
        app.app_context(),
        record_operations() as recorded,
        pytest.raises(ValidationError) as raised,
    ):
        meisa.upsert(payload)
    assert raised.value.field.startswith(field)
    assert recorded == []


def test_upsert_of_none_is_refused() -> None:
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    meisa = Meisa(app)
    with app.app_context(), pytest.raises(ValidationError):
        meisa.upsert(None)


def test_merge_keeps_the_creation_source_and_unites_tags() -> None:
    merged = merge_upsert_payloads(
        {"email": "a@b.co", "source": "signup", "tag_names": ["a"], "custom_fields": {"x": 1}},
        {"email": "a@b.co", "source": "api", "tag_names": ["b", "a"], "custom_fields": {"y": 2}},
    )
    assert merged == {
        "email": "a@b.co",
        "source": "signup",
        "tag_names": ["a", "b"],
        "custom_fields": {"x": 1, "y": 2},
    }


def test_merge_lets_a_later_value_win_and_a_later_none_change_nothing() -> None:
    merged = merge_upsert_payloads(
        {"email": "a@b.co", "source": "signup", "first_name": "Ada", "custom_fields": {"x": 1}},
        {"email": "a@b.co", "first_name": None, "last_name": "L", "custom_fields": None},
    )
    assert merged == {
        "email": "a@b.co",
        "source": "signup",
        "first_name": "Ada",
        "last_name": "L",
        "custom_fields": {"x": 1},
    }


def test_merge_takes_a_later_source_and_tags_when_the_earlier_upsert_has_none() -> None:
    merged = merge_upsert_payloads({"email": "a@b.co"}, {"source": "api", "tag_names": ["vip"]})
    assert merged == {"email": "a@b.co", "source": "api", "tag_names": ["vip"]}


def test_a_backfill_upsert_counts_as_the_older_only_against_a_live_one() -> None:
    old, new = {"first_name": "Old"}, {"first_name": "New"}
    assert by_age(old, None, new, "backfill") == (new, old)
    assert by_age(old, "high", new, "backfill") == (new, old)
    assert by_age(old, "backfill", new, "backfill") == (old, new)
    assert by_age(old, "backfill", new, None) == (old, new)


@pytest.mark.parametrize(
    ("first", "second", "merged"),
    [
        ("high", "backfill", "high"),
        (None, "high", "high"),
        ("backfill", "backfill", "backfill"),
        (None, "backfill", None),
        ("backfill", None, None),
        (None, None, None),
    ],
)
def test_merged_upserts_take_the_more_urgent_priority(
    first: Priority | None, second: Priority | None, merged: Priority | None
) -> None:
    assert merge_priorities(first, second) == merged


@pytest.mark.parametrize("forced", ["earlier", "later"])
def test_operation_merge_folds_a_later_upsert_in_with_its_priority_and_force(forced: str) -> None:
    earlier = Operation("upsert", {"email": "a@b.co", "tag_names": ["a"]}, priority="backfill")
    later = Operation("upsert", {"email": "a@b.co", "tag_names": ["b"]}, priority="backfill")
    (earlier if forced == "earlier" else later).force = True
    assert earlier.merge(later) is True
    assert earlier.payload == {"email": "a@b.co", "tag_names": ["a", "b"]}
    assert earlier.json == encode_body(earlier.payload)
    assert (earlier.priority, earlier.force, earlier.lane) == ("backfill", True, LANE_BACKFILL)


def test_operation_merge_refuses_upserts_of_two_contacts_and_changes_nothing() -> None:
    earlier = Operation("upsert", {"email": "a@b.co", "external_id": "1"})
    later = Operation("upsert", {"email": "a@b.co", "external_id": "2"}, priority="high")
    later.force = True
    assert earlier.merge(later) is False
    assert (earlier.payload, earlier.priority, earlier.force, earlier.body) == (
        {"email": "a@b.co", "external_id": "1"},
        None,
        False,
        None,
    )


def test_only_upserts_can_be_merged() -> None:
    upsert = Operation("upsert", {"email": "a@b.co"})
    track = Operation("track", {"event_name": "opened", "email": "a@b.co"})
    for earlier, later in ((upsert, track), (track, upsert)):
        with pytest.raises(ValueError, match="only upserts"):
            earlier.merge(later)


def test_a_custom_mapper_maps_a_user_that_is_a_mapping_where_a_user_is_synced() -> None:
    # Users read as documents (a dict subclass): the app's mapper knows their keys.
    class Document(dict[str, Any]):
        pass

    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    meisa = Meisa(app, contact_mapper=lambda user: {"email": user["mail"], "external_id": "d1"})
    user = Document(mail="doc@example.com", password_hash="x")
    with app.app_context(), record_operations() as recorded:
        assert meisa.map_user(user) == {"email": "doc@example.com", "external_id": "d1"}
        plan_changed.send(app, user=user, new_plan="pro")
    assert [op.payload for op in recorded] == [
        {"email": "doc@example.com", "external_id": "d1", "custom_fields": {"plan": "pro"}}
    ]
    # Without one, such a mapping is the upsert's fields, as meisa.upsert takes them.
    app = Flask(__name__)
    app.config.update(MEISA_ENABLED=False)
    Meisa(app)
    with app.app_context(), record_operations() as recorded:
        plan_changed.send(app, user={"email": "doc@example.com"}, new_plan="team")
    assert [op.payload for op in recorded] == [
        {"email": "doc@example.com", "custom_fields": {"plan": "team"}}
    ]
