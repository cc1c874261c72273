"""Test support for the Celery engine: a real Redis server, real Celery worker processes,
and the worker's own app.

The worker side: ``celery -A tests.celery_support:worker_app worker`` builds a Flask app
with Meisa and a Celery app from the environment (``MEISA_TEST_URL``, ``MEISA_TEST_KEY``,
``MEISA_TEST_REDIS_URL``; the key never goes on a command line; ``MEISA_TEST_CONFIG``, a
JSON object of extra ``MEISA_*`` keys) and registers the delivery task. Its outcome
signals are pushed to the Redis list :data:`OUTCOMES` as JSON, so that a test can see
what the worker's hooks saw. With ``MEISA_TEST_HANG_AFTER_SEND`` set, the
worker's ``email_sent`` receiver announces itself on :data:`HUNG` and then blocks, so that
a test can kill the worker between a send and its acknowledgement; with
``MEISA_TEST_UNPUBLISHED_RETRIES=N`` the broker refuses the worker's first N retries.

The test side: the fixture :func:`redis_url_fixture` (the session's ``redis-server``, of
``tests/conftest.py``, emptied for each test), :class:`RedisServer`
(one a test can restart), :func:`make_celery` and :class:`WorkerProcess`.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery  # type: ignore[import-untyped]
from flask import Flask
from redis import Redis

from flask_meisa import Meisa
from flask_meisa._engine.celery import CeleryDispatcher
from flask_meisa._engine.celery_setup import TASK_NAME
from flask_meisa._engine.celery_worker import lane_queues
from flask_meisa.emulator import Emulator
from flask_meisa.signals import contact_synced
from flask_meisa.signals import delivery_dropped
from flask_meisa.signals import delivery_failed
from flask_meisa.signals import email_sent
from flask_meisa.signals import email_suppressed
from flask_meisa.signals import event_tracked
from tests.engine_support import RecordingHooks

ROOT = Path(__file__).resolve().parent.parent
#: Redis list of the worker's outcome signals (JSON objects).
OUTCOMES = "test:outcomes"
#: Redis list a hanging ``email_sent`` receiver pushes to before it blocks.
HUNG = "test:hung"
QUEUES = ",".join(lane_queues("meisa").values())


def make_celery(redis_url: str, *, visibility_timeout: float | None = None) -> Celery:
    """A Celery app on ``redis_url`` set up as the engine's docs advise: lanes taken in
    priority order, one message reserved per worker thread, JSON only; the visibility
    timeout is the engine's default unless given."""
    app = Celery("flask-meisa-tests", set_as_current=False)
    options: dict[str, Any] = {
        "queue_order_strategy": "priority",
        "unacked_restore_interval": 0.25,
        "unacked_restore_throttle": 1,
        # A Redis restart during a sweep keeps the sweep's lock (AOF), and no sweep runs
        # until it expires (300 s by default): short here, as the tests sweep every 0.25 s.
        "unacked_mutex_expire": 3,
        # A stopping worker waits out its pending BRPOP: keep it short in tests.
        "polling_interval": 0.2,
    }
    if visibility_timeout is not None:
        options["visibility_timeout"] = visibility_timeout
    app.conf.update(
        broker_url=redis_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=options,
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
        MEISA_DELIVERY="celery",
        MEISA_BASE_URL=env["MEISA_TEST_URL"],
        MEISA_RATE_LIMIT=env.get("MEISA_TEST_RATE_LIMIT") or None,
        MEISA_MAX_ATTEMPTS=5,
        MEISA_RETRY_BASE_DELAY=0.05,
        MEISA_RETRY_MAX_DELAY=0.2,
        MEISA_RETRY_DEADLINE=30.0,
        MEISA_TIMEOUT=3.0,
        MEISA_CONNECT_TIMEOUT=1.0,
    )
    flask_app.config.update(json.loads(env.get("MEISA_TEST_CONFIG") or "{}"))
    visibility = env.get("MEISA_TEST_VISIBILITY")
    celery_app = make_celery(
        redis_url, visibility_timeout=float(visibility) if visibility else None
    )
    flask_app.extensions["celery"] = celery_app
    Meisa(flask_app)  # registers the delivery task, as the app factory of a worker does

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
            if "unchanged" in extra:
                detail["unchanged"] = extra["unchanged"]
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

    def hang(sender: Flask, **extra: Any) -> None:
        recorder.rpush(HUNG, "1")
        threading.Event().wait()  # until the test kills this process

    receivers.append(hang)
    for variable, after in (
        ("MEISA_TEST_HANG_AFTER_SEND", email_sent),
        ("MEISA_TEST_HANG_AFTER_FAILURE", delivery_failed),
    ):
        if env.get(variable):
            after.connect(hang, sender=flask_app)

    unpublished = [None] * int(env.get("MEISA_TEST_UNPUBLISHED_RETRIES") or 0)
    if unpublished:
        # The broker refuses this worker's first retries, as one that is restarting does.
        task = celery_app.tasks[TASK_NAME]
        publish = task.apply_async

        def refuse_first(*args: Any, **kwargs: Any) -> Any:
            with contextlib.suppress(IndexError):
                unpublished.pop()
                raise redis.ConnectionError("the broker is restarting (a test's fault)")
            return publish(*args, **kwargs)

        task.apply_async = refuse_first

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


