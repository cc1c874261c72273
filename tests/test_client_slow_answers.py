"""Answers that trickle in, stall or never end: every attempt has a total time limit and
a size limit, however the bytes arrive."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._http import MAX_ANSWER_BYTES
from flask_meisa.client import MeisaClient
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import APITimeoutError
from flask_meisa.retry import RetryPolicy
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response

Answer = Callable[[Exchange], None]

KEY = "meisa_live_" + "s1owDr1p" * 4
SUPPRESSIONS = "/api/v1/contacts/api/unsubscribed-emails/"
TRIGGER = "/api/v1/emails/trigger/"
SENT = {"status": "sent", "email_send_id": "e-1", "contact_id": "c-1", "contact_created": False}
#: (connect, read) seconds, the retry deadline, and what a call may take at most.
TIMEOUT = (1.0, 2.0)
DEADLINE = 3.0
BOUND = DEADLINE + TIMEOUT[0] + 1.0


def head(extra: str) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}\r\n\r\n".encode()


def answered_list(exchange: Exchange) -> bool:
    """Answer the suppression list at once (an empty one); the rest is left to the test."""
    if exchange.method == "GET" and exchange.path == SUPPRESSIONS:
        exchange.send(response(200, {"as_of": "2026-01-01T00:00:00Z", "count": 0, "emails": []}))
        return True
    return False


def drip_status_line(exchange: Exchange) -> None:
    if not answered_list(exchange):
        exchange.drip(response(200, SENT))


def drip_body(exchange: Exchange) -> None:
    body = json.dumps(SENT).encode().ljust(150)
    exchange.send(head(f"Content-Length: {len(body)}"))
    exchange.drip(body)


def short_body_then_stall(exchange: Exchange) -> None:
    exchange.send(head("Content-Length: 1000") + b'{"status": ')
    exchange.stall()


def endless_chunked_body(exchange: Exchange) -> None:
    exchange.send(head("Transfer-Encoding: chunked"))
    while not exchange.server.stopped.wait(0.05):
        exchange.send(b"40\r\n" + b" " * 64 + b"\r\n")


def endless_fast_chunked_body(exchange: Exchange) -> None:
    exchange.send(head("Transfer-Encoding: chunked"))
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    while not exchange.server.stopped.is_set():
        exchange.send(chunk)


def huge_content_length(exchange: Exchange) -> None:
    exchange.send(head(f"Content-Length: {10**12}") + b"{")
    exchange.stall()


def timed_trigger(meisa: MeisaClient) -> tuple[float, BaseException]:
    started = time.monotonic()
    with pytest.raises(APIConnectionError) as info:
        meisa.trigger_email("verify_email", "ada@example.com")
    return time.monotonic() - started, info.value


@pytest.mark.parametrize(
    "answer",
    [drip_status_line, drip_body, short_body_then_stall, endless_chunked_body],
    ids=lambda answer: answer.__name__,
)
def test_a_slow_answer_ends_within_the_deadline(answer: Answer) -> None:
    policy = RetryPolicy(deadline=DEADLINE)
    with (
        hostile(answer) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=policy) as meisa,
    ):
        elapsed, error = timed_trigger(meisa)
    assert elapsed <= BOUND, f"{answer} kept the call {elapsed:.1f} s"
    assert isinstance(error, APITimeoutError)
    assert error.retryable
    assert server.requests[0] == ("POST", TRIGGER)
    if answer is not short_body_then_stall:  # that one meets the per-read timeout first
        assert error.reason == "no complete answer within 3 s"


def test_without_a_deadline_an_attempt_lasts_its_two_timeouts_at_most() -> None:
    policy = RetryPolicy(deadline=None, max_attempts=1)
    with (
        hostile(endless_chunked_body) as server,
        MeisaClient(KEY, server.url, timeout=(0.5, 1.0), retry=policy) as meisa,
    ):
        elapsed, error = timed_trigger(meisa)
    assert isinstance(error, APITimeoutError)
    assert error.reason == "no complete answer within 1.5 s"
    assert 1.5 <= elapsed < 3.0, elapsed


def drip_fast(exchange: Exchange) -> None:
    """A whole answer in 6 s: each byte within the read timeout of 0.5 s."""
    body = json.dumps(SENT).encode().ljust(60)
    exchange.send(head(f"Content-Length: {len(body)}"))
    exchange.drip(body, every=0.1)


def test_an_attempt_longer_than_any_wait_leaves_the_watchdog_cutting_the_others() -> None:
    # Without a deadline an attempt may take both timeouts, together past the longest wait
    # of a lock: the watchdog waiting for it must not end, and every later cut with it.
    longest = (threading.TIMEOUT_MAX, threading.TIMEOUT_MAX)
    arrived = threading.Event()

    def stall(exchange: Exchange) -> None:
        arrived.set()
        exchange.stall()

    def long_call(meisa: MeisaClient) -> None:
        with pytest.raises(APIConnectionError):
            meisa.ping()

    forever = RetryPolicy(deadline=None, max_attempts=1)
    with (
        hostile(stall) as stalled,
        MeisaClient(KEY, stalled.url, timeout=longest, retry=forever) as slow,
    ):
        caller = threading.Thread(target=long_call, args=(slow,))
        caller.start()
        assert arrived.wait(10)
        with hostile(drip_fast) as server:
            for _ in range(2):  # the watchdog looks at the long attempt alone after the first
                with MeisaClient(KEY, server.url, timeout=(0.5, 0.5), retry=forever) as meisa:
                    elapsed, error = timed_trigger(meisa)
                assert isinstance(error, APITimeoutError), error
                assert elapsed < 3.0, elapsed
    caller.join(10)
    assert not caller.is_alive()


@pytest.mark.parametrize(
    "answer", [endless_fast_chunked_body, huge_content_length], ids=lambda a: a.__name__
)
def test_an_answer_past_the_size_limit_fails_without_a_retry(answer: Answer) -> None:
    policy = RetryPolicy(base_delay=0.01, deadline=10.0)
    with (
        hostile(answer) as server,
        MeisaClient(KEY, server.url, timeout=TIMEOUT, retry=policy) as meisa,
    ):
        _, error = timed_trigger(meisa)
    assert type(error) is APIConnectionError
    assert error.reason == f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB"
    assert not error.retryable
    assert server.requests == [("POST", TRIGGER)]


def test_a_whole_answer_leaves_its_connection_for_the_next_call() -> None:
    def sent(exchange: Exchange) -> None:
        body = json.dumps(SENT).encode()
        exchange.send(head(f"Content-Length: {len(body)}") + body)

    policy = RetryPolicy.never()
    with hostile(sent) as server, MeisaClient(KEY, server.url, retry=policy) as meisa:
        for _ in range(3):
            assert meisa.trigger_email("verify_email", "ada@example.com").status == "sent"
    assert (len(server.requests), server.connections) == (3, 1)


def test_a_synchronous_send_ends_within_the_send_deadline() -> None:
    with hostile(drip_status_line) as server:
        app = Flask(__name__)
        app.config.update(
            MEISA_DELIVERY="sync",
            MEISA_SEND_DEADLINE=DEADLINE,
            MEISA_TIMEOUT=TIMEOUT[1],
            MEISA_CONNECT_TIMEOUT=TIMEOUT[0],
            MEISA_BASE_URL=server.url,
            MEISA_API_KEY=KEY,
            MEISA_SUPPRESS_SEND=False,
        )
        meisa = Meisa(app)
        try:
            with app.app_context():
                started = time.monotonic()
                with pytest.raises(APITimeoutError) as info:
                    meisa.send("verify_email", "ada@example.com")
                elapsed = time.monotonic() - started
        finally:
            meisa.state(app).close(5.0)
    assert elapsed <= BOUND, f"the send took {elapsed:.1f} s"
    assert info.value.retryable
    assert server.requests == [("GET", SUPPRESSIONS), ("POST", TRIGGER)]


FORKED_CALL = textwrap.dedent(
    """
    import os, sys, time
    from flask_meisa.client import MeisaClient
    from flask_meisa.errors import APITimeoutError
    from flask_meisa.retry import RetryPolicy

    meisa = MeisaClient(sys.argv[1], sys.argv[2], timeout=(1.0, 2.0),
                        retry=RetryPolicy(deadline=1.0))

    def timed():
        started = time.monotonic()
        try:
            meisa.trigger_email("verify_email", "ada@example.com")
        except APITimeoutError:
            return time.monotonic() - started
        return None

    parent = timed()  # the parent's watchdog runs from here on
    pid = os.fork()
    if pid == 0:
        print("child", timed(), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("parent", parent, flush=True)
    """
)


def test_a_forked_child_has_its_own_watchdog() -> None:
    with hostile(drip_status_line) as server:
        done = subprocess.run(
            [sys.executable, "-c", FORKED_CALL, KEY, server.url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    times = dict(line.split() for line in done.stdout.splitlines())
    assert set(times) == {"parent", "child"}, done.stdout
    for who, elapsed in times.items():
        assert elapsed != "None", f"the {who}'s call was not cut"
        assert float(elapsed) <= 1.0 + TIMEOUT[0] + 1.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_session_of_its_own_from_the_one_fork_hook() -> None:
    client = MeisaClient(KEY, "http://127.0.0.1:9")
    parent = client._http.session()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: no parent's sockets (nor a lock its thread held)
        os._exit(0 if client._http.session() is not parent else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client._http.session() is parent
    client.close()


def test_a_name_that_resolves_slowly_ends_the_call_within_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A resolver that does not answer (5 s a try is the usual resolver timeout): a socket
    # timeout never bounds the name's resolution.
    resolve, answered = socket.getaddrinfo, threading.Event()

    def stuck(host: str, *args: Any, **kwargs: Any) -> Any:
        answered.wait(10.0)
        return resolve(host, *args, **kwargs)

    def sent(exchange: Exchange) -> None:
        exchange.send(response(200, SENT))

    policy = RetryPolicy(deadline=DEADLINE)
    with hostile(sent) as server:
        url = server.url.replace("127.0.0.1", "localhost")
        with MeisaClient(KEY, url, timeout=TIMEOUT, retry=policy) as meisa:
            monkeypatch.setattr(socket, "getaddrinfo", stuck)
            elapsed, error = timed_trigger(meisa)
            answered.set()
            assert meisa.trigger_email("verify_email", "ada@example.com").status == "sent"
    assert elapsed <= BOUND, f"resolving the name kept the call {elapsed:.1f} s"
    assert isinstance(error, APITimeoutError)
    assert not error.sent  # nothing reached the server
    assert error.reason.startswith("no connection within")
    assert server.requests == [("POST", TRIGGER)]
