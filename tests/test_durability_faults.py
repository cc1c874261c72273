"""Durability under faults, each in app processes of its own against the emulator: SIGKILL
with hundreds of operations pending during an outage, SIGTERM, a send replayed after a
crash, and a locked outbox at write time.

The module is also the app process: ``python -m tests.test_durability_faults <scenario>``
with ``MEISA_TEST_URL``, ``MEISA_TEST_KEY`` (never on a command line), ``OUTBOX`` and
``FLUSH_TIMEOUT`` in the environment:

- ``serve <requests>``: make that many requests to the app (each releases an upsert and an
  event after its response, every tenth a background send too), print ``ready``, then
  wait for a signal (SIGTERM exits normally, as WSGI servers make it do);
- ``drain``: start the app, flush what the outbox holds, print ``flushed <bool>``;
- ``fork``: deliver a request's operations, fork, let the child write its own and wait for
  the parent (still the holder) to deliver them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from flask_meisa.engine.outbox import Outbox
from flask_meisa.engine.outbox import OutboxCounts

ROOT = Path(__file__).resolve().parent.parent
USERS = 20
UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"


# -- the app process -------------------------------------------------------------------


def make_app(url: str, key: str, outbox: str, **config: Any) -> Flask:
    """An app on the emulator at ``url``, delivering through the outbox file ``outbox``.
    ``POST /work/<n>`` releases an upsert of user ``n % USERS`` (custom field ``f<n>``)
    and an event ``worked`` with ``n``, and for every tenth ``n`` a background send."""
    app = Flask(__name__)
    app.config.update(
        MEISA_API_KEY=key,
        MEISA_BASE_URL=url,
        MEISA_OUTBOX=outbox,
        MEISA_RATE_LIMIT=None,
        MEISA_RETRY_BASE_DELAY=0.05,
        MEISA_RETRY_MAX_DELAY=0.5,
        MEISA_MAX_ATTEMPTS=1000,
        MEISA_TIMEOUT=2.0,
    )
    app.config.update(config)
    meisa = Meisa(app)

    @app.post("/work/<int:n>")
    def work(n: int) -> str:
        user = n % USERS
        meisa.upsert(
            {
                "email": f"user{user}@example.com",
                "external_id": f"u{user}",
                "custom_fields": {f"f{n}": n},
            }
        )
        meisa.track("worked", external_id=f"u{user}", properties={"n": n})
        if n % 10 == 0:
            meisa.send(
                "receipt", f"buyer{n}@example.com", idempotency_key=f"k{n}", background=True
            )
        return "ok"

    return app


def app_from_environment() -> Flask:
    return make_app(
        os.environ["MEISA_TEST_URL"],
        os.environ["MEISA_TEST_KEY"],
        os.environ["OUTBOX"],
        MEISA_FLUSH_TIMEOUT=float(os.environ.get("FLUSH_TIMEOUT", "5")),
    )


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def serve(requests: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client = app_from_environment().test_client()
    for n in range(requests):
        client.post(f"/work/{n}").close()  # closing the response releases its operations
    say("ready")
    while True:
        signal.pause()


def drain() -> None:
    app = app_from_environment()
    with app.app_context():
        flushed = app.extensions["meisa"].flush(30)
    say(f"flushed {flushed}")


def fork() -> None:
    app = app_from_environment()
    meisa = app.extensions["meisa"]
    client = app.test_client()
    client.post("/work/0").close()
    with app.app_context():
        meisa.flush(10)
    say(f"parent holder {meisa.state(app).dispatcher.is_holder}")
    pid = os.fork()  # with the delivery lock held and connections open
    if pid == 0:
        child = app.test_client()
        for n in range(1, 6):
            child.post(f"/work/{n}").close()
        with app.app_context():
            flushed = meisa.flush(10)  # the parent delivers the child's rows
        say(f"child flushed {flushed} holder {meisa.state(app).dispatcher.is_holder}")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    with app.app_context():
        say(f"parent flushed {meisa.flush(10)} child_exit {os.waitstatus_to_exitcode(status)}")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scenario, *numbers = argv
    if scenario == "serve":
        serve(int(numbers[0]))
    elif scenario == "drain":
        drain()
    elif scenario == "fork":
        fork()
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


# -- the tests -------------------------------------------------------------------------


@pytest.fixture
def emu(emulator_factory: Callable[..., Emulator]) -> Emulator:
    """An emulator without rate limit nor send guardrail."""
    return emulator_factory(rate_limit=None, send_guardrail=None)


def environment(emu: Emulator, outbox: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MEISA_TEST_URL": emu.url,
        "MEISA_TEST_KEY": emu.live_key,
        "OUTBOX": str(outbox),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """``spawn(env, *args)``: start an app process; any still running after the test is
    killed and reaped."""
    started: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_durability_faults", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", line + (process.stderr.read() if process.stderr else "")


def run_drain(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_durability_faults", "drain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "flushed True" in done.stdout, done.stdout + done.stderr
    return done


def finish(process: subprocess.Popen[str], sig: int) -> tuple[str, str, float]:
    began = time.monotonic()
    process.send_signal(sig)
    out, err = process.communicate(timeout=30)
    return out, err, time.monotonic() - began


def tally(emu: Emulator, requests: int) -> dict[str, int]:
    """Operations lost and duplicated, counted from what the emulator took: every event
    once, every send once, every upsert's field present in its contact."""
    events = Counter(e["properties"]["n"] for e in emu.events(event_name="worked"))
    sends = Counter(s["idempotency_key"] for s in emu.sends())
    fields_lost = 0
    for user in range(USERS):
        contact = emu.contact(external_id=f"u{user}")
        have = contact["custom_fields"] if contact else {}
        fields_lost += sum(1 for n in range(user, requests, USERS) if have.get(f"f{n}") != n)
    return {
        "events_lost": sum(1 for n in range(requests) if events[n] == 0),
        "events_duplicated": sum(count - 1 for count in events.values()),
        "sends_lost": sum(1 for n in range(0, requests, 10) if sends[f"k{n}"] == 0),
        "sends_duplicated": sum(count - 1 for count in sends.values()),
        "upserted_fields_lost": fields_lost,
    }


