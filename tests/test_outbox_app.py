"""``MEISA_OUTBOX`` in an app: config, checks at ``init_app``, the first request picking up
what an earlier run left, and ``flask meisa outbox`` / ``flask meisa dead-letters``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from flask_meisa.engine.outbox import Outbox
from flask_meisa.errors import ConfigurationError
from flask_meisa.testing import emulator_config
from tests.apps import build_app
from tests.engine_support import upsert

TRIGGER = "/emails/trigger/"


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    """Apps made by a test; their Meisa state (engine, outbox) is closed after it."""
    made: list[Flask] = []
    yield made
    for app in made:
        app.extensions["meisa"].state(app).close(0)


def outbox_app(emulator: Emulator, apps: list[Flask], outbox: Any, **config: Any) -> Flask:
    settings = emulator_config(
        emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=outbox, MEISA_RETRY_BASE_DELAY=0.01
    )
    app = build_app({**settings, **config})
    apps.append(app)
    return app


def invoke(app: Flask, *args: str, input: str | None = None) -> Any:
    return app.test_cli_runner().invoke(args=["meisa", *args], input=input)


def test_instance_names_a_file_in_the_instance_folder(
    emulator: Emulator, tmp_path: Path, apps: list[Flask]
) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    app.config["MEISA_OUTBOX"] = "instance:meisa-outbox.sqlite3"
    Meisa(app)
    apps.append(app)
    assert (tmp_path / "instance" / "meisa-outbox.sqlite3").is_file()
    assert app.extensions["meisa"].state(app).outbox.path == str(
        tmp_path / "instance" / "meisa-outbox.sqlite3"
    )


@pytest.mark.parametrize(
    ("value", "delivery", "message"),
    [
        ("", "thread", "MEISA_OUTBOX must be None, a SQLite file path"),
        (5, "thread", "MEISA_OUTBOX must be None, a SQLite file path"),
        ("instance:", "thread", "names no file"),
        (":memory:", "thread", "must be a file"),
        ("outbox.sqlite3", "sync", 'works with MEISA_DELIVERY = "thread"'),
    ],
)
def test_invalid_settings_are_refused(value: Any, delivery: str, message: str) -> None:
    app = Flask(__name__)
    app.config.update(MEISA_API_KEY="meisa_live_x", MEISA_OUTBOX=value, MEISA_DELIVERY=delivery)
    with pytest.raises(ConfigurationError, match=message):
        Meisa(app)


def test_a_damaged_file_fails_init_app_clearly(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"these bytes are no database " * 100)
    app = Flask(__name__)
    app.config.update(MEISA_API_KEY="meisa_live_x", MEISA_OUTBOX=str(path))
    with pytest.raises(ConfigurationError) as caught:
        Meisa(app)
    text = str(caught.value)
    assert str(path) in text
    assert "SQLITE_NOTADB" in text
    assert "move it aside" in text
    assert "meisa_live_x" not in text


def test_a_path_that_cannot_be_opened_fails_init_app(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigurationError, match="SQLITE_CANTOPEN"):
        Outbox(tmp_path / "taken")


def test_an_outbox_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    Outbox(path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ConfigurationError, match="newer flask-meisa"):
        Outbox(path)


def test_the_first_request_picks_up_what_an_earlier_run_left(
    emulator: Emulator, tmp_path: Path, apps: list[Flask]
) -> None:
    path = tmp_path / "outbox.sqlite3"
    left = Outbox(path)
    for n in range(5):
        left.put(upsert(n, tag="earlier"))
    left.close()
    app = outbox_app(emulator, apps, str(path))
    assert emulator.requests == []  # nothing starts at init (a preloading master forks)
    app.test_client().get("/nothing-here").close()
    assert emulator.wait_for(lambda e: len(e.requests_to("/contacts/upsert/")) == 5)
    assert {c["external_id"] for c in emulator.contacts()} >= {f"earlier-{n}" for n in range(5)}


def make_dead_letters(app: Flask, count: int) -> None:
    with app.app_context():
        meisa = app.extensions["meisa"]
        for n in range(count):
            meisa.send("launch_day", f"buyer{n}@example.com", background=True)
        assert meisa.flush(5)


def test_dead_letters_list_show_retry_and_purge(
    emulator: Emulator, tmp_path: Path, apps: list[Flask]
) -> None:
    app = outbox_app(emulator, apps, str(tmp_path / "outbox.sqlite3"))
    assert invoke(app, "dead-letters").output == "no dead letters\n"
    make_dead_letters(app, 3)

    listed = invoke(app, "dead-letters", "list")
    assert listed.exit_code == 0, listed.output
    rows = listed.output.splitlines()
    assert rows[-1] == "3 dead letter(s)"
    ids = [int(row.split("\t")[0]) for row in rows[:-1]]
    assert all("send launch_day" in row for row in rows[:-1])
    assert all(
        "HTTP 400 [invalid_trigger] Unknown or inactive trigger_key." in r for r in rows[:-1]
    )
    assert "buyer" not in listed.output  # no payload values in the listing

    shown = invoke(app, "dead-letters", "show", str(ids[0]))
    assert '"to_email": "buyer0@example.com"' in shown.output
    assert '"code": "invalid_trigger"' in shown.output

    emulator.add_trigger("launch_day")
    retried = invoke(app, "dead-letters", "retry", str(ids[0]), "--timeout", "5")
    assert retried.exit_code == 0, retried.output
    assert "1 operation(s) queued again" in retried.output
    assert "done; 2 dead letter(s) left" in retried.output
    assert [s["to_email"] for s in emulator.sends()] == ["buyer0@example.com"]

    status = invoke(app, "outbox")
    assert "waiting: 0" in status.output and "dead letters: 2" in status.output
    assert f"outbox: {tmp_path / 'outbox.sqlite3'}" in status.output

    purged = invoke(app, "dead-letters", "purge", str(ids[1]))
    assert purged.output == "1 dead letter(s) deleted\n"
    refused = invoke(app, "dead-letters", "purge", "--all", input="n\n")
    assert refused.exit_code == 1
    assert invoke(app, "dead-letters", "purge", "--all", "--yes").output.endswith(
        "1 dead letter(s) deleted\n"
    )
    assert invoke(app, "outbox").output.count("dead letters: 0") == 1


def test_retry_all_and_unknown_ids(emulator: Emulator, tmp_path: Path, apps: list[Flask]) -> None:
    app = outbox_app(emulator, apps, str(tmp_path / "outbox.sqlite3"))
    make_dead_letters(app, 2)
    unknown = invoke(app, "dead-letters", "retry", "999")
    assert unknown.exit_code == 1 and "no dead letter with ID 999" in unknown.output
    both = invoke(app, "dead-letters", "retry", "1", "--all")
    assert both.exit_code == 2 and "not both" in both.output
    emulator.add_trigger("launch_day")
    retried = invoke(app, "dead-letters", "retry", "--all", "--timeout", "5")
    assert "2 operation(s) queued again" in retried.output, retried.output
    assert "done; 0 dead letter(s) left" in retried.output
    assert len(emulator.sends()) == 2


def test_commands_say_when_there_is_no_outbox(emulator: Emulator) -> None:
    app = build_app(emulator_config(emulator))
    for args in (["outbox"], ["dead-letters", "list"]):
        result = invoke(app, *args)
        assert result.exit_code == 1
        assert "MEISA_OUTBOX is not set" in result.output
