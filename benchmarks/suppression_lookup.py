"""Memory and lookup cost of the suppression set at one million addresses.

Run: ``.venv/bin/python benchmarks/suppression_lookup.py [--size N]``

Prints the memory (tracemalloc) of Meisa's list as the client hands it over and what
:class:`~flask_meisa._suppression.SuppressionSet` adds on top, for an already clean list
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

from flask_meisa._suppression import SuppressionSet


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


#: The per-call measures: name → statement timed in :func:`lookup_namespace`.
LOOKUPS = {
    "frozenset hit": "hit in emails",
    "frozenset miss": "miss in emails",
    "is_suppressed hit": "is_suppressed(hit)",
    "is_suppressed miss": "is_suppressed(miss)",
    "is_suppressed upper-case hit": "is_suppressed(shouting)",
    "freshness check": "monotonic() >= stale_at",
    "monotonic": "monotonic()",
}


def per_call_ns(
    statements: dict[str, str], namespace: dict[str, object], number: int, repeat: int = 5
) -> dict[str, float]:
    """Best of ``repeat`` runs of ``number`` calls of each statement, in nanoseconds per
    call; the runs are interleaved, so that drift hits every statement alike."""
    best = dict.fromkeys(statements, float("inf"))
    for _ in range(repeat):
        for name, stmt in statements.items():
            run = timeit.timeit(stmt, globals=namespace, number=number)
            best[name] = min(best[name], run / number * 1e9)
    return best


def lookup_namespace(s: SuppressionSet, emails: frozenset[str], size: int) -> dict[str, object]:
    """What the :data:`LOOKUPS` statements read: a hit, a miss and an upper-case hit of
    ``emails`` (as built by :func:`addresses`), the loaded set and the bare frozenset."""
    hit = f"user{size // 2}@example{(size // 2) % 997}.com"
    miss = "nobody@example.org"
    shouting = hit.upper()
    assert s.is_suppressed(hit) and s.is_suppressed(shouting) and not s.is_suppressed(miss)
    return {
        "is_suppressed": s.is_suppressed,
        "stale_at": time.monotonic() + 300,
        "monotonic": time.monotonic,
        "emails": emails,
        "hit": hit,
        "miss": miss,
        "shouting": shouting,
    }


def load_traced(emails: frozenset[str]) -> tuple[SuppressionSet, int, int, float]:
    """Load a set over ``emails`` under tracemalloc: (the set, bytes it added, peak bytes,
    seconds the load took)."""
    started = time.perf_counter()
    s, added, peak = traced(lambda: loaded_set(emails))
    seconds = time.perf_counter() - started
    assert isinstance(s, SuppressionSet)
    return s, added, peak, seconds


def mixed_case_footprint(size: int) -> tuple[int, int, float]:
    """What a set over a mixed-case list (normalized into a set of its own) adds: (bytes
    added, peak bytes, load seconds under tracemalloc)."""
    mixed = addresses(size, mixed_case=True)
    s, added, peak, seconds = load_traced(mixed)
    s.close()
    return added, peak, seconds


def clean_list(size: int) -> tuple[frozenset[str], int]:
    """A clean list of ``size`` addresses and the bytes it holds (strings and table)."""
    clean, held, _ = traced(lambda: addresses(size, mixed_case=False))
    assert isinstance(clean, frozenset)
    return clean, held


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=1_000_000)
    args = parser.parse_args()
    size: int = args.size

    clean, clean_held = clean_list(size)
    print(f"{size:,} addresses")
    print(f"  Meisa's list as a frozenset (strings + table):   {mib(clean_held)}")

    s, added_clean, peak_clean, load_clean_s = load_traced(clean)
    print(
        f"  SuppressionSet over a clean list adds:           {mib(added_clean)}"
        f" (peak {mib(peak_clean).strip()}; load {load_clean_s:.2f}s under tracemalloc)"
    )

    added, peak, seconds = mixed_case_footprint(size)
    print(
        f"  SuppressionSet over a mixed-case list adds:      {mib(added)}"
        f" (peak {mib(peak).strip()}; load {seconds:.2f}s under tracemalloc)"
    )

    started = time.perf_counter()
    untraced = loaded_set(clean)
    print(f"  load of a clean list, untraced: {time.perf_counter() - started:.3f}s")
    untraced.close()

    n = args.calls
    ns = per_call_ns(LOOKUPS, lookup_namespace(s, clean, size), n)
    base_hit, base_miss = ns["frozenset hit"], ns["frozenset miss"]
    sup_hit, sup_miss = ns["is_suppressed hit"], ns["is_suppressed miss"]
    sup_shout = ns["is_suppressed upper-case hit"]
    print(f"per call (best of 5 x {n:,}):")
    print(f"  frozenset membership, hit:        {base_hit:7.1f} ns")
    print(f"  frozenset membership, miss:       {base_miss:7.1f} ns")
    print(f"  is_suppressed, hit:               {sup_hit:7.1f} ns  ({sup_hit / base_hit:.1f}x)")
    print(f"  is_suppressed, miss:              {sup_miss:7.1f} ns  ({sup_miss / base_miss:.1f}x)")
    print(
        f"  is_suppressed, upper-case hit:    {sup_shout:7.1f} ns  ({sup_shout / base_hit:.1f}x)"
    )
    print("  parts of is_suppressed, for scale:")
    print(f"    the freshness check (a clock read):         {ns['freshness check']:7.1f} ns")
    print(f"    time.monotonic() (one clock read):         {ns['monotonic']:7.1f} ns")
    s.close()


if __name__ == "__main__":
    main()
