"""Chapter 0's overview of the models and the data: what each model is, how it continues a prompt,
and how many tokens the book's texts cost under each tokenizer.

:func:`model_overview` loads each model once (for its description and tokenizer) and caches a greedy
continuation of one prompt (``ch00-continuation``; the configuration is the cache key of the
committed results). :func:`token_lengths` counts the tokens of the translation targets and the
open-ended passages per tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtp_lib import data
from mtp_lib import models as M
from mtp_lib.results import CachedResult, cached

__all__ = ["ModelOverview", "continuation", "model_overview", "token_lengths"]


def continuation(lm: Any, prompt: str, max_new_tokens: int) -> dict[str, str]:
    """The model's greedy continuation of ``prompt`` (special tokens dropped)."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    return {"continuation": lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}


@dataclasses.dataclass
class ModelOverview:
    """Per model: its description row, its tokenizer and its cached continuation."""

    rows: list[dict[str, Any]]
    tokenizers: dict[str, Any]
    results: list[CachedResult]

    def table(self) -> Any:
        """Architecture, parameters, layers, width and vocabulary per model."""
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("model").drop(columns=["weights", "continuation"])

    def cards(self) -> list[str]:
        """Per model, a markdown paragraph: where its weights come from, and its continuation quoted."""
        return [f"**{r['model']}**: {r['weights']}.\n\n> {r['continuation'].replace(chr(10), ' ⏎ ')}" for r in self.rows]


def model_overview(models: Sequence[str], prompt: str, max_new_tokens: int, *, profile: str, device: str = "auto",
                   dtype: str = "auto", recompute: bool = False) -> ModelOverview:
    """Load each model, describe it, and load or compute its greedy continuation of ``prompt``."""
    dev = M.resolve_device(device)
    out = ModelOverview([], {}, [])
    for name in models:
        lm = M.load_model(name, device=dev, dtype=dtype, progress=lambda msg: None)
        info = lm.info()
        res = cached("ch00-continuation", {"model": name, "prompt": prompt, "max_new_tokens": max_new_tokens,
                                           "dtype": info["dtype"]},
                     lambda: continuation(lm, prompt, max_new_tokens), profile=profile, recompute=recompute, device=dev)
        out.rows.append({"model": name, "architecture": info["class"], "parameters": f"{info['params'] / 1e6:.1f}M",
                         "layers": info["layers"], "d_model": info["d_model"], "vocabulary": info["vocab"],
                         "weights": info["source"], "continuation": prompt + " ..." + res.value["continuation"]})
        out.tokenizers[name] = lm.tokenizer
        out.results.append(res)
        del lm
    return out


def token_lengths(tokenizers: Mapping[str, Any], passages: Sequence[Any], n_samples: int) -> Any:
    """One row per (task, model, text): the target tokens of the first ``n_samples`` translation samples,
    and the untruncated tokens of the first ``n_samples`` open-ended passages."""
    import pandas as pd

    rows = []
    for name, tok in tokenizers.items():
        for s in data.translation_samples(tok, n_samples):
            rows.append({"task": "translation", "model": name, "tokens": len(s.input_ids) - s.target_start})
        for p in passages[:n_samples]:
            rows.append({"task": "open-ended", "model": name, "tokens": len(tok(p.text).input_ids)})
    return pd.DataFrame(rows)
