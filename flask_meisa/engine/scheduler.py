"""What to deliver next: lanes by priority, per-contact order and coalescing, retry timers
and the bound on what is held.

The :class:`Scheduler` is a plain data structure driven by one delivery engine under that
engine's lock; it never sleeps, never calls Meisa and takes the time as an argument.

Rules it keeps:

- Three lanes, served strictly in order: transactional sends, contact syncs (upserts),
  events. Only entries free to go sit in a lane, so picking the next call is O(1).
- Per contact (``external_id`` first, then ``email``, see
  :func:`~flask_meisa.operations.contact_key`): one upsert at a time. A later upsert
  merges into one still waiting (queued or waiting to retry) and takes no new slot; one
  that arrives while the earlier is in flight waits behind it, and is merged into it if
  that call has to be retried.
- A contact's events wait while the contact has an upsert pending (queued, waiting or in
  flight), and go one at a time in the order they came, so an event never overtakes its
  contact's upsert or an earlier event.
- An event answered 404 is requeued behind an upsert made from the event's ``contact``
  payload or from the latest upsert payload seen for the contact (:meth:`recover`).
- At ``capacity`` entries held, the lowest lane sheds first: the oldest event not in
  flight, then the oldest upsert not in flight; a new operation that is itself the lowest
  is refused instead. Transactional sends are never shed; a send that cannot be held
  raises :class:`QueueFull`.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import OrderedDict
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Any

from ..operations import LANE_EVENTS
from ..operations import LANE_SYNC
from ..operations import LANE_TRANSACTIONAL
from ..operations import Operation

__all__ = [
    "LANE_NAMES",
    "AddOutcome",
    "Counts",
    "Entry",
    "EntryState",
    "QueueFull",
    "Scheduler",
]

#: Lane names as :class:`~flask_meisa.engine.base.DeliveryStatus` reports them.
LANE_NAMES: dict[int, str] = {
    LANE_TRANSACTIONAL: "transactional",
    LANE_SYNC: "sync",
    LANE_EVENTS: "events",
}
_LANES = tuple(sorted(LANE_NAMES))
#: The lanes that may be shed, lowest priority first.
_SHEDDABLE = (LANE_EVENTS, LANE_SYNC)


class QueueFull(Exception):
    """A transactional send could not be held: everything held is a send or in flight."""


class EntryState(enum.Enum):
    """Where an entry is in its life."""

    QUEUED = "queued"
    WAITING = "waiting"
    IN_FLIGHT = "in_flight"
    DONE = "done"


@dataclass(eq=False)
class Entry:
    """One call the scheduler holds, and the submitted operations whose outcome it decides.

    ``call`` is what is sent. ``members`` are the operations submitted by the app: one, or
    several upserts coalesced into one call, or none for an upsert the engine made itself
    to recover an event answered 404 (``recovery_for`` is that event).
    """

    seq: int
    call: Operation
    members: list[Operation]
    key: str | None
    state: EntryState = EntryState.QUEUED
    ready_at: float = 0.0
    attempts: int = 0
    first_attempt: float | None = None
    recovered: bool = False
    recovery_for: Entry | None = None
    _own_call: bool = field(default=False, repr=False)

    @property
    def lane(self) -> int:
        """The entry's lane (see :mod:`flask_meisa.operations`)."""
        return self.call.lane

    def absorb(self, call: Operation, members: list[Operation]) -> None:
        """Merge a later upsert of the same contact into this entry's call."""
        if not self._own_call:
            # The submitted operation keeps its own payload; the merge goes to a copy.
            self.call = replace(self.call, payload=dict(self.call.payload))
            self._own_call = True
        self.call.merge(call)
        self.members.extend(members)

    def describe(self) -> str:
        """A log-safe description (no payload values)."""
        text = self.call.describe()
        if len(self.members) > 1:
            text += f" (coalesced from {len(self.members)} operations)"
        elif not self.members:
            text += " (to recover an event answered 404)"
        return text


@dataclass
class _Contact:
    upserts: deque[Entry] = field(default_factory=deque)
    events: deque[Entry] = field(default_factory=deque)


@dataclass
class AddOutcome:
    """What :meth:`Scheduler.add` did: the new ``entry``, or the entry the operation was
    ``merged`` into; ``shed`` lists the operations dropped to make room (the new one
    included when it was refused)."""

    entry: Entry | None = None
    merged: Entry | None = None
    shed: list[Operation] = field(default_factory=list)


