"""``MEISA_DELIVERY = "celery"``, the web process's side: each operation is published as a
JSON task on its lane's queue, for the workers (:mod:`.celery_worker`); see docs/celery.md."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from ..errors import DeliveryError
from ..errors import EngineClosed
from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import Operation
from . import backfill
from . import base
from . import celery_setup
from . import known
from .celery_worker import DeliveryWorker
from .celery_worker import lane_queues
from .redis_budget import RedisBudget
from .redis_budget import Stall
from .redis_dead import RedisDeadLetters
from .redis_store import RedisDeliveryStore

if TYPE_CHECKING:
    from .._runtime import MeisaState
    from ..retry import RetryPolicy

logger = logging.getLogger("flask_meisa.engine")

#: How often, at most, a busy dispatcher checks which of its operations are finished.
_LOOK_EVERY = 1.0


class CeleryDispatcher(base.Dispatcher):
    """Publishes operations on the queues of ``queue`` (a prefix), with the records and the
    budget of ``budget_key`` in ``redis``; remembers ``ledger_size`` operations to report if
    Redis loses them; publishes again those no worker ran for ``lost_after`` seconds."""

    def __init__(
        self,
        celery_app: Any,
        *,
        redis: Any,
        hooks: base.DeliveryHooks,
        queue: str = "meisa",
        rate_limit: str | None = None,
        budget_key: str | None = None,
        call_timeout: float = 15.0,
        ledger_size: int = 10_000,
        priority_fields: Sequence[str] = ("plan", "subscription_status"),
        lost_after: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._celery = celery_app
        self._hooks = base.HookCaller(hooks, logger)
        self.queues = lane_queues(queue)
        self.store = RedisDeliveryStore(redis, queue)
        #: What Meisa refused, or whose retries ran out (``flask meisa dead-letters``); a
        #: retry is published ``refused``: one that cannot be stays a dead letter.
        self.dead_letters = RedisDeadLetters(
            self.store, functools.partial(self.submit, refused=True)
        )
        # While Redis (or the broker) just timed out: publishing drops, sends take no slot.
        self.stall = Stall(redis.ping, self._ping_broker)
        #: The key's shared budget (``None`` without a key).
        self.budget = (
            RedisBudget(redis, rate_limit, budget_key, retry, self.stall) if budget_key else None
        )
        self._priority_fields = tuple(priority_fields)
        self._call_timeout = call_timeout
        self._ledger_size = ledger_size
        self._lost_after = lost_after
        self._closed = False
        # What to report if Redis loses its data: those submitted here not seen finished yet.
        self._epoch: str | None = None
        self._ledger: dict[str, Operation] = {}
        self._forgotten = 0
        self._next_look = 0.0
        self._lost = False
        self.after_fork()

    def start(self) -> None:
        """Nothing to start: the workers deliver."""

    def after_fork(self) -> None:
        """In a forked child: its own lock and worker (the Redis client reconnects itself)."""
        self._lock = threading.Lock()
        self._worker: DeliveryWorker | None = None

    def worker(self, state: MeisaState) -> DeliveryWorker:
        """This process's worker for the delivery task (made on first use)."""
        with self._lock:
            if self._worker is None:
                options = state.settings
                self._worker = DeliveryWorker(
                    client_factory=state.make_client,
                    hooks=state.reporter,
                    retry=state.background_retry_policy(),
                    store=self.store,
                    budget=self.budget,
                    call_timeout=self._call_timeout,
                    max_countdown=celery_setup.configure_visibility(self._celery, options),
                    context=state.app.app_context,
                    enabled=state.delivering,
                    resync_after=options.resync_after,
                    routine_max_age=options.routine_max_age,
                )
            return self._worker

    def submit(self, operations: Iterable[Operation], *, refused: bool = False) -> None:
        """Publish each operation (see :meth:`publish`)."""
        for operation in operations:
            self.publish(operation, refused=refused)

    def publish(
        self, operation: Operation, *, refused: bool = False, read_at: float | None = None
    ) -> bool:
        """Publish ``operation`` (a backfill's upsert of a user read at ``read_at``); what
        cannot be published is dropped (a send, or anything when ``refused``, raises
        :class:`DeliveryError` instead; closed: ``EngineClosed``); ``False``: none left."""
        if self._closed:
            raise EngineClosed(f"delivery engine is closed; {operation.describe()} was not sent")
        if self.stall:  # nothing of it reached Redis
            self._drop(operation, "TimeoutError", record=False, refused=refused)
            return True
        recorded = False  # Redis took its records (then only the broker may have failed)
        try:
            tasks = self.tasks(operation, read_at)
            recorded = True
            for task in tasks:
                self._send(*task)
        except Exception as error:
            origin = error.__cause__ or error  # kombu raises its own error from the broker's
            self.stall.note(origin)  # then its records, if any, expire: no cleanup to wait on
            # The text of a broker error can hold its URL: only its class is told.
            cause, record = type(origin).__name__, recorded or not self.stall
            self._drop(operation, cause, record=record, refused=refused)
            return True
        if tasks:
            with self._lock:
                self._ledger[operation.id] = operation
        return bool(tasks)

    def _ping_broker(self) -> None:
        with self._celery.connection_for_write() as broker:
            broker.channel().close()  # (kombu's Redis transport pings as it opens one)

    def _send(self, lane: int, op: dict[str, Any], meta: dict[str, Any]) -> None:
        queue = self.queues[LANE_NAMES[lane]]
        self._celery.send_task(
            celery_setup.TASK_NAME,
            kwargs={"op": op, "meta": meta},
            queue=queue,
            routing_key=queue,
            serializer="json",
            task_id=op["id"],
            ignore_result=True,
        )

    def _drop(self, operation: Operation, cause: str, *, record: bool, refused: bool) -> None:
        # Not published; ``record``: counted in Redis, unless it timed out a moment ago.
        refused = refused or operation.kind == "send"
        if record:
            with contextlib.suppress(Exception):  # Redis may be out of reach too
                self.store.finish([operation.id], None if refused else "dropped", 1)
        if refused:
            what = f"publishing failed ({cause}); {operation.describe()} was not sent"
            raise DeliveryError(what) from None
        logger.warning(
            "flask-meisa: dropped %s (broker_unavailable: %s)", operation.describe(), cause
        )
        self._hooks.call("dropped", operation, "broker_unavailable")

    def tasks(
        self, operation: Operation, read_at: float | None = None
    ) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        """Record ``operation`` in Redis; its tasks ``(lane, op, meta)``, companion first."""
        store, (_, now) = self.store, self._look()
        contact = store.contact_of(operation.payload) if operation.kind == "upsert" else None
        lane = known.lane_of(operation, lambda: store.known(contact), self._priority_fields)
        meta: dict[str, Any] = {"lane": lane, "released": now}  # Redis's clock, every host's
        after: list[tuple[str, int]] = []
        joined = False
        if contact is not None:
            # Read before the record links the address to this contact and takes it as its last.
            after, left = store.ahead_of(operation.payload, contact)
            meta["contact"] = contact
            coalesced = store.coalesce(operation, contact, lane, after, left, read_at, now)
            if coalesced is None:  # a backfill's, older than what Meisa has
                return []
            meta["version"], joined = coalesced
        else:
            store.add_pending(operation, lane, now)
        if operation.kind == "track":
            store.note_event(operation)
            names = [store.contacts(p) for p in (operation.payload, operation.contact) if p]
            if operation.contact:  # what a 404's upsert of its contact must not undo
                meta["seen"] = store.version(next(iter(names[-1]), None))  # its contact_of
            found = store.pending_version(c for contacts in names for c in contacts)
            if found is not None:
                after, meta["after"] = [found], list(found)
        # What it waits for is delivered on its lane, not behind a backlog of a later lane.
        tasks = []
        for found in after:
            companion = Operation("upsert", {}, created_at=operation.created_at)
            extra = {"contact": found[0], "version": found[1], "companion": True}
            tasks.append((lane, companion.to_dict(), {"lane": lane, "released": now, **extra}))
        tasks.append(own := (lane, operation.to_dict(), meta))
        if self.budget is not None:  # contacts take turns, from their release
            # A task that delivers upserts already waiting (a companion, an upsert that joined
            # them) takes no turn ("" for its id): their own task has one.
            waiters = [
                (
                    "" if m.get("companion") or (m is meta and joined) else op["id"],
                    store.turns(op["kind"], op["payload"], m),
                )
                for _, op, m in tasks
            ]
            for (_, _, task_meta), place in zip(tasks, self.budget.places(waiters), strict=True):
                task_meta["turn"] = place
        if self._lost_after is not None:
            store.keep(*own)
        return tasks

    def _look(self, *, force: bool = False) -> tuple[int, float]:
        """The pending count and Redis's clock; prunes the ledger, republishes lost tasks,
        reports a data loss."""
        with self._lock:
            now = time.monotonic()
            due = force or len(self._ledger) >= self._ledger_size or now >= self._next_look
            if due:
                self._next_look = now + _LOOK_EVERY
            ids = list(self._ledger) if due else []
            newest = next(reversed(self._ledger), None)
        epoch, pending, unfinished, now = self.store.look(ids)
        if due and self._lost_after is not None:
            try:  # a broker can lose a message: publish again what no worker has run
                tasks = self.store.unseen(self._lost_after)
                for task in tasks:
                    self._send(*task)
                if tasks:
                    logger.warning(
                        "flask-meisa: %d pending operation(s) unseen by every worker for %.0f s: "
                        "published again (their message was lost, or waits in a long queue)",
                        len(tasks),
                        self._lost_after,
                    )
            except Exception as error:  # the operation being published is not at fault
                name = type(error).__name__
                logger.warning("flask-meisa: publishing lost operations again failed (%s)", name)
        with self._lock:
            seen, self._epoch = self._epoch, epoch
            if seen is None or seen == epoch:
                for op_id, waiting in zip(ids, unfinished, strict=True):
                    if not waiting:
                        self._ledger.pop(op_id, None)
                # Nothing pending: all it published before this look is finished.
                while not pending and newest in self._ledger:
                    self._ledger.pop(next(iter(self._ledger)))
                while len(self._ledger) >= self._ledger_size:
                    del self._ledger[next(iter(self._ledger))]
                    self._forgotten += 1
                if not self._ledger:
                    self._forgotten = 0  # older than all it saw finish: taken as finished
                return pending, now
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
        return pending, now

    def budget_slot(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """A slot of the shared budget for a call made outside the workers."""
        if self.budget is None:
            return contextlib.nullcontext(False)
        return self.budget.slot(timeout, base.lease_of(self._call_timeout))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every operation of this queue prefix is finished; ``False`` on timeout,
        or if Redis cannot be read or lost its data since."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        pause = 0.005
        while True:
            try:
                pending, _ = self._look()
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
        """Stop publishing and close the Redis connections; ``0``: nothing is held here."""
        self._closed = True
        self.store.redis.close()
        return 0

    def status(self) -> base.DeliveryStatus:
        """Every worker's delivery (see :class:`~.base.DeliveryStatus`)."""
        self._look(force=True)
        status = base.DeliveryStatus(engine="celery")
        self.store.describe(status)
        status.dead_letters = self.dead_letters.count()
        if self.budget is not None:
            status.paused_for, flying, status.budget_left = self.budget.snapshot()
            for lane, count in flying.items():
                name = LANE_NAMES[lane]
                status.queued[name] = max(status.queued[name] - count, 0)
                status.in_flight += count
        return status

    def backfill(self, resync_after: float = 86400.0) -> CeleryBackfill:
        """The target of ``flask meisa sync-users`` (see :class:`CeleryBackfill`)."""
        return CeleryBackfill(self, resync_after)


class CeleryBackfill(backfill.Target):
    """A backfill through Celery (a :class:`~.backfill.Target`), its run kept in Redis."""

    _get, _put = staticmethod(RedisDeliveryStore.get), staticmethod(RedisDeliveryStore.put)

    def __init__(self, dispatcher: CeleryDispatcher, resync_after: float) -> None:
        self._dispatcher, self.resync_after = dispatcher, resync_after
        self.clock = dispatcher.store.clock  # Redis's, by which the workers date Meisa's answers

    @contextlib.contextmanager
    def _kept(self, write: bool = False) -> Iterator[RedisDeliveryStore]:
        store = self._dispatcher.store
        # Written by one run at a time: two started at once each read that none ran.
        lock = store.redis.lock(f"{store.prefix}:backfill:lock", timeout=60, sleep=0.01)
        with lock if write else contextlib.nullcontext():
            yield store

    def _queue(
        self, store: RedisDeliveryStore, run: backfill.Run, operations: list[Operation], now: float
    ) -> None:
        for operation in operations:
            contacts = store.contacts(operation.payload)
            had = functools.cache(functools.partial(store.known, next(iter(contacts), None)))
            fresh = known.fresh_part(operation, had(), now)
            if fresh is None or (
                self._unchanged(fresh, had, run, now) and store.pending_version(contacts) is None
            ):
                run.skipped += 1
            elif self._dispatcher.publish(fresh, read_at=now):
                run.queued += 1
            else:  # Meisa accepted all of it since the read (a live sync)
                run.skipped += 1

    def backlog(self) -> tuple[int, int]:
        """Backfill upserts not finished, and those Meisa refused."""
        store = self._dispatcher.store
        return store.pending(LANE_BACKFILL), store.counters().get("backfill_refused", 0)


def make_dispatcher(state: MeisaState) -> CeleryDispatcher:
    """The Celery engine of an app, from its config."""
    settings, celery_app = celery_setup.resolve_celery_app(state.app)
    options = state.settings
    return CeleryDispatcher(
        celery_app,
        redis=celery_setup.redis_client(settings, celery_app),
        hooks=state.reporter,
        queue=settings.queue,
        rate_limit=options.rate_limit,
        budget_key=options.api_key,
        call_timeout=options.call_timeout,
        ledger_size=options.queue_size,
        priority_fields=options.priority_fields,
        lost_after=celery_setup.lost_after(celery_app, options.call_timeout),
        retry=state.background_retry_policy(),
    )
