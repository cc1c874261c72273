"""What a user gets from the built package: its data files, its ``flask meisa`` command,
the embedded emulator, and one upsert from a Flask app to it.

CI also runs this file as a script in a clean virtualenv holding only the built wheel
(``python -I tests/test_installed_package.py``), so that a file missing from the wheel
fails there; it then checks that the package came from that virtualenv.
"""

from __future__ import annotations

import sys
from importlib import metadata
from importlib import resources
from pathlib import Path

import requests
from flask import Flask

import flask_meisa
from flask_meisa import Meisa
from flask_meisa.emulator import Emulator
from flask_meisa.testing import emulator_config


def test_the_package_ships_its_data_files() -> None:
    package = resources.files("flask_meisa")
    assert package.joinpath("py.typed").is_file()
    assert (package / "emulator" / "seed.json").is_file()
    assert b"<script>" in (package / "emulator" / "inbox.html").read_bytes()


def test_the_installed_version_is_the_packages() -> None:
    from flask_meisa._version import __version__

    assert metadata.version("flask-meisa") == __version__


def test_the_package_requires_a_urllib3_that_decodes_only_what_is_read() -> None:
    # Older ones decode a whole compressed read at once: a gzip bomb's gigabytes, however
    # small the size limit and the deadline.
    assert "urllib3>=2.6" in (metadata.requires("flask-meisa") or [])


def test_the_flask_command_group_is_registered() -> None:
    (entry,) = [e for e in metadata.entry_points(group="flask.commands") if e.name == "meisa"]
    group = entry.load()
    assert {"ping", "status", "config-template", "emulator"} <= set(group.commands)


def test_an_upsert_from_a_flask_app_reaches_the_emulator() -> None:
    with Emulator(seed="demo", rate_limit=None) as emulator:
        app = Flask(__name__)
        app.config.update(emulator_config(emulator, MEISA_DELIVERY="sync", MEISA_OUTBOX=None))
        meisa = Meisa(app)

        @app.post("/signup")
        def signup() -> str:
            meisa.upsert({"email": "smoke@example.com", "custom_fields": {"plan": "free"}})
            return "welcome"

        response = app.test_client().post("/signup", buffered=True)
        assert response.status_code == 200
        contact = emulator.contact(email="smoke@example.com")
        assert contact is not None
        assert contact["custom_fields"] == {"plan": "free"}
        inbox = requests.get(emulator.root_url + "/_emulator/", timeout=10)
        assert inbox.status_code == 200
        assert inbox.headers["Content-Type"].startswith("text/html")
        meisa.close()


def main() -> int:
    """Run every test above; fail unless flask_meisa was imported from outside this
    checkout (an installed package)."""
    source = Path(__file__).resolve().parent.parent / "flask_meisa"
    location = Path(flask_meisa.__file__).resolve()
    if location.is_relative_to(source):
        print(f"flask_meisa was imported from the checkout ({location}), not installed")
        return 1
    tests = [value for name, value in globals().items() if name.startswith("test_")]
    for test in tests:
        test()
        print(f"ok {test.__name__}")
    print(f"{len(tests)} passed, 0 failed (flask-meisa {metadata.version('flask-meisa')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
