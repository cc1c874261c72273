"""The outbox engine against the emulator over loopback: rows written on submit and removed
once delivered, picked up again by the next engine, coalesced and ordered across restarts,
dead letters, one delivering engine per outbox file, and writes that fail."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.engine.deadletters import DeadLetters
from flask_meisa.engine.durable import OutboxDispatcher
from flask_meisa.engine.outbox import Outbox
from flask_meisa.errors import DeliveryError
from flask_meisa.operations import Operation
from flask_meisa.retry import RetryPolicy
from tests.engine_support import RecordingHooks
from tests.engine_support import upsert

FAST = RetryPolicy(max_attempts=20, base_delay=0.05, max_delay=0.2, deadline=30.0)
UPSERT = "/contacts/upsert/"
TRACK = "/events/track/"
TRIGGER = "/emails/trigger/"

MakeEngine = Callable[..., OutboxDispatcher]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def make_engine(path: Path) -> Iterator[MakeEngine]:
    """``make_engine(emulator, hooks, **options)``: an outbox engine on ``path`` (no
    budget, fast retries, short polls unless given); all closed after the test."""
    made: list[OutboxDispatcher] = []

    def make(emu: Emulator, hooks: RecordingHooks, **options: Any) -> OutboxDispatcher:
        options.setdefault("retry", FAST)
        options.setdefault("rate_limit", None)
        options.setdefault("poll_interval", 0.02)
        outbox = options.pop("outbox", None) or Outbox(path)
        engine = OutboxDispatcher(
            outbox=outbox,
            client_factory=lambda: MeisaClient(emu.live_key, emu.url, timeout=(1.0, 2.0)),
            hooks=hooks,
            **options,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close(timeout=0)


def track(n: int, name: str = "clicked", tag: str = "t") -> Operation:
    return Operation("track", {"event_name": name, "external_id": f"{tag}-{n}"})


def send(n: int, trigger: str = "receipt") -> Operation:
    return Operation(
        "send",
        {"trigger_key": trigger, "to_email": f"buyer{n}@example.com", "idempotency_key": f"s{n}"},
    )


def answered(emu: Emulator, path: str) -> list[Any]:
    return [r for r in emu.requests_to(path) if r.status is not None and r.status < 300]


def test_rows_are_written_on_submit_and_removed_once_delivered(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    emulator.faults.outage(60)
    engine = make_engine(emulator, hooks)
    for n in range(5):
        engine.submit(upsert(n))
    engine.submit(send(1))
    outbox = Outbox(path)
    counts = outbox.counts()
    assert counts.pending + counts.claimed == 6  # on disk before any call succeeded
    emulator.faults.clear()
    assert engine.flush(5)
    assert outbox.counts() == type(counts)(0, 0, 0)
    assert len(hooks.of("delivered")) == 6
    assert len(answered(emulator, UPSERT)) == 5
    status = engine.status()
    assert (status.engine, status.holder, status.stored, status.pending) == ("outbox", True, 0, 0)


def test_the_next_engine_delivers_what_a_closed_one_left(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    first_hooks, second_hooks = RecordingHooks(), RecordingHooks()
    emulator.faults.outage(60)
    first = make_engine(emulator, first_hooks, flush_timeout=0.1)
    operations = [upsert(n) for n in range(20)] + [track(n) for n in range(20)] + [send(9)]
    for op in operations:
        first.submit(op)
    assert first.close() == 0  # nothing lost: it all stays in the outbox
    assert first_hooks.of("dropped") == []
    emulator.faults.clear()
    second = make_engine(emulator, second_hooks)
    assert second.flush(10)
    assert len(second_hooks.of("delivered")) == 41
    assert {op.id for op in second_hooks.of("delivered")} == {op.id for op in operations}
    assert len(answered(emulator, TRACK)) == 20
    assert [r.body["idempotency_key"] for r in emulator.requests_to(TRIGGER)][-1] == "s9"
    assert len(emulator.sends()) == 1


def test_coalescing_and_order_hold_across_a_restart(
    emulator: Emulator, make_engine: MakeEngine
) -> None:
    emulator.faults.outage(60)
    first = make_engine(emulator, RecordingHooks(), flush_timeout=0)
    first.submit(upsert(1, a=1))
    first.submit(track(1, "first"))
    first.submit(upsert(1, b=2))
    first.submit(track(1, "second"))
    first.close()
    emulator.faults.clear()
    emulator.clear_requests()
    second = make_engine(emulator, RecordingHooks())
    assert second.flush(5)
    paths = [(r.path.removeprefix("/api/v1"), r.status) for r in emulator.requests]
    assert paths == [(UPSERT, 201), (TRACK, 200), (TRACK, 200)]
    assert emulator.requests[0].body["custom_fields"] == {"tag": "t", "a": 1, "b": 2}
    assert [r.body["event_name"] for r in emulator.requests[1:]] == ["first", "second"]


def test_an_upsert_merges_into_its_contacts_stored_row_until_it_is_claimed(
    path: Path,
) -> None:
    outbox = Outbox(path)
    first = outbox.put(upsert(1, a=1))
    assert outbox.put(upsert(1, b=2)) == first
    assert outbox.put(upsert(2)) != first
    [(seq, merged), (_, other)] = outbox.claim(10)
    assert seq == first
    assert merged.payload["custom_fields"] == {"tag": "t", "a": 1, "b": 2}
    assert other.payload["external_id"] == "t-2"
    # Claimed: a later upsert of the contact gets a row of its own, after it.
    assert outbox.put(upsert(1, c=3)) > first
    assert outbox.counts().pending == 1
    outbox.close()


def test_sends_are_loaded_first_even_behind_a_backlog(path: Path) -> None:
    outbox = Outbox(path)
    for n in range(5):
        outbox.put(track(n))
        outbox.put(upsert(n))
    outbox.put(send(1))
    kinds = [op.kind for _, op in outbox.claim(3)]
    assert kinds == ["send", "upsert", "upsert"]
    outbox.close()


def test_refused_operations_become_dead_letters_without_payload_values(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    bad = send(1, trigger="no_such_trigger")
    engine.submit(bad)
    engine.submit(upsert(3))
    assert engine.flush(5)
    assert [op.id for op in hooks.of("failed")] == [bad.id]
    [letter] = DeadLetters(Outbox(path)).list()
    assert (letter.status, letter.code, letter.attempts) == (400, "invalid_trigger", 1)
    assert letter.operation.payload == bad.payload  # kept whole, idempotency key too
    assert "buyer1" not in letter.message
    assert engine.status().dead_letters == 1


def test_running_out_of_retries_makes_a_dead_letter(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    emulator.faults.fail_next(10, status=503, path=UPSERT)
    hooks = RecordingHooks()
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01)
    engine = make_engine(emulator, hooks, retry=retry)
    engine.submit(upsert(1))
    assert engine.flush(5)
    [letter] = DeadLetters(Outbox(path)).list()
    assert (letter.status, letter.code, letter.attempts) == (503, "service_unavailable", 2)


def test_dead_letters_can_be_requeued_and_purged(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    for n in range(3):
        engine.submit(send(n, trigger="launch_day"))  # not configured yet: 400
    assert engine.flush(5)
    dead = DeadLetters(Outbox(path))
    letters = dead.list()
    assert [letter.code for letter in letters] == ["invalid_trigger"] * 3
    emulator.add_trigger("launch_day")
    assert dead.requeue([letters[0].seq]) == 1
    assert engine.flush(5)
    assert [s["to_email"] for s in emulator.sends()] == ["buyer0@example.com"]
    assert dead.purge([letters[1].seq]) == 1
    assert [letter.seq for letter in dead.list()] == [letters[2].seq]
    assert dead.purge() == 1
    assert dead.list() == []


def test_one_engine_per_outbox_delivers_and_takes_the_others_rows(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    holder_hooks, writer_hooks = RecordingHooks(), RecordingHooks()
    holder = make_engine(emulator, holder_hooks)
    holder.submit(upsert(0, tag="h"))
    assert holder.flush(5)
    assert holder.is_holder
    writer = make_engine(emulator, writer_hooks, outbox=Outbox(path))
    for n in range(10):
        writer.submit(upsert(n, tag="w"))
    assert writer.flush(5)  # the holder delivered them
    assert holder.flush(5)  # and its hooks ran (the rows leave the outbox first)
    assert not writer.is_holder
    assert writer_hooks.outcomes == []
    assert len(holder_hooks.of("delivered")) == 11
    assert writer.status().holder is False
    # The holder leaves; the writer takes over and delivers what comes next.
    holder.close()
    writer.submit(upsert(99, tag="w"))
    assert writer.flush(5)
    assert writer.status().holder  # it took over
    assert len(writer_hooks.of("delivered")) == 1


def test_a_send_after_close_is_refused(emulator: Emulator, make_engine: MakeEngine) -> None:
    hooks = RecordingHooks()
    engine = make_engine(emulator, hooks)
    engine.close()
    with pytest.raises(DeliveryError, match="closed"):
        engine.submit(send(1))
    engine.submit(upsert(1))
    assert hooks.detail(hooks.of("dropped")[0]) == "closed"


def test_a_full_database_falls_back_to_memory_and_says_so(
    emulator: Emulator,
    make_engine: MakeEngine,
    path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def tiny(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA max_page_count = 6")

    hooks = RecordingHooks()
    outbox = Outbox(path, setup=tiny)
    emulator.faults.outage(60)
    engine = make_engine(emulator, hooks, outbox=outbox, queue_size=300)
    with caplog.at_level(logging.WARNING, logger="flask_meisa.engine"):
        for n in range(200):
            engine.submit(upsert(n, note="x" * 200))
    stored = outbox.counts().pending + outbox.counts().claimed
    assert 0 < stored < 200
    full = [r for r in caplog.records if "could not write" in r.getMessage()]
    assert len(full) == 1  # once per run of failures, not once per operation
    assert "database or disk is full" in full[0].getMessage()
    emulator.faults.clear()
    assert engine.flush(10)
    assert len(hooks.of("delivered")) == 200  # those held in memory too
    assert {r.body["external_id"] for r in answered(emulator, UPSERT)} == {
        f"t-{n}" for n in range(200)
    }


def test_what_neither_the_outbox_nor_memory_can_hold_is_reported_dropped(
    emulator: Emulator, make_engine: MakeEngine, path: Path
) -> None:
    def read_only(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA query_only = 1")  # every write fails

    Outbox(path)  # the schema exists already
    hooks = RecordingHooks()
    emulator.faults.outage(60)
    engine = make_engine(emulator, hooks, outbox=Outbox(path, setup=read_only), queue_size=5)
    for n in range(8):
        engine.submit(track(n))
    dropped = hooks.of("dropped")
    assert len(dropped) == 3
    assert {hooks.detail(op) for op in dropped} == {"queue_full"}
    assert engine.close(0) == 5  # the rest was only in memory
    assert len(hooks.of("dropped")) == 8
