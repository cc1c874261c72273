"""The flask-meisa example: a small SaaS app whose users are synced to Meisa.

Run it with ``python -m example_app`` (the embedded Meisa emulator included), or build it
with :func:`create_app`. What it shows:

- ``meisa = Meisa()`` and ``meisa.init_app(app)`` in an app factory, with a contact
  mapper that turns a user row into the custom fields Meisa recommends;
- signup: the contact created with ``source="signup"``, a verification code sent with
  ``meisa.send`` and a deterministic idempotency key;
- login through Flask-Login, synced by the extension (``signin_count``, ``last_active``);
- billing changes announced with the ``plan_changed`` signal;
- an in-product action recorded with ``@track_event``;
- a password reset email sent in the background, the same answer whether or not the
  address has an account, and a reset that ends the user's other sessions;
- on the embedded emulator (development), a banner linking to the emulator's inbox: every
  call it got, verification codes and reset links included.

No view holds HTTP code for Meisa: everything goes through the extension.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from flask import Flask
from flask import render_template
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from . import contacts as _contacts  # noqa: F401  (registers the contact mapper)
from . import db
from .config import app_config
from .config import inbox_url
from .config import on_emulator
from .extensions import csrf
from .extensions import limiter
from .extensions import login_manager
from .extensions import meisa
from .models import User

__all__ = ["create_app", "meisa"]


def _load_user(session_id: str) -> User | None:
    # session_id is User.get_id(): "<id>:<session version>". A session made before the
    # version changed (a password reset) loads no one, so it is logged out.
    user_id, _, version = session_id.partition(":")
    try:
        user = db.get_db().user(int(user_id))
    except ValueError:
        return None
    if user is None or str(user.session_version) != version:
        return None
    return user


def _http_error(error: HTTPException) -> ResponseReturnValue:
    return render_template("error.html", error=error), error.code or 500


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app with :func:`~example_app.config.app_config` of ``config``.

    :raises flask_meisa.ConfigurationError: a ``MEISA_*`` key is missing or invalid (no
        ``MEISA_API_KEY``, for one).
    """
    app = Flask(__name__)
    app.config.update(app_config(config))
    development = on_emulator(app.config)
    db.init_app(app)
    csrf.init_app(app)
    limiter.init_app(app)
    login_manager.init_app(app)
    login_manager.user_loader(_load_user)
    meisa.init_app(app)

    from .account import bp as account_bp
    from .auth import bp as auth_bp
    from .billing import bp as billing_bp

    for blueprint in (account_bp, auth_bp, billing_bp):
        app.register_blueprint(blueprint)
    app.register_error_handler(HTTPException, _http_error)
    inbox = partial(inbox_url, app.config)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"development": development, "inbox_url": inbox}

    return app
