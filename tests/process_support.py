"""Support for tests that run the app in processes of their own (``tests/served_app.py``):
their environment, starting and stopping them by pid, reading the host's store from
outside, and counting at the emulator what was lost or repeated."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

from flask_meisa._engine import pending
from flask_meisa._engine.base import DeliveryStatus
from flask_meisa._engine.store import Store
from flask_meisa.emulator import Emulator
from tests.served_app import USERS

ROOT = Path(__file__).resolve().parent.parent
#: The file the default ``MEISA_OUTBOX`` names in the instance folder.
STORE_NAME = "meisa-outbox.sqlite3"


def environment(emu: Emulator, instance: Path, **extra: str) -> dict[str, str]:
    """The environment of a process running ``tests.served_app`` against ``emu`` with
    ``instance`` as its instance folder (``extra``: more variables). The caller's own
    ``MEISA_*`` and ``FLASK_*`` variables are left out."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MEISA_", "FLASK_"))
    }
    return {
        **inherited,
        "MEISA_TEST_URL": emu.url,
        "MEISA_TEST_KEY": emu.live_key,
        "MEISA_TEST_INSTANCE": str(instance),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def store_path(instance: Path) -> Path:
    """The delivery store of an app whose instance folder is ``instance``."""
    return instance / STORE_NAME


def linked_releases(root: Path) -> tuple[Path, Path]:
    """Releases 1 and 2 in ``root``, the instance folder of each a link to a shared one (as
    Capistrano's ``linked_dirs``): the shared instance folder and the releases' folder."""
    shared, releases = root / "shared" / "instance", root / "releases"
    shared.mkdir(parents=True)
    for release in ("1", "2"):
        (releases / release).mkdir(parents=True)
        (releases / release / "instance").symlink_to(shared)
    return shared, releases


def stored(instance: Path) -> DeliveryStatus:
    """What the host's store holds now, read from this process."""
    store = Store(store_path(instance))
    try:
        status = DeliveryStatus(engine="thread", durable=True)
        with store.read() as db:
            pending.describe(db, time.time(), status)
        return status
    finally:
        store.close()


def stored_kinds(instance: Path) -> Counter[str]:
    """The operations waiting in the host's store (dead letters not included), by kind."""
    store = Store(store_path(instance))
    try:
        with store.read() as db:
            rows = db.execute(
                "SELECT kind, count(*) FROM meisa_ops WHERE state != 'dead' GROUP BY kind"
            ).fetchall()
        return Counter({kind: int(count) for kind, count in rows})
    finally:
        store.close()


def wait_stored(instance: Path, kind: str, count: int, timeout: float = 30.0) -> bool:
    """Wait until the store holds ``count`` operations of ``kind`` (the writer threads store
    what requests handed over in groups, a moment later)."""
    return wait_until(lambda: stored_kinds(instance)[kind] >= count, timeout)


class Process:
    """A process started by a test, with its output read on threads (so that no pipe
    fills) and waited for line by line."""

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            list(args),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its group: what it leaves running is stopped with it
        )
        self.pid = self.popen.pid
        self.out: list[str] = []
        self.err: list[str] = []
        self._read_at: list[float] = []  # when each line of ``err`` was read
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(line)
                if lines is self.err:
                    self._read_at.append(time.time())
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def timed_err(self) -> list[tuple[float, str]]:
        """The lines of stderr so far, each with the time it was read (``time.time()``)."""
        with self._changed:
            return list(zip(self._read_at, self.err, strict=True))

    @property
    def output(self) -> str:
        """Everything the process wrote so far, stdout then stderr."""
        with self._changed:
            return "".join(self.out) + "".join(self.err)

    def wait_for(self, test: Callable[[Process], bool], timeout: float = 30.0) -> bool:
        """Wait until ``test(self)`` holds, re-checked on every line written."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not test(self):
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reading()):
                    return test(self)
                self._changed.wait(min(left, 0.5))
            return True

    def wait_for_line(self, text: str, timeout: float = 30.0) -> bool:
        """Wait until a line of stdout or stderr contains ``text``."""
        return self.wait_for(lambda p: any(text in line for line in p.out + p.err), timeout)

    def _reading(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def signal(self, number: int) -> None:
        """Send signal ``number`` to the process, if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(number)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit and for its output; returns its exit code."""
        code = self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if it is still running after ``timeout``; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.wait(10)


class Processes:
    """Every process a test starts; :meth:`stop_all` ends those still running."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def start(self, args: Sequence[str], env: dict[str, str]) -> Process:
        """Start ``args`` (run from the repository root) with ``env``."""
        process = Process(args, env)
        self.started.append(process)
        return process

    def app(self, env: dict[str, str], *scenario: str) -> Process:
        """Start ``python -m tests.served_app <scenario>``."""
        return self.start([sys.executable, "-m", "tests.served_app", *scenario], env)

    def stop_all(self) -> None:
        """Stop every process still running (SIGTERM, then SIGKILL), by pid, then what each
        left running (a server's workers orphaned by a killed master, which would hold its
        output pipes open: closing them would wait for good), by its group."""
        for process in reversed(self.started):
            if process.popen.poll() is None:
                process.stop(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            for stream in (process.popen.stdout, process.popen.stderr):
                if stream is not None:
                    stream.close()


def run_app(env: dict[str, str], *scenario: str, timeout: float = 90.0) -> str:
    """Run ``python -m tests.served_app <scenario>`` to its end; its stdout and stderr.

    :raises AssertionError: it failed.
    """
    done = subprocess.run(
        [sys.executable, "-m", "tests.served_app", *scenario],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def wait_until(test: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``test()`` until it holds, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def blocked_signals(pid: int) -> dict[int, int]:
    """The blocked signals (``SigBlk``) of each thread of process ``pid``, by thread id."""
    masks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        found = re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M)
        assert found is not None
        masks[int(task.name)] = int(found[1], 16)
    return masks


def drain_without_loss(emu: Emulator, env: dict[str, str], requests: int) -> None:
    """Meisa answering again, a new process of ``env`` delivers what the store kept, and
    :func:`tally` finds nothing of ``requests`` lost or repeated."""
    emu.faults.clear()
    output = run_app(env, "drain")
    assert "flushed True" in output, output
    numbers = tally(emu, requests)
    assert no_loss(numbers), numbers


def no_loss(numbers: dict[str, int]) -> bool:
    """Whether a :func:`tally` found nothing lost and nothing repeated."""
    return numbers == dict.fromkeys(numbers, 0)


def tally(emu: Emulator, requests: int) -> dict[str, int]:
    """What ``requests`` calls of ``POST /work/<n>`` (``n`` from 0) lost or repeated, by
    the emulator's state: each event ``worked`` once, each send once (by its idempotency
    key), each upsert's field in its contact."""
    events = Counter(e["properties"]["n"] for e in emu.events(event_name="worked"))
    sends = Counter(s["idempotency_key"] for s in emu.sends())
    fields_lost = 0
    for user in range(USERS):
        contact = emu.contact(external_id=f"u{user}")
        have = contact["custom_fields"] if contact else {}
        fields_lost += sum(1 for n in range(user, requests, USERS) if have.get(f"f{n}") != n)
    return {
        "events_lost": sum(1 for n in range(requests) if events[n] == 0),
        "events_repeated": sum(count - 1 for count in events.values()),
        "sends_lost": sum(1 for n in range(0, requests, 10) if sends[f"k{n}"] == 0),
        "sends_repeated": sum(count - 1 for count in sends.values()),
        "fields_lost": fields_lost,
    }
