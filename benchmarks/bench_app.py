"""The app the benchmarks serve and drive, under either engine (public API only): users who
log in, and ``flask meisa sync-users`` over all of them.

Configured by the environment, so that gunicorn and ``flask --app`` can load it:
``BENCH_VARIANT`` (``meisa``, the default; ``bare``: no Meisa; ``naive``: a
``requests.post`` to Meisa in the login view; ``celery``: a plain Celery task per login,
``.delay()`` in the view, on the broker ``BENCH_BROKER``), ``BENCH_URL`` and ``BENCH_KEY``
(Meisa's base URL and key), ``BENCH_INSTANCE`` (the instance folder), ``BENCH_USERS``
(default 200) and ``BENCH_CONFIG`` (JSON of more config keys).

    gunicorn --chdir benchmarks 'bench_app:create_app()'
    celery -A bench_app:worker worker --pool=threads    # the Celery variant's worker
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime
from datetime import timezone
from typing import Any

import requests
from flask import Flask
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import login_user

import flask_meisa
from flask_meisa import Meisa

#: The custom fields a login changes (``signin_count``, ``last_active``) and ``plan``.
FIELDS = ["plan", "signin_count", "last_active"]


class User(UserMixin):  # type: ignore[misc]
    def __init__(self, number: int) -> None:
        self.id = number
        self.email = f"user{number}@example.com"
        self.plan = "free"
        self.signin_count = 0
        self.last_active: datetime | None = None

    def contact(self) -> dict[str, Any]:
        """What a naive integration sends on login."""
        fields = {"plan": self.plan, "signin_count": self.signin_count}
        fields["last_active"] = self.last_active.isoformat() if self.last_active else None
        return {"email": self.email, "external_id": str(self.id), "custom_fields": fields}


class Users(dict[int, User]):
    """The users who logged in, made on first use (a backfill reads fresh ones)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def __missing__(self, number: int) -> User:
        if not 0 <= number < self.count:
            raise KeyError(number)
        user = self[number] = User(number)
        return user

    def stream(self) -> Iterator[User]:
        """Every user, as a database cursor would give them (none kept alive)."""
        return (User(n) for n in range(self.count))


def create_app(config: dict[str, Any] | None = None, **settings: str) -> Flask:
    """The app (see the module's docstring). ``config`` adds config keys; ``settings``
    (``variant``, ``url``, ``key``, ``instance``, ``users``) override ``BENCH_*``."""
    env = {**os.environ, **{f"BENCH_{name.upper()}": value for name, value in settings.items()}}
    variant = env.get("BENCH_VARIANT", "meisa")
    app = Flask(__name__, instance_path=env.get("BENCH_INSTANCE") or None)
    url, key = env.get("BENCH_URL", ""), env.get("BENCH_KEY", "")
    app.config.update(SECRET_KEY="bench", MEISA_CUSTOM_FIELDS=FIELDS)
    app.config.update(MEISA_API_KEY=key, MEISA_BASE_URL=url)
    app.config.update(json.loads(env.get("BENCH_CONFIG") or "{}"))
    app.config.update(config or {})
    users = app.config["USERS"] = Users(int(env.get("BENCH_USERS") or 200))
    LoginManager(app).user_loader(lambda user_id: users.get(int(user_id)))
    task = celery_app(env["BENCH_BROKER"]).tasks[TASK] if variant == "celery" else None
    if variant == "meisa":
        meisa = Meisa(app)
        try:
            meisa.users_to_sync(users.stream, count=lambda: users.count)
        except TypeError:  # today's engine takes no count
            meisa.users_to_sync(users.stream)

    @app.get("/ping")
    def ping() -> str:
        return flask_meisa.__file__ or ""  # which engine this process runs

    @app.get("/threads")
    def threads() -> dict[str, str]:
        """This process's threads: {native thread id: name}, to read their CPU in /proc."""
        return {str(thread.native_id): thread.name for thread in threading.enumerate()}

    @app.post("/login/<int:number>")
    def login(number: int) -> str:
        user = users[number]
        user.signin_count += 1
        user.last_active = datetime.now(timezone.utc)
        login_user(user)
        if variant == "naive":
            answer = requests.post(
                f"{url}/contacts/upsert/",
                json=user.contact(),
                headers={"X-API-Key": key},
                timeout=10,
            )
            answer.raise_for_status()
        if task is not None:
            task.delay(user.contact())
        return "ok"

    return app


TASK = "bench.upsert_contact"


def celery_app(broker: str) -> Any:
    """A plain Celery app with one task that upserts a contact with ``requests.post``."""
    from celery import Celery  # type: ignore[import-untyped]

    app = Celery("bench", broker=broker, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name=TASK)
    def upsert_contact(contact: dict[str, Any]) -> None:
        url, key = os.environ["BENCH_URL"], os.environ["BENCH_KEY"]
        answer = requests.post(
            f"{url}/contacts/upsert/", json=contact, headers={"X-API-Key": key}, timeout=10
        )
        answer.raise_for_status()

    return app


def __getattr__(name: str) -> Any:
    # ``celery -A bench_app:worker``: built on demand, so that importing starts nothing;
    # it pushes to the list ``bench:ready`` once it consumes.
    if name != "worker":
        raise AttributeError(name)
    import redis
    from celery.signals import worker_ready  # type: ignore[import-untyped]

    broker = os.environ["BENCH_BROKER"]

    def ready(sender: Any = None, **extra: Any) -> None:
        with redis.Redis.from_url(broker) as client:
            client.rpush("bench:ready", "1")

    worker_ready.connect(ready, weak=False)
    app = globals()["worker"] = celery_app(broker)
    return app
