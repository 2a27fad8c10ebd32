"""One token stream for every size of the suite: documents -> BPE tokenizer -> token ids, fixed order.

A built stream is a folder:

- ``dataset/``: a Hugging Face ``datasets`` Arrow dataset, one row a document (``source``, ``text``,
  ``input_ids``), memory-mapped when loaded;
- ``tokens.npy``: the documents' ids concatenated in dataset order, each followed by the end-of-text
  token (uint16: the vocabulary is below 2^16); this is what training reads;
- ``tokenizer/``: the tokenizer (``transformers`` fast tokenizer files);
- ``manifest.json``: the settings, per-source counts and licences, the held-out check, and
  ``fingerprint``: sha256 over ``tokens.npy`` and the tokenizer's vocabulary and merges, which every
  size's training result records.

Order: documents are shuffled once (``seed``) across sources, so every stretch of the stream mixes
them; training then reads fixed-length windows of it in an order that depends only on the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtp_lib import data
from mtp_lib.suite import sources as S

__all__ = ["EOS", "Stream", "StreamSpec", "build_stream", "held_out_overlap", "load_stream"]

EOS = "<|endoftext|>"
_NGRAM = 12  # words: an evaluation text "appears" in training when its word 12-grams do


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What a stream is built from. ``max_docs``: at most this many documents per source (0: all)."""

    sources: tuple[str, ...] = tuple(S.SOURCES)
    vocab_size: int = 16384
    max_docs: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in S.SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"unknown or no sources {unknown}: choose from {', '.join(S.SOURCES)}")
        if not 256 + 1 <= self.vocab_size < 2 ** 16:
            raise ValueError(f"vocab_size must be in 257..65535 (byte-level BPE, uint16 ids), got {self.vocab_size}")


@dataclasses.dataclass
class Stream:
    """A built stream: ``tokens`` (memory-mapped uint16), ``tokenizer`` and ``manifest``."""

    folder: Path
    tokens: np.ndarray
    tokenizer: Any
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def dataset(self) -> Any:
        """The documents as a memory-mapped ``datasets.Dataset``."""
        import datasets

        return datasets.load_from_disk(str(self.folder / "dataset"))


def _documents(spec: StreamSpec, downloads: Path, work: Path) -> list[tuple[str, str]]:
    paths = S.fetch(list(spec.sources), downloads)
    docs = []
    for name in spec.sources:
        found = list(S.read_source(name, paths, work))
        docs += [(name, d) for d in (found[:spec.max_docs] if spec.max_docs else found)]
    random.Random(spec.seed).shuffle(docs)
    return docs


def _train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _grams(words: Sequence[str]) -> set[int]:
    return {hash(tuple(words[i:i + _NGRAM])) for i in range(len(words) - _NGRAM + 1)}


class _Scan:
    """One pass over the training documents against the evaluation texts' word 12-grams: per
    document, the evaluation 12-grams it holds and how many distinct 12-grams it has."""

    def __init__(self, docs: Iterable[str], eval_texts: dict[str, str]) -> None:
        self.wanted = {key: _grams(_words(text)) for key, text in eval_texts.items()}
        pool = set().union(*self.wanted.values()) if self.wanted else set()
        self.docs: list[tuple[set[int], int]] = []
        for doc in docs:
            grams = _grams(_words(doc))
            self.docs.append((grams & pool, len(grams)))

    def overlap(self, kept: Iterable[int] | None = None) -> dict[str, float]:
        """Each evaluation text's share of 12-grams found in the documents (those of ``kept`` only)."""
        rows = self.docs if kept is None else [self.docs[i] for i in kept]
        seen: set[int] = set().union(*(m for m, _ in rows)) if rows else set()
        return {key: (len(g & seen) / len(g) if g else 0.0) for key, g in self.wanted.items()}


def held_out_overlap(docs: Iterable[str], eval_texts: dict[str, str]) -> dict[str, float]:
    """For each evaluation text, the share of its word 12-grams that occur in ``docs`` (1.0: the whole
    text appears in training; words are lowercased letters and digits, so spacing and punctuation
    do not hide a copy)."""
    return _Scan(docs, eval_texts).overlap()


