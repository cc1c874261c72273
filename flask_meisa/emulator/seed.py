"""Loading the seed: the product, keys, triggers, sequences and suppressions to start from.

A seed is ``"demo"`` (the packaged ``seed.json``), a path to a JSON file, a dict of the same
shape, or ``None`` (an empty product with a sender, and generated keys). See
``docs/emulator.md`` for the format.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any
from typing import Union
from typing import cast

__all__ = ["SeedSource", "load_seed"]

#: What ``Emulator(seed=...)`` accepts.
SeedSource = Union[str, "os.PathLike[str]", Mapping[str, Any], None]

_TOP_LEVEL = frozenset(
    {"product", "keys", "triggers", "sequences", "suppressions", "contacts", "send_guardrail"}
)


def load_seed(source: SeedSource) -> dict[str, Any]:
    """Read a seed into a fresh dict (the caller may keep and mutate it).

    :raises ValueError: the seed is not a JSON object or has unknown top-level keys.
    :raises OSError: the seed file cannot be read.
    """
    if source is None:
        data: Any = {}
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    elif source == "demo":
        text = resources.files(__package__).joinpath("seed.json").read_text("utf-8")
        data = json.loads(text)
    else:
        with open(os.fspath(source), encoding="utf-8") as handle:
            data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError("a seed must be a JSON object")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ValueError(f"unknown seed keys: {', '.join(sorted(unknown))}")
    return cast("dict[str, Any]", data)
