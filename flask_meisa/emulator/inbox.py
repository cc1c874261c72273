"""The inbox at ``/_emulator/``: one HTML page (``inbox.html``) showing what the emulator
received.

Contacts, events, emails and calls, newest first, filterable by address. The page's script
polls the admin JSON endpoints and builds the page with ``textContent`` only, so no value
it shows is ever parsed as HTML; its Content Security Policy allows that one script and
style, and connections to its own origin only.
"""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

__all__ = ["HEADERS", "PAGE"]

#: The page, UTF-8.
PAGE = resources.files(__package__).joinpath("inbox.html").read_bytes()


def _inline(tag: str) -> str:
    """The text of the page's one ``<tag>`` element."""
    return PAGE.decode().partition(f"<{tag}>")[2].partition(f"</{tag}>")[0]


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: The page's response headers.
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_digest(_inline('script'))}; "
        f"style-src {_digest(_inline('style'))}; img-src data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
