"""The example app's configuration: its own ``EXAMPLE_*`` keys and the Meisa keys it sets.

:func:`app_config` is what :func:`~example_app.create_app` loads: :func:`defaults`, the
``config`` mapping given to ``create_app`` over them, then what follows from both (secure
cookies unless :func:`on_emulator`). Every ``MEISA_*`` key the extension understands is
documented by ``flask meisa config-template`` (``flask_meisa.config.KEYS``).

Development and production
--------------------------
``python -m example_app`` starts the embedded Meisa emulator and points the app at it:
that is development. The app shows a development banner on every page, linking to the
emulator's inbox (:func:`inbox_url`: every email the emulator got, verification codes and
reset links included). To run against the real Meisa instead, set both variables in the
environment::

    export MEISA_API_KEY=meisa_test_...         # a test key touches no real contacts
    export MEISA_BASE_URL=https://api.meisa.io/api/v1
    python -m example_app

No emulator is started then: that is production. No page links to an inbox, and the
session and remember-me cookies are ``Secure``: sent over HTTPS only (browsers such as
Chromium also send them to ``http://127.0.0.1`` and ``localhost``, so this command still
works on loopback). The demo's triggers (``verification_code``, ``password_reset``) must
exist and be active in the Meisa dashboard.

Environment variables
---------------------
``MEISA_API_KEY``, ``MEISA_BASE_URL``
    The key and API root (see above).
``MEISA_RATE_LIMIT``
    The key's budget (default ``60/minute;1000/hour``, Meisa's default limits).
``EXAMPLE_SECRET_KEY``
    Signs the session cookie, CSRF tokens and password reset links. Without it a random
    key is made at start, so sessions end when the process does.
``EXAMPLE_DATABASE``
    The SQLite file (default ``example_app.sqlite3`` in the app's instance folder).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

__all__ = ["DEFAULT_RATE_LIMIT", "app_config", "defaults", "inbox_url", "on_emulator"]

#: Meisa's default per-key limits.
DEFAULT_RATE_LIMIT = "60/minute;1000/hour"


def defaults(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The app's default config, reading ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    return {
        "SECRET_KEY": env.get("EXAMPLE_SECRET_KEY") or secrets.token_hex(32),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        # The SQLite file; None means "example_app.sqlite3" in the instance folder.
        "EXAMPLE_DATABASE": env.get("EXAMPLE_DATABASE") or None,
        # Root URL of the embedded emulator (``emulator.root_url``) when the app runs on
        # it: development (see on_emulator). None against the real Meisa.
        "EXAMPLE_EMULATOR_URL": None,
        # Minutes a verification code stays valid, and wrong tries allowed per code.
        "EXAMPLE_CODE_TTL_MINUTES": 15,
        "EXAMPLE_CODE_MAX_ATTEMPTS": 5,
        # Seconds a password reset link stays valid.
        "EXAMPLE_RESET_MAX_AGE": 3600,
        # Emails a visitor can make the app send (Flask-Limiter's notation): password
        # resets per address, and password resets and new codes together per client
        # address. Each email also spends the Meisa key's budget that every sync needs.
        "EXAMPLE_EMAIL_LIMIT_PER_ADDRESS": "3/hour",
        "EXAMPLE_EMAIL_LIMIT_PER_CLIENT": "10/hour",
        # Where Flask-Limiter counts. In memory, each process counts on its own and
        # forgets at restart: production uses Redis ("redis://localhost:6379"), shared by
        # every worker. Behind a proxy, wrap the app in werkzeug's ProxyFix so that the
        # client address is the visitor's, not the proxy's.
        "RATELIMIT_STORAGE_URI": "memory://",
        "MEISA_API_KEY": env.get("MEISA_API_KEY"),
        "MEISA_BASE_URL": env.get("MEISA_BASE_URL", "https://api.meisa.io/api/v1"),
        "MEISA_RATE_LIMIT": env.get("MEISA_RATE_LIMIT", DEFAULT_RATE_LIMIT),
    }


def on_emulator(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` points the app at the embedded emulator (development).

    True when ``EXAMPLE_EMULATOR_URL`` is set and ``MEISA_BASE_URL`` lies under it: an
    emulator URL alone does not make an app that talks to the real Meisa a development
    one.
    """
    root = config.get("EXAMPLE_EMULATOR_URL")
    base = config.get("MEISA_BASE_URL")
    if not (isinstance(root, str) and root and isinstance(base, str)):
        return False
    return base.startswith(root.rstrip("/") + "/")


def inbox_url(config: Mapping[str, Any], address: str | None = None) -> str | None:
    """The embedded emulator's inbox (``<root>/_emulator/``), showing only what concerns
    ``address`` when one is given; ``None`` unless :func:`on_emulator`: the real Meisa has
    no such page, and people's codes and links must never be shown to whoever asks."""
    if not on_emulator(config):
        return None
    url = str(config["EXAMPLE_EMULATOR_URL"]).rstrip("/") + "/_emulator/"
    # "@" stays readable; "+" and the rest are escaped as the page's URLSearchParams reads them.
    return f"{url}?{urlencode({'address': address}, safe='@')}" if address else url


def app_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`defaults`, then ``config`` over them; off the emulator, the session and
    remember-me cookies are ``Secure`` unless ``config`` says otherwise."""
    settings = {**defaults(), **(config or {})}
    production = not on_emulator(settings)
    settings.setdefault("SESSION_COOKIE_SECURE", production)
    settings.setdefault("REMEMBER_COOKIE_SECURE", production)
    return settings
