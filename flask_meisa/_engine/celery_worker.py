"""The Celery worker's side: :class:`DeliveryWorker` makes at most one call per run of the
delivery task, then finishes its operation or runs it again after a countdown (docs/celery.md)."""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

from redis.exceptions import RedisError

from .. import operations
from ..operations import Operation
from ..retry import RetryPolicy
from . import base
from . import dead
from . import known
from .redis_budget import MAX_WAIT
from .redis_budget import RedisBudget
from .redis_dead import RedisDeadLetters
from .redis_records import Claim
from .redis_store import RedisDeliveryStore
from .redis_store import released

#: The longest an event waits for its contact's pending upsert (seconds) without a retry deadline.
EVENT_WAIT_LIMIT = 600.0

logger = logging.getLogger("flask_meisa.engine")


def lane_queues(prefix: str = "meisa") -> dict[str, str]:
    """The queue of each lane by lane name, first lane first (``"meisa.transactional"``)."""
    return {name: f"{prefix}.{name}" for name in operations.LANE_NAMES.values()}


class RunAgain(NamedTuple):
    """Run the task again in ``countdown`` seconds with these arguments, on ``queue``
    (its lane's; ``None``: the one it came from)."""

    countdown: float
    op: dict[str, Any]
    meta: dict[str, Any]
    queue: str | None = None


