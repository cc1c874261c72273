"""The :class:`Meisa` extension: config, hooks, per-request collection, send/upsert/track."""

from __future__ import annotations

import json
import logging
import os
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
from flask import has_request_context
from flask import request

from .bodies import ContactMapper
from .bodies import default_contact_mapper
from .bodies import identity_of
from .bodies import map_contact
from .bodies import track_body
from .bodies import trigger_body
from .bodies import upsert_payload
from .client import MeisaClient
from .config import DEFAULTS
from .config import MeisaSettings
from .deferral import BATCH_KEY
from .deferral import MIDDLEWARE_KEY
from .deferral import RESPONDED_KEY
from .deferral import AfterResponseMiddleware
from .deferral import RequestBatch
from .engine.base import DeliveryStatus
from .errors import DeliveryError
from .errors import UnprocessableEntityError
from .errors import ValidationError
from .operations import Operation
from .payloads import normalize_email
from .payloads import to_json_value
from .results import SendResult
from .results import SendStatus
from .runtime import MeisaState
from .signals import delivery_failed
from .signals import email_sent
from .signals import email_suppressed
from .signals import emit
from .signals import operation_queued
from .signals import plan_changed

__all__ = ["Meisa"]

logger = logging.getLogger("flask_meisa")

F = TypeVar("F", bound=Callable[..., Any])


