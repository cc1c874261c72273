"""The ordering promise of the operations table, checked on random histories: whatever is
added, merged, taken, retried and finished, in any interleaving, no older state of a
contact reaches Meisa after a newer one, nothing is lost, and an event goes after every
upsert of its contact that came before it. Each name is a contact of its own here (two
rows that share no name are not linked, see docs/delivery.md)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import precondition
from hypothesis.stateful import rule

from flask_meisa._engine import pending
from flask_meisa._engine.store import Store
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation
from flask_meisa.operations import identities

EXTERNAL_IDS = ("1", "2")
EMAILS = ("a@example.com", "b@example.com")
FIELDS = ("f", "g")

names = st.one_of(
    st.tuples(st.sampled_from(EXTERNAL_IDS), st.none()),
    st.tuples(st.none(), st.sampled_from(EMAILS)),
    st.tuples(st.sampled_from(EXTERNAL_IDS), st.sampled_from(EMAILS)),
)


def named(ext: str | None, email: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if ext is not None:
        payload["external_id"] = ext
    if email is not None:
        payload["email"] = email
    return payload


def carried(payload: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(name, field) pairs of an upsert's payload."""
    for name in identities(payload):
        if name is not None:
            for field in payload.get("custom_fields", {}):
                yield name, field


class PendingHistory(RuleBasedStateMachine):
    """Each upsert sets its fields to its own number, so a delivered value tells which
    submission it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(None)
        self.closing = ExitStack()
        self.db: sqlite3.Connection = self.closing.enter_context(self.store.read())
        self.number = 0
        #: (name, field): the number of the newest upsert submitted with it.
        self.submitted: dict[tuple[str, str], int] = {}
        #: (name, field): the value delivered last.
        self.delivered: dict[tuple[str, str], int] = {}
        #: event number: what had been submitted of its contact when it was added.
        self.events: dict[int, dict[tuple[str, str], int]] = {}
        self.flying: list[pending.Row] = []
        #: upsert number: the names it was submitted with.
        self.names: dict[int, set[str | None]] = {}

    @rule(
        who=names,
        fields=st.sets(st.sampled_from(FIELDS), min_size=1),
        lane=st.sampled_from((LANE_AUTOMATION, LANE_ROUTINE)),
        looked_up=st.booleans(),
    )
    def add_upsert(
        self, who: tuple[str | None, str | None], fields: set[str], lane: int, looked_up: bool
    ) -> None:
        self.number += 1
        payload = {**named(*who), "custom_fields": dict.fromkeys(sorted(fields), self.number)}
        operation = Operation("upsert", payload)
        # The writer passes a routine upsert's lane as a look-up, called only when needed.
        pending.add(self.db, operation, (lambda: lane) if looked_up else lane)
        for key in carried(payload):
            self.submitted[key] = self.number
        self.names[self.number] = set(identities(payload))

    @rule(ext=st.sampled_from(EXTERNAL_IDS))
    def add_event(self, ext: str) -> None:
        self.number += 1
        name = f"ext:{ext}"
        before = {key: value for key, value in self.submitted.items() if key[0] == name}
        self.events[self.number] = before
        payload = {"event_name": "clicked", "external_id": ext, "data": {"n": self.number}}
        pending.add(self.db, Operation("track", payload), LANE_AUTOMATION)

    @rule()
    def take(self) -> None:
        row = pending.next_ready(self.db, 0.0)
        if row is not None:
            pending.take(self.db, row, 0.0)
            self.flying.append(row)

    @precondition(lambda self: self.flying)
    @rule(which=st.integers(min_value=0))
    def finish(self, which: int) -> None:
        self.deliver(self.flying.pop(which % len(self.flying)))

    @precondition(lambda self: self.flying)
    @rule(which=st.integers(min_value=0))
    def retry(self, which: int) -> None:
        pending.retry_at(self.db, self.flying.pop(which % len(self.flying)), 0.0)

    def deliver(self, row: pending.Row) -> None:
        payload = row.operation.payload
        if row.operation.kind == "track":
            before = self.events[payload["data"]["n"]]
            late = {key: n for key, n in before.items() if self.behind(key, n)}
            assert not late, f"event {payload} went before the upserts {late}"
        else:
            for key in carried(payload):
                self.delivered[key] = payload["custom_fields"][key[1]]
        pending.finish(self.db, row)

    def behind(self, key: tuple[str, str], number: int) -> bool:
        """Whether what was delivered last of ``key`` is older than submission ``number``.
        A merge that links two names may send one name's older field under the other
        (the limitation the module docstring names): a value that was not submitted
        under ``key``'s name is not counted as older."""
        last = self.delivered.get(key)
        return last is None or (last < number and key[0] in self.names[last])

    def teardown(self) -> None:
        try:
            while self.flying:
                self.deliver(self.flying.pop(0))
            while (row := pending.next_ready(self.db, 0.0)) is not None:
                pending.take(self.db, row, 0.0)
                self.deliver(row)
            assert pending.unfinished(self.db) == 0
            older = {
                key: (self.delivered.get(key), number)
                for key, number in self.submitted.items()
                if self.behind(key, number)
            }
            assert not older, f"(delivered last, submitted last) per name and field: {older}"
        finally:
            self.closing.close()
            self.store.close()


TestPendingHistory = PendingHistory.TestCase
TestPendingHistory.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