def _redis_binary() -> str:
    """The ``redis-server`` binary; the test is skipped without it, unless ``CI`` is set."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "redis-server is not installed (CI needs it: apt-get install redis-server)"
            )
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


class RedisServer:
    """A ``redis-server`` on a free loopback port, with its files in ``workdir``; with
    ``appendonly`` it persists every write (AOF), else nothing. Stopped by pid."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.binary = _redis_binary()
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers."""
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes" if self.appendonly else "no"]
        self.process = subprocess.Popen(
            command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 10
            while True:  # a process on its own: nothing to wait on but its port
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (a clean shutdown, which writes the AOF), then SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop it and start it again on the same port and files."""
        self.stop()
        self.start()


@pytest.fixture(name="own_redis")
def own_redis_fixture(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``own_redis(appendonly=False)``: a started :class:`RedisServer` of the test's own,
    which it may restart; stopped after the test (request it before ``start_worker``, so
    that the workers stop first)."""
    servers: list[RedisServer] = []

    def start(*, appendonly: bool = False) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        servers.append(RedisServer(workdir, appendonly=appendonly))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(name="redis_url")
def redis_url_fixture(redis_server: str) -> Iterator[str]:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    yield redis_server


@pytest.fixture(name="client")
def redis_client_fixture(redis_url: str) -> Iterator[Any]:
    """A connection to the test's Redis."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


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
            # Its own process group: the main process and its pool can be killed at once.
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
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
        """SIGKILL to the main process and its pool: no warm shutdown, no acknowledgement
        of the tasks in hand."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then :meth:`kill` if it lingers (its pool too);
        closes the Redis client."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        self.kill()
        self._redis.close()


def outcomes(redis_url: str) -> list[dict[str, Any]]:
    """Every outcome the workers' signals reported so far, oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(OUTCOMES, 0, -1)]
    finally:
        client.close()


#: ``start_worker(emulator, wait=True, concurrency=2, pool="threads", **env)``.
StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(name="start_worker")
def start_worker_fixture(redis_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker(emulator, ...)``: a worker process on that emulator and the test's
    Redis (``redis=`` another URL; extra ``MEISA_TEST_*`` variables in ``env``); every
    worker is stopped after."""
    started: list[WorkerProcess] = []

    def start(
        emulator: Emulator,
        *,
        wait: bool = True,
        concurrency: int = 2,
        pool: str = "threads",
        redis: str | None = None,
        queues: str = QUEUES,
        **env: str,
    ) -> WorkerProcess:
        variables = {
            "MEISA_TEST_URL": emulator.url,
            "MEISA_TEST_KEY": emulator.live_key,
            "MEISA_TEST_REDIS_URL": redis or redis_url,
            **env,
        }
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(variables, log, concurrency=concurrency, pool=pool, queues=queues)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(name="producer")
def producer_fixture(redis_url: str) -> Iterator[Callable[..., CeleryDispatcher]]:
    """``producer(emulator, rate_limit=None, redis=None, hooks=None, lost_after=None)``: a
    dispatcher publishing for that emulator's key (on the test's Redis unless ``redis`` is
    given); all closed after."""
    made: list[tuple[CeleryDispatcher, Celery]] = []

    def make(
        emulator: Emulator,
        rate_limit: str | None = None,
        redis: str | None = None,
        hooks: Any = None,
        lost_after: float | None = None,
    ) -> CeleryDispatcher:
        celery_app = make_celery(redis or redis_url)
        dispatcher = CeleryDispatcher(
            celery_app,
            redis=Redis.from_url(redis or redis_url),
            hooks=hooks or RecordingHooks(),
            rate_limit=rate_limit,
            budget_key=emulator.live_key,
            lost_after=lost_after,
        )
        made.append((dispatcher, celery_app))
        return dispatcher

    yield make
    for dispatcher, celery_app in made:
        dispatcher.close()
        celery_app.close()


class SlowProxy:
    """A TCP proxy on a free loopback port to ``port``, each chunk held ``delay`` seconds
    each way: a Redis that answers slowly (another region, an overloaded host)."""

    def __init__(self, port: int, delay: float) -> None:
        self.delay, self.target = delay, port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(self.delay)
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close it and every connection through it."""
        self._listener.close()
        for end in self._sockets:
            end.close()
