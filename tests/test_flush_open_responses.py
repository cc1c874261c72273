"""``meisa.flush()`` and responses the test client has not closed: under ``TESTING`` a
request's work is released as soon as the view returned, whatever the test does with
the response; otherwise it waits for the response to close, and ``flush`` says so."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from flask import Flask
from flask import Response
from flask import copy_current_request_context
from flask import stream_with_context
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_meisa import Meisa
from flask_meisa import delivery_dropped
from flask_meisa import operation_queued
from flask_meisa._engine.host import HostLock
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests.apps import build_app
from tests.process_support import ROOT
from tests.process_support import environment
from tests.process_support import run_app
from tests.servers import serve

UPSERT = "/contacts/upsert/"


def make_app(emulator: Emulator, **config: Any) -> Flask:
    """The test app with the default delivery (the store in its instance folder)."""
    return build_app(emulator_config(emulator, MEISA_DELIVERY="thread", **config))


@contextmanager
def login(client: FlaskClient, idiom: str) -> Iterator[TestResponse]:
    """``POST /login/1`` the way a test may write it; the block runs while the response
    (and, for ``with client``, the request context) is still held."""
    with ExitStack() as stack:
        if idiom == "with client":
            stack.enter_context(client)
        response = client.post("/login/1", buffered=idiom == "buffered")
        yield response


@pytest.mark.parametrize("idiom", ["kept", "buffered", "with client"])
def test_under_testing_work_is_released_when_the_view_returns(
    emulator: Emulator, idiom: str
) -> None:
    emulator.faults.set(latency=0.3)  # the call is still being made when flush is called
    app = make_app(emulator, TESTING=True)
    meisa: Meisa = app.extensions["meisa"]
    recorded: list[Operation]
    with record_operations(app) as recorded, login(app.test_client(), idiom) as response:
        assert response.status_code == 200
        assert [op.kind for op in recorded] == ["upsert"]  # right after client.post()
        with app.app_context():
            assert meisa.flush(10)
        assert len(emulator.requests_to(UPSERT)) == 1  # True only once it was delivered
        with app.app_context():
            assert meisa.status().delivered == 1
    assert emulator.contact(external_id="1") is not None


def test_without_testing_a_response_kept_open_holds_its_work_and_flush_says_so(
    emulator: Emulator,
) -> None:
    app = make_app(emulator)
    meisa: Meisa = app.extensions["meisa"]
    with record_operations(app) as recorded:
        response = app.test_client().post("/login/1")
        assert response.status_code == 200
        assert recorded == []  # held until the server is done with the response
        with app.app_context():
            assert not meisa.flush(0.2)
        assert emulator.requests_to(UPSERT) == []
        response.close()
        assert [op.kind for op in recorded] == ["upsert"]
        with app.app_context():
            assert meisa.flush(10)
    assert len(emulator.requests_to(UPSERT)) == 1


#: The locks a response's release takes, which the thread collecting it may hold.
RELEASE_LOCKS = {
    "the state's": lambda state: state._lock,  # making the client
    "the engine's": lambda state: state.dispatcher._lock,  # the writer taking the intake
    "the held batches'": lambda state: state.held._lock,
}


@pytest.mark.parametrize("lock", RELEASE_LOCKS)
def test_a_response_collected_in_a_thread_holding_a_lock_of_its_release_still_releases(
    emulator: Emulator, lock: str
) -> None:
    # A response dropped unclosed in a reference cycle is released by the collector, in
    # whichever thread it runs: maybe one inside a lock the release takes.
    app = make_app(emulator)
    meisa: Meisa = app.extensions["meisa"]
    held = RELEASE_LOCKS[lock](meisa.state(app))
    response = app.test_client().post("/login/1")
    assert response.status_code == 200
    cycle: list[Any] = [response]
    cycle.append(cycle)
    collected = threading.Event()

    def collect() -> None:
        held.acquire()
        try:
            gc.collect()
            collected.set()
        finally:
            with contextlib.suppress(RuntimeError):  # let go by the test when stuck
                held.release()

    collector = threading.Thread(target=collect, daemon=True)
    enabled = gc.isenabled()
    gc.disable()  # collected in the collector's thread, not wherever it allocates first
    try:
        del response, cycle
        collector.start()
        stuck = not collected.wait(10)
    finally:
        if enabled:
            gc.enable()
    if stuck:  # waiting for the lock it holds: let it go, so that the test ends
        held.release()
    collector.join(10)
    assert not stuck, f"releasing waited for {lock} lock, held by its own thread"
    with app.app_context():
        assert meisa.flush(10)
    assert len(emulator.requests_to(UPSERT)) == 1


@pytest.mark.parametrize("testing", [False, True], ids=["not-testing", "testing"])
def test_a_response_kept_past_its_apps_life_logs_no_error_at_exit(
    emulator: Emulator, tmp_path: Any, testing: bool
) -> None:
    env = environment(emulator, tmp_path / "instance")
    output = run_app(env, "keep-response", *(["testing"] if testing else []))
    assert "kept a response" in output
    for sign in ("Traceback", "Exception ignored", "ERROR", "CRITICAL", "Error"):
        assert sign not in output, output
    assert emulator.live_key not in output


KEEP_APP_AND_RESPONSE = """
import os
from flask_meisa import Meisa
from tests.apps import build_app
meisa = Meisa()
app = build_app({"MEISA_API_KEY": os.environ["MEISA_TEST_KEY"],
                 "MEISA_BASE_URL": os.environ["MEISA_TEST_URL"],
                 "MEISA_OUTBOX": os.environ["MEISA_TEST_INSTANCE"] + "/outbox.sqlite3"},
                meisa=meisa)
