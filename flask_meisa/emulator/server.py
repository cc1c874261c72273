"""The HTTP layer: a threading HTTP/1.1 server with keep-alive, faults and request recording.

Every answer leaves in one write (buffered ``wfile``, Nagle off) so keep-alive clients are
not held up by delayed ACKs. Headers are read with a plain line split: ``http.server``
parses them through the ``email`` package, which costs more than the whole API call.
What :func:`refusal` refuses, so that web pages cannot drive a loopback service (see "Safe
on loopback" in ``docs/emulator.md``), is answered before anything else.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import unquote

from . import api
from . import inbox
from .call import Answer
from .call import ApiError
from .call import Request
from .faults import Faults
from .recording import RecordedRequest
from .recording import Recorder
from .recording import relative_path
from .state import Store

__all__ = ["ADMIN_PREFIX", "Backend", "EmulatorServer", "Fields", "parse_body", "refusal"]

#: Where the inbox page and the admin endpoints live (no key, no rate limit, no faults,
#: not recorded).
ADMIN_PREFIX = "/_emulator/"
_MAX_BODY = 10 * 1024 * 1024
_POLL_INTERVAL = 0.02
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_MAX_LINE = 65536
_MAX_FIELDS = 100
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
#: ``name[:port]`` or ``[ipv6][:port]``, nothing else (no user info, no path).
_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9.-]+))(?::[0-9]*)?", re.IGNORECASE)
#: ``(method, name, query, body) -> (status, JSON body)``
AdminHandler = Callable[[str, str, Mapping[str, str], Any], tuple[int, Any]]


@dataclass
class Backend:
    """What the HTTP layer serves: the state, the faults, the record and the admin API."""

    store: Store
    faults: Faults
    recorder: Recorder
    admin: AdminHandler


class Fields:
    """Request headers: case-insensitive :meth:`get`, and :meth:`items` in arrival order."""

    __slots__ = ("_items", "_map")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._map = {name.lower(): value for name, value in items}

    def get(self, name: str, default: str = "") -> str:
        """The value of a header (the last one when repeated), or ``default``."""
        return self._map.get(name.lower(), default)

    def items(self) -> list[tuple[str, str]]:
        """Every header as ``(name, value)``."""
        return list(self._items)


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    """An HTTP ``Date`` value; the same second is formatted only once."""
    return formatdate(second, usegmt=True)


def _is_local(host: str, own_host: str) -> bool:
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    name = (match[1] or match[2]).lower().rstrip(".")
    if name == "localhost" or (own_host and name == own_host.lower()):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def refusal(method: str, admin: bool, fields: Fields, own_host: str) -> ApiError | None:
    """The error to answer when the request must be refused, else ``None``.

    Every request must name a loopback address, ``localhost`` or ``own_host`` (the address
    the emulator was started on) in ``Host``. An admin write must also be JSON and come
    from no other origin than the one it is addressed to.
    """
    host = fields.get("Host")
    if not _is_local(host, own_host):
        return ApiError(
            421, "misdirected_request", "The Host header must name a loopback address."
        )
    if not admin or method in _READS:
        return None
    origin = fields.get("Origin")
    if origin and origin.lower() != f"http://{host}".lower():
        return ApiError(403, "forbidden_origin", "Admin writes from another origin are refused.")
    if fields.get("Content-Type").partition(";")[0].strip().lower() != "application/json":
        return ApiError(415, "unsupported_media_type", "Admin writes must be application/json.")
    return None


def parse_body(raw: bytes) -> tuple[Any, bool]:
    """The JSON body (``None`` when empty) and whether it parsed.

    Strict JSON only: ``NaN`` and ``Infinity`` are refused (they are not JSON, and an
    answer echoing them would not be either), and so is nesting too deep to parse.
    """
    if not raw.strip():
        return None, True
    try:
        return json.loads(raw, parse_constant=_refuse_constant), True
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MeisaEmulator/0.1"
    sys_version = ""
    # One buffered write per answer (flushed by handle_one_request), and no Nagle delay.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: EmulatorServer

    fields: Fields
    raw_requestline: bytes

    def log_message(self, format: str, *args: Any) -> None:
        """Silent (request and error logs alike): request lines could carry addresses in
        query strings."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header's value (formatted once per second)."""
        if timestamp is None:
            return _http_date(int(time.time()))
        return super().date_time_string(timestamp)

    def handle_expect_100(self) -> bool:
        """Answer ``100 Continue`` at once (the write buffer would otherwise hold it)."""
        self.send_response_only(HTTPStatus.CONTINUE)
        self.end_headers()
        self.wfile.flush()
        return True

    def _read_fields(self) -> Fields:
        """Read header lines up to the blank line that ends them.

        :raises ApiError: a line without ``:``, a line too long, or too many headers.
        """
        items: list[tuple[str, str]] = []
        while True:
            line = self.rfile.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                raise ApiError(431, "header_too_large", "Header line too long")
            if line in (b"\r\n", b"\n", b""):
                return Fields(items)
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or not name.strip():
                raise ApiError(400, "parse_error", "Malformed header line")
            items.append((name.strip(), value.strip()))
            if len(items) > _MAX_FIELDS:
                raise ApiError(431, "header_too_large", "Too many headers")

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
            self.fields = self._read_fields()
        except ApiError as error:
            self.send_error(error.status, error.detail)
            return False
        connection = self.fields.get("Connection").lower()
        http10 = self.request_version == "HTTP/1.0"
        self.close_connection = connection == "close" or (http10 and connection != "keep-alive")
        if not http10 and self.fields.get("Expect").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def _dispatch(self) -> None:
        started = time.perf_counter()
        backend = self.server.backend
        path, _, query_string = self.path.partition("?")
        admin = path.startswith(ADMIN_PREFIX)
        try:
            refused = refusal(self.command, admin, self.fields, self.server.own_host)
            if refused is not None:
                raise refused
            raw = self._read_body()
        except ApiError as error:
            self.close_connection = True
            self._respond(*error.answer())
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
            body, ok = parse_body(raw)
            if not ok:
                self._respond(*ApiError(400, "parse_error", "Malformed JSON body.").answer())
                return
            status, answer = backend.admin(self.command, name, query, body)
            self._respond(status, answer, {})
            return
        self._serve_api(backend, unquote(path), query, raw, started)

    # Every method is routed alike (the API answers 405 to those an endpoint does not take).
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _serve_api(
        self, backend: Backend, path: str, query: dict[str, str], raw: bytes, started: float
    ) -> None:
        received = backend.store.clock.time()
        key = self.fields.get("X-API-Key") or None
        body, ok = parse_body(raw)
        relative = relative_path(path)
        latency, reply = backend.faults.plan(relative, body if ok else None)
        if latency:
            self.server.stopping.wait(latency)
        if reply is None or reply.after:
            if relative == path:  # not under the API's base path
                answer: Answer = ApiError(404, "not_found", "Not found.").answer()
            else:
                request = Request(self.command, relative, query, key, body, ok)
                answer = api.handle(backend.store, request)
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
            raise ApiError(400, "parse_error", "Invalid Content-Length.") from None
        if length < 0 or length > _MAX_BODY:
            raise ApiError(413, "payload_too_large", "The body is too large.")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ApiError(400, "parse_error", "Invalid chunked body.") from None
            total += size
            if total > _MAX_BODY:
                raise ApiError(413, "payload_too_large", "The body is too large.")
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


class EmulatorServer(ThreadingHTTPServer):
    """Serves a :class:`Backend` on ``host:port`` from a background thread."""

    daemon_threads = True
    block_on_close = True
    request_queue_size = 128

    def __init__(self, backend: Backend, host: str, port: int) -> None:
        self.backend = backend
        #: The address given to listen on: a Host header may name it (see :func:`refusal`).
        self.own_host = host
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        #: Set by :meth:`stop`: ends latency waits at once.
        self.stopping = threading.Event()
        super().__init__((host, port), _Handler)
        self.port = int(self.server_address[1])
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"meisa-emulator:{self.port}",
            daemon=True,
        )
        self._thread.start()

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

    def stop(self) -> None:
        """Stop accepting, end every open connection, join every thread, close the socket.

        Open connections are shut down so that handler threads blocked on a keep-alive read
        end and can be joined.
        """
        self.shutdown()
        self.stopping.set()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self._thread.join()
