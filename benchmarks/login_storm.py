"""A login storm through a naive integration and through the ``ThreadDispatcher``.

2,000 logins by 200 users over one minute, against an in-process emulator that enforces
Meisa's default budget (60/minute, 1,000/hour). Each login updates the user's
``signin_count`` and ``last_active``; halfway through, one user asks for a password reset.
A pool of request threads (a WSGI server's) handles the logins:

- **naive**: each login calls ``client.upsert_contact`` inline, with the client's default
  retries (429s honoured by sleeping in the request thread), and the reset calls
  ``client.trigger_email`` inline;
- **engine**: each login submits an upsert to a ``ThreadDispatcher`` (same budget) and
  returns; the reset is submitted as a transactional send.

Time is compressed by ``--scale`` (default 60): the emulator's and the engine's budgets
are both divided in time by it (60/second and 1,000/minute at 60x), the storm lasts
60/scale seconds, and the seconds printed are benchmark seconds, with the real-time
equivalent beside them. What is not compressed: the emulator's ``Retry-After`` (whole
seconds, at least 1) and the client's default retry delays and deadline, which favours the
naive side (its retries span more windows than they would at real scale).

    .venv/bin/python benchmarks/login_storm.py [--scale 60] [--logins 2000] [--users 200]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.engine.thread import ThreadDispatcher
from flask_meisa.errors import MeisaError
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy

RESET_EMAIL = "reset-user@example.com"


@dataclass
class Result:
    """What one run measured."""

    calls: int
    throttled: int
    users_current: int
    reset_wait: float | None
    login_p50: float
    login_p99: float
    storm_handled: float
    all_done: float


class _Hooks:
    """Delivery hooks that notice the reset's delivery and count failures."""

    def __init__(self) -> None:
        self.reset_delivered = threading.Event()
        self.failures = 0

    def skip_reason(self, operation: Operation) -> str | None:
        return None

    def skipped(self, operation: Operation, reason: str) -> None:
        pass

    def delivered(self, operation: Operation, result: Any) -> None:
        if operation.kind == "send":
            self.reset_delivered.set()

    def failed(self, operation: Operation, error: BaseException) -> None:
        self.failures += 1

    def dropped(self, operation: Operation, reason: str) -> None:
        pass


def budget(scale: float) -> str:
    """Meisa's "60/minute;1000/hour", with time divided by ``scale``."""
    return f"60/{60 / scale:g}s;1000/{3600 / scale:g}s"


