"""The client's transport: its session, and one HTTP attempt within a size limit and a total time
limit (``requests`` times each socket read only: one watchdog thread per process shuts down the
socket of an attempt past its deadline)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import NameResolutionError
from urllib3.exceptions import NewConnectionError
from urllib3.poolmanager import PoolManager
from urllib3.util.connection import allowed_gai_family
from urllib3.util.ssl_ import is_ipaddress

from . import errors
from ._threads import start_daemon
from ._version import __version__
from .retry import parse_retry_after

#: Largest answer read, decoded, of the suppression list (a million addresses fit).
MAX_LIST_BYTES = 32 * 1024 * 1024
#: Largest answer read of any other call (8 times the largest body sent): a hostile answer
#: of JSON containers takes 25 times its size to parse (810 MiB for 32 MiB of ``{},``).
MAX_ANSWER_BYTES = 4 * 1024 * 1024


#: A JSON escape of an ASCII character that json.dumps writes as itself (a key's may be).
_ASCII_ESCAPE = re.compile(rb"\\u00[0-7]|\\/")


class Transport:
    """What a client and its ``with_options`` copies share: the key's headers, and the
    session given or the client's own (made on first use, and again in a forked child)."""

    def __init__(
        self, api_key: str, base_url: str, session: requests.Session | None, pool_size: int
    ) -> None:
        self._key, self._base_url, self._pool_size = api_key, base_url, pool_size
        self._echo = json.dumps(api_key)[1:-1].encode()  # the key as an answer's JSON has it
        self._session, self._owned = session, session is None
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
                raise errors.MeisaError("this MeisaClient is closed")
            if self._session is None:
                self._session = _session_for(self._base_url, self._pool_size)
            return self._session

    def after_fork(self) -> None:
        """In a forked child: the parent's sockets, and a lock maybe held by its thread."""
        self._lock = threading.Lock()
        if self._owned:
            self._session = None

    def close(self) -> None:
        """Close the client's own session; later use raises."""
        with self._lock:
            self._closed, session = True, self._session
        if self._owned and session is not None:
            session.close()

    def attempt(
        self,
        endpoint: str,
        scope: str | None,
        limit: float,
        largest: int = MAX_ANSWER_BYTES,
        **request: Any,
    ) -> tuple[int, Any] | errors.APIError | errors.APIConnectionError:
        """One attempt of ``requests.request(**request)`` within ``limit`` seconds, reading
        ``largest`` bytes of answer at most: ``(status, parsed body)`` on 2xx, else the typed
        error, for the caller to raise out of any ``except`` block and of this frame, so that it
        holds no ``requests`` object (those hold the headers) as a cause or in a traceback's
        locals."""
        session = self.session()
        failure: BaseException | None = None
        with _watchdog().time_limit(limit) as watch:
            try:
                # No redirect: it would carry the key to another host.
                response = session.request(
                    **request, headers=self._headers, allow_redirects=False, stream=True
                )
                with response:
                    if response.status_code < 200:  # its answer may follow: not reused
                        response.raw.close()
                    content = _read(response, largest)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                failure = exc
        # Whatever the cut socket made of the answer; a connection never made sent nothing.
        if watch.expired and not isinstance(failure, requests.ConnectTimeout):
            return errors.APITimeoutError(endpoint, f"no complete answer within {limit:.3g} s")
        if failure is not None:
            return errors._connection_error(endpoint, failure, request["timeout"])
        if content is None:
            reason = f"the answer is larger than {largest // 2**20} MiB"
            return errors.APIConnectionError(endpoint, reason, retryable=False)
        if response.status_code < 200:  # http.client skips a 100 Continue only
            reason = f"only an informational answer ({response.status_code})"
            return errors.APIConnectionError(endpoint, reason)
        if response.status_code < 300:
            return response.status_code, self._redacted(content)
        wait = parse_retry_after(response.headers.get("Retry-After"), response.headers.get("Date"))
        return errors._api_error(endpoint, response, content, self._key, scope, wait)

    def _redacted(self, content: bytes) -> Any:
        """A successful answer parsed, the key echoed in it (written in JSON escapes too)
        replaced: it never reaches a result."""
        body = errors._json(content.replace(self._echo, b"[redacted]"))
        if _ASCII_ESCAPE.search(content):  # they may spell the key: written again, not
            try:
                written = json.dumps(body).encode()
            except RecursionError:  # nested deeper than the stack: no answer of Meisa's
                return None
            body = errors._json(written.replace(self._echo, b"[redacted]"))
        return body


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
# (flask_meisa._process), or on first use after a fork that ran no hook.
_transports: weakref.WeakSet[Transport] = weakref.WeakSet()
_pid = os.getpid()


def after_fork() -> None:
    """In a forked child: a watchdog of its own (at first use), and every transport of the
    process reset."""
    global _pid
    _pid = os.getpid()
    _watchdogs.clear()
    for transport in list(_transports):
        transport.after_fork()


