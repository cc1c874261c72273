"""What every engine shares: its interface (:class:`Dispatcher`, the hooks, the status),
the client it calls with, and :func:`settle`: what a call's outcome means."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import Protocol

from ..errors import APIConnectionError
from ..errors import APIError
from ..errors import DeliveryError
from ..errors import NotFoundError
from ..errors import RateLimitError
from ..errors import ServerError
from ..errors import ValidationError
from ..operations import Attempt
from ..operations import Operation
from ..operations import attempt
from ..retry import RetryPolicy

if TYPE_CHECKING:
    from ..client import MeisaClient

#: The window of answers that the latency figures of a status cover, in seconds.
LATENCY_WINDOW = 900.0
#: Builds the client an engine calls Meisa with (again in a forked child).
ClientFactory = Callable[[], "MeisaClient"]


class DeliveryHooks(Protocol):
    """What an engine reports back to the extension. Hooks must not raise (but ``guard``)."""

    def skip_reason(self, operation: Operation) -> str | None:
        """Checked just before a call: a reason not to make it (e.g. ``"suppressed"``)."""

    def skipped(self, operation: Operation, reason: str) -> None:
        """The operation was not delivered on purpose (see :meth:`skip_reason`)."""

    def guard(self, operation: Operation) -> None:
        """Checked just before a call: raise Meisa's 429 for it when known (no call)."""

    def learn(self, operation: Operation, error: BaseException) -> None:
        """Meisa answered the call for ``operation`` with ``error``."""

    def delivered(self, operation: Operation, result: Any) -> None:
        """Meisa accepted the operation (``result``), or had the upsert's state (``None``)."""

    def failed(self, operation: Operation, error: BaseException) -> None:
        """Meisa refused the operation or its retry budget ran out."""

    def dropped(self, operation: Operation, reason: str) -> None:
        """The operation was shed (e.g. a full queue) or abandoned at exit."""


_IN_HOOK = threading.local()


def in_hook() -> bool:
    """Whether this thread is in an engine's hook, where waiting for delivery would deadlock
    or hold up an engine's thread (the writer's: all the process's storing)."""
    return bool(getattr(_IN_HOOK, "depth", 0))


class HookCaller:
    """Calls :class:`DeliveryHooks` methods, logging what they raise (a hook is the app's
    code, run on a delivery thread)."""

    def __init__(self, hooks: DeliveryHooks, logger: logging.Logger) -> None:
        self.hooks, self.logger = hooks, logger

    def skip_reason(self, operation: Operation) -> str | None:
        """The hook's reason to skip ``operation``; a hook that raises skips nothing."""
        reason: str | None = self.call("skip_reason", operation)
        return reason

    def attempt(self, get_client: Callable[[], MeisaClient], call: Operation) -> Attempt:
        """:func:`attempt` ``call`` unless ``guard`` raises (not made); ``learn`` its error."""
        try:
            self.hooks.guard(call)
        except RateLimitError as refused:
            return Attempt(error=refused)
        if (outcome := attempt(get_client, call)).error is not None:
            self.call("learn", call, outcome.error)
        return outcome

    def call(self, name: str, operation: Operation, *args: Any) -> Any:
        """Call hook ``name`` and return what it returns (``None`` when it raised)."""
        _IN_HOOK.depth = getattr(_IN_HOOK, "depth", 0) + 1
        try:
            return getattr(self.hooks, name)(operation, *args)
        except Exception:
            otherwise = "delivering it anyway" if name == "skip_reason" else "ignored"
            self.logger.exception(
                "flask-meisa: the %s hook raised for %s; %s", name, operation.describe(), otherwise
            )
            return None
        finally:
            _IN_HOOK.depth -= 1


