"""A request's operations: collected while the view runs, released to delivery (coalesced
per contact) once the server has written the response (under ``TESTING``, once the view
returned), never for a failed view. Outside a request, work goes to delivery at once."""

from __future__ import annotations

import json
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from operator import methodcaller
from typing import TYPE_CHECKING
from typing import Any

from flask import request
from flask import request_tearing_down

from ._threads import start_daemon
from .errors import DeliveryError
from .operations import Operation
from .operations import identities
from .signals import emit
from .signals import operation_queued

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

    from ._runtime import MeisaState

#: Environ keys: the request's batches (``{state: batch}``: work of another app's Meisa,
#: made in its app context, goes through that app's state); set while the middleware
#: handles the request; set once the app has returned its response.
_BATCH_KEY = "flask_meisa.batch"
_MIDDLEWARE_KEY = "flask_meisa.middleware"
_RESPONDED_KEY = "flask_meisa.responded"
_HELD_KEY = "flask_meisa.held"  # the response body that holds them while it is written

logger = logging.getLogger("flask_meisa")


#: A hook's work made into its operation once the response is out, where it costs the
#: request nothing (``None``: refused, in the hook's own words logged; nobody awaits it).
Later = Callable[[], "Operation | None"]


#: The work one request produced for one app, in arrival order.
Batch = list["Operation | Later"]


def _operations(batch: Batch) -> list[Operation]:
    """A request's operations, the later ones made now; a later upsert of a contact merged
    into the request's latest one when it can (see :meth:`Operation.merge`)."""
    operations: list[Operation] = []
    for item in batch:
        operation = item if isinstance(item, Operation) else item()
        if operation is not None:
            operations.append(operation)
    return operations if len(operations) < 2 else _coalesced(operations)


def _coalesced(made: list[Operation]) -> list[Operation]:
    """``made``, each upsert merged into the latest earlier one of its contact when it can."""
    operations: list[Operation] = []
    upserts: dict[str, Operation] = {}  # by each name of its contact
    for operation in made:
        if operation.kind != "upsert":
            operations.append(operation)
            continue
        names = _names(operation)
        earlier = next((upserts[n] for n in names if n in upserts), None)
        # Only into the latest upsert of every name either has, so that none overtakes one.
        if earlier is not None and any(
            upserts.get(n) is not earlier for n in {*names, *_names(earlier)}
        ):
            earlier = None
        if earlier is None or not earlier.merge(operation):
            operations.append(operation)
        else:
            operation, names = earlier, _names(earlier)
        for name in names:
            upserts[name] = operation
    return operations


def _environ() -> WSGIEnvironment | None:
    """The request's environ (``None`` outside a request), at a quarter of the cost of
    ``has_request_context()`` and ``request.environ`` (run on every request)."""
    try:
        return request._get_current_object().environ  # type: ignore[attr-defined,no-any-return]
    except RuntimeError:  # no request context
        return None


def _names(operation: Operation) -> list[str]:
    return [name for name in identities(operation.payload) if name]


def enqueue(state: MeisaState, operation: Operation | Later) -> None:
    """Add ``operation`` to the current request's batch while its response is being made;
    otherwise hand it to delivery now (:class:`DeliveryError` if the engine is full)."""
    environ = _environ()
    if environ is not None and not environ.get(_RESPONDED_KEY):
        batches = found = environ.get(_BATCH_KEY)
        if batches is None:
            if _MIDDLEWARE_KEY not in environ:
                # No after-response point (``test_request_context``): released at the
                # context's teardown, by a receiver other requests never pay for.
                request_tearing_down.connect(_teardown, weak=False)
            batches = environ[_BATCH_KEY] = {}
        batches.setdefault(state, []).append(operation)
        # A thread of the request's (copy_current_request_context) may have made the
        # batches just as the response left: then nothing else will release them.
        left = found is None and environ.get(_RESPONDED_KEY)
        if left and environ.pop(_BATCH_KEY, None) is batches:
            _release(batches, failed=False)
        return
    made = operation if isinstance(operation, Operation) else operation()
    if made is not None:
        _dispatch(state, [made], raise_refused=True)


