"""The instructions a syncing login costs, counted by valgrind: steady where times drift.

Each variant of the login app (``bench_app.py``) runs ``--logins`` logins through Flask's
test client in a child process under callgrind, and again with none (the start-up alone):
the difference over the logins is a login's cost, per thread. The request's thread holds
the caller's share (Flask-Login, and Meisa's mapping, validation, collection and release);
Meisa's own threads (the writer storing, delivery) are counted apart. Delivery is held
back (a host that never answers, a ``1/day`` budget), so that only the request side and
storing are counted. Variants: ``bare`` (no Meisa), ``today``'s engine (``baseline.py``),
the new ``default``, ``off`` (``MEISA_ENABLED = False``: no engine), and with ``--ref REV``
the new default as of git revision REV, side by side in one run.

    .venv/bin/python benchmarks/login_instructions.py [--logins 2000] [--ref a8c869f]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import baseline
from enqueue_cost import settle
from support import HERE
from support import ROOT
from support import silent_host

#: name: (engine, app variant, config, label)
VARIANTS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bare": ("new", "bare", {}, "bare app (no Meisa)"),
    "today": ("baseline", "meisa", {}, "today's engine (memory)"),
    "default": ("new", "meisa", {}, "new default (store file)"),
    "off": ("new", "meisa", {"MEISA_ENABLED": False}, "new, MEISA_ENABLED = False"),
}
WARMUP = 50


def scenario(params: dict[str, Any]) -> dict[str, Any]:
    """In the child: ``WARMUP`` logins, then ``params["logins"]`` more."""
    import logging

    import bench_app

    logging.disable(logging.WARNING)  # the held-back engine's connection errors
    with silent_host() as url, tempfile.TemporaryDirectory() as instance:
        config = {"MEISA_RATE_LIMIT": "1/day", **params["config"]}
        app = bench_app.create_app(
            config,
            variant=params["variant"],
            url=url,
            key="mk_test_" + "a" * 32,
            instance=instance,
        )
        client = app.test_client()
        for number in range(WARMUP + params["logins"]):
            client.post(f"/login/{number % 200}").close()
        if "meisa" in app.extensions:  # until the writer has stored every login
            with app.app_context():
                settle(app.extensions["meisa"])
        return {}


def count(home: Path, variant: str, config: dict[str, Any], logins: int) -> tuple[int, int]:
    """Instructions of (the request's thread, every other thread) over ``logins`` logins."""
    params = json.dumps({"variant": variant, "config": config, "logins": logins})
    out = Path(tempfile.mkdtemp(prefix="meisa-callgrind-"))
    try:
        command = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
        command += [f"--callgrind-out-file={out}/cg", sys.executable, __file__]
        env = {**os.environ, "PYTHONPATH": str(home), "PYTHONHASHSEED": "0"}
        child = subprocess.run(
            [*command, "--scenario", params], env=env, cwd=HERE, capture_output=True, text=True
        )
        if child.returncode != 0:
            raise RuntimeError(f"the {variant} child failed:\n{child.stderr[-3000:]}")
        totals = {
            path.name: int(re.findall(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)[0])
            for path in out.glob("cg-*")
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)
    main = totals.pop("cg-01")
    return main, sum(totals.values())


def per_login(home: Path, variant: str, config: dict[str, Any], logins: int) -> tuple[int, int]:
    """Instructions per login: the request's thread, Meisa's threads."""
    main, others = count(home, variant, config, logins)
    start_main, start_others = count(home, variant, config, 0)
    return (main - start_main) // logins, max(others - start_others, 0) // logins


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--ref", help="also the new default as of this git revision")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    rows = {name: VARIANTS[name] for name in ["bare", *args.only]}
    homes = {"new": ROOT, "baseline": baseline.source()}
    if args.ref:
        homes[args.ref] = baseline.source(args.ref)
        rows[f"ref {args.ref}"] = (args.ref, "meisa", {}, f"new default as of {args.ref}")
    print(
        f"instructions per login, {args.logins} logins (Flask's test client), delivery held back"
    )
    print(
        f"  {'variant':34} {'request thread':>15} {'x bare':>7} {'+ over bare':>12}"
        f" {'Meisa threads':>14}"
    )
    bare = 0
    for engine, variant, config, label in rows.values():
        request, engine_threads = per_login(homes[engine], variant, config, args.logins)
        bare = bare or request
        print(
            f"  {label:34} {request:>15,} {request / bare:>6.2f}x {request - bare:>12,}"
            f" {engine_threads:>14,}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--scenario":
        scenario(json.loads(sys.argv[2]))
        os._exit(0)  # no exit flush of the work left pending
    main()
