"""Memory and lookup cost of the suppression set at one million addresses.

Run: ``.venv/bin/python benchmarks/suppression_lookup.py [--size N]``

Prints the memory (tracemalloc) of Meisa's list as the client hands it over and what
:class:`~flask_meisa.suppression.SuppressionSet` adds on top, for an already clean list
(lowercase, no spaces: shared, not copied) and for a mixed-case one (normalized into a new
set); then the cost of one ``is_suppressed`` call beside a bare ``frozenset`` membership test,
as a ratio from this one run.
"""

from __future__ import annotations

import argparse
import gc
import time
import timeit
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from flask_meisa.suppression import SuppressionSet


@dataclass(frozen=True)
class Snapshot:
    emails: frozenset[str]
    as_of: str | None


def addresses(size: int, *, mixed_case: bool) -> frozenset[str]:
    """``size`` distinct addresses, built the way a parsed JSON answer would hold them."""
    shape = "User{0}@Example{1}.COM" if mixed_case else "user{0}@example{1}.com"
    return frozenset(shape.format(i, i % 997) for i in range(size))


def traced(build: Callable[[], object]) -> tuple[object, int, int]:
    """Run ``build`` under tracemalloc: (its result, bytes still held, peak bytes)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = build()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held, peak


def loaded_set(emails: frozenset[str]) -> SuppressionSet:
    """A loaded set whose fetch hands back ``emails``."""
    s = SuppressionSet(lambda: Snapshot(emails, "bench"))
    if not s.load():
        raise SystemExit(f"load failed: {s.last_error}")
    return s


def per_call_ns(stmt: str, namespace: dict[str, object], number: int) -> float:
    """Best of five runs of ``number`` calls, in nanoseconds per call."""
    runs = timeit.repeat(stmt, globals=namespace, number=number, repeat=5)
    return min(runs) / number * 1e9


def report_mixed(size: int) -> None:
    """Memory and load time over a mixed-case list (normalized into a set of its own)."""
    mixed = addresses(size, mixed_case=True)
    started = time.perf_counter()
    s, added, peak = traced(lambda: loaded_set(mixed))
    seconds = time.perf_counter() - started
    assert isinstance(s, SuppressionSet)
    print(
        f"  SuppressionSet over a mixed-case list adds:      {mib(added)}"
        f" (peak {mib(peak).strip()}; load {seconds:.2f}s under tracemalloc)"
    )
    s.close()


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=1_000_000)
    args = parser.parse_args()
    size: int = args.size

    clean, clean_held, _ = traced(lambda: addresses(size, mixed_case=False))
    assert isinstance(clean, frozenset)
    print(f"{size:,} addresses")
    print(f"  Meisa's list as a frozenset (strings + table):   {mib(clean_held)}")

    started = time.perf_counter()
    s, added_clean, peak_clean = traced(lambda: loaded_set(clean))
    load_clean_s = time.perf_counter() - started
    assert isinstance(s, SuppressionSet)
    print(
        f"  SuppressionSet over a clean list adds:           {mib(added_clean)}"
        f" (peak {mib(peak_clean).strip()}; load {load_clean_s:.2f}s under tracemalloc)"
    )

    report_mixed(size)

    started = time.perf_counter()
    untraced = loaded_set(clean)
    print(f"  load of a clean list, untraced: {time.perf_counter() - started:.3f}s")
    untraced.close()

    hit = f"user{size // 2}@example{(size // 2) % 997}.com"
    miss = "nobody@example.org"
    shouting = hit.upper()
    fresh: TTLCache[str, bool] = TTLCache(maxsize=1, ttl=300)
    fresh["fresh"] = True
    namespace: dict[str, object] = {
        "is_suppressed": s.is_suppressed,
        "fresh": fresh,
        "monotonic": time.monotonic,
        "emails": clean,
        "hit": hit,
        "miss": miss,
        "shouting": shouting,
    }
    assert s.is_suppressed(hit) and s.is_suppressed(shouting) and not s.is_suppressed(miss)

    n = args.calls
    base_hit = per_call_ns("hit in emails", namespace, n)
    base_miss = per_call_ns("miss in emails", namespace, n)
    sup_hit = per_call_ns("is_suppressed(hit)", namespace, n)
    sup_miss = per_call_ns("is_suppressed(miss)", namespace, n)
    sup_shout = per_call_ns("is_suppressed(shouting)", namespace, n)
    ttl_check = per_call_ns("'fresh' in fresh", namespace, n)
    clock_read = per_call_ns("monotonic()", namespace, n)
    print(f"per call (best of 5 x {n:,}):")
    print(f"  frozenset membership, hit:        {base_hit:7.1f} ns")
    print(f"  frozenset membership, miss:       {base_miss:7.1f} ns")
    print(f"  is_suppressed, hit:               {sup_hit:7.1f} ns  ({sup_hit / base_hit:.1f}x)")
    print(f"  is_suppressed, miss:              {sup_miss:7.1f} ns  ({sup_miss / base_miss:.1f}x)")
    print(
        f"  is_suppressed, upper-case hit:    {sup_shout:7.1f} ns  ({sup_shout / base_hit:.1f}x)"
    )
    print("  parts of is_suppressed, for scale:")
    print(f"    one-entry TTLCache membership (freshness): {ttl_check:7.1f} ns")
    print(f"    time.monotonic() (one clock read):         {clock_read:7.1f} ns")
    s.close()


if __name__ == "__main__":
    main()
