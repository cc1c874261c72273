"""A fault soak: the example app under steady traffic while Meisa misbehaves.

The emulator runs in its own process (``python -m flask_meisa.emulator``) and the example
app (``example_app.create_app``) runs here, under Werkzeug's threaded WSGI server, with
``--clients`` threads, each a ``requests.Session`` and a browser's worth of users: they
sign up (reading the emailed code from the emulator), verify, log in and out, change
plans, export reports and ask for password resets, for ``--duration`` seconds. Meanwhile
a fault driver walks the emulator, through its admin endpoints, through eleven equal
phases: healthy, 300 ms latency, healthy, 5xx (error rate 0.3, plus a 502 after
processing every second), healthy, forced 429s (five a second, ``Retry-After: 1``),
healthy, dropped connections (drop rate 0.2, plus one dropped after processing every
second), healthy, a full outage (every call 503), healthy.

The key's budget is ``20/second;600/minute`` at the emulator and in the app alike: ten
times Meisa's default of 60 a minute, so that a two-minute soak makes a few thousand
calls, and still less than eight busy clients ask for, so the engine builds a backlog
(bounded by coalescing) and the final flush drains it at ten calls a second.

At the end traffic stops, the faults are cleared and ``meisa.flush`` runs until nothing
is pending (bounded), then it checks, and prints in one table:

- every user's row in the app's SQLite table (plan, signin_count, reports_exported, ...)
  equals the emulator's contact, no ``exported_report`` event was lost, and no operation
  was given up on (``delivery_failed``) or shed (``delivery_dropped``): a lost sync
  that a later one happened to repair is still a lost sync;
- no email went out twice (by idempotency key, and by trigger + address + variables);
- memory stayed bounded: the Python heap sampled every second (start, peak, end), RSS
  beside it;
- no request waited on Meisa: request latency percentiles of the views that only sync
  (billing, export, ...; login apart, for its password hash) in fault phases against
  healthy phases. Signup and the code resend send their email synchronously by design
  (the example tells the visitor whether the code went out), so those views wait on
  Meisa within ``SIGNUP_RETRY`` and ``MEISA_SEND_DEADLINE``: they are timed apart and
  checked against that bound, and so is the password reset (sent in the background);
- totals: requests, API calls by status, 429s, retries.

Exit status 0 only when every check passes.

    .venv/bin/python benchmarks/soak.py [--duration 120] [--clients 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from flask import Flask
from werkzeug.serving import make_server
from werkzeug.wsgi import ClosingIterator

ROOT = Path(__file__).resolve().parent.parent
RATE_LIMIT = "20/second;600/minute"
PHASES = (
    "healthy", "latency", "healthy", "errors", "healthy", "429",
    "healthy", "drops", "healthy", "outage", "healthy",
)  # fmt: skip
LATENCY = 0.3
#: Views by what they do besides answering: send email in the request (by design, see
#: above), check a password (scrypt, ~0.3 s of CPU), or nothing but sync after the response.
SEND_VIEWS = frozenset({"signup", "resend", "forgot"})
CLASSES = ("sync-only views", "login", "send views")
#: A view that waited on Meisa would move its median by the injected 300 ms latency or
#: the 1 s ``Retry-After``; 100 ms leaves room for the delivery thread's catch-up CPU.
MEDIAN_SLACK = 0.10
#: Login's median moves by up to ~100 ms between runs with how many scrypt hashes share
#: the cores at once; a wait on Meisa would still add the whole 300 ms or more.
LOGIN_MEDIAN_SLACK = 0.20
#: The tail is noisier (password hashing on the same cores, thread scheduling): a shift
#: under the injected 300 ms is not a wait on Meisa.
P99_SLACK = 0.30
#: The median is compared with at least this many requests on each side, the tail with
#: at least TAIL_SAMPLES (below it, p99 is the slowest request or two) and never for
#: login, whose tail is how many scrypt hashes share the cores at once.
MEDIAN_SAMPLES = 30
TAIL_SAMPLES = 200
#: Memory is the Python heap in pymalloc blocks (``sys.getallocatedblocks()``), sampled
#: every second. Not tracemalloc: it slowed this app's requests five-fold, which would
#: blur the latency check. Not RSS alone: it jumps by scrypt's 32 MiB per password hash
#: in flight, and by the 10 MB buffer Werkzeug's dev server reads into after each
#: response. A queued operation holds ~22 blocks, so the engine's own bound
#: (MEISA_QUEUE_SIZE, 10,000 operations) is ~220,000 blocks; with requests in flight
#: 300,000 is the most bounded memory can reach.
PEAK_GROWTH_LIMIT = 300_000
#: Once drained, only caches and pools may stay; a leak of one block per request or per
#: operation would pass this within a soak of a few thousand requests, ten would not.
END_GROWTH_LIMIT = 20_000
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
EXPECTED = {
    "signup": {302}, "verify": {302, 400}, "resend": {302}, "login": {302},
    "logout": {302}, "export": {302}, "upgrade": {302}, "downgrade": {302},
    "cancel": {302}, "dashboard": {200}, "billing": {200}, "forgot": {200},
}  # fmt: skip
FIELDS = (
    "plan", "subscription_status", "signup_date", "last_active", "signin_count",
    "onboarding_completed", "reports_exported",
)  # fmt: skip


@dataclass
class Account:
    """A user a client signed up."""

    email: str
    password: str
    last_reset: float = 0.0


class Admin:
    """The emulator's admin endpoints, over one session."""

    def __init__(self, root_url: str) -> None:
        self.root_url = root_url
        self.root = f"{root_url}/_emulator"
        self.http = requests.Session()

    def get(self, name: str) -> Any:
        """``GET /_emulator/<name>``'s JSON."""
        response = self.http.get(f"{self.root}/{name}", timeout=30)
        response.raise_for_status()
        return response.json()

    def faults(self, **settings: Any) -> None:
        """Add faults (``POST /_emulator/faults``)."""
        self.http.post(f"{self.root}/faults", json=settings, timeout=10).raise_for_status()

    def clear(self) -> None:
        """Remove every fault."""
        self.http.delete(f"{self.root}/faults", json={}, timeout=10).raise_for_status()

    def close(self) -> None:
        """Close the session."""
        self.http.close()


