"""Top-k accuracy, nucleus sizes and their confidence intervals, shared by every chapter.

The core is pure functions on tensors (any ``[..., V]`` log-probabilities: the next-token
distribution, a marginal from :mod:`mtp_lib.marginal`, a logit-lens layer or an MTP head):

- :func:`reference_targets` the reference tokens ``x_{t+d+1}`` of each context end ``t``;
- :func:`target_rank` / :func:`topk_hits` where the reference falls in the predicted distribution;
- :func:`nucleus_size` how many tokens the top-p nucleus holds (from :mod:`mtp_lib.marginal`);
- :func:`accuracy_with_ci` / :func:`mean_with_ci` a mean with a confidence interval.

Confidence intervals: positions of one sample are correlated (same text, same context), so when
``groups`` (one sample id per value) is given the interval is a *cluster bootstrap*: samples are
resampled with replacement and the pooled mean recomputed, percentile interval. This is the
interval the book reports. Without groups, :func:`accuracy_with_ci` gives the Wilson score interval
and :func:`mean_with_ci` a bootstrap over the values, both treating the values as independent.
With fewer than two groups no between-sample spread can be estimated and the bounds are NaN.

On top, pandas helpers for the chapters: :func:`position_table` (one row per position and offset,
per sample), :func:`marginal_table` (the same for every top-p a marginalization computed) and
:func:`summarize` (per offset, with intervals), :func:`per_sample`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from mtp_lib.marginal import MarginalResult, nucleus_size

__all__ = [
    "Interval",
    "accuracy_with_ci",
    "marginal_table",
    "mean_with_ci",
    "nucleus_size",
    "per_sample",
    "position_table",
    "reference_targets",
    "summarize",
    "target_rank",
    "topk_hits",
    "wilson_interval",
]


class Interval(NamedTuple):
    """A mean and its confidence interval (NaN bounds when none can be estimated)."""

    mean: float
    lo: float
    hi: float


# --------------------------------------------------------------------------------------------------
# Targets, ranks, hits


def reference_targets(input_ids: torch.Tensor, positions: Sequence[int] | torch.Tensor, depth: int) -> torch.Tensor:
    """``[P, depth]`` reference tokens: ``[i, d] = input_ids[t + d + 1]`` for ``t = positions[i]``,
    ``-1`` where that lies beyond the end of the text."""
    ids = input_ids.reshape(-1) if input_ids.ndim == 2 and input_ids.shape[0] == 1 else input_ids
    if ids.ndim != 1:
        raise ValueError(f"input_ids must have shape [T] or [1, T], got {tuple(input_ids.shape)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be an integer >= 1")
    pos = torch.as_tensor(positions, device=ids.device).long().reshape(-1)
    if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= len(ids)):
        raise ValueError(f"positions must lie in [0, {len(ids) - 1}]")
    idx = pos[:, None] + torch.arange(1, depth + 1, device=ids.device)
    valid = idx < len(ids)
    return torch.where(valid, ids[idx.clamp(max=len(ids) - 1)], torch.full_like(idx, -1))


def _check_pair(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_probs, torch.Tensor) or not log_probs.is_floating_point() or log_probs.ndim < 1:
        raise ValueError("log_probs must be a floating tensor of shape [..., V]")
    targets = torch.as_tensor(targets, device=log_probs.device)
    if targets.is_floating_point() or targets.shape != log_probs.shape[:-1]:
        raise ValueError(f"targets must be integer token ids of shape {tuple(log_probs.shape[:-1])} "
                         f"(log_probs without its last dimension), got {tuple(targets.shape)}")
    vocab = log_probs.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}); drop positions without a reference (-1) first")
    return targets.long()


def target_rank(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many tokens are strictly more probable than the target: 0 = top-1. ``[..., V], [...] -> [...]``.

    Ties count in the target's favour (a target tied for first place has rank 0), so the result
    does not depend on how a sort breaks ties.
    """
    targets = _check_pair(log_probs, targets)
    target_lp = log_probs.gather(-1, targets[..., None])
    return (log_probs > target_lp).sum(dim=-1)


