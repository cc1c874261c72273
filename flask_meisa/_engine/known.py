"""What Meisa already has: per contact, a short digest of each field Meisa last accepted
from us, so that a state Meisa has is not sent again (within ``MEISA_RESYNC_AFTER``), and
a contact's first upsert, or a change of a priority field, goes ahead of routine syncs."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..operations import LANE_AUTOMATION
from ..operations import LANE_ROUTINE
from ..operations import Operation
from ..operations import identities

__all__ = ["Known", "digest", "forget", "lane_of", "lookup", "prune", "remember", "unchanged"]

#: Entries unused for this long are forgotten, whatever ``MEISA_RESYNC_AFTER`` says.
KEEP_FOR = 30 * 86400.0


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def digest(payload: Mapping[str, Any]) -> dict[str, str]:
    """``{field: short hash}`` of an upsert payload: one entry per top-level field, per
    custom field and per tag. ``source`` is left out: Meisa keeps a contact's first."""
    fields: dict[str, str] = {}
    for name, value in payload.items():
        if name == "custom_fields":
            fields.update((f"custom_fields.{key}", _hash(item)) for key, item in value.items())
        elif name == "tag_names":
            fields.update((f"tag:{tag}", "1") for tag in value)
        elif name != "source":
            fields[name] = _hash(value)
    return fields


@dataclass(frozen=True)
class Known:
    """What Meisa last accepted of a contact, and when."""

    fields: dict[str, str]
    accepted_at: float

    def has(self, wanted: Mapping[str, str]) -> bool:
        """Whether every field of ``wanted`` is already there with the same value."""
        return all(self.fields.get(name) == value for name, value in wanted.items())


Lookup = Callable[[], "Known | None"]


def lane_of(operation: Operation, had: Lookup, priority_fields: Iterable[str]) -> int:
    """The lane of ``operation``, given ``had()``, what Meisa has of its contact (looked up
    only for a routine upsert): a contact's first upsert, or one that changes a priority
    field, goes ahead of routine syncs."""
    lane = operation.lane
    if operation.kind != "upsert" or lane != LANE_ROUTINE:
        return lane
    known = had()
    custom = operation.payload.get("custom_fields") or {}
    # Only the priority fields the upsert carries are hashed: a login's other fields are not.
    wanted = {
        f"custom_fields.{name}": _hash(custom[name]) for name in priority_fields if name in custom
    }
    return LANE_AUTOMATION if known is None or not known.has(wanted) else lane


def unchanged(operation: Operation, had: Lookup, now: float, resync_after: float) -> bool:
    """Whether Meisa already has every field of the upsert ``operation``, accepted within
    ``resync_after`` seconds, so that no call is needed (never when it is forced)."""
    if operation.kind != "upsert" or operation.force:
        return False
    known = had()
    return (
        known is not None
        and known.accepted_at >= now - resync_after
        and known.has(digest(operation.payload))
    )


def _keys(payload: Mapping[str, Any]) -> list[str]:
    return [key for key in identities(payload) if key is not None]


def _entries(db: sqlite3.Connection, payload: Mapping[str, Any]) -> Iterator[tuple[str, ...]]:
    """The entries of the contact ``payload`` names, ``(names, fields, accepted_at)``, by
    ``external_id`` first (read one at a time)."""
    for key in _keys(payload):
        query = "SELECT names, fields, accepted_at FROM meisa_known WHERE key = ?"
        row = db.execute(query, (key,)).fetchone()
        if row is not None:
            yield row


def lookup(db: sqlite3.Connection, payload: Mapping[str, Any]) -> Known | None:
    """What Meisa has of the contact ``payload`` names (by ``external_id`` first)."""
    keys = _keys(payload)  # one query, stopping at the first name found: the writer's hot path
    if not keys:
        return None
    query = " UNION ALL ".join([_BY_KEY] * len(keys)) + " LIMIT 1"
    row = db.execute(query, keys).fetchone()
    return None if row is None else Known(json.loads(row[0]), float(row[1]))


_BY_KEY = "SELECT fields, accepted_at FROM meisa_known WHERE key = ?"


def remember(db: sqlite3.Connection, payload: Mapping[str, Any], now: float) -> None:
    """Meisa accepted ``payload``: fold its fields into what it has of the contact."""
    entries = list(_entries(db, payload))
    fields = {**(json.loads(entries[0][1]) if entries else {}), **digest(payload)}
    names = sorted(
        {name for entry in entries for name in json.loads(entry[0])}.union(_keys(payload))
    )
    text, listed = json.dumps(fields, separators=(",", ":")), json.dumps(names)
    db.executemany(
        "INSERT OR REPLACE INTO meisa_known (key, names, fields, accepted_at) VALUES (?, ?, ?, ?)",
        [(key, listed, text, now) for key in names],
    )


def forget(db: sqlite3.Connection, payload: Mapping[str, Any]) -> None:
    """Meisa no longer knows the contact (an event answered 404): forget it, by every
    name it was known by."""
    names = {name for entry in _entries(db, payload) for name in json.loads(entry[0])}
    for key in names or _keys(payload):
        db.execute("DELETE FROM meisa_known WHERE key = ?", (key,))


def prune(db: sqlite3.Connection, before: float) -> int:
    """Forget entries accepted before ``before``."""
    return db.execute("DELETE FROM meisa_known WHERE accepted_at < ?", (before,)).rowcount
