"""Time to automation: how long plan changes and events wait for Meisa in a login storm.

Meisa's automations react to plan changes and events, so those should not wait behind
routine syncs. 200 users Meisa already knows (synced before the storm) log in 2,000 times a
minute for ``--minutes`` minutes; among the logins come ``--changes`` plan changes a minute
(``plan_changed.send``, each of its own user) and ``--events`` events (``meisa.track``).
Each login changes the user's ``signin_count`` and ``last_active`` (a routine sync). The
storm runs outside a request (a release is the call itself), at Meisa's default budget,
time compressed by ``--scale`` (default 60: the emulator's and the app's budgets both
become 60/second and 1,000/minute, and a minute lasts one second), in a child process on
the new engine and on today's (``baseline.py``), each against its own emulator process.

Prints, per engine, the p50 and p99 wait from release to Meisa's answer (the emulator's
arrival time plus its answering time) of the plan changes and of the events, in benchmark
seconds and their real-time equivalent, with the calls made and the 429s.

    .venv/bin/python benchmarks/time_to_automation.py [--scale 60] [--minutes 3]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone
from typing import Any

import baseline
from support import emulator_process
from support import load_average
from support import percentile
from support import progress
from support import sigterm_unwinds

from flask_meisa import plan_changed


def budget(scale: float) -> str:
    """Meisa's "60/minute;1000/hour", with time divided by ``scale``."""
    return f"60/{60 / scale:g}s;1000/{3600 / scale:g}s"


