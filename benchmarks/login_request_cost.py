"""What a syncing login costs the request, in production: gunicorn, default config.

Each variant of one login app (``bench_app.py``) is served by its own gunicorns (gthread, 1
worker, 4 threads; ``--replicas`` of them per variant, each round timing the next one, since
two processes of the same code can differ by several per cent on their own), side by side,
and a client times logins over HTTP (keep-alive), in interleaved rounds that start with a
different variant each time, so that drift on a shared machine hits all of them alike:

- ``bare``: Flask-Login only, no Meisa;
- ``naive``: a synchronous ``requests.post`` to Meisa in the login view;
- ``celery``: a plain Celery task per login (``.delay()`` in the view), a real
  ``redis-server`` broker and one ``celery worker`` (threads pool, 2 threads) making the
  calls; left out when redis-server or Celery is missing;
- ``today``: ``Meisa(app)`` on today's engine (commit 0ab1d82, see ``baseline.py``): memory;
- ``default``: ``Meisa(app)`` on the new engine as shipped: the store file in the instance
  folder;
- ``memory``: the new engine with ``MEISA_OUTBOX = None``;
- ``nosync``: ``Meisa(app)`` with ``MEISA_SYNC_ON_LOGIN = False``: the extension in a
  request that syncs nothing;
- ``off``: ``MEISA_ENABLED = False``: each login's sync mapped, checked and released in
  the request but never handed to delivery, so the request's own share of the cost,
  without the engine's threads.

Every Meisa variant keeps the default budget (60/minute, 1,000/hour), so most syncs wait
in the engine while the logins run, as in production. Each login changes the user's
``signin_count`` and ``last_active``, so every login is a sync. The emulator runs in its
own process, answering at once, then after 300 ms. Prints p50 and p99 per variant and their
ratios to ``bare`` (target for ``default``: p50 <= 1.05x, p99 <= 1.20x), the p50 ratio
paired round by round (the median of each round's ratio, steadier on a noisy machine), the
lowest and highest of that paired ratio over the replicas (how far one process alone could
have misled), and the CPU each gunicorn worker used per login during its own rounds, every
thread (background delivery included), which other processes' load on a shared machine does
not inflate, and how much of it Meisa's own threads (the writer storing, delivery) took. Last,
the p99 ratio without each replica's first round: at 0 ms that round holds its start-up
burst (the fresh budget's first calls and the users' first syncs, delivered at once by the
serving process), which otherwise sets the p99 of 3,000 logins.

    .venv/bin/python benchmarks/login_request_cost.py [--logins 1000] [--rounds 20] [--replicas 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import baseline
import requests
from support import HERE
from support import EmulatorProcess
from support import emulator_process
from support import free_port
from support import load_average
from support import percentile
from support import progress
from support import redis_server
from support import sigterm_unwinds
from support import stop
from support import wait_for_port

#: name: (engine, app variant, config, label)
VARIANTS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bare": ("new", "bare", {}, "bare app (no Meisa)"),
    "naive": ("new", "naive", {}, "naive (requests.post in the view)"),
    "celery": ("new", "celery", {}, "Celery task per call (.delay)"),
    "today": ("baseline", "meisa", {}, "today's engine (memory)"),
    "default": ("new", "meisa", {}, "new default (store file)"),
    "memory": ("new", "meisa", {"MEISA_OUTBOX": None}, "new, MEISA_OUTBOX = None"),
    "nosync": ("new", "meisa", {"MEISA_SYNC_ON_LOGIN": False}, "new, no sync on login"),
    "off": ("new", "meisa", {"MEISA_ENABLED": False}, "new, MEISA_ENABLED = False"),
}
LATENCIES = (0.0, 0.3)
USERS = 200


@dataclass(frozen=True)
class Served:
    """One variant under gunicorn."""

    name: str
    url: str
    master: subprocess.Popen[bytes]

    def worker(self) -> str:
        """The pid of gunicorn's one worker."""
        with open(f"/proc/{self.master.pid}/task/{self.master.pid}/children") as children:
            return children.read().split()[0]

    def threads(self) -> dict[str, str]:
        """Meisa's threads in the worker: {native thread id: part} (``writer``,
        ``delivery`` for every delivery thread, ...), as the app names them at ``/threads``."""
        names = requests.get(f"{self.url}/threads", timeout=10).json()
        return {
            tid: name.removeprefix("flask-meisa-").split("-")[0]
            for tid, name in names.items()
            if name.startswith("flask-meisa-")
        }

    def used(self, threads: dict[str, str]) -> dict[str, float]:
        """CPU seconds the worker has used: ``all`` (every thread), and each part of
        ``threads`` (see :meth:`threads`)."""
        tasks = f"/proc/{self.worker()}/task"
        used = {"all": _cpu_seconds(f"/proc/{self.worker()}/stat")}
        for tid, part in threads.items():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended
                used[part] = used.get(part, 0.0) + _cpu_seconds(f"{tasks}/{tid}/stat")
        return used


