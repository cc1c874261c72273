"""``meisa.flush()`` in the threads of a real threaded server: in a thread of the request's
(``copy_current_request_context``) just as the response leaves and holds the request's work;
in receivers of the releases of several responses at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from flask import Flask
from flask import copy_current_request_context
from flask import request

from flask_meisa import Meisa
from flask_meisa import operation_queued
from flask_meisa.emulator import Emulator
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from tests.apps import build_app
from tests.servers import serve

UPSERT = "/contacts/upsert/"


class _LeavingEnviron(dict):  # type: ignore[type-arg]
    """A server's environ that, once the response body is stored in it, runs the request's
    ``flushing`` thread before the server's goes on (descheduled right there)."""

    flushing: threading.Thread | None = None

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key == "flask_meisa.held" and self.flushing is not None:
            self.flushing.start()
            self.flushing.join(10)


def test_a_request_thread_flushing_as_the_response_leaves_releases_its_work_once(
    emulator: Emulator,
) -> None:
    # The body was found before it held the work: a flush there released no batches (an
    # AttributeError), or released them before they were held, then held for good: every
    # later flush of the app waited its whole timeout and said work was left.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    said: list[object] = []
    inner = app.wsgi_app

    def leaving(environ: Any, start_response: Any) -> Any:
        return inner(_LeavingEnviron(environ), start_response)

    app.wsgi_app = leaving  # type: ignore[method-assign]

    @app.post("/report")
    def report() -> str:
        meisa.upsert({"email": "ada@example.com", "external_id": "ada"})

        @copy_current_request_context
        def flush() -> None:
            try:
                said.append(meisa.flush(5))
            except Exception as error:  # the test reports it
                said.append(error)

        request.environ.flushing = threading.Thread(target=flush)  # type: ignore[attr-defined]
        return "ok"

    try:
        with serve(app) as url, requests.Session() as http:
            assert http.post(f"{url}/report").status_code == 200
            assert said == [True]
            with app.app_context():
                started = time.monotonic()
                assert meisa.flush(5)
                assert time.monotonic() - started < 2
    finally:
        meisa.state(app).close(5.0)
    assert len(emulator.requests_to(UPSERT)) == 1


def test_receivers_flushing_in_releases_of_concurrent_responses_do_not_wait_for_each_other(
    emulator: Emulator,
) -> None:
    # An audit receiver that flushes once work is queued, on a threaded server: two
    # responses released at once, each receiver's flush waited for the other's release,
    # which waited in its own receiver: both waited their whole timeout.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    together = threading.Barrier(2, timeout=10)
    results: list[tuple[bool, float]] = []

    def on_queued(sender: Flask, operation: Operation, **extra: Any) -> None:
        together.wait()  # both releases are under way
        with sender.app_context():
            started = time.monotonic()
            results.append((meisa.flush(3.0), time.monotonic() - started))

    def login(url: str, user: int) -> None:
        with requests.Session() as http:
            assert http.post(f"{url}/login/{user}").status_code == 200

    operation_queued.connect(on_queued, sender=app)
    try:
        with serve(app) as url:
            clients = [threading.Thread(target=login, args=(url, user)) for user in (1, 2)]
            for client in clients:
                client.start()
            for client in clients:
                client.join(10)
            with app.app_context():
                assert meisa.flush(10)
    finally:
        operation_queued.disconnect(on_queued, sender=app)
        meisa.state(app).close(5.0)
    assert len(results) == 2 and all(flushed and took < 2.0 for flushed, took in results), results
    assert len(emulator.requests_to(UPSERT)) == 2