class DeliveryWorker:
    """Runs the delivery task (``meta`` is described in docs/celery.md); ``max_countdown``:
    the longest countdown a task holds; ``context``: entered around every run; while
    ``enabled()`` is false, operations are skipped (``"delivery_suppressed"``)."""

    def __init__(
        self,
        *,
        client_factory: base.ClientFactory,
        hooks: base.DeliveryHooks,
        retry: RetryPolicy,
        store: RedisDeliveryStore,
        budget: RedisBudget | None,
        call_timeout: float,
        max_countdown: float = MAX_WAIT,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        enabled: Callable[[], bool] = lambda: True,
        resync_after: float = 86400.0,
        routine_max_age: float = 3600.0,
    ) -> None:
        self._client = base.CallClient(client_factory)
        self._hooks = base.HookCaller(hooks, logger)
        self._dead, self._lease = RedisDeadLetters(store), base.lease_of(call_timeout)
        self._retry, self.store, self.budget = retry, store, budget
        self.max_countdown, self._context, self._enabled = max_countdown, context, enabled
        self._resync_after, self._routine_max_age = resync_after, routine_max_age

    def close(self) -> None:
        """Close the client (the worker process is ending)."""
        self._client.close()

    def run(self, data: dict[str, Any], meta: dict[str, Any]) -> RunAgain | None:
        """Make at most one call for the task's operation; ``None`` once it is finished
        (:class:`RedisError`: the records are out of reach, no call was made)."""
        operation = Operation.from_dict(data)
        meta = dict(meta)
        pending, now = self.store.seen(operation.id)  # Redis's time: every worker's
        if not pending and not meta.get("companion"):  # a companion stands for none
            self.store.finish([operation.id])  # a copy of a finished one: its task goes
            return None
        with self._context():
            try:
                return self._run(operation, meta, now)
            except RedisError:
                raise
            except Exception as error:
                # Not Meisa's answer: reported, never acknowledged in silence.
                what = operation.describe()
                logger.exception("flask-meisa: delivering %s raised; reported as failed", what)
                self._report("failed", [operation], error)
                return None

    def _run(self, operation: Operation, meta: dict[str, Any], now: float) -> RunAgain | None:
        meta["lane"] = int(meta.get("lane", operation.lane))
        due = float(meta.get("due") or 0.0)
        if due > now:
            return self._again(due - now, operation, meta)  # a wait made of several
        age = now - released(meta, operation.created_at)
        if meta["lane"] == operations.LANE_ROUTINE and age > self._routine_max_age:
            meta["lane"] = operations.LANE_AUTOMATION  # nothing waits forever
            self.store.add_pending(operation, operations.LANE_AUTOMATION, now - age)
        if operation.kind == "upsert" and meta.get("contact") is not None:
            return self._run_coalesced(operation, meta, age)
        if operation.kind == "track" and meta.get("recover") and meta.get("seen") is not None:
            return self._recover(operation, meta, age)
        if operation.kind == "track" and not meta.get("recover"):
            # An event goes after the upsert its contact had pending when it was released.
            after = [tuple(meta["after"])] if meta.get("after") else []
            if self._waits(age, after):
                return self._after_upsert(operation, meta)
        return self._attempt(operation, meta, [operation])

    def _after_upsert(self, operation: Operation, meta: dict[str, Any]) -> RunAgain:
        """An event waiting for its contact's upsert looks again in a moment, keeping its
        place before its contact's later tasks (docs/celery.md: contacts take turns)."""
        countdown = 0.1 + random.uniform(0, 0.05)
        if self.budget is not None:
            self.budget.hold(operation.id, meta["lane"], countdown)
        return self._again(countdown, operation, meta)

    def _recover(self, operation: Operation, meta: dict[str, Any], age: float) -> RunAgain | None:
        """An event answered 404 upserts its contact as it saw it, then goes again: unless
        an upsert of the contact released after it goes instead (its state is newer), and
        never while an upsert of the contact is in flight."""
        contact = self.store.contact_of(operation.contact or {})
        assert contact is not None  # "seen" is noted only for an event with its contact's upsert
        held = self.store.hold(contact, int(meta["seen"]), self._lease)
        if held.state == "busy":
            return self._again(held.wait + random.uniform(0, 0.05), operation, meta)
        if held.state == "covered":
            if self._waits(age, [(contact, held.version)]):
                return self._after_upsert(operation, meta)
            again = {**meta, "recover": False, "recovered": True}
            return self._attempt(operation, again, [operation])
        try:
            return self._attempt(operation, meta, [operation])
        finally:
            self._release(held)

    def _waits(self, age: float, after: Any, events: Any = ()) -> bool:
        """Whether one of the upserts ``after`` (``(contact, version)``) is not delivered
        yet, or one of the ``events`` (ids) not finished, and an operation released ``age``
        seconds ago may still wait (a stuck one holds it no longer than the retry deadline)."""
        limit = self._retry.deadline
        if age > (EVENT_WAIT_LIMIT if limit is None else limit):
            return False
        pending, unfinished = self.store.pending_version, self.store.unfinished(list(events))
        return any(unfinished) or any(pending([str(c)], upto=int(v)) for c, v in after)

    def _run_coalesced(
        self, operation: Operation, meta: dict[str, Any], age: float
    ) -> RunAgain | None:
        own = not meta.get("companion")
        claim = self.store.claim(str(meta["contact"]), int(meta["version"]), self._lease)
        if claim.state == "covered":
            if own:  # already finished with the call that covered it
                self.store.finish([operation.id])
            return None
        if claim.state == "busy":
            return self._again(claim.wait + random.uniform(0, 0.05), operation, meta)
        if claim.state == "missing":  # its record expired: its own payload, less what Meisa
            # accepted of its contact since its release (a later upsert's, delivered)
            since = released(meta, operation.created_at)
            fresh = known.fresh_part(operation, self.store.known(claim.contact), since)
            if own and fresh is not None:
                return self._attempt(fresh, meta, [fresh], claim)
            self._uncalled(operation, meta, claim)
            self._report("unchanged", [operation] if own else [], None, claim)
            return None
        if self._waits(age, claim.after, claim.events):
            self._release(claim)
            return self._again(0.1 + random.uniform(0, 0.05), operation, meta)
        fields = {"payload": claim.payload, "force": claim.force}
        call = Operation.from_dict({**operation.to_dict(), **fields})
        members = [
            call
            if member == operation.id
            else Operation(
                "upsert",
                claim.payload,
                id=member,
                attempts=operation.attempts,
                priority=claim.priorities.get(member),
            )
            for member in claim.members
        ]
        # An earlier part of the record (upserts that could not join this one) goes first.
        earlier = claim.version < int(meta["version"])
        if own and not earlier and operation.id not in claim.members:
            members.append(call)  # e.g. its record expired and was made again since
        try:
            again = self._attempt(call, meta, members, claim)
        except BaseException:
            self._release(claim)
            raise
        if again is None and earlier:  # then its own part, with retries of its own
            rest = {name: value for name, value in meta.items() if name != "first_attempt"}
            return self._again(0.0, operation, rest)
        return again

    def _attempt(
        self,
        operation: Operation,
        meta: dict[str, Any],
        members: list[Operation],
        claim: Claim | None = None,
    ) -> RunAgain | None:
        def had() -> known.Known | None:
            return self.store.known(
                meta.get("contact") or self.store.contact_of(operation.payload)
            )

        now = self.store.clock()  # Redis's: had's, and every worker's (a retry may run on another)
        if known.unchanged(operation, had, now, self._resync_after):
            # The app set these fields again: an older dead upsert of them is outdated.
            self.store.remember(operation.payload, None, meta.get("contact"), accepted=False)
            self._uncalled(operation, meta, claim)
            self._report("unchanged", members, None, claim)
            return None
        recovering = operation.kind == "track" and bool(meta.get("recover"))
        if not recovering:
            reason = (
                self._hooks.skip_reason(operation) if self._enabled() else "delivery_suppressed"
            )
            # Meisa refused the key: the run reads its users again, not a live sync joined.
            backfill = all(member.priority == "backfill" for member in members)
            if backfill and self.store.get("backfill_refused"):
                reason = "backfill_stopped"
            if reason is not None:
                self._uncalled(operation, meta, claim)
                self._report("skipped", members, reason, claim)
                return None
        first = meta.get("first_attempt")
        if operation.kind == "send" and first is None:
            # A copy of the task as first published (its message restored, or published
            # again) may come after attempts whose retries carried the date: it is recorded.
            first = self.store.first_attempt(operation.id)
        late = base.too_late(operation, first, now)
        if late is not None:
            self._uncalled(operation, meta, claim)
        budget, token, lane = self.budget, None, int(meta["lane"])
        if budget is not None and late is None:
            run = self.store.get("backfill", {}) if lane == operations.LANE_BACKFILL else {}
            # The tasks of one part of a record (its members', its companions') wait as one,
            # its first member, at the earliest of their places: it needs one slot.
            waiter = _waiter(operation, claim)
            got = budget.acquire(
                lease=self._lease,
                lane=lane,
                share=float(run.get("max_share", 1.0)),
                waiter=waiter,
                place=str(meta.get("turn") or ""),  # given at its release, kept by retries
                part=claim is not None and bool(claim.members),
                shared=operation.id if waiter != operation.id else "",
            )
            meta = {**meta, "turn": got.place}
            if got.token is None:
                self._release(claim)
                return self._again(got.wait, operation, meta)
            token = got.token
        operation.attempts += 1
        meta = {**meta, "first_attempt": float(first or now)}
        try:
            if operation.kind == "send" and first is None:
                self.store.first_attempt(operation.id, meta["first_attempt"])
            outcome = operations.Attempt(error=late)
            if late is None:
                outcome = self._hooks.attempt(self._client, base.call_for(operation, recovering))
        except BaseException:
            if budget is not None and token is not None:
                budget.finish(token)  # interrupted mid-call: the slot counts as spent
            raise
        answered_at = self.store.clock()
        settled = base.settle(
            operation,
            outcome.error,
            recovering=recovering,
            recovered=bool(meta.get("recovered")),
            elapsed=answered_at - meta["first_attempt"],
            policy=self._retry,
            made=outcome.made,
        )
        if budget is not None:  # a 429 about the key: no other call may start from now
            budget.pause(settled.decision.pause)
        run = functools.partial(self.store.get, "backfill")
        refused, kept = int(meta.get("refused", 0)), settled  # the key's refusals in a row
        settled = dead.retried_refusal(operation, kept, outcome.error, run, self._retry, refused)
        meta = {**meta, "refused": refused + 1 if settled is not kept else 0}
        decision = settled.decision
        base.log_decision(
            logger, decision, operation.describe(), outcome.error, operation.attempts
        )
        if budget is not None and token is not None:
            # Every worker follows: a 429 about the key pauses all; an outage opens the breaker.
            failures = budget.finish(
                token,
                made=outcome.made,
                timed_out=outcome.timed_out,
                outage=decision.outage,
                answered=decision.answered,
                again=None if settled.step in ("delivered", "failed") else decision.delay,
                # A retry due may wait for a thread busy with a call; a recovery runs at once
                # and may wait for its contact's upsert, which must not wait for it as long.
                late=self._lease if settled.step == "retry" else 1.0,
            )
            if decision.outage:  # Meisa looks down: its calls in a row decide the pause
                budget.pause(base.pause_for(decision, failures, self._retry, logger))
        if decision.unknown_contact:
            self.store.forget([operation.payload, operation.contact])
        if settled.accepted is not None:
            # Under the record it was made for: its address may name another user by now.
            self.store.remember(settled.accepted, None, meta.get("contact"))
        if settled.step == "upsert_contact":
            if budget is not None:  # its recovery is due now, its contact's next wait for it
                budget.hold(operation.id, lane, 0.0, str(meta.get("turn") or ""))
            return self._again(0.0, operation, {**meta, "recover": True})
        if settled.step == "event_again":
            return self._again(0.0, operation, {**meta, "recover": False, "recovered": True})
        if settled.step == "retry":  # every task of the part waits as long
            self._release(claim, decision.delay)
            return self._again(decision.delay, operation, meta)
        for member in members:
            member.attempts = operation.attempts
        if settled.step == "failed":
            self._report("failed", members, outcome.error, claim)
        else:
            waited = (lane, answered_at - released(meta, operation.created_at), answered_at)
            self._report("delivered", members, outcome.result, claim, answer=waited)
        return None

    def _uncalled(self, operation: Operation, meta: dict[str, Any], claim: Claim | None) -> None:
        # Placed (it may have waited, or called before), it ends without a call: its
        # contact's next need not wait for it (as a late waiter, a lease).
        if self.budget is not None and meta.get("turn"):
            self.budget.release(_waiter(operation, claim), str(meta["turn"]))

    def _release(self, claim: Claim | None, backoff: float = 0.0) -> None:
        if claim is not None:
            self.store.settle(claim, delivered=False, backoff=backoff)

    def _again(self, countdown: float, operation: Operation, meta: dict[str, Any]) -> RunAgain:
        meta = {name: value for name, value in meta.items() if name != "due"}
        if countdown > self.max_countdown:
            meta["due"] = self.store.clock() + countdown  # another worker may run it
            countdown = self.max_countdown
        queue = lane_queues(self.store.namespace)[operations.LANE_NAMES[meta["lane"]]]
        return RunAgain(max(countdown, 0.0), operation.to_dict(), meta, queue)

    def _report(
        self,
        outcome: str,
        members: list[Operation],
        detail: Any,
        claim: Claim | None = None,
        answer: tuple[int, float, float] | None = None,
    ) -> None:
        # The claim first, so that no other task sends its payload again; the operations
        # last (a worker killed in a hook leaves its task to run again: its version is done).
        failed = outcome == "failed"
        if failed:  # before the claim: its members' tasks then finish them with no outcome
            # Not the one that stops the run: no dead letter, its user is read again.
            self.store.refused([m.id for m in members if not self._dead.stops(m, detail)])
        if claim is not None:
            self.store.settle(claim)
            if self.budget is not None:  # the other members' tasks need no slot any more
                self.budget.forget([member.id for member in members])
        # Kept as dead letters: those of a claim now (their task run again finds its version
        # done); any other after the hooks (run again, it calls Meisa again: an event that
        # Meisa tracks then is no dead letter, retried to be tracked twice).
        if failed and claim is not None:
            self._dead.bury(members, detail)
        for member in members:
            self._hooks.call("delivered" if outcome == "unchanged" else outcome, member, detail)
        if failed and claim is None:
            self._dead.bury(members, detail)
        self.store.finish([member.id for member in members], outcome, len(members), answer=answer)


def _waiter(operation: Operation, claim: Claim | None) -> str:
    """Who ``operation`` asks the budget as: its part's first member, or itself."""
    return claim.members[0] if claim is not None and claim.members else operation.id
