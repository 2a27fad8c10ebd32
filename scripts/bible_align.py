"""Pairing a Spanish and an English Bible verse by verse where their versifications agree, and the
train/validation split by chapter. Used by ``scripts/build_data.py`` (rules in ``data/README.md``)."""

from __future__ import annotations

import collections
import hashlib
import math

from bible_text import WORD

VALIDATION_PERCENT = 5  # chapters whose stable hash falls below this percentage go to validation
MAX_OFFSET, SWITCH_COST = 2, 1.0
MAX_LENGTH_RATIO = 1.8  # es/en character-length ratio, relative to the corpus median, either way
MIN_LENGTH_GAP = 20  # ... and differ by at least this many characters (short verses vary a lot)
NEIGHBOUR_MARGIN = 0.3  # drop a verse when a neighbouring English verse fits better by this much


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


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
