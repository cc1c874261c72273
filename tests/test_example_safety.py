"""The example app is safe to copy: redirects, email floods, account probing, the
development banner and its inbox link, sessions after a password reset, CSRF, cookies."""

from __future__ import annotations

import html
import re
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from example_app import meisa
from example_app.db import SCHEMA
from tests.example_helpers import ADA
from tests.example_helpers import get
from tests.example_helpers import log_in
from tests.example_helpers import make_app
from tests.example_helpers import new_client
from tests.example_helpers import post
from tests.example_helpers import sign_up
from tests.example_helpers import verify

#: ``next`` values that lead off the site once a browser has read them.
HOSTILE_NEXT = [
    "/\t/evil.example/",
    "/\r\n/evil.example/",
    "/\n/evil.example/",
    "//evil.example/",
    "///evil.example/",
    "/\\evil.example/",
    "\\/evil.example/",
    "\\\\evil.example/",
    "/\t\\evil.example/",
    "https://evil.example/",
    "https:/evil.example/",
    "https:evil.example",
    "HTTPS://evil.example/",
    "javascript:alert(1)",
    " //evil.example/",
    "\t//evil.example/",
    "evil.example/",
    "/\x00/evil.example/",
    "//evil.example@127.0.0.1/",
]


@pytest.fixture
def app(emulator: Any, tmp_path: Path) -> Flask:
    return make_app(emulator, tmp_path)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return new_client(app)


def production_app(emulator: Any, tmp_path: Path, **overrides: Any) -> Flask:
    """The app against "the real Meisa" (here the emulator, not known as one)."""
    return make_app(emulator, tmp_path, EXAMPLE_EMULATOR_URL=None, **overrides)


def signed_up(client: FlaskClient, emulator: Any) -> None:
    """Ada signs up, verifies and logs out; the page after it shows its messages."""
    sign_up(client)
    verify(client, emulator)
    assert post(client, "/logout").status_code == 302
    assert get(client, "/").status_code == 200


# -- 1. the login's next ---------------------------------------------------------------


