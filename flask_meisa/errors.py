"""The error hierarchy. No error holds the API key or a payload value: its text comes from
the endpoint, the status and what Meisa said (cleaned).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    """The delivery engine could not accept an operation (for example a full queue)."""


class APIError(MeisaError):
    """Meisa answered with an error status.

    :param endpoint: method and path, e.g. ``"POST /emails/trigger/"``.
    :param message: Meisa's ``detail``, or a short description of the body.
    :param code: Meisa's error code; ``body``: the cleaned JSON body (``None`` if not JSON);
        ``retry_after``: seconds, from ``Retry-After``; ``hint``: what to do about it, when
        the library knows (the key scope a 403's call needs), else ``""``.
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
