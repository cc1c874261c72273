"""The total time limit of one HTTP attempt.

``requests`` applies its read timeout to each socket read, so an answer that trickles in
a byte at a time never times out. Here one daemon thread per process keeps a heap of
attempt deadlines and shuts down the socket of any attempt still running at its deadline,
which makes that attempt's next read fail. The connections of a :class:`WatchedAdapter`
hand themselves to the attempt running in their thread.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

__all__ = ["Watch", "WatchedAdapter", "time_limit"]


class Watch:
    """One attempt's deadline and the connection to cut when it passes."""

    __slots__ = ("connection", "deadline", "expired", "finished")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.connection: HTTPConnection | None = None
        #: Whether the deadline passed before the attempt finished.
        self.expired = False
        self.finished = False

    def __lt__(self, other: Watch) -> bool:
        return self.deadline < other.deadline


class _Watchdog:
    """The process's one watchdog thread, started on first use."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start afresh: in a forked child the thread is gone and the lock may be held."""
        self._cond = threading.Condition()
        self._heap: list[Watch] = []
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> Watch:
        """Watch an attempt that must finish within ``seconds``."""
        watch = Watch(time.monotonic() + seconds)
        with self._cond:
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name="flask-meisa-watchdog", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # at interpreter shutdown: per-read timeouts only
                    return watch
                self._thread = thread
            heapq.heappush(self._heap, watch)
            if self._heap[0] is watch:
                self._cond.notify()
        return watch

    def attach(self, watch: Watch, connection: HTTPConnection) -> None:
        """Note the connection ``watch``'s attempt uses (cut at once if already late)."""
        with self._cond:
            if watch.finished:
                return
            watch.connection = connection
            if watch.expired:
                _cut(connection)

    def finish(self, watch: Watch) -> None:
        """The attempt is over: its connection is no longer to be cut."""
        with self._cond:
            watch.finished = True
            watch.connection = None

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0].deadline <= now:
                    watch = heapq.heappop(self._heap)
                    if not watch.finished:
                        watch.expired = True
                        if watch.connection is not None:
                            _cut(watch.connection)
                self._cond.wait(self._heap[0].deadline - now if self._heap else None)


def _cut(connection: HTTPConnection) -> None:
    sock: Any = connection.sock
    if sock is not None and not isinstance(sock, socket.socket):
        sock = getattr(sock, "socket", None)  # urllib3's TLS-in-TLS transport
    if isinstance(sock, socket.socket):
        # The plain socket's shutdown: SSLSocket's own would also drop its TLS state
        # under the thread that is reading.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watchdog.reset)

_current: ContextVar[Watch | None] = ContextVar("flask_meisa_attempt", default=None)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[Watch]:
    """Cut the connection of the attempt made inside if it is still running after
    ``seconds``; the watch says afterwards whether that happened."""
    watch = _watchdog.start(seconds)
    token = _current.set(watch)
    try:
        yield watch
    finally:
        _current.reset(token)
        _watchdog.finish(watch)


def _attach(connection: HTTPConnection) -> None:
    watch = _current.get()
    if watch is not None:
        _watchdog.attach(watch, connection)


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()
        _attach(self)  # the deadline may have passed before there was a socket to cut

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)  # a kept-alive connection is not connected again
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS: dict[type[HTTPConnectionPool], type[HTTPConnectionPool]] = {
    HTTPConnectionPool: _WatchedHTTPPool,
    HTTPSConnectionPool: _WatchedHTTPSPool,
}


def _watch_pools(manager: PoolManager) -> PoolManager:
    # A SOCKS proxy's own pool classes are left as they are.
    manager.pool_classes_by_scheme = {
        scheme: _WATCHED_POOLS.get(cls, cls)
        for scheme, cls in manager.pool_classes_by_scheme.items()
    }
    return manager


class WatchedAdapter(HTTPAdapter):
    """An adapter whose connections an attempt inside :func:`time_limit` can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return _watch_pools(super().proxy_manager_for(proxy, **proxy_kwargs))
