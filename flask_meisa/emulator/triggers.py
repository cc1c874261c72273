"""``POST /emails/trigger/``: transactional sends, idempotency, conditions, the guardrail."""

from __future__ import annotations

import uuid
from typing import Any

from .call import ApiError
from .call import Call
from .call import Payload
from .model import Trigger
from .model import iso
from .ratelimit import RateLimiter
from .ratelimit import retry_after_header

__all__ = ["IDEMPOTENCY_WINDOW", "trigger"]

#: How long an ``idempotency_key`` is remembered, in seconds.
IDEMPOTENCY_WINDOW = 3600.0
_PURGE_AT = 10_000


def trigger(call: Call) -> tuple[int, Any]:
    """Send (200), schedule (202) or skip (200) an email; repeats of a key answer the same.

    Order: fields 400, idempotency repeat, trigger 400, sender 422, suppression 422,
    guardrail 429, then the contact is created or enriched and the conditions decide.
    Answers 200, 202 and 422 are remembered under the ``idempotency_key`` for an hour.
    """
    payload = Payload(call.body)
    trigger_key = payload.string("trigger_key", required=True)
    to_email = payload.email("to_email", required=True)
    payload.obj("variables")
    recipient = payload.obj("recipient")
    idempotency_key = payload.string("idempotency_key")
    fields = Payload(recipient or {}, prefix="recipient.")
    external_id, names, custom_fields = fields.contact_fields()
    payload.errors.update(fields.errors)
    payload.done()
    assert trigger_key is not None and to_email is not None
    env = call.env
    now = call.store.clock.monotonic()
    if idempotency_key is not None:
        first = env.idempotency.get(idempotency_key)
        if first is not None and now - first[0] < IDEMPOTENCY_WINDOW:
            return first[1], {**first[2], "duplicate": True}
    configured = call.store.triggers.get(trigger_key)
    if configured is None or not configured.active:
        raise ApiError(
            400,
            "invalid_trigger",
            "Unknown or inactive trigger_key.",
            errors={"trigger_key": ["Unknown or inactive trigger."]},
        )
    try:
        status, answer = _send(call, configured, to_email, external_id, names, custom_fields)
    except ApiError as error:
        if error.status == 422 and idempotency_key is not None:
            _remember(call, idempotency_key, now, error.status, error.body())
        raise
    if idempotency_key is not None:
        _remember(call, idempotency_key, now, status, answer)
    return status, answer


def _remember(call: Call, key: str, now: float, status: int, body: dict[str, Any]) -> None:
    memory = call.env.idempotency
    if len(memory) >= _PURGE_AT:
        for stale in [k for k, v in memory.items() if now - v[0] >= IDEMPOTENCY_WINDOW]:
            del memory[stale]
    memory[key] = (now, status, body)


def _guardrail(call: Call, to_email: str, mono: float) -> RateLimiter | None:
    spec = call.store.send_guardrail
    if spec is None:
        return None
    limiter = call.env.guardrails.get(to_email.lower())
    if limiter is None:
        limiter = call.env.guardrails[to_email.lower()] = RateLimiter(spec)
    wait = limiter.acquire(mono)
    if wait is not None:
        raise ApiError(
            429,
            "send_guardrail",
            "Too many emails to this recipient; try later.",
            headers={"Retry-After": retry_after_header(wait)},
        )
    return limiter


def _send(
    call: Call,
    configured: Trigger,
    to_email: str,
    external_id: str | None,
    names: dict[str, str | None],
    custom_fields: Any,
) -> tuple[int, dict[str, Any]]:
    store, env, body = call.store, call.env, call.body
    if store.sender is None:
        raise ApiError(422, "no_sender", "The product has no sender configured.")
    if env.status_of(to_email) != "subscribed":
        raise ApiError(422, "recipient_suppressed", "The recipient does not receive email.")
    mono, now = store.clock.monotonic(), store.clock.time()
    guardrail = _guardrail(call, to_email, mono)
    contact, created = env.upsert(
        to_email, now=now, external_id=external_id, names=names, custom_fields=custom_fields
    )
    answer: dict[str, Any] = {"contact_id": contact.id, "contact_created": created}
    if not configured.conditions_met(contact):
        if guardrail is not None:
            guardrail.release(mono)
        return 200, {"status": "skipped", "reason": "conditions_not_met", **answer}
    scheduled = configured.delay_seconds > 0
    send = {
        "id": str(uuid.uuid4()),
        "trigger_key": configured.key,
        "to_email": to_email,
        "variables": dict(body.get("variables") or {}),
        "recipient": dict(body["recipient"]) if body.get("recipient") else None,
        "status": "scheduled" if scheduled else "sent",
        "idempotency_key": body.get("idempotency_key"),
        "created_at": iso(now),
        "scheduled_for": iso(now + configured.delay_seconds),
        "contact_id": contact.id,
        "environment": env.name,
    }
    env.sends.append(send)
    answer = {"status": send["status"], "email_send_id": send["id"], **answer}
    if scheduled:
        answer["scheduled_for"] = send["scheduled_for"]
    return (202 if scheduled else 200), answer
