"""What a store file shares with the other processes of its host: the delivery lock
(:class:`HostLock`), a damaged file set aside with what can still be read from it, and a
file deleted or replaced while in use followed (:class:`HostFiles`)."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import suppress
from typing import TYPE_CHECKING
from typing import Any

from ..errors import ConfigurationError
from .mounts import folders_owner
from .mounts import opened
from .mounts import sqlite_files

if TYPE_CHECKING:
    from .store import Store

logger = logging.getLogger("flask_meisa.engine")
#: Seconds before a file at the store's path that could not be used is tried again.
_FOLLOW_AGAIN = 60.0
#: Seconds past its ``stall`` a waiting process leaves a lock file made again to the holder.
_RELOCK = 1.0
#: Why the file at the store's path may not be followed (``STORE_ERRORS``, a newer schema).
_UNFOLLOWABLE = (sqlite3.Error, OSError, ConfigurationError)
#: The store file whose folder this thread holds locked (see :func:`checking`).
_checking = threading.local()


class HostLock:
    """The delivery lock: an exclusive, non-blocking ``flock`` on ``path`` (``<store>.lock``).
    The kernel releases it when its holder exits or is killed, so the next process to try
    takes over; the holder writes its pid into the file. It looks at the lock once a pass,
    which may wait ``stall`` seconds for the store (its busy timeout)."""

    def __init__(self, path: str, stall: float = 0.0) -> None:
        self.path, self._stall = path, stall
        self._fd: int | None = None
        self._not_before = 0.0  # (monotonic) when it may lock a file made again
        #: Whether this process holds the lock through this object.
        self.held = False

    def __repr__(self) -> str:
        return f"HostLock({self.path!r}, held={self.held})"

    def try_acquire(self) -> bool:
        """Take the lock if no other open file holds it; never waits. Only the file now at
        the path counts: one deleted or replaced since it was opened is opened again."""
        if self.held:
            return True
        if self._fd is not None and not self._at_path(self._fd):
            # Its holder (maybe moved on to a file deleted since) locks the one now there
            # within a pass: another process locking it first would take back its calls' rows.
            if _locked(self._fd):
                return False
            self.release()
            self._not_before = time.monotonic() + _RELOCK + self._stall
        if self._fd is None:
            self._fd = opened(self.path, os.O_RDWR)
            folders_owner(self.path)
        if time.monotonic() < self._not_before:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        if not self._at_path(self._fd):  # deleted or replaced since the open: try again
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.release()
            return False
        self.held = True  # not before it is found at the path: delivery threads go by it
        with suppress(OSError):  # the pid is only informative
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def moved(self) -> bool:
        """Whether the file held was deleted or replaced (an admin, a deploy script): any
        process could then lock the file at the path and deliver as well."""
        return self.held and self._fd is not None and not self._at_path(self._fd)

    def take_again(self) -> bool:
        """After :meth:`moved`: lock the file now at the path instead of the one held; whether
        that worked. :raises OSError: the path cannot be opened (the file held stays)."""
        held, self._fd, self.held = self._fd, None, False
        assert held is not None
        try:
            taken = self.try_acquire()
        except OSError:
            self._fd, self.held = held, True
            raise
        os.close(held)  # and with it the lock of a file nobody can open any more
        return taken

    def _at_path(self, fd: int) -> bool:
        return at_path(self.path, identity(os.fstat(fd)))

    def release(self, *, forked: bool = False) -> None:
        """Let go of the lock (when held) and close the file. In a forked child (``forked``)
        only close it: the child shares the parent's open file, whose lock is the parent's."""
        fd, self._fd, held, self.held = self._fd, None, self.held, False
        if fd is None:
            return
        try:
            if held and not forked:  # a forked child may still share the open file: unlock it
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            with suppress(OSError):
                os.close(fd)

    @staticmethod
    def holder(path: str) -> int | None:
        """The pid written by the process holding the lock on ``path`` (``None``: nobody)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if not _locked(fd):
                return None
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        finally:
            os.close(fd)


