"""The emulator's Python handle, admin endpoints, seeds and command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import requests

from flask_meisa.emulator import Emulator
from flask_meisa.emulator import ManualClock

# The handle


def test_urls_keys_and_repr(emulator):
    assert emulator.url == emulator.root_url + "/api/v1"
    assert emulator.root_url.startswith("http://127.0.0.1:")
    assert emulator.live_key.startswith("meisa_live_")
    assert emulator.test_key.startswith("meisa_test_")
    assert emulator.live_key not in repr(emulator)


def test_recorded_requests(emulator, emulator_api):
    emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"}, params={"x": "1"})
    contact_id = emulator.contacts()[0]["id"]
    emulator_api.post(f"/contacts/{contact_id}/add_tag/", {"tag_name": "vip"})
    emulator_api.get("/ping/", key=None)
    upsert, tag, ping = emulator.requests
    assert (upsert.method, upsert.path, upsert.query) == (
        "POST",
        "/api/v1/contacts/upsert/",
        {"x": "1"},
    )
    assert upsert.body == {"email": "ada@example.com"}
    assert upsert.key == emulator.live_key
    assert upsert.status == 201
    assert upsert.duration >= 0
    assert abs(upsert.time - time.time()) < 60
    assert "x-api-key" not in {h.lower() for h in upsert.headers}
    assert emulator.live_key not in repr(upsert)
    assert (ping.key, ping.status) == (None, 401)
    assert emulator.requests_to("/contacts/*/add_tag/") == [tag]
    assert emulator.requests_to("/api/v1/ping/") == [ping]
    assert emulator.requests_to("/contacts/upsert/", method="GET") == []
    emulator.clear_requests()
    assert emulator.requests == []


def test_wait_for_is_woken_by_requests(emulator, emulator_api):
    worker = threading.Thread(
        target=emulator_api.post, args=("/contacts/upsert/", {"email": "ada@example.com"})
    )
    worker.start()
    try:
        assert emulator.wait_for(lambda emu: emu.contact(email="ada@example.com") is not None)
        assert emulator.wait_for_requests(1, path="/contacts/upsert/")
    finally:
        worker.join()
    assert emulator.wait_for_requests(2, timeout=0.05) is False
    assert emulator.wait_for(lambda emu: False, timeout=0.05) is False


def test_reset_returns_to_the_seed(emulator, emulator_api):
    key = emulator.create_key()
    emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    emulator.add_trigger("extra")
    emulator.suppress("ada@example.com")
    emulator.faults.outage(60)
    emulator.reset()
    assert emulator.contacts() == []
    assert emulator.requests == []
    assert key not in emulator.keys.values()
    assert "ada@example.com" not in emulator.suppressions()
    assert emulator_api.get("/ping/").ok
    answer = emulator_api.post("/emails/trigger/", {"trigger_key": "extra", "to_email": "a@b.co"})
    assert answer.json()["code"] == "invalid_trigger"


def test_add_trigger_and_sequence(emulator, emulator_api):
    emulator.add_trigger("plan_mail", conditions=[{"custom_field": "plan", "in": ["pro", "team"]}])
    emulator.add_sequence("paused_one", status="paused")
    payload = {
        "trigger_key": "plan_mail",
        "to_email": "ada@example.com",
        "recipient": {"custom_fields": {"plan": "team"}},
    }
    assert emulator_api.post("/emails/trigger/", payload).json()["status"] == "sent"
    listed = emulator_api.get("/sequences/api/list/", params={"status": "paused"}).json()
    assert [s["slug"] for s in listed["results"]] == ["winback", "paused_one"]
    with pytest.raises(ValueError):
        emulator.add_trigger("broken", conditions={"custom_field": "plan"})


def test_stop_closes_keep_alive_connections_promptly(emulator_factory, emulator_api_factory):
    emu = emulator_factory(rate_limit=None)
    api = emulator_api_factory(emu)
    assert api.get("/ping/").ok  # leaves a keep-alive connection open
    started = time.perf_counter()
    emu.stop()
    assert time.perf_counter() - started < 2
    assert not emu.running
    with pytest.raises(requests.ConnectionError):
        api.get("/ping/")
    emu.start()  # same port again, state kept
    assert api.get("/ping/").ok


def test_stop_ends_a_latency_wait_and_a_restart_waits_again(emulator_factory, monkeypatch):
    emu = emulator_factory(rate_limit=None)
    emu.faults.set(latency=30)
    outcomes: list[object] = []
    planned = threading.Event()  # the call is in the server, its latency decided
    plan = emu.faults.plan

    def plan_and_tell(path: str, body: Any = None) -> Any:
        try:
            return plan(path, body)
        finally:
            planned.set()

    monkeypatch.setattr(emu.faults, "plan", plan_and_tell)

    def ping() -> None:
        try:
            answer = requests.get(
                emu.url + "/ping/", headers={"X-API-Key": emu.live_key}, timeout=20
            )
            outcomes.append(answer.status_code)
        except requests.RequestException as error:
            outcomes.append(error)

    caller = threading.Thread(target=ping)
    caller.start()
    assert planned.wait(10)  # the call is waiting out its latency (stop() ends that wait)
    started = time.perf_counter()
    emu.stop()
    caller.join(10)
    assert time.perf_counter() - started < 5
    assert len(outcomes) == 1
    emu.faults.set(latency=0.3)
    emu.start()
    started = time.perf_counter()
    assert requests.get(emu.url + "/ping/", headers={"X-API-Key": emu.live_key}, timeout=5).ok
    assert time.perf_counter() - started >= 0.3
    assert len(emu.requests) == 2  # the refused connection never reached it


def test_manual_clock_drives_timestamps(emulator_factory, emulator_api_factory):
    clock = ManualClock(start=1_700_000_000)
    emu = emulator_factory(rate_limit="1/minute", clock=clock)
    api = emulator_api_factory(emu)
    created = api.post("/contacts/upsert/", {"email": "ada@example.com"}).json()
    assert created["created_at"] == "2023-11-14T22:13:20.000000+00:00"
    assert api.get("/ping/").status_code == 429
    emu.advance_clock(60)
    assert api.get("/ping/").ok


class WallStepClock(ManualClock):
    """A clock whose wall time steps forward alone, as a VM's when it resumes."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0.0

    def time(self) -> float:
        return super().time() + self.step


