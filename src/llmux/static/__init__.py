"""The status page served at ``GET /``: one static file, ``index.html``, read once per app."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks)
    return " ".join(f"'sha256-{d}'" for d in digests)


def status_page() -> tuple[str, dict[str, str]]:
    """The page and its headers. The Content-Security-Policy allows only the page's own inline
    script and style (by hash) and requests to this origin, so even a model-provided string that
    slipped into the DOM as markup could not run or load anything."""
    html = resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")
    csp = (
        "default-src 'none'; "
        f"script-src {_hashes(html, 'script')}; "
        f"style-src {_hashes(html, 'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    headers = {
        "content-security-policy": csp,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-cache",
    }
    return html, headers