class CallClient:
    """The client an engine calls with, made on first use: one attempt per call."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._owned: MeisaClient | None = None
        self._client: MeisaClient | None = None

    def __call__(self) -> MeisaClient:
        with self._lock:
            if self._client is None:
                self._owned = self._factory()
                self._client = self._owned.with_options(retry=RetryPolicy.never())
            return self._client

    def close(self) -> None:
        """Close the client (made again on next use)."""
        with self._lock:
            owned, self._owned, self._client = self._owned, None, None
        if owned is not None:
            owned.close()


@dataclass
class DeliveryStatus:
    """A snapshot of delivery, for ``flask meisa status`` and monitoring (with the store:
    of the whole host, whichever process asks)."""

    engine: str
    #: Operations waiting, by lane (in flight and waiting to retry not included).
    queued: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    retry_waiting: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    #: Upserts that needed no call: Meisa already had their state.
    unchanged: int = 0
    budget_left: dict[str, int] | None = None
    paused_for: float = 0.0
    #: Dead letters kept (``flask meisa dead-letters``).
    dead_letters: int = 0
    #: The pid of the process delivering for the host (``None``: nobody now).
    delivering_pid: int | None = None
    #: Whether the store is a file that outlives the process.
    durable: bool = False
    #: By lane: seconds the oldest waiting operation has waited.
    oldest_wait: dict[str, float] = field(default_factory=dict)
    #: By lane: (p50, p99) seconds from release to Meisa's answer over the last window.
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The backfill run (``flask meisa sync-users``), if any; ``refused``: ``[status, code,
    #: message, user]`` of the upsert refused for the key that stopped it (``user``: its
    #: external_id or None); ``refused_upserts``: dead letters; ``failed``: users unmapped.
    backfill: dict[str, Any] | None = None

    @property
    def pending(self) -> int:
        """Operations not yet finished: queued, in flight or waiting to retry."""
        return sum(self.queued.values()) + self.in_flight + self.retry_waiting

    def add_latency(self, lane: str, waits: Iterable[float]) -> None:
        """Note ``lane``'s (p50, p99) of ``waits``, release to answer (none: no figure)."""
        ordered = sorted(waits)
        if ordered:
            last = len(ordered) - 1
            self.latency[lane] = ordered[last // 2], ordered[min(last, int(len(ordered) * 0.99))]


class Dispatcher(Protocol):
    """An engine: takes operations and delivers them."""

    def start(self) -> None:
        """Begin delivering (threads, the host's delivery lock); idempotent."""

    def submit(self, operations: Iterable[Operation]) -> None:
        """Take operations, never waiting on Meisa (closed: take none, raise ``EngineClosed``);
        what cannot be taken is reported to ``hooks.dropped`` (a send raises instead)."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is finished; ``True`` if nothing is left."""

    def close(self, timeout: float | None = None) -> int:
        """Flush within ``timeout``, stop, and return how many operations were lost."""

    def status(self) -> DeliveryStatus:
        """A snapshot of the engine's queues and counters."""

    def budget_slot(self, timeout: float) -> AbstractContextManager[bool]:
        """A slot of the key's budget for a call made outside the engine."""

    def after_fork(self) -> None:
        """In a forked child: forget the parent's threads, locks and connections."""


Action = Literal["done", "retry", "recover", "fail"]
#: After a call: delivered, failed, retry (in ``decision.delay`` seconds), upsert the event's
#: contact before it goes again, or the event again at once (its contact upserted).
Step = Literal["delivered", "failed", "retry", "upsert_contact", "event_again"]

#: Failures in a row (no answer, or 5xx) after which Meisa is treated as down: delivery
#: pauses with a growing backoff, at least a second however small the retry delays (0
#: included: never a tight loop), then probes with one call at a time.
OUTAGE_THRESHOLD, OUTAGE_MIN_PAUSE = 3, 1.0

#: Meisa deduplicates a send's idempotency key for this long, in seconds.
IDEMPOTENCY_WINDOW = 3600.0
#: What a replayed send leaves of that window for its wait in a queue, in seconds.
REPLAY_MARGIN = 600.0


def lease_of(call_timeout: float) -> float:
    """How long a call of at most ``call_timeout`` seconds holds its slot of the budget:
    Meisa may count it that much later than it left, so 5 s more."""
    return call_timeout + 5.0


@dataclass(frozen=True)
class Decision:
    """What to do after a call: ``"done"``, ``"retry"`` (in ``delay`` seconds), ``"recover"``
    (an event answered 404: upsert its contact, then again) or ``"fail"``."""

    action: Action
    delay: float = 0.0
    #: How long no call on the key may start (a 429 about the key's budget).
    pause: float = 0.0
    #: No answer or a 5xx: one more failure in a row.
    outage: bool = False
    #: Meisa answered otherwise: the failures in a row are over.
    answered: bool = True
    #: A 429 of the send guardrail: only this recipient waits.
    recipient: bool = False
    #: Meisa does not know the event's contact (what it was told of it before is lost).
    unknown_contact: bool = False


def decide(
    kind: str,
    error: BaseException | None,
    *,
    attempts: int,
    elapsed: float,
    policy: RetryPolicy,
    can_recover: bool = False,
    made: bool = True,
) -> Decision:
    """What a call's outcome (``error``, or ``None``; not ``made``: no answer, no failure)
    means after ``attempts`` in ``elapsed`` s; ``can_recover``: a 404 event may upsert. Pure."""
    if error is None:
        return Decision("done")
    retryable = isinstance(error, APIConnectionError) and error.retryable
    outage = made and (isinstance(error, ServerError) or retryable)
    answered = made and isinstance(error, APIError) and not isinstance(error, ServerError)
    if isinstance(error, NotFoundError) and kind == "track":
        return Decision("recover" if can_recover else "fail", unknown_contact=True)
    if isinstance(error, RateLimitError) and kind == "send" and error.about_recipient:
        # About one recipient: that recipient's sends wait as long as Meisa asks (capped
        # only by the deadline); the key and everyone else carry on.
        wait = error.retry_after if error.retry_after is not None else policy.backoff(attempts)
        if policy.deadline is not None and elapsed + wait > policy.deadline:
            return Decision("fail", answered=answered, recipient=True)
        return Decision("retry", delay=wait, answered=answered, recipient=True)
    delay = policy.delay_for(attempts, error, elapsed)
    pause = 0.0
    if isinstance(error, RateLimitError):
        # About the key (any other code, or none: the safe side): every call waits.
        wanted = error.retry_after if error.retry_after is not None else (delay or 1.0)
        pause = min(wanted, policy.max_retry_after)
    if delay is None:
        return Decision("fail", pause=pause, outage=outage, answered=answered)
    return Decision(
        "retry", delay=max(delay, pause), pause=pause, outage=outage, answered=answered
    )


@dataclass(frozen=True)
class Outcome:
    """A decision applied to an operation: its next ``step`` (see :data:`Step`), and the
    upsert payload Meisa now has (``accepted``), to remember."""

    decision: Decision
    step: Step
    accepted: Mapping[str, Any] | None = None


def call_for(operation: Operation, recovering: bool) -> Operation:
    """The call to make for ``operation``: while ``recovering``, the upsert of its contact."""
    if recovering and operation.contact:
        return Operation("upsert", operation.contact, id=operation.id)
    return operation


def too_late(
    operation: Operation, first_attempt: float | None, now: float
) -> DeliveryError | None:
    """The error that fails a send retried so long after its ``first_attempt`` that Meisa
    may have forgotten its idempotency key (a call could send it twice); else ``None``."""
    if operation.kind != "send" or first_attempt is None:
        return None
    if now - first_attempt <= IDEMPOTENCY_WINDOW - REPLAY_MARGIN:
        return None
    return DeliveryError(
        f"{operation.describe()} was not retried: Meisa's idempotency hour is over"
    )


def settle(
    operation: Operation,
    error: BaseException | None,
    *,
    recovering: bool,
    recovered: bool,
    elapsed: float,
    policy: RetryPolicy,
    made: bool = True,
) -> Outcome:
    """What the outcome of the call :func:`call_for` made for ``operation`` (or not
    ``made``) means for it; ``recovered``: the event upserted its contact once already."""
    call = call_for(operation, recovering)
    decision = decide(
        call.kind,
        error,
        attempts=operation.attempts,
        elapsed=elapsed,
        policy=policy,
        can_recover=bool(operation.contact) and not recovering and not recovered,
        made=made,
    )
    if decision.action == "done":
        accepted = call.payload if call.kind == "upsert" else None
        return Outcome(decision, "event_again" if recovering else "delivered", accepted)
    steps: dict[Action, Step] = {"retry": "retry", "recover": "upsert_contact", "fail": "failed"}
    return Outcome(decision, steps[decision.action])


def pause_for(
    decision: Decision, failures: int, policy: RetryPolicy, logger: logging.Logger
) -> float:
    """How long no call on the key may start after ``decision`` (``failures`` in a row with
    it): its 429 pause, or once Meisa looks down the backoff's ceiling (not a draw)."""
    pause = decision.pause
    if decision.outage and failures >= OUTAGE_THRESHOLD:
        ceiling = policy.base_delay * 2.0 ** min(failures - 1, 64)
        pause = max(pause, min(policy.max_delay, ceiling), OUTAGE_MIN_PAUSE)
        logger.info(
            "flask-meisa: %d failed calls in a row; pausing delivery for %.2f s", failures, pause
        )
    return pause


def _summary(error: BaseException) -> str:
    if isinstance(error, APIError):
        code = f" [{error.code}]" if error.code else ""
        return f"HTTP {error.status}{code}{f' ({error.hint})' if error.hint else ''}"
    if isinstance(error, APIConnectionError):
        return f"{type(error).__name__} ({error.reason})"
    if isinstance(error, ValidationError):
        return f"ValidationError on {error.field}"
    return type(error).__name__


def log_decision(
    logger: logging.Logger,
    decision: Decision,
    what: str,
    error: BaseException | None,
    attempts: int,
) -> None:
    """The one log line of a decision (``what`` is a log-safe description)."""
    if decision.pause:
        logger.warning(
            "flask-meisa: Meisa answered 429 for the key; pausing delivery for %.1f s",
            decision.pause,
        )
    if error is None:  # then the decision is "done" (see decide)
        return
    summary = _summary(error)
    if decision.action == "recover":
        logger.info("flask-meisa: %s answered 404; upserting its contact, then again", what)
    elif decision.action == "retry":
        logger.info(
            "flask-meisa: %s: %s on attempt %d; retrying in %.2f s%s",
            what,
            summary,
            attempts,
            decision.delay,
            " (this recipient only)" if decision.recipient else "",
        )
    else:
        logger.warning("flask-meisa: %s failed after %d attempt(s): %s", what, attempts, summary)
