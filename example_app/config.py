"""The example app's configuration: its own ``EXAMPLE_*`` keys and the Meisa keys it sets.

:func:`defaults` is read by :func:`~example_app.create_app` first; the ``config`` mapping
given to ``create_app`` overrides it. Every ``MEISA_*`` key the extension understands is
documented by ``flask meisa config-template`` (``flask_meisa.config.KEYS``).

Running against the real Meisa
------------------------------
``python -m example_app`` starts the embedded Meisa emulator and points the app at it.
To run against the real Meisa instead, set both variables in the environment::

    export MEISA_API_KEY=meisa_test_...         # a test key touches no real contacts
    export MEISA_BASE_URL=https://api.meisa.io/api/v1
    python -m example_app

No emulator is started then, and the "What Meisa received" page is off (it reads the
emulator's inspection endpoints, which the real Meisa does not have). The demo's
triggers (``verification_code``, ``password_reset``) must exist and be active in the
Meisa dashboard.

Environment variables
---------------------
``MEISA_API_KEY``, ``MEISA_BASE_URL``
    The key and API root (see above).
``MEISA_RATE_LIMIT``
    The key's budget (default ``60/minute;1000/hour``, Meisa's default limits).
``EXAMPLE_SECRET_KEY``
    Signs the session cookie and password reset links. Without it a random key is made
    at start, so sessions end when the process does.
``EXAMPLE_DATABASE``
    The SQLite file (default ``example_app.sqlite3`` in the app's instance folder).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_RATE_LIMIT", "defaults"]

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
        # it; turns on the "What Meisa received" page. None against the real Meisa.
        "EXAMPLE_EMULATOR_URL": None,
        # Minutes a verification code stays valid, and wrong tries allowed per code.
        "EXAMPLE_CODE_TTL_MINUTES": 15,
        "EXAMPLE_CODE_MAX_ATTEMPTS": 5,
        # Seconds a password reset link stays valid.
        "EXAMPLE_RESET_MAX_AGE": 3600,
        # Refuse POSTs without the session's CSRF token.
        "EXAMPLE_CSRF": True,
        "MEISA_API_KEY": env.get("MEISA_API_KEY"),
        "MEISA_BASE_URL": env.get("MEISA_BASE_URL", "https://api.meisa.io/api/v1"),
        "MEISA_RATE_LIMIT": env.get("MEISA_RATE_LIMIT", DEFAULT_RATE_LIMIT),
    }
