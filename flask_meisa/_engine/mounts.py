"""Which filesystem a folder is on: a store on a network filesystem is refused, since
SQLite's locks and its write-ahead log's shared memory do not hold there, and hosts
sharing one would corrupt it; whether it is full; whether a store's files are writable;
where SQLite keeps a store's files, where one whose link went is, and with which mode and
owner flask-meisa makes them."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import stat
from contextlib import suppress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

#: Filesystem types other hosts may share (as ``/proc/self/mountinfo`` names them). Not 9p
#: nor virtiofs: one host's files shown to a sandbox or a VM on it (gVisor's root and
#: volumes, WSL, Docker Desktop), where SQLite works or fails to open by itself.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "ceph", "glusterfs", "lustre", "gpfs"}
    | {"beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs"}
    | {"fuse.ceph-fuse", "fuse.juicefs"}
)
#: The mount table read (Linux; elsewhere no filesystem is known).
MOUNTINFO = "/proc/self/mountinfo"
#: With less room than this a folder's disk is full (SQLite's -shm alone takes 32 KiB).
FULL_BELOW = 1 << 20
_ESCAPED = re.compile(r"\\([0-7]{3})")  # a space, a tab, a newline or a backslash


def network_filesystem(folder: str) -> str | None:
    """The type of the network filesystem ``folder`` (made or not yet) is on, or ``None``.
    A root filesystem is the host's own (a diskless host's), never one shared."""
    # Resolved before the table is read: walking into an autofs mount mounts it.
    path, kind, longest = os.path.realpath(folder), None, 2  # (no "/": shorter than 2)
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as table:
            mounts = table.read().split("\n")  # (a mount point may hold \f, \x1c, \u2028)
    except OSError:
        return None
    for line in mounts:
        fields, _, rest = line.partition(" - ")
        point = _ESCAPED.sub(lambda m: chr(int(m[1], 8)), (fields.split(" ") + [""] * 5)[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and rest.strip() and len(point) >= longest:  # the last one over it; not "/"
            kind, longest = rest.split()[0], len(point)
    return kind if kind in NETWORK_FILESYSTEMS else None


def disk_full(error: BaseException, folder: str) -> bool:
    """Whether ``error`` of a store in ``folder`` comes of a full disk: by SQLite's code,
    else (Python 3.10 names none) by the folder's room left."""
    if isinstance(error, OSError):  # (not a refusal of its own: a network filesystem)
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if (name := getattr(error, "sqlite_errorname", None)) is not None:
        return name in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


def check_writable(path: str) -> None:
    """Check that this process may write the store file ``path`` and, where they exist, its
    ``-wal``, ``-shm`` and lock file. :raises PermissionError: one it may not, and why."""
    for name in (path, *sqlite_files(path)[1:], path + ".lock"):
        # Access, exists, access again: one removed (-shm) or made (-wal) meanwhile passes.
        denied = not os.access(name, os.W_OK)
        if denied and os.path.exists(name) and not os.access(name, os.W_OK):
            raise PermissionError(f"{name} is {_unwritable(name)}")


def _unwritable(path: str) -> str:
    """Why this process may not write ``path``: its filesystem mounted read-only (a user's
    rights would change nothing), or its mode and owner."""
    with suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only filesystem"
    return "not writable by this process"


def sqlite_files(path: str) -> tuple[str, str, str]:
    """The store file ``path``, its ``-wal`` and its ``-shm`` where SQLite has them: a link's
    target and beside it."""
    real = os.path.realpath(path)
    return real, real + "-wal", real + "-shm"


def not_sqlite(path: str) -> bool:
    """Whether ``path`` holds bytes that are not a SQLite database (by its header): a file
    of something else, not one of ours to set aside if damaged (missing or empty: not so)."""
    with suppress(OSError), open(path, "rb") as file:  # (what fails, SQLite says)
        return (head := file.read(16)) != b"" and head != b"SQLite format 3\x00"
    return False


def write_locked(store: Store, wait: float = 0.0) -> bool:
    """Whether another process holds the write lock of ``store``'s file (``wait`` seconds at
    most, on a connection of its own, not for the busy timeout of the one this process's
    threads share), under the store's lock as every use of SQLite: a fork waits for it."""
    if store.path is None:
        return False
    with store.read():
        db = sqlite3.connect(store.path, timeout=wait, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        finally:
            db.close()  # (and with it the transaction it began)
    return False


def home(path: str, found: str) -> str:
    """Where the store file ``path``, opened where SQLite ``found`` it, is now: there, when
    the folder ``path`` names is gone but that one is not (a folder linked to a shared one,
    an old release's, deleted: the processes of the other releases find it there)."""
    gone = not os.path.lexists(os.path.dirname(path))
    return found if gone and os.path.isdir(os.path.dirname(found)) else path


def opened(path: str, flags: int) -> int:
    """``path`` opened with ``flags`` (closed on exec), made if missing: a store file or lock
    is the owner's alone, and its group's too in a folder shared with a group (setgid, as
    ``chmod 2770`` makes), whose users may all run the app; the umask still applies."""
    try:
        shared = os.stat(os.path.dirname(os.path.realpath(path))).st_mode & stat.S_ISGID
    except OSError:
        shared = 0
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o660 if shared else 0o600)


def folders_owner(path: str) -> None:
    """Run as root (``sudo flask db upgrade``), give the file ``path`` root made the owner
    of its folder when that is another user: the app, run as that user, must write it."""
    if os.geteuid() == 0:
        with suppress(OSError):
            folder, file = os.stat(os.path.dirname(path)), os.stat(path)
            if folder.st_uid != 0 and file.st_uid == 0:
                os.chown(path, folder.st_uid, folder.st_gid)
