"""What the benchmark scripts share: child processes stopped by their pid (on errors and on
Ctrl-C or SIGTERM too), the emulator in its own process, a host that answers nothing, and
percentiles."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def progress(message: str) -> None:
    """A progress line on stderr (the results go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def sigterm_unwinds() -> None:
    """Make SIGTERM unwind like Ctrl-C, so that every ``finally`` stops what it started."""
    signal.signal(signal.SIGTERM, _interrupt)


def stop(*processes: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM each process by its pid (all first, then wait), SIGKILL one that lingers,
    and reap them."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Wait until ``process`` listens on ``port`` (another process: nothing to wait on
    but its port)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pid {process.pid} did not listen on port {port}")
        time.sleep(0.05)


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (``share`` 0.5 for the median, 0.99 for p99)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the record."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


@dataclass(frozen=True)
class EmulatorProcess:
    """``python -m flask_meisa.emulator`` in its own process."""

    process: subprocess.Popen[str]
    root_url: str  # http://127.0.0.1:<port>
    key: str

    @property
    def url(self) -> str:
        """The API's base URL."""
        return f"{self.root_url}/api/v1"

    def admin(self, method: str, name: str, body: Any = None) -> Any:
        """Call ``/_emulator/<name>``; the JSON answer."""
        answer = requests.request(
            method, f"{self.root_url}/_emulator/{name}", json=body, timeout=120
        )
        answer.raise_for_status()
        return answer.json()

    def set_latency(self, seconds: float) -> None:
        """Answer every call after ``seconds``."""
        self.admin("POST", "faults", {"latency": seconds})

    def requests(self) -> list[dict[str, Any]]:
        """Every API request received: method, path, body, status, time, duration."""
        return list(self.admin("GET", "requests"))


@contextlib.contextmanager
def emulator_process(
    rate_limit: str = "none", send_guardrail: str = "none"
) -> Iterator[EmulatorProcess]:
    """The emulator in a child process, stopped by its pid when the block ends."""
    command = [sys.executable, "-m", "flask_meisa.emulator", "--port", str(free_port())]
    command += ["--rate-limit", rate_limit, "--send-guardrail", send_guardrail]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
    try:
        assert process.stdout is not None
        output = ""
        while "meisa_live_" not in output:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"the emulator did not start:\n{output}")
            output += line
        url = re.search(r"listening on (http://\S+?)/api/v1", output)
        key = re.search(r"(meisa_live_\w+)", output)
        assert url is not None and key is not None
        yield EmulatorProcess(process, url.group(1), key.group(1))
    finally:
        stop(process)
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def silent_host() -> Iterator[str]:
    """The URL of a host that accepts connections and never answers (a hung Meisa)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A ``redis-server`` without persistence on a free loopback port, stopped by its pid
    when the block ends; yields its URL.

    :raises RuntimeError: redis-server is not installed, or did not start.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen([*command, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)
