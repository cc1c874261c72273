"""What one ``meisa.upsert(payload)`` costs its caller, beside PostHog's and Segment's SDKs.

Each variant runs in a fresh child process per round, the variants of a round in a rotated
order; each warms up with 200 calls and rests, then times ``--calls`` calls in a row; the
median of the rounds is printed: microseconds per call, outside a request,
with delivery held back (Meisa is a host that accepts connections and never answers, and
the budget is ``1/day``), so that only the caller's side is timed (with whatever the
SDK's background threads take from it meanwhile):

- ``meisa.upsert(payload)``: the new engine as shipped (store file in the instance folder),
  the new engine with ``MEISA_OUTBOX = None``, and today's engine (``baseline.py``);
- PostHog's ``Posthog(...).capture(...)`` (its default background consumer, not
  ``sync_mode``) and Segment's ``Client(...).track(...)``, against the same silent host.

Beside the wall time, the CPU time the process spent meanwhile (the caller and the SDK's
threads), which the load of other processes on a shared machine does not inflate.

Target: ``meisa.upsert`` <= 15 us. Then a breakdown of ``meisa.upsert`` on the
new engine, each part timed on its own once the writer thread is idle: validation, the
``Operation``, the ``operation_queued`` signal, the app's state with the request check and
``delivering()``, the hand-over to delivery, and what is left of the whole: the writer
thread storing the operations meanwhile, holding the GIL part of the time.
PostHog and Segment come with the ``bench`` extra: pip install -e '.[bench]'.

    .venv/bin/python benchmarks/enqueue_cost.py [--calls 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import baseline
from support import load_average
from support import progress
from support import sigterm_unwinds
from support import silent_host

#: name: (engine, label)
VARIANTS = {
    "default": ("new", "meisa.upsert, new engine (store file)"),
    "memory": ("new", "meisa.upsert, new engine, MEISA_OUTBOX = None"),
    "today": ("baseline", "meisa.upsert, today's engine"),
    "posthog": ("new", "PostHog Posthog.capture"),
    "segment": ("new", "Segment Client.track"),
}
PARTS = {
    "validation": "validation (upsert_payload)",
    "operation": "the Operation",
    "signal": "the operation_queued signal",
    "rest": "the app's state, the request check, delivering()",
    "handover": "the hand-over (dispatcher.submit)",
    "writer": "the writer thread's share (whole - the above)",
}
WARMUP = 200
#: Seconds every variant rests after its warm-up, so that no start-up work of a background
#: thread (opening, a first pass, a first upload) falls into the timed calls.
SETTLE = 0.5


def payload(n: int) -> dict[str, Any]:
    """One contact's sync, about 150 bytes of JSON."""
    return {
        "email": f"user{n}@example.com",
        "external_id": f"user-{n}",
        "custom_fields": {"plan": "pro", "signin_count": n, "last_active": "2026-05-01T10:00"},
    }


def per_call(call: Callable[[dict[str, Any]], Any], first: int, count: int) -> float:
    """Microseconds per ``call(payload)`` over ``count`` fresh payloads."""
    return measured(call, first, count)["us"]


def measured(call: Callable[[dict[str, Any]], Any], first: int, count: int) -> dict[str, float]:
    """Per ``call(payload)`` over ``count`` fresh payloads: wall microseconds (``us``) and
    the microseconds of CPU this process spent meanwhile, every thread (``cpu``), which
    other processes' load does not inflate."""
    payloads = [payload(n) for n in range(first, first + count)]
    started, cpu = time.perf_counter(), time.process_time()
    for item in payloads:
        call(item)
    cpu = time.process_time() - cpu
    return {"us": (time.perf_counter() - started) / count * 1e6, "cpu": cpu / count * 1e6}


def meisa_app(url: str, instance: str, config: dict[str, Any]) -> Any:
    from flask import Flask

    from flask_meisa import Meisa

    app = Flask("bench_enqueue", instance_path=instance)
    app.config.update(MEISA_API_KEY="meisa_live_benchmark_0000", MEISA_BASE_URL=url)
    app.config.update(MEISA_RATE_LIMIT="1/day", **config)
    Meisa(app)
    return app


def sdk_call(variant: str, url: str) -> Callable[[dict[str, Any]], Any]:
    """PostHog's capture or Segment's track of a payload."""
    if variant == "posthog":
        posthog = importlib.import_module("posthog").Posthog("phc_benchmark", host=url)
        return lambda item: posthog.capture(
            "login", distinct_id=item["external_id"], properties=item["custom_fields"]
        )
    segment = importlib.import_module("segment.analytics").Client("benchmark", host=url)
    return lambda item: segment.track(item["external_id"], "login", item["custom_fields"])


