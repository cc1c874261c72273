"""The emulator's rate limits and fault injection, over real HTTP."""

from __future__ import annotations

import time

import pytest
import requests

from flask_meisa.emulator import RateLimiter
from flask_meisa.emulator import parse_rules

# Rate limits


def test_parse_rules():
    def shape(spec: str) -> list[tuple[int, float]]:
        return [(rule.limit, rule.period) for rule in parse_rules(spec)]

    assert shape("60/minute;1000/hour") == [(60, 60.0), (1000, 3600.0)]
    assert shape("10/second") == [(10, 1.0)]
    assert shape("5/10s, 2/days") == [(5, 10.0), (2, 86400.0)]
    # One parser for the emulator and the engine: the engine's spellings work here too.
    assert shape("10 per minute") == [(10, 60.0)]
    for bad in ("", "ten/minute", "5/fortnight", "5"):
        with pytest.raises(ValueError):
            parse_rules(bad)


def test_sliding_window_frees_one_slot_per_expired_hit():
    limiter = RateLimiter("2/10s")
    assert limiter.acquire(0.0) is None
    assert limiter.acquire(4.0) is None
    assert limiter.acquire(9.0) == pytest.approx(1.0)
    assert limiter.acquire(10.0) is None  # the hit at 0 left the window
    assert limiter.acquire(12.0) == pytest.approx(2.0)


def test_rate_limit_429_with_retry_after_then_the_window_frees(
    emulator_factory, emulator_api_factory
):
    emu = emulator_factory(rate_limit="5/second")
    api = emulator_api_factory(emu)
    assert [api.get("/ping/").status_code for _ in range(5)] == [200] * 5
    limited = api.get("/ping/")
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited"
    assert limited.headers["Retry-After"] == "1"
    emu.advance_clock(1)
    assert api.get("/ping/").status_code == 200


def test_requests_answered_429_are_not_counted(emulator_factory, emulator_api_factory):
    emu = emulator_factory(rate_limit="2/second;3/minute")
    api = emulator_api_factory(emu)
    assert [api.get("/ping/").status_code for _ in range(4)] == [200, 200, 429, 429]
    emu.advance_clock(1)
    assert api.get("/ping/").status_code == 200  # third of the minute: the 429s did not count
    emu.advance_clock(1)
    minute = api.get("/ping/")
    assert minute.status_code == 429
    assert 55 <= int(minute.headers["Retry-After"]) <= 60


def test_every_authenticated_request_counts_even_refused_ones(
    emulator_factory, emulator_api_factory
):
    emu = emulator_factory(rate_limit="2/minute")
    key = emu.create_key(scopes=["contacts:read"])
    api = emulator_api_factory(emu, key)
    assert api.post("/contacts/upsert/", {"email": "a@example.com"}).status_code == 403
    assert api.get("/nope/").status_code == 404  # unknown path: not counted
    assert api.get("/ping/").status_code == 200
    assert api.get("/ping/").status_code == 429


def test_limits_per_key_and_disabled(emulator_factory, emulator_api_factory):
    emu = emulator_factory(rate_limit="1/hour")
    roomy = emu.create_key(rate_limit="3/hour")
    unlimited = emu.create_key(rate_limit=None)
    default = emulator_api_factory(emu)
    assert [default.get("/ping/").status_code for _ in range(2)] == [200, 429]
    other = emulator_api_factory(emu, roomy)
    assert [other.get("/ping/").status_code for _ in range(4)] == [200, 200, 200, 429]
    free = emulator_api_factory(emu, unlimited)
    assert all(free.get("/ping/").ok for _ in range(10))
    emu.set_rate_limit(None)
    assert default.get("/ping/").ok


# Faults


def test_latency_delays_answers(emulator, emulator_api):
    emulator.faults.set(latency=1.0, paths=["/ping/"])
    started = time.perf_counter()
    assert emulator_api.get("/ping/").ok
    assert time.perf_counter() - started >= 1.0
    assert emulator.requests[-1].duration >= 1.0
    started = time.perf_counter()
    emulator_api.get("/contacts/api/unsubscribed-emails/")
    # Not held (a second is long beside a local call, even on a busy machine).
    assert time.perf_counter() - started < 1.0


def test_error_rate_answers_errors_without_processing(emulator, emulator_api):
    emulator.faults.set(error_rate=1.0, error_statuses=(502,))
    answer = emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    assert answer.status_code == 502
    assert answer.json()["code"] == "bad_gateway"
    assert emulator.contacts() == []
    assert emulator.requests[-1].fault == "error"
    emulator.faults.clear()
    assert emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"}).ok


def test_drop_rate_closes_connections_on_chosen_paths(emulator, emulator_api):
    emulator.faults.set(drop_rate=1.0, paths=["/contacts/*"])
    with pytest.raises(requests.ConnectionError):
        emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    assert emulator_api.get("/ping/").ok
    assert emulator.requests[0].status is None
    assert emulator.contacts() == []


