"""The benchmark suite: every measure that matters, in one run, printed as one table.

1. **request path**: a login that syncs, over HTTP to a threaded Werkzeug server, with the
   emulator in its own process answering at once and after 300 ms: the bare app, a naive
   integration (the client called in the view), a Celery task per call (a plain
   ``@celery_app.task`` making the upsert, ``.delay()`` in the view, a real Redis broker
   and one real ``celery worker`` consuming it) and flask-meisa as shipped (thread
   delivery, default budget); interleaved rounds, median per login and ratio to bare;
2. **enqueue**: one ``meisa.upsert(payload)`` outside a request and one
   ``ThreadDispatcher.submit(op)`` with delivery held back (budget ``1/day``, Meisa a
   closed port), and the outbox's submit beside the in-memory queue, in interleaved rounds;
3. **login storm**: naive against the engine under Meisa's budget, time compressed;
4. **suppression**: one million suppressed addresses: an ``is_suppressed`` call beside a
   bare frozenset probe, and the memory the set takes.

Ratios are what to read on a shared machine: the things compared run side by side in one
run. Every process the suite starts (emulator, ``redis-server``, ``celery worker``) is
stopped by its pid, on errors and on Ctrl-C or SIGTERM too. About three minutes on two
cores; ``--quick`` shrinks the sections to a smoke run of well under a minute.

    .venv/bin/python benchmarks/suite.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timezone
from pathlib import Path
from types import FrameType
from typing import Any

import login_request_cost as request_cost
import login_storm
import outbox_cost
import requests
import suppression_lookup
from flask import Flask

from flask_meisa import Meisa
from flask_meisa import MeisaClient
from flask_meisa.operations import Operation

HERE = Path(__file__).resolve().parent
#: The Celery task of the task-per-call integration.
TASK_NAME = "meisa_bench.upsert_contact"
#: Where the worker reads its broker, Meisa's URL and key (never on a command line).
BROKER_ENV, URL_ENV, KEY_ENV, WORKER_ENV = (
    "MEISA_BENCH_BROKER",
    "MEISA_BENCH_URL",
    "MEISA_BENCH_KEY",
    "MEISA_BENCH_WORKER",
)
LATENCIES = (0.0, 0.3)


@dataclass(frozen=True)
class Sizes:
    """How much each section does."""

    logins: int  # per version and latency
    rounds: int
    enqueue_ops: int  # upserts and events per round
    enqueue_rounds: int
    storm: list[str]  # login_storm.py's options
    addresses: int
    calls: int  # per lookup timing
    mixed_case: bool  # also load a mixed-case list (normalized: a second copy)


FULL = Sizes(200, 10, 5000, 7, [], 1_000_000, 1_000_000, True)
QUICK = Sizes(60, 6, 2000, 3, ["--logins", "400", "--users", "40"], 1_000_000, 100_000, False)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    section: str
    measure: str
    value: str
    ratio: str = ""


@dataclass
class Table:
    """The rows measured so far and whether something failed."""

    rows: list[Row] = field(default_factory=list)
    failed: bool = False

    def add(self, section: str, measure: str, value: str, ratio: str = "") -> None:
        self.rows.append(Row(section, measure, value, ratio))

    def render(self) -> str:
        header = Row("section", "measure", "value", "ratio")
        lines = [header, *self.rows]
        widths = [
            max(len(getattr(row, name)) for row in lines)
            for name in ("section", "measure", "value")
        ]

        def line(row: Row) -> str:
            cells = zip((row.section, row.measure, row.value), widths, strict=True)
            return "  ".join(cell.ljust(width) for cell, width in cells) + "  " + row.ratio

        rule = "  ".join("-" * width for width in widths) + "  " + "-" * 12
        return "\n".join([line(header), rule, *(line(row) for row in self.rows)]).rstrip()


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(value: float, base: float, name: str) -> str:
    return f"{value / base:.2f}x {name}"


def stop(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the process by its pid, SIGKILL if it lingers, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


# -- the Celery task-per-call integration ----------------------------------------------------


def task_per_call_app(broker_url: str) -> tuple[Any, Any]:
    """A plain Celery app on ``broker_url`` and its one task, which upserts a contact
    with a client made once per worker process: (app, task)."""
    from celery import Celery  # type: ignore[import-untyped]

    app = Celery("meisa-bench", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    clients: list[MeisaClient] = []
    lock = threading.Lock()

    @app.task(name=TASK_NAME)
    def upsert_contact(email: str, external_id: str, custom_fields: dict[str, Any]) -> None:
        with lock:
            if not clients:
                clients.append(MeisaClient(os.environ[KEY_ENV], os.environ[URL_ENV]))
        clients[0].upsert_contact(email, external_id=external_id, custom_fields=custom_fields)

    return app, upsert_contact


def _build_worker_app() -> Any:
    """The worker's app: the task, and a ready signal pushed to Redis."""
    import redis
    from celery.signals import worker_ready  # type: ignore[import-untyped]

    broker = os.environ[BROKER_ENV]
    app, _ = task_per_call_app(broker)

    def ready(sender: Any = None, **extra: Any) -> None:
        client = redis.Redis.from_url(broker)
        client.rpush(f"meisa-bench:ready:{os.environ[WORKER_ENV]}", "1")
        client.close()

    worker_ready.connect(ready, weak=False)
    return app


