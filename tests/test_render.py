"""The book's HTML works offline: vendored JS (``mtp_lib.assets``) and a throwaway book built with it.

Fast tests check the vendoring (checksums, file selection, no-op, error messages) on synthetic
npm tarballs. The slow test builds a book with the repo's ``_config.yml``: one chapter, executed by papermill, holds a seaborn figure, an ipywidgets slider (saved widget
state) and display math. It is built strictly (``-W -n --keep-going``); then no page may load an
external URL, and headless Chromium (with name resolution off) must show the rendered slider, the
typeset math and a non-blank page.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest

import mtp_lib.assets as assets
from mtp_lib.assets import VENDOR_DIR, NpmPackage, VendorAssetsError, ensure_vendor_assets
from render_check import ChromiumMissingError, chromium_path, external_urls, ink_fraction, render_dom, screenshot

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- vendoring, on synthetic tarballs


def _npm_tarball(files: dict[str, bytes]) -> bytes:
    """A gzipped tar laid out like ``npm pack``'s: everything under ``package/``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Replace the pinned packages by one synthetic package with random contents; count fetches."""
    seed = random.SystemRandom().randrange(10**9)
    rng = random.Random(seed)
    files = {
        "dist/main.js": rng.randbytes(rng.randrange(1, 5000)),
        "dist/font.woff2": rng.randbytes(100),
        "dist/font.ttf": rng.randbytes(100),
        "dist/extra/all.js": rng.randbytes(10),
        "dist/extra/one.js": rng.randbytes(10),
        "README.md": b"readme",
    }
    tarball = _npm_tarball(files)
    pkg = NpmPackage(name="@scope/fake", version="1.2.3", integrity=_sri(tarball), folder="fake",
                     keep=("dist/main.js", "dist/*.woff2", "dist/extra/*.js"), drop=("dist/extra/all.js",))
    calls = {"https": 0, "npm": 0}

    def https(p: NpmPackage, timeout: float) -> bytes:
        calls["https"] += 1
        return state["https"]

    def npm(p: NpmPackage, timeout: float) -> bytes:
        calls["npm"] += 1
        raise FileNotFoundError("npm is not installed")

    state = {"https": tarball, "files": files, "tarball": tarball, "pkg": pkg, "calls": calls, "seed": seed}
    monkeypatch.setattr(assets, "PACKAGES", (pkg,))
    monkeypatch.setattr(assets, "_fetch_https", https)
    monkeypatch.setattr(assets, "_fetch_npm_pack", npm)
    (tmp_path / "book").mkdir()
    return state


def test_vendoring_keeps_only_selected_files_and_is_a_noop_after(fake_registry: dict, tmp_path: Path) -> None:
    book, seed, files = tmp_path / "book", fake_registry["seed"], fake_registry["files"]
    vendor = ensure_vendor_assets(book)
    assert vendor == book / VENDOR_DIR
    kept = sorted(str(p.relative_to(vendor)) for p in vendor.rglob("*") if p.is_file())
    assert kept == ["MANIFEST.json", "fake/dist/extra/one.js", "fake/dist/font.woff2", "fake/dist/main.js"], seed
    for name in ("dist/main.js", "dist/font.woff2", "dist/extra/one.js"):
        assert (vendor / "fake" / name).read_bytes() == files[name], f"{name} differs (seed {seed})"
    manifest = json.loads((vendor / "MANIFEST.json").read_text())
    assert manifest["packages"] == {"@scope/fake": {"version": "1.2.3", "integrity": fake_registry["pkg"].integrity}}

    assert fake_registry["calls"] == {"https": 1, "npm": 0}
    ensure_vendor_assets(book)  # complete: nothing fetched
    assert fake_registry["calls"] == {"https": 1, "npm": 0}
    (vendor / "fake" / "dist" / "main.js").unlink()  # incomplete: fetched again
    ensure_vendor_assets(book)
    assert fake_registry["calls"] == {"https": 2, "npm": 0}
    assert (vendor / "fake" / "dist" / "main.js").read_bytes() == files["dist/main.js"], seed
    ensure_vendor_assets(book, force=True)
    assert fake_registry["calls"] == {"https": 3, "npm": 0}


