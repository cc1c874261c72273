"""The threads flask-meisa starts: daemon threads that leave the process's signals to the
server's own threads."""

from __future__ import annotations

import signal
import sys
import threading
import weakref
from collections.abc import Callable

from .errors import ConfigurationError

#: What servers send a worker to stop, reload or report. A C handler (uWSGI's) runs in
#: whichever thread the kernel hands a process's signal to, and exits the process from
#: there: from one of ours, interrupted inside a wait, the exit waits on it forever.
_SIGNALS = {
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2")
}
_ours: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread named ``name`` running ``target``, those signals blocked in it
    (it inherits the mask in effect while it starts). Raises :class:`RuntimeError` where
    no thread can start (interpreter shutdown)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    _ours.add(thread)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return thread


def after_fork_in_child() -> None:
    """In a child forked from one of our threads (a signal receiver's job, a pool it
    starts): those signals given back, so that ``SIGTERM`` (``terminate()``) ends it."""
    if threading.current_thread() in _ours:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def require_real_threads() -> None:
    """Raise :class:`ConfigurationError` where gevent or eventlet has patched ``threading``:
    an engine's threads of its own would be greenlets."""
    gevent, eventlet = sys.modules.get("gevent.monkey"), sys.modules.get("eventlet.patcher")
    if gevent is not None and gevent.is_module_patched("threading"):
        green = "gevent"
    elif eventlet is not None and eventlet.is_monkey_patched("thread"):
        green = "eventlet"
    else:
        return
    raise ConfigurationError(
        f"background delivery needs real threads, and {green} monkey-patching makes them "
        'greenlets: set MEISA_DELIVERY = "sync" (or "celery")'
    )
