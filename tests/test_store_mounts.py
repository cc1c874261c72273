"""A store on a network filesystem (NFS, SMB, ...) is refused: SQLite's locks and its
write-ahead log's shared memory do not hold there, and hosts sharing one volume (the
replicas of a deployment) would corrupt it. The mount table is a crafted copy of this
machine's, with network mounts added. A store on a folder mounted read-only is refused
as such, as the app's processes see it."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from flask_meisa import Meisa
from flask_meisa._engine import mounts
from flask_meisa._engine import pending
from flask_meisa._engine.mounts import network_filesystem
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from flask_meisa.errors import ConfigurationError
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import Operation
from flask_meisa.testing import emulator_config
from tests.process_support import Processes
from tests.process_support import drain_without_loss
from tests.process_support import environment
from tests.process_support import run_app
from tests.process_support import wait_stored

STORE_FILE = "meisa-outbox.sqlite3"


def mount_line(point: str, kind: str) -> str:
    for char, code in ("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012"):
        point = point.replace(char, code)  # as the kernel escapes them
    return f"900 1 0:99 / {point} rw,relatime shared:9 - {kind} server:/export rw"


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


@pytest.mark.skipif(os.geteuid() != 0, reason="only root mounts a small disk")
def test_a_store_on_a_full_network_filesystem_is_refused_all_the_same(
    tmp_path: Path, mount: Callable[[Path, str], Path]
) -> None:
    # A full disk only postpones the store's check (it is freed): not so a network one.
    folder = mount(tmp_path / "nfs", "nfs4")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder], check=True)
    try:
        (folder / "filler").write_bytes(bytes(48 * 1024))
        with pytest.raises(ConfigurationError, match=r"network filesystem \(nfs4\)"):
            Store(folder / "store.sqlite3")
    finally:
        subprocess.run(["umount", folder], check=True)


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


def test_a_store_already_on_a_network_filesystem_is_left_with_what_it_holds(
    emulator: Emulator,
    tmp_path: Path,
    mount: Callable[[Path, str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An upgrade where the instance folder was a network volume already: the file's work is
    # neither delivered from there nor dropped, and the warning says where it waits.
    instance = tmp_path / "efs" / "instance"
    instance.mkdir(parents=True)
    store = Store(instance / STORE_FILE)  # made before the volume was known as network
    with store.write() as db:
        left = Operation("upsert", {"email": "left@example.com", "external_id": "left"})
        pending.add(db, left, LANE_ROUTINE)
    store.close()
    mount(tmp_path / "efs", "nfs4")
    caplog.set_level(logging.WARNING)
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "(nfs4)" in warning and "what the file holds waits in it" in warning
    with app.app_context():
        assert meisa.flush(5)
    assert emulator.requests_to("/contacts/upsert/") == []
    with sqlite3.connect(instance / STORE_FILE) as db:
        assert db.execute("SELECT count(*) FROM meisa_ops").fetchone() == (1,)
    db.close()


@pytest.mark.parametrize(
    "kind", ["nfs4", "cifs", "smb3", "ceph", "fuse.ceph-fuse", "fuse.glusterfs", "fuse.juicefs"]
)
def test_the_common_network_filesystems_are_known(
    tmp_path: Path, mount: Callable[[Path, str], Path], kind: str
) -> None:
    # EFS and Filestore (nfs4, nfs), Azure Files (cifs, smb3), CephFS by the kernel or by
    # ceph-fuse (as Kubernetes' CSI driver can mount it), GlusterFS, JuiceFS.
    assert network_filesystem(str(mount(tmp_path / "volume", kind) / "instance")) == kind


def test_a_sandbox_or_a_vm_showing_its_hosts_files_and_a_root_filesystem_are_local(
    emulator: Emulator, tmp_path: Path, mount: Callable[[Path, str], Path]
) -> None:
    # gVisor (GKE Sandbox, Cloud Run's first generation) shows its root and its volumes as
    # 9p, Docker Desktop its bind mounts as virtiofs: one host's files, not a shared volume.
    # A diskless host's root is on NFS, but its own. Refused, each lost its store.
    mount(Path("/"), "9p")
    assert network_filesystem(str(tmp_path / "instance")) is None
    assert network_filesystem(str(mount(tmp_path / "volume", "9p"))) is None
    assert network_filesystem(str(mount(tmp_path / "desktop", "virtiofs"))) is None
    mount(Path("/"), "nfs")
    instance = tmp_path / "instance"
    assert network_filesystem(str(instance)) is None
    assert network_filesystem(str(mount(tmp_path / "shared", "nfs4"))) == "nfs4"
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(emulator_config(emulator, MEISA_DELIVERY="thread"))
    meisa = Meisa(app)
    with app.app_context():
        assert meisa.status().durable
    meisa.close()


@pytest.mark.parametrize("name", ["tab\tline\nend", "form\ffeed", "sep\x1cx", "para\u2028x"])
def test_a_mount_point_with_any_character_is_read_whole(
    tmp_path: Path, mount: Callable[[Path, str], Path], name: str
) -> None:
    # The kernel escapes a space, a tab, a newline and a backslash; other characters a line
    # splitter or a field splitter takes for a break are left as they are.
    assert network_filesystem(str(mount(tmp_path / name, "nfs4") / "instance")) == "nfs4"
    assert network_filesystem(str(tmp_path / name[:3])) is None  # a name it starts with


def test_a_malformed_mount_table_refuses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "mountinfo"
    table.write_text("1 0 0:5 / / rw - ext4 /dev/vda rw\n2 1 0:6 / /srv rw -  \njunk - nfs4 x\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(table))
    assert network_filesystem("/srv/app/instance") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root mounts a folder")
def test_a_store_on_a_read_only_mount_is_said_to_be_so_and_keeps_its_work(
    emu: Emulator, instance: Path, processes: Processes
) -> None:
    # "not writable by this process": its owner, running the app, would look for a mode
    # or an owner to change, while the volume was mounted read-only (a deploy step's ro
    # bind mount, a disk the kernel turned read-only on errors).
    env = environment(emu, instance, MEISA_TEST_RATE="none", MEISA_TEST_FLUSH_TIMEOUT="0")
    emu.faults.outage(600)  # nothing is delivered: everything waits in the store
    app = processes.app(env, "serve", "5")
    assert app.wait_for_line("ready"), app.output
    assert wait_stored(instance, "track", 5)
    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.output
    if subprocess.run(["mount", "--bind", instance, instance], check=False).returncode:
        pytest.skip("this machine cannot bind-mount a folder")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", instance], check=True)
        output = run_app(env, "drain")
    finally:
        subprocess.run(["umount", instance], check=True)
    store = instance / STORE_FILE
    assert f"{store} is on a read-only filesystem" in output, output
    assert "falls back to memory" in output, output
    drain_without_loss(emu, env, 5)  # what it held waited in it
