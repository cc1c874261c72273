"""Endpoints about sequences: enroll, bulk enroll, list, a contact's enrollments."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

from .call import ApiError
from .call import Call
from .call import Payload
from .call import is_valid_email
from .model import SEQUENCE_STATUSES
from .model import Contact
from .model import Enrollment
from .model import iso
from .state import EnvState

__all__ = ["MAX_BULK", "bulk_enroll", "enroll", "enrollments", "list_sequences"]

#: Most addresses one bulk-enroll call takes.
MAX_BULK = 500


def _check_sequence(call: Call, slug: str) -> None:
    sequence = call.store.sequences.get(slug)
    if sequence is None:
        raise ApiError(404, "sequence_not_found", "Sequence not found.")
    if sequence.status != "active":
        raise ApiError(400, "sequence_inactive", "This sequence is not active.")


def _enrolled(env: EnvState, contact: Contact | None, slug: str) -> bool:
    return contact is not None and any(
        e.contact_id == contact.id and e.sequence_slug == slug and e.status in ("active", "paused")
        for e in env.enrollments
    )


def _enroll_one(call: Call, email: str, slug: str, metadata: Any, source: str) -> Enrollment:
    now = call.store.clock.time()
    contact = call.env.find(email=email) or call.env.upsert(email, now=now)[0]
    enrollment = Enrollment(
        str(uuid.uuid4()), contact.id, slug, "active", now, dict(metadata or {}), source
    )
    call.env.enrollments.append(enrollment)
    return enrollment


def enroll(call: Call) -> tuple[int, Any]:
    """``POST /sequences/enroll/``: 201 enrolled; 404/400 sequence; 409; 422 suppressed."""
    payload = Payload(call.body)
    email = payload.email("email", required=True)
    slug = payload.string("sequence_slug", required=True)
    metadata = payload.obj("metadata")
    source = payload.string("trigger_source") or "api"
    override = payload.boolean("override_unsubscribe")
    payload.done()
    assert email is not None and slug is not None
    _check_sequence(call, slug)
    if _enrolled(call.env, call.env.find(email=email), slug):
        raise ApiError(409, "already_enrolled", "The contact is already in this sequence.")
    if call.env.status_of(email) != "subscribed" and not override:
        raise ApiError(422, "recipient_suppressed", "The contact does not receive email.")
    enrollment = _enroll_one(call, email, slug, metadata, source)
    return 201, {
        "status": "enrolled",
        "enrollment_id": enrollment.id,
        "contact_id": enrollment.contact_id,
        "sequence_slug": slug,
        "email": call.env.contacts[enrollment.contact_id].email,
    }


def bulk_enroll(call: Call) -> tuple[int, Any]:
    """``POST /sequences/api/bulk-enroll/``: enroll what can be, report every address."""
    payload = Payload(call.body)
    slug = payload.string("sequence_slug", required=True)
    emails = call.body.get("emails")
    if emails is None:
        payload.error("emails", "This field is required.")
    elif not isinstance(emails, list):
        payload.error("emails", "Must be a list.")
    elif len(emails) > MAX_BULK:
        payload.error("emails", f"At most {MAX_BULK} addresses per call.")
    override = payload.boolean("override_unsubscribe")
    payload.done()
    assert slug is not None and isinstance(emails, list)
    _check_sequence(call, slug)
    results = []
    for email in emails:
        if not isinstance(email, str) or not is_valid_email(email):
            status = "invalid"
        elif _enrolled(call.env, call.env.find(email=email), slug):
            status = "already_enrolled"
        elif call.env.status_of(email) != "subscribed" and not override:
            status = "suppressed"
        else:
            _enroll_one(call, email, slug, None, "api")
            status = "enrolled"
        results.append({"email": email, "status": status})
    enrolled = sum(1 for r in results if r["status"] == "enrolled")
    return 200, {
        "sequence_slug": slug,
        "enrolled": enrolled,
        "skipped": len(results) - enrolled,
        "results": results,
    }


def list_sequences(call: Call) -> tuple[int, Any]:
    """``GET /sequences/api/list/``: active ones, or ``?status=all|paused|archived``."""
    status = call.query.get("status", "active")
    if status not in ("all", *SEQUENCE_STATUSES):
        raise ApiError.invalid({"status": ["Must be all, active, paused or archived."]})
    search = call.query.get("search", "").lower()
    results = [
        asdict(s)
        for s in call.store.sequences.values()
        if (status == "all" or s.status == status)
        and (search in s.slug.lower() or search in s.name.lower())
    ]
    return 200, {"count": len(results), "results": results}


def enrollments(call: Call) -> tuple[int, Any]:
    """``GET /sequences/api/contact-enrollments/?email=``: 404 for an unknown contact."""
    payload = Payload(call.query)
    email = payload.email("email", required=True)
    payload.done()
    contact = call.env.find(email=email)
    if contact is None:
        raise ApiError(404, "contact_not_found", "Contact not found.")
    results = [
        {"sequence_slug": e.sequence_slug, "status": e.status, "enrolled_at": iso(e.enrolled_at)}
        for e in call.env.enrollments
        if e.contact_id == contact.id
    ]
    return 200, {"email": contact.email, "count": len(results), "results": results}
