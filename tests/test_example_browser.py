"""The example app in real headless Chromium, served by a real WSGI server on loopback.

Needs Playwright for Python and Debian's ``chromium`` (see :mod:`tests.browser`). The
verification code and the reset link are read where a developer reads them: in the
embedded emulator's inbox, opened from the app's own links.

The screenshot of the dashboard (with the development banner) goes to the test's
temporary folder, and also to ``$MEISA_SCREENSHOT_DIR/example-app.png`` when that variable
is set (the project keeps its copy in ``docs/screenshots/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask

from example_app import create_app
from example_app import meisa
from flask_meisa.testing import emulator_config
from tests.browser import chromium
from tests.browser import save_screenshot
from tests.example_helpers import make_app
from tests.example_helpers import new_client
from tests.example_helpers import sign_up
from tests.example_helpers import verify
from tests.servers import serve

if TYPE_CHECKING:
    from playwright.sync_api import Browser
    from playwright.sync_api import Page

UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"
PHONE_WIDTH = 390
EMAIL = "ada@example.com"
PASSWORD = "analytical-engine"
NEW_PASSWORD = "difference-engine"


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium."""
    with chromium() as launched:
        yield launched


@contextmanager
def new_page(browser: Browser, width: int, height: int) -> Iterator[Page]:
    """A page in a fresh browser context (no cookies) of ``width`` x ``height`` pixels."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page at a desktop's size."""
    with new_page(browser, 1200, 900) as fresh:
        yield fresh


@pytest.fixture
def phone(browser: Browser) -> Iterator[Page]:
    """A fresh page at a phone's size (390 x 844 CSS pixels)."""
    with new_page(browser, PHONE_WIDTH, 844) as fresh:
        yield fresh


def from_the_inbox(page: Page, emulator: Any, trigger_key: str, variable: str) -> str:
    """Open the page's link to the emulator's inbox (a new tab) and read ``variable`` of
    the newest ``trigger_key`` email to Ada there."""
    link = page.locator("#where-email a")
    inbox_url = f"{emulator.root_url}/_emulator/?address={EMAIL}"
    assert link.get_attribute("href") == inbox_url
    with page.context.expect_page() as opened:
        link.click()
    inbox = opened.value
    try:
        inbox.wait_for_load_state()
        assert inbox.url == inbox_url
        assert inbox.input_value("#filter") == EMAIL
        email = inbox.locator("#sends li", has_text=f"{trigger_key} → {EMAIL}").first
        return email.locator(f"dt:text-is('{variable}') + dd").inner_text()
    finally:
        inbox.close()


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
            banner = page.locator("#dev-banner a")
            assert (
                banner.get_attribute("href") == f"{emulator.root_url}/_emulator/?address={EMAIL}"
            )
            shot = page.screenshot(path=str(tmp_path / "example-app.png"), full_page=True)
            wait_for_calls(emulator, UPSERT, 6)
    finally:
        meisa.state(app).close(5.0)
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    save_screenshot(shot, "example-app.png")
    check_what_meisa_received(emulator, url)


def drive(page: Page, url: str, emulator: Any) -> None:
    """Sign up, verify, log out, log in, upgrade, export, reset the password, log in."""
    page.goto(url + "/")
    page.click("text=Create a free account")
    page.fill("input[name=name]", "Ada Lovelace")
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Sign up')")
    page.wait_for_url(url + "/verify")
    assert f"We sent a 6-digit code to {EMAIL}" in page.inner_text(".flashes")

    code = from_the_inbox(page, emulator, "verification_code", "code")
    (send,) = emulator.sends(trigger_key="verification_code")
    assert code == send["variables"]["code"]
    page.fill("input[name=code]", code)
    page.click("button:has-text('Verify')")
    page.wait_for_url(url + "/app")
    assert page.inner_text("h1") == "Hello, Ada"
    assert page.inner_text("#signin-count") == "1"
    wait_for_calls(emulator, UPSERT, 2)

    page.click("nav >> text=Log out")
    page.wait_for_url(url + "/")
    assert "You are logged out." in page.inner_text(".flashes")
    log_in(page, url, PASSWORD)
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
    reset_url = from_the_inbox(page, emulator, "password_reset", "reset_url")
    assert reset_url.startswith(url + "/reset/")
    page.goto(reset_url)
    page.fill("input[name=password]", NEW_PASSWORD)
    page.click("button:has-text('Save the password')")
    page.wait_for_url(url + "/login")
    assert "Your password is changed." in page.inner_text(".flashes")
    log_in(page, url, NEW_PASSWORD)
    assert page.inner_text("#signin-count") == "3"


def log_in(page: Page, url: str, password: str) -> None:
    """Log Ada in from the top bar; the dashboard is open then."""
    page.click("nav >> text=Log in")
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")
    page.wait_for_url(url + "/app")


