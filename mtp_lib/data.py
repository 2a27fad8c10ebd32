"""The two evaluation tasks: translation pairs and open-ended texts, the prompt, the evaluated positions.

Offline data (committed under ``data/``, rebuilt by ``scripts/build_data.py``):

- ``bible-es-en``: Spanish -> English Bible verse pairs (Reina-Valera 1909 / World English Bible,
  both public domain), standing in for the paper's IWSLT 2017 de->en. Readers with network can
  pass ``dataset="iwslt2017-de-en"`` to use the paper's data through Hugging Face ``datasets``.
  The train split has a second English reference, the King James Version (``references=("web",
  "kjv")``: two pairs per Spanish verse, about 58k pairs instead of 29k); validation is WEB only.
- Brown Corpus passages of 150-170 words (about 200 tokens), standing in for the paper's unreleased
  GPT-4o texts.

A :class:`Sample` is one tokenized sequence with the index where its target starts;
:func:`evaluation_targets` and :func:`context_ends` say which positions the analyses score.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LANGUAGE_NAMES",
    "PAPER_TEMPLATE",
    "BIBLE_REFERENCES",
    "TRANSLATION_DATASETS",
    "Pair",
    "Sample",
    "Text",
    "context_ends",
    "data_dir",
    "evaluation_targets",
    "load_open_ended",
    "load_translation",
    "open_ended_samples",
    "pairs_from_records",
    "translation_prompt",
    "translation_samples",
]

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "de": "German", "en": "English", "es": "Spanish", "fr": "French", "it": "Italian",
    "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "zh": "Chinese",
}
PAPER_TEMPLATE = ("Translate the following {source_language} sentence to {target_language}: {source}\n---\n"
                  "Translated: {target}")
TRANSLATION_DATASETS: tuple[str, ...] = ("bible-es-en", "iwslt2017-de-en")
BIBLE_REFERENCES: dict[str, str] = {"web": "World English Bible (derived)", "kjv": "King James Version"}
"""The English references of ``bible-es-en``: the WEB (train and validation), the KJV (train only)."""

_LANGUAGES = {"bible-es-en": ("es", "en"), "iwslt2017-de-en": ("de", "en")}
_SPLITS = {"bible-es-en": ("train", "validation"), "iwslt2017-de-en": ("train", "validation", "test")}
_OPEN_ENDED_FILE = Path("open_ended") / "brown-passages.jsonl.gz"
# datasets >= 4 no longer runs the hub's iwslt2017.py loading script; the hub's Parquet export of it:
_IWSLT_PARQUET = "hf://datasets/IWSLT/iwslt2017@refs%2Fconvert%2Fparquet/iwslt2017-de-en/{split}/*.parquet"
_BUILD_HINT = "run `python scripts/build_data.py` from the repository root (or point $MTP_DATA_DIR at a data folder)"


def data_dir() -> Path:
    """``$MTP_DATA_DIR`` if set, else the repository's ``data/`` folder next to the package."""
    env = os.environ.get("MTP_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One translation pair: ``source`` in ``source_lang`` translates to ``target`` in ``target_lang``."""

    id: str
    source: str
    target: str
    source_lang: str
    target_lang: str


@dataclasses.dataclass(frozen=True)
class Text:
    """One open-ended reference text; ``source`` says where it comes from, ``genre`` its kind."""

    id: str
    text: str
    source: str
    genre: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One tokenized sequence to evaluate.

    ``input_ids`` is the whole sample (BOS included if the tokenizer adds one); ``target_start`` is
    the index of the first token of the target: the translated sentence, or for open-ended text the
    first token after BOS (the whole text is the target). ``text`` is the text the ids encode.
    """

    id: str
    task: str  # "translation" | "open-ended"
    input_ids: list[int]
    target_start: int
    text: str


# --------------------------------------------------------------------------------------------------
# Loading


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} is missing: {_BUILD_HINT}.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pairs_from_records(records: Iterable[Mapping[str, Any]], source_lang: str, target_lang: str,
                       *, id_prefix: str = "") -> list[Pair]:
    """Pairs from IWSLT-shaped records ``{"translation": {lang: text, ...}, "id"?: ...}``.

    Works on a list of dicts or a ``datasets.Dataset``. A record without ``id`` gets
    ``f"{id_prefix}{index}"``. Whitespace is normalised; records with an empty side are skipped.
    """
    pairs = []
    for index, record in enumerate(records):
        translation = record["translation"]
        for lang in (source_lang, target_lang):
            if lang not in translation:
                raise ValueError(f"record {index} has no {lang!r} text (it has {sorted(translation)}); "
                                 "pass source_lang/target_lang among those")
        source = " ".join(str(translation[source_lang]).split())
        target = " ".join(str(translation[target_lang]).split())
        if source and target:
            pairs.append(Pair(str(record.get("id") or f"{id_prefix}{index}"), source, target,
                              source_lang, target_lang))
    return pairs


def _load_iwslt(split: str) -> Any:
    """IWSLT 2017 de-en from the Hugging Face hub (needs network and the ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError("dataset='iwslt2017-de-en' needs the `datasets` package "
                                  "(`pip install datasets`); offline, use dataset='bible-es-en'") from None
    try:
        try:
            return datasets.load_dataset("IWSLT/iwslt2017", "iwslt2017-de-en", split=split)
        except RuntimeError as err:
            if "scripts are no longer supported" not in str(err):
                raise
            return datasets.load_dataset("parquet", data_files={split: _IWSLT_PARQUET.format(split=split)},
                                         split=split)
    except ConnectionError as err:
        raise ConnectionError(f"IWSLT 2017 needs the Hugging Face hub, which is not reachable ({err}); "
                              "offline, use dataset='bible-es-en'") from err


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {list(valid)}")


def _check_references(references: Sequence[str], split: str, dataset: str) -> tuple[str, ...]:
    refs = (references,) if isinstance(references, str) else tuple(references)
    if dataset != "bible-es-en" and refs != ("web",):
        raise ValueError(f"references={refs} applies to dataset='bible-es-en' only; leave it at ('web',)")
    if not refs or len(set(refs)) != len(refs) or not set(refs) <= set(BIBLE_REFERENCES):
        raise ValueError(f"references={refs} must be distinct names among {list(BIBLE_REFERENCES)}, "
                         "e.g. ('web',) or ('web', 'kjv')")
    if split != "train" and refs != ("web",):
        raise ValueError(f"references={refs}: the KJV has training pairs only (the validation chapters are "
                         f"held out of both references); use references=('web',) for split={split!r}")
    return refs


def load_translation(split: str = "validation", dataset: str = "bible-es-en", *,
                     references: Sequence[str] = ("web",)) -> list[Pair]:
    """The translation pairs of ``dataset`` (one of :data:`TRANSLATION_DATASETS`), in file order.

    ``"bible-es-en"`` (splits train, validation) reads the committed files, Spanish -> English;
    ``"iwslt2017-de-en"`` (train, validation, test) loads the paper's data from the hub, German -> English.
    ``references`` (bible-es-en, train split): the English translations paired with each Spanish
    verse, in this order (:data:`BIBLE_REFERENCES`); ``("web", "kjv")`` gives the WEB pairs, then
    the KJV pairs, whose ids end in ``/kjv`` (``"Gen.1.1/kjv"``; the WEB's stay ``"Gen.1.1"``).
    """
    _check_choice("dataset", dataset, TRANSLATION_DATASETS)
    _check_choice("split", split, _SPLITS[dataset])
    refs = _check_references(references, split, dataset)
    source_lang, target_lang = _LANGUAGES[dataset]
    if dataset != "bible-es-en":
        return pairs_from_records(_load_iwslt(split), source_lang, target_lang, id_prefix=f"{dataset}/{split}/")
    pairs = []
    for ref in refs:
        name = f"{split}.jsonl.gz" if ref == "web" else f"{split}-{ref}.jsonl.gz"
        records = _read_jsonl_gz(data_dir() / "translation" / dataset / name)
        got = pairs_from_records(records, source_lang, target_lang, id_prefix=f"{dataset}/{split}/")
        pairs += got if ref == "web" else [dataclasses.replace(p, id=f"{p.id}/{ref}") for p in got]
    return pairs


def load_open_ended() -> list[Text]:
    """The open-ended reference texts, in file order (the first 15 cover the corpus' 15 genres)."""
    return [Text(r["id"], r["text"], f"Brown Corpus {r['id']} ({r['genre']})", r["genre"])
            for r in _read_jsonl_gz(data_dir() / _OPEN_ENDED_FILE)]


# --------------------------------------------------------------------------------------------------
# Prompts and tokenization


def translation_prompt(pair: Pair, template: str = PAPER_TEMPLATE) -> tuple[str, str]:
    """``(prefix, full_text)``: the prompt up to and including "Translated:" and the whole text.

    ``template`` has the fields ``{source_language}``, ``{target_language}``, ``{source}`` and ends
    with ``{target}``; the target follows the prompt after the template's separator (a space).
    """
    if not template.endswith("{target}") or template.count("{target}") != 1 or "{source}" not in template:
        raise ValueError("template must contain {source} and end with {target} (once), like "
                         f"PAPER_TEMPLATE; got {template!r}")
    names = []
    for lang in (pair.source_lang, pair.target_lang):
        if lang not in LANGUAGE_NAMES:
            raise ValueError(f"language code {lang!r} has no name: add it to mtp_lib.data.LANGUAGE_NAMES")
        names.append(LANGUAGE_NAMES[lang])
    try:
        head = template[: -len("{target}")].format(source_language=names[0], target_language=names[1],
                                                   source=pair.source)
    except (KeyError, IndexError) as err:
        raise ValueError(f"template has a field other than source_language, target_language, source, "
                         f"target: {err}") from None
    return head.rstrip(), head + pair.target


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character spans of ``text``; special tokens added at the end (EOS) are dropped."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: offset mappings "
                         "are needed to find the target; load it with use_fast=True")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    while spans and spans[-1] == (0, 0) and len(text) > 0:
        ids.pop()
        spans.pop()
    return ids, spans


def _first_token_at(spans: list[tuple[int, int]], char: int) -> int:
    """Index of the first token that covers a character at or after ``char`` (specials cover none)."""
    for i, (_, end) in enumerate(spans):
        if end > char:
            return i
    raise ValueError(f"no token covers character {char}: is the target empty?")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def translation_samples(tokenizer: Any, n: int, *, split: str = "validation", dataset: str = "bible-es-en",
                        template: str = PAPER_TEMPLATE, min_target_words: int = 20, max_target_words: int = 60,
                        seed: int | None = None, references: Sequence[str] = ("web",)) -> list[Sample]:
    """The first ``n`` pairs (in file order, or shuffled by ``seed``) whose target has
    ``min_target_words``..``max_target_words`` words, as tokenized prompt + target. ``references``
    as in :func:`load_translation` (``("web", "kjv")``: both English references of the train split,
    shuffled together when ``seed`` is given).

    Words (whitespace-separated), not tokens, select the pairs, so that every model gets the same
    samples. ``target_start`` comes from the tokenizer's offset mapping: the first token covering a
    character of the target, so a BOS token, or a space merged into the first target token
    (" In"), is handled.
    """
    _check_positive("n", n)
    _check_positive("min_target_words", min_target_words)
    if max_target_words < min_target_words:
        raise ValueError(f"max_target_words={max_target_words} is below min_target_words={min_target_words}")
    pairs = load_translation(split, dataset, references=references)
    if seed is not None:
        pairs = pairs.copy()
        random.Random(seed).shuffle(pairs)
    chosen = [p for p in pairs if min_target_words <= len(p.target.split()) <= max_target_words][:n]
    if len(chosen) < n:
        raise ValueError(f"n={n} but only {len(chosen)} {dataset} {split} pairs have {min_target_words}-"
                         f"{max_target_words} target words: lower n or widen the word range")
    samples = []
    for pair in chosen:
        _, full = translation_prompt(pair, template)
        ids, spans = _encode(tokenizer, full)
        start = _first_token_at(spans, len(full) - len(pair.target))
        samples.append(Sample(pair.id, "translation", ids, start, full))
    return samples


def open_ended_samples(tokenizer: Any, n: int, *, n_tokens: int = 200) -> list[Sample]:
    """The first ``n`` open-ended texts, each cut to its first ``n_tokens`` tokens (BOS included when
    the tokenizer adds one). A text shorter than that keeps all its tokens; ``Sample.text`` is the
    text the kept tokens encode. A byte-level tokenizer can cut a multi-byte character (an em dash,
    an accented letter) in the middle: ``Sample.text`` then holds that character whole, while
    decoding the kept tokens ends in a replacement character."""
    _check_positive("n", n)
    _check_positive("n_tokens", n_tokens)
    texts = load_open_ended()
    if n > len(texts):
        raise ValueError(f"n={n} but there are only {len(texts)} open-ended texts")
    samples = []
    for item in texts[:n]:
        ids, spans = _encode(tokenizer, item.text)
        start = _first_token_at(spans, 0)
        if n_tokens <= start:
            raise ValueError(f"n_tokens={n_tokens} leaves no text after the {start} special token(s)")
        ids, spans = ids[:n_tokens], spans[:n_tokens]
        samples.append(Sample(item.id, "open-ended", ids, start, item.text[: spans[-1][1]]))
    return samples


# --------------------------------------------------------------------------------------------------
# Evaluated positions


def evaluation_targets(sample: Sample, last: int = 20) -> range:
    """Indices j of the last ``last`` tokens of the sample, all inside the target.

    The paper evaluates "the last 20 tokens" of each sample. We read them as the last 20 *target*
    tokens x_j: each is scored once per prediction depth. The next-token prediction of x_j uses the
    context ending at t = j - 1, the d-th-token prediction (x_j predicted d tokens ahead) the context
    ending at t = j - d (see :func:`context_ends`). Raises ValueError if the target is shorter.
    """
    _check_positive("last", last)
    n = len(sample.input_ids)
    if n - sample.target_start < last:
        raise ValueError(f"sample {sample.id!r} has {n - sample.target_start} target tokens, fewer than "
                         f"last={last}: lower `last` or choose longer targets")
    return range(n - last, n)


def context_ends(sample: Sample, depth: int, last: int = 20) -> list[int]:
    """``[j - depth for j in evaluation_targets(sample, last)]``: the index of the last context token
    from which the analyses predict each evaluated token ``depth`` tokens ahead (1 = next token)."""
    _check_positive("depth", depth)
    ends = [j - depth for j in evaluation_targets(sample, last)]
    if ends[0] < 0:
        raise ValueError(f"depth={depth} reaches before the start of sample {sample.id!r}")
    return ends
