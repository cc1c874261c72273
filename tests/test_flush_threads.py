"""``meisa.flush()`` in the threads of a real threaded server: in a thread of the request's
(``copy_current_request_context``) just as the response leaves and holds the request's work;
in receivers of the releases of several responses at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
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
    """A server's environ that, once the key ``at`` is stored in it or taken out, runs the
    request's ``flushing`` thread before the server's goes on (descheduled right there)."""

    flushing: threading.Thread | None = None

    def __init__(self, environ: Any, at: str) -> None:
        super().__init__(environ)
        self.at = at

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._leaving(key)

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._leaving(key)
        return value

    def _leaving(self, key: str) -> None:
        if key == self.at and self.flushing is not None:
            flushing, self.flushing = self.flushing, None
            flushing.start()
            flushing.join(10)


@pytest.mark.parametrize("at", ["flask_meisa.held", "flask_meisa.batch"])
def test_a_request_thread_flushing_as_the_response_leaves_releases_its_work_once(
    emulator: Emulator, at: str
) -> None:
    # The body was found before it held the work: a flush there released no batches (an
    # AttributeError), or released them before they were held, then held for good: every
    # later flush of the app waited its whole timeout and said work was left. And between
    # the batch taken from the request and the body holding it, a flush found neither: it
    # said all was delivered before the work was even handed over.
    app = build_app(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa: Meisa = app.extensions["meisa"]
    said: list[object] = []
    inner = app.wsgi_app

    def leaving(environ: Any, start_response: Any) -> Any:
        return inner(_LeavingEnviron(environ, at), start_response)

    app.wsgi_app = leaving  # type: ignore[method-assign]

    @app.post("/report")
    def report() -> str:
        meisa.upsert({"email": "ada@example.com", "external_id": "ada"})

        @copy_current_request_context
        def flush() -> None:
            try:
                said.append((meisa.flush(5), len(emulator.requests_to(UPSERT))))
            except Exception as error:  # the test reports it
                said.append(error)

        request.environ.flushing = threading.Thread(target=flush)  # type: ignore[attr-defined]
        return "ok"

    try:
        with serve(app) as url, requests.Session() as http:
            assert http.post(f"{url}/report").status_code == 200
            assert said == [(True, 1)]  # delivered by the time the flush said so
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
