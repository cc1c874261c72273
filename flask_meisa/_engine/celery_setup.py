"""The Celery engine's setup from the app's config: its settings, the Redis transport's
visibility timeout, and the delivery task ``flask_meisa.deliver`` (:func:`init_celery`),
whose every run is one of the worker's (:mod:`.celery_worker`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

import redis
from celery.exceptions import Reject  # type: ignore[import-untyped]
from redis.exceptions import RedisError

from ..config import DEFAULTS
from ..config import MeisaSettings
from ..config import resolve_keys
from ..errors import ConfigurationError
from . import base
from .celery_worker import DeliveryWorker
from .celery_worker import RunAgain
from .redis_budget import MAX_WAIT

if TYPE_CHECKING:
    from flask import Flask

    from .._runtime import MeisaState
    from .celery import CeleryDispatcher

logger = logging.getLogger("flask_meisa.engine")

#: The name of the delivery task on the Celery app.
TASK_NAME = "flask_meisa.deliver"
#: Where :func:`register_tasks` keeps the task and its worker on the Celery app.
_HOLDER = "_flask_meisa_delivery"
#: The ``MEISA_CELERY_*`` keys and their defaults.
CELERY_DEFAULTS = {k: v for k, v in DEFAULTS.items() if k.startswith("MEISA_CELERY_")}
#: The Redis transport's ``visibility_timeout`` when the app sets none, in seconds.
DEFAULT_VISIBILITY_TIMEOUT = 600.0
#: Calls' timeouts a worker may hold a message beyond its countdown: waiting for a busy
#: pool, then a run (a suppression load's budget wait and call, then its own call).
RUN_TIMEOUTS = 4
#: Seconds a Redis command may wait on its connection (redis-py 5 and older wait for ever
#: by default: a partitioned Redis would hold a send, or a response's release, for good).
REDIS_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}


@dataclass(frozen=True)
class CelerySettings:
    """The ``MEISA_CELERY_*`` settings (see :data:`CELERY_DEFAULTS`)."""

    celery_app: Any
    queue: str
    redis_url: str | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CelerySettings:
        """Read the keys (a missing one takes its default); a :class:`ConfigurationError`
        names each invalid one."""
        return cls(*resolve_keys(config, CELERY_DEFAULTS).values())


def resolve_celery_app(app: Flask) -> tuple[CelerySettings, Any]:
    """The ``MEISA_CELERY_*`` settings of ``app`` and its Celery app: ``MEISA_CELERY_APP``,
    else ``app.extensions["celery"]`` (else a ConfigurationError)."""
    settings = CelerySettings.from_config(app.config)
    celery_app = settings.celery_app or app.extensions.get("celery")
    if celery_app is None:
        raise ConfigurationError(
            'MEISA_DELIVERY = "celery" needs the app\'s Celery app: set MEISA_CELERY_APP, '
            'or app.extensions["celery"] before meisa.init_app(app)'
        )
    if not callable(getattr(celery_app, "send_task", None)):
        where = "MEISA_CELERY_APP" if settings.celery_app else 'app.extensions["celery"]'
        raise ConfigurationError(f"{where} must be a celery.Celery instance")
    return settings, celery_app


def redis_client(settings: CelerySettings, celery_app: Any) -> redis.Redis:
    """A client of the Redis that keeps the engine's records and budget: that of
    ``MEISA_CELERY_REDIS_URL``, else the broker (a ConfigurationError if it is not Redis)."""
    url = settings.redis_url or str(celery_app.conf.broker_url or "")
    if not settings.redis_url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            "the Celery engine keeps its rate budget and coalesced upserts in Redis: "
            "set MEISA_CELERY_REDIS_URL (the broker is not Redis)"
        )
    return redis.Redis.from_url(url, health_check_interval=30, **REDIS_TIMEOUTS)


def _transport_options(celery_app: Any) -> dict[str, Any] | None:
    """The broker's transport options, ``None`` for a broker without a visibility timeout."""
    scheme = str(celery_app.conf.broker_url or "").partition("://")[0]
    if scheme not in ("redis", "rediss", "redis+socket", "sentinel"):
        return None
    return dict(celery_app.conf.broker_transport_options or {})


def _restore_sweep(options: Mapping[str, Any]) -> float:
    """How often kombu gives back the messages of dead workers, in seconds."""
    interval = options.get("unacked_restore_interval", 10)
    return float(interval) * float(options.get("unacked_restore_throttle", 10))


