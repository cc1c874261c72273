"""Answers malformed on the wire (their head, their encoding): what the call raises, and
whether it retries a send, with the same idempotency key, where a retry could help."""

from __future__ import annotations

import gzip
import json
import math
import socket
import threading
import time
from email.utils import formatdate
from typing import Any

import pytest

from flask_meisa._http import MAX_ANSWER_BYTES
from flask_meisa._http import MAX_LIST_BYTES
from flask_meisa.client import MeisaClient
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import APIError
from flask_meisa.errors import RateLimitError
from flask_meisa.retry import RetryPolicy
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response

KEY = "meisa_live_" + "m4lf0rmd" * 4
SENT = {"status": "sent", "email_send_id": "e-1", "contact_id": "c-1", "contact_created": False}
POLICY = RetryPolicy(base_delay=0.01, deadline=3.0)
TIMEOUT = (1.0, 2.0)


def first_then_sent(first: bytes) -> Any:
    """An answer that is ``first`` for the first request and a whole 200 after it."""

    def answer(exchange: Exchange) -> None:
        again = len(exchange.server.requests) > 1
        exchange.send(response(200, {**SENT, "duplicate": True}) if again else first)

    return answer


def keys(bodies: list[bytes]) -> list[str]:
    return [json.loads(body)["idempotency_key"] for body in bodies]


BODY = json.dumps(SENT).encode()
MALFORMED = {
    # urllib3 refuses a length it cannot trust (response splitting) after the send.
    "two_lengths": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), len(BODY) + 1, BODY),
    # http.client skips a 100 Continue only: any other 1xx came back as the answer.
    "early_hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + response(200, SENT),
    "processing": b"HTTP/1.1 102 Processing\r\n\r\n" + response(200, SENT),
}


@pytest.mark.parametrize("first", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_send_whose_answer_is_malformed_is_retried_with_its_key(first: bytes) -> None:
    with (
        hostile(first_then_sent(first)) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=POLICY) as meisa,
    ):
        result = meisa.trigger_email("verify_email", "ada@example.com")
    assert (result.status, result.email_send_id) == ("sent", "e-1")
    assert len(server.requests) == 2
    assert keys(server.bodies) == [result.idempotency_key] * 2


def test_a_connection_that_carried_an_informational_answer_is_not_used_again() -> None:
    # The final answer of a request answered 103 may still come on its connection: read
    # there, it is taken for the answer of whatever request that connection carries next
    # (another thread's, during the retry's backoff).
    first: list[socket.socket] = []

    def answer(exchange: Exchange) -> None:
        if not first:
            first.append(exchange.sock)
            exchange.send(b"HTTP/1.1 103 Early Hints\r\n\r\n")
            return
        if exchange.sock is first[0]:  # the first request's answer, late
            exchange.send(response(200, {**SENT, "email_send_id": "e-late"}))
        exchange.send(response(200, {**SENT, "duplicate": True}))

    with (
        hostile(answer) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=POLICY) as meisa,
    ):
        result = meisa.trigger_email("verify_email", "ada@example.com")
    assert result.duplicate  # the retry's own answer
    assert server.connections == 2


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (MALFORMED["two_lengths"], "the answer's head was malformed"),
        (MALFORMED["early_hints"], "only an informational answer (103)"),
    ],
    ids=["two_lengths", "early_hints"],
)
def test_a_malformed_answer_is_not_called_unsent_nor_final(first: bytes, reason: str) -> None:
    with (
        hostile(lambda exchange: exchange.send(first)) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=RetryPolicy.never()) as meisa,
        pytest.raises(APIConnectionError) as caught,
    ):
        meisa.trigger_email("verify_email", "ada@example.com")
    assert caught.value.reason == reason
    assert caught.value.retryable


def test_a_length_of_no_decimal_digits_is_read_to_the_close() -> None:
    # "²" (latin-1, as header values are read) is a digit to str.isdigit, not to int().
    def answer(exchange: Exchange) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\nConnection: close\r\n\r\n"
        exchange.send(head.encode("latin-1") + BODY)
        exchange.sock.shutdown(socket.SHUT_WR)

    with (
        hostile(answer) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=RetryPolicy.never()) as meisa,
    ):
        assert meisa.trigger_email("verify_email", "ada@example.com").status == "sent"


