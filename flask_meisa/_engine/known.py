"""What Meisa already has of each contact: a digest per field of the state it last accepted,
and when the app last set each field, in the store's ``meisa_known`` table (Redis for Celery).
Kept once, on the row of the first name it was last remembered by (its home); its other names'
rows point there (``fields`` ``{}``, ``names`` the home's list, home first): a previous
release reads them as nothing known."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any

from ..operations import LANE_AUTOMATION
from ..operations import LANE_ROUTINE
from ..operations import Operation
from ..operations import identities

#: Before a field's name in what Meisa has of a contact: when the app last set that field.
SET_AT = "@set:"

#: What Meisa has of a contact is forgotten after this long, whatever MEISA_RESYNC_AFTER says.
KEEP_FOR = 30 * 86400.0
#: Rows of each table one :func:`prune` forgets at most: its write lock stays short (a few
#: ms) when many expire at once (a host down for weeks); housekeeping calls it again, a
#: transaction a step, until it is done.
PRUNE_STEP = 1000


def _entries(db: sqlite3.Connection, payload: Mapping[str, Any], limit: str = "") -> list[Any]:
    """``(names, fields, accepted_at)`` of the contact ``payload`` names, ``external_id``
    first (one indexed read per name: cheaper than ``IN`` and a sort); the first that is a
    pointer is its home's (skipped if gone): the others' names are all a caller needs.
    Every upsert and event names its contact, by one name at least."""
    keys = _names(payload)
    query = "SELECT names, fields, accepted_at FROM meisa_known WHERE key = ?"
    if len(keys) == 1 and keys[0].startswith("email:"):
        # Mostly a pointer to an ext row: followed in the read (1 us; a second read, 4 us).
        found = db.execute(_FOLLOWED, keys).fetchall()
    else:
        found = db.execute(" UNION ALL ".join([query] * len(keys)) + limit, keys).fetchall()
    # Most upserts name their home first: a join would cost every read 1 us a name.
    while found and found[0][1] == "{}":
        home = db.execute(f"{query} AND fields != '{{}}'", json.loads(found[0][0])[:1])
        found[:1] = home.fetchall()
    return found


_FOLLOWED = (
    "SELECT names, fields, accepted_at FROM meisa_known WHERE key = coalesce((SELECT"
    " json_extract(names, '$[0]') FROM meisa_known WHERE key = ?1 AND fields = '{}'), ?1)"
)


def lookup(db: sqlite3.Connection, payload: Mapping[str, Any]) -> Known | None:
    """What Meisa has of the contact ``payload`` names (by ``external_id`` first)."""
    found = _entries(db, payload, " LIMIT 1")
    return Known(json.loads(found[0][1]), float(found[0][2])) if found else None


def remember(
    db: sqlite3.Connection, payload: Mapping[str, Any], now: float, *, accepted: bool = True
) -> None:
    """Meisa accepted ``payload`` (or had it, not ``accepted``): fold its fields into what
    it has of the contact, each with when the app last set it (:func:`set_since`)."""
    entries = _entries(db, payload)
    if not accepted and not entries:
        return
    digested = digest(payload)
    fields = {**(json.loads(entries[0][1]) if entries else {}), **digested}
    fields.update((f"{SET_AT}{name}", repr(now)) for name in digested)
    home, *_ = keys = _names(payload)
    names = {name for entry in entries for name in json.loads(entry[0])}.union(keys)
    listed = [home, *sorted(names - {home})]
    text, known_as = json.dumps(fields, separators=(",", ":")), json.dumps(listed)
    at = now if accepted else float(entries[0][2])
    db.executemany(
        "INSERT OR REPLACE INTO meisa_known (key, names, fields, accepted_at) VALUES (?, ?, ?, ?)",
        [(key, known_as, text if key == home else "{}", at) for key in listed],
    )
    ext, email = identities(payload)
    if ext is not None and email is not None:  # the user Meisa has at this address, only
        db.execute("DELETE FROM meisa_addresses WHERE ext = ? AND email != ?", (ext, email))
        db.execute(
            "INSERT OR REPLACE INTO meisa_addresses (email, ext, at) VALUES (?, ?, ?)",
            (email, ext, now),
        )


def set_since(db: sqlite3.Connection, payload: Mapping[str, Any], since: float) -> bool:
    """Whether a field of the upsert ``payload`` (not a name of its contact) was set
    again after ``since``: Meisa accepted it, or had it when the app set it again."""
    known = lookup(db, payload)
    return known is not None and bool(known.set_after(since).intersection(digest(payload)))


def forget(db: sqlite3.Connection, payload: Mapping[str, Any]) -> None:
    """Meisa no longer knows the contact (an event answered 404): forget all its names."""
    names = [name for entry in _entries(db, payload) for name in json.loads(entry[0])]
    names += _names(payload)  # a pointer whose home is gone
    db.execute(f"DELETE FROM meisa_known WHERE key IN ({marks(names)})", names)
    db.execute(f"DELETE FROM meisa_addresses WHERE ext IN ({marks(names)})", names)


def prune(db: sqlite3.Connection, before: float) -> int:
    """Forget what Meisa had of contacts accepted before ``before``, at most
    :data:`PRUNE_STEP` rows of each table (the rest at the next call); how many names."""
    query = "DELETE FROM {0} WHERE rowid IN (SELECT rowid FROM {0} WHERE {1} < ? LIMIT ?)"
    db.execute(query.format("meisa_addresses", "at"), (before, PRUNE_STEP))
    return db.execute(query.format("meisa_known", "accepted_at"), (before, PRUNE_STEP)).rowcount


def _names(payload: Mapping[str, Any]) -> list[str]:
    return [name for name in identities(payload) if name is not None]


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def digest(payload: Mapping[str, Any]) -> dict[str, str]:
    """``{field: short hash}`` of an upsert payload, per field, custom field and tag (not
    ``source``: Meisa keeps a contact's first)."""
    fields: dict[str, str] = {}
    for name, value in payload.items():
        if name == "custom_fields":
            fields.update((f"custom_fields.{key}", _hash(item)) for key, item in value.items())
        elif name == "tag_names":
            fields.update((f"tag:{tag}", "1") for tag in value)
        elif name != "source":
            fields[name] = _hash(value)
    return fields


def without(payload: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """``payload`` less ``fields``, named as :func:`digest` names them."""
    gone = set(fields)
    kept = {name: value for name, value in payload.items() if name not in gone}
    pairs = (kept.pop("custom_fields", None) or {}).items()
    if custom := {key: value for key, value in pairs if f"custom_fields.{key}" not in gone}:
        kept["custom_fields"] = custom
    if tags := [tag for tag in kept.pop("tag_names", None) or [] if f"tag:{tag}" not in gone]:
        kept["tag_names"] = tags
    return kept


@dataclass(frozen=True)
class Known:
    """What Meisa last accepted of a contact (a :func:`digest`), and when."""

    fields: dict[str, str]
    accepted_at: float

    def has(self, wanted: Mapping[str, str]) -> bool:
        """Whether every field of ``wanted`` is already there with the same value."""
        return all(self.fields.get(name) == value for name, value in wanted.items())

    def set_after(self, since: float) -> set[str]:
        """The fields (not the contact's names) the app set after ``since``."""
        return {
            name
            for name in self.fields
            if not name.startswith(SET_AT)
            and name not in ("email", "external_id")
            and float(self.fields[f"{SET_AT}{name}"]) > since
        }


Lookup = Callable[[], "Known | None"]


def lane_of(operation: Operation, had: Lookup, priority_fields: Iterable[str]) -> int:
    """The lane of ``operation``: a routine upsert that is its contact's first, or changes a
    priority field, given ``had()`` (what Meisa has), goes ahead of routine syncs."""
    lane = operation.lane
    if operation.kind != "upsert" or lane != LANE_ROUTINE:
        return lane
    known = had()
    custom = operation.payload.get("custom_fields") or {}
    # Only the priority fields the upsert carries are hashed: a login's other fields are not.
    wanted = digest({"custom_fields": {k: custom[k] for k in priority_fields if k in custom}})
    return LANE_AUTOMATION if known is None or not known.has(wanted) else lane


def unchanged(operation: Operation, had: Lookup, now: float, resync_after: float) -> bool:
    """Whether Meisa has every field of the upsert ``operation`` (``had()``), accepted within
    ``resync_after`` seconds: no call is needed (never when forced)."""
    if operation.kind != "upsert" or operation.force:
        return False
    known = had()
    return (
        known is not None
        and known.accepted_at >= now - resync_after
        and known.has(digest(operation.payload))
    )


def fresh_part(
    operation: Operation, had: Known | None, read_at: float, db: sqlite3.Connection | None = None
) -> Operation | None:
    """The backfill upsert ``operation`` of a user read at ``read_at``, less the fields a
    live sync Meisa accepted since then set (newer than the read), and with the store
    ``db``, those of live syncs released since (:func:`released_after`); ``None`` when only
    its contact's names are left, or Meisa accepted another address of it since."""
    email, fields = digest(operation.payload).get("email"), had.fields if had else {}
    if fields.get("email", email) != email and float(fields[f"{SET_AT}email"]) > read_at:
        return None  # it moved since: the former address would move it back
    newer = set() if db is None else released_after(db, operation.payload, read_at)
    newer |= set() if had is None else had.set_after(read_at)
    if not newer.intersection(digest(operation.payload)):
        return operation
    payload = without(operation.payload, newer)
    if not set(digest(payload)) - {"email", "external_id"}:
        return None
    return dataclasses.replace(operation, payload=payload, body=None)


def released_after(db: sqlite3.Connection, payload: Mapping[str, Any], since: float) -> set[str]:
    """The fields (not the names) of the live upserts of ``payload``'s contact released
    after ``since`` and not over: one in flight cannot take a backfill upsert in, which
    would go after it with the older state."""
    query = (
        "SELECT payload FROM meisa_ops WHERE (ext = ? OR email = ?) AND kind = 'upsert' "
        "AND state != 'dead' AND priority IS NOT 'backfill' AND created_at > ?"
    )
    rows = db.execute(query, (*identities(payload), since))
    names = {"email", "external_id"}
    return {name for (body,) in rows for name in digest(json.loads(body)) if name not in names}


def marks(values: Sized) -> str:
    """The placeholders of ``values`` in an ``IN (...)`` list."""
    return ", ".join("?" * len(values))
