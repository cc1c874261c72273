"""A hostile HTTP server on a raw loopback socket: it reads each request and answers as
the test's function says, all at once, a byte at a time, or never."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def response(status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body and its Content-Length."""
    content = json.dumps(body).encode()
    head = {"Content-Type": "application/json", "Content-Length": str(len(content))}
    head.update(headers or {})
    lines = [f"HTTP/1.1 {status} Whatever"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


@dataclass
class Exchange:
    """One request and the means to answer it."""

    server: HostileServer
    sock: socket.socket
    method: str
    path: str
    body: bytes = b""

    def send(self, data: bytes) -> None:
        """Send ``data`` at once."""
        self.sock.sendall(data)

    def drip(self, data: bytes, every: float = 0.5) -> None:
        """Send ``data`` one byte every ``every`` seconds (until the server stops)."""
        for index in range(len(data)):
            self.sock.sendall(data[index : index + 1])
            if self.server.stopped.wait(every):
                return

    def stall(self) -> None:
        """Send nothing more until the server stops."""
        self.server.stopped.wait()


class HostileServer:
    """Accepts connections on a free loopback port and answers every request with
    ``answer(exchange)``; keep-alive connections are served request after request."""

    def __init__(self, answer: Callable[[Exchange], None]) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        #: Set when the server stops; every wait of an answer ends then.
        self.stopped = threading.Event()
        #: ``(method, path)`` of every request read, in order, and each one's body.
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        #: Connections accepted.
        self.connections = 0
        self._lock = threading.Lock()
        self._peers: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._accept, name="hostile-accept")]
        self._threads[0].start()

    @property
    def url(self) -> str:
        """The API root on this server."""
        return f"http://127.0.0.1:{self.port}/api/v1"

    def stop(self) -> None:
        """Stop accepting, end every answer and connection, and join every thread."""
        self.stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with self._lock:
            for peer in self._peers:
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self.stopped.is_set():
                    sock.close()
                    return
                self._peers.add(sock)
                self.connections += 1
                thread = threading.Thread(target=self._serve, args=(sock,), name="hostile-peer")
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        with sock, sock.makefile("rb") as reader, contextlib.suppress(OSError):
            while not self.stopped.is_set():
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = reader.read(length)
                with self._lock:
                    self.requests.append((method, path))
                    self.bodies.append(body)
                self._answer(Exchange(self, sock, method, path, body))


@contextlib.contextmanager
def hostile(answer: Callable[[Exchange], None]) -> Iterator[HostileServer]:
    """A :class:`HostileServer` for the ``with`` block, stopped after it."""
    server = HostileServer(answer)
    try:
        yield server
    finally:
        server.stop()
