"""How long queueing a backfill upsert takes while other upserts of its contact keep
writing the contact's record in Redis (the Celery engine).

Starts a ``redis-server`` on a free loopback port; ``--threads`` threads add live upserts of
one contact to its record nonstop while this one adds ``--tries`` backfill upserts of it
(each reading what Meisa has of the contact in its transaction, as ``sync-users`` does),
one after the other; prints p50 and max of their time, and how many upserts each live
thread added meanwhile (equal counts: each went in turn).

    .venv/bin/python benchmarks/record_contention.py [--threads 16] [--tries 100]

Needs ``redis-server`` and the ``celery`` extra.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import redis
from support import redis_server
from support import sigterm_unwinds

from flask_meisa._engine.redis_store import RedisDeliveryStore
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation

PAYLOAD = {"email": "ada@example.com", "external_id": "42"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--tries", type=int, default=100)
    args = parser.parse_args()
    sigterm_unwinds()
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        store = RedisDeliveryStore(client, "meisa")
        contact = store.contact_of(PAYLOAD)
        assert contact is not None
        stop, made = threading.Event(), [0] * args.threads

        def live(n: int) -> None:
            while not stop.is_set():
                op = Operation("upsert", {**PAYLOAD, "custom_fields": {"n": n}})
                store.coalesce(op, contact, LANE_ROUTINE)
                made[n] += 1

        threads = [threading.Thread(target=live, args=(n,)) for n in range(args.threads)]
        for thread in threads:
            thread.start()
        took = []
        try:
            for _ in range(args.tries):
                op = Operation("upsert", {**PAYLOAD, "first_name": "Ada"}, priority="backfill")
                started = time.monotonic()
                store.coalesce(op, contact, LANE_BACKFILL, read_at=time.time())
                took.append(time.monotonic() - started)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            client.close()
    print(
        f"queueing a backfill upsert beside {args.threads} threads of live ones, "
        f"{args.tries} times: p50 {statistics.median(took):.3f} s, max {max(took):.3f} s"
    )
    print(f"live upserts added per thread: min {min(made)}, max {max(made)}")


if __name__ == "__main__":
    main()
