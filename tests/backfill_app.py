"""A small app with many users, for backfill tests (in-process, or ``flask --app
tests.backfill_app meisa sync-users`` in a subprocess, configured by the environment:
``MEISA_TEST_URL``, ``MEISA_TEST_KEY``, ``BACKFILL_USERS``, ``BACKFILL_INSTANCE`` and
optionally ``BACKFILL_RATE_LIMIT``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from flask import Flask
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import login_user

from flask_meisa import Meisa


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
        MEISA_FLUSH_TIMEOUT=0.5,
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