def schedule(params: dict[str, Any]) -> list[tuple[float, str, int, int]]:
    """(offset, kind, user, number) in time order: the logins, each user's in turn, and
    the plan changes and events spread evenly among them."""
    rng = random.Random(params["seed"])
    users, minutes = params["users"], params["minutes"]
    duration = 60.0 * minutes / params["scale"]
    order = [n for n in range(users) for _ in range(params["logins"] * minutes // users)]
    rng.shuffle(order)
    made = [(duration * i / len(order), "login", n, i) for i, n in enumerate(order)]
    changes, events = params["changes"] * minutes, params["events"] * minutes
    for k in range(changes):  # every fifth user: one change each
        made.append((duration * (k + 0.5) / changes, "plan", k * 5 % users, k))
    for k in range(events):
        made.append((duration * (k + 0.3) / events, "event", rng.randrange(users), k))
    return sorted(made)


def storm(params: dict[str, Any]) -> dict[str, Any]:
    """The scenario (either engine): sync every user, then replay the storm; the release
    time of each plan change and event."""
    import bench_app

    app = bench_app.create_app(
        {"MEISA_RATE_LIMIT": budget(params["scale"])},
        url=params["url"],
        key=params["key"],
        instance=params["instance"],
    )
    meisa, users = app.extensions["meisa"], app.config["USERS"]
    releases: dict[str, float] = {}
    with app.app_context():
        for number in range(params["users"]):
            meisa.upsert(users[number])
        warmed = meisa.flush(120)
        started, began, late = time.monotonic(), time.time(), 0.0
        for offset, kind, number, k in schedule(params):
            delay = started + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            late = max(late, -delay)
            user = users[number]
            if kind == "login":
                user.signin_count += 1
                user.last_active = datetime.now(timezone.utc)
                meisa.upsert(user)
            elif kind == "plan":
                user.plan = f"pro-{k}"
                releases[f"plan-{k}"] = time.time()
                plan_changed.send(app, user=user, old_plan="free", new_plan=user.plan)
            else:
                releases[f"event-{k}"] = time.time()
                meisa.track("exported_report", user=user, properties={"k": k})
        flushed = meisa.flush(params["deadline"])
    return {
        "releases": releases,
        "warmed": warmed,
        "began": began,
        "late": late,
        "flushed": flushed,
    }


@dataclass(frozen=True)
class Result:
    """Waits from release to Meisa's answer (seconds), calls and 429s of the storm."""

    plans: list[float]
    events: list[float]
    missing: int
    calls: int
    throttled: int
    late: float


def answered(requests: list[dict[str, Any]]) -> dict[str, float]:
    """When Meisa answered each plan change and event (the first call that carried it)."""
    found: dict[str, float] = {}
    for r in requests:
        body, done = r["body"] or {}, r["time"] + r["duration"]
        if r["status"] not in (200, 201):
            continue
        if r["path"].endswith("/contacts/upsert/"):
            plan = str(body.get("custom_fields", {}).get("plan", ""))
            if plan.startswith("pro-"):
                found.setdefault(f"plan-{plan[4:]}", done)
        elif r["path"].endswith("/events/track/"):
            found.setdefault(f"event-{body['properties']['k']}", done)
    return found


def run(engine: str, params: dict[str, Any]) -> Result:
    """The storm on ``engine``, against its own emulator with the scaled budget."""
    with (
        emulator_process(rate_limit=budget(params["scale"])) as meisa,
        tempfile.TemporaryDirectory(prefix="bench-automation-") as folder,
    ):
        params = {**params, "url": meisa.url, "key": meisa.key, "instance": folder}
        result = baseline.run(engine, "time_to_automation.py", params)
        if not result["warmed"]:
            raise RuntimeError(f"{engine}: the users were not synced before the storm")
        requests = meisa.requests()
    storm = [r for r in requests if r["time"] >= result["began"]]  # not the warm-up
    done = answered(requests)
    waits = {name: done[name] - at for name, at in result["releases"].items() if name in done}
    return Result(
        plans=[wait for name, wait in waits.items() if name.startswith("plan")],
        events=[wait for name, wait in waits.items() if name.startswith("event")],
        missing=len(result["releases"]) - len(waits),
        calls=len(storm),
        throttled=sum(1 for r in storm if r["status"] == 429),
        late=result["late"],
    )


def build_parser() -> argparse.ArgumentParser:
    """The storm's options (``parse_args([])`` gives the defaults)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", type=float, default=60.0, help="time compression")
    parser.add_argument("--minutes", type=int, default=3, help="the storm's length")
    parser.add_argument("--logins", type=int, default=2000, help="per minute")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--changes", type=int, default=10, help="plan changes per minute")
    parser.add_argument("--events", type=int, default=10, help="per minute")
    parser.add_argument("--deadline", type=float, default=60.0, help="flush after the storm")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def compare(args: argparse.Namespace) -> dict[str, Result]:
    """The storm on each engine (one after the other: a storm is not interleaved)."""
    params = {name: getattr(args, name) for name in vars(args)}
    results = {}
    for engine in baseline.ENGINES:
        progress(f"time to automation: {baseline.LABELS[engine]}")
        results[engine] = run(engine, params)
    return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sigterm_unwinds()
    print(f"load average at the start: {load_average()}")
    results = compare(args)
    print(
        f"{args.minutes} minutes of {args.logins} logins by {args.users} known users, "
        f"{args.changes} plan changes and {args.events} events a minute; budget "
        f"{budget(args.scale)} (≙ 60/minute;1000/hour)"
    )
    for engine, result in results.items():
        print(
            f"{baseline.LABELS[engine]}: {result.calls} calls, {result.throttled} 429s "
            f"(the replay ran at most {result.late * 1000:.0f} ms behind its schedule)"
        )
        for name, waits in (("plan changes", result.plans), ("events", result.events)):
            p50, p99 = percentile(waits, 0.5), percentile(waits, 0.99)
            print(
                f"  {name:12} n={len(waits):3}  p50 {p50:.3f} s (≙ {p50 * args.scale:.0f} s)"
                f"  p99 {p99:.3f} s (≙ {p99 * args.scale:.0f} s)"
            )
        if result.missing:
            print(f"  not answered within the deadline: {result.missing}")


if __name__ == "__main__":
    baseline.main_or_scenario(storm)
    main()
