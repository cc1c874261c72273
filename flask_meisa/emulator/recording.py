"""The record of API requests, the path patterns that pick requests (``"/ping/"``,
``"/api/v1/ping/"`` or a glob like ``"/contacts/*/add_tag/"``), and waiting for something
to happen without polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from fnmatch import fnmatchcase
from typing import Any

from .model import mask_key

__all__ = ["BASE_PATH", "RecordedRequest", "Recorder", "path_matches", "relative_path"]

#: Where the API lives.
BASE_PATH = "/api/v1"


def relative_path(path: str) -> str:
    """``path`` without the ``/api/v1`` prefix (unchanged when it has none)."""
    if path.startswith(BASE_PATH + "/"):
        return path[len(BASE_PATH) :]
    return path


def path_matches(pattern: str, path: str) -> bool:
    """Whether ``path`` is ``pattern`` (globs allowed); both may carry ``/api/v1`` or not."""
    pattern, path = relative_path(pattern), relative_path(path)
    if any(ch in pattern for ch in "*?["):
        return fnmatchcase(path, pattern)
    return path == pattern


@dataclass(frozen=True)
class RecordedRequest:
    """One API request the emulator received (admin calls are not recorded)."""

    method: str
    #: The full path without the query, e.g. ``"/api/v1/ping/"``.
    path: str
    #: Query parameters (first value of each).
    query: Mapping[str, str]
    #: The ``X-API-Key`` sent (``None`` when missing). Left out of ``repr``.
    key: str | None = field(repr=False)
    #: The parsed JSON body; the raw text when it was not JSON; ``None`` when empty.
    body: Any
    #: The status answered; ``None`` when the connection was dropped without an answer.
    status: int | None
    #: When it arrived, emulator clock, seconds since the epoch.
    time: float
    #: Seconds spent answering (latency faults included).
    duration: float
    #: The fault that shaped the answer: ``error``, ``error_after``, ``drop``,
    #: ``drop_after``, ``429``, ``outage``; ``None`` when none did.
    fault: str | None = None
    #: The request headers, without ``X-API-Key``.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def key_hint(self) -> str | None:
        """A masked form of :attr:`key`, safe to print."""
        return mask_key(self.key) if self.key else None

    def to_json(self) -> dict[str, Any]:
        """The request as ``GET /_emulator/requests`` shows it (key masked)."""
        return {
            "method": self.method,
            "path": self.path,
            "query": dict(self.query),
            "key_hint": self.key_hint,
            "body": self.body,
            "status": self.status,
            "time": self.time,
            "duration": self.duration,
            "fault": self.fault,
        }


class Recorder:
    """The requests received, and a condition notified after every request or change."""

    def __init__(self) -> None:
        # Re-entrant: a predicate given to wait_for may read the record itself.
        self._condition = threading.Condition(threading.RLock())
        self._items: list[RecordedRequest] = []

    def add(self, item: RecordedRequest) -> None:
        """Record a request and wake every waiter."""
        with self._condition:
            self._items.append(item)
            self._condition.notify_all()

    def notify(self) -> None:
        """Wake every waiter (the state changed without a request)."""
        with self._condition:
            self._condition.notify_all()

    def matching(
        self, path: str | None = None, method: str | None = None
    ) -> list[RecordedRequest]:
        """The recorded requests (to ``path``, a pattern, and by ``method`` when given),
        oldest first."""
        with self._condition:
            return [
                r
                for r in self._items
                if (path is None or path_matches(path, r.path))
                and (method is None or r.method == method.upper())
            ]

    def clear(self) -> None:
        """Forget every recorded request."""
        with self._condition:
            self._items.clear()
            self._condition.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (re-checked after each notification) or time out."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True
