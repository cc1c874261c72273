"""The TTL-cached suppression set: addresses Meisa says not to email, answered without a
lock, refreshed in the background, never making a sender wait longer than it asked."""

from __future__ import annotations

import datetime as dt
import logging
import operator
import threading
import time
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import errors
from ._payloads import address_key
from ._threads import start_daemon
from .results import UnsubscribedEmails

_logger = logging.getLogger("flask_meisa.suppression")

#: Local additions beyond this many push out the oldest (with a warning).
_MAX_LOCAL = 100_000


@dataclass(frozen=True, slots=True)
class _Loaded:  # one successful load, published whole and never changed
    emails: frozenset[str]
    as_of: str | None
    loaded_at: float


class SuppressionSet:
    """A per-process set of addresses not to email, refreshed from Meisa every ``ttl`` seconds.

    :param fetch: returns what ``client.unsubscribed_emails()`` does: ``emails`` (in any case,
        maybe padded) and Meisa's ``as_of``; runs in the caller's or a background thread,
        never under the lock.
    :param ttl: seconds a loaded list stays fresh.
    :param retry_interval: seconds to wait after a failed load before fetching again.
    :param clock: monotonic seconds (tests advance their own).
    """

    def __init__(
        self,
        fetch: Callable[[], Any],
        *,
        ttl: float = 300.0,
        retry_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise errors.ConfigurationError("ttl must be a positive number of seconds")
        if not retry_interval >= 0:
            raise errors.ConfigurationError("retry_interval must be zero or more seconds")
        self._fetch = fetch
        self._ttl = float(ttl)
        self._retry_interval = float(retry_interval)
        self._clock = clock
        self._current: _Loaded | None = None  # read without the lock, replaced under it
        # address -> how many fetches had started when it was added.
        self._local: dict[str, int] = {}
        # The rest is guarded by the lock.
        self._fetches = 0  # fetches started
        self._loading = False
        self._retry_at: float | None = None
        #: Why the last fetch failed, or ``None`` once a fetch succeeded after it.
        self.last_error: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()  # notified when a fetch ends

    def __repr__(self) -> str:
        if self._current is None:
            return f"<{type(self).__name__} not loaded>"
        return f"<{type(self).__name__} count={self.count} as_of={self.as_of!r}>"

    def is_suppressed(self, email: str, *, wait: float | None = None) -> bool:
        """Whether Meisa (or :meth:`add`) says not to email ``email``, in any case. The first
        use loads the list, waiting at most ``wait`` seconds (``None``: until it is loaded or
        failed); a stale list answers while a background refresh runs."""
        key = _key(email)
        current = self._current
        stale = current is not None and self._clock() >= current.loaded_at + self._ttl
        if current is None or (stale and not self._loading):
            with self._lock:
                if self._current is current:
                    self._start_refresh(respect_retry=True)
            # Said only when the caller chose to wait (a queued send is checked again).
            if current is None and not self.wait_for_refresh(wait) and wait != 0:
                _logger.warning(
                    "Meisa suppression list not loaded within %gs; going on without it "
                    "while it loads",
                    wait,
                )
        return self.peek(key)

    def peek(self, email: str) -> bool:
        """Like :meth:`is_suppressed`, from what is held now: never loads, never refreshes."""
        key = _key(email)
        current = self._current
        return key in self._local or (current is not None and key in current.emails)

    def add(self, email: str) -> None:
        """Suppress ``email`` locally (after a 422 ``recipient_suppressed``) until a load
        whose fetch started after this call succeeds."""
        key = _key(email)
        with self._lock:
            self._local.pop(key, None)
            self._local[key] = self._fetches
            overflow = len(self._local) > _MAX_LOCAL
            if overflow:
                del self._local[next(iter(self._local))]
        if overflow:
            _logger.warning(
                "Meisa suppression set: over %d local additions, dropped the oldest", _MAX_LOCAL
            )

    def load(self) -> bool:
        """Fetch the list now, in this thread (after any fetch running), ignoring
        ``retry_interval``; ``True`` on success. Never raises: see :attr:`last_error`."""
        with self._lock:
            self._lock.wait_for(lambda: not self._loading)
            self._loading = True
            self._fetches += 1
        return self._run_fetch()

    def refresh_in_background(self) -> bool:
        """Start a refresh thread (ignoring ``retry_interval``) unless a fetch is running
        or the set is closed; whether one was started."""
        with self._lock:
            return self._start_refresh(respect_retry=False)

    def wait_for_refresh(self, timeout: float | None = None) -> bool:
        """Wait until no fetch is running; ``True`` if none is running by the end."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._loading, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop refreshing (answers come from the last list; :meth:`load` still works) and
        join a running refresh for at most ``timeout`` seconds."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def after_fork(self) -> None:
        """In a forked child: the parent's lock and refresh thread are not ours."""
        self._lock = threading.Condition()
        self._loading = False
        self._thread = None

    @property
    def loaded(self) -> bool:
        """Whether a list has ever been loaded."""
        return self._current is not None

    @property
    def count(self) -> int:
        """How many addresses the loaded list holds (local additions not counted)."""
        return 0 if self._current is None else len(self._current.emails)

    @property
    def as_of(self) -> str | None:
        """Meisa's ``as_of`` of the loaded list, or ``None``."""
        return None if self._current is None else self._current.as_of

    @property
    def age(self) -> float | None:
        """Seconds (by the clock) since the last successful load, or ``None``."""
        return None if self._current is None else self._clock() - self._current.loaded_at

    def _start_refresh(self, *, respect_retry: bool) -> bool:  # with the lock held
        if self._loading or self._closed:
            return False
        if respect_retry and self._retry_at is not None and self._clock() < self._retry_at:
            return False
        self._loading = True
        self._fetches += 1
        try:
            thread = start_daemon(self._run_fetch, "flask-meisa-suppression-refresh")
        except RuntimeError:  # no new threads at interpreter shutdown
            self._loading = False
            self._lock.notify_all()
            return False
        self._thread = thread
        return True

    def _run_fetch(self) -> bool:
        # Fetches never overlap (``_loading``): only this one changes ``_current`` and
        # ``_fetches`` counts it.
        try:
            loaded = _read_snapshot(self._fetch(), self._clock)
        except Exception as exc:
            # flask-meisa's errors never carry payload values or keys; other text might, so
            # only their type is told.
            error = str(exc) if isinstance(exc, errors.MeisaError) else type(exc).__name__
            with self._lock:
                self._retry_at = self._clock() + self._retry_interval
                self.last_error = error
            _logger.warning(
                "Meisa suppression list %s%s",
                f"refresh failed ({error}); keeping the last list"
                if self._current is not None
                else f"could not be loaded ({error}); suppressing nothing until it loads",
                ""
                if isinstance(exc, errors.EngineClosed)  # exiting: there is no next one
                else f"; next attempt in {self._retry_interval:g}s",
            )
            return False
        else:
            with self._lock:
                self._current = loaded
                # Additions made before this fetch started are now Meisa's to answer for.
                self._local = {k: v for k, v in self._local.items() if v >= self._fetches}
                self._retry_at = self.last_error = None
            _logger.debug(
                "Meisa suppression list loaded: %d addresses as of %s",
                len(loaded.emails),
                loaded.as_of,
            )
            return True
        finally:
            # Cleared last: wait_for_refresh returns once the outcome is installed and logged.
            with self._lock:
                self._loading = False
                self._lock.notify_all()


def _key(email: object) -> str:
    if not isinstance(email, str):
        raise errors.ValidationError("email", "must be a string")
    key = address_key(email)
    if not key:
        raise errors.ValidationError("email", "must not be blank")
    return key


def _normalized(emails: Iterable[object]) -> frozenset[str]:
    if not isinstance(emails, Collection):
        emails = tuple(emails)  # the fallback below must be able to iterate again
    try:
        # Already lowercase and unpadded (C-speed passes, no copies): share the client's set
        # instead of holding a second copy.
        if (
            isinstance(emails, frozenset)
            and all(map(str.islower, emails))
            and all(map(operator.is_, emails, map(str.strip, emails)))
        ):
            keys = emails
        else:
            keys = frozenset(map(str.lower, map(str.strip, emails)))
    except TypeError:  # an entry that is not a string
        keys = frozenset(e.strip().lower() for e in emails if isinstance(e, str))
    if not all(map(str.isascii, keys)):  # a domain may have another form than its NFC
        keys = frozenset(map(address_key, keys))
    return keys - {""} if "" in keys else keys


def _read_snapshot(snapshot: Any, clock: Callable[[], float]) -> _Loaded:
    try:
        emails: object = snapshot.emails
        as_of: object = snapshot.as_of
    except AttributeError:
        raise errors.MeisaError("the answer has no emails or as_of") from None
    if isinstance(emails, (str, bytes)) or not isinstance(emails, Iterable):
        raise errors.MeisaError("the answer's emails is not a collection of addresses")
    if isinstance(snapshot, UnsubscribedEmails):  # read leniently: was there a list at all?
        raw = snapshot.raw
        listed = raw.get("emails") if isinstance(raw, Mapping) else None
        # Entries none of which is an address (objects, say) are no list of emails either.
        addresses = isinstance(listed, list) and any(isinstance(e, str) for e in listed)
        if not isinstance(listed, list) or (listed and not addresses):
            raise errors.MeisaError("the answer holds no list of emails")
    if isinstance(as_of, dt.datetime):
        as_of = as_of.isoformat()
    return _Loaded(_normalized(emails), None if as_of is None else str(as_of), clock())