def _read(response: requests.Response, largest: int) -> bytes | None:
    """The whole (decoded) body, or ``None`` when it is larger than ``largest`` bytes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdecimal() and int(declared) > largest:  # isdigit() takes "²"
        return None
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > largest:
            return None
    return bytes(body)


class Watch:
    """One attempt: its deadline, its connection, and whether the deadline passed first."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.connection: HTTPConnection | None = None
        self.expired = False

    def cut(self) -> None:
        """Shut the connection's socket down if the deadline has passed."""
        sock: Any = self.connection.sock if self.expired and self.connection else None
        if not isinstance(sock, socket.socket):
            sock = getattr(sock, "socket", None)  # urllib3's TLS-in-TLS transport
        if isinstance(sock, socket.socket):
            # The plain socket's shutdown: SSLSocket's would also drop its TLS state under
            # the thread that is reading.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """The process's watchdog thread (started on first use) and the attempts it watches; a
    forked child makes a new one (the thread is gone there, the lock may be held)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.watches: set[Watch] = set()
        self.started = False

    @contextlib.contextmanager
    def time_limit(self, seconds: float) -> Iterator[Watch]:
        """Cut the attempt made inside if it still runs after ``seconds`` (the watch says so)."""
        watch = Watch(seconds)
        with self.cond:
            if not self.started:
                with contextlib.suppress(RuntimeError):  # at interpreter shutdown: per read only
                    start_daemon(self._run, "flask-meisa-watchdog")
                    self.started = True
            self.watches.add(watch)
            self.cond.notify()
        token = _current.set(watch)
        try:
            yield watch
        finally:
            _current.reset(token)
            with self.cond:
                self.watches.discard(watch)

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                for watch in [w for w in self.watches if w.deadline <= now]:
                    self.watches.discard(watch)
                    watch.expired = True
                    watch.cut()
                # No longer than a lock can wait: an attempt of two long timeouts and no
                # deadline would otherwise end this thread, and every later cut.
                deadlines = [min(w.deadline - now, threading.TIMEOUT_MAX) for w in self.watches]
                self.cond.wait(min(deadlines) if deadlines else None)


_current: ContextVar[Watch | None] = ContextVar("flask_meisa_attempt", default=None)
_watchdogs: list[_Watchdog] = []  # the process's one, once made


def _watchdog() -> _Watchdog:
    # Made at its first use in the process (after_fork forgets the parent's), not at the
    # fork: gevent patches a worker forked from a loaded app (gunicorn --preload) after the
    # fork, and a Condition made before it breaks once the watchdog thread is a greenlet.
    if not _watchdogs:
        _watchdogs.append(_Watchdog())
    return _watchdogs[0]


def _attach(connection: HTTPConnection) -> None:
    watch = _current.get()
    if watch is not None:
        with _watchdog().cond:
            watch.connection = connection
            watch.cut()


def _resolve(host: str, port: int, deadline: float) -> list[str]:
    """``host``'s addresses, resolved in a thread of its own: no socket timeout bounds a
    resolver, so the caller waits for it until ``deadline`` only."""
    found: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM))
        except Exception as error:
            found.append(error)
        done.set()

    start_daemon(run, "flask-meisa-resolve")
    if not done.wait(max(deadline - time.monotonic(), 0.0)):
        raise TimeoutError(f"{host} not resolved in time")
    if isinstance(found[0], Exception):
        raise found[0]
    return list(dict.fromkeys(str(entry[4][0]) for entry in found[0]))


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()
        _attach(self)  # the deadline may have passed before there was a socket to cut

    def _new_conn(self) -> socket.socket:
        watch, host = _current.get(), self._dns_host
        if watch is None or is_ipaddress(host):
            return super()._new_conn()
        wait = self.timeout if isinstance(self.timeout, (int, float)) else math.inf  # connect's
        try:
            addresses = _resolve(host, self.port, min(watch.deadline, time.monotonic() + wait))
        except TimeoutError as error:
            raise ConnectTimeoutError(self, f"{host} not resolved in time") from error
        except socket.gaierror as error:
            raise NameResolutionError(host, self, error) from error
        except UnicodeError:  # not a name: urllib3's own refusal
            return super()._new_conn()
        failure: Exception | None = None
        for address in addresses:  # each in turn, as urllib3 would
            self._dns_host = address
            try:
                return super()._new_conn()
            except (NewConnectionError, ConnectTimeoutError) as error:
                failure = error
            finally:
                self._dns_host = host
        raise failure or NameResolutionError(host, self, socket.gaierror("no address"))

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)  # a kept-alive connection is not connected again
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def _watch_pools(manager: PoolManager) -> PoolManager:
    # A SOCKS proxy's own pool classes are left as they are.
    watched = {HTTPConnectionPool: _WatchedHTTPPool, HTTPSConnectionPool: _WatchedHTTPSPool}
    classes = manager.pool_classes_by_scheme
    manager.pool_classes_by_scheme = {k: watched.get(v, v) for k, v in classes.items()}
    return manager


class WatchedAdapter(HTTPAdapter):
    """An adapter whose connections the watchdog can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return _watch_pools(super().proxy_manager_for(proxy, **proxy_kwargs))
