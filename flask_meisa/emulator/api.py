"""The Meisa API: routing, authentication, the key's rate limit and scopes.

:func:`handle` takes one parsed request and answers ``(status, body, headers)``. It holds
the store's lock for the whole call, so every call is atomic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from . import contacts
from . import sequences
from . import triggers
from .call import Answer
from .call import ApiError
from .call import Call
from .call import Request
from .ratelimit import retry_after_header
from .recording import BASE_PATH
from .state import Store

__all__ = ["BASE_PATH", "Answer", "Request", "handle"]

_Endpoint = Callable[[Call], tuple[int, Any]]
_Route = tuple[str, "str | None", _Endpoint]

#: Paths with a contact's ``{id}`` match :data:`_CONTACT_PATH`.
_ROUTES: dict[str, _Route] = {
    "/ping/": ("GET", None, contacts.ping),
    "/contacts/upsert/": ("POST", "contacts:write", contacts.upsert),
    "/events/track/": ("POST", "events:track", contacts.track),
    "/contacts/api/unsubscribed-emails/": ("GET", "contacts:read", contacts.unsubscribed),
    "/sequences/enroll/": ("POST", "sequences:enroll", sequences.enroll),
    "/sequences/api/bulk-enroll/": ("POST", "sequences:enroll", sequences.bulk_enroll),
    "/sequences/api/list/": ("GET", "sequences:read", sequences.list_sequences),
    "/sequences/api/contact-enrollments/": ("GET", "sequences:read", sequences.enrollments),
    "/emails/trigger/": ("POST", "emails:trigger", triggers.trigger),
    "/contacts/{id}/add_tag/": ("POST", "contacts:write", contacts.add_tag),
    "/contacts/{id}/remove_tag/": ("POST", "contacts:write", contacts.remove_tag),
}
_CONTACT_PATH = re.compile(r"^/contacts/([^/]+)/(add_tag|remove_tag)/$")


def handle(store: Store, request: Request) -> Answer:
    """Answer one API call (``request.path`` is relative to :data:`BASE_PATH`).

    Order: unknown path 404, key 401, rate limit 429 (a call answered 429 is not counted),
    method 405, scope 403, body 400, then the endpoint.
    """
    try:
        return _handle(store, request)
    except ApiError as error:
        return error.answer()


def _handle(store: Store, request: Request) -> Answer:
    route, contact_id = _resolve(request.path)
    if route is None:
        raise ApiError(404, "not_found", "Not found.")
    method, scope, endpoint = route
    with store.lock:
        api_key = store.keys.get(request.key) if request.key else None
        if api_key is None:
            detail = "Invalid API key." if request.key else "No API key was provided."
            raise ApiError(401, "authentication_failed", detail)
        # The wall clock, as a server's own and as every delivery engine counts: a clock
        # of its own would disagree with theirs on this host when it steps (a VM resumed).
        limiter, hit = api_key.limiter, store.clock.time()
        wait = limiter.acquire(hit) if limiter is not None else None
        if wait is not None:
            retry_after = {"Retry-After": retry_after_header(wait)}
            raise ApiError(429, "rate_limited", "Request was throttled.", headers=retry_after)
        try:
            _check(request, method, scope, api_key.scopes)
            body = (request.body or {}) if method == "POST" else {}
            env = store.envs[api_key.environment]
            status, answer = endpoint(Call(store, env, api_key, body, request.query, contact_id))
        except ApiError as error:
            if error.status == 429 and limiter is not None:
                limiter.release(hit)
            raise
        return status, answer, {}


def _check(request: Request, method: str, scope: str | None, scopes: frozenset[str]) -> None:
    if request.method != method:
        raise ApiError(
            405,
            "method_not_allowed",
            f"Method {request.method} not allowed.",
            headers={"Allow": method},
        )
    if scope is not None and scope not in scopes:
        raise ApiError(403, "missing_scope", f"This API key lacks the '{scope}' scope.")
    if method != "POST":
        return
    if not request.body_ok:
        raise ApiError(400, "parse_error", "Malformed JSON body.")
    if request.body is not None and not isinstance(request.body, dict):
        message = "Expected a JSON object."
        raise ApiError(400, "invalid", message, errors={"non_field_errors": [message]})


def _resolve(path: str) -> tuple[_Route | None, str]:
    route = _ROUTES.get(path)
    if route is not None:
        return route, ""
    match = _CONTACT_PATH.match(path)
    if match:
        return _ROUTES[f"/contacts/{{id}}/{match[2]}/"], match[1]
    return None, ""