def _cpu_seconds(stat_path: str) -> float:
    """User and system CPU seconds from a /proc stat file (of a process or a thread)."""
    with open(stat_path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def celery_missing() -> str | None:
    """Why the Celery variant cannot run here, or ``None``."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if not all(importlib.util.find_spec(name) for name in ("celery", "redis")):
        return "Celery is not installed (pip install -e '.[celery]')"
    return None


@contextlib.contextmanager
def celery_worker(meisa: EmulatorProcess, broker: str, log: str) -> Iterator[Any]:
    """One ``celery worker`` (threads pool, 2 threads: as many as the default prefork pool
    on two cores, in one process that its pid stops) consuming ``broker``; yields a Redis
    client of the broker."""
    import redis

    env = baseline.environ("new", BENCH_BROKER=broker, BENCH_URL=meisa.url, BENCH_KEY=meisa.key)
    command = [sys.executable, "-m", "celery", "-A", "bench_app:worker", "worker"]
    command += ["--pool=threads", "--concurrency=2", "--without-gossip", "--without-mingle"]
    command += ["--without-heartbeat", "--loglevel=WARNING"]
    with open(log, "wb") as out:
        worker = subprocess.Popen(command, cwd=HERE, env=env, stdout=out, stderr=out)
    client = redis.Redis.from_url(broker)
    try:
        deadline = time.monotonic() + 60
        while not client.blpop(["bench:ready"], timeout=1):
            if worker.poll() is not None or time.monotonic() > deadline:
                with open(log) as text:
                    raise RuntimeError(f"the celery worker did not start:\n{text.read()}")
        yield client
    finally:
        stop(worker)
        client.close()


@contextlib.contextmanager
def gunicorn(
    name: str, meisa: EmulatorProcess, instance: str, broker: str = ""
) -> Iterator[Served]:
    """Serve variant ``name`` with gunicorn (gthread, 1 worker, 4 threads); the master is
    stopped by its pid when the block ends (it stops its worker)."""
    engine, variant, config, _ = VARIANTS[name]
    port = free_port()
    env = baseline.environ(
        engine,
        BENCH_VARIANT=variant,
        BENCH_URL=meisa.url,
        BENCH_KEY=meisa.key,
        BENCH_INSTANCE=instance,
        BENCH_USERS=str(USERS),
        BENCH_CONFIG=json.dumps(config),
        BENCH_BROKER=broker,
    )
    command = [sys.executable, "-m", "gunicorn", "--chdir", str(HERE), "--bind"]
    command += [f"127.0.0.1:{port}", "--worker-class", "gthread", "--workers", "1"]
    command += ["--threads", "4", "--keep-alive", "60", "--graceful-timeout", "10"]
    command += ["--log-level", "warning", "bench_app:create_app()"]
    with open(f"{instance}.log", "wb") as log:
        master = subprocess.Popen(command, env=env, cwd=HERE, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_port(port, master)
            baseline.check(engine, requests.get(f"{url}/ping", timeout=10).text)
        except Exception:
            with open(f"{instance}.log") as log:
                print(log.read()[-3000:], file=sys.stderr)
            raise
        yield Served(name, url, master)
    finally:
        stop(master, timeout=20)


def time_logins(http: requests.Session, url: str, count: int, start: int) -> list[float]:
    """Seconds per login of ``count`` logins, users taken in turn from ``start``."""
    times = []
    for i in range(count):
        began = time.perf_counter()
        answer = http.post(f"{url}/login/{(start + i) % USERS}")
        times.append(time.perf_counter() - began)
        answer.raise_for_status()
    return times


def measure(
    sessions: dict[str, list[tuple[requests.Session, str, Served]]],
    latency: float,
    logins: int,
    rounds: int,
) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, float]]]:
    """Seconds per login, per variant and round, in ``rounds`` interleaved rounds; round
    ``k`` times replica ``k % replicas`` of every variant. ``naive`` waits on Meisa, so with
    a slow Meisa it makes a tenth of the logins. Also the CPU seconds each variant's
    workers used during its own rounds (see :meth:`Served.used`): not while other variants'
    rounds ran, when idle passes of background threads would count against its logins."""
    names = list(sessions)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    spent: dict[str, dict[str, float]] = {name: {} for name in names}
    threads = {name: [one.threads() for _, _, one in sessions[name]] for name in names}
    per_round = max(logins // rounds, 1)
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            count = max(per_round // 10, 2) if name == "naive" and latency else per_round
            replica = number % len(sessions[name])
            http, url, served = sessions[name][replica]
            before = served.used(threads[name][replica])
            times[name].append(time_logins(http, url, count, number * per_round))
            for part, seconds in served.used(threads[name][replica]).items():
                spent[name][part] = spent[name].get(part, 0.0) + seconds - before.get(part, 0.0)
    return times, spent


def paired_ratio(rounds: list[list[float]], bare: list[list[float]]) -> tuple[float, float]:
    """The median over rounds of a round's p50 over bare's p50 in the same round, and half
    the spread of the middle half of those ratios: drift between rounds cancels out."""
    pairs = zip(rounds, bare, strict=True)
    ratios = sorted(percentile(a, 0.5) / percentile(b, 0.5) for a, b in pairs)
    return percentile(ratios, 0.5), (percentile(ratios, 0.75) - percentile(ratios, 0.25)) / 2


def run(logins: int, rounds: int, names: list[str], replicas: int = 3) -> list[dict[str, Any]]:
    """Serve the variants (``replicas`` gunicorns each), time them at each latency; one row
    per variant and latency: latency, name, label, n, p50, p99 (seconds), ratios to bare,
    the paired p50 ratio and its range over the replicas, the workers' CPU seconds per
    login (every thread, background work included), its ratio to bare and the share of
    Meisa's own threads (writer, delivery), and for Celery the tasks left in the broker
    after the variants' logins."""
    rows = []
    with contextlib.ExitStack() as stack:
        meisa = stack.enter_context(emulator_process())
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-login-"))
        broker, queue = "", None
        if "celery" in names:
            progress("login cost: starting redis-server and a celery worker")
            broker = stack.enter_context(redis_server())
            queue = stack.enter_context(celery_worker(meisa, broker, f"{folder}/celery.log"))
        progress(f"login cost: starting {len(names) * replicas} gunicorns")
        workers = {
            name: [
                stack.enter_context(gunicorn(name, meisa, f"{folder}/{name}-{number}", broker))
                for number in range(replicas)
            ]
            for name in names
        }
        sessions = {
            name: [(stack.enter_context(requests.Session()), one.url, one) for one in served]
            for name, served in workers.items()
        }
        for latency in LATENCIES:
            meisa.set_latency(latency)
            progress(f"login cost: Meisa answering after {latency * 1000:.0f} ms")
            for replicas_of in sessions.values():  # connections, imports, first syncs
                for http, url, _ in replicas_of:
                    time_logins(http, url, 20, 0)
            by_round, spent = measure(sessions, latency, logins, rounds)
            times = {name: [t for one in values for t in one] for name, values in by_round.items()}
            cpu = {name: spent[name]["all"] / len(times[name]) for name in times}
            threads = {
                name: {
                    part: seconds / len(times[name])
                    for part, seconds in spent[name].items()
                    if part != "all"
                }
                for name in times
            }
            bare = times["bare"]
            first = min(replicas, rounds - 1)  # the rounds of each replica's start-up burst
            later_bare = [t for one in by_round["bare"][first:] for t in one]
            for name, values in times.items():
                p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
                later = [t for one in by_round[name][first:] for t in one]
                rows.append(
                    {
                        "latency": latency,
                        "name": name,
                        "label": VARIANTS[name][3],
                        "n": len(values),
                        "p50": p50,
                        "p99": p99,
                        "p50_ratio": p50 / percentile(bare, 0.5),
                        "paired": paired_ratio(by_round[name], by_round["bare"]),
                        "replicas": [
                            paired_ratio(
                                by_round[name][r::replicas], by_round["bare"][r::replicas]
                            )[0]
                            for r in range(min(replicas, rounds))
                        ],
                        "p99_ratio": p99 / percentile(bare, 0.99),
                        "p99_later": percentile(later, 0.99) / percentile(later_bare, 0.99),
                        "cpu": cpu[name],
                        "cpu_ratio": cpu[name] / cpu["bare"],
                        "threads": threads[name],
                        "backlog": queue.llen("celery") if name == "celery" and queue else None,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--logins", type=int, default=1000, help="per variant and latency")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3, help="gunicorns per variant")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    sigterm_unwinds()
    names = ["bare", *(name for name in args.only if name != "bare")]
    missing = celery_missing()
    if "celery" in names and missing:
        print(f"Celery variant left out: {missing}")
        names.remove("celery")
    if "today" in names and (why := baseline.missing()):
        print(f"today's engine left out: {why}")
        names.remove("today")
    print(f"load average at the start: {load_average()}")
    rows = run(args.logins, args.rounds, names, max(args.replicas, 1))
    print(
        f"{'latency':>7}  {'variant':36} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}  x bare p50/p99"
        "   paired p50 (replicas)   CPU ms/login, x bare   p99 x bare, later rounds"
    )
    for row in rows:
        paired, spread = row["paired"]
        low, high = min(row["replicas"]), max(row["replicas"])
        print(
            f"{row['latency'] * 1000:>5.0f}ms  {row['label']:36} {row['n']:>5} "
            f"{row['p50'] * 1000:>8.2f} {row['p99'] * 1000:>8.2f}  "
            f"{row['p50_ratio']:.2f}x / {row['p99_ratio']:.2f}x"
            f"   {paired:.2f}x ±{spread:.2f} ({low:.2f}-{high:.2f})"
            f"   {row['cpu'] * 1000:6.2f}  {row['cpu_ratio']:.2f}x"
            f"   {row['p99_later']:.2f}x"
        )
        if row["threads"]:
            parts = ", ".join(f"{part} {cpu * 1000:.2f}" for part, cpu in row["threads"].items())
            print(f"{'':9}of which Meisa's threads, CPU ms/login: {parts}")
        if row["backlog"] is not None:
            print(f"{'':9}Celery tasks left in the broker after them: {row['backlog']}")
    print("target for the new default: p50 <= 1.05x bare, p99 <= 1.20x bare")
    print(
        "later rounds: without each replica's first round, which holds its start-up burst (a "
        "fresh budget lets its first calls go at once, in the serving process)"
    )
    print(
        "paired p50: the median over rounds of a round's p50 over bare's in the same round, "
        "± half the spread of the middle half of the rounds; (replicas): the lowest and "
        "highest of that median over each replica's own rounds"
    )


if __name__ == "__main__":
    main()
