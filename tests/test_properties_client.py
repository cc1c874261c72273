"""Properties of MeisaClient against the emulator: input the client refuses never reaches
Meisa (a ValidationError, zero requests), input it accepts Meisa accepts too, and any answer
at all gives a typed result or a MeisaError, nothing else."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask import Response
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.errors import APIError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import MeisaError
from flask_meisa.errors import ValidationError
from flask_meisa.retry import RetryPolicy
from tests import property_strategies as s
from tests.servers import serve

SETTINGS = settings(deadline=None, max_examples=100)
KEY = "meisa_live_scripted_key_0123456789"
TRIGGERS = ("verification_code", "receipt", "welcome_delayed", "pro_only", "legacy_digest")
SEQUENCES = ("onboarding", "trial_expiry", "winback", "legacy")

# Valid values mostly: examples should get past the client's checks and reach Meisa,
# where a gap between the two would show.
trigger_keys = s.mostly(st.sampled_from(TRIGGERS), s.labels)
slugs = s.mostly(st.sampled_from(SEQUENCES), s.labels)
emails = s.mostly(s.valid_emails, s.emails)
maybe_objects = s.mostly(s.plain_objects, s.objects)
labels = s.mostly(s.names, s.labels)
optional_labels = s.mostly(st.none(), s.labels)
flags = s.mostly(st.booleans(), st.one_of(st.none(), st.integers(0, 1), s.texts))
#: ``recipient``: contact fields to create or enrich the contact with, or anything else.
recipients = s.mostly(
    st.fixed_dictionaries(
        {},
        optional={
            "external_id": s.external_ids,
            "first_name": s.labels,
            "last_name": s.labels,
            "display_name": s.labels,
            "custom_fields": st.one_of(s.plain_objects, s.objects),
            "email": s.emails,
        },
    ),
    st.one_of(st.none(), s.objects),
)


@pytest.fixture(scope="module")
def module_emulator() -> Iterator[Emulator]:
    """One emulator for the module's examples (no rate limit, no send guardrail)."""
    with Emulator(seed="demo", rate_limit=None, send_guardrail=None) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def client(module_emulator: Emulator) -> Iterator[MeisaClient]:
    """A client that never retries (the emulator has no faults), shared by the examples."""
    with MeisaClient(
        module_emulator.live_key, module_emulator.url, retry=RetryPolicy.never()
    ) as made:
        yield made


def call_and_check(
    emulator: Emulator,
    call: Callable[[], Any],
    *,
    allowed: tuple[tuple[type[APIError], str | None], ...] = (),
) -> Any:
    """Make ``call``: a ValidationError must leave the emulator without a request; an
    APIError must be one of ``allowed`` (``(class, code)``, code ``None`` for any); a
    400 naming a field is a gap between the client's checks and Meisa's."""
    emulator.clear_requests()
    try:
        result = call()
    except ValidationError as error:
        s.assert_validation_error(error)
        assert emulator.requests == [], "a refused call reached Meisa"
        return None
    except APIError as error:
        assert emulator.requests, "an API error without a request"
        if any(isinstance(error, kind) and code in (None, error.code) for kind, code in allowed):
            return None
        if isinstance(error, BadRequestError) and error.code == "invalid":
            pytest.fail(f"the client sent what Meisa refuses: {error.field_errors}")
        pytest.fail(f"unexpected {error!r}")
    assert emulator.requests, "a result without a request"
    assert all(200 <= (r.status or 0) < 300 for r in emulator.requests)
    return result


@SETTINGS
@given(s.upsert_payloads())
def test_upsert_contact(module_emulator: Emulator, client: MeisaClient, fields: Any) -> None:
    fields = {k: v for k, v in fields.items() if k != "status" and k != "tags"}
    email = fields.pop("email", None)
    call_and_check(
        module_emulator,
        lambda: client.upsert_contact(email, **{k: v for k, v in fields.items() if k in UPSERT}),
        # Another example's contact may hold the address under another external id.
        allowed=((APIError, "email_conflict"),),
    )


