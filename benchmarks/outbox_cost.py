"""What the durable outbox costs per operation on the submitting side.

Times ``submit`` of the same operations (an upsert and an event per user, about 250 bytes
of JSON each) into three engines, in interleaved rounds so that drift on a shared machine
hits them alike:

- ``memory``: :class:`ThreadDispatcher`, the in-memory queue;
- ``outbox-holder``: :class:`OutboxDispatcher` in the process that holds the delivery
  lock: each submit is a SQLite write (WAL, ``synchronous = NORMAL``), and its pump thread
  claims the new rows into memory meanwhile, competing for the GIL;
- ``outbox-writer``: :class:`OutboxDispatcher` in a process whose delivery lock is held by
  another engine (the other workers of a host): each submit is a SQLite write only.

Delivery is paused in all of them, so only the submitting side is measured: the budget is
``1/day`` and Meisa is a closed loopback port (the one call allowed fails at once). Each
round uses fresh engines and fresh outbox files. Prints microseconds per submit (median
of the rounds) and each engine's ratio to ``memory``.

    .venv/bin/python benchmarks/outbox_cost.py [--operations 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flask_meisa import MeisaClient
from flask_meisa.engine.base import Dispatcher
from flask_meisa.engine.durable import OutboxDispatcher
from flask_meisa.engine.outbox import Outbox
from flask_meisa.engine.thread import ThreadDispatcher
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy


class NoHooks:
    def skip_reason(self, operation: Operation) -> str | None:
        return None

    def skipped(self, operation: Operation, reason: str) -> None:
        pass

    def delivered(self, operation: Operation, result: Any) -> None:
        pass

    def failed(self, operation: Operation, error: BaseException) -> None:
        pass

    def dropped(self, operation: Operation, reason: str) -> None:
        pass


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1"


def operations(count: int) -> list[Operation]:
    made: list[Operation] = []
    for n in range(count // 2):
        identity = {"email": f"user{n}@example.com", "external_id": f"user-{n}"}
        fields = {"plan": "pro", "signin_count": n, "last_active": "2026-05-01T10:00:00Z"}
        made.append(Operation("upsert", {**identity, "custom_fields": fields}))
        made.append(
            Operation(
                "track",
                {"event_name": "exported_report", "external_id": f"user-{n}"},
                contact={**identity, "custom_fields": fields},
            )
        )
    return made


def engine_options(url: str) -> dict[str, Any]:
    return {
        "client_factory": lambda: MeisaClient("meisa_live_benchmark_0000", url),
        "hooks": NoHooks(),
        "retry": RetryPolicy(max_attempts=3, base_delay=60.0),
        "rate_limit": "1/day",
        "queue_size": 20_000,
    }


def timed(engine: Dispatcher, ops: list[Operation]) -> float:
    started = time.perf_counter()
    for op in ops:
        engine.submit(op)
    return (time.perf_counter() - started) / len(ops) * 1e6


def run_round(variant: str, ops: list[Operation], folder: Path, url: str) -> float:
    options = engine_options(url)
    if variant == "memory":
        memory = ThreadDispatcher(**options)
        try:
            return timed(memory, ops)
        finally:
            memory.close(0)
    path = folder / f"{variant}-{time.monotonic_ns()}.sqlite3"
    holder = OutboxDispatcher(outbox=Outbox(path), **options)
    holder.start()
    deadline = time.monotonic() + 5
    while not holder.is_holder and time.monotonic() < deadline:
        holder.flush(0.01)
    engines = [holder]
    try:
        if variant == "outbox-writer":
            writer = OutboxDispatcher(outbox=Outbox(path), **engine_options(url))
            engines.append(writer)
            return timed(writer, ops)
        return timed(holder, ops)
    finally:
        for engine in reversed(engines):
            engine.close(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--operations", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the paused engines' connection errors
    url = closed_url()
    ops = operations(args.operations)
    variants = ["memory", "outbox-holder", "outbox-writer"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(args.rounds):
            order = variants[round_number % 3 :] + variants[: round_number % 3]
            for variant in order:
                fresh = [Operation.from_dict(op.to_dict()) for op in ops]
                results[variant].append(run_round(variant, fresh, Path(folder), url))
    base = statistics.median(results["memory"])
    print(f"{len(ops)} submits per engine per round, {args.rounds} rounds, delivery paused")
    for variant in variants:
        median = statistics.median(results[variant])
        spread = f"{min(results[variant]):.1f}-{max(results[variant]):.1f}"
        print(f"{variant:14} {median:8.1f} us/op (range {spread})   x{median / base:.1f} memory")


if __name__ == "__main__":
    main()
