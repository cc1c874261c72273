"""A backfill: every user of ``@meisa.users_to_sync`` upserted once in the lowest lane, a
chunk at a time, resumable from the position kept with each chunk. The upserts and the
run go to the engine's :class:`Target` (the store, or Redis)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any

from ..errors import MeisaError
from ..operations import LANE_ROUTINE
from ..operations import Operation
from ..operations import identities
from . import known
from .budget import allowed
from .known import unchanged

#: Users read, mapped and stored together (one transaction).
CHUNK = 200
#: Backfill rows waiting in the store before reading more users, at most; and no more
#: than the budget sends in :data:`BACKLOG_FOR` s (1,000 are an hour at the default budget).
HIGH_WATER = 1_000
BACKLOG_FOR = 300.0
#: Mapping failures kept for ``sync-users --failures`` (all are counted).
KEEP_FAILURES = 1_000
#: How often a run notes in its store that its process still runs (seconds).
ALIVE_EVERY = 30.0
_PIDS = "/proc/self/ns/pid"  # a container's pids are its own
#: This host (and its pids), as a run notes its process's: one gone here is known gone.
HOST = socket.gethostname() + (os.readlink(_PIDS) if os.path.exists(_PIDS) else "")


@dataclass
class Run:
    """A backfill's state, kept in the store (``flask meisa status`` shows it)."""

    started_at: float
    state: str = "running"  # running, done
    position: int = 0  # users read from the start of the list
    total: int | None = None
    queued: int = 0
    skipped: int = 0  # Meisa already had the user's state
    failed: int = 0  # users that could not be mapped
    max_share: float = 1.0
    refused_before: int = 0  # backfill upserts refused before this run (not its failures)
    last: list[Any] | None = None  # the last user mapped: [position, *names], checked again
    alive_at: float | None = None  # when its process last noted it runs (None: stopped)
    owner: str | None = None  # the command that runs it (one taken over stops)
    process: list[Any] | None = None  # [HOST, pid] of the process that runs it


def alive(run: dict[str, Any], now: float) -> bool:
    """Whether a process runs the kept ``run``, unfinished: not when it was interrupted, nor
    once its process is gone (killed) on this host, or elsewhere has not noted it runs for
    three :data:`ALIVE_EVERY`."""
    at, (host, pid) = run.get("alive_at"), run.get("process") or (None, 0)
    if host == HOST:
        with contextlib.suppress(PermissionError):  # (another user's process runs)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
    return run.get("state") == "running" and at is not None and now - at <= 3 * ALIVE_EVERY


class AlreadyRunning(MeisaError):
    """Another process runs the backfill (:func:`alive`): a second one would clear its
    notes and move its position too."""

    def __init__(self, alive_at: float | None, now: float) -> None:
        alive_at = alive_at or now  # by the clock the note was dated by
        noted = time.strftime("%H:%M:%S UTC", time.gmtime(alive_at))
        super().__init__(
            f"another 'flask meisa sync-users' runs the backfill (its process last noted it"
            f" runs at {noted}, {max(now - alive_at, 0):.0f} s ago): wait for it to"
            " finish, or stop it (Ctrl+C), then run the command again to go on. A run whose"
            " process was killed is taken over at once on its host; from another, once it"
            f" has not noted it runs for {3 * ALIVE_EVERY:.0f} s."
        )


class KeyRefused(Exception):
    """Meisa refused a backfill upsert for the key (401: revoked or invalid; 403: without
    ``contacts:write``) :data:`~.dead.REFUSALS_TO_STOP` times in a row: the run stopped,
    its upserts not sent went (the next run reads their users again); ``user``: the
    external_id of the user whose upsert it refused, when known."""

    def __init__(
        self, status: int, code: str | None, message: str, user: str | None = None
    ) -> None:
        super().__init__(f"HTTP {status}{f' [{code}]' if code else ''} {message}")
        self.status, self.user = status, user


