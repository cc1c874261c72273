"""The outbox file and the delivery lock on their own: WAL, claims, hand-backs, the error
fields dead letters keep, and one lock holder per file."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from flask_meisa.engine.deadletters import error_fields
from flask_meisa.engine.hostlock import HostLock
from flask_meisa.engine.outbox import Outbox
from flask_meisa.engine.outbox import OutboxCounts
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import BadRequestError
from flask_meisa.errors import ValidationError
from flask_meisa.operations import Operation
from tests.engine_support import upsert


def test_a_new_outbox_is_in_wal_mode_with_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "outbox.sqlite3"
    Outbox(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()


def test_claims_are_handed_back_one_by_one_or_all_at_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    for n in range(4):
        outbox.put(upsert(n))
    claimed = outbox.claim(3)
    assert outbox.counts() == OutboxCounts(pending=1, claimed=3)
    assert outbox.release_claims([claimed[0][0]]) == 1
    assert outbox.counts() == OutboxCounts(pending=2, claimed=2)
    assert outbox.release_claims() == 2
    assert outbox.delete([seq for seq, _ in claimed]) == 3
    assert outbox.counts() == OutboxCounts(pending=1)
    assert outbox.unfinished(outbox.last_seq()) == 1
    outbox.close()


def test_an_operation_comes_back_as_it_went_in(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    contact = {"email": "ada@example.com", "external_id": "1", "custom_fields": {"n": 1.5}}
    event = Operation(
        "track",
        {"event_name": "ünïcode", "external_id": "1", "properties": {"a": [1, None]}},
        contact=contact,
    )
    outbox.put(event)
    [(_, back)] = outbox.claim(1)
    assert back == event
    outbox.close()


def test_data_version_moves_when_another_connection_commits(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    before = outbox.data_version()
    assert outbox.data_version() == before
    Outbox(tmp_path / "outbox.sqlite3").put(upsert(1))
    assert outbox.data_version() != before
    outbox.close()


def test_error_fields_hold_no_payload_values() -> None:
    refused = BadRequestError(
        "POST /contacts/upsert/", 400, "Enter a valid email.", code="invalid", body={}
    )
    assert error_fields(refused) == (400, "invalid", "Enter a valid email.")
    timeout = APITimeoutError("POST /events/track/", "no answer within 2 s")
    assert error_fields(timeout) == (None, None, "APITimeoutError: no answer within 2 s")
    invalid = ValidationError("email", "is not an address")
    assert error_fields(invalid) == (None, "validation", "email: is not an address")
    assert error_fields(RuntimeError("secret@example.com")) == (None, None, "RuntimeError")


def test_one_holder_per_lock_file(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.sqlite3.lock")
    first, second = HostLock(path), HostLock(path)
    assert HostLock.holder(path) is None
    assert first.try_acquire()
    assert not second.try_acquire()
    assert HostLock.holder(path) == os.getpid()
    first.release()
    assert HostLock.holder(path) is None
    assert second.try_acquire() and second.held
    second.release()
    first.release()  # twice is harmless
