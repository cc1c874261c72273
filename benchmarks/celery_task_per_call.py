"""What a task per call costs with the Celery engine, and what coalescing saves.

Starts a ``redis-server`` on a free loopback port, an in-process emulator, and real
``celery worker`` processes (the test suite's worker app, ``tests.celery_support``), then
measures:

1. **submit**: the web process's cost of ``CeleryDispatcher.submit`` per operation (Redis
   round trips: the coalescing record and the publish), p50 and p99, and how many round
   trips to the engine's Redis records it makes (counted; the broker's publish is one more);
2. **throughput**: operations delivered per second by 1 and by 2 workers (threads pool,
   concurrency 4 each) with no rate budget and a fast emulator: the engine's overhead per
   call (a broker round trip, the Redis records, the budget script);
3. **storm**: ``--logins`` upserts of ``--users`` users submitted at once under a budget of
   ``--budget``; how many calls reach Meisa with coalescing, and how long it takes.

    .venv/bin/python benchmarks/celery_task_per_call.py [--ops 1000] [--logins 2000]
        [--users 200] [--budget 60/second]

Needs ``redis-server`` and the ``celery`` extra.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import redis
from support import ROOT
from support import redis_server
from support import sigterm_unwinds

from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation

if TYPE_CHECKING:
    from tests.celery_support import WorkerProcess


class Rig:
    """A Redis, an emulator and a producer; workers started on demand."""

    def __init__(self, redis_url: str, emulator: Emulator, logs: Path) -> None:
        from tests.celery_support import make_celery

        self.redis_url = redis_url
        self.emulator = emulator
        self.logs = logs
        self.celery = make_celery(redis_url)
        self.client = redis.Redis.from_url(redis_url)

    def dispatcher(
        self, rate_limit: str | None, connection_class: type[redis.Connection] = redis.Connection
    ) -> CeleryDispatcher:
        from tests.engine_support import RecordingHooks

        pool = redis.ConnectionPool.from_url(self.redis_url, connection_class=connection_class)
        return CeleryDispatcher(
            self.celery,
            redis=redis.Redis(connection_pool=pool),
            hooks=RecordingHooks(),
            rate_limit=rate_limit,
            budget_key=self.emulator.live_key,
        )

    def workers(self, count: int, rate_limit: str | None) -> list[WorkerProcess]:
        from tests.celery_support import WorkerProcess

        env = {
            "MEISA_TEST_URL": self.emulator.url,
            "MEISA_TEST_KEY": self.emulator.live_key,
            "MEISA_TEST_REDIS_URL": self.redis_url,
            "MEISA_TEST_RATE_LIMIT": rate_limit or "",
        }
        started = [
            WorkerProcess(env, self.logs / f"worker-{n}.log", concurrency=4) for n in range(count)
        ]
        for worker in started:
            worker.wait_ready()
        return started

    def reset(self) -> None:
        self.client.flushall()
        self.emulator.reset()

    def close(self) -> None:
        self.client.close()
        self.celery.close()


def upsert(n: int, **fields: Any) -> Operation:
    return Operation("upsert", {"email": f"user{n}@example.com", "external_id": str(n), **fields})


class CountingConnection(redis.Connection):
    """A connection that counts what it sends: one send per round trip (a pipeline, or a
    transaction, is one)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def event(n: int) -> Operation:
    payload = {"event_name": "opened", "email": f"user{n}@example.com"}
    return Operation("track", payload, contact={"email": f"user{n}@example.com"})


def measure_submit(rig: Rig, ops: int) -> None:
    for name, make in (("upserts", upsert), ("events", event)):
        dispatcher = rig.dispatcher(None, CountingConnection)
        dispatcher.submit([make(ops)])  # the scripts loaded, the epoch noted
        costs, CountingConnection.sent = [], 0
        for n in range(ops):
            started = time.perf_counter()
            dispatcher.submit([make(n)])
            costs.append(time.perf_counter() - started)
        trips = CountingConnection.sent / ops
        dispatcher.close()
        costs.sort()
        p50 = statistics.median(costs) * 1000
        p99 = costs[int(len(costs) * 0.99) - 1] * 1000
        print(
            f"submit: {ops} {name}, p50 {p50:.2f} ms, p99 {p99:.2f} ms per operation, "
            f"{trips:.2f} round trips to the records each (and the broker's publish)"
        )
        rig.reset()


def measure_throughput(rig: Rig, ops: int, workers: int) -> None:
    started_workers = rig.workers(workers, None)
    dispatcher = rig.dispatcher(None)
    try:
        started = time.perf_counter()
        for n in range(ops):
            dispatcher.submit([upsert(n)])
        assert dispatcher.flush(timeout=300), "not delivered in time"
        elapsed = time.perf_counter() - started
        calls = len(rig.emulator.requests)
        print(
            f"throughput: {workers} worker(s) x 4 threads: {ops} upserts in {elapsed:.2f} s, "
            f"{ops / elapsed:.0f} ops/s ({calls} calls)"
        )
    finally:
        dispatcher.close()
        for worker in started_workers:
            worker.stop()
        rig.reset()


def measure_storm(rig: Rig, logins: int, users: int, budget: str) -> None:
    started_workers = rig.workers(2, budget)
    dispatcher = rig.dispatcher(budget)
    try:
        started = time.perf_counter()
        for n in range(logins):
            user = n % users
            dispatcher.submit([upsert(user, custom_fields={"signin_count": n // users + 1})])
        submitted = time.perf_counter() - started
        assert dispatcher.flush(timeout=600), "not delivered in time"
        elapsed = time.perf_counter() - started
        requests = rig.emulator.requests
        throttled = sum(1 for r in requests if r.status == 429)
        current = sum(
            1
            for contact in rig.emulator.contacts()
            if contact["custom_fields"].get("signin_count") == logins // users
        )
        print(
            f"storm: {logins} logins of {users} users under {budget}: submitted in "
            f"{submitted:.2f} s, {len(requests)} calls ({throttled} answered 429), "
            f"{current}/{users} users current, all delivered in {elapsed:.2f} s"
        )
    finally:
        dispatcher.close()
        for worker in started_workers:
            worker.stop()
        rig.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--budget", default="60/second")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the worker app is in tests/, beside flask_meisa
    sigterm_unwinds()
    with (
        redis_server() as url,
        Emulator(seed="demo", rate_limit=None) as emulator,
        tempfile.TemporaryDirectory() as logs,
    ):
        rig = Rig(url, emulator, Path(logs))
        try:
            measure_submit(rig, args.ops)
            measure_throughput(rig, args.ops, 1)
            measure_throughput(rig, args.ops, 2)
            emulator.set_rate_limit(args.budget)
            measure_storm(rig, args.logins, args.users, args.budget)
        finally:
            rig.close()


if __name__ == "__main__":
    main()
