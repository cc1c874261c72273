"""flask meisa ... through the test CLI runner."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from flask import Flask
from flask.cli import FlaskGroup

from flask_meisa import DeliveryStatus
from flask_meisa import Meisa
from flask_meisa import _cli_text
from flask_meisa import delivery_failed
from flask_meisa._engine import pending
from flask_meisa._engine.store import Store
from flask_meisa.config import config_template
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from tests.apps import build_app
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response
from tests.process_support import ROOT
from tests.process_support import environment
from tests.process_support import store_path


@pytest.fixture
def app(emulator: Any) -> Flask:
    return build_app(emulator_config(emulator))


def invoke(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["meisa", *args])


def test_ping_reports_the_keys_environment_and_scopes(emulator: Any, app: Flask) -> None:
    result = invoke(app, "ping")
    assert result.exit_code == 0, result.output
    assert "ok: live key for Demo SaaS" in result.output
    assert "emails:trigger" in result.output
    assert emulator.live_key not in result.output


def test_ping_names_the_scopes_the_key_lacks_and_what_they_are_for(emulator: Any) -> None:
    key = emulator.create_key(scopes=["contacts:write", "contacts:read"])
    app = build_app(emulator_config(emulator, MEISA_API_KEY=key))
    result = invoke(app, "ping")
    assert result.exit_code == 1
    assert "the key lacks scopes this extension uses:" in result.output
    assert "events:track: needed for events (@track_event, meisa.track)" in result.output
    assert "emails:trigger: needed for transactional email (meisa.send)" in result.output
    assert "contacts:write: needed" not in result.output


def test_a_403_at_delivery_names_the_scope_in_the_log_the_signal_and_the_dead_letter(
    emulator: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = emulator.create_key(scopes=["contacts:write", "contacts:read"])
    app = build_app(
        emulator_config(
            emulator,
            MEISA_API_KEY=key,
            MEISA_DELIVERY="thread",
            MEISA_OUTBOX=str(tmp_path / "store.sqlite3"),
        )
    )
    failures: list[Any] = []
    record = lambda sender, **kw: failures.append(kw)  # noqa: E731
    with delivery_failed.connected_to(record, sender=app), app.app_context():
        app.extensions["meisa"].track("opened", email="ada@example.com")
        assert app.extensions["meisa"].flush(5)
    needs = "this call needs the key scope events:track"
    (failure,) = failures
    assert needs in str(failure["error"])
    assert any(needs in record.getMessage() for record in caplog.records)
    assert needs in invoke(app, "dead-letters").output


def test_ping_with_a_bad_key_fails_with_the_servers_message(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, MEISA_API_KEY="meisa_live_not_a_real_key_0000"))
    result = invoke(app, "ping")
    assert result.exit_code == 1
    assert "401" in result.output
    assert "meisa_live_not_a_real_key" not in result.output


def test_suppressions_count_and_check(emulator: Any, app: Flask) -> None:
    emulator.suppress("gone@example.com")
    result = invoke(app, "suppressions", "--check", "Gone@Example.com")
    assert result.exit_code == 0, result.output
    count = len(emulator.suppressions())
    assert f"{count} suppressed addresses" in result.output
    assert "Gone@Example.com: suppressed" in result.output
    assert (
        "ok@example.com: not suppressed"
        in invoke(app, "suppressions", "--check", "ok@example.com").output
    )


def test_suppressions_without_check_shows_the_count_only(emulator: Any, app: Flask) -> None:
    emulator.suppress("gone@example.com")
    result = invoke(app, "suppressions")
    assert result.exit_code == 0, result.output
    assert result.output == f"{len(emulator.suppressions())} suppressed addresses (as of " + (
        f"{app.extensions['meisa'].state(app).suppression.as_of})\n"
    )


def test_sync_users_plans_an_unknown_number_of_users_at_the_budgets_pace(emulator: Any) -> None:
    meisa = Meisa()
    config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_RATE_LIMIT="1000/hour")
    app = build_app(config, meisa=meisa)

    @meisa.users_to_sync
    def every_user() -> Any:
        return iter(app.config["USERS"].values())  # no len(), no count: a stream

    try:
        result = invoke(app, "sync-users", "--dry-run")
    finally:
        meisa.state(app).close(5)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "an unknown number of users at ~950/hour"


def test_suppressions_load_while_delivery_is_off_without_an_engine(
    emulator: Any, tmp_path: Path
) -> None:
    store = tmp_path / "store.sqlite3"
    config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(store))
    app = build_app({**config, "MEISA_ENABLED": False})
    emulator.suppress("gone@example.com")
    result = invoke(app, "suppressions", "--check", "gone@example.com")
    assert result.exit_code == 0, result.output
    assert "gone@example.com: suppressed" in result.output
    assert not store.exists()  # no engine (nor its store) made for a call while off


def test_sequences_lists_active_ones_or_all(app: Flask) -> None:
    active = invoke(app, "sequences").output
    assert "onboarding" in active
    assert "winback" not in active
    assert "winback" in invoke(app, "sequences", "--all").output


def test_sync_users_backfills_every_registered_user(emulator: Any) -> None:
    meisa = Meisa()
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"), meisa=meisa)

    @meisa.users_to_sync
    def every_user() -> list[Any]:
        return list(app.config["USERS"].values())

    try:
        result = invoke(app, "sync-users")
        assert result.exit_code == 0, result.output
        assert "2 users, no budget set" in result.output
        assert "2 of 2 users done" in result.output and "0 failed" in result.output
    finally:
        meisa.state(app).close(5)
    contacts = {c["email"]: c for c in emulator.contacts()}
    assert set(contacts) == {"ada@example.com", "grace@example.com"}
    assert contacts["ada@example.com"]["source"] == "initial_sync"


def test_sync_users_names_a_failed_user_without_get_id_by_its_position(emulator: Any) -> None:
    meisa = Meisa()
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"), meisa=meisa)

    @meisa.users_to_sync
    def every_user() -> list[Any]:
        return [*app.config["USERS"].values(), object()]  # no email, no get_id()

    try:
        result = invoke(app, "sync-users")
        failures = invoke(app, "sync-users", "--failures")
    finally:
        meisa.state(app).close(5)
    assert "1 failed" in result.output, result.output
    assert failures.output == "user #2: email: the user object has no email attribute\n"


def test_any_commands_meisa_error_is_its_message_without_a_traceback(app: Flask) -> None:
    meisa = app.extensions["meisa"]

    @meisa.users_to_sync
    def users_without_email() -> list[Any]:
        return [object()]

    for args in (("suppressions", "--check", "not an address"), ("sync-users", "--dry-run")):
        result = invoke(app, *args)
        assert result.exit_code == 1, result.output
        assert "Error: email: " in result.output
        assert isinstance(result.exception, SystemExit)  # handled: no traceback


def test_sync_users_without_a_query_explains_what_to_do(app: Flask) -> None:
    result = invoke(app, "sync-users")
    assert result.exit_code == 1
    assert "@meisa.users_to_sync" in result.output


@pytest.mark.parametrize(
    ("query", "count", "said"),
    [
        (lambda: None, None, "@meisa.users_to_sync returned NoneType"),  # no return
        (lambda: "ada@example.com", None, "@meisa.users_to_sync returned str"),
        (lambda: [], lambda: "10", "the count of @meisa.users_to_sync returned '10'"),
        (lambda: [], lambda: -1, "the count of @meisa.users_to_sync returned -1"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_sync_users_says_what_the_registered_functions_returned_that_is_no_users(
    emulator: Any, query: Any, count: Any, said: str, dry_run: bool
) -> None:
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=None))
    app.extensions["meisa"].users_to_sync(query, count=count)
    try:
        result = invoke(app, "sync-users", *(["--dry-run"] if dry_run else []))
    finally:
        app.extensions["meisa"].close(timeout=0)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {said}"
    assert isinstance(result.exception, SystemExit)  # handled: no traceback


def test_flush_and_status(app: Flask) -> None:
    assert "nothing pending" in invoke(app, "flush").output
    status = invoke(app, "status").output
    assert "engine: sync" in status
    assert "delivered: 0" in status


@pytest.mark.parametrize("timeout", ["nan", "-1"])
def test_flush_refuses_a_timeout_that_is_not_a_number_of_seconds(app: Flask, timeout: str) -> None:
    # flush(nan) never ends while work is pending: no deadline is ever reached.
    result = invoke(app, "flush", "--timeout", timeout)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--timeout'" in result.output


def test_config_template_prints_every_key(app: Flask) -> None:
    result = invoke(app, "config-template")
    assert result.exit_code == 0
    assert result.output == config_template()
    assert 'MEISA_RATE_LIMIT = "60/minute;1000/hour"' in result.output
    assert "MEISA_FLUSH_TIMEOUT = 5.0" in result.output


def test_emulator_command_passes_its_options_on_and_names_itself(app: Flask) -> None:
    result = invoke(app, "emulator", "--help")
    assert result.exit_code == 0
    assert "--rate-limit" in result.output
    assert "python -m flask_meisa.emulator" not in result.output
    assert " meisa emulator [-h]" in result.output


def test_commands_on_an_app_without_meisa_say_so() -> None:
    from flask_meisa.cli import meisa_cli

    result = Flask(__name__).test_cli_runner().invoke(meisa_cli, ["status"])
    assert result.exit_code == 1
    assert "Meisa is not initialised" in result.output


def test_status_shows_the_store_and_who_delivers(emulator: Any, tmp_path: Any) -> None:
    config = emulator_config(
        emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(tmp_path / "outbox.sqlite3")
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    try:
        with app.app_context():
            meisa.upsert({"email": "ada@example.com"})
            assert meisa.flush(5.0)
        status = invoke(app, "status").output
        assert f"store: {tmp_path / 'outbox.sqlite3'} (every process of this host)" in status
        assert f"delivering process: pid {os.getpid()}" in status
        assert "dead letters: 0" in status
        assert "delivered: 1" in status
    finally:
        meisa.state(app).close(5.0)


# -- the first hour: `flask meisa` on any app, before init_app and without a key ----------


def app_without_a_key() -> Flask:
    """An app factory as a user's is before the key is set: init_app refuses to run."""
    app = Flask(__name__)
    Meisa(app)  # raises ConfigurationError: MEISA_API_KEY is not set
    return app


