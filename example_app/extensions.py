"""The app's extension instances, made once and registered by the app factory."""

from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect  # type: ignore[import-untyped]

from flask_meisa import Meisa

__all__ = ["csrf", "limiter", "login_manager", "meisa"]

#: The Meisa extension; ``meisa.init_app(app)`` in :func:`~example_app.create_app`.
meisa = Meisa()

#: Flask-Login; logging in (``login_user``) is what the extension's login sync hooks.
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Log in to see that page."
login_manager.login_message_category = "info"

#: Flask-WTF's CSRF protection: every POST carries the ``csrf_token()`` its form got.
csrf = CSRFProtect()

#: Flask-Limiter, counting per client address unless a limit says otherwise; where it
#: counts is ``RATELIMIT_STORAGE_URI`` (see :mod:`example_app.config`).
limiter = Limiter(get_remote_address)