def test_login_never_redirects_off_the_site(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    signed_up(client, emulator)
    for target in HOSTILE_NEXT:
        response = log_in(new_client(app), path=f"/login?next={quote(target, safe='')}")
        assert response.status_code == 302, target
        location = response.headers["Location"]
        assert location == "/app", (target, location)


def test_login_keeps_a_path_on_the_site(emulator: Any, app: Flask, client: FlaskClient) -> None:
    signed_up(client, emulator)
    for target in ("/billing/", "/app?tab=usage#export", "/reports/%2F%2Fevil"):
        response = log_in(new_client(app), path=f"/login?next={quote(target, safe='')}")
        location = response.headers["Location"]
        assert location == target
        parts = urlsplit(location.replace("\\", "/"))
        assert (parts.scheme, parts.netloc) == ("", "")


# -- 2. email floods -------------------------------------------------------------------


def test_a_reset_flood_to_one_address_is_refused_after_the_limit(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    signed_up(client, emulator)
    limit = int(app.config["EXAMPLE_EMAIL_LIMIT_PER_ADDRESS"].split("/")[0])
    statuses = [
        post(client, "/forgot-password", email=ADA["email"]).status_code for _ in range(37)
    ]
    assert statuses == [200] * limit + [429] * (37 - limit)
    # Per address: another client address gets no more for it, and the case is no way round.
    other = new_client(app)
    other.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    refused = post(other, "/forgot-password", email=ADA["email"].upper())
    assert refused.status_code == 429
    assert "Too many emails were asked for" in refused.get_data(as_text=True)
    with app.app_context():
        assert meisa.flush(5.0)
    assert len(emulator.sends(trigger_key="password_reset")) == limit


def test_one_client_asking_for_many_emails_is_refused_after_the_limit(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    signed_up(client, emulator)
    limit = int(app.config["EXAMPLE_EMAIL_LIMIT_PER_CLIENT"].split("/")[0])
    emails = [ADA["email"]] + [f"user{n}@example.com" for n in range(limit + 5)]
    statuses = [post(client, "/forgot-password", email=e).status_code for e in emails]
    assert statuses == [200] * limit + [429] * (len(emails) - limit)
    # New codes count with the resets: this client address has none left.
    pending = new_client(app)
    sign_up(pending, email="grace@example.com")
    assert post(pending, "/verify/resend").status_code == 429
    # Another client address still gets its answer.
    other = new_client(app)
    other.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    assert post(other, "/forgot-password", email="someone@example.com").status_code == 200
    with app.app_context():
        assert meisa.flush(5.0)
    assert len(emulator.sends(trigger_key="password_reset")) == 1


# -- 3 and 7. forgot-password tells nothing about the address --------------------------


def forgot_page(client: FlaskClient, email: str) -> str:
    response = post(client, "/forgot-password", email=email)
    assert response.status_code == 200
    return str(response.get_data(as_text=True)).replace(email, "ADDRESS")


def test_forgot_password_answers_alike_for_any_address(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    signed_up(client, emulator)
    sign_up(new_client(app), email="grace@example.com")
    emulator.suppress("grace@example.com", reason="bounced")  # has an account
    known = forgot_page(client, ADA["email"])
    assert "If an account exists for" in known
    for email in ("nobody@example.com", "grace@example.com", "complained@example.com"):
        assert forgot_page(client, email) == known, email
    assert "can't" not in known
    assert [s["to_email"] for s in emulator.sends(trigger_key="password_reset")] == [ADA["email"]]


def test_forgot_password_calls_meisa_only_after_the_response(
    emulator: Any, tmp_path: Path
) -> None:
    app = make_app(
        emulator,
        tmp_path,
        MEISA_DELIVERY="thread",
        EXAMPLE_EMAIL_LIMIT_PER_ADDRESS="1000/hour",
        EXAMPLE_EMAIL_LIMIT_PER_CLIENT="1000/hour",
    )
    try:
        client = new_client(app)
        signed_up(client, emulator)  # the suppression list is loaded by now
        with app.app_context():
            assert meisa.flush(5.0)
        emulator.clear_requests()
        token = re.search(r'value="([^"]+)"', get(client, "/forgot-password").get_data(True))
        assert token is not None
        form = {"csrf_token": token.group(1), "email": ADA["email"]}
        response = client.post("/forgot-password", data=form, buffered=False)
        assert response.status_code == 200
        assert emulator.requests == []  # nothing while the visitor waits
        response.close()
        with app.app_context():
            assert meisa.flush(5.0)
        (send,) = emulator.sends(trigger_key="password_reset")
        assert send["to_email"] == ADA["email"]

        # The time each answer takes (reported, not asserted): known and unknown take
        # turns going first, as a known one's delivery runs while the next one is served.
        times: dict[str, list[float]] = {"known": [], "unknown": []}
        pair = [("known", ADA["email"]), ("unknown", "nobody@example.com")]
        for round_ in range(20):
            for kind, email in pair if round_ % 2 else pair[::-1]:
                started = time.perf_counter()
                response = client.post(
                    "/forgot-password", data={**form, "email": email}, buffered=False
                )
                times[kind].append(time.perf_counter() - started)
                assert response.status_code == 200
                response.close()
        medians = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
        print(f"forgot-password medians: {medians['known']:.1f} ms for a known address,"
              f" {medians['unknown']:.1f} ms for an unknown one")  # fmt: skip
        with app.app_context():
            assert meisa.flush(10.0)
        assert len(emulator.sends(trigger_key="password_reset")) == 21
    finally:
        meisa.state(app).close(5.0)


# -- 4. What Meisa received -------------------------------------------------------------


def banner_link(page: str) -> str | None:
    """Where the development banner's link leads; ``None`` without a banner."""
    found = re.search(r'<p class="dev-banner" id="dev-banner".*?<a href="([^"]+)"', page, re.S)
    return html.unescape(found.group(1)) if found else None


def test_the_banner_links_to_the_emulators_inbox_only_on_the_emulator(
    emulator: Any, app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    inbox = emulator.root_url + "/_emulator/"
    for path in ("/", "/login", "/forgot-password", "/no-such-page"):
        assert banner_link(get(client, path).get_data(as_text=True)) == inbox, path
    sign_up(client, email="ada+work@example.com")
    verify(client, emulator, email="ada+work@example.com")
    mine = inbox + "?address=ada%2Bwork@example.com"  # "+" is a space in a query
    for path in ("/app", "/billing/", "/no-such-page"):
        assert banner_link(get(client, path).get_data(as_text=True)) == mine, path
    answer = requests.get(mine, timeout=5)
    assert answer.status_code == 200
    assert "<title>Meisa emulator inbox</title>" in answer.text
    assert get(client, "/meisa").status_code == 404  # the app has no such page of its own

    production = production_app(emulator, tmp_path / "production")
    # An emulator URL alone does not make it development: Meisa is elsewhere.
    elsewhere = make_app(
        emulator, tmp_path / "elsewhere", EXAMPLE_EMULATOR_URL="http://127.0.0.1:9"
    )
    for other in (production, elsewhere):
        visitor = new_client(other)
        sign_up(visitor)
        pages = [get(visitor, path) for path in ("/", "/login", "/verify", "/no-such-page")]
        pages.append(post(visitor, "/forgot-password", email=ADA["email"]))
        assert get(visitor, "/meisa").status_code == 404
        for page in pages:
            text = page.get_data(as_text=True)
            assert banner_link(text) is None and "dev-banner" not in text, page.request.path
            assert "_emulator" not in text and "What Meisa received" not in text
        emulator.reset()


# -- 5. sessions after a password reset ------------------------------------------------


def test_a_password_reset_logs_out_the_users_other_sessions(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    signed_up(client, emulator)
    laptop, phone = new_client(app), new_client(app)
    for device in (laptop, phone):
        assert log_in(device).location == "/app"
        assert get(device, "/app").status_code == 200
    post(laptop, "/forgot-password", email=ADA["email"])
    (send,) = emulator.sends(trigger_key="password_reset")
    reset_path = urlsplit(send["variables"]["reset_url"]).path
    assert post(laptop, reset_path, password="a-new-password").location == "/login"
    for device in (phone, laptop):
        response = get(device, "/app")
        assert response.status_code == 302
        assert response.location.startswith("/login")
    assert log_in(phone, password="a-new-password").location == "/app"
    assert get(phone, "/app").status_code == 200


def test_a_database_made_before_session_versions_gets_them(emulator: Any, tmp_path: Path) -> None:
    old_schema = SCHEMA.replace("    session_version INTEGER NOT NULL DEFAULT 0,\n", "")
    assert old_schema != SCHEMA
    with sqlite3.connect(tmp_path / "example.sqlite3") as db:
        db.executescript(old_schema)
    db.close()
    client = new_client(make_app(emulator, tmp_path))
    sign_up(client)
    verify(client, emulator)
    assert get(client, "/app").status_code == 200


# -- 6. CSRF ---------------------------------------------------------------------------


def test_a_post_without_the_right_csrf_token_is_refused(
    emulator: Any, app: Flask, client: FlaskClient
) -> None:
    without = app.test_client().post("/signup", data=ADA, buffered=True)
    assert without.status_code == 400
    assert "CSRF token is missing" in without.get_data(as_text=True)
    wrong = app.test_client().post("/signup", data={**ADA, "csrf_token": "x"}, buffered=True)
    assert wrong.status_code == 400
    # A token is good only with the session it was made for.
    other = new_client(app)
    stolen = re.search(r'value="([^"]+)"', get(client, "/login").get_data(as_text=True))
    assert stolen is not None
    forged = other.post("/signup", data={**ADA, "csrf_token": stolen.group(1)}, buffered=True)
    assert forged.status_code == 400
    assert emulator.requests == []
    sign_up(client)  # with its own token


# -- 7. where the email is, and the favicon --------------------------------------------


def test_the_pages_say_where_the_email_is(emulator: Any, tmp_path: Path) -> None:
    development = make_app(emulator, tmp_path / "development")
    production = production_app(emulator, tmp_path / "production")
    inbox = f'href="{emulator.root_url}/_emulator/?address=ada@example.com"'
    for app, expected in ((development, inbox), (production, "Look in your inbox.")):
        client = new_client(app)
        sign_up(client)
        verify_page = get(client, "/verify").get_data(as_text=True)
        done_page = post(client, "/forgot-password", email=ADA["email"]).get_data(as_text=True)
        for page, trigger in ((verify_page, "verification_code"), (done_page, "password_reset")):
            where = re.search(r'<p class="muted" id="where-email">(.*?)</p>', page, re.S)
            assert where is not None
            assert expected in where.group(1)
            assert (f"“{trigger} → ada@example.com”" in where.group(1)) is (app is development)
        emulator.reset()


def test_the_favicon_is_linked_and_served(client: FlaskClient) -> None:
    page = get(client, "/").get_data(as_text=True)
    link = re.search(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)">', page)
    assert link is not None
    icon = get(client, link.group(1))
    assert icon.status_code == 200
    assert icon.mimetype == "image/svg+xml"
    assert icon.get_data().startswith(b"<svg")


# -- 8. cookies ------------------------------------------------------------------------


def test_cookies_are_secure_unless_on_the_emulator(
    emulator: Any, app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    production = production_app(emulator, tmp_path / "production")
    for flask_app, secure in ((app, False), (production, True)):
        assert flask_app.config["SESSION_COOKIE_SECURE"] is secure
        assert flask_app.config["REMEMBER_COOKIE_SECURE"] is secure
        response = flask_app.test_client().get("/login", buffered=True)
        (cookie,) = response.headers.getlist("Set-Cookie")
        assert cookie.startswith("session=")
        assert ("; Secure" in cookie) is secure
    # Config given to create_app wins.
    relaxed = production_app(emulator, tmp_path / "relaxed", SESSION_COOKIE_SECURE=False)
    assert relaxed.config["SESSION_COOKIE_SECURE"] is False