def __getattr__(name: str) -> Any:
    # ``celery -A suite:task_worker_app``: built on demand, so importing starts nothing.
    if name == "task_worker_app":
        app = _build_worker_app()
        globals()[name] = app
        return app
    raise AttributeError(name)


@dataclass
class TaskQueue:
    """The web side of the task-per-call integration."""

    task: Any
    redis: Any

    def enqueue(self, user: request_cost.User) -> None:
        custom_fields = {"plan": user.plan, "signin_count": user.signin_count}
        self.task.delay(user.email, str(user.id), custom_fields)

    def backlog(self) -> int:
        """Tasks waiting in the broker, not yet taken by the worker."""
        return int(self.redis.llen("celery"))


@contextlib.contextmanager
def task_per_call(meisa_url: str, key: str, logs: Path) -> Iterator[TaskQueue]:
    """A ``redis-server`` and one ``celery worker`` (threads pool, 2 threads: as many as the
    default prefork pool on a 2-core machine, in one process that its pid stops)."""
    import redis
    from celery_task_per_call import start_redis

    process, broker = start_redis()
    try:
        app, task = task_per_call_app(broker)
        name = f"meisa-bench-{os.getpid()}"
        env = {
            **os.environ,
            BROKER_ENV: broker,
            URL_ENV: meisa_url,
            KEY_ENV: key,
            WORKER_ENV: name,
        }
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "suite:task_worker_app",
            "worker",
            "--pool=threads",
            "--concurrency=2",
            f"--hostname={name}@localhost",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
        log = logs / "celery-worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        client = redis.Redis.from_url(broker)
        try:
            deadline = time.monotonic() + 60
            while not client.blpop([f"meisa-bench:ready:{name}"], timeout=1):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the celery worker did not start:\n{log.read_text()}")
            yield TaskQueue(task, client)
        finally:
            stop(worker)
            client.close()
            app.close()
    finally:
        stop(process)


# -- 1. request path -----------------------------------------------------------------------

VERSIONS = {
    "bare": "bare (no Meisa)",
    "naive": "naive (client call in the view)",
    "celery": "Celery task per call (.delay)",
    "meisa": "flask-meisa (thread, default budget)",
}


def request_path(sizes: Sizes, table: Table) -> None:
    section = "1 request path"
    with contextlib.ExitStack() as stack:
        root_url, key = stack.enter_context(request_cost.emulator_process())
        base_url = f"{root_url}/api/v1"
        queue: TaskQueue | None = None
        skipped = None
        if shutil.which("redis-server") is None:
            skipped = "skipped: redis-server not installed"
        elif not all(importlib.util.find_spec(name) for name in ("celery", "redis")):
            skipped = "skipped: celery not installed (pip install 'flask-meisa[celery]')"
        if skipped is None:
            progress("request path: starting redis-server and a celery worker")
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            queue = stack.enter_context(task_per_call(base_url, key, logs))
        apps = {
            name: request_cost.make_app(
                name, base_url, key, queue.enqueue if name == "celery" and queue else None
            )
            for name in VERSIONS
            if name != "celery" or queue is not None
        }
        shipped = apps["meisa"]
        stack.callback(lambda: shipped.extensions["meisa"].state(shipped).close(0.1))
        urls = {name: stack.enter_context(request_cost.serve(app)) for name, app in apps.items()}
        http = stack.enter_context(requests.Session())
        worker = "Celery: Redis + 1 worker, 2 threads" if queue else "no Celery"
        table.add(section, f"setup: threaded Werkzeug, emulator process; {worker}", "")
        for latency in LATENCIES:
            request_cost.set_latency(root_url, latency)
            label = f"{latency * 1000:.0f} ms"
            progress(f"request path: Meisa answering after {label}")
            for url in urls.values():  # warm connections, pools and code paths
                request_cost.time_logins(http, url, 3, 0)
            results = request_cost.measure(
                http, urls, latency, sizes.logins, sizes.rounds, rotate=True
            )
            bare = statistics.median(results["bare"])
            for name, times in results.items():
                median = statistics.median(times)
                table.add(
                    section,
                    f"{label}: {VERSIONS[name]}, n={len(times)}",
                    f"{median * 1000:.2f} ms/login",
                    ratio(median, bare, "bare"),
                )
            if queue is not None:
                table.add(
                    section,
                    f"{label}: Celery tasks left in the broker after them",
                    str(queue.backlog()),
                )
        if skipped is not None:
            table.add(section, VERSIONS["celery"], skipped)


