"""Servers other than gunicorn's sync and gthread workers, with the default delivery.

- uWSGI (the ``uwsgi`` command of the pyuwsgi package) with its default prefork: the app
  loaded in the master, which forks its workers without Python's fork hooks (no
  ``--lazy-apps``, no ``--py-call-uwsgi-fork-hooks``). A thread of ours running in the
  master at that fork could hold the GIL there, and the worker would hang before its
  first request; the workers must serve, and one of them deliver.
- uWSGI stopping its workers: its handler of SIGINT exits the process from whichever
  thread the kernel gave the signal to; from one of ours, waiting on a lock, that exit
  waited on it until the master killed the worker.
- gunicorn's gevent worker under ``--preload``: the app is loaded, and its engine made,
  before gevent patches the worker; the default delivery is refused there as it is when
  gevent patched first.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from flask_meisa.emulator import Emulator
from tests.process_support import Process
from tests.process_support import Processes
from tests.process_support import blocked_signals
from tests.process_support import environment
from tests.process_support import no_loss
from tests.process_support import store_path
from tests.process_support import stored
from tests.process_support import tally
from tests.test_gunicorn_delivery import free_port
from tests.test_gunicorn_delivery import holder
from tests.test_gunicorn_delivery import no_control_socket
from tests.test_gunicorn_delivery import post_all
from tests.test_gunicorn_delivery import statuses
from tests.test_gunicorn_delivery import work

pytestmark = pytest.mark.slow

UWSGI = str(Path(sys.executable).parent / "uwsgi")
WORKERS = 3
MERCY = 20  # seconds


@pytest.fixture
def uwsgi() -> str:
    pytest.importorskip("pyuwsgi")
    return UWSGI


def start_uwsgi(processes: Processes, emu: Emulator, instance: Path, rate: str) -> Process:
    port = free_port()
    command = [
        UWSGI,
        f"--http-socket=127.0.0.1:{port}",
        "--master",
        f"--processes={WORKERS}",
        "--die-on-term",
        "--need-app",
        # A hung worker is killed this soon at the end, not after a minute.
        f"--worker-reload-mercy={MERCY}",
        f"--reload-mercy={MERCY}",
        "--module=tests.served_app:create_app()",
    ]
    process = processes.start(command, environment(emu, instance, MEISA_TEST_RATE=rate))
    process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    assert process.wait_for(lambda p: p.output.count("spawned uWSGI worker") >= WORKERS, 60)
    return process


def test_uwsgi_workers_forked_without_fork_hooks_serve_and_deliver(
    uwsgi: str, emulator_factory: Callable[..., Emulator], processes: Processes, instance: Path
) -> None:
    rate = "40/second"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    server = start_uwsgi(processes, emu, instance, rate)
    for _ in range(2 * WORKERS):  # every worker answers (a hung one would not)
        assert requests.get(server.url + "/pid", timeout=10).ok  # type: ignore[attr-defined]
    requests_made = 60
    post_all(server.url, work(range(requests_made)))  # type: ignore[attr-defined]
    assert emu.wait_for(lambda e: no_loss(tally(e, requests_made)), 60), tally(emu, requests_made)
    # A worker delivers: the master, which serves nothing, started no delivery, and holds
    # no store file open (a worker's connection would share the SQLite locks of its own).
    assert holder(instance) not in (None, 0, server.pid)
    assert not [
        name for name in open_files(server.pid) if name.startswith(str(store_path(instance)))
    ]
    assert server.stop() == 0, server.output
    counts = statuses(emu)
    print(f"\nuWSGI {WORKERS} workers, default prefork, {rate}: {dict(counts)}")
    assert counts[429] == 0
    assert stored(instance).pending == 0
    assert emu.live_key not in server.output


def open_files(pid: int) -> list[str]:
    """What process ``pid`` has open, by path."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            found.append(os.readlink(fd))
    return found


def test_uwsgi_workers_stop_promptly_while_delivery_threads_run(
    uwsgi: str, emulator_factory: Callable[..., Emulator], processes: Processes, instance: Path
) -> None:
    emu = emulator_factory(rate_limit=None)
    server = start_uwsgi(processes, emu, instance, "none")
    post_all(server.url, work(range(100)))  # type: ignore[attr-defined]
    assert emu.wait_for(lambda e: no_loss(tally(e, 100)), 60), tally(emu, 100)
    workers = [
        int(pid) for pid in re.findall(r"spawned uWSGI worker \d+ \(pid: (\d+)", server.output)
    ]
    stopping = {signal.SIGINT, signal.SIGTERM}
    for worker in workers:  # the kernel hands those signals to the worker's main thread
        threads = blocked_signals(worker)
        assert len(threads) > 1, "no thread of ours in a worker"
        for thread, mask in threads.items():
            if thread != worker:
                assert all(mask >> (number - 1) & 1 for number in stopping), (worker, thread)
    began = time.monotonic()
    assert server.stop() == 0, server.output
    took = time.monotonic() - began
    print(f"\nuWSGI stopped in {took:.1f}s")
    assert took < MERCY / 2, server.output[-2000:]


def start_gevent_preloaded(
    processes: Processes, emu: Emulator, instance: Path, **env: str
) -> tuple[Process, str]:
    """gunicorn's gevent worker under ``--preload`` (one worker, ``env`` more variables),
    and its URL."""
    pytest.importorskip("gevent")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers=1",
        "--worker-class=gevent",
        "--preload",
        f"--bind=127.0.0.1:{port}",
        *no_control_socket(),
        "tests.served_app:create_app()",
    ]
    server = processes.start(command, environment(emu, instance, **env))
    assert server.wait_for_line("Booting worker", 60), server.output
    return server, f"http://127.0.0.1:{port}"


def test_gunicorn_gevent_worker_under_preload_refuses_the_default_delivery(
    emulator_factory: Callable[..., Emulator], processes: Processes, instance: Path
) -> None:
    emu = emulator_factory(rate_limit=None)
    server, url = start_gevent_preloaded(processes, emu, instance)
    for _ in range(2):
        assert requests.post(url + "/work/1", timeout=30).status_code == 500
    assert server.wait_for_line('set MEISA_DELIVERY = "sync" (or "celery")', 30), server.output
    assert emu.events(event_name="worked") == []
    assert emu.live_key not in server.output


def test_gunicorn_gevent_worker_under_preload_delivers_with_sync_delivery(
    emulator_factory: Callable[..., Emulator], processes: Processes, instance: Path
) -> None:
    # What the refusal above says to do. The HTTP watchdog made at the fork, before gevent
    # patched the worker, failed the worker's first call (its thread a greenlet).
    emu = emulator_factory(rate_limit=None)
    server, url = start_gevent_preloaded(processes, emu, instance, MEISA_TEST_DELIVERY="sync")
    for n in range(10):
        assert requests.post(f"{url}/work/{n}", timeout=30).ok
    assert emu.wait_for(lambda e: no_loss(tally(e, 10)), 30), tally(emu, 10)
    assert "releasing a request's operations failed" not in server.output
    assert emu.live_key not in server.output