def flask_command(*args: str, create_app: Any = None) -> Any:
    """Run ``flask <args>`` as the ``flask`` command does, with its plugin commands."""
    group = FlaskGroup(create_app=create_app or (lambda: Flask(__name__)))
    # FlaskGroup sets FLASK_RUN_FROM_CLI in os.environ and leaves it: the runner restores
    # it, or every later app of this process would wait for a first use to deliver.
    env = {"FLASK_RUN_FROM_CLI": None}
    return CliRunner().invoke(group, list(args), prog_name="flask", env=env)


def test_the_group_is_a_flask_commands_entry_point() -> None:
    (entry,) = [e for e in entry_points(group="flask.commands") if e.name == "meisa"]
    assert entry.value == "flask_meisa.cli:meisa_cli"


def test_config_template_works_before_init_app_and_without_a_key() -> None:
    for factory in (lambda: Flask(__name__), app_without_a_key):
        result = flask_command("meisa", "config-template", create_app=factory)
        assert result.exit_code == 0, result.output
        assert result.output == config_template()


def test_emulator_help_works_before_init_app_and_names_itself() -> None:
    result = flask_command("meisa", "emulator", "--help", create_app=app_without_a_key)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("usage: flask meisa emulator [-h]")
    assert "--rate-limit" in result.output


