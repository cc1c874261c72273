"""Key hygiene, configuration checks, and validation that stops a call before any request."""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from flask_meisa import errors
from flask_meisa.client import MeisaClient
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import MeisaError
from flask_meisa.errors import ValidationError
from flask_meisa.operations import MAX_BODY_BYTES
from flask_meisa.retry import RetryPolicy
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response

FAST = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, deadline=5.0)


@pytest.fixture
def secret(emulator: Any) -> str:
    """A long random key with every scope, made for this test."""
    key: str = emulator.create_key()
    assert len(key) >= 32
    return key


@pytest.fixture
def client(emulator: Any, secret: str) -> Iterator[MeisaClient]:
    with MeisaClient(secret, emulator.url, retry=FAST, timeout=(1.0, 0.3)) as meisa:
        yield meisa


def texts_of(error: BaseException) -> Iterator[str]:
    """Every text an error shows: str, repr, args, attributes, and its chained causes."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield repr(current.args)
        yield repr(vars(current))
        pending += [current.__cause__, current.__context__]


# -- the key stays secret --------------------------------------------------------------


def test_key_absent_from_logs_and_errors(
    client: MeisaClient, emulator: Any, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.add_trigger("verify_email")
    limited = emulator.create_key(scopes=["contacts:read"])
    errors: list[BaseException] = []

    def expect_failure(call: Any) -> None:
        try:
            call()
        except MeisaError as error:
            errors.append(error)
        else:
            raise AssertionError("the call should have failed")

    with caplog.at_level(logging.DEBUG):
        for name in ("requests", "urllib3", "flask_meisa"):
            assert logging.getLogger(name).isEnabledFor(logging.DEBUG)
        client.ping()
        client.upsert_contact("ada@example.com", custom_fields={"plan": "pro"})
        client.trigger_email("verify_email", "ada@example.com", variables={"code": "9"})
        emulator.faults.fail_next(5, status=503)
        expect_failure(client.ping)
        emulator.faults.drop_next(5)
        expect_failure(client.ping)
        emulator.faults.set(latency=0.6)
        expect_failure(client.ping)
        emulator.faults.set(latency=0)
        expect_failure(lambda: client.track_event("x", email="nobody@example.com"))
        expect_failure(lambda: client.trigger_email("nope", "ada@example.com"))
        expect_failure(lambda: client.upsert_contact("ada@example.com", source="bogus"))
        with MeisaClient(limited, emulator.url) as narrow:
            expect_failure(lambda: narrow.upsert_contact("ada@example.com"))
        with MeisaClient(secret + "x", emulator.url) as wrong:
            expect_failure(wrong.ping)
        with MeisaClient(secret, "http://127.0.0.1:9/api/v1", retry=FAST) as nowhere:
            expect_failure(nowhere.ping)

    assert len(errors) == 9
    assert any(r.name.startswith("urllib3") for r in caplog.records)
    assert any(r.name == "flask_meisa.client" for r in caplog.records)
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert limited not in record.getMessage()
    for error in errors:
        for text in texts_of(error):
            assert secret not in text
            assert secret[-12:] not in text
            assert limited not in text
            assert "ada@example.com" not in text


@pytest.mark.parametrize("key", ["meisa_live_" + "ech0ed" * 6, "opaque-" + "ech0ed" * 6])
def test_a_key_echoed_in_an_error_body_is_redacted_everywhere(key: str) -> None:
    body = {
        "detail": "Invalid fields.",
        "code": "invalid",
        "errors": {key: ["unknown field"], "email": [f"{key} is not an address"]},
        "echo": [{key: {"deeper": {key: key}}}],
    }

    def refuse(exchange: Exchange) -> None:
        exchange.send(response(400, body))

    with (
        hostile(refuse) as server,
        MeisaClient(key, server.url, retry=RetryPolicy.never()) as meisa,
        pytest.raises(BadRequestError) as info,
    ):
        meisa.upsert_contact("ada@example.com")
    error = info.value
    assert error.field_errors == {
        "[redacted]": ["unknown field"],
        "email": ["[redacted] is not an address"],
    }
    assert error.body["echo"] == [{"[redacted]": {"deeper": {"[redacted]": "[redacted]"}}}]
    once = pickle.loads(pickle.dumps(error))
    twice = pickle.loads(pickle.dumps(once))
    for copy in (error, once, twice):
        assert key.encode() not in pickle.dumps(copy)
        texts = [*texts_of(copy), repr(copy.body), repr(copy.field_errors)]
        for text in texts:
            assert key not in text
    assert (str(twice), twice.body, twice.field_errors) == (
        str(error),
        error.body,
        error.field_errors,
    )


@pytest.mark.parametrize("key", ["meisa_live_" + "ech0ed" * 6, 'quo"te\\' + "ech0ed" * 6])
def test_a_key_echoed_in_a_successful_answer_reaches_no_result(key: str) -> None:
    echo = {"status": "ok", "scopes": [key], "product": {"id": "p1", "name": f"Echo {key}"}}

    def answer(exchange: Exchange) -> None:
        exchange.send(response(200, echo))

    with hostile(answer) as server, MeisaClient(key, server.url) as meisa:
        result = meisa.ping()
    assert (result.scopes, result.product_name) == (("[redacted]",), "Echo [redacted]")
    assert key not in repr(result.raw) and key[-5:] not in repr(result)


ECHOED = "meisa_live_" + "esc4ped" * 5
UNICODE_ESCAPES = "".join(f"\\u{ord(c):04x}" for c in ECHOED)


@pytest.mark.parametrize(
    ("key", "written"),
    [
        (ECHOED, "\\u006d" + ECHOED[1:]),  # "\u006d" is "m" to a JSON parser
        (ECHOED, UNICODE_ESCAPES),
        ("meisa_live_esc4/ped" * 2, "meisa_live_esc4\\/ped" * 2),  # "\/" is "/"
    ],
    ids=["first", "every", "solidus"],
)
def test_a_key_echoed_in_json_escapes_reaches_no_result(key: str, written: str) -> None:
    # The answer's bytes do not spell the key, what they parse to does.
    body = '{"status": "ok", "scopes": ["%s"], "product": {"id": "p1", "name": "Echo %s"}}'
    content = (body % (written, written)).encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(content), content)

    def echo(exchange: Exchange) -> None:
        exchange.send(answer)

    with hostile(echo) as server, MeisaClient(key, server.url) as meisa:
        result = meisa.ping()
    assert (result.scopes, result.product_name) == (("[redacted]",), "Echo [redacted]")
    assert key not in repr(result.raw) and key[-5:] not in repr(result)


def test_connection_errors_chain_nothing(emulator: Any, secret: str) -> None:
    nowhere = "http://127.0.0.1:9/api/v1"
    with (
        MeisaClient(secret, nowhere, retry=RetryPolicy.never()) as meisa,
        pytest.raises(APIConnectionError) as info,
    ):
        meisa.ping()
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert info.value.reason == "connection refused"
    assert str(info.value) == "GET /ping/ failed: connection refused"


def test_a_failed_call_leaves_no_requests_object_in_its_traceback(
    emulator: Any, secret: str
) -> None:
    """Error reporters that capture each frame's locals find nothing holding the headers."""
    never = RetryPolicy.never()
    nowhere = "http://127.0.0.1:9/api/v1"
    raised = []
    for url, key in ((nowhere, secret), (emulator.url, "mk_test_" + "0" * 32)):
        with MeisaClient(key, url, retry=never) as meisa, pytest.raises(MeisaError) as info:
            meisa.ping()
        raised.append(info.value)
    assert [type(error).__name__ for error in raised] == [
        "APIConnectionError",
        "AuthenticationError",
    ]
    held = (requests.Response, requests.PreparedRequest, requests.RequestException)
    for error in raised:
        frame = error.__traceback__
        while frame is not None:
            assert not any(isinstance(v, held) for v in frame.tb_frame.f_locals.values())
            frame = frame.tb_next