class HostFiles:
    """The writer's look at the store file, at each of its passes: one deleted or replaced
    is followed; when that cannot be done, it is said once, not at every pass."""

    def __init__(self, store: Store) -> None:
        assert store.path is not None
        self.store = store
        # What was at the path when moving to it failed, and until when not to try again.
        self._unfollowable: tuple[tuple[Any, ...], float] | None = None
        self._said: str | None = None

    @property
    def _path(self) -> str:
        return self.store.path or ""  # (where it was followed to, when it was)

    def to_follow(self) -> bool:
        """Whether the store file was replaced and this process has yet to try moving to it."""
        return self._unfollowable is None and self.store.moved()

    def follow(self) -> None:
        """Move to the file now at the store's path (see :meth:`Store.follow`)."""
        if self._unfollowable is not None:
            failed_on, until = self._unfollowable
            if looks(self._path) == failed_on and time.monotonic() < until:
                return  # tried again once something there changes, or after a while
        try:
            carried = self.store.follow()
        except _UNFOLLOWABLE as error:
            if isinstance(error, sqlite3.OperationalError) and "is locked" in str(error):
                raise  # busy (another process moving rows into it): a store error, tried again
            # As the try left it (opening the file changes its folder).
            self._unfollowable = (looks(self._path), time.monotonic() + _FOLLOW_AGAIN)
            if self._said != str(error):
                self._said = str(error)
                logger.warning(
                    "flask-meisa: the delivery store %s was deleted or replaced while this "
                    "process (pid %d) had it open, and it cannot move to the file now there "
                    "(%s): it keeps the one it has open, and tries again when that file changes",
                    self._path,
                    os.getpid(),
                    error,
                )
            return
        self._said = self._unfollowable = None
        logger.warning(
            "flask-meisa: the delivery store %s was deleted or replaced while this process "
            "(pid %d) had it open; it uses the file now there%s",
            self._path,
            os.getpid(),
            f", into which it moved the {carried} operations left in the old one"
            if carried
            else " (nothing was left in the old one)",
        )

    def closing(self, unfinished: Callable[[sqlite3.Connection], int]) -> None:
        """As the delivering process stops: say what is left (``unfinished``) for the next
        start, in the file now at the path (moved into it when the one open was replaced);
        what cannot be moved there goes with the file left behind: said, with why."""
        if self.store.moved():
            self.follow()
        with self.store.read() as db:
            left = unfinished(db)
        if left and self.store.moved():
            logger.warning(
                "flask-meisa: %d operations are left in the delivery store %s, deleted or "
                "replaced while this process (pid %d) delivered from it: they cannot be moved "
                "into the file now there (%s), and are lost with the last process that has "
                "the old one open. Replace the file only with every process stopped, or with "
                "one they can all use",
                left,
                self._path,
                os.getpid(),
                self._said,
            )
        elif left:
            stay = "flask-meisa: %d operations stay in the store for the next start (%s)"
            logger.info(stay, left, self._path)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on ``db``, holding the database's write lock from its start."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")  # one that fails may leave the transaction open
    except BaseException:
        with suppress(sqlite3.Error):  # the original error says more
            db.execute("ROLLBACK")
        raise


def identity(stat: os.stat_result) -> tuple[int, int]:
    """A file's identity (device, inode): the same while it is renamed, not once replaced."""
    return stat.st_dev, stat.st_ino


def at_path(path: str, file: tuple[int, int]) -> bool:
    """Whether ``file`` (an :func:`identity`) is still the one at ``path``: not deleted nor
    replaced since it was opened."""
    try:
        return identity(os.stat(path)) == file
    except (FileNotFoundError, NotADirectoryError):  # a file where its folder was
        return False