def test_other_commands_on_an_app_without_meisa_say_to_call_init_app() -> None:
    for command in (["status"], ["ping"], ["flush"], ["dead-letters", "list"]):
        result = flask_command("meisa", *command)
        assert result.exit_code == 1, command
        assert "Meisa is not initialised on this app (call init_app)" in result.output


def test_flask_meisa_emulator_starts_without_a_key(tmp_path: Path) -> None:
    # The real `flask` command, on an app whose factory fails for want of a key.
    (tmp_path / "keyless_app.py").write_text(
        "from flask import Flask\n"
        "from flask_meisa import Meisa\n\n"
        "def create_app():\n"
        "    app = Flask(__name__)\n"
        "    Meisa(app)\n"
        "    return app\n",
        encoding="utf-8",
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MEISA_", "FLASK_"))}
    command = [sys.executable, "-m", "flask", "--app", "keyless_app", "meisa", "emulator"]
    process = subprocess.Popen(
        [*command, "--port", "0", "--rate-limit", "none"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(queue.Empty):
                found = re.search(r"listening on (\S+)", lines.get(timeout=1))
                url = found.group(1) if found else None
        assert url is not None, f"no 'listening on' line; exit status {process.poll()}"
        answer = requests.get(url + "/ping/", timeout=10)
        assert answer.status_code == 401  # a Meisa API, asking for a key
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == 0


def test_the_status_table_shows_each_lanes_wait_and_latency() -> None:
    status = DeliveryStatus(
        engine="thread",
        queued={"transactional": 0, "automation": 2, "routine": 340, "backfill": 0},
        oldest_wait={"automation": 0.3, "routine": 245.0},
        latency={"automation": (0.12, 0.7), "routine": (7300.0, 7300.0)},
        durable=True,
        delivering_pid=4242,
    )
    lines = _cli_text.status_report(status, "/srv/instance/outbox.db", 0.0).splitlines()
    assert lines[:2] == [
        "engine: thread, store: /srv/instance/outbox.db (every process of this host)",
        "delivering process: pid 4242",
    ]
    table = [line.split() for line in lines[2:7]]
    assert table == [
        ["lane", "waiting", "oldest", "p50", "p99"],
        ["transactional", "0", "-", "-", "-"],
        ["automation", "2", "0.3s", "0.1s", "0.7s"],
        ["routine", "340", "4m", "05s", "2h", "01m", "2h", "01m"],
        ["backfill", "0", "-", "-", "-"],
    ]


def test_flush_that_times_out_says_what_is_left_and_who_delivers(
    emulator: Any, tmp_path: Path
) -> None:
    # Meisa answers 429 for a minute: the event waits to retry, delivery paused meanwhile.
    config = emulator_config(
        emulator,
        MEISA_DELIVERY="thread",
        MEISA_OUTBOX=str(tmp_path / "store.sqlite3"),
        MEISA_RATE_LIMIT="60/minute",
    )
    app = build_app(config)
    emulator.faults.force_429(1, retry_after=60, path="/events/track/")
    try:
        with app.app_context():
            app.extensions["meisa"].track("opened", email="ada@example.com")
            assert emulator.wait_for_requests(1, "/events/track/")
        result = invoke(app, "flush", "--timeout", "0.3")
        assert result.exit_code == 1
        assert "1 operations still pending after 0.3s (no other process delivers)" in (
            result.output
        )
        status = invoke(app, "status").output
        assert "waiting to retry: 1" in status
        assert re.search(r"paused for: \d+\.\ds", status), status
    finally:
        app.extensions["meisa"].state(app).close(0)  # the event is left in the store


def instance_with_one_upsert(tmp_path: Path) -> Path:
    """An instance folder whose store holds one upsert waiting."""
    instance = tmp_path / "instance"
    instance.mkdir()
    with Store(store_path(instance)).write() as db:
        pending.add(db, Operation("upsert", {"email": "ada@example.com"}), LANE_BACKFILL)
    return instance


def test_flush_that_times_out_ends_at_its_timeout_not_the_exit_hooks(
    emulator: Any, tmp_path: Path
) -> None:
    # Meisa is down and the command delivers (no other process does): at its --timeout it
    # stops, rather than wait MEISA_FLUSH_TIMEOUT more in the exit hook (60 s here).
    instance = instance_with_one_upsert(tmp_path)
    emulator.faults.outage(300)
    env = environment(
        emulator,
        instance,
        MEISA_TEST_FLUSH_TIMEOUT="60",
        FLASK_APP="tests.served_app:create_app()",
    )
    command = [sys.executable, "-m", "flask", "meisa", "flush", "--timeout", "0.5"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "1 operations still pending after 0.5s" in done.stderr, done.stderr


def test_flush_stopped_with_ctrl_c_ends_at_once_and_keeps_what_is_pending(
    emulator: Any, tmp_path: Path
) -> None:
    # Meisa is down: Ctrl+C in 'flask meisa flush --timeout 30' said "Aborted!", then the
    # exit hook delivered for MEISA_FLUSH_TIMEOUT more (60 s here; a second Ctrl+C there
    # printed a traceback). It ends at once; the upsert stays in the store for the next.
    instance = instance_with_one_upsert(tmp_path)
    emulator.faults.outage(300)
    app = "tests.served_app:create_app()"
    env = environment(emulator, instance, MEISA_TEST_FLUSH_TIMEOUT="60", FLASK_APP=app)
    command = [sys.executable, "-m", "flask", "meisa", "flush", "--timeout", "30"]
    flush = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert emulator.wait_for(lambda e: e.requests_to("/contacts/upsert/"), 20)
        flush.send_signal(signal.SIGINT)
        _, said = flush.communicate(timeout=15)
    finally:
        flush.kill()
        flush.wait(30)
    assert flush.returncode == 1 and said == "\nAborted!\n", said
    with Store(store_path(instance)).read() as db:
        assert db.execute("SELECT count(*) FROM meisa_ops").fetchone()[0] == 1


def test_flush_while_another_process_writes_says_so_and_ends_at_its_timeout(
    emulator: Any, tmp_path: Path
) -> None:
    # Another process holds the store's write lock (a long transaction, a sqlite3 shell):
    # the command cannot take delivery over. It said "the delivery store failed (database
    # is locked); operations wait in memory" (none did) and "(no process delivers)", and
    # its own wait for the lock, on the connection its reads share, took it past --timeout
    # (2.4 s at --timeout 0, 6.5 s at 5).
    instance = instance_with_one_upsert(tmp_path)
    env = environment(emulator, instance, FLASK_APP="tests.served_app:create_app()")
    command = [sys.executable, "-m", "flask", "meisa", "flush", "--timeout"]
    run = functools.partial(subprocess.run, cwd=ROOT, env=env, capture_output=True, text=True)
    writer = sqlite3.connect(store_path(instance), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        began = time.monotonic()
        quick = run([*command, "0"], timeout=30)
        startup = time.monotonic() - began  # its interpreter's start, and no wait
        began = time.monotonic()
        done = run([*command, "1.5"], timeout=30)
        took = time.monotonic() - began
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    for result in (quick, done):
        assert result.returncode == 1, result.stderr
        assert "operations wait in memory" not in result.stderr  # (none did)
    assert "(database is locked: another process is writing to it)" in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "Error: 1 operations still pending after 1.5s (no other process delivers): another"
        " process is writing to the store (it holds its write lock)"
    ), done.stderr
    assert took < startup + 1.5 + 0.5, (took, startup)


def test_dead_letters_named_by_the_thousand_are_purged_and_said_ten_at_most(
    emulator: Any, tmp_path: Path
) -> None:
    # All of a large backfill's letters named at once (the check for IDs that are no dead
    # letter's took time in their number squared: benchmarks measure speed, not tests).
    outbox = tmp_path / "store.sqlite3"
    with Store(outbox).write() as db:
        for n in range(30_000):
            upsert = Operation("upsert", {"email": f"u{n}@example.com"}, priority="backfill")
            pending.add(db, upsert, LANE_BACKFILL)
        db.execute("UPDATE meisa_ops SET state = 'dead'")
        ids = [str(seq) for (seq,) in db.execute("SELECT seq FROM meisa_ops")]
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(outbox)))
    result = invoke(app, "dead-letters", "purge", *ids)
    assert result.output == "30000 dead letter(s) deleted\n", result.output
    gone = invoke(app, "dead-letters", "purge", *ids)  # and none of them is one now
    assert gone.exit_code == 1
    assert f"no dead letter with ID {', '.join(ids[:10])}, ...\n" in gone.output, gone.output


def test_the_upserts_a_retry_keeps_are_counted_with_the_first_few_ids() -> None:
    # A large backfill's letters retried can keep 100,000 upserts: not all on one line.
    line = _cli_text.kept(list(range(100_000, 0, -1)))
    assert line.startswith("100000 upsert(s) kept (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...): ")
    assert len(line) < 300


def test_suppressions_that_cannot_be_loaded_say_why(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, MEISA_API_KEY="meisa_live_not_a_real_key_0000"))
    result = invoke(app, "suppressions")
    assert result.exit_code == 1, result.output
    assert "could not load the suppression set: " in result.output
    assert "401" in result.output
    assert "meisa_live_not_a_real_key" not in result.output


def test_commands_that_call_meisa_without_a_key_say_it_is_not_set() -> None:
    app = build_app({"MEISA_ENABLED": False})  # no key needed while delivery is off
    for args, said in ((("ping",), "Error: "), (("suppressions",), "suppression set: ")):
        result = invoke(app, *args)
        assert result.exit_code == 1, result.output
        assert f"{said}MEISA_API_KEY is not set" in result.output
        assert isinstance(result.exception, SystemExit)  # handled: no traceback


def test_sequences_says_when_there_are_none(app: Flask) -> None:
    result = invoke(app, "sequences", "--search", "no such sequence")
    assert (result.exit_code, result.output) == (0, "no sequences\n")


def test_sync_users_without_background_delivery_says_which_to_choose(app: Flask) -> None:
    meisa: Meisa = app.extensions["meisa"]
    meisa.users_to_sync(lambda: list(app.config["USERS"].values()))
    result = invoke(app, "sync-users")  # MEISA_DELIVERY = "sync"
    assert result.exit_code == 1, result.output
    assert 'needs background delivery (MEISA_DELIVERY = "thread" or "celery"' in result.output


def test_sync_users_in_memory_warns_that_it_cannot_resume(emulator: Any) -> None:
    meisa = Meisa()
    config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=None)
    app = build_app(config, meisa=meisa)
    meisa.users_to_sync(lambda: list(app.config["USERS"].values()))
    try:
        result = invoke(app, "sync-users")
    finally:
        meisa.state(app).close(5)
    assert result.exit_code == 0, result.output
    assert "note: MEISA_OUTBOX is memory: the backfill cannot resume" in result.output
    assert len(emulator.contacts()) == 2


def test_control_characters_a_server_sends_are_not_printed() -> None:
    ping = {
        "environment": "live\x1b[2J",
        "scopes": ["contacts:write", "events:track", "emails:trigger", "contacts:read\x07"],
        "product": {"id": "p1", "name": "Demo\x1b]0;owned\x07"},
    }
    sequences = {"results": [{"slug": "welcome", "status": "active", "name": "A\x1b[31mred"}]}

    def answer(exchange: Exchange) -> None:
        exchange.send(response(200, ping if "ping" in exchange.path else sequences))

    with hostile(answer) as server:
        app = build_app(emulator_config_for(server.url))
        output = invoke(app, "ping").output + invoke(app, "sequences").output
    assert "ok: live [2J key for Demo ]0;owned \n" in output, repr(output)
    assert "welcome\tactive\tA [31mred\n" in output, repr(output)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", output), repr(output)


def emulator_config_for(url: str) -> dict[str, Any]:
    return {"MEISA_API_KEY": "meisa_live_" + "k3y" * 12, "MEISA_BASE_URL": url, "TESTING": True}
