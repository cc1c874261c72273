"""The thread engine across process boundaries: interpreter exit, fork, green threads.

Exit and fork run in a separate interpreter (``tests/engine_support.py``) talking to the
emulator of this test over loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from flask_meisa.emulator import Emulator
from flask_meisa.engine.thread import ThreadDispatcher
from flask_meisa.errors import ConfigurationError
from flask_meisa.retry import RetryPolicy
from tests.engine_support import RecordingHooks

ROOT = Path(__file__).resolve().parent.parent
UPSERT = "/contacts/upsert/"


def run_scenario(
    url: str, key: str, *args: str, flush_timeout: float = 5.0
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MEISA_TEST_URL": url,
        "MEISA_TEST_KEY": key,
        "FLUSH_TIMEOUT": str(flush_timeout),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "tests.engine_support", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_exit_delivers_what_is_pending(emulator: Emulator) -> None:
    done = run_scenario(emulator.url, emulator.live_key, "exit", "25")
    assert done.returncode == 0, done.stderr
    upserts = emulator.requests_to(UPSERT)
    assert len(upserts) == 25
    assert {r.body["external_id"] for r in upserts} == {f"exit-{n}" for n in range(25)}
    assert "exit outcome delivered 25" in done.stdout
    assert "not delivered" not in done.stderr
    assert emulator.live_key not in done.stdout + done.stderr


def test_exit_reports_what_it_could_not_deliver() -> None:
    url = f"http://127.0.0.1:{closed_port()}/api/v1"
    done = run_scenario(url, "meisa_live_unreachable_0000", "exit", "7", flush_timeout=0.3)
    assert done.returncode == 0, done.stderr
    assert "7 operations were not delivered before shutdown (sync: 7)" in done.stderr
    assert "exit outcome dropped:shutdown 7" in done.stdout
    assert "meisa_live_unreachable_0000" not in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_empty_and_both_deliver_their_own(emulator: Emulator) -> None:
    done = run_scenario(emulator.url, emulator.live_key, "fork", "4", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    parent_pending = int(next(line for line in lines if "pending_at_fork" in line).split()[-1])
    assert parent_pending >= 2, done.stdout  # the budget (2/second) held them at the fork
    assert "child pending_at_start 0 delivered 0" in lines
    assert "child flushed True" in lines
    assert "child outcome delivered 3" in lines
    assert "parent flushed True child_exit 0" in lines
    assert "parent outcome delivered 4" in lines
    ids = sorted(r.body["external_id"] for r in emulator.requests_to(UPSERT))
    assert ids == sorted([f"parent-{n}" for n in range(4)] + [f"child-{n}" for n in range(3)])


@pytest.mark.parametrize(
    ("module", "function", "argument", "library"),
    [
        ("gevent.monkey", "is_module_patched", "threading", "gevent"),
        ("eventlet.patcher", "is_monkey_patched", "thread", "eventlet"),
    ],
)
def test_green_thread_patching_is_refused(
    monkeypatch: pytest.MonkeyPatch, module: str, function: str, argument: str, library: str
) -> None:
    # Neither library is installed here: stand in for a patched one the way its own
    # query would answer, with a module object in sys.modules.
    stub = types.ModuleType(module)
    setattr(stub, function, lambda name: name == argument)
    monkeypatch.setitem(sys.modules, module, stub)
    with pytest.raises(ConfigurationError, match=f"{library} monkey-patching"):
        ThreadDispatcher(
            client_factory=lambda: pytest.fail("no client is made"),
            hooks=RecordingHooks(),
            retry=RetryPolicy(),
        )


def test_unpatched_green_thread_libraries_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = types.ModuleType("gevent.monkey")
    stub.is_module_patched = lambda name: False  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gevent.monkey", stub)
    engine = ThreadDispatcher(
        client_factory=lambda: pytest.fail("no client is made"),
        hooks=RecordingHooks(),
        retry=RetryPolicy(),
    )
    assert engine.close() == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("queue_size", 0),
        ("workers", 0),
        ("workers", True),
        ("flush_timeout", -1),
        ("flush_timeout", float("nan")),
        ("rate_limit", "lots/minute"),
        ("retry", None),
    ],
)
def test_invalid_options_are_refused(option: str, value: object) -> None:
    options: dict[str, object] = {"retry": RetryPolicy(), option: value}
    with pytest.raises(ConfigurationError):
        ThreadDispatcher(
            client_factory=lambda: pytest.fail("no client is made"),
            hooks=RecordingHooks(),
            **options,  # type: ignore[arg-type]
        )
