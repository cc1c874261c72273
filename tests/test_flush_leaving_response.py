"""``meisa.flush()`` in a thread of the request's (``copy_current_request_context``) just
as the response leaves and holds the request's work, over a real threaded server."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from flask import copy_current_request_context
from flask import request

from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
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