def test_vendoring_rejects_a_tampered_tarball(fake_registry: dict, tmp_path: Path) -> None:
    good = fake_registry["tarball"]
    flip = random.SystemRandom().randrange(len(good))
    fake_registry["https"] = good[:flip] + bytes([good[flip] ^ 0xFF]) + good[flip + 1:]
    with pytest.raises(VendorAssetsError) as err:
        ensure_vendor_assets(tmp_path / "book")
    message = str(err.value)
    assert "@scope/fake@1.2.3" in message and "checksum mismatch" in message, f"byte {flip}: {message}"
    assert "npm is not installed" in message and "--tarball-dir" in message, message
    assert not (tmp_path / "book" / VENDOR_DIR).exists(), "a failed fetch left a vendor folder behind"


def test_vendoring_offline_from_a_tarball_folder(fake_registry: dict, tmp_path: Path) -> None:
    fake_registry["https"] = b"not a tarball"  # the network gives garbage: the local copy must win
    folder = tmp_path / "tarballs"
    folder.mkdir()
    (folder / "scope-fake-1.2.3.tgz").write_bytes(fake_registry["tarball"])
    vendor = ensure_vendor_assets(tmp_path / "book", tarball_dir=folder)
    assert (vendor / "fake" / "dist" / "main.js").read_bytes() == fake_registry["files"]["dist/main.js"]
    assert fake_registry["calls"] == {"https": 0, "npm": 0}


def test_vendoring_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="book_root"):
        ensure_vendor_assets(tmp_path / "missing")
    with pytest.raises(ValueError, match="tarball_dir"):
        ensure_vendor_assets(tmp_path, tarball_dir=tmp_path / "missing")


def test_pinned_packages_are_exact_and_checksummed() -> None:
    for pkg in assets.PACKAGES:
        assert re.fullmatch(r"\d+\.\d+\.\d+", pkg.version), f"{pkg.name}: pin an exact version"
        algo, _, digest = pkg.integrity.partition("-")
        assert algo == "sha512" and len(base64.b64decode(digest)) == 64, f"{pkg.name}: bad integrity"
        assert pkg.url.startswith("https://registry.npmjs.org/") and pkg.url.endswith(f"-{pkg.version}.tgz")


def test_external_urls_finds_loads_not_links(tmp_path: Path) -> None:
    host = f"cdn{random.SystemRandom().randrange(10**6)}.example"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.html").write_text(
        f'<html><head><script src="https://{host}/a.js"></script><link rel="stylesheet" href="http://{host}/b.css">'
        f'<script>const U = "https://{host}/c.js";</script>'
        f'<script type="application/vnd.jupyter.widget-state+json">{{"v": "https://{host}/data"}}</script>'
        f'<style>@import "https://{host}/d.css";</style></head><body>'
        f'<a href="https://{host}/link">a link is not a load</a><img srcset="//{host}/e.png 1x, local.png 2x">'
        f'<div style="background: url(https://{host}/f.png)"></div><script src="../_static/ok.js"></script>'
        f"</body></html>"
    )
    (tmp_path / "theme.css").write_text(f"/* url(https://{host}/comment) */ a {{ background: url('http://{host}/g.png') }}")
    found = external_urls(tmp_path)
    expected = [f"sub/page.html: https://{host}/{n}" for n in ("a.js", "c.js", "d.css", "f.png")]
    expected += [f"sub/page.html: http://{host}/b.css", f"sub/page.html: //{host}/e.png", f"theme.css: http://{host}/g.png"]
    assert found == sorted(expected)


# ---------------------------------------------------------------- the throwaway book


TOC = "format: jb-book\nroot: intro\nchapters:\n  - file: chapters/demo\n"
INTRO = "# Render check\n\nA throwaway book: one chapter with a figure, a widget and math.\n"


