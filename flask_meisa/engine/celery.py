"""``MEISA_DELIVERY = "celery"``: delivery by Celery workers, scaled out across machines.

The web process publishes each operation as a JSON task on its lane's queue
(:class:`CeleryDispatcher`); workers run it (:mod:`.celery_worker`) within one budget kept
in Redis (:mod:`.redis_budget`, :mod:`.redis_store`). Setup, settings and the design are
in the README's Celery section and docs/celery.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import redis
from redis.exceptions import RedisError

from ..config import DEFAULTS
from ..config import MeisaSettings
from ..config import resolve_keys
from ..errors import ConfigurationError
from ..errors import DeliveryError
from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import LANE_TRANSACTIONAL
from ..operations import Operation
from . import backfill
from . import known
from .base import DeliveryHooks
from .base import DeliveryStatus
from .base import HookCaller
from .celery_worker import TASK_NAME
from .celery_worker import DeliveryWorker
from .celery_worker import register_tasks
from .redis_budget import MAX_WAIT
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
    "configure_visibility",
    "init_celery",
    "lane_queues",
    "make_dispatcher",
    "resolve_celery_app",
]

logger = logging.getLogger("flask_meisa.engine")

#: The ``MEISA_CELERY_*`` keys and their defaults.
CELERY_DEFAULTS: dict[str, Any] = {
    name: DEFAULTS[name]
    for name in (
        "MEISA_CELERY_APP",
        "MEISA_CELERY_QUEUE",
        "MEISA_CELERY_REDIS_URL",
        "MEISA_CELERY_COALESCE",
    )
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
#: How often, at most, a busy dispatcher checks which of its operations are finished.
_LOOK_EVERY = 1.0


def lane_queues(prefix: str = "meisa") -> dict[str, str]:
    """The queue of each lane by lane name, first lane first: ``{"transactional":
    "meisa.transactional", "automation": "meisa.automation", "routine": "meisa.routine",
    "backfill": "meisa.backfill"}``."""
    return {name: f"{prefix}.{name}" for name in LANE_NAMES.values()}


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

        :raises ConfigurationError: naming each key that is invalid.
        """
        values = resolve_keys(config, CELERY_DEFAULTS)
        return cls(*(values[name] for name in CELERY_DEFAULTS))


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


