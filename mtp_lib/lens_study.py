"""Chapter 2's experiment: the logit lens, two sentences read token by token, and per-layer probes.

For each model, :meth:`LensStudy.run` computes (or loads, see :mod:`mtp_lib.results`) three results:

- ``ch02-lens``: the logit lens on ``n_samples`` Bible validation pairs at the paper's evaluated
  positions: per layer and sample, mean KL(p_l || p_L) and entropy (nats) and top-k hits for the next
  token and the token after it; plus the residual stream's RMS on the first sample;
- ``ch02-sentences``: the two sentences of Figure 2.2 and the token browser's samples: the entropy of
  the next-token distribution at every target token, and the top tokens of selected layers;
- ``ch02-probe``: a linear probe per layer (:func:`mtp_lib.probe.layerwise_probes`) trained on Bible
  training pairs and tested on the validation positions of ``ch02-lens``.

The configuration dicts are the cache keys of the committed results: change them only with a new
version in :data:`VERSIONS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mtp_lib import data, lens, probe
from mtp_lib.marginal_study import DeviceChoice, LazyModel, evenly_spaced
from mtp_lib.results import CachedResult, cached

__all__ = ["SELECTION", "VERSIONS", "LensRuns", "LensStudy", "layer_subset"]

VERSIONS = {"ch02-lens": 1, "ch02-sentences": 1, "ch02-probe": 1}  # bump when a computation changes
SELECTION: dict[str, Any] = {"dataset": "bible-es-en", "split": "validation", "template": "paper",
                             "min_target_words": 20, "max_target_words": 60, "order": "file"}


def layer_subset(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer (1-based) counted back from the last, so the last layer is always in."""
    return sorted(range(n_layers, 0, -stride))


def _rounded(x: Any, digits: int = 5) -> Any:
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else x
    return np.round(torch.as_tensor(x, dtype=torch.float64).numpy(), digits)


@dataclasses.dataclass
class LensRuns:
    """The cached results of one study, per model."""

    lens: dict[str, CachedResult]
    sentences: dict[str, CachedResult]
    probe: dict[str, CachedResult]

    def all_results(self) -> list[CachedResult]:
        return [*self.lens.values(), *self.sentences.values(), *self.probe.values()]

    def sources(self) -> Any:
        """Per model: layers, vocabulary, whether loaded, where computed, and the commit."""
        import pandas as pd

        rows = []
        for n, r in self.lens.items():
            loaded = all(x.loaded for x in (r, self.sentences[n], self.probe[n]))
            rows.append({"model": n, "layers": r.value["n_layers"], "vocabulary": r.value["info"]["vocab"],
                         "results": "loaded from stored results" if loaded else "computed now",
                         "computed on": r.provenance["device"], "commit": (r.provenance["git_commit"] or "?")[:8]})
        return pd.DataFrame(rows).set_index("model")