def gzip_bomb(layers: int) -> bytes:
    """Gzip of 1 GiB of zeros (members of 1 MiB each, concatenated), gzipped again
    ``layers - 1`` times: about 1 MiB, or 2 KiB from two layers on."""
    bomb = gzip.compress(b"\0" * 2**20, 9) * 1024
    for _ in range(layers - 1):
        bomb = gzip.compress(bomb, 9)
    return bomb


@pytest.mark.parametrize("layers", [1, 2])
def test_a_gzip_bomb_stops_at_the_size_limit_at_once(layers: int) -> None:
    bomb = gzip_bomb(layers)
    encoding = ", ".join(["gzip"] * layers)
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(bomb)}"

    def answer(exchange: Exchange) -> None:
        exchange.send(head.encode() + b"\r\n\r\n" + bomb)

    with (
        hostile(answer) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=POLICY) as meisa,
    ):
        started = time.monotonic()
        with pytest.raises(APIConnectionError) as caught:
            meisa.unsubscribed_emails()
        elapsed = time.monotonic() - started
    # Decoding what a short read brings is not bounded by any socket's timeout.
    assert elapsed < 2.0, f"decoding took {elapsed:.1f} s"
    assert caught.value.reason == f"the answer is larger than {MAX_LIST_BYTES // 2**20} MiB"
    assert len(server.requests) == 1


def test_only_the_suppression_list_may_answer_more_than_the_answer_limit() -> None:
    # A million addresses take about 25 MiB; a hostile answer of that size to any other
    # call would take 25 times as much memory to parse.
    emails = [f"user{n}@example.com" for n in range(MAX_ANSWER_BYTES // 16)]
    listed = {"as_of": "2026-01-01T00:00:00Z", "count": len(emails), "emails": emails}
    big = {**SENT, "padding": "x" * MAX_ANSWER_BYTES}

    def answer(exchange: Exchange) -> None:
        exchange.send(response(200, listed if "unsubscribed" in exchange.path else big))

    with (
        hostile(answer) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=POLICY) as meisa,
    ):
        assert len(meisa.unsubscribed_emails().emails) == len(emails)
        with pytest.raises(APIConnectionError) as caught:
            meisa.trigger_email("welcome", "ada@example.com")
    assert caught.value.reason == f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB"
    assert not caught.value.retryable


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_points_at_the_base_url(status: int) -> None:
    # A wrong MEISA_BASE_URL (http:// for https://, a missing /api/v1) often answers so.
    moved = response(status, {}, {"Location": "https://elsewhere.example/api/v1/"})
    with (
        hostile(lambda exchange: exchange.send(moved)) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=POLICY) as meisa,
        pytest.raises(APIError) as raised,
    ):
        meisa.ping()
    assert raised.value.status == status
    assert "check MEISA_BASE_URL" in str(raised.value)
    assert len(server.requests) == 1  # not retried, not followed


def test_a_retry_after_date_is_read_against_the_answers_own_date() -> None:
    # A proxy whose clock is a day behind asks for 2 s by date: not "now" for this host.
    day_ago = time.time() - 86400
    head = {
        "Date": formatdate(day_ago, usegmt=True),
        "Retry-After": formatdate(day_ago + 2, usegmt=True),
    }
    limited = response(429, {"detail": "slow down"}, head)
    once = RetryPolicy(max_attempts=1)
    with (
        hostile(lambda exchange: exchange.send(limited)) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=once) as meisa,
        pytest.raises(APIError) as info,
    ):
        meisa.ping()
    assert info.value.retry_after == 2.0


def test_a_retry_after_of_more_digits_than_a_float_holds_is_the_longest_wait() -> None:
    # float() of 400 nines is infinity, which no whole number of seconds is.
    limited = response(429, {"detail": "slow down"}, {"Retry-After": "9" * 400})
    with (
        hostile(lambda exchange: exchange.send(limited)) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=RetryPolicy.never()) as meisa,
        pytest.raises(RateLimitError) as info,
    ):
        meisa.ping()
    assert info.value.retry_after == math.ceil(threading.TIMEOUT_MAX)
