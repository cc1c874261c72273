"""What the delivery store keeps per contact Meisa accepted, and what keeping it costs.

``--users`` users, each accepted once with a typical sync (email, external_id, first name,
seven custom fields: plan, signin_count, last_active, signup_date, mrr, country,
onboarding_completed), then each once more by a login (signin_count and last_active), as
the thread engine's delivering process does: one write transaction per accepted upsert,
its digest folded in by :func:`flask_meisa._engine.known.remember`. Printed per contact:

- the store file's bytes (checkpointed, less an empty store's), after the syncs and after
  the logins, and extrapolated to 100,000 users;
- the CPU time of one ``remember`` of a login (the delivering thread's, per login), and
  of one ``lookup`` of a login's contact by each of its names (the storing thread's, per
  upsert: its lane);
- with ``--redis``: Redis's ``used_memory`` growth per contact for the Celery engine's
  digest (:meth:`~flask_meisa._engine.redis_records.ContactRecords.remember`), on a
  ``redis-server`` of its own.

    .venv/bin/python benchmarks/known_size.py [--users 20000] [--redis]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from contextlib import closing
from typing import Any

from support import load_average
from support import progress
from support import redis_server
from support import sigterm_unwinds

from flask_meisa._engine import known
from flask_meisa._engine.store import Store

COUNTRIES = ["US", "DE", "FR", "GB", "BR", "IN", "JP", "CA"]


def signup(n: int, now: float) -> dict[str, Any]:
    """A user's first sync, as an app sends it."""
    day = time.strftime("%Y-%m-%d", time.gmtime(now - n * 600))
    return {
        "email": f"user{n}@example.com",
        "external_id": str(100_000 + n),
        "first_name": f"User{n}",
        "custom_fields": {
            "plan": ["free", "standard", "pro"][n % 3],
            "signin_count": n % 50,
            "last_active": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now)),
            "signup_date": day,
            "mrr": [0, 19.0, 49.5][n % 3],
            "country": COUNTRIES[n % len(COUNTRIES)],
            "onboarding_completed": n % 2 == 0,
        },
    }


def login(n: int, now: float) -> dict[str, Any]:
    """A later login's sync: the fields a login changes."""
    last = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now))
    fields = {"signin_count": n % 50 + 1, "last_active": last}
    return {
        "email": f"user{n}@example.com",
        "external_id": str(100_000 + n),
        "custom_fields": fields,
    }


def size(path: str) -> int:
    """The store file's bytes, its write-ahead log checkpointed into it."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(path)


def tables(path: str) -> dict[str, int]:
    """Bytes per table and index of the store file (SQLite's ``dbstat``)."""
    with closing(sqlite3.connect(path)) as db:
        query = "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
        return dict(db.execute(query).fetchall())


def thread_engine(
    users: int,
) -> tuple[int, int, int, list[float], dict[str, list[float]], dict[str, int]]:
    """An empty store's bytes, after the syncs, after the logins; CPU seconds per login;
    CPU seconds per lookup by each name; bytes per table and index at the end."""
    with tempfile.TemporaryDirectory(prefix="bench-known-") as folder:
        path = os.path.join(folder, "store.sqlite3")
        store = Store(path)
        empty = size(path)
        now = time.time()
        for n in range(users):
            with store.write() as db:
                known.remember(db, signup(n, now), now + n * 0.001)
        synced = size(path)
        costs = []
        now = time.time() + 3600.0
        for n in range(users):
            payload = login(n, now)
            with store.write() as db:
                started = time.process_time()
                known.remember(db, payload, now + n * 0.001)
                costs.append(time.process_time() - started)
        logged_in = size(path)
        looks: dict[str, list[float]] = {"external_id": [], "email": []}
        for name, looked in looks.items():
            for n in range(users):
                payload = {name: login(n, now)[name]}
                with store.write() as db:
                    started = time.process_time()
                    known.lookup(db, payload)
                    looked.append(time.process_time() - started)
        store.close()
        parts = tables(path)
    return empty, synced, logged_in, costs, looks, parts


def celery_engine(users: int) -> int:
    """Redis's ``used_memory`` growth (bytes) for the digests of ``users`` contacts."""
    import redis

    from flask_meisa._engine.redis_records import ContactRecords

    with redis_server() as url:
        client = redis.Redis.from_url(url)
        try:
            records = ContactRecords(client, "bench")
            before = int(client.info("memory")["used_memory"])
            now = time.time()
            for n in range(users):
                records.remember(signup(n, now), now + n * 0.001)
            now += 3600.0
            for n in range(users):
                records.remember(login(n, now), now + n * 0.001)
            return int(client.info("memory")["used_memory"]) - before
        finally:
            client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--redis", action="store_true", help="the Celery engine's too")
    args = parser.parse_args(argv)
    sigterm_unwinds()
    print(f"load average at the start: {load_average()}")
    progress(f"thread engine: {args.users:,} users")
    empty, synced, logged_in, costs, looks, parts = thread_engine(args.users)
    for label, total in (("after the syncs", synced), ("after a login each", logged_in)):
        per = (total - empty) / args.users
        print(
            f"store file {label:<20} {per:>7,.0f} B/contact"
            f"  ({total / 2**20:,.1f} MiB; 100,000 users: {per * 100_000 / 2**20:,.0f} MiB)"
        )
    for name, total in parts.items():
        if total > 10 * 4096:
            print(f"  {name:<34} {total / args.users:>7,.0f} B/contact")
    micros = [cost * 1e6 for cost in costs]
    print(
        f"remember() of a login, CPU: median {statistics.median(micros):.1f} us,"
        f" mean {statistics.fmean(micros):.1f} us"
    )
    for name, looked in looks.items():
        micros = [cost * 1e6 for cost in looked]
        print(
            f"lookup() by {name + ',':<12} CPU: median {statistics.median(micros):.1f} us,"
            f" mean {statistics.fmean(micros):.1f} us"
        )
    if args.redis:
        progress(f"celery engine: {args.users:,} users")
        grown = celery_engine(args.users)
        per = grown / args.users
        print(
            f"redis used_memory after a login each {per:>7,.0f} B/contact"
            f"  (100,000 users: {per * 100_000 / 2**20:,.0f} MiB)"
        )


if __name__ == "__main__":
    main()
