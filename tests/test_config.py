"""The one table of MEISA_* keys, and what is made from it: the template, the README's
table, the client's defaults and the Celery engine's."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa import client
from flask_meisa.config import DEFAULTS
from flask_meisa.config import KEYS
from flask_meisa.config import config_template
from flask_meisa.config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
#: Keys the template reads from the environment.
FROM_ENVIRONMENT = ("MEISA_API_KEY", "MEISA_BASE_URL")


def run_template(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The names the template defines, run with none of its variables set."""
    for name in FROM_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    namespace: dict[str, object] = {}
    exec(compile(config_template(), "config-template", "exec"), namespace)
    return {name: value for name, value in namespace.items() if name.startswith("MEISA_")}


def test_the_table_names_each_key_once_with_a_meaning() -> None:
    names = [key.name for key in KEYS]
    assert len(names) == len(set(names)) == len(DEFAULTS)
    assert all(name.startswith("MEISA_") and name.isupper() for name in names)
    assert all(key.meaning and key.type for key in KEYS)
    for name, default in [
        ("MEISA_RESYNC_AFTER", 86400.0),
        ("MEISA_PRIORITY_FIELDS", ("plan", "subscription_status")),
        ("MEISA_ROUTINE_MAX_AGE", 3600.0),
    ]:
        assert DEFAULTS[name] == default


def test_every_default_passes_its_own_validation() -> None:
    for key in KEYS:
        key.parse(key.default)


def test_the_template_assigns_every_key_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_template(monkeypatch) == DEFAULTS


def test_the_template_reads_the_key_and_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEISA_API_KEY", "meisa_test_from_the_environment")
    namespace: dict[str, object] = {}
    exec(compile(config_template(), "config-template", "exec"), namespace)
    assert namespace["MEISA_API_KEY"] == "meisa_test_from_the_environment"


def test_the_template_says_each_keys_type_default_and_meaning() -> None:
    template = config_template()
    blocks = template.split("\n\n")[1:]  # after the header
    assert len(blocks) == len(KEYS)
    for key, block in zip(KEYS, blocks, strict=True):
        *comment, assignment = block.strip().splitlines()
        assert assignment.startswith(f"{key.name} = ")
        assert all(line.startswith("# ") and len(line) <= 99 for line in comment)
        text = " ".join(line[2:] for line in comment)
        assert text.startswith(f"{key.type}, default ")
        meaning = key.meaning.replace("`", "")
        assert meaning[1:] in text, key.name


@pytest.mark.parametrize(
    ("name", "written", "value"),
    [
        ("MEISA_SYNC_ON_LOGIN", '"no"', False),
        ("MEISA_RETRY_DEADLINE", '"2.5"', 2.5),
        ("MEISA_PRIORITY_FIELDS", '"a, b"', ("a", "b")),
        ("MEISA_PRIORITY_FIELDS", "a JSON list", ("plan", "mrr")),
        ("MEISA_RATE_LIMIT", '"null"', None),
        ("MEISA_DEFAULT_SOURCE", '"none"', None),
        ("MEISA_RATE_LIMIT", '"5/10 seconds"', "5/10 seconds"),
        ("MEISA_RATE_LIMIT", '"<limit> per <unit>"', "20 per min, 500 per hr"),
    ],
)
def test_the_strings_the_template_names_are_taken_as_the_values_they_stand_for(
    name: str, written: str, value: object
) -> None:
    # An environment gives strings only: the template says which, and each works.
    assert written in config_template()
    text = {
        "a JSON list": '["plan", "mrr"]',
        '"<limit> per <unit>"': "20 per min, 500 per hr",
    }.get(written, written.strip('"'))
    app = Flask(__name__)
    app.config.update(TESTING=True, MEISA_OUTBOX=None, **{name: text})
    Meisa(app)
    settings = app.extensions["meisa"].state(app).settings
    attribute = name.removeprefix("MEISA_").lower()
    assert getattr(settings, attribute) == value


def test_the_template_is_a_config_file_init_app_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in FROM_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "meisa_config.py"
    path.write_text(config_template(), encoding="utf-8")
    app = Flask(__name__)
    app.config.from_pyfile(path)
    app.config["TESTING"] = True
    with caplog.at_level(logging.WARNING):
        meisa = Meisa(app)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert meisa.state(app).settings.priority_fields == ("plan", "subscription_status")


def test_the_readme_table_is_the_tables() -> None:
    readme = README.read_text(encoding="utf-8")
    assert markdown_table() in readme, (
        "README.md's configuration table differs from flask_meisa.config.KEYS; print it"
        " with: python -c 'from flask_meisa.config import markdown_table as t; print(t())'"
    )
    rows = [line for line in readme.splitlines() if line.startswith("| `MEISA_")]
    assert [row.split("`")[1] for row in rows] == [key.name for key in KEYS]


def test_the_readme_step_2_snippet_runs_without_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = README.read_text(encoding="utf-8")
    step = readme[readme.index("**2. Configure.**") : readme.index("**3. Register")]
    match = re.search(r"```python\n(.*?)```", step, re.DOTALL)
    assert match is not None
    monkeypatch.delenv("MEISA_API_KEY", raising=False)
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "README step 2", "exec"), namespace)  # no KeyError
    assert namespace["MEISA_API_KEY"] is None
    app = Flask(__name__)
    app.config.update({k: v for k, v in namespace.items() if k.startswith("MEISA_")})
    app.config["MEISA_ENABLED"] = False
    Meisa(app)


def test_the_clients_defaults_are_the_tables() -> None:
    assert DEFAULTS["MEISA_BASE_URL"] == client.DEFAULT_BASE_URL
    assert (DEFAULTS["MEISA_CONNECT_TIMEOUT"], DEFAULTS["MEISA_TIMEOUT"]) == client.DEFAULT_TIMEOUT


def test_the_celery_engines_keys_are_the_tables() -> None:
    celery_engine = pytest.importorskip("flask_meisa._engine.celery_setup")
    assert {
        name: DEFAULTS[name]
        for name in (
            "MEISA_CELERY_APP",
            "MEISA_CELERY_QUEUE",
            "MEISA_CELERY_REDIS_URL",
        )
    } == celery_engine.CELERY_DEFAULTS
    settings = celery_engine.CelerySettings.from_config({"MEISA_CELERY_QUEUE": " billing "})
    assert settings.queue == "billing"


def test_the_celery_keys_take_a_celery_app_and_redis_urls() -> None:
    celery_engine = pytest.importorskip("flask_meisa._engine.celery_setup")
    celery_app = pytest.importorskip("celery").Celery("billing")
    for url, expected in [
        (" REDIS://cache:6379/0 ", "redis://cache:6379/0"),
        ("rediss://cache:6380/0", "rediss://cache:6380/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ]:
        config = {"MEISA_CELERY_APP": celery_app, "MEISA_CELERY_REDIS_URL": url}
        settings = celery_engine.CelerySettings.from_config(config)
        assert (settings.celery_app, settings.redis_url) == (celery_app, expected)
