"""Chapter 0's overview of the models and the data: what each model is, how it continues a prompt,
and how many tokens the book's texts cost under each tokenizer.

:func:`model_overview` loads each model once (for its description and tokenizer) and caches a greedy
continuation of one prompt (``ch00-continuation``; the configuration is the cache key of the
committed results). :func:`token_lengths` counts the tokens of the translation targets and the
open-ended passages per tokenizer. :func:`translation_examples` caches each model's greedy translation
of the first validation verses (``ch00-translations``), in the paper's prompt and, for a model whose
tokenizer has a chat template (SmolLM2-135M-Instruct), inside that template too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtp_lib import data
from mtp_lib import models as M
from mtp_lib.results import CachedResult, cached

__all__ = ["ModelOverview", "chat_prompt", "continuation", "greedy_translations", "model_overview", "token_lengths",
           "translation_examples", "translation_table"]


def continuation(lm: Any, prompt: str, max_new_tokens: int, *, special_tokens: bool = True) -> dict[str, str]:
    """The model's greedy continuation of ``prompt`` (special tokens dropped from the output).

    ``special_tokens=False`` tokenizes ``prompt`` without adding a BOS (for a prompt that already holds
    its special tokens, such as one built by a chat template)."""
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=special_tokens).input_ids.to(lm.device)
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


def chat_prompt(tokenizer: Any, prefix: str) -> str | None:
    """``prefix`` as the user's turn of the tokenizer's chat template, ready for the assistant's answer;
    None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return str(tokenizer.apply_chat_template([{"role": "user", "content": prefix}], add_generation_prompt=True,
                                             tokenize=False))


def greedy_translations(lm: Any, n: int, max_new_tokens: int) -> dict[str, Any]:
    """The greedy output, up to its first line break, for the first ``n`` validation samples (Chapter 0's
    verses): after the paper's prompt, and inside the chat template when the tokenizer has one."""
    by_id = {p.id: p for p in data.load_translation("validation")}
    out = []
    for sample in data.translation_samples(lm.tokenizer, n):
        prefix, _ = data.translation_prompt(by_id[sample.id])
        row = {"id": sample.id, "paper prompt": continuation(lm, prefix, max_new_tokens)["continuation"]}
        chat = chat_prompt(lm.tokenizer, prefix)
        if chat is not None:
            row["chat template"] = continuation(lm, chat, max_new_tokens, special_tokens=False)["continuation"]
        out.append({k: v.strip().split("\n")[0].strip() if k != "id" else v for k, v in row.items()})
    return {"translations": out}


def translation_examples(models: Sequence[str], n: int, max_new_tokens: int, *, profile: str,
                         recompute: bool = False) -> dict[str, CachedResult]:
    """Per model, the cached ``ch00-translations``: a few short greedy generations, always on the CPU in
    float32 whatever the profile (so every profile can hold the same, cheap result)."""
    dev = torch.device("cpu")
    out = {}
    for name in models:
        config = {"model": name, "dtype": "float32",
                  "samples": {"split": "validation", "min_target_words": 20, "max_target_words": 60, "n": n},
                  "max_new_tokens": max_new_tokens, "decoding": "greedy, cut at the first line break"}
        out[name] = cached("ch00-translations", config, lambda: greedy_translations(
            M.load_model(name, device=dev, dtype="float32", progress=lambda msg: None), n, max_new_tokens),
            profile=profile, recompute=recompute, device=dev)
    return out


def translation_table(results: Mapping[str, CachedResult]) -> Any:
    """One row per verse: the Spanish source, the reference English, and each model's output per prompt."""
    import pandas as pd

    by_id = {p.id: p for p in data.load_translation("validation")}
    rows: dict[str, dict[str, str]] = {}
    for name, res in results.items():
        for t in res.value["translations"]:
            pair = by_id[t["id"]]
            row = rows.setdefault(t["id"], {"Spanish": pair.source, "reference": pair.target})
            row.update({f"{name} ({k})": v for k, v in t.items() if k != "id"})
    return pd.DataFrame.from_dict(rows, orient="index")
