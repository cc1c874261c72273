"""The example app in real headless Chromium, served by a real WSGI server on loopback.

Needs Playwright for Python (``pip install playwright``; its browser downloads are not
used) and Debian's ``chromium`` at ``/usr/bin/chromium`` (or ``MEISA_CHROMIUM``). When
either is missing the test skips, except under CI (``CI`` set), where it fails.

The screenshot of the "What Meisa received" page goes to the test's temporary folder, and
also to ``$MEISA_SCREENSHOT_DIR/example-app.png`` when that variable is set (the project
keeps its copy in ``docs/screenshots/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import pytest

from example_app import create_app
from example_app import meisa
from flask_meisa.testing import emulator_config
from tests.servers import serve

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = os.environ.get("MEISA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
EMAIL = "ada@example.com"
PASSWORD = "analytical-engine"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEISA_CHROMIUM)"
    return None


@pytest.fixture
def page() -> Iterator[Page]:
    """A fresh page in headless Chromium."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            context.set_default_timeout(10_000)
            yield context.new_page()
            context.close()
        finally:
            browser.close()


def wait_for_calls(emulator: Any, path: str, n: int) -> None:
    """Syncs and events go out after each response: wait until the n-th has arrived."""
    assert emulator.wait_for_requests(n, path=path, timeout=10), f"{path}: fewer than {n}"


def test_a_visitor_signs_up_uses_the_app_and_meisa_receives_each_step(
    emulator: Any, page: Page, tmp_path: Path
) -> None:
    config = emulator_config(
        emulator,
        MEISA_DELIVERY="thread",
        SECRET_KEY="browser-test",
        EXAMPLE_DATABASE=str(tmp_path / "example.sqlite3"),
        EXAMPLE_EMULATOR_URL=emulator.root_url,
    )
    app = create_app(config)
    try:
        with serve(app) as url:
            drive(page, url, emulator)
            shot = tmp_path / "example-app.png"
            page.goto(url + "/meisa")
            page.screenshot(path=str(shot), full_page=True)
            counts = [page.inner_text(f"#count-{k}") for k in ("upserts", "events", "emails")]
            kinds = page.eval_on_selector_all(
                "li.entry", "nodes => nodes.map(n => n.dataset.kind)"
            )
    finally:
        meisa.state(app).close(5.0)
    assert counts == ["5", "1", "2"]
    assert kinds == [
        "suppression",
        "upsert",
        "email",
        "upsert",
        "upsert",
        "upsert",
        "upsert",
        "event",
        "email",
    ]
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    target = os.environ.get("MEISA_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(shot, os.path.join(target, "example-app.png"))
    check_what_meisa_received(emulator, url)


def drive(page: Page, url: str, emulator: Any) -> None:
    """Sign up, verify, log out, log in, upgrade, export, ask for a password reset."""
    page.goto(url + "/")
    page.click("text=Create a free account")
    page.fill("input[name=name]", "Ada Lovelace")
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Sign up')")
    page.wait_for_url(url + "/verify")
    assert f"We sent a 6-digit code to {EMAIL}" in page.inner_text(".flashes")

    (send,) = emulator.sends(trigger_key="verification_code")
    page.fill("input[name=code]", send["variables"]["code"])
    page.click("button:has-text('Verify')")
    page.wait_for_url(url + "/app")
    assert page.inner_text("h1") == "Hello, Ada"
    assert page.inner_text("#signin-count") == "1"
    wait_for_calls(emulator, UPSERT, 2)

    page.click("nav >> text=Log out")
    page.wait_for_url(url + "/")
    assert "You are logged out." in page.inner_text(".flashes")
    page.click("nav >> text=Log in")
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    page.wait_for_url(url + "/app")
    assert page.inner_text("#signin-count") == "2"
    wait_for_calls(emulator, UPSERT, 3)

    page.click("nav >> text=Billing")
    page.click("#upgrade")
    page.wait_for_selector("text=You are on the Standard plan now.")
    assert page.inner_text("#current-plan") == "Standard"
    wait_for_calls(emulator, UPSERT, 4)

    page.click("nav >> text=Dashboard")
    page.select_option("select[name=format]", "csv")
    page.click("#export")
    page.wait_for_selector("text=Your usage report is exported as CSV (1 so far).")
    assert page.inner_text("#reports-exported") == "1"
    wait_for_calls(emulator, TRACK, 1)

    page.goto(url + "/forgot-password")
    page.fill("input[name=email]", EMAIL)
    page.click("button:has-text('Send the reset link')")
    assert "If an account exists for" in page.inner_text("#reset-result")


def check_what_meisa_received(emulator: Any, url: str) -> None:
    """Exactly the expected calls arrived, in order, with the right fields."""
    assert [(r.method, r.path.removeprefix("/api/v1")) for r in emulator.requests] == [
        ("GET", "/contacts/api/unsubscribed-emails/"),
        ("POST", UPSERT),  # signup
        ("POST", "/emails/trigger/"),  # verification code
        ("POST", UPSERT),  # login after verifying
        ("POST", UPSERT),  # login again
        ("POST", UPSERT),  # upgrade
        ("POST", UPSERT),  # export: the usage counter
        ("POST", TRACK),  # export: the event
        ("POST", "/emails/trigger/"),  # password reset
    ]
    assert all(r.status in (200, 201) for r in emulator.requests)
    bodies = [r.body for r in emulator.requests_to(UPSERT)]
    assert all((b["email"], b["external_id"]) == (EMAIL, "1") for b in bodies)
    assert [b.get("source") for b in bodies] == ["signup", None, None, None, None]
    fields = [b["custom_fields"] for b in bodies]
    assert [f["signin_count"] for f in fields] == [0, 1, 2, 2, 2]
    assert [f["plan"] for f in fields] == ["free", "free", "free", "standard", "standard"]
    assert [f["subscription_status"] for f in fields] == [
        "none",
        "none",
        "none",
        "active",
        "active",
    ]
    assert [f["reports_exported"] for f in fields] == [0, 0, 0, 0, 1]
    assert [f["onboarding_completed"] for f in fields] == [False] * 4 + [True]
    assert fields[0]["signup_date"] == fields[-1]["signup_date"]

    (event,) = emulator.events()
    assert event["event_name"] == "exported_report"
    assert event["properties"] == {"format": "csv", "report": "usage_summary"}

    verification, reset = emulator.sends()
    assert verification["trigger_key"] == "verification_code"
    assert verification["idempotency_key"] == f"verify:1:{verification['variables']['code']}"
    assert reset["trigger_key"] == "password_reset"
    assert reset["to_email"] == EMAIL
    assert reset["variables"]["reset_url"].startswith(url + "/reset/")

    (contact,) = emulator.contacts()
    assert contact["source"] == "signup"
    assert contact["custom_fields"]["plan"] == "standard"
    assert contact["custom_fields"]["signin_count"] == 2
    assert contact["custom_fields"]["reports_exported"] == 1