def logins(count: int, users: int, duration: float, seed: int) -> list[tuple[float, int, int]]:
    """(offset in seconds, user, that user's login number), in time order."""
    rng = random.Random(seed)
    order = [user for user in range(users) for _ in range(count // users)]
    rng.shuffle(order)
    seen: dict[int, int] = {}
    schedule = []
    for i, user in enumerate(order):
        seen[user] = seen.get(user, 0) + 1
        schedule.append((duration * i / len(order), user, seen[user]))
    return schedule


def login_payload(user: int, number: int) -> dict[str, Any]:
    return {
        "email": f"user{user}@example.com",
        "external_id": str(user),
        "custom_fields": {"signin_count": number, "last_active": f"login-{number}"},
    }


def run(mode: str, args: argparse.Namespace) -> Result:
    """Replay the storm in ``mode`` ("naive" or "engine") against a fresh emulator."""
    spec = budget(args.scale)
    duration = 60.0 / args.scale
    schedule = logins(args.logins, args.users, duration, args.seed)
    latencies: list[float] = []
    latency_lock = threading.Lock()
    reset_wait: list[float] = []
    with Emulator(seed="demo", rate_limit=spec, send_guardrail=None) as emu:
        key, url = emu.live_key, emu.url
        client = MeisaClient(key, url)  # default retries
        hooks = _Hooks()
        engine = ThreadDispatcher(
            client_factory=lambda: MeisaClient(key, url),
            hooks=hooks,
            retry=RetryPolicy(),
            rate_limit=spec,
        )
        start = time.monotonic()

        def wait_until(offset: float) -> float:
            due = start + offset
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the replay's clock: a login arrives at its time
            return due

        def login(offset: float, user: int, number: int) -> None:
            due = wait_until(offset)
            payload = login_payload(user, number)
            if mode == "naive":
                with contextlib.suppress(MeisaError):  # a naive app logs it and moves on
                    client.upsert_contact(**payload)
            else:
                engine.submit(Operation("upsert", payload))
            with latency_lock:
                latencies.append(time.monotonic() - due)

        def password_reset() -> None:
            due = wait_until(duration / 2)
            if mode == "naive":
                with contextlib.suppress(MeisaError):
                    client.trigger_email("password_reset", RESET_EMAIL, idempotency_key="reset-1")
                    reset_wait.append(time.monotonic() - due)
            else:
                body = {
                    "trigger_key": "password_reset",
                    "to_email": RESET_EMAIL,
                    "idempotency_key": "reset-1",
                }
                engine.submit(Operation("send", body))
                if hooks.reset_delivered.wait(120):
                    reset_wait.append(time.monotonic() - due)

        with ThreadPoolExecutor(args.threads, thread_name_prefix="request") as pool:
            resets = pool.submit(password_reset)
            for offset, user, number in schedule:
                pool.submit(login, offset, user, number)
            pool.shutdown(wait=True)  # every login handled
            storm_handled = time.monotonic() - start
            resets.result()
        if mode == "engine":
            engine.flush(600)
        engine.close(0)
        client.close()
        all_done = time.monotonic() - start
        final = args.logins // args.users
        current = 0
        for user in range(args.users):
            contact = emu.contact(external_id=str(user))
            if contact and contact["custom_fields"].get("signin_count") == final:
                current += 1
        statuses = [r.status for r in emu.requests]
    latencies.sort()
    return Result(
        calls=len(statuses),
        throttled=statuses.count(429),
        users_current=current,
        reset_wait=reset_wait[0] if reset_wait else None,
        login_p50=statistics.median(latencies),
        login_p99=latencies[int(len(latencies) * 0.99) - 1],
        storm_handled=storm_handled,
        all_done=all_done,
    )


def build_parser() -> argparse.ArgumentParser:
    """The storm's options (``parse_args([])`` gives the defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=60.0, help="time compression factor")
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--threads", type=int, default=32, help="request threads")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    scale = args.scale

    def seconds(value: float | None, *, budget_bound: bool = True) -> str:
        if value is None:
            return "never sent"
        if not budget_bound:
            return f"{value:.3f} s"  # request-thread time: not scaled
        real = value * scale
        unit = f"{real:.0f} s" if real < 120 else f"{real / 60:.1f} min"
        return f"{value:.3f} s (≙ {unit})"

    print(
        f"Login storm: {args.logins} logins by {args.users} users over 1 minute (≙ "
        f"{60 / scale:g} s here; time compressed {scale:g}x), budget {budget(scale)} on the "
        f"emulator and the engine (≙ 60/minute;1000/hour), {args.threads} request threads.\n"
        "Benchmark seconds; ≙ the real-time equivalent where the budget sets the pace."
    )
    results = {mode: run(mode, args) for mode in ("naive", "engine")}
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("API calls made", lambda r: str(r.calls)),
        ("429s received", lambda r: str(r.throttled)),
        ("users whose final state reached Meisa", lambda r: f"{r.users_current}/{args.users}"),
        ("password reset (mid-storm) waited", lambda r: seconds(r.reset_wait)),
        ("login request time, median", lambda r: seconds(r.login_p50, budget_bound=False)),
        ("login request time, p99", lambda r: seconds(r.login_p99, budget_bound=False)),
        ("all logins handled after", lambda r: seconds(r.storm_handled)),
        ("everything delivered after", lambda r: seconds(r.all_done)),
    ]
    width = max(len(name) for name, _ in rows)
    header = f"{'':{width}}  {'naive (sync upsert per login)':32}  ThreadDispatcher"
    print(header)
    print("-" * len(header))
    for name, cell in rows:
        print(f"{name:{width}}  {cell(results['naive']):32}  {cell(results['engine'])}")


if __name__ == "__main__":
    main()
