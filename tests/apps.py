"""A small Flask app with Flask-Login and Meisa, for the extension's tests."""

from __future__ import annotations

import datetime as dt
import enum
import io
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from flask import Flask
from flask import Response
from flask import abort
from flask import current_app
from flask import send_file
from flask import stream_with_context
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import login_user

from flask_meisa import Meisa
from flask_meisa import plan_changed
from flask_meisa import track_event


class Plan(enum.Enum):
    FREE = "free"
    PRO = "pro"


class User(UserMixin):  # type: ignore[misc]
    def __init__(self, user_id: int, email: str, **fields: Any) -> None:
        self.id = user_id
        self.email = email
        self.first_name: str | None = fields.pop("first_name", None)
        self.last_name: str | None = fields.pop("last_name", None)
        self.plan: Plan = fields.pop("plan", Plan.FREE)
        self.signup_date = fields.pop("signup_date", dt.datetime(2026, 1, 2, 3, 4, 5))
        self.mrr = fields.pop("mrr", Decimal("0"))
        self.signin_count: int = fields.pop("signin_count", 0)
        for name, value in fields.items():
            setattr(self, name, value)


def make_users() -> dict[int, User]:
    return {
        1: User(1, "ada@example.com", first_name="Ada", last_name="Lovelace"),
        2: User(2, "grace@example.com", first_name="Grace"),
    }


def build_app(config: dict[str, Any], *, meisa: Meisa | None = None) -> Flask:
    """An app with login, plan-change, tracking, send, file and stream views."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test", MEISA_CUSTOM_FIELDS=["plan", "signup_date", "mrr"])
    app.config.update(config)
    users = make_users()
    app.config["USERS"] = users
    login_manager = LoginManager(app)

    @login_manager.user_loader
    def load_user(user_id: str) -> User | None:
        return users.get(int(user_id))

    extension = meisa if meisa is not None else Meisa()
    extension.init_app(app)

    @app.post("/login/<int:user_id>")
    def login(user_id: int) -> str:
        user = users[user_id]
        user.signin_count += 1
        login_user(user)
        return "logged in"

    @app.post("/plan/<int:user_id>/<plan>")
    def change_plan(user_id: int, plan: str) -> str:
        user = users[user_id]
        old, user.plan = user.plan, Plan(plan)
        real_app = current_app._get_current_object()  # type: ignore[attr-defined]
        plan_changed.send(real_app, user=user, old_plan=old.value, new_plan=plan)
        return "changed"

    @app.post("/triple/<int:user_id>")
    def triple(user_id: int) -> str:
        user = users[user_id]
        extension.upsert({"email": user.email, "external_id": user.id, "custom_fields": {"a": 1}})
        extension.upsert({"email": user.email, "custom_fields": {"b": 2}, "tag_names": ["x"]})
        extension.upsert(
            {"email": user.email, "external_id": user.id, "first_name": "Ady", "tag_names": ["y"]}
        )
        return "ok"

    @app.post("/fail/<int:user_id>")
    def fail(user_id: int) -> str:
        extension.upsert(users[user_id])
        raise RuntimeError("the view failed")

    @app.post("/abort/<int:user_id>")
    def abort_503(user_id: int) -> str:
        extension.upsert(users[user_id])
        abort(503)

    @app.get("/file/<int:user_id>")
    def file(user_id: int) -> Response:
        extension.upsert(users[user_id])
        return send_file(io.BytesIO(b"report"), download_name="report.txt")

    @app.get("/stream/<int:user_id>")
    def stream(user_id: int) -> Response:
        extension.upsert(users[user_id])

        def chunks() -> Iterator[str]:
            yield "a"
            yield "b"

        return Response(stream_with_context(chunks()))

    @app.post("/export")
    @track_event("exported_report", properties=lambda: {"format": "csv"})
    def export() -> str:
        """Export a report."""
        return "exported"

    @app.post("/export/<fmt>")
    @track_event("exported_report", properties=lambda fmt: {"format": fmt})
    def export_format(fmt: str) -> tuple[str, int]:
        return ("bad format", 400) if fmt == "bad" else ("exported", 200)

    @app.post("/async-export")
    @track_event("exported_async")
    async def async_export() -> str:
        return "exported"

    @app.post("/send/<trigger>/<path:email>")
    def send(trigger: str, email: str) -> dict[str, Any]:
        result = extension.send(trigger, email, variables={"code": "123456"}, background=False)
        return {"status": result.status, "reason": result.reason}

    @app.post("/send-later/<trigger>/<path:email>")
    def send_later(trigger: str, email: str) -> dict[str, Any]:
        result = extension.send(trigger, email, background=True)
        return {"status": result.status}

    return app
