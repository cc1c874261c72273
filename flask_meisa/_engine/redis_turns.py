"""Transactions on one contact's keys in Redis that none retries without bound: a few
optimistic tries (WATCH, read, MULTI/EXEC), then the contact's line, first come first
served (docs/celery.md)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

from redis import exceptions
from redis.exceptions import WatchError

#: Optimistic tries of a transaction before it joins its contact's line.
TRIES = 3
#: A line's first that has not written for this long is taken as gone (a killed process).
GONE_AFTER = 2.0
#: A line outlives its last newcomer this long (seconds).
LINE_TTL = 60

T = TypeVar("T")


def transact(
    redis: Any,
    line: str,
    reads: Sequence[tuple[str, ...]],
    update: Callable[[Any, list[Any]], T],
    *keys: str,
) -> T:
    """``update(pipe, replies)`` in a WATCH transaction of ``keys``, given the replies to
    the commands ``reads`` (it calls ``pipe.multi()`` and queues its writes, or returns
    without one). While the list ``line`` holds transactions that failed :data:`TRIES`
    times, none but its first writes: each of them goes in turn, and a newcomer waits
    behind them (then joins them)."""
    token: str | None = None
    tries, first_seen, led = 0, (None, 0.0), False
    with redis.pipeline() as pipe:
        try:
            while True:
                head = None  # the line's first
                try:
                    # Not the line: one joining it, or taking a slow first as gone, would
                    # fail the first's write, again and again; its keys guard the data.
                    pipe.watch(*keys)
                    # Read in one round trip, after the WATCH, on its connection (a
                    # bounded pool may have no other to give while it is held).
                    head, after, *replies = _read(
                        pipe, (("LINDEX", line, 0), ("LINDEX", line, 1), *reads)
                    )
                    head = head.decode() if isinstance(head, bytes) else head
                    if head in (None, token):
                        led = token is not None
                        value = update(pipe, replies)
                        if token is not None:  # out of the line with its write, atomically
                            if not pipe.explicit_transaction:
                                pipe.multi()
                            pipe.lrem(line, 1, token)
                            if after is not None:  # the next one's turn: wake it
                                pipe.rpush(_bell(line, after), 1).expire(_bell(line, after), 5)
                        pipe.execute()
                        token = None
                        return value
                except WatchError:
                    pass  # a key it watched was written: it tries again
                tries += 1
                if head not in (None, token):  # another is first in the line
                    pipe.reset()
                    now = time.monotonic()
                    if first_seen[0] != head:
                        first_seen = (head, now)
                    elif now - first_seen[1] > GONE_AFTER:  # its process was killed
                        redis.lrem(line, 1, head)
                    if led:  # it was first, and was taken as gone: in line again
                        token, led = None, False
                    if token is None:
                        time.sleep(random.uniform(0.0002, 0.001))
                    else:  # until its turn, or a moment (it may be first in the line now)
                        redis.blpop([_bell(line, token)], timeout=0.05)
                if token is None and tries >= TRIES:
                    token = uuid.uuid4().hex
                    with redis.pipeline() as join:
                        join.rpush(line, token).expire(line, LINE_TTL).execute()
        finally:
            if token is not None:  # update raised: out of the line
                pipe.reset()  # its connection first: the pool may have no other
                redis.lrem(line, 1, token)


def _bell(line: str, token: bytes | str) -> str:
    return f"{line}:{token.decode() if isinstance(token, bytes) else token}"


def _read(pipe: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """The replies to ``commands`` sent at once on the connection ``pipe`` watches with."""
    connection = pipe.connection
    try:
        connection.send_packed_command(connection.pack_commands(commands))
        return [pipe.parse_response(connection, command[0]) for command in commands]
    except BaseException as error:
        connection.disconnect()  # replies may be left unread on it
        pipe.reset()  # its connection back to the pool: joining the line takes one
        if isinstance(error, (exceptions.ConnectionError, exceptions.TimeoutError)):
            raise WatchError("the connection was lost while watching") from error
        raise
