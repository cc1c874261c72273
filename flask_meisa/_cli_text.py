"""What ``flask meisa`` prints about delivery: a backfill's plan, progress and failures, the
status report, dead letters, and the times in them."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import click

from ._engine import backfill
from ._engine import dead
from .errors import _CONTROL

if TYPE_CHECKING:
    from ._engine.backfill import Progress
    from ._engine.base import DeliveryStatus
    from ._engine.dead import DeadLetter


def plain(*texts: object) -> str:
    """Texts of Meisa's answer as printed, tab-separated: a control character in them (a
    terminal's escape sequence starts with one) as a space."""
    return "\t".join(_CONTROL.sub(" ", str(text)) for text in texts)


_ROW = "{:<14}  {:<8}  {:<9}  {:<8}  {:<8}"


def plan(total: int | None, per_hour: float | None, done: int = 0) -> str:
    """A backfill's plan: how many users (``done`` of them by the run it goes on with), how
    fast, and how long what is left takes."""
    users = "an unknown number of users" if total is None else f"{total:,} users"
    left = None if total is None else max(total - done, 0)
    if done:
        users += f", {done:,} done" + ("" if left is None else f", {left:,} left")
    if per_hour is None:
        return f"{users}, no budget set: as fast as Meisa answers"
    if left is None:
        return f"{users} at ~{per_hour:,.0f}/hour"
    return f"{users} at ~{per_hour:,.0f}/hour: {_duration(left * 3600 / per_hour)}"


def progress_line(progress: Progress) -> str:
    """A backfill's progress: users done, the rate, what is left and how long it takes."""
    run = progress.run
    total = f" of {run.total:,}" if run.total is not None else ""
    rate = f"{progress.rate:,.0f}/hour" if progress.rate else "rate not yet known"
    eta = ""
    if progress.rate and progress.left is not None and progress.left + progress.waiting:
        eta = f", {_duration((progress.left + progress.waiting) * 3600 / progress.rate)} left"
    return (
        f"{progress.done:,}{total} users done ({rate}), {run.skipped:,} unchanged, "
        f"{run.failed + progress.refused:,} failed, {progress.waiting:,} waiting{eta}"
    )


def report(progress: Progress) -> None:
    """Print ``progress`` on stderr. One that takes no line (``2</dev/null``) is as
    ``2>/dev/null``: the run goes on; a reader that went (a broken pipe) stops it, as a
    closed terminal does."""
    try:
        click.echo(progress_line(progress), err=True)
    except OSError as error:
        if error.errno != errno.EBADF:
            raise


def users_changed(changed: Exception) -> str:
    """Why ``sync-users`` goes through the users again from the first."""
    return (
        f"the users changed since the last run stopped ({changed}): going through"
        " them from the first (those Meisa already has cost no call)"
    )


def store_failed(error: BaseException) -> str:
    """Why ``sync-users`` stopped at a store that failed, and how to go on."""
    return (
        f"the delivery store failed ({error}); what was stored is kept: once it works"
        " again, run the command again to go on from where it stopped"
    )


def not_flushed(status: DeliveryStatus, timeout: float, locked: bool) -> str:
    """What ``flush`` left after ``timeout``, who delivers it (this process stopped), and
    whether another process holds the store's write lock (``locked``)."""
    pid = status.delivering_pid
    who = f"pid {pid}" if pid not in (None, os.getpid()) else "no other process"
    why = ": another process is writing to the store (it holds its write lock)"
    left = f"{status.pending} operations still pending after {timeout:g}s ({who} delivers)"
    return left + (why if locked else "")


def status_report(status: DeliveryStatus, store_path: str | None, now: float) -> str:
    """``flask meisa status``: store, delivering process, lanes, counters, backfill (``now``:
    by the clock its run notes it runs by)."""
    where = "memory of this process"
    if status.durable:
        where = f"{store_path} (every process of this host)"
    elif status.engine == "celery":
        where = "Redis (every worker)"
    lines = [f"engine: {status.engine}, store: {where}"]
    if status.engine == "thread":
        pid = status.delivering_pid
        lines.append(f"delivering process: {f'pid {pid}' if pid else 'none running'}")
    lines.append(_ROW.format("lane", "waiting", "oldest", "p50", "p99"))
    for lane, depth in status.queued.items():
        ages = (status.oldest_wait.get(lane), *status.latency.get(lane, (None, None)))
        lines.append(_ROW.format(lane, depth, *map(_age, ages)))
    lines.append(
        f"in flight: {status.in_flight}  waiting to retry: {status.retry_waiting}  "
        f"dead letters: {status.dead_letters}"
    )
    if status.budget_left is not None:
        left = ", ".join(f"{window}: {n}" for window, n in status.budget_left.items())
        lines.append(f"budget left: {left}")
    if status.paused_for:
        lines.append(f"paused for: {_age(status.paused_for)}")
    lines.append(
        f"delivered: {status.delivered}  unchanged (no call needed): {status.unchanged}  "
        f"failed: {status.failed}  dropped: {status.dropped}"
    )
    if run := status.backfill:
        state = run.get("state", "running")
        if state == "running" and not backfill.alive(run, now):
            state = "stopped (run 'flask meisa sync-users' again to go on)"
        if refused := run.get("refused"):
            state = _stopped_by(refused)
        lines.append(
            f"backfill: {state}, {run.get('position', 0)} of"
            f" {'?' if run.get('total') is None else run['total']} users read,"
            f" {run.get('skipped', 0)} unchanged,"
            f" {run.get('failed', 0) + run.get('refused_upserts', 0)} failed"
            f" (started {when(float(run.get('started_at', 0)))})"
        )
    return "\n".join(lines)


