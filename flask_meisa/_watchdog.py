"""The total time limit of one HTTP attempt, which ``requests`` times per socket read only:
one thread per process shuts down the socket of an attempt past its deadline.
"""

from __future__ import annotations

import contextlib
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
    """The process's watchdog thread (started on first use) and the attempts it watches."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start afresh, as in a forked child: the thread is gone, the lock may be held."""
        self.cond = threading.Condition()
        self.watches: set[Watch] = set()
        self.started = False

    @contextlib.contextmanager
    def time_limit(self, seconds: float) -> Iterator[Watch]:
        """Cut the connection of the attempt made inside if it is still running after
        ``seconds``; the watch says afterwards whether that happened."""
        watch = Watch(seconds)
        with self.cond:
            if not self.started:
                thread = threading.Thread(target=self._run, name="flask-meisa-watchdog")
                thread.daemon = True
                with contextlib.suppress(RuntimeError):  # at interpreter shutdown: per read only
                    thread.start()
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
                deadlines = [w.deadline for w in self.watches]
                self.cond.wait(min(deadlines) - now if deadlines else None)


_current: ContextVar[Watch | None] = ContextVar("flask_meisa_attempt", default=None)
_watchdog = _Watchdog()
time_limit = _watchdog.time_limit
#: In a forked child (called by the one fork hook, in flask_meisa._runtime).
after_fork = _watchdog.reset


def _attach(connection: HTTPConnection) -> None:
    watch = _current.get()
    if watch is not None:
        with _watchdog.cond:
            watch.connection = connection
            watch.cut()


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


def _watch_pools(manager: PoolManager) -> PoolManager:
    # A SOCKS proxy's own pool classes are left as they are.
    watched = {HTTPConnectionPool: _WatchedHTTPPool, HTTPSConnectionPool: _WatchedHTTPSPool}
    classes = manager.pool_classes_by_scheme
    manager.pool_classes_by_scheme = {k: watched.get(v, v) for k, v in classes.items()}
    return manager


class WatchedAdapter(HTTPAdapter):
    """An adapter whose connections an attempt inside :func:`time_limit` can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return _watch_pools(super().proxy_manager_for(proxy, **proxy_kwargs))