def _dispatch(
    state: MeisaState, operations: Iterable[Operation], *, raise_refused: bool = False
) -> None:
    """Hand ``operations`` to delivery (only report them while delivery is off); one the
    engine refuses is reported dropped, or raised with ``raise_refused``."""
    delivering = state.delivering()
    for operation in operations:
        report_queued(state, operation, delivering)
        if not delivering:
            continue
        try:  # one at a time: an operation refused never holds back the others
            state.with_engine(methodcaller("submit", [operation]))
        except DeliveryError as error:
            if raise_refused:
                raise
            state.refused += 1
            logger.error("meisa: %s was not accepted: %s", operation.describe(), error)
            state.reporter.dropped(operation, "refused")


def report_queued(state: MeisaState, operation: Operation, delivering: bool) -> None:
    """Send :data:`~flask_meisa.signals.operation_queued` for ``operation``."""
    if operation_queued.receivers:  # spares the call on every login without one
        emit(operation_queued, state.app, operation=operation, delivering=delivering)
    if not delivering and state.app.debug:
        # Like a console mail backend: in development, show what Meisa would get.
        payload = json.dumps(operation.payload, ensure_ascii=False, sort_keys=True)
        logger.info("meisa (delivery off) would %s: %s", operation.kind, payload)


def _release(batches: dict[MeisaState, Batch] | None, *, failed: bool) -> None:
    """Deliver a finished request's batches, except when the request failed (and
    ``MEISA_RELEASE_ON_ERROR`` is off) or the batch's app is gone. Never raises."""
    for state, batch in (batches or {}).items():
        if not state.alive:  # a response outlived its app (a test's kept response)
            logger.debug("meisa: %d operations of a discarded app not released", len(batch))
        elif failed and not state.settings.release_on_error:
            count = len(_operations(batch))  # made all the same: a login's refusal is logged
            logger.info("meisa: the request failed; %d collected operation(s) not released", count)
        else:
            try:
                _dispatch(state, _operations(batch))
            except Exception:
                logger.exception("meisa: releasing a request's operations failed")


def _teardown(sender: Any, exc: BaseException | None = None, **extra: Any) -> None:
    """Release the work of a request context pushed without the middleware, at its teardown."""
    environ = _environ()
    if environ is not None and not environ.get(_MIDDLEWARE_KEY):
        _release(environ.pop(_BATCH_KEY, None), failed=exc is not None)


def release_now(state: MeisaState) -> None:
    """Hand the current request's batch of ``state``, if any, to delivery now (``meisa.flush``)."""
    environ = _environ()
    if environ is not None:
        batch = (environ.get(_BATCH_KEY) or {}).pop(state, None)
        if batch is not None:
            _dispatch(state, _operations(batch))
        held = environ.get(_HELD_KEY)
        if held is not None and (body := held()) is not None:  # in a streamed response
            body.release()


class HeldBatches:
    """One app's batches that responses hold until the server is done with them (of any
    app's middleware: work made in another app's context goes with that app's response);
    ``flush`` waits for them."""

    def __init__(self) -> None:
        # {id of a response: the thread releasing its batch, None until one does}: each
        # change is one atomic step, made without the lock (taken only to wake a waiter).
        self._held: dict[int, int | None] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # The threads in wait(): released(), on every request, notifies only while one waits.
        self._waiting: set[int] = set()

    def hold(self, response: object) -> None:
        """``response`` now holds a batch."""
        self._held[id(response)] = None

    def releasing(self, response: object) -> None:
        """This thread releases the batch of ``response`` now; it counts until :meth:`released`."""
        self._held[id(response)] = threading.get_ident()

    def released(self, response: object) -> None:
        """The batch of ``response`` no longer counts."""
        self._held.pop(id(response), None)
        # Read after the change: a waiter that did not see it already counted itself here.
        if self._waiting:
            with self._changed:
                self._changed.notify_all()

    def wait(self, timeout: float | None) -> bool:
        """Wait until no response holds a batch, at most ``timeout`` seconds (but for those this
        thread is releasing: a receiver of their signals waiting would wait for itself; and,
        while it releases one, for those threads waiting here release: each for the other)."""
        me = threading.get_ident()

        def done() -> bool:
            threads = list(self._held.values())
            waiting = self._waiting if me in threads else {me}
            return all(thread in waiting for thread in threads)

        with self._changed:
            self._waiting.add(me)
            self._changed.notify_all()  # a releasing thread waiting may wait for this one no more
            try:
                return self._changed.wait_for(done, timeout)
            finally:
                self._waiting.discard(me)


