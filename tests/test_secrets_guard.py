"""The secrets guard (tests/secrets_guard.py, tests/leak_scan.py) fails a test that leaks a
key, and only then."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.leak_scan import Secret
from tests.leak_scan import find_leaks
from tests.leak_scan import mask

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
KEY = "meisa_live_demo_4f9c2a7e1b6d3058"  # the demo seed's live key

LEAKY_TESTS = """
    import logging

    import pytest

    from flask_meisa.client import MeisaClient
    from flask_meisa.emulator import Emulator
    from flask_meisa.errors import ValidationError


    @pytest.fixture
    def emulator():
        with Emulator(seed="demo", rate_limit=None) as emu:
            yield emu


    def test_clean(emulator):
        with MeisaClient(emulator.live_key, emulator.url) as client:
            assert client.ping().environment == "live"
            logging.getLogger("app").warning("client %r", client)


    def test_logs_the_key(emulator):
        logging.getLogger("app").debug("calling with %s", emulator.live_key)


    def test_logs_a_cut_off_key(emulator):
        logging.getLogger("flask_meisa.anything").debug("key starts %s", emulator.live_key[:-3])


    def test_raises_an_error_holding_the_key(emulator):
        with pytest.raises(ValidationError):
            raise ValidationError("email", f"bad, key {emulator.live_key[-6:]}")


    def test_prints_the_key(emulator):
        print("key:", emulator.live_key)


    def test_a_generated_key(emulator):
        key = emulator.create_key(name="extra")
        logging.getLogger("urllib3").debug("sent %s", key)
"""


def test_the_guard_fails_every_leaky_test_and_shows_no_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_leaks=textwrap.dedent(LEAKY_TESTS))
    result = pytester.runpytest_subprocess(
        "-p", "tests.secrets_guard", "-p", "no:cacheprovider", "-W", "error", "-rA"
    )
    # A log or error leak fails at teardown (an error after the test's own pass); a
    # printed one fails the test itself.
    result.assert_outcomes(passed=5, errors=4, failed=1)
    output = result.stdout.str() + result.stderr.str()
    assert "ERROR test_leaks.py::test_clean" not in output
    for name in ("logs_the_key", "logs_a_cut_off_key", "raises_an_error", "a_generated_key"):
        assert f"ERROR test_leaks.py::test_{name}" in output
    assert "FAILED test_leaks.py::test_prints_the_key" in output
    assert "log record app DEBUG" in output
    assert "ValidationError text" in output
    assert KEY not in output and KEY[-5:] not in output and KEY[11:23] not in output


def test_a_key_leaks_whole_cut_off_or_by_more_than_its_last_four() -> None:
    secret = Secret.of(KEY)
    assert secret.leaks_in(f"x-api-key: {KEY}")
    assert secret.leaks_in(KEY[:27])  # cut off
    assert not secret.leaks_in(KEY[:20])  # "meisa_live_" and 9 characters: too short to tell
    assert secret.leaks_in(KEY[-14:])  # a long tail
    assert secret.leaks_in("…" + KEY[-5:])  # five is more than four
    assert not secret.leaks_in("api_key='…" + KEY[-4:] + "'")
    assert not secret.leaks_in("meisa_live_[redacted] meisa_live_demo_…")
    # A random id that merely holds the last five characters is not a leak.
    assert not secret.leaks_in("upsert (775c24" + KEY[-5:] + "b4730aa26a5f8)")
    assert secret.leaks_in("key=…" + KEY[-8:] + ")")
    assert find_leaks([("log", f"k={KEY}!"), ("ok", "nothing")], [secret]) == ["log: k=[KEY]!"]
    assert KEY[-5:] not in mask(f"{KEY} {KEY[3:]} {KEY[-7:]}", [secret])


def test_a_low_entropy_tail_is_not_a_fingerprint() -> None:
    secret = Secret.of("meisa_live_unreachable_0000")
    assert not secret.leaks_in("order_0000")
    assert secret.leaks_in("unreachable_0000")
