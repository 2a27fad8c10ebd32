"""Does an instruction-tuned model's chat template change Chapter 1's accuracies? (``ch01-chat-template``)

SmolLM2-135M-Instruct is the book's SmolLM2 (no base checkpoint is available offline), and the book
prompts it, like every model, with the paper's plain three-line prompt. Here the same translation
pairs are scored twice: in the paper's prompt, and with that prompt as the user's turn of the
tokenizer's chat template followed by the reference translation as the assistant's answer. Scored as
in Chapter 1, teacher-forced: the next token x_j from t = j - 1 for each of the last ``last_tokens``
target tokens, and the 2nd token by top-p marginalization (:func:`mtp_lib.marginal.marginalize`) from
t = j - 2 for ``positions`` of them, evenly spaced. Targets are counted from the end of the sample, so
both versions score the same reference tokens (the result records whether they are identical) and the
difference is paired, with a cluster-bootstrap interval over samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtp_lib import data, metrics
from mtp_lib.marginal import marginalize
from mtp_lib.marginal_study import evenly_spaced
from mtp_lib.model_overview import chat_prompt
from mtp_lib.report import ci_text, paired_difference
from mtp_lib.results import CachedResult, cached

__all__ = ["VERSIONS", "chat_samples", "template_effect", "template_lines", "template_result"]

VERSIONS = ("paper prompt", "chat template")


def chat_samples(tokenizer: Any, samples: Sequence[data.Sample]) -> list[data.Sample]:
    """The pairs of ``samples`` with the paper's prompt as the user's turn of the chat template and the
    reference target as the assistant's answer (no special token after it)."""
    by_id = {p.id: p for p in data.load_translation("validation")}
    out = []
    for s in samples:
        pair = by_id[s.id]
        prefix, _ = data.translation_prompt(pair)
        chat = chat_prompt(tokenizer, prefix)
        if chat is None:
            raise ValueError("the tokenizer has no chat template: measure the template's effect on a chat model "
                             "(e.g. smollm2-135m)")
        start = len(tokenizer(chat, add_special_tokens=False).input_ids)
        ids = list(tokenizer(chat + pair.target, add_special_tokens=False).input_ids)
        out.append(data.Sample(s.id, "translation", ids, start, chat + pair.target))
    return out


def _score(model: Any, sample: data.Sample, last_tokens: int, positions: int, top_p: float) -> dict[str, Any]:
    """Ranks of the last ``last_tokens`` target tokens (next token) and of ``positions`` of them (2nd token)."""
    ids = torch.tensor([sample.input_ids])
    every = list(data.evaluation_targets(sample, last_tokens))
    chosen = evenly_spaced(every, positions)
    first = marginalize(model, ids, depth=1, positions=[j - 1 for j in every])
    second = marginalize(model, ids, depth=2, top_p=top_p, positions=[j - 2 for j in chosen])  # [P, 2, V]
    refs = torch.tensor([sample.input_ids[j] for j in every])
    refs2 = torch.tensor([sample.input_ids[j] for j in chosen])
    return {"id": sample.id, "targets": refs.tolist(),
            "rank_next": metrics.target_rank(first.log_probs[:, 0].cpu(), refs).tolist(),
            "rank_2nd": metrics.target_rank(second.at(top_p)[:, 1].float().cpu(), refs2).tolist()}


def template_effect(lm: Any, n_samples: int, *, last_tokens: int = 20, positions: int = 5,
                    top_p: float = 0.9) -> dict[str, Any]:
    """Score the first ``n_samples`` validation pairs (20-60 target words) in both prompts."""
    plain = data.translation_samples(lm.tokenizer, n_samples)
    versions = dict(zip(VERSIONS, (plain, chat_samples(lm.tokenizer, plain))))
    scored = {v: [_score(lm.model, s, last_tokens, positions, top_p) for s in samples] for v, samples in versions.items()}
    same = [a["targets"] == b["targets"] for a, b in zip(*scored.values())]
    chat0 = versions["chat template"][0]
    return {"versions": scored, "same_targets": same,
            "example_prompt": lm.tokenizer.decode(chat0.input_ids[: chat0.target_start])}


def template_result(model: str, n_samples: int, *, last_tokens: int, positions: int, top_p: float, profile: str,
                    recompute: bool = False) -> CachedResult:
    """The cached ``ch01-chat-template`` of ``model``: always computed on the CPU in float32, whatever the
    profile (a few samples; every profile can hold the same result)."""
    from mtp_lib.models import load_model

    config = {"model": model, "dtype": "float32", "versions": list(VERSIONS),
              "samples": {"split": "validation", "min_target_words": 20, "max_target_words": 60, "n": n_samples},
              "last_tokens": last_tokens, "positions_2nd": positions, "top_p": top_p}
    dev = torch.device("cpu")
    return cached("ch01-chat-template", config, lambda: template_effect(
        load_model(model, device=dev, dtype="float32", progress=lambda msg: None), n_samples, last_tokens=last_tokens,
        positions=positions, top_p=top_p), profile=profile, recompute=recompute, device=dev)


def template_lines(value: dict[str, Any], *, top_k: int = 5, model: str = "") -> list[str]:
    """Top-k accuracy in each prompt and the paired difference (chat template minus paper prompt)."""
    lines = []
    runs = value["versions"]
    for key, what in (("rank_next", "next token"), ("rank_2nd", "2nd token")):
        hits = {v: [np.asarray(s[key]) < top_k for s in runs[v]] for v in VERSIONS}
        groups = [i for i, s in enumerate(hits[VERSIONS[0]]) for _ in s]
        flat = {v: np.concatenate(h).astype(float) for v, h in hits.items()}
        diff = paired_difference(flat[VERSIONS[1]], flat[VERSIONS[0]], groups=groups)
        reading = ("the interval holds 0: no change shown at this sample size" if diff.lo <= 0 <= diff.hi
                   else "the interval excludes 0: the template changes it")
        lines.append(f"- {model + ', ' if model else ''}{what} ({len(flat[VERSIONS[0]])} positions): top-{top_k} "
                     f"accuracy {flat[VERSIONS[0]].mean():.2f} in the paper's prompt, {flat[VERSIONS[1]].mean():.2f} "
                     f"in the chat template; difference {ci_text(diff, signed=True)} ({reading}).")
    if not all(value["same_targets"]):
        lines.append(f"- The two tokenizations differ in the scored tokens of {value['same_targets'].count(False)} "
                     "sample(s): there the pairs compare the same positions, not identical tokens.")
    return lines