class Meisa:
    """The Flask extension: syncs users to Meisa and sends transactional email.

    ::

        meisa = Meisa()          # or Meisa(app)
        meisa.init_app(app)      # registers app.extensions["meisa"]

    In a request, upserts and events are collected, coalesced per contact and released
    once the response has been written; outside a request they go straight to delivery.

    :param app: the app to register with now; or call :meth:`init_app` later.
    :param contact_mapper: the user → contact payload function; see
        :meth:`contact_mapper`.
    """

    def __init__(
        self, app: Flask | None = None, *, contact_mapper: ContactMapper | None = None
    ) -> None:
        self._contact_mapper = contact_mapper
        #: The users ``flask meisa sync-users`` backfills, and how to count them
        #: (see :meth:`users_to_sync`).
        self.user_source: tuple[Callable[[], Iterable[Any]], Callable[[], int] | None] | None
        self.user_source = None
        self._states: WeakKeyDictionary[Flask, MeisaState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<Meisa apps={len(self._states)}>"

    # -- registration ------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app``: config defaults, the after-response
        middleware, the login and plan hooks and the ``flask meisa`` commands.

        :raises RuntimeError: the app already has a Meisa extension.
        :raises ConfigurationError: a ``MEISA_*`` key is missing or invalid (for example
            no ``MEISA_API_KEY`` while ``MEISA_ENABLED``).
        """
        if "meisa" in app.extensions:
            raise RuntimeError(
                "A 'Meisa' instance has already been registered on this Flask app."
                " Register one 'Meisa' per app."
            )
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, default)
        settings = MeisaSettings.from_config(app.config)
        state = MeisaState(app, settings)
        self._states[app] = state
        app.extensions["meisa"] = self

        middleware = AfterResponseMiddleware(
            app.wsgi_app,
            release=lambda batch: self._release(state, batch),
            discard=lambda batch: self._release(state, batch, raised=True),
            early=lambda: bool(app.testing),
        )
        app.wsgi_app = state.middleware = middleware  # type: ignore[method-assign]
        app.teardown_request(self._teardown_request)
        app.before_request(state.start)
        # Bound methods: held weakly by blinker, alive as long as this instance is.
        plan_changed.connect(self._on_plan_changed)
        if settings.sync_on_login:
            try:
                from flask_login import user_logged_in
            except ImportError:  # pragma: no cover - flask-login is a dependency
                logger.warning("meisa: Flask-Login is not installed; logins are not synced")
            else:
                user_logged_in.connect(self._on_user_logged_in, sender=app)

        from .cli import meisa_cli

        app.cli.add_command(meisa_cli)
        if state.delivering():
            # Opened now, so that a damaged store is found at startup; delivery starts
            # now too, except in a command of the Flask CLI (which delivers on first use).
            state.open(start=not os.environ.get("FLASK_RUN_FROM_CLI"))
            if settings.suppression_preload:
                state.suppression.refresh_in_background()

    def _state(self, app: Flask | None = None) -> MeisaState:
        if app is None:
            if not has_app_context():
                raise RuntimeError(
                    "Meisa needs an application context: call it in a request, a CLI"
                    " command, or inside 'with app.app_context():'."
                )
            app = cast(Any, current_app)._get_current_object()
        state = self._states.get(cast(Flask, app))
        if state is None:
            raise RuntimeError(
                "The current Flask app is not registered with this 'Meisa' instance."
                " Did you forget to call 'init_app'?"
            )
        return state

    def state(self, app: Flask | None = None) -> MeisaState:
        """The runtime state (client, suppression set, engine) of ``app`` or the
        current app."""
        return self._state(app)

    # -- configuration by decorator ----------------------------------------------------

    def contact_mapper(self, mapper: F) -> F:
        """Decorator: replace the default user → contact mapping.

        The function takes a user object and returns the upsert fields (``email``
        required; ``external_id``, names, ``source``, ``custom_fields``,
        ``tag_names``). It runs inside the request, while the user object is alive.
        """
        self._contact_mapper = mapper
        return mapper

    def users_to_sync(
        self, query: F | None = None, *, count: Callable[[], int] | None = None
    ) -> Any:
        """Decorator: register the function ``flask meisa sync-users`` takes every user
        from. It returns an iterable of user objects in a stable order, streamed (for
        SQLAlchemy, ``session.scalars(select(User).order_by(User.id)
        .execution_options(yield_per=500))``, so that 100,000 ORM objects are never alive
        at once). ``count`` returns how many there are, for the estimate and the progress
        (a list's own length is used when it has one)::

            @meisa.users_to_sync(count=lambda: db.session.scalar(select(func.count(User.id))))
            def all_users():
                ...
        """

        def register(function: F) -> F:
            self.user_source = (function, count)
            return function

        return register if query is None else register(query)

    # -- public calls ------------------------------------------------------------------

    @property
    def delivering(self) -> bool:
        """Whether the current app delivers now: ``MEISA_ENABLED`` and not
        ``MEISA_SUPPRESS_SEND`` (which follows ``TESTING``), read on every call."""
        return self._state().delivering()

    @property
    def client(self) -> MeisaClient:
        """The current app's :class:`~flask_meisa.client.MeisaClient`."""
        return self._state().client

    def map_user(self, user: Any) -> dict[str, Any]:
        """The validated upsert payload of ``user``, by the contact mapper in use."""
        return self._map(self._state(), user)

    def upsert(
        self,
        user_or_payload: Any,
        *,
        priority: Literal["high", "normal"] = "normal",
        force: bool = False,
    ) -> None:
        """Sync a contact: a user object (mapped now) or a mapping of upsert fields.

        In a request, delivery waits until the response has been written, and several
        upserts of one contact become one call. An upsert that would send Meisa a state
        it already has makes no call (see ``MEISA_RESYNC_AFTER``).

        :param priority: ``"high"`` delivers it with the changes that start automations,
            ahead of routine syncs.
        :param force: make the call even if Meisa already has this state (when Meisa's
            copy was changed by hand).
        :raises ValidationError: before anything is queued, for a field Meisa cannot take.
        """
        state = self._state()
        if user_or_payload is None:
            raise ValidationError("user_or_payload", "is required")
        if priority not in ("high", "normal"):
            raise ValidationError("priority", 'must be "high" or "normal"')
        if not isinstance(force, bool):
            raise ValidationError("force", "must be True or False")
        if isinstance(user_or_payload, Mapping):
            payload = upsert_payload(user_or_payload)
        else:
            payload = self._map(state, user_or_payload)
        operation = Operation.checked("upsert", payload, force=force)
        if priority == "high":
            operation.priority = "high"
        self._enqueue(state, operation)

    def track(
        self,
        event_name: str,
        *,
        user: Any = None,
        email: str | None = None,
        external_id: str | int | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an in-product event for a user object, or for ``email`` /
        ``external_id``.

        :raises ValidationError: before anything is queued (no event name, no contact,
            properties that JSON cannot carry, both ``user`` and an identity given).
        """
        state = self._state()
        contact: dict[str, Any] | None = None
        if user is not None:
            if email is not None or external_id is not None:
                raise ValidationError("user", "give a user or an email/external_id, not both")
            contact = self._map(state, user)
            identity = identity_of(contact)
        else:
            identity = {"email": email, "external_id": external_id}
        body = track_body(event_name, properties=properties, **identity)
        self._enqueue(state, Operation.checked("track", body, contact=contact))

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
        """Send a transactional email through the trigger ``trigger_key``.

        The address is normalised and checked against the suppression set first: a
        suppressed address gets status ``"suppressed"`` and no call is made. By default
        the call is made now (with retries within ``MEISA_SEND_DEADLINE``) and the
        result says ``"sent"``, ``"scheduled"`` or ``"skipped"``; ``background=True``
        returns ``"queued"`` at once and delivers after the response. Every attempt
        carries the same ``idempotency_key`` (a random one when none is given), so no
        retry or replay sends twice within Meisa's one-hour window.

        :raises ValidationError: for bad input, before anything is sent or queued.
        :raises APIError: (synchronous sends) Meisa refused the send, e.g.
            :class:`~flask_meisa.errors.UnprocessableEntityError` for a recipient Meisa
            has suppressed (the address then joins the local suppression set).
        :raises DeliveryError: (``background=True`` outside a request) the engine
            cannot hold another send.
        """
        state = self._state()
        if not isinstance(background, bool):
            raise ValidationError("background", "must be True or False")
        body = trigger_body(
            trigger_key,
            to_email,
            variables=variables,
            recipient=recipient,
            idempotency_key=idempotency_key,
        )
        key = cast(str, body["trigger_key"])
        address = cast(str, body["to_email"])

        def without_a_call(status: SendStatus, reason: str | None = None) -> SendResult:
            return SendResult(
                status=status,
                trigger_key=key,
                to_email=address,
                idempotency_key=cast(str, body["idempotency_key"]),
                reason=reason,
            )

        delivering = state.delivering()
        deadline = state.settings.send_deadline
        started = time.monotonic()
        # The first send of a process waits for the suppression list at most half its
        # deadline, keeping the other half for its own call.
        wait = deadline / 2 if delivering and not background else 0.0
        if self._suppressed_now(state, address, wait=wait):
            emit(email_suppressed, state.app, trigger_key=key, to_email=address, operation=None)
            return without_a_call("suppressed", "suppressed")
        operation = Operation.checked("send", body)
        if background:
            self._enqueue(state, operation)
            return without_a_call("queued")
        self._queued(state, operation, delivering)
        if not delivering:
            return without_a_call("disabled", "delivery_suppressed")
        try:
            # Waiting for the list and for a budget slot count against the deadline.
            with state.budget_slot(max(deadline - (time.monotonic() - started), 0.0)):
                left = max(deadline - (time.monotonic() - started), 0.001)
                policy = state.retry_policy(deadline=left)
                result = state.client.with_options(retry=policy).trigger_email(**cast(Any, body))
        except UnprocessableEntityError as error:
            if error.code == "recipient_suppressed":
                state.suppression.add(address)
            raise
        outcome = SendResult.from_trigger(result, trigger_key=key, to_email=address)
        emit(email_sent, state.app, operation=None, result=outcome)
        return outcome

    def is_suppressed(self, email: str) -> bool:
        """Whether Meisa says not to email ``email`` (the TTL-cached suppression set).

        The first call loads the set, waiting at most ``MEISA_SEND_DEADLINE``; later calls
        answer at once, refreshing a stale set in the background. While delivery is
        suppressed nothing is fetched and only addresses added locally count.
        """
        state = self._state()
        address = normalize_email(email)
        wait = state.settings.send_deadline if state.delivering() else 0.0
        return self._suppressed_now(state, address, wait=wait)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Deliver everything pending within ``timeout`` seconds; ``True`` when nothing
        is left, including work still held by responses not yet closed. In a request,
        the request's own collected work is released first. With the store, waits for
        the host's delivering process, whichever it is."""
        state = self._state()
        if has_request_context():
            batch = request.environ.pop(BATCH_KEY, None)
            if batch is not None:
                self._dispatch(state, batch.operations)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        if not state.middleware.wait_released(timeout):
            return False
        if not state.has_dispatcher():
            return True
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return state.dispatcher.flush(left)

    def status(self) -> DeliveryStatus:
        """A snapshot of delivery: pending work per lane and its age, in flight, waiting to
        retry, dead letters, the budget left, which process delivers, and counters. With
        the store, it describes the whole host, from any of its processes."""
        state = self._state()
        if not state.has_dispatcher():
            return DeliveryStatus(engine=state.settings.delivery)
        status = state.dispatcher.status()
        status.dropped += state.refused
        return status

    def close(self, app: Flask | None = None, timeout: float | None = None) -> int:
        """Stop delivery for ``app`` (default: every app of this extension): deliver for up
        to ``timeout`` seconds (default ``MEISA_FLUSH_TIMEOUT``), stop the threads and
        close the connections. What a file store holds waits for the next start. Returns
        how many operations were lost. For tests and app factories; an app that is
        garbage-collected is closed too, and every app at interpreter exit."""
        states = [self._state(app)] if app is not None else list(self._states.values())
        return sum(state.close(timeout) for state in states)

    # -- internals ---------------------------------------------------------------------

    def _map(self, state: MeisaState, user: Any) -> dict[str, Any]:
        mapper = self._contact_mapper
        if mapper is None:
            settings = state.settings

            def mapper(user: Any) -> Mapping[str, Any]:
                return default_contact_mapper(
                    user, custom_fields=settings.custom_fields, source=settings.default_source
                )

        return map_contact(mapper, user)

    def _suppressed_now(self, state: MeisaState, address: str, *, wait: float) -> bool:
        if not state.delivering():
            return state.suppression.peek(address)
        # wait=0: never wait on a first load; delivery checks again before the call.
        return state.suppression.is_suppressed(address, wait=wait)

    def _enqueue(self, state: MeisaState, operation: Operation) -> None:
        if has_request_context():
            environ = request.environ
            if not environ.get(RESPONDED_KEY):
                batch = environ.get(BATCH_KEY)
                if batch is None:
                    batch = environ[BATCH_KEY] = RequestBatch()
                batch.add(operation)
                return
        self._dispatch(state, [operation], raise_refused=True)

    def _dispatch(
        self, state: MeisaState, operations: Iterable[Operation], *, raise_refused: bool = False
    ) -> None:
        delivering = state.delivering()
        for operation in operations:
            self._queued(state, operation, delivering)
            if not delivering:
                continue
            try:  # one at a time: an operation refused never holds back the others
                state.dispatcher.submit([operation])
            except DeliveryError as error:
                if raise_refused:
                    raise
                state.refused += 1
                logger.error("meisa: %s was not accepted: %s", operation.describe(), error)
                state.reporter.dropped(operation, "refused")

    def _queued(self, state: MeisaState, operation: Operation, delivering: bool) -> None:
        emit(operation_queued, state.app, operation=operation, delivering=delivering)
        if not delivering and state.app.debug:
            # Like a console mail backend: in development, show what Meisa would get.
            payload = json.dumps(operation.payload, ensure_ascii=False, sort_keys=True)
            logger.info("meisa (delivery off) would %s: %s", operation.kind, payload)

    def _release(self, state: MeisaState, batch: RequestBatch, raised: bool = False) -> None:
        if not state.alive:  # a response outlived its app (a test's kept response)
            logger.debug("meisa: %d operations of a discarded app not released", len(batch))
            return
        failed = raised or (batch.status is not None and batch.status >= 500)
        if failed and not state.settings.release_on_error:
            logger.info(
                "meisa: the request failed; %d collected operation(s) not released", len(batch)
            )
            return
        try:
            self._dispatch(state, batch.operations)
        except Exception:
            logger.exception("meisa: releasing a request's operations failed")

    def _teardown_request(self, error: BaseException | None) -> None:
        # A request context pushed without the WSGI middleware (test_request_context,
        # some test setups) has no after-response point: release at teardown.
        environ = request.environ
        if environ.get(MIDDLEWARE_KEY):
            return
        batch = environ.pop(BATCH_KEY, None)
        if batch is not None:
            self._release(self._state(), batch, raised=error is not None)

    def _on_user_logged_in(self, sender: Flask, user: Any = None, **extra: Any) -> None:
        # Never let a sync problem break login_user(): log it instead.
        try:
            state = self._state(sender)
            self._enqueue(state, Operation.checked("upsert", self._map(state, user)))
        except Exception:
            logger.exception("meisa: could not sync the user who logged in")

    def _on_plan_changed(
        self,
        sender: Any,
        user: Any = None,
        new_plan: Any = None,
        old_plan: Any = None,
        **extra: Any,
    ) -> None:
        resolve = getattr(sender, "_get_current_object", None)
        app = resolve() if callable(resolve) else sender
        if not isinstance(app, Flask) or app not in self._states:
            return
        state = self._states[app]
        # Like a login, a plan change never breaks the billing view that signalled it.
        try:
            if user is None:
                raise ValidationError("user", "plan_changed needs the user whose plan changed")
            if new_plan is None:
                raise ValidationError("new_plan", "plan_changed needs the new plan")
            payload = self._map(state, user)
            fields = dict(cast(Mapping[str, Any], payload.get("custom_fields") or {}))
            fields["plan"] = to_json_value(new_plan, "new_plan")
            payload["custom_fields"] = fields
            operation = Operation.checked("upsert", payload, priority="high")
        except ValidationError as error:
            logger.error("meisa: the plan change was not synced: %s", error)
            emit(delivery_failed, app, operation=None, error=error)
            return
        self._enqueue(state, operation)
