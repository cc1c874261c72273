"""Fast request header parsing and a per-second ``Date`` cache for the HTTP layer.

``http.server`` parses headers through the ``email`` package, which costs more than the
whole API call; a plain line split is all a JSON API needs.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Protocol

__all__ = ["Fields", "FieldsError", "http_date", "read_fields"]

_MAX_LINE = 65536
_MAX_FIELDS = 100


class FieldsError(Exception):
    """The header block is malformed or too large: answer ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


class _Readable(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def read_fields(rfile: _Readable) -> Fields:
    """Read header lines up to the blank line that ends them.

    :raises FieldsError: a line without ``:``, a line too long, or too many headers.
    """
    items: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise FieldsError(431, "Header line too long")
        if line in (b"\r\n", b"\n", b""):
            return Fields(items)
        name, colon, value = line.decode("iso-8859-1").partition(":")
        if not colon or not name.strip():
            raise FieldsError(400, "Malformed header line")
        items.append((name.strip(), value.strip()))
        if len(items) > _MAX_FIELDS:
            raise FieldsError(431, "Too many headers")


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The current time as an HTTP ``Date`` value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] != now:
        cached = _date_cache = (now, formatdate(now, usegmt=True))
    return cached[1]
