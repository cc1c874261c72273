"""Requests per second the Meisa emulator answers on loopback.

Keep-alive clients alternate ``GET /ping/`` and ``POST /contacts/upsert/`` for a few
seconds. Three set-ups are measured:

- ``inprocess``: the emulator in this process, as the test suite uses it, and client
  threads with one ``requests.Session`` each (clients and server share one GIL);
- ``subprocess``: the same client threads against ``python -m flask_meisa.emulator``;
- ``capacity``: the emulator's own ceiling: ``python -m flask_meisa.emulator`` hammered by
  client *processes* using the lighter ``http.client``.

Run: ``.venv/bin/python benchmarks/emulator_throughput.py [--seconds 3] [--clients 4]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests

from flask_meisa.emulator import Emulator


@contextmanager
def in_process() -> Iterator[tuple[str, str]]:
    """An emulator in this process; yields its URL and live key."""
    with Emulator(seed="demo", rate_limit=None, send_guardrail=None) as emu:
        yield emu.url, emu.live_key


@contextmanager
def in_subprocess() -> Iterator[tuple[str, str]]:
    """An emulator in a child process; yields its URL and live key, stops it on SIGTERM."""
    command = [
        sys.executable,
        "-m",
        "flask_meisa.emulator",
        "--port",
        "0",
        "--rate-limit",
        "none",
        "--send-guardrail",
        "none",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        assert process.stdout is not None
        try:
            lines = [process.stdout.readline() for _ in range(4)]
            yield lines[0].split()[-1], lines[3].split()[-1]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)


def hammer(url: str, key: str, threads: int, seconds: float) -> tuple[int, int, float]:
    """Run the client threads; returns (answers, errors, elapsed seconds)."""
    counts = [0] * threads
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def client(index: int) -> None:
        with requests.Session() as session:
            session.headers["X-API-Key"] = key
            start.wait()
            n = 0
            while time.perf_counter() < deadline[0]:
                if n % 2:
                    email = f"user{index}-{n % 100}@example.com"
                    payload = {"email": email, "custom_fields": {"n": n}}
                    answer = session.post(url + "/contacts/upsert/", json=payload, timeout=10)
                else:
                    answer = session.get(url + "/ping/", timeout=10)
                if answer.status_code >= 300:
                    errors[index] += 1
                n += 1
            counts[index] = n

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for worker in workers:
        worker.join()
    return sum(counts), sum(errors), time.perf_counter() - began


def light_client(url: str, key: str, index: int, seconds: float) -> tuple[int, int]:
    """One ``http.client`` connection in its own process; returns (answers, errors)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    answers = errors = 0
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            if answers % 2:
                email = f"user{index}-{answers % 100}@example.com"
                body = json.dumps({"email": email, "custom_fields": {"n": answers}}).encode()
                connection.request("POST", parts.path + "/contacts/upsert/", body, headers)
            else:
                connection.request("GET", parts.path + "/ping/", headers=headers)
            response = connection.getresponse()
            response.read()
            errors += response.status >= 300
            answers += 1
    finally:
        connection.close()
    return answers, errors


def capacity(url: str, key: str, clients: int, seconds: float) -> tuple[int, int, float]:
    """Run ``light_client`` in ``clients`` processes; returns (answers, errors, seconds)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(clients) as pool:
        results = pool.starmap(light_client, [(url, key, i, seconds) for i in range(clients)])
    return sum(r[0] for r in results), sum(r[1] for r in results), seconds


def main() -> None:
    """Measure and print requests/second for each set-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4, help="client threads/processes")
    parser.add_argument(
        "--mode", choices=("inprocess", "subprocess", "capacity", "all"), default="all"
    )
    args = parser.parse_args()
    modes = ("inprocess", "subprocess", "capacity") if args.mode == "all" else (args.mode,)
    print(f"{os.cpu_count()} CPUs, {args.clients} clients, {args.seconds:g} s per set-up")
    for mode in modes:
        with (in_process if mode == "inprocess" else in_subprocess)() as (url, key):
            run = capacity if mode == "capacity" else hammer
            answers, errors, elapsed = run(url, key, args.clients, args.seconds)
        print(
            f"{mode:>10}: {answers / elapsed:8.0f} requests/second "
            f"({answers} answers, {errors} non-2xx; ping + upsert, keep-alive)"
        )


if __name__ == "__main__":
    main()
