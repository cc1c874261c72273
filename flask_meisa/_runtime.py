"""Per-app runtime state: the client, the suppression set and the delivery engine, made on
first use, remade in a forked child, and closed with the app or at exit."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import pwd
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeVar

from ._deferral import HeldBatches
from ._engine.base import Dispatcher
from ._process import close_apart
from ._process import exited
from ._process import forks_without_hooks
from ._process import live
from ._process import making
from ._suppression import SuppressionSet
from ._threads import require_real_threads
from .client import MeisaClient
from .config import DEFAULTS
from .config import INSTANCE_PREFIX
from .config import is_delivering
from .errors import ConfigurationError
from .errors import EngineClosed
from .retry import RetryPolicy
from .signals import SignalReporter

if TYPE_CHECKING:
    from flask import Flask

    from ._engine.store import Store
    from .config import MeisaSettings
    from .results import UnsubscribedEmails

logger = logging.getLogger("flask_meisa")
_T = TypeVar("_T")


class MeisaState:
    """The runtime parts of :class:`~flask_meisa.Meisa` for one app (held weakly: an app
    that is gone takes its state with it), from its resolved ``MEISA_*`` settings."""

    def __init__(self, app: Flask, settings: MeisaSettings) -> None:
        self._app = weakref.ref(app)
        self.settings = settings
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._client: MeisaClient | None = None
        self._dispatcher: Dispatcher | None = None
        self._closing: Dispatcher | None = None  # flushed by the exit hook's close()
        self._store: Store | None = None
        #: Why the default store fell back to memory in this process (``None``: it did not).
        self.fell_back: str | None = None
        self._switches: tuple[Any, ...] | None = None
        self._delivering = False
        self._started = False  # in this process
        #: This app's batches held by responses not yet written (``flush`` waits for them).
        self.held = HeldBatches()
        #: The suppression set consulted before every send.
        self.suppression = SuppressionSet(self._fetch_suppressions, ttl=settings.suppression_ttl)
        self.reporter = SignalReporter(app, self.suppression)
        #: Operations the engine refused (counted into ``status().dropped``).
        self.refused = 0
        if settings.delivery == "celery":
            from ._engine.celery_setup import init_celery

            init_celery(app, settings)
        live.add(self)
        # The engine's threads must not keep a dropped app's engine running. Not at exit:
        # there the exit hook (_process) closes it, flushing for MEISA_FLUSH_TIMEOUT.
        weakref.finalize(app, close_apart, self).atexit = False

    @property
    def app(self) -> Flask:
        """The app this state belongs to."""
        app = self._app()
        if app is None:
            raise RuntimeError("the Flask app of this Meisa state no longer exists")
        return app

    @property
    def alive(self) -> bool:
        """Whether the app still exists."""
        return self._app() is not None

    def delivering(self) -> bool:
        """Whether operations are delivered now: ``MEISA_ENABLED`` and not
        ``MEISA_SUPPRESS_SEND`` (which follows ``TESTING``), read on every operation."""
        config = self.app.config
        switches = (
            config.get("MEISA_ENABLED"),
            config.get("MEISA_SUPPRESS_SEND"),
            config.get("TESTING"),
        )
        if switches != self._switches:  # parsed again only when one of them changed
            self._delivering, self._switches = is_delivering(config), switches
        return self._delivering

    def is_suppressed(self, address: str, *, wait: float) -> bool:
        """Whether the suppression set holds ``address`` (a first load waited for at most
        ``wait`` seconds); while delivery is off, from what it holds, fetching nothing."""
        if not self.delivering():
            return self.suppression.peek(address)
        return self.suppression.is_suppressed(address, wait=wait)

    def retry_policy(self, *, deadline: float | None = None) -> RetryPolicy:
        """The retry policy of calls made in the caller's thread (``meisa.send``, the CLI,
        ``meisa.client``): at most ``MEISA_MAX_ATTEMPTS`` attempts."""
        settings = self.settings
        return RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
            max_retry_after=settings.retry_max_delay,
            deadline=settings.retry_deadline if deadline is None else deadline,
        )

    def background_retry_policy(self) -> RetryPolicy:
        """The retry policy of background delivery: until ``MEISA_RETRY_DEADLINE``."""
        return dataclasses.replace(self.retry_policy(), max_attempts=None)

    def start(self) -> None:
        """Start delivering in this process, once (also on each request: ``flask run``);
        in a uWSGI master that forks without hooks, in each worker after the fork instead."""
        if self._started:
            if self.settings.delivery == "thread":
                # Patched since the engine was made (gunicorn -k gevent --preload patches
                # each worker after the fork): its threads would mix with green locks.
                require_real_threads()
            return
        if not self.delivering() or forks_without_hooks() or exited.is_set():
            return  # (after the exit hook: none to start, what comes is refused)
        self._started = True
        self.dispatcher.start()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's client, threads and locks, and deliver
        again if the parent did (gunicorn ``--preload``)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client = None
        self._started = False
        self.held = HeldBatches()  # the responses open at the fork are the parent's
        if self._store is not None:
            self._store.after_fork()
        self.suppression.after_fork()
        if self._dispatcher is not None:
            self._dispatcher.after_fork()
            with contextlib.suppress(RuntimeError):
                self.start()

    @property
    def client(self) -> MeisaClient:
        """The app's client (made on first use, remade after a fork)."""
        self.after_fork()
        with self._lock:
            if self._client is None:
                self._client = self.make_client()
            return self._client

    def make_client(self) -> MeisaClient:
        """A new client from the settings."""
        settings = self.settings
        if not settings.api_key:
            raise ConfigurationError("MEISA_API_KEY is not set, so Meisa cannot be called")
        return MeisaClient(
            settings.api_key,
            settings.base_url,
            timeout=(settings.connect_timeout, settings.timeout),
            retry=self.retry_policy(),
        )

    @property
    def dispatcher(self) -> Dispatcher:
        """The app's delivery engine (made on first use; after the exit hook, none:
        :class:`EngineClosed`)."""
        self.after_fork()
        # Once made, read without the lock: a response body the collector releases runs
        # here in whichever thread it collects in, maybe one that holds the lock.
        if (dispatcher := self._dispatcher) is not None:
            return dispatcher
        with self._lock:
            if self._dispatcher is None:
                if exited.is_set():  # what is handed over after it is refused and reported
                    raise EngineClosed("delivery engine is closed: this process is exiting")
                name = "delivery" if self.settings.delivery == "thread" else self.settings.delivery
                module = importlib.import_module(f"._engine.{name}", __package__)
                self._dispatcher = module.make_dispatcher(self)
                live.add(self)  # again, when used after close(): flushed at exit
            return self._dispatcher

    def with_engine(self, use: Callable[[Dispatcher], _T]) -> _T:
        """``use(engine)`` with the app's engine; when ``meisa.close()`` in another thread
        closes it meanwhile, with the app's next one (an engine closed by hand, still the
        app's, raises :class:`EngineClosed`)."""
        engine = self.dispatcher
        while True:
            try:
                return use(engine)
            except EngineClosed:
                closed, engine = engine, self.dispatcher
                if engine is closed:
                    raise

    def has_dispatcher(self) -> bool:
        """Whether an engine was made, or one is needed (a store may hold earlier work)."""
        keeps_store = self.settings.delivery == "thread"
        return self._dispatcher is not None or (keeps_store and self.delivering())

    def store(self) -> Store:
        """The store of ``MEISA_DELIVERY = "thread"`` (opened on first use): the
        ``MEISA_OUTBOX`` file, or memory when it is ``None`` or cannot be written."""
        if self._store is None:
            from ._engine.mounts import not_sqlite
            from ._engine.store import Store

            path = self.store_path()
            if path is not None:
                self._refuse_another_accounts_store(path)
                if self.settings.outbox != DEFAULTS["MEISA_OUTBOX"] and not_sqlite(path):
                    raise ConfigurationError(  # (the default's own file, damaged, is set aside)
                        f"MEISA_OUTBOX names {path!r}, which is not a SQLite database: set it "
                        "to a file of its own (the file was left as it is)"
                    )
            with making:  # not during a fork, the memory one's either: see _before_fork
                try:
                    self._store = Store(path, busy_timeout=self.settings.outbox_busy_timeout)
                    self.fell_back = None
                except ConfigurationError as error:
                    if self.settings.outbox != DEFAULTS["MEISA_OUTBOX"]:
                        raise
                    # Its cause alone: its advice (set MEISA_OUTBOX) is not for a command.
                    self.fell_back = str(error.__context__ or error)
                    waits = " (the work in it waits there)" if os.path.exists(path or "") else ""
                    logger.warning(
                        "meisa: %s. Delivery falls back to memory%s: work pending when a "
                        "process stops is lost, and each process has its own budget. Put the "
                        "instance folder on a writable local disk (a mounted volume in a "
                        "container), or set MEISA_OUTBOX.",
                        error,
                        waits,
                    )
                    self._store = Store(None)
        return self._store

    def host_store(self) -> Store:
        """The store, for a command about the host's delivery (``flask meisa status``).

        :raises ConfigurationError: the default file fell back to memory as another user's
            (named), whose processes deliver from it: this memory holds none of their work."""
        store, path = self.store(), self.store_path() or ""
        # Not when no user can (a read-only disk): every process of the host is in memory.
        if self.fell_back is None or (owner := _owner(path)) is None:
            return store
        raise ConfigurationError(
            f"this process cannot use the delivery store {path!r} ({self.fell_back}; its "
            f"owner: {owner}): in its own memory, this command would find none of the host's "
            f"work. Run it as the user the app runs as (sudo -u {owner} flask meisa ...)"
        )

    def _refuse_another_accounts_store(self, path: str) -> None:
        # The delivering process sends every stored row with its own key and counts every
        # call against one budget: a store file holds one Meisa account's work.
        mine = os.path.realpath(path)
        account = (self.settings.api_key, self.settings.base_url)
        for other in list(live):
            app, store = other._app(), other._store
            if app is None or store is None or store.path is None:
                continue
            theirs = (other.settings.api_key, other.settings.base_url)
            if os.path.realpath(store.path) == mine and theirs != account:
                raise ConfigurationError(
                    f"the delivery store {path!r} is already used by the app {app.name!r} "
                    "with another MEISA_API_KEY or MEISA_BASE_URL: one store holds one "
                    "Meisa account's work and budget; set MEISA_OUTBOX to another file "
                    "for one of the apps"
                )

    def store_path(self) -> str | None:
        """The file of the delivery store, or ``None`` for memory."""
        path = self.settings.outbox
        if path is not None:
            path = path.removeprefix(INSTANCE_PREFIX).strip()
        # A relative path is the instance folder's, not the working directory's: a command
        # run from another folder must find the workers' store, not make one of its own.
        return None if path is None else os.path.join(self.app.instance_path, path)

    def budget_slot(self, timeout: float) -> AbstractContextManager[Any]:
        """Hold a slot of the key's budget for a call made outside the engine (a
        synchronous send, a suppression list load)."""
        if not self.delivering():
            return contextlib.nullcontext()
        # While the exit hook flushes the engine, the engine's (none is made then).
        return (self._closing or self.dispatcher).budget_slot(timeout)

    def _fetch_suppressions(self) -> UnsubscribedEmails:
        # Bounded like a send (a first send waits for it), in at most 3 attempts.
        policy = self.retry_policy(deadline=self.settings.send_deadline)
        policy = dataclasses.replace(policy, max_attempts=3)
        return self.client.with_options(retry=policy, slot=self.budget_slot).unsubscribed_emails()

    def close(self, timeout: float | None = None) -> int:
        """Flush and stop the engine, close the client; returns what was lost."""
        if self._pid != os.getpid():
            # Inherited through a fork that ran no hook, and unused here: nothing of it is
            # this process's to flush or close (nor its locks, maybe held in the parent).
            if self._store is not None:
                self._store.after_fork()
            live.discard(self)
            return 0
        # Used again, even while this flushes: delivery starts again, on a store connection
        # (a memory store) of its own, and is flushed at exit (dispatcher).
        with self._lock:
            dispatcher, self._dispatcher = self._dispatcher, None
            self._closing = dispatcher if exited.is_set() else None
            client, self._client = self._client, None
            store, self._store = self._store, None
            self._started = False
            live.discard(self)
        left = 0 if dispatcher is None else dispatcher.close(timeout)
        self._closing = None
        self.suppression.close()
        if client is not None:
            client.close()
        if store is not None:
            store.close()
        return left


def _owner(path: str) -> str | None:
    """The user owning the file ``path`` (else its folder), when not this process's."""
    for name in (path, os.path.dirname(path)):
        try:
            uid = os.stat(name).st_uid
        except OSError:
            continue
        if uid == os.geteuid():
            return None
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"'#{uid}'"  # as sudo -u takes a user without a name
    return None
