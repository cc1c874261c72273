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
from collections.abc import Callable
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
from tests.example_helpers import make_app
from tests.example_helpers import new_client
from tests.example_helpers import sign_up
from tests.example_helpers import verify
from tests.servers import serve

if TYPE_CHECKING:
    from playwright.sync_api import Browser
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
TRIGGER = "/emails/trigger/"
PHONE_WIDTH = 390
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
def chromium() -> Iterator[Callable[..., Browser]]:
    """Launch headless Chromium (``launch(*extra_args)``); every browser closed after."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched: list[Browser] = []

        def launch(*extra_args: str) -> Browser:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args]
            )
            launched.append(browser)
            return browser

        try:
            yield launch
        finally:
            for browser in launched:
                browser.close()


@pytest.fixture
def browser(chromium: Callable[..., Browser]) -> Browser:
    """Headless Chromium."""
    return chromium()


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
    wait_for_calls(emulator, TRIGGER, 2)  # sent after the response


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


def test_a_login_link_whose_next_leads_off_the_site_lands_on_the_app(
    emulator: Any, chromium: Callable[..., Browser], tmp_path: Path
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
        with new_page(chromium(f"--host-resolver-rules={rule}"), 1200, 900) as page:
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


#: The elements that stick out of the viewport, or clip what they hold, outside of a
#: container that scrolls sideways on purpose (a wide table).
OVERFLOWING = """() => {
  const scrollsSideways = (el) => {
    for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === "auto" || o === "scroll") return true;
    }
    return false;
  };
  const name = (el) => {
    const classes = typeof el.className === "string" ? el.className.trim() : "";
    return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "")
      + (classes ? "." + classes.split(/\\s+/).join(".") : "");
  };
  const found = [];
  for (const el of document.querySelectorAll("body *")) {
    if (scrollsSideways(el)) continue;
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
        visit("/meisa")  # its entries hold the longest values: URLs, keys, names
        assert phone.locator("li.entry").count() >= 8
