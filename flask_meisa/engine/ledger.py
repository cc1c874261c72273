"""What an outbox engine's process holds in memory, and writing outcomes back to the outbox.

The :class:`Ledger` is the in-memory engine's :class:`~.base.DeliveryHooks`: each outcome
is first settled in the outbox (a delivered or skipped row is deleted, a refused one
becomes a dead letter, one handed back at shutdown is made pending again), then reported
to the app's hooks. A row handed back is not reported as dropped: it is not lost.
Operations the outbox could not take are held in memory only, and reported like the
thread engine's. A settlement the outbox refuses is kept and retried (:meth:`retry`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..operations import Operation
from .deadletters import DeadLetters
from .outbox import OUTBOX_ERRORS
from .outbox import Outbox
from .reporting import HookCaller

__all__ = ["Ledger"]


class Ledger:
    """Rows and memory-only operations held by this process (see the module).

    :param changed: called (without the ledger's lock) whenever an operation is over,
        so that the engine can load more rows and wake a waiting flush.
    """

    def __init__(
        self,
        outbox: Outbox,
        hooks: HookCaller,
        logger: logging.Logger,
        changed: Callable[[], None],
    ) -> None:
        self.outbox = outbox
        self._dead = DeadLetters(outbox)
        self._hooks = hooks
        self._logger = logger
        self._changed = changed
        self.reset()

    def reset(self) -> None:
        """Forget everything (in a forked child: the parent's holdings are its own)."""
        self._lock = threading.Lock()
        self._rows: dict[int, tuple[Operation, int]] = {}  # id(op) -> (op, seq)
        self._memory: dict[int, Operation] = {}
        self._unsettled: list[tuple[str, int, Any]] = []
        self._local = threading.local()
        #: Set at shutdown: rows handed back are released at once by the engine.
        self.closing = False

    # -- holding -------------------------------------------------------------------------

    def hold_row(self, operation: Operation, seq: int) -> None:
        """``operation`` (row ``seq``) is about to go to the in-memory engine."""
        with self._lock:
            self._rows[id(operation)] = (operation, seq)

    def hold_memory(self, operation: Operation) -> None:
        """``operation`` goes to the in-memory engine without a row."""
        with self._lock:
            self._memory[id(operation)] = operation

    def forget(self, operation: Operation) -> int | None:
        """Stop holding ``operation`` (it was not accepted); returns its row's seq."""
        with self._lock:
            self._memory.pop(id(operation), None)
            row = self._rows.pop(id(operation), None)
        return None if row is None else row[1]

    def held(self) -> int:
        """Operations held in memory, rows and memory-only ones."""
        with self._lock:
            return len(self._rows) + len(self._memory)

    def memory_only(self) -> int:
        """Operations held that the outbox does not have."""
        with self._lock:
            return len(self._memory)

    def unfinished(self) -> int:
        """Memory-only operations not yet over, and settlements not yet written."""
        with self._lock:
            return len(self._memory) + len(self._unsettled)

    @property
    def in_hook(self) -> bool:
        """Whether the current thread is running one of the app's hooks."""
        return bool(getattr(self._local, "active", False))

    # -- settling ------------------------------------------------------------------------

    def _finish(self, operation: Operation, action: str, detail: Any = None) -> bool:
        with self._lock:
            self._memory.pop(id(operation), None)
            row = self._rows.pop(id(operation), None)
        try:
            if row is None:
                return False
            if not (action == "unclaim" and self.closing):
                self.settle(action, row[1], detail)
            return True
        finally:
            self._changed()

    def settle(self, action: str, seq: int, detail: Any = None) -> None:
        """Write an outcome to row ``seq`` (``"delete"``, ``"bury"`` with ``(error,
        attempts)``, or ``"unclaim"``); kept for :meth:`retry` when the outbox fails."""
        try:
            self._apply(action, seq, detail)
        except OUTBOX_ERRORS as error:
            self._logger.warning(
                "flask-meisa: could not record an outcome in the outbox (%s); retrying", error
            )
            with self._lock:
                self._unsettled.append((action, seq, detail))

    def _apply(self, action: str, seq: int, detail: Any) -> None:
        if action == "delete":
            self.outbox.delete([seq])
        elif action == "bury":
            error, attempts = detail
            self._dead.bury(seq, error, attempts)
        else:
            self.outbox.release_claims([seq])

    def retry(self) -> None:
        """Write the settlements the outbox refused earlier, in order."""
        with self._lock:
            todo, self._unsettled = self._unsettled, []
        for index, (action, seq, detail) in enumerate(todo):
            try:
                self._apply(action, seq, detail)
            except OUTBOX_ERRORS:
                with self._lock:
                    self._unsettled[:0] = todo[index:]
                return
        if todo:
            self._changed()

    def _report(self, name: str, operation: Operation, *args: Any) -> None:
        self._local.active = True
        try:
            self._hooks.call(name, operation, *args)
        finally:
            self._local.active = False

    # -- DeliveryHooks (called by the in-memory engine) ----------------------------------

    def skip_reason(self, operation: Operation) -> str | None:
        """The app's reason to skip ``operation``."""
        return self._hooks.skip_reason(operation)

    def skipped(self, operation: Operation, reason: str) -> None:
        """Skipped on purpose: the row goes."""
        self._finish(operation, "delete")
        self._report("skipped", operation, reason)

    def delivered(self, operation: Operation, result: Any) -> None:
        """Meisa took it: the row goes."""
        self._finish(operation, "delete")
        self._report("delivered", operation, result)

    def failed(self, operation: Operation, error: BaseException) -> None:
        """Refused or out of retries: the row becomes a dead letter."""
        self._finish(operation, "bury", (error, operation.attempts))
        self._report("failed", operation, error)

    def dropped(self, operation: Operation, reason: str) -> None:
        """Handed back (a row stays in the outbox) or, for a memory-only one, lost."""
        if not self._finish(operation, "unclaim"):
            self._report("dropped", operation, reason)
