"""After-response release: a request's operations are collected (coalesced per contact)
and handed to delivery once the server has written the response, for every kind of
response; under ``TESTING``, as soon as the view returned, so a test can assert right
after ``client.post()``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any

from .operations import Operation
from .operations import contact_key

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

__all__ = [
    "BATCH_KEY",
    "MIDDLEWARE_KEY",
    "RESPONDED_KEY",
    "AfterResponseMiddleware",
    "RequestBatch",
]

#: Environ key of the request's :class:`RequestBatch`.
BATCH_KEY = "flask_meisa.batch"
#: Environ key set while :class:`AfterResponseMiddleware` handles the request.
MIDDLEWARE_KEY = "flask_meisa.middleware"
#: Environ key set once the app has returned its response to the middleware.
RESPONDED_KEY = "flask_meisa.responded"

logger = logging.getLogger("flask_meisa")


class RequestBatch:
    """The operations one request produced, coalesced per contact, in arrival order.

    A later upsert of a contact already upserted in this request merges into the first
    one (later fields win, custom fields merged, tags united), so a request that changes
    a user three times makes one call. Events and sends keep their place.
    """

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self._upserts: dict[str, Operation] = {}
        #: The response's HTTP status, once known.
        self.status: int | None = None

    def __len__(self) -> int:
        return len(self.operations)

    def add(self, operation: Operation) -> None:
        """Append ``operation``, or merge it into this request's upsert of its contact."""
        if operation.kind == "upsert":
            keys = _identity_keys(operation.payload)
            earlier = next((self._upserts[k] for k in keys if k in self._upserts), None)
            if earlier is not None:
                earlier.merge(operation)
                for key in _identity_keys(earlier.payload):
                    self._upserts[key] = earlier
                return
            for key in keys:
                self._upserts[key] = operation
        self.operations.append(operation)


def _identity_keys(payload: dict[str, Any]) -> list[str]:
    # Both identities: an upsert by email alone and one by external_id with the same email
    # are one contact.
    keys = [contact_key(payload)]
    email = payload.get("email")
    if email and payload.get("external_id") not in (None, ""):
        keys.append(f"email:{str(email).lower()}")
    return [key for key in keys if key]


def _status_code(status_line: str) -> int | None:
    try:
        return int(status_line.split(" ", 1)[0])
    except ValueError:
        return None


class AfterResponseMiddleware:
    """WSGI middleware that releases each request's :class:`RequestBatch` after the
    server has written the response.

    :param wsgi_app: the wrapped WSGI application (the Flask app's ``wsgi_app``).
    :param release: called with the batch once the response is done; decides what to
        deliver. It must not raise.
    :param discard: called with the batch when the app raised instead of answering.
    :param early: when it answers true, the batch is released as soon as the app
        returned, before the body is written (under the test client).
    """

    def __init__(
        self,
        wsgi_app: WSGIApplication,
        release: Callable[[RequestBatch], None],
        discard: Callable[[RequestBatch], None],
        early: Callable[[], bool] = lambda: False,
    ) -> None:
        self.wsgi_app = wsgi_app
        self._release = release
        self._discard = discard
        self._early = early
        self._open = 0  # batches held by responses not yet closed
        self._released = threading.Condition()

    @property
    def open_batches(self) -> int:
        """Batches held by responses the server has not closed yet."""
        return self._open

    def wait_released(self, timeout: float | None) -> bool:
        """Wait until no response holds a batch, at most ``timeout`` seconds."""
        with self._released:
            return self._released.wait_for(lambda: self._open == 0, timeout)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[MIDDLEWARE_KEY] = True
        status: list[int | None] = [None]

        def recording_start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = _status_code(line)
            return start_response(line, headers, exc_info)

        try:
            body = self.wsgi_app(environ, recording_start_response)
        except BaseException:
            batch = environ.pop(BATCH_KEY, None)
            if batch is not None:
                self._discard(batch)
            raise
        finally:
            # From here on the response is on its way: work queued while a stream is
            # being written goes straight to delivery.
            environ[RESPONDED_KEY] = True
        batch = environ.pop(BATCH_KEY, None)
        if batch is None:
            return body
        batch.status = status[0]
        if self._early():
            self._release(batch)
            return body
        with self._released:
            self._open += 1
        return _ReleasingBody(body, lambda: self._finish(batch))

    def _finish(self, batch: RequestBatch) -> None:
        try:
            self._release(batch)
        finally:
            with self._released:
                self._open -= 1
                self._released.notify_all()


class _ReleasingBody:
    """A response body that runs ``release`` once, after the server is done with it."""

    def __init__(self, body: Iterable[bytes], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        """Close the wrapped body, then release the request's batch (once)."""
        release, self._release = self._release, None
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if release is not None:
                release()

    def __del__(self) -> None:
        if self._release is not None:
            self.close()
