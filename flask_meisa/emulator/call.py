"""One API call as the endpoints see it: the request, its context, typed field readers that
collect 400 errors, and the error answer.

Messages never repeat the value that was refused (it could be an address or a secret).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeVar

from .model import NAME_FIELDS

if TYPE_CHECKING:
    from .model import ApiKey
    from .state import EnvState
    from .state import Store

__all__ = ["MAX_STRING", "Answer", "ApiError", "Call", "Payload", "Request", "is_valid_email"]

_T = TypeVar("_T")

#: Longest accepted string field.
MAX_STRING = 255
_MAX_EMAIL = 254
#: ``(status, JSON body, extra headers)``
Answer = tuple[int, Any, Mapping[str, str]]


class ApiError(Exception):
    """An error answer: status, snake_case code, message, optional field errors and headers."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: Mapping[str, list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = dict(errors) if errors else None
        self.headers = dict(headers) if headers else {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        body: dict[str, Any] = {"detail": self.detail, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body

    def answer(self) -> Answer:
        """``(status, JSON body, headers)``, as the HTTP layer writes it."""
        return self.status, self.body(), self.headers

    @classmethod
    def invalid(cls, errors: Mapping[str, list[str]]) -> ApiError:
        """A 400 ``invalid`` answer for these field errors."""
        return cls(400, "invalid", "Invalid input.", errors=errors)


def is_valid_email(value: str) -> bool:
    """Exactly one ``@``, a non-empty local part, a dotted domain, no whitespace or CR/LF."""
    if not value or len(value) > _MAX_EMAIL or value.count("@") != 1:
        return False
    if not value.isprintable() or any(ch.isspace() for ch in value):
        return False
    local, domain = value.split("@")
    return bool(local) and "." in domain and all(domain.split("."))


def _anything(value: object) -> bool:
    return True


def _strings(values: list[Any]) -> bool:
    return all(isinstance(v, str) and v.strip() and len(v) <= MAX_STRING for v in values)


class Payload:
    """Reads typed fields out of a JSON object and collects what is wrong, per field.

    Readers return ``None`` for an absent field (check :meth:`has` to tell absent from null).
    Call :meth:`done` once all fields were read: it raises a 400 if anything was wrong.
    """

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix
        self.errors: dict[str, list[str]] = {}

    def has(self, name: str) -> bool:
        """Whether the field was sent (even as null)."""
        return name in self.data

    def error(self, name: str, message: str) -> None:
        """Record an error for a field."""
        self.errors.setdefault(self.prefix + name, []).append(message)

    def string(
        self, name: str, *, required: bool = False, nullable: bool = True, blank: bool = False
    ) -> str | None:
        """A string field of at most :data:`MAX_STRING` characters."""
        value = self.data.get(name)
        if value is None:
            if required:
                self.error(name, "This field is required.")
            elif name in self.data and not nullable:
                self.error(name, "This field may not be null.")
            return None
        if not isinstance(value, str):
            self.error(name, "Must be a string.")
            return None
        if not blank and not value.strip():
            self.error(name, "This field may not be blank." if not required else "Required.")
            return None
        if len(value) > MAX_STRING:
            self.error(name, f"Ensure this field has no more than {MAX_STRING} characters.")
            return None
        return value

    def email(self, name: str, *, required: bool = False) -> str | None:
        """An email address (see :func:`is_valid_email`)."""
        if required and self.data.get(name) is None:
            self.error(name, "This field is required.")
        return self._read(name, str, is_valid_email, "Enter a valid email address.")

    def obj(self, name: str) -> dict[str, Any] | None:
        """A JSON object field (null counts as absent)."""
        return self._read(name, dict, _anything, "Must be an object.")

    def string_list(self, name: str) -> list[str] | None:
        """A list of non-blank strings."""
        return self._read(name, list, _strings, "Must be a list of non-empty strings.")

    def boolean(self, name: str, default: bool = False) -> bool:
        """A JSON boolean."""
        value = self._read(name, bool, _anything, "Must be a boolean.")
        return default if value is None else value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        """One of ``choices``."""
        message = f"Must be one of: {', '.join(choices)}."
        value = self._read(name, str, choices.__contains__, message)
        return default if value is None else value

    def _read(
        self, name: str, kind: type[_T], ok: Callable[[_T], bool], message: str
    ) -> _T | None:
        """The field when it is a ``kind`` that is ``ok``; ``None`` when absent or null, and
        when it is not (then with ``message`` recorded)."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, kind) or not ok(value):
            self.error(name, message)
            return None
        return value

    def contact_fields(self) -> tuple[str | None, dict[str, str | None], Any]:
        """``external_id``, the sent name fields, and ``custom_fields`` of an upsert-like
        object."""
        external_id = self.string("external_id")
        names = {f: self.string(f, blank=True) for f in NAME_FIELDS if self.has(f)}
        return external_id, names, self.obj("custom_fields")

    def forbid(self, *names: str) -> None:
        """Refuse fields that the API does not let a caller set."""
        for name in names:
            if name in self.data:
                self.error(name, "This field cannot be set through the API.")

    def done(self) -> None:
        """Raise a 400 ``invalid`` when any field was wrong."""
        if self.errors:
            raise ApiError.invalid(self.errors)


@dataclass
class Request:
    """An API request: method, path relative to the base path, query, key and JSON body."""

    method: str
    path: str
    query: Mapping[str, str]
    key: str | None
    #: The parsed JSON body (``None`` when empty or malformed).
    body: Any
    #: Whether the body parsed as JSON.
    body_ok: bool


@dataclass
class Call:
    """An authenticated call routed to an endpoint."""

    store: Store
    env: EnvState
    key: ApiKey
    #: The JSON object body of a POST (empty for a GET).
    body: Mapping[str, Any]
    #: The query parameters (first value of each).
    query: Mapping[str, str]
    #: The ``{id}`` of ``/contacts/{id}/...`` paths.
    contact_id: str = ""
