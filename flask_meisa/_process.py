"""The process's one exit hook and one fork hook (docs/architecture.md, "Processes"): at
exit every live app state is closed (its work delivered or stored); around a fork no store
is made, none is in a transaction, and none keeps its file open, and the child makes every
live state its own."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from typing import Any

from . import _http
from . import _threads
from ._deferral import run_apart
from .config import DEFAULTS

if TYPE_CHECKING:
    from ._engine.store import Store
    from ._runtime import MeisaState

logger = logging.getLogger("flask_meisa")

#: The states to close at exit and to reset in a forked child.
live: weakref.WeakSet[MeisaState] = weakref.WeakSet()
#: Taken while a store is made: no fork then (see :func:`_before_fork`).
making = threading.Lock()
#: Set once the exit hook closes the live states: no engine is made again in this process.
exited = threading.Event()
_held: list[Store] = []


def close_apart(state: MeisaState) -> None:
    """Close ``state`` (its app was garbage-collected) in a thread of its own."""
    # A finalizer runs in whichever thread the collector ran in, maybe a delivery thread
    # inside a call on the store: closing there would close the store under that call.
    if state in live:  # not closed already
        run_apart(functools.partial(_close_quietly, state, 0.0), "flask-meisa-close")


def _close_quietly(state: MeisaState, timeout: float | None) -> None:
    try:
        state.close(timeout)
    except Exception:
        logger.exception("meisa: closing delivery failed")


def _at_exit() -> None:
    # First what collected apps and responses hand over in daemon threads (run_apart): exit
    # would stop those before they stored, delivered or reported it.
    ends = time.monotonic() + DEFAULTS["MEISA_FLUSH_TIMEOUT"]
    try:
        for thread in threading.enumerate():
            if thread.name in ("flask-meisa-release", "flask-meisa-close"):
                thread.join(max(ends - time.monotonic(), 0.0))
        exited.set()
        for state in list(live):
            _close_quietly(state, None)
    except KeyboardInterrupt:  # Ctrl+C (again) as it delivers: it ends now, no traceback
        logger.warning("meisa: exit interrupted: what is pending stays in a file outbox only")


def _before_fork() -> None:
    # No store is being made: a child would keep the lock its folder is checked under (it
    # goes with the open file), and share the SQLite locks of its first connection.
    making.acquire()
    # Every store, those being closed too (in use until their engine stopped).
    stores = sys.modules.get(f"{__package__}._engine.store")
    _held[:] = [] if stores is None else stores.STORES
    for store in _held:
        store.before_fork()


def _after_fork_in_parent(reopen: bool = True) -> None:
    for store in _held:
        store.after_fork_in_parent(reopen)
    _held.clear()
    making.release()


def _after_fork_in_child() -> None:
    _threads.after_fork_in_child()
    for store in _held:  # (a live state's is reset again with the state)
        store.after_fork()
    _held.clear()
    making.release()
    _reset_in_child()


def _reset_in_child(*then: Callable[[], object] | None) -> None:
    """A forked child's delivery made its own, then ``then``'s hook (uWSGI's post-fork)."""
    _http.after_fork()
    for state in list(live):
        try:
            state.after_fork()
        except Exception:
            logger.exception("meisa: resetting delivery after fork failed")
    for hook in then:
        if hook is not None:
            hook()


def forks_without_hooks() -> bool:
    """Whether this is a uWSGI master that loaded the app and will fork its workers without
    Python's fork hooks (uWSGI's default): a thread of ours running at that fork may hold
    the GIL, or a lock, and the worker hangs on it before its first request. Then the store
    files are closed now, and uWSGI's post-fork hook does in each worker what the Python one
    does, delivery started there."""
    uwsgi: Any = sys.modules.get("uwsgi")
    if uwsgi is None or uwsgi.worker_id() != 0 or uwsgi.opt.get("py-call-uwsgi-fork-hooks"):
        return False
    hook = getattr(uwsgi, "post_fork_hook", None)
    if not isinstance(hook, functools.partial) or hook.func is not _reset_in_child:
        uwsgi.post_fork_hook = functools.partial(_reset_in_child, hook)  # the app's kept
    _before_fork()  # as the fork's own hook would: no store file open across it
    _after_fork_in_parent(reopen=False)
    return True


# atexit runs the hook registered last first: weakref.finalize's (made on first use), where
# urllib3 closes its pools, must run after this one, which still delivers through them.
weakref.finalize(_at_exit, int).atexit = False
atexit.register(_at_exit)
# A multiprocessing child ends with os._exit, past the atexit hooks: its finalizers run.
multiprocessing.util.register_after_fork(
    _at_exit, lambda run: multiprocessing.util.Finalize(None, run, exitpriority=0)
)
os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


@contextmanager
def stops_interrupt() -> Iterator[None]:
    """In the main thread, for the block: ``SIGTERM`` (a redeploy, ``kill``) and ``SIGHUP``
    (the terminal or SSH session closed) raise :class:`KeyboardInterrupt`, as Ctrl+C does;
    one ignored (``nohup``) stays ignored."""
    stops = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    main = threading.current_thread() is threading.main_thread()
    kept = {stop: signal.getsignal(stop) for stop in stops if main}
    for stop, handler in kept.items():
        if handler is not signal.SIG_IGN:
            signal.signal(stop, signal.default_int_handler)
    try:
        yield
    finally:
        for stop, handler in kept.items():
            signal.signal(stop, handler)
