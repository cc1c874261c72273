"""@track_event and meisa.track."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask
from flask.views import MethodView
from flask_login import logout_user

from flask_meisa import Meisa
from flask_meisa import ValidationError
from flask_meisa import track_event
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations
from tests.apps import build_app

TRACK = "/events/track/"


@pytest.fixture
def app(emulator: Any) -> Flask:
    return build_app(emulator_config(emulator))


def login(app: Flask, user_id: int = 1) -> Any:
    client = app.test_client()
    client.post(f"/login/{user_id}", buffered=True)
    return client


def test_tracks_for_the_current_user_after_the_contact_upsert(emulator: Any, app: Flask) -> None:
    client = login(app)
    response = client.post("/export", buffered=True)
    assert response.status_code == 200
    (event,) = emulator.events()
    assert event["event_name"] == "exported_report"
    assert event["properties"] == {"format": "csv"}
    (request,) = emulator.requests_to(TRACK)
    assert request.body["external_id"] == "1"
    paths = [r.path for r in emulator.requests]
    assert paths.index("/api/v1/contacts/upsert/") < paths.index("/api/v1/events/track/")


def test_properties_callable_gets_the_view_arguments(emulator: Any, app: Flask) -> None:
    client = login(app)
    client.post("/export/pdf", buffered=True)
    assert emulator.events()[0]["properties"] == {"format": "pdf"}


def test_a_method_views_properties_callable_gets_its_url_values(emulator: Any, app: Flask) -> None:
    class Projects(MethodView):
        @track_event("created_project", properties=lambda project_id: {"id": project_id})
        def post(self, project_id: int) -> str:
            return "created"

    app.add_url_rule("/projects/<int:project_id>", view_func=Projects.as_view("projects"))
    assert login(app).post("/projects/7", buffered=True).status_code == 200
    assert [(e["event_name"], e["properties"]) for e in emulator.events()] == [
        ("created_project", {"id": 7})
    ]


def test_a_view_answering_400_or_more_tracks_nothing(emulator: Any, app: Flask) -> None:
    client = login(app)
    assert client.post("/export/bad", buffered=True).status_code == 400
    assert emulator.requests_to(TRACK) == []


def test_async_views_are_tracked(emulator: Any, app: Flask) -> None:
    client = login(app)
    assert client.post("/async-export", buffered=True).data == b"exported"
    assert emulator.events()[0]["event_name"] == "exported_async"


def test_anonymous_users_are_skipped_with_a_debug_line(
    emulator: Any, app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="flask_meisa"):
        assert app.test_client().post("/export", buffered=True).status_code == 200
    assert emulator.requests == []
    assert "exported_report not tracked: no authenticated user" in caplog.text


def test_a_view_that_logs_its_user_out_tracks_for_that_user(emulator: Any, app: Flask) -> None:
    @app.post("/logout")
    @track_event("logged_out")
    def logout() -> str:
        logout_user()
        return "bye"

    assert login(app).post("/logout", buffered=True).data == b"bye"
    (request,) = emulator.requests_to(TRACK)
    assert (request.body["event_name"], request.body["external_id"]) == ("logged_out", "1")


def test_the_decorator_keeps_the_views_name_and_docstring(app: Flask) -> None:
    view = app.view_functions["export"]
    assert view.__name__ == "export"
    assert view.__doc__ == "Export a report."


@pytest.mark.parametrize(
    ("name", "properties", "field"),
    [("", None, "event_name"), ("x\n", None, "event_name"), ("ok", {"a": {1, 2}}, "properties.a")],
)
def test_bad_decorator_arguments_fail_at_decoration(
    name: str, properties: Any, field: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        track_event(name, properties=properties)
    assert raised.value.field == field


def test_async_properties_are_refused_at_decoration() -> None:
    # Called after the view, in an after-request hook, it would only make a coroutine:
    # the event never tracked, and "coroutine was never awaited" at each request.
    async def properties(**values: Any) -> dict[str, Any]:
        return dict(values)

    with pytest.raises(ValidationError, match=r"^properties: must be a plain function"):
        track_event("exported", properties=properties)  # type: ignore[arg-type]


def test_the_decorator_without_a_name_says_how_to_write_it() -> None:
    missing = r'^event_name: is missing: write @track_event\("name"\)$'
    with pytest.raises(ValidationError, match=missing):

        @track_event  # type: ignore[arg-type]
        def export() -> str:
            return "done"


def test_track_with_a_user_carries_the_contact_for_404_recovery(emulator: Any, app: Flask) -> None:
    meisa: Meisa = app.extensions["meisa"]
    user = app.config["USERS"][2]
    with app.app_context(), record_operations() as recorded:
        meisa.track("invited_teammate", user=user, properties={"count": 2})
    (operation,) = recorded
    assert operation.contact is not None
    assert operation.contact["email"] == "grace@example.com"
    # The contact did not exist: the 404 led to an upsert and the event again.
    assert [r.status for r in emulator.requests] == [404, 201, 200]
    assert emulator.events()[0]["event_name"] == "invited_teammate"


def test_track_takes_the_user_as_a_mapping_of_upsert_fields_as_upsert_does(
    emulator: Any, app: Flask
) -> None:
    meisa: Meisa = app.extensions["meisa"]
    user = {"email": "lin@example.com", "external_id": "77", "first_name": "Lin"}
    with app.app_context():
        meisa.track("invited_teammate", user=user)
    assert [r.status for r in emulator.requests] == [404, 201, 200]
    assert emulator.contacts()[0]["first_name"] == "Lin"
    with app.app_context(), pytest.raises(ValidationError, match=r"^email: "):
        meisa.track("invited_teammate", user={"external_id": "78"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"event_name": ""}, "event_name"),
        ({"event_name": "x"}, "email"),
        ({"event_name": "x", "email": "nope"}, "email"),
        (
            {"event_name": "x", "email": "a@b.co", "properties": {"n": float("nan")}},
            "properties.n",
        ),
        ({"event_name": "x", "email": "a@b.co", "external_id": ""}, "external_id"),
    ],
)
def test_bad_input_to_track_raises_and_queues_nothing(
    emulator: Any, app: Flask, kwargs: dict[str, Any], field: str
) -> None:
    meisa: Meisa = app.extensions["meisa"]
    event_name = kwargs.pop("event_name")
    with (
        app.app_context(),
        record_operations() as recorded,
        pytest.raises(ValidationError) as raised,
    ):
        meisa.track(event_name, **kwargs)
    assert raised.value.field == field
    assert recorded == []
    assert emulator.requests == []


def test_track_refuses_a_user_and_an_identity_together(app: Flask) -> None:
    meisa: Meisa = app.extensions["meisa"]
    with app.app_context(), pytest.raises(ValidationError, match="not both"):
        meisa.track("x", user=app.config["USERS"][1], email="ada@example.com")


@pytest.mark.parametrize(
    ("properties", "logged"),
    [
        (lambda: {"at": object()}, "broken_export not tracked: "),  # not JSON: refused
        (lambda: 1 / 0, "broken_export not tracked"),  # a bug in the app's callable
    ],
    ids=["refused", "raising"],
)
def test_properties_that_cannot_be_tracked_are_logged_and_the_view_answers(
    emulator: Any, app: Flask, caplog: pytest.LogCaptureFixture, properties: Any, logged: str
) -> None:
    @app.post("/broken-export")
    @track_event("broken_export", properties=properties)
    def broken_export() -> str:
        return "exported"

    response = login(app).post("/broken-export", buffered=True)
    assert (response.status_code, response.data) == (200, b"exported")
    assert emulator.requests_to(TRACK) == []
    assert logged in caplog.text


def test_an_app_without_flask_login_tracks_nothing_and_answers(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = Flask(__name__)
    app.config.update(emulator_config(emulator))
    Meisa(app)

    @app.post("/export")
    @track_event("exported_report")
    def export() -> str:
        return "exported"

    with caplog.at_level(logging.DEBUG, logger="flask_meisa"):
        assert app.test_client().post("/export", buffered=True).data == b"exported"
    assert emulator.requests == []
    assert "exported_report not tracked: no authenticated user" in caplog.text