def configure_visibility(celery_app: Any, settings: MeisaSettings) -> float:
    """Set the Redis transport's ``visibility_timeout`` when the app set none
    (:data:`DEFAULT_VISIBILITY_TIMEOUT`), check it, and return the longest countdown a
    task may hold: :data:`~.redis_budget.MAX_WAIT`, or less so that a held message is
    never handed to a second worker.

    :raises ConfigurationError: saying what to set, when it cannot hold.
    """
    scheme = str(celery_app.conf.broker_url or "").partition("://")[0]
    if scheme not in ("redis", "rediss", "redis+socket", "sentinel"):
        return MAX_WAIT  # a broker without a visibility timeout
    options = dict(celery_app.conf.broker_transport_options or {})
    visibility = options.setdefault("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
    celery_app.conf.broker_transport_options = options
    # A run holds its message beyond its countdown; a message whose worker died comes
    # back after the visibility timeout and kombu's next sweep (interval x throttle).
    run = RUN_TIMEOUTS * (settings.connect_timeout + settings.timeout)
    sweep = float(options.get("unacked_restore_interval", 10)) * float(
        options.get("unacked_restore_throttle", 10)
    )
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


class CeleryDispatcher:
    """Publishes operations as Celery tasks (implements the dispatcher protocol).

    :param celery_app: the app's ``celery.Celery``; the worker must have the task
        registered (:func:`init_celery` or :func:`register_tasks`).
    :param redis: a ``redis.Redis`` client for the engine's records; the dispatcher
        closes it in :meth:`close`.
    :param hooks: told about operations that cannot be published or that Redis lost
        (``dropped``); every other outcome is reported by the worker, to its hooks.
    :param queue: the queue prefix; one queue per lane (see :func:`lane_queues`).
    :param rate_limit: the key's budget, for :meth:`status` and :meth:`budget_slot`.
    :param budget_key: the API key whose budget is shared (only a digest of it is used).
    :param coalesce: merge upserts of one contact that wait in the queue.
    :param call_timeout: the longest one call can take (a budget slot's lease).
    :param ledger_size: how many operations submitted here, not yet seen finished, are
        remembered to be reported if Redis loses them.
    :param priority_fields: custom fields whose change moves an upsert ahead.
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
        call_timeout: float = 15.0,
        ledger_size: int = 10_000,
        priority_fields: Sequence[str] = ("plan", "subscription_status"),
    ) -> None:
        self._celery = celery_app
        self._redis = redis
        self._hooks = HookCaller(hooks, logger)
        self._queues = lane_queues(queue)
        self.store = RedisDeliveryStore(redis, queue)
        self._budget = (
            RedisBudget(redis, rate_limit, prefix=budget_prefix(budget_key))
            if budget_key
            else None
        )
        self._coalesce = coalesce
        self._priority_fields = tuple(priority_fields)
        self._lease = call_timeout + 5.0
        self._ledger_size = ledger_size
        self._lock = threading.Lock()
        self._closed = False
        # Redis's epoch when last seen, and the operations submitted here not yet seen
        # finished (oldest first): what to report if Redis loses its data.
        self._epoch: str | None = None
        self._ledger: dict[str, Operation] = {}
        self._forgotten = 0
        self._looked_at = 0.0
        self._lost = False

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
        try:
            self._look()
            for lane, op, meta in self.tasks(operation):
                queue = self._queues[LANE_NAMES[lane]]
                self._celery.send_task(
                    TASK_NAME,
                    kwargs={"op": op, "meta": meta},
                    queue=queue,
                    routing_key=queue,
                    serializer="json",
                    task_id=op["id"],
                    ignore_result=True,
                )
        except Exception as error:
            # The text of a broker error can hold its URL: only its class is reported.
            self._drop(operation, "broker_unavailable", type(error).__name__)
            return
        with self._lock:
            self._ledger[operation.id] = operation

    def tasks(self, operation: Operation) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        """Record ``operation`` in Redis and return the tasks that deliver it, as ``(lane,
        op, meta)``: its own, in the lane of its significance (an upsert's depends on
        what Meisa has of its contact), and before it, for an event whose contact has an
        upsert pending, a companion that delivers that upsert on the event's lane."""
        store = self.store
        contact = store.contact_of(operation.payload) if operation.kind == "upsert" else None
        lane = known.lane_of(operation, lambda: store.known(contact), self._priority_fields)
        meta: dict[str, Any] = {"lane": lane}
        tasks = []
        if contact is not None and self._coalesce:
            meta.update(contact=contact, version=store.coalesce(operation, contact, lane))
        else:
            store.add_pending(operation, lane)
        if operation.kind == "track":
            names = (operation.payload, operation.contact)
            found = store.pending_version(c for p in names if p for c in store.contacts(p))
            if found is not None:
                companion = Operation("upsert", {}, created_at=operation.created_at)
                extra = {"contact": found[0], "version": found[1], "companion": True}
                tasks.append((lane, companion.to_dict(), {"lane": lane, **extra}))
                meta["after"] = list(found)
        return [*tasks, (lane, operation.to_dict(), meta)]

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

    def _look(self, *, force: bool = False) -> int:
        """Check Redis's epoch and, at most every :data:`_LOOK_EVERY` seconds (or when
        ``force``d or the ledger is full), forget the operations found finished; report
        the ledger as dropped if Redis lost its data. Returns the pending count."""
        with self._lock:
            now = time.monotonic()
            due = force or now - self._looked_at >= _LOOK_EVERY
            if due or len(self._ledger) >= self._ledger_size:
                self._looked_at = now
                ids = list(self._ledger)
            else:
                ids = []
        epoch, pending, unfinished = self.store.look(ids)
        with self._lock:
            known, self._epoch = self._epoch, epoch
            if known is not None and known != epoch:
                lost, self._ledger = list(self._ledger.values()), {}
                forgotten, self._forgotten, self._lost = self._forgotten, 0, True
            else:
                lost, forgotten = [], -1
                for op_id, waiting in zip(ids, unfinished, strict=True):
                    if not waiting:
                        self._ledger.pop(op_id, None)
                while len(self._ledger) >= self._ledger_size:
                    del self._ledger[next(iter(self._ledger))]
                    self._forgotten += 1
                if not self._ledger:
                    self._forgotten = 0  # older than all it saw finish: taken as finished
        if forgotten >= 0:
            self._report_lost(lost, forgotten)
        return pending

    def _report_lost(self, lost: list[Operation], forgotten: int) -> None:
        logger.error(
            "flask-meisa: Redis lost the Celery engine's data (a restart without persistence, "
            "or a flush): %d operation(s) this process submitted were pending and are "
            "reported dropped%s; keep Redis persistent (appendonly yes)",
            len(lost) + forgotten,
            f" ({forgotten} of them, over the ledger's size, not one by one)" if forgotten else "",
        )
        with contextlib.suppress(Exception):
            self.store.finish([], "dropped", len(lost) + forgotten)
        for operation in lost:
            self._hooks.call("dropped", operation, "redis_data_lost")

    @contextlib.contextmanager
    def budget_slot(self, timeout: float) -> Iterator[bool]:
        """Hold a slot of the shared budget (a send's, from the reserve) for a call made
        outside the workers: a synchronous ``meisa.send``, a suppression list load. Waits
        at most ``timeout`` seconds; yields whether a slot was taken (without one, the
        call is made anyway and the client's retries handle a 429)."""
        budget, token = self._budget, None
        if budget is not None:
            deadline = time.monotonic() + max(timeout, 0.0)
            waiter = uuid.uuid4().hex
            take = functools.partial(
                budget.acquire, lease=self._lease, lane=LANE_TRANSACTIONAL, waiter=waiter
            )
            try:
                got = take()
                while got.token is None and time.monotonic() + got.wait <= deadline:
                    time.sleep(got.wait)
                    got = take()
                token = got.token
                if token is None:
                    budget.give_up(waiter, LANE_TRANSACTIONAL)
            except RedisError as error:
                logger.warning(
                    "flask-meisa: no budget slot from Redis (%s); calling without one",
                    type(error).__name__,
                )
        try:
            yield token is not None
        finally:
            if budget is not None and token is not None:
                with contextlib.suppress(RedisError):
                    budget.finish(token)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the workers have finished every operation submitted under this
        queue prefix (by any process), at most ``timeout`` seconds (``None``: no limit).

        :returns: ``True`` when none is left; ``False`` on timeout, when Redis cannot be
            read, or when Redis lost its data since the last flush (the operations it
            lost were reported dropped).
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        pause = 0.005
        while True:
            try:
                pending = self._look()
            except Exception:
                logger.warning("flask-meisa: cannot read the pending count from Redis")
                return False
            with self._lock:
                lost, self._lost = self._lost, False
            if lost:
                return False
            if pending == 0:
                return True
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
        """Operations not finished per lane (held by workers for a countdown included;
        calls in flight apart), the oldest one's wait and the latency of each lane,
        counters from every worker, the budget left in each window, the pause every
        worker observes, and the backfill run."""
        self._look(force=True)
        status = DeliveryStatus(engine="celery", queued=dict.fromkeys(self._queues, 0))
        self.store.describe(status)
        if self._budget is not None:
            status.paused_for, flying, status.budget_left = self._budget.snapshot()
            for lane, count in flying.items():
                name = LANE_NAMES[lane]
                status.queued[name] = max(status.queued[name] - count, 0)
                status.in_flight += count
        return status

    def backfill(self, resync_after: float = 86400.0) -> CeleryBackfill:
        """The target of ``flask meisa sync-users`` (see :class:`CeleryBackfill`)."""
        return CeleryBackfill(self, resync_after)


class CeleryBackfill:
    """A backfill through Celery (a :class:`~.backfill.Target`): upserts published on the
    backfill queue, but for those Meisa already has; the run, its failures and the upserts
    Meisa refused kept in Redis (workers read the run's ``max_share``)."""

    def __init__(self, dispatcher: CeleryDispatcher, resync_after: float) -> None:
        self._dispatcher = dispatcher
        self._store = dispatcher.store
        self._resync_after = resync_after

    def load(self) -> backfill.Run | None:
        """The last run, or ``None``."""
        data = self._store.get("backfill")
        return None if data is None else backfill.Run(**data)

    def save(self, run: backfill.Run, *, fresh: bool = False) -> None:
        """Keep ``run`` (``fresh``: and forget earlier runs' failures)."""
        if fresh:
            self._store.put("backfill_failures", None)
            self._store.count("backfill_refused", 0)
        self._store.put("backfill", asdict(run))

    def add(
        self,
        run: backfill.Run,
        operations: list[Operation],
        failed: list[dict[str, Any]],
        now: float,
    ) -> None:
        """Publish the chunk's upserts, then keep its failures and ``run``."""
        store = self._store
        for operation in operations:
            contacts = store.contacts(operation.payload)
            had = functools.partial(store.known, contacts[0] if contacts else None)
            if known.unchanged(operation, had, now, self._resync_after) and (
                store.pending_version(contacts) is None
            ):
                run.skipped += 1
                continue
            self._dispatcher.publish(operation)
            run.queued += 1
        if failed:
            kept = store.get("backfill_failures", [])
            store.put("backfill_failures", (kept + failed)[: backfill.KEEP_FAILURES])
        store.put("backfill", asdict(run))

    def backlog(self) -> tuple[int, int]:
        """Backfill upserts not finished, and those Meisa refused."""
        return self._store.pending(LANE_BACKFILL), self._store.counters().get(
            "backfill_refused", 0
        )

    def failures(self) -> list[dict[str, Any]]:
        """Users the last runs could not map."""
        return list(self._store.get("backfill_failures", []))


def make_dispatcher(state: MeisaState) -> CeleryDispatcher:
    """The Celery engine of an app, from its config (``MeisaState._make_dispatcher``)."""
    app = state.app
    settings = CelerySettings.from_config(app.config)
    celery_app = settings.celery_app or resolve_celery_app(app)
    options = state.settings
    return CeleryDispatcher(
        celery_app,
        redis=_redis_client(settings.redis_url, celery_app),
        hooks=state.reporter,
        queue=settings.queue,
        rate_limit=options.rate_limit,
        budget_key=options.api_key,
        coalesce=settings.coalesce,
        call_timeout=options.connect_timeout + options.timeout,
        ledger_size=options.queue_size,
        priority_fields=options.priority_fields,
    )


def init_celery(app: Flask, celery_app: Any = None) -> Any:
    """Register the delivery task on the app's Celery app (``init_app`` calls this when
    ``MEISA_DELIVERY = "celery"``) and set up its visibility timeout
    (:func:`configure_visibility`); returns the task.

    In each worker process the first task builds, from ``app``: the client (its key,
    URL and timeouts), the retry policy, the hooks (``app``'s outcome signals), the
    shared budget (``MEISA_RATE_LIMIT``) and the Redis records; every task runs inside
    ``app.app_context()``.

    :raises ConfigurationError: no Celery app, an invalid ``MEISA_CELERY_*`` key, or a
        visibility timeout that cannot hold.
    """
    settings = CelerySettings.from_config(app.config)
    if celery_app is None:
        celery_app = settings.celery_app or resolve_celery_app(app)
    max_countdown = configure_visibility(
        celery_app, MeisaSettings.from_config({**DEFAULTS, **app.config})
    )

    def build() -> DeliveryWorker:
        meisa = app.extensions["meisa"]
        state: MeisaState = meisa.state(app)
        redis = _redis_client(settings.redis_url, celery_app)
        options = state.settings
        budget = None
        if options.api_key:
            budget = RedisBudget(redis, options.rate_limit, prefix=budget_prefix(options.api_key))
        return DeliveryWorker(
            client_factory=state.make_client,
            hooks=state.reporter,
            retry=state.background_retry_policy(),
            store=RedisDeliveryStore(redis, settings.queue),
            budget=budget,
            call_timeout=options.connect_timeout + options.timeout,
            max_countdown=max_countdown,
            context=app.app_context,
            enabled=state.delivering,
            resync_after=options.resync_after,
            routine_max_age=options.routine_max_age,
        )

    return register_tasks(celery_app, build)