@contextmanager
def emulator_process() -> Iterator[tuple[str, str]]:
    """The emulator in its own process; yields its root URL and the demo live key."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flask_meisa.emulator", "--port", "0", "--rate-limit", RATE_LIMIT],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        output = ""
        while "demo-live:" not in output:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("the emulator did not start")
            output += line
        url = re.search(r"listening on (http://\S+)/api/v1", output)
        key = re.search(r"demo-live: (\S+)", output)
        assert url is not None and key is not None
        yield url.group(1), key.group(1)
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


class FaultDriver(threading.Thread):
    """Walks the emulator through :data:`PHASES`, equal slots over the duration.

    :attr:`phase` names a fault phase from just before its faults are set until just after
    they are cleared, so a request that could meet a fault is counted in that phase.
    """

    def __init__(self, admin: Admin, duration: float, stop: threading.Event) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.admin, self.stop = admin, stop
        self.slot = duration / len(PHASES)
        self.phase = "healthy"

    def run(self) -> None:
        start = time.monotonic()
        for number, name in enumerate(PHASES):
            if self.stop.wait(max(0.0, start + number * self.slot - time.monotonic())):
                break
            if name == "healthy":
                continue
            end = start + (number + 1) * self.slot
            self.phase = name
            self._begin(name)
            while not self.stop.is_set() and time.monotonic() < end:
                self._tick(name)
                self.stop.wait(min(1.0, max(0.0, end - time.monotonic())))
            self.admin.clear()
            self.phase = "healthy"

    def _begin(self, name: str) -> None:
        if name == "latency":
            self.admin.faults(latency=LATENCY)
        elif name == "errors":
            self.admin.faults(error_rate=0.3)
        elif name == "drops":
            self.admin.faults(drop_rate=0.2)
        elif name == "outage":
            self.admin.faults(outage=self.slot)

    def _tick(self, name: str) -> None:
        # Faults after processing: the call took effect, its answer is lost, so a retry
        # replays it (the case idempotency keys exist for).
        if name == "errors":
            self.admin.faults(fail_next={"n": 1, "status": 502, "after": True})
        elif name == "429":
            self.admin.faults(force_429={"n": 5, "retry_after": 1})
        elif name == "drops":
            self.admin.faults(drop_next={"n": 1, "after": True})


class Client(threading.Thread):
    """One visitor's browser, signing up and using accounts until told to stop."""

    def __init__(
        self, number: int, base: str, emulator_url: str, seed: int, driver: FaultDriver
    ) -> None:
        super().__init__(name=f"soak-client-{number}", daemon=True)
        self.number, self.base, self.driver = number, base, driver
        self.emulator_url = emulator_url
        self.rng = random.Random(f"{seed}:{number}")
        self.http = requests.Session()
        #: Seconds per (view class, phase); statuses per (view, status), 0 for no answer.
        #: Arrays and counters: the soak's own record stays out of the Python heap measured.
        self.times: defaultdict[tuple[str, str], array[float]] = defaultdict(lambda: array("d"))
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.accounts: list[Account] = []
        self.current: Account | None = None
        self.csrf = ""
        self.signups = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.csrf = self.token()
            while not self.driver.stop.is_set():
                self.step()
                self.driver.stop.wait(self.rng.uniform(0.0, 0.1))  # think time
        except Exception as error:  # reported in the summary, never swallowed
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.http.close()

    def token(self) -> str:
        """The session's CSRF token, read from the login form."""
        page = self.http.get(f"{self.base}/login", timeout=30).text
        found = CSRF.search(page)
        if found is None:
            raise RuntimeError("no CSRF token on the login page")
        return found.group(1)

    def call(self, view: str, path: str, form: dict[str, str] | None = None) -> int:
        """POST ``form`` (GET when ``None``) and record the request; the status (0 when
        no answer came). Its phase is the fault phase it met at its start or end."""
        before = self.driver.phase
        started = time.monotonic()
        try:
            if form is None:
                response = self.http.get(self.base + path, allow_redirects=False, timeout=60)
            else:
                data = {"csrf_token": self.csrf, **form}
                response = self.http.post(
                    self.base + path, data=data, allow_redirects=False, timeout=60
                )
            status = response.status_code
        except requests.RequestException:
            status = 0
        seconds = time.monotonic() - started
        after = self.driver.phase
        phase = before if before != "healthy" else after
        self.times[view_class(view), phase].append(seconds)
        self.statuses[view, status] += 1
        return status

    def step(self) -> None:
        """One action, chosen like a user would."""
        if self.current is None:
            roll = self.rng.random()
            if not self.accounts or roll < 0.3:
                self.sign_up()
            elif roll < 0.45:
                self.forgot()
            else:
                self.log_in(self.rng.choice(self.accounts))
            return
        view = self.rng.choices(
            ["export", "upgrade", "downgrade", "cancel", "dashboard", "billing", "logout"],
            weights=[25, 12, 8, 5, 20, 10, 12],
        )[0]
        if view == "export":
            self.call(view, "/reports/export", {"format": self.rng.choice(["csv", "pdf"])})
        elif view in ("upgrade", "downgrade", "cancel"):
            self.call(view, f"/billing/{view}", {})
        elif view == "dashboard":
            self.call(view, "/app")
        elif view == "billing":
            self.call(view, "/billing/")
        elif self.call("logout", "/logout", {}) == 302:
            self.current = None

    def sign_up(self) -> None:
        """Sign up, read the emailed code at the emulator, verify (resending if needed)."""
        self.signups += 1
        n = self.signups
        account = Account(
            f"soak-c{self.number}-u{n}@example.com", f"password-{self.rng.getrandbits(40)}"
        )
        form = {"email": account.email, "name": f"Soak User{self.number}x{n}"}
        if self.call("signup", "/signup", {"password": account.password, **form}) == 302:
            for _ in range(4):
                code = self._latest_code(account.email)
                if code is not None and self.call("verify", "/verify", {"code": code}) == 302:
                    self.accounts.append(account)
                    self.current = account
                    return
                if self.driver.stop.is_set():
                    return
                self.call("resend", "/verify/resend", {})

    def _latest_code(self, email: str) -> str | None:
        response = self.http.get(f"{self.emulator_url}/_emulator/sends", timeout=30)
        codes = [
            s["variables"]["code"]
            for s in response.json()
            if s["trigger_key"] == "verification_code" and s["to_email"] == email
        ]
        return str(codes[-1]) if codes else None

    def log_in(self, account: Account) -> None:
        """Log in as one of this client's users."""
        form = {"email": account.email, "password": account.password}
        if self.call("login", "/login", form) == 302:
            self.current = account

    def forgot(self) -> None:
        """Ask for a password reset. Never twice for a user within the same wall-clock
        second: the link is signed with a timestamp in whole seconds, and two identical
        emails would read as one sent twice."""
        now = time.time()
        account = self.rng.choice(self.accounts)
        if now - account.last_reset < 1.5:
            return
        account.last_reset = now
        self.call("forgot", "/forgot-password", {"email": account.email})


