"""Check built book pages the way an offline reader sees them: no external URLs, rendered headlessly.

Reusable by any test that builds HTML (the throwaway book of ``test_render.py``, the real book):

- :func:`external_urls`: every http(s) URL that a page or style sheet would *load* (script, link,
  img, iframe, source... ``src``/``href``/``srcset``/``data``, CSS ``url()``/``@import``, any URL
  inside inline JavaScript). Navigation links (``<a href>``) are not loads and are ignored, and so is
  data such as saved widget state (``<script type="application/...json">``).
- :func:`render_dom`: the DOM after scripts ran, from Debian ``chromium --headless --dump-dom``.
- :func:`screenshot`: a PNG of the page; :func:`ink_fraction` says how much of it is not background.

Chromium runs with host name resolution switched off (``--host-resolver-rules``), so a page that
still needs the network renders as it would offline, whatever this machine can reach.
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "ChromiumMissingError",
    "chromium_path",
    "external_urls",
    "ink_fraction",
    "render_dom",
    "screenshot",
]

INSTALL_HINT = "`make test` installs it (`apt-get install -y chromium`)"

# Tag -> attributes whose URL the browser fetches when the page loads.
_LOADING_ATTRS: dict[str, tuple[str, ...]] = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
    "image": ("href", "xlink:href"),  # SVG
    "use": ("href", "xlink:href"),  # SVG
}
_EXTERNAL = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)
_JS_URL = re.compile(r"""https?://[^\s'"`<>()]+""", re.IGNORECASE)
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:https?:)?//[^'")\s]+)""", re.IGNORECASE)


class ChromiumMissingError(RuntimeError):
    """Debian's ``chromium`` is not installed."""


class _LoadCollector(html.parser.HTMLParser):
    """Collects external URLs from loading attributes and inline ``style`` of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in_style = False
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = _LOADING_ATTRS.get(tag, ())
        for name, value in attrs:
            if value is None:
                continue
            if name in wanted:
                candidates = [p.strip().split()[0] for p in value.split(",") if p.strip()] if name == "srcset" else [value]
                self.urls += [v.strip() for v in candidates if _EXTERNAL.match(v)]
            elif name == "style":
                self.urls += _CSS_URL.findall(value)
        self._in_style = tag == "style"
        kind = dict(attrs).get("type") or "text/javascript"
        self._in_script = tag == "script" and ("javascript" in kind or kind == "module")

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += _CSS_URL.findall(data)
        elif self._in_script:  # inline JavaScript that names a URL is about to load it
            self.urls += _JS_URL.findall(data)


def external_urls(html_dir: Path) -> list[str]:
    """Every http(s) or protocol-relative URL that a page under ``html_dir`` would load.

    Scans all ``*.html`` (loading attributes of script/link/img/iframe/source/... tags, inline
    styles, inline JavaScript) and all ``*.css`` (``url()`` and ``@import``). Returns sorted ``"<file>: <url>"``
    strings, with file paths relative to ``html_dir``; empty when the pages are self-contained.
    """
    html_dir = Path(html_dir)
    if not html_dir.is_dir():
        raise ValueError(f"html_dir: {html_dir} is not a folder; pass the built HTML folder")
    found: set[str] = set()
    for page in html_dir.rglob("*.html"):
        collector = _LoadCollector()
        collector.feed(page.read_text(encoding="utf-8", errors="replace"))
        found.update(f"{page.relative_to(html_dir)}: {url}" for url in collector.urls)
    for sheet in html_dir.rglob("*.css"):
        text = re.sub(r"/\*.*?\*/", "", sheet.read_text(encoding="utf-8", errors="replace"), flags=re.DOTALL)
        found.update(f"{sheet.relative_to(html_dir)}: {url}" for url in _CSS_URL.findall(text))
    return sorted(found)


def chromium_path() -> str:
    """The ``chromium`` executable; :class:`ChromiumMissingError` saying how to install it if absent."""
    path = shutil.which("chromium")
    if path is None:
        raise ChromiumMissingError(f"Debian `chromium` is not installed: {INSTALL_HINT}")
    return path


def _run_chromium(html_file: Path, args: list[str], *, window: tuple[int, int], budget_ms: int,
                  timeout_s: float) -> subprocess.CompletedProcess[str]:
    html_file = Path(html_file).resolve()
    if not html_file.is_file():
        raise ValueError(f"html_file: {html_file} does not exist; pass a built .html page")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing resolves: the page is offline
            f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={budget_ms}", *args, html_file.as_uri(),
        ]
        env = {**os.environ, "HOME": profile}  # keep chromium's crash/cache files out of $HOME
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def render_dom(html_file: Path, *, budget_ms: int = 8000, timeout_s: float = 60.0) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``), in headless Chromium over file://.

    ``budget_ms`` is Chromium's virtual time budget: how long the page's timers may run.
    """
    proc = _run_chromium(Path(html_file), ["--dump-dom"], window=(1280, 900), budget_ms=budget_ms,
                         timeout_s=timeout_s)
    return proc.stdout


def screenshot(html_file: Path, png: Path, *, window: tuple[int, int] = (1280, 900),
               budget_ms: int = 8000, timeout_s: float = 60.0) -> Path:
    """Save a PNG of the page's first ``window`` pixels (width, height) as rendered headlessly."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    _run_chromium(Path(html_file), [f"--screenshot={png}"], window=window, budget_ms=budget_ms,
                  timeout_s=timeout_s)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png.name}")
    return png


def ink_fraction(png: Path) -> float:
    """Fraction of pixels whose colour differs from the image's most common (background) colour."""
    from PIL import Image  # Pillow comes with matplotlib

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        counts = rgb.getcolors(maxcolors=rgb.width * rgb.height)
    assert counts is not None
    background = max(counts)[0]
    return 1.0 - background / (rgb.width * rgb.height)