def test_an_interruption_while_waiting_to_retry_chains_no_meisa_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Interrupted(Exception):
        pass

    def interrupt(seconds: float) -> None:
        raise Interrupted

    unavailable = response(503, {"detail": "down"}, {"Retry-After": "0"})
    with (
        hostile(lambda exchange: exchange.send(unavailable)) as server,
        MeisaClient("mk_test_" + "0" * 32, f"http://127.0.0.1:{server.port}", retry=FAST) as meisa,
    ):
        monkeypatch.setattr("flask_meisa.client.time.sleep", interrupt)
        with pytest.raises(Interrupted) as info:
            meisa.ping()
    assert info.value.__context__ is None


def test_repr_shows_at_most_the_last_four(emulator: Any, secret: str) -> None:
    with MeisaClient(secret, emulator.url + "//") as meisa:
        text = repr(meisa)
        assert text == f"MeisaClient(base_url={emulator.url!r}, api_key='…{secret[-4:]}')"
        assert repr(meisa.with_options(retry=RetryPolicy.never())) == text
        assert secret[:-4] not in text and secret[-5:] not in text
        assert secret not in str(vars(meisa.retry))
    with MeisaClient("short-key", emulator.url) as short:
        assert "short" not in repr(short) and "-key" not in repr(short)