# -- 2. enqueue ----------------------------------------------------------------------------


def meisa_upsert_round(payloads: list[dict[str, Any]], url: str) -> float:
    """Microseconds per ``meisa.upsert(payload)`` outside a request, delivery held back."""
    app = Flask("bench_enqueue")
    app.config.update(
        MEISA_API_KEY="meisa_live_benchmark_0000",
        MEISA_BASE_URL=url,
        MEISA_RATE_LIMIT="1/day",
        MEISA_MAX_ATTEMPTS=3,
        MEISA_RETRY_BASE_DELAY=60.0,
        MEISA_RETRY_MAX_DELAY=60.0,
        MEISA_QUEUE_SIZE=20_000,
    )
    meisa = Meisa(app)
    try:
        with app.app_context():
            started = time.perf_counter()
            for payload in payloads:
                meisa.upsert(payload)
            return (time.perf_counter() - started) / len(payloads) * 1e6
    finally:
        meisa.state(app).close(0)


def enqueue(sizes: Sizes, table: Table) -> None:
    section = "2 enqueue"
    url = outbox_cost.closed_url()
    mixed = outbox_cost.operations(sizes.enqueue_ops)
    upserts = [op for op in mixed if op.kind == "upsert"]

    def fresh(ops: list[Operation]) -> list[Operation]:
        return [Operation.from_dict(op.to_dict()) for op in ops]

    logging.disable(logging.WARNING)  # the held-back engines' connection errors
    try:
        with tempfile.TemporaryDirectory() as name:
            folder = Path(name)
            runners: dict[str, Callable[[], float]] = {
                "upsert": lambda: meisa_upsert_round([op.payload for op in upserts], url),
                "submit": lambda: outbox_cost.run_round("memory", fresh(upserts), folder, url),
                "memory": lambda: outbox_cost.run_round("memory", fresh(mixed), folder, url),
                "holder": lambda: outbox_cost.run_round(
                    "outbox-holder", fresh(mixed), folder, url
                ),
                "writer": lambda: outbox_cost.run_round(
                    "outbox-writer", fresh(mixed), folder, url
                ),
            }
            results: dict[str, list[float]] = {name: [] for name in runners}
            names = list(runners)
            for round_no in range(sizes.enqueue_rounds):
                progress(f"enqueue: round {round_no + 1}/{sizes.enqueue_rounds}")
                shift = round_no % len(names)
                for name in [*names[shift:], *names[:shift]]:
                    results[name].append(runners[name]())
    finally:
        logging.disable(logging.NOTSET)
    us = {name: statistics.median(values) for name, values in results.items()}
    table.add(
        section,
        f"setup: per op, median of {sizes.enqueue_rounds} rounds of {len(upserts):,} "
        f"upserts / {len(mixed):,} mixed ops; delivery held back",
        "",
    )
    table.add(
        section,
        "meisa.upsert(payload), thread engine, outside a request",
        f"{us['upsert']:.1f} us",
        ratio(us["upsert"], us["submit"], "submit"),
    )
    table.add(
        section,
        "ThreadDispatcher.submit(op), same upserts",
        f"{us['submit']:.1f} us",
        "1.00x submit",
    )
    table.add(
        section,
        "ThreadDispatcher.submit, upsert + event mix",
        f"{us['memory']:.1f} us",
        "1.00x memory",
    )
    for name, label in (("holder", "lock holder"), ("writer", "writer")):
        table.add(
            section,
            f"OutboxDispatcher.submit, {label}, same mix",
            f"{us[name]:.1f} us",
            ratio(us[name], us["memory"], "memory"),
        )


# -- 3. login storm ------------------------------------------------------------------------