@dataclass
class Counts:
    """Entries held, by state; ``queued`` by lane name."""

    queued: dict[str, int]
    in_flight: int
    waiting: int


class Scheduler:
    """Lanes, contacts and timers of one engine (see the module's docstring).

    :param capacity: the most entries held at once (in flight included).
    :param recent: how many contacts' latest upsert payloads to remember for 404
        recovery.
    """

    def __init__(self, capacity: int, *, recent: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._recent_size = recent
        self._seq = itertools.count()
        self._held: dict[int, OrderedDict[int, Entry]] = {lane: OrderedDict() for lane in _LANES}
        self._ready: dict[int, OrderedDict[int, Entry]] = {lane: OrderedDict() for lane in _LANES}
        self._contacts: dict[str, _Contact] = {}
        self._timers: list[tuple[float, int, Entry]] = []
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())

    def entries(self) -> Iterator[Entry]:
        """Every entry held, lane by lane, oldest first."""
        for lane in _LANES:
            yield from list(self._held[lane].values())

    def counts(self) -> Counts:
        """How many entries are queued (by lane), in flight and waiting to retry."""
        queued = dict.fromkeys(LANE_NAMES.values(), 0)
        in_flight = waiting = 0
        for lane in _LANES:
            for entry in self._held[lane].values():
                if entry.state is EntryState.QUEUED:
                    queued[LANE_NAMES[lane]] += 1
                elif entry.state is EntryState.IN_FLIGHT:
                    in_flight += 1
                elif entry.state is EntryState.WAITING:
                    waiting += 1
        return Counts(queued, in_flight, waiting)

    def next_lane(self, now: float) -> int | None:
        """The lane :meth:`take` would take from now, or ``None`` when nothing may go (due
        retries are moved to their lane first)."""
        self._promote(now)
        return next((lane for lane in _LANES if self._ready[lane]), None)

    def next_due(self) -> float | None:
        """When the earliest retry comes due, or ``None`` when none waits."""
        while self._timers and self._stale(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    # -- taking work in ------------------------------------------------------------------

    def add(self, operation: Operation) -> AddOutcome:
        """Hold an operation (or merge it into its contact's waiting upsert).

        :raises QueueFull: for a send when nothing held can be shed.
        """
        key = operation.contact_key
        if operation.kind == "upsert" and key is not None:
            contact = self._contacts.get(key)
            if (
                contact
                and contact.upserts
                and contact.upserts[-1].state is not EntryState.IN_FLIGHT
            ):
                target = contact.upserts[-1]
                target.absorb(operation, [operation])
                self._remember(key, target.call.payload)
                return AddOutcome(merged=target)
        outcome = AddOutcome()
        if len(self) >= self.capacity:
            victim = self._victim(operation.lane)
            if victim is None:
                if operation.kind == "send":
                    raise QueueFull(operation.describe())
                outcome.shed.append(operation)
                return outcome
            self._remove(victim)
            outcome.shed.extend(victim.members)
        entry = Entry(next(self._seq), operation, [operation], key)
        self._insert(entry)
        if operation.kind == "upsert" and key is not None:
            self._remember(key, operation.payload)
        outcome.entry = entry
        return outcome

    def _victim(self, new_lane: int) -> Entry | None:
        for lane in _SHEDDABLE:
            for entry in self._held[lane].values():
                if entry.state is not EntryState.IN_FLIGHT:
                    return entry
            if lane == new_lane:
                return None  # the newcomer is the oldest of the lowest lane left
        return None

    def _insert(self, entry: Entry) -> None:
        self._held[entry.lane][entry.seq] = entry
        contact = self._contact_of(entry)
        if contact is None:
            self._set_ready(entry, entry.state is EntryState.QUEUED)
            return
        if entry.call.kind == "upsert":
            contact.upserts.append(entry)
        else:
            contact.events.append(entry)
        self._refresh(contact)

    # -- handing work out ----------------------------------------------------------------

    def take(self, now: float) -> Entry | None:
        """The next entry to call, highest lane first, marked in flight; ``None`` if none."""
        self._promote(now)
        for lane in _LANES:
            ready = self._ready[lane]
            if ready:
                _, entry = ready.popitem(last=False)
                entry.state = EntryState.IN_FLIGHT
                entry.attempts += 1
                if entry.first_attempt is None:
                    entry.first_attempt = now
                return entry
        return None

    def finish(self, entry: Entry) -> None:
        """The entry is over (delivered, failed or skipped): forget it and free what
        waited behind it."""
        if entry.state is not EntryState.DONE:
            self._remove(entry)

    def forget_upsert(self, key: str) -> None:
        """Forget a contact's remembered upsert payload (it was refused)."""
        self._recent.pop(key, None)

    def retry_at(self, entry: Entry, when: float) -> None:
        """Park an entry until ``when``. An upsert that arrived for the same contact while
        this one was in flight is merged into it now."""
        entry.state = EntryState.WAITING
        entry.ready_at = when
        contact = self._contact_of(entry)
        if contact is not None and entry.call.kind == "upsert":
            while len(contact.upserts) > 1 and contact.upserts[0] is entry:
                later = contact.upserts[1]
                self._remove(later)
                entry.absorb(later.call, later.members)
        heapq.heappush(self._timers, (when, entry.seq, entry))
        if contact is not None:
            self._refresh(contact)
        else:
            self._set_ready(entry, False)

    def recover(self, event: Entry) -> bool:
        """Requeue an event answered 404 behind an upsert of its contact.

        The upsert is the contact's pending one if there is one, else one made from the
        event's ``contact`` payload or the latest remembered payload. Returns ``False``
        (nothing changed) when the event was recovered once already or no payload is
        known.
        """
        contact = self._contact_of(event)
        if event.recovered or contact is None or event.state is EntryState.DONE:
            return False
        if not contact.upserts:
            payload = event.call.contact or self._recent.get(event.key or "")
            if not payload:
                return False
            upsert = Entry(
                next(self._seq),
                Operation(kind="upsert", payload=dict(payload)),
                [],
                event.key,
                recovery_for=event,
                _own_call=True,
            )
            self._held[upsert.lane][upsert.seq] = upsert
            contact.upserts.append(upsert)
        event.recovered = True
        event.state = EntryState.QUEUED
        self._refresh(contact)
        return True

    def drain(self) -> list[Entry]:
        """Remove and return every entry held, in flight included (at shutdown)."""
        entries = list(self.entries())
        for entry in entries:
            self._remove(entry)
        self._timers.clear()
        return entries

    # -- internals -----------------------------------------------------------------------

    def _contact_of(self, entry: Entry) -> _Contact | None:
        if entry.key is None or entry.call.kind == "send":
            return None
        contact = self._contacts.get(entry.key)
        if contact is None:
            contact = self._contacts[entry.key] = _Contact()
        return contact

    def _remember(self, key: str, payload: dict[str, Any]) -> None:
        self._recent[key] = payload
        self._recent.move_to_end(key)
        while len(self._recent) > self._recent_size:
            self._recent.popitem(last=False)

    def _remove(self, entry: Entry) -> None:
        self._held[entry.lane].pop(entry.seq, None)
        self._ready[entry.lane].pop(entry.seq, None)
        entry.state = EntryState.DONE
        if entry.key is None or entry.call.kind == "send":
            return
        contact = self._contacts.get(entry.key)
        if contact is None:
            return
        queue = contact.upserts if entry.call.kind == "upsert" else contact.events
        if entry in queue:
            queue.remove(entry)
        if contact.upserts or contact.events:
            self._refresh(contact)
        else:
            del self._contacts[entry.key]

    def _refresh(self, contact: _Contact) -> None:
        """Put exactly the contact's entries that are free to go into their lanes."""
        for index, upsert in enumerate(contact.upserts):
            self._set_ready(upsert, index == 0 and upsert.state is EntryState.QUEUED)
        if contact.events:
            head = contact.events[0]
            self._set_ready(head, not contact.upserts and head.state is EntryState.QUEUED)

    def _set_ready(self, entry: Entry, ready: bool) -> None:
        lane = self._ready[entry.lane]
        if not ready:
            lane.pop(entry.seq, None)
        elif entry.seq not in lane:
            lane[entry.seq] = entry

    def _stale(self, timer: tuple[float, int, Entry]) -> bool:
        when, _, entry = timer
        return entry.state is not EntryState.WAITING or entry.ready_at != when

    def _promote(self, now: float) -> None:
        while self._timers and (self._stale(self._timers[0]) or self._timers[0][0] <= now):
            _, _, entry = heapq.heappop(self._timers)
            if entry.state is not EntryState.WAITING or entry.ready_at > now:
                continue
            entry.state = EntryState.QUEUED
            contact = self._contact_of(entry)
            if contact is None:
                self._set_ready(entry, True)
            else:
                self._refresh(contact)
