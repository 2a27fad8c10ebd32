"""The Bible modules' text: OSIS markup to plain text, and the clean-up each translation needs.

Used by ``scripts/build_data.py``; the rules are documented in ``data/README.md``.
"""

from __future__ import annotations

import collections
import functools
import html
import re
import unicodedata
from pathlib import Path

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


def strip_osis(osis: str, *, enclitics: bool = True) -> str:
    """Plain text of one verse of OSIS markup, never gluing two words together.

    Footnotes, cross references and speaker labels are dropped with their content; canonical titles
    (psalm superscriptions, which RV1909 also has in verse 1) are kept, other titles dropped; anything
    after the end-of-book marker (WEB appends its glossary to Rev 22:21) is dropped; word wrappers
    (``<w>``, ``<q>``...) are removed. Every other element (milestones, line and paragraph markers,
    ``<transChange>`` around added words) is a word boundary: it becomes a space unless whitespace or
    punctuation already separates the neighbours. pysword's ``clean=True`` deletes them instead, which
    glues words ("Godcreated"). ``enclitics``: glue RV1909's added enclitic pronouns to their verb
    (:func:`_glue_enclitics`); off for English, where an added "me" or "her" is a word of its own.
    """
    text = _BOOK_END.sub("", osis)
    text = _glue_enclitics(text) if enclitics else text
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
# Clean-up per translation: Spanish drop capitals and colophons, WEB's quotation marks, KJV's pilcrows

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


def strip_pilcrows(verses: dict[str, str]) -> int:
    """The KJV marks paragraph starts with a pilcrow (¶ These are the generations...), kept by our
    markup stripping as by pysword's ``clean=True``: drop it. Returns how many verses had one."""
    changed = 0
    for ref, text in verses.items():
        if "¶" in text:
            verses[ref] = normalize_space(text.replace("¶", " "))
            changed += 1
    return changed


# --------------------------------------------------------------------------------------------------
# Checks on the cleaned text

WORD = re.compile(r"\w+")
GLUED = re.compile(r"\w*[a-záéíóúñ][A-ZÁÉÍÓÚÑ]\w*")


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
        a, b = WORD.findall(clean[ref]), WORD.findall(spaced)
        if len(a) < len(b):
            short += 1
            new_words.update(set(a) - set(b))
    return short, new_words