class LogCounter(logging.Handler):
    """Counts flask-meisa's and the app's log lines: retries, give-ups, failures."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()
        #: Each distinct warning (its format string) once, with its first rendering.
        self.first: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        where = "engine" if record.name.startswith("flask_meisa.engine") else "request"
        text = str(record.msg)
        if "retrying in" in text:
            self.counts[f"retries {where}"] += 1
        elif record.levelno >= logging.WARNING:
            self.counts[f"{record.levelname.lower()} {record.name}"] += 1
            self.first.setdefault(text, f"{record.name}: {record.getMessage()}")


class Sampler(threading.Thread):
    """Samples the Python heap, RSS and the engine's backlog every second."""

    def __init__(self, pending: Callable[[], int], stop: threading.Event) -> None:
        super().__init__(name="soak-memory", daemon=True)
        self.pending, self.stop = pending, stop
        self.blocks: list[int] = []
        self.rss: list[int] = []
        self.backlog: list[int] = []

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.blocks.append(sys.getallocatedblocks())
            self.rss.append(rss())
            self.backlog.append(self.pending())


def view_class(view: str) -> str:
    """Which of :data:`CLASSES` a view is timed with."""
    if view in SEND_VIEWS:
        return "send views"
    return "login" if view == "login" else "sync-only views"


