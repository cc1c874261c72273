"""The delivery lock: an exclusive ``flock`` on ``<store>.lock``, held by the one process
of the host that delivers. The kernel releases it when its holder exits or is killed, so
the next process to try takes over. The holder writes its pid into the file."""

from __future__ import annotations

import contextlib
import fcntl
import os

__all__ = ["HostLock"]


class HostLock:
    """An exclusive, non-blocking, process-wide lock on ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._held = False

    def __repr__(self) -> str:
        return f"HostLock({self.path!r}, held={self._held})"

    @property
    def held(self) -> bool:
        """Whether this process holds the lock through this object."""
        return self._held

    def try_acquire(self) -> bool:
        """Take the lock if no other open file holds it; never waits."""
        if self._held:
            return True
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        self._held = True
        with contextlib.suppress(OSError):  # the pid is only informative
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        """Let go of the lock (when held) and close the file."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._held:  # a forked child may still share the open file: unlock it
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._held = False
            os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking it (the
        child shares the parent's open file: unlocking would release the parent's lock)."""
        fd, self._fd, self._held = self._fd, None, False
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    @staticmethod
    def holder(path: str) -> int | None:
        """The pid written by the process holding the lock on ``path``, or ``None`` when
        nobody holds it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
