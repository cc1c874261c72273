"""Today's engine beside this tree's, each in a child process.

The baseline ("today's engine") is flask_meisa as of commit 0ab1d82, the last commit before
background delivery was rewritten: an in-memory ``ThreadDispatcher`` in each process, with
lanes sends > syncs > events, per-contact coalescing in memory, a budget per process and no
digest of what Meisa already has (``MEISA_OUTBOX`` was ``None`` by default). Its package is
extracted once with ``git archive`` into ``.bench/baseline-0ab1d82/`` (gitignored), and a
scenario runs against it in a child process whose ``PYTHONPATH`` starts there; the same
scenario runs against this tree with ``PYTHONPATH`` at the repository's root. Scenarios use
only the public API that both have (``Meisa(app)``, ``meisa.users_to_sync``,
``meisa.upsert``, ``meisa.track``, ``plan_changed.send``, ``meisa.flush``, Flask-Login's
``login_user``), so that one script drives both.

A script with a scenario calls :func:`main_or_scenario` before its own ``main``: given
``--scenario JSON``, it runs the scenario and prints its result as JSON, which :func:`run`
reads back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import HERE
from support import ROOT
from support import stop

COMMIT = "0ab1d82"
#: Engines a scenario can run against: this tree's and today's.
ENGINES = ("new", "baseline")
LABELS = {"new": "new engine", "baseline": f"today's engine ({COMMIT})"}
CACHE = ROOT / ".bench" / f"baseline-{COMMIT}"


def source(commit: str = COMMIT) -> Path:
    """The folder holding the ``flask_meisa`` package of ``commit`` (default: today's
    engine), extracted on first use."""
    cache = CACHE if commit == COMMIT else CACHE.parent / f"commit-{commit}"
    if (cache / "flask_meisa" / "__init__.py").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=cache.parent, prefix="partial-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "flask_meisa"],
            check=True,
            capture_output=True,
        )
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
        partial.rename(cache)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cache


def home(engine: str) -> Path:
    """The folder ``engine``'s flask_meisa package is in."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    return source() if engine == "baseline" else ROOT


def missing() -> str | None:
    """Why today's engine cannot run here, or ``None``."""
    if importlib.util.find_spec("cachetools") is None:
        return "today's engine needs cachetools (pip install -e '.[bench]')"
    return None


def environ(engine: str, **extra: str) -> dict[str, str]:
    """The environment of a child process that imports ``engine``'s flask_meisa. Start it
    in :data:`~support.HERE`: a child started at the repository's root would find this
    tree's package first, whatever the path says."""
    if engine == "baseline" and (why := missing()):
        raise RuntimeError(why)
    return {**os.environ, "PYTHONPATH": str(home(engine)), "PYTHONUNBUFFERED": "1", **extra}


def check(engine: str, module_file: str) -> None:
    """Raise unless ``module_file`` (a child's ``flask_meisa.__file__``) is ``engine``'s."""
    if home(engine) not in Path(module_file).resolve().parents:
        raise RuntimeError(f"the {engine} child imported flask_meisa from {module_file}")


def run(
    engine: str, script: str, params: dict[str, Any], *, timeout: float = 900.0
) -> dict[str, Any]:
    """Run the scenario of ``script`` (a file name in benchmarks/) with ``params`` against
    ``engine`` in a child process (stopped by its pid on errors and interrupts); its
    result."""
    command = [sys.executable, str(HERE / script), "--scenario", json.dumps(params)]
    process = subprocess.Popen(
        command,
        env=environ(engine),
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"{engine} scenario of {script} failed:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    check(engine, result.pop("flask_meisa"))
    return result


def main_or_scenario(scenario: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """In a child started by :func:`run`: run ``scenario``, print its result, exit."""
    if len(sys.argv) == 3 and sys.argv[1] == "--scenario":
        import flask_meisa

        result = scenario(json.loads(sys.argv[2]))
        result["flask_meisa"] = flask_meisa.__file__
        print(json.dumps(result), flush=True)
        os._exit(0)  # the result is out: no exit flush of work the scenario left pending
