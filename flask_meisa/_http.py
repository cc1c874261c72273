"""The client's transport: its session, one HTTP attempt within a time and size limit, and
the typed error of a failed one, cleaned of the key, emails and control characters.
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
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions
from requests.exceptions import ChunkedEncodingError

from . import _watchdog
from ._version import __version__
from ._watchdog import WatchedAdapter
from ._watchdog import time_limit
from .errors import APIConnectionError
from .errors import APIError
from .errors import APITimeoutError
from .errors import MeisaError
from .errors import PermissionDeniedError
from .errors import error_for_status
from .retry import parse_retry_after

__all__ = ["MAX_ANSWER_BYTES", "Request", "Transport", "clean_text", "describe"]

#: Longest message kept from an error answer.
MAX_MESSAGE = 200
#: Longest excerpt kept from a non-JSON error answer.
MAX_EXCERPT = 120
#: Deepest nesting kept in an error's ``body``.
MAX_BODY_DEPTH = 32
#: Largest answer read, decoded (the suppression list of a million addresses fits).
MAX_ANSWER_BYTES = 32 * 1024 * 1024

_KEY_SHAPE = re.compile(r"meisa_[A-Za-z0-9]+_[A-Za-z0-9_\-]+")
# A match may only start where a run of address characters starts (the lookbehind), so a
# long run without an "@" is scanned once, not once per character (quadratic).
_EMAIL_SHAPE = re.compile(r"(?<![^\s@\"'<>(),;:\[\]])[^\s@\"'<>(),;:\[\]]+@[^\s@\"'<>(),;:\[\]]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Request:
    """What one call sends on every attempt, and the key scope its endpoint needs."""

    method: str
    url: str
    endpoint: str
    data: bytes | None
    params: Mapping[str, str]
    scope: str | None


class Transport:
    """What a client and its ``with_options`` copies share: the key's headers, and the
    session given or the client's own (made on first use, and again in a forked child)."""

    def __init__(
        self, api_key: str, base_url: str, session: requests.Session | None, pool_size: int
    ) -> None:
        self._key, self._given, self._pool_size = api_key, session, pool_size
        self._base_url = base_url
        self._own: requests.Session | None = None
        self._lock, self._closed = threading.Lock(), False
        _transports.add(self)
        self._headers = {
            "X-API-Key": api_key,
            "User-Agent": f"flask-meisa/{__version__} python-requests/{requests.__version__}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

    def session(self) -> requests.Session:
        """The session to use now."""
        if _pid != os.getpid():  # a fork that ran no at-fork hook (uWSGI's prefork default)
            after_fork()
        with self._lock:
            if self._closed:
                raise MeisaError("this MeisaClient is closed")
            if self._given is not None:
                return self._given
            if self._own is None:
                self._own = _session_for(self._base_url, self._pool_size)
            return self._own

    def after_fork(self) -> None:
        """In a forked child: the parent's sockets, and a lock maybe held by its thread."""
        self._lock, self._own = threading.Lock(), None

    def close(self) -> None:
        """Close the client's own session; later use raises."""
        with self._lock:
            self._closed, own, self._own = True, self._own, None
        if own is not None:
            own.close()

    def attempt(
        self, request: Request, timeout: tuple[float, float], limit: float
    ) -> tuple[int, Any, APIError | APIConnectionError | None]:
        """One attempt within ``limit`` seconds: ``(status, parsed body, None)`` on 2xx, else
        ``(status or 0, None, error)``; the error is raised by the caller, out of any
        ``except`` block, so it chains no ``requests`` exception (those hold the headers)."""
        session, endpoint = self.session(), request.endpoint
        timeout = (min(timeout[0], limit), min(timeout[1], limit))
        failure: BaseException | None = None
        with time_limit(limit) as watch:
            try:
                response = session.request(
                    request.method,
                    request.url,
                    params=request.params,
                    data=request.data,
                    headers=self._headers,
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
            return 0, None, APITimeoutError(endpoint, reason)
        if failure is not None:
            return 0, None, _connection_error(endpoint, failure, timeout)
        if content is None:
            reason = f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB"
            return 0, None, APIConnectionError(endpoint, reason, retryable=False)
        status = response.status_code
        if 200 <= status < 300:
            return status, _json(content), None
        return status, None, _api_error(endpoint, response, content, self._key, request.scope)


def _session_for(base_url: str, pool_size: int) -> requests.Session:
    """A session for ``base_url`` that reads the environment's proxy and CA bundle
    variables once, here: by default requests reads them, scanning the whole environment,
    and looks for ``~/.netrc``, on every call (150-220 µs of each, in a container)."""
    session = requests.Session()
    adapter = WatchedAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.proxies = requests.utils.get_environ_proxies(base_url)  # NO_PROXY honoured
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    session.verify = bundle or True
    session.trust_env = False
    return session


# Every transport of the process, each reset in a forked child by the one fork hook
# (flask_meisa._runtime), or on first use after a fork that ran no hook.
_transports: weakref.WeakSet[Transport] = weakref.WeakSet()
_pid = os.getpid()


def after_fork() -> None:
    """In a forked child: reset the watchdog and every transport of the process."""
    global _pid
    _pid = os.getpid()
    _watchdog.after_fork()
    for transport in list(_transports):
        transport.after_fork()


def _read(response: requests.Response) -> bytes | None:
    """The whole (decoded) body, or ``None`` when it is larger than the limit."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        return None
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            return None
    return bytes(body)


def _json(content: bytes) -> Any:
    try:
        return json.loads(content) if content else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        return None


def describe(error: APIError | APIConnectionError) -> str:
    """A failed attempt for a log line: the status and code, or the reason."""
    if isinstance(error, APIError):
        return f"answered {error.status}{f' [{error.code}]' if error.code else ''}"
    return f"failed: {error.reason}"


def clean_text(text: str, secret: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` without the key, key- or email-shaped words and control characters,
    whitespace collapsed and cut to ``limit`` characters."""
    text = _KEY_SHAPE.sub("[redacted]", text.replace(secret, "[redacted]") if secret else text)
    text = _SPACES.sub(" ", _CONTROL.sub(" ", _EMAIL_SHAPE.sub("[email]", text))).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _scrub(value: Any, secret: str, depth: int = 0) -> Any:
    """An error body with every string (keys too) cleaned, uncut, and containers nested
    deeper than :data:`MAX_BODY_DEPTH` dropped."""
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
    # Scrubbed first: that also bounds the depth json.dumps and repr() meet below.
    body = _scrub(_json(content), secret)
    code: str | None = None
    message: str | None = None
    if isinstance(body, Mapping):
        if isinstance(body.get("code"), str) and body["code"].strip():
            code = clean_text(body["code"], secret, limit=64)
        for detail in (body.get("detail"), body.get("message"), body.get("error")):
            if isinstance(detail, str) and detail.strip():
                message = clean_text(detail, secret)
                break
            if isinstance(detail, (Mapping, list)) and detail:
                message = clean_text(json.dumps(detail, ensure_ascii=False), secret)
                break
    elif body is None and content:
        excerpt = html.unescape(_TAG.sub(" ", content[:2048].decode("utf-8", "replace")))
        if excerpt := clean_text(excerpt, secret, MAX_EXCERPT):
            message = f"non-JSON answer: {excerpt}"
    kind = error_for_status(response.status_code)
    scoped: dict[str, Any] = {"scope": scope} if issubclass(kind, PermissionDeniedError) else {}
    return kind(
        endpoint,
        response.status_code,
        message or clean_text(response.reason or "", secret) or "no details",
        code=code,
        body=body,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        **scoped,
    )


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
    ("host not resolved", True, (socket.gaierror, urllib3.exceptions.NameResolutionError)),
    ("the answer could not be decoded", True, (requests.exceptions.ContentDecodingError,)),
    ("connection failed", True, (requests.ConnectionError, urllib3.exceptions.ProtocolError)),
]


def _connection_error(
    endpoint: str, exc: BaseException, timeout: tuple[float, float]
) -> APIConnectionError:
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
        return APITimeoutError(endpoint, f"no connection within {timeout[0]:g} s")
    timeouts = (urllib3.exceptions.ReadTimeoutError, TimeoutError)
    if isinstance(exc, requests.Timeout) or any(isinstance(e, timeouts) for e in chain):
        return APITimeoutError(endpoint, f"no answer within {timeout[1]:g} s")
    for reason, retryable, kinds in _REASONS:
        if any(isinstance(e, kinds) for e in chain):
            return APIConnectionError(endpoint, reason, retryable=retryable)
    # InvalidURL, InvalidHeader and the like: a fault here, not a flaky network.
    return APIConnectionError(
        endpoint, f"request not sent ({type(exc).__name__})", retryable=False
    )
