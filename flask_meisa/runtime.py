"""Per-app runtime state: the client, the suppression set and the delivery engine.

One :class:`MeisaState` exists per app that :meth:`Meisa.init_app
<flask_meisa.Meisa.init_app>` registered. Its parts are made on first use and remade in
a forked child (gunicorn ``--preload``): the child gets its own HTTP session, suppression
lock and delivery threads.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

from .client import MeisaClient
from .engine.base import Dispatcher
from .engine.sync import SyncDispatcher
from .reporting import SignalReporter
from .retry import RetryPolicy
from .suppression import SuppressionSet

if TYPE_CHECKING:
    from flask import Flask

    from .config import MeisaSettings
    from .results import UnsubscribedEmails

__all__ = ["MeisaState"]

logger = logging.getLogger("flask_meisa")


class MeisaState:
    """The runtime parts of :class:`~flask_meisa.Meisa` for one app.

    :param app: the app; held weakly, so an app that is gone takes its state with it.
    :param settings: the app's resolved ``MEISA_*`` settings.
    """

    def __init__(self, app: Flask, settings: MeisaSettings) -> None:
        self._app = weakref.ref(app)
        self.settings = settings
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._client: MeisaClient | None = None
        self._dispatcher: Dispatcher | None = None
        #: The suppression set consulted before every send.
        self.suppression = SuppressionSet(
            self._fetch_suppressions,
            ttl=settings.suppression_ttl,
            logger=logging.getLogger("flask_meisa.suppression"),
        )
        self.reporter = SignalReporter(app, self.suppression)

    @property
    def app(self) -> Flask:
        """The app this state belongs to."""
        app = self._app()
        if app is None:
            raise RuntimeError("the Flask app of this Meisa state no longer exists")
        return app

    def delivering(self) -> bool:
        """Whether operations are delivered now (read on every operation):
        ``MEISA_ENABLED`` and not ``MEISA_SUPPRESS_SEND`` (which follows ``TESTING``
        while it is ``None``)."""
        config = self.app.config
        if not config.get("MEISA_ENABLED", True):
            return False
        suppress = config.get("MEISA_SUPPRESS_SEND")
        if suppress is None:
            suppress = config.get("TESTING", False)
        return not suppress

    def retry_policy(self) -> RetryPolicy:
        """The retry policy of background delivery, from the settings."""
        settings = self.settings
        return RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
            max_retry_after=settings.retry_max_delay,
            deadline=settings.retry_deadline,
        )

    def _check_fork(self) -> None:
        # After a fork the child must not touch the parent's session or threads.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._client = None
            self._dispatcher = None

    @property
    def client(self) -> MeisaClient:
        """The app's client (made on first use, remade after a fork)."""
        self._check_fork()
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self.make_client()
                client = self._client
        return client

    def make_client(self) -> MeisaClient:
        """A new client from the settings (the engines call this after a fork)."""
        settings = self.settings
        if not settings.api_key:
            raise RuntimeError("MEISA_API_KEY is not set, so Meisa cannot be called")
        return MeisaClient(
            settings.api_key,
            settings.base_url,
            timeout=(settings.connect_timeout, settings.timeout),
            retry=self.retry_policy(),
        )

    def _fetch_suppressions(self) -> UnsubscribedEmails:
        return self.client.unsubscribed_emails()

    @property
    def dispatcher(self) -> Dispatcher:
        """The app's delivery engine (made on first use, remade after a fork)."""
        self._check_fork()
        dispatcher = self._dispatcher
        if dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = self._make_dispatcher()
                dispatcher = self._dispatcher
        return dispatcher

    def _make_dispatcher(self) -> Dispatcher:
        settings = self.settings
        if settings.delivery == "sync":
            return SyncDispatcher(client_factory=lambda: self.client, hooks=self.reporter)
        from .engine.thread import ThreadDispatcher

        return ThreadDispatcher(
            client_factory=self.make_client,
            hooks=self.reporter,
            retry=self.retry_policy(),
            rate_limit=settings.rate_limit,
            queue_size=settings.queue_size,
            workers=settings.workers,
            flush_timeout=settings.flush_timeout,
        )

    def has_dispatcher(self) -> bool:
        """Whether an engine was made (``flush`` needs none otherwise)."""
        return self._dispatcher is not None and self._pid == os.getpid()

    def close(self, timeout: float | None = None) -> int:
        """Flush and stop the engine, close the client; returns what was left undelivered."""
        left = 0
        with self._lock:
            dispatcher, self._dispatcher = self._dispatcher, None
            client, self._client = self._client, None
        if dispatcher is not None and self._pid == os.getpid():
            left = dispatcher.close(timeout)
        self.suppression.close()
        if client is not None:
            client.close()
        return left
