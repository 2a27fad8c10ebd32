"""Scoring heads: teacher-forced top-k hits per head (the paper's accuracy) and held-out losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtp_lib.heads import MTPModel
from mtp_lib.models import eval_mode
from mtp_lib.train.batches import TrainSample, collate
from mtp_lib.train.objective import Objective

__all__ = ["accuracy", "eval_losses", "evaluate"]


def _topk_hits(log_probs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each target is among the top ``k`` (fewer than ``k`` tokens score strictly higher)."""
    target_scores = log_probs.gather(-1, targets[:, None])
    return (log_probs > target_scores).sum(-1) < k


def _evaluation_targets(sample: TrainSample, last: int) -> range:
    from mtp_lib.data import evaluation_targets

    return evaluation_targets(sample, last)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(mtp: MTPModel, samples: Sequence[TrainSample], *, k: int = 5, last: int = 20,
             batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """Teacher-forced top-``k`` hits of every head, per sample: a list of bool [n_heads, last].

    ``hits[i][n - 1, m]``: head n, from the context ending at t = j - n, ranks x_j in its top k, for the
    m-th of the sample's last ``last`` target tokens j (:func:`mtp_lib.data.evaluation_targets`).
    """
    from tqdm.auto import tqdm

    if k < 1 or last < 1 or batch_size < 1:
        raise ValueError(f"k={k}, last={last} and batch_size={batch_size} must be positive")
    device = next(mtp.parameters()).device
    out: list[torch.Tensor] = []
    with eval_mode(mtp):
        for i in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress):
            chunk = samples[i:i + batch_size]
            batch = collate(chunk, 1).to(device)
            states = mtp(batch.input_ids, attention_mask=batch.attention_mask, return_logits=False).states
            for b, sample in enumerate(chunk):
                js = torch.tensor(list(_evaluation_targets(sample, last)), device=device)
                hits = []
                for n in range(mtp.n_heads):
                    if js[0] - (n + 1) < 0:
                        raise ValueError(f"sample {i + b}: head {n + 1} would need a context before token 0")
                    logits = mtp.unembed_states(states[n, b, js - (n + 1)]).float()
                    hits.append(_topk_hits(torch.log_softmax(logits, -1), batch.input_ids[b, js], k))
                out.append(torch.stack(hits).cpu())
    return out


def accuracy(hits: Sequence[torch.Tensor]) -> list[float]:
    """Per-head share of hits over all evaluated tokens of all samples (the paper's top-k accuracy)."""
    if not hits:
        raise ValueError("hits is empty")
    return torch.cat(list(hits), dim=1).float().mean(dim=1).tolist()


@torch.no_grad()
def eval_losses(objective: Objective, samples: Sequence[TrainSample], n_heads: int, batch_size: int,
                device: torch.device) -> list[float]:
    """Mean cross-entropy per head over all target tokens of ``samples`` (the objective's own loss)."""
    total = torch.zeros(n_heads, dtype=torch.float64)
    count = torch.zeros(n_heads, dtype=torch.float64)
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i:i + batch_size], n_heads).to(device)
        mean, _, k = objective(batch.input_ids, batch.attention_mask, batch.labels)
        total += (mean * k).double().cpu()
        count += k.double().cpu()
    return (total / count.clamp(min=1)).tolist()
