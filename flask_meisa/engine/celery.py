"""``MEISA_DELIVERY = "celery"``: the web process publishes each operation as a JSON task
on its lane's queue; Celery workers deliver it (:mod:`.celery_worker`) within one budget
kept in Redis. docs/celery.md has the setup and the design.
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
from .celery_worker import lane_queues
from .celery_worker import register_tasks
from .redis_budget import MAX_WAIT
from .redis_budget import RedisBudget
from .redis_store import RedisDeliveryStore

if TYPE_CHECKING:
    from flask import Flask

    from ..runtime import MeisaState

__all__ = ["CELERY_DEFAULTS", "CeleryDispatcher", "CelerySettings", "init_celery"]

logger = logging.getLogger("flask_meisa.engine")

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
#: How often, at most, a busy dispatcher checks which of its operations are finished.
_LOOK_EVERY = 1.0


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


def configure_visibility(celery_app: Any, settings: MeisaSettings) -> float:
    """Set the Redis transport's ``visibility_timeout`` if the app set none, check it (a
    :class:`ConfigurationError` says what to set), and return the longest countdown a task
    may hold so that a held message is never handed to a second worker."""
    scheme = str(celery_app.conf.broker_url or "").partition("://")[0]
    if scheme not in ("redis", "rediss", "redis+socket", "sentinel"):
        return MAX_WAIT  # a broker without a visibility timeout
    options = dict(celery_app.conf.broker_transport_options or {})
    visibility = options.setdefault("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
    celery_app.conf.broker_transport_options = options
    # A dead worker's message comes back after the timeout and kombu's next sweep.
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
    """Publishes operations as Celery tasks on the queues of ``queue`` (a prefix), keeping
    the engine's records through ``redis`` (closed by :meth:`close`). ``budget_key``: the
    API key whose budget (``rate_limit``) is shared; ``ledger_size``: how many operations
    submitted here are remembered, to be reported if Redis loses them."""

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
        #: The queue of each lane, by lane name.
        self.queues = lane_queues(queue)
        self.store = RedisDeliveryStore(redis, queue)
        self._budget = RedisBudget(redis, rate_limit, budget_key) if budget_key else None
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

    def start(self) -> None:
        """Nothing to start: the workers deliver."""

    def after_fork(self) -> None:
        """Nothing to reset: the Redis client reconnects in a forked child."""

    def submit(self, operations: Iterable[Operation]) -> None:
        """Publish each operation (see :meth:`publish`)."""
        for operation in operations:
            self.publish(operation)

    def publish(self, operation: Operation) -> None:
        """Publish ``operation`` on its lane's queue; what cannot be published is reported
        to ``hooks.dropped``, but a send raises :class:`DeliveryError`."""
        if self._closed:
            self._drop(operation, "closed")
            return
        try:
            self._look()
            for lane, op, meta in self.tasks(operation):
                queue = self.queues[LANE_NAMES[lane]]
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
            # The text of a broker error can hold its URL: only its class is told.
            self._drop(operation, "broker_unavailable", type(error).__name__)
            return
        with self._lock:
            self._ledger[operation.id] = operation

    def _drop(self, operation: Operation, reason: str, cause: str | None = None) -> None:
        if operation.kind == "send":
            where = f"publishing failed ({cause})" if cause else "the delivery engine is closed"
            raise DeliveryError(f"{where}; {operation.describe()} was not sent") from None
        with contextlib.suppress(Exception):  # Redis may be out of reach too
            self.store.finish([operation.id], "dropped", 1)
        detail = f"{reason}: {cause}" if cause else reason
        logger.warning("flask-meisa: dropped %s (%s)", operation.describe(), detail)
        self._hooks.call("dropped", operation, reason)

    def tasks(self, operation: Operation) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        """Record ``operation`` in Redis and return the tasks that deliver it as ``(lane,
        op, meta)``: its own, and before it, for an event whose contact has an upsert
        pending, a companion that delivers that upsert on the event's lane."""
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

    def _look(self, *, force: bool = False) -> int:
        """The pending count; forgets the ledger's finished operations (every
        :data:`_LOOK_EVERY` seconds at most), or reports it dropped if Redis lost its data."""
        with self._lock:
            now = time.monotonic()
            full = len(self._ledger) >= self._ledger_size
            due = force or full or now - self._looked_at >= _LOOK_EVERY
            if due:
                self._looked_at = now
            ids = list(self._ledger) if due else []
        epoch, pending, unfinished = self.store.look(ids)
        with self._lock:
            seen, self._epoch = self._epoch, epoch
            if seen is None or seen == epoch:
                for op_id, waiting in zip(ids, unfinished, strict=True):
                    if not waiting:
                        self._ledger.pop(op_id, None)
                while len(self._ledger) >= self._ledger_size:
                    del self._ledger[next(iter(self._ledger))]
                    self._forgotten += 1
                if not self._ledger:
                    self._forgotten = 0  # older than all it saw finish: taken as finished
                return pending
            lost, self._ledger = list(self._ledger.values()), {}
            forgotten, self._forgotten, self._lost = self._forgotten, 0, True
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
        return pending

    @contextlib.contextmanager
    def budget_slot(self, timeout: float) -> Iterator[bool]:
        """Hold a slot of the shared budget (from the reserve) for a call made outside the
        workers, waiting at most ``timeout`` seconds; yields whether one was taken
        (without one, the call is made anyway and the client's retries handle a 429)."""
        budget, token = self._budget, None
        if budget is not None:
            deadline, waiter = time.monotonic() + max(timeout, 0.0), uuid.uuid4().hex
            try:
                while True:
                    got = budget.acquire(lease=self._lease, lane=LANE_TRANSACTIONAL, waiter=waiter)
                    if got.token is not None or time.monotonic() + got.wait > deadline:
                        break
                    time.sleep(got.wait)
                if got.token is None:
                    budget.give_up(waiter, LANE_TRANSACTIONAL)
                token = got.token
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
        """Wait at most ``timeout`` seconds until the workers finished every operation of
        this queue prefix, by any process; ``False`` on timeout, when Redis cannot be read
        or when it lost its data since the last flush."""
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
            if lost or pending == 0:
                return not lost
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)

    def close(self, timeout: float | None = None) -> int:
        """Stop publishing and close the Redis connections; returns ``0``: the broker holds
        what was published, nothing is held here."""
        with self._lock:
            closed, self._closed = self._closed, True
        if not closed:
            self._redis.close()
        return 0

    def status(self) -> DeliveryStatus:
        """Operations not finished per lane (calls in flight apart), their wait and latency,
        every worker's counters, the budget left, the pause and the backfill run."""
        self._look(force=True)
        status = DeliveryStatus(engine="celery", queued=dict.fromkeys(self.queues, 0))
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
    """A backfill through Celery (a :class:`~.backfill.Target`): upserts published but for
    those Meisa has; the run, its failures and the count Meisa refused kept in Redis."""

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
        refused = self._store.counters().get("backfill_refused", 0)
        return self._store.pending(LANE_BACKFILL), refused

    def failures(self) -> list[dict[str, Any]]:
        """Users the last runs could not map."""
        return list(self._store.get("backfill_failures", []))


