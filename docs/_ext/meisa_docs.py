"""Sphinx extension for flask-meisa's site: pages made from the code, and checks that the
pages say what the code has.

- ``meisa-config-keys``: every ``MEISA_*`` key, from the one table ``flask_meisa.config.KEYS``.
- The API reference must document every name of ``flask_meisa.__all__``,
  ``flask_meisa.testing.__all__`` and ``flask_meisa.emulator.Emulator``.
- The testing page must name every logger the package logs to and every operation kind.
"""

from __future__ import annotations

import ast
import importlib
import typing
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import flask_meisa
from flask_meisa import config
from flask_meisa import testing

logger = logging.getLogger(__name__)

PACKAGE = Path(flask_meisa.__file__).parent
TESTING_PAGE = "testing"


class ConfigKeys(SphinxDirective):
    """Every configuration key as a ``confval`` entry: type, default and meaning, in the
    words of the README's table and the config template (Markdown pages only)."""

    def run(self) -> list[nodes.Node]:
        lines: list[str] = []
        for key in config.KEYS:
            meaning = f"{key.meaning[0].upper()}{key.meaning[1:]}."
            lines += [
                f":::{{confval}} {key.name}",
                f":type: {key.type}",
                f":default: {config._default_text(key)}",
                "",
                f"{meaning} {key.notes}".strip(),
                ":::",
                "",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines), 0, container)
        return container.children


def logger_names() -> set[str]:
    """The names of the loggers the package gets (``getLogger("...")`` or ``__name__``)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and _name(node.func) == "getLogger"):
                continue
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                names.add(argument.value)
            elif isinstance(argument, ast.Name) and argument.id == "__name__":
                names.add(module)
    return names


def _name(function: ast.expr) -> str | None:
    if isinstance(function, ast.Attribute):
        return function.attr
    return function.id if isinstance(function, ast.Name) else None


def operation_kinds() -> tuple[str, ...]:
    """The kinds an :class:`~flask_meisa.Operation` can have."""
    return typing.get_args(typing.get_type_hints(flask_meisa.Operation)["kind"])


def check_testing_page(app: Sphinx, docname: str, source: list[str]) -> None:
    """Warn when the testing page misses a logger name or an operation kind."""
    if docname != TESTING_PAGE:
        return
    text = source[0]
    for name in sorted(logger_names()):
        if f"`{name}`" not in text:
            logger.warning("the testing page does not name the logger `%s`", name)
    for kind in operation_kinds():
        if f'`"{kind}"`' not in text:
            logger.warning('the testing page does not name the operation kind `"%s"`', kind)


def public_objects() -> dict[str, Any]:
    """Every public name the API reference must document, and its object."""
    objects = {f"flask_meisa.{name}": getattr(flask_meisa, name) for name in flask_meisa.__all__}
    objects.update(
        {f"flask_meisa.testing.{name}": getattr(testing, name) for name in testing.__all__}
    )
    emulator = importlib.import_module("flask_meisa.emulator")
    objects["flask_meisa.emulator.Emulator"] = emulator.Emulator
    return objects


def _documented_as(fullname: str, obj: Any, documented: set[str]) -> bool:
    """Whether ``obj`` is documented, under ``fullname`` or wherever it lives."""
    if fullname in documented:
        return True
    name = fullname.rpartition(".")[2]
    for other in documented:
        module, _, attribute = other.rpartition(".")
        if attribute != name:
            continue
        try:
            if getattr(importlib.import_module(module), attribute, None) is obj:
                return True
        except ImportError:
            continue
    return False


def check_api_reference(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn about each public name the API reference does not document."""
    domain: Any = env.get_domain("py")
    documented = set(domain.objects)
    for fullname, obj in public_objects().items():
        if not _documented_as(fullname, obj, documented):
            logger.warning("the API reference does not document %s", fullname)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("meisa-config-keys", ConfigKeys)
    app.connect("source-read", check_testing_page)
    app.connect("env-check-consistency", check_api_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
