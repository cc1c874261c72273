"""The app that the process tests run in processes of their own: served by gunicorn
(``tests.served_app:create_app()``), named by ``FLASK_APP`` for ``flask meisa ...``, or
run as ``python -m tests.served_app <scenario>``.

It is configured from the environment, so that the API key never goes on a command line:
``MEISA_TEST_URL``, ``MEISA_TEST_KEY``, ``MEISA_TEST_INSTANCE`` (the instance folder, where
the delivery store is by default), and optionally ``MEISA_TEST_RATE`` (the key's budget;
``none`` for none), ``MEISA_TEST_OUTBOX``, ``MEISA_TEST_FLUSH_TIMEOUT`` and
``MEISA_TEST_DELIVERY``. Nothing else of flask-meisa's configuration is set: delivery is
the default one unless ``MEISA_TEST_DELIVERY`` says otherwise.

Scenarios:

- ``serve <n>``: make ``n`` requests to ``POST /work/<i>``, print ``ready``, then wait for
  a signal (SIGTERM exits normally, as WSGI servers make it do);
- ``drain``: start the app, flush what the store holds, print ``flushed <bool>``;
- ``keep-response [testing]``: make a request with the test client, keep its response
  unclosed, drop the app and exit;
- ``fork [mid-write|parent-dies]``: deliver a request's operations, fork, let the child
  make five requests and wait for the parent (the delivering process) to deliver them;
  with ``mid-write``, another thread of the parent is inside a write of the store when
  the fork is called (as the writer thread may be); with ``parent-dies``, the parent
  exits at once without closing anything (as when it is killed), and the child takes
  over. The child gives up after 45 seconds.
- ``reuse``: make a request, close delivery, make ten more, exit without a flush; with
  ``closing``, the ten are made while another thread's close still flushes the first;
- ``exit-fetch``: deliver, start a suppression list fetch, then wait for a signal (SIGTERM
  exits normally); after the exit hooks, print ``engine after exit <bool>`` (whether the app
  has a delivery engine again);
- ``exit-request``: deliver a request's operations, exit; after the exit hook, serve one more
  request and print ``late request <status> dropped <reasons>``;
- ``exit-paused [<email>]``: pause the host's delivery for 2 s (as a 429 does), send
  ``receipt`` to ``<email>`` in the background (without one, upsert a user), exit; print
  ``suppressed <email>`` or ``failed <error>`` for what delivery reports meanwhile;
- ``pool <n>``: deliver a request's operations, start ``n`` ``multiprocessing`` children
  (forked) that make five requests each and return, then flush, print ``pool flushed
  <bool> exits <codes>``.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any
from typing import cast

from flask import Flask
from flask_login import LoginManager
from flask_login import login_user

from flask_meisa import Meisa
from flask_meisa import delivery_dropped
from flask_meisa import delivery_failed
from flask_meisa import email_suppressed
from flask_meisa._engine.delivery import Delivery
from flask_meisa._engine.store import Store
from tests.apps import User

#: ``POST /work/<n>`` upserts user ``n % USERS``.
USERS = 20
#: ``flask meisa sync-users`` upserts members ``1000`` to ``1000 + MEMBERS - 1``.
MEMBERS = 200
#: How long ``POST /hang`` waits at most for its release file, in seconds.
HANG_LIMIT = 300.0
#: The file in the instance folder whose creation ends every hanging request.
RELEASE_FILE = "release-hung-requests"


def create_app() -> Flask:
    """The app (see the module's docstring). Its views:

    - ``POST /work/<n>``: upserts user ``n % USERS`` with the custom field ``f<n>``, tracks
      ``worked`` with ``{"n": n}``, and for every tenth ``n`` sends ``receipt`` in the
      background with the idempotency key ``k<n>``;
    - ``POST /sync/<n>``: only the upsert of ``/work/<n>``;
    - ``POST /login/<user>/<visit>``: logs the user in (Flask-Login syncs them, with the
      custom field ``login_<visit>``) and tracks ``logged_in`` with the visit;
    - ``POST /hang``: in the process that delivers for the host, writes ``hung-<pid>`` in
      the instance folder and answers only once :data:`RELEASE_FILE` exists there; in
      any other process answers 409 at once;
    - ``GET /pid``: the serving process's pid;

    and ``flask meisa sync-users`` upserts :data:`MEMBERS` members.
    """
    app = Flask(__name__, instance_path=os.environ["MEISA_TEST_INSTANCE"])
    app.config.update(
        SECRET_KEY="test",
        MEISA_API_KEY=os.environ["MEISA_TEST_KEY"],
        MEISA_BASE_URL=os.environ["MEISA_TEST_URL"],
        MEISA_RETRY_BASE_DELAY=0.05,
        MEISA_RETRY_MAX_DELAY=0.5,
        MEISA_TIMEOUT=2.0,
    )
    rate = os.environ.get("MEISA_TEST_RATE")
    if rate is not None:
        app.config["MEISA_RATE_LIMIT"] = None if rate == "none" else rate
    if "MEISA_TEST_OUTBOX" in os.environ:
        app.config["MEISA_OUTBOX"] = os.environ["MEISA_TEST_OUTBOX"]
    if "MEISA_TEST_DELIVERY" in os.environ:
        app.config["MEISA_DELIVERY"] = os.environ["MEISA_TEST_DELIVERY"]
    if "MEISA_TEST_FLUSH_TIMEOUT" in os.environ:
        app.config["MEISA_FLUSH_TIMEOUT"] = float(os.environ["MEISA_TEST_FLUSH_TIMEOUT"])
    login_manager = LoginManager(app)
    login_manager.user_loader(lambda user_id: None)
    meisa = Meisa(app)

    @meisa.contact_mapper
    def to_contact(user: User) -> dict[str, Any]:
        return {
            "email": user.email,
            "external_id": str(user.id),
            "custom_fields": {f"login_{user.visit}": user.visit},
        }

    @meisa.users_to_sync(count=lambda: MEMBERS)
    def members() -> Iterator[User]:
        return (User(n, f"member{n}@example.com", visit=0) for n in range(1000, 1000 + MEMBERS))

    @app.post("/work/<int:n>")
    def work(n: int) -> str:
        user = n % USERS
        meisa.upsert(
            {
                "email": f"user{user}@example.com",
                "external_id": f"u{user}",
                "custom_fields": {f"f{n}": n},
            }
        )
        meisa.track("worked", external_id=f"u{user}", properties={"n": n})
        if n % 10 == 0:
            meisa.send(
                "receipt", f"buyer{n}@example.com", idempotency_key=f"k{n}", background=True
            )
        return "ok"

    @app.post("/sync/<int:n>")
    def sync(n: int) -> str:
        user = n % USERS
        meisa.upsert(
            {
                "email": f"user{user}@example.com",
                "external_id": f"u{user}",
                "custom_fields": {f"f{n}": n},
            }
        )
        return "ok"

    @app.post("/login/<int:user_id>/<int:visit>")
    def login(user_id: int, visit: int) -> dict[str, int]:
        user = User(user_id, f"user{user_id}@example.com", visit=visit)
        login_user(user)
        meisa.track("logged_in", user=user, properties={"visit": visit})
        return {"pid": os.getpid()}

    @app.post("/hang")
    def hang() -> tuple[str, int]:
        if meisa.status().delivering_pid != os.getpid():
            return "not the delivering process", 409
        with open(os.path.join(app.instance_path, f"hung-{os.getpid()}"), "w"):
            pass
        release = os.path.join(app.instance_path, RELEASE_FILE)
        deadline = time.monotonic() + HANG_LIMIT
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return "released", 200

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    return app


def say(line: str) -> None:
    """Print one line with a single write (a parent's and its child's never interleave)."""
    os.write(1, (line + "\n").encode())


def serve(requests: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client = create_app().test_client()
    for n in range(requests):
        client.post(f"/work/{n}").close()  # closing the response releases its operations
    say("ready")
    while True:
        signal.pause()


def drain() -> None:
    app = create_app()
    with app.app_context():
        flushed = app.extensions["meisa"].flush(60)
    say(f"flushed {flushed}")


def fork(mid_write: bool, parent_dies: bool = False) -> None:
    app = create_app()
    meisa: Meisa = app.extensions["meisa"]
    app.test_client().post("/work/1").close()
    with app.app_context():
        meisa.flush(10)
        say(f"parent delivers {meisa.status().delivering_pid == os.getpid()}")
    writing = threading.Event()

    def a_long_write() -> None:
        with meisa.state(app).store().write():
            writing.set()
            time.sleep(0.5)  # a slow commit, such as a busy disk makes

    writer = threading.Thread(target=a_long_write)
    if mid_write:
        writer.start()
        writing.wait(10)
    parent = os.getpid()
    pid = os.fork()  # with the delivery lock held and the store open
    if pid == 0:
        signal.alarm(45)
        while parent_dies and os.getppid() == parent:
            time.sleep(0.01)  # until the kernel has closed the parent's files
        child = app.test_client()
        for n in range(2, 7):
            child.post(f"/work/{n}").close()
        with app.app_context():
            flushed = meisa.flush(20)  # the parent delivers the child's rows
            delivering = meisa.status().delivering_pid
        who = "parent" if delivering == os.getppid() else delivering
        who = "child" if delivering == os.getpid() else who
        say(f"child flushed {flushed} delivering {who}")
        os._exit(0)
    if parent_dies:
        os._exit(0)  # no close, no exit hook: the kernel alone lets go of the lock
    if mid_write:
        writer.join()
    _, status = os.waitpid(pid, 0)
    with app.app_context():
        say(f"parent flushed {meisa.flush(10)} child_exit {os.waitstatus_to_exitcode(status)}")


def pool(children: int) -> None:
    app = create_app()
    app.test_client().post("/work/0").close()  # this process delivers

    def child(first: int) -> None:  # returns, and multiprocessing ends it with os._exit
        client = app.test_client()
        for n in range(first, first + 5):
            client.post(f"/work/{n}").close()

    forked = multiprocessing.get_context("fork")
    started = [forked.Process(target=child, args=(1 + 5 * i,)) for i in range(children)]
    for process in started:
        process.start()
    for process in started:
        process.join(45)
    with app.app_context():
        flushed = app.extensions["meisa"].flush(20)
    say(f"pool flushed {flushed} exits {[process.exitcode for process in started]}")


def reuse(closing: bool) -> None:
    app = create_app()
    client = app.test_client()
    client.post("/work/0").close()
    meisa, state = app.extensions["meisa"], app.extensions["meisa"].state(app)
    closer = threading.Thread(target=lambda: say(f"closed lost {meisa.close(app)}"))
    closer.start()
    if not closing:
        closer.join()
    while state.has_dispatcher() and state._dispatcher is not None:  # until close took it
        time.sleep(0.001)
    say(f"reused while closing {closer.is_alive()}")
    for n in range(1, 11):  # delivery again, after close: flushed at exit as before
        client.post(f"/work/{n}").close()
    closer.join()


def exit_fetch() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app()
    meisa: Meisa = app.extensions["meisa"]
    state = meisa.state(app)
    delivery = cast("Delivery", state.dispatcher)
    say(f"delivers {delivery.first_pass(10) and delivery.is_holder}")  # the host's lock held
    # weakref.finalize's exit hook runs after flask-meisa's (see _process).
    weakref.finalize(state, lambda: say(f"engine after exit {state._dispatcher is not None}"))
    state.suppression.refresh_in_background()
    while True:
        signal.pause()


def exit_request() -> None:
    app = create_app()
    client = app.test_client()
    client.post("/work/0").close()
    reasons: list[str] = []
    delivery_dropped.connect(lambda _, reason, **kw: reasons.append(reason), app, False)

    def late() -> None:  # a server's thread still serving (weakref.finalize's hook runs last)
        response = client.post("/work/1")
        response.close()  # its work released
        say(f"late request {response.status_code} dropped {reasons}")

    weakref.finalize(app, late)


def exit_paused(email: str | None) -> None:
    app = create_app()
    meisa: Meisa = app.extensions["meisa"]
    email_suppressed.connect(lambda _, to_email, **kw: say(f"suppressed {to_email}"), app, False)
    delivery_failed.connect(lambda _, error, **kw: say(f"failed {error}"), app, False)
    with app.app_context(), meisa.state(app).store().write() as db:
        Store.set_meta(db, "pause_until", time.time() + 2.0)
    with app.app_context():
        if email is None:
            meisa.upsert({"email": "user0@example.com", "external_id": "u0"})
        else:
            meisa.send("receipt", email, background=True)


def keep_response(testing: bool) -> None:
    global KEPT
    app = create_app()
    app.config.update(TESTING=testing, MEISA_SUPPRESS_SEND=False)
    KEPT = app.test_client().post("/work/1")  # never closed
    del app
    gc.collect()
    say("kept a response; exiting")


#: The response ``keep-response`` keeps until the interpreter's end.
KEPT: object = None


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    scenario, *numbers = argv
    if scenario == "serve":
        serve(int(numbers[0]))
    elif scenario == "drain":
        drain()
    elif scenario == "keep-response":
        keep_response(testing=numbers == ["testing"])
    elif scenario == "reuse":
        reuse(closing=numbers == ["closing"])
    elif scenario == "exit-fetch":
        exit_fetch()
    elif scenario == "exit-request":
        exit_request()
    elif scenario == "exit-paused":
        exit_paused(numbers[0] if numbers else None)
    elif scenario == "pool":
        pool(int(numbers[0]))
    elif scenario == "fork":
        fork(mid_write=numbers == ["mid-write"], parent_dies=numbers == ["parent-dies"])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