def test_client_cannot_be_pickled(emulator: Any, secret: str) -> None:
    with MeisaClient(secret, emulator.url) as meisa, pytest.raises(TypeError) as info:
        pickle.dumps(meisa)
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        *(None, 123, b"meisa_live_abc", "", "   ", "meisa live key", "meisa_live_\nx", "clé"),
        *('"meisa_live_abc"', "'meisa_live_abc'"),  # as an env file (Docker's) keeps quotes
    ],
)
def test_bad_keys_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        MeisaClient(bad)
    if isinstance(bad, str) and bad.strip():
        assert bad.strip() not in str(info.value)


def test_key_is_stripped(emulator: Any, secret: str) -> None:
    with MeisaClient(f"  {secret}\n", emulator.url) as meisa:
        assert meisa.ping().environment == "live"


# -- base URL, timeout, policy -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://api.meisa.io/api/v1", "https://api.meisa.io/api/v1"),
        ("https://api.meisa.io/api/v1///", "https://api.meisa.io/api/v1"),
        ("http://127.0.0.1:8000/api/v1/", "http://127.0.0.1:8000/api/v1"),
        ("http://127.9.9.9/api/v1", "http://127.9.9.9/api/v1"),
        ("http://localhost:5000/api/v1", "http://localhost:5000/api/v1"),
        ("http://[::1]:5000/api/v1", "http://[::1]:5000/api/v1"),
    ],
)
def test_base_url_accepted(url: str, normalised: str) -> None:
    with MeisaClient("meisa_live_" + "a" * 32, url) as meisa:
        assert meisa.base_url == normalised


@pytest.mark.parametrize(
    "url",
    [
        "http://api.meisa.io/api/v1",
        "http://10.0.0.5/api/v1",
        "http://128.0.0.1/api/v1",
        "http://localhost.example.com/api/v1",
        "ftp://api.meisa.io/api/v1",
        "api.meisa.io/api/v1",
        "https:///api/v1",
        "https://user:pw@api.meisa.io/api/v1",
        "https://api.meisa.io/api/v1?x=1",
        "https://api.meisa.io:99999/api/v1",
        "",
        None,
    ],
)
def test_base_url_refused(url: Any) -> None:
    with pytest.raises(ConfigurationError):
        MeisaClient("meisa_live_" + "a" * 32, url)


@pytest.mark.parametrize(
    "timeout", [0, -1, math.nan, math.inf, (1.0,), (1.0, 0), "5", True, 1e20, (1.0, 1e300)]
)
def test_bad_timeout_refused(timeout: Any) -> None:
    with pytest.raises(ConfigurationError):
        MeisaClient("meisa_live_" + "a" * 32, timeout=timeout)


def test_timeout_forms() -> None:
    key = "meisa_live_" + "a" * 32
    with MeisaClient(key, timeout=5) as meisa:
        assert meisa.timeout == (5.0, 5.0)
        assert meisa.with_options(timeout=(1, 2)).timeout == (1.0, 2.0)
        assert meisa.timeout == (5.0, 5.0)
    with MeisaClient(key) as meisa:
        assert meisa.timeout == (3.05, 10.0)
        assert meisa.retry == RetryPolicy()


