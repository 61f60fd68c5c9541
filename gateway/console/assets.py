"""The console's static files: read once at start-up in a thread (never per request, never on
the loop), served from the package (no build step, no CDN)."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"console.js": "application/javascript", "console.css": "text/css"}  # name -> content type


class ConsoleAssets:
    def __init__(self) -> None:
        self.files = {name: (STATIC_DIR / name).read_bytes() for name in ASSETS}
        self.page = (STATIC_DIR / "console.html").read_text(encoding="utf-8")
        self.login = (STATIC_DIR / "login.html").read_text(encoding="utf-8")