def rss() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``nan`` for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def listing(counts: Counter[str]) -> str:
    """``a 3, b 1``, or ``0`` when empty."""
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items())) or "0"


def mib(size: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{size / 2**20:.1f}"


class Table:
    """The summary: rows of measure, value and verdict; passes when no check failed."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.passed = True

    def add(self, measure: str, value: str, ok: bool | None = None) -> None:
        """A row; ``ok`` None for information, else a check."""
        self.rows.append((measure, value, "" if ok is None else "PASS" if ok else "FAIL"))
        self.passed = self.passed and ok is not False

    def print(self) -> None:
        """Print the table and the verdict."""
        width = max(len(row[0]) for row in self.rows)
        value_width = max(len(row[1]) for row in self.rows)
        rule = "-" * (width + value_width + 10)
        print(rule)
        print(f"{'measure':<{width}}  {'value':<{value_width}}  check")
        print(rule)
        for measure, value, verdict in self.rows:
            print(f"{measure:<{width}}  {value:<{value_width}}  {verdict}".rstrip())
        print(rule)
        print(f"soak: {'PASS' if self.passed else 'FAIL'}", flush=True)


@dataclass
class Traffic:
    """What the traffic stage measured."""

    seconds: float
    times: dict[tuple[str, str], list[float]]  # (view class, phase) -> seconds
    statuses: Counter[tuple[str, int]]
    crashed: list[str]
    slot: float
    backlog: int  # operations pending when traffic stopped
    backlog_peak: int
    flush_seconds: float
    flush_bound: float
    left: int  # operations pending after the flush
    blocks: tuple[int, int, int]  # Python heap blocks: start, peak, end
    rss: tuple[int, int, int]


def timing(values: list[float]) -> str:
    """``n``, p50, p99 and max, in ms."""
    if not values:
        return "n=0"
    return (
        f"n={len(values):<5} p50 {percentile(values, 0.5) * 1000:5.0f}  "
        f"p99 {percentile(values, 0.99) * 1000:5.0f}  max {max(values) * 1000:5.0f} ms"
    )


def check_latency(
    table: Table, times: dict[tuple[str, str], list[float]], send_bound: float
) -> None:
    """Per view class and phase. The views that do not send email must not feel the
    faults; the ones that do must stay within their deadlines."""
    for label in CLASSES:
        for phase in dict.fromkeys(PHASES):
            table.add(f"{label}, {phase}", timing(times.get((label, phase), [])))
        healthy = times.get((label, "healthy"), [])
        faulty = [t for (c, p), ts in times.items() if c == label and p != "healthy" for t in ts]
        if label == "send views":
            worst = max([*healthy, *faulty], default=0.0)
            table.add(
                "send views: slowest, within the deadlines",
                f"{worst:.2f} s (bound {send_bound:.1f} s)",
                worst <= send_bound,
            )
            continue
        table.add(f"{label}, all fault phases", timing(faulty))
        p50 = percentile(faulty, 0.5) - percentile(healthy, 0.5)
        p99 = percentile(faulty, 0.99) - percentile(healthy, 0.99)
        fewest = min(len(healthy), len(faulty))
        if fewest < MEDIAN_SAMPLES:
            table.add(f"{label}: faults minus healthy", f"not checked (n < {MEDIAN_SAMPLES})")
            continue
        tail = fewest >= TAIL_SAMPLES and label != "login"
        slack = LOGIN_MEDIAN_SLACK if label == "login" else MEDIAN_SLACK
        table.add(
            f"{label}: faults minus healthy",
            f"p50 {p50 * 1000:+.0f} ms (< {slack * 1000:.0f}), p99 {p99 * 1000:+.0f} ms "
            + (f"(< {P99_SLACK * 1000:.0f})" if tail else "(not checked)"),
            p50 < slack and (not tail or p99 < P99_SLACK),
        )


def check_users(table: Table, db_path: str, admin: Admin) -> list[str]:
    """The app's users against the emulator's contacts and events; returns the first
    mismatches (user ids and fields, no addresses)."""
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM users ORDER BY id").fetchall()
    db.close()
    contacts = admin.get("contacts")
    by_external = {c.get("external_id"): c for c in contacts}
    owner = {c["id"]: c.get("external_id") for c in contacts}
    events = admin.get("events")
    exports = Counter(
        owner.get(e["contact_id"]) for e in events if e["event_name"] == "exported_report"
    )
    missing, lost, replayed = 0, 0, 0
    details: list[str] = []
    for row in rows:
        user_id = str(row["id"])
        expected: dict[str, Any] = {name: row[name] for name in FIELDS}
        expected["onboarding_completed"] = bool(row["onboarding_completed"])
        expected["email"], expected["first_name"] = row["email"], row["name"].split()[0]
        contact = by_external.get(user_id)
        if contact is None:
            missing += 1
            details.append(f"user {user_id}: no contact")
        else:
            found = {**contact, **(contact.get("custom_fields") or {})}
            diffs = [
                f"{name} app {value!r} Meisa {found.get(name)!r}"
                for name, value in expected.items()
                if found.get(name) != value and name != "email"
            ]
            if found.get("email") != row["email"]:
                diffs.append("email differs")
            if diffs:
                details.append(f"user {user_id}: {'; '.join(diffs)}")
        lost += max(0, row["reports_exported"] - exports[user_id])
        replayed += max(0, exports[user_id] - row["reports_exported"])
    verified = sum(1 for row in rows if row["email_verified"])
    table.add("users in the app (verified)", f"{len(rows)} ({verified}); contacts {len(contacts)}")
    table.add(
        "users whose final state Meisa lacks",
        f"{len(details)} ({missing} without a contact)",
        bool(rows) and not details,
    )
    table.add("exported_report events lost", f"{lost} of {sum(exports.values())}", lost == 0)
    table.add("exported_report events replayed", f"{replayed} (Meisa has no event dedup)")
    return details[:5]


def check_sends(table: Table, admin: Admin) -> set[str]:
    """No email went out twice: by idempotency key, and by trigger, address and variables
    (a retry under a new key would send the same email again)."""
    sends = admin.get("sends")
    by_key = Counter(str(s["idempotency_key"]) for s in sends)
    by_content = Counter(
        f"{s['trigger_key']} {s['to_email']} {json.dumps(s['variables'], sort_keys=True)}"
        for s in sends
    )
    table.add("emails sent", listing(Counter(s["trigger_key"] for s in sends)))
    twice = sum(n - 1 for n in by_key.values() if n > 1)
    table.add("emails sent twice: same idempotency key", str(twice), twice == 0)
    twice = sum(n - 1 for n in by_content.values() if n > 1)
    table.add("emails sent twice: same trigger, to, vars", str(twice), twice == 0)
    return set(by_key)


def answer(call: dict[str, Any]) -> str:
    """What a recorded call met: the fault injected, else the budget's 429, else the status."""
    if call["fault"]:
        return str(call["fault"])
    return "budget 429" if call["status"] == 429 else str(call["status"])


def api_totals(table: Table, admin: Admin, logs: Counter[str], sent: set[str]) -> None:
    """What the emulator received, the retries the library logged, and the emails asked
    for that never went out (each with what its last attempt met)."""
    calls = admin.get("requests")
    attempts: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        if call["path"].endswith("/emails/trigger/") and isinstance(call["body"], dict):
            attempts[str(call["body"].get("idempotency_key"))].append(call)
    unsent = Counter(answer(tries[-1]) for key, tries in attempts.items() if key not in sent)
    keys = Counter({key: len(tries) for key, tries in attempts.items()})
    table.add(
        "API calls at the emulator",
        f"{len(calls)}: " + listing(Counter(c["path"].rsplit("/", 2)[-2] for c in calls)),
    )
    statuses = Counter("dropped" if c["status"] is None else str(c["status"]) for c in calls)
    table.add("  by status", listing(statuses))
    table.add("  by fault injected", listing(Counter(c["fault"] for c in calls if c["fault"])))
    forced = sum(1 for c in calls if c["fault"] == "429")
    limited = Counter(
        c["path"].rsplit("/", 2)[-2] for c in calls if c["status"] == 429 and not c["fault"]
    )
    table.add(
        "  429s",
        f"{forced} forced; {sum(limited.values())} from the key's budget ({listing(limited)})",
    )
    table.add(
        "retries",
        f"engine {logs['retries engine']}, in requests {logs['retries request']}; "
        f"email calls replayed {sum(n - 1 for n in keys.values() if n > 1)}",
    )
    table.add(
        "emails asked for that never went out",
        f"{sum(unsent.values())} of {len(attempts)}; last attempt met: {listing(unsent)}",
    )


def report(table: Table, traffic: Traffic, send_bound: float) -> None:
    """The traffic stage's rows: requests, latency, flush and memory."""
    made = sum(traffic.statuses.values())
    unexpected = Counter(
        f"{view} {status}"
        for (view, status), n in traffic.statuses.items()
        if status not in EXPECTED[view]
        for _ in range(n)
    )
    table.add("phases", f"{len(PHASES)} x {traffic.slot:.1f} s: " + " ".join(PHASES))
    table.add("requests made", f"{made} ({made / traffic.seconds:.1f}/s)")
    table.add("requests answered unexpectedly", listing(unexpected), not unexpected)
    table.add(
        "client threads that crashed", "; ".join(traffic.crashed) or "0", not traffic.crashed
    )
    check_latency(table, traffic.times, send_bound)
    table.add(
        "backlog at stop; flushed in",
        f"{traffic.backlog} operations; {traffic.flush_seconds:.1f} s "
        f"(bound {traffic.flush_bound:.0f} s), {traffic.left} left",
        traffic.left == 0,
    )
    table.add("engine backlog peak (sampled 1/s)", str(traffic.backlog_peak))
    start, peak, end = traffic.blocks
    table.add("Python heap blocks start / peak / end", f"{start} / {peak} / {end}")
    table.add(
        "  peak growth",
        f"{peak - start:+} (< {PEAK_GROWTH_LIMIT})",
        peak - start < PEAK_GROWTH_LIMIT,
    )
    table.add(
        "  end growth, drained",
        f"{end - start:+} (< {END_GROWTH_LIMIT})",
        end - start < END_GROWTH_LIMIT,
    )
    table.add("RSS start / peak / end", "{} / {} / {} MiB".format(*map(mib, traffic.rss)))


class Open:
    """WSGI wrapper counting the responses the server has not closed yet.

    The extension hands a request's work to delivery when the server closes the
    response, and Werkzeug's dev server closes it only after waiting up to 10 ms for more
    input, when the client already has its answer: the flush must wait for those.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.count = 0
        self.closed = threading.Condition()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.closed:
            self.count += 1
        try:
            return ClosingIterator(self.app(environ, start_response), self._close)
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        with self.closed:
            self.count -= 1
            self.closed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait until every response is closed; ``False`` on timeout."""
        with self.closed:
            return self.closed.wait_for(lambda: self.count == 0, timeout)


@contextmanager
def serving(app: Flask) -> Iterator[tuple[str, Open]]:
    """``app`` under Werkzeug's threaded server on loopback; yields its URL and the
    counter of open responses."""
    responses = Open(app)
    server = make_server("127.0.0.1", 0, responses, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="soak-wsgi", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", responses
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def drive(
    app: Flask, base: str, responses: Open, admin: Admin, duration: float, clients: int, seed: int
) -> Traffic:
    """Warm up, run the traffic and the faults, stop, clear the faults and flush."""
    meisa = app.extensions["meisa"]
    state = meisa.state(app)

    def pending() -> int:
        return state.dispatcher.status().pending if state.has_dispatcher() else 0

    stop = threading.Event()
    driver = FaultDriver(admin, duration, stop)
    warm_up(Client(0, base, admin.root_url, seed, driver))
    gc.collect()
    blocks_start, rss_start = sys.getallocatedblocks(), rss()
    sampler = Sampler(pending, stop)
    crowd = [Client(n, base, admin.root_url, seed, driver) for n in range(1, clients + 1)]
    began = time.monotonic()
    threads: list[threading.Thread] = [driver, sampler, *crowd]
    for thread in threads:
        thread.start()
    try:
        stop.wait(duration)
        seconds = time.monotonic() - began
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    admin.clear()
    responses.wait(10.0)
    backlog = pending()
    bound = 60.0 + backlog / 5.0  # the budget delivers ten a second on average
    flushing = time.monotonic()
    with app.app_context():
        while not meisa.flush(5.0) and time.monotonic() - flushing < bound:
            pass
    flush_seconds = time.monotonic() - flushing
    gc.collect()
    blocks_end = sys.getallocatedblocks()
    times: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    statuses: Counter[tuple[str, int]] = Counter()
    for client in crowd:
        for key, values in client.times.items():
            times[key].extend(values)
        statuses.update(client.statuses)
    return Traffic(
        seconds=seconds,
        times=dict(times),
        statuses=statuses,
        crashed=[c.error for c in crowd if c.error],
        slot=driver.slot,
        backlog=backlog,
        backlog_peak=max(sampler.backlog, default=0),
        flush_seconds=flush_seconds,
        flush_bound=bound,
        left=pending(),
        blocks=(blocks_start, max([blocks_start, *sampler.blocks]), blocks_end),
        rss=(rss_start, max([rss_start, *sampler.rss]), rss()),
    )


def warm_up(client: Client) -> None:
    """One user through every view, so that templates and code paths are loaded before
    the memory baseline is taken."""
    try:
        client.csrf = client.token()
        client.sign_up()
        client.call("export", "/reports/export", {"format": "csv"})
        for view in ("upgrade", "downgrade", "cancel"):
            client.call(view, f"/billing/{view}", {})
        client.call("dashboard", "/app")
        client.call("billing", "/billing/")
        client.call("logout", "/logout", {})
        client.log_in(client.accounts[0])
        client.call("logout", "/logout", {})
        client.forgot()
    finally:
        client.http.close()


def run(duration: float, clients: int, seed: int) -> int:
    """The soak; returns the exit status."""
    sys.path.insert(0, str(ROOT))  # example_app sits beside flask_meisa, not installed
    from example_app import create_app
    from example_app.contacts import SIGNUP_RETRY
    from flask_meisa.signals import delivery_dropped
    from flask_meisa.signals import delivery_failed

    logs = LogCounter()
    for name in ("flask_meisa", "example_app"):
        logger = logging.getLogger(name)
        logger.addHandler(logs)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    table = Table()
    lost: Counter[str] = Counter()

    def on_lost(sender: Flask, operation: Any = None, **extra: Any) -> None:
        lost[f"{operation.kind} {extra.get('reason', 'failed')}"] += 1

    with tempfile.TemporaryDirectory() as tmp, emulator_process() as (root_url, key):
        db_path = str(Path(tmp) / "soak.sqlite3")
        app = create_app(
            {
                "SECRET_KEY": f"soak-{seed}",
                "EXAMPLE_DATABASE": db_path,
                "MEISA_API_KEY": key,
                "MEISA_BASE_URL": f"{root_url}/api/v1",
                "MEISA_RATE_LIMIT": RATE_LIMIT,
                "MEISA_OUTBOX": str(Path(tmp) / "meisa-outbox.sqlite3"),
                # Plain HTTP on loopback, and every client from one address asking for
                # resets: the example's production cookie and email limits are not tested here.
                "SESSION_COOKIE_SECURE": False,
                "EXAMPLE_EMAIL_LIMIT_PER_ADDRESS": "1000000/hour",
                "EXAMPLE_EMAIL_LIMIT_PER_CLIENT": "1000000/hour",
            }
        )
        delivery_failed.connect(on_lost, sender=app)
        delivery_dropped.connect(on_lost, sender=app)
        admin = Admin(root_url)
        try:
            with serving(app) as (base, responses):
                traffic = drive(app, base, responses, admin, duration, clients, seed)
            table.add("duration, clients, seed", f"{traffic.seconds:.0f} s, {clients}, {seed}")
            table.add("budget, emulator and app", RATE_LIMIT)
            send_bound = app.config["MEISA_SEND_DEADLINE"] + (SIGNUP_RETRY.deadline or 0) + 3
            report(table, traffic, send_bound)
            table.add("operations failed or dropped", listing(lost), not lost)
            details = check_users(table, db_path, admin)
            sent = check_sends(table, admin)
            api_totals(table, admin, logs.counts, sent)
            warned = Counter({k: n for k, n in logs.counts.items() if "retries" not in k})
            table.add("log lines at warning or above", listing(warned))
        finally:
            app.extensions["meisa"].state(app).close(1.0)
            admin.close()
    table.print()
    for line in details:
        print(f"mismatch: {line}")
    for line in list(logs.first.values())[:10]:
        print(f"first of its kind: {line}")
    return 0 if table.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the soak."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--seed", type=int, default=1, help="seeds the clients' choices")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1:
        parser.error("--duration must be > 0 and --clients at least 1")
    return run(args.duration, args.clients, args.seed)


if __name__ == "__main__":
    sys.exit(main())
