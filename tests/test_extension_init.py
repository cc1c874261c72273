"""Registration and configuration of the extension."""

from __future__ import annotations

import ast
import importlib.resources
from typing import Any

import pytest
from flask import Flask

from flask_meisa import ConfigurationError
from flask_meisa import Meisa
from flask_meisa.config import DEFAULTS
from flask_meisa.testing import record_operations

KEY = "meisa_live_0123456789abcdefSECRET"


def make_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update({"MEISA_API_KEY": KEY, **config})
    return app


def test_init_app_registers_the_instance_and_sets_every_default() -> None:
    app = make_app()
    meisa = Meisa()
    meisa.init_app(app)
    assert app.extensions["meisa"] is meisa
    for key, default in DEFAULTS.items():
        if key != "MEISA_API_KEY":
            assert app.config[key] == default
    assert app.config["MEISA_RATE_LIMIT"] == "60/minute;1000/hour"


def test_constructor_with_app_calls_init_app() -> None:
    app = make_app()
    meisa = Meisa(app)
    assert app.extensions["meisa"] is meisa


def test_second_init_app_on_the_same_app_is_an_error() -> None:
    app = make_app()
    Meisa(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        Meisa(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        app.extensions["meisa"].init_app(app)


def test_one_instance_serves_two_apps_with_their_own_settings() -> None:
    meisa = Meisa()
    first, second = make_app(MEISA_TIMEOUT=1.0), make_app(MEISA_TIMEOUT=2.0)
    meisa.init_app(first)
    meisa.init_app(second)
    assert meisa.state(first).settings.timeout == 1.0
    assert meisa.state(second).settings.timeout == 2.0
    with second.app_context():
        assert meisa.client.timeout[1] == 2.0


def test_missing_api_key_is_a_clear_error_while_enabled() -> None:
    app = Flask(__name__)
    with pytest.raises(ConfigurationError, match="MEISA_API_KEY is not set"):
        Meisa(app)
    assert "meisa" not in app.extensions


def test_disabled_needs_no_key_and_records_without_delivering() -> None:
    app = Flask(__name__)
    app.config["MEISA_ENABLED"] = False
    meisa = Meisa(app)
    with app.app_context(), record_operations() as recorded:
        meisa.upsert({"email": "ada@example.com"})
        result = meisa.send("welcome", "ada@example.com")
    assert [op.kind for op in recorded] == ["upsert", "send"]
    assert result.status == "disabled"
    assert result.reason == "delivery_suppressed"


def test_testing_suppresses_delivery_by_default_and_is_read_lazily() -> None:
    app = make_app(MEISA_BASE_URL="http://127.0.0.1:9/api/v1")
    meisa = Meisa(app)
    state = meisa.state(app)
    assert state.delivering()
    app.config["TESTING"] = True  # set after init_app: still honoured
    assert not state.delivering()
    app.config["MEISA_SUPPRESS_SEND"] = False
    assert state.delivering()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("MEISA_DELIVERY", "carrier-pigeon", "MEISA_DELIVERY must be one of"),
        ("MEISA_TIMEOUT", "ten", "MEISA_TIMEOUT must be a number"),
        ("MEISA_TIMEOUT", 0, "MEISA_TIMEOUT must be at least"),
        ("MEISA_MAX_ATTEMPTS", 0, "MEISA_MAX_ATTEMPTS must be at least 1"),
        ("MEISA_QUEUE_SIZE", 2.5, "MEISA_QUEUE_SIZE must be an integer"),
        ("MEISA_CUSTOM_FIELDS", "plan", "not a string"),
        ("MEISA_CUSTOM_FIELDS", {"plan": ""}, "must name a user attribute"),
        ("MEISA_RATE_LIMIT", "", "MEISA_RATE_LIMIT must be a string"),
        ("MEISA_RATE_LIMIT", "lots/minute", "is not a rate limit"),
        ("MEISA_RATE_LIMIT", "60/fortnight", "is not a rate limit"),
        ("MEISA_API_KEY", 123, "MEISA_API_KEY must be a string"),
        ("MEISA_BASE_URL", "", "MEISA_BASE_URL must be a URL"),
    ],
)
def test_invalid_settings_are_refused_at_init(key: str, value: Any, message: str) -> None:
    app = make_app(**{key: value})
    with pytest.raises(ConfigurationError, match=message):
        Meisa(app)


def test_the_key_never_appears_in_reprs() -> None:
    app = make_app()
    meisa = Meisa(app)
    state = meisa.state(app)
    for text in (repr(meisa), repr(state.settings), repr(state.client)):
        assert KEY not in text
        assert KEY[:-4] not in text


def test_calls_outside_an_app_context_say_what_is_missing() -> None:
    meisa = Meisa(make_app())
    with pytest.raises(RuntimeError, match="needs an application context"):
        meisa.upsert({"email": "ada@example.com"})


def test_calls_on_an_unregistered_app_say_so() -> None:
    meisa = Meisa(make_app())
    other = make_app()
    with other.app_context(), pytest.raises(RuntimeError, match="not registered"):
        meisa.flush()


def test_the_config_template_documents_every_key_with_its_default() -> None:
    source = (
        importlib.resources.files("flask_meisa")
        .joinpath("config_template.py")
        .read_text(encoding="utf-8")
    )
    assigned: dict[str, ast.expr] = {}
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            assigned[statement.targets[0].id] = statement.value
    assert set(assigned) == set(DEFAULTS)
    for key, node in assigned.items():
        if key in ("MEISA_API_KEY", "MEISA_BASE_URL"):
            continue  # read from the environment in the template
        assert ast.literal_eval(node) == DEFAULTS[key], key
    lines = source.splitlines()
    for key in DEFAULTS:
        (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{key} = ")]
        assert lines[index - 1].startswith("# "), f"{key} has no comment above it"
