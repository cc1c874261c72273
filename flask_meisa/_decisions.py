"""What the outcome of one call means for its operation: the one place every engine asks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from typing import Literal

from .errors import APIConnectionError
from .errors import APIError
from .errors import NotFoundError
from .errors import RateLimitError
from .errors import ServerError
from .errors import ValidationError
from .operations import Operation
from .retry import RetryPolicy

__all__ = [
    "OUTAGE_THRESHOLD",
    "Decision",
    "Outcome",
    "call_for",
    "decide",
    "error_summary",
    "log_decision",
    "pause_for",
    "settle",
]

Action = Literal["done", "retry", "recover", "fail"]
Step = Literal["delivered", "failed", "retry", "upsert_contact", "event_again"]

#: Failures in a row (no answer, or 5xx) after which Meisa is treated as down: delivery
#: pauses with a growing backoff, then probes with one call at a time.
OUTAGE_THRESHOLD = 3

#: The ``code`` of a 429 from Meisa's per-recipient send guardrail.
SEND_GUARDRAIL = "send_guardrail"


@dataclass(frozen=True)
class Decision:
    """What to do after a call: ``"done"`` (Meisa took it), ``"retry"`` (in ``delay``
    seconds), ``"recover"`` (an event answered 404: upsert its contact, then track it
    again) or ``"fail"`` (refused for good, or out of retries)."""

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
) -> Decision:
    """Decide what the outcome of a call (``error``: what it raised, or ``None``) means,
    after ``attempts`` attempts over ``elapsed`` seconds; ``can_recover``: an event answered
    404 may upsert its contact and come again. Pure: no I/O, no clock."""
    if error is None:
        return Decision("done")
    outage = isinstance(error, ServerError) or (
        isinstance(error, APIConnectionError) and error.retryable
    )
    answered = isinstance(error, APIError) and not isinstance(error, ServerError)
    if isinstance(error, NotFoundError) and kind == "track":
        if can_recover:
            return Decision("recover", unknown_contact=True)
        return Decision("fail", unknown_contact=True)
    if isinstance(error, RateLimitError) and kind == "send" and error.code == SEND_GUARDRAIL:
        # About one recipient: that recipient's sends wait as long as Meisa asks (capped
        # only by the deadline); the key and everyone else carry on.
        wait = error.retry_after if error.retry_after is not None else policy.backoff(attempts)
        if policy.deadline is not None and elapsed + wait > policy.deadline:
            return Decision("fail", recipient=True)
        return Decision("retry", delay=wait, recipient=True)
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
    """A decision applied to an operation: its next ``step`` (``"delivered"``,
    ``"failed"``, ``"retry"`` in ``decision.delay`` seconds, ``"upsert_contact"`` before
    the event goes again, or ``"event_again"`` at once, its contact upserted), and the
    upsert payload Meisa now has (``accepted``), to remember."""

    decision: Decision
    step: Step
    accepted: Mapping[str, Any] | None = None


def call_for(operation: Operation, recovering: bool) -> Operation:
    """The call to make for ``operation``: while ``recovering`` (its event answered 404),
    the upsert of its contact."""
    if recovering and operation.contact:
        return Operation("upsert", operation.contact, id=operation.id)
    return operation


def settle(
    operation: Operation,
    error: BaseException | None,
    *,
    recovering: bool,
    recovered: bool,
    elapsed: float,
    policy: RetryPolicy,
) -> Outcome:
    """What the outcome of the call :func:`call_for` made for ``operation`` (its attempt
    number ``operation.attempts``) means for it; ``recovered``: the event upserted its
    contact once already (an event is recovered once)."""
    call = call_for(operation, recovering)
    decision = decide(
        call.kind,
        error,
        attempts=operation.attempts,
        elapsed=elapsed,
        policy=policy,
        can_recover=bool(operation.contact) and not recovering and not recovered,
    )
    if decision.action == "done":
        accepted = call.payload if call.kind == "upsert" else None
        return Outcome(decision, "event_again" if recovering else "delivered", accepted)
    steps: dict[Action, Step] = {"retry": "retry", "recover": "upsert_contact", "fail": "failed"}
    return Outcome(decision, steps[decision.action])


def pause_for(
    decision: Decision, failures: int, policy: RetryPolicy, logger: logging.Logger
) -> float:
    """How long no call on the key may start after ``decision``, ``failures`` failures in
    a row counted with it: its 429 pause, and once Meisa looks down
    (:data:`OUTAGE_THRESHOLD`) the backoff's ceiling after that many failures (not a draw:
    one pause shared by every delivery thread or worker)."""
    pause = decision.pause
    if decision.outage and failures >= OUTAGE_THRESHOLD:
        ceiling = policy.base_delay * 2.0 ** min(failures - 1, 64)
        pause = max(pause, min(policy.max_delay, ceiling))
        logger.info(
            "flask-meisa: %d failed calls in a row; pausing delivery for %.2f s", failures, pause
        )
    return pause


def error_summary(error: BaseException) -> str:
    """A log-safe account of an error: ``"HTTP 400 [invalid]"`` (a 403 with the scope the
    call needs), ``"APITimeoutError (no answer within 10 s)"``, ``"ValidationError on
    email"``."""
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
    if error is None or decision.action == "done":
        return
    summary = error_summary(error)
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
