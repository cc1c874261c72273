"""payloads: every conversion and every refusal, without a network."""

from __future__ import annotations

import datetime as dt
import enum
import json
import time
import uuid
from collections import OrderedDict
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest

from flask_meisa._payloads import MAX_DEPTH
from flask_meisa._payloads import json_object
from flask_meisa._payloads import normalize_email
from flask_meisa._payloads import normalize_external_id
from flask_meisa._payloads import optional_text
from flask_meisa._payloads import require_text
from flask_meisa._payloads import text_list
from flask_meisa._payloads import to_json_value
from flask_meisa._payloads import track_body
from flask_meisa._payloads import trigger_body
from flask_meisa._payloads import unique_emails
from flask_meisa._payloads import upsert_body
from flask_meisa.errors import ValidationError
from flask_meisa.operations import MAX_BODY_BYTES
from flask_meisa.operations import encode_body


class Plan(str, enum.Enum):
    PRO = "pro"


class Level(enum.IntEnum):
    HIGH = 3


class Nested(enum.Enum):
    WHEN = dt.date(2024, 5, 1)


class BrokenOffset(dt.tzinfo):
    """A tzinfo whose offset Python refuses (a day or more)."""

    def utcoffset(self, value: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=30)

    def dst(self, value: dt.datetime | None) -> dt.timedelta | None:
        return None

    def tzname(self, value: dt.datetime | None) -> str | None:
        return None


# -- emails ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ada@example.com", "ada@example.com"),
        ("  Ada.Lovelace+x@Example.CO.uk \n", "ada.lovelace+x@example.co.uk"),
        ("a@b.io", "a@b.io"),
    ],
)
def test_normalize_email(value: str, expected: str) -> None:
    assert normalize_email(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "must be a string"),
        (b"ada@example.com", "must be a string"),
        (42, "must be a string"),
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("ada.example.com", "exactly one '@'"),
        ("ada@@example.com", "exactly one '@'"),
        ("a@b@example.com", "exactly one '@'"),
        ("@example.com", "empty part"),
        ("ada@localhost", "domain"),
        ("ada@example.", "domain"),
        ("ada@.example.com", "domain"),
        ("ada@example..com", "domain"),
        ("ada@", "domain"),
        ("ada lovelace@example.com", "whitespace"),
        ("ada@example.com\r\nBcc: eve@example.com", "whitespace"),
        ("ada\x00@example.com", "control"),
        ("ada\x85@example.com", "control"),
        ("a" * 65 + "@example.com", "64 characters"),
        ("ada@" + "d" * 250 + ".com", "254"),
    ],
)
def test_normalize_email_refusals(value: Any, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        normalize_email(value, "to_email")
    assert info.value.field == "to_email"
    assert fragment in info.value.message
    if isinstance(value, str) and value.strip():
        assert value.strip() not in str(info.value)


def test_email_error_never_repeats_the_value() -> None:
    with pytest.raises(ValidationError) as info:
        normalize_email("secret.person@nowhere")
    assert "secret.person" not in str(info.value)
    assert str(info.value).startswith("email: ")


def test_an_address_off_the_common_pattern_is_checked_and_kept_up_to_the_limits() -> None:
    # An apostrophe, a non-ASCII domain: not what nearly every address looks like, so the
    # slow checks run, and the address still comes back normalised.
    assert normalize_email(" O'Brien@Example.com ") == "o'brien@example.com"
    assert normalize_email("zoë@exämple.com") == "zoë@exämple.com"
    longest = "o'b@" + "d" * 246 + ".com"
    assert normalize_email(longest) == longest
    local = "'" + "a" * 63
    assert normalize_email(local + "@example.com") == local + "@example.com"


def test_a_domain_typed_composed_or_decomposed_is_one_address() -> None:
    # "ë" as one code point (U+00EB) or as "e" + U+0308: one host, so one contact.
    composed, decomposed = "zo\u00eb@ex\u00e4mple.com", "zo\u00eb@exa\u0308mple.com"
    assert normalize_email(decomposed) == normalize_email(composed) == composed
    # The local part is left as typed: a mailbox may tell the two forms apart.
    assert normalize_email("zoe\u0308@example.com") == "zoe\u0308@example.com"
    assert unique_emails([composed, decomposed], "emails") == [composed]
    # The length limit applies to what is sent: the composed form.
    longest = "a@" + "\u00e4" * 248 + ".com"
    assert normalize_email(longest.replace("\u00e4", "a\u0308")) == longest


# -- text ------------------------------------------------------------------------------


def test_require_text_strips() -> None:
    assert require_text("  welcome-email ", "trigger_key") == "welcome-email"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "must be a string"),
        (3, "must be a string"),
        ("", "must not be empty"),
        (" \t ", "must not be empty"),
        ("a\nb", "control"),
        ("welcome\n", "control"),
        ("\r\nwelcome", "control"),
        ("a\rb", "control"),
        ("a\x1bb", "control"),
        ("a\u2028b", "control"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_require_text_refusals(value: Any, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        require_text(value, "event_name")
    assert info.value.field == "event_name"
    assert fragment in info.value.message


def test_require_text_custom_length() -> None:
    assert require_text("abc", "slug", max_length=3) == "abc"
    with pytest.raises(ValidationError):
        require_text("abcd", "slug", max_length=3)


def test_optional_text() -> None:
    assert optional_text(None, "first_name") is None
    assert optional_text(" Ada ", "first_name") == "Ada"
    with pytest.raises(ValidationError):
        optional_text("", "first_name")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), ("u-1", "u-1"), (" 7 ", "7"), (uuid.UUID(int=1), str(uuid.UUID(int=1)))],
)
def test_external_id(value: Any, expected: str) -> None:
    assert normalize_external_id(value) == expected


