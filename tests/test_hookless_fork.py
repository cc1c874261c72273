"""A fork that runs no Python at-fork hook, as uWSGI makes its workers by default (without
``--py-call-uwsgi-fork-hooks``) or a C extension calling ``fork()``: the child must not
use the parent's connections, nor wait on a lock a parent thread held at the fork."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from flask_meisa.emulator import Emulator
from tests.hostile import Exchange
from tests.hostile import hostile
from tests.hostile import response

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

KEY = "meisa_live_" + "f0rkL3ss" * 4
PING = "/api/v1/ping/"
PONG = {"environment": "live", "scopes": ["contacts:write"], "product": {"id": "p", "name": "P"}}
CHILDS_CONTACT = {"id": "c-child", "email": "child@example.com", "status": "subscribed"}

# ctypes.PyDLL keeps the GIL across the call, so the child resumes in this thread; no
# os.register_at_fork hook runs.
SHARED_CONNECTION = textwrap.dedent(
    """
    import ctypes, json, os, sys
    from flask_meisa import _http
    from flask_meisa.client import MeisaClient
    from flask_meisa.retry import RetryPolicy

    client = MeisaClient(sys.argv[1], sys.argv[2], timeout=(1.0, 1.0),
                         retry=RetryPolicy.never())
    client.ping()  # the parent's keep-alive connection, in its pool
    with _http._watchdog().cond:  # not held by the watchdog thread across the fork
        pid = ctypes.PyDLL(None).fork()
    if pid == 0:  # a worker: its call gets no answer in time, and it gives up
        try:
            client.upsert_contact(email="child@example.com")
        except Exception as error:
            print("child", type(error).__name__, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("parent", json.dumps(client.ping().raw), flush=True)
    client.close()
    """
)


def test_a_child_calls_on_a_connection_of_its_own() -> None:
    lock = threading.Lock()
    held: dict[object, bytes] = {}  # per connection: an answer not sent yet

    def answer(exchange: Exchange) -> None:
        with lock:
            late = held.pop(exchange.sock, None)
            if late is None and exchange.method == "POST" and not held:
                held[exchange.sock] = response(200, CHILDS_CONTACT)  # answered late
                return
        if late is not None:
            exchange.send(late)  # the late answer comes first on its connection
        exchange.send(response(200, PONG if exchange.path == PING else CHILDS_CONTACT))

    with hostile(answer) as server:
        done = subprocess.run(
            [sys.executable, "-c", SHARED_CONNECTION, KEY, server.url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines.get("child") == "APITimeoutError", done.stdout + done.stderr
    # Shared, the parent's ping would read the answer meant for the child.
    assert json.loads(lines["parent"]) == PONG, f"{server.connections} connection(s)"


WORKER_EXITS = textwrap.dedent(
    """
    import ctypes, os, signal, sys, tempfile, time
    from flask import Flask
    from flask_meisa import Meisa

    app = Flask("hookless", instance_path=tempfile.mkdtemp())
    app.config.update(MEISA_API_KEY=sys.argv[1], MEISA_BASE_URL=sys.argv[2])
    meisa = Meisa(app)
    state = meisa.state(app)
    with app.app_context():
        meisa.upsert({"email": "parent@example.com"})
    state._lock.acquire()  # a parent thread inside the state at the moment of the fork
    pid = ctypes.PyDLL(None).fork()
    if pid == 0:
        sys.exit(0)  # the worker ends at once: the exit hook runs
    state._lock.release()
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print("child hung", flush=True)
            break
        time.sleep(0.05)
    else:
        print("child exited", flush=True)
    with app.app_context():
        print("parent flushed", meisa.flush(10), flush=True)
    """
)


def test_a_worker_that_never_used_the_app_exits_without_touching_the_parents_state(
    emulator: Emulator,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WORKER_EXITS, emulator.live_key, emulator.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == ["child exited", "parent flushed True"], done.stderr
    upserts = emulator.requests_to("/api/v1/contacts/upsert/")
    assert [r.body["email"] for r in upserts] == ["parent@example.com"]
