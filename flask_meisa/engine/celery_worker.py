"""The Celery worker's side: the task ``flask_meisa.deliver``. Each run makes at most one
call, then finishes its operation or runs again after a countdown (never sleeping on a
wait). What an outcome means is decided by :func:`~flask_meisa._decisions.decide`; this
module applies the decision to the shared budget, pause, breaker and records in Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

from redis.exceptions import RedisError

from .._decisions import Decision
from .._decisions import decide
from .._decisions import log_decision
from ..operations import LANE_AUTOMATION
from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import LANE_ROUTINE
from ..operations import Operation
from ..operations import attempt
from ..retry import RetryPolicy
from . import known
from .base import ClientFactory
from .base import DeliveryHooks
from .base import HookCaller
from .caller import OUTAGE_THRESHOLD
from .known import Known
from .redis_budget import MAX_WAIT
from .redis_budget import RedisBudget
from .redis_store import Claim
from .redis_store import RedisDeliveryStore

if TYPE_CHECKING:
    from ..client import MeisaClient

__all__ = ["TASK_NAME", "DeliveryWorker", "RunAgain", "register_tasks"]

#: The name of the delivery task on the Celery app.
TASK_NAME = "flask_meisa.deliver"

#: The longest an event waits for its contact's pending upsert when the retry policy has
#: no deadline, in seconds.
EVENT_WAIT_LIMIT = 600.0

logger = logging.getLogger("flask_meisa.engine")


@dataclass(frozen=True)
class RunAgain:
    """Run the task again in ``countdown`` seconds with these arguments, on ``queue``
    (its lane's; ``None``: the one it came from)."""

    countdown: float
    op: dict[str, Any]
    meta: dict[str, Any]
    queue: str | None = None


class DeliveryWorker:
    """Runs the delivery task's body (see the module's docstring). Thread-safe: one per
    worker process, shared by its threads.

    A task's ``meta`` says how to run it: ``lane``; for a coalesced upsert, its contact's
    record (``contact``) and ``version`` (``companion``: a copy published on an event's
    lane, delivering the record but none of its own); for an event, the upsert to wait
    for (``after``: contact and version); while it runs: ``due``, ``first_attempt`` and
    an event's recovery (``recover``, ``recovered``).

    :param client_factory: builds the client (once; its calls are made with
        ``retry=RetryPolicy.never()``); closed by :meth:`close`.
    :param hooks: told about every outcome, in the worker.
    :param retry: when and how long to wait before retrying.
    :param store: coalesced upserts, what Meisa has, pending operations, counters.
    :param budget: the shared rate budget, pause and outage breaker, or ``None``.
    :param call_timeout: the longest one call can take (connect plus read timeout); a
        budget slot or a contact's lease held longer is given up.
    :param max_countdown: the longest countdown a task holds (it must fit in the
        broker's visibility timeout); a longer wait is made of several.
    :param context: entered around every run (the Flask app context).
    :param enabled: read on every run; while it returns ``False`` operations are skipped
        with reason ``"delivery_suppressed"`` (``MEISA_ENABLED = False`` on the worker).
    :param resync_after: seconds after which a state Meisa has is sent again anyway.
    :param routine_max_age: seconds after which a routine operation is promoted.
    """

    def __init__(
        self,
        *,
        client_factory: ClientFactory,
        hooks: DeliveryHooks,
        retry: RetryPolicy,
        store: RedisDeliveryStore,
        budget: RedisBudget | None,
        call_timeout: float,
        max_countdown: float = MAX_WAIT,
        context: Callable[[], AbstractContextManager[Any]] | None = None,
        enabled: Callable[[], bool] | None = None,
        resync_after: float = 86400.0,
        routine_max_age: float = 3600.0,
    ) -> None:
        self._client_factory = client_factory
        self._hooks = HookCaller(hooks, logger)
        self._retry = retry
        self.store = store
        self.budget = budget
        self._lease = call_timeout + 5.0
        self.max_countdown = max_countdown
        self._context = context or contextlib.nullcontext
        self._enabled = enabled
        self._resync_after = resync_after
        self._routine_max_age = routine_max_age
        self._client_lock = threading.Lock()
        self._owned: MeisaClient | None = None
        self._client: MeisaClient | None = None

    def __repr__(self) -> str:
        return f"DeliveryWorker(store={self.store!r}, budget={self.budget!r})"

    def close(self) -> None:
        """Close the client (the worker process is ending)."""
        with self._client_lock:
            owned, self._owned, self._client = self._owned, None, None
        if owned is not None:
            owned.close()

    def _get_client(self) -> MeisaClient:
        with self._client_lock:
            if self._client is None:
                self._owned = self._client_factory()
                self._client = self._owned.with_options(retry=RetryPolicy.never())
            return self._client

    # -- one run -------------------------------------------------------------------------

    def run(self, data: dict[str, Any], meta: dict[str, Any]) -> RunAgain | None:
        """Make at most one call for the task's operation; ``None`` once it is finished.

        :raises RedisError: the engine's records are out of reach (no call was made).
        """
        operation = Operation.from_dict(data)
        meta = dict(meta)
        with self._context():
            try:
                return self._run(operation, meta)
            except RedisError:
                raise
            except Exception as error:
                # Not Meisa's answer (those are settled in _attempt): report it rather
                # than let the message be acknowledged in silence.
                logger.exception(
                    "flask-meisa: delivering %s raised; reported as failed", operation.describe()
                )
                self._report("failed", [operation], error, meta)
                return None

    def _run(self, operation: Operation, meta: dict[str, Any]) -> RunAgain | None:
        due = float(meta.get("due") or 0.0)
        if due > time.time():
            return self._again(due - time.time(), operation, meta)  # a wait made of several
        meta["lane"] = int(meta.get("lane", operation.lane))
        if meta["lane"] == LANE_ROUTINE and time.time() - operation.created_at > (
            self._routine_max_age
        ):
            meta["lane"] = LANE_AUTOMATION  # nothing waits forever
            self.store.move(operation, LANE_AUTOMATION)
        if operation.kind == "upsert" and meta.get("contact") is not None:
            return self._run_coalesced(operation, meta)
        if operation.kind == "track" and not meta.get("recover"):
            wait = self._event_wait(operation, meta)
            if wait is not None:
                return wait
        return self._attempt(operation, meta, members=[operation])

    def _run_coalesced(self, operation: Operation, meta: dict[str, Any]) -> RunAgain | None:
        own = not meta.get("companion")
        claim = self.store.claim(str(meta["contact"]), int(meta["version"]), self._lease)
        if claim.state == "covered":
            if own:  # already finished with the call that covered it
                self.store.finish([operation.id])
            return None
        if claim.state == "busy":
            return self._again(claim.wait + random.uniform(0, 0.05), operation, meta)
        if claim.state == "missing":
            return self._attempt(operation, meta, members=[operation]) if own else None
        call = Operation(
            "upsert",
            claim.payload,
            id=operation.id,
            created_at=operation.created_at,
            attempts=operation.attempts,
            priority=operation.priority,
            force=claim.force,
        )
        members = [
            call
            if member == operation.id
            else Operation("upsert", claim.payload, id=member, attempts=operation.attempts)
            for member in claim.members
        ]
        if own and operation.id not in claim.members:
            members.append(call)  # e.g. its record expired and was made again since
        try:
            return self._attempt(call, meta, members=members, claim=claim)
        except BaseException:
            self._release(meta, claim)
            raise

    def _event_wait(self, operation: Operation, meta: dict[str, Any]) -> RunAgain | None:
        """An event waits until the upsert its contact had pending when it was released
        is delivered (at most the retry deadline), so that it never reaches Meisa before
        its contact's state."""
        contact, version = meta.get("after") or (None, 0)
        if contact is None or self.store.pending_version([contact], upto=version) is None:
            return None
        limit = self._retry.deadline if self._retry.deadline is not None else EVENT_WAIT_LIMIT
        if time.time() - operation.created_at > limit:
            return None  # the upsert is stuck; the event goes anyway (a 404 recovers it)
        return self._again(0.1 + random.uniform(0, 0.05), operation, meta)

    def _attempt(
        self,
        operation: Operation,
        meta: dict[str, Any],
        *,
        members: list[Operation],
        claim: Claim | None = None,
    ) -> RunAgain | None:
        def had() -> Known | None:
            contact = meta.get("contact") or self.store.contact_of(operation.payload)
            return self.store.known(contact)

        if known.unchanged(operation, had, time.time(), self._resync_after):
            self._report("delivered", members, None, meta, claim, counter="unchanged")
            return None
        recovering = operation.kind == "track" and bool(meta.get("recover"))
        if not recovering:
            if self._enabled is not None and not self._enabled():
                reason: str | None = "delivery_suppressed"
            else:
                reason = self._hooks.skip_reason(operation)
            if reason is not None:
                self._report("skipped", members, reason, meta, claim)
                return None
        lane, token = int(meta["lane"]), None
        if self.budget is not None:
            share = 1.0
            if lane == LANE_BACKFILL:
                share = float((self.store.get("backfill") or {}).get("max_share", 1.0))
            got = self.budget.acquire(
                lease=self._lease, lane=lane, share=share, waiter=operation.id
            )
            if got.token is None:
                self._release(meta, claim)
                return self._again(got.wait, operation, meta)
            token = got.token
        call = operation
        if recovering and operation.contact:
            call = Operation("upsert", operation.contact, id=operation.id)
        operation.attempts += 1
        meta = {**meta, "first_attempt": float(meta.get("first_attempt") or time.time())}
        try:
            outcome = attempt(self._get_client, call)
        except BaseException:
            if token is not None and self.budget is not None:
                self.budget.finish(token)  # interrupted mid-call: count the slot as spent
            raise
        decision = decide(
            call.kind,
            outcome.error,
            attempts=operation.attempts,
            elapsed=time.time() - meta["first_attempt"],
            policy=self._retry,
            can_recover=bool(operation.contact) and not recovering and not meta.get("recovered"),
        )
        log_decision(logger, decision, operation.describe(), outcome.error, operation.attempts)
        if token is not None and self.budget is not None:
            self._settle_budget(self.budget, token, outcome.made, decision)
        if decision.unknown_contact:
            self.store.forget([operation.payload, operation.contact])
        if decision.action == "done" and call.kind == "upsert":
            self.store.remember(call.payload, time.time())
        if decision.action == "recover":
            return self._again(0.0, operation, {**meta, "recover": True})
        if decision.action == "done" and recovering:
            # The contact exists now: the event again, at once.
            return self._again(0.0, operation, {**meta, "recover": False, "recovered": True})
        if decision.action == "retry":
            self._release(meta, claim)
            return self._again(decision.delay, operation, meta)
        for member in members:
            member.attempts = operation.attempts
        if decision.action == "done":
            waited = time.time() - operation.created_at
            self._report("delivered", members, outcome.result, meta, claim, answer=waited)
        else:
            self._report("failed", members, outcome.error, meta, claim)
        return None

    def _settle_budget(
        self, budget: RedisBudget, token: str, made: bool, decision: Decision
    ) -> None:
        """Free the call's slot and apply the decision to every worker: a 429 about the
        key pauses them all; an outage opens the breaker with a growing pause."""
        failures = budget.finish(
            token, made=made, outage=decision.outage, answered=decision.answered
        )
        budget.pause(decision.pause)
        if decision.outage and failures >= OUTAGE_THRESHOLD:
            # The backoff's ceiling, not a draw: one pause shared by every worker.
            exponent = min(failures - 1, 64)
            pause = min(self._retry.max_delay, self._retry.base_delay * 2.0**exponent)
            budget.pause(pause)
            logger.info(
                "flask-meisa: %d failed calls in a row; pausing delivery for %.2f s",
                failures,
                pause,
            )

    def _release(self, meta: dict[str, Any], claim: Claim | None) -> None:
        if claim is not None:
            self.store.release(str(meta["contact"]), claim)

    def _again(self, countdown: float, operation: Operation, meta: dict[str, Any]) -> RunAgain:
        meta = dict(meta)
        meta.pop("due", None)
        if countdown > self.max_countdown:
            meta["due"] = time.time() + countdown
            countdown = self.max_countdown
        lane = LANE_NAMES[int(meta.get("lane", operation.lane))]
        queue = f"{self.store.namespace}.{lane}"  # the queue of the lane it is in now
        return RunAgain(max(countdown, 0.0), operation.to_dict(), meta, queue)

    def _report(
        self,
        outcome: str,
        members: list[Operation],
        detail: Any,
        meta: dict[str, Any],
        claim: Claim | None = None,
        *,
        counter: str | None = None,
        answer: float | None = None,
    ) -> None:
        """Settle the contact's claim, call the hooks, then finish the operations.

        The claim is settled first, so that no other task sends this contact's payload
        again meanwhile; the operations stay pending until their hooks ran (a worker
        killed in a hook leaves its task to be run again, and that run finds its version
        delivered)."""
        if claim is not None:
            self.store.settle(str(meta["contact"]), claim)
        for member in members:
            self._hooks.call(outcome, member, detail)
        lane = int(meta.get("lane", members[0].lane))
        self.store.finish(
            [member.id for member in members],
            counter or outcome,
            len(members),
            answer=None if answer is None else (lane, answer),
        )
        if outcome == "failed" and any(member.priority == "backfill" for member in members):
            self.store.count("backfill_refused", len(members))


class _WorkerHolder:
    """Builds one :class:`DeliveryWorker` per process, on the first task (a prefork
    child gets its own, with its own client and Redis connections)."""

    def __init__(self, factory: Callable[[], DeliveryWorker]) -> None:
        self._lock = threading.Lock()
        self.task: Any = None
        self.replace(factory)

    def replace(self, factory: Callable[[], DeliveryWorker]) -> None:
        with self._lock:
            self._factory = factory
            self._pid = 0
            self._worker: DeliveryWorker | None = None

    def get(self) -> DeliveryWorker:
        with self._lock:
            if self._worker is None or self._pid != os.getpid():
                self._worker = self._factory()
                self._pid = os.getpid()
            return self._worker


_HOLDER_ATTRIBUTE = "_flask_meisa_delivery"


def register_tasks(
    celery_app: Any, worker_factory: Callable[[], DeliveryWorker], *, name: str = TASK_NAME
) -> Any:
    """Register the delivery task on ``celery_app`` and return it.

    ``worker_factory`` is called in each worker process on its first task, so a Flask
    app's config, client and hooks are read in the worker. Registering again on the same
    Celery app replaces the factory (one Flask app per Celery app).

    The task acknowledges late, is requeued if its worker is lost, takes and sends JSON
    only, keeps no result, and is retried by its own rules (no ``max_retries``).
    """
    holder: _WorkerHolder | None = getattr(celery_app, _HOLDER_ATTRIBUTE, None)
    if holder is not None and holder.task is not None and holder.task.name == name:
        holder.replace(worker_factory)
        return holder.task
    holder = _WorkerHolder(worker_factory)
    setattr(celery_app, _HOLDER_ATTRIBUTE, holder)

    @celery_app.task(
        name=name,
        bind=True,
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        serializer="json",
        max_retries=None,
    )
    def deliver_operation(
        self: Any, op: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> None:
        current: _WorkerHolder = getattr(self.app, _HOLDER_ATTRIBUTE)
        meta = dict(meta or {})
        try:
            again = current.get().run(op, meta)
        except RedisError as error:
            # The engine's records are out of reach: no call was made; try again later
            # (if the broker is down too, the message stays unacknowledged and comes
            # back once Redis does).
            logger.warning(
                "flask-meisa: Redis error while delivering (%s); retrying the task",
                type(error).__name__,
            )
            again = RunAgain(1.0 + random.uniform(0, 4.0), op, meta)
        if again is not None:
            where = {"queue": again.queue} if again.queue else {}
            raise self.retry(
                kwargs={"op": again.op, "meta": again.meta},
                countdown=again.countdown,
                max_retries=None,
                **where,
            )

    holder.task = deliver_operation
    return deliver_operation