def wait_for_calls(emulator: Any, path: str, n: int) -> None:
    """Syncs and events go out after each response: wait until the n-th has arrived."""
    assert emulator.wait_for_requests(n, path=path, timeout=10), f"{path}: fewer than {n}"


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
        ("POST", UPSERT),  # login with the new password
    ]
    assert all(r.status in (200, 201) for r in emulator.requests)
    bodies = [r.body for r in emulator.requests_to(UPSERT)]
    assert all((b["email"], b["external_id"]) == (EMAIL, "1") for b in bodies)
    assert [b.get("source") for b in bodies] == ["signup"] + [None] * 5
    fields = [b["custom_fields"] for b in bodies]
    assert [f["signin_count"] for f in fields] == [0, 1, 2, 2, 2, 3]
    assert [f["plan"] for f in fields] == ["free"] * 3 + ["standard"] * 3
    assert [f["subscription_status"] for f in fields] == ["none"] * 3 + ["active"] * 3
    assert [f["reports_exported"] for f in fields] == [0, 0, 0, 0, 1, 1]
    assert [f["onboarding_completed"] for f in fields] == [False] * 4 + [True] * 2
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
    assert contact["custom_fields"]["signin_count"] == 3
    assert contact["custom_fields"]["reports_exported"] == 1


def test_a_login_link_whose_next_leads_off_the_site_lands_on_the_app(
    emulator: Any, tmp_path: Path
) -> None:
    app = make_app(emulator, tmp_path)
    client = new_client(app)
    sign_up(client)
    verify(client, emulator)
    other = Flask("other_site")
    visits: list[str] = []

    @other.get("/", defaults={"path": ""})
    @other.get("/<path:path>")
    def another_site(path: str) -> str:
        visits.append(path)
        return "<h1>Another site</h1>"

    with serve(app) as url, serve(other) as other_url:
        # evil.example is the other server on loopback, for this browser alone.
        rule = f"MAP evil.example {urlsplit(other_url).netloc}"
        with (
            chromium(f"--host-resolver-rules={rule}") as browser,
            new_page(browser, 1200, 900) as page,
        ):
            # "/", tab, "/evil.example/": a browser drops the tab, reads //evil.example/.
            page.goto(url + "/login?next=/%09/evil.example/")
            page.fill("input[name=email]", EMAIL)
            page.fill("input[name=password]", PASSWORD)
            with page.expect_navigation():
                page.click("button:has-text('Log in')")
            landed = page.url
    assert visits == []
    assert urlsplit(landed).netloc == urlsplit(url).netloc
    assert landed == url + "/app"


#: The elements that stick out of the viewport, or clip what they hold.
OVERFLOWING = """() => {
  const name = (el) => {
    const classes = typeof el.className === "string" ? el.className.trim() : "";
    return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "")
      + (classes ? "." + classes.split(/\\s+/).join(".") : "");
  };
  const found = [];
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (box.width && (box.right > innerWidth + 0.5 || box.left < -0.5)) {
      found.push(name(el) + " spans " + Math.round(box.left) + ".." + Math.round(box.right));
    }
    const o = getComputedStyle(el).overflowX;
    if ((o === "hidden" || o === "clip") && el.scrollWidth > el.clientWidth + 1) {
      found.push(name(el) + " clips " + el.scrollWidth + " to " + el.clientWidth);
    }
  }
  return found;
}"""


def fits_the_phone(page: Page) -> None:
    """Nothing is wider than the phone's screen, and nothing is cut off."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE_WIDTH, (page.url, width)
    assert page.evaluate(OVERFLOWING) == [], page.url
    # The top bar holds the brand and the menu on one row.
    tops = page.eval_on_selector_all(
        ".topbar .brand, .topbar nav > *", "nodes => nodes.map(n => n.getBoundingClientRect().top)"
    )
    assert max(tops) - min(tops) < 20, (page.url, tops)


def test_every_page_fits_a_phone_screen(emulator: Any, phone: Page, tmp_path: Path) -> None:
    app = make_app(emulator, tmp_path)
    with serve(app) as url:

        def visit(path: str) -> None:
            phone.goto(url + path)
            fits_the_phone(phone)

        for path in ("/", "/signup", "/login", "/forgot-password", "/no-such-page"):
            visit(path)
        phone.goto(url + "/signup")
        phone.fill("input[name=name]", "Ada Augusta King, Countess of Lovelace")
        phone.fill("input[name=email]", EMAIL)
        phone.fill("input[name=password]", PASSWORD)
        phone.click("button:has-text('Sign up')")
        phone.wait_for_url(url + "/verify")
        fits_the_phone(phone)
        (send,) = emulator.sends(trigger_key="verification_code")
        phone.fill("input[name=code]", send["variables"]["code"])
        phone.click("button:has-text('Verify')")
        phone.wait_for_url(url + "/app")
        fits_the_phone(phone)
        phone.click("#export")
        phone.wait_for_selector("text=Your usage report is exported as CSV (1 so far).")
        fits_the_phone(phone)
        visit("/billing/")
        phone.click("#upgrade")
        phone.wait_for_selector("text=You are on the Standard plan now.")
        fits_the_phone(phone)
        visit("/forgot-password")
        phone.fill("input[name=email]", EMAIL)
        phone.click("button:has-text('Send the reset link')")
        phone.wait_for_selector("#reset-result")
        fits_the_phone(phone)
