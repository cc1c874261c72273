"""The "What Meisa received" page: the emulator's record, in order, with every field.

This is the one place where the app speaks HTTP itself, and not to Meisa: it reads the
embedded emulator's inspection endpoints (``/_emulator/requests``, ``contacts``,
``events``, ``sends``). It shows every email's codes and links to whoever can reach it,
so :func:`~example_app.create_app` registers it only on the emulator (development, see
:func:`~example_app.config.on_emulator`): against the real Meisa it does not exist.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import requests
from flask import Blueprint
from flask import current_app
from flask import render_template
from flask.typing import ResponseReturnValue

__all__ = ["Entry", "bp", "read_emulator", "timeline"]

bp = Blueprint("inspection", __name__)

_ADMIN_LISTS = ("requests", "contacts", "events", "sends")
_IDENTITY = ("email", "external_id", "first_name", "last_name", "display_name", "source")


@dataclass
class Entry:
    """One API request the emulator received, described for the page."""

    number: int
    kind: str  # "upsert", "event", "email", "suppression" or "other"
    title: str
    method: str
    path: str
    status: int | None
    time: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    custom_fields: list[tuple[str, str]] = field(default_factory=list)
    #: For an upsert: the custom fields whose value differs from the contact's last upsert.
    changed: set[str] = field(default_factory=set)


def show(value: Any) -> str:
    """A value as the page shows it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _clock(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _pairs(mapping: Any) -> list[tuple[str, str]]:
    if not isinstance(mapping, dict):
        return []
    return [(str(key), show(value)) for key, value in mapping.items()]


def _entry(number: int, record: dict[str, Any], sends: dict[str, dict[str, Any]]) -> Entry:
    path = str(record.get("path", ""))
    body = record.get("body") if isinstance(record.get("body"), dict) else {}
    assert isinstance(body, dict)
    entry = Entry(
        number=number,
        kind="other",
        title=f"{record.get('method', '')} {path}",
        method=str(record.get("method", "")),
        path=path,
        status=record.get("status"),
        time=_clock(record.get("time")),
    )
    if path.endswith("/contacts/upsert/"):
        entry.kind, entry.title = "upsert", "Contact upsert"
        entry.fields = [(name, show(body[name])) for name in _IDENTITY if name in body]
        if "tag_names" in body:
            entry.fields.append(("tag_names", show(body["tag_names"])))
        entry.custom_fields = _pairs(body.get("custom_fields"))
    elif path.endswith("/events/track/"):
        entry.kind, entry.title = "event", f"Event · {body.get('event_name', '')}"
        entry.fields = [
            (name, show(body[name]))
            for name in ("event_name", "email", "external_id")
            if name in body
        ]
        entry.custom_fields = _pairs(body.get("properties"))
    elif path.endswith("/emails/trigger/"):
        entry.kind, entry.title = "email", f"Email · {body.get('trigger_key', '')}"
        entry.fields = [
            (name, show(body[name]))
            for name in ("trigger_key", "to_email", "idempotency_key")
            if name in body
        ]
        send = sends.get(str(body.get("idempotency_key")))
        if send is not None:
            entry.fields.append(("outcome", show(send.get("status"))))
        entry.custom_fields = _pairs(body.get("variables"))
    elif path.endswith("/contacts/api/unsubscribed-emails/"):
        entry.kind, entry.title = "suppression", "Suppression list read"
    return entry


def timeline(records: list[dict[str, Any]], sends: list[dict[str, Any]]) -> list[Entry]:
    """The recorded requests, oldest first, as page entries."""
    by_key = {str(s.get("idempotency_key")): s for s in sends if s.get("idempotency_key")}
    entries = [_entry(n, record, by_key) for n, record in enumerate(records, start=1)]
    _mark_changes(entries, records)
    return entries


def _mark_changes(entries: list[Entry], records: list[dict[str, Any]]) -> None:
    # What each upsert changed, compared with the same contact's previous upsert.
    last: dict[str, dict[str, str]] = {}
    for entry, record in zip(entries, records, strict=True):
        body = record.get("body")
        if entry.kind != "upsert" or not isinstance(body, dict):
            continue
        contact = str(body.get("external_id") or str(body.get("email", "")).lower())
        fields = dict(entry.custom_fields)
        before = last.get(contact)
        if before is not None:
            entry.changed = {k for k, v in fields.items() if before.get(k) != v}
        last[contact] = {**(before or {}), **fields}


def read_emulator(root_url: str, timeout: float = 5.0) -> dict[str, list[dict[str, Any]]]:
    """GET each inspection list from the emulator at ``root_url``.

    :raises requests.RequestException: the emulator did not answer.
    """
    lists: dict[str, list[dict[str, Any]]] = {}
    with requests.Session() as http:
        for name in _ADMIN_LISTS:
            response = http.get(f"{root_url.rstrip('/')}/_emulator/{name}", timeout=timeout)
            response.raise_for_status()
            lists[name] = response.json()
    return lists


@bp.get("/meisa")
def received() -> ResponseReturnValue:
    """What the emulator received: every request in order, then the contacts it holds."""
    try:
        lists = read_emulator(str(current_app.config["EXAMPLE_EMULATOR_URL"]))
    except (requests.RequestException, ValueError) as error:
        current_app.logger.warning("the emulator could not be read: %s", type(error).__name__)
        return render_template("received.html", unreachable=True), 502
    entries = timeline(lists["requests"], lists["sends"])
    counts = {kind: sum(e.kind == kind for e in entries) for kind in ("upsert", "event", "email")}
    return render_template(
        "received.html",
        unreachable=False,
        entries=entries,
        counts=counts,
        contacts=lists["contacts"],
        show=show,
    )
