"""One API call as the endpoints see it: the parsed request and its context."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from .model import ApiKey
    from .state import EnvState
    from .state import Store

__all__ = ["Call", "Request"]


@dataclass
class Request:
    """An API request: method, path relative to the base path, query, key and JSON body."""

    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None
    #: The parsed JSON body (``None`` when empty or malformed).
    body: Any = None
    #: Whether the body parsed as JSON.
    body_ok: bool = True


@dataclass
class Call:
    """An authenticated call routed to an endpoint."""

    store: Store
    env: EnvState
    key: ApiKey
    request: Request
    #: The JSON object body of a POST (empty for a GET).
    body: Mapping[str, Any]
    #: The ``{id}`` of ``/contacts/{id}/...`` paths.
    contact_id: str = ""

    @property
    def query(self) -> Mapping[str, str]:
        """The query parameters (first value of each)."""
        return self.request.query
