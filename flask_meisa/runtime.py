"""Per-app runtime state: the client, the suppression set, the outbox and the engine.

One :class:`MeisaState` exists per app that :meth:`Meisa.init_app
<flask_meisa.Meisa.init_app>` registered. Its parts are made on first use and remade in
a forked child (gunicorn ``--preload``): the child gets its own HTTP session, suppression
lock and delivery threads.

With ``MEISA_OUTBOX`` the outbox file is opened and checked when the state is made (a
damaged file fails ``init_app``), and closed again at once: a process that forks (a
preloading master) holds no connection. The engine starts with a process's first request
(or its first operation or flush), never in a master that only forks workers, so that
each worker picks up what an earlier run left in the outbox.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import weakref
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

from .client import MeisaClient
from .config import INSTANCE_PREFIX
from .engine.base import Dispatcher
from .engine.outbox import Outbox
from .engine.sync import SyncDispatcher
from .errors import ConfigurationError
from .reporting import SignalReporter
from .retry import RetryPolicy
from .suppression import SuppressionSet

if TYPE_CHECKING:
    from flask import Flask

    from .config import MeisaSettings
    from .results import UnsubscribedEmails

__all__ = ["MeisaState"]

#: Background delivery is bounded by its deadline, not by a count of attempts.
_UNLIMITED_ATTEMPTS = 2**31


def _celery_engine() -> Any:
    try:
        from .engine import celery as celery_engine
    except ImportError as error:
        raise ConfigurationError(
            'MEISA_DELIVERY = "celery" needs Celery and redis: pip install "flask-meisa[celery]"'
        ) from error
    return celery_engine


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
        if settings.delivery == "celery":
            _celery_engine().init_celery(app)
        #: The outbox (``MEISA_OUTBOX``), or ``None``.
        self.outbox = self._open_outbox(app, settings)
        self._started_in: int | None = None
        if self.outbox is not None:
            app.before_request(self._start_delivery)

    @staticmethod
    def _open_outbox(app: Flask, settings: MeisaSettings) -> Outbox | None:
        path = settings.outbox
        if path is None:
            return None
        if path.startswith(INSTANCE_PREFIX):
            path = os.path.join(app.instance_path, path[len(INSTANCE_PREFIX) :].strip())
        return Outbox(path, busy_timeout=settings.outbox_busy_timeout)

    def _start_delivery(self) -> None:
        # Once per process: the first request starts the engine, which picks up rows left
        # in the outbox by an earlier run.
        if self._started_in == os.getpid() or not self.delivering():
            return
        self._started_in = os.getpid()
        start = getattr(self.dispatcher, "start", None)
        if start is not None:
            start()

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
        """The retry policy of calls made in the caller's thread (``meisa.send``, CLI
        commands, ``meisa.client``): at most ``MEISA_MAX_ATTEMPTS`` attempts."""
        settings = self.settings
        return RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
            max_retry_after=settings.retry_max_delay,
            deadline=settings.retry_deadline,
        )

    def background_retry_policy(self) -> RetryPolicy:
        """The retry policy of background delivery: retried until ``MEISA_RETRY_DEADLINE``
        however many attempts that takes, so that an outage or a run of 429s of a few
        minutes loses nothing (the engine waits between attempts without a worker)."""
        return dataclasses.replace(self.retry_policy(), max_attempts=_UNLIMITED_ATTEMPTS)

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

    def budget_slot(self, timeout: float) -> AbstractContextManager[Any]:
        """Hold a slot of the thread engine's rate budget for a call made outside it (a
        synchronous send, a suppression list load), so that those calls and background
        delivery together stay within the key's limit. A no-op for other engines."""
        if self.settings.delivery == "sync" or not self.delivering():
            return contextlib.nullcontext()
        slot = getattr(self.dispatcher, "budget_slot", None)
        if slot is None:
            return contextlib.nullcontext()
        return cast(AbstractContextManager[Any], slot(timeout))

    def _fetch_suppressions(self) -> UnsubscribedEmails:
        with self.budget_slot(self.settings.timeout):
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
        if settings.delivery == "celery":
            return cast(Dispatcher, _celery_engine().make_dispatcher(self))
        engine_options: dict[str, Any] = {
            "client_factory": self.make_client,
            "hooks": self.reporter,
            "retry": self.background_retry_policy(),
            "rate_limit": settings.rate_limit,
            "queue_size": settings.queue_size,
            "workers": settings.workers,
            "flush_timeout": settings.flush_timeout,
        }
        if self.outbox is not None:
            from .engine.durable import OutboxDispatcher

            return OutboxDispatcher(outbox=self.outbox, **engine_options)
        from .engine.thread import ThreadDispatcher

        return ThreadDispatcher(**engine_options)

    def has_dispatcher(self) -> bool:
        """Whether an engine was made (``flush`` needs none otherwise). With an outbox,
        whenever delivering: rows an earlier run left there need an engine too."""
        if self.outbox is not None and self.delivering():
            return True
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
        if self.outbox is not None:
            self.outbox.close()
        return left
