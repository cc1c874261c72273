"""``docs/emulator.md`` names only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "emulator.md"
TOP = "|".join(("docs", "tests", "flask_meisa", "benchmarks", "example_app", "scripts"))


def test_every_file_the_emulator_docs_name_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    paths = re.findall(rf"(?<![\w./-])((?:{TOP})/[\w./-]*\w)", text)
    quoted = re.findall(r"`([\w./-]+\.(?:md|py|json|png|html))`", text)
    linked = [link for link in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in link]
    named = {ROOT / p for p in paths + quoted} | {DOC.parent / link for link in linked}
    assert ROOT / "tests" / "conftest.py" in named
    assert DOC.parent / "screenshots" / "emulator-inbox.png" in named
    missing = sorted(str(p.relative_to(ROOT)) for p in named if not p.exists())
    assert missing == []
