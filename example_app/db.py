"""The user table, in SQLite through the standard library's ``sqlite3``.

Why ``sqlite3`` and not an ORM: the example must run with flask-meisa's own dependencies
and nothing else, and a dozen plain SQL statements are easier to read than a model layer
would be. The extension never sees a row or a connection: the contact mapper turns a
:class:`~example_app.models.User` into plain data while the request is alive.

Each request gets its own connection (the server is threaded), opened on first use and
closed when the app context ends. Timestamps are stored as ISO 8601 text in UTC.

The email verification code is **not** stored: only an HMAC-SHA256 of it (keyed with the
app's ``SECRET_KEY``, bound to the user id), with the time it was sent and the wrong tries
made, so a leaked database does not hand out live codes.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from typing import Any

from flask import Flask
from flask import current_app
from flask import g

from .models import User
from .models import iso

__all__ = ["Database", "Verification", "get_db", "init_app"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    email_verified INTEGER NOT NULL DEFAULT 0,
    plan TEXT NOT NULL DEFAULT 'free'
        CHECK (plan IN ('free', 'standard', 'pro', 'churned')),
    subscription_status TEXT NOT NULL DEFAULT 'none',
    signup_date TEXT NOT NULL,
    last_active TEXT NOT NULL,
    signin_count INTEGER NOT NULL DEFAULT 0,
    onboarding_completed INTEGER NOT NULL DEFAULT 0,
    reports_exported INTEGER NOT NULL DEFAULT 0,
    session_version INTEGER NOT NULL DEFAULT 0,
    code_hash TEXT,
    code_sent_at TEXT,
    code_attempts INTEGER NOT NULL DEFAULT 0
);
"""

_USER_COLUMNS = (
    "id, email, name, password_hash, email_verified, plan, subscription_status, "
    "signup_date, last_active, signin_count, onboarding_completed, reports_exported, "
    "session_version"
)


