"""The Python examples of README.md and docs/quickstart.md run as written, in order, against
the embedded emulator: only the user's own parts (a user, Flask-Login's manager, a code)
are supplied."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import flask
import flask_login
import pytest

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from flask_meisa.testing import emulator_config

ROOT = Path(__file__).resolve().parent.parent
# file: the section of the integration steps (config, factory, steps), the heading of the test
DOCS = {
    "README.md": (
        ("## Integrate it in five minutes", "## Configuration"),
        "## Testing your own app",
    ),
    "docs/quickstart.md": (("## 2. Configure", "## 8. Test it"), "## 8. Test it"),
}


class User(flask_login.UserMixin):  # type: ignore[misc]
    id, email, given_name, plan, mrr, projects = 1, "ada@example.com", "Ada", "free", 0, ()
    subscription_status, signup_date, last_active = "active", "2026-01-02", None
    signin_count, onboarding_completed = 1, False


def blocks(name: str, start: str, end: str | None = None) -> list[str]:
    text = (ROOT / name).read_text(encoding="utf-8")
    text = text[text.index(start) : text.index(end) if end else None]
    return re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def run(code: str, namespace: dict[str, Any], label: str) -> None:
    code = code.replace("(): ...", '(): return "done"')  # a view's elided body
    exec(compile(code, label, "exec"), namespace)


def the_users_parts(login_manager: flask_login.LoginManager) -> dict[str, Any]:
    """What the examples take from the user's app: its user, its login manager."""
    user = User()
    login_manager.user_loader(lambda user_id: user)
    return {
        "__name__": "yourapp",
        "user": user,
        "code": "123456",
        "url": "https://app.example.com/reset/abc",
        "login_manager": login_manager,
        **{name: getattr(flask_login, name) for name in ("current_user", "login_required")},
        **{name: getattr(flask, name) for name in ("flash", "request")},
    }


@pytest.mark.parametrize("name", sorted(DOCS))
def test_the_integration_steps_run_against_the_emulator(
    name: str, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    (start, end), test_heading = DOCS[name]
    config, factory, *steps = blocks(name, start, end)
    monkeypatch.setenv("MEISA_API_KEY", emulator.live_key)
    monkeypatch.setenv("MEISA_BASE_URL", emulator.url)  # the quickstart's offline setup
    module = types.ModuleType("config")
    vars(module)["MEISA_BASE_URL"] = emulator.url  # the README's config: the real Meisa
    run(config, vars(module), f"{name}: config")
    monkeypatch.setitem(sys.modules, "config", module)
    namespace = the_users_parts(flask_login.LoginManager())
    run(factory, namespace, f"{name}: factory")
    app = namespace["app"] = namespace["create_app"]()
    app.secret_key = "docs-examples"
    app.post("/login")(lambda: str(flask_login.login_user(namespace["user"])))
    with app.test_request_context():
        flask_login.login_user(namespace["user"])
        for number, step in enumerate(steps):
            run(step, namespace, f"{name}: step {number}")
    meisa = namespace["meisa"]
    with app.app_context():
        assert meisa.flush(10)
    contact = emulator.contact(email=User.email)
    assert contact is not None and contact["custom_fields"]["plan"] == "pro"  # plan_changed
    assert [s["variables"] for s in emulator.sends(trigger_key="verification_code")] == [
        {"code": "123456"}
    ]
    client = app.test_client()
    client.post("/login")
    (view,) = {r.rule for r in app.url_map.iter_rules()} - {"/login", "/static/<path:filename>"}
    assert client.post(view, data={"template": "blank"}).status_code == 200  # @track_event's
    with app.app_context():
        assert meisa.flush(10)
    events = [event["event_name"] for event in emulator.events()]
    assert len(events) == 2 and "invited_teammate" in events, events
    # Step 8 / "Testing your own app": the test as written, on the app under TESTING.
    testing = namespace["create_app"]()
    testing.config.update(TESTING=True, SECRET_KEY="docs-examples")

    @testing.post("/signup")
    def signup() -> str:
        meisa.send("verification_code", flask.request.form["email"], variables={"code": "1"})
        return str(flask_login.login_user(namespace["user"]))

    run(blocks(name, test_heading)[0], namespace, f"{name}: test")
    namespace["test_signup_syncs_and_sends_a_code"](testing, testing.test_client())


@pytest.mark.parametrize("name", ["README.md", "docs/index.md"])
def test_the_overview_runs_against_the_emulator(name: str, emulator: Emulator) -> None:
    namespace = the_users_parts(flask_login.LoginManager())
    app = namespace["app"] = flask.Flask("yourapp")
    app.config.update(emulator_config(emulator), SECRET_KEY="docs-examples")
    namespace["login_manager"].init_app(app)
    with app.test_request_context():
        run(blocks(name, "")[0], namespace, f"{name}: overview")
    with app.app_context():
        assert namespace["meisa"].flush(10)
    assert [s["trigger_key"] for s in emulator.sends()] == ["password_reset"]
    contact = emulator.contact(email=User.email)
    assert contact is not None and contact["custom_fields"]["plan"] == "pro"


def test_the_emulators_quick_start_runs_with_the_integrating_factory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "config", types.ModuleType("config"))
    namespace = the_users_parts(flask_login.LoginManager())
    run(blocks("docs/integrating.md", "## One extension")[0], namespace, "integrating.md")
    exercise = """with app.test_request_context():
        plan_changed.send(app, user=user, new_plan="pro")
        meisa.send("verification_code", user.email, variables={"code": "123456"})"""
    quick_start = blocks("docs/emulator.md", "## Quick start")[0].replace("...", exercise)
    run("from flask_meisa import plan_changed\n" + quick_start, namespace, "emulator.md")


def test_the_typical_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEISA_API_KEY", "meisa_live_docs_example")  # not a key of any Meisa
    settings = blocks("docs/configuration.md", "## Typical settings")
    assert len(settings) == 3
    for number, block in enumerate(settings):
        module: dict[str, Any] = {}
        run(block, module, f"configuration.md: typical settings {number}")
        app = flask.Flask("yourapp")  # each block on a config that has the key
        app.config.from_mapping(MEISA_API_KEY="meisa_live_docs_example")
        app.config.from_mapping({k: v for k, v in module.items() if k.isupper()})
        Meisa(app).close(app)  # every value accepted