kept = app.test_client().post("/login/1")  # never closed
print("kept a response; exiting")
"""


def test_a_response_kept_with_its_app_to_the_end_lets_the_interpreter_exit(
    emulator: Emulator, tmp_path: Any
) -> None:
    # The response releases its work while the interpreter finalizes, after the exit hook
    # closed delivery: a thread started then (before Python 3.12) never started.
    env = environment(emulator, tmp_path / "instance")
    done = subprocess.run(
        [sys.executable, "-c", KEEP_APP_AND_RESPONSE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "kept a response" in output
    assert "Traceback" not in output, output
    assert emulator.live_key not in output


def test_flush_inside_a_streamed_response_delivers_its_own_work_first(
    emulator: Emulator,
) -> None:
    app = make_app(emulator)
    meisa: Meisa = app.extensions["meisa"]

    @app.get("/streamed")
    def streamed() -> Any:
        meisa.upsert({"email": "ada@example.com", "external_id": "ada"})

        def rows() -> Iterator[str]:
            yield "started\n"
            yield f"flushed: {meisa.flush(5)}\n"  # waited for this very response before

        return Response(stream_with_context(rows()))

    started = time.monotonic()
    response = app.test_client().get("/streamed")
    assert response.get_data(as_text=True) == "started\nflushed: True\n"
    assert time.monotonic() - started < 4
    response.close()
    assert emulator.contact(external_id="ada") is not None


def test_flush_in_a_receiver_of_a_release_does_not_wait_for_that_release(
    emulator: Emulator,
) -> None:
    # An audit receiver that flushes once work is queued runs inside the release of the
    # response that holds the work: waiting for that response to be released, it waited
    # for itself, its whole timeout.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    results: list[tuple[bool, float]] = []
    done = threading.Event()

    def on_queued(sender: Flask, operation: Operation, **extra: Any) -> None:
        with sender.app_context():
            started = time.monotonic()
            results.append((meisa.flush(3.0), time.monotonic() - started))
        done.set()

    operation_queued.connect(on_queued, sender=app)
    try:
        with serve(app) as url, requests.Session() as http:
            assert http.post(f"{url}/login/1").status_code == 200
            assert done.wait(10)
    finally:
        operation_queued.disconnect(on_queued, sender=app)
        meisa.state(app).close(5.0)
    ((flushed, took),) = results
    assert flushed and took < 2.0, (flushed, took)


def test_a_stream_that_fails_releases_nothing(emulator: Emulator) -> None:
    # A lazy export: the view upserts and returns a generator whose first query fails.
    # The client gets a 500, as from a view that raised: nothing may be released.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]

    @app.get("/lazy-export/<int:rows>")
    def lazy_export(rows: int) -> Response:
        meisa.upsert({"email": "ada@example.com", "first_name": "Exported"})

        def lines() -> Iterator[str]:
            yield from ["row\n"] * rows
            raise RuntimeError("the export query failed")

        return Response(stream_with_context(lines()))

    try:
        with serve(app) as url, requests.Session() as http:
            assert http.get(f"{url}/lazy-export/0").status_code == 500
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                http.get(f"{url}/lazy-export/3")  # cut after its first rows
            with app.app_context():
                assert meisa.flush(5.0)
    finally:
        meisa.state(app).close(5.0)
    assert emulator.requests_to("/contacts/upsert/") == []


def test_flush_of_an_app_counts_its_work_held_by_another_apps_open_response(
    emulator: Emulator, emulator_factory: Any
) -> None:
    other_emulator = emulator_factory(seed="demo", rate_limit=None)
    # The other app delivers inline: one store per instance folder is one app's.
    app, other = make_app(emulator), build_app(emulator_config(other_emulator))
    theirs: Meisa = other.extensions["meisa"]

    @app.post("/both")
    def both() -> str:
        with other.app_context():  # the other app's work, held by this app's response
            theirs.upsert({"email": "other@example.com"})
        return "ok"

    response = app.test_client().post("/both")
    with other.app_context():
        assert not theirs.flush(0.2)
    assert other_emulator.requests_to(UPSERT) == []
    response.close()
    with other.app_context():
        assert theirs.flush(10)
    assert len(other_emulator.requests_to(UPSERT)) == 1


class _PausingEnviron(dict):  # type: ignore[type-arg]
    """A server's environ whose batch look-up, in a thread of the request's, waits for
    ``gate`` once it has read the batches (that thread is descheduled right there)."""

    def __init__(self, environ: dict[str, Any], read: threading.Event, gate: threading.Event):
        super().__init__(environ)
        self.read, self.gate = read, gate

    def get(self, key: str, default: Any = None) -> Any:
        value = super().get(key, default)
        if key == "flask_meisa.batch" and threading.current_thread().name == "late-helper":
            self.read.set()
            self.gate.wait(10)
        return value


def test_work_a_request_thread_adds_as_the_response_leaves_keeps_flush_counting(
    emulator: Emulator, emulator_factory: Any
) -> None:
    # A thread of the request's read the request's batches just before the response left,
    # and adds the other app's batch to them once the response holds them: the response's
    # release must not count for the other app a batch it never counted as held (its
    # count went below zero, and its flush stopped waiting for responses that hold work).
    other_emulator = emulator_factory(seed="demo", rate_limit=None)
    app, other = make_app(emulator), build_app(emulator_config(other_emulator))
    mine: Meisa = app.extensions["meisa"]
    theirs: Meisa = other.extensions["meisa"]
    read, gate = threading.Event(), threading.Event()
    helpers: list[threading.Thread] = []
    inner = app.wsgi_app

    def pausing(environ: Any, start_response: Any) -> Any:
        return inner(_PausingEnviron(environ, read, gate), start_response)

    app.wsgi_app = pausing  # type: ignore[method-assign]

    @app.post("/late-helper")
    def late_helper() -> str:
        mine.upsert({"email": "mine@example.com"})

        @copy_current_request_context
        def helper() -> None:
            with other.app_context():
                theirs.upsert({"email": "late@example.com"})

        thread = threading.Thread(target=helper, name="late-helper")
        helpers.append(thread)
        thread.start()
        assert read.wait(10)
        return "ok"

    @app.post("/theirs")
    def their_work() -> str:
        with other.app_context():
            theirs.upsert({"email": "held@example.com"})
        return "ok"

    try:
        client = app.test_client()
        first = client.post("/late-helper")
        gate.set()
        helpers[0].join(10)
        first.close()
        with other.app_context():
            assert theirs.flush(10)
        second = client.post("/theirs")  # held until closed: flush must say so
        with other.app_context():
            assert not theirs.flush(0.2)
        second.close()
        with other.app_context():
            assert theirs.flush(10)
    finally:
        mine.state(app).close(5.0)
        theirs.state(other).close(5.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_does_not_wait_for_responses_its_parent_held(emulator: Emulator) -> None:
    # A view starting a process (multiprocessing's fork) while other responses are open:
    # their batches are the parent's to release, and the child's flush must not wait
    # for them (nor for a lock a parent thread held at the fork).
    app = make_app(emulator)
    meisa: Meisa = app.extensions["meisa"]
    response = app.test_client().post("/login/1")  # kept open: it holds its batch
    with app.app_context():
        assert not meisa.flush(0.1)
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            with app.app_context():
                os.write(write, b"flushed" if meisa.flush(5) else b"timed out")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        said = answer.read()
    os.waitpid(pid, 0)
    assert said == b"flushed"
    response.close()  # the parent still releases and delivers its own
    with app.app_context():
        assert meisa.flush(10)
    assert len(emulator.requests_to(UPSERT)) == 1


def test_flush_in_a_dropped_receiver_on_the_writers_thread_does_not_wait_for_open_responses(
    emulator: Emulator, tmp_path: Any
) -> None:
    # The writer alone stores, and runs the receivers of what its pass shed (queue_size 1):
    # a flush there answers at once, as the engine's does in a hook, and does not hold the
    # writer for its timeout while a response (a download, a stream) holds its batch: all
    # the process's released work would wait that long in memory, not ~10 ms.
    path = tmp_path / "outbox.sqlite3"
    elsewhere = HostLock(f"{path}.lock")  # another process delivers: the rows stay
    assert elsewhere.try_acquire()
    app = make_app(emulator, MEISA_OUTBOX=str(path), MEISA_QUEUE_SIZE=1)
    meisa: Meisa = app.extensions["meisa"]
    answers: list[tuple[bool, str, float]] = []
    answered = threading.Event()

    def flush_when_dropped(sender: Flask, **extra: Any) -> None:
        began = time.monotonic()
        with sender.app_context():
            done = meisa.flush(5)
        answers.append((done, threading.current_thread().name, time.monotonic() - began))
        answered.set()

    try:
        with delivery_dropped.connected_to(flush_when_dropped, app):
            kept = app.test_client().post("/login/1")  # its batch held until it is closed
            with app.app_context():
                meisa.track("first", external_id="x1")
                meisa.track("second", external_id="x2")  # one more than the store takes
                assert answered.wait(10)
            kept.close()
            ((done, thread, took),) = answers[:1]
            assert (done, thread) == (False, "flask-meisa-reporter")
            assert took < 1.0  # not the flush's 5 s
    finally:
        with app.app_context():
            meisa.close(timeout=0)
        elsewhere.release()
