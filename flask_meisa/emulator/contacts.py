"""Endpoints about contacts: ping, upsert, events, tags, the unsubscribed list."""

from __future__ import annotations

import uuid
from typing import Any

from .call import ApiError
from .call import Call
from .call import Payload
from .model import SOURCES
from .model import iso

__all__ = ["add_tag", "ping", "remove_tag", "track", "unsubscribed", "upsert"]


def ping(call: Call) -> tuple[int, Any]:
    """``GET /ping/``: the key's environment and scopes, and the product."""
    return 200, {
        "status": "ok",
        "environment": call.key.environment,
        "scopes": sorted(call.key.scopes),
        "product": {"id": call.store.product_id, "name": call.store.product_name},
    }


def upsert(call: Call) -> tuple[int, Any]:
    """``POST /contacts/upsert/``: 201 on create, 200 on update, with the full contact."""
    payload = Payload(call.body)
    payload.forbid("status", "tags")
    email = payload.email("email", required=True)
    external_id, names, custom_fields = payload.contact_fields()
    source = payload.choice("source", SOURCES, "api")
    tag_names = payload.string_list("tag_names")
    payload.done()
    assert email is not None
    contact, created = call.env.upsert(
        email,
        now=call.store.clock.time(),
        external_id=external_id,
        names=names,
        custom_fields=custom_fields,
        tag_names=tag_names or (),
        source=source,
    )
    return (201 if created else 200), call.env.contact_json(contact)


def track(call: Call) -> tuple[int, Any]:
    """``POST /events/track/``: record an event for an existing contact (404 otherwise)."""
    payload = Payload(call.body)
    event_name = payload.string("event_name", required=True)
    email = payload.email("email")
    external_id = payload.string("external_id")
    properties = payload.obj("properties")
    if call.body.get("email") is None and call.body.get("external_id") is None:
        payload.error("email", "Either email or external_id is required.")
    payload.done()
    contact = call.env.find(email=email, external_id=external_id)
    if contact is None:
        raise ApiError(404, "contact_not_found", "No contact matches; upsert the contact first.")
    event = {
        "id": str(uuid.uuid4()),
        "contact_id": contact.id,
        "email": contact.email,
        "external_id": contact.external_id,
        "event_name": event_name,
        "properties": properties or {},
        "timestamp": iso(call.store.clock.time()),
        "environment": call.env.name,
    }
    call.env.events.append(event)
    return 200, {
        "status": "tracked",
        "contact_id": contact.id,
        "event_name": event_name,
        "timestamp": event["timestamp"],
    }


def add_tag(call: Call) -> tuple[int, Any]:
    """``POST /contacts/{id}/add_tag/``: by ``tag_name`` (created if missing) or ``tag_id``."""
    return _change_tag(call, adding=True)


def remove_tag(call: Call) -> tuple[int, Any]:
    """``POST /contacts/{id}/remove_tag/``: removing a tag the contact lacks is a no-op."""
    return _change_tag(call, adding=False)


def _change_tag(call: Call, *, adding: bool) -> tuple[int, Any]:
    env = call.env
    contact = env.contacts.get(call.contact_id)
    if contact is None:
        raise ApiError(404, "contact_not_found", "Contact not found.")
    payload = Payload(call.body)
    tag_name = payload.string("tag_name")
    tag_id = payload.string("tag_id")
    if call.body.get("tag_name") is None and call.body.get("tag_id") is None:
        payload.error("tag_name", "Either tag_name or tag_id is required.")
    payload.done()
    if tag_id is not None:
        if tag_id not in env.tags:
            raise ApiError(404, "tag_not_found", "Tag not found.")
    elif tag_name is not None:
        tag_id = env.tag_named(tag_name).id if adding else env.tags_by_name.get(tag_name.lower())
    if adding and tag_id is not None and tag_id not in contact.tag_ids:
        contact.tag_ids.append(tag_id)
    elif not adding and tag_id in contact.tag_ids:
        contact.tag_ids.remove(tag_id)
    contact.updated_at = call.store.clock.time()
    return 200, env.contact_json(contact)


def unsubscribed(call: Call) -> tuple[int, Any]:
    """``GET /contacts/api/unsubscribed-emails/``: every suppressed address."""
    emails = sorted(entry[0] for entry in call.env.suppressions.values())
    return 200, {"as_of": iso(call.store.clock.time()), "count": len(emails), "emails": emails}
