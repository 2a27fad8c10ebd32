"""Top-p nuclei: the candidates each intermediate distribution contributes to the marginal's sum.

The nucleus of a distribution is the smallest set of most probable tokens whose mass reaches
``top_p`` (the token that crosses the threshold included); its weights are renormalized over it.
Nuclei at several top-p values are prefixes of one sort, so they come out of one pass
(:func:`_nested_nucleus`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch

__all__ = ["Nucleus", "nucleus", "nucleus_size"]


@dataclasses.dataclass(frozen=True)
class Nucleus:
    """The top-p candidates of a batch of distributions, flattened row by row.

    Within a row the candidates come most probable first. ``log_weights`` are the renormalized
    log-probabilities (they sum to one over a row's candidates in probability space).
    """

    rows: torch.Tensor  # [N] long: which input row each candidate belongs to
    tokens: torch.Tensor  # [N] long: the candidate token ids
    log_weights: torch.Tensor  # [N] float64: log p(token) - log(mass kept in its row)
    sizes: torch.Tensor  # [R] long: candidates per row
    log_mass: torch.Tensor  # [R] float64: log of the probability mass the nucleus kept


def _check_top_p(top_p: float, name: str = "top_p") -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"{name}={top_p!r} must be a number in (0, 1]; use 1.0 for the whole vocabulary")
    return float(top_p)


def _as_log_probs(log_probs: torch.Tensor, name: str = "log_probs") -> torch.Tensor:
    """Normalized log-probabilities in float32 or wider (logits are accepted and normalized too)."""
    if not isinstance(log_probs, torch.Tensor) or not log_probs.is_floating_point() or log_probs.ndim == 0:
        raise ValueError(f"{name} must be a floating tensor of shape [..., V]")
    if log_probs.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension")
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    return torch.log_softmax(log_probs.to(dtype), dim=-1)


def _row_blocks(n_rows: int, n_cols: int, budget: int) -> Iterator[slice]:
    step = max(1, budget // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _nested_nucleus(log_probs: torch.Tensor, top_ps: Sequence[float], budget: int = 2**24
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nuclei of ``log_probs [R, V]`` (normalized) at several ``top_ps`` (ascending) in one sort.

    The nucleus at a smaller top-p is a prefix of the one at a larger top-p (same order), so the
    candidates are those of the largest and each gets one log weight per top-p (``-inf`` where that
    nucleus leaves it out). Returns ``rows [N]``, ``tokens [N]``, ``log_weights [N, m]`` (float64),
    ``sizes [R, m]`` and ``log_mass [R, m]`` (float64). Rows are processed in blocks of about
    ``budget`` elements so that the sort stays bounded in memory.
    """
    rows_out, toks_out, lw_out, sizes_out, mass_out = [], [], [], [], []
    n_rows, vocab = log_probs.shape
    for blk in _row_blocks(n_rows, vocab, budget):
        sorted_lp, order = log_probs[blk].sort(dim=-1, descending=True)
        probs = sorted_lp.double().exp()
        cum = probs.cumsum(dim=-1)
        before = cum - probs  # mass of the more probable tokens
        n_finite = torch.isfinite(sorted_lp).sum(dim=-1)
        sizes = torch.stack([
            n_finite if q >= 1.0 else torch.minimum((before < q).sum(dim=-1), n_finite) for q in top_ps
        ], dim=-1).clamp(min=1)
        log_mass = cum.gather(1, sizes - 1).log()
        n_max = sizes[:, -1]
        rows = torch.repeat_interleave(torch.arange(len(n_max), device=n_max.device), n_max)
        starts = torch.cumsum(n_max, 0) - n_max
        ranks = torch.arange(len(rows), device=rows.device) - starts[rows]
        lw = sorted_lp[rows, ranks].double()[:, None] - log_mass[rows]
        lw = lw.masked_fill(ranks[:, None] >= sizes[rows], -math.inf)
        rows_out.append(rows + blk.start)
        toks_out.append(order[rows, ranks])
        lw_out.append(lw)
        sizes_out.append(sizes)
        mass_out.append(log_mass)
    return (torch.cat(rows_out), torch.cat(toks_out), torch.cat(lw_out), torch.cat(sizes_out),
            torch.cat(mass_out))


def nucleus(log_probs: torch.Tensor, top_p: float) -> Nucleus:
    """The top-p nucleus of each row of ``log_probs`` (``[V]`` or ``[R, V]``; logits are fine too).

    The nucleus is the smallest set of most probable tokens whose mass reaches ``top_p``: the token
    that crosses the threshold is included, and a row keeps at least one token. ``top_p=1.0`` keeps
    every token of nonzero probability. Masses are summed in float64.
    """
    top_p = _check_top_p(top_p)
    lp = _as_log_probs(log_probs)
    flat = lp.reshape(-1, lp.shape[-1])
    rows, tokens, lw, sizes, log_mass = _nested_nucleus(flat, [top_p])
    return Nucleus(rows=rows, tokens=tokens, log_weights=lw[:, 0], sizes=sizes[:, 0], log_mass=log_mass[:, 0])


def nucleus_size(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """How many tokens the top-p nucleus of each distribution holds: ``[..., V] -> [...]`` (long)."""
    top_p = _check_top_p(top_p)
    lp = _as_log_probs(log_probs)
    flat = lp.reshape(-1, lp.shape[-1])
    out = []
    for blk in _row_blocks(flat.shape[0], flat.shape[1], 2**24):
        sorted_lp = flat[blk].sort(dim=-1, descending=True).values
        n_finite = torch.isfinite(sorted_lp).sum(dim=-1)
        if top_p >= 1.0:
            out.append(n_finite)
            continue
        probs = sorted_lp.double().exp()
        before = probs.cumsum(dim=-1) - probs
        out.append(torch.minimum((before < top_p).sum(dim=-1), n_finite).clamp(min=1))
    return torch.cat(out).reshape(lp.shape[:-1])

