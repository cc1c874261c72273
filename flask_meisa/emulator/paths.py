"""Path patterns: ``"/ping/"``, ``"/api/v1/ping/"`` or a glob like ``"/contacts/*/add_tag/"``."""

from __future__ import annotations

from fnmatch import fnmatchcase

__all__ = ["BASE_PATH", "path_matches", "relative_path"]

#: Where the API lives.
BASE_PATH = "/api/v1"


def relative_path(path: str) -> str:
    """``path`` without the ``/api/v1`` prefix (unchanged when it has none)."""
    if path.startswith(BASE_PATH + "/"):
        return path[len(BASE_PATH) :]
    return path


def path_matches(pattern: str, path: str) -> bool:
    """Whether ``path`` is ``pattern`` (globs allowed); both may carry ``/api/v1`` or not."""
    pattern, path = relative_path(pattern), relative_path(path)
    if any(ch in pattern for ch in "*?["):
        return fnmatchcase(path, pattern)
    return path == pattern
