"""The :class:`Meisa` extension: registration, the login and plan hooks, upsert/track/send."""

from __future__ import annotations

import functools
import inspect
import logging
import numbers
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import Literal
from typing import TypeVar
from typing import cast
from weakref import WeakKeyDictionary

from flask import Flask
from flask import current_app
from flask import has_app_context
from flask_login import user_logged_in

from . import _contacts
from . import _deferral as deferral
from . import signals
from ._engine.base import DeliveryStatus
from ._engine.base import Dispatcher
from ._engine.base import in_hook
from ._payloads import flag
from ._payloads import normalize_email
from ._payloads import to_json_value
from ._payloads import track_body
from ._payloads import trigger_body
from ._payloads import upsert_body
from ._runtime import MeisaState
from .client import MeisaClient
from .config import DEFAULTS
from .config import MeisaSettings
from .errors import APIError
from .errors import EngineClosed
from .errors import ValidationError
from .operations import Operation
from .operations import deliver
from .results import SendResult

__all__ = ["Meisa"]

logger = logging.getLogger("flask_meisa")

F = TypeVar("F", bound=Callable[..., Any])


class Meisa:
    """The Flask extension: syncs users to Meisa and sends transactional email.

    :param app: the app to register with now; or call :meth:`init_app` later.
    :param contact_mapper: the user → contact payload function (see :meth:`contact_mapper`)."""

    def __init__(
        self, app: Flask | None = None, *, contact_mapper: _contacts.ContactMapper | None = None
    ) -> None:
        self._contact_mapper: _contacts.ContactMapper | None = None
        if contact_mapper is not None:
            self.contact_mapper(contact_mapper)
        #: The users ``flask meisa sync-users`` backfills, and how to count them
        #: (see :meth:`users_to_sync`).
        self.user_source: tuple[Callable[[], Iterable[Any]], Callable[[], int] | None] | None
        self.user_source = None
        self._states: WeakKeyDictionary[Flask, MeisaState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<Meisa apps={len(self._states)}>"

    def init_app(self, app: Flask) -> None:
        """Register on ``app`` (``current_app``: the app behind it; config defaults, hooks,
        ``flask meisa`` commands) and start delivery; an invalid ``MEISA_*`` key, or no
        ``MEISA_API_KEY`` while delivering, raises :class:`ConfigurationError`."""
        app = _flask_app(app)
        if "meisa" in app.extensions:
            raise RuntimeError(
                "A 'Meisa' instance has already been registered on this Flask app."
                " Register one 'Meisa' per app."
            )
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, default)
        settings = MeisaSettings.from_config(app.config)
        state = MeisaState(app, settings)
        delivering = state.delivering()
        if delivering:
            # The engine is made now (its file store opened and checked), so that a damaged
            # store is found at startup and an app that cannot deliver is not registered.
            try:
                state.dispatcher  # noqa: B018
            except BaseException:
                state.close(0)
                raise
        self._states[app] = state
        app.extensions["meisa"] = self
        app.wsgi_app = deferral.AfterResponseMiddleware(app.wsgi_app, state)  # type: ignore[method-assign]
        # Bound methods: held weakly by blinker, alive as long as this instance is.
        signals.plan_changed.connect(self._on_plan_changed)
        if settings.sync_on_login:
            user_logged_in.connect(self._on_user_logged_in, sender=app)

        from .cli import meisa_cli

        app.cli.add_command(meisa_cli)
        if delivering:
            # Delivery starts once registered (what an earlier run left may be delivered at
            # once), except in a command of the Flask CLI (which delivers on first use).
            if not os.environ.get("FLASK_RUN_FROM_CLI"):
                state.start()
            if settings.suppression_preload:
                state.suppression.refresh_in_background()

    def state(self, app: Flask | None = None) -> MeisaState:
        """The runtime state (client, suppression set, engine) of ``app`` or the current app."""
        state = self._states.get(_flask_app(current_app if app is None else app))
        if state is None:
            raise RuntimeError(
                "The current Flask app is not registered with this 'Meisa' instance."
                " Did you forget to call 'init_app'?"
            )
        return state

    def contact_mapper(self, mapper: F) -> F:
        """Decorator: the function from a user object to its upsert fields (``email``
        required), instead of the default mapping."""
        self._contact_mapper = _function(mapper, "contact_mapper")
        return mapper

    def users_to_sync(
        self, query: F | None = None, *, count: Callable[[], int] | None = None
    ) -> Any:
        """Decorator: register the function ``flask meisa sync-users`` takes every user
        from (in a stable order, best streamed), and ``count``, how many there are."""

        def register(function: F) -> F:
            counter = None if count is None else _function(count, "count")
            self.user_source = (_function(function, "users_to_sync"), counter)
            return function

        return register if query is None else register(query)

    @property
    def delivering(self) -> bool:
        """Whether the current app delivers now: ``MEISA_ENABLED`` and not
        ``MEISA_SUPPRESS_SEND`` (which follows ``TESTING``)."""
        return self.state().delivering()

    @property
    def client(self) -> MeisaClient:
        """The current app's :class:`~flask_meisa.client.MeisaClient` (without
        ``MEISA_API_KEY``: :class:`ConfigurationError`)."""
        return self.state().client

    def map_user(self, user: Any) -> dict[str, Any]:
        """The validated upsert payload of ``user``, by the contact mapper in use."""
        return self._map(self.state(), user)

    def upsert(
        self,
        user_or_payload: Any,
        *,
        priority: Literal["high", "normal"] = "normal",
        force: bool = False,
    ) -> None:
        """Sync a contact (a user object or a mapping of upsert fields): after the response,
        ahead of routine syncs with ``priority="high"``, even if Meisa has this state with
        ``force``. Bad input raises :class:`ValidationError` before anything is queued."""
        state = self.state()
        if user_or_payload is None:
            raise ValidationError("user_or_payload", "is required")
        if priority not in ("high", "normal"):
            raise ValidationError("priority", 'must be "high" or "normal"')
        flag(force, "force")
        high = "high" if priority == "high" else None
        payload = self._map(state, user_or_payload, payload=True)
        deferral.enqueue(state, Operation.checked("upsert", payload, force=force, priority=high))

    def track(
        self,
        event_name: str,
        *,
        user: Any = None,
        email: str | None = None,
        external_id: str | int | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an in-product event for a user (an object or a mapping of upsert fields),
        or for ``email`` / ``external_id`` (bad input raises :class:`ValidationError` before
        anything is queued)."""
        state = self.state()
        contact: dict[str, Any] | None = None
        if user is not None:
            if email is not None or external_id is not None:
                raise ValidationError("user", "give a user or an email/external_id, not both")
            contact = self._map(state, user, payload=True)
            email, external_id = contact["email"], contact.get("external_id")
        body = track_body(event_name, email=email, external_id=external_id, properties=properties)
        deferral.enqueue(state, Operation.checked("track", body, contact=contact))

    def send(
        self,
        trigger_key: str,
        to_email: str,
        *,
        variables: Mapping[str, Any] | None = None,
        recipient: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        background: bool = False,
    ) -> SendResult:
        """Send a transactional email through the trigger ``trigger_key`` unless the address
        is suppressed: now, within ``MEISA_SEND_DEADLINE`` (Meisa's refusal raises its
        :class:`APIError`), or queued with ``background=True``. Every attempt carries the
        same ``idempotency_key``. Bad input raises :class:`ValidationError`."""
        fields = {k: v for k, v in locals().items() if k not in ("self", "background")}
        state = self.state()
        flag(background, "background")
        body: dict[str, Any] = trigger_body(**fields)
        key, address = body["trigger_key"], body["to_email"]
        no_call = functools.partial(
            SendResult, trigger_key=key, to_email=address, idempotency_key=body["idempotency_key"]
        )
        operation = Operation.checked("send", body)  # a body too large: refused first
        delivering = state.delivering()
        ends = time.monotonic() + state.settings.send_deadline
        # A send made now waits for a first suppression list at most half its deadline,
        # keeping the other half for its call; a queued one does not wait (delivery checks).
        wait = state.settings.send_deadline / 2 if delivering and not background else 0.0
        if state.is_suppressed(address, wait=wait):
            state.reporter.suppressed(body, operation=None)
            return no_call("suppressed", reason="suppressed")
        if background:
            deferral.enqueue(state, operation)
            return no_call("queued")
        deferral.report_queued(state, operation, delivering)
        if not delivering:
            return no_call("disabled", reason="delivery_suppressed")
        try:  # (waiting for the list and for budget slots counts against the deadline)
            state.reporter.guard(operation)
            policy = state.retry_policy(deadline=max(ends - time.monotonic(), 0.001))
            client = state.client.with_options(retry=policy, slot=state.budget_slot)
            result = deliver(client, operation)
        except APIError as error:
            state.reporter.learn(operation, error)
            raise
        return state.reporter.sent(body, result, operation=None)

    def is_suppressed(self, email: str) -> bool:
        """Whether Meisa says not to email ``email`` (the TTL-cached suppression set)."""
        state = self.state()
        return state.is_suppressed(normalize_email(email), wait=state.settings.send_deadline)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Deliver everything pending (the current request's work first) within ``timeout``
        seconds (``None``: no limit); ``True`` when nothing is left, including work of
        responses not yet closed (not work that signal receivers queue meanwhile). A
        ``timeout`` that is no number raises :class:`ValidationError`."""
        state = self.state()
        timeout = _wait_limit(timeout)
        deferral.release_now(state)
        deadline = None if timeout is None else time.monotonic() + timeout
        # In an engine's hook (a dropped receiver on the writer's thread): answered at once.
        if not state.held.wait(0 if in_hook() else timeout):
            return False
        if not state.has_dispatcher():
            return True

        def flush(engine: Dispatcher) -> bool:
            return engine.flush(None if deadline is None else max(deadline - time.monotonic(), 0))

        try:
            return state.with_engine(flush)
        except EngineClosed:
            return False

    def status(self) -> DeliveryStatus:
        """A snapshot of the host's delivery: pending work per lane, the budget, who delivers."""
        state = self.state()
        if not state.has_dispatcher():
            return DeliveryStatus(engine=state.settings.delivery)
        status = state.dispatcher.status()
        status.dropped += state.refused
        return status

    def close(self, app: Flask | None = None, timeout: float | None = None) -> int:
        """Stop delivery for ``app`` (default: every app of this extension) after up to
        ``timeout`` seconds (``MEISA_FLUSH_TIMEOUT``) of delivering; returns what was lost.
        Work made afterwards, or meanwhile, starts delivery again (flushed at exit)."""
        timeout = _wait_limit(timeout)
        states = [self.state(app)] if app is not None else list(self._states.values())
        return sum(state.close(timeout) for state in states)

    def _map(self, state: MeisaState, user: Any, *, payload: bool = False) -> dict[str, Any]:
        """``user``'s upsert payload, by the contact mapper; a mapping is the payload itself
        with ``payload`` (upsert, track) or without a custom mapper."""
        if isinstance(user, Mapping) and (payload or self._contact_mapper is None):
            return _contacts.upsert_payload(user)
        if self._contact_mapper is not None:
            return _contacts.map_contact(self._contact_mapper, user)
        settings = state.settings
        fields = _contacts.default_contact_mapper(
            user, custom_fields=settings.custom_fields, source=settings.default_source
        )
        return upsert_body(fields)

    def _on_user_logged_in(self, sender: Flask, user: Any = None, **extra: Any) -> None:
        try:  # never let a sync problem break login_user(): log it instead
            state = self.state(sender)
            # Made plain data now: the user's values may change, or need the request, later.
            # Encoded once the response is out, where it costs the login nothing.
            payload = self._map(state, user)
            deferral.enqueue(state, functools.partial(_login_upsert, payload, time.time()))
        except Exception:
            logger.exception(_LOGIN_FAILED)

    def _on_plan_changed(
        self, sender: Any, user: Any = None, new_plan: Any = None, **extra: Any
    ) -> None:
        app = sender if isinstance(sender, Flask) else None  # else the app it happens in
        if app is None and not has_app_context():
            kind = type(sender).__name__
            logger.error("meisa: plan_changed sent by a %s outside an app: not synced", kind)
            return
        try:
            state = self.state(app)
        except RuntimeError:  # an app not registered with this instance
            return
        # Like a login, a plan change never breaks the billing view that signalled it.
        try:
            if user is None:
                raise ValidationError("user", "plan_changed needs the user whose plan changed")
            if new_plan is None:
                raise ValidationError("new_plan", "plan_changed needs the new plan")
            payload = self._map(state, user)
            plan = to_json_value(new_plan, "new_plan")
            payload["custom_fields"] = {**(payload.get("custom_fields") or {}), "plan": plan}
            operation = Operation.checked("upsert", payload, priority="high")
        except Exception as error:  # the mapper's own failures too
            if isinstance(error, ValidationError):
                logger.error("meisa: the plan change was not synced: %s", error)
            else:  # its text may hold the user's data: in the traceback only
                logger.exception("meisa: the plan change was not synced")
            signals.emit(signals.delivery_failed, state.app, operation=None, error=error)
            return
        deferral.enqueue(state, operation)


_LOGIN_FAILED = "meisa: could not sync the user who logged in"


def _login_upsert(payload: dict[str, Any], logged_in_at: float) -> Operation | None:
    """The upsert of a login's ``payload``, made when it logged in (``None``, logged, when
    its body is too large)."""
    try:
        return Operation.checked("upsert", payload, created_at=logged_in_at)
    except Exception:
        logger.exception(_LOGIN_FAILED)
        return None


def _flask_app(app: object) -> Flask:
    """``app``, or the app of this context for ``current_app`` (a proxy: no weak reference
    holds it, and it is another app in another context); anything else is refused."""
    if app is current_app:
        if not has_app_context():
            raise RuntimeError(
                "Meisa needs an application context: call it in a request, a CLI"
                " command, or inside 'with app.app_context():'."
            )
        app = cast(Any, current_app)._get_current_object()
    if not isinstance(app, Flask):
        raise ValidationError("app", f"must be a Flask app, not {type(app).__name__}")
    return app


def _function(value: F, name: str) -> F:
    """``value``, a function to call later: refused now when it is not one."""
    if not callable(value):
        raise ValidationError(name, f"must be a function, not {type(value).__name__}")
    if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
        raise ValidationError(name, "must be a plain function, not an async one")  # none awaits
    return value


def _wait_limit(timeout: object) -> float | None:
    """A ``timeout`` of :meth:`Meisa.flush` or :meth:`Meisa.close` in seconds (below 0: 0),
    or ``None``; refused when it is not a number, since a wait until nan never ends."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or timeout != timeout:
        raise ValidationError("timeout", "must be a number of seconds, or None")
    seconds = cast(float, timeout)
    return float(min(max(seconds, 0), threading.TIMEOUT_MAX))  # no float overflow
