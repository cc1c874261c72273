"""Sphinx configuration of flask-meisa's documentation site (built by scripts/docs)."""

from __future__ import annotations

import sys
from importlib.metadata import version as installed_version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "flask-meisa"
author = "flask-meisa contributors"
copyright = "flask-meisa contributors"
release = installed_version("flask-meisa")
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "myst_parser", "meisa_docs"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]

# Every reference to flask-meisa's own names must resolve; names of other projects are
# not linked (the build needs no network, so no intersphinx inventories).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!flask_meisa\b).*"),
    (r"py:class", r"flask_meisa\..*\.[A-Z]"),  # type variables (F in a decorator's signature)
]

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"flask-meisa {release}"
html_static_path: list[str] = []
