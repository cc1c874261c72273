"""Shared fixtures: a fresh Meisa emulator per test, a factory for custom ones, an HTTP helper."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from tests.engine_support import FAST
from tests.engine_support import MakeEngine
from tests.engine_support import RecordingHooks
from tests.engine_support import make_engine as build_engine
from tests.process_support import Processes

#: Fails any test whose logs, errors, reprs, CLI output or operations show an API key.
pytest_plugins = ["tests.secrets_guard"]

# Started in the background by a shell without job control (CI, `cmd &` in a script), the
# suite inherits SIGINT ignored, and so would every process a test then Ctrl+Cs, which hangs
# on. Handled here, it starts at its default in those children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: ``key=`` value of :class:`EmulatorAPI` calls meaning "the helper's own key".
OWN_KEY = ""


class EmulatorAPI:
    """A keep-alive ``requests.Session`` bound to an emulator's API and one key.

    ``get("/ping/")`` and ``post("/contacts/upsert/", {...})`` send the helper's key;
    ``key=None`` sends none, ``key="..."`` another one.
    """

    def __init__(self, emulator: Emulator, key: str | None = None) -> None:
        self.emulator = emulator
        self.key = key or emulator.live_key
        self.session = requests.Session()

    def request(
        self, method: str, path: str, *, key: str | None = OWN_KEY, **kwargs: Any
    ) -> requests.Response:
        """Send a request to ``emulator.url + path``."""
        headers = dict(kwargs.pop("headers", None) or {})
        sent_key = self.key if key == OWN_KEY else key
        if sent_key is not None:
            headers["X-API-Key"] = sent_key
        kwargs.setdefault("timeout", 10)
        return self.session.request(method, self.emulator.url + path, headers=headers, **kwargs)

    def get(self, path: str, *, key: str | None = OWN_KEY, **kwargs: Any) -> requests.Response:
        """GET ``path`` (``params=`` for the query)."""
        return self.request("GET", path, key=key, **kwargs)

    def post(
        self, path: str, json: Any = None, *, key: str | None = OWN_KEY, **kwargs: Any
    ) -> requests.Response:
        """POST ``json`` to ``path``."""
        return self.request("POST", path, key=key, json=json, **kwargs)

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A fresh demo emulator without rate limits, stopped after the test."""
    with Emulator(seed="demo", rate_limit=None) as emu:
        yield emu


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., Emulator]]:
    """Start emulators with any ``Emulator`` arguments; every one is stopped after the test.

    The arguments' defaults are ``Emulator``'s own (so Meisa's default rate limit applies
    unless ``rate_limit=None`` is given).
    """
    started: list[Emulator] = []

    def start(**kwargs: Any) -> Emulator:
        emu = Emulator(**kwargs)
        started.append(emu)
        return emu.start()

    yield start
    for emu in started:
        emu.stop()


@pytest.fixture
def emulator_api(emulator: Emulator) -> Iterator[EmulatorAPI]:
    """An :class:`EmulatorAPI` on the ``emulator`` fixture with its live key."""
    api = EmulatorAPI(emulator)
    yield api
    api.close()


@pytest.fixture
def emulator_api_factory() -> Iterator[Callable[..., EmulatorAPI]]:
    """Make :class:`EmulatorAPI` helpers (``(emulator, key=None)``); all closed after."""
    made: list[EmulatorAPI] = []

    def make(emulator: Emulator, key: str | None = None) -> EmulatorAPI:
        api = EmulatorAPI(emulator, key)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``redis-server`` without persistence for the whole session (defined here, once: a
    test module's own copy would start one per module); yields its URL. Skipped when
    redis-server is not installed, unless ``CI`` is set."""
    from tests.celery_support import RedisServer  # Celery and Redis: the Celery tests only

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _isolated_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every Flask app a test builds gets its own instance folder (where the delivery store
    lives by default), and every app's delivery is closed when the test ends."""
    from flask import Flask

    from flask_meisa import _process

    instance = str(tmp_path_factory.mktemp("instance"))
    original = Flask.auto_find_instance_path
    Flask.auto_find_instance_path = lambda self: instance  # type: ignore[method-assign]
    try:
        yield
    finally:
        Flask.auto_find_instance_path = original  # type: ignore[method-assign]
        for state in list(_process.live):
            state.close(0.0)


@pytest.fixture
def unresolvable(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name (under RFC 2606's ``.invalid``) that the resolver at once reports unknown,
    whatever resolver the machine has (one out of reach would time out instead)."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "meisa.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return "meisa.invalid"


@pytest.fixture
def emu(emulator_factory: Callable[..., Emulator]) -> Emulator:
    """An emulator without rate limit nor send guardrail."""
    return emulator_factory(rate_limit=None, send_guardrail=None)


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Start app processes; those still running after the test are stopped, by pid."""
    started = Processes()
    yield started
    started.stop_all()


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    """The instance folder the app processes of a test share."""
    return tmp_path / "instance"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A delivery store file in the test's folder."""
    return tmp_path / "store.sqlite3"


@pytest.fixture
def make_engine(path: Path) -> Iterator[MakeEngine]:
    """``make_engine(emulator, hooks, **options)``: an engine on a store of ``path`` (no
    budget, fast retries, short polls unless given); all closed after the test."""
    made: list[Delivery] = []

    def make(emu: Emulator, hooks: RecordingHooks, **options: Any) -> Delivery:
        options.setdefault("retry", FAST)
        options.setdefault("poll_interval", 0.02)
        if "store" not in options:
            options["store"] = Store(path)
        engine = build_engine(hooks, emu.url, emu.live_key, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close(timeout=0)
