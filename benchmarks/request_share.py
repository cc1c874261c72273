"""Where a syncing login's cost in the request thread goes, part by part, measured inside
a whole request (Flask's test client), not in a loop of its own: a part costs three to
four times as much there as it does alone (the request's own work leaves the caches cold
for it), so only this says what cutting a part would gain.

The login app of ``bench_app.py`` with ``MEISA_ENABLED = False`` (no engine: the request's
share only), its login receiver replaced by each part in turn, each part including those
before it:

- ``receiver``: a receiver that does nothing (the signal's dispatch, the middleware);
- ``map``: the user mapped to its upsert payload (:meth:`Meisa._map`);
- ``check``: and made an operation (:meth:`Operation.checked`: its JSON, its size);
- ``collect``: an operation made beforehand collected for the request, the response held
  and the batch released when it closes (``_deferral``), without mapping;
- ``full``: Meisa's own receiver (mapping, checking, collecting, releasing).

Prints the request thread's CPU per login of each (the best of ``--repeats`` rounds of
``--logins``, variants interleaved) and what it adds to the bare app's.

    .venv/bin/python benchmarks/request_share.py [--logins 2000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import bench_app
from flask import Flask
from flask.testing import FlaskClient
from flask_login import user_logged_in
from support import silent_host

from flask_meisa import Meisa
from flask_meisa import _deferral
from flask_meisa.operations import Operation

Part = Callable[[Meisa, Any, Any], object]
USERS = 200
READY = Operation.checked("upsert", {"email": "ada@example.com", "external_id": "1"})
PARTS: dict[str, Part | None] = {
    "receiver": lambda meisa, state, user: None,
    "map": lambda meisa, state, user: meisa._map(state, user),
    "check": lambda meisa, state, user: Operation.checked("upsert", meisa._map(state, user)),
    "collect": lambda meisa, state, user: _deferral.enqueue(state, READY),
    "full": None,
}


def app_with(url: str, instance: str, part: Part | None, variant: str = "meisa") -> Flask:
    """The login app whose login receiver is ``part`` (``None``: Meisa's own)."""
    config = {"MEISA_ENABLED": False}
    settings = {"variant": variant, "url": url, "instance": instance, "users": str(USERS)}
    app = bench_app.create_app(config, **settings)
    if part is not None:
        meisa: Meisa = app.extensions["meisa"]
        state = meisa.state(app)
        user_logged_in.disconnect(meisa._on_user_logged_in, sender=app)

        def receiver(sender: Flask, user: Any = None, **extra: Any) -> None:
            part(meisa, state, user)

        user_logged_in.connect(receiver, sender=app, weak=False)
    return app


def cpu_per_login(client: FlaskClient, logins: int, start: int) -> float:
    """Seconds of this thread's CPU per login, over ``logins`` logins of users in turn."""
    began = time.thread_time()
    for number in range(start, start + logins):
        client.post(f"/login/{number % USERS}").close()
    return (time.thread_time() - began) / logins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--logins", type=int, default=2000, help="per round")
    parser.add_argument("--repeats", type=int, default=9, help="rounds per variant")
    args = parser.parse_args(argv)
    with silent_host() as url, tempfile.TemporaryDirectory(prefix="bench-share-") as folder:
        clients = {"bare": app_with(url, folder, None, variant="bare").test_client()}
        for name, part in PARTS.items():
            clients[name] = app_with(url, f"{folder}/{name}", part).test_client()
        for client in clients.values():  # imports, first logins, caches
            cpu_per_login(client, 300, 0)
        best = dict.fromkeys(clients, float("inf"))
        for round_number in range(args.repeats):
            for name, client in clients.items():
                spent = cpu_per_login(client, args.logins, round_number * args.logins)
                best[name] = min(best[name], spent)
    print(f"{'part':10} {'us/login':>9} {'+ over bare':>12}   (request thread CPU, best round)")
    for name, seconds in best.items():
        extra = (seconds - best["bare"]) * 1e6
        print(f"{name:10} {seconds * 1e6:9.1f} {extra:+12.1f}")


if __name__ == "__main__":
    main()
