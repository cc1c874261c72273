"""Small security helpers: verification codes and password reset tokens.

CSRF protection is Flask-WTF's (see :mod:`example_app.extensions`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from flask import current_app
from itsdangerous import BadSignature
from itsdangerous import URLSafeTimedSerializer

from .models import User

__all__ = [
    "code_hash",
    "codes_match",
    "new_code",
    "reset_token",
    "reset_token_matches",
    "user_id_from_reset_token",
]


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
