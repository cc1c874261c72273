"""Test support for the delivery engine: a recording ``DeliveryHooks``, and the
scenarios the engine tests run in a separate interpreter (exit and fork).

Run as ``python -m tests.engine_support <scenario>`` with ``MEISA_TEST_URL`` and
``MEISA_TEST_KEY`` in the environment (the key never goes on a command line), and
``MEISA_TEST_STORE`` for a store file (default: memory):

- ``exit <n>``: submit ``n`` upserts and leave the interpreter without flushing;
- ``drain``: deliver what the store holds, then exit;
- ``fork <n_parent> <n_child>``: submit upserts, fork while they are still pending, let
  the child report what it sees at its start and submit its own, then both flush and exit;
- ``full-disk`` (with a store file): store an upsert of a state Meisa already has, fill
  the disk, let the engine deliver it (no call, and the store cannot take that), give the
  disk room again and say whether everything is over;
- ``full-disk-retry`` (with a store file; Meisa slow to answer, then 503): while an upsert
  is in flight, store a later upsert of its contact, fill the disk before the answer, give
  the disk room again and say what was counted delivered.

Each prints what its hooks saw as ``outcome <kind> <count>`` lines at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import resource
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from flask_meisa._engine import known
from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.host import HostLock
from flask_meisa._engine.store import SCHEMA_VERSION
from flask_meisa._engine.store import Store
from flask_meisa.client import MeisaClient
from flask_meisa.config import MeisaSettings
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy

_DEFAULTS = MeisaSettings.from_config({"MEISA_ENABLED": False})


#: Retries a test does not wait for; and retries a minute apart (a retry that waits).
FAST = RetryPolicy(max_attempts=None, base_delay=0.05, max_delay=0.2, deadline=30.0)
SLOW = RetryPolicy(base_delay=60.0, max_delay=60.0, deadline=None, random=lambda: 0.999)

#: The ``make_engine`` fixture: ``make_engine(emulator, hooks, **options)``.
MakeEngine = Callable[..., Delivery]


class RecordingHooks:
    """Records every outcome; lets a test wait for one without sleeping."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, Operation, Any]] = []
        self.skip: Callable[[Operation], str | None] = lambda op: None
        self.raise_in: set[str] = set()
        self._held: dict[str, tuple[threading.Event, threading.Event]] = {}
        self._changed = threading.Condition()

    def hold(self, kind: str) -> tuple[threading.Event, threading.Event]:
        """Make each ``kind`` hook wait (at most 5 s) until the second event is set; the
        first is set when one starts."""
        events = self._held[kind] = threading.Event(), threading.Event()
        return events

    def _record(self, kind: str, operation: Operation, detail: Any) -> None:
        if kind in self._held:
            entered, release = self._held[kind]
            entered.set()
            release.wait(5)
        with self._changed:
            self.outcomes.append((kind, operation, detail))
            self._changed.notify_all()
        if kind in self.raise_in:
            raise RuntimeError(f"the {kind} hook failed on purpose")

    def skip_reason(self, operation: Operation) -> str | None:
        if "skip_reason" in self.raise_in:
            raise RuntimeError("the skip_reason hook failed on purpose")
        return self.skip(operation)

    def skipped(self, operation: Operation, reason: str) -> None:
        self._record("skipped", operation, reason)

    def guard(self, operation: Operation) -> None:
        pass

    def learn(self, operation: Operation, error: BaseException) -> None:
        pass

    def delivered(self, operation: Operation, result: Any) -> None:
        self._record("delivered", operation, result)

    def failed(self, operation: Operation, error: BaseException) -> None:
        self._record("failed", operation, error)

    def dropped(self, operation: Operation, reason: str) -> None:
        self._record("dropped", operation, reason)

    def of(self, kind: str) -> list[Operation]:
        """The operations with outcome ``kind``, in the order they were reported."""
        with self._changed:
            return [op for k, op, _ in self.outcomes if k == kind]

    def detail(self, operation: Operation) -> Any:
        """What was reported with ``operation`` (result, error or reason)."""
        with self._changed:
            return next(d for _, op, d in self.outcomes if op is operation)

    def wait_for(self, kind: str, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` outcomes of ``kind`` were reported."""
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(1 for k, _, _ in self.outcomes if k == kind) >= count, timeout
            )


def upsert(n: int, *, tag: str = "t", **fields: Any) -> Operation:
    """An upsert of user ``n`` whose ``custom_fields`` carry ``tag`` and ``fields``."""
    return Operation(
        "upsert",
        {
            "email": f"user{n}@example.com",
            "external_id": f"{tag}-{n}",
            "custom_fields": {"tag": tag, **fields},
        },
    )


def make_engine(
    hooks: RecordingHooks,
    url: str,
    key: str,
    *,
    store: Store | None = None,
    retry: RetryPolicy | None = None,
    poll_interval: float = 0.1,
    **settings: Any,
) -> Delivery:
    """A background delivery engine on ``store`` (default: memory) calling ``url``, with
    the default settings but for ``settings`` (:class:`MeisaSettings` attributes; no
    budget unless ``rate_limit`` is given)."""
    settings.setdefault("rate_limit", None)
    return Delivery(
        store=store or Store(None),
        client_factory=lambda: MeisaClient(key, url, timeout=(0.5, 2.0)),
        hooks=hooks,
        retry=retry or RetryPolicy(max_attempts=10, base_delay=0.05, max_delay=0.2, deadline=30.0),
        # connect_timeout + timeout + 5 s: a lease of 10 s
        settings=replace(
            _DEFAULTS, base_url=url, api_key=key, connect_timeout=0.5, timeout=4.5, **settings
        ),
        poll_interval=poll_interval,
    )


def query(path: Path, sql: str, *params: Any) -> list[Any]:
    """Rows of ``sql`` read through a store of its own (another process's view)."""
    store = Store(path)
    try:
        with store.read() as db:
            return db.execute(sql, params).fetchall()
    finally:
        store.close()


def _engine(hooks: RecordingHooks, **options: Any) -> Delivery:
    path = os.environ.get("MEISA_TEST_STORE")
    engine = make_engine(
        hooks,
        os.environ["MEISA_TEST_URL"],
        os.environ["MEISA_TEST_KEY"],
        store=None if path is None else Store(path),
        **options,
    )
    atexit.register(engine.close)
    return engine


def say(line: str) -> None:
    """Print one line with a single write, so that lines of a parent and its forked
    child never interleave."""
    os.write(1, (line + "\n").encode())


def _print_outcomes(hooks: RecordingHooks, who: str) -> None:
    counts: dict[str, int] = {}
    for kind, _, detail in hooks.outcomes:
        name = f"{kind}:{detail}" if kind in ("dropped", "skipped") else kind
        counts[name] = counts.get(name, 0) + 1
    for name, count in sorted(counts.items()):
        say(f"{who} outcome {name} {count}")


def exit_scenario(count: int) -> None:
    hooks = RecordingHooks()
    # Registered before the first engine exists, so it runs after the engines' exit hook
    # (atexit runs the last registered first).
    atexit.register(_print_outcomes, hooks, "exit")
    engine = _engine(hooks, rate_limit=None, flush_timeout=float(os.environ["FLUSH_TIMEOUT"]))
    for n in range(count):
        engine.submit([upsert(n, tag="exit")])
    # Leave without flush() or close(): the exit hook must deliver or report the rest.


def drain_scenario() -> None:
    hooks = RecordingHooks()
    atexit.register(_print_outcomes, hooks, "drain")
    engine = _engine(hooks)
    say(f"drain flushed {engine.flush(30.0)}")


def _stored(engine: Delivery, count: int) -> None:
    """Wait until ``count`` operations handed over are stored (the writer thread stores
    them a moment later), at most ten seconds."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        status = engine.status()
        if status.pending + status.delivered >= count:
            return
        time.sleep(0.01)


def fork_scenario(parent_count: int, child_count: int) -> None:
    hooks = RecordingHooks()
    engine = _engine(hooks, rate_limit="2/second")
    for n in range(parent_count):
        engine.submit([upsert(n, tag="parent")])
    _stored(engine, parent_count)
    say(f"parent pending_at_fork {engine.status().pending}")
    # What the extension's fork hook does for its store: no transaction crosses the fork.
    engine.store.before_fork()
    pid = os.fork()
    if pid == 0:
        # The child reports only its own outcomes, not those the parent had before the
        # fork (the condition may have been held by a parent thread: make a new one).
        hooks.outcomes = []
        hooks._changed = threading.Condition()
        engine.after_fork()
        status = engine.status()
        say(f"child pending_at_start {status.pending} delivered {status.delivered}")
        for n in range(child_count):
            engine.submit([upsert(n, tag="child")])
        flushed = engine.flush(10.0)
        say(f"child flushed {flushed} delivers {engine.is_holder}")
        _print_outcomes(hooks, "child")
        engine.close()
        os._exit(0)
    engine.store.after_fork_in_parent()
    _, wait_status = os.waitpid(pid, 0)
    flushed = engine.flush(10.0)
    say(f"parent flushed {flushed} child_exit {os.waitstatus_to_exitcode(wait_status)}")
    _print_outcomes(hooks, "parent")
    engine.close()


class _Seen(logging.Handler):
    """Sets ``event`` when a message containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def full_disk(engine: Delivery) -> Iterator[threading.Event]:
    """No file of this process may grow (a full disk) until the block ends; yields an
    event set once the engine logs that its store failed."""
    failed = _Seen("delivery store failed")
    logging.getLogger("flask_meisa.engine").addHandler(failed)
    with engine.store.read() as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        yield failed.event
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)  # room again


def full_disk_scenario() -> None:
    hooks = RecordingHooks()
    engine = _engine(hooks, rate_limit=None)
    held = HostLock(f"{engine.store.path}.lock")
    assert held.try_acquire()  # the engine only writes, for now
    same = upsert(1)
    with engine.store.write() as db:
        known.remember(db, same.payload, time.time())  # Meisa has this state already
    engine.submit([same])
    _stored(engine, 1)
    with full_disk(engine) as failed:
        held.release()  # the engine delivers: no call is needed, and the store cannot take that
        say(f"full-disk store_failed {failed.wait(10)}")
    say(f"full-disk flushed {engine.flush(5)} pending {engine.status().pending}")
    _print_outcomes(hooks, "full-disk")


def full_disk_retry_scenario() -> None:
    hooks = RecordingHooks()
    engine = _engine(hooks, rate_limit=None)
    engine.submit([upsert(1, plan="a")])
    deadline = time.monotonic() + 10.0
    while engine._caller.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the call is made (Meisa answers in a moment)
    engine.submit([upsert(1, plan="b")])  # its contact's next state, while it is in flight
    _stored(engine, 2)
    with full_disk(engine) as failed:
        say(f"full-disk-retry store_failed {failed.wait(10)}")
        time.sleep(2.5)  # the answer (503: retry) waits for the store
    flushed = engine.flush(10)
    say(f"full-disk-retry flushed {flushed} delivered {engine.status().delivered}")
    _print_outcomes(hooks, "full-disk-retry")


_KEPT: list[Any] = []  # what must outlive the scenario's function, up to the exit hooks


def full_disk_exit_scenario(count: int) -> None:
    logging.basicConfig(format="%(message)s")  # full_disk's handler hides the last resort
    hooks = RecordingHooks()
    atexit.register(_print_outcomes, hooks, "full-disk-exit")  # runs after the engine's
    engine = _engine(hooks, rate_limit=None, flush_timeout=float(os.environ["FLUSH_TIMEOUT"]))
    stack = contextlib.ExitStack()
    _KEPT.append(stack)  # the disk stays full until the process exits
    failed = stack.enter_context(full_disk(engine))
    engine.submit([upsert(n, tag="full") for n in range(count)])
    say(f"full-disk-exit store_failed {failed.wait(10)}")


def newer_schema_fork_scenario(count: int) -> None:
    hooks, who = RecordingHooks(), ["parent"]
    atexit.register(lambda: _print_outcomes(hooks, who[0]))  # after the engine's exit hook
    engine = _engine(hooks, rate_limit=None, flush_timeout=float(os.environ["FLUSH_TIMEOUT"]))
    engine.start()  # the store is open, as after init_app
    assert engine.first_pass(10)
    assert engine.store.path is not None
    _newer_store_in_place(engine.store.path)
    engine.store.before_fork()
    pid = os.fork()
    if pid:
        engine.store.after_fork_in_parent()
        os.waitpid(pid, 0)
        return
    # A worker forked now (a gunicorn worker restarted): what the fork hook does, then work.
    who[0], hooks.outcomes, hooks._changed = "child", [], threading.Condition()
    engine.after_fork()
    engine.submit([upsert(n, tag="child") for n in range(count)])
    say(f"child submitted {count}")  # and exits through the interpreter's exit hooks


def newer_schema_exit_scenario(count: int) -> None:
    cannot_move = _Seen("cannot move to the file now there")
    logging.getLogger("flask_meisa.engine").addHandler(cannot_move)
    logging.basicConfig(format="%(message)s")  # that handler hides the last resort
    # Meisa is out of reach: the operations wait to retry, far later than the exit.
    retry = RetryPolicy(max_attempts=None, base_delay=60.0, max_delay=60.0, deadline=600.0)
    engine = _engine(RecordingHooks(), rate_limit=None, flush_timeout=0.3, retry=retry)
    engine.submit([upsert(n, tag="left") for n in range(count)])
    _stored(engine, count)
    assert engine.store.path is not None
    _newer_store_in_place(engine.store.path, remove_wal=True)
    say(f"newer-schema-exit cannot_move {cannot_move.event.wait(10)}")


def _newer_store_in_place(path: str, *, remove_wal: bool = False) -> None:
    """Put a newer release's store (of a newer schema) at ``path`` (with its WAL files
    removed first: replaced as a whole, as a deploy wiping the folder does)."""
    newer = f"{path}.newer"
    with contextlib.closing(sqlite3.connect(newer)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    for end in ("-wal", "-shm") if remove_wal else ():
        os.unlink(path + end)
    os.replace(newer, path)


class _Said(logging.Handler):
    """Counts the messages logged that contain ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.count = text, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += self.text in record.getMessage()


def full_disk_quiet_scenario() -> None:
    engine = _engine(RecordingHooks(), rate_limit=None)
    engine.submit([upsert(0)])
    assert engine.flush(5)  # the engine delivers, and has nothing to deliver
    failed, works = _Said("delivery store failed"), _Said("delivery store works again")
    for said in (failed, works):
        logging.getLogger("flask_meisa.engine").addHandler(said)
    with full_disk(engine) as failing:
        engine.submit([upsert(1)])  # the writer cannot store it
        failing.wait(10)
        engine.flush(2.5)  # meanwhile delivery reads (and finds nothing to do) at least twice
        while_full = (failed.count, works.count)
    flushed = engine.flush(5)
    say(f"full-disk-quiet while-full {while_full} flushed {flushed} then {works.count}")


def main(argv: list[str]) -> None:
    scenario, *numbers = argv
    if scenario == "exit":
        exit_scenario(int(numbers[0]))
    elif scenario == "drain":
        drain_scenario()
    elif scenario == "fork":
        fork_scenario(int(numbers[0]), int(numbers[1]))
    elif scenario == "full-disk":
        full_disk_scenario()
    elif scenario == "full-disk-retry":
        full_disk_retry_scenario()
    elif scenario == "full-disk-quiet":
        full_disk_quiet_scenario()
    elif scenario == "newer-schema-exit":
        newer_schema_exit_scenario(int(numbers[0]))
    elif scenario == "newer-schema-fork":
        newer_schema_fork_scenario(int(numbers[0]))
    elif scenario == "full-disk-exit":
        full_disk_exit_scenario(int(numbers[0]))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
