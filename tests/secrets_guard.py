"""Secrets guard: a pytest plugin that fails a test whose run let an API key leak.

Enable it for the whole suite with one line in ``tests/conftest.py``::

    pytest_plugins = ["tests.secrets_guard"]

or for one run with ``python -m pytest -p tests.secrets_guard``.

**The secrets.** Every key of every :class:`~flask_meisa.emulator.Emulator` running during
the test or created by it (demo keys included: in a test, the demo key *is* the app's
key), every ``api_key`` given to a :class:`~flask_meisa.client.MeisaClient` and every
``MEISA_API_KEY`` an app was configured with during the test. Keys shorter than 16
characters are toy values and are not tracked. A key *leaks* when a text holds the whole
key, any 12 consecutive characters of it after its ``meisa_live_``/``meisa_test_``
prefix (a cut-off key), or its last 5 characters (more than the 4 a masked form shows).

**The texts scanned**, all collected while the test runs and scanned at its teardown:

- every log record of any logger (message and formatted traceback), DEBUG records
  included: every logger (``flask_meisa``, ``urllib3``, ``requests``, ``werkzeug``, the
  app's...) is made to produce them. Records are taken in ``Logger.handle`` and passed
  on only when the logger's level lets them through, so other handlers (``caplog``, the
  live log) see exactly what they would without the guard;
- ``str``, ``repr``, ``args`` and attributes of every
  :class:`~flask_meisa.errors.MeisaError` made, with its causes and contexts (and the
  headers of any ``requests`` request they hold);
- every operation the extension queued or recorded, and the arguments of every
  outcome signal;
- the output of every command run through ``click.testing.CliRunner`` (``flask``'s
  ``app.test_cli_runner()`` included);
- the ``repr`` of every flask-meisa object reachable from the clients, settings and
  runtime states made during the test (the emulator's own objects excepted: holding
  keys is its job);
- the test's captured stdout and stderr.

A leak fails the test at teardown with a report that names where the key appeared and
shows the text with every key masked; the captured output shown for the failure is
masked too. The standalone emulator prints its demo keys on purpose: it does so in its
own process, which the guard does not watch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import weakref
from collections.abc import Callable
from collections.abc import Generator
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import pytest
from click.testing import CliRunner

from flask_meisa import signals
from flask_meisa._runtime import MeisaState
from flask_meisa.client import MeisaClient
from flask_meisa.config import MeisaSettings
from flask_meisa.emulator import Emulator
from flask_meisa.errors import MeisaError
from tests.leak_scan import MIN_KEY_LENGTH
from tests.leak_scan import Secret
from tests.leak_scan import error_texts
from tests.leak_scan import find_leaks
from tests.leak_scan import mask
from tests.leak_scan import reachable

__all__ = ["pytest_configure", "pytest_runtest_makereport", "secrets_guard"]

#: Texts kept before they are scanned (and dropped) early, in characters.
_BUFFER_LIMIT = 32 * 1024 * 1024
#: Errors held (with their tracebacks) before the oldest is written down and let go.
_ERRORS_HELD = 64
_OUTCOME_SIGNALS = (
    signals.operation_queued,
    signals.contact_synced,
    signals.event_tracked,
    signals.email_sent,
    signals.email_suppressed,
    signals.delivery_failed,
    signals.delivery_dropped,
)


# -- what one test produced ----------------------------------------------------------------


@dataclass
class _TestRecord:
    """Everything gathered while one test runs."""

    keys: set[str] = field(default_factory=set)
    emulators: list[Emulator] = field(default_factory=list)
    roots: list[weakref.ref[Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0
    leaks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_key(self, key: object) -> None:
        if isinstance(key, str) and len(key.strip()) >= MIN_KEY_LENGTH:
            self.keys.add(key.strip())

    def add_error(self, error: BaseException) -> None:
        # Exceptions take no weak references, and a traceback holds its frames' locals:
        # hold a few, writing the oldest down (raised by then, causes set) as more come.
        with self.lock:
            self.errors.append(error)
            oldest = self.errors.pop(0) if len(self.errors) > _ERRORS_HELD else None
        if oldest is not None:
            for source, text in error_texts(oldest):
                self.add_text(source, text)

    def add_text(self, source: str, text: str) -> None:
        with self.lock:
            self.texts.append((source, text))
            self.size += len(text)
            if self.size <= _BUFFER_LIMIT:
                return
            texts, self.texts, self.size = self.texts, [], 0
        # A key cannot be in a text written before it existed: scan what is known so far.
        self.leaks.extend(find_leaks(texts, self.secrets()))

    def secrets(self) -> list[Secret]:
        keys = set(self.keys)
        for emulator in [*self.emulators, *list(_REGISTRY.emulators)]:
            if emulator in self.emulators or emulator.running:
                keys.update(k for k in emulator.keys.values() if len(k) >= MIN_KEY_LENGTH)
        return [Secret.of(key) for key in sorted(keys)]


class _Registry:
    """The hooks' shared state: emulators alive in the session, and the current test."""

    def __init__(self) -> None:
        self.emulators: weakref.WeakSet[Emulator] = weakref.WeakSet()
        self.current: _TestRecord | None = None

    def note(self, source: str, text: Callable[[], str]) -> None:
        record = self.current
        if record is not None:
            try:
                written = text()
            except Exception as error:  # a repr that raises is no leak, but say so
                written = f"<{source} could not be written: {type(error).__name__}>"
            record.add_text(source, written)