def configure_visibility(celery_app: Any, settings: MeisaSettings) -> float:
    """Set the Redis transport's ``visibility_timeout`` and socket timeouts the app left unset,
    check the first, and return the longest countdown a task may hold keeping its message."""
    options = _transport_options(celery_app)
    if options is None:
        return MAX_WAIT
    visibility = options.setdefault("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
    # kombu waits for ever on a broker that stopped answering (a stall, a partition): a
    # response's release, or a worker's retry, would hang on its publish for good.
    for name, seconds in REDIS_TIMEOUTS.items():
        options.setdefault(name, seconds)
    celery_app.conf.broker_transport_options = options
    # A dead worker's message comes back after the timeout and kombu's next sweep.
    run = RUN_TIMEOUTS * settings.call_timeout
    sweep = _restore_sweep(options)
    highest = base.IDEMPOTENCY_WINDOW - base.REPLAY_MARGIN - settings.retry_deadline - sweep
    if not isinstance(visibility, (int, float)) or not run + 1.0 <= visibility <= highest:
        raise ConfigurationError(
            f"broker_transport_options['visibility_timeout'] is {visibility!r}: set it "
            f"between {run + 1.0:g} s ({RUN_TIMEOUTS} x (MEISA_CONNECT_TIMEOUT + "
            f"MEISA_TIMEOUT) + 1 s, what a worker may hold a message for besides its "
            f"countdown) and {highest:g} s (so that a send replayed after its worker died, "
            "as late as MEISA_RETRY_DEADLINE after its first attempt, lands within Meisa's "
            "one-hour idempotency window), lowering MEISA_RETRY_DEADLINE or the timeouts "
            "if there is no room"
        )
    return min(MAX_WAIT, visibility - run)


def lost_after(celery_app: Any, call_timeout: float) -> float | None:
    """How long no worker may run a pending operation before its message is taken as lost
    (docs/celery.md); ``None`` for a broker without a visibility timeout."""
    options = _transport_options(celery_app)
    if options is None:
        return None
    visibility = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
    mutex = float(options.get("unacked_mutex_expire", 300))
    return visibility + _restore_sweep(options) + mutex + RUN_TIMEOUTS * call_timeout


def init_celery(app: Flask, settings: MeisaSettings) -> Any:
    """Register the delivery task (it runs the worker of the app's engine) and set up the
    visibility timeout (:func:`configure_visibility`); returns the task."""
    _, celery_app = resolve_celery_app(app)
    configure_visibility(celery_app, settings)

    def worker() -> DeliveryWorker:
        state: MeisaState = app.extensions["meisa"].state(app)
        return cast("CeleryDispatcher", state.dispatcher).worker(state)

    return register_tasks(celery_app, worker)


def register_tasks(celery_app: Any, worker: Callable[[], DeliveryWorker]) -> Any:
    """Register the delivery task on ``celery_app`` (again: ``worker`` replaces the last)
    and return it; each run calls ``worker()`` for this process's worker."""
    task = getattr(celery_app, _HOLDER, (None,))[0]
    if task is None:
        task = celery_app.task(
            name=TASK_NAME,
            bind=True,
            shared=False,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            serializer="json",
            max_retries=None,
        )(_deliver)
    setattr(celery_app, _HOLDER, (task, worker))
    return task


def worker_of(celery_app: Any) -> DeliveryWorker:
    """The :class:`DeliveryWorker` of this process for ``celery_app``'s delivery task."""
    return cast(DeliveryWorker, getattr(celery_app, _HOLDER)[1]())


def _deliver(self: Any, op: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """The delivery task: one run of this process's worker; a wait is a retry."""
    meta = dict(meta or {})
    try:
        again = worker_of(self.app).run(op, meta)
    except RedisError as error:
        # No call was made; try again later (with the broker down too, the message stays
        # unacknowledged and comes back once Redis does).
        logger.warning(
            "flask-meisa: Redis error while delivering (%s); retrying the task",
            type(error).__name__,
        )
        again = RunAgain(1.0 + random.uniform(0, 4.0), op, meta)
    if again is not None:
        where = {"queue": again.queue} if again.queue else {}
        kwargs = {"op": again.op, "meta": again.meta}
        try:
            raise self.retry(kwargs=kwargs, countdown=again.countdown, max_retries=None, **where)
        except Reject as unpublished:
            # Celery rejects a task whose retry it could not publish, and the broker then
            # drops its message: put it back instead (or, with the broker down, it stays
            # unacknowledged and comes back after the visibility timeout).
            raise Reject(unpublished.reason, requeue=True) from None
