"""A small app with many users, for backfill tests (in-process, or ``flask --app
tests.backfill_app meisa sync-users`` in a subprocess, configured by the environment:
``MEISA_TEST_URL``, ``MEISA_TEST_KEY``, ``BACKFILL_USERS``, ``BACKFILL_INSTANCE`` and
optionally ``BACKFILL_RATE_LIMIT``, ``BACKFILL_FLUSH_TIMEOUT``)."""

from __future__ import annotations

import copy
import os
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import login_user

from flask_meisa import Meisa
from flask_meisa._engine import backfill
from flask_meisa.emulator import Emulator


class User(UserMixin):  # type: ignore[misc]
    def __init__(self, number: int, plan: str = "free") -> None:
        self.id = number
        self.email: str | None = f"user{number}@example.com"
        self.plan: Any = plan
        self.signin_count = 0


def create_app(config: dict[str, Any] | None = None, users: int | None = None) -> Flask:
    """The app; ``users`` users numbered from 0 (default ``BACKFILL_USERS``)."""
    env = os.environ
    app = Flask(__name__, instance_path=env.get("BACKFILL_INSTANCE"))
    app.config.update(
        SECRET_KEY="test",
        MEISA_API_KEY=env.get("MEISA_TEST_KEY"),
        MEISA_BASE_URL=env.get("MEISA_TEST_URL"),
        MEISA_RATE_LIMIT=env.get("BACKFILL_RATE_LIMIT") or None,
        MEISA_CUSTOM_FIELDS=["plan"],
        MEISA_FLUSH_TIMEOUT=float(env.get("BACKFILL_FLUSH_TIMEOUT", "0.5")),
    )
    app.config.update(config or {})
    count = int(env.get("BACKFILL_USERS", "0")) if users is None else users
    people = {n: User(n) for n in range(count)}
    app.config["PEOPLE"] = people
    login_manager = LoginManager(app)
    login_manager.user_loader(lambda user_id: people.get(int(user_id)))
    meisa = Meisa(app)

    @meisa.users_to_sync(count=lambda: len(people))
    def every_user() -> Iterator[User]:
        return (people[n] for n in sorted(people))

    @app.post("/login/<int:number>")
    def login(number: int) -> str:
        user = people[number]
        user.signin_count += 1
        login_user(user)
        return "ok"

    return app


def interrupt_first_run(app: Flask, at: int) -> None:
    """Make the next ``sync-users`` run stop (Ctrl-C) as it reads its ``at``-th user; the
    runs after it read every user."""
    meisa: Meisa = app.extensions["meisa"]
    query, count = meisa.user_source  # type: ignore[misc]
    runs = 0

    def users() -> Iterator[User]:
        nonlocal runs
        runs += 1
        for read, person in enumerate(query(), start=1):
            if runs == 1 and read == at:
                raise KeyboardInterrupt
            yield person

    meisa.users_to_sync(users, count=count)


def upgrade_while_read(app: Flask, live_sync: Callable[[User], None], number: int = 5) -> None:
    """Make ``sync-users`` read user ``number`` as it is, then upgrade it to "pro" and call
    ``live_sync(user)`` in the app's context (the web app syncing the upgrade) before the
    rest of the chunk is read: the run holds the row as it was read."""
    meisa: Meisa = app.extensions["meisa"]
    people = app.config["PEOPLE"]
    _, count = meisa.user_source  # type: ignore[misc]

    def users() -> Iterator[User]:
        for each in sorted(people):
            row = copy.copy(people[each])
            if each == number:
                people[each].plan = "pro"
                with app.app_context():
                    live_sync(people[each])
            yield row

    meisa.users_to_sync(users, count=count)


def hold_after_first_chunk(meisa: Meisa) -> threading.Event:
    """Make ``sync-users`` of ``meisa``'s app wait, its first chunk queued, until the event
    returned is set."""
    query, count = meisa.user_source  # type: ignore[misc]
    go_on = threading.Event()

    def users() -> Iterator[Any]:
        for read, person in enumerate(query()):
            if read == backfill.CHUNK:
                assert go_on.wait(60)
            yield person

    meisa.users_to_sync(users, count=count)
    return go_on


def live_sync_retried(meisa: Meisa, emulator: Emulator) -> Callable[[User], None]:
    """A live sync of a user (for :func:`upgrade_while_read`) whose first call Meisa answers
    503: it waits to retry."""

    def live_sync(user: User) -> None:
        emulator.faults.fail_next(1, 503, path="/contacts/upsert/")
        meisa.upsert(user, priority="high")
        assert emulator.wait_for(lambda e: len(e.requests_to("/contacts/upsert/")) == 1, 10)

    return live_sync


ROOT = Path(__file__).resolve().parent.parent


def sync_users_process(url: str, key: str, users: int, instance: Path) -> dict[str, Any]:
    """``subprocess`` arguments that run ``flask meisa sync-users`` of this app, with
    ``users`` users and its instance folder at ``instance``, against Meisa at ``url``."""
    env = {
        **os.environ,
        "MEISA_TEST_URL": url,
        "MEISA_TEST_KEY": key,
        "BACKFILL_USERS": str(users),
        "BACKFILL_INSTANCE": str(instance),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "flask", "--app", "tests.backfill_app", "meisa", "sync-users"]
    return {"args": command, "env": env, "cwd": ROOT}
