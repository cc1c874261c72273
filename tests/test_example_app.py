"""The example app's flows, through Flask's test client, against the emulator."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from example_app import meisa
from flask_meisa.testing import record_operations
from tests.example_helpers import ADA
from tests.example_helpers import TRACK
from tests.example_helpers import UPSERT
from tests.example_helpers import code_sent_to
from tests.example_helpers import csrf_token
from tests.example_helpers import get
from tests.example_helpers import log_in
from tests.example_helpers import make_app
from tests.example_helpers import new_client
from tests.example_helpers import post
from tests.example_helpers import sign_up
from tests.example_helpers import verify
from tests.process_support import blocked_signals
from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def app(emulator: Any, tmp_path: Path) -> Flask:
    return make_app(emulator, tmp_path)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return new_client(app)


def upserts(emulator: Any) -> list[dict[str, Any]]:
    return [r.body for r in emulator.requests_to(UPSERT)]


def ada(emulator: Any) -> dict[str, Any]:
    contact: dict[str, Any] | None = emulator.contact(email=ADA["email"])
    assert contact is not None
    return contact


def test_signup_creates_the_contact_with_source_signup_then_emails_a_code(
    emulator: Any, app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    sign_up(client)
    paths = [(r.method, r.path) for r in emulator.requests]
    assert paths == [
        ("GET", "/api/v1/contacts/api/unsubscribed-emails/"),
        ("POST", "/api/v1/contacts/upsert/"),
        ("POST", "/api/v1/emails/trigger/"),
    ]
    contact = ada(emulator)
    assert contact["source"] == "signup"
    assert contact["external_id"] == "1"
    assert (contact["first_name"], contact["last_name"]) == ("Ada", "Lovelace")
    fields = contact["custom_fields"]
    assert ISO.match(fields["signup_date"])
    assert fields["last_active"] == fields["signup_date"]
    assert fields["plan"] == "free"
    assert fields["subscription_status"] == "none"
    assert fields["signin_count"] == 0
    assert fields["onboarding_completed"] is False
    assert fields["reports_exported"] == 0
    (send,) = emulator.sends(trigger_key="verification_code")
    code = send["variables"]["code"]
    assert re.fullmatch(r"\d{6}", code)
    assert send["idempotency_key"] == f"verify:1:{code}"
    assert send["to_email"] == "ada@example.com"
    # Only a keyed hash of the code is stored.
    with sqlite3.connect(tmp_path / "example.sqlite3") as db:
        (stored,) = db.execute("SELECT code_hash FROM users").fetchone()
    db.close()
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    assert code not in stored
    assert "We sent a 6-digit code" in get(client, "/verify").get_data(as_text=True)


def test_signup_refuses_an_address_meisa_will_not_email(
    emulator: Any, client: FlaskClient
) -> None:
    response = post(client, "/signup", **{**ADA, "email": "bounced@example.com"})
    assert response.status_code == 400
    assert "can&#39;t send email to bounced@example.com" in response.get_data(as_text=True)
    assert upserts(emulator) == []
    assert emulator.sends() == []


def test_signup_validates_its_fields_and_refuses_a_taken_address(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    response = post(client, "/signup", email="not-an-address", name=" ", password="short")
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "Enter your name." in page
    assert "Use at least 8 characters." in page
    assert "Enter a valid email address" in page
    sign_up(client)
    again = post(new_client(app), "/signup", **{**ADA, "email": "ADA@example.com"})
    assert again.status_code == 400
    assert "exists already" in again.get_data(as_text=True)
    assert len(emulator.sends()) == 1


def test_verify_checks_the_code_then_logs_in_and_syncs_signin_count(
    emulator: Any, client: FlaskClient
) -> None:
    sign_up(client)
    code = code_sent_to(emulator, ADA["email"])
    wrong = "000000" if code != "000000" else "111111"
    response = post(client, "/verify", code=wrong)
    assert response.status_code == 400
    assert "That code is not right" in response.get_data(as_text=True)
    assert len(upserts(emulator)) == 1
    verify(client, emulator)
    login_sync = upserts(emulator)[-1]
    assert login_sync["external_id"] == "1"
    assert "source" not in login_sync
    assert login_sync["custom_fields"]["signin_count"] == 1
    assert ISO.match(login_sync["custom_fields"]["last_active"])
    assert ada(emulator)["custom_fields"]["signin_count"] == 1
    assert ada(emulator)["source"] == "signup"
    assert "Hello, Ada" in get(client, "/app").get_data(as_text=True)


def test_too_many_wrong_codes_need_a_new_code(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    sign_up(client)
    code = code_sent_to(emulator, ADA["email"])
    wrong = "000000" if code != "000000" else "111111"
    for _ in range(app.config["EXAMPLE_CODE_MAX_ATTEMPTS"]):
        post(client, "/verify", code=wrong)
    response = post(client, "/verify", code=code)
    assert response.status_code == 400
    assert "Too many wrong codes" in response.get_data(as_text=True)
    assert post(client, "/verify/resend").status_code == 302
    first, second = emulator.sends(trigger_key="verification_code")
    assert first["idempotency_key"] != second["idempotency_key"]
    assert second["idempotency_key"] == f"verify:1:{second['variables']['code']}"
    verify(client, emulator)


def test_login_counts_the_signin_before_the_sync(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    sign_up(client)
    verify(client, emulator)
    assert post(client, "/logout").status_code == 302
    assert get(client, "/app").status_code == 302
    refused = log_in(new_client(app), password="wrong password")
    assert refused.status_code == 400
    assert len(upserts(emulator)) == 2
    response = log_in(client)
    assert response.status_code == 302
    assert response.location == "/app"
    assert len(upserts(emulator)) == 3
    assert upserts(emulator)[-1]["custom_fields"]["signin_count"] == 2
    assert ada(emulator)["custom_fields"]["signin_count"] == 2


def test_an_unverified_login_goes_to_the_code_page_without_a_sync(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    sign_up(client)
    response = log_in(new_client(app))
    assert response.status_code == 302
    assert response.location == "/verify"
    assert len(upserts(emulator)) == 1


def test_upgrade_downgrade_and_cancel_sync_the_plan(emulator: Any, client: FlaskClient) -> None:
    sign_up(client)
    verify(client, emulator)
    seen = []
    for action in ("upgrade", "upgrade", "downgrade", "cancel"):
        assert post(client, f"/billing/{action}").status_code == 302
        fields = ada(emulator)["custom_fields"]
        seen.append((fields["plan"], fields["subscription_status"]))
    assert seen == [
        ("standard", "active"),
        ("pro", "active"),
        ("standard", "active"),
        ("churned", "canceled"),
    ]
    assert len(upserts(emulator)) == 2 + 4
    assert "Canceled" in get(client, "/billing/").get_data(as_text=True)
    # Nothing to cancel any more, and nothing synced for it.
    post(client, "/billing/cancel")
    assert len(upserts(emulator)) == 6


def test_export_syncs_the_counter_then_tracks_the_event(
    emulator: Any, client: FlaskClient
) -> None:
    sign_up(client)
    verify(client, emulator)
    emulator.clear_requests()
    assert post(client, "/reports/export", format="pdf").status_code == 302
    assert [r.path for r in emulator.requests] == [
        "/api/v1/contacts/upsert/",
        "/api/v1/events/track/",
    ]
    (event,) = emulator.events(event_name="exported_report")
    assert event["properties"] == {"format": "pdf", "report": "usage_summary"}
    (track,) = emulator.requests_to(TRACK)
    assert (track.body["email"], track.body["external_id"]) == ("ada@example.com", "1")
    fields = ada(emulator)["custom_fields"]
    assert (fields["reports_exported"], fields["onboarding_completed"]) == (1, True)
    assert "exported as PDF (1 so far)" in get(client, "/app").get_data(as_text=True)


def test_export_needs_a_login_and_tracks_nothing_without_one(
    emulator: Any, client: FlaskClient
) -> None:
    response = post(client, "/reports/export")
    assert response.status_code == 302
    assert response.location.startswith("/login")
    assert emulator.requests == []


def test_forgot_password_emails_a_single_use_reset_link(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    sign_up(client)
    verify(client, emulator)
    other = new_client(app)
    response = post(other, "/forgot-password", email="ada@example.com")
    assert response.status_code == 200
    assert "If an account exists for" in response.get_data(as_text=True)
    (send,) = emulator.sends(trigger_key="password_reset")
    reset_url = send["variables"]["reset_url"]
    assert reset_url.startswith("http://localhost/reset/")
    path = reset_url.removeprefix("http://localhost")
    assert post(other, path, password="new-password-1").status_code == 302
    assert post(other, path, password="new-password-2").location == "/forgot-password"
    assert log_in(other, password="new-password-1").location == "/app"


def test_forgot_password_answers_the_same_for_an_unknown_address(
    emulator: Any, client: FlaskClient
) -> None:
    response = post(client, "/forgot-password", email="nobody@example.com")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "If an account exists for" in page
    assert "nobody@example.com" in page
    assert emulator.sends() == []


def test_with_delivery_suppressed_the_signup_is_recorded_not_sent(
    emulator: Any, tmp_path: Path
) -> None:
    app = make_app(emulator, tmp_path, TESTING=True, MEISA_SUPPRESS_SEND=None)
    with record_operations(app) as operations:
        response = post(new_client(app), "/signup", **ADA)
    assert response.status_code == 302
    assert sorted(op.kind for op in operations) == ["send", "upsert"]
    (upsert,) = [op for op in operations if op.kind == "upsert"]
    assert upsert.payload["source"] == "signup"
    assert emulator.requests == []


def test_background_delivery_reaches_meisa_after_flush(emulator: Any, tmp_path: Path) -> None:
    app = make_app(emulator, tmp_path, MEISA_DELIVERY="thread")
    try:
        client = new_client(app)
        sign_up(client)
        verify(client, emulator)
        post(client, "/billing/upgrade")
        with app.app_context():
            assert meisa.flush(5.0)
        assert ada(emulator)["custom_fields"]["plan"] == "standard"
        assert ada(emulator)["custom_fields"]["signin_count"] == 1
    finally:
        meisa.state(app).close(5.0)


def post_then_reset(port: int, path: str, cookie: str, form: str) -> None:
    """POST over a raw socket and reset the connection as soon as the answer starts,
    as browsers sometimes do after a redirect."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: session={cookie}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(form)}\r\n\r\n{form}".encode()
        )
        assert raw.recv(12) == b"HTTP/1.1 302"
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_connection_reset_after_the_answer_loses_no_sync(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    sign_up(client)
    verify(client, emulator)
    session = client.get_cookie("session")
    assert session is not None
    form = f"csrf_token={csrf_token(client)}&format=csv"
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for n in range(1, 6):
            post_then_reset(port, "/reports/export", session.value, form)
            assert emulator.wait_for_requests(n, path=TRACK, timeout=5)
    assert ada(emulator)["custom_fields"]["reports_exported"] == 5


def run_example(env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str]:
    """Start ``python -m example_app``; its process, URL and output up to the URL line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "example_app", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"Example app on (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return process, found.group(1), "".join(lines)
    process.wait(10)
    process.stdout.close()
    raise AssertionError("the app did not start:\n" + "".join(lines))


def stop_example(process: subprocess.Popen[str]) -> str:
    process.terminate()
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    return output


def test_python_m_example_app_stops_whichever_of_its_threads_gets_the_signal(
    emulator: Any, tmp_path: Path
) -> None:
    # The kernel hands a process's signal to any thread that does not block it; the main
    # thread then ran the handler only once it woke, and it waited without a timeout.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEISA_", "EXAMPLE_"))}
    env.update(EXAMPLE_DATABASE=str(tmp_path / "run.sqlite3"))
    env.update(MEISA_API_KEY=emulator.live_key, MEISA_BASE_URL=emulator.url)
    process, _, _ = run_example(env)
    try:
        # Another thread than the main one, when one may get it (flask-meisa's block it).
        takers = [
            thread
            for thread, mask in blocked_signals(process.pid).items()
            if not mask >> (signal.SIGTERM - 1) & 1
        ]
        other = next((thread for thread in takers if thread != process.pid), process.pid)
        assert ctypes.CDLL(None, use_errno=True).tgkill(process.pid, other, signal.SIGTERM) == 0
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0 and "Stopped." in output, output


@pytest.mark.parametrize("on_emulator", [True, False])
def test_python_m_example_app_serves_until_sigterm(
    emulator: Any, tmp_path: Path, on_emulator: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEISA_", "EXAMPLE_"))}
    env["EXAMPLE_DATABASE"] = str(tmp_path / "run.sqlite3")
    if not on_emulator:
        # "The real Meisa": here the test's emulator, reached through the environment.
        env.update(MEISA_API_KEY=emulator.live_key, MEISA_BASE_URL=emulator.url)
    process, url, started = run_example(env)
    try:
        with requests.Session() as http:
            home = http.get(url + "/", timeout=10)
            banner = re.search(r'id="dev-banner".*?<a href="([^"]+)"', home.text, re.S)
            inbox = http.get(banner.group(1), timeout=10) if banner else None
    finally:
        output = started + stop_example(process)
    assert home.status_code == 200
    assert "Reportly" in home.text
    assert "Stopped." in output
    assert emulator.live_key not in output
    if on_emulator:
        found = re.search(r"Meisa emulator \(demo seed\) on (http://127\.0\.0\.1:\d+)/", output)
        assert found is not None, output
        assert banner is not None and inbox is not None
        assert banner.group(1) == found.group(1) + "/_emulator/"
        assert f"What Meisa received: {banner.group(1)}" in output
        assert inbox.status_code == 200
        assert "<title>Meisa emulator inbox</title>" in inbox.text
    else:
        assert f"Using Meisa at {emulator.url}" in output
        assert banner is None
        assert "_emulator" not in home.text and "What Meisa received" not in output