def test_the_keys_windows_follow_the_wall_clock_as_the_engines_do(
    emulator_factory, emulator_api_factory
):
    clock = WallStepClock()
    emu = emulator_factory(rate_limit="1/minute", clock=clock)
    api = emulator_api_factory(emu)
    assert api.get("/ping/").ok
    assert api.get("/ping/").status_code == 429
    clock.step = 60.0  # the monotonic clock did not move
    assert api.get("/ping/").ok


@pytest.mark.parametrize("kind", ["dict", "path", "none"])
def test_seeds(emulator_factory, emulator_api_factory, tmp_path, kind):
    seed = {
        "product": {"name": "Tiny"},
        "triggers": [{"key": "hello"}],
        "keys": [{"name": "only", "key": "meisa_live_tiny_1", "scopes": ["emails:trigger"]}],
        "contacts": {"test": [{"email": "seeded@example.com", "custom_fields": {"plan": "pro"}}]},
    }
    if kind == "path":
        path = tmp_path / "seed.json"
        path.write_text(json.dumps(seed))
        emu = emulator_factory(seed=path, rate_limit=None)
    else:
        emu = emulator_factory(seed=seed if kind == "dict" else None, rate_limit=None)
    api = emulator_api_factory(emu)
    ping = api.get("/ping/").json()
    assert ping["product"]["name"] == ("Meisa Emulator" if kind == "none" else "Tiny")
    answer = api.post("/emails/trigger/", {"trigger_key": "hello", "to_email": "a@example.com"})
    assert answer.status_code == (400 if kind == "none" else 200)
    seeded = emu.contact(email="seeded@example.com", environment="test")
    assert (seeded is None) == (kind == "none")
    key = emu.live_key
    emu.reset()
    assert emu.live_key == key  # generated keys survive a reset
    with pytest.raises(ValueError):
        Emulator(seed={"unknown": 1})


# Admin endpoints


def admin(api, method, name, **kwargs):
    url = api.emulator.root_url + "/_emulator/" + name
    return api.session.request(method, url, timeout=5, **kwargs)


def test_admin_reads_state_and_lists(emulator, emulator_api):
    emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    emulator_api.post("/events/track/", {"event_name": "login", "email": "ada@example.com"})
    emulator_api.post("/emails/trigger/", {"trigger_key": "receipt", "to_email": "a@example.com"})
    emulator_api.post(
        "/sequences/enroll/", {"email": "ada@example.com", "sequence_slug": "onboarding"}
    )
    state = admin(emulator_api, "GET", "state").json()
    assert state["product"]["name"] == "Demo SaaS"
    assert state["environments"]["live"]["contacts"] == 2
    assert state["requests"] == 4
    assert all(emulator.live_key not in json.dumps(k) for k in state["keys"])
    assert len(admin(emulator_api, "GET", "events").json()) == 1
    assert len(admin(emulator_api, "GET", "sends").json()) == 1
    assert len(admin(emulator_api, "GET", "enrollments").json()) == 1
    contacts = admin(emulator_api, "GET", "contacts", params={"environment": "test"})
    assert contacts.json() == []
    logged = admin(emulator_api, "GET", "requests").json()
    assert [r["path"] for r in logged][:1] == ["/api/v1/contacts/upsert/"]
    assert emulator.live_key not in json.dumps(logged)
    assert len(emulator.requests) == 4  # admin calls are not recorded
    assert admin(emulator_api, "GET", "nope").status_code == 404


