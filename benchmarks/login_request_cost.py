"""The request-path cost of a login that syncs to Meisa.

Serves three versions of one Flask login view with a real threaded WSGI server
(Werkzeug's) on loopback and times logins over HTTP, interleaved in rounds so drift on a
shared machine hits all of them alike:

- ``bare``: Flask-Login only, no Meisa;
- ``meisa-off``: ``Meisa(app)`` with ``MEISA_ENABLED = False``: the extension's own
  in-request work (mapping, validation, collection, release) without any delivery;
- ``meisa``: ``Meisa(app)`` as shipped: thread delivery within the default budget
  (60/minute), so most syncs wait in the engine while the logins run;
- ``meisa-nolimit``: thread delivery with the budget off, so the delivery thread makes a
  call per login and competes with the requests for the GIL;
- ``naive``: the same app calling ``MeisaClient.upsert_contact`` inside the view.

The emulator runs in its own process, answering at once and then after 300 ms. Prints
per-login milliseconds (median and mean) and each version's ratio to ``bare``.

    .venv/bin/python benchmarks/login_request_cost.py [--logins 200] [--rounds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from typing import Any

import requests
from flask import Flask
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import login_user
from werkzeug.serving import make_server

from flask_meisa import Meisa
from flask_meisa import MeisaClient


class User(UserMixin):  # type: ignore[misc]
    def __init__(self, user_id: int) -> None:
        self.id = user_id
        self.email = f"user{user_id}@example.com"
        self.plan = "free"
        self.signin_count = 0


def make_app(
    variant: str, base_url: str, key: str, on_login: Callable[[User], None] | None = None
) -> Flask:
    """The login app of ``variant``; ``on_login``, when given, runs in the view after
    ``login_user`` (another integration's sync)."""
    app = Flask(f"bench_{variant.replace('-', '_')}")
    app.config.update(SECRET_KEY="bench", MEISA_CUSTOM_FIELDS=["plan", "signin_count"])
    users = {i: User(i) for i in range(1, 201)}
    LoginManager(app).user_loader(lambda user_id: users.get(int(user_id)))
    client = MeisaClient(key, base_url)
    if variant.startswith("meisa"):
        app.config.update(MEISA_API_KEY=key, MEISA_BASE_URL=base_url)
        if variant == "meisa-off":
            app.config["MEISA_ENABLED"] = False
        if variant == "meisa-nolimit":
            app.config["MEISA_RATE_LIMIT"] = None
        Meisa(app)

    @app.post("/login/<int:user_id>")
    def login(user_id: int) -> str:
        user = users[user_id]
        user.signin_count += 1
        login_user(user)
        if variant == "naive":
            client.upsert_contact(
                user.email,
                external_id=user.id,
                custom_fields={"plan": user.plan, "signin_count": user.signin_count},
            )
        if on_login is not None:
            on_login(user)
        return "ok"

    return app


@contextlib.contextmanager
def serve(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def emulator_process() -> Iterator[tuple[str, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask_meisa.emulator",
            "--port",
            str(port),
            "--rate-limit",
            "none",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        output = ""
        while "meisa_live_" not in output:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("the emulator did not start")
            output += line
        key = re.search(r"(meisa_live_\w+)", output)
        assert key is not None
        yield f"http://127.0.0.1:{port}", key.group(1)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def set_latency(root_url: str, seconds: float) -> None:
    requests.post(f"{root_url}/_emulator/faults", json={"latency": seconds}, timeout=5)


def time_logins(http: requests.Session, url: str, count: int, offset: int) -> list[float]:
    times = []
    for i in range(count):
        user_id = (offset + i) % 200 + 1
        started = time.perf_counter()
        response = http.post(f"{url}/login/{user_id}")
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return times


def measure(
    http: requests.Session,
    urls: dict[str, str],
    latency: float,
    logins: int,
    rounds: int,
    *,
    blocking: Collection[str] = ("naive",),
    rotate: bool = False,
) -> dict[str, list[float]]:
    """Time ``logins`` logins per version in ``rounds`` interleaved rounds: seconds per login.

    A ``blocking`` version (one that waits on Meisa in the view) makes only two logins a
    round when the emulator is slow. With ``rotate``, each round starts with the next
    version, so that none always follows the same one.
    """
    names = list(urls)
    results: dict[str, list[float]] = {name: [] for name in names}
    per_round = max(1, logins // rounds)
    for round_no in range(rounds):
        shift = round_no % len(names) if rotate else 0
        for name in [*names[shift:], *names[:shift]]:
            count = per_round if name not in blocking or latency == 0 else 2
            results[name] += time_logins(http, urls[name], count, round_no * 7)
    return results


def run(logins: int, rounds: int) -> None:
    variants = ["bare", "meisa-off", "meisa", "meisa-nolimit", "naive"]
    with emulator_process() as (root_url, key):
        base_url = f"{root_url}/api/v1"
        apps = {name: make_app(name, base_url, key) for name in variants}
        with contextlib.ExitStack() as stack:
            urls = {name: stack.enter_context(serve(app)) for name, app in apps.items()}
            http = stack.enter_context(requests.Session())
            for latency in (0.0, 0.3):
                set_latency(root_url, latency)
                results = measure(http, urls, latency, logins, rounds)
                unlimited = apps["meisa-nolimit"]
                with unlimited.app_context():
                    delivered = unlimited.extensions["meisa"].flush(60.0)
                report(latency, results, delivered)
            for name in ("meisa", "meisa-nolimit"):
                meisa: Meisa = apps[name].extensions["meisa"]
                meisa.state(apps[name]).close(0.1)


def report(latency: float, results: dict[str, list[float]], delivered: bool) -> None:
    bare = statistics.median(results["bare"])
    print(f"\nemulator latency {latency * 1000:.0f} ms (meisa-nolimit delivered all: {delivered})")
    print(f"{'version':<14} {'logins':>6} {'median ms':>10} {'mean ms':>9} {'x bare':>7}")
    for name, times in results.items():
        median = statistics.median(times)
        print(
            f"{name:<14} {len(times):>6} {median * 1000:>10.3f} "
            f"{statistics.mean(times) * 1000:>9.3f} {median / bare:>7.2f}"
        )


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--logins", type=int, default=200, help="logins per version")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("flask_meisa").setLevel(
        logging.ERROR
    )  # the budget-bound app ends with work pending
    run(args.logins, args.rounds)


if __name__ == "__main__":
    main()