def storm(sizes: Sizes, table: Table) -> None:
    section = "3 login storm"
    args = login_storm.build_parser().parse_args(sizes.storm)
    results = {}
    for mode in ("naive", "engine"):
        progress(f"login storm: {mode}")
        results[mode] = login_storm.run(mode, args)
    naive, ours = results["naive"], results["engine"]
    table.add(
        section,
        f"setup: {args.logins} logins, {args.users} users, 1 min at {args.scale:g}x; "
        "Meisa's default budget",
        "",
    )
    for label, pick in (("API calls", "calls"), ("429s received", "throttled")):
        a, b = getattr(naive, pick), getattr(ours, pick)
        table.add(section, f"{label}: naive", str(a))
        table.add(
            section, f"{label}: flask-meisa engine", str(b), ratio(b, a, "naive") if a else ""
        )
    for name, result in (("naive", naive), ("flask-meisa engine", ours)):
        table.add(
            section, f"users current at the end: {name}", f"{result.users_current}/{args.users}"
        )
    for name, result in (("naive", naive), ("flask-meisa engine", ours)):
        wait = result.reset_wait
        value = (
            "never sent" if wait is None else f"{wait:.3f} s (≙ {wait * args.scale:.0f} s real)"
        )
        table.add(section, f"password reset mid-storm waited: {name}", value)


# -- 4. suppression ------------------------------------------------------------------------


def suppression(sizes: Sizes, table: Table) -> None:
    section = "4 suppression"
    size = sizes.addresses
    progress(f"suppression: building {size:,} addresses")
    clean, held = suppression_lookup.clean_list(size)
    loaded, added, _, _ = suppression_lookup.load_traced(clean)
    try:
        table.add(section, f"memory: {size:,} addresses, frozenset", f"{held / 2**20:.1f} MiB")
        table.add(section, "memory: SuppressionSet adds, clean list", f"{added / 2**20:.1f} MiB")
        if sizes.mixed_case:
            progress("suppression: a mixed-case list")
            mixed_added, _, _ = suppression_lookup.mixed_case_footprint(size)
            table.add(
                section,
                "memory: SuppressionSet adds, mixed-case list",
                f"{mixed_added / 2**20:.1f} MiB",
            )
        progress("suppression: timing lookups")
        wanted = (
            "frozenset hit",
            "is_suppressed hit",
            "frozenset miss",
            "is_suppressed miss",
            "TTLCache membership",
        )
        statements = {name: suppression_lookup.LOOKUPS[name] for name in wanted}
        namespace = suppression_lookup.lookup_namespace(loaded, clean, size)
        ns = suppression_lookup.per_call_ns(statements, namespace, sizes.calls)
    finally:
        loaded.close()
    table.add(section, f"setup: per call, best of 5 x {sizes.calls:,}, interleaved", "")
    for kind in ("hit", "miss"):
        base = ns[f"frozenset {kind}"]
        table.add(section, f"email in frozenset, {kind}", f"{base:.1f} ns")
        table.add(
            section,
            f"is_suppressed(email), {kind}",
            f"{ns[f'is_suppressed {kind}']:.1f} ns",
            ratio(ns[f"is_suppressed {kind}"], base, "frozenset"),
        )
    table.add(
        section,
        "  of which: one-entry TTLCache membership",
        f"{ns['TTLCache membership']:.1f} ns",
    )


# -- the run -------------------------------------------------------------------------------

SECTIONS: list[tuple[str, Callable[[Sizes, Table], None]]] = [
    ("1 request path", request_path),
    ("2 enqueue", enqueue),
    ("3 login storm", storm),
    ("4 suppression", suppression),
]


def interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every ``finally`` stops what it started.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run every section and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, well under a minute")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, interrupt)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # Budget-bound engines end with work pending; the naive storm gives up on 429s.
    logging.getLogger("flask_meisa").setLevel(logging.ERROR)
    started = time.monotonic()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    load = os.getloadavg()[0]
    table = Table()
    interrupted = False
    try:
        for name, section in SECTIONS:
            began = time.monotonic()
            try:
                section(sizes, table)
            except Exception as error:
                table.failed = True
                traceback.print_exc()
                table.add(name, "failed", f"{type(error).__name__}: {error}")
            progress(f"{name}: {time.monotonic() - began:.0f} s")
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.monotonic() - started
    print(f"\nflask-meisa benchmark suite{' (--quick)' if args.quick else ''}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"date:    {when}; took {elapsed:.0f} s; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average {load:.2f} at the start"
    )
    if interrupted:
        print("INTERRUPTED: the table holds what was measured before")
    print()
    print(table.render())
    if interrupted:
        return 130
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
