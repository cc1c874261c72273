"""The emulator as a safe local service: foreign Host names and cross-site admin writes."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import requests
from flask import Flask

from flask_meisa.emulator import Emulator
from tests.browser import chromium
from tests.servers import serve


def port_of(emulator: Emulator) -> int:
    return int(emulator.root_url.rsplit(":", 1)[1])


def raw(address: tuple[str, int], head: str, body: bytes = b"") -> tuple[int, Any]:
    """Send one request as written (``Connection: close``); the status and JSON body."""
    with socket.create_connection(address, timeout=5) as connection:
        connection.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    fields, _, payload = answer.partition(b"\r\n\r\n")
    status = int(fields.split()[1])
    is_json = b"application/json" in fields
    return status, json.loads(payload) if is_json else payload.decode()


def attempts(host: str | None, key: str) -> list[tuple[str, bytes]]:
    """An API call, an admin read, the inbox and an admin write, naming ``host``."""
    line = "" if host is None else f"Host: {host}\r\n"
    outage = b'{"outage": 600}'
    return [
        (f"GET /api/v1/ping/ HTTP/1.1\r\n{line}X-API-Key: {key}\r\n", b""),
        (f"GET /_emulator/requests HTTP/1.1\r\n{line}", b""),
        (f"GET /_emulator/ HTTP/1.1\r\n{line}", b""),
        (
            f"POST /_emulator/faults HTTP/1.1\r\n{line}Content-Type: application/json\r\n"
            f"Content-Length: {len(outage)}\r\n",
            outage,
        ),
    ]


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "evil.example@127.0.0.1:{port}",
        "127.0.0.1:{port}/evil",
        "[::1:{port}",
        None,
    ],
)
def test_a_foreign_host_name_is_refused_everywhere(emulator: Emulator, host: str | None) -> None:
    port = port_of(emulator)
    named = None if host is None else host.format(port=port)
    answers = [
        raw(("127.0.0.1", port), head, body) for head, body in attempts(named, emulator.live_key)
    ]
    assert [status for status, _ in answers] == [421] * 4
    assert all(body["code"] == "misdirected_request" for _, body in answers)
    assert emulator.requests == []  # refused before the API: not recorded, not counted
    assert emulator.faults.snapshot()["outage_remaining"] == 0


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost.", "[::1]:{port}", "127.0.0.2"]
)
def test_loopback_names_are_served(emulator: Emulator, host: str) -> None:
    port = port_of(emulator)
    named = host.format(port=port)
    statuses = [
        raw(("127.0.0.1", port), head, body)[0]
        for head, body in attempts(named, emulator.live_key)
    ]
    assert statuses == [200, 200, 200, 200]
    assert emulator.faults.snapshot()["outage_remaining"] > 0


def _public_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_the_address_it_was_started_on_is_served(emulator_factory: Any) -> None:
    address = _public_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    emulator = emulator_factory(host=address, rate_limit=None)
    port = port_of(emulator)
    ping = f"GET /_emulator/state HTTP/1.1\r\nHost: {address}:{port}\r\n"
    assert raw((address, port), ping)[0] == 200
    foreign = "GET /_emulator/state HTTP/1.1\r\nHost: evil.example\r\n"
    assert raw((address, port), foreign)[0] == 421


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ],
)
def test_an_admin_write_that_is_not_json_is_refused(
    emulator: Emulator, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    admin = emulator.root_url + "/_emulator/"
    before = emulator.state()
    with requests.Session() as http:
        outage = http.post(admin + "faults", data='{"outage": 600}', headers=headers, timeout=5)
        forget = http.delete(
            admin + "suppressions", data='{"email": "bounced@example.com"}', headers=headers
        )
        reset = http.post(admin + "reset", headers=headers, timeout=5)
    for answer in (outage, forget, reset):
        assert (answer.status_code, answer.json().get("code")) == (415, "unsupported_media_type")
    assert emulator.state() == before


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1:{other}", "https://127.0.0.1:{port}"],
)
def test_an_admin_write_from_another_origin_is_refused(emulator: Emulator, origin: str) -> None:
    port = port_of(emulator)
    headers = {"Origin": origin.format(port=port, other=port + 1)}
    before = emulator.state()
    answer = requests.post(
        emulator.root_url + "/_emulator/suppressions",
        json={"email": "victim@example.com"},
        headers=headers,
        timeout=5,
    )
    assert (answer.status_code, answer.json().get("code")) == (403, "forbidden_origin")
    assert emulator.state() == before
    assert "victim@example.com" not in emulator.suppressions()


def test_an_admin_write_as_json_from_its_own_origin_or_none_works(emulator: Emulator) -> None:
    port = port_of(emulator)
    with requests.Session() as http:
        for n, host in enumerate((f"127.0.0.1:{port}", f"localhost:{port}")):
            answer = http.post(
                emulator.root_url + "/_emulator/suppressions",
                json={"email": f"own-{n}@example.com"},
                headers={"Host": host, "Origin": f"http://{host}"},
                timeout=5,
            )
            assert answer.status_code == 200
        no_origin = http.post(
            emulator.root_url + "/_emulator/faults",
            data='{"outage": 600}',
            headers={"Content-Type": "application/json; charset=utf-8"},
            timeout=5,
        )
        assert no_origin.status_code == 200
        read = http.get(
            emulator.root_url + "/_emulator/state", headers={"Origin": "http://evil.example"}
        )
    assert {"own-0@example.com", "own-1@example.com"} <= set(emulator.suppressions())
    assert emulator.faults.snapshot()["outage_remaining"] > 0
    # Reads answer, but grant no other origin the right to see the answer.
    assert read.status_code == 200
    assert "Access-Control-Allow-Origin" not in read.headers


ATTACK_PAGE = """<!doctype html>
<form id="form" method="post" enctype="text/plain" action="{target}/_emulator/suppressions">
  <input type="hidden" name='{{"email":"victim@example.com","x":"' value='"}}'>
</form>
<script>
fetch("{target}/_emulator/faults",
      {{method: "POST", mode: "no-cors", body: JSON.stringify({{outage: 600}})}})
  .finally(() => {{ document.title = "fetched"; }});
</script>
"""


def test_a_page_on_another_loopback_port_cannot_change_the_emulator(emulator: Emulator) -> None:
    target = emulator.root_url
    attacker = Flask("attacker")
    attacker.add_url_rule("/", "page", lambda: ATTACK_PAGE.format(target=target))
    before = emulator.state()
    with serve(attacker) as url, chromium() as browser:
        assert url.rsplit(":", 1)[1] != target.rsplit(":", 1)[1]
        page = browser.new_page()
        with page.expect_response(target + "/_emulator/faults") as fetched:
            page.goto(url + "/")
        page.wait_for_function("document.title === 'fetched'")
        with page.expect_response(target + "/_emulator/suppressions") as posted:
            page.evaluate("document.getElementById('form').submit()")
        refusals = [fetched.value.status, posted.value.status]
        shown = posted.value.json()
    assert refusals == [403, 403]  # the requests arrived, and were refused
    assert shown["code"] == "forbidden_origin"
    # Showing the refusal, the browser asked the emulator for a favicon (recorded, a 404).
    assert {(r.method, r.path) for r in emulator.requests} <= {("GET", "/favicon.ico")}
    assert {**emulator.state(), "requests": 0} == before
    assert "victim@example.com" not in emulator.suppressions()