UPSERT = (
    "external_id",
    "first_name",
    "last_name",
    "display_name",
    "source",
    "custom_fields",
    "tag_names",
)


@SETTINGS
@given(labels, emails, s.mostly(st.none(), s.external_ids), maybe_objects)
def test_track_event(
    module_emulator: Emulator,
    client: MeisaClient,
    event_name: Any,
    email: Any,
    external_id: Any,
    properties: Any,
) -> None:
    call_and_check(
        module_emulator,
        lambda: client.track_event(
            event_name, email=email, external_id=external_id, properties=properties
        ),
        allowed=((APIError, "contact_not_found"),),
    )


@SETTINGS
@given(trigger_keys, emails, maybe_objects, recipients, optional_labels)
@example("receipt", "ada@example.com", None, {"external_id": 0}, None)  # once sent as is
def test_trigger_email(
    module_emulator: Emulator,
    client: MeisaClient,
    trigger_key: Any,
    to_email: Any,
    variables: Any,
    recipient: Any,
    idempotency_key: Any,
) -> None:
    result = call_and_check(
        module_emulator,
        lambda: client.trigger_email(
            trigger_key,
            to_email,
            variables=variables,
            recipient=recipient,
            idempotency_key=idempotency_key,
        ),
        allowed=(
            (BadRequestError, "invalid_trigger"),
            (APIError, "recipient_suppressed"),
            (APIError, "email_conflict"),
        ),
    )
    if result is not None:
        assert result.status in ("sent", "scheduled", "skipped")
        assert result.idempotency_key


@SETTINGS
@given(emails, slugs, maybe_objects, optional_labels, flags)
def test_enroll(
    module_emulator: Emulator,
    client: MeisaClient,
    email: Any,
    slug: Any,
    metadata: Any,
    trigger_source: Any,
    override: Any,
) -> None:
    call_and_check(
        module_emulator,
        lambda: client.enroll(
            email,
            slug,
            metadata=metadata,
            trigger_source=trigger_source,
            override_unsubscribe=override,
        ),
        allowed=(
            (APIError, "sequence_not_found"),
            (APIError, "sequence_inactive"),
            (APIError, "already_enrolled"),
            (APIError, "recipient_suppressed"),
        ),
    )


@SETTINGS
@given(slugs, s.mostly(st.lists(emails, min_size=1, max_size=4), s.emails), flags)
def test_bulk_enroll(
    module_emulator: Emulator, client: MeisaClient, slug: Any, emails: Any, override: Any
) -> None:
    if emails == []:
        return  # nothing to enroll: no call, by design
    result = call_and_check(
        module_emulator,
        lambda: client.bulk_enroll(slug, emails, override_unsubscribe=override),
        allowed=((APIError, "sequence_not_found"), (APIError, "sequence_inactive")),
    )
    if result is not None:
        assert all(o.status != "invalid" for o in result.results), "Meisa refused an address"


@SETTINGS
@given(
    st.one_of(st.sampled_from(["contact"]), s.external_ids),
    optional_labels,
    st.one_of(st.none(), s.external_ids),
    st.booleans(),
)
def test_add_and_remove_tag(
    module_emulator: Emulator,
    client: MeisaClient,
    contact_id: Any,
    tag_name: Any,
    tag_id: Any,
    adding: bool,
) -> None:
    if contact_id == "contact":
        contact_id = client.upsert_contact("tagged@example.com").id
    method = client.add_tag if adding else client.remove_tag
    call_and_check(
        module_emulator,
        lambda: method(contact_id, tag_name=tag_name, tag_id=tag_id),
        allowed=((APIError, "contact_not_found"), (APIError, "tag_not_found")),
    )


@SETTINGS
@given(optional_labels, optional_labels, emails)
def test_reading_calls(
    module_emulator: Emulator, client: MeisaClient, status: Any, search: Any, email: Any
) -> None:
    # Only "all" is documented; the client leaves other statuses to Meisa to refuse.
    known = status in (None, "all", "active", "paused", "archived")
    call_and_check(
        module_emulator,
        lambda: client.list_sequences(status=status, search=search),
        allowed=() if known else ((BadRequestError, "invalid"),),
    )
    call_and_check(
        module_emulator,
        lambda: client.contact_enrollments(email),
        allowed=((APIError, "contact_not_found"),),
    )


