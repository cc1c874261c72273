"""``MeisaClient``: one method per Meisa endpoint over one pooled ``requests.Session``.

Every method validates its input first (a :class:`~flask_meisa.errors.ValidationError`
means no request was made), then calls Meisa, retrying per its
:class:`~flask_meisa.retry.RetryPolicy`, and returns a typed result from
:mod:`flask_meisa.results` or raises a typed error from :mod:`flask_meisa.errors`.
The API key travels only in the ``X-API-Key`` header: it is never logged, never shown by
``repr`` and never part of an error, and errors keep no chained ``requests`` exception
(those hold the prepared request and its headers).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import requests

from . import _http
from . import _values
from ._version import __version__
from .bodies import track_body
from .bodies import trigger_body
from .bodies import upsert_body
from .config import DEFAULTS
from .errors import ConfigurationError
from .errors import ValidationError
from .payloads import encode_body
from .payloads import json_object
from .payloads import normalize_email
from .payloads import normalize_external_id
from .payloads import optional_text
from .payloads import require_text
from .payloads import unique_emails
from .results import BulkEnrollResult
from .results import Contact
from .results import ContactEnrollments
from .results import Enrollment
from .results import PingResult
from .results import Sequence
from .results import TagResult
from .results import TrackResult
from .results import TriggerResult
from .results import UnsubscribedEmails
from .retry import RetryPolicy

__all__ = ["BULK_ENROLL_LIMIT", "DEFAULT_BASE_URL", "DEFAULT_TIMEOUT", "MeisaClient", "Timeout"]

#: Meisa's production API (``MEISA_BASE_URL``'s default).
DEFAULT_BASE_URL: str = DEFAULTS["MEISA_BASE_URL"]
#: (connect, read) seconds (``MEISA_CONNECT_TIMEOUT``'s and ``MEISA_TIMEOUT``'s defaults).
DEFAULT_TIMEOUT: tuple[float, float] = (
    DEFAULTS["MEISA_CONNECT_TIMEOUT"],
    DEFAULTS["MEISA_TIMEOUT"],
)
#: The most addresses one bulk-enroll call takes; more are split over several calls.
BULK_ENROLL_LIMIT = 500

Timeout = float | tuple[float, float]

#: The key scope each endpoint needs (``GET /ping/`` needs none), named by a 403's error.
#: The endpoint of each kind of operation.
_PATHS = {"upsert": "/contacts/upsert/", "track": "/events/track/", "send": "/emails/trigger/"}

_SCOPES = {
    "POST /contacts/upsert/": "contacts:write",
    "POST /contacts/{id}/add_tag/": "contacts:write",
    "POST /contacts/{id}/remove_tag/": "contacts:write",
    "GET /contacts/api/unsubscribed-emails/": "contacts:read",
    "POST /events/track/": "events:track",
    "GET /sequences/api/list/": "sequences:read",
    "GET /sequences/api/contact-enrollments/": "sequences:read",
    "POST /sequences/enroll/": "sequences:enroll",
    "POST /sequences/api/bulk-enroll/": "sequences:enroll",
    "POST /emails/trigger/": "emails:trigger",
}

logger = logging.getLogger("flask_meisa.client")


class MeisaClient:
    """A synchronous client of the Meisa API.

    :param api_key: the key sent as ``X-API-Key``.
    :param base_url: the API root; ``https://`` (``http://`` only for a loopback host).
    :param timeout: seconds, for connecting and for each read, or a ``(connect, read)``
        pair. An attempt ends after ``connect + read`` seconds in all, however slowly the
        answer comes, and never outlives the retry policy's deadline.
    :param retry: the retry policy; default :class:`RetryPolicy()`.
    :param session: a ``requests.Session`` to use (the caller closes it); by default the
        client makes its own pooled session on first use and closes it in :meth:`close`.
        On a given session, an answer that trickles in is limited by ``timeout`` per read
        only, not in all.
    :param pool_size: connections kept alive per host by the client's own session.
    :raises ConfigurationError: for a missing or malformed key, URL, timeout or policy.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        pool_size: int = 10,
    ) -> None:
        self._api_key = _check_key(api_key)
        self._base_url = _check_base_url(base_url)
        self._timeout = _check_timeout(timeout)
        self._retry = _check_retry(retry)
        if session is not None and not isinstance(session, requests.Session):
            raise ConfigurationError("session must be a requests.Session")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigurationError("pool_size must be an integer >= 1")
        self._sessions = _http.SessionHolder(session, pool_size)
        self._owner = True
        self._headers = {
            "X-API-Key": self._api_key,
            "User-Agent": f"flask-meisa/{__version__} python-requests/{requests.__version__}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The API root, without a trailing slash."""
        return self._base_url

    @property
    def timeout(self) -> tuple[float, float]:
        """The ``(connect, read)`` timeout in seconds."""
        return self._timeout

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy."""
        return self._retry

    def with_options(
        self, *, timeout: Timeout | None = None, retry: RetryPolicy | None = None
    ) -> MeisaClient:
        """A copy with another timeout and/or retry policy, sharing this client's session.

        Closing the copy leaves the shared session open; close the original.
        """
        clone = object.__new__(MeisaClient)
        clone.__dict__.update(self.__dict__)
        clone._owner = False
        if timeout is not None:
            clone._timeout = _check_timeout(timeout)
        if retry is not None:
            clone._retry = _check_retry(retry)
        return clone

    def close(self) -> None:
        """Close the client's own session (a session passed in stays open)."""
        if self._owner:
            self._sessions.close()

    def __enter__(self) -> MeisaClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        tail = f"…{self._api_key[-4:]}" if len(self._api_key) >= 16 else "…"
        return f"MeisaClient(base_url={self._base_url!r}, api_key={tail!r})"

    def __reduce__(self) -> Any:
        raise TypeError("MeisaClient holds a secret and cannot be pickled")

    # -- endpoints ---------------------------------------------------------------------

    def ping(self) -> PingResult:
        """``GET /ping/``: the key's environment, scopes and product."""
        _, body = self._call("GET", "/ping/")
        return PingResult.from_body(body)

    def upsert_contact(
        self,
        email: str,
        *,
        external_id: str | int | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        display_name: str | None = None,
        source: str | None = None,
        custom_fields: Mapping[str, Any] | None = None,
        tag_names: Iterable[str] | None = None,
    ) -> Contact:
        """``POST /contacts/upsert/``: create or update a contact (matched on
        ``external_id``, then ``email``). ``custom_fields`` are merged into the stored
        ones; ``tag_names`` are added, never removed."""
        body = upsert_body(
            {
                "email": email,
                "external_id": external_id,
                "first_name": first_name,
                "last_name": last_name,
                "display_name": display_name,
                "source": source,
                "custom_fields": custom_fields,
                "tag_names": tag_names,
            }
        )
        status, answer = self._call("POST", "/contacts/upsert/", body=body)
        return Contact.from_body(answer, status)

    def track_event(
        self,
        event_name: str,
        *,
        email: str | None = None,
        external_id: str | int | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """``POST /events/track/`` for the contact with this ``external_id`` or ``email``.

        Meisa answers 404 (:class:`~flask_meisa.errors.NotFoundError`) when no contact
        matches: upsert first.
        """
        body = track_body(event_name, email=email, external_id=external_id, properties=properties)
        _, answer = self._call("POST", "/events/track/", body=body)
        return TrackResult.from_body(answer)

    def add_tag(
        self, contact_id: str, *, tag_name: str | None = None, tag_id: str | int | None = None
    ) -> TagResult:
        """``POST /contacts/{id}/add_tag/``: tag a contact (the tag is made if missing)."""
        return self._tag("add_tag", contact_id, tag_name, tag_id)

    def remove_tag(
        self, contact_id: str, *, tag_name: str | None = None, tag_id: str | int | None = None
    ) -> TagResult:
        """``POST /contacts/{id}/remove_tag/``: untag a contact."""
        return self._tag("remove_tag", contact_id, tag_name, tag_id)

    def _tag(self, action: str, contact_id: object, tag_name: object, tag_id: object) -> TagResult:
        contact = normalize_external_id(contact_id, "contact_id")
        if (tag_name is None) == (tag_id is None):
            raise ValidationError("tag_name", "give exactly one of tag_name or tag_id")
        name = optional_text(tag_name, "tag_name")
        body: dict[str, Any] = {
            "tag_name": name,
            "tag_id": _maybe(normalize_external_id, tag_id, "tag_id"),
        }
        path = f"/contacts/{quote(contact, safe='')}/{action}/"
        _, answer = self._call("POST", path, body=body, endpoint=f"/contacts/{{id}}/{action}/")
        return TagResult.from_body(answer, contact, name)

    def unsubscribed_emails(self) -> UnsubscribedEmails:
        """``GET /contacts/api/unsubscribed-emails/``: every address not to email."""
        _, body = self._call("GET", "/contacts/api/unsubscribed-emails/")
        return UnsubscribedEmails.from_body(body)

    def enroll(
        self,
        email: str,
        sequence_slug: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        trigger_source: str | None = None,
        override_unsubscribe: bool = False,
    ) -> Enrollment:
        """``POST /sequences/enroll/``: enroll a contact (made if missing) in an active
        sequence. Already enrolled → :class:`~flask_meisa.errors.ConflictError`."""
        body: dict[str, Any] = {
            "email": normalize_email(email),
            "sequence_slug": require_text(sequence_slug, "sequence_slug"),
            "metadata": json_object(metadata, "metadata"),
            "trigger_source": optional_text(trigger_source, "trigger_source"),
            "override_unsubscribe": _flag(override_unsubscribe, "override_unsubscribe"),
        }
        _, answer = self._call("POST", "/sequences/enroll/", body=body)
        return Enrollment.from_body(answer, body["sequence_slug"])

    def bulk_enroll(
        self, sequence_slug: str, emails: Iterable[str], *, override_unsubscribe: bool = False
    ) -> BulkEnrollResult:
        """``POST /sequences/api/bulk-enroll/`` for many addresses.

        Every address is checked first; repeats are dropped. More than
        :data:`BULK_ENROLL_LIMIT` addresses take several calls, combined into one result.
        An error in a later call raises after the earlier calls took effect; calling again
        is safe, as already enrolled addresses are skipped.
        """
        slug = require_text(sequence_slug, "sequence_slug")
        addresses = unique_emails(emails, "emails")
        override = _flag(override_unsubscribe, "override_unsubscribe")
        bodies = []
        for start in range(0, len(addresses), BULK_ENROLL_LIMIT):
            chunk = addresses[start : start + BULK_ENROLL_LIMIT]
            body = {"sequence_slug": slug, "emails": chunk, "override_unsubscribe": override}
            bodies.append(self._call("POST", "/sequences/api/bulk-enroll/", body=body)[1])
        return BulkEnrollResult.combine(slug, bodies)

    def list_sequences(
        self, *, status: str | None = None, search: str | None = None
    ) -> tuple[Sequence, ...]:
        """``GET /sequences/api/list/``: active sequences, or ``status="all"``."""
        params = {
            "status": optional_text(status, "status"),
            "search": optional_text(search, "search"),
        }
        _, body = self._call("GET", "/sequences/api/list/", params=params)
        return Sequence.list_from_body(body)

    def contact_enrollments(self, email: str) -> ContactEnrollments:
        """``GET /sequences/api/contact-enrollments/``: one contact's enrollments."""
        address = normalize_email(email)
        params = {"email": address}
        _, body = self._call("GET", "/sequences/api/contact-enrollments/", params=params)
        return ContactEnrollments.from_body(body, address)

    def trigger_email(
        self,
        trigger_key: str,
        to_email: str,
        *,
        variables: Mapping[str, Any] | None = None,
        recipient: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> TriggerResult:
        """``POST /emails/trigger/``: send a transactional email.

        Every attempt carries the same ``idempotency_key`` (a random one when none is
        given; it is in the result), so a retry after a lost answer sends nothing twice.
        A suppressed recipient or a missing sender raises
        :class:`~flask_meisa.errors.UnprocessableEntityError`.
        """
        body = trigger_body(
            trigger_key,
            to_email,
            variables=variables,
            recipient=recipient,
            idempotency_key=idempotency_key,
        )
        status, answer = self._call("POST", "/emails/trigger/", body=body)
        return TriggerResult.from_body(answer, status, str(body["idempotency_key"]))

    def send_json(self, kind: str, body: str) -> Contact | TrackResult | TriggerResult:
        """Make the call of a body already validated and encoded (what the delivery
        engines do with an :class:`~flask_meisa.operations.Operation`): ``kind`` is
        ``"upsert"``, ``"track"`` or ``"send"``."""
        path = _PATHS[kind]
        status, answer = self._call("POST", path, data=body.encode())
        if kind == "upsert":
            return Contact.from_body(answer, status)
        if kind == "track":
            return TrackResult.from_body(answer)
        key = json.loads(body).get("idempotency_key")
        return TriggerResult.from_body(answer, status, key)

    # -- transport ---------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        params: Mapping[str, str | None] | None = None,
        endpoint: str | None = None,
    ) -> tuple[int, Any]:
        """Make the call, retrying per the policy; return (status, parsed body)."""
        if body is not None:
            data = encode_body({k: v for k, v in body.items() if v is not None}).encode()
        query = {k: v for k, v in params.items() if v is not None} if params else None
        name = f"{method} {endpoint or path}"
        request = _http.Request(
            method, self._base_url + path, name, data, query, _SCOPES.get(name)
        )
        session = self._sessions.get()
        policy = self._retry
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            status, answer, error = _http.attempt(
                session,
                request,
                self._headers,
                self._timeout,
                self._attempt_limit(policy, started),
                self._api_key,
            )
            if error is None:
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("%s answered %d (attempt %d)", name, status, attempt)
                return status, answer
            delay = policy.delay_for(attempt, error, time.monotonic() - started)
            outcome = _http.describe(error)
            if delay is None:
                if policy.is_retryable(error) and policy.max_attempts != 1:
                    logger.warning("%s %s on attempt %d; giving up", name, outcome, attempt)
                else:
                    logger.debug("%s %s on attempt %d", name, outcome, attempt)
                raise error
            logger.info("%s %s on attempt %d; retrying in %.2f s", name, outcome, attempt, delay)
            time.sleep(delay)

    def _attempt_limit(self, policy: RetryPolicy, started: float) -> float:
        """Seconds the next attempt may take in all."""
        limit = sum(self._timeout)
        if policy.deadline is None:
            return limit
        # No attempt may run past the deadline; a floor keeps the last one meaningful.
        return min(limit, max(policy.deadline - (time.monotonic() - started), 0.05))


def _maybe(check: Any, value: Any, field: str) -> Any:
    return None if value is None else check(value, field)


def _flag(value: object, field: str) -> bool | None:
    """A boolean option; ``False`` is Meisa's default, so it is left out of the body."""
    if not isinstance(value, bool):
        raise ValidationError(field, f"must be True or False, not {type(value).__name__}")
    return True if value else None


def _check_key(api_key: object) -> str:
    try:
        key = _values.api_key(api_key)
    except _values.InvalidValue as error:
        raise ConfigurationError(f"api_key {error} (MEISA_API_KEY)") from None
    if key is None:
        raise ConfigurationError("api_key is not set (set MEISA_API_KEY)")
    return key


def _check_base_url(base_url: object) -> str:
    try:
        return _values.base_url(base_url)
    except _values.InvalidValue as error:
        raise ConfigurationError(f"base_url {error}") from None


def _check_timeout(timeout: object) -> tuple[float, float]:
    pair = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if len(pair) != 2 or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
        for t in pair
    ):
        raise ConfigurationError("timeout must be seconds > 0, or a (connect, read) pair")
    return float(pair[0]), float(pair[1])


def _check_retry(retry: object) -> RetryPolicy:
    if retry is None:
        return RetryPolicy()
    if not isinstance(retry, RetryPolicy):
        raise ConfigurationError("retry must be a RetryPolicy")
    return retry
