"""The Celery engine's setup from the app's config: its settings, the Redis transport's
visibility timeout, and the delivery task every worker process runs (:func:`init_celery`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import redis

from ..config import DEFAULTS
from ..config import MeisaSettings
from ..config import resolve_keys
from ..errors import ConfigurationError
from .celery_worker import DeliveryWorker
from .celery_worker import register_tasks
from .redis_budget import MAX_WAIT
from .redis_budget import RedisBudget
from .redis_store import RedisDeliveryStore

if TYPE_CHECKING:
    from flask import Flask

    from .._runtime import MeisaState

__all__ = [
    "CELERY_DEFAULTS",
    "CelerySettings",
    "configure_visibility",
    "init_celery",
    "lost_after",
]

#: The ``MEISA_CELERY_*`` keys and their defaults.
CELERY_DEFAULTS: dict[str, Any] = {
    name: value for name, value in DEFAULTS.items() if name.startswith("MEISA_CELERY_")
}
#: Meisa deduplicates a send's idempotency key for this long, in seconds.
IDEMPOTENCY_WINDOW = 3600.0
#: What a replayed send leaves of that window for its wait in the queue, in seconds.
REPLAY_MARGIN = 600.0
#: The Redis transport's ``visibility_timeout`` when the app sets none, in seconds.
DEFAULT_VISIBILITY_TIMEOUT = 600.0
#: Calls' timeouts a worker may hold a message beyond its countdown: waiting for a busy
#: pool, then a run (a suppression load's budget wait and call, then its own call).
RUN_TIMEOUTS = 4


@dataclass(frozen=True)
class CelerySettings:
    """The ``MEISA_CELERY_*`` settings (see :data:`CELERY_DEFAULTS`)."""

    celery_app: Any
    queue: str
    redis_url: str | None
    coalesce: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CelerySettings:
        """Read the keys (a missing one takes its default); a :class:`ConfigurationError`
        names each invalid one."""
        values = resolve_keys(config, CELERY_DEFAULTS)
        return cls(*(values[name] for name in CELERY_DEFAULTS))


def resolve_celery_app(app: Flask) -> Any:
    """The Celery app of ``app``: ``MEISA_CELERY_APP``, else ``app.extensions["celery"]``
    (a :class:`ConfigurationError` when there is neither)."""
    celery_app = app.config.get("MEISA_CELERY_APP") or app.extensions.get("celery")
    if celery_app is None:
        raise ConfigurationError(
            'MEISA_DELIVERY = "celery" needs the app\'s Celery app: set MEISA_CELERY_APP, '
            'or app.extensions["celery"] before meisa.init_app(app)'
        )
    if not callable(getattr(celery_app, "send_task", None)):
        raise ConfigurationError("MEISA_CELERY_APP must be a celery.Celery instance")
    return celery_app


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
    """Set the Redis transport's ``visibility_timeout`` if the app set none, check it (a
    :class:`ConfigurationError` says what to set), and return the longest countdown a task
    may hold so that a held message is never handed to a second worker."""
    options = _transport_options(celery_app)
    if options is None:
        return MAX_WAIT
    visibility = options.setdefault("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
    celery_app.conf.broker_transport_options = options
    # A dead worker's message comes back after the timeout and kombu's next sweep.
    run = RUN_TIMEOUTS * (settings.connect_timeout + settings.timeout)
    sweep = _restore_sweep(options)
    highest = IDEMPOTENCY_WINDOW - REPLAY_MARGIN - settings.retry_deadline - sweep
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
    """How long a pending operation may go unrun by every worker before its message is
    taken as lost: the longest a worker holds it, then kombu gives it back (the visibility
    timeout, its sweep, and the sweep's lock a Redis restart may leave); ``None`` for a
    broker without a visibility timeout."""
    options = _transport_options(celery_app)
    if options is None:
        return None
    visibility = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
    mutex = float(options.get("unacked_mutex_expire", 300))
    return visibility + _restore_sweep(options) + mutex + RUN_TIMEOUTS * call_timeout


def redis_client(url: str | None, celery_app: Any) -> Any:
    """A Redis client for ``url``, else for the Celery app's broker if it is Redis."""
    if url is None:
        url = str(celery_app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "the Celery engine keeps its rate budget and coalesced upserts in Redis: "
                "set MEISA_CELERY_REDIS_URL (the broker is not Redis)"
            )
    return redis.Redis.from_url(url, health_check_interval=30)


def settings_of(app: Flask, celery_app: Any = None) -> tuple[CelerySettings, Any]:
    """The ``MEISA_CELERY_*`` settings of ``app`` and its Celery app (``celery_app`` if given)."""
    settings = CelerySettings.from_config(app.config)
    return settings, celery_app or settings.celery_app or resolve_celery_app(app)


def init_celery(app: Flask, celery_app: Any = None) -> Any:
    """Register the delivery task on the app's Celery app (each worker process builds
    its :class:`DeliveryWorker` from ``app`` on its first task) and set up the visibility
    timeout (:func:`configure_visibility`); returns the task. ``init_app`` calls this.

    :raises ConfigurationError: no Celery app, an invalid ``MEISA_CELERY_*`` key, or a
        visibility timeout that cannot hold.
    """
    settings, celery_app = settings_of(app, celery_app)
    options = MeisaSettings.from_config({**DEFAULTS, **app.config})
    max_countdown = configure_visibility(celery_app, options)

    def build() -> DeliveryWorker:
        state: MeisaState = app.extensions["meisa"].state(app)
        options, redis = state.settings, redis_client(settings.redis_url, celery_app)
        key = options.api_key
        return DeliveryWorker(
            client_factory=state.make_client,
            hooks=state.reporter,
            retry=state.background_retry_policy(),
            store=RedisDeliveryStore(redis, settings.queue),
            budget=RedisBudget(redis, options.rate_limit, key) if key else None,
            call_timeout=options.connect_timeout + options.timeout,
            max_countdown=max_countdown,
            context=app.app_context,
            enabled=state.delivering,
            resync_after=options.resync_after,
            routine_max_age=options.routine_max_age,
        )

    return register_tasks(celery_app, build)