@pytest.mark.parametrize("value", [True, 1.5, "", "  ", None, ["1"]])
def test_external_id_refusals(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        normalize_external_id(value)
    assert info.value.field == "external_id"


def test_external_id_refusal_says_what_it_takes() -> None:
    with pytest.raises(ValidationError) as info:
        normalize_external_id(1.5)
    assert info.value.message == "must be a string or an integer, not float"


def test_text_list() -> None:
    assert text_list(("trial", " beta "), "tag_names") == ["trial", "beta"]
    with pytest.raises(ValidationError) as info:
        text_list("trial", "tag_names")
    assert info.value.field == "tag_names"
    with pytest.raises(ValidationError) as info:
        text_list(["ok", ""], "tag_names")
    assert info.value.field == "tag_names[1]"


def test_unique_emails() -> None:
    assert unique_emails(["A@x.io", "b@x.io", "a@X.io"], "emails") == ["a@x.io", "b@x.io"]
    assert unique_emails(iter(()), "emails") == []
    with pytest.raises(ValidationError) as info:
        unique_emails(["a@x.io", "nope"], "emails")
    assert info.value.field == "emails[1]"
    for bad in ("a@x.io", 5, {"a@x.io": 1}):
        with pytest.raises(ValidationError):
            unique_emails(bad, "emails")  # type: ignore[arg-type]


# -- JSON conversion -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", "text"),
        (0, 0),
        (-12, -12),
        (1.25, 1.25),
        (True, True),
        (False, False),
        (None, None),
        (dt.datetime(2024, 3, 1, 12, 30, 5), "2024-03-01T12:30:05Z"),
        (dt.datetime(2024, 3, 1, 12, 30, 5, 123000), "2024-03-01T12:30:05.123000Z"),
        (
            dt.datetime(2024, 3, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2024-03-01T12:30:00Z",
        ),
        (dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc), "2024-03-01T00:00:00Z"),
        (
            dt.datetime(2024, 3, 1, 12, 30, 5, 123000, tzinfo=dt.timezone.utc),
            "2024-03-01T12:30:05.123000Z",
        ),
        (dt.date(2024, 3, 1), "2024-03-01"),
        (dt.time(9, 30), "09:30:00"),
        (dt.time(9, 30, tzinfo=dt.timezone.utc), "09:30:00+00:00"),
        (Decimal("19.99"), 19.99),
        (Decimal("20.00"), 20),
        (Decimal("1E+3"), 1000),
        (uuid.UUID(int=255), "00000000-0000-0000-0000-0000000000ff"),
        (Plan.PRO, "pro"),
        (Level.HIGH, 3),
        (Nested.WHEN, "2024-05-01"),
        ((1, "a"), [1, "a"]),
        ([dt.date(2024, 1, 2)], ["2024-01-02"]),
        ({"a": {"b": [Decimal("2")]}}, {"a": {"b": [2]}}),
        (OrderedDict(x=1), {"x": 1}),
        (MappingProxyType({"y": Plan.PRO}), {"y": "pro"}),
    ],
)
def test_to_json_value(value: Any, expected: Any) -> None:
    converted = to_json_value(value, "custom_fields")
    assert converted == expected
    assert type(converted) is type(expected)


def test_plain_types_come_out_plain() -> None:
    class Text(str):
        pass

    class Count(int):
        pass

    class Ratio(float):  # as numpy.float64 is
        pass

    out = to_json_value({"t": Text("x"), "c": Count(3), "l": Level.HIGH, "r": Ratio(0.5)}, "f")
    assert isinstance(out, dict)
    assert type(out["t"]) is str
    assert type(out["c"]) is int
    assert type(out["l"]) is int
    assert type(out["r"]) is float
    assert json.dumps(out) == '{"t": "x", "c": 3, "l": 3, "r": 0.5}'