def test_bad_retry_and_session_refused() -> None:
    key = "meisa_live_" + "a" * 32
    with pytest.raises(ConfigurationError):
        MeisaClient(key, retry=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        MeisaClient(key, session=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("pool_size", [0, -1, 1.5, True, "4", None])
def test_bad_pool_size_refused(pool_size: Any) -> None:
    with pytest.raises(ConfigurationError, match="pool_size must be an integer >= 1"):
        MeisaClient("meisa_live_" + "a" * 32, pool_size=pool_size)


@pytest.mark.parametrize("body", [{"detail": "bad", "code": "invalid"}, {"errors": ["email"]}])
def test_a_400_without_an_errors_object_has_no_field_errors(body: Any) -> None:
    def refuse(exchange: Exchange) -> None:
        exchange.send(response(400, body))

    with (
        hostile(refuse) as server,
        MeisaClient("meisa_live_" + "a" * 32, server.url, retry=RetryPolicy.never()) as meisa,
        pytest.raises(BadRequestError) as info,
    ):
        meisa.upsert_contact("ada@example.com")
    assert info.value.status == 400
    assert info.value.field_errors == {}


# -- sessions --------------------------------------------------------------------------


def test_copies_share_the_session_and_only_the_original_closes_it(
    emulator: Any, secret: str
) -> None:
    meisa = MeisaClient(secret, emulator.url)
    single = meisa.with_options(retry=RetryPolicy.never())
    single.ping()
    single.close()
    assert meisa.ping().environment == "live"  # still open
    meisa.close()
    with pytest.raises(MeisaError, match="closed"):
        single.ping()


def test_a_given_session_is_used_and_left_open(emulator: Any, secret: str) -> None:
    with requests.Session() as session:
        with MeisaClient(secret, emulator.url, session=session) as meisa:
            meisa.ping()
        response = session.get(emulator.url + "/ping/", headers={"X-API-Key": secret})
        assert response.status_code == 200


# -- validation before any request -----------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.upsert_contact("not-an-email"), "email"),
        (lambda c: c.upsert_contact("a@x.io", external_id=True), "external_id"),
        (lambda c: c.upsert_contact("a@x.io", external_id=""), "external_id"),
        (lambda c: c.upsert_contact("a@x.io", custom_fields={"s": {1}}), "custom_fields.s"),
        (lambda c: c.upsert_contact("a@x.io", custom_fields={"n": math.nan}), "custom_fields.n"),
        (lambda c: c.upsert_contact("a@x.io", custom_fields=["x"]), "custom_fields"),
        (lambda c: c.upsert_contact("a@x.io", tag_names="vip"), "tag_names"),
        (lambda c: c.upsert_contact("a@x.io", first_name="A\r\nB"), "first_name"),
        (
            lambda c: c.upsert_contact("a@x.io", custom_fields={"b": "x" * MAX_BODY_BYTES}),
            "custom_fields",
        ),
        (lambda c: c.track_event("opened"), "email"),
        (lambda c: c.track_event("", email="a@x.io"), "event_name"),
        (lambda c: c.track_event("x", email="a@x.io", properties={"t": b"x"}), "properties.t"),
        (lambda c: c.add_tag("id"), "tag_name"),
        (lambda c: c.add_tag("id", tag_name="a", tag_id="b"), "tag_name"),
        (lambda c: c.add_tag("", tag_name="a"), "contact_id"),
        (lambda c: c.enroll("a@x.io", " "), "sequence_slug"),
        (lambda c: c.enroll("a@x.io", "s", override_unsubscribe="yes"), "override_unsubscribe"),
        (lambda c: c.enroll("a@x.io", "s", metadata={"d": object()}), "metadata.d"),
        (
            lambda c: c.bulk_enroll("s", [f"u{i}@x.io" for i in range(600)] + ["bad"]),
            "emails[600]",
        ),
        (lambda c: c.bulk_enroll("s", "a@x.io"), "emails"),
        (lambda c: c.list_sequences(status="a\nb"), "status"),
        (lambda c: c.contact_enrollments("nope"), "email"),
        (lambda c: c.trigger_email("", "a@x.io"), "trigger_key"),
        (lambda c: c.trigger_email("t", "a@x.io, b@x.io"), "to_email"),
        (lambda c: c.trigger_email("t", "a@x.io", recipient="a@x.io"), "recipient"),
        (lambda c: c.trigger_email("t", "a@x.io", variables={"when": {1, 2}}), "variables.when"),
        (lambda c: c.trigger_email("t", "a@x.io", idempotency_key=" "), "idempotency_key"),
    ],
)
def test_validation_makes_no_request(
    client: MeisaClient, emulator: Any, call: Any, field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        call(client)
    assert info.value.field == field
    assert emulator.requests == []


# -- error text from unusual answers ---------------------------------------------------


def answer(
    status: int, content: bytes, content_type: str = "application/json"
) -> tuple[requests.Response, bytes]:
    """An answer's head and its body, as an attempt has read them."""
    response = requests.Response()
    response.status_code = status
    response.headers["Content-Type"] = content_type
    response.reason = "Bad Gateway" if status == 502 else "Error"
    return response, content


def test_non_json_error_gets_a_short_clean_excerpt() -> None:
    page = b"<html><body><h1>502 Bad Gateway</h1>" + b"<p>nginx</p>" * 100 + b"</body></html>"
    error = errors._api_error("POST /contacts/upsert/", *answer(502, page, "text/html"), "k")
    assert error.message.startswith("non-JSON answer: 502 Bad Gateway nginx")
    assert len(error.message) <= len("non-JSON answer: ") + errors.MAX_EXCERPT
    assert "<" not in error.message
    assert error.body is None


def test_a_non_json_error_with_no_text_but_tags_keeps_the_status_reason() -> None:
    page = b"<html><body>\n  <br/>  </body></html>"
    error = errors._api_error("POST /contacts/upsert/", *answer(502, page, "text/html"), "k")
    assert error.message == "Bad Gateway"
    assert error.body is None


def test_an_error_answer_too_large_to_read_is_excerpted_not_parsed() -> None:
    # 32 MiB of "[{},{},...]" in a 500 took 1.6 GB and 9 s to parse and clean.
    huge = b"[" + b"{}," * 2**20 + b"{}]"  # 3 MiB
    error = errors._api_error("POST /emails/trigger/", *answer(500, huge), "k")
    assert error.body is None
    assert error.message.startswith("oversized answer: [{},{},")
    fits = b'{"detail": "busy", "pad": "' + b" " * 200_000 + b'"}'
    assert errors._api_error("POST /emails/trigger/", *answer(500, fits), "k").message == "busy"


def test_echoed_key_and_addresses_are_redacted() -> None:
    key = "meisa_live_" + "f" * 32
    body = (
        b'{"detail": "Key meisa_live_' + b"f" * 32 + b' cannot email ada@example.com",'
        b' "code": "nope", "errors": {"to_email": ["ada@example.com is bad"]}}'
    )
    error = errors._api_error("POST /emails/trigger/", *answer(400, body), key)
    assert isinstance(error, BadRequestError)
    assert error.message == "Key [redacted] cannot email [email]"
    assert error.field_errors == {"to_email": ["[email] is bad"]}
    assert key not in repr(vars(error))


def test_empty_or_odd_error_bodies() -> None:
    assert errors._api_error("GET /ping/", *answer(502, b""), "k").message == "Bad Gateway"
    listed = errors._api_error("GET /ping/", *answer(500, b'{"detail": ["a", "b"]}'), "k")
    assert listed.message == '["a", "b"]'
    assert errors._api_error("GET /ping/", *answer(500, b"[1, 2]"), "k").message == "Error"
    long = errors._api_error("GET /ping/", *answer(500, b'{"detail": "' + b"x" * 999 + b'"}'), "k")
    assert len(long.message) == errors.MAX_MESSAGE
    assert long.message.endswith("…")


def test_the_environment_proxy_carries_calls_unless_no_proxy_names_the_host(
    emulator: Any, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client reads the proxy variables once per session, as requests would per call.
    answer = response(200, {"id": "c-1", "email": "a@example.com"})
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with hostile(lambda exchange: exchange.send(answer)) as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        with MeisaClient(secret, emulator.url) as meisa:
            assert meisa.upsert_contact(email="a@example.com").email == "a@example.com"
        # A proxy is asked for the absolute URL.
        assert proxy.requests == [("POST", f"{emulator.url}/contacts/upsert/")]
        assert emulator.contact(email="a@example.com") is None
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        with MeisaClient(secret, emulator.url) as meisa:
            meisa.upsert_contact(email="b@example.com")
        assert len(proxy.requests) == 1
    assert emulator.contact(email="b@example.com") is not None


def test_the_environment_ca_bundle_is_used(
    secret: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    def failure() -> str:
        with (
            MeisaClient(secret, "https://127.0.0.1:9/api/v1", retry=FAST) as meisa,
            pytest.raises(APIConnectionError) as caught,
        ):
            meisa.ping()
        return str(caught.value)

    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    assert "request not sent" not in failure()  # it tried to connect
    # A bundle that does not exist stops the call before any connection.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    assert "request not sent (OSError)" in failure()
