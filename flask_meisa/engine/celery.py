"""``MEISA_DELIVERY = "celery"``: delivery by Celery workers, scaled out across machines.

Install the extra (``pip install flask-meisa[celery]``) and follow Flask's own Celery
pattern: the app factory creates the Celery app and stores it as
``app.extensions["celery"]`` (or sets ``MEISA_CELERY_APP``) *before*
``meisa.init_app(app)``, and the worker imports a module that calls the factory::

    # yourapp/__init__.py
    def create_app():
        app = Flask(__name__)
        app.config.from_mapping(
            MEISA_DELIVERY="celery",
            CELERY={
                "broker_url": "redis://127.0.0.1:6379/0",
                "broker_transport_options": {"queue_order_strategy": "priority"},
                "worker_prefetch_multiplier": 1,
            },
        )
        celery_app = Celery(app.name)
        celery_app.config_from_object(app.config["CELERY"])
        app.extensions["celery"] = celery_app
        meisa.init_app(app)         # registers the task flask_meisa.deliver
        return app

    # yourapp/make_celery.py
    flask_app = create_app()
    celery_app = flask_app.extensions["celery"]

    $ celery -A yourapp.make_celery worker -Q meisa.transactional,meisa.sync,meisa.events

The web process only publishes: :meth:`CeleryDispatcher.submit` files each operation
(as JSON, never pickle) on its lane's queue and returns. Lanes are separate queues,
``<MEISA_CELERY_QUEUE>.transactional``, ``.sync`` and ``.events``: a worker consuming them
in that order with the Redis transport's ``queue_order_strategy = "priority"`` always
takes a waiting send first (without it, kombu takes the queues in turn, so a send waits
behind at most two other messages); a dedicated worker can serve the transactional queue
alone; each lane's backlog is one ``LLEN``; and it works on any broker.

The worker runs the task inside the Flask app's context, with a client, retry policy and
hooks (the app's outcome signals, sent in the worker) built from that app's config. The
rate budget (``MEISA_RATE_LIMIT``), coalesced upserts and the pending count live in Redis
(``MEISA_CELERY_REDIS_URL``, by default the broker's URL when the broker is Redis), so
every worker on every machine shares them; see :mod:`.redis_budget`,
:mod:`.redis_store` and :mod:`.celery_worker`.

Waits are Celery countdowns held by a worker until due (at most
:data:`~flask_meisa.engine.redis_budget.MAX_WAIT`, 300 s), so keep the Redis transport's
``visibility_timeout`` (one hour by default) well above that: a message held longer than
it is handed to another worker as well. ``flush()`` waits until the workers have finished
what was submitted; ``close()`` waits for nothing, since the broker holds the work.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import redis

from ..config import DEFAULTS
from ..config import resolve_keys
from ..errors import ConfigurationError
from ..errors import DeliveryError
from ..operations import LANE_NAMES
from ..operations import Operation
from .base import DeliveryHooks
from .base import DeliveryStatus
from .base import HookCaller
from .celery_worker import TASK_NAME
from .celery_worker import DeliveryWorker
from .celery_worker import register_tasks
from .redis_budget import RedisBudget
from .redis_budget import budget_prefix
from .redis_store import RedisDeliveryStore

if TYPE_CHECKING:
    from flask import Flask

    from ..runtime import MeisaState

__all__ = [
    "CELERY_DEFAULTS",
    "CeleryDispatcher",
    "CelerySettings",
    "init_celery",
    "lane_queues",
    "make_dispatcher",
    "resolve_celery_app",
]

logger = logging.getLogger("flask_meisa.engine")

#: The ``MEISA_CELERY_*`` keys and their defaults (from :data:`flask_meisa.config.KEYS`).
CELERY_DEFAULTS: dict[str, Any] = {
    name: default for name, default in DEFAULTS.items() if name.startswith("MEISA_CELERY_")
}

_LANE_SUFFIXES = LANE_NAMES


def lane_queues(prefix: str = "meisa") -> dict[str, str]:
    """The queue of each lane by lane name, first lane first: ``{"transactional":
    "meisa.transactional", "sync": "meisa.sync", "events": "meisa.events"}``."""
    return {name: f"{prefix}.{name}" for name in _LANE_SUFFIXES.values()}


@dataclass(frozen=True)
class CelerySettings:
    """The resolved ``MEISA_CELERY_*`` settings (see :data:`CELERY_DEFAULTS`)."""

    celery_app: Any
    queue: str
    redis_url: str | None
    coalesce: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CelerySettings:
        """Read and check the keys (a missing key takes its default).

        :raises ConfigurationError: naming the key that is invalid.
        """
        values = resolve_keys(config, CELERY_DEFAULTS)
        return cls(
            celery_app=values["MEISA_CELERY_APP"],
            queue=values["MEISA_CELERY_QUEUE"],
            redis_url=values["MEISA_CELERY_REDIS_URL"],
            coalesce=values["MEISA_CELERY_COALESCE"],
        )


def resolve_celery_app(app: Flask) -> Any:
    """The Celery app of ``app``: ``MEISA_CELERY_APP``, else ``app.extensions["celery"]``.

    :raises ConfigurationError: when there is neither.
    """
    celery_app = app.config.get("MEISA_CELERY_APP") or app.extensions.get("celery")
    if celery_app is None:
        raise ConfigurationError(
            'MEISA_DELIVERY = "celery" needs the app\'s Celery app: set MEISA_CELERY_APP, '
            'or app.extensions["celery"] before meisa.init_app(app)'
        )
    if not callable(getattr(celery_app, "send_task", None)):
        raise ConfigurationError("MEISA_CELERY_APP must be a celery.Celery instance")
    return celery_app


def _redis_client(url: str | None, celery_app: Any) -> Any:
    if url is None:
        broker = str(celery_app.conf.broker_url or "")
        if not broker.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "the Celery engine keeps its rate budget and coalesced upserts in Redis: "
                "set MEISA_CELERY_REDIS_URL (the broker is not Redis)"
            )
        url = broker
    return redis.Redis.from_url(url, health_check_interval=30)


class CeleryDispatcher:
    """Publishes operations as Celery tasks (implements the dispatcher protocol).

    :param celery_app: the app's ``celery.Celery``; the worker must have the task
        registered (:func:`init_celery` or :func:`register_tasks`).
    :param redis: a ``redis.Redis`` client for the engine's records; the dispatcher
        closes it in :meth:`close`.
    :param hooks: told about operations that cannot be published (``dropped``); every
        other outcome is reported by the worker, to the worker's hooks.
    :param queue: the queue prefix; one queue per lane (see :func:`lane_queues`).
    :param rate_limit: the key's budget, for :meth:`status` (the workers enforce it).
    :param budget_key: the API key whose budget :meth:`status` reads (only a digest of
        it is used).
    :param coalesce: merge upserts of one contact that wait in the queue.
    """

    def __init__(
        self,
        celery_app: Any,
        *,
        redis: Any,
        hooks: DeliveryHooks,
        queue: str = "meisa",
        rate_limit: str | None = None,
        budget_key: str | None = None,
        coalesce: bool = True,
    ) -> None:
        self._celery = celery_app
        self._redis = redis
        self._hooks = HookCaller(hooks, logger)
        self._queues = lane_queues(queue)
        self._lane_queue = {lane: self._queues[name] for lane, name in _LANE_SUFFIXES.items()}
        self.store = RedisDeliveryStore(redis, queue)
        self._budget = (
            RedisBudget(redis, rate_limit, prefix=budget_prefix(budget_key))
            if rate_limit is not None and budget_key
            else None
        )
        self._coalesce = coalesce
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"CeleryDispatcher(queues={list(self._queues.values())!r})"

    @property
    def queues(self) -> dict[str, str]:
        """The queue of each lane, by lane name."""
        return dict(self._queues)

    def start(self) -> None:
        """Nothing to start: the workers deliver."""

    def after_fork(self) -> None:
        """Nothing to reset: the Redis client reconnects in a forked child."""

    def budget_slot(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """A slot of the shared budget for a call made in the caller's thread."""
        return contextlib.nullcontext(False)

    def submit(self, operations: Iterable[Operation]) -> None:
        """Publish each operation (see :meth:`publish`)."""
        for operation in operations:
            self.publish(operation)

    def publish(self, operation: Operation) -> None:
        """Publish ``operation`` on its lane's queue (a few Redis round trips; never
        waits on Meisa).

        An operation that cannot be published (the broker is down, the dispatcher is
        closed) is reported to ``hooks.dropped`` and logged.

        :raises DeliveryError: for a transactional send that cannot be published.
        """
        if not isinstance(operation, Operation):
            raise TypeError(f"expected an Operation, not {type(operation).__name__}")
        with self._lock:
            closed = self._closed
        if closed:
            self._drop(operation, "closed")
            return
        meta: dict[str, Any] = {}
        try:
            contact = operation.contact_key
            if self._coalesce and operation.kind == "upsert" and contact is not None:
                meta["version"] = self.store.coalesce(operation, contact)
            else:
                self.store.add_pending(operation)
            self._celery.send_task(
                TASK_NAME,
                kwargs={"op": operation.to_dict(), "meta": meta},
                queue=self._lane_queue[operation.lane],
                routing_key=self._lane_queue[operation.lane],
                serializer="json",
                task_id=operation.id,
                ignore_result=True,
            )
        except Exception as error:
            # The text of a broker error can hold its URL: only its class is reported.
            self._drop(operation, "broker_unavailable", type(error).__name__)

    def _drop(self, operation: Operation, reason: str, cause: str | None = None) -> None:
        if operation.kind == "send":
            where = f"publishing failed ({cause})" if cause else "the delivery engine is closed"
            raise DeliveryError(f"{where}; {operation.describe()} was not sent") from None
        with contextlib.suppress(Exception):  # unreachable Redis: why it was dropped
            self.store.finish([operation.id], "dropped", 1)
        logger.warning(
            "flask-meisa: dropped %s (%s%s)",
            operation.describe(),
            reason,
            f": {cause}" if cause else "",
        )
        self._hooks.call("dropped", operation, reason)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the workers have finished every operation submitted under this
        queue prefix (by any process), at most ``timeout`` seconds (``None``: no limit).

        :returns: ``True`` when none is left; ``False`` on timeout or when Redis cannot
            be read.
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        pause = 0.005
        while True:
            try:
                if self.store.pending() == 0:
                    return True
            except Exception:
                logger.warning("flask-meisa: cannot read the pending count from Redis")
                return False
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def close(self, timeout: float | None = None) -> int:
        """Stop publishing and close the Redis connections; waits for nothing, since
        what was published is held by the broker for the workers.

        :returns: ``0``: nothing is held in this process.
        """
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        self._redis.close()
        return 0

    def status(self) -> DeliveryStatus:
        """Queue length per lane, calls in flight, operations waiting to run again
        (retries, budget waits, messages reserved by workers), counters from every
        worker, budget left in each window and the pause every worker observes."""
        pipe = self._redis.pipeline(transaction=False)
        for name in self._queues.values():
            pipe.llen(name)
        lengths = pipe.execute()
        queued = {lane: int(n) for lane, n in zip(self._queues, lengths, strict=True)}
        pending = self.store.pending()
        counters = self.store.counters()
        paused_for, in_flight, budget_left = 0.0, 0, None
        if self._budget is not None:
            paused_for, in_flight, budget_left = self._budget.snapshot()
        return DeliveryStatus(
            engine="celery",
            queued=queued,
            in_flight=in_flight,
            retry_waiting=max(pending - sum(queued.values()) - in_flight, 0),
            delivered=counters["delivered"],
            failed=counters["failed"],
            dropped=counters["dropped"],
            budget_left=budget_left,
            paused_for=paused_for,
        )


