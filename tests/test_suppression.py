"""The TTL-cached suppression set, against a plain fetch function and a fake clock."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flask_meisa import _suppression as suppression
from flask_meisa._suppression import SuppressionSet
from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.errors import APIConnectionError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import ValidationError
from flask_meisa.retry import RetryPolicy
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response

TTL = 300.0
RETRY = 30.0
REFRESH_THREAD = "flask-meisa-suppression-refresh"
WAIT = 5.0  # upper bound for waits that should end at once; never reached when passing

MakeSet = Callable[..., SuppressionSet]


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Snapshot:
    emails: frozenset[str]
    as_of: str | None


class Source:
    """A stand-in for Meisa's list: counts fetches, can block on a gate, can fail."""

    def __init__(self, *emails: str, as_of: str = "2025-01-01T00:00:00Z") -> None:
        self.emails = frozenset(emails)
        self.as_of = as_of
        self.error: Exception | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def block(self) -> threading.Event:
        self.gate = threading.Event()
        self.started.clear()
        return self.gate

    def __call__(self) -> Snapshot:
        with self._lock:
            self.calls += 1
        self.started.set()
        if self.gate is not None and not self.gate.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        if self.error is not None:
            raise self.error
        return Snapshot(self.emails, self.as_of)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def source() -> Iterator[Source]:
    src = Source("Alice@Example.com", " bob@example.com ")
    yield src
    if src.gate is not None:
        src.gate.set()


@pytest.fixture
def make_set(clock: FakeClock) -> Iterator[MakeSet]:
    made: list[SuppressionSet] = []

    class Tracked(SuppressionSet):
        def __init__(self, fetch: Callable[[], Snapshot], **kwargs: Any) -> None:
            kwargs.setdefault("ttl", TTL)
            kwargs.setdefault("retry_interval", RETRY)
            kwargs.setdefault("clock", clock)
            super().__init__(fetch, **kwargs)
            made.append(self)

    yield Tracked
    for s in made:
        s.close()


def test_first_use_loads_once_for_concurrent_callers(make_set: MakeSet, source: Source) -> None:
    gate = source.block()
    s = make_set(source)
    callers = 8
    start = threading.Barrier(callers + 1)
    answers: list[bool] = []

    def caller() -> None:
        start.wait(WAIT)
        answers.append(s.is_suppressed("alice@example.com"))

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    start.wait(WAIT)
    assert source.started.wait(WAIT)
    assert answers == []  # everyone is waiting on the one load
    gate.set()
    for t in threads:
        t.join(WAIT)
    assert answers == [True] * callers
    assert source.calls == 1
    assert s.loaded and s.count == 2


def test_answers_ignore_case_and_surrounding_space(make_set: MakeSet, source: Source) -> None:
    s = make_set(source)
    assert s.is_suppressed("alice@example.com")
    assert s.is_suppressed("  ALICE@EXAMPLE.COM\n")
    assert s.is_suppressed("Bob@Example.Com")
    assert not s.is_suppressed("carol@example.com")
    assert source.calls == 1


@pytest.mark.parametrize("bad", [None, 42, b"alice@example.com", ["a@b.c"], "", "   "])
def test_invalid_input_is_a_validation_error(
    make_set: MakeSet, source: Source, bad: object
) -> None:
    s = make_set(source)
    with pytest.raises(ValidationError) as info:
        s.is_suppressed(bad)  # type: ignore[arg-type]
    assert info.value.field == "email"
    with pytest.raises(ValidationError):
        s.add(bad)  # type: ignore[arg-type]
    assert source.calls == 0