# -- any answer at all ---------------------------------------------------------------------


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


answer_bodies = st.one_of(
    st.builds(lambda v: json.dumps(v, allow_nan=True).encode(), s.objects.filter(_json_able)),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"<html><body>Bad gateway</body></html>",
            b'{"detail": {"nested": ["x"]}, "code": 5}',
            b'{"detail": "key meisa_live_leaked_1234567890 for bob@example.com\\r\\nX: y"}',
            b'{"code": "invalid", "errors": {"email": "not a list"}}',
            b'{"status": "sent", "contact_id": 5, "duplicate": "yes"}',
        ]
    ),
    st.integers(800, 5000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(4301, 6000).map(lambda n: b'{"count": ' + b"7" * n + b"}"),
)
answers = st.tuples(
    st.sampled_from([200, 201, 202, 204, 299, 301, 400, 401, 403, 404, 409, 418, 422, 429, 500]),
    answer_bodies,
    st.one_of(
        st.none(),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=30),
        st.sampled_from(["5", "-1", "1e309", "nan", "Wed, 21 Oct 2015 07:28:00 GMT"]),
    ),
)


VALID_CALLS: tuple[Callable[[MeisaClient], Any], ...] = (
    lambda c: c.ping(),
    lambda c: c.upsert_contact("ada@example.com", external_id=1, tag_names=["a"]),
    lambda c: c.track_event("opened", email="ada@example.com"),
    lambda c: c.add_tag("contact-1", tag_name="vip"),
    lambda c: c.unsubscribed_emails(),
    lambda c: c.enroll("ada@example.com", "onboarding"),
    lambda c: c.bulk_enroll("onboarding", ["ada@example.com", "bob@example.com"]),
    lambda c: c.list_sequences(status="all"),
    lambda c: c.contact_enrollments("ada@example.com"),
    lambda c: c.trigger_email("receipt", "ada@example.com", idempotency_key="k-1"),
)


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[MeisaClient, dict[str, Any]]]:
    """A loopback server that answers whatever the example scripts, and a client of it."""
    script: dict[str, Any] = {}
    app = Flask(__name__)

    @app.route("/api/v1/<path:path>", methods=["GET", "POST"])
    def answer(path: str) -> Response:
        status, body, retry_after = script["answer"]
        response = Response(body, status=status, content_type="application/json")
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response

    with serve(app) as url, MeisaClient(KEY, url + "/api/v1", retry=RetryPolicy.never()) as made:
        yield made, script


@settings(deadline=None, max_examples=150)
@given(st.sampled_from(VALID_CALLS), answers)
@example(VALID_CALLS[0], (200, b"[" * 5000 + b"]" * 5000, None))  # RecursionError in parsing
@example(VALID_CALLS[0], (400, b"[" * 600 + b"]" * 600, None))  # RecursionError in scrubbing
@example(VALID_CALLS[0], (400, b'{"detail": "' + b"x" * 100_000 + b'"}', None))  # took minutes
def test_any_answer_gives_a_result_or_a_meisa_error(
    scripted: tuple[MeisaClient, dict[str, Any]],
    call: Callable[[MeisaClient], Any],
    answer: tuple[int, bytes, str | None],
) -> None:
    client, script = scripted
    script["answer"] = answer
    started = time.monotonic()
    try:
        result = call(client)
    except MeisaError as error:
        # Cleaning an error's text once took time quadratic in its length.
        assert time.monotonic() - started < 5, "reading the error answer took too long"
        assert not 200 <= answer[0] < 300
        text = f"{error} {error!r} {getattr(error, 'body', '')!r}"
        assert "scripted_key" not in text and "meisa_live_leaked" not in text
        assert "bob@example.com" not in text
        assert "\r" not in str(error) and "\n" not in str(error)
        return
    assert 200 <= answer[0] < 300
    assert result is not None
