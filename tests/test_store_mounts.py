"""A store on a network filesystem (NFS, SMB, ...) is refused: SQLite's locks and its
write-ahead log's shared memory do not hold there, and hosts sharing one volume (the
replicas of a deployment) would corrupt it. The mount table is a crafted copy of this
machine's, with network mounts added."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine import mounts
from flask_meisa._engine.mounts import network_filesystem
from flask_meisa.emulator import Emulator
from flask_meisa.errors import ConfigurationError
from flask_meisa.testing import emulator_config

STORE_FILE = "meisa-outbox.sqlite3"


def mount_line(point: str, kind: str) -> str:
    escaped = point.replace("\\", "\\134").replace(" ", "\\040")
    return f"900 1 0:99 / {escaped} rw,relatime shared:9 - {kind} server:/export rw"


@pytest.fixture
def mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, str], Path]:
    """Add a mount of type ``kind`` at a folder to the table flask-meisa reads."""
    table = tmp_path / "mountinfo"
    table.write_text(Path(mounts.MOUNTINFO).read_text())
    monkeypatch.setattr(mounts, "MOUNTINFO", str(table))

    def add(point: Path, kind: str) -> Path:
        point.mkdir(parents=True, exist_ok=True)
        with table.open("a") as lines:
            lines.write(mount_line(str(point), kind) + "\n")
        return point

    return add


def test_a_local_folder_is_no_network_filesystem(tmp_path: Path) -> None:
    assert network_filesystem(str(tmp_path)) is None  # the real table: a local disk


def test_the_filesystem_of_a_folder_is_that_of_the_last_mount_over_it(
    tmp_path: Path, mount: Callable[[Path, str], Path]
) -> None:
    shared = mount(tmp_path / "shared volume", "nfs4")
    assert network_filesystem(str(shared)) == "nfs4"
    assert network_filesystem(str(shared / "instance" / "not made yet")) == "nfs4"
    assert network_filesystem(str(tmp_path / "shared")) is None  # a name it starts with
    mount(shared / "scratch", "tmpfs")
    assert network_filesystem(str(shared / "scratch" / "instance")) is None
    mount(shared / "scratch", "cifs")  # mounted over again
    assert network_filesystem(str(shared / "scratch")) == "cifs"
    (tmp_path / "link").symlink_to(shared)
    assert network_filesystem(str(tmp_path / "link" / "instance")) == "nfs4"


def test_without_a_mount_table_no_filesystem_is_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mounts, "MOUNTINFO", str(tmp_path / "absent"))  # not Linux
    assert network_filesystem(str(tmp_path)) is None


def test_an_explicit_store_on_a_network_filesystem_fails_init_app(
    emulator: Emulator, tmp_path: Path, mount: Callable[[Path, str], Path]
) -> None:
    path = mount(tmp_path / "nfs", "nfs") / "outbox" / "store.sqlite3"
    app = Flask(__name__)
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread", MEISA_OUTBOX=str(path)))
    with pytest.raises(ConfigurationError, match=r"network filesystem \(nfs\)") as caught:
        Meisa(app)
    assert str(path) in str(caught.value) and "MEISA_OUTBOX" in str(caught.value)
    assert not path.parent.exists()  # nothing made there


def test_a_default_store_on_a_network_filesystem_falls_back_to_memory_with_one_warning(
    emulator: Emulator,
    tmp_path: Path,
    mount: Callable[[Path, str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    instance = mount(tmp_path / "efs", "nfs4") / "instance"
    caplog.set_level(logging.WARNING)
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert str(instance / STORE_FILE) in warnings[0] and "(nfs4)" in warnings[0]
    assert "falls back to memory" in warnings[0] and "local disk" in warnings[0]
    with app.app_context():
        meisa.upsert({"email": "ada@example.com", "external_id": "kept"})
        assert meisa.flush(5)
        assert not meisa.status().durable
    assert [r.body["external_id"] for r in emulator.requests_to("/contacts/upsert/")] == ["kept"]
    assert not instance.exists()
