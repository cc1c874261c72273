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
from ..operations import Operation
from ..operations import attempt
from ..operations import contact_key
from ..retry import RetryPolicy
from .base import ClientFactory
from .base import DeliveryHooks
from .base import HookCaller
from .caller import OUTAGE_THRESHOLD
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
    """Run the task again in ``countdown`` seconds with these arguments."""

    countdown: float
    op: dict[str, Any]
    meta: dict[str, Any]


class DeliveryWorker:
    """Runs the delivery task's body (see the module's docstring). Thread-safe: one per
    worker process, shared by its threads.

    :param client_factory: builds the client (once; its calls are made with
        ``retry=RetryPolicy.never()``); closed by :meth:`close`.
    :param hooks: told about every outcome, in the worker.
    :param retry: when and how long to wait before retrying.
    :param store: coalesced upserts, pending operations, counters.
    :param budget: the shared rate budget, pause and outage breaker, or ``None``.
    :param call_timeout: the longest one call can take (connect plus read timeout); a
        budget slot or a contact's lease held longer is given up.
    :param max_countdown: the longest countdown a task holds (it must fit in the
        broker's visibility timeout); a longer wait is made of several.
    :param context: entered around every run (the Flask app context).
    :param enabled: read on every run; while it returns ``False`` operations are skipped
        with reason ``"delivery_suppressed"`` (``MEISA_ENABLED = False`` on the worker).
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
                self._report("failed", [operation], error, None, None)
                return None

    def _run(self, operation: Operation, meta: dict[str, Any]) -> RunAgain | None:
        due = float(meta.get("due") or 0.0)
        if due > time.time():
            return self._again(due - time.time(), operation, meta)  # a wait made of several
        contact = operation.contact_key
        if operation.kind == "upsert" and contact is not None and meta.get("version") is not None:
            return self._run_coalesced(operation, contact, meta)
        if operation.kind == "track" and not meta.get("recover"):
            wait = self._event_wait(operation, meta)
            if wait is not None:
                return wait
        return self._attempt(operation, meta, members=[operation])

    def _run_coalesced(
        self, operation: Operation, contact: str, meta: dict[str, Any]
    ) -> RunAgain | None:
        claim = self.store.claim(contact, int(meta["version"]), self._lease)
        if claim.state == "covered":
            self.store.finish([operation.id])  # already finished with the call that covered it
            return None
        if claim.state == "busy":
            return self._again(claim.wait + random.uniform(0, 0.05), operation, meta)
        if claim.state == "missing":
            return self._attempt(operation, meta, members=[operation])
        call = Operation("upsert", claim.payload, id=operation.id, attempts=operation.attempts)
        call.created_at = operation.created_at
        members = [
            call
            if member == operation.id
            else Operation("upsert", claim.payload, id=member, attempts=operation.attempts)
            for member in claim.members
        ]
        if operation.id not in claim.members:
            members.append(call)  # e.g. its record expired and was made again since
        try:
            return self._attempt(call, meta, members=members, contact=contact, claim=claim)
        except BaseException:
            self.store.release(contact, claim)
            raise

    def _event_wait(self, operation: Operation, meta: dict[str, Any]) -> RunAgain | None:
        contacts = {contact_key(operation.payload), operation.contact_key}
        if operation.contact:
            contacts.add(contact_key(operation.contact))
        keys = [key for key in contacts if key is not None]
        if not keys or not self.store.upsert_pending(keys):
            return None
        limit = self._retry.deadline if self._retry.deadline is not None else EVENT_WAIT_LIMIT
        if time.time() - operation.created_at > limit:
            return None  # the upsert is stuck; the event goes anyway (a 404 recovers it)
        return self._again(0.2 + random.uniform(0, 0.1), operation, meta)

    def _attempt(
        self,
        operation: Operation,
        meta: dict[str, Any],
        *,
        members: list[Operation],
        contact: str | None = None,
        claim: Claim | None = None,
    ) -> RunAgain | None:
        recovering = operation.kind == "track" and bool(meta.get("recover"))
        if not recovering:
            if self._enabled is not None and not self._enabled():
                reason: str | None = "delivery_suppressed"
            else:
                reason = self._hooks.skip_reason(operation)
            if reason is not None:
                self._report("skipped", members, reason, contact, claim)
                return None
        token = None
        if self.budget is not None:
            got = self.budget.acquire(lease=self._lease, priority=operation.kind == "send")
            if got.token is None:
                self._release(contact, claim)
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
        if decision.action == "recover":
            return self._again(0.0, operation, {**meta, "recover": True})
        if decision.action == "done" and recovering:
            # The contact exists now: the event again, at once.
            return self._again(0.0, operation, {**meta, "recover": False, "recovered": True})
        if decision.action == "retry":
            self._release(contact, claim)
            return self._again(decision.delay, operation, meta)
        for member in members:
            member.attempts = operation.attempts
        if decision.action == "done":
            self._report("delivered", members, outcome.result, contact, claim)
        else:
            self._report("failed", members, outcome.error, contact, claim)
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

    def _release(self, contact: str | None, claim: Claim | None) -> None:
        if claim is not None and contact is not None:
            self.store.release(contact, claim)

    def _again(self, countdown: float, operation: Operation, meta: dict[str, Any]) -> RunAgain:
        meta = dict(meta)
        meta.pop("due", None)
        if countdown > self.max_countdown:
            meta["due"] = time.time() + countdown
            countdown = self.max_countdown
        return RunAgain(max(countdown, 0.0), operation.to_dict(), meta)

    def _report(
        self,
        outcome: str,
        members: list[Operation],
        detail: Any,
        contact: str | None,
        claim: Claim | None,
    ) -> None:
        """Settle the contact's claim, call the hooks, then finish the operations.

        The claim is settled first, so that no other task sends this contact's payload
        again meanwhile; the operations stay pending until their hooks ran (a worker
        killed in a hook leaves its task to be run again, and that run finds its version
        delivered)."""
        if claim is not None and contact is not None:
            self.store.settle(contact, claim)
        for member in members:
            self._hooks.call(outcome, member, detail)
        self.store.finish([member.id for member in members], outcome, len(members))


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
            raise self.retry(
                kwargs={"op": again.op, "meta": again.meta},
                countdown=again.countdown,
                max_retries=None,
            )

    holder.task = deliver_operation
    return deliver_operation