class UsersFailed(MeisaError):
    """The user source (``@meisa.users_to_sync``, or its ``count``: ``what``) raised
    ``error`` reading user ``number``: the run stopped there, what it stored kept; or, at
    ``number`` 0, before the run started: nothing done."""

    def __init__(self, number: int, error: Exception, what: str = "") -> None:
        why = next(iter(str(error).splitlines()), "")  # one line (a query's error has more)
        where = f"reading user #{number:,}: the run stopped there, what it stored is kept"
        super().__init__(
            f"{what}@meisa.users_to_sync raised {type(error).__name__}"
            f"{f' ({why})' if why else ''} "
            + (where if number else "before the run started: nothing was done")
            + ". Fix it, then run 'flask meisa sync-users' again"
            + (" to go on from where it stopped." if number else ".")
        )


def before_run(source: Callable[[], Any] | None, what: str = "") -> Any:
    """What ``source`` (the user query, or its count: ``what``) returns (``None``: none); an
    error it raises (the database down, a wrong table name) is one line, as one midway is."""
    try:
        return None if source is None else source()
    except Exception as error:
        raise UsersFailed(0, error, what) from error


class UsersChanged(Exception):
    """The users before the last run's position are not those it read (deleted, or new)."""


@dataclass
class Progress:
    """What a run has done so far, for the progress line."""

    run: Run
    waiting: int  # backfill upserts stored, not yet answered
    refused: int  # backfill upserts Meisa refused (dead letters)
    rate: float  # users finished per hour since this command started (0: not yet known)
    elapsed: float
    left: int | None = None

    @property
    def done(self) -> int:
        """Users finished: upserted, unchanged or failed (not those an earlier run left)."""
        return max(self.run.position - self.waiting, 0)


def estimate_per_hour(spec_windows: Iterable[Any], share: float) -> float | None:
    """The calls an hour a backfill can make with ``share`` of the budget (``None``: none)."""
    rates = [allowed(window, LANE_ROUTINE) * 3600.0 / window.period for window in spec_windows]
    return min(rates) * share if rates else None


class Target:
    """Where a backfill's upserts go and its run is kept, as JSON values: ``_get(kept, name,
    default)``, ``_put(kept, name, value)`` on what ``_kept(write=False)`` opens; ``_queue(kept,
    run, operations, now)`` queues a chunk; ``backlog()``: upserts waiting, and refused."""

    _get: Callable[..., Any]
    _put: Callable[..., None]
    resync_after: float
    _kept: Callable[..., contextlib.AbstractContextManager[Any]]
    _queue: Callable[[Any, Run, list[Operation], float], None]
    backlog: Callable[[], tuple[int, int]]
    #: The clock that dates what Meisa accepted, and so the users' read time.
    clock: Callable[[], float] = staticmethod(time.time)

    def load(self) -> Run | None:
        """The last run, or ``None``."""
        with self._kept() as kept:
            data = self._get(kept, "backfill")
        return None if data is None else Run(**data)

    def save(self, run: Run, *, fresh: bool = False, start: bool = False) -> None:
        """Keep ``run``; ``fresh``: it starts over, so forget earlier runs' failures;
        ``start``: this process runs it from now, unless another does (:class:`AlreadyRunning`)."""
        with self._kept(write=True) as kept:
            self._check(kept, run, start)
            if fresh:
                self._put(kept, "backfill_failures", None)
                self._put(kept, "backfill_refused", None)
            self._put(kept, "backfill", asdict(run))

    def _check(self, kept: Any, run: Run, start: bool) -> None:
        other = self._get(kept, "backfill") or {}
        if start:
            ours = not alive(other, self.clock()) or self._get(kept, "backfill_refused")
        else:  # another took it over, this one noting nothing for 90 s (reading a chunk)
            ours = other.get("owner") in (None, run.owner)
        if not ours:
            raise AlreadyRunning(other.get("alive_at"), self.clock())

    def goes_on_from(self) -> int:
        """The users the next run (not ``--restart``) counts done as it starts: the last
        run's position less its upserts still waiting, unless it finished, or stopped at a
        refused key (its upserts not sent went: it reads the users again)."""
        run = self.load()
        done = 0 if run is None or run.state == "done" or self.refused() else run.position
        return max(done - self.backlog()[0], 0)

    def refused(self) -> list[Any] | None:
        """``[status, code, message, user]`` of the backfill upsert Meisa refused for the key
        (since the last run started), or ``None``."""
        with self._kept() as kept:
            return self._get(kept, "backfill_refused")  # type: ignore[no-any-return]

    def add(
        self, run: Run, operations: list[Operation], failed: list[dict[str, Any]], read_at: float
    ) -> None:
        """Queue ``operations`` (of users read at ``read_at``) in the backfill lane but for
        what Meisa already has or got since (:func:`~.known.fresh_part`), each counted in
        ``run.queued`` or ``run.skipped``; keep ``failed`` for ``--failures``, and keep
        ``run`` with them."""
        with self._kept(write=True) as kept:
            if (refused := self._get(kept, "backfill_refused")) is not None:
                raise KeyRefused(*refused)  # as the run read the chunk: none of it is sent
            self._check(kept, run, start=False)
            self._queue(kept, run, operations, read_at)
            if failed:
                failures = self._get(kept, "backfill_failures", [])
                self._put(kept, "backfill_failures", (failures + failed)[:KEEP_FAILURES])
            self._put(kept, "backfill", asdict(run))

    def go_back(self, run: Run, to: int) -> None:
        """``run`` goes on from position ``to`` (the users read past it, all of which failed,
        are read again): their failures are no longer counted nor kept."""
        with self._kept(write=True) as kept:
            failures = self._get(kept, "backfill_failures", [])
            left = [failure for failure in failures if failure["position"] < to]
            run.failed = max(run.failed - (run.position - to), 0)
            run.position = to
            self._put(kept, "backfill_failures", left or None)
            self._put(kept, "backfill", asdict(run))

    def _unchanged(self, operation: Operation, had: known.Lookup, run: Run, now: float) -> bool:
        # Nor what Meisa accepted since the run started, however long ago: a run takes days
        # at the default budget, and going through the users again sends none twice.
        return unchanged(operation, had, now, max(self.resync_after, now - run.started_at))

    def failures(self) -> list[dict[str, Any]]:
        """Users the last runs could not map (at most :data:`KEEP_FAILURES`)."""
        with self._kept() as kept:
            return list(self._get(kept, "backfill_failures", []))