def _redis_client(url: str | None, celery_app: Any) -> Any:
    if url is None:
        url = str(celery_app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "the Celery engine keeps its rate budget and coalesced upserts in Redis: "
                "set MEISA_CELERY_REDIS_URL (the broker is not Redis)"
            )
    return redis.Redis.from_url(url, health_check_interval=30)


def _settings(app: Flask, celery_app: Any = None) -> tuple[CelerySettings, Any]:
    settings = CelerySettings.from_config(app.config)
    return settings, celery_app or settings.celery_app or resolve_celery_app(app)


def make_dispatcher(state: MeisaState) -> CeleryDispatcher:
    """The Celery engine of an app, from its config."""
    settings, celery_app = _settings(state.app)
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
    """Register the delivery task on the app's Celery app (each worker process builds
    its :class:`DeliveryWorker` from ``app`` on its first task) and set up the visibility
    timeout (:func:`configure_visibility`); returns the task. ``init_app`` calls this.

    :raises ConfigurationError: no Celery app, an invalid ``MEISA_CELERY_*`` key, or a
        visibility timeout that cannot hold.
    """
    settings, celery_app = _settings(app, celery_app)
    options = MeisaSettings.from_config({**DEFAULTS, **app.config})
    max_countdown = configure_visibility(celery_app, options)

    def build() -> DeliveryWorker:
        state: MeisaState = app.extensions["meisa"].state(app)
        options, redis = state.settings, _redis_client(settings.redis_url, celery_app)
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
