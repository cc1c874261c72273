"""What syncs, and when: after the response, coalesced, never for a failed view."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import math
import pydoc
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import flask_login
import pytest
import requests
from asgiref.wsgi import WsgiToAsgi
from flask import Flask
from flask import Response
from flask import copy_current_request_context
from flask import current_app
from flask import g
from flask import request
from flask import stream_with_context
from werkzeug.local import LocalProxy
from werkzeug.test import EnvironBuilder

import flask_meisa
from flask_meisa import Meisa
from flask_meisa import ValidationError
from flask_meisa import contact_synced
from flask_meisa import delivery_dropped
from flask_meisa import operation_queued
from flask_meisa import signals
from flask_meisa._engine import writer
from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.host import HostLock
from flask_meisa.emulator import Emulator
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests.apps import build_app
from tests.engine_support import query
from tests.servers import serve

UPSERT = "/contacts/upsert/"


@pytest.fixture
def app(emulator: Any) -> Flask:
    return build_app(emulator_config(emulator))


def upserts(emulator: Any) -> list[Any]:
    return list(emulator.requests_to(UPSERT))


def test_login_upsert_arrives_only_after_the_client_has_its_response(
    emulator: Any, app: Flask
) -> None:
    emulator.faults.set(latency=3.0)
    with serve(app) as url, requests.Session() as http:
        started = time.monotonic()
        response = http.post(f"{url}/login/1")
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        # The upsert takes 3 s at the emulator (long beside a login's answer, even on a busy
        # machine); the login answered before it was made.
        assert elapsed < 3.0
        assert upserts(emulator) == []
        assert emulator.wait_for_requests(1, path=UPSERT, timeout=10)
    (request,) = upserts(emulator)
    assert request.body["email"] == "ada@example.com"
    assert request.body["external_id"] == "1"
    assert request.body["first_name"] == "Ada"
    assert request.body["custom_fields"] == {
        "plan": "free",
        "signup_date": "2026-01-02T03:04:05Z",
        "mrr": 0,
    }
    assert emulator.contact(email="ada@example.com")["external_id"] == "1"


def test_a_session_restored_from_the_remember_me_cookie_syncs_nothing(emulator: Any) -> None:
    app = build_app(emulator_config(emulator))
    users = app.config["USERS"]

    @app.post("/remember/<int:user_id>")
    def remember(user_id: int) -> str:
        flask_login.login_user(users[user_id], remember=True)
        return "logged in"

    @app.get("/me")
    def me() -> str:
        return str(flask_login.current_user.email)

    with app.test_client() as client:
        client.post("/remember/1", buffered=True)
        assert len(upserts(emulator)) == 1
        client.delete_cookie("session")  # a new browser session: only the cookie is left
        assert client.get("/me", buffered=True).text == "ada@example.com"
    assert len(upserts(emulator)) == 1


def test_plan_change_upserts_the_new_plan(emulator: Any, app: Flask) -> None:
    with app.test_client() as client:
        client.post("/plan/2/pro", buffered=True)
    (request,) = upserts(emulator)
    assert request.body["custom_fields"]["plan"] == "pro"
    assert emulator.contact(email="grace@example.com")["custom_fields"]["plan"] == "pro"


def test_three_changes_of_one_user_in_one_request_make_one_merged_upsert(
    emulator: Any, app: Flask
) -> None:
    app.test_client().post("/triple/1", buffered=True)
    (request,) = upserts(emulator)
    assert request.body == {
        "email": "ada@example.com",
        "external_id": "1",
        "first_name": "Ady",
        "custom_fields": {"a": 1, "b": 2},
        "tag_names": ["x", "y"],
    }


@pytest.mark.parametrize("path", ["/fail/1", "/abort/1"])
def test_a_failed_view_releases_nothing(emulator: Any, app: Flask, path: str) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False
    with record_operations(app) as recorded:
        response = app.test_client().post(path, buffered=True)
    assert response.status_code >= 500
    assert recorded == []
    assert emulator.requests == []


def test_a_raising_view_under_testing_releases_nothing(emulator: Any, app: Flask) -> None:
    app.config["TESTING"] = True
    app.config["MEISA_SUPPRESS_SEND"] = False
    with record_operations(app) as recorded, pytest.raises(RuntimeError):
        app.test_client().post("/fail/1", buffered=True)
    assert recorded == []
    assert emulator.requests == []


def test_release_on_error_releases_a_failed_views_work(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, MEISA_RELEASE_ON_ERROR=True))
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert app.test_client().post("/abort/1", buffered=True).status_code == 503
    assert len(upserts(emulator)) == 1


@pytest.mark.parametrize("path", ["/file/1", "/stream/1"])
def test_send_file_and_streamed_responses_still_release(
    emulator: Any, app: Flask, path: str
) -> None:
    with serve(app) as url, requests.Session() as http:
        response = http.get(f"{url}{path}")
        assert response.status_code == 200
        assert emulator.wait_for_requests(1, path=UPSERT, timeout=5)
    assert upserts(emulator)[0].body["email"] == "ada@example.com"


def _stream_app(emulator: Any, **config: Any) -> tuple[Flask, threading.Event]:
    """An app whose ``/rows`` view upserts, then streams ``first`` and ``last`` (once
    ``go_on`` is set), or rows until the client stops reading (``?endless``), or ``first``
    then an error (``?fail``); its ``/tracked-rows`` tracks an event inside the stream."""
    app = build_app(emulator_config(emulator, **config))
    app.config["PROPAGATE_EXCEPTIONS"] = False
    meisa: Meisa = app.extensions["meisa"]
    go_on = threading.Event()

    @app.get("/rows")
    def rows() -> Response:
        meisa.upsert({"email": "ada@example.com", "external_id": "1"})

        def chunks() -> Iterator[bytes]:
            yield b"first\n"
            if "fail" in request.args:
                raise RuntimeError("the export query failed")
            while "endless" in request.args:  # the server blocks while the client reads none
                yield b"x" * 65536
            assert go_on.wait(10)
            yield b"last\n"

        return Response(stream_with_context(chunks()))

    @app.get("/tracked-rows")
    def tracked_rows() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"first\n"
            meisa.track("exported", email="ada@example.com")
            raise RuntimeError("the export query failed")

        return Response(stream_with_context(chunks()))

    return app, go_on


def test_a_streamed_responses_work_is_released_when_the_stream_ends_not_when_the_view_returns(
    emulator: Any,
) -> None:
    app, go_on = _stream_app(emulator)
    with record_operations(app) as recorded, serve(app) as url:
        with requests.get(f"{url}/rows", stream=True, timeout=10) as response:
            chunks = response.iter_content(None)
            assert next(chunks) == b"first\n"  # the view has returned, the stream goes on
            assert recorded == []
            go_on.set()
            assert b"".join(chunks) == b"last\n"
        assert emulator.wait_for_requests(1, path=UPSERT, timeout=5)
    assert [op.kind for op in recorded] == ["upsert"]


def test_a_stream_the_client_leaves_before_its_end_still_releases_its_work(
    emulator: Any,
) -> None:
    app, _ = _stream_app(emulator)
    with record_operations(app) as recorded, serve(app) as url:
        with requests.get(f"{url}/rows?endless", stream=True, timeout=10) as response:
            chunks = response.iter_content(None)  # dropped, it would hang up (urllib3)
            assert next(chunks).startswith(b"first\n")
            assert recorded == []
        # The client hung up: the server's next write fails and it closes the body.
        assert emulator.wait_for_requests(1, path=UPSERT, timeout=5)
    assert upserts(emulator)[0].body["email"] == "ada@example.com"


def test_a_stream_that_raises_midway_releases_the_views_work_only_with_release_on_error(
    emulator: Any,
) -> None:
    for release_on_error in (False, True):
        app, _ = _stream_app(emulator, MEISA_RELEASE_ON_ERROR=release_on_error)
        meisa: Meisa = app.extensions["meisa"]
        with serve(app) as url, requests.Session() as http:
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                http.get(f"{url}/rows?fail", timeout=10)  # cut after its first row
            with app.app_context():
                assert meisa.flush(5)
        assert len(upserts(emulator)) == int(release_on_error), release_on_error


def test_work_queued_while_a_stream_is_written_goes_to_delivery_even_if_the_stream_fails(
    emulator: Any,
) -> None:
    # The client has had the rows the stream tracked: their events are not held back.
    app, _ = _stream_app(emulator)
    cut = pytest.raises(requests.exceptions.ChunkedEncodingError)
    with serve(app) as url, requests.Session() as http, cut:
        http.get(f"{url}/tracked-rows", timeout=10)
    tracked = emulator.requests_to("/events/track/")
    assert [r.body["event_name"] for r in tracked] == ["exported"]


def test_outside_a_request_operations_go_straight_to_delivery(emulator: Any, app: Flask) -> None:
    meisa: Meisa = app.extensions["meisa"]
    with app.app_context():
        meisa.upsert({"email": "cli@example.com", "custom_fields": {"plan": "pro"}})
        assert len(upserts(emulator)) == 1
        meisa.track("ran_job", email="cli@example.com", properties={"n": 1})
    assert emulator.events()[0]["event_name"] == "ran_job"


def test_test_request_context_releases_at_teardown(emulator: Any, app: Flask) -> None:
    users = app.config["USERS"]
    app.test_client().post("/login/2", buffered=True)
    with app.test_request_context("/"):
        flask_login.login_user(users[1])
        assert upserts(emulator)[-1].body["email"] != users[1].email
    assert upserts(emulator)[-1].body["email"] == users[1].email
    with pytest.raises(RuntimeError), app.test_request_context("/"):
        flask_login.login_user(users[2])
        raise RuntimeError("the view failed")
    assert [u.body["email"] for u in upserts(emulator)] == [users[2].email, users[1].email]


def test_a_send_released_after_delivery_closed_is_reported_dropped_as_refused(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=None))
    meisa: Meisa = app.extensions["meisa"]
    dropped: list[tuple[str, str]] = []

    def record(sender: Flask, **extra: Any) -> None:
        dropped.append((extra["operation"].kind, extra["reason"]))

    with delivery_dropped.connected_to(record, app), app.test_request_context("/"):
        meisa.send("password_reset", "ada@example.com", background=True)  # held until the end
        # Closed while the request ran (meisa.close() in another thread, as it races a
        # release): the engine the release hands its work to refuses it.
        meisa.state(app).dispatcher.close(0)
    assert dropped == [("send", "refused")]
    assert "was not accepted: delivery engine is closed" in caplog.text
    assert emulator.requests_to("/emails/trigger/") == []


def test_work_released_while_meisa_close_runs_in_another_thread_is_delivered(
    emulator: Any,
) -> None:
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    entered, go = threading.Event(), threading.Event()
    dropped: list[str] = []

    # Holds the releasing thread where it has the engine in hand, not yet handing over to
    # it: the one moment of a real race with close() that a test can stop at.
    def hold(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is Delivery.submit.__code__ and not entered.is_set():
            entered.set()
            go.wait(10)

    def login() -> None:
        sys.settrace(hold)
        try:
            app.test_client().post("/login/1").close()
        finally:
            sys.settrace(None)

    def record(sender: Flask, **extra: Any) -> None:
        dropped.append(extra["reason"])

    with delivery_dropped.connected_to(record, app):
        releasing = threading.Thread(target=login)
        releasing.start()
        assert entered.wait(10)
        assert meisa.close(app, timeout=5) == 0
        go.set()
        releasing.join(10)
        with app.app_context():
            assert meisa.flush(10)
    assert dropped == []
    assert [u.body["email"] for u in emulator.requests_to(UPSERT)] == ["ada@example.com"]


def test_work_of_another_apps_meisa_goes_through_that_app(
    emulator: Any, emulator_factory: Any
) -> None:
    other_emulator = emulator_factory(seed="demo", rate_limit=None)
    app, other = build_app(emulator_config(emulator)), build_app(emulator_config(other_emulator))

    @app.post("/both")
    def both() -> str:
        with other.app_context():  # the other app's work, made first, in this request
            other.extensions["meisa"].upsert({"email": "other@example.com"})
        app.extensions["meisa"].upsert({"email": "mine@example.com"})
        return "ok"

    app.test_client().post("/both", buffered=True)
    with app.test_request_context("/"):
        both()
    assert [u.body["email"] for u in upserts(other_emulator)] == ["other@example.com"] * 2
    assert [u.body["email"] for u in upserts(emulator)] == ["mine@example.com"] * 2


def test_work_is_released_when_the_apps_wsgi_callable_is_replaced(emulator: Any) -> None:
    app = build_app(emulator_config(emulator))
    app.wsgi_app = Flask.wsgi_app.__get__(app)  # type: ignore[method-assign]
    gc.collect()  # nothing holds the extension's middleware now
    app.test_client().post("/login/1", buffered=True)
    with app.app_context():
        assert app.extensions["meisa"].flush(5)
    assert [u.body["email"] for u in upserts(emulator)] == ["ada@example.com"]


def test_login_still_syncs_after_garbage_collection(emulator: Any) -> None:
    app = build_app(emulator_config(emulator))
    gc.collect()
    app.test_client().post("/login/2", buffered=True)
    assert len(upserts(emulator)) == 1


def test_a_failing_mapper_never_breaks_login(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    meisa = Meisa()

    @meisa.contact_mapper
    def broken(user: Any) -> dict[str, Any]:
        raise LookupError("mapper bug")

    app = build_app(emulator_config(emulator), meisa=meisa)
    with caplog.at_level(logging.ERROR, logger="flask_meisa"):
        response = app.test_client().post("/login/1", buffered=True)
    assert response.status_code == 200
    assert "could not sync the user who logged in" in caplog.text
    assert emulator.requests == []


def test_a_login_field_that_cannot_be_sent_is_logged_while_the_login_runs(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Checked in the request, as an explicit upsert is: logged before the response is out.
    app = build_app(emulator_config(emulator))
    app.config["USERS"][1].mrr = math.nan
    environ = EnvironBuilder(path="/login/1", method="POST").get_environ()

    def start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        return lambda data: None

    with caplog.at_level(logging.ERROR, logger="flask_meisa"):
        body = app(environ, start_response)
        assert b"".join(body) == b"logged in"
        (record,) = caplog.records
        body.close()  # type: ignore[attr-defined]
    assert record.getMessage() == "meisa: could not sync the user who logged in"
    assert "custom_fields.mrr: must be a finite number" in caplog.text
    assert len(caplog.records) == 1
    assert emulator.requests == []


def test_a_logins_work_is_stored_by_the_writer_not_by_the_requests_thread(
    emulator: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request's thread hands its work over and is done: the writer stores the group at
    # the end of its window (a minute here), or at once when the engine closes.
    monkeypatch.setattr(writer, "GROUP_WINDOW", 60.0)
    path = tmp_path / "store.sqlite3"
    elsewhere = HostLock(f"{path}.lock")  # another process delivers: the rows stay
    assert elsewhere.try_acquire()
    try:
        config = emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(path))
        app = build_app(config)
        meisa = app.extensions["meisa"]
        with app.app_context():
            assert meisa.state().dispatcher.first_pass(10)
        for user in (1, 2):
            environ = EnvironBuilder(path=f"/login/{user}", method="POST").get_environ()
            body = app(environ, lambda status, headers, exc_info=None: lambda data: None)
            assert b"".join(body) == b"logged in"
            body.close()  # type: ignore[attr-defined]
        assert query(path, "SELECT ext FROM meisa_ops") == []
        assert meisa.close(timeout=0) == 0
        assert query(path, "SELECT ext FROM meisa_ops ORDER BY ext") == [("ext:1",), ("ext:2",)]
    finally:
        elsewhere.release()


def test_a_logins_upsert_is_dated_by_the_login_not_by_the_end_of_its_response(
    emulator: Any,
) -> None:
    # Its age, and which of a backfill's reads it is newer than, start at the login.
    app = build_app(emulator_config(emulator))
    environ = EnvironBuilder(path="/login/1", method="POST").get_environ()

    def start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        return lambda data: None

    with record_operations(app) as recorded:
        began = time.time()
        body = app(environ, start_response)
        answered = time.time()
        assert b"".join(body) == b"logged in"
        body.close()  # type: ignore[attr-defined]
    (operation,) = recorded
    assert began <= operation.created_at <= answered


@pytest.mark.parametrize(
    ("mrr", "told"),
    [
        (math.nan, "custom_fields.mrr: must be a finite number"),
        ("x" * 600_000, "custom_fields: makes the request body 600"),  # its JSON, made later
    ],
)
def test_a_login_field_that_cannot_be_sent_is_logged_when_the_view_then_fails(
    emulator: Any, caplog: pytest.LogCaptureFixture, mrr: object, told: str
) -> None:
    # A failed view releases nothing: the login's bad field must still be told, once.
    app = build_app(emulator_config(emulator, PROPAGATE_EXCEPTIONS=False))
    app.config["USERS"][1].mrr = mrr

    @app.post("/login-then-fail/<int:user_id>")
    def login_then_fail(user_id: int) -> str:
        flask_login.login_user(app.config["USERS"][user_id])
        raise RuntimeError("the view failed")

    with caplog.at_level(logging.ERROR, logger="flask_meisa"):
        response = app.test_client().post("/login-then-fail/1", buffered=True)
    assert response.status_code == 500
    meisa = [r.getMessage() for r in caplog.records if r.name == "flask_meisa"]
    assert meisa == ["meisa: could not sync the user who logged in"]
    assert told in caplog.text
    assert emulator.requests == []


def test_a_login_sends_the_user_as_it_was_read_not_as_the_view_left_it(emulator: Any) -> None:
    # The login captures plain data: a dict of the user's that the view changes after
    # login_user (or another request changes meanwhile) is not what the login read.
    meisa = Meisa()

    @meisa.contact_mapper
    def mapper(user: Any) -> dict[str, Any]:
        return {"email": user.email, "custom_fields": user.settings, "tag_names": user.tags}

    app = build_app(emulator_config(emulator), meisa=meisa)
    users = app.config["USERS"]
    users[1].settings, users[1].tags = {"theme": "dark"}, ["beta"]

    @app.post("/login-then-edit/<int:user_id>")
    def login_then_edit(user_id: int) -> str:
        user = users[user_id]
        flask_login.login_user(user)
        user.settings["theme"] = "light"
        user.settings["draft"] = "not yet saved"
        user.tags.append("churned")
        return "ok"

    assert app.test_client().post("/login-then-edit/1", buffered=True).status_code == 200
    (upsert,) = upserts(emulator)
    assert upsert.body["custom_fields"] == {"theme": "dark"}
    assert upsert.body["tag_names"] == ["beta"]


class _AppZone(dt.tzinfo):
    """A time zone the app configures: its offset read from the current app's config."""

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=current_app.config["ZONE_HOURS"])

    def dst(self, when: dt.datetime | None) -> dt.timedelta | None:
        return None

    def tzname(self, when: dt.datetime | None) -> str:
        return "app"


