"""The error hierarchy.

Every error raised by flask-meisa derives from :class:`MeisaError`. Errors that come from
an HTTP answer carry the endpoint, status, Meisa's error ``code`` and message, and whether
a retry could succeed. No error ever holds the API key or a payload value (an email
address, a custom field's value): error text is built only from the endpoint, the status
and what Meisa said.
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


class ConfigurationError(MeisaError, ValueError):
    """A ``MEISA_*`` setting or a constructor argument is missing or invalid."""


class ValidationError(MeisaError, ValueError):
    """A call's input was refused before anything was sent or queued.

    :param field: the name of the offending field, e.g. ``"email"`` or
        ``"custom_fields.signup_date"``.
    :param message: what is wrong with it, without repeating its value.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DeliveryError(MeisaError):
    """The delivery engine could not accept an operation (for example a full queue)."""


class APIError(MeisaError):
    """Meisa answered with an error status.

    :param endpoint: the method and path that answered, e.g. ``"POST /emails/trigger/"``.
    :param status: the HTTP status code.
    :param code: Meisa's snake_case error code when the body had one, else ``None``.
    :param message: Meisa's message (``detail``), or a short description of the body.
    :param body: the parsed JSON body (or ``None`` when the body was not JSON).
    :param retry_after: seconds to wait before retrying, from ``Retry-After``.
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
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after
        super().__init__(self._describe())

    def _describe(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        return f"{self.endpoint} answered {self.status}{code}: {self.message}"

    def _options(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this error (for pickling)."""
        return {"code": self.code, "body": self.body, "retry_after": self.retry_after}

    def __reduce__(self) -> tuple[Any, ...]:
        args = (type(self), self.endpoint, self.status, self.message, self._options())
        return _rebuild_api_error, args


def _rebuild_api_error(
    cls: type[APIError], endpoint: str, status: int, message: str, options: dict[str, Any]
) -> APIError:
    return cls(endpoint, status, message, **options)


class BadRequestError(APIError):
    """400: a field was missing or invalid. :attr:`field_errors` maps field → messages."""

    @property
    def field_errors(self) -> dict[str, list[str]]:
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
    """403: the API key lacks the scope this endpoint needs.

    :param scope: that scope (e.g. ``"contacts:write"``) when the endpoint is known to
        need one; the message names it too.
    """

    def __init__(
        self, endpoint: str, status: int, message: str, *, scope: str | None = None, **options: Any
    ) -> None:
        self.scope = scope
        super().__init__(endpoint, status, message, **options)

    def _describe(self) -> str:
        text = super()._describe()
        return f"{text} (this call needs the key scope {self.scope})" if self.scope else text

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "scope": self.scope}


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
    """The request did not get an answer: connection refused, reset or dropped.

    :param endpoint: the method and path that was being called.
    :param reason: a short description of the failure (never a payload value).
    :param retryable: ``False`` for a failure a retry cannot fix (an untrusted TLS
        certificate, a malformed request); by default the class's ``True``.
    """

    retryable = True

    def __init__(self, endpoint: str, reason: str, *, retryable: bool | None = None) -> None:
        super().__init__(f"{endpoint} failed: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        if retryable is not None:
            self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_connection_error,
            (type(self), self.endpoint, self.reason, self.retryable),
        )


def _rebuild_connection_error(
    cls: type[APIConnectionError], endpoint: str, reason: str, retryable: bool
) -> APIConnectionError:
    return cls(endpoint, reason, retryable=retryable)


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
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, APIError)
