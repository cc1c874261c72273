"""The transport under :class:`~flask_meisa.client.MeisaClient`: its pooled session, one
HTTP attempt, and safe error text.

An attempt has a total time limit however slowly the answer comes (see
:mod:`flask_meisa._watchdog`) and reads at most :data:`MAX_ANSWER_BYTES`. It returns either
a 2xx status and its parsed body, or a typed error built from the answer or from the
``requests`` exception. Errors are built here, returned and raised by the caller outside
any ``except`` block, so they chain no ``requests`` exception (those hold the prepared
request, headers included). Text taken from an answer (the keys of its objects too) is
cleaned of the API key, anything shaped like a Meisa key or an email address, and
control characters, and cut short.
"""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions

from ._watchdog import WatchedAdapter
from ._watchdog import time_limit
from .errors import APIConnectionError
from .errors import APIError
from .errors import APITimeoutError
from .errors import MeisaError
from .errors import PermissionDeniedError
from .errors import error_for_status
from .retry import parse_retry_after

__all__ = ["Request", "SessionHolder", "attempt", "clean_text", "describe", "new_session"]

#: Longest message kept from an error answer.
MAX_MESSAGE = 200
#: Longest excerpt kept from a non-JSON error answer.
MAX_EXCERPT = 120
#: Deepest nesting kept in an error's ``body``.
MAX_BODY_DEPTH = 32
#: Largest answer read, decoded (the suppression list of a million addresses fits).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024