def test_a_login_field_that_needs_the_request_is_converted_in_it(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Values that only mean something in the request (a proxy to g, a zone read from the
    # app) are made plain data there: the release runs after the request's context is gone.
    meisa = Meisa()
    tenant = LocalProxy(lambda: g.tenant)

    @meisa.contact_mapper
    def mapper(user: Any) -> dict[str, Any]:
        seen = dt.datetime(2026, 1, 2, 12, 0, tzinfo=_AppZone())
        return {"email": user.email, "custom_fields": {"tenant": tenant, "seen": seen}}

    app = build_app(emulator_config(emulator, ZONE_HOURS=2), meisa=meisa)
    app.before_request(lambda: setattr(g, "tenant", "acme"))
    with caplog.at_level(logging.ERROR, logger="flask_meisa"):
        assert app.test_client().post("/login/1", buffered=True).status_code == 200
    assert caplog.records == []
    (upsert,) = upserts(emulator)
    assert upsert.body["custom_fields"] == {"tenant": "acme", "seen": "2026-01-02T10:00:00Z"}


class _PlainUser:
    """A user without Flask-Login's ``UserMixin``: no ``get_id()``; the app's login manager
    reads ``get_auth_id()`` instead (``LoginManager.id_attribute``)."""

    is_active = is_authenticated = True
    is_anonymous = False

    def __init__(self, email: str) -> None:
        self.email = email

    def get_auth_id(self) -> str:
        return self.email


def _plain_login_app(emulator: Any, meisa: Meisa) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test", **emulator_config(emulator))
    manager = flask_login.LoginManager(app)
    manager.id_attribute = "get_auth_id"
    manager.user_loader(_PlainUser)
    meisa.init_app(app)

    @app.post("/login")
    def login() -> str:
        assert flask_login.login_user(_PlainUser("plain@example.com"))
        return "logged in"

    return app


def test_a_user_without_get_id_syncs_by_email_alone(emulator: Any) -> None:
    app = _plain_login_app(emulator, Meisa())
    with app.test_client() as client:
        assert client.post("/login", buffered=True).status_code == 200
        assert flask_login.current_user.email == "plain@example.com"
    (request,) = upserts(emulator)
    assert request.body == {"email": "plain@example.com"}


def test_a_mapper_that_calls_get_id_on_a_user_without_it_is_logged_and_login_goes_on(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    meisa = Meisa()

    @meisa.contact_mapper
    def by_id(user: Any) -> dict[str, Any]:
        return {"email": user.email, "external_id": user.get_id()}

    app = _plain_login_app(emulator, meisa)
    with caplog.at_level(logging.ERROR, logger="flask_meisa"), app.test_client() as client:
        assert client.post("/login", buffered=True).status_code == 200
        assert flask_login.current_user.is_authenticated  # logged in all the same
    (record,) = [r for r in caplog.records if r.name == "flask_meisa"]
    assert record.getMessage() == "meisa: could not sync the user who logged in"
    assert record.exc_info is not None and isinstance(record.exc_info[1], AttributeError)
    assert "get_id" in str(record.exc_info[1])
    assert emulator.requests == []


def test_sync_on_login_can_be_switched_off(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, MEISA_SYNC_ON_LOGIN=False))
    app.test_client().post("/login/1", buffered=True)
    assert emulator.requests == []


def test_background_thread_delivery_after_the_response(emulator: Any) -> None:
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    try:
        app.test_client().post("/login/1", buffered=True)
        app.test_client().post("/plan/1/pro", buffered=True)
        with app.app_context():
            assert meisa.flush(5.0)
            assert meisa.status().delivered == 2
        assert emulator.contact(email="ada@example.com")["custom_fields"]["plan"] == "pro"
    finally:
        meisa.state(app).close(5.0)


def test_a_receiver_that_raises_is_logged_and_keeps_no_other_receiver_from_its_signal(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    heard: list[str] = []

    def broken(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("a bug in the app's receiver")

    def metrics(sender: Flask, **extra: Any) -> None:
        heard.append(extra["operation"].kind)

    try:
        with contact_synced.connected_to(broken, app), contact_synced.connected_to(metrics, app):
            app.test_client().post("/login/1", buffered=True)
            with app.app_context():
                assert meisa.flush(5.0)
                assert meisa.status().delivered == 1
        assert heard == ["upsert"]
        assert "a receiver of meisa-contact-synced raised" in caplog.text
    finally:
        meisa.state(app).close(5.0)


def test_a_receiver_on_a_delivery_thread_runs_in_its_apps_context(emulator: Any) -> None:
    # As Celery's workers run them, and as Flask runs its own signals' receivers: one that
    # records the outcome with current_app (Flask-SQLAlchemy's session, the app's logger)
    # is not refused for want of a context and its work lost.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    heard: list[Any] = []

    def record(sender: Flask, **extra: Any) -> None:
        heard.append((threading.current_thread().name, current_app._get_current_object()))  # type: ignore[attr-defined]

    try:
        with contact_synced.connected_to(record, app):
            app.test_client().post("/login/1", buffered=True)
            with app.app_context():
                assert meisa.flush(5.0)
        ((thread, seen),) = heard
        assert thread != threading.current_thread().name
        assert seen is app
    finally:
        meisa.state(app).close(5.0)


def test_a_failing_teardown_of_a_receivers_app_context_loses_no_operation(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The context pushed for the receivers after the response is popped with the app's
    # teardown_appcontext hooks: one that fails (a database session that cannot be
    # removed) is logged, and keeps the request's other operations from no release.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    used: list[bool] = []  # the receiver used the database in its context

    @app.teardown_appcontext
    def remove_session(error: BaseException | None) -> None:
        if used:
            used.clear()
            raise RuntimeError("the database session could not be removed")

    @app.post("/two")
    def two() -> str:
        meisa.upsert({"email": "ada@example.com"})
        meisa.upsert({"email": "bob@example.com"})
        return "ok"

    def queued(sender: Flask, **extra: Any) -> None:
        used.append(True)

    try:
        with operation_queued.connected_to(queued, app):
            assert app.test_client().post("/two", buffered=True).status_code == 200
        with app.app_context():
            assert meisa.flush(5.0)
        delivered = {call.body["email"] for call in upserts(emulator)}
        assert delivered == {"ada@example.com", "bob@example.com"}
        assert "the app context of the receivers of meisa-operation-queued failed" in caplog.text
    finally:
        meisa.state(app).close(5.0)


def test_an_async_receiver_is_logged_and_keeps_no_other_from_the_signal(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    heard: list[str] = []

    async def later(sender: Flask, **extra: Any) -> None:
        heard.append("async")

    def metrics(sender: Flask, **extra: Any) -> None:
        heard.append(extra["operation"].kind)

    try:
        with contact_synced.connected_to(later, app), contact_synced.connected_to(metrics, app):
            app.test_client().post("/login/1", buffered=True)
            with app.app_context():
                assert meisa.flush(5.0)
        assert heard == ["upsert"]
        assert "a receiver of meisa-contact-synced raised" in caplog.text
        assert "TypeError: an async receiver cannot be called from delivery" in caplog.text
    finally:
        meisa.state(app).close(5.0)


def test_a_plan_change_that_cannot_be_synced_is_logged_and_signalled_never_raised(
    emulator: Any, app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    from flask_meisa import ValidationError
    from flask_meisa import delivery_failed
    from flask_meisa import plan_changed

    failures: list[BaseException] = []

    def on_failed(sender: Flask, error: BaseException, **extra: Any) -> None:
        failures.append(error)

    user = app.config["USERS"][1]
    with delivery_failed.connected_to(on_failed, sender=app):
        with app.test_request_context("/"):
            plan_changed.send(app, user=user, old_plan="free")  # no new plan
            plan_changed.send(app, new_plan="pro")  # no user
        # A user the mapper cannot map (no email) in a real billing view: it answers 200
        # as login_user and @track_event do, instead of a 500.
        user.email = None
        assert app.test_client().post("/plan/1/pro", buffered=True).status_code == 200
    assert [type(error) for error in failures] == [ValidationError] * 3
    assert [getattr(error, "field", None) for error in failures] == ["new_plan", "user", "email"]
    assert sum("plan change was not synced" in r.getMessage() for r in caplog.records) == 3
    assert emulator.requests == []


def test_a_plan_change_whose_mapper_raises_never_breaks_the_billing_view(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A mapper touching a relation that is gone (any exception, not a ValidationError):
    # the billing view still answers, as a login does, and the failure is said.
    from flask_meisa import delivery_failed

    def to_contact(user: Any) -> dict[str, Any]:
        raise LookupError("the user's profile is gone")

    app = build_app(emulator_config(emulator), meisa=Meisa(contact_mapper=to_contact))
    failures: list[BaseException] = []

    def on_failed(sender: Flask, error: BaseException, **extra: Any) -> None:
        failures.append(error)

    with delivery_failed.connected_to(on_failed, sender=app):
        response = app.test_client().post("/plan/1/pro", buffered=True)
    assert response.status_code == 200
    assert [type(error) for error in failures] == [LookupError]
    assert "plan change was not synced" in caplog.text
    assert emulator.requests == []


@pytest.mark.parametrize("name", [n for n in signals.__all__ if n.islower() and n != "emit"])
def test_help_on_a_signal_says_what_it_is_and_its_arguments(name: str) -> None:
    text = pydoc.render_doc(getattr(flask_meisa, name))
    assert "Arguments" in text and "generic notification emitter" not in text, text


def test_plan_changed_from_another_app_is_ignored(emulator: Any, app: Flask) -> None:
    from flask_meisa import plan_changed

    other = Flask("other")
    with other.app_context():
        plan_changed.send(other, user=app.config["USERS"][1], new_plan="pro")
    assert emulator.requests == []


def test_plan_changed_sent_by_something_other_than_an_app_syncs_for_the_current_app(
    emulator: Any, app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    # blinker's send() without a sender, or with the user or a model as sender: the plan
    # change must not vanish without a word.
    from flask_meisa import plan_changed

    ada, grace = app.config["USERS"][1], app.config["USERS"][2]
    with app.test_request_context("/"):
        plan_changed.send(user=ada, old_plan="free", new_plan="pro")
        plan_changed.send(grace, user=grace, old_plan="free", new_plan="team")
    assert emulator.contact(email="ada@example.com")["custom_fields"]["plan"] == "pro"
    assert emulator.contact(email="grace@example.com")["custom_fields"]["plan"] == "team"
    plan_changed.send(user=ada, new_plan="free")  # no app to sync for: said so
    assert "plan_changed" in caplog.text and "not synced" in caplog.text
    assert len(upserts(emulator)) == 2


def test_flush_in_a_request_releases_the_requests_work_first(emulator: Any, app: Flask) -> None:
    meisa: Meisa = app.extensions["meisa"]
    with app.test_request_context("/"):
        meisa.upsert({"email": "now@example.com"})
        assert upserts(emulator) == []
        assert meisa.flush()
        assert len(upserts(emulator)) == 1
    assert len(upserts(emulator)) == 1


@pytest.mark.parametrize("timeout", [math.nan, "5", True, (1,)])
def test_a_wait_that_is_no_number_of_seconds_is_refused_and_nothing_is_lost(
    emulator: Any, app: Flask, timeout: Any
) -> None:
    # A flush or close until nan would never end while work is pending.
    meisa: Meisa = app.extensions["meisa"]
    with app.app_context():
        emulator.faults.fail_next(1, 503, path=UPSERT)  # still pending at each refusal
        meisa.upsert({"email": "later@example.com"})
        with pytest.raises(ValidationError, match=r"^timeout: must be a number of seconds"):
            meisa.flush(timeout)
        with pytest.raises(ValidationError, match=r"^timeout: must be a number of seconds"):
            meisa.close(app, timeout)
        with pytest.raises(ValidationError, match=r"^app: must be a Flask app"):
            meisa.close(5)  # type: ignore[arg-type]
        assert meisa.flush(math.inf)  # no limit
    assert emulator.contact(email="later@example.com") is not None


def test_a_connection_reset_right_after_the_answer_loses_no_sync(
    emulator: Any, app: Flask
) -> None:
    # Werkzeug's server drops the body without close() when the client resets the
    # connection while it drains the request: the batch is released all the same.
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for n in range(1, 11):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(
                    b"POST /login/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\nabcd"
                )
                assert raw.recv(12) == b"HTTP/1.1 200"
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            assert emulator.wait_for_requests(n, path=UPSERT, timeout=5)
    assert len(upserts(emulator)) == 10


def test_background_delivery_outlasts_more_failures_than_max_attempts(emulator: Any) -> None:
    config = emulator_config(
        emulator,
        MEISA_DELIVERY="thread",
        MEISA_MAX_ATTEMPTS=2,
        MEISA_RETRY_BASE_DELAY=0.01,
        MEISA_RETRY_MAX_DELAY=0.05,
    )
    app = build_app(config)
    meisa: Meisa = app.extensions["meisa"]
    emulator.faults.fail_next(8, status=503, path=UPSERT)
    try:
        with app.app_context():
            meisa.upsert({"email": "patient@example.com"})
            assert meisa.flush(10.0)
            assert meisa.status().failed == 0
        assert [r.status for r in upserts(emulator)] == [503] * 8 + [201]
    finally:
        meisa.state(app).close(5.0)


def test_upserts_of_one_contact_that_one_call_cannot_carry_go_one_after_the_other(
    emulator: Any, app: Flask
) -> None:
    meisa = app.extensions["meisa"]
    big = "x" * 300_000  # merged, the two would be over the 512 KiB a body may have
    ada = {"email": "ada@example.com", "external_id": "1"}
    with app.test_request_context():
        meisa.upsert({**ada, "custom_fields": {"a": big}})
        meisa.upsert({**ada, "custom_fields": {"b": big}})
        meisa.upsert({**ada, "external_id": "2"})  # another user with that address
        meisa.upsert({**ada, "custom_fields": {"c": 1}})  # after the other user's, still
    with app.app_context():
        assert meisa.flush(timeout=10)
    bodies = [request.body for request in upserts(emulator)]
    assert [(b["external_id"], sorted(b.get("custom_fields", {}))) for b in bodies] == [
        ("1", ["a"]),
        ("1", ["b"]),
        ("2", []),
        ("1", ["c"]),
    ]


def test_an_upsert_merges_into_no_earlier_one_that_a_later_upsert_follows(
    emulator: Any, app: Flask
) -> None:
    meisa = app.extensions["meisa"]
    big = "x" * 300_000
    with app.test_request_context():
        meisa.upsert({"email": "a@example.com", "external_id": "1", "custom_fields": {"a": big}})
        # User 1 moves to another address (too big to merge: it goes after).
        meisa.upsert({"email": "b@example.com", "external_id": "1", "custom_fields": {"b": big}})
        meisa.upsert({"email": "a@example.com", "first_name": "Carol"})  # after the move
    with app.app_context():
        assert meisa.flush(timeout=10)
    sent = [(r.body["email"], r.body.get("first_name")) for r in upserts(emulator)]
    assert sent == [("a@example.com", None), ("b@example.com", None), ("a@example.com", "Carol")]


def test_an_address_change_in_a_request_is_a_call_of_its_own_after_the_old_address(
    emulator: Any, app: Flask
) -> None:
    meisa = app.extensions["meisa"]
    with app.test_request_context():
        meisa.upsert({"email": "a@example.com", "external_id": "1"})
        meisa.upsert({"email": "b@example.com", "external_id": "1", "first_name": "Ada"})
        meisa.upsert({"email": "b@example.com", "external_id": "1", "last_name": "Lovelace"})
    with app.app_context():
        assert meisa.flush(timeout=10)
    sent = [(r.body["email"], r.body.get("last_name")) for r in upserts(emulator)]
    assert sent == [("a@example.com", None), ("b@example.com", "Lovelace")]


class _RacyEnviron(dict):  # type: ignore[type-arg]
    """A WSGI environ that orders two threads around the "responded" mark: the request's
    own thread reads it just before the server's thread sets it (the GIL may switch threads
    between any two bytecodes), and waits there until the server has looked for the
    batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checked = threading.Event()
        self.taken = threading.Event()
        self.worker: threading.Thread | None = None

    def get(self, key: Any, default: Any = None) -> Any:
        value = super().get(key, default)
        if key == "flask_meisa.responded" and threading.current_thread() is self.worker:
            self.checked.set()
            self.taken.wait(5)
        elif key == "flask_meisa.batch" and threading.current_thread() is not self.worker:
            self.taken.set()
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if key == "flask_meisa.responded":
            self.checked.wait(5)

    def pop(self, key: Any, *default: Any) -> Any:
        value = super().pop(key, *default)
        if key == "flask_meisa.batch":
            self.taken.set()
        return value


def test_work_a_copied_context_thread_queues_as_the_response_leaves_is_released(
    emulator: Emulator,
) -> None:
    app = build_app(emulator_config(emulator))
    meisa: Meisa = app.extensions["meisa"]
    environ = _RacyEnviron(EnvironBuilder(path="/race", method="POST").get_environ())

    @app.post("/race")
    def race() -> str:
        @copy_current_request_context
        def work() -> None:
            meisa.upsert({"email": "racer@example.com"})

        environ.worker = threading.Thread(target=work)
        environ.worker.start()
        return "ok"

    def start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        return lambda data: None

    body = app.wsgi_app(environ, start_response)
    b"".join(body)
    getattr(body, "close", lambda: None)()
    assert environ.worker is not None
    environ.worker.join(5)
    with app.app_context():
        assert meisa.flush(5)
    assert "flask_meisa.batch" not in environ
    assert [r.body["email"] for r in emulator.requests_to("/contacts/upsert/")] == [
        "racer@example.com"
    ]


def asgi_post(asgi_app: Any, path: str) -> int:
    """POST ``path`` to an ASGI app as an ASGI server does; the response's status."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(asgi_app(scope, receive, send))
    return int(sent[0]["status"])


def test_under_asgiref_work_is_released_after_the_response_and_never_for_a_failed_one(
    emulator: Emulator,
) -> None:
    # asgiref's WsgiToAsgi (uvicorn, hypercorn) never calls the body's close(): the work
    # goes when the body is dropped after its last chunk, even while the failed request's
    # logged error (kept here by the log capture) holds the frames it went through.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=None))
    app.config["PROPAGATE_EXCEPTIONS"] = False
    asgi_app = WsgiToAsgi(app)
    try:
        assert asgi_post(asgi_app, "/fail/2") == 500
        assert asgi_post(asgi_app, "/abort/2") == 503
        assert asgi_post(asgi_app, "/login/1") == 200
        assert emulator.wait_for(lambda e: upserts(e) != [], 10)
        with app.app_context():
            assert app.extensions["meisa"].flush(10)
        assert [r.body["external_id"] for r in upserts(emulator)] == ["1"]
    finally:
        app.extensions["meisa"].close(app)