def _moment(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def _user(row: sqlite3.Row | None) -> User | None:
    if row is None:
        return None
    return User(
        id=row["id"],
        email=row["email"],
        name=row["name"],
        password_hash=row["password_hash"],
        email_verified=bool(row["email_verified"]),
        plan=row["plan"],
        subscription_status=row["subscription_status"],
        signup_date=_moment(row["signup_date"]),
        last_active=_moment(row["last_active"]),
        signin_count=row["signin_count"],
        onboarding_completed=bool(row["onboarding_completed"]),
        reports_exported=row["reports_exported"],
        session_version=row["session_version"],
    )


class Verification:
    """A user's pending verification code: its hash, when it was sent, wrong tries."""

    def __init__(self, code_hash: str, sent_at: dt.datetime, attempts: int) -> None:
        self.code_hash = code_hash
        self.sent_at = sent_at
        self.attempts = attempts


class Database:
    """The queries the app makes, over one ``sqlite3`` connection."""

    def __init__(self, path: str) -> None:
        self.connection = sqlite3.connect(path, timeout=10)
        self.connection.row_factory = sqlite3.Row

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    def create_schema(self) -> None:
        """Create the table when it does not exist yet."""
        with self.connection:
            self.connection.executescript(SCHEMA)
            # A database made by an earlier version of the example lacks this column.
            columns = {row["name"] for row in self.connection.execute("PRAGMA table_info(users)")}
            if "session_version" not in columns:
                self.connection.execute(
                    "ALTER TABLE users ADD COLUMN session_version INTEGER NOT NULL DEFAULT 0"
                )

    def _one(self, sql: str, *params: Any) -> User | None:
        cursor = self.connection.execute(f"SELECT {_USER_COLUMNS} FROM users {sql}", params)
        return _user(cursor.fetchone())

    def _update(self, user_id: int, assignments: str, *params: Any) -> User:
        with self.connection:
            self.connection.execute(
                f"UPDATE users SET {assignments} WHERE id = ?", (*params, user_id)
            )
        user = self.user(user_id)
        if user is None:
            raise LookupError("the user was deleted")
        return user

    def user(self, user_id: int) -> User | None:
        """The user with this id, or ``None``."""
        return self._one("WHERE id = ?", user_id)

    def user_by_email(self, email: str) -> User | None:
        """The user with this address (stored lowercased), or ``None``."""
        return self._one("WHERE email = ?", email.strip().lower())

    def create_user(
        self, email: str, name: str, password_hash: str, now: dt.datetime
    ) -> User | None:
        """Insert a free-plan user; ``None`` when the address is taken."""
        try:
            with self.connection:
                cursor = self.connection.execute(
                    "INSERT INTO users (email, name, password_hash, signup_date, last_active)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (email.strip().lower(), name, password_hash, iso(now), iso(now)),
                )
        except sqlite3.IntegrityError:
            return None
        user_id = cursor.lastrowid
        assert user_id is not None
        return self.user(user_id)

    def record_login(self, user_id: int, now: dt.datetime) -> User:
        """Count a sign-in and mark the user active now."""
        return self._update(user_id, "signin_count = signin_count + 1, last_active = ?", iso(now))

    def set_verification(self, user_id: int, code_hash: str, now: dt.datetime) -> None:
        """Store a new code's hash (replacing any earlier code) and reset the tries."""
        self._update(
            user_id, "code_hash = ?, code_sent_at = ?, code_attempts = 0", code_hash, iso(now)
        )

    def verification(self, user_id: int) -> Verification | None:
        """The user's pending code, or ``None``."""
        row = self.connection.execute(
            "SELECT code_hash, code_sent_at, code_attempts FROM users WHERE id = ?", (user_id,)
        ).fetchone()
        if row is None or row["code_hash"] is None:
            return None
        return Verification(row["code_hash"], _moment(row["code_sent_at"]), row["code_attempts"])

    def count_wrong_code(self, user_id: int) -> None:
        """Count a wrong try at the pending code."""
        self._update(user_id, "code_attempts = code_attempts + 1")

    def mark_verified(self, user_id: int) -> User:
        """Mark the address verified and forget the code."""
        return self._update(
            user_id, "email_verified = 1, code_hash = NULL, code_sent_at = NULL, code_attempts = 0"
        )

    def set_plan(self, user_id: int, plan: str, subscription_status: str) -> User:
        """Put the user on ``plan`` with ``subscription_status``."""
        return self._update(
            user_id, "plan = ?, subscription_status = ?", plan, subscription_status
        )

    def record_export(self, user_id: int, now: dt.datetime) -> User:
        """Count an exported report; the first one completes onboarding."""
        return self._update(
            user_id,
            "reports_exported = reports_exported + 1, onboarding_completed = 1, last_active = ?",
            iso(now),
        )

    def set_password(self, user_id: int, password_hash: str) -> User:
        """Replace the password hash and end the user's sessions (a new session version)."""
        return self._update(
            user_id, "password_hash = ?, session_version = session_version + 1", password_hash
        )


def database_path(app: Flask) -> str:
    """``EXAMPLE_DATABASE``, or ``example_app.sqlite3`` in the instance folder."""
    configured = app.config.get("EXAMPLE_DATABASE")
    if configured:
        return str(configured)
    os.makedirs(app.instance_path, exist_ok=True)
    return os.path.join(app.instance_path, "example_app.sqlite3")


def get_db() -> Database:
    """The current app context's database connection (opened on first use)."""
    if "db" not in g:
        g.db = Database(current_app.config["EXAMPLE_DATABASE_PATH"])
    db: Database = g.db
    return db


def _close_db(error: BaseException | None) -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_app(app: Flask) -> None:
    """Resolve the database file, create the table, close connections at teardown."""
    path = database_path(app)
    app.config["EXAMPLE_DATABASE_PATH"] = path
    db = Database(path)
    try:
        db.create_schema()
    finally:
        db.close()
    app.teardown_appcontext(_close_db)