def test_fresh_set_is_not_fetched_again(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    s = make_set(source)
    assert s.is_suppressed("alice@example.com")
    clock.advance(TTL - 1)
    assert s.is_suppressed("alice@example.com")
    assert s.wait_for_refresh(0)
    assert source.calls == 1
    assert s.age == TTL - 1


def test_stale_set_refreshes_in_background_while_callers_get_answers(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    s = make_set(source)
    assert s.load()
    source.emails = frozenset({"carol@example.com"})
    source.as_of = "2025-01-02T00:00:00Z"
    gate = source.block()
    clock.advance(TTL)

    # The refresh is blocked inside fetch, yet the caller is answered from the old set.
    assert s.is_suppressed("alice@example.com")
    assert source.started.wait(WAIT)
    assert not s.wait_for_refresh(0)
    assert not s.is_suppressed("carol@example.com")
    assert not s.refresh_in_background()  # at most one at a time
    assert source.calls == 2

    gate.set()
    assert s.wait_for_refresh(WAIT)
    assert s.is_suppressed("carol@example.com")
    assert not s.is_suppressed("alice@example.com")
    assert s.as_of == "2025-01-02T00:00:00Z"
    assert s.age == 0
    assert source.calls == 2


def test_failed_refresh_keeps_the_old_set_and_logs(
    make_set: MakeSet, source: Source, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    s = make_set(source)
    assert s.load()
    source.error = APIConnectionError("GET /contacts/api/unsubscribed-emails/", "refused")
    clock.advance(TTL + 5)
    with caplog.at_level(logging.WARNING, logger="flask_meisa.suppression"):
        assert s.is_suppressed("alice@example.com")
        assert s.wait_for_refresh(WAIT)
    assert source.calls == 2
    assert s.is_suppressed("alice@example.com")
    assert s.count == 2
    assert s.as_of == "2025-01-01T00:00:00Z"
    assert s.age == TTL + 5
    assert s.last_error is not None and "refused" in s.last_error
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "refresh failed" in record.getMessage()
    assert "@" not in record.getMessage()


def test_failed_refresh_is_retried_after_retry_interval(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    s = make_set(source)
    assert s.load()
    source.error = RuntimeError("down")
    clock.advance(TTL)
    s.is_suppressed("alice@example.com")
    assert s.wait_for_refresh(WAIT)
    assert source.calls == 2

    clock.advance(RETRY - 1)
    s.is_suppressed("alice@example.com")
    assert s.wait_for_refresh(WAIT)
    assert source.calls == 2

    source.error = None
    source.emails = frozenset({"dave@example.com"})
    clock.advance(1)
    assert s.is_suppressed("alice@example.com")  # answered from the old set
    assert s.wait_for_refresh(WAIT)
    assert source.calls == 3
    assert s.is_suppressed("dave@example.com")
    assert s.last_error is None


def test_failed_first_load_fails_open_without_waiting_again(
    make_set: MakeSet, source: Source, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    source.error = APIConnectionError("GET /contacts/api/unsubscribed-emails/", "timed out")
    s = make_set(source)
    with caplog.at_level(logging.WARNING, logger="flask_meisa.suppression"):
        assert not s.is_suppressed("alice@example.com")
    assert source.calls == 1
    assert (s.loaded, s.age, s.count) == (False, None, 0)
    [record] = caplog.records
    assert "could not be loaded" in record.getMessage()
    assert "@" not in record.getMessage()

    # Within retry_interval nobody fetches (so no sender waits on a down Meisa).
    clock.advance(RETRY - 1)
    assert not s.is_suppressed("alice@example.com")
    assert source.calls == 1

    source.error = None
    clock.advance(1)
    assert s.is_suppressed("alice@example.com")
    assert source.calls == 2
    assert s.loaded and s.last_error is None


def test_unreadable_answers_fail_like_errors(make_set: MakeSet, clock: FakeClock) -> None:
    answers: list[object] = [
        None,
        Snapshot("alice@example.com", None),  # type: ignore[arg-type]
        Snapshot(42, None),  # type: ignore[arg-type]
    ]

    def fetch() -> Snapshot:
        return answers.pop(0)  # type: ignore[return-value]

    s = make_set(fetch)
    assert not s.load()
    assert s.last_error == "the answer has no emails or as_of"
    for _ in range(2):
        assert not s.load()
        assert s.last_error == "the answer's emails is not a collection of addresses"
    assert not s.loaded


def test_any_iterable_of_addresses_is_read_once(make_set: MakeSet) -> None:
    def fetch() -> Snapshot:
        entries = iter(["Ann@B.C", 7, " bo@b.c "])
        return Snapshot(entries, None)  # type: ignore[arg-type]

    s = make_set(fetch)
    assert s.load()
    assert s.count == 2
    assert s.is_suppressed("ann@b.c") and s.is_suppressed("BO@B.C")


def test_entries_that_are_not_addresses_are_skipped(make_set: MakeSet) -> None:
    def fetch() -> Snapshot:
        return Snapshot(frozenset({"A@B.C", "", "  ", 7}), 20250101)  # type: ignore[arg-type]

    s = make_set(fetch)
    assert s.load()
    assert s.count == 1
    assert s.is_suppressed("a@b.c")
    assert s.as_of == "20250101"


@pytest.mark.parametrize(
    "emails",
    [
        frozenset({"Ann@B.C", "bo@b.c"}),  # unpadded, not all lowercase
        frozenset({"ann@b.c", " bo@b.c"}),  # lowercase, not all unpadded
        ["ann@b.c", "bo@b.c", "ann@b.c"],  # lowercase and unpadded, not a set
    ],
)
def test_a_list_of_addresses_is_read_in_any_case_without_padding_or_repeats(
    make_set: MakeSet, emails: Collection[str]
) -> None:
    s = make_set(lambda: Snapshot(emails, None))  # type: ignore[arg-type]
    assert s.load()
    assert s.count == 2
    assert s.is_suppressed("ann@b.c") and s.is_suppressed("BO@B.C")


@pytest.mark.parametrize(
    ("listed", "asked"),
    [
        ("zoe@exa\u0308mple.com", "zoe@ex\u00e4mple.com"),  # the domain decomposed in the list
        ("zoe@ex\u00e4mple.com", "ZOE@EXA\u0308MPLE.COM"),  # or in the address asked about
    ],
)
def test_a_domain_composed_or_decomposed_is_one_address(
    make_set: MakeSet, listed: str, asked: str
) -> None:
    s = make_set(lambda: Snapshot(frozenset({listed, "ann@b.c"}), None))
    assert s.load()
    assert s.is_suppressed(asked) and s.is_suppressed("ann@b.c")
    s.add("bo@exa\u0308mple.com")
    assert s.is_suppressed("bo@ex\u00e4mple.com")
    # The part before the "@" keeps its code points: another mailbox.
    assert not s.is_suppressed("zoe\u0308@ex\u00e4mple.com")


def test_peek_answers_from_what_is_held_and_never_fetches(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    s = make_set(source)
    assert not s.peek("alice@example.com")
    s.add("erin@example.com")
    assert s.peek("ERIN@example.com")
    assert source.calls == 0
    assert s.load()
    clock.advance(TTL)
    assert s.peek(" Alice@Example.com")
    assert not s.peek("carol@example.com")
    assert s.wait_for_refresh(0)  # stale, yet no refresh was started
    assert source.calls == 1
    with pytest.raises(ValidationError):
        s.peek(None)  # type: ignore[arg-type]


def test_a_datetime_as_of_is_told_in_iso_form(make_set: MakeSet) -> None:
    when = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)

    @dataclass(frozen=True)
    class Parsed:
        emails: frozenset[str]
        as_of: dt.datetime | None

    s = make_set(lambda: Parsed(frozenset({"a@b.c"}), when))
    assert s.load()
    assert s.as_of == "2025-03-04T05:06:07+00:00"


def test_add_suppresses_until_a_later_fetch_answers(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    s = make_set(source)
    assert s.load()
    s.add("  Erin@Example.com ")
    assert s.is_suppressed("erin@example.com")

    # A fetch that started after erin's addition decides for erin, but not for frank,
    # who was added while that fetch was running.
    gate = source.block()
    assert s.refresh_in_background()
    assert source.started.wait(WAIT)
    s.add("frank@example.com")
    gate.set()
    assert s.wait_for_refresh(WAIT)
    assert not s.is_suppressed("erin@example.com")
    assert s.is_suppressed("frank@example.com")

    # The next fetch started after frank's addition: now Meisa's list decides for frank.
    source.gate = None
    clock.advance(TTL)
    assert s.is_suppressed("frank@example.com")
    assert s.wait_for_refresh(WAIT)
    assert not s.is_suppressed("frank@example.com")
    assert s.count == 2


def test_local_additions_are_bounded_with_a_warning(
    make_set: MakeSet,
    source: Source,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(suppression, "_MAX_LOCAL", 2)
    s = make_set(source)
    with caplog.at_level(logging.WARNING, logger="flask_meisa.suppression"):
        s.add("one@example.com")
        s.add("two@example.com")
        s.add("one@example.com")  # re-adding makes it the newest
        assert caplog.records == []
        s.add("three@example.com")
    assert [s.peek(e) for e in ("one@example.com", "two@example.com", "three@example.com")] == [
        True,
        False,
        True,
    ]
    [record] = caplog.records
    assert "dropped the oldest" in record.getMessage() and "@" not in record.getMessage()


def test_add_works_before_anything_loads_and_lasts_until_a_load_succeeds(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    source.error = RuntimeError("down")
    s = make_set(source)
    s.add("Grace@Example.com")
    assert s.is_suppressed("GRACE@example.com")  # the first-use load failed
    assert not s.load()
    clock.advance(RETRY)
    assert s.is_suppressed("grace@example.com")  # and the retry failed too
    assert source.calls == 3
    source.error = None
    s.add("heidi@example.com")  # just before the load: its fetch starts after this
    assert s.load()
    # Meisa's list, fetched since, decides for both.
    assert not s.is_suppressed("grace@example.com")
    assert not s.is_suppressed("heidi@example.com")


def test_wait_for_refresh(make_set: MakeSet, source: Source) -> None:
    s = make_set(source)
    assert s.wait_for_refresh(0)  # nothing running
    gate = source.block()
    assert s.refresh_in_background()
    assert source.started.wait(WAIT)
    assert not s.wait_for_refresh(0.01)
    # A fetch hanging as the app exits must not keep the process alive.
    refreshing = [t for t in threading.enumerate() if t.name == REFRESH_THREAD]
    assert refreshing and all(t.daemon for t in refreshing)
    done = threading.Event()

    def waiter() -> None:
        if s.wait_for_refresh(WAIT):
            done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.is_set()
    gate.set()
    t.join(WAIT)
    assert done.is_set()
    assert s.loaded


def test_load_waits_for_a_running_fetch_then_fetches_anew(
    make_set: MakeSet, source: Source
) -> None:
    s = make_set(source)
    gate = source.block()
    assert s.refresh_in_background()
    assert source.started.wait(WAIT)
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(s.load()))
    t.start()
    gate.set()
    t.join(WAIT)
    assert results == [True]
    assert source.calls == 2


def test_an_explicit_load_is_the_one_fetch_running_until_it_ends(
    make_set: MakeSet, source: Source, clock: FakeClock
) -> None:
    s = make_set(source)
    gate = source.block()
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(s.load()))
    t.start()
    assert source.started.wait(WAIT)
    assert not s.wait_for_refresh(0)
    assert not s.refresh_in_background()
    clock.advance(TTL)
    assert not s.is_suppressed("alice@example.com", wait=0)  # nothing loaded yet
    gate.set()
    t.join(WAIT)
    assert results == [True]
    assert s.is_suppressed("alice@example.com")
    assert source.calls == 1


def test_explicit_load_ignores_retry_interval_and_never_raises(
    make_set: MakeSet, source: Source
) -> None:
    source.error = ValueError("boom")
    s = make_set(source)
    assert not s.load()
    assert s.last_error == "ValueError"  # only the type: foreign messages may hold payloads
    assert repr(s) == "<Tracked not loaded>"
    source.error = None
    assert s.load()
    assert s.loaded and s.count == 2 and s.as_of == "2025-01-01T00:00:00Z"
    assert repr(s) == "<Tracked count=2 as_of='2025-01-01T00:00:00Z'>"


def test_refresh_in_background_ignores_retry_interval(make_set: MakeSet, source: Source) -> None:
    source.error = RuntimeError("down")
    s = make_set(source)
    assert not s.is_suppressed("alice@example.com")  # the first load failed
    source.error = None
    assert s.refresh_in_background()
    assert s.wait_for_refresh(WAIT)
    assert s.is_suppressed("alice@example.com")
    assert source.calls == 2


def test_no_thread_for_a_refresh_means_no_refresh_running(
    make_set: MakeSet, source: Source, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the OS answers when out of threads, and Python at interpreter shutdown.
    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    s = make_set(source)
    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", refused)
        assert not s.refresh_in_background()
        assert s.wait_for_refresh(0)  # a sender's first check would wait on it in vain
        assert not s.is_suppressed("alice@example.com", wait=WAIT)
    assert source.calls == 0
    assert s.is_suppressed("alice@example.com")  # threads again: the next check loads
    assert source.calls == 1


def test_close_stops_refreshing(make_set: MakeSet, source: Source, clock: FakeClock) -> None:
    s = make_set(source)
    assert s.load()
    gate = source.block()
    assert s.refresh_in_background()
    assert source.started.wait(WAIT)
    gate.set()
    s.close()
    assert s.wait_for_refresh(0)
    clock.advance(TTL)
    assert s.is_suppressed("alice@example.com")
    assert not s.refresh_in_background()
    assert s.wait_for_refresh(0)
    assert source.calls == 2


def test_closed_set_does_not_load_on_first_use(make_set: MakeSet, source: Source) -> None:
    s = make_set(source)
    s.close()
    assert not s.is_suppressed("alice@example.com")
    assert source.calls == 0


@pytest.mark.parametrize(
    ("ttl", "retry_interval", "refused"),
    [
        (0.0, RETRY, True),
        (-1.0, RETRY, True),
        (TTL, -1.0, True),
        (0.5, RETRY, False),
        (TTL, 0.0, False),
        (TTL, 0.5, False),
    ],
)
def test_settings_out_of_range_are_refused(
    source: Source, ttl: float, retry_interval: float, refused: bool
) -> None:
    if refused:
        with pytest.raises(ConfigurationError):
            SuppressionSet(source, ttl=ttl, retry_interval=retry_interval)
    else:
        SuppressionSet(source, ttl=ttl, retry_interval=retry_interval).close()


def test_log_lines_hold_no_foreign_error_text(
    make_set: MakeSet, source: Source, caplog: pytest.LogCaptureFixture
) -> None:
    source.error = RuntimeError("failed for alice@example.com with key meisa_live_secret")
    s = make_set(source)
    with caplog.at_level(logging.DEBUG, logger="flask_meisa.suppression"):
        assert not s.is_suppressed("alice@example.com")
    text = caplog.text
    assert "RuntimeError" in text
    assert "alice" not in text and "meisa_live" not in text
    assert "alice" not in (s.last_error or "")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_gets_fresh_state(make_set: MakeSet, source: Source) -> None:
    s = make_set(source)
    assert s.load()
    gate = source.block()
    assert s.refresh_in_background()
    assert source.started.wait(WAIT)  # the parent's refresh is running at fork time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        status = 99
        try:
            signal.alarm(10)  # a deadlocked child must not hang the suite
            source.gate = None
            source.emails = frozenset({"child@example.com"})
            s.after_fork()  # what the extension's one fork hook does for its sets
            if not s.wait_for_refresh(0):
                status = 1  # inherited a "refresh running" flag
            elif not s.is_suppressed("alice@example.com"):
                status = 2  # lost the parent's list
            elif not s.load():
                status = 3
            elif not s.is_suppressed("child@example.com"):
                status = 4
            elif not (s.refresh_in_background() and s.wait_for_refresh(WAIT)):
                status = 5
            else:
                status = 0
        finally:
            os._exit(status)

    _, status = os.waitpid(pid, 0)
    gate.set()
    assert s.wait_for_refresh(WAIT)
    assert os.WIFEXITED(status), status
    assert os.WEXITSTATUS(status) == 0
    assert source.calls == 2  # the child's fetches happened in the child only


def test_with_the_client_against_the_emulator(emulator: Emulator, clock: FakeClock) -> None:
    path = "/contacts/api/unsubscribed-emails/"
    emulator.suppress("Zoe@Example.com")
    with MeisaClient(emulator.live_key, emulator.url, retry=RetryPolicy.never()) as client:
        s = SuppressionSet(client.unsubscribed_emails, ttl=TTL, retry_interval=RETRY, clock=clock)
        try:
            assert s.is_suppressed("ZOE@example.com ")
            assert s.as_of is not None
            held = s.count
            emulator.suppress("yan@example.com")
            assert not s.is_suppressed("yan@example.com")  # still fresh: not fetched again

            emulator.faults.fail_next(1, status=503, path=path)
            clock.advance(TTL)
            assert not s.is_suppressed("yan@example.com")  # stale: the old set answers
            assert s.wait_for_refresh(WAIT)
            error = s.last_error
            assert error is not None and "503" in error
            assert emulator.live_key not in error
            assert s.is_suppressed("zoe@example.com")

            clock.advance(RETRY)
            s.is_suppressed("zoe@example.com")
            assert s.wait_for_refresh(WAIT)
            assert s.is_suppressed("Yan@Example.com")
            assert s.count == held + 1
            assert s.last_error is None
            assert [r.status for r in emulator.requests_to(path)] == [200, 503, 200]
        finally:
            s.close()


def test_a_2xx_answer_without_a_list_never_replaces_the_list(clock: FakeClock) -> None:
    # A proxy or a failing upstream answering 200 with an error object or a page: taken
    # as an empty list, it would unsuppress every address until the next load.
    answers = [
        response(200, {"as_of": "2026-01-01T00:00:00Z", "count": 1, "emails": ["gone@b.co"]}),
        response(200, {"detail": "upstream unavailable", "code": "bad_gateway"}),
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n<p>ok</p>",
    ]

    def answer(exchange: Exchange) -> None:
        exchange.send(answers.pop(0))

    key = "meisa_live_suppression_test_key_1"
    policy = RetryPolicy.never()
    with hostile(answer) as server, MeisaClient(key, server.url, retry=policy) as client:
        s = SuppressionSet(client.unsubscribed_emails, ttl=TTL, retry_interval=RETRY, clock=clock)
        try:
            assert s.is_suppressed("gone@b.co")
            for _ in range(2):
                clock.advance(TTL + RETRY)
                s.is_suppressed("gone@b.co")  # starts a refresh
                assert s.wait_for_refresh(WAIT)
                assert s.is_suppressed("gone@b.co")
                assert s.last_error == "the answer holds no list of emails"
            assert answers == []
        finally:
            s.close()


def test_a_list_of_no_addresses_never_replaces_the_list_but_an_empty_one_does(
    clock: FakeClock,
) -> None:
    # A list whose entries are not addresses (objects, as another version or a proxy may
    # give them) reads as no address at all: it would unsuppress every one just the same.
    bounced = {"email": "gone@b.co", "reason": "bounced"}
    answers = [
        response(200, {"as_of": "2026-01-01T00:00:00Z", "count": 1, "emails": ["gone@b.co"]}),
        response(200, {"as_of": "2026-01-02T00:00:00Z", "count": 1, "emails": [bounced]}),
        response(200, {"as_of": "2026-01-03T00:00:00Z", "count": 0, "emails": []}),
    ]

    def answer(exchange: Exchange) -> None:
        exchange.send(answers.pop(0))

    key = "meisa_live_suppression_test_key_1"
    policy = RetryPolicy.never()
    with hostile(answer) as server, MeisaClient(key, server.url, retry=policy) as client:
        s = SuppressionSet(client.unsubscribed_emails, ttl=TTL, retry_interval=RETRY, clock=clock)
        try:
            assert s.is_suppressed("gone@b.co")
            clock.advance(TTL + RETRY)
            s.is_suppressed("gone@b.co")  # starts a refresh
            assert s.wait_for_refresh(WAIT)
            assert s.is_suppressed("gone@b.co")
            assert str(s.last_error) == "the answer holds no list of emails"
            clock.advance(TTL + RETRY)
            s.is_suppressed("gone@b.co")
            assert s.wait_for_refresh(WAIT)
            assert not s.is_suppressed("gone@b.co")  # everyone resubscribed: the list is empty
            assert s.last_error is None
            assert answers == []
        finally:
            s.close()
