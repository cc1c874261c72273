"""The fault soak (``benchmarks/soak.py``) at a small size: every check passes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Every row of the summary that is a check.
CHECKS = (
    "requests answered unexpectedly",
    "client threads that crashed",
    "sync-only views: faults minus healthy",
    "send views: slowest, within the deadlines",
    "backlog at stop; flushed in",
    "  peak growth",
    "  end growth, drained",
    "operations failed or dropped",
    "users whose final state Meisa lacks",
    "exported_report events lost",
    "emails sent twice: same idempotency key",
    "emails sent twice: same trigger, to, vars",
)


def row(output: str, measure: str) -> str:
    """The value and verdict of the summary row named ``measure``."""
    found = re.search(rf"^{re.escape(measure)}\s+(.*)$", output, re.MULTILINE)
    assert found is not None, f"no row {measure!r} in:\n{output}"
    return found.group(1).strip()


def run_soak(*args: str, timeout: float) -> tuple[int, str, str]:
    """Run the soak; on timeout kill its process group (the emulator it started too)."""
    process = subprocess.Popen(
        [sys.executable, "benchmarks/soak.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        output, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, errors = process.communicate()
        pytest.fail(f"the soak ran past {timeout} s:\n{output}{errors}")
    return process.returncode, output, errors


@pytest.mark.slow
def test_a_short_soak_passes_every_check() -> None:
    status, output, errors = run_soak(
        "--duration", "8", "--clients", "4", "--seed", "3", timeout=90
    )
    assert status == 0, output + errors
    assert output.count("soak: PASS") == 1
    for measure in CHECKS:
        assert row(output, measure).endswith("PASS"), row(output, measure)
    assert "FAIL" not in output
    # Few logins in a short soak: their median is compared only when there are enough.
    login = row(output, "login: faults minus healthy")
    assert login.endswith("PASS") or login.startswith("not checked"), login
    # Traffic ran, users were made and compared, and the faults reached the emulator.
    made = re.match(r"(\d+) ", row(output, "requests made"))
    assert made is not None and int(made.group(1)) > 20
    users = re.match(r"(\d+) \(", row(output, "users in the app (verified)"))
    assert users is not None and int(users.group(1)) >= 4
    assert row(output, "users whose final state Meisa lacks").startswith("0 (0 without")
    faults = row(output, "  by fault injected")
    assert faults != "0"
    assert sum(int(n) for n in re.findall(r"\d+", faults)) > 0
    assert row(output, "budget, emulator and app") == "20/second;600/minute"
