"""``python -m example_app``: the example app on loopback, with the Meisa emulator in-process.

Starts the embedded emulator seeded with the demo product (its triggers
``verification_code``, ``password_reset``, ...; Meisa's default limits of 60 requests a
minute and 1,000 an hour), points the app at it and serves the app with Werkzeug's
threaded WSGI server until Ctrl+C or SIGTERM, then delivers what is still pending and
stops. With ``MEISA_API_KEY`` and ``MEISA_BASE_URL`` both set in the environment it
talks to that Meisa instead and starts no emulator (see :mod:`example_app.config`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from collections.abc import Sequence
from types import FrameType
from typing import Any

from werkzeug.serving import make_server

from flask_meisa import MeisaError
from flask_meisa.emulator import Emulator

from . import create_app
from .config import DEFAULT_RATE_LIMIT
from .config import inbox_url
from .extensions import meisa

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="Serve the flask-meisa example app, on the embedded Meisa emulator"
        " unless MEISA_API_KEY and MEISA_BASE_URL are set.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port, 0 for any (default 5000)")
    return parser


def _config(environ: Mapping[str, str]) -> tuple[dict[str, Any], Emulator | None]:
    if environ.get("MEISA_API_KEY") and environ.get("MEISA_BASE_URL"):
        return {}, None  # config.defaults() reads both from the environment
    if environ.get("MEISA_API_KEY") or environ.get("MEISA_BASE_URL"):
        print(
            "Only one of MEISA_API_KEY and MEISA_BASE_URL is set; both are needed to use"
            " a real Meisa. Using the embedded emulator.",
            flush=True,
        )
    rate_limit = environ.get("MEISA_RATE_LIMIT") or DEFAULT_RATE_LIMIT
    emulator = Emulator(seed="demo", rate_limit=rate_limit).start()
    config = {
        "MEISA_API_KEY": emulator.live_key,
        "MEISA_BASE_URL": emulator.url,
        "MEISA_RATE_LIMIT": rate_limit,
        "EXAMPLE_EMULATOR_URL": emulator.root_url,
    }
    return config, emulator


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app until SIGINT or SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    emulator: Emulator | None = None
    try:
        config, emulator = _config(os.environ)
        app = create_app(config)
        server = make_server(args.host, args.port, app, threaded=True)
    except (OSError, MeisaError) as error:
        print(f"error: {error}", file=sys.stderr)
        if emulator is not None:
            emulator.stop()
        return 2
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="example-app", daemon=True
    )
    thread.start()
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if emulator is not None:
            print(f"Meisa emulator (demo seed) on {emulator.url}", flush=True)
            print(f"What Meisa received: {inbox_url(app.config)}", flush=True)
        else:
            print(f"Using Meisa at {app.config['MEISA_BASE_URL']}", flush=True)
        print(f"Example app on http://{args.host}:{server.server_port}/", flush=True)
        print("Press Ctrl+C to stop.", flush=True)
        # The handler runs in this thread only between bytecodes, and the kernel may hand
        # the signal to another thread: a wait without a timeout could outlast it.
        while not done.wait(0.2):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.shutdown()
        server.server_close()
        thread.join(5)
        left = meisa.close(app)
        if left:
            print(f"{left} operation(s) were not delivered before stopping.", flush=True)
        if emulator is not None:
            emulator.stop()
    print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
