"""Reporting outcomes from a delivery engine: guarded hook calls and log-safe summaries.

A hook is the extension's code (or the app's, through signals) running on a worker
thread; one that raises is logged and ignored, so it can never stop delivery. Log lines
name an operation through :meth:`~flask_meisa.operations.Operation.describe` and an error
through its status, code or class, never through payload values or the key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from ..errors import APIConnectionError
from ..errors import APIError
from ..errors import ValidationError
from ..operations import Operation
from .base import DeliveryHooks

__all__ = ["FailedOperation", "HookCaller", "error_summary"]


@dataclass(frozen=True)
class FailedOperation:
    """An operation Meisa refused or that ran out of retries, kept for inspection."""

    operation: Operation
    error: BaseException
    attempts: int
    failed_at: float = field(default_factory=time.time)


def error_summary(error: BaseException) -> str:
    """A log-safe account of an error: ``"HTTP 400 [invalid]"``, ``"APITimeoutError (no
    answer within 10 s)"``, ``"ValidationError on email"``."""
    if isinstance(error, APIError):
        code = f" [{error.code}]" if error.code else ""
        return f"HTTP {error.status}{code}"
    if isinstance(error, APIConnectionError):
        return f"{type(error).__name__} ({error.reason})"
    if isinstance(error, ValidationError):
        return f"ValidationError on {error.field}"
    return type(error).__name__


class HookCaller:
    """Calls :class:`~flask_meisa.engine.base.DeliveryHooks` methods, logging any
    exception instead of raising it."""

    def __init__(self, hooks: DeliveryHooks, logger: logging.Logger) -> None:
        self.hooks = hooks
        self.logger = logger

    def skip_reason(self, operation: Operation) -> str | None:
        """The hook's reason to skip ``operation``; a hook that raises skips nothing."""
        try:
            return self.hooks.skip_reason(operation)
        except Exception:
            self.logger.exception(
                "flask-meisa: the skip_reason hook raised for %s; delivering it anyway",
                operation.describe(),
            )
            return None

    def call(self, name: str, operation: Operation, *args: Any) -> None:
        """Call hook ``name`` (``skipped``, ``delivered``, ``failed`` or ``dropped``)."""
        try:
            getattr(self.hooks, name)(operation, *args)
        except Exception:
            self.logger.exception(
                "flask-meisa: the %s hook raised for %s; ignored", name, operation.describe()
            )
