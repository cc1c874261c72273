"""A backfill at scale, its rerun, and a storm of logins that change nothing.

1. ``flask meisa sync-users`` over ``--users`` users (``bench_app.py``, users streamed as
   a database cursor gives them) in a child process, against an emulator whose budget is
   raised to ``--budget``, with the app's ``MEISA_RATE_LIMIT`` the same: calls made, 429s,
   the child's peak RSS growth (its ``VmHWM``, read every 50 ms until it exits, minus its
   RSS when it printed the plan, after startup; not ``ru_maxrss``, which counts the parent's
   pages the child shared before ``exec``) and the wall time. Target: under 50 MiB
   for 100,000 users.
2. The same command again on the finished backfill: the calls it makes (target: 0).
3. 2,000 logins by 200 users whose synced fields do not change (only ``plan`` is synced),
   in 10 passes of one login each, flushed after each pass, on the new engine and on
   today's (``baseline.py``), each against its own emulator: the calls each makes
   (target: at most 200, the first login of each user).

    .venv/bin/python benchmarks/backfill_scale.py [--users 100000] [--budget 2000/second]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import baseline
from support import HERE
from support import load_average
from support import progress
from support import sigterm_unwinds
from support import stop

from flask_meisa.emulator import Emulator

UPSERT = "/api/v1/contacts/upsert/"


@dataclass(frozen=True)
class Backfill:
    """What one ``sync-users`` run did."""

    calls: int
    throttled: int
    rss_start: int  # bytes
    rss_peak: int  # bytes
    wall: float  # seconds, start to exit
    last_line: str

    @property
    def growth(self) -> int:
        return self.rss_peak - self.rss_start


@dataclass(frozen=True)
class Storm:
    """What one engine made of the unchanged-login storm."""

    calls: int
    throttled: int
    wall: float  # seconds, including the engine's process start


def rss(pid: int, field: str = "VmRSS") -> int:
    """The process's resident set now (or its high-water mark, ``VmHWM``), in bytes; 0
    once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0  # gone, or a zombie, which has no memory left


def watch_peak(pid: int, peak: list[int], every: float = 0.05) -> threading.Thread:
    """Keep ``peak[0]`` at the process's last read ``VmHWM`` until it exits."""

    def watch() -> None:
        while seen := rss(pid, "VmHWM"):
            peak[0] = max(peak[0], seen)
            time.sleep(every)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def sync_users(emulator: Emulator, users: int, budget: str, instance: str) -> Backfill:
    """Run ``flask meisa sync-users`` in a child process (stopped by its pid on errors)."""
    before = len(emulator.requests)
    env = baseline.environ(
        "new",
        BENCH_URL=emulator.url,
        BENCH_KEY=emulator.live_key,
        BENCH_USERS=str(users),
        BENCH_INSTANCE=instance,
        BENCH_CONFIG=json.dumps({"MEISA_RATE_LIMIT": budget}),
    )
    command = [sys.executable, "-m", "flask", "--app", "bench_app:create_app"]
    command += ["meisa", "sync-users"]
    started = time.monotonic()
    with open(f"{instance}.log", "ab") as log:
        child = subprocess.Popen(
            command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        assert child.stdout is not None
        plan = child.stdout.readline()  # printed once the app is up, before any user is read
        if not plan:
            raise RuntimeError("sync-users printed nothing")
        start, peak = rss(child.pid), [0]
        watcher = watch_peak(child.pid, peak)
        lines = [plan, *child.stdout]  # ends when the child closes it, just before it exits
        watcher.join()
        child.wait()
    finally:
        stop(child)
        if child.stdout is not None:
            child.stdout.close()
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise RuntimeError(f"sync-users exited {child.returncode}: {''.join(lines)[-2000:]}")
    made = emulator.requests[before:]
    throttled = sum(1 for r in made if r.status == 429)
    return Backfill(len(made), throttled, start, peak[0], wall, lines[-1].strip())


def storm(params: dict[str, Any]) -> dict[str, Any]:
    """The scenario (either engine): 10 passes of 200 logins that change no synced field."""
    import bench_app

    app = bench_app.create_app(
        {"MEISA_CUSTOM_FIELDS": ["plan"], "MEISA_RATE_LIMIT": None},
        url=params["url"],
        key=params["key"],
        instance=params["instance"],
    )
    client = app.test_client()
    flushed = True
    for _ in range(params["passes"]):
        for number in range(params["users"]):
            client.post(f"/login/{number}", buffered=True)
        with app.app_context():
            flushed = app.extensions["meisa"].flush(60) and flushed
    return {"flushed": flushed}


def unchanged_storm(engine: str, folder: str, users: int = 200, passes: int = 10) -> Storm:
    """What ``engine`` makes of the storm, against its own emulator."""
    with Emulator(seed="demo", rate_limit=None, send_guardrail=None) as emulator:
        params = {"url": emulator.url, "key": emulator.live_key, "users": users}
        params.update(passes=passes, instance=f"{folder}/storm-{engine}")
        started = time.monotonic()
        result = baseline.run(engine, "backfill_scale.py", params)
        if not result["flushed"]:
            raise RuntimeError(f"the {engine} storm did not deliver everything")
        throttled = sum(1 for r in emulator.requests if r.status == 429)
        return Storm(len(emulator.requests), throttled, time.monotonic() - started)


def measure(users: int, budget: str) -> tuple[Backfill, Backfill, dict[str, Storm]]:
    """The backfill, its rerun, and the storm per engine."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-backfill-") as folder,
        Emulator(seed="demo", rate_limit=budget, send_guardrail=None) as emulator,
    ):
        progress(f"backfill: {users:,} users")
        first = sync_users(emulator, users, budget, f"{folder}/instance")
        progress("backfill: again")
        again = sync_users(emulator, users, budget, f"{folder}/instance")
        storms = {}
        for engine in baseline.ENGINES:
            progress(f"unchanged logins: {baseline.LABELS[engine]}")
            storms[engine] = unchanged_storm(engine, folder)
    return first, again, storms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--budget", default="2000/second", help="emulator and app alike")
    args = parser.parse_args(argv)
    sigterm_unwinds()
    print(f"load average at the start: {load_average()}")
    first, again, storms = measure(args.users, args.budget)
    print(f"budget {args.budget} (emulator and app); RSS growth: peak less after startup")
    print(f"{'run':<60} {'calls':>8} {'429s':>5} {'RSS growth':>11} {'wall':>8}")
    for label, run in (
        (f"backfill of {args.users:,} users", first),
        ("rerun (target 0 calls)", again),
    ):
        growth = f"{run.growth / 2**20:.1f} MiB"
        print(f"{label:<60} {run.calls:>8,} {run.throttled:>5} {growth:>11} {run.wall:>7.1f}s")
    for engine, storm in storms.items():
        label = f"2,000 unchanged logins, {baseline.LABELS[engine]}"
        print(f"{label:<60} {storm.calls:>8,} {storm.throttled:>5} {'-':>11} {storm.wall:>7.1f}s")
    print("targets: RSS growth < 50 MiB; rerun 0 calls; unchanged logins <= 200 calls")
    print(f"backfill's last line: {first.last_line}")


if __name__ == "__main__":
    baseline.main_or_scenario(storm)
    main()
