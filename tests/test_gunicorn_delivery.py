"""Delivery under a real gunicorn with the default configuration: the store in the app's
instance folder, shared by every worker, one of which delivers for the host.

Three sync workers serve ``tests.served_app:create_app()`` against the emulator, both
sides at the same small budget. Checked: one budget for the host (no 429), nothing lost
or repeated, a delivering worker killed during an outage, a graceful stop and restart, a
hung delivering worker, ``flask meisa status``, ``flush`` and ``sync-users`` run beside
the server, and a graceful reload (HUP) with the budget carried across it.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from flask_meisa._engine.host import HostLock
from flask_meisa.emulator import Emulator
from flask_meisa.emulator.recording import RecordedRequest
from tests.process_support import ROOT
from tests.process_support import Process
from tests.process_support import Processes
from tests.process_support import drain_without_loss
from tests.process_support import environment
from tests.process_support import linked_releases
from tests.process_support import no_loss
from tests.process_support import store_path
from tests.process_support import stored
from tests.process_support import tally
from tests.process_support import wait_stored
from tests.process_support import wait_until
from tests.served_app import RELEASE_FILE

pytestmark = pytest.mark.slow

WORKERS = 3
USERS = 15
LOGINS = 6  # per user
BOOTING = re.compile(r"Booting worker with pid: (\d+)")


def no_control_socket() -> list[str]:
    """The option that keeps a recent gunicorn from making its control socket in the
    home folder (shared by every server of the machine)."""
    config = importlib.import_module("gunicorn.config")
    known = {setting.name for setting in config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in known else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A gunicorn master serving ``tests.served_app`` (see :func:`start_server`)."""

    def __init__(self, process: Process, url: str) -> None:
        self.process = process
        self.url = url

    def booted(self) -> list[tuple[float, int]]:
        """``(when read, pid)`` of every worker booted so far, in order."""
        return [
            (when, int(found.group(1)))
            for when, line in self.process.timed_err()
            if (found := BOOTING.search(line))
        ]

    def wait_booted(self, count: int, timeout: float = 60.0) -> list[int]:
        """Wait until ``count`` workers in all have booted; their pids."""
        assert self.process.wait_for(lambda p: len(self.booted()) >= count, timeout), (
            self.process.output
        )
        return [pid for _, pid in self.booted()]

    def stop(self) -> int:
        """Stop gracefully (SIGTERM to the master); its exit code."""
        return self.process.stop(timeout=60)


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(processes: Processes, instance: Path) -> StartServer:
    """``start_server(emu, *options, **env)``: gunicorn with three sync workers serving the
    app on ``emu``; waits for the workers to boot. Stopped after the test."""

    def start(emu: Emulator, *options: str, **env: str) -> Server:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            f"--workers={WORKERS}",
            "--worker-class=sync",
            f"--bind=127.0.0.1:{port}",
            "--graceful-timeout=30",
            "--timeout=120",
            "--log-level=info",
            *no_control_socket(),
            *options,
            "tests.served_app:create_app()",
        ]
        process = processes.start(command, environment(emu, instance, **env))
        server = Server(process, f"http://127.0.0.1:{port}")
        server.wait_booted(WORKERS)
        return server

    return start


def post_all(url: str, paths: list[str], threads: int = 6) -> list[requests.Response]:
    """POST every path, ``threads`` at a time."""

    def post(path: str) -> requests.Response:
        with requests.Session() as session:
            response = session.post(url + path, timeout=30)
        response.raise_for_status()
        return response

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(post, paths))


def logins() -> list[str]:
    return [f"/login/{n % USERS}/{n // USERS}" for n in range(USERS * LOGINS)]


def every_login_arrived(emu: Emulator) -> bool:
    if len(emu.events(event_name="logged_in")) < USERS * LOGINS:
        return False
    for user in range(USERS):
        contact = emu.contact(external_id=str(user))
        if contact is None or len(contact["custom_fields"]) < LOGINS:
            return False
    return True


def holder(instance: Path) -> int | None:
    """The pid delivering for the host."""
    return HostLock.holder(str(store_path(instance)) + ".lock")


