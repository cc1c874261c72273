"""The error hierarchy, and the error a failed attempt makes. No error holds the API key or a
payload value: its text comes from the endpoint, the status and what Meisa said (cleaned of the
key, emails and control characters)."""

from __future__ import annotations

import html
import http.client
import json
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any

import requests
import urllib3.exceptions
from requests.exceptions import ChunkedEncodingError
from urllib3.exceptions import NameResolutionError

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "DeliveryError",
    "MeisaError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "UnprocessableEntityError",
    "ValidationError",
    "error_for_status",
]

#: Longest message kept from an error answer.
MAX_MESSAGE = 200
#: Longest excerpt kept from a non-JSON error answer.
MAX_EXCERPT = 120
#: Deepest nesting kept in an error's ``body``.
MAX_BODY_DEPTH = 32
#: Largest error answer parsed as JSON; a larger one is only excerpted.
MAX_ERROR_BODY = 256 * 1024

_KEY_SHAPE = re.compile(r"meisa_[A-Za-z0-9]+_[A-Za-z0-9_\-]+")
# A match may only start where a run of address characters starts (the lookbehind), so a
# long run without an "@" is scanned once, not once per character (quadratic).
_EMAIL_SHAPE = re.compile(r"(?<![^\s@\"'<>(),;:\[\]])[^\s@\"'<>(),;:\[\]]+@[^\s@\"'<>(),;:\[\]]+")
# C0 and C1 control characters plus the Unicode line and paragraph separators: none of them
# belongs in an address, a name or a message; CR/LF could split a header or a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"\s+")


class MeisaError(Exception):
    """Base class of every error flask-meisa raises."""

    #: Whether the same call could succeed if tried again later.
    retryable: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its state: subclasses' constructors take other arguments than ``args``.
        return type(self).__new__, (type(self),), {**vars(self), "args": self.args}


class ConfigurationError(MeisaError, ValueError):
    """A ``MEISA_*`` setting or a constructor argument is missing or invalid."""


class ValidationError(MeisaError, ValueError):
    """A call's input was refused before anything was sent or queued: ``field`` (e.g.
    ``"custom_fields.plan"``) and what is wrong with it (``message``, without its value)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DeliveryError(MeisaError):
    """The delivery engine could not take a send (it is closed, or a Celery publish failed),
    or a send retried past Meisa's idempotency hour (through ``delivery_failed``)."""


class EngineClosed(DeliveryError):
    """A closed engine took none of the operations handed to it (the extension hands them
    to the app's next engine)."""


class APIError(MeisaError):
    """Meisa answered with an error status.

    :param endpoint: method and path, e.g. ``"POST /emails/trigger/"``.
    :param message: Meisa's ``detail``, or a short description of the body.
    :param code: Meisa's error code; ``body``: the cleaned JSON body (``None`` if not JSON or
        over :data:`MAX_ERROR_BODY`); ``retry_after``: seconds, from ``Retry-After``;
        ``hint``: what to do about it, when the library knows (the key scope a 403's call
        needs), else ``""``.
    """

    def __init__(
        self,
        endpoint: str,
        status: int,
        message: str,
        *,
        code: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
        hint: str = "",
    ) -> None:
        code_part, hint_part = f" [{code}]" if code else "", f" ({hint})" if hint else ""
        super().__init__(f"{endpoint} answered {status}{code_part}: {message}{hint_part}")
        self.hint = hint
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after


class BadRequestError(APIError):
    """400: a field was missing or invalid. :attr:`field_errors` maps field → messages."""

    @property
    def field_errors(self) -> dict[str, list[str]]:
        """Meisa's ``errors`` object, each field's messages as a list."""
        errors = self.body.get("errors") if isinstance(self.body, Mapping) else None
        if not isinstance(errors, Mapping):
            return {}
        return {
            str(field): [str(m) for m in (msgs if isinstance(msgs, list) else [msgs])]
            for field, msgs in errors.items()
        }


class AuthenticationError(APIError):
    """401: the API key is missing or invalid."""


