"""The Python handle: start an emulator, read its state, shape it, inject faults, wait
(its mirror over HTTP, the admin API, is :mod:`.admin`)."""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import asdict
from types import TracebackType
from typing import Any
from typing import Literal

from . import admin
from .clock import Clock
from .clock import ClockLike
from .faults import Faults
from .model import ENVIRONMENTS
from .model import INHERIT
from .model import LISTS
from .model import Inherit
from .model import Sequence
from .model import Trigger
from .ratelimit import parse_rules
from .recording import BASE_PATH
from .recording import RecordedRequest
from .recording import Recorder
from .server import Backend
from .server import EmulatorServer
from .state import DEFAULT_RATE_LIMIT
from .state import DEFAULT_SENDER
from .state import EnvState
from .state import SeedSource
from .state import Store
from .state import load_seed

__all__ = ["Emulator"]

#: What ``state()`` counts in each environment.
_COUNTED = (*LISTS, "suppressions")


class Emulator:
    """A stateful Meisa API on loopback, for tests, examples and benchmarks.

    :param seed: ``"demo"`` (the packaged ``seed.json``), a path to a seed file, a seed
        dict, or ``None`` for an empty product (with a sender and generated keys).
    :param rate_limit: every key's default limit, e.g. ``"60/minute;1000/hour"``;
        ``None`` disables rate limiting.
    :param host: the address to listen on (loopback by default).
    :param port: the port; ``0`` picks a free one.
    :param send_guardrail: per-recipient send limit of ``/emails/trigger/``, e.g.
        ``"3/hour"``; ``None`` disables it; by default the seed's.
    :param clock: the clock to read (default: real time that :meth:`advance_clock` moves).
    :param fault_seed: seeds the random choices of ``error_rate`` and ``drop_rate``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        seed: SeedSource = "demo",
        rate_limit: str | None = DEFAULT_RATE_LIMIT,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        send_guardrail: str | Literal[Inherit.INHERIT] | None = INHERIT,
        clock: ClockLike | None = None,
        fault_seed: int | None = None,
    ) -> None:
        self._seed = load_seed(seed)
        self._is_demo = seed == "demo"
        self._clock: ClockLike = clock if clock is not None else Clock()
        self._rate_limit = rate_limit
        self._store = Store(
            self._seed, clock=self._clock, rate_limit=rate_limit, send_guardrail=send_guardrail
        )
        # Generated keys go into the seed, so that reset() brings back the same ones.
        self._seed["keys"] = [k.seed_entry() for k in self._store.keys.values()]
        #: Fault injection (see :class:`~.faults.Faults`).
        self.faults = Faults(self._clock, seed=fault_seed)
        self._recorder = Recorder()
        self._host = host
        self._port = port
        self._server: EmulatorServer | None = None
        self._lifecycle = threading.Lock()

    # Lifecycle

    def start(self) -> Emulator:
        """Start serving (no-op when already started); returns the emulator."""
        with self._lifecycle:
            if self._server is None:
                answer = functools.partial(admin.answer, self)
                backend = Backend(self._store, self.faults, self._recorder, answer)
                self._server = EmulatorServer(backend, self._host, self._port)
                # A restart binds the same port again, so URLs handed out stay valid.
                self._port = self._server.port
        return self

    def stop(self) -> None:
        """Stop serving: close every client connection and join every thread.

        :meth:`start` serves again on the same port (state, faults and record kept).
        """
        with self._lifecycle:
            server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Emulator {self.root_url if self._server else 'stopped'}>"

    @property
    def running(self) -> bool:
        """Whether the emulator is serving."""
        return self._server is not None

    @property
    def root_url(self) -> str:
        """``http://<host>:<port>`` (once started; it stays the same after a stop or restart)."""
        if not self._port:
            raise RuntimeError("the emulator was never started")
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        return f"http://{host}:{self._port}"

    @property
    def url(self) -> str:
        """The API base URL, ``http://<host>:<port>/api/v1`` (no trailing slash)."""
        return self.root_url + BASE_PATH

    @property
    def is_demo(self) -> bool:
        """Whether the packaged demo seed is loaded."""
        return self._is_demo

    # Keys and settings

    @property
    def live_key(self) -> str:
        """A live key with every scope (the seed's first, else a generated one)."""
        return self._store.live_key

    @property
    def test_key(self) -> str:
        """A test key with every scope (the seed's first, else a generated one)."""
        return self._store.test_key

    @property
    def keys(self) -> dict[str, str]:
        """Every key by name (the seed's names; others ``<environment>-<n>`` or as created)."""
        with self._store.lock:
            return {k.name: k.key for k in self._store.keys.values()}

    def key_scopes(self, key: str) -> list[str]:
        """The scopes of a key, sorted (``KeyError`` for an unknown key)."""
        with self._store.lock:
            return sorted(self._store.keys[key].scopes)

    def create_key(
        self,
        scopes: Iterable[str] | None = None,
        environment: str = "live",
        rate_limit: str | Literal[Inherit.INHERIT] | None = INHERIT,
        *,
        name: str | None = None,
    ) -> str:
        """A new key: ``scopes`` None means all; ``rate_limit`` defaults to the emulator's."""
        scope_list = None if scopes is None else list(scopes)
        key = self._store.add_key(
            environment=environment, scopes=scope_list, rate_limit=rate_limit, name=name
        )
        return key.key

    def set_rate_limit(
        self, rate_limit: str | Literal[Inherit.INHERIT] | None, key: str | None = None
    ) -> None:
        """Change every inheriting key's limit (``key`` None), or one key's; windows start
        afresh."""
        if rate_limit is not None and rate_limit is not INHERIT:
            parse_rules(rate_limit)
        store = self._store
        with store.lock:
            if key is None:
                if rate_limit is INHERIT:
                    raise ValueError("the emulator-wide limit cannot inherit")
                store.rate_limit = rate_limit
                targets = [k for k in store.keys.values() if k.rate_limit is INHERIT]
            else:
                targets = [store.keys[key]]
                targets[0].rate_limit = rate_limit
            for api_key in targets:
                api_key.limiter = store.limiter_for(api_key)

    def set_send_guardrail(self, spec: str | None) -> None:
        """Change the per-recipient send guardrail, e.g. ``"3/hour"``; ``None`` disables."""
        if spec is not None:
            parse_rules(spec)
        with self._store.lock:
            self._store.send_guardrail = spec
            for env in self._store.envs.values():
                env.guardrails.clear()

    def set_sender(self, configured: bool) -> None:
        """Give the product a sender or take it away (triggers then answer 422 no_sender)."""
        with self._store.lock:
            sender = self._store.sender or dict(DEFAULT_SENDER)
            self._store.sender = sender if configured else None
        self._recorder.notify()

    def add_trigger(
        self,
        key: str,
        *,
        active: bool = True,
        delay_seconds: float = 0,
        conditions: Any = None,
        name: str | None = None,
    ) -> None:
        """Configure a trigger.

        ``conditions``: e.g. ``{"custom_field": "plan", "equals": "pro"}`` (see the docs).
        """
        trigger = Trigger(key, name or "", active, delay_seconds, conditions)
        with self._store.lock:
            self._store.triggers[key] = trigger

    def add_sequence(
        self, slug: str, *, name: str | None = None, status: str = "active", steps: int = 3
    ) -> None:
        """Configure a sequence (``status``: active, paused or archived)."""
        sequence = Sequence(slug, name or "", status, steps)
        with self._store.lock:
            self._store.sequences[slug] = sequence

    def suppress(
        self, email: str, reason: str = "unsubscribed", environment: str | None = None
    ) -> None:
        """Put an address on the suppression list (of both environments by default)."""
        with self._store.lock:
            now = self._clock.time()
            for env in self._envs(environment):
                env.suppress(email, reason, now)
        self._recorder.notify()

    def unsuppress(self, email: str, environment: str | None = None) -> None:
        """Take an address off the suppression list (of both environments by default)."""
        with self._store.lock:
            for env in self._envs(environment):
                env.suppressions.pop(email.lower(), None)
        self._recorder.notify()

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock forward (rate windows, idempotency hour, outages)."""
        self._clock.advance(seconds)
        self._recorder.notify()

    def now(self) -> float:
        """The emulator clock's time, seconds since the epoch."""
        return self._clock.time()

    def clear_requests(self) -> None:
        """Forget the recorded requests (state and faults stay)."""
        self._recorder.clear()

    def reset(self) -> None:
        """Back to the seed: state, keys and limits as constructed; no faults, no requests."""
        with self._store.lock:
            self._store.rate_limit = self._rate_limit
            self._store.load(self._seed)
        self.faults.clear()
        self._recorder.clear()

    # Reading the state

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every API request received so far, oldest first (a copy)."""
        return self._recorder.matching()

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        """The requests to ``path`` (``"/ping/"``, ``"/api/v1/ping/"`` or a glob)."""
        return self._recorder.matching(path, method)

    def contacts(self, environment: str = "live") -> list[dict[str, Any]]:
        """Every contact of an environment, as the API shows them, oldest first."""
        with self._store.lock:
            env = self._env(environment)
            return [env.contact_json(c) for c in env.contacts.values()]

    def contact(
        self,
        email: str | None = None,
        external_id: str | None = None,
        environment: str = "live",
    ) -> dict[str, Any] | None:
        """The contact with this external id or address (case-insensitive), or ``None``."""
        if email is None and external_id is None:
            raise ValueError("give an email or an external_id")
        with self._store.lock:
            env = self._env(environment)
            found = env.find(email=email, external_id=external_id)
            return env.contact_json(found) if found else None

    def events(
        self, environment: str = "live", *, event_name: str | None = None
    ) -> list[dict[str, Any]]:
        """Tracked events, oldest first (optionally only those named ``event_name``)."""
        return self._copies(environment, "events", "event_name", event_name)

    def sends(
        self, environment: str = "live", *, trigger_key: str | None = None
    ) -> list[dict[str, Any]]:
        """Recorded sends (sent or scheduled; not skipped or refused), oldest first."""
        return self._copies(environment, "sends", "trigger_key", trigger_key)

    def enrollments(
        self, environment: str = "live", *, sequence_slug: str | None = None
    ) -> list[dict[str, Any]]:
        """Enrollments, oldest first (optionally only in ``sequence_slug``)."""
        with self._store.lock:
            env = self._env(environment)
            return [
                env.enrollment_json(e)
                for e in env.enrollments
                if sequence_slug is None or e.sequence_slug == sequence_slug
            ]

    def suppressions(self, environment: str = "live") -> dict[str, str]:
        """The suppression list: address -> reason."""
        with self._store.lock:
            return {e[0]: e[1] for e in self._env(environment).suppressions.values()}

    def state(self) -> dict[str, Any]:
        """The configuration and counts (what ``GET /_emulator/state`` shows)."""
        store = self._store
        with store.lock:
            sender = dict(store.sender) if store.sender else None
            state: dict[str, Any] = {
                "product": {"id": store.product_id, "name": store.product_name, "sender": sender},
                "rate_limit": store.rate_limit,
                "send_guardrail": store.send_guardrail,
                "keys": [k.to_json() for k in store.keys.values()],
                "triggers": [asdict(t) for t in store.triggers.values()],
                "sequences": [asdict(s) for s in store.sequences.values()],
                "environments": {
                    name: {kind: len(getattr(env, kind)) for kind in _COUNTED}
                    for name, env in store.envs.items()
                },
            }
        # Outside the state's lock: a wait_for predicate holds the record's lock and may
        # take the state's.
        state["url"] = self.url if self._server else None
        state["faults"] = self.faults.snapshot()
        state["requests"] = len(self.requests)
        return state

    # Waiting

    def wait_for(self, predicate: Callable[[Emulator], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate(emulator)`` holds; re-checked after every request or change.

        Returns ``False`` on timeout.
        """
        return self._recorder.wait_for(lambda: predicate(self), timeout)

    def wait_for_requests(self, n: int, path: str | None = None, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` requests (to ``path``, if given) were answered."""
        return self._recorder.wait_for(lambda: len(self._recorder.matching(path)) >= n, timeout)

    def _copies(
        self, environment: str, kind: str, field: str, value: str | None
    ) -> list[dict[str, Any]]:
        with self._store.lock:
            records = getattr(self._env(environment), kind)
            return copy.deepcopy([r for r in records if value is None or r[field] == value])

    def _env(self, environment: str) -> EnvState:
        if environment not in ENVIRONMENTS:
            raise ValueError("environment must be 'live' or 'test'")
        return self._store.envs[environment]

    def _envs(self, environment: str | None) -> list[EnvState]:
        if environment is None:
            return list(self._store.envs.values())
        return [self._env(environment)]