def refusal(letter: DeadLetter) -> str:
    status = f"HTTP {letter.status}" if letter.status is not None else ""
    return " ".join(filter(None, (status, letter.code and f"[{letter.code}]", letter.message)))


def letter_line(letter: DeadLetter) -> str:
    """A dead letter in ``dead-letters list``: its ID, what, why, attempts, when."""
    merged = f", {letter.merged} merged" if letter.merged > 1 else ""
    return (
        f"{letter.seq}\t{letter.operation.describe()}\t{refusal(letter)}\t"
        f"{letter.operation.attempts} attempt(s){merged}\t{when(letter.failed_at)}"
    )


def kept(seqs: list[int]) -> str:
    """What ``dead-letters retry`` says of the upserts it kept, outdated."""
    return (
        f"{len(seqs)} upsert(s) kept ({first_ids(sorted(seqs))}): their fields "
        "were set again after they failed, and retrying would put older values back "
        "(--force retries them)"
    )


def key_refused(refused: backfill.KeyRefused, status: DeliveryStatus) -> str:
    """Why a backfill stopped at Meisa's refusal of the key, and how to go on: the key of
    the Celery workers, or of the process delivering from the store when not this one."""
    whose, fix = "", "Fix the key ('flask meisa ping' checks it)"
    if status.engine == "celery":
        whose, fix = " of the Celery workers (they call Meisa)", "Fix it there, restart them"
    elif (other := status.delivering_pid) is not None and other != os.getpid():
        whose = f" of the process delivering from the store (pid {other}), not this one's,"
        fix = "Fix that process's key and restart it"
    return (
        f"Meisa refused a backfill upsert {dead.REFUSALS_TO_STOP} times in a row ({refused}):"
        f" the key (MEISA_API_KEY){whose}"
        f" {_lacks(refused)}, so it would refuse every user. The run stopped{_at(refused)};"
        f" nothing more was sent, and its upserts not sent are no dead letters. {fix}, then"
        " run 'flask meisa sync-users' again: it goes through the users from the first, and"
        " those Meisa already has cost no call."
    )


def stopped_run(status: DeliveryStatus) -> str:
    """After ``dead-letters retry``: the backfill's upserts Meisa refused for the key went
    (its run, stopped, reads their users again), or nothing."""
    if not (status.backfill or {}).get("refused"):
        return ""
    return (
        " (the backfill stopped at an upsert Meisa refused for the key: its upserts retried"
        " are not sent, nor dead letters, and the next 'flask meisa sync-users' reads their"
        " users again; see 'flask meisa status')"
    )


def _stopped_by(refused: list[Any]) -> str:
    key = backfill.KeyRefused(*refused)
    return (
        f"stopped{_at(key)}: Meisa refused its upserts ({key}), the key {_lacks(key)}: fix"
        " it ('flask meisa ping' checks it), then run 'flask meisa sync-users' again"
    )


def _at(refused: backfill.KeyRefused) -> str:
    # That user's upsert is no failure, nor a dead letter: the next run reads it again.
    user = refused.user
    return f" at user {user} (not synced, not failed: the next run reads it again)" if user else ""


def _lacks(refused: backfill.KeyRefused) -> str:
    return "has no contacts:write scope" if refused.status == 403 else "is revoked or invalid"


def set_aside(seqs: list[int]) -> str:
    """What ``dead-letters retry --all`` says of the work for another Meisa it left."""
    return (
        f"{len(seqs)} dead letter(s) released for another Meisa left ({first_ids(seqs)}): to send"
        " them to this one, retry them by ID (see 'flask meisa dead-letters list')"
    )


def first_ids(seqs: Sequence[object]) -> str:
    """The first few IDs of ``seqs``: all of them could fill a screen."""
    return ", ".join(map(str, seqs[:10])) + (", ..." if len(seqs) > 10 else "")


def letter_json(letter: DeadLetter) -> str:
    """A dead letter with its payload, as ``dead-letters show`` prints it."""
    record = {
        "id": letter.seq,
        "operation": letter.operation.to_dict(),
        "error": {"status": letter.status, "code": letter.code, "message": letter.message},
        "attempts": letter.operation.attempts,
        "failed_at": when(letter.failed_at),
    }
    return json.dumps(record, indent=2, sort_keys=True)


def failures(
    users: list[dict[str, Any]], letters: list[DeadLetter], refused: list[Any] | None = None
) -> str:
    """A backfill's failures: the users it could not map, those whose upserts Meisa refused
    (with the dead letter's ID, to retry it by), and first, when Meisa refused them for the
    key (``refused``), that the run stopped."""
    lines = [f"the run {_stopped_by(refused)}"] if refused else []
    lines += [
        f"user {failure['user'] or '#' + str(failure['position'])}: {failure['reason']}"
        for failure in users
    ]
    for letter in letters:  # named by external_id, else address
        external_id = letter.operation.payload.get("external_id")
        user = letter.operation.payload.get("email") if external_id in (None, "") else external_id
        lines.append(f"user {user}: {refusal(letter)} (dead letter {letter.seq})")
    return "\n".join(lines) or "no failures"


def when(timestamp: float) -> str:
    """A Unix time in UTC: ``2024-05-01 12:00:00Z``."""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: float) -> str:
    """A long time, roughly: "about 4 days 9 hours", "under a minute"."""
    days, minutes = divmod(int(seconds // 60), 1440)
    hours, minutes = divmod(minutes, 60)
    parts = [(days, "day"), (hours, "hour"), (minutes, "minute")]
    words = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n][:2]
    return f"about {' '.join(words)}" if words else "under a minute"


def _age(seconds: float | None) -> str:
    """A wait as the status table shows it: "0.3s", "4m 05s", "2h 05m", or "-"."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, whole_seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {whole_seconds:02d}s"