def _drop_copies(docs: list[tuple[str, str]], scan: _Scan) -> tuple[list[int], dict[str, int]]:
    """The documents to keep (indices), dropping the training documents that are copies of an
    evaluation text: the Bible repeats verses (2 Kings 14:15 is 2 Kings 13:12, "Yahweh spoke to
    Moses, saying" recurs), so a training verse can equal a validation verse of another chapter. A
    document goes when half or more of its word 12-grams belong to an evaluation text that appears
    (half or more of its 12-grams) in training, or a quarter of them when the text is pieced
    together from several near-copies (2 Kings 13:12 is made of the formulas of its neighbours)."""
    flagged = set().union(*(scan.wanted[k] for k, v in scan.overlap().items() if v >= 0.5))
    kept: list[int] = []
    dropped: dict[str, int] = {}
    for i, ((name, _), (matched, n_grams)) in enumerate(zip(docs, scan.docs)):
        if n_grams and len(matched & flagged) / n_grams >= 0.25:
            dropped[name] = dropped.get(name, 0) + 1
        else:
            kept.append(i)
    return kept, dropped


def evaluation_texts() -> dict[str, str]:
    """Everything Chapters 1-3 can evaluate on: every validation pair whose target has 20 words or
    more (the chapters' selection; shorter verses are formulas such as "Yahweh spoke to Moses,
    saying," that recur in the training chapters) as its whole prompt, and every open-ended passage."""
    out = {f"validation/{p.id}": data.translation_prompt(p)[1] for p in data.load_translation("validation")
           if len(p.target.split()) >= 20}
    out.update({f"open-ended/{t.id}": t.text for t in data.load_open_ended()})
    return out


def _fingerprint(tokens: np.ndarray, tokenizer: Any) -> str:
    h = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()[:16]


def build_stream(spec: StreamSpec, folder: Path, *, downloads: Path, work: Path | None = None) -> Stream:
    """Fetch, read, shuffle, train the tokenizer, tokenize, check the held-out texts, and save."""
    import datasets

    work = work or downloads / "unpacked"
    docs = _documents(spec, downloads, work)
    scan = _Scan((d for _, d in docs), evaluation_texts())  # one pass over the documents
    kept, dropped = _drop_copies(docs, scan)
    overlap = scan.overlap(kept)
    docs = [docs[i] for i in kept]
    leaked = sorted(k for k, v in overlap.items() if v >= 0.5)
    if leaked:
        raise RuntimeError(f"{len(leaked)} evaluation texts appear in the training documents "
                           f"(half or more of their word 12-grams), e.g. {leaked[:5]}: fix the held-out rules")
    tokenizer = _train_tokenizer((d for _, d in docs), spec.vocab_size)
    ids = tokenizer([d for _, d in docs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids(EOS)
    tokens = np.fromiter((t for row in ids for t in (*row, eos)), dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict({"source": [s for s, _ in docs], "text": [d for _, d in docs],
                                     "input_ids": ids})
    ds.save_to_disk(str(folder / "dataset"))
    np.save(folder / "tokens.npy", tokens)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    manifest = _manifest(spec, docs, ids, tokens, tokenizer, overlap)
    manifest["datasets_fingerprint"] = ds._fingerprint
    manifest["held_out"]["documents_dropped_as_copies"] = dropped
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return load_stream(folder)


def _manifest(spec: StreamSpec, docs: list[tuple[str, str]], ids: list[list[int]], tokens: np.ndarray,
              tokenizer: Any, overlap: dict[str, float]) -> dict[str, Any]:
    per_source: dict[str, dict[str, Any]] = {}
    for (name, text), row in zip(docs, ids):
        entry = per_source.setdefault(name, {"documents": 0, "words": 0, "tokens": 0})
        entry["documents"] += 1
        entry["words"] += len(text.split())
        entry["tokens"] += len(row) + 1
    for name, entry in per_source.items():
        src = S.SOURCES[name]
        entry.update(package=src.package, version=src.version, registry=src.kind, licence=src.licence,
                     description=src.description)
    return {
        "spec": dataclasses.asdict(spec), "tokens": int(tokens.size), "documents": len(docs),
        "sources": per_source, "fingerprint": _fingerprint(tokens, tokenizer),
        "held_out": {"texts_checked": len(overlap), "ngram_words": _NGRAM,
                     "max_share": round(max(overlap.values(), default=0.0), 4),
                     "texts_with_any_shared_ngram": sum(v > 0 for v in overlap.values())},
    }


def load_stream(folder: Path) -> Stream:
    """A stream built by :func:`build_stream`; the tokens are memory-mapped, not read."""
    from transformers import PreTrainedTokenizerFast

    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"no stream in {folder} (no manifest.json): build it with "
                                "`python -m mtp_lib.suite stream --out <folder>`")
    manifest = json.loads(manifest_file.read_text())
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    if _fingerprint(tokens, tokenizer) != manifest["fingerprint"]:
        raise ValueError(f"the tokens or the tokenizer in {folder} do not match its manifest (fingerprint "
                         f"{manifest['fingerprint']}): they were changed or mixed with another stream's; "
                         "rebuild the stream")
    return Stream(folder, tokens, tokenizer, manifest)