def make_dispatcher(state: MeisaState) -> CeleryDispatcher:
    """The Celery engine of an app, from its config (``MeisaState._make_dispatcher``)."""
    app = state.app
    settings = CelerySettings.from_config(app.config)
    celery_app = settings.celery_app or resolve_celery_app(app)
    return CeleryDispatcher(
        celery_app,
        redis=_redis_client(settings.redis_url, celery_app),
        hooks=state.reporter,
        queue=settings.queue,
        rate_limit=state.settings.rate_limit,
        budget_key=state.settings.api_key,
        coalesce=settings.coalesce,
    )


def init_celery(app: Flask, celery_app: Any = None) -> Any:
    """Register the delivery task on the app's Celery app (``init_app`` calls this when
    ``MEISA_DELIVERY = "celery"``); returns the task.

    In each worker process the first task builds, from ``app``: the client (its key,
    URL and timeouts), the retry policy, the hooks (``app``'s outcome signals), the
    shared budget (``MEISA_RATE_LIMIT``) and the Redis records; every task runs inside
    ``app.app_context()``.

    :raises ConfigurationError: no Celery app, or an invalid ``MEISA_CELERY_*`` key.
    """
    settings = CelerySettings.from_config(app.config)
    if celery_app is None:
        celery_app = settings.celery_app or resolve_celery_app(app)

    def build() -> DeliveryWorker:
        meisa = app.extensions["meisa"]
        state: MeisaState = meisa.state(app)
        redis = _redis_client(settings.redis_url, celery_app)
        options = state.settings
        budget = None
        if options.rate_limit is not None and options.api_key:
            budget = RedisBudget(redis, options.rate_limit, prefix=budget_prefix(options.api_key))
        return DeliveryWorker(
            client_factory=state.make_client,
            hooks=state.reporter,
            retry=state.background_retry_policy(),
            store=RedisDeliveryStore(redis, settings.queue),
            budget=budget,
            call_timeout=options.connect_timeout + options.timeout,
            context=app.app_context,
            enabled=state.delivering,
        )

    return register_tasks(celery_app, build)
