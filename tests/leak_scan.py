"""Finding API keys in text: what counts as a leak, masking, and the texts of objects and
errors (for the secrets guard, ``tests/secrets_guard.py``)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field

__all__ = ["MIN_KEY_LENGTH", "WINDOW", "Secret", "error_texts", "find_leaks", "mask", "reachable"]

#: Keys shorter than this are toy values in tests, not secrets.
MIN_KEY_LENGTH = 16
#: Consecutive characters of a key's secret part that count as a leak.
WINDOW = 12
_PREFIX = re.compile(r"^meisa_(?:live|test)_")


@dataclass(frozen=True)
class Secret:
    """A key and the fragments of it whose presence in a text means it leaked."""

    key: str = field(repr=False)
    windows: frozenset[str] = field(repr=False)
    #: The key's last 5 to 11 characters standing alone (not inside a longer word, such
    #: as a random hex id that happens to hold them), or ``None``.
    tails: re.Pattern[str] | None = field(repr=False)

    @classmethod
    def of(cls, key: str) -> Secret:
        """The secret for ``key``."""
        body = _PREFIX.sub("", key)
        windows = frozenset(body[i : i + WINDOW] for i in range(len(body) - WINDOW + 1))
        # A low-entropy tail ("_0000") would match unrelated text.
        suffixes = [key[-n:] for n in range(WINDOW - 1, 4, -1) if len(set(key[-5:])) >= 3]
        tails = None
        if len(body) >= 9 and suffixes:
            alternatives = "|".join(re.escape(suffix) for suffix in suffixes)
            tails = re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")
        return cls(key, windows, tails)

    def leaks_in(self, text: str) -> bool:
        """Whether ``text`` shows this key, a cut-off piece of it, or more than its last
        four characters."""
        if self.key in text:
            return True
        if self.tails is not None and self.tails.search(text):
            return True
        return any(window in text for window in self.windows)


def mask(text: str, secrets: Iterable[Secret]) -> str:
    """``text`` with every key, piece of a key and key tail replaced by ``[KEY]``."""
    for secret in sorted(secrets, key=lambda s: -len(s.key)):
        text = text.replace(secret.key, "[KEY]")
        for piece in sorted(secret.windows, key=len, reverse=True):
            text = text.replace(piece, "[KEY]")
        if secret.tails is not None:
            text = secret.tails.sub("[KEY]", text)
    return text


def find_leaks(texts: Iterable[tuple[str, str]], secrets: Iterable[Secret]) -> list[str]:
    """For each ``(source, text)`` that shows a secret, a line naming the source with an
    excerpt of the text, every key masked."""
    secrets = list(secrets)
    found = []
    for source, text in texts:
        for secret in secrets:
            if secret.leaks_in(text):
                found.append(f"{source}: {_excerpt(mask(text, secrets))}")
                break
    return found


def _excerpt(text: str, limit: int = 300) -> str:
    at = text.find("[KEY]")
    start = max(0, at - limit // 2)
    piece = text[start : start + limit]
    return ("…" if start else "") + piece + ("…" if start + limit < len(text) else "")


def _ours(obj: object) -> bool:
    module = type(obj).__module__
    return module.startswith("flask_meisa") and not module.startswith("flask_meisa.emulator")


def reachable(roots: Iterable[object], limit: int = 400) -> list[object]:
    """flask-meisa objects reachable from ``roots`` through attributes and small
    containers (at most ``limit``)."""
    found: list[object] = []
    seen: set[int] = set()
    pending = list(roots)
    while pending and len(found) < limit:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            if len(obj) <= 50:
                pending.extend(obj.values())
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            if len(obj) <= 50:
                pending.extend(obj)
            continue
        if not _ours(obj) or isinstance(obj, BaseException):
            continue
        found.append(obj)
        pending.extend(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                with contextlib.suppress(AttributeError):
                    pending.append(getattr(obj, slot))
    return found


def error_texts(error: BaseException) -> Iterator[tuple[str, str]]:
    """The texts of an error, its causes and contexts, and any request they hold."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending and len(seen) < 16:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        name = type(current).__name__
        yield f"{name} text", f"{current!s}\n{current!r}\n{current.args!r}"
        yield f"{name} attributes", repr(vars(current))
        for holder in (current, getattr(current, "response", None)):
            request = getattr(holder, "request", None)
            headers = getattr(request, "headers", None)
            if headers is not None:
                yield f"{name} request headers", repr(dict(headers))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
