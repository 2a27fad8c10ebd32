"""Chapter 1's verdicts on the paper's claims, each from a like-for-like difference with its interval.

- Claim 1 (the 2nd token is predictable, and harder than the next): the 2nd-token accuracy against
  chance, and the paired difference 2nd - next on the same evaluated targets.
- Claim 3 (translation predicts better than open-ended text): the difference translation -
  open-ended, unpaired (different samples), each side resampled over its own samples.

The words come from :func:`mtp_lib.report.verdict`. Values read off the paper's plots (another
dataset, tokenizer and model family) are context, never a verdict: see
:func:`mtp_lib.marginal_tables.paper_context_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtp_lib.marginal_tables import paired_hits, paper_context_rows
from mtp_lib.metrics import accuracy_with_ci
from mtp_lib.report import ci_text, difference_with_ci, paired_difference, verdict

__all__ = ["MIN_SAMPLES", "claim1_lines", "claim3_lines", "claims_markdown", "too_few_samples"]

MIN_SAMPLES = 5  # below this many samples a bootstrap over samples is no interval: no verdict is drawn


def _samples(ranks: Any, model: str, task: str) -> int:
    part = ranks[(ranks["model"] == model) & (ranks["task"] == task)]
    return int(part["sample"].nunique())


def too_few_samples(ranks: Any) -> int | None:
    """The smallest number of samples of a (model, task) when below :data:`MIN_SAMPLES`, else None."""
    n = int(ranks.groupby(["model", "task"])["sample"].nunique().min())
    return n if n < MIN_SAMPLES else None


def _main(ranks: Any, top_p: float) -> Any:
    return ranks[ranks["top_p"].isna() | (ranks["top_p"] == top_p)]


def claim1_lines(ranks: Any, info: Mapping[str, Mapping[str, Any]], *, top_p: float, k: int,
                 tasks: Sequence[str]) -> list[str]:
    """Per model: 2nd-token accuracy against chance, and 2nd - next (paired, same targets)."""
    main = _main(ranks, top_p)
    lines = []
    for model in dict.fromkeys(main["model"]):
        vocab = info[model]["vocab"]
        chance = k / vocab
        parts = []
        for task in tasks:
            n = _samples(main, model, task)
            nxt, second, groups = paired_hits(main, {"model": model, "task": task, "offset": 1},
                                              {"model": model, "task": task, "offset": 2})
            acc2 = accuracy_with_ci(second, groups=groups)
            above = verdict(acc2, threshold=chance, samples=n, min_samples=MIN_SAMPLES, digits=2, signed=False)
            step = verdict(paired_difference(second, nxt, groups=groups), direction="less", samples=n,
                           min_samples=MIN_SAMPLES)
            parts.append(f"{task}: 2nd token {ci_text(acc2)} against next {ci_text(accuracy_with_ci(nxt, groups=groups))}"
                         f" on the same {len(groups)} targets; above chance: {above.label}; 2nd - next {step.text}")
        lines.append(f"- **{model}** (chance level {chance:.1e}: {k} of {vocab:,} tokens): " + "; ".join(parts) + ".")
    return lines


def claim3_lines(ranks: Any, *, top_p: float, tasks: Sequence[str] = ("translation", "open-ended")) -> list[str]:
    """Per model and offset: translation - open-ended accuracy (unpaired: different samples)."""
    main = _main(ranks, top_p)
    first, second = tasks
    lines = []
    for model in dict.fromkeys(main["model"]):
        parts = []
        for off in (1, 2):
            a = main[(main["model"] == model) & (main["task"] == first) & (main["offset"] == off)]
            b = main[(main["model"] == model) & (main["task"] == second) & (main["offset"] == off)]
            diff = difference_with_ci(a["hit"].to_numpy(dtype=float), b["hit"].to_numpy(dtype=float),
                                      groups_a=a["sample"].tolist(), groups_b=b["sample"].tolist())
            n = min(a["sample"].nunique(), b["sample"].nunique())
            v = verdict(diff, samples=n, min_samples=MIN_SAMPLES)
            parts.append(f"{'next' if off == 1 else '2nd'} token {a['hit'].mean():.2f} ({first}) vs "
                         f"{b['hit'].mean():.2f} ({second}), difference {v.text}")
        lines.append(f"- **{model}**: " + "; ".join(parts) + ".")
    return lines


def claims_markdown(ranks: Any, acc: Any, nuc: Any, paper1: Any, paper4: Any, info: Mapping[str, Mapping[str, Any]],
                    *, top_p: float, k: int, tasks: Sequence[str]) -> str:
    """The chapter's section on the paper's claims: claims 1 and 3 with their verdicts, and our numbers
    beside the paper's Pythia of the same size as context."""
    out = []
    few = too_few_samples(ranks)
    if few is not None:
        out.append(f"*With {few} samples per task (this profile), a bootstrap over samples gives no usable interval: "
                   f"the numbers are reported below, but no verdict is drawn from fewer than {MIN_SAMPLES} samples "
                   "(\"not resolved\"). The `gpu` profile's 100 samples decide.*")
    out.append("**Claim 1, the 2nd token is predictable by marginalization and harder than the next.** The first "
               "half holds where the 2nd-token accuracy's interval lies above chance; the second where the paired "
               "difference 2nd - next (same targets, 95% cluster-bootstrap interval over samples) lies below "
               "zero:\n\n" + "\n".join(claim1_lines(ranks, info, top_p=top_p, k=k, tasks=tasks)))
    p160 = paper1[(paper1["family"] == "Pythia") & (paper1["model"] == "160M") & (paper1["offset"] == 2)]
    p160 = dict(zip(p160["task"], p160["accuracy"]))
    out.append("**Claim 3, a constrained context (translation) predicts better.** In the paper this holds from "
               "Pythia 410M up; below, open-ended text scores higher (Pythia 160M: 2nd token "
               f"{p160['translation']:.2f} on translation, {p160['open-ended']:.2f} open-ended). Ours, as the "
               "difference translation - open-ended (different samples: each task resampled on its own):\n\n"
               + "\n".join(claim3_lines(ranks, top_p=top_p, tasks=tasks)))
    out.append("**Beside Pythia of the same size**, as context and not as a test: the paper's values are read off "
               "its plot (±0.01), interpolated in log-parameters, on 10 samples of another dataset (IWSLT 2017, "
               "GPT-4o texts) with another tokenizer, so no verdict is drawn from them. Ours with 95% intervals:\n\n"
               + "\n".join(paper_context_rows(acc, nuc, paper1, paper4, info, tasks)))
    return "\n\n".join(out)
