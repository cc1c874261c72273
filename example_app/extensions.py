"""The app's extension instances, made once and registered by the app factory."""

from __future__ import annotations

from flask_login import LoginManager

from flask_meisa import Meisa

__all__ = ["login_manager", "meisa"]

#: The Meisa extension; ``meisa.init_app(app)`` in :func:`~example_app.create_app`.
meisa = Meisa()

#: Flask-Login; logging in (``login_user``) is what the extension's login sync hooks.
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Log in to see that page."
login_manager.login_message_category = "info"
