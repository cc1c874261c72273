"""Several gunicorn worker processes sharing one outbox share one rate budget.

Real gunicorn, three sync workers, with and without ``--preload``, against the emulator
with Meisa's budget scaled down (the app's ``MEISA_RATE_LIMIT`` is the emulator's). Many
logins are driven at once; each worker writes its syncs and events to the outbox and the
one worker holding the delivery lock delivers them all. Three workers each spending the
whole budget would draw 429s; one budget per host draws none, and nothing is lost.

``create_app()`` is the app gunicorn serves (``tests.test_gunicorn_outbox:create_app()``),
configured from ``MEISA_TEST_URL``, ``MEISA_TEST_KEY``, ``OUTBOX`` and ``RATE_LIMIT``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask_login import LoginManager
from flask_login import login_user

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from flask_meisa.engine.hostlock import HostLock
from flask_meisa.engine.outbox import Outbox
from flask_meisa.engine.outbox import OutboxCounts
from tests.apps import User

ROOT = Path(__file__).resolve().parent.parent
RATE = "40/second"
USERS = 15
LOGINS = 6  # per user
WORKERS = 3


def create_app() -> Flask:
    """The app under gunicorn: ``POST /login/<user>/<visit>`` logs the user in (Flask-Login
    syncs them, with a custom field per visit) and tracks ``logged_in``."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test",
        MEISA_API_KEY=os.environ["MEISA_TEST_KEY"],
        MEISA_BASE_URL=os.environ["MEISA_TEST_URL"],
        MEISA_OUTBOX=os.environ["OUTBOX"] or None,  # empty: no outbox (for comparison)
        MEISA_RATE_LIMIT=os.environ["RATE_LIMIT"],
        MEISA_RETRY_BASE_DELAY=0.05,
        MEISA_RETRY_MAX_DELAY=1.0,
    )
    login_manager = LoginManager(app)
    login_manager.user_loader(lambda user_id: None)
    meisa = Meisa(app)

    @meisa.contact_mapper
    def to_contact(user: User) -> dict[str, Any]:
        visit = user.visit
        return {
            "email": user.email,
            "external_id": str(user.id),
            "custom_fields": {f"login_{visit}": visit},
        }

    @app.post("/login/<int:user_id>/<int:visit>")
    def login(user_id: int, visit: int) -> dict[str, int]:
        user = User(user_id, f"user{user_id}@example.com", visit=visit)
        login_user(user)
        meisa.track("logged_in", user=user, properties={"visit": visit})
        return {"pid": os.getpid()}

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A gunicorn master and the lines it logs (read on a thread, so the pipe never
    fills), with events for "listening" and for each worker booted."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<exited>")
            self.changed.notify_all()

    def wait_for(self, test: Callable[[list[str]], bool], timeout: float = 20) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: test(self.lines), timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=40)
        self.reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


@contextmanager
def gunicorn(emu: Emulator, outbox: Path, *options: str) -> Iterator[Server]:
    port = free_port()
    env = {
        **os.environ,
        "MEISA_TEST_URL": emu.url,
        "MEISA_TEST_KEY": emu.live_key,
        "OUTBOX": str(outbox),
        "RATE_LIMIT": RATE,
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        f"--workers={WORKERS}",
        "--worker-class=sync",
        f"--bind=127.0.0.1:{port}",
        "--graceful-timeout=20",
        "--log-level=info",
        *options,
        "tests.test_gunicorn_outbox:create_app()",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        booted = server.wait_for(lambda lines: sum("Booting worker" in x for x in lines) >= 3)
        assert booted, "".join(server.lines)
        yield server
    finally:
        server.stop()


def drive(url: str) -> set[int]:
    """Log every user in ``LOGINS`` times, six requests at a time; the workers' pids."""

    def login(number: int) -> int:
        with requests.Session() as session:
            user, visit = number % USERS, number // USERS
            response = session.post(f"{url}/login/{user}/{visit}", timeout=10)
            response.raise_for_status()
            return int(response.json()["pid"])

    with ThreadPoolExecutor(6) as pool:
        return set(pool.map(login, range(USERS * LOGINS)))


def everything_arrived(emu: Emulator) -> bool:
    if len(emu.events(event_name="logged_in")) < USERS * LOGINS:
        return False
    for user in range(USERS):
        contact = emu.contact(external_id=str(user))
        if contact is None or len(contact["custom_fields"]) < LOGINS:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_workers_share_one_budget_and_lose_nothing(
    emulator_factory: Callable[..., Emulator], tmp_path: Path, preload: bool
) -> None:
    emu = emulator_factory(rate_limit=RATE)
    outbox = tmp_path / "outbox.sqlite3"
    with gunicorn(emu, outbox, *(["--preload"] if preload else [])) as server:
        pids = drive(server.url)
        assert len(pids) >= 2, pids  # more than one worker served logins
        assert emu.wait_for(everything_arrived, timeout=60), Outbox(outbox).counts()
        holder = HostLock.holder(str(outbox) + ".lock")
        assert holder in pids  # a worker delivers, not the master
        code = server.stop()
    assert code == 0, "".join(server.lines)
    statuses = Counter(r.status for r in emu.requests)
    print(f"\ngunicorn {WORKERS} workers, preload={preload}: {dict(statuses)}")
    assert statuses[429] == 0
    assert set(statuses) <= {200, 201}
    visits = Counter(
        (e["contact_id"], e["properties"]["visit"]) for e in emu.events(event_name="logged_in")
    )
    assert len(visits) == USERS * LOGINS and set(visits.values()) == {1}  # once each
    for user in range(USERS):
        contact = emu.contact(external_id=str(user))
        assert contact is not None
        assert contact["custom_fields"] == {f"login_{v}": v for v in range(LOGINS)}
    assert Outbox(outbox).counts() == OutboxCounts()