def statuses(emu: Emulator) -> Counter[int | None]:
    return Counter(r.status for r in emu.requests)


def work(numbers: range | list[int]) -> list[str]:
    return [f"/work/{n}" for n in numbers]


def wait_for_new_holder(
    instance: Path, gone: int | None, timeout: float = 30.0
) -> tuple[int, float]:
    """Wait until a process other than ``gone`` delivers; its pid and the time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = holder(instance)  # 0: held, its pid not written yet
        if pid and pid != gone:
            return pid, time.time()
        time.sleep(0.01)
    raise AssertionError(f"no process took over delivery from {gone} within {timeout}s")


def signal_process(pid: int | None, number: int) -> None:
    """Send a signal to a worker of the server this test started."""
    assert pid is not None
    os.kill(pid, number)


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_workers_share_one_budget_and_lose_nothing(
    emulator_factory: Callable[..., Emulator],
    start_server: StartServer,
    instance: Path,
    preload: bool,
) -> None:
    rate = "40/second"
    emu = emulator_factory(rate_limit=rate)
    server = start_server(emu, *(["--preload"] if preload else []), MEISA_TEST_RATE=rate)
    workers = server.wait_booted(WORKERS)
    served_by = {int(r.json()["pid"]) for r in post_all(server.url, logins())}
    assert len(served_by) >= 2, served_by  # more than one worker wrote to the store
    assert emu.wait_for(every_login_arrived, timeout=60), stored(instance)
    # One process of the server delivers: a worker, or under --preload the master (which
    # started delivery in init_app before it forked the workers).
    assert holder(instance) in [server.process.pid, *workers]
    assert server.stop() == 0, server.process.output
    counts = statuses(emu)
    print(f"\ngunicorn {WORKERS} workers, preload={preload}, {rate}: {dict(counts)}")
    assert counts[429] == 0
    assert set(counts) <= {200, 201}
    visits = Counter(
        (e["contact_id"], e["properties"]["visit"]) for e in emu.events(event_name="logged_in")
    )
    assert len(visits) == USERS * LOGINS and set(visits.values()) == {1}  # once each
    for user in range(USERS):
        contact = emu.contact(external_id=str(user))
        assert contact is not None
        assert contact["custom_fields"] == {f"login_{v}": v for v in range(LOGINS)}
    assert stored(instance).pending == 0
    assert emu.live_key not in server.process.output


def test_sigkill_of_the_delivering_worker_during_an_outage_loses_and_repeats_nothing(
    emulator_factory: Callable[..., Emulator], start_server: StartServer, instance: Path
) -> None:
    rate = "40/second"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    requests_made = 60  # 20 users' upserts, 60 events, 6 sends
    # Meisa is down, except that the first send is taken and only its answer is lost.
    emu.faults.outage(600)
    emu.faults.drop_next(1, path="/emails/trigger/", after=True)
    server = start_server(emu, MEISA_TEST_RATE=rate)
    workers = server.wait_booted(WORKERS)
    post_all(server.url, work(range(requests_made)))
    assert wait_stored(instance, "track", requests_made)
    assert emu.wait_for(lambda e: any(r.fault == "drop_after" for r in e.requests), 30)
    victim = holder(instance)
    assert victim in workers
    killed_at = time.time()
    signal_process(victim, signal.SIGKILL)
    successor, seen_at = wait_for_new_holder(instance, victim)
    emu.faults.clear()
    assert emu.wait_for(lambda e: no_loss(tally(e, requests_made)), 60), tally(emu, requests_made)
    triggers = Counter(r.body["idempotency_key"] for r in emu.requests_to("/emails/trigger/"))
    print(
        f"\nSIGKILL of the delivering worker {victim}: worker {successor} delivered from "
        f"{seen_at - killed_at:.2f}s after; {tally(emu, requests_made)}; "
        f"{len(emu.sends())} emails sent for {sum(triggers.values())} trigger calls; "
        f"429s: {statuses(emu)[429]}"
    )
    assert len(emu.sends()) == requests_made // 10  # once each, the replayed one included
    assert triggers["k0"] >= 2  # the send Meisa took was replayed, with its key
    assert statuses(emu)[429] == 0
    assert server.stop() == 0, server.process.output
    assert stored(instance).pending == 0


def test_a_graceful_stop_keeps_the_rest_for_the_next_start_of_the_server(
    emulator_factory: Callable[..., Emulator], start_server: StartServer, instance: Path
) -> None:
    rate = "40/second"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    requests_made = 40
    emu.faults.outage(600)
    server = start_server(emu, MEISA_TEST_RATE=rate)
    post_all(server.url, work(range(requests_made)))
    assert wait_stored(instance, "track", requests_made)
    began = time.monotonic()
    assert server.stop() == 0, server.process.output  # SIGTERM: workers exit gracefully
    took = time.monotonic() - began
    left = stored(instance)
    assert left.pending >= requests_made and left.in_flight == 0
    calls = len(emu.requests)
    emu.faults.clear()
    began = time.monotonic()
    start_server(emu, MEISA_TEST_RATE=rate)  # no request: the store's work is delivered
    assert emu.wait_for(lambda e: no_loss(tally(e, requests_made)), 60), tally(emu, requests_made)
    delivered_in = time.monotonic() - began
    print(
        f"\ngraceful stop in {took:.1f}s with {left.pending} operations left; the next start "
        f"delivered them in {delivered_in:.1f}s ({len(emu.requests) - calls} calls)"
    )
    assert statuses(emu)[429] == 0


def test_workers_forked_after_the_old_release_folder_went_store_in_the_shared_store(
    emu: Emulator, start_server: StartServer, tmp_path: Path
) -> None:
    # --preload: the master opened the store through releases/1/instance, a link to the
    # shared folder; the deploy's cleanup deleted the release, and the master replaced its
    # workers. The new ones made the release's folder again, for a store no later start
    # reads, or (not making it) held their work in memory, lost at their stop.
    requests_made = 30
    shared, releases = linked_releases(tmp_path)
    emu.faults.outage(600)  # nothing is delivered: everything waits in the store
    old = {"MEISA_TEST_INSTANCE": str(releases / "1" / "instance"), "MEISA_TEST_RATE": "none"}
    server = start_server(emu, "--preload", **old, MEISA_TEST_FLUSH_TIMEOUT="0")
    post_all(server.url, work(range(10)))
    assert wait_stored(shared, "track", 10)
    shutil.rmtree(releases / "1")
    workers = server.wait_booted(WORKERS)
    for pid in workers:
        signal_process(pid, signal.SIGTERM)  # each replaced by a worker forked now
    server.wait_booted(2 * WORKERS)
    exits = [f"Worker exiting (pid: {pid})" for pid in workers]
    assert server.process.wait_for(lambda p: all(e in p.output for e in exits))
    post_all(server.url, work(range(10, requests_made)))
    assert wait_stored(shared, "track", requests_made), server.process.output
    assert server.stop() == 0, server.process.output
    assert not (releases / "1").exists()
    drain_without_loss(emu, environment(emu, releases / "2" / "instance"), requests_made)


class Hung:
    """A request hanging in the delivering worker."""

    def __init__(self, future: Future[requests.Response], pid: int) -> None:
        self.future = future
        self.pid = pid

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float) -> requests.Response:
        return self.future.result(timeout)


def hang_the_delivering_worker(server: Server, instance: Path) -> Hung:
    """Send ``POST /hang`` until the delivering worker takes one (the others answer 409)."""
    pool = ThreadPoolExecutor(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        future = pool.submit(requests.post, server.url + "/hang", timeout=120)
        while not future.done():
            hanging = list(instance.glob("hung-*"))
            if hanging:
                pool.shutdown(wait=False)
                return Hung(future, int(hanging[0].name.split("-")[1]))
            time.sleep(0.02)
        assert future.result().status_code == 409
    raise AssertionError("the delivering worker took no /hang request")


def test_a_delivering_worker_hung_in_a_request_still_delivers(
    emulator_factory: Callable[..., Emulator], start_server: StartServer, instance: Path
) -> None:
    rate = "40/second"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    server = start_server(emu, MEISA_TEST_RATE=rate)
    hung = hang_the_delivering_worker(server, instance)
    try:
        requests_made = 40
        began = time.monotonic()
        post_all(server.url, work(range(requests_made)), threads=4)  # the others serve
        assert emu.wait_for(lambda e: no_loss(tally(e, requests_made)), 60), tally(
            emu, requests_made
        )
        took = time.monotonic() - began
        assert holder(instance) == hung.pid  # it delivered it all, while hung
        assert not hung.done()  # and it is still hung
        print(f"\nthe delivering worker hung: {requests_made} requests delivered in {took:.1f}s")
        assert statuses(emu)[429] == 0
    finally:
        (instance / RELEASE_FILE).touch()
    assert hung.result(30).status_code == 200


def flask_cli(
    emu: Emulator, instance: Path, *args: str, rate: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``flask meisa <args>`` in a process of its own, on the server's app module and
    instance folder."""
    env = environment(
        emu, instance, MEISA_TEST_RATE=rate, FLASK_APP="tests.served_app:create_app()"
    )
    done = subprocess.run(
        [sys.executable, "-m", "flask", "meisa", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert emu.live_key not in done.stdout + done.stderr
    return done


def lane_waiting(output: str) -> dict[str, int]:
    """The ``waiting`` column of ``flask meisa status``, by lane."""
    found = re.findall(r"^(transactional|automation|routine|backfill)\s+(\d+)", output, re.M)
    return {lane: int(count) for lane, count in found}


def test_flask_meisa_status_and_flush_beside_the_server(
    emulator_factory: Callable[..., Emulator], start_server: StartServer, instance: Path
) -> None:
    # Six calls per 20 seconds on both sides: the first six go, the rest wait for the
    # window, long enough to be seen from another process.
    rate = "6/20s"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    server = start_server(emu, MEISA_TEST_RATE=rate)
    workers = server.wait_booted(WORKERS)
    post_all(server.url, work([1, 2, 3]))  # three new contacts and their events: six calls
    assert wait_until(lambda: stored(instance).delivered == 6)
    # Known contacts' next syncs (routine); a new contact and its event (automation).
    post_all(server.url, ["/sync/21", "/sync/22", "/work/4"])
    assert wait_until(lambda: stored(instance).pending == 4)
    done = flask_cli(emu, instance, "status", rate=rate)
    assert done.returncode == 0, done.stdout + done.stderr
    status = done.stdout
    print(f"\n{status}")
    delivering = holder(instance)
    assert delivering in workers
    assert f"delivering process: pid {delivering}" in status
    assert f"store: {store_path(instance)} (every process of this host)" in status
    assert lane_waiting(status) == {
        "transactional": 0,
        "automation": 2,
        "routine": 2,
        "backfill": 0,
    }
    assert re.search(r"^budget left: 6/20 seconds: 0$", status, re.M), status
    assert "delivered: 6 " in status
    began = time.monotonic()
    done = flask_cli(emu, instance, "flush", "--timeout", "60", rate=rate)
    took = time.monotonic() - began
    print(f"flask meisa flush: {took:.1f}s, {done.stdout.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing pending" in done.stdout
    assert stored(instance).pending == 0
    assert holder(instance) == delivering  # the server delivered, not the command
    assert sorted(e["properties"]["n"] for e in emu.events(event_name="worked")) == [1, 2, 3, 4]
    for n in (1, 2, 3, 4, 21, 22):
        contact = emu.contact(external_id=f"u{n % 20}")
        assert contact is not None and contact["custom_fields"][f"f{n}"] == n
    assert statuses(emu)[429] == 0


class HolderWatch:
    """Records which process delivers, every 10 ms, on a thread."""

    def __init__(self, instance: Path) -> None:
        self.instance = instance
        self.seen: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.seen.append((time.time(), holder(self.instance)))

    def first(self, test: Callable[[int | None], bool]) -> float | None:
        """When the holder first passed ``test``."""
        return next((when for when, pid in self.seen if test(pid)), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_graceful_reload_resumes_delivery_at_once_within_the_budget(
    emulator_factory: Callable[..., Emulator], start_server: StartServer, instance: Path
) -> None:
    # Ten calls a second on both sides, and about nine seconds of calls pending when the
    # master is told to reload: the old workers stop (the delivering one flushes for
    # MEISA_FLUSH_TIMEOUT), new ones start, one of them takes over without any request.
    rate = "10/second"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    server = start_server(emu, MEISA_TEST_RATE=rate)
    requests_made = 60
    post_all(server.url, work(range(requests_made)))
    assert emu.wait_for(lambda e: len(e.requests) >= 10, 30)
    old_holder = holder(instance)
    watch = HolderWatch(instance)
    try:
        reloaded_at = time.time()
        signal_process(server.process.pid, signal.SIGHUP)
        new_workers = server.wait_booted(2 * WORKERS)[WORKERS:]
        booted_at = server.booted()[-1][0]
        successor, _ = wait_for_new_holder(instance, old_holder, timeout=60)
        assert successor in new_workers
        assert emu.wait_for(lambda e: no_loss(tally(e, requests_made)), 60), tally(
            emu, requests_made
        )
    finally:
        watch.stop()
    released_at = watch.first(lambda pid: pid != old_holder and pid != 0)
    taken_at = watch.first(lambda pid: pid in new_workers)
    assert released_at is not None and taken_at is not None
    calls = sorted(r.time for r in emu.requests if r.time >= reloaded_at)
    resumed_at = next(t for t in calls if t >= taken_at)
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    counts = statuses(emu)
    print(
        f"\nHUP: new workers booted {booted_at - reloaded_at:.2f}s after it; the old holder "
        f"let go {released_at - reloaded_at:.2f}s after it; a new worker took over "
        f"{taken_at - released_at:.2f}s later and made its first call "
        f"{resumed_at - taken_at:.2f}s after that; longest pause between calls "
        f"{max(gaps):.2f}s; {len(calls)} calls after the HUP; statuses {dict(counts)}"
    )
    assert counts[429] == 0  # the new holder knew the budget the old one had spent
    # Within the lock's poll (0.1 s), then the rest of the budget's one-second window,
    # each with slack for a busy machine.
    assert taken_at - released_at < 0.1 + 1.0
    assert resumed_at - taken_at < 1.0 + 2.0
    assert max(gaps) < 1.0 + 2.0


def test_a_backfill_beside_the_server_goes_through_its_budget_behind_its_live_work(
    emulator_factory: Callable[..., Emulator], start_server: StartServer, instance: Path
) -> None:
    rate = "20/second"
    emu = emulator_factory(rate_limit=rate, send_guardrail=None)
    server = start_server(emu, MEISA_TEST_RATE=rate)
    post_all(server.url, work([1, 2, 3]))
    assert wait_until(lambda: stored(instance).delivered == 6)
    delivering = holder(instance)

    def members() -> list[RecordedRequest]:
        """Meisa's upserts of the backfill's members (numbered; live users are ``u<n>``)."""
        upserts = emu.requests_to("/contacts/upsert/")
        return [r for r in upserts if r.body["external_id"].isdigit()]

    with ThreadPoolExecutor(1) as pool:
        backfill = pool.submit(flask_cli, emu, instance, "sync-users", rate=rate)
        assert wait_until(lambda: len(members()) >= 40, timeout=60)
        asked = time.time()
        post_all(server.url, ["/sync/21", "/sync/22", "/sync/23"])
        done = backfill.result()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 of 200 users done" in done.stdout
    # The server's delivering worker delivered the backfill, from the one budget.
    assert holder(instance) == delivering
    assert statuses(emu)[429] == 0
    upserted = members()
    assert Counter(int(r.body["external_id"]) for r in upserted) == dict.fromkeys(
        range(1000, 1200), 1
    )
    # The live syncs went ahead of the backfill's queue: they arrived while members were
    # still waiting, with at most the slot already taken and one call in flight ahead.
    arrived = max(
        r.time
        for r in emu.requests_to("/contacts/upsert/")
        if any(f"f{n}" in r.body.get("custom_fields", {}) for n in (21, 22, 23))
    )
    ahead = [r for r in upserted if asked < r.time < arrived]
    print(f"\nmembers delivered between the live syncs' request and arrival: {len(ahead)}")
    assert arrived < max(r.time for r in upserted) and len(ahead) <= 2