def test_admin_faults_keys_clock_reset(emulator, emulator_api):
    posted = admin(
        emulator_api, "POST", "faults", json={"fail_next": {"n": 1, "status": 502}, "outage": 0}
    )
    assert posted.status_code == 200
    assert emulator_api.get("/ping/").status_code == 502
    admin(emulator_api, "POST", "faults", json={"error_rate": 1.0, "error_statuses": [504]})
    assert emulator_api.get("/ping/").status_code == 504
    assert admin(emulator_api, "DELETE", "faults", json={}).json()["error_rate"] == 0
    assert emulator_api.get("/ping/").ok
    bad = admin(emulator_api, "POST", "faults", json={"drop_rate": 3})
    assert bad.status_code == 400
    made = admin(
        emulator_api, "POST", "keys", json={"environment": "test", "scopes": ["contacts:read"]}
    )
    assert made.status_code == 201
    ping = emulator_api.get("/ping/", key=made.json()["key"]).json()
    assert (ping["environment"], ping["scopes"]) == ("test", ["contacts:read"])
    before = emulator.now()
    admin(emulator_api, "POST", "clock", json={"advance": 120})
    assert emulator.now() - before >= 120
    admin(emulator_api, "POST", "suppressions", json={"email": "x@example.com"})
    assert "x@example.com" in emulator.suppressions("test")
    emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    assert admin(emulator_api, "POST", "reset", json={}).json() == {"status": "reset"}
    assert emulator.contacts() == []
    assert emulator.requests == []


# Command line


def test_command_line_serves_the_demo_and_exits_cleanly_on_sigterm():
    command = [sys.executable, "-m", "flask_meisa.emulator", "--port", "0", "--rate-limit", "none"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            lines = [process.stdout.readline() for _ in range(4)]
            assert lines[0].startswith("Meisa emulator listening on http://127.0.0.1:")
            url = lines[0].split()[-1]
            key = lines[3].split()[-1]
            assert key.startswith("meisa_live_demo_")
            assert "not secrets" in lines[2]
            with requests.Session() as session:
                ping = session.get(url + "/ping/", headers={"X-API-Key": key}, timeout=5)
                inbox = session.get(lines[1].split()[-1], timeout=5)
            assert ping.json()["product"]["name"] == "Demo SaaS"
            assert lines[1].startswith("Inbox and admin endpoints: http://127.0.0.1:")
            assert (inbox.status_code, inbox.headers["Content-Type"]) == (
                200,
                "text/html; charset=utf-8",
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
            assert process.stderr.read() == ""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# The HTTP layer reads headers and bodies itself


def exchange(emulator: Emulator, request: bytes) -> list[tuple[int, str]]:
    """Send ``request`` as written; every answer's status and head until the emulator closes
    the connection (a ``100 Continue`` counts as one)."""
    host, port = emulator.root_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    answers = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        text = head.decode("iso-8859-1")
        answers.append((int(text.split()[1]), text))
        length = re.search(r"(?im)^Content-Length: *(\d+)", text)
        data = data[int(length[1]) :] if length else data
    return answers


def test_malformed_or_oversized_headers_are_refused(emulator):
    start = "GET /api/v1/ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    lines = {
        400: "no colon here\r\n",
        431: "".join(f"X-Extra-{n}: {n}\r\n" for n in range(101)),
    }
    for status, extra in lines.items():
        assert exchange(emulator, f"{start}{extra}\r\n".encode())[0][0] == status
    too_long = f"{start}X-Long: {'x' * 65536}\r\n\r\n".encode()
    assert exchange(emulator, too_long)[0][0] == 431
    assert exchange(emulator, b"GET /api/v1/ping/\r\n\r\n")[0][0] == 400
    assert emulator.requests == []


def test_chunked_bodies_expect_continue_and_the_date_header(emulator):
    head = (
        "POST /api/v1/contacts/upsert/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-API-Key: {emulator.live_key}\r\nContent-Type: application/json\r\n"
    )
    chunked = (
        f"{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        '10\r\n{"email": "chunk\r\n10;ext=1\r\ned@example.com"}\r\n0\r\nX-Trailer: 1\r\n\r\n'
    )
    [(status, text)] = exchange(emulator, chunked.encode())
    assert status == 201
    date = re.search(r"(?im)^Date: (.+)$", text)
    assert date and parsedate_to_datetime(date[1]).tzinfo is not None
    body = b'{"email": "continued@example.com"}'
    expecting = f"{head}Expect: 100-continue\r\nContent-Length: {len(body)}\r\n"
    answers = exchange(emulator, f"{expecting}Connection: close\r\n\r\n".encode() + body)
    assert [status for status, _ in answers] == [100, 201]
    assert emulator.contact(email="chunked@example.com") is not None
    assert emulator.contact(email="continued@example.com") is not None
    bad = exchange(emulator, f"{head}Content-Length: ten\r\nConnection: close\r\n\r\n".encode())
    assert bad[0][0] == 400