def looks(path: str) -> tuple[Any, ...]:
    """The identities, sizes and change times of ``path`` and its folder (``None``: missing)."""
    found: list[Any] = []
    for name in (path, os.path.dirname(path)):
        try:
            stat = os.stat(name)
            found.append((*identity(stat), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
        except OSError:
            found.append(None)
    return tuple(found)


def _locked(fd: int) -> bool:
    """Whether another open file holds the lock of ``fd``'s file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)  # at once: a fork before fd is closed would hold it
    return False


@contextmanager
def checking(path: str) -> Iterator[None]:
    """A ``flock`` on the folder of the store file ``path`` (made when missing, where links
    point) while it is checked or made: processes starting together neither set aside nor
    read another's fresh file. A deleted file's ``-wal`` and ``-shm`` go before it is made
    again (SQLite would read them as theirs). :class:`FileNotFoundError` when the folder's
    parent is missing too (an old release's, deleted: a store made there would be read by
    no later start, and that release's workers would move their work into it)."""
    if getattr(_checking, "path", None) == path:  # this thread holds it already
        yield
        return
    if not os.path.isdir(parent := os.path.dirname(os.path.dirname(path))):
        raise FileNotFoundError(f"{parent} does not exist: only the store's own folder is made")
    os.makedirs(os.path.dirname(os.path.realpath(path)), exist_ok=True)  # a shared one linked
    fd, locked = None, False
    with suppress(OSError):  # a folder that cannot be locked is checked unguarded
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        locked = True
    _checking.path = path
    try:
        if locked and not os.path.exists(path):  # unguarded, the -wal may be another's new one
            for name in sqlite_files(path)[1:]:
                with suppress(FileNotFoundError):
                    os.unlink(name)
        yield
        for name in sqlite_files(path):
            folders_owner(name)
    finally:
        _checking.path = None
        if fd is not None:
            os.close(fd)


def set_aside(store: Store, error: BaseException) -> None:
    """Move a damaged store file aside and start a fresh one with the operations that can
    still be read from it."""
    assert store.path is not None
    names = sqlite_files(store.path)  # a link's target: the link then names the fresh one
    damaged = f"{names[0]}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    for name, suffix in zip(names, ("", "-wal", "-shm"), strict=True):
        with suppress(FileNotFoundError):
            os.replace(name, damaged + suffix)
    rows = _salvage(damaged)
    store.check()
    with store.write() as db:
        _insert(db, f"{_SALVAGED}, turn", rows)
        db.execute("UPDATE meisa_ops SET state = 'pending' WHERE state = 'flight'")
    logger.error(
        "flask-meisa: the delivery store %s is damaged (%s); it was moved to %s and a "
        "fresh one started with the %d operations that could still be read. Keep the "
        "damaged file for inspection, or delete it.",
        store.path,
        error,
        damaged,
        len(rows),
    )


def carry_over(old: sqlite3.Connection, store: Store) -> int:
    """Move the operations left in ``old`` (a store file deleted or replaced since it was
    opened), and the meta ``store`` lacks, into ``store``: how many operations. Stored there
    before they go from ``old`` (a failure repeats them). Rows in flight stay so, for their
    calls' answers: the delivering process makes the others wait again (``flights_moved``)."""
    with transaction(old):  # the other processes still on the old file wait
        # Each file's times moved back by a clock step back since it noted the time (the
        # file now there may be a copy made before one): both then count from this clock.
        store.now(old)
        rows = old.execute(f"SELECT {_MOVED} FROM meisa_ops ORDER BY seq").fetchall()
        with store.write() as db:
            store.now(db)
            # Their turns as far from the turn taken in the file now there (pending's
            # turn_taken) as from the old one's; a fresh file takes the old one's.
            taken_there = store.get_meta(db, "turn")
            if taken_there is not None:
                shift = int(taken_there) - int(store.get_meta(old, "turn", 0))
                rows = [(*row[:-1], row[-1] + shift) for row in rows]
            # The file now there may be a copy of the old one (a backup restored): a row of
            # both is the old file's, as it went on from the copy (merged into, retried).
            there = dict(db.execute("SELECT id, seq FROM meisa_ops"))
            copies = [(there[row[0]],) for row in rows if row[0] in there]  # id: first of _MOVED
            db.executemany("DELETE FROM meisa_ops WHERE seq = ?", copies)
            _insert(db, _MOVED, rows)
            # Whose caller is gone (killed; a copy's, taken mid-call): only the process
            # delivering knows, at its next call, whether it moves them or another does.
            store.set_meta(db, "flights_moved", True)
            # Meisa's pause, the backfill run, the counters: where the file has none (its
            # own clock note is Store.now's).
            kept = old.execute("SELECT name, value FROM meisa_meta WHERE name != 'clock'")
            db.executemany("INSERT OR IGNORE INTO meisa_meta VALUES (?, ?)", kept.fetchall())
        old.execute("DELETE FROM meisa_ops")
    return len(rows)


# The columns carried over from a store file deleted or replaced, or salvaged from a
# damaged one (with its ``seq``).
_CARRIED = (
    "id, kind, lane, ext, email, payload, contact, priority, force, created_at, state, "
    "attempts, first_attempt, merged, error_status, error_code, error_message, failed_at"
)
_SALVAGED = f"seq, {_CARRIED}"
# Moved with when a retry is due, an event's recovery, and its turn (last: a row salvaged
# from a damaged file is given one).
_MOVED = f"{_CARRIED}, ready_at, recover, turn"


def _insert(db: sqlite3.Connection, columns: str, rows: list[tuple[Any, ...]]) -> None:
    values = ", ".join("?" * len(columns.split(",")))
    db.executemany(f"INSERT INTO meisa_ops ({columns}) VALUES ({values})", rows)


def _salvage(path: str) -> list[tuple[Any, ...]]:
    """The operations that can still be read from a damaged store, skipping bad pages, each
    with its turn again (a damaged file may have none): a contact's n-th takes turn n."""
    rows: list[tuple[Any, ...]] = []
    last: dict[str, int] = {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows
    query = f"SELECT {_SALVAGED} FROM meisa_ops WHERE seq > ? ORDER BY seq"
    after, skip = -1, 1
    try:
        while skip < 1 << 40:
            try:
                for row in db.execute(query, (after,)):
                    names = [name for name in row[4:6] if name is not None]  # ext, email
                    turn = 1 + max((last.get(name, 0) for name in names), default=0)
                    last.update(dict.fromkeys(names, turn))
                    rows.append((*row, turn))
                    after, skip = row[0], 1
                break
            except sqlite3.DatabaseError:
                after, skip = after + skip, skip * 2  # jump past the damage
    finally:
        db.close()
    return rows