_KEY_SHAPE = re.compile(r"meisa_[A-Za-z0-9]+_[A-Za-z0-9_\-]+")
# A match may only start where a run of address characters starts (the lookbehind), so a
# long run without an "@" is scanned once, not once per character (quadratic).
_EMAIL_SHAPE = re.compile(r"(?<![^\s@\"'<>(),;:\[\]])[^\s@\"'<>(),;:\[\]]+@[^\s@\"'<>(),;:\[\]]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Request:
    """What one call sends on every attempt (the body is encoded once)."""

    method: str
    url: str
    endpoint: str
    data: bytes | None
    params: Mapping[str, str] | None
    #: The key scope the endpoint needs, named by a 403's error.
    scope: str | None = None


class SessionHolder:
    """The session a client and its ``with_options`` copies share.

    The client's own session is made on first use and made again in a forked child, whose
    inherited pooled sockets belong to the parent.
    """

    def __init__(self, session: requests.Session | None, pool_size: int) -> None:
        self._given = session
        self._session = session
        self._pool_size = pool_size
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> requests.Session:
        """The session to use now (made on first use, and again after a fork)."""
        session = self._session
        if session is not None and (self._given is not None or self._pid == os.getpid()):
            return session
        if self._pid != os.getpid():
            # A forked child: the parent's lock may have been held by a thread that does not
            # exist here.
            self._lock = threading.Lock()
        with self._lock:
            if self._closed:
                raise MeisaError("this MeisaClient is closed")
            if self._session is None or self._pid != os.getpid():
                self._session = new_session(self._pool_size)
                self._pid = os.getpid()
            return self._session

    def close(self) -> None:
        """Close the session unless it was passed in; later use raises."""
        with self._lock:
            self._closed = True
            session, self._session = self._session, None
        if session is not None and self._given is None:
            session.close()


def new_session(pool_size: int) -> requests.Session:
    """A session with a keep-alive pool of ``pool_size`` connections per host."""
    session = requests.Session()
    adapter = WatchedAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def attempt(
    session: requests.Session,
    request: Request,
    headers: Mapping[str, str],
    timeout: tuple[float, float],
    limit: float,
    secret: str,
) -> tuple[int, Any, MeisaError | None]:
    """Make one attempt that ends within ``limit`` seconds: ``(status, parsed body,
    None)`` on 2xx, else ``(status, None, error)`` with status 0 when no whole answer came.

    :param timeout: the ``(connect, read)`` timeout of each socket operation.
    """
    timeout = (min(timeout[0], limit), min(timeout[1], limit))
    failure: BaseException | None = None
    content: bytes | None = None
    with time_limit(limit) as watch:
        try:
            response = session.request(
                request.method,
                request.url,
                params=request.params,
                data=request.data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,  # a redirect would carry the key to another host
                stream=True,
            )
            with response:
                content = _read(response)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failure = exc
    if watch.expired:  # whatever the cut socket made of the answer
        reason = f"no complete answer within {limit:.3g} s"
        return 0, None, APITimeoutError(request.endpoint, reason)
    if failure is not None:
        return 0, None, _connection_error(request.endpoint, failure, timeout)
    if content is None:
        reason = f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB"
        return 0, None, APIConnectionError(request.endpoint, reason, retryable=False)
    status = response.status_code
    if 200 <= status < 300:
        return status, _json(content), None
    return status, None, _api_error(request.endpoint, response, content, secret, request.scope)


def _read(response: requests.Response) -> bytes | None:
    """The whole (decoded) body, or ``None`` when it is larger than the limit."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        return None
    body = bytearray()
    for chunk in response.iter_content(_CHUNK_BYTES):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            return None
    return bytes(body)


def describe(error: MeisaError) -> str:
    """A short account of a failed attempt for a log line: status and code, or reason."""
    if isinstance(error, APIError):
        code = f" [{error.code}]" if error.code else ""
        return f"answered {error.status}{code}"
    if isinstance(error, APIConnectionError):
        return f"failed: {error.reason}"
    return "failed"


def _json(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        return None


def clean_text(text: str, secret: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` without the key, key- or email-shaped words and control characters,
    whitespace collapsed and cut to ``limit`` characters."""
    if secret:
        text = text.replace(secret, "[redacted]")
    text = _KEY_SHAPE.sub("[redacted]", text)
    text = _EMAIL_SHAPE.sub("[email]", text)
    text = _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _scrub(value: Any, secret: str, depth: int = 0) -> Any:
    """An error body with the same cleaning applied to every string, object keys included
    (no length cap), and containers nested deeper than :data:`MAX_BODY_DEPTH` dropped
    (``None``)."""
    if isinstance(value, str):
        return clean_text(value, secret, limit=len(value) + 1)
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
) -> APIError:
    status = response.status_code
    # Scrubbed first: it also bounds the depth that json.dumps and repr() meet below.
    body = _scrub(_json(content), secret)
    code: str | None = None
    message: str | None = None
    if isinstance(body, Mapping):
        raw_code = body.get("code")
        if isinstance(raw_code, str) and raw_code.strip():
            code = clean_text(raw_code, secret, limit=64)
        for name in ("detail", "message", "error"):
            value = body.get(name)
            if isinstance(value, str) and value.strip():
                message = clean_text(value, secret)
                break
            if isinstance(value, (Mapping, list)) and value:
                message = clean_text(json.dumps(value, ensure_ascii=False), secret)
                break
    elif body is None and content:
        excerpt = content[:2048].decode("utf-8", "replace")
        excerpt = clean_text(html.unescape(_TAG.sub(" ", excerpt)), secret, MAX_EXCERPT)
        if excerpt:
            message = f"non-JSON answer: {excerpt}"
    if not message:
        message = clean_text(response.reason or "", secret) or "no details"
    options: dict[str, Any] = {
        "code": code,
        "body": body,
        "retry_after": parse_retry_after(response.headers.get("Retry-After")),
    }
    kind = error_for_status(status)
    if issubclass(kind, PermissionDeniedError):
        options["scope"] = scope
    return kind(endpoint, status, message, **options)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it wraps: args, urllib3's ``reason``, causes."""
    pending = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 32:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [a for a in current.args if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            inner.append(reason)
        inner.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        pending.extend(inner)


# Checked in order: RemoteDisconnected is a ConnectionResetError, the certificate error
# an SSLError.
_REASONS: tuple[tuple[tuple[type[BaseException], ...], str, bool], ...] = (
    ((http.client.RemoteDisconnected,), "the server closed the connection unanswered", True),
    ((ConnectionRefusedError,), "connection refused", True),
    ((ConnectionResetError, BrokenPipeError), "connection reset", True),
    (
        (
            http.client.IncompleteRead,
            urllib3.exceptions.IncompleteRead,
            urllib3.exceptions.InvalidChunkLength,
            requests.exceptions.ChunkedEncodingError,
        ),
        "the answer was cut off",
        True,
    ),
    ((ssl.SSLCertVerificationError,), "TLS certificate verification failed", False),
    ((ssl.SSLError, requests.exceptions.SSLError), "TLS error", True),
    ((socket.gaierror, urllib3.exceptions.NameResolutionError), "host not resolved", True),
    ((requests.exceptions.ContentDecodingError,), "the answer could not be decoded", True),
    ((requests.ConnectionError, urllib3.exceptions.ProtocolError), "connection failed", True),
)


def _connection_error(
    endpoint: str, exc: BaseException, timeout: tuple[float, float]
) -> APIConnectionError:
    chain = list(_chain(exc))
    # Trust requests' own split: urllib3's NewConnectionError (a refusal) subclasses its
    # ConnectTimeoutError, so the chain alone cannot tell a refusal from a timeout.
    if isinstance(exc, requests.ConnectTimeout):
        return APITimeoutError(endpoint, f"no connection within {timeout[0]:g} s")
    if isinstance(exc, requests.Timeout) or any(
        isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError)) for e in chain
    ):
        return APITimeoutError(endpoint, f"no answer within {timeout[1]:g} s")
    for kinds, reason, retryable in _REASONS:
        if any(isinstance(e, kinds) for e in chain):
            return APIConnectionError(endpoint, reason, retryable=retryable)
    # InvalidURL, InvalidHeader and the like: a fault here, not a flaky network.
    return APIConnectionError(
        endpoint, f"request not sent ({type(exc).__name__})", retryable=False
    )
