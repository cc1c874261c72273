"""``@track_event``: record an in-product action when a view succeeds."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import TypeVar
from typing import cast

from flask import Response
from flask import after_this_request
from flask import current_app
from flask_login import current_user

from ._payloads import json_object
from ._payloads import require_text
from .errors import ValidationError

__all__ = ["track_event"]

logger = logging.getLogger("flask_meisa")

F = TypeVar("F", bound=Callable[..., Any])

Properties = Mapping[str, Any] | Callable[..., Mapping[str, Any] | None] | None


def track_event(name: str, properties: Properties = None) -> Callable[[F], F]:
    """Decorator: track the event ``name`` for ``current_user`` as the view leaves it, or
    as it found it when the view logged the user out (anonymous users are skipped), once
    the view (sync or async) answered below 400. ``properties`` is a mapping,
    or a plain (not async) function that takes the view's arguments (its URL values, by
    name) and returns one.

    :raises ValidationError: at decoration time, for an empty name or properties that
        JSON cannot carry (or an async function as properties)."""
    if callable(name):  # @track_event over a view, without the event's name
        raise ValidationError("event_name", 'is missing: write @track_event("name")')
    event_name = require_text(name, "event_name")
    if inspect.iscoroutinefunction(properties):  # an after-request hook cannot await it
        raise ValidationError("properties", "must be a plain function, not an async one")
    if properties is not None and not callable(properties):
        properties = json_object(properties, "properties")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before = _user()  # who asked: the view may log them out

            @after_this_request
            def track_on_success(response: Response) -> Response:
                if response.status_code < 400:
                    _track(event_name, properties, kwargs, before)
                return response

            return current_app.ensure_sync(view)(*args, **kwargs)

        return cast(F, wrapper)

    return decorator


def _user() -> Any:
    """The authenticated ``current_user``, or ``None``."""
    if not hasattr(current_app, "login_manager"):
        return None
    user = cast(Any, current_user)._get_current_object()
    return user if getattr(user, "is_authenticated", False) else None


def _track(event_name: str, properties: Properties, kwargs: dict[str, Any], before: Any) -> None:
    # Runs in an after-request hook: a problem is logged, never turned into a 500.
    user = _user() or before  # the user the view logged in, else the one it logged out
    if user is None:
        logger.debug("meisa: %s not tracked: no authenticated user", event_name)
        return
    try:
        # By name only: Flask passes URL values so, and a MethodView's ``self`` is no value.
        props = properties(**kwargs) if callable(properties) else properties
        current_app.extensions["meisa"].track(event_name, user=user, properties=props)
    except ValidationError as error:
        logger.error("meisa: %s not tracked: %s", event_name, error)
    except Exception:
        logger.exception("meisa: %s not tracked", event_name)
