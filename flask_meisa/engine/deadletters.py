"""Dead letters: operations Meisa refused (a 4xx other than 429) or whose retries ran out,
kept in the outbox with their error until someone retries or purges them
(``flask meisa dead-letters``).

A dead letter keeps the error's status, Meisa's code and a message built only from what
the error classes hold (Meisa's message, a failure's reason, a field name), never a
payload value. Its payload stays in the row, so a retry sends exactly what failed, a send
with its original ``idempotency_key``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import APIConnectionError
from ..errors import APIError
from ..errors import ValidationError
from ..operations import Operation
from .outbox import COLUMNS
from .outbox import Outbox
from .outbox import operation_of

__all__ = ["DeadLetter", "DeadLetters", "error_fields"]

_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class DeadLetter:
    """An operation kept with its error; ``seq`` is its ID in the outbox and the CLI."""

    seq: int
    operation: Operation
    status: int | None
    code: str | None
    message: str
    attempts: int
    #: How many submitted operations were merged into this one (coalesced upserts).
    merged: int
    failed_at: float


def error_fields(error: BaseException) -> tuple[int | None, str | None, str]:
    """``(status, code, message)`` of an error, as a dead letter keeps them."""
    if isinstance(error, APIError):
        message = error.message
        status: int | None = error.status
        code = error.code
    elif isinstance(error, APIConnectionError):
        status, code, message = None, None, f"{type(error).__name__}: {error.reason}"
    elif isinstance(error, ValidationError):
        status, code, message = None, "validation", f"{error.field}: {error.message}"
    else:
        status, code, message = None, None, type(error).__name__
    return status, code, message[:_MESSAGE_LIMIT]


class DeadLetters:
    """The dead letters of one :class:`~.outbox.Outbox`."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def bury(self, seq: int, error: BaseException, attempts: int) -> None:
        """Keep row ``seq`` as a dead letter with ``error`` (see :func:`error_fields`)."""
        status, code, message = error_fields(error)
        with self.outbox.connection() as db:
            db.execute(
                "UPDATE meisa_outbox SET state = 'dead', attempts = ?, error_status = ?, "
                "error_code = ?, error_message = ?, failed_at = ? WHERE seq = ?",
                (attempts, status, code, message, time.time(), seq),
            )

    def list(self, seqs: Iterable[int] | None = None) -> list[DeadLetter]:
        """Dead letters (those in ``seqs``, or all), oldest first."""
        query = (
            f"SELECT {COLUMNS}, error_status, error_code, error_message, merged, failed_at "
            "FROM meisa_outbox WHERE state = 'dead'"
        )
        params: list[int] = []
        if seqs is not None:
            params = [int(seq) for seq in seqs]
            query += f" AND seq IN ({', '.join('?' * len(params))})"
        with self.outbox.connection() as db:
            rows = db.execute(query + " ORDER BY seq", params).fetchall()
        return [
            DeadLetter(
                seq=int(row[0]),
                operation=operation_of(row),
                status=row[7],
                code=row[8],
                message=row[9] or "",
                attempts=int(row[6]),
                merged=int(row[10]),
                failed_at=float(row[11] or 0.0),
            )
            for row in rows
        ]

    def requeue(self, seqs: Iterable[int] | None = None) -> int:
        """Make dead letters (those in ``seqs``, or all) pending again, errors cleared;
        returns how many. The delivering process picks them up like new rows."""
        reset = (
            "UPDATE meisa_outbox SET state = 'pending', attempts = 0, error_status = NULL, "
            "error_code = NULL, error_message = NULL, failed_at = NULL WHERE state = 'dead'"
        )
        with self.outbox.connection() as db:
            if seqs is None:
                return db.execute(reset).rowcount
            return Outbox.each(db, reset + " AND", seqs)

    def purge(self, seqs: Iterable[int] | None = None) -> int:
        """Delete dead letters (those in ``seqs``, or all); returns how many."""
        with self.outbox.connection() as db:
            if seqs is None:
                return db.execute("DELETE FROM meisa_outbox WHERE state = 'dead'").rowcount
            return Outbox.each(db, "DELETE FROM meisa_outbox WHERE state = 'dead' AND", seqs)
