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
- a password reset email, and what to say when Meisa will not email an address.

No view holds HTTP code for Meisa: everything goes through the extension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask import render_template
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from . import contacts as _contacts  # noqa: F401  (registers the contact mapper)
from . import db
from . import security
from .config import defaults
from .extensions import login_manager
from .extensions import meisa

__all__ = ["create_app", "meisa"]


def _load_user(user_id: str) -> Any:
    try:
        return db.get_db().user(int(user_id))
    except ValueError:
        return None


def _http_error(error: HTTPException) -> ResponseReturnValue:
    return render_template("error.html", error=error), error.code or 500


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: :func:`~example_app.config.defaults`, then ``config`` over them.

    :raises flask_meisa.ConfigurationError: a ``MEISA_*`` key is missing or invalid (no
        ``MEISA_API_KEY``, for one).
    """
    app = Flask(__name__)
    app.config.update(defaults())
    if config:
        app.config.update(config)
    db.init_app(app)
    security.init_app(app)
    login_manager.init_app(app)
    login_manager.user_loader(_load_user)
    meisa.init_app(app)

    from .account import bp as account_bp
    from .auth import bp as auth_bp
    from .billing import bp as billing_bp
    from .inspection import bp as inspection_bp

    for blueprint in (account_bp, auth_bp, billing_bp, inspection_bp):
        app.register_blueprint(blueprint)
    app.register_error_handler(HTTPException, _http_error)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"emulator_url": app.config.get("EXAMPLE_EMULATOR_URL")}

    return app
