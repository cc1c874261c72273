"""The HTTP layer: a threading HTTP/1.1 server with keep-alive, faults and request recording.

Every answer leaves in one write (buffered ``wfile``, Nagle off) so keep-alive clients are
not held up by delayed ACKs. :meth:`EmulatorServer.stop` shuts every open client connection
down, so handler threads blocked on a keep-alive read end and can be joined. Requests that
:mod:`.guard` refuses are answered before anything else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import unquote

from . import api
from . import inbox
from .call import Request
from .faults import Faults
from .guard import refusal
from .paths import BASE_PATH
from .recording import RecordedRequest
from .recording import Recorder
from .state import Store
from .wire import Fields
from .wire import FieldsError
from .wire import http_date
from .wire import read_fields

__all__ = ["ADMIN_PREFIX", "Backend", "EmulatorServer"]

#: Where the inbox page and the admin endpoints live (no key, no rate limit, no faults,
#: not recorded).
ADMIN_PREFIX = "/_emulator/"
_MAX_BODY = 10 * 1024 * 1024
_POLL_INTERVAL = 0.02
_ENCODER = json.JSONEncoder(separators=(",", ":"))
#: ``(method, name, query, body) -> (status, JSON body)``
AdminHandler = Callable[[str, str, Mapping[str, str], Any], tuple[int, Any]]


@dataclass
class Backend:
    """What the HTTP layer serves: the state, the faults, the record and the admin API."""

    store: Store
    faults: Faults
    recorder: Recorder
    admin: AdminHandler
    stopping: threading.Event


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MeisaEmulator/0.1"
    sys_version = ""
    # One buffered write per answer (flushed by handle_one_request), and no Nagle delay.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _HTTPServer

    fields: Fields
    raw_requestline: bytes

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: request lines could carry addresses in query strings."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silent (see :meth:`log_message`)."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header's value (cached per second)."""
        return http_date() if timestamp is None else super().date_time_string(timestamp)

    def handle_expect_100(self) -> bool:
        """Answer ``100 Continue`` at once (the write buffer would otherwise hold it)."""
        self.send_response_only(HTTPStatus.CONTINUE)
        self.end_headers()
        self.wfile.flush()
        return True

    def parse_request(self) -> bool:
        """Parse the request line and headers (into :attr:`fields`, not ``headers``)."""
        self.close_connection = True
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self.command, self.request_version = "", "HTTP/1.0"
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad request line")
            return False
        self.command, self.path, self.request_version = words
        try:
            self.fields = read_fields(self.rfile)
        except FieldsError as error:
            self.send_error(error.status, error.message)
            return False
        connection = self.fields.get("Connection").lower()
        http10 = self.request_version == "HTTP/1.0"
        self.close_connection = connection == "close" or (http10 and connection != "keep-alive")
        if not http10 and self.fields.get("Expect").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def do_GET(self) -> None:
        """Serve a GET."""
        self._dispatch()

    def do_POST(self) -> None:
        """Serve a POST."""
        self._dispatch()

    def do_PUT(self) -> None:
        """Serve a PUT (always 405 on the API)."""
        self._dispatch()

    def do_PATCH(self) -> None:
        """Serve a PATCH (always 405 on the API)."""
        self._dispatch()

    def do_DELETE(self) -> None:
        """Serve a DELETE."""
        self._dispatch()

    def _dispatch(self) -> None:
        started = time.perf_counter()
        backend = self.server.backend
        path, _, query_string = self.path.partition("?")
        admin = path.startswith(ADMIN_PREFIX)
        try:
            refused = refusal(self.command, admin, self.fields, self.server.own_host)
            if refused is not None:
                raise _BadRequest(*refused)
            raw = self._read_body()
        except _BadRequest as error:
            self.close_connection = True
            body = {"detail": error.detail, "code": error.code}
            self._respond(error.status, body, {})
            return
        query = {}
        if query_string:
            parsed = parse_qs(query_string, keep_blank_values=True)
            query = {k: v[0] for k, v in parsed.items()}
        if admin:
            name = path[len(ADMIN_PREFIX) :].strip("/")
            if not name and self.command == "GET":
                self._send(200, inbox.PAGE, inbox.HEADERS)
                return
            body, ok = api.parse_body(raw)
            if not ok:
                self._respond(400, {"detail": "Malformed JSON body.", "code": "parse_error"}, {})
                return
            status, answer = backend.admin(self.command, name, query, body)
            self._respond(status, answer, {})
            return
        self._serve_api(backend, unquote(path), query, raw, started)

    def _serve_api(
        self, backend: Backend, path: str, query: dict[str, str], raw: bytes, started: float
    ) -> None:
        received = backend.store.clock.time()
        key = self.fields.get("X-API-Key") or None
        body, ok = api.parse_body(raw)
        relative = path[len(BASE_PATH) :] if path.startswith(BASE_PATH + "/") else None
        plan = backend.faults.plan(relative or path)
        if plan.latency:
            backend.stopping.wait(plan.latency)
        reply = plan.before
        if reply is None:
            if relative is None:
                answer: api.Answer = (404, {"detail": "Not found.", "code": "not_found"}, {})
            else:
                request = Request(self.command, relative, query, key, body, ok)
                answer = api.handle(backend.store, request)
            reply = plan.after
        if reply is not None and reply.kind == "error":
            answer = reply.answer()
        dropped = reply is not None and reply.kind == "drop"
        backend.recorder.add(
            RecordedRequest(
                method=self.command,
                path=path,
                query=query,
                key=key,
                body=body if ok else raw.decode("utf-8", "replace"),
                status=None if dropped else answer[0],
                time=received,
                duration=time.perf_counter() - started,
                fault=reply.label if reply is not None else None,
                headers={k: v for k, v in self.fields.items() if k.lower() != "x-api-key"},
            )
        )
        if dropped:
            self._drop()
        else:
            self._respond(*answer)

    def _read_body(self) -> bytes:
        if "chunked" in self.fields.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.fields.get("Content-Length")
        if not length_header:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise _BadRequest(400, "parse_error", "Invalid Content-Length.") from None
        if length < 0 or length > _MAX_BODY:
            raise _BadRequest(413, "payload_too_large", "The body is too large.")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "parse_error", "Invalid chunked body.") from None
            total += size
            if total > _MAX_BODY:
                raise _BadRequest(413, "payload_too_large", "The body is too large.")
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _respond(self, status: int, body: Any, headers: Mapping[str, str]) -> None:
        data = _ENCODER.encode(body).encode()
        self._send(status, data, {"Content-Type": "application/json", **headers})

    def _send(self, status: int, data: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], backend: Backend) -> None:
        self.backend = backend
        #: The address given to listen on: a Host header may name it (see :mod:`.guard`).
        self.own_host = address[0]
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (or stop() cutting a connection) is not an error worth a
        # traceback; anything else is a bug and is reported as usual.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def cut_connections(self) -> None:
        """Shut every open client connection down (their handler threads then end)."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class EmulatorServer:
    """Serves a :class:`Backend` on ``host:port`` from a background thread."""

    def __init__(self, backend: Backend, host: str, port: int) -> None:
        self._backend = backend
        self._httpd = _HTTPServer((host, port), backend)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"meisa-emulator:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, end every open connection, join every thread, close the socket."""
        self._httpd.shutdown()
        self._backend.stopping.set()
        self._httpd.cut_connections()
        self._httpd.server_close()
        self._thread.join()