def run(
    target: Target,
    users: Iterable[Any],
    to_operation: Callable[[Any], Operation],
    *,
    total: int | None,
    max_share: float = 1.0,
    restart: bool = False,
    again: bool = False,
    report: Callable[[Progress], None] = lambda progress: None,
    every: float = 1.0,
    per_hour: float | None = None,
) -> Progress:
    """Queue an upsert of each user (from where the last unfinished run stopped), never
    more waiting at once than :data:`HIGH_WATER`, nor than ``per_hour`` (the run's calls an
    hour, ``None``: no budget) sends in :data:`BACKLOG_FOR`; wait until they are answered.

    :param to_operation: maps a user to its upsert (raises for a user that cannot be
        mapped: counted, kept for ``--failures``, and skipped).
    :param again: go through the users from the first, in the run that stopped (they
        changed since): what Meisa accepted since it started costs no call.
    :param report: called about every ``every`` seconds, and at the end (or Ctrl+C).
    """
    current = target.load()
    # A refused key stopped it: its waiting upserts went, a run of its own reads them again.
    again = again or (not restart and target.refused() is not None)
    fresh = restart or again or current is None or current.state == "done"
    began = target.clock()
    if fresh or current is None:
        since = current.started_at if again and current is not None else began
        current = Run(started_at=since, refused_before=target.backlog()[1])
    current.total, current.max_share, current.alive_at = total, max_share, began
    current.owner, current.process = uuid.uuid4().hex, [HOST, os.getpid()]
    target.save(current, fresh=fresh, start=True)
    started, start_done, last_report = time.monotonic(), current.position, 0.0

    def tick(force: bool = False) -> Progress:
        nonlocal last_report
        if not force and (refused_key := target.refused()) is not None:
            raise KeyRefused(*refused_key)
        waiting, refused = target.backlog()
        refused = max(refused - current.refused_before, 0)
        elapsed = time.monotonic() - started
        done_now = current.position - waiting - start_done
        rate = done_now * 3600.0 / elapsed if elapsed > 1 and done_now > 0 else 0.0
        if (current.total or 0) < current.position:  # a count short of the users: unknown
            current.total = None
        left = None if current.total is None else current.total - current.position
        progress = Progress(current, waiting, refused, rate, elapsed, left)
        if (now := target.clock()) - (current.alive_at or 0.0) >= ALIVE_EVERY:
            current.alive_at = now  # by the clock another run's check reads (Redis's)
            target.save(current)
        if force or time.monotonic() - last_report >= every:
            last_report = time.monotonic()
            report(progress)
        return progress

    try:
        rest = _from_position(_read(users), current, to_operation, target)
        # Done as it starts: the users read (moved back if failed ones are read again) less
        # the upserts an earlier run left waiting, answered from now on.
        start_done = current.position - target.backlog()[0]
        room = int(min(HIGH_WATER, max((per_hour or float("inf")) * BACKLOG_FOR / 3600, 1)))
        while True:
            # Read only once there is room: users read hours before would be sent as they were.
            while tick().waiting > room:
                time.sleep(min(every, 0.2))
            # Users are read as of this command's start: a query may read a page ahead.
            if not (chunk := list(itertools.islice(rest, min(CHUNK, room)))):
                break
            operations, failed = [], []
            for offset, user in enumerate(chunk):
                try:
                    operations.append(to_operation(user))
                except Exception as error:  # as a login's sync: one user never stops the rest
                    failed.append(_failure(user, current.position + offset, error))
                else:
                    current.last = [current.position + offset, *_names(operations[-1])]
            current.failed += len(failed)
            current.position += len(chunk)
            target.add(current, operations, failed, began)
        while tick().waiting:
            time.sleep(min(every, 0.2))
    except BaseException as stop:
        # The summary so far, before the caller says how to go on (not after a refused key:
        # it would count the users whose upserts went as done).
        try:
            if isinstance(stop, KeyboardInterrupt):
                with contextlib.suppress(OSError):  # (its reader gone with it: 2>&1 | head)
                    tick(force=True)
            # No process runs it (the next run starts), as kept: not an interrupted write's.
            with contextlib.suppress(AlreadyRunning):  # nor when another took it over
                kept = target.load() or current
                target.save(dataclasses.replace(kept, owner=current.owner, alive_at=None))
        except KeyboardInterrupt:
            if not isinstance(stop, KeyRefused):  # the key's error, kept, says how to go on
                raise
        raise
    current.state, current.total = "done", current.position  # the users, whatever counted
    target.save(current)
    return tick(force=True)


