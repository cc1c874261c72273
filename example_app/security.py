"""Small security helpers: CSRF tokens, verification codes, password reset tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from flask import Flask
from flask import abort
from flask import current_app
from flask import request
from flask import session
from itsdangerous import BadSignature
from itsdangerous import URLSafeTimedSerializer

from .models import User

__all__ = [
    "code_hash",
    "codes_match",
    "csrf_token",
    "init_app",
    "new_code",
    "reset_token",
    "reset_token_matches",
    "user_id_from_reset_token",
]

_CSRF_KEY = "csrf_token"


def csrf_token() -> str:
    """The session's CSRF token (made on first use); every form posts it back."""
    token = session.get(_CSRF_KEY)
    if not isinstance(token, str):
        token = session[_CSRF_KEY] = secrets.token_urlsafe(32)
    return token


def _check_csrf() -> None:
    if request.method != "POST" or not current_app.config.get("EXAMPLE_CSRF", True):
        return
    expected = session.get(_CSRF_KEY)
    sent = request.form.get(_CSRF_KEY, "")
    if not isinstance(expected, str) or not hmac.compare_digest(expected, sent):
        abort(400, description="The form expired. Go back, reload the page and try again.")


def init_app(app: Flask) -> None:
    """Check the CSRF token of every POST and give templates ``csrf_token()``."""
    app.before_request(_check_csrf)
    app.jinja_env.globals["csrf_token"] = csrf_token


def new_code() -> str:
    """A random 6-digit verification code."""
    return f"{secrets.randbelow(1_000_000):06d}"


def code_hash(user_id: int, code: str) -> str:
    """The stored form of a verification code: HMAC-SHA256 keyed with ``SECRET_KEY``."""
    key = str(current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, f"verify:{user_id}:{code}".encode(), hashlib.sha256).hexdigest()


def codes_match(user_id: int, code: str, stored_hash: str) -> bool:
    """Whether ``code`` is the one whose hash is stored (constant time)."""
    return hmac.compare_digest(code_hash(user_id, code), stored_hash)


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt="password-reset")


def _password_tag(user: User) -> str:
    # Bound to the current password hash: a link stops working once it has been used.
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def reset_token(user: User) -> str:
    """A signed, expiring token for ``user``'s password reset link."""
    return _serializer().dumps({"id": user.id, "pw": _password_tag(user)})


def user_id_from_reset_token(token: str, max_age: int) -> tuple[int, str] | None:
    """The user id and password tag inside a valid, unexpired token; else ``None``."""
    try:
        data: Any = _serializer().loads(token, max_age=max_age)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), int):
        return None
    return data["id"], str(data.get("pw"))


def reset_token_matches(user: User, tag: str) -> bool:
    """Whether a token's password tag still matches ``user``'s password."""
    return hmac.compare_digest(_password_tag(user), tag)
