"""The benchmark suite: the measures that matter, in one run, printed as one table.

1. **request cost** (``login_request_cost.py``): a syncing login under gunicorn (gthread,
   1 worker, 4 threads), default config, p50 and p99 over HTTP for the bare app, a naive
   integration, a Celery task per call, today's engine and the new one (store file, and
   memory; with no sync on login, and with delivery off, to tell the request's share from
   the engine's), at 0 and 300 ms of emulator latency; ratios to bare;
2. **backfill** (``backfill_scale.py``): ``flask meisa sync-users`` over 100,000 users:
   calls, 429s, peak RSS growth, wall time; the rerun's calls; the calls of 2,000 logins
   that change nothing, new engine against today's;
3. **time to automation** (``time_to_automation.py``): the wait of plan changes and
   events for Meisa in a time-compressed login storm at the default budget, new engine
   against today's;
4. **enqueue** (``enqueue_cost.py``): ``meisa.upsert`` beside PostHog's ``capture`` and
   Segment's ``track``, delivery held back, and the parts of ``meisa.upsert``;
5. **suppression** (``suppression_lookup.py``): one million suppressed addresses: an
   ``is_suppressed`` call beside a bare frozenset probe, and the memory the set takes.

Ratios are what to read on a shared machine: the things compared run side by side in one
run (absolute times drift with the load, whose average is printed). Every process the
suite starts (emulators, gunicorns, ``redis-server``, ``celery worker``, children) is
stopped by its pid, on errors and on Ctrl-C or SIGTERM too. About ten minutes on two
cores (the backfill takes most); ``--quick`` shrinks every section, well under two minutes.

    .venv/bin/python benchmarks/suite.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timezone

import backfill_scale
import baseline
import enqueue_cost
import login_request_cost
import suppression_lookup
import time_to_automation
from support import load_average
from support import percentile
from support import progress
from support import sigterm_unwinds


@dataclass(frozen=True)
class Sizes:
    """How much each section does."""

    logins: int  # per variant and latency
    rounds: int
    users: int  # backfilled
    minutes: int  # of the storm
    calls: int  # enqueue calls per process
    enqueue_rounds: int
    addresses: int
    lookups: int  # per lookup timing
    mixed_case: bool  # also load a mixed-case list (normalized: a second copy)


FULL = Sizes(1000, 20, 100_000, 3, 5000, 7, 1_000_000, 1_000_000, True)
QUICK = Sizes(60, 3, 2_000, 1, 2000, 2, 200_000, 100_000, False)
BACKFILL_BUDGET = "2000/second"


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
        header = Row("section", "measure", "value", "ratio / target")
        lines = [header, *self.rows]
        names = ("section", "measure", "value")
        widths = [max(len(getattr(row, name)) for row in lines) for name in names]

        def line(row: Row) -> str:
            cells = zip((row.section, row.measure, row.value), widths, strict=True)
            return "  ".join(cell.ljust(width) for cell, width in cells) + "  " + row.ratio

        rule = "  ".join("-" * width for width in widths) + "  " + "-" * 14
        return "\n".join([line(header), rule, *(line(row) for row in self.rows)]).rstrip()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# -- 1. request cost -----------------------------------------------------------------------


def request_cost(sizes: Sizes, table: Table) -> None:
    section = "1 request cost"
    names = list(login_request_cost.VARIANTS)
    missing = login_request_cost.celery_missing()
    if missing:
        names.remove("celery")
        table.add(section, "Celery task per call", f"left out: {missing}")
    table.add(
        section,
        "setup: gunicorn gthread 1x4, default config; emulator process; p50 / p99",
        "",
    )
    for row in login_request_cost.run(sizes.logins, sizes.rounds, names):
        label = f"{row['latency'] * 1000:.0f} ms: {row['label']}, n={row['n']}"
        ratio = f"{row['p50_ratio']:.2f}x / {row['p99_ratio']:.2f}x bare"
        if row["name"] == "default":
            ratio += " (target 1.05 / 1.20)"
        table.add(section, label, f"{ms(row['p50'])} / {ms(row['p99'])}", ratio)
        table.add(
            section,
            "  worker CPU per login, every thread",
            ms(row["cpu"]),
            f"{row['cpu_ratio']:.2f}x bare",
        )
        if row["backlog"] is not None:
            table.add(section, "  Celery tasks left in the broker then", str(row["backlog"]))


# -- 2. backfill ---------------------------------------------------------------------------


def backfill(sizes: Sizes, table: Table) -> None:
    section = "2 backfill"
    first, again, storms = backfill_scale.measure(sizes.users, BACKFILL_BUDGET)
    table.add(section, f"setup: sync-users, {sizes.users:,} users, budget {BACKFILL_BUDGET}", "")
    table.add(section, "calls made / 429s", f"{first.calls:,} / {first.throttled}")
    table.add(
        section,
        "peak RSS growth of sync-users",
        f"{first.growth / 2**20:.1f} MiB",
        f"target < 50 MiB (RSS after startup {first.rss_start / 2**20:.0f} MiB)",
    )
    table.add(section, "wall time", f"{first.wall:.1f} s")
    table.add(section, "rerun of the finished backfill: calls", str(again.calls), "target 0")
    for engine, storm in storms.items():
        table.add(
            section,
            f"2,000 unchanged logins of 200 users, {baseline.LABELS[engine]}: calls / 429s",
            f"{storm.calls:,} / {storm.throttled}",
            "target <= 200 calls",
        )


# -- 3. time to automation -----------------------------------------------------------------


def automation(sizes: Sizes, table: Table) -> None:
    section = "3 time to automation"
    args = time_to_automation.build_parser().parse_args(["--minutes", str(sizes.minutes)])
    results = time_to_automation.compare(args)
    table.add(
        section,
        f"setup: {args.minutes} min of {args.logins} logins/min, {args.changes} plan changes"
        f" + {args.events} events/min; {time_to_automation.budget(args.scale)} ≙ 60/min",
        "p50 / p99",
    )
    today = results["baseline"]
    for engine, result in results.items():
        label = baseline.LABELS[engine]
        table.add(section, f"{label}: calls / 429s", f"{result.calls} / {result.throttled}")
        for name, waits, before in (
            ("plan changes", result.plans, today.plans),
            ("events", result.events, today.events),
        ):
            p50, p99 = percentile(waits, 0.5), percentile(waits, 0.99)
            real = f"≙ {p50 * args.scale:.0f} / {p99 * args.scale:.0f} s"
            ratio = ""
            if engine != "baseline":
                ratio = f"{p50 / percentile(before, 0.5):.2f}x / "
                ratio += f"{p99 / percentile(before, 0.99):.2f}x today"
            value = f"{p50:.3f} / {p99:.3f} s ({real})"
            table.add(section, f"{label}: {name}, n={len(waits)}", value, ratio)
        if result.missing:
            table.add(section, f"{label}: not answered by the deadline", str(result.missing))


# -- 4. enqueue ----------------------------------------------------------------------------


def enqueue(sizes: Sizes, table: Table) -> None:
    section = "4 enqueue"
    us, parts = enqueue_cost.run(sizes.calls, sizes.enqueue_rounds)
    table.add(
        section,
        f"setup: per call, median of {sizes.enqueue_rounds} rounds of {sizes.calls:,} calls, "
        "a process each; delivery held back",
        "",
    )
    for name, (_, label) in enqueue_cost.VARIANTS.items():
        wall, cpu = us[name]["us"], us[name]["cpu"]
        ratio = f"{wall / us['posthog']['us']:.2f}x PostHog"
        if name == "default":
            ratio += " (target <= 15 us)"
        table.add(
            section, f"{label}: wall (CPU, all threads)", f"{wall:.1f} ({cpu:.1f}) us", ratio
        )
    table.add(section, "breakdown of meisa.upsert (new engine), whole", f"{parts['whole']:.1f} us")
    for name, label in enqueue_cost.PARTS.items():
        table.add(section, f"  {label}", f"{parts[name]:.1f} us")


# -- 5. suppression ------------------------------------------------------------------------


def suppression(sizes: Sizes, table: Table) -> None:
    section = "5 suppression"
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
        wanted = ("frozenset hit", "is_suppressed hit", "frozenset miss", "is_suppressed miss")
        statements = {name: suppression_lookup.LOOKUPS[name] for name in wanted}
        namespace = suppression_lookup.lookup_namespace(loaded, clean, size)
        ns = suppression_lookup.per_call_ns(statements, namespace, sizes.lookups)
    finally:
        loaded.close()
    table.add(section, f"setup: per call, best of 5 x {sizes.lookups:,}, interleaved", "")
    for kind in ("hit", "miss"):
        base, ours = ns[f"frozenset {kind}"], ns[f"is_suppressed {kind}"]
        table.add(section, f"email in frozenset, {kind}", f"{base:.1f} ns")
        table.add(
            section, f"is_suppressed(email), {kind}", f"{ours:.1f} ns", f"{ours / base:.2f}x"
        )


# -- the run -------------------------------------------------------------------------------

SECTIONS: list[tuple[str, Callable[[Sizes, Table], None]]] = [
    ("1 request cost", request_cost),
    ("2 backfill", backfill),
    ("3 time to automation", automation),
    ("4 enqueue", enqueue),
    ("5 suppression", suppression),
]


def main(argv: list[str] | None = None) -> int:
    """Run every section and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="well under two minutes")
    parser.add_argument("--only", nargs="*", choices=[name for name, _ in SECTIONS])
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sigterm_unwinds()
    started = time.monotonic()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    load = load_average()
    table = Table()
    interrupted = False
    try:
        for name, section in SECTIONS:
            if args.only and name not in args.only:
                continue
            began = time.monotonic()
            try:
                section(sizes, table)
            except Exception as error:
                table.failed = True
                traceback.print_exc()
                table.add(name, "failed", f"{type(error).__name__}: {error}"[:200])
            progress(f"{name}: {time.monotonic() - began:.0f} s")
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.monotonic() - started
    print(f"\nflask-meisa benchmark suite{' (--quick)' if args.quick else ''}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"date:    {when}; took {elapsed:.0f} s; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average {load} at the start, "
        f"{load_average()} at the end"
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
