"""The modules of flask-meisa a login and a send pass through, as they run, from Flask-Login's
``login_user`` (and from ``meisa.send``) to the HTTP request to Meisa, in the order they
are first entered, every thread counted (the request's, the writer's, delivery's). The
default configuration (the store file in the instance folder, background delivery), the
embedded emulator answering. Target: a login through at most 8 modules.

    .venv/bin/python benchmarks/login_path.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from flask import Flask
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import login_user

import flask_meisa
from flask_meisa import Meisa
from flask_meisa import _http
from flask_meisa.emulator import Emulator

PACKAGE = Path(flask_meisa.__file__).parent
TARGET = 8


class User(UserMixin):  # type: ignore[misc]
    id = 1
    email = "ada@example.com"
    plan = "free"


class Trace:
    """The modules entered while active, until the first HTTP attempt."""

    def __init__(self) -> None:
        self.modules: dict[str, None] = {}
        self.active = False
        self.reached = threading.Event()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.active or self.reached.is_set():
            return
        path = Path(frame.f_code.co_filename)
        if not path.is_relative_to(PACKAGE) or "emulator" in path.parts:
            return
        self.modules.setdefault(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if frame.f_code is _http.Transport.attempt.__code__:
            self.reached.set()

    def follow(self, action: Callable[[], Any]) -> list[str]:
        """The modules ``action`` (and the threads it wakes) enters before the HTTP call."""
        self.modules.clear()
        self.reached.clear()
        self.active = True
        sys.setprofile(self.profile)
        try:
            action()
            if not self.reached.wait(30):
                raise RuntimeError("no HTTP request to Meisa within 30 s")
        finally:
            sys.setprofile(None)
            self.active = False
        return list(self.modules)


def main() -> None:
    trace = Trace()
    threading.setprofile(trace.profile)  # the engine's threads, started after this
    with Emulator(seed="demo", rate_limit=None) as emulator, tempfile.TemporaryDirectory() as home:
        app = Flask(__name__, instance_path=home)
        app.config.update(SECRET_KEY="path", MEISA_CUSTOM_FIELDS=["plan"])
        app.config.update(MEISA_API_KEY=emulator.live_key, MEISA_BASE_URL=emulator.url)
        LoginManager(app).user_loader(lambda user_id: User())
        meisa = Meisa(app)

        def log_in() -> None:
            with app.test_request_context():  # released as the context ends
                login_user(User())

        try:
            log_in()  # first use: the client, the suppression list
            with app.app_context():
                meisa.is_suppressed("ada@example.com")
                meisa.flush(10)
            User.plan = "pro"  # a change to sync
            login = trace.follow(log_in)
            with app.app_context():
                meisa.flush(10)
                send = trace.follow(lambda: meisa.send("verification_code", "ada@example.com"))
        finally:
            meisa.close()
            threading.setprofile(None)
    for name, modules in (("login", login), ("send", send)):
        print(f"{name}: {len(modules)} modules: {' -> '.join(modules)}")
    print(f"target for a login: at most {TARGET} modules")


if __name__ == "__main__":
    main()