def _from_position(
    users: Iterator[Any], run: Run, to_operation: Callable[[Any], Operation], target: Target
) -> Iterator[Any]:
    """``users`` from the first (without ``run.last``), or past the last user the run
    mapped once it is found where it was (:class:`UsersChanged` if not); the users read
    after that one, all of which failed, are read again."""
    past_last = 0  # no user mapped yet
    if run.last is not None:
        at, *names = run.last
        there = next(itertools.islice(users, at, None), None)
        try:
            moved = there is None or _names(to_operation(there)) != names
        except Exception:
            moved = True
        if moved:
            raise UsersChanged(f"user {'/'.join(filter(None, names))} is no longer #{at + 1}")
        past_last = at + 1
    if run.position > past_last:
        # The users read past it all failed: read them again, as the failed ones may have
        # been deleted since (going on from the position would skip as many others).
        target.go_back(run, past_last)
    return users


def _read(users: Iterable[Any]) -> Iterator[Any]:
    """``users``, an error of their source raised as :class:`UsersFailed`."""
    number = 0
    try:
        for number, user in enumerate(users, start=1):  # noqa: B007 (read in the except)
            yield user
    except Exception as error:
        raise UsersFailed(number + 1, error) from error


def _names(operation: Operation) -> list[str | None]:
    return list(identities(operation.payload))


def _failure(user: Any, position: int, error: Exception) -> dict[str, Any]:
    who = None
    with contextlib.suppress(Exception):
        who = str(user.get_id())
    reason = str(error) if isinstance(error, MeisaError) else f"{type(error).__name__}: {error}"
    return {"position": position, "user": who, "reason": reason}
