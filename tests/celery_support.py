"""Test support for the Celery engine: a real Redis server, real Celery worker processes,
and the worker's own app.

The worker side: ``celery -A tests.celery_support:worker_app worker`` builds a Flask app
with Meisa and a Celery app from the environment (``MEISA_TEST_URL``, ``MEISA_TEST_KEY``,
``MEISA_TEST_REDIS_URL``; the key never goes on a command line) and registers the delivery
task. Its outcome signals are pushed to the Redis list :data:`OUTCOMES` as JSON, so that a
test can see what the worker's hooks saw. With ``MEISA_TEST_HANG_AFTER_SEND`` set, the
worker's ``email_sent`` receiver announces itself on :data:`HUNG` and then blocks, so that
a test can kill the worker between a send and its acknowledgement.

The test side: the fixtures :func:`redis_server_fixture` (one ``redis-server`` per
session) and :func:`redis_url_fixture` (an emptied Redis per test), :func:`make_celery`
and :class:`WorkerProcess`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery  # type: ignore[import-untyped]
from flask import Flask

from flask_meisa import Meisa
from flask_meisa.engine.celery import init_celery
from flask_meisa.engine.celery import lane_queues
from flask_meisa.signals import contact_synced
from flask_meisa.signals import delivery_dropped
from flask_meisa.signals import delivery_failed
from flask_meisa.signals import email_sent
from flask_meisa.signals import email_suppressed
from flask_meisa.signals import event_tracked

ROOT = Path(__file__).resolve().parent.parent
#: Redis list of the worker's outcome signals (JSON objects).
OUTCOMES = "test:outcomes"
#: Redis list a hanging ``email_sent`` receiver pushes to before it blocks.
HUNG = "test:hung"
QUEUES = ",".join(lane_queues("meisa").values())


def make_celery(redis_url: str, *, visibility_timeout: float = 3600.0) -> Celery:
    """A Celery app on ``redis_url`` set up as the engine's docs advise: lanes taken in
    priority order, one message reserved per worker thread, JSON only."""
    app = Celery("flask-meisa-tests", set_as_current=False)
    app.conf.update(
        broker_url=redis_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "queue_order_strategy": "priority",
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": 0.25,
            "unacked_restore_throttle": 1,
            # A stopping worker waits out its pending BRPOP: keep it short in tests.
            "polling_interval": 0.2,
        },
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )
    return app


# -- the worker's side ---------------------------------------------------------------------


def _record(redis_client: Any, name: str, operation: Any, **detail: Any) -> None:
    entry = {"signal": name, "op": None, "kind": None, "payload": None, **detail}
    entry["worker"] = os.environ.get("MEISA_TEST_WORKER")
    if operation is not None:
        entry.update(op=operation.id, kind=operation.kind, payload=operation.payload)
        entry["attempts"] = operation.attempts
    redis_client.rpush(OUTCOMES, json.dumps(entry))


def _build_worker_app() -> Celery:
    env = os.environ
    redis_url = env["MEISA_TEST_REDIS_URL"]
    flask_app = Flask("celery-worker")
    flask_app.config.update(
        MEISA_API_KEY=env["MEISA_TEST_KEY"],
        MEISA_BASE_URL=env["MEISA_TEST_URL"],
        MEISA_RATE_LIMIT=env.get("MEISA_TEST_RATE_LIMIT") or None,
        MEISA_MAX_ATTEMPTS=5,
        MEISA_RETRY_BASE_DELAY=0.05,
        MEISA_RETRY_MAX_DELAY=0.2,
        MEISA_RETRY_DEADLINE=30.0,
        MEISA_TIMEOUT=3.0,
        MEISA_CONNECT_TIMEOUT=1.0,
    )
    celery_app = make_celery(
        redis_url, visibility_timeout=float(env.get("MEISA_TEST_VISIBILITY", "3600"))
    )
    flask_app.extensions["celery"] = celery_app
    Meisa(flask_app)
    init_celery(flask_app)

    recorder = redis.Redis.from_url(redis_url)
    receivers: list[Any] = []  # blinker holds receivers weakly

    def on(sig: Any, name: str) -> None:
        def receive(sender: Flask, operation: Any = None, **extra: Any) -> None:
            detail: dict[str, Any] = {}
            if "error" in extra:
                detail["status"] = getattr(extra["error"], "status", None)
            if "reason" in extra:
                detail["reason"] = extra["reason"]
            if "result" in extra and hasattr(extra["result"], "duplicate"):
                detail["duplicate"] = extra["result"].duplicate
            _record(recorder, name, operation, **detail)

        receivers.append(receive)
        sig.connect(receive, sender=flask_app)

    for sig, name in (
        (contact_synced, "contact_synced"),
        (event_tracked, "event_tracked"),
        (email_sent, "email_sent"),
        (delivery_failed, "delivery_failed"),
        (delivery_dropped, "delivery_dropped"),
        (email_suppressed, "email_suppressed"),
    ):
        on(sig, name)

    if env.get("MEISA_TEST_HANG_AFTER_SEND"):

        def hang(sender: Flask, **extra: Any) -> None:
            recorder.rpush(HUNG, "1")
            threading.Event().wait()  # until the test kills this process

        receivers.append(hang)
        email_sent.connect(hang, sender=flask_app)

    from celery.signals import worker_ready  # type: ignore[import-untyped]

    def ready(sender: Any = None, **extra: Any) -> None:
        recorder.rpush(f"test:ready:{env['MEISA_TEST_WORKER']}", "1")

    receivers.append(ready)
    worker_ready.connect(ready, weak=False)
    celery_app.flask_app = flask_app
    celery_app.test_receivers = receivers
    return celery_app


def __getattr__(name: str) -> Any:
    # Built on demand, so that importing this module for its fixtures starts nothing.
    if name == "worker_app":
        app = _build_worker_app()
        globals()["worker_app"] = app
        return app
    raise AttributeError(name)


# -- the test's side -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``redis-server`` on a free loopback port, without persistence, for the session;
    yields its URL. Skipped when redis-server is not installed, unless ``CI`` is set."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "redis-server is not installed (CI needs it: apt-get install redis-server)"
            )
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:  # a process on its own: nothing to wait on but its port
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(name="redis_url")
def redis_url_fixture(redis_server: str) -> Iterator[str]:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    yield redis_server


class WorkerProcess:
    """A ``celery worker`` subprocess on the test worker app; stopped by pid.

    :param env: the ``MEISA_TEST_*`` variables (emulator URL and key, Redis URL, ...).
    :param log: where the worker's output goes (shown when it fails to start).
    """

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        concurrency: int = 2,
        queues: str = QUEUES,
        pool: str = "threads",
    ) -> None:
        self.name = f"w{uuid.uuid4().hex[:8]}"
        self.log = log
        self._redis = redis.Redis.from_url(env["MEISA_TEST_REDIS_URL"])
        environment = {**os.environ, **env, "MEISA_TEST_WORKER": self.name}
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_support:worker_app",
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={queues}",
            f"--hostname={self.name}@localhost",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the worker consumes its queues (its ``worker_ready`` signal)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._redis.blpop([f"test:ready:{self.name}"], timeout=1):
                return
            if self.process.poll() is not None:
                break
        raise AssertionError(f"the worker did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no acknowledgement of the task in hand."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it lingers; closes the Redis client."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._redis.close()


def outcomes(redis_url: str) -> list[dict[str, Any]]:
    """Every outcome the workers' signals reported so far, oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(OUTCOMES, 0, -1)]
    finally:
        client.close()
