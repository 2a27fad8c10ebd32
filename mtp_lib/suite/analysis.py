"""The paper's analyses on one trained size: Chapter 1's marginalization and Chapter 2's logit lens.

Per sample and evaluated target x_j (the last ``last`` target tokens, as Chapter 1):
- next token: is x_j in the top-k of p(x_j | x<=j-1)?
- 2nd token: is x_j in the top-k of the top-p marginal p(x_j | x<=j-2) = sum_y p(x_j | x<=j-2, y) p(y | x<=j-2)
  (:func:`mtp_lib.marginal.marginalize`), and how many candidates y the nucleus holds;
- logit lens: KL(p_l || p_L) at every layer l for the context ends j-1 (:func:`mtp_lib.lens.lens_stats`).

Everything is stored per sample, so that intervals are a bootstrap over samples and comparisons
between sizes can be paired (the same samples for every size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mtp_lib import data, metrics
from mtp_lib.lens import lens_stats
from mtp_lib.marginal import marginalize

__all__ = ["lens_kl", "marginal_hits"]


def _sample_hits(model: torch.nn.Module, sample: data.Sample, *, last: int, k: int, top_p: float,
                 nucleus_top_p: Sequence[float], chunk: int | None) -> dict[str, Any]:
    ids = torch.tensor(sample.input_ids)
    targets = list(data.evaluation_targets(sample, last))
    ends = sorted({j - 2 for j in targets} | {j - 1 for j in targets})  # contexts of the 2nd and next token
    extra = [q for q in nucleus_top_p if q < top_p]
    res = marginalize(model, ids[None], depth=2, top_p=top_p, positions=ends, extra_top_p=extra,
                      max_tokens_per_chunk=chunk)
    row = {t: i for i, t in enumerate(ends)}
    refs = ids[targets]
    at_next = torch.tensor([row[j - 1] for j in targets])
    at_2nd = torch.tensor([row[j - 2] for j in targets])
    hits1 = metrics.topk_hits(res.log_probs[at_next, 0], refs, k)
    hits2 = metrics.topk_hits(res.log_probs[at_2nd, 1], refs, k)
    nuclei = {f"{q:g}": res.nucleus_size(q)[at_2nd].tolist() for q in sorted({top_p, *extra})}
    return {"id": sample.id, "next": hits1.int().tolist(), "second": hits2.int().tolist(), "nucleus": nuclei}


def marginal_hits(model: torch.nn.Module, samples: Sequence[data.Sample], *, last: int = 20, k: int = 5,
                  top_p: float = 0.99, nucleus_top_p: Sequence[float] = (0.9,), chunk: int | None = None
                  ) -> list[dict[str, Any]]:
    """Per sample: top-k hits of the next and the 2nd token at each evaluated target, and the
    nucleus sizes of the intermediate token (at ``top_p`` and each smaller ``nucleus_top_p``)."""
    was_training = model.training
    model.eval()
    try:
        return [_sample_hits(model, s, last=last, k=k, top_p=top_p, nucleus_top_p=nucleus_top_p, chunk=chunk)
                for s in samples]
    finally:
        model.train(was_training)


def lens_kl(model: torch.nn.Module, samples: Sequence[data.Sample], *, last: int = 20) -> list[list[float]]:
    """Per sample: mean KL(p_l || p_L) in nats over the next-token contexts j-1, for layers 1..L."""
    out = []
    for s in samples:
        ends = [j - 1 for j in data.evaluation_targets(s, last)]
        stats = lens_stats(model, torch.tensor(s.input_ids), positions=ends, top_p=(0.9,))
        out.append([round(float(v), 5) for v in stats.kl.mean(dim=1)])
    return out
