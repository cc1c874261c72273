"""The inbox at ``/_emulator/``: what the emulator received, in headless Chromium.

The phone-sized screenshot goes to the test's temporary folder, and also to
``$MEISA_SCREENSHOT_DIR/emulator-inbox.png`` when that variable is set (the project keeps
its copy in ``docs/screenshots/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import pytest
import requests

from flask_meisa.emulator import Emulator
from tests.browser import chromium
from tests.browser import save_screenshot
from tests.conftest import EmulatorAPI

if TYPE_CHECKING:
    from playwright.sync_api import Page

RESET_URL = "https://app.example.com/reset/" + "Jq7vT2xKp9LmZ4wB" * 4
HOSTILE: dict[str, Any] = {
    "email": "mallory@example.com",
    "first_name": "<script>window.pwned = 1</script>",
    "last_name": '"\'><img src=x onerror="window.pwned = 2">',
    "custom_fields": {"<b>note</b>": "</dd><script>window.pwned = 3</script>", "quote": "\"'`"},
    "tag_names": ['<i onmouseover="window.pwned = 4">vip</i>'],
}


def open_page(emulator: Emulator, width: int) -> Iterator[Page]:
    """The inbox in a fresh Chromium page ``width`` px wide; fails on any script error."""
    with chromium() as browser:
        context = browser.new_context(viewport={"width": width, "height": 844})
        context.set_default_timeout(10_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
        page.goto(emulator.root_url + "/_emulator/")
        yield page
        context.close()
        assert errors == []


@pytest.fixture
def phone(emulator: Emulator) -> Iterator[Page]:
    """The inbox on a 390x844 viewport."""
    yield from open_page(emulator, 390)


@pytest.fixture
def desktop(emulator: Emulator) -> Iterator[Page]:
    """The inbox on a 1200x844 viewport."""
    yield from open_page(emulator, 1200)


def make_traffic(api: EmulatorAPI) -> None:
    """Two users sign up; Ada gets a reset email and exports a report."""
    for n, (email, plan) in enumerate((("ada@example.com", "pro"), ("bob@example.com", "free"))):
        answer = api.post(
            "/contacts/upsert/",
            {
                "email": email,
                "external_id": str(n + 1),
                "first_name": email.split("@")[0].title(),
                "custom_fields": {"plan": plan, "signin_count": n + 2},
                "tag_names": ["beta"] if plan == "pro" else [],
            },
        )
        assert answer.status_code == 201
    sent = api.post(
        "/emails/trigger/",
        {
            "trigger_key": "password_reset",
            "to_email": "ada@example.com",
            "variables": {"reset_url": RESET_URL},
        },
    )
    assert sent.json()["status"] == "sent"
    tracked = api.post(
        "/events/track/",
        {"event_name": "exported_report", "email": "bob@example.com", "properties": {"n": 1}},
    )
    assert tracked.status_code == 200
    assert api.get("/ping/", key="meisa_live_wrong").status_code == 401


def texts(page: Page, selector: str) -> list[str]:
    found: list[str] = page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.innerText)")
    return found


def test_the_inbox_lists_what_arrived_newest_first_and_fits_a_phone(
    emulator: Emulator, emulator_api: EmulatorAPI, phone: Page, tmp_path: Path
) -> None:
    make_traffic(emulator_api)
    phone.wait_for_selector("#requests li:has-text('401')")
    contacts = texts(phone, "#contacts li")
    assert [c.split("\n")[0] for c in contacts] == ["bob@example.com", "ada@example.com"]
    ada = contacts[1]
    assert "beta" in ada and "plan\npro" in ada and "signin_count\n2" in ada
    assert "external_id\n1" in ada
    (email,) = texts(phone, "#sends li")
    assert email.startswith("password_reset → ada@example.com\nsent")
    assert RESET_URL in email
    (event,) = texts(phone, "#events li")
    assert event.startswith("exported_report\nbob@example.com")
    calls = texts(phone, "#requests li")
    assert [c.split("\n")[0] for c in calls] == [
        "GET /ping/",
        "POST /events/track/",
        "POST /emails/trigger/",
        "POST /contacts/upsert/",
        "POST /contacts/upsert/",
    ]
    assert [c.split("\n")[1].split(" ")[0] for c in calls] == ["401", "200", "200", "201", "201"]
    assert phone.inner_text("#n-requests") == "(5)"

    # It refreshes itself: a call made now shows up without a reload.
    emulator_api.post("/contacts/upsert/", {"email": "carol@example.com"})
    phone.wait_for_selector("#contacts li:has-text('carol@example.com')")
    assert texts(phone, "#requests li")[0].startswith("POST /contacts/upsert/\n201")

    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    shot = phone.screenshot(path=str(tmp_path / "emulator-inbox.png"), full_page=True)
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    save_screenshot(shot, "emulator-inbox.png")


def test_the_filter_keeps_what_concerns_one_address(
    emulator: Emulator, emulator_api: EmulatorAPI, phone: Page
) -> None:
    make_traffic(emulator_api)
    bob = emulator.contact(email="bob@example.com")
    assert bob is not None
    emulator_api.post(f"/contacts/{bob['id']}/add_tag/", {"tag_name": "churn-risk"})
    phone.wait_for_selector("#requests li:has-text('add_tag')")
    phone.fill("#filter", "BOB@")
    phone.wait_for_function("document.querySelectorAll('#contacts li').length === 1")
    assert texts(phone, "#contacts li")[0].startswith("bob@example.com")
    assert texts(phone, "#sends li") == ["Nothing for this address."]
    assert [e.split("\n")[0] for e in texts(phone, "#events li")] == ["exported_report"]
    assert [c.split("\n")[0] for c in texts(phone, "#requests li")] == [
        f"POST /contacts/{bob['id']}/add_tag/",
        "POST /events/track/",
        "POST /contacts/upsert/",
    ]
    assert phone.url.endswith("/_emulator/?address=BOB%40")
    # The address in the URL is the filter: a link to it opens filtered.
    phone.goto(emulator.root_url + "/_emulator/?address=ada%40example.com")
    phone.wait_for_selector("#sends li:has-text('password_reset')")
    assert [c.split("\n")[0] for c in texts(phone, "#contacts li")] == ["ada@example.com"]
    assert phone.input_value("#filter") == "ada@example.com"


def test_contact_fields_show_as_text_and_nothing_in_them_runs(
    emulator_api: EmulatorAPI, desktop: Page
) -> None:
    assert emulator_api.post("/contacts/upsert/", HOSTILE).status_code == 201
    desktop.wait_for_selector("#contacts li:has-text('mallory@example.com')")
    desktop.hover("#contacts .tag")
    shown = desktop.inner_text("#contacts")
    assert desktop.evaluate("window.pwned") is None
    made = "main script, main img, main b, main i"
    assert desktop.eval_on_selector_all(made, "nodes => nodes.length") == 0
    for value in (HOSTILE["first_name"], HOSTILE["last_name"], *HOSTILE["custom_fields"].values()):
        assert value in shown
    assert "<b>note</b>" in shown and "<i onmouseover" in shown


def test_the_page_is_static_and_locked_down(emulator: Emulator) -> None:
    answer = requests.get(emulator.root_url + "/_emulator/", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "frame-ancestors 'none'" in policy
    assert emulator.requests == []  # the page is not an API call
