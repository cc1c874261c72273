"""Helpers for the example app's tests: an app on the emulator, clients that post their
forms' CSRF token, and the signup and login steps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from flask import Flask
from flask.testing import FlaskClient

from example_app import create_app
from flask_meisa.testing import emulator_config

UPSERT = "/contacts/upsert/"
TRIGGER = "/emails/trigger/"
TRACK = "/events/track/"
ADA = {"email": "ada@example.com", "name": "Ada Lovelace", "password": "analytical-engine"}
CSRF_FIELD = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')

_tokens: WeakKeyDictionary[FlaskClient, str] = WeakKeyDictionary()


def make_app(emulator: Any, tmp_path: Path, **overrides: Any) -> Flask:
    """The example app on ``emulator`` (development), its database and delivery store in
    ``tmp_path`` (not in the checkout's instance folder, which the example app would use)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = emulator_config(
        emulator,
        SECRET_KEY="test-secret",
        EXAMPLE_DATABASE=str(tmp_path / "example.sqlite3"),
        MEISA_OUTBOX=str(tmp_path / "meisa-outbox.sqlite3"),
        EXAMPLE_EMULATOR_URL=emulator.root_url,
    )
    config.update(overrides)
    return create_app(config)


def csrf_token(client: FlaskClient) -> str:
    """The CSRF token the client's forms carry (read from the login form once)."""
    if client not in _tokens:
        page = client.get("/forgot-password", buffered=True).get_data(as_text=True)
        found = CSRF_FIELD.search(page)
        assert found is not None, "no CSRF token in the form"
        _tokens[client] = found.group(1)
    return _tokens[client]


def new_client(app: Flask) -> FlaskClient:
    """A test client of ``app`` with its session's CSRF token already read."""
    client = app.test_client()
    csrf_token(client)
    return client


def post(client: FlaskClient, path: str, **form: str) -> Any:
    """POST ``form`` with the client's CSRF token, as the app's forms do."""
    # buffered=True closes the response, which is when the extension releases its work.
    return client.post(path, data={"csrf_token": csrf_token(client), **form}, buffered=True)


def get(client: FlaskClient, path: str) -> Any:
    """GET ``path`` (the response closed)."""
    return client.get(path, buffered=True)


def code_sent_to(emulator: Any, email: str) -> str:
    """The last verification code the emulator got for ``email``."""
    sends = [s for s in emulator.sends(trigger_key="verification_code") if s["to_email"] == email]
    return str(sends[-1]["variables"]["code"])


def sign_up(client: FlaskClient, **fields: str) -> Any:
    """Sign Ada up (``fields`` override hers)."""
    response = post(client, "/signup", **{**ADA, **fields})
    assert response.status_code == 302, response.get_data(as_text=True)
    assert response.location == "/verify"
    return response


def verify(client: FlaskClient, emulator: Any, email: str = ADA["email"]) -> Any:
    """Enter the emailed code; the client is logged in then."""
    response = post(client, "/verify", code=code_sent_to(emulator, email))
    assert response.status_code == 302
    assert response.location == "/app"
    return response


def log_in(client: FlaskClient, password: str = ADA["password"], path: str = "/login") -> Any:
    """Log in as Ada through ``path`` (``/login?next=...`` for one)."""
    return post(client, path, email=ADA["email"], password=password)