@pytest.mark.slow
def test_sigkill_during_an_outage_loses_and_repeats_nothing(
    emu: Emulator, tmp_path: Path, spawn: Spawn
) -> None:
    requests = 200  # 200 upserts, 200 events, 20 sends
    outbox_path = tmp_path / "outbox.sqlite3"
    env = environment(emu, outbox_path)
    emu.faults.outage(600)
    app = spawn(env, "serve", str(requests))
    wait_ready(app)
    counts = Outbox(outbox_path).counts()
    stored = counts.pending + counts.claimed
    assert stored >= requests + requests // 10  # events and sends each a row; upserts merge
    assert emu.wait_for(lambda e: len(e.requests) >= 3)  # it was trying
    app.kill()
    app.communicate(timeout=10)
    emu.faults.clear()
    run_drain(env)
    numbers = tally(emu, requests)
    print(f"\nSIGKILL with {stored} rows pending: {numbers}")
    assert numbers == dict.fromkeys(numbers, 0)
    assert Outbox(outbox_path).counts() == OutboxCounts()


@pytest.mark.slow
def test_sigterm_flushes_within_the_timeout_and_leaves_the_rest_stored(
    emu: Emulator, tmp_path: Path, spawn: Spawn
) -> None:
    requests = 60
    outbox_path = tmp_path / "outbox.sqlite3"
    env = environment(emu, outbox_path, FLUSH_TIMEOUT="0.5")
    emu.faults.outage(600)
    app = spawn(env, "serve", str(requests))
    wait_ready(app)
    emu.faults.clear()
    emu.faults.set(latency=0.05)  # about ten calls fit in the flush timeout
    _, err, took = finish(app, signal.SIGTERM)
    assert app.returncode == 0, err
    assert took < 0.5 + 4.0  # the flush timeout, the call in flight, the exit
    delivered_before = len([r for r in emu.requests if r.status in (200, 201)])
    counts = Outbox(outbox_path).counts()
    assert delivered_before > 0
    assert counts.pending > 0 and counts.claimed == 0  # handed back for the next start
    assert "stay in the outbox for the next start" in err
    emu.faults.clear()
    run_drain(env)
    numbers = tally(emu, requests)
    print(f"\nSIGTERM after {delivered_before} calls, {counts.pending} rows left: {numbers}")
    assert numbers == dict.fromkeys(numbers, 0)


@pytest.mark.slow
def test_a_send_replayed_after_a_crash_is_not_sent_twice(
    emu: Emulator, tmp_path: Path, spawn: Spawn
) -> None:
    outbox_path = tmp_path / "outbox.sqlite3"
    env = environment(emu, outbox_path)
    # The first send is taken, but its answer is lost; every later call fails unprocessed.
    emu.faults.drop_next(1, path=TRIGGER, after=True)
    for path in (TRIGGER, UPSERT, TRACK):
        emu.faults.fail_next(10_000, status=503, path=path)
    app = spawn(env, "serve", "1")
    wait_ready(app)
    assert emu.wait_for(lambda e: any(r.fault == "drop_after" for r in e.requests))
    app.kill()
    app.communicate(timeout=10)
    assert len(emu.sends()) == 1  # Meisa sent it; the app never learnt so
    emu.faults.clear()
    run_drain(env)
    triggers = [r for r in emu.requests_to(TRIGGER) if r.fault is None]
    assert [r.body["idempotency_key"] for r in triggers] == ["k0"]
    assert len(emu.sends()) == 1  # the replay carried the same key: not sent again


def test_a_forked_child_writes_and_its_parent_delivers(emu: Emulator, tmp_path: Path) -> None:
    env = environment(emu, tmp_path / "outbox.sqlite3")
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_durability_faults", "fork"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        "parent holder True",
        "child flushed True holder False",
        "parent flushed True child_exit 0",
    ], done.stdout + done.stderr
    assert sorted(e["properties"]["n"] for e in emu.events(event_name="worked")) == list(range(6))
    assert emu.live_key not in done.stdout + done.stderr


def test_a_locked_outbox_never_fails_a_request(
    emu: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox_path = tmp_path / "outbox.sqlite3"
    app = make_app(emu.url, emu.live_key, str(outbox_path), MEISA_OUTBOX_BUSY_TIMEOUT=0.05)
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(outbox_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    client = app.test_client()
    try:
        assert locker.stdout is not None
        assert locker.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.WARNING, logger="flask_meisa"):
            for n in range(3):
                response = client.post(f"/work/{n}")
                assert response.status_code == 200
                response.close()
        with app.app_context():
            assert app.extensions["meisa"].flush(5)  # delivered from memory meanwhile
        assert len(emu.events(event_name="worked")) == 3
        assert Outbox(outbox_path).counts() == OutboxCounts()
        assert "database is locked" in caplog.text
        assert "delivering it from memory instead (not durable)" in caplog.text
    finally:
        locker.communicate("", timeout=10)
    # Unlocked: the outbox takes writes again.
    client.post("/work/3").close()
    with app.app_context():
        assert app.extensions["meisa"].flush(5)
    assert "the outbox takes writes again" in caplog.text
    assert len(emu.events(event_name="worked")) == 4
    app.extensions["meisa"].state(app).close()


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
db.close()
"""


if __name__ == "__main__":
    main(sys.argv[1:])