class PermissionDeniedError(APIError):
    """403: the API key lacks the scope the endpoint needs; ``scope`` names it when known."""

    def __init__(
        self, endpoint: str, status: int, message: str, *, scope: str | None = None, **options: Any
    ) -> None:
        hint = f"this call needs the key scope {scope}" if scope else ""
        super().__init__(endpoint, status, message, hint=hint, **options)
        self.scope = scope


class NotFoundError(APIError):
    """404: no such contact, trigger or sequence."""


class ConflictError(APIError):
    """409: for example a contact already enrolled in the sequence."""


class UnprocessableEntityError(APIError):
    """422: e.g. ``code == "recipient_suppressed"`` or ``"no_sender"`` on a trigger."""


class RateLimitError(APIError):
    """429: the key's rate limit or the send guardrail. See :attr:`retry_after`."""

    retryable = True

    @property
    def about_recipient(self) -> bool:
        """Whether it is the send guardrail's (``send_guardrail``: too many emails to one
        address), which holds that recipient's sends only, for its whole ``Retry-After``."""
        return self.code == "send_guardrail"


class ServerError(APIError):
    """5xx: trouble on Meisa's side; safe to retry."""

    retryable = True


class APIConnectionError(MeisaError):
    """No answer came (``reason``: refused, reset, dropped...); ``retryable=False`` for a
    failure a retry cannot fix (an untrusted certificate)."""

    retryable = True

    def __init__(self, endpoint: str, reason: str, *, retryable: bool | None = None) -> None:
        super().__init__(f"{endpoint} failed: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        if retryable is not None:
            self.retryable = retryable


class APITimeoutError(APIConnectionError):
    """The connection or the answer took longer than the configured timeout."""

    #: Whether the request may have reached Meisa: False when no connection was made in
    #: time (nothing was sent), True when its answer was late (Meisa may count it later).
    sent = True


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_for_status(status: int) -> type[APIError]:
    """The :class:`APIError` subclass for an HTTP status code."""
    return ServerError if status >= 500 else _BY_STATUS.get(status, APIError)


def _json(content: bytes) -> Any:
    """A body parsed as JSON, or ``None``."""
    try:
        return json.loads(content) if content else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        return None


def _clean(text: str, secret: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` without the key, key- or email-shaped words and control characters,
    whitespace collapsed and cut to ``limit`` characters."""
    text = _KEY_SHAPE.sub("[redacted]", text.replace(secret, "[redacted]") if secret else text)
    text = _SPACES.sub(" ", _CONTROL.sub(" ", _EMAIL_SHAPE.sub("[email]", text))).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _scrub(value: Any, secret: str, depth: int = 0) -> Any:
    """An error body with every string (keys too) cleaned, uncut, and containers nested
    deeper than :data:`MAX_BODY_DEPTH` dropped."""
    if isinstance(value, str):
        return _clean(value, secret, limit=len(value) + 1)
    if isinstance(value, (Mapping, list)) and depth >= MAX_BODY_DEPTH:
        return None
    if isinstance(value, Mapping):
        return {_scrub(str(k), secret): _scrub(v, secret, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secret, depth + 1) for v in value]
    return value


def _api_error(
    endpoint: str,
    response: requests.Response,
    content: bytes,
    secret: str,
    scope: str | None = None,
    retry_after: float | None = None,
) -> APIError:
    """The error of an answer with an error status (``scope``: the key scope the call needs)."""
    # Scrubbed first: that also bounds the depth json.dumps and repr() meet below.
    small = len(content) <= MAX_ERROR_BODY  # 32 MiB of "[{},...]" parsed took 1.6 GB
    body = _scrub(_json(content), secret) if small else None
    code: str | None = None
    message: str | None = None
    if isinstance(body, Mapping):
        if isinstance(body.get("code"), str) and body["code"].strip():
            code = _clean(body["code"], secret, limit=64)
        for detail in (body.get("detail"), body.get("message"), body.get("error")):
            if isinstance(detail, (Mapping, list)) and detail:
                detail = json.dumps(detail, ensure_ascii=False)
            if isinstance(detail, str) and detail.strip():
                message = _clean(detail, secret)
                break
    elif body is None and content:
        excerpt = html.unescape(_TAG.sub(" ", content[:2048].decode("utf-8", "replace")))
        if excerpt := _clean(excerpt, secret, MAX_EXCERPT):
            message = f"{'non-JSON' if small else 'oversized'} answer: {excerpt}"
    kind = error_for_status(response.status_code)
    options: dict[str, Any] = {"code": code, "body": body, "retry_after": retry_after}
    if issubclass(kind, PermissionDeniedError):
        options["scope"] = scope
    elif 300 <= response.status_code < 400:  # redirects are not followed: the key stays here
        options["hint"] = "Meisa's API does not redirect: check MEISA_BASE_URL"
    message = message or _clean(response.reason or "", secret) or "no details"
    return kind(endpoint, response.status_code, message, **options)


# Checked in order: RemoteDisconnected is a ConnectionResetError, the certificate error
# an SSLError.
_REASONS: list[tuple[str, bool, tuple[type[BaseException], ...]]] = [
    ("the server closed the connection unanswered", True, (http.client.RemoteDisconnected,)),
    ("connection refused", True, (ConnectionRefusedError,)),
    ("connection reset", True, (ConnectionResetError, BrokenPipeError)),
    # urllib3's IncompleteRead and InvalidChunkLength are http.client's IncompleteRead.
    ("the answer was cut off", True, (http.client.IncompleteRead, ChunkedEncodingError)),
    ("TLS certificate verification failed", False, (ssl.SSLCertVerificationError,)),
    ("TLS error", True, (ssl.SSLError, requests.exceptions.SSLError)),
    ("host not resolved", True, (socket.gaierror, NameResolutionError)),
    ("the answer could not be decoded", True, (requests.exceptions.ContentDecodingError,)),
    # urllib3's own (conflicting lengths), raised after the request went out.
    ("the answer's head was malformed", True, (urllib3.exceptions.InvalidHeader,)),
    ("connection failed", True, (requests.ConnectionError, urllib3.exceptions.ProtocolError)),
]


def _connection_error(
    endpoint: str, exc: BaseException, timeout: tuple[float, float]
) -> APIConnectionError:
    """The error of an attempt that got no answer (``exc``: what ``requests`` raised)."""
    # Every exception ``exc`` wraps: in its args, urllib3's ``reason``, its causes.
    chain: list[BaseException] = []
    pending = [exc]
    while pending and len(chain) < 32:
        current = pending.pop(0)
        if not any(current is seen for seen in chain):
            chain.append(current)
            inner = (*current.args, getattr(current, "reason", None), current.__cause__)
            pending += [e for e in (*inner, current.__context__) if isinstance(e, BaseException)]
    # Trust requests' own split: urllib3's NewConnectionError (a refusal) subclasses its
    # ConnectTimeoutError, so the chain alone cannot tell a refusal from a timeout.
    if isinstance(exc, requests.ConnectTimeout):
        unsent = APITimeoutError(endpoint, f"no connection within {timeout[0]:g} s")
        unsent.sent = False
        return unsent
    timeouts = (urllib3.exceptions.ReadTimeoutError, TimeoutError)
    if isinstance(exc, requests.Timeout) or any(isinstance(e, timeouts) for e in chain):
        return APITimeoutError(endpoint, f"no answer within {timeout[1]:g} s")
    # Which name was not found (Meisa's or a proxy's): the reason alone did not say.
    if names := [e.conn.host for e in chain if isinstance(e, NameResolutionError) and e.conn]:
        return APIConnectionError(endpoint, f"host {names[0]} not resolved", retryable=True)
    for reason, retryable, kinds in _REASONS:
        if any(isinstance(e, kinds) for e in chain):
            return APIConnectionError(endpoint, reason, retryable=retryable)
    # InvalidURL, InvalidHeader and the like: a fault here, not a flaky network.
    reason = f"request not sent ({type(exc).__name__})"
    return APIConnectionError(endpoint, reason, retryable=False)
