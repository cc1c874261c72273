"""Properties of the emulator's request validation, over real HTTP: any body gets an
answer (never a 5xx, never a dropped connection), in strict JSON, and a refused one says
why (``detail``, ``code`` and, for field errors, ``errors``)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_meisa.emulator import Emulator
from tests import property_strategies as s

POST_PATHS = (
    "/contacts/upsert/",
    "/events/track/",
    "/emails/trigger/",
    "/sequences/enroll/",
    "/sequences/api/bulk-enroll/",
    "/contacts/{id}/add_tag/",
    "/contacts/{id}/remove_tag/",
)
GET_PATHS = ("/sequences/api/list/", "/sequences/api/contact-enrollments/")
#: Every field any endpoint reads, so that wrong types reach every reader.
FIELDS = (
    "email",
    "external_id",
    "first_name",
    "last_name",
    "display_name",
    "source",
    "custom_fields",
    "tag_names",
    "status",
    "tags",
    "event_name",
    "properties",
    "trigger_key",
    "to_email",
    "variables",
    "recipient",
    "idempotency_key",
    "sequence_slug",
    "emails",
    "metadata",
    "trigger_source",
    "override_unsubscribe",
    "tag_name",
    "tag_id",
)
EXPECTED_STATUSES = {200, 201, 202, 400, 404, 409, 413, 422}
SETTINGS = settings(deadline=None, max_examples=150)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities: written as bare NaN/Infinity tokens
    s.texts,
    st.sampled_from(["receipt", "onboarding", "api", "ada@example.com", ""]),
    st.integers(100, 2000).map(lambda n: "s" * n),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(s.texts, children, max_size=4)
    ),
    max_leaves=10,
)
#: JSON objects whose fields are the endpoints' own, with any value.
field_objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
#: The object fields, holding numbers that JSON has no form for (bare NaN, Infinity).
special_numbers = st.dictionaries(
    st.sampled_from(["custom_fields", "properties", "variables", "metadata", "recipient"]),
    st.dictionaries(s.names, st.sampled_from([float("nan"), float("inf"), float("-inf")])),
    min_size=1,
)
#: A valid body of each endpoint, for mutations that reach past the first refusal.
VALID: dict[str, dict[str, Any]] = {
    "/contacts/upsert/": {"email": "p@example.com", "external_id": "p-1"},
    "/events/track/": {"email": "p@example.com", "event_name": "opened"},
    "/emails/trigger/": {"trigger_key": "receipt", "to_email": "p@example.com"},
    "/sequences/enroll/": {"email": "p@example.com", "sequence_slug": "onboarding"},
    "/sequences/api/bulk-enroll/": {"sequence_slug": "trial_expiry", "emails": ["p@example.com"]},
    "/contacts/{id}/add_tag/": {"tag_name": "vip"},
    "/contacts/{id}/remove_tag/": {"tag_name": "vip"},
}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def _deep(depth: int) -> bytes:
    return (
        b'{"email":"deep@example.com","custom_fields":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    )


raw_bodies = st.one_of(
    field_objects.map(_dumps),
    json_values.map(_dumps),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    field_objects.map(_dumps).flatmap(
        lambda body: st.integers(0, len(body)).map(lambda cut: body[:cut])
    ),
    st.one_of(st.integers(1, 3000), st.sampled_from([990, 1000, 5000, 100_000])).map(_deep),
    st.integers(4000, 6000).map(
        lambda n: b'{"email":"n@example.com","external_id":' + b"9" * n + b"}"
    ),
    st.integers(200_000, 1_000_000).map(
        lambda n: _dumps({"email": "big@example.com", "custom_fields": {"x": "b" * n}})
    ),
)


@pytest.fixture(scope="module")
def api() -> Iterator[tuple[Emulator, requests.Session]]:
    """One emulator and one keep-alive session for every example of the module."""
    with Emulator(seed="demo", rate_limit=None, send_guardrail=None) as emulator:
        session = requests.Session()
        session.headers["X-API-Key"] = emulator.live_key
        try:
            yield emulator, session
        finally:
            session.close()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(content: bytes) -> Any:
    """Parse strict JSON (no NaN or Infinity) on a fresh thread: an answer may nest as deep
    as the emulator's handler thread could parse, deeper than this test's stack allows."""
    parsed: list[Any] = []

    def parse() -> None:
        with contextlib.suppress(ValueError):
            parsed.append(json.loads(content, parse_constant=_refuse_constant))

    thread = threading.Thread(target=parse)
    thread.start()
    thread.join()
    assert parsed, "the answer is not strict JSON"
    return parsed[0]


def check_answer(response: requests.Response) -> Any:
    """The answer's status is one the API documents, and its body strict JSON that
    explains a refusal."""
    assert response.status_code in EXPECTED_STATUSES, response.text[:300]
    assert response.headers["Content-Type"] == "application/json"
    body = strict_json(response.content)
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert isinstance(body.get("detail"), str) and body["detail"]
        assert isinstance(body.get("code"), str) and body["code"]
        errors = body.get("errors")
        if body["code"] == "invalid":
            assert isinstance(errors, dict) and errors
        if errors is not None:
            assert all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(m, str) for m in v)
                for k, v in errors.items()
            )
    return body


def _fresh_url(emulator: Emulator, session: requests.Session, path: str) -> str:
    """Back to the seed plus one contact (each example starts from the same state), and
    the URL of ``path``."""
    emulator.reset()
    answer = session.post(emulator.url + "/contacts/upsert/", json=VALID["/contacts/upsert/"])
    return emulator.url + path.format(id=answer.json()["id"])


@SETTINGS
@given(st.sampled_from(POST_PATHS), raw_bodies)
@example("/contacts/upsert/", _deep(5000))  # once a RecursionError: a dropped connection
def test_any_body_gets_a_documented_answer(api: Any, path: str, raw: bytes) -> None:
    emulator, session = api
    response = session.post(
        _fresh_url(emulator, session, path),
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    check_answer(response)


@SETTINGS
@given(st.sampled_from(POST_PATHS), st.one_of(field_objects, special_numbers), st.booleans())
@example("/contacts/upsert/", {"custom_fields": {"x": float("nan")}}, True)  # once echoed NaN
def test_wrong_types_are_refused_field_by_field(
    api: Any, path: str, fields: dict[str, Any], from_valid: bool
) -> None:
    emulator, session = api
    body = {**VALID[path], **fields} if from_valid else fields
    response = session.post(_fresh_url(emulator, session, path), data=_dumps(body), timeout=10)
    answer = check_answer(response)
    if response.status_code == 400 and answer["code"] == "invalid":
        assert set(answer["errors"]) <= {*FIELDS, "non_field_errors"} | {
            f"recipient.{name}" for name in FIELDS
        }


@settings(deadline=None, max_examples=60)
@given(
    st.sampled_from(GET_PATHS),
    st.dictionaries(st.sampled_from(["email", "status", "search", "x"]), s.texts, max_size=3),
)
def test_any_query_gets_a_documented_answer(api: Any, path: str, query: dict[str, str]) -> None:
    emulator, session = api
    params = {k: v.encode("utf-8", "surrogatepass") for k, v in query.items()}
    check_answer(session.get(emulator.url + path, params=params, timeout=10))


def test_a_body_over_the_limit_is_refused_with_413(api: Any) -> None:
    emulator, session = api
    raw = _dumps({"email": "huge@example.com", "custom_fields": {"x": "h" * (11 << 20)}})
    response = session.post(emulator.url + "/contacts/upsert/", data=raw, timeout=30)
    assert response.status_code == 413
    assert check_answer(response)["code"] == "payload_too_large"