def _demo_notebook(seed: int) -> nbformat.NotebookNode:
    """A chapter like the book's: parameters cell, markdown with display math, a figure, a slider."""
    cells = [
        nbformat.v4.new_markdown_cell("# Demo chapter\n\nThe loss of head $k$ is\n\n"
                                      "$$\\mathcal{L}_k = -\\sum_{t} \\log p_k(x_{t+k} \\mid \\boldsymbol{x}_{\\le t})$$\n"),
        nbformat.v4.new_code_cell("seed = 0\nn_points = 10", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(  # a slider driving a Stack in the browser, as mtp_lib.widgets does
            "import ipywidgets as widgets\n"
            "slider = widgets.IntSlider(value=seed % 50, min=0, max=50, description='layer')\n"
            "stack = widgets.Stack([widgets.HTML(f'<b>view {i}</b>') for i in range(51)], selected_index=seed % 50)\n"
            "widgets.jslink((slider, 'value'), (stack, 'selected_index'))\n"
            "widgets.VBox([slider, stack])"
        ),
        nbformat.v4.new_code_cell(
            "import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt\n"
            "rng = np.random.default_rng(seed)\n"
            "df = pd.DataFrame({'k': np.repeat(np.arange(1, 5), n_points), 'acc': rng.random(4 * n_points)})\n"
            "ax = sns.lineplot(data=df, x='k', y='acc')\n"
            "ax.set_title('top-1 accuracy of head k')\n"
            "plt.show()"
        ),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def _build_demo_book(root: Path, seed: int) -> Path:
    """Write, execute (papermill) and build (jupyter-book, strict) the demo book; return its HTML dir."""
    src = root / "src"
    (src / "chapters").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", src / "_config.yml")
    (src / "_toc.yml").write_text(TOC)
    (src / "intro.md").write_text(INTRO)
    try:
        vendor = ensure_vendor_assets(REPO)  # cached in the repo (git-ignored), fetched once
    except VendorAssetsError as err:
        pytest.fail(f"vendored JS unavailable: {err}")
    shutil.copytree(vendor, src / VENDOR_DIR)

    import papermill

    raw = root / "demo_raw.ipynb"
    nbformat.write(_demo_notebook(seed), raw)
    papermill.execute_notebook(str(raw), str(src / "chapters" / "demo.ipynb"), parameters={"seed": seed},
                               progress_bar=False, cwd=str(src / "chapters"), kernel_name="python3")
    nb = nbformat.read(src / "chapters" / "demo.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected, "papermill injected no parameters cell"
    for cell in injected:  # as the book runner does
        cell.metadata["tags"].append("remove-cell")
    assert "widgets" in nb.metadata and nb.metadata["widgets"], "papermill saved no widget state"
    nbformat.write(nb, src / "chapters" / "demo.ipynb")

    jb = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())"]
    proc = subprocess.run([*jb, "build", str(src), "--path-output", str(root / "out"), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"strict build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    html = root / "out" / "_build" / "html"
    assert (html / "chapters" / "demo.html").is_file(), sorted(p.name for p in html.iterdir())
    return html


@pytest.mark.slow
def test_book_html_renders_offline(tmp_path: Path) -> None:
    try:
        chromium_path()
    except ChromiumMissingError as err:
        pytest.fail(str(err))
    seed = random.SystemRandom().randrange(10**5, 10**6)
    html = _build_demo_book(tmp_path, seed)
    page = html / "chapters" / "demo.html"
    source = page.read_text()

    # The page asks for the vendored scripts, the injected parameters cell is gone.
    assert "_static/requirejs/require.js" in source and "embed-amd.js" in source, "widget JS not on the page"
    assert "mathjax/es5/tex-mml-chtml.js" in source, "vendored MathJax not on the page"
    visible = re.sub(r"<script.*?</script>", "", source, flags=re.DOTALL)
    assert str(seed) not in visible, f"papermill's injected cell (seed = {seed}) is on the page"

    figures = re.findall(r'<img[^>]* src="(\.\./_images/[^"]+\.png)"', source)
    assert len(figures) == 1, f"expected the seaborn figure as one local PNG, found {figures}"
    assert ink_fraction(page.parent / figures[0]) > 0.02, "the figure PNG is blank"

    urls = external_urls(html)
    assert not urls, "pages load external URLs:\n" + "\n".join(urls)

    dom = render_dom(page)
    assert "widget-slider" in dom and "jupyter-widgets" in dom, f"the slider did not render (seed {seed})"
    readout = re.findall(r'class="widget-readout"[^>]*>(\d+)<', dom)
    assert readout == [str(seed % 50)], f"slider readout {readout}, expected {seed % 50} (seed {seed})"
    shown = re.findall(r'widget-html-content">(<b>view \d+</b>)', dom)
    assert shown == [f"<b>view {seed % 50}</b>"], f"the Stack shows {shown}, not view {seed % 50} (seed {seed})"
    assert dom.count("<mjx-container") >= 2 and 'display="true"' in dom, "MathJax did not typeset the math"
    assert "<mjx-merror" not in dom and "\\mathcal" not in dom, "MathJax left an error or raw TeX"

    png = screenshot(page, tmp_path / "demo.png", window=(1280, 1600))
    keep = REPO / "_build" / "render_check"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, keep / "demo.png")  # for a human look; _build/ is git-ignored
    ink = ink_fraction(png)
    assert ink > 0.03, f"screenshot looks blank: {ink:.1%} of pixels differ from the background"
