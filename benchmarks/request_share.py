"""Where a syncing login's cost in the request thread goes, part by part, measured inside
a whole request (the app's WSGI callable), not in a loop of its own: a part costs up to
several times as much there as it does alone (the request's own work leaves the caches
cold for it), so only this says what cutting a part would gain. Each is split at the
response: the CPU until the app returned it (what a login's latency pays), and the CPU of
closing it, after the server wrote it (where Meisa releases the request's work: under
gunicorn, not measurably part of the login's latency).

The login app of ``bench_app.py`` with ``MEISA_ENABLED = False`` (no engine: the request's
share only), its login receiver replaced by each part in turn, each part including those
before it:

- ``receiver``: a receiver that does nothing (the signal's dispatch, the middleware);
- ``map``: the user mapped to its upsert payload (:meth:`Meisa._map`);
- ``check``: and made an operation (:meth:`Operation.checked`: its JSON, its size);
- ``collect``: an operation made beforehand collected for the request, the response held
  and the batch released when it closes (``_deferral``), without mapping;
- ``full``: Meisa's own receiver (mapping and checking the user, then, once the response
  is closed, encoding, merging and releasing).

Prints the request thread's CPU per login of each, before and after the response (the
best of ``--repeats`` rounds of ``--logins``, variants interleaved), and what each adds
to the bare app's.

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
from flask_login import user_logged_in
from support import silent_host
from werkzeug.test import EnvironBuilder

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


def cpu_per_login(app: Flask, logins: int, start: int) -> tuple[float, float]:
    """Seconds of this thread's CPU per login until the app returned its response, and
    closing it, over ``logins`` logins of users in turn."""
    before = after = 0.0
    for number in range(start, start + logins):
        environ = EnvironBuilder(path=f"/login/{number % USERS}", method="POST").get_environ()
        began = time.thread_time()
        body = app(environ, lambda status, headers, exc_info=None: lambda data: None)
        b"".join(body)
        answered = time.thread_time()
        getattr(body, "close", lambda: None)()
        before += answered - began
        after += time.thread_time() - answered
    return before / logins, after / logins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--logins", type=int, default=2000, help="per round")
    parser.add_argument("--repeats", type=int, default=9, help="rounds per variant")
    args = parser.parse_args(argv)
    with silent_host() as url, tempfile.TemporaryDirectory(prefix="bench-share-") as folder:
        apps = {"bare": app_with(url, folder, None, variant="bare")}
        for name, part in PARTS.items():
            apps[name] = app_with(url, f"{folder}/{name}", part)
        for app in apps.values():  # imports, first logins, caches
            cpu_per_login(app, 300, 0)
        best = {name: [float("inf")] * 2 for name in apps}
        for round_number in range(args.repeats):
            for name, app in apps.items():
                spent = cpu_per_login(app, args.logins, round_number * args.logins)
                best[name] = [min(pair) for pair in zip(best[name], spent, strict=True)]
    heads = ("part", "before response", "+ over bare", "closing", "+ over bare")
    print("{:10} {:>16} {:>12} {:>8} {:>12}".format(*heads))
    for name, times in best.items():
        extra = [(mine - bare) * 1e6 for mine, bare in zip(times, best["bare"], strict=True)]
        before, after = (seconds * 1e6 for seconds in times)
        print(f"{name:10} {before:13.1f} us {extra[0]:+12.1f} {after:8.1f} {extra[1]:+12.1f}")
    print("(the request thread's CPU per login, microseconds, best round)")


if __name__ == "__main__":
    main()