def test_large_integers_pass_until_python_cannot_write_them_out() -> None:
    assert to_json_value({"n": 10**30}, "f") == {"n": 10**30}
    assert to_json_value(-(10**4000), "f") == -(10**4000)
    with pytest.raises(ValidationError) as info:
        to_json_value({"n": 10**5000}, "f")
    assert (info.value.field, info.value.message) == (
        "f.n",
        "is too large a number to send as JSON",
    )


def test_a_naive_datetime_is_taken_as_utc_whatever_the_local_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "XYZ-9")
    time.tzset()
    try:
        assert to_json_value(dt.datetime(2024, 3, 1, 12, 30), "f") == "2024-03-01T12:30:00Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_datetime_subclass_is_sent_in_utc_like_a_datetime() -> None:
    class Moment(dt.datetime):  # as pendulum's and freezegun's are
        pass

    tz = dt.timezone(dt.timedelta(hours=2))
    assert to_json_value(Moment(2024, 3, 1, 14, 30, tzinfo=tz), "f") == "2024-03-01T12:30:00Z"
    assert to_json_value({"at": Moment(2024, 3, 1, 12, 30)}, "f") == {"at": "2024-03-01T12:30:00Z"}


def test_non_ascii_text_and_keys_are_kept() -> None:
    value = {"città": "Zürich", "names": ["Zoë", "東京"]}
    assert to_json_value(value, "custom_fields") == value
    assert to_json_value("Zoë", "custom_fields") == "Zoë"


def test_a_str_enum_key_names_its_value_as_it_does_as_a_value() -> None:
    # custom_fields={Field.PLAN: ...} names the field "plan" (as json.dumps writes that key),
    # not "Field.PLAN" (what str() of a str-mixed Enum is).
    class Field(str, enum.Enum):
        PLAN = "plan"

    out = to_json_value({Field.PLAN: Field.PLAN, Plan.PRO: {Plan.PRO: 1}}, "custom_fields")
    assert out == {"plan": "plan", "pro": {"pro": 1}}
    assert json.dumps(out) == json.dumps({Field.PLAN: "plan", Plan.PRO: {Plan.PRO: 1}})
    assert all(type(key) is str for key in out)


@pytest.mark.parametrize(
    ("value", "field", "fragment"),
    [
        (float("nan"), "custom_fields", "finite"),
        (float("inf"), "custom_fields", "finite"),
        (float("-inf"), "custom_fields", "finite"),
        (Decimal("NaN"), "custom_fields", "finite"),
        (Decimal("Infinity"), "custom_fields", "finite"),
        ({1, 2}, "custom_fields", "(set)"),
        (frozenset(), "custom_fields", "(frozenset)"),
        (b"bytes", "custom_fields", "(bytes)"),
        (object(), "custom_fields", "(object)"),
        (dt.timedelta(days=1), "custom_fields", "(timedelta)"),
        ({"tags": ["a", "b", {1}]}, "custom_fields.tags[2]", "(set)"),
        ({"a": {"b": float("nan")}}, "custom_fields.a.b", "finite"),
        ({1: "x"}, "custom_fields", "key that is not a string"),
        ({"\ud800": 1}, "custom_fields", "key that is not valid Unicode"),
        (dt.time(9, tzinfo=BrokenOffset()), "custom_fields", "invalid offset"),
        ("bad \ud800 surrogate", "custom_fields", "Unicode"),
    ],
)
def test_to_json_value_refusals(value: Any, field: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        to_json_value(value, "custom_fields")
    assert info.value.field == field
    assert fragment in info.value.message


def test_refusal_chains_no_exception_holding_the_value() -> None:
    with pytest.raises(ValidationError) as info:
        to_json_value({"name": "Zoë \ud800"}, "recipient")
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_depth_limit() -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH):
        value = [value]
    assert to_json_value(value, "v") is not None
    with pytest.raises(ValidationError) as info:
        to_json_value([value], "v")
    assert "deeper than 32" in info.value.message


def test_depth_limit_counts_mappings_as_it_counts_lists() -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH):
        value = {"k": value}
    assert to_json_value(value, "v") is not None
    with pytest.raises(ValidationError) as info:
        to_json_value({"k": value}, "v")
    assert "deeper than 32" in info.value.message


def test_cycle_is_refused_not_recursed_forever() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValidationError) as info:
        to_json_value(loop, "metadata")
    assert info.value.field.startswith("metadata.self.self")


