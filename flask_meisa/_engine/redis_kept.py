"""The Celery engine's kept tasks: each operation's own task, kept in Redis until it is
finished, with when a worker last ran it, so that one whose message the broker lost is
published again (docs/celery.md, "Messages the broker loses")."""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["KeptTasks"]


class KeptTasks:
    """The tasks kept under ``<prefix>:tasks`` and ``<prefix>:seen``; ``pending``: the
    keys of the sorted sets of pending operations, one per lane."""

    def __init__(self, redis: Any, prefix: str, pending: list[str]) -> None:
        self._redis = redis
        self._prefix = prefix
        self._pending = pending
        self._tasks, self._seen = f"{prefix}:tasks", f"{prefix}:seen"

    def keep(self, lane: int, op: dict[str, Any], meta: dict[str, Any]) -> None:
        """Keep the task that delivers the operation ``op`` until it is finished, seen now."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._tasks, op["id"], json.dumps([lane, op, meta], separators=(",", ":")))
        pipe.zadd(self._seen, {op["id"]: time.time()})
        pipe.execute()

    def seen(self, op_id: str) -> bool:
        """A worker runs the task of ``op_id``: note when; whether it is still pending."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._seen, {op_id: time.time()}, xx=True)
        for key in self._pending:
            pipe.zscore(key, op_id)
        _, *scores = pipe.execute()
        if any(score is not None for score in scores):
            return True
        self.forget([op_id])  # finished: keep() may have landed after finish()
        return False

    def forget(self, ids: list[str], pipe: Any = None) -> None:
        """Drop the kept tasks of ``ids`` (in ``pipe``, else at once): they are finished."""
        now = pipe is None
        pipe = self._redis.pipeline(transaction=True) if now else pipe
        pipe.zrem(self._seen, *ids)
        pipe.hdel(self._tasks, *ids)
        if now:
            pipe.execute()

    def unseen(self, after: float, limit: int = 500) -> list[list[Any]]:
        """The tasks ``[lane, op, meta]`` of operations no worker has run for ``after``
        seconds (their message was lost, or waits in a long queue), each taken as seen
        again later the older it is, so that a long outage of every worker adds few
        copies; ``[]`` when another process looked within ``after / 8`` seconds."""
        sweep = f"{self._prefix}:sweep"
        if not self._redis.set(sweep, 1, nx=True, px=max(int(after * 125), 1000)):
            return []
        now = time.time()
        ids = self._redis.zrangebyscore(self._seen, "-inf", now - after, start=0, num=limit)
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._tasks, ids)
        for key in self._pending:
            pipe.zmscore(key, ids)
        raws, *lanes = pipe.execute()
        tasks, finished = [], []
        for n, (op_id, raw) in enumerate(zip(ids, raws, strict=True)):
            if raw is not None and any(lane[n] is not None for lane in lanes):
                tasks.append(json.loads(raw))
            else:  # finished (by a worker of a version that kept nothing, say)
                finished.append(op_id)
        if finished:
            self.forget(finished)
        if tasks:
            # The next copy once the operation is twice as old as now (XX: not one finished since).
            ages = {op["id"]: now + max(now - op["created_at"] - after, 0.0) for _, op, _ in tasks}
            self._redis.zadd(self._seen, ages, xx=True)
        return tasks
