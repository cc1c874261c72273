"""Process lifecycle of delivery engines: exit, fork and green threads.

- At interpreter exit every live engine gets a bounded flush (its ``flush_timeout``),
  and what is left is logged and reported. Worker threads are daemons, so they keep
  delivering while the exit hook waits for them, and never hold the process open.
- In a forked child (gunicorn ``--preload``, Celery prefork, ``multiprocessing`` with
  fork) every live engine starts afresh: new locks and conditions (a lock a parent thread
  held at the moment of the fork would stay held forever in the child), no threads (they
  start on the child's first submit), an empty queue (the parent keeps and delivers its
  own work) and a new client.
- Under gevent or eventlet monkey-patching, ``threading`` makes greenlets, which a
  blocking HTTP call or a ``Condition`` wait would starve or be starved by; the thread
  engine refuses to start there rather than lose work silently.

Engines are held through a :class:`weakref.WeakSet`: registering never keeps an engine
alive, and the exit and fork hooks are installed once per process, not once per engine.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from typing import Protocol

__all__ = ["ProcessBound", "green_threads", "track", "untrack"]

logger = logging.getLogger("flask_meisa.engine")


class ProcessBound(Protocol):
    """What an engine provides to be told about exit and fork."""

    def _at_exit(self) -> None: ...

    def _after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[ProcessBound] = weakref.WeakSet()
_installed = False
_install_lock = threading.Lock()


def track(engine: ProcessBound) -> None:
    """Flush ``engine`` at exit and reset it in forked children, for as long as it lives."""
    global _installed
    with _install_lock:
        if not _installed:
            atexit.register(_run_at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_run_after_fork)
            _installed = True
        _live.add(engine)


def untrack(engine: ProcessBound) -> None:
    """Stop tracking ``engine`` (it was closed)."""
    _live.discard(engine)


def _run_at_exit() -> None:
    for engine in list(_live):
        try:
            engine._at_exit()
        except Exception:
            logger.exception("flask-meisa: flushing a delivery engine at exit failed")


def _run_after_fork() -> None:
    global _install_lock
    _install_lock = threading.Lock()
    for engine in list(_live):
        try:
            engine._after_fork_in_child()
        except Exception:
            logger.exception("flask-meisa: resetting a delivery engine after fork failed")


def green_threads() -> str | None:
    """``"gevent"`` or ``"eventlet"`` when that library has monkey-patched ``threading``,
    else ``None``. Only modules already imported are consulted (a patch imports them)."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None:
        try:
            if gevent_monkey.is_module_patched("threading"):
                return "gevent"
        except Exception:
            logger.debug("could not ask gevent whether threading is patched", exc_info=True)
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None:
        try:
            if eventlet_patcher.is_monkey_patched("thread"):
                return "eventlet"
        except Exception:
            logger.debug("could not ask eventlet whether threads are patched", exc_info=True)
    return None