def topk_hits(log_probs: torch.Tensor, targets: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Whether each target is among the ``k`` most probable tokens: ``[..., V], [...] -> bool [...]``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    return target_rank(log_probs, targets) < k


# --------------------------------------------------------------------------------------------------
# Confidence intervals


def _check_level(level: float) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level={level!r} must be in (0, 1), e.g. 0.95")
    return float(level)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of a proportion ``successes / n``."""
    level = _check_level(level)
    if n <= 0:
        raise ValueError(f"n={n} must be positive")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _group_keys(groups: Sequence[Hashable] | torch.Tensor) -> list[Hashable]:
    """One group key per value, as a list."""
    return groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)


def _group_sums(values: torch.Tensor, groups: Sequence[Hashable] | torch.Tensor | None,
                order: Sequence[Hashable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums and counts (each value its own group when ``groups`` is None), the groups in
    the order they first appear, or in ``order`` (which must name every group)."""
    if groups is None:
        return values, torch.ones_like(values)
    keys = _group_keys(groups)
    if len(keys) != len(values):
        raise ValueError(f"groups must give one group per value: {len(keys)} groups for {len(values)} values")
    index: dict[Hashable, int] = {key: i for i, key in enumerate(order or [])}
    if order is not None and not set(keys) <= index.keys():
        raise ValueError(f"groups {sorted(set(keys) - index.keys(), key=str)[:5]} are not in the given order")
    ids = torch.tensor([index.setdefault(key, len(index)) for key in keys], dtype=torch.long)
    sums = torch.zeros(len(index), dtype=torch.float64).index_add_(0, ids, values)
    counts = torch.zeros(len(index), dtype=torch.float64).index_add_(0, ids, torch.ones_like(values))
    return sums, counts


def _bootstrap(sums: torch.Tensor, counts: torch.Tensor, level: float, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the pooled mean ``sum(sums) / sum(counts)`` over resampled groups."""
    n_groups = len(sums)
    gen = torch.Generator().manual_seed(seed)
    stats = []
    batch = max(1, 2**22 // n_groups)
    for start in range(0, n_boot, batch):
        idx = torch.randint(n_groups, (min(batch, n_boot - start), n_groups), generator=gen)
        stats.append(sums[idx].sum(1) / counts[idx].sum(1))
    boot = torch.cat(stats)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boot, q).tolist()
    return lo, hi


def _as_values(values: Any, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        out = values.detach().cpu().reshape(-1).double()
    else:
        out = torch.tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    if out.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} holds non-finite values")
    return out


def mean_with_ci(values: Any, *, groups: Sequence[Hashable] | torch.Tensor | None = None, level: float = 0.95,
                 n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``values`` with a bootstrap percentile interval.

    With ``groups`` (one sample id per value) whole groups are resampled (cluster bootstrap) and the
    mean is the pooled mean over all values; without, values are resampled one by one.
    """
    level = _check_level(level)
    vals = _as_values(values, "values")
    sums, counts = _group_sums(vals, groups)
    mean = float(vals.mean())
    if len(sums) < 2:
        return Interval(mean, math.nan, math.nan)
    return Interval(mean, *_bootstrap(sums, counts, level, n_boot, seed))


def accuracy_with_ci(hits: Any, *, groups: Sequence[Hashable] | torch.Tensor | None = None, level: float = 0.95,
                     n_boot: int = 2000, seed: int = 0) -> Interval:
    """Share of hits with a confidence interval: cluster bootstrap over ``groups`` when given
    (what the book reports), else the Wilson score interval over independent hits."""
    level = _check_level(level)
    vals = _as_values(hits, "hits")
    if not ((vals == 0) | (vals == 1)).all():
        raise ValueError("hits must be booleans (or 0/1)")
    if groups is None:
        return wilson_interval(int(vals.sum()), len(vals), level)
    return mean_with_ci(vals, groups=groups, level=level, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------------
# Tables for the chapters


def position_table(log_probs: torch.Tensor, targets: torch.Tensor, *, positions: Sequence[int] | torch.Tensor | None = None,
                   sample: Hashable = 0, k: int = 5, top_ps: Sequence[float] = (0.99, 0.9),
                   columns: Mapping[str, Sequence[Any] | torch.Tensor] | None = None) -> Any:
    """One row per (position, offset) with a reference token: a pandas DataFrame.

    ``log_probs [P, D, V]`` (e.g. ``MarginalResult.log_probs``: offset ``d + 1`` predicts
    ``x_{t+d+1}``) and ``targets [P, D]`` from :func:`reference_targets` (``-1`` rows are dropped).
    Columns: ``sample``, ``position`` (the context end t), ``offset`` (1 = next token), ``target``,
    ``rank`` (:func:`target_rank`), ``hit`` (rank < k), and ``nucleus_<p>`` for each top-p: the size of
    the next-token nucleus at t, i.e. the candidates the marginalization sums over. ``columns``
    adds more per-position values (one per row of ``log_probs``).
    """
    import pandas as pd

    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must have shape [P, D, V], got {tuple(log_probs.shape)}")
    n_pos, depth, _ = log_probs.shape
    targets = torch.as_tensor(targets, device=log_probs.device)
    if targets.shape != (n_pos, depth):
        raise ValueError(f"targets must have shape [{n_pos}, {depth}], got {tuple(targets.shape)}")
    pos = torch.arange(n_pos) if positions is None else torch.as_tensor(positions).reshape(-1)
    if len(pos) != n_pos:
        raise ValueError(f"positions must give one context end per row of log_probs ({n_pos}), got {len(pos)}")
    valid = targets >= 0
    safe = targets.clamp(min=0)
    ranks = target_rank(log_probs, safe)
    sizes = {f"nucleus_{q:g}": nucleus_size(log_probs[:, 0], q).cpu() for q in top_ps}
    rows_i, offs = valid.nonzero(as_tuple=True)
    rows_c, offs_c = rows_i.cpu(), offs.cpu()
    table = pd.DataFrame({
        "sample": [sample] * len(rows_c),
        "position": pos.cpu()[rows_c].tolist(),
        "offset": (offs_c + 1).tolist(),
        "target": targets[rows_i, offs].cpu().tolist(),
        "rank": ranks[rows_i, offs].cpu().tolist(),
    })
    table["hit"] = table["rank"] < k
    for name, size in sizes.items():
        table[name] = size[rows_c].tolist()
    for name, values in (columns or {}).items():
        vals = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if len(vals) != n_pos:
            raise ValueError(f"columns[{name!r}] must give one value per position ({n_pos}), got {len(vals)}")
        table[name] = [vals[i] for i in rows_c.tolist()]
    return table


def marginal_table(result: MarginalResult, input_ids: torch.Tensor, *, sample: Hashable = 0, k: int = 5,
                   top_ps: Sequence[float] = (0.99, 0.9)) -> Any:
    """:func:`position_table` of a :class:`~mtp_lib.marginal.MarginalResult`, one block per top-p it
    computed (its ``top_p`` and ``extra_top_p``), with columns ``top_p`` and ``candidates`` (the
    next-token nucleus at that top-p: what the marginal at offset 2 cost, in extra tokens).

    ``summarize(table, by=["top_p"])`` then gives accuracy against top-p, with its cost.
    """
    import pandas as pd

    targets = reference_targets(input_ids, result.positions, result.depth)
    blocks = []
    for q in sorted([result.top_p, *result.extra_log_probs]):
        block = position_table(result.at(q), targets, positions=result.positions, sample=sample, k=k, top_ps=top_ps,
                               columns={"candidates": result.nucleus_size(q)})
        block.insert(1, "top_p", q)
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def per_sample(table: Any) -> Any:
    """Accuracy, positions and mean nucleus sizes per sample and offset (a pandas DataFrame)."""
    nuc = [c for c in table.columns if c.startswith("nucleus_")]
    agg = {"accuracy": ("hit", "mean"), "positions": ("hit", "size"), **{c: (c, "mean") for c in nuc}}
    return table.groupby(["sample", "offset"], sort=True).agg(**agg).reset_index()


def summarize(table: Any, *, by: Sequence[str] = (), level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Any:
    """Per offset (and the ``by`` columns): accuracy and mean nucleus sizes (``nucleus_*`` and
    ``candidates`` columns) with cluster-bootstrap intervals over samples (:func:`accuracy_with_ci`,
    :func:`mean_with_ci` with ``groups=sample``; NaN bounds with a single sample)."""
    import pandas as pd

    if len(table) == 0:
        raise ValueError("table is empty")
    nuc = [c for c in table.columns if c.startswith("nucleus_") or c == "candidates"]
    out = []
    for key, part in table.groupby([*by, "offset"], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        groups = part["sample"].tolist()
        acc = accuracy_with_ci(part["hit"].to_numpy(), groups=groups, level=level, n_boot=n_boot, seed=seed)
        row: dict[str, Any] = dict(zip([*by, "offset"], key))
        row.update(positions=len(part), samples=part["sample"].nunique(), accuracy=acc.mean, accuracy_lo=acc.lo,
                   accuracy_hi=acc.hi)
        for c in nuc:
            m = mean_with_ci(part[c].to_numpy(), groups=groups, level=level, n_boot=n_boot, seed=seed)
            row.update({c: m.mean, f"{c}_lo": m.lo, f"{c}_hi": m.hi})
        out.append(row)
    return pd.DataFrame(out)