def enqueue(params: dict[str, Any]) -> dict[str, Any]:
    """The scenario: microseconds per call of one variant (or the breakdown)."""
    logging.disable(logging.WARNING)  # the held-back engine's and SDKs' connection errors
    variant, calls = params["variant"], params["calls"]
    with silent_host() as url:
        if variant in ("posthog", "segment"):
            call = sdk_call(variant, url)
            per_call(call, 0, WARMUP)
            time.sleep(SETTLE)
            return measured(call, WARMUP, calls)
        if variant == "breakdown":
            return breakdown(url, params["instance"], calls)
        config = {"MEISA_OUTBOX": None} if variant == "memory" else {}
        app = meisa_app(url, params["instance"], config)
        meisa = app.extensions["meisa"]
        with app.app_context():
            per_call(meisa.upsert, 0, WARMUP)
            time.sleep(SETTLE)
            settle(meisa)
            return measured(meisa.upsert, WARMUP, calls)


def breakdown(url: str, instance: str, calls: int) -> dict[str, Any]:
    """Microseconds of each part of ``meisa.upsert`` (new engine) in 3 rounds, each on a
    fresh app (an empty store, as in the variants), each part timed once the writer
    thread has stored what came before."""
    results: dict[str, list[float]] = {}
    for number in range(3):
        app = meisa_app(url, f"{instance}/{number}", {})
        meisa = app.extensions["meisa"]
        with app.app_context():
            per_call(meisa.upsert, 0, WARMUP)
            time.sleep(SETTLE)
            for name, part in parts(app, calls).items():
                settle(meisa)
                results.setdefault(name, []).append(part())
            meisa.close(timeout=0)
    us = {name: statistics.median(values) for name, values in results.items()}
    us["writer"] = us["whole"] - sum(us[name] for name in PARTS if name != "writer")
    return {"parts": us}


def parts(app: Any, calls: int) -> dict[str, Callable[[], float]]:
    """Timers of the parts of ``meisa.upsert`` and of the whole, in the order to run."""
    from flask import has_request_context

    from flask_meisa._contacts import upsert_payload
    from flask_meisa.operations import Operation
    from flask_meisa.signals import emit
    from flask_meisa.signals import operation_queued

    meisa = app.extensions["meisa"]
    state = meisa.state()
    checked = [upsert_payload(payload(n)) for n in range(calls)]
    made = [Operation.checked("upsert", item) for item in checked]

    def signal(i: int) -> None:
        emit(operation_queued, app, operation=made[i], delivering=True)

    return {
        "validation": lambda: per_call(upsert_payload, WARMUP, calls),
        "operation": lambda: timed(lambda i: Operation.checked("upsert", checked[i]), calls),
        "signal": lambda: timed(signal, calls),
        "rest": lambda: timed(
            lambda i: (meisa.state(), has_request_context(), state.delivering()), calls
        ),
        "whole": lambda: per_call(meisa.upsert, WARMUP, calls),
        "handover": lambda: timed(lambda i: state.dispatcher.submit([made[i]]), calls),
    }


def settle(meisa: Any) -> None:
    """Wait (at most 30 s) until the writer thread has stored everything handed over:
    the store's count holds still for 0.2 s."""
    deadline, last, since = time.monotonic() + 30, -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.2:
        pending = meisa.status().pending
        if pending != last:
            last, since = pending, time.monotonic()
        time.sleep(0.02)


def timed(call: Callable[[int], Any], count: int) -> float:
    """Microseconds per ``call(i)`` for i in range(count)."""
    started = time.perf_counter()
    for i in range(count):
        call(i)
    return (time.perf_counter() - started) / count * 1e6


def run(calls: int, rounds: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({variant: median wall ``us`` and ``cpu`` per call}, the breakdown's parts)."""
    names = list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as folder:
        for number in range(rounds):
            progress(f"enqueue: round {number + 1}/{rounds}")
            shift = number % len(names)
            for name in names[shift:] + names[:shift]:
                params = {"variant": name, "calls": calls, "instance": f"{folder}/{number}{name}"}
                results[name].append(baseline.run(VARIANTS[name][0], "enqueue_cost.py", params))
        progress("enqueue: breakdown")
        params = {"variant": "breakdown", "calls": calls, "instance": f"{folder}/breakdown"}
        parts = baseline.run("new", "enqueue_cost.py", params)["parts"]
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("us", "cpu")}
        for name, runs in results.items()
    }
    return medians, parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="timed calls per process")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    sigterm_unwinds()
    print(f"load average at the start: {load_average()}")
    us, parts = run(args.calls, args.rounds)
    print(f"per call, median of {args.rounds} rounds of {args.calls} calls; delivery held back")
    print(f"  {'':48} {'wall':>8}  {'x PostHog':>9}  {'CPU, all threads':>16}")
    for name, (_, label) in VARIANTS.items():
        wall, cpu = us[name]["us"], us[name]["cpu"]
        ratio = wall / us["posthog"]["us"]
        print(f"  {label:48} {wall:5.1f} us  {ratio:8.2f}x  {cpu:13.1f} us")
    print("target: meisa.upsert <= 15 us")
    print(f"breakdown of meisa.upsert, new engine (whole: {parts['whole']:.1f} us)")
    for name, label in PARTS.items():
        print(f"  {label:48} {parts[name]:6.1f} us")


if __name__ == "__main__":
    baseline.main_or_scenario(enqueue)
    main()