_REGISTRY = _Registry()


# -- hooks on the project's and the libraries' classes ------------------------------------


class _Patches:
    """Attribute patches, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        """Set ``owner.name`` (a class attribute), remembering the original."""
        if name in vars(owner):
            original = vars(owner)[name]
            self._undo.append(lambda: setattr(owner, name, original))
        else:
            self._undo.append(lambda: delattr(owner, name))
        setattr(owner, name, value)

    def undo(self) -> None:
        """Restore every patched attribute."""
        while self._undo:
            self._undo.pop()()


def _install_class_hooks(patches: _Patches) -> None:
    """Hooks that see keys being handed out and errors being made (whole session)."""
    emulator_init = Emulator.__init__
    create_key = Emulator.create_key
    client_init = MeisaClient.__init__
    from_config = vars(MeisaSettings)["from_config"].__func__
    state_init = MeisaState.__init__

    @functools.wraps(emulator_init)
    def init_emulator(self: Emulator, *args: Any, **kwargs: Any) -> None:
        emulator_init(self, *args, **kwargs)
        _REGISTRY.emulators.add(self)
        if _REGISTRY.current is not None:
            _REGISTRY.current.emulators.append(self)

    @functools.wraps(create_key)
    def create_emulator_key(self: Emulator, *args: Any, **kwargs: Any) -> str:
        key = create_key(self, *args, **kwargs)
        if _REGISTRY.current is not None:
            _REGISTRY.current.add_key(key)
        return key

    @functools.wraps(client_init)
    def init_client(self: MeisaClient, api_key: Any, *args: Any, **kwargs: Any) -> None:
        if _REGISTRY.current is not None:
            _REGISTRY.current.add_key(api_key)
        client_init(self, api_key, *args, **kwargs)
        if _REGISTRY.current is not None:
            _REGISTRY.current.roots.append(weakref.ref(self))

    def settings_from_config(cls: type[MeisaSettings], config: Any) -> MeisaSettings:
        if _REGISTRY.current is not None:
            _REGISTRY.current.add_key(config.get("MEISA_API_KEY"))
        settings: MeisaSettings = from_config(cls, config)
        _REGISTRY.note("repr of MeisaSettings", lambda: repr(settings))
        return settings

    @functools.wraps(state_init)
    def init_state(self: MeisaState, *args: Any, **kwargs: Any) -> None:
        state_init(self, *args, **kwargs)
        if _REGISTRY.current is not None:
            _REGISTRY.current.roots.append(weakref.ref(self))

    def init_error(self: MeisaError, *args: Any) -> None:
        super(MeisaError, self).__init__(*args)
        if _REGISTRY.current is not None:
            _REGISTRY.current.add_error(self)

    invoke = CliRunner.invoke

    @functools.wraps(invoke)
    def invoke_cli(self: CliRunner, *args: Any, **kwargs: Any) -> Any:
        result = invoke(self, *args, **kwargs)
        _REGISTRY.note("CLI output", lambda: _cli_text(result))
        return result

    patches.set(Emulator, "__init__", init_emulator)
    patches.set(Emulator, "create_key", create_emulator_key)
    patches.set(MeisaClient, "__init__", init_client)
    patches.set(MeisaSettings, "from_config", classmethod(settings_from_config))
    patches.set(MeisaState, "__init__", init_state)
    patches.set(MeisaError, "__init__", init_error)
    patches.set(CliRunner, "invoke", invoke_cli)


def _cli_text(result: Any) -> str:
    parts = [result.output]
    with contextlib.suppress(ValueError, AttributeError):
        parts.append(result.stderr)
    if result.exception is not None:
        parts.append(repr(result.exception))
    return "\n".join(str(p) for p in parts)


@contextlib.contextmanager
def _capturing_logs() -> Iterator[None]:
    """Take every log record in ``Logger.handle``; let every logger make every record,
    but pass on only those its level lets through (so handlers see what they would)."""
    patches = _Patches()
    enabled = logging.Logger.isEnabledFor
    handle = logging.Logger.handle
    formatter = logging.Formatter()

    def is_enabled_for(self: logging.Logger, level: int) -> bool:
        return True

    def handle_record(self: logging.Logger, log_record: logging.LogRecord) -> None:
        def text() -> str:
            written = log_record.getMessage()
            if log_record.exc_info:
                written += "\n" + formatter.formatException(log_record.exc_info)
            if log_record.stack_info:
                written += "\n" + log_record.stack_info
            return written

        source = f"log record {log_record.name} {log_record.levelname}"
        _REGISTRY.note(source, text)
        if enabled(self, log_record.levelno):
            handle(self, log_record)

    patches.set(logging.Logger, "isEnabledFor", is_enabled_for)
    patches.set(logging.Logger, "handle", handle_record)
    try:
        yield
    finally:
        patches.undo()


@contextlib.contextmanager
def _hearing_signals() -> Iterator[None]:
    def receiver(sender: Any, **kwargs: Any) -> None:
        _REGISTRY.note("signal arguments", lambda: _signal_text(kwargs))

    for signal in _OUTCOME_SIGNALS:
        signal.connect(receiver, weak=False)
    try:
        yield
    finally:
        for signal in _OUTCOME_SIGNALS:
            signal.disconnect(receiver)


def _signal_text(kwargs: dict[str, Any]) -> str:
    parts = [repr(kwargs)]
    operation = kwargs.get("operation")
    if operation is not None:
        parts.append(json.dumps(operation.to_dict(), default=repr))
    return "\n".join(parts)


def _final_texts(record: _TestRecord) -> Iterator[tuple[str, str]]:
    for error in record.errors:
        yield from error_texts(error)
    roots = [ref() for ref in record.roots]
    for obj in reachable(r for r in roots if r is not None):
        try:
            text = repr(obj)
        except Exception:
            continue
        yield f"repr of {type(obj).__name__}", text


# -- the fixture and the report hook -------------------------------------------------------

_RECORD_KEY = pytest.StashKey[_TestRecord]()


def pytest_configure(config: pytest.Config) -> None:
    """Install the class hooks for the session."""
    patches = _Patches()
    _install_class_hooks(patches)
    config.add_cleanup(patches.undo)


@pytest.fixture(autouse=True)
def secrets_guard(request: pytest.FixtureRequest) -> Generator[None, None, None]:
    """Fail the test at teardown if an API key leaked while it ran (see the module)."""
    record = _TestRecord()
    request.node.stash[_RECORD_KEY] = record
    _REGISTRY.current = record
    try:
        with _capturing_logs(), _hearing_signals():
            yield
    finally:
        _REGISTRY.current = None
    secrets = record.secrets()
    leaks = record.leaks + find_leaks([*record.texts, *_final_texts(record)], secrets)
    record.texts.clear()
    record.roots.clear()
    record.errors.clear()
    if leaks:
        shown = "\n  ".join(leaks[:10])
        more = f"\n  ... and {len(leaks) - 10} more" if len(leaks) > 10 else ""
        pytest.fail(
            f"secrets guard: an API key leaked in {len(leaks)} place(s):\n  {shown}{more}",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fail a passing test whose captured output shows a key, and mask the keys in
    every captured section the report shows."""
    report = yield
    record = item.stash.get(_RECORD_KEY, None)
    if record is None:
        return report
    secrets = record.secrets()
    if not secrets:
        return report
    output = [
        (title, text)
        for title, text in report.sections
        if title.startswith("Captured std") and title.endswith(f" {call.when}")
    ]
    leaks = find_leaks(output, secrets)
    report.sections = [(title, mask(text, secrets)) for title, text in report.sections]
    if leaks and report.passed:
        report.outcome = "failed"
        report.longrepr = "secrets guard: an API key leaked in the test's output:\n  " + (
            "\n  ".join(leaks)
        )
    return report