class AfterResponseMiddleware:
    """WSGI middleware that releases each request's batch once the server has closed the
    response body; under ``TESTING``, as soon as the app returned, so that a test can
    assert right after ``client.post()``."""

    def __init__(self, wsgi_app: WSGIApplication, state: MeisaState) -> None:
        self.wsgi_app = wsgi_app
        self._state = state

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        self._state.start()  # with the first request (``flask run``, a forked worker)
        environ[_MIDDLEWARE_KEY] = True
        status = ""

        def recording_start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status
            status = line
            return start_response(line, headers, exc_info)

        try:
            body = self.wsgi_app(environ, recording_start_response)
        except BaseException:
            _release(environ.pop(_BATCH_KEY, None), failed=True)
            raise
        finally:
            # From here on the response is on its way: work queued while a stream is
            # being written goes straight to delivery.
            environ[_RESPONDED_KEY] = True
        batches = environ.get(_BATCH_KEY)
        if not batches:
            return body
        if self._state.app.testing:
            _release(environ.pop(_BATCH_KEY, None), failed=_server_error(status))
            return body
        try:
            # Not kept in this frame, which outlives the call while a logged error's
            # traceback holds it (asgiref never closes a body: it goes once nothing holds it).
            return _ReleasingBody(body, batches, _server_error(status), environ)
        finally:
            # Taken from the request once held: a flush of a thread of the request's
            # meanwhile finds one or the other (or releases them itself).
            environ.pop(_BATCH_KEY, None)


def _server_error(status_line: str) -> bool:
    try:
        return int(status_line.split(" ", 1)[0]) >= 500
    except ValueError:
        return False


class _ReleasingBody:
    """A response body that releases its request's ``batches`` once, after the server is
    done with it (or dropped it without closing it), held by their apps until then; as
    failed also when writing it raised (a stream whose query fails: the client gets a 500,
    or a cut body)."""

    def __init__(
        self,
        body: Iterable[bytes],
        batches: dict[MeisaState, Batch],
        failed: bool,
        environ: WSGIEnvironment,
    ) -> None:
        self._body = body
        self._batches: dict[MeisaState, Batch] | None = batches
        self._failed = failed
        # The states held now are those released: a thread of the request's may still add
        # another app's batch to ``batches`` (it read them just before the response left).
        self._states = tuple(batches)
        for state in self._states:
            state.held.hold(self)
        # Last: a thread of the request's flushing now releases it, held and whole (found
        # earlier, it had no batches yet, or held them after their release, for good).
        environ[_HELD_KEY] = weakref.ref(self)  # not the body itself: no reference cycle

    def __iter__(self) -> Iterator[bytes]:
        try:
            # Not ``yield from``: closing this generator must not close the body twice.
            for chunk in self._body:  # noqa: UP028
                yield chunk
        except Exception:
            self._failed = True
            raise

    def close(self) -> None:
        """Close the wrapped body, then release the request's batch (once)."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self.release()

    def release(self) -> None:
        """Release the request's batches now, once."""
        batches, self._batches = self._batches, None
        if batches is None:
            return
        for state in self._states:
            state.held.releasing(self)
        try:
            _release(batches, failed=self._failed)
        finally:
            for state in self._states:
                state.held.released(self)

    def __del__(self) -> None:
        if self._batches is None:
            return
        if sys.is_finalizing():  # no other thread runs now, nor would one started
            self.close()
            return
        run_apart(self.close, "flask-meisa-release")


def run_apart(target: Callable[[], object], name: str) -> None:
    """Run ``target`` in a daemon thread named ``name``, for a finalizer or ``__del__``: the
    collector runs those in whichever thread it collects in, maybe one holding a lock
    ``target`` takes (the engine's, the state's). Starting a daemon thread takes none that
    thread may hold (threading's own is re-entrant)."""
    try:
        start_daemon(target, name)
    except RuntimeError:  # no new threads at interpreter shutdown
        target()
