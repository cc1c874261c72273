"""Helpers for testing an app that uses flask-meisa: :func:`record_operations` (what
would be delivered) and, with ``pytest_plugins = ["flask_meisa.testing"]``, the
``meisa_emulator`` and ``meisa_config`` fixtures (deliver to the embedded emulator)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

from flask import Flask
from flask import current_app

from .signals import operation_queued

if TYPE_CHECKING:
    from .emulator import Emulator
    from .operations import Operation

__all__ = ["emulator_config", "record_operations"]


@contextmanager
def record_operations(app: Flask | None = None) -> Iterator[list[Operation]]:
    """Collect a copy of every operation ``app`` (default: the current app) hands to
    delivery, or would hand while delivery is suppressed, while the block runs (a
    request's once it is released). Recording does not suppress delivery."""
    # Signals name their sender by identity: current_app's, not its proxy's (which none has).
    proxied = app is None or app is current_app
    target = cast(Any, current_app)._get_current_object() if proxied else app
    recorded: list[Operation] = []

    def receiver(sender: Flask, operation: Operation, **extra: Any) -> None:
        recorded.append(copy.deepcopy(operation))

    with operation_queued.connected_to(receiver, sender=target):
        yield recorded


def emulator_config(emulator: Emulator, **overrides: Any) -> dict[str, Any]:
    """Config keys that point an app at ``emulator`` and deliver for real, inline
    (``MEISA_DELIVERY = "sync"``: each call is made before the next line runs)."""
    return {
        "MEISA_API_KEY": emulator.live_key,
        "MEISA_BASE_URL": emulator.url,
        "MEISA_SUPPRESS_SEND": False,
        "MEISA_DELIVERY": "sync",
        "MEISA_RATE_LIMIT": None,
        **overrides,
    }


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
else:

    @pytest.fixture
    def meisa_emulator() -> Iterator[Emulator]:
        """A fresh embedded Meisa emulator (demo seed, no rate limit), stopped after."""
        from .emulator import Emulator

        with Emulator(seed="demo", rate_limit=None) as emulator:
            yield emulator

    @pytest.fixture
    def meisa_config(meisa_emulator: Emulator) -> dict[str, Any]:
        """Config keys pointing an app at ``meisa_emulator`` (see :func:`emulator_config`)."""
        return emulator_config(meisa_emulator)
