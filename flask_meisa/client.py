"""``MeisaClient``: one method per Meisa endpoint. Each checks its input (a ``ValidationError``
means nothing was sent), calls with retries and returns a typed result or raises a typed error."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import TypeVar
from urllib.parse import quote

import requests

from . import _http
from . import _payloads as payloads
from . import _values
from . import errors
from . import results
from .config import DEFAULTS
from .operations import encode_body
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
#: A context each attempt is made in, given the seconds it may wait (see ``with_options``).
Slot = Callable[[float], contextlib.AbstractContextManager[Any]]

#: Each endpoint's method, path and the key scope it needs (named by a 403's error).
_ENDPOINTS: dict[str, tuple[str, str, str | None]] = {
    "ping": ("GET", "/ping/", None),
    "upsert": ("POST", "/contacts/upsert/", "contacts:write"),
    "add_tag": ("POST", "/contacts/{id}/add_tag/", "contacts:write"),
    "remove_tag": ("POST", "/contacts/{id}/remove_tag/", "contacts:write"),
    "unsubscribed": ("GET", "/contacts/api/unsubscribed-emails/", "contacts:read"),
    "track": ("POST", "/events/track/", "events:track"),
    "sequences": ("GET", "/sequences/api/list/", "sequences:read"),
    "enrollments": ("GET", "/sequences/api/contact-enrollments/", "sequences:read"),
    "enroll": ("POST", "/sequences/enroll/", "sequences:enroll"),
    "bulk_enroll": ("POST", "/sequences/api/bulk-enroll/", "sequences:enroll"),
    "send": ("POST", "/emails/trigger/", "emails:trigger"),
}

logger = logging.getLogger("flask_meisa.client")
_T = TypeVar("_T")


class MeisaClient:
    """A synchronous client of the Meisa API; the key is sent as ``X-API-Key`` only.

    :param base_url: ``https://`` (``http://`` only for a loopback host).
    :param timeout: seconds, or ``(connect, read)``; an attempt ends after ``connect + read``
        in all (on a given ``session``: per read only), and within the policy's deadline.
    :param session: a session to use and leave open; by default the client's own, made on
        first use with ``pool_size`` connections per host and closed by :meth:`close`. It
        reads the proxy and CA bundle variables (``HTTPS_PROXY``, ``NO_PROXY``,
        ``REQUESTS_CA_BUNDLE``, ...) once, when it is made, and never ``~/.netrc``.
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
        key = _checked(_values.api_key, api_key, "api_key", " (MEISA_API_KEY)")
        if key is None:
            raise errors.ConfigurationError("api_key is not set (set MEISA_API_KEY)")
        self._base_url = _checked(_values.base_url, base_url, "base_url")
        self._api_key = key
        self._timeout = _check_timeout(timeout)
        self._retry = _check_retry(retry)
        if session is not None and not isinstance(session, requests.Session):
            raise errors.ConfigurationError("session must be a requests.Session")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise errors.ConfigurationError("pool_size must be an integer >= 1")
        self._http = _http.Transport(key, self._base_url, session, pool_size)
        self._owner = True
        self._slot: Slot = lambda seconds: contextlib.nullcontext()

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
        self,
        *,
        timeout: Timeout | None = None,
        retry: RetryPolicy | None = None,
        slot: Slot | None = None,
    ) -> MeisaClient:
        """A copy with another timeout and/or retry policy, sharing this client's session
        (closing the copy leaves it open); ``slot(seconds)``: a context each attempt is made
        in, which may wait that long first (a slot of the key's budget: Meisa counts every
        attempt); an attempt that was sent and got no answer in time raises its
        :class:`~flask_meisa.errors.APITimeoutError` in it, one answered 429 its
        :class:`~flask_meisa.errors.RateLimitError` (a call Meisa may not have counted)."""
        clone = object.__new__(MeisaClient)
        clone.__dict__.update(self.__dict__, _owner=False)
        if slot is not None:
            clone._slot = slot
        if timeout is not None:
            clone._timeout = _check_timeout(timeout)
        if retry is not None:
            clone._retry = _check_retry(retry)
        return clone

    def close(self) -> None:
        """Close the client's own session (a session passed in stays open)."""
        if self._owner:
            self._http.close()

    def __enter__(self) -> MeisaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        tail = _values.key_tail(self._api_key)
        return f"MeisaClient(base_url={self._base_url!r}, api_key={tail!r})"

    def __reduce__(self) -> Any:
        raise TypeError("MeisaClient holds a secret and cannot be pickled")

    def ping(self) -> results.PingResult:
        """``GET /ping/``: the key's environment, scopes and product."""
        return results.PingResult.from_body(self._call("ping")[1])

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
    ) -> results.Contact:
        """``POST /contacts/upsert/``: create or update a contact (matched on ``external_id``,
        then ``email``); ``custom_fields`` are merged, ``tag_names`` added."""
        fields = {name: value for name, value in locals().items() if name != "self"}
        status, answer = self._call("upsert", payloads.upsert_body(fields))
        return results.Contact.from_body(answer, status)

    def track_event(
        self,
        event_name: str,
        *,
        email: str | None = None,
        external_id: str | int | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> results.TrackResult:
        """``POST /events/track/`` for the contact with this ``external_id`` or ``email``;
        no such contact: :class:`~flask_meisa.errors.NotFoundError` (upsert first)."""
        fields = {name: value for name, value in locals().items() if name != "self"}
        return results.TrackResult.from_body(self._call("track", payloads.track_body(**fields))[1])

    def add_tag(
        self, contact_id: str, *, tag_name: str | None = None, tag_id: str | int | None = None
    ) -> results.TagResult:
        """``POST /contacts/{id}/add_tag/``: tag a contact (the tag is made if missing)."""
        return self._tag("add_tag", contact_id, tag_name, tag_id)

    def remove_tag(
        self, contact_id: str, *, tag_name: str | None = None, tag_id: str | int | None = None
    ) -> results.TagResult:
        """``POST /contacts/{id}/remove_tag/``: untag a contact."""
        return self._tag("remove_tag", contact_id, tag_name, tag_id)

    def _tag(
        self, action: str, contact_id: object, tag_name: object, tag_id: object
    ) -> results.TagResult:
        contact = payloads.normalize_external_id(contact_id, "contact_id")
        if "/" in contact or contact in (".", ".."):  # not one segment of the URL's path
            raise errors.ValidationError("contact_id", "must not contain '/' or be '.' or '..'")
        if (tag_name is None) == (tag_id is None):
            raise errors.ValidationError("tag_name", "give exactly one of tag_name or tag_id")
        name = payloads.optional_text(tag_name, "tag_name")
        tag = None if tag_id is None else payloads.normalize_external_id(tag_id, "tag_id")
        answer = self._call(action, {"tag_name": name, "tag_id": tag}, contact_id=contact)[1]
        return results.TagResult.from_body(answer, contact, name)

    def unsubscribed_emails(self) -> results.UnsubscribedEmails:
        """``GET /contacts/api/unsubscribed-emails/``: every address not to email."""
        return results.UnsubscribedEmails.from_body(self._call("unsubscribed")[1])

    def enroll(
        self,
        email: str,
        sequence_slug: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        trigger_source: str | None = None,
        override_unsubscribe: bool = False,
    ) -> results.Enrollment:
        """``POST /sequences/enroll/``: enroll a contact (made if missing) in an active
        sequence; already enrolled: :class:`~flask_meisa.errors.ConflictError`."""
        override = payloads.flag(override_unsubscribe, "override_unsubscribe")
        body: dict[str, Any] = {
            "email": payloads.normalize_email(email),
            "sequence_slug": payloads.require_text(sequence_slug, "sequence_slug"),
            "metadata": payloads.json_object(metadata, "metadata"),
            "trigger_source": payloads.optional_text(trigger_source, "trigger_source"),
            "override_unsubscribe": override or None,  # False, Meisa's default, is left out
        }
        return results.Enrollment.from_body(self._call("enroll", body)[1], body["sequence_slug"])

    def bulk_enroll(
        self, sequence_slug: str, emails: Iterable[str], *, override_unsubscribe: bool = False
    ) -> results.BulkEnrollResult:
        """``POST /sequences/api/bulk-enroll/`` in calls of :data:`BULK_ENROLL_LIMIT`, one
        result; a failed call raises after the earlier ones took effect (calling again is
        safe: enrolled addresses are skipped)."""
        slug = payloads.require_text(sequence_slug, "sequence_slug")
        addresses = payloads.unique_emails(emails, "emails")
        override = payloads.flag(override_unsubscribe, "override_unsubscribe") or None
        bodies = []
        for start in range(0, len(addresses), BULK_ENROLL_LIMIT):
            chunk = addresses[start : start + BULK_ENROLL_LIMIT]
            body = {"sequence_slug": slug, "emails": chunk, "override_unsubscribe": override}
            bodies.append(self._call("bulk_enroll", body)[1])
        return results.BulkEnrollResult.combine(slug, bodies)

    def list_sequences(
        self, *, status: str | None = None, search: str | None = None
    ) -> tuple[results.Sequence, ...]:
        """``GET /sequences/api/list/``: active sequences, or ``status="all"``."""
        params = {
            "status": payloads.optional_text(status, "status"),
            "search": payloads.optional_text(search, "search"),
        }
        return results.Sequence.list_from_body(self._call("sequences", params=params)[1])

    def contact_enrollments(self, email: str) -> results.ContactEnrollments:
        """``GET /sequences/api/contact-enrollments/``: one contact's enrollments."""
        address = payloads.normalize_email(email)
        answer = self._call("enrollments", params={"email": address})[1]
        return results.ContactEnrollments.from_body(answer, address)

    def trigger_email(
        self,
        trigger_key: str,
        to_email: str,
        *,
        variables: Mapping[str, Any] | None = None,
        recipient: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> results.TriggerResult:
        """``POST /emails/trigger/``: send a transactional email. Every attempt carries the
        same ``idempotency_key`` (random when none is given), so nothing is sent twice; a
        suppressed recipient raises :class:`~flask_meisa.errors.UnprocessableEntityError`."""
        fields = {name: value for name, value in locals().items() if name != "self"}
        body = payloads.trigger_body(**fields)
        status, answer = self._call("send", body)
        return results.TriggerResult.from_body(answer, status, str(body["idempotency_key"]))

    def send_json(
        self, kind: str, body: str
    ) -> results.Contact | results.TrackResult | results.TriggerResult:
        """Send a body already checked and encoded; ``kind``: ``"upsert"``, ``"track"`` or
        ``"send"``."""
        status, answer = self._call(kind, body)
        if kind == "upsert":
            return results.Contact.from_body(answer, status)
        if kind == "track":
            return results.TrackResult.from_body(answer)
        key = json.loads(body).get("idempotency_key")
        return results.TriggerResult.from_body(answer, status, key)

    def _call(
        self,
        name: str,
        body: Mapping[str, Any] | str | None = None,
        *,
        params: Mapping[str, str | None] | None = None,
        contact_id: str = "",
    ) -> tuple[int, Any]:
        """Call endpoint ``name``, retrying per the policy: ``(status, parsed body)``."""
        method, path, scope = _ENDPOINTS[name]
        if isinstance(body, Mapping):
            body = encode_body({k: v for k, v in body.items() if v is not None})
        request: dict[str, Any] = {
            "method": method,
            "url": self._base_url + path.replace("{id}", quote(contact_id, safe="")),
            "params": {k: v for k, v in (params or {}).items() if v is not None},
            "data": None if body is None else body.encode(),
        }
        endpoint = f"{method} {path}"
        largest = _http.MAX_LIST_BYTES if name == "unsubscribed" else _http.MAX_ANSWER_BYTES
        policy, started, attempt = self._retry, time.monotonic(), 0

        def left(floor: float) -> float:  # of the deadline (without one, an attempt's time)
            if policy.deadline is None:
                return sum(self._timeout)
            return max(policy.deadline - (time.monotonic() - started), floor)

        while True:
            attempt += 1
            try:
                # A slot is waited for half the time left at most: the call keeps the rest.
                with self._slot(left(0.0) / 2):
                    # No attempt runs past the deadline; a floor keeps the last.
                    limit = min(sum(self._timeout), left(0.05))
                    timeout = (min(self._timeout[0], limit), min(self._timeout[1], limit))
                    request["timeout"] = timeout
                    result = self._http.attempt(endpoint, scope, limit, largest, **request)
                    # The slot learns that Meisa may count it later still, or refused it.
                    if isinstance(result, errors.RateLimitError) or (
                        isinstance(result, errors.APITimeoutError) and result.sent
                    ):
                        raise result
            except (errors.APITimeoutError, errors.RateLimitError) as raised:
                result = raised
            if isinstance(result, tuple):
                logger.debug("%s answered %d (attempt %d)", endpoint, result[0], attempt)
                return result
            error = result
            delay = policy.delay_for(attempt, error, time.monotonic() - started)
            outcome = f"{endpoint} {_describe(error, endpoint)} on attempt {attempt}"
            if delay is None:
                if policy.is_retryable(error) and policy.max_attempts != 1:
                    logger.warning("%s; giving up", outcome)
                else:
                    logger.debug("%s", outcome)
                raise error
            logger.info("%s; retrying in %.2f s", outcome, delay)
            time.sleep(delay)


def _describe(error: errors.APIError | errors.APIConnectionError, endpoint: str) -> str:
    """A failed attempt at ``endpoint`` for a log line: the status and code, the reason, or
    (refused by the key's budget, a pause after a 429) why it was not made."""
    if isinstance(error, errors.APIError) and error.endpoint != endpoint:
        return f"not made: {error.message}"
    if isinstance(error, errors.APIError):
        return f"answered {error.status}{f' [{error.code}]' if error.code else ''}"
    return f"failed: {error.reason}"


def _checked(parse: Callable[[object], _T], value: object, name: str, hint: str = "") -> _T:
    try:
        return parse(value)
    except _values.InvalidValue as error:
        raise errors.ConfigurationError(f"{name} {error}{hint}") from None


def _check_timeout(timeout: object) -> tuple[float, float]:
    pair = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    # A socket takes no longer timeout (and the extension's keys no longer value).
    longest = threading.TIMEOUT_MAX
    if len(pair) != 2 or not all(_values.is_number(t) and 0 < t <= longest for t in pair):
        raise errors.ConfigurationError(
            f"timeout must be seconds from 0 to {longest:.0f}, or a (connect, read) pair"
        )
    return float(pair[0]), float(pair[1])


def _check_retry(retry: object) -> RetryPolicy:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise errors.ConfigurationError("retry must be a RetryPolicy")
    return retry or RetryPolicy()