@dataclasses.dataclass(frozen=True)
class LensStudy(DeviceChoice):
    """Chapter 2's parameters (see the chapter's parameters cell for each one's meaning)."""

    n_samples: int
    last_tokens: int = 20
    top_k: int = 5
    fig3_source: str = ""
    fig3_target: str = ""
    bible_sentence: int = 2
    widget_extra_samples: int = 1
    widget_positions: int = 5
    widget_layer_stride: int = 3
    widget_top_k: int = 8
    probe_train_samples: int = 24
    probe_offsets: tuple[int, ...] = (2,)
    probe_layer_stride: int = 6
    probe_steps: int = 20
    probe_batch: int = 32
    probe_lr: float = 1e-3
    probe_weight_decay: float = 0.01
    seed: int = 0
    max_elements: int = 2**22
    dtype: str = "auto"
    device: str = "auto"

    def describe(self) -> str:
        return (f"{self.n_samples} translation samples x last {self.last_tokens} tokens; probes: "
                f"{self.probe_train_samples} training pairs, offsets {list(self.probe_offsets)}, every "
                f"{self.probe_layer_stride} layer(s), {self.probe_steps} steps of {self.probe_batch}")

    # ------------------------------------------------------------------------------------------------
    # Cache keys

    def lens_config(self, name: str) -> dict[str, Any]:
        return {"model": name, "dtype": self.dtype_name, "samples": {**SELECTION, "n": self.n_samples},
                "last_tokens": self.last_tokens, "top_k": self.top_k}

    def sentences_config(self, name: str) -> dict[str, Any]:
        return {"model": name, "dtype": self.dtype_name,
                "sentences": {"fig3_source": self.fig3_source, "fig3_target": self.fig3_target,
                              "bible_sentence": self.bible_sentence, **SELECTION, "extra": self.widget_extra_samples},
                "positions": self.widget_positions, "layer_stride": self.widget_layer_stride,
                "top_k": self.widget_top_k}

    def probe_config(self, name: str) -> dict[str, Any]:
        train = {**SELECTION, "split": "train", "order": f"shuffled, seed {self.seed}", "n": self.probe_train_samples,
                 "positions": "every target position t >= target_start - 1 with x_(t+2) inside the sample"}
        return {"model": name, "dtype": self.dtype_name, "top_k": self.top_k, "train": train,
                "test": {**SELECTION, "n": self.n_samples, "last_tokens": self.last_tokens,
                         "positions": "context ends t = j - offset of the last `last_tokens` target tokens j"},
                "offsets": sorted(self.probe_offsets), "layer_stride": self.probe_layer_stride,
                "steps": self.probe_steps, "batch_size": self.probe_batch, "lr": self.probe_lr,
                "weight_decay": self.probe_weight_decay, "seed": self.seed}

    def run(self, models: list[str], *, profile: str, recompute: bool = False) -> LensRuns:
        """Load or compute the three results of every model."""
        runs = LensRuns({}, {}, {})
        for name in models:
            lm = LazyModel(name, self.dev, self.dtype_name)

            def one(kind: str, config: dict[str, Any], compute: Callable[[Any], Any]) -> CachedResult:
                return cached(kind, config, lambda: compute(lm()), profile=profile, recompute=recompute,
                              device=self.dev, version=VERSIONS[kind])

            runs.lens[name] = one("ch02-lens", self.lens_config(name), self.lens_result)
            runs.sentences[name] = one("ch02-sentences", self.sentences_config(name), self.sentence_result)
            runs.probe[name] = one("ch02-probe", self.probe_config(name), self.probe_result)
        return runs

    # ------------------------------------------------------------------------------------------------
    # The computations

    def validation_samples(self, tok: Any, n: int) -> list[data.Sample]:
        return data.translation_samples(tok, n, min_target_words=SELECTION["min_target_words"],
                                        max_target_words=SELECTION["max_target_words"])

    def lens_result(self, lm: Any) -> dict[str, Any]:
        samples = self.validation_samples(lm.tokenizer, self.n_samples)
        lengths = torch.tensor([len(s.input_ids) for s in samples])
        last = self.last_tokens
        # contexts t = j - 2 .. j - 1 for the last `last_tokens` targets j (see mtp_lib.data.context_ends)
        positions = [list(range(len(s.input_ids) - last - 2, len(s.input_ids) - 1)) for s in samples]
        stats = lens.lens_stats_many(lm.model, [s.input_ids for s in samples], positions=positions, top_p=(),
                                     chunk=max(1, self.max_elements // lm.vocab_size), progress=False)
        n_of = lengths[stats.sequence]
        cols = {"next": stats.positions >= n_of - last - 1, "2nd": stats.positions <= n_of - 3}

        def per_sample(values: torch.Tensor, which: str) -> torch.Tensor:  # [L, P] -> [L, samples]
            return torch.stack([values[:, cols[which] & (stats.sequence == i)].mean(1) for i in range(len(samples))], 1)

        hidden = lens.hidden_states(lm.model, samples[0].input_ids).float().cpu()  # residual stream, first sample
        rms = hidden.pow(2).mean(-1).sqrt()  # [L, T]
        ends = torch.tensor(data.context_ends(samples[0], 1, last))
        info = {k: v for k, v in lm.info().items() if k not in ("device",)}
        return {
            "info": info, "sample_ids": [s.id for s in samples], "n_layers": stats.n_layers,
            "kl": _rounded(per_sample(stats.kl, "next")), "entropy": _rounded(per_sample(stats.entropy, "next")),
            "hits_next": _rounded(per_sample(stats.top_k_hits(self.top_k, "next"), "next")),
            "hits_2nd": _rounded(per_sample(stats.top_k_hits(self.top_k, "next2"), "2nd")),
            "rms_evaluated": _rounded(rms[:, ends].mean(1), 3), "rms_max": _rounded(rms.max(1).values, 3),
            "rms_max_position": rms.max(1).indices,
            "rms_max_token": [lm.tokenizer.decode([samples[0].input_ids[int(i)]]) for i in rms.max(1).indices],
        }

    def sentence_pairs(self, tok: Any) -> list[data.Pair]:
        """The Figure 2.2 sentences (ours, then the Bible one) and the browser's extra validation samples."""
        ours = data.Pair("ours/paper-fig3-sentence", self.fig3_source, self.fig3_target, "es", "en")
        by_id = {p.id: p for p in data.load_translation("validation")}
        chosen = self.validation_samples(tok, max(self.bible_sentence, self.widget_extra_samples) + 1)
        bible = by_id[chosen[self.bible_sentence].id]
        extra = [by_id[s.id] for i, s in enumerate(chosen) if i != self.bible_sentence][:self.widget_extra_samples]
        return [ours, bible, *extra]

    def sentence_result(self, lm: Any) -> dict[str, Any]:
        out = []
        layers = layer_subset(lm.n_layers, self.widget_layer_stride)
        for pair in self.sentence_pairs(lm.tokenizer):
            sample, spans, first = _pair_sample(lm.tokenizer, pair)
            targets = list(range(sample.target_start, len(sample.input_ids)))  # predicted tokens j; context j - 1
            hidden = lens.hidden_states(lm.model, sample.input_ids)
            with torch.no_grad():
                final = lens.lens_log_probs(lm.model, hidden[-1, [j - 1 for j in targets]])
            chars = []
            for j in targets:  # first non-space character of token j, counted from the start of the target
                a, b = spans[j]
                piece = sample.text[a:b]
                chars.append(max(0, a + len(piece) - len(piece.lstrip()) - first))
            picked = evenly_spaced(list(range(len(targets))), self.widget_positions)
            views = [{"target_index": i, "layers": self._layer_tops(lm, hidden, sample.input_ids, targets[i] - 1, layers)}
                     for i in picked]
            out.append({"id": pair.id, "source": pair.source, "target": pair.target,
                        "tokens": [lm.tokenizer.decode([sample.input_ids[j]]) for j in targets], "chars": chars,
                        "entropy": _rounded(-(final.exp() * final).sum(-1), 4), "views": views})
        return {"n_layers": lm.n_layers, "sentences": out}

    def _layer_tops(self, lm: Any, hidden: torch.Tensor, ids: list[int], t: int, layers: list[int]) -> list[dict[str, Any]]:
        per_layer = []
        for layer in layers:
            with torch.no_grad():
                logp = lens.lens_log_probs(lm.model, hidden[layer - 1, t:t + 1])[0]
            top = logp.topk(self.widget_top_k)

            def rank(j: int) -> int | None:
                return int((logp > logp[ids[j]]).sum()) if j < len(ids) else None

            per_layer.append({"layer": layer, "tokens": [lm.tokenizer.decode([int(x)]) for x in top.indices],
                              "probs": _rounded(top.values.exp(), 4),
                              "entropy": round(float(-(logp.exp() * logp).sum()), 3),
                              "rank_next": rank(t + 1), "rank_2nd": rank(t + 2)})
        return per_layer

    def probe_result(self, lm: Any) -> dict[str, Any]:
        offsets = sorted(self.probe_offsets)
        train = data.translation_samples(lm.tokenizer, self.probe_train_samples, split="train", seed=self.seed,
                                         min_target_words=SELECTION["min_target_words"],
                                         max_target_words=SELECTION["max_target_words"])
        train_data = probe.collect_probe_data(
            lm.model, [s.input_ids for s in train], offsets=offsets,
            positions=[list(range(s.target_start - 1, len(s.input_ids))) for s in train], progress=False)
        test = self.validation_samples(lm.tokenizer, self.n_samples)
        layers = layer_subset(train_data.n_layers, self.probe_layer_stride)
        out: dict[str, Any] = {"n_layers": train_data.n_layers, "layers": layers, "n_train_positions": len(train_data),
                               "train_ids": [s.id for s in train], "test_ids": [s.id for s in test], "offsets": {}}
        for k in offsets:
            test_data = probe.collect_probe_data(
                lm.model, [s.input_ids for s in test], offsets=[k],
                positions=[data.context_ends(s, k, self.last_tokens) for s in test], progress=False)
            res = probe.layerwise_probes(lm.model, train_data, test_data, offset=k, k=self.top_k, layers=layers,
                                         steps=self.probe_steps, batch_size=self.probe_batch, lr=self.probe_lr,
                                         weight_decay=self.probe_weight_decay, seed=self.seed,
                                         max_elements=self.max_elements, progress=False)
            tail = max(1, self.probe_steps // 10)
            out["offsets"][str(k)] = {
                "n_test_positions": len(test_data),
                "lens_accuracy": [s.accuracy for s in res.lens], "lens_nll": _rounded([s.nll for s in res.lens], 4),
                "probe_accuracy": [s.accuracy for s in res.probe], "probe_nll": _rounded([s.nll for s in res.probe], 4),
                "train_loss_first": _rounded([loss[0] for loss in res.losses], 4),
                "train_loss_last": _rounded([float(np.mean(loss[-tail:])) for loss in res.losses], 4),
            }
        return out


def _pair_sample(tok: Any, pair: data.Pair) -> tuple[data.Sample, list[tuple[int, int]], int]:
    """A pair in the paper's prompt, tokenized as :func:`mtp_lib.data.translation_samples` does, with the
    tokens' character spans and where the target starts in the text."""
    _, full = data.translation_prompt(pair)
    enc = tok(full, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    while spans and spans[-1] == (0, 0):  # an appended EOS
        ids.pop(), spans.pop()
    first = len(full) - len(pair.target)
    start = next(i for i, (_, end) in enumerate(spans) if end > first)
    return data.Sample(pair.id, "translation", ids, start, full), spans, first