def test_json_object() -> None:
    assert json_object(None, "variables") is None
    assert json_object({"code": 123456}, "variables") == {"code": 123456}
    for bad in (["a"], "text", 3):
        with pytest.raises(ValidationError) as info:
            json_object(bad, "variables")
        assert info.value.field == "variables"
        assert "mapping" in info.value.message


def test_encode_body_is_compact_ascii_json_whose_length_is_its_size() -> None:
    text = encode_body({"name": "Zoë", "n": [1, 2]})
    assert text == '{"name":"Zo\\u00eb","n":[1,2]}'
    assert len(text) == len(text.encode())


def test_encode_body_size_limit_names_the_largest_field() -> None:
    body: dict[str, Any] = {"email": "a@x.io", "custom_fields": {"blob": "x" * MAX_BODY_BYTES}}
    with pytest.raises(ValidationError) as info:
        encode_body(body)
    assert info.value.field == "custom_fields"
    assert "524288-byte limit" in info.value.message
    assert "xxxx" not in str(info.value)
    small: dict[str, Any] = {
        "email": "a@x.io",
        "custom_fields": {"blob": "x" * (MAX_BODY_BYTES - 100)},
    }
    assert len(encode_body(small)) <= MAX_BODY_BYTES


def test_encode_body_takes_a_body_of_exactly_the_limit_and_never_writes_nan() -> None:
    size = len('{"a":"xx"}')
    assert encode_body({"a": "xx"}, max_bytes=size) == '{"a":"xx"}'
    with pytest.raises(ValidationError):
        encode_body({"a": "xx"}, max_bytes=size - 1)
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_body({"x": float("nan")})


# -- request bodies --------------------------------------------------------------------


def test_upsert_body_checks_every_field_and_leaves_out_none() -> None:
    body = upsert_body(
        {
            "email": " Ada@Example.com ",
            "external_id": 7,
            "first_name": " Ada ",
            "last_name": None,
            "display_name": "Countess",
            "source": "signup",
            "custom_fields": {"mrr": Decimal("49.50")},
            "tag_names": ["beta", " trial ", "beta"],
        }
    )
    assert body == {
        "email": "ada@example.com",
        "external_id": "7",
        "first_name": "Ada",
        "display_name": "Countess",
        "source": "signup",
        "custom_fields": {"mrr": 49.5},
        "tag_names": ["beta", "trial"],
    }


@pytest.mark.parametrize("source", ["api", "import", "manual", "signup", "initial_sync"])
def test_upsert_body_takes_every_contact_source(source: str) -> None:
    assert upsert_body({"email": "a@b.co", "source": f" {source} "})["source"] == source


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"external_id": 1}, "email", "is required"),
        ({"email": "a@b.co", "status": "x"}, "status", "is not a field of a contact upsert"),
        (
            {"email": "a@b.co", "source": "carrier"},
            "source",
            "must be one of api, import, initial_sync, manual, signup",
        ),
    ],
)
def test_upsert_body_refusals(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        upsert_body(fields)
    assert (info.value.field, info.value.message) == (field, message)


def test_track_body_takes_an_email_or_an_external_id_and_needs_one() -> None:
    assert track_body(" signed_up ", external_id=7) == {
        "event_name": "signed_up",
        "external_id": "7",
    }
    assert track_body("opened", email="A@b.co", properties={"n": 1}) == {
        "event_name": "opened",
        "email": "a@b.co",
        "properties": {"n": 1},
    }
    with pytest.raises(ValidationError) as info:
        track_body("opened", properties={"n": 1})
    assert (info.value.field, info.value.message) == (
        "email",
        "an email or an external_id is required",
    )


def test_trigger_body_checks_the_recipient_contact_fields_and_keeps_the_rest() -> None:
    recipient = {
        "external_id": 7,
        "first_name": " Ada ",
        "last_name": " Lovelace ",
        "display_name": " Countess ",
        "plan": {"name": "pro"},
    }
    body = trigger_body(" welcome ", "Ada@Example.com", recipient=recipient, idempotency_key="k")
    assert body == {
        "trigger_key": "welcome",
        "to_email": "ada@example.com",
        "recipient": {
            "external_id": "7",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "display_name": "Countess",
            "plan": {"name": "pro"},
        },
        "idempotency_key": "k",
    }


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ((None, "a@b.co"), "trigger_key"),
        (("welcome", None), "to_email"),
    ],
)
def test_trigger_body_requires_a_trigger_key_and_an_address(
    arguments: tuple[Any, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        trigger_body(*arguments)
    assert info.value.field == field


def test_trigger_body_refuses_recipient_custom_fields_that_are_not_a_mapping() -> None:
    with pytest.raises(ValidationError) as info:
        trigger_body("welcome", "a@b.co", recipient={"custom_fields": ["x"]})
    assert info.value.field == "recipient.custom_fields"
