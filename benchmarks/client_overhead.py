"""What MeisaClient adds over a bare ``requests.Session.post``, per call.

Runs an in-process emulator (no rate limit) on loopback and times N ``upsert_contact``
calls through the client and N equivalent bare posts on one keep-alive session,
interleaved in rounds so that drift (caches, the emulator's growing state, CPU clock
changes) affects both sides alike. Each round alternates which side goes first.

    .venv/bin/python benchmarks/client_overhead.py [--calls 2000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import requests

from flask_meisa._payloads import upsert_body
from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.operations import encode_body
from flask_meisa.results import Contact


def payload(i: int) -> dict[str, Any]:
    """The same upsert, sent both ways."""
    return {
        "email": f"user{i % 500}@example.com",
        "external_id": str(i % 500),
        "first_name": "Ada",
        "custom_fields": {"plan": "pro", "signin_count": i, "last_active": "2024-05-01T12:00:00Z"},
        "tag_names": ["beta"],
    }


def run(calls: int, rounds: int) -> None:
    """Time both sides and print per-call microseconds and their ratio."""
    per_round = calls // rounds
    with Emulator(seed="demo", rate_limit=None) as emu:
        key = emu.live_key
        url = emu.url + "/contacts/upsert/"
        headers = {
            "X-API-Key": key,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        with MeisaClient(key, emu.url) as client, requests.Session() as session:

            def with_client(i: int) -> None:
                client.upsert_contact(**payload(i))

            def bare(i: int) -> None:
                body = json.dumps(payload(i), separators=(",", ":"))
                response = session.post(url, data=body, headers=headers, timeout=(3.05, 10.0))
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"unexpected status {response.status_code}")
                response.json()

            def timed(call: Callable[[int], None], start: int) -> float:
                began = time.perf_counter()
                for i in range(start, start + per_round):
                    call(i)
                return time.perf_counter() - began

            answer = session.post(url, data=json.dumps(payload(0)), headers=headers).content
            for i in range(50):  # warm both connections and caches
                with_client(i)
                bare(i)
            client_times: list[float] = []
            bare_times: list[float] = []
            gc.collect()
            for r in range(rounds):
                start = r * per_round
                if r % 2 == 0:
                    client_times.append(timed(with_client, start))
                    bare_times.append(timed(bare, start))
                else:
                    bare_times.append(timed(bare, start))
                    client_times.append(timed(with_client, start))

    total = per_round * rounds
    client_us = [t / per_round * 1e6 for t in client_times]
    bare_us = [t / per_round * 1e6 for t in bare_times]
    paired = [c - b for c, b in zip(client_us, bare_us, strict=True)]
    mean_client = sum(client_times) / total * 1e6
    mean_bare = sum(bare_times) / total * 1e6
    print(f"calls per side: {total} in {rounds} interleaved rounds of {per_round}")
    print(
        f"MeisaClient.upsert_contact: mean {mean_client:7.1f} us/call, "
        f"median round {statistics.median(client_us):7.1f}"
    )
    print(
        f"bare Session.post:          mean {mean_bare:7.1f} us/call, "
        f"median round {statistics.median(bare_us):7.1f}"
    )
    print(
        f"overhead: mean {mean_client - mean_bare:+.1f} us/call "
        f"(ratio {mean_client / mean_bare:.3f}); "
        f"median of paired rounds {statistics.median(paired):+.1f} us/call"
    )
    print(f"client-side work alone (validate, encode, parse): {local_work(answer):.1f} us/call")


def local_work(answer: Any, n: int = 5000) -> float:
    """Per-call microseconds of what the client does besides HTTP, with no network."""
    began = time.perf_counter()
    for i in range(n):
        encode_body(upsert_body(payload(i)))
        Contact.from_body(json.loads(answer), 200)
    return (time.perf_counter() - began) / n * 1e6


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per side")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    args = parser.parse_args()
    run(args.calls, args.rounds)


if __name__ == "__main__":
    main()