def test_fail_next_is_deterministic_and_path_scoped(emulator, emulator_api):
    emulator.faults.fail_next(2, status=503, path="/events/track/", retry_after=7)
    assert emulator_api.get("/ping/").ok
    emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    payload = {"event_name": "login", "email": "ada@example.com"}
    first = emulator_api.post("/events/track/", payload)
    assert first.status_code == 503
    assert first.headers["Retry-After"] == "7"
    assert emulator_api.post("/events/track/", payload).status_code == 503
    assert emulator_api.post("/events/track/", payload).ok
    assert len(emulator.events()) == 1


def test_fail_next_with_match_refuses_only_requests_whose_body_has_those_fields(
    emulator, emulator_api
):
    emulator.faults.fail_next(1, status=400, path="/contacts/upsert/", match={"external_id": "5"})
    assert emulator.faults.snapshot()["pending"][0]["match"] == {"external_id": "5"}
    for n in (4, 6):  # other contacts go through, the fault waits
        body = {"email": f"u{n}@example.com", "external_id": str(n)}
        assert emulator_api.post("/contacts/upsert/", body).ok
    five = {"email": "u5@example.com", "external_id": "5"}
    assert emulator_api.post("/contacts/upsert/", five).status_code == 400
    assert emulator_api.post("/contacts/upsert/", five).ok  # one shot
    with pytest.raises(ValueError, match="match"):
        emulator.faults.fail_next(1, match=["external_id"])
    # Over the admin API too.
    admin = emulator.root_url + "/_emulator/faults"
    shot = {"fail_next": {"status": 503, "match": {"external_id": "7"}}}
    assert emulator_api.session.post(admin, json=shot, timeout=5).ok
    assert emulator.faults.snapshot()["pending"][0]["match"] == {"external_id": "7"}


def test_fail_next_after_keeps_the_effect_and_loses_the_answer(emulator, emulator_api):
    emulator.faults.fail_next(1, status=500, after=True)
    answer = emulator_api.post("/contacts/upsert/", {"email": "ada@example.com"})
    assert answer.status_code == 500
    assert emulator.contact(email="ada@example.com") is not None
    assert emulator.requests[-1].fault == "error_after"


def test_drop_next_before_and_after(emulator, emulator_api):
    emulator.faults.drop_next(1, path="/emails/trigger/")
    emulator.faults.drop_next(1, path="/emails/trigger/", after=True)
    payload = {"trigger_key": "receipt", "to_email": "ada@example.com"}
    with pytest.raises(requests.ConnectionError):
        emulator_api.post("/emails/trigger/", payload)
    assert emulator.sends() == []
    with pytest.raises(requests.ConnectionError):
        emulator_api.post("/emails/trigger/", payload)
    assert len(emulator.sends()) == 1
    assert emulator_api.post("/emails/trigger/", payload).ok
    assert [r.fault for r in emulator.requests] == ["drop", "drop_after", None]


def test_force_429_is_not_counted_by_the_rate_limit(emulator_factory, emulator_api_factory):
    emu = emulator_factory(rate_limit="1/minute")
    api = emulator_api_factory(emu)
    emu.faults.force_429(2, retry_after=3)
    forced = api.get("/ping/")
    assert forced.status_code == 429
    assert forced.headers["Retry-After"] == "3"
    assert forced.json()["code"] == "rate_limited"
    assert api.get("/ping/").status_code == 429
    assert api.get("/ping/").status_code == 200
    assert [r.fault for r in emu.requests] == ["429", "429", None]


def test_outage_answers_503_until_it_ends(emulator, emulator_api):
    emulator.faults.outage(30)
    assert emulator_api.get("/ping/").status_code == 503
    assert emulator_api.post("/contacts/upsert/", {"email": "a@example.com"}).status_code == 503
    assert emulator.contacts() == []
    assert emulator.state()["faults"]["outage_remaining"] > 0
    emulator.advance_clock(30)
    assert emulator_api.get("/ping/").ok


def test_outage_can_drop_instead(emulator, emulator_api):
    emulator.faults.outage(10, drop=True)
    with pytest.raises(requests.ConnectionError):
        emulator_api.get("/ping/")
    emulator.faults.clear()
    assert emulator_api.get("/ping/").ok


def test_faults_never_touch_admin_endpoints(emulator, emulator_api):
    emulator.faults.outage(60)
    emulator.faults.fail_next(5)
    answer = emulator_api.session.get(emulator.root_url + "/_emulator/state", timeout=5)
    assert answer.status_code == 200
    assert emulator.requests == []
    assert len(emulator.faults.snapshot()["pending"]) == 1
