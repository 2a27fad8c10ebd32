"""The logit lens: what each decoder layer would predict if the model stopped there.

For a causal LM with L decoder layers, let z^l_t be the output of layer l at position t (the residual
stream after layer l, before the final norm), l = 1..L. The logit lens reads it with the model's own
output head f_u = final norm + unembedding W_u (+ final logit soft-capping where the model has it):

    p_l(. | x_<=t) = softmax(f_u(z^l_t)),    so p_L is the model's own next-token distribution.

This module computes, for every layer and position,

- ``kl``: KL(p_l || p_L) in nats, the paper's Figure 2 (plotted against normalized depth l / L);
- ``entropy``: H(p_l) in nats (Figure 3 uses the last layer, H(p_L));
- ``nucleus``: the number of tokens in the top-p nucleus of p_l, the smallest set of most likely
  tokens whose mass reaches p (Figure 4 uses the last layer, p = 0.99 and 0.9);
- ``rank_next`` / ``rank_next2``: the rank of the reference next token x_{t+1} and of the token after
  it, x_{t+2}, in p_l (0 = most likely), from which top-k accuracies follow for any k.

Memory stays bounded: one forward pass keeps only the layer outputs ([L, T, d]); the [T, V] logits of
one layer are formed for a chunk of positions at a time and reduced on the fly, so [L, T, V] is never
materialized (:func:`layer_log_probs` does materialize it, for small inputs and tests). All softmax
arithmetic runs in float32 (or the ``dtype`` you pass), whatever the model's dtype; the final norm and
unembedding run in the model's dtype, as in its own forward pass, so the last layer reproduces the
model's output.

Typical use, on the evaluated positions of :mod:`mtp_lib.data` samples::

    stats = lens_stats_many(model, [s.input_ids for s in samples],
                            positions=[sorted(set(context_ends(s, 1)) | set(context_ends(s, 2))) for s in samples])
    stats.kl.mean(dim=1)                       # Figure 2: one value per layer, against stats.depth
    stats.top_k_accuracy(5, "next")            # logit-lens top-5 accuracy for x_{t+1}, per layer
    stats.top_k_accuracy(5, "next2")           # ... and for x_{t+2}
    stats.to_dataframe()                       # one row per layer and position, for seaborn

Every function takes the model itself or the ``LoadedModel`` of :func:`mtp_lib.models.load_model`, and
one sequence's ids as a tensor ``[T]`` or ``[1, T]``, a list or a tokenizer's ``BatchEncoding``
(:mod:`mtp_lib.inputs`).

(To score exactly the paper's last-20 targets, pick each target's own context end with
:meth:`LensStats.subset` before averaging.)

Comparable with the paper (Mehra et al. 2025, Section 2.2, Figures 2-3): the definition of p_l (final
norm before W_u, layer outputs 1..L), KL(p_l || p_L) in nats against normalized depth, entropy in nats.
Not comparable: the models (the book runs SmolLM2, Gemma 3 and tiny random models, the paper Pythia
and Llama 3; the offline weights are 4/5-bit quantizations dequantized to float), and the evaluation
text, which the paper does not fully specify. The paper has no top-k accuracy of the lens for x_{t+2};
that part (and :mod:`mtp_lib.probe`) goes beyond it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mtp_lib.inputs import as_ids as as_token_ids
from mtp_lib.inputs import as_model
from mtp_lib.inputs import as_positions as _check_positions
from mtp_lib.models import Adapter, get_adapter

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "LensStats",
    "as_token_ids",
    "hidden_states",
    "layer_log_probs",
    "lens_log_probs",
    "lens_stats",
    "lens_stats_many",
    "nucleus_sizes",
    "vocab_size",
]

DEFAULT_MAX_ELEMENTS = 2**22
"""Default bound on positions x vocabulary handled at once (16 MiB per float32 [chunk, V] tensor)."""


# --------------------------------------------------------------------------------------------------
# Inputs and small helpers


def vocab_size(model: Any) -> int:
    """The width of the model's logits: rows of the unembedding matrix."""
    model = as_model(model)
    return int(get_adapter(model).unembed_weight(model).shape[0])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_top_p(top_p: float | Sequence[float]) -> tuple[float, ...]:
    values = (float(top_p),) if isinstance(top_p, (int, float)) else tuple(float(p) for p in top_p)
    for p in values:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p values must lie in (0, 1], got {p}")
    return values


def _chunk_size(chunk: int | None, vocab: int) -> int:
    if chunk is None:
        return max(1, DEFAULT_MAX_ELEMENTS // vocab)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk (positions per step) must be a positive int or None, got {chunk!r}")
    return chunk


# --------------------------------------------------------------------------------------------------
# Layer outputs and their lens distributions


def hidden_states(model: Any, input_ids: Any) -> torch.Tensor:
    """The output of every decoder layer for one sequence: a [L, T, d] tensor, row l = layer l + 1.

    These are residual-stream states before the final norm (``output_hidden_states`` of Hugging Face
    models is not that: its last entry is already normed). Captured with forward hooks on the
    adapter's decoder layers during one forward pass of the decoder stack (no unembedding), without
    gradients. The tensor is in the model's dtype, on the device of its unembedding.
    """
    model = as_model(model)
    adapter = get_adapter(model)
    ids = as_token_ids(input_ids, vocab_size(model)).to(_model_device(model))
    layers = adapter.layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)
    head_device = adapter.unembed_weight(model).device  # layers may sit on several devices

    def hook(index: int) -> Any:
        def save(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[index] = out.detach().to(head_device)
        return save

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            adapter.base(model)(input_ids=ids[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i + 1 for i, c in enumerate(captured) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run in the forward pass")
    return torch.stack([c[0] for c in captured if c is not None])


def lens_log_probs(model: Any, hidden: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                   adapter: Adapter | None = None) -> torch.Tensor:
    """log softmax(f_u(hidden)) over the vocabulary, for hidden states [..., d] of any layer.

    f_u (final norm, unembedding, soft-capping) runs in the model's dtype; the softmax in ``dtype``.
    """
    model = as_model(model)
    adapter = adapter or get_adapter(model)
    weight = adapter.unembed_weight(model)
    logits = adapter.logits(model, hidden.to(device=weight.device, dtype=weight.dtype))
    return torch.log_softmax(logits.to(dtype), dim=-1)


def layer_log_probs(model: Any, input_ids: Any, *, dtype: torch.dtype = torch.float32,
                    max_elements: int = 2**28) -> torch.Tensor:
    """The logit lens of every layer, materialized: [L, T, V] log-probabilities.

    Row l (0-based) is log softmax(f_u(z^{l+1})); the last row is the model's own output. Meant for
    short inputs and small vocabularies; refuses more than ``max_elements`` numbers (use
    :func:`lens_stats`, which reduces on the fly, for long inputs or Gemma's 262k vocabulary).
    """
    model = as_model(model)
    adapter = get_adapter(model)
    hidden = hidden_states(model, input_ids)
    n_layers, length, _ = hidden.shape
    size = n_layers * length * vocab_size(model)
    if size > max_elements:
        raise ValueError(f"layer_log_probs would hold {n_layers} x {length} x {vocab_size(model)} = {size:,} "
                         f"numbers, more than max_elements={max_elements:,}: use lens_stats (bounded memory) "
                         "or raise max_elements")
    with torch.no_grad():
        return torch.stack([lens_log_probs(model, h, dtype=dtype, adapter=adapter) for h in hidden])


# --------------------------------------------------------------------------------------------------
# Reductions


def nucleus_sizes(log_probs: torch.Tensor, top_p: Sequence[float], *, start_k: int = 256) -> torch.Tensor:
    """Size of the top-p nucleus of each distribution: [len(top_p), ...] int64.

    The nucleus is the smallest set of most likely tokens whose total probability reaches p, so its
    size is 1 + the number of sorted cumulative sums below p (at most V). Exact, without sorting the
    whole vocabulary: the ``start_k`` most likely tokens are sorted first, and k grows eightfold for
    the distributions whose top k do not yet reach max(top_p).
    """
    values = _check_top_p(top_p)
    if not isinstance(start_k, int) or start_k < 1:
        raise ValueError(f"start_k must be a positive int, got {start_k!r}")
    vocab = log_probs.shape[-1]
    probs = log_probs.exp().reshape(-1, vocab)
    sizes = torch.empty(len(values), probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)
    k = min(start_k, vocab)
    while todo.numel() > 0:
        cum = probs[todo].topk(k, dim=-1, sorted=True).values.cumsum(dim=-1)
        done = cum[:, -1] >= max(values) if k < vocab else torch.ones_like(todo, dtype=torch.bool)
        for i, p in enumerate(values):  # beyond k the cumulative sum only grows: the count is final
            sizes[i, todo[done]] = ((cum[done] < p).sum(dim=-1) + 1).clamp_max(vocab)
        todo, k = todo[~done], min(vocab, 8 * k)
    return sizes.reshape(len(values), *log_probs.shape[:-1])


def _target_rank(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each target (number of tokens strictly more likely); -1 where target < 0."""
    valid = targets >= 0
    picked = log_probs.gather(-1, targets.clamp_min(0)[:, None])
    rank = (log_probs > picked).sum(dim=-1)
    return torch.where(valid, rank, torch.full_like(rank, -1))


@dataclasses.dataclass
class LensStats:
    """Per-layer, per-position statistics of the logit lens.

    Every tensor is [L, P] over layers 1..L (row 0 = layer 1) and the P analysed positions, on the CPU.
    A position t holds the distributions computed after reading x_0..x_t, i.e. predictions of x_{t+1}.
    Ranks are -1 where the target token lies beyond the end of the sequence.
    """

    positions: torch.Tensor  # [P] index t in its sequence
    sequence: torch.Tensor  # [P] which sequence (0 for a single call)
    kl: torch.Tensor  # KL(p_l || p_L), nats
    entropy: torch.Tensor  # H(p_l), nats
    nucleus: dict[float, torch.Tensor]  # top_p -> nucleus size of p_l
    rank_next: torch.Tensor  # rank of x_{t+1} in p_l
    rank_next2: torch.Tensor  # rank of x_{t+2} in p_l

    @property
    def n_layers(self) -> int:
        return int(self.kl.shape[0])

    @property
    def depth(self) -> torch.Tensor:
        """Normalized depth l / L of each row, as in the paper's Figure 2."""
        return torch.arange(1, self.n_layers + 1, dtype=torch.float64) / self.n_layers

    def _rank(self, target: str) -> torch.Tensor:
        if target == "next":
            return self.rank_next
        if target == "next2":
            return self.rank_next2
        raise ValueError(f"target must be 'next' (x_{{t+1}}) or 'next2' (x_{{t+2}}), got {target!r}")

    def top_k_hits(self, k: int = 5, target: str = "next") -> torch.Tensor:
        """[L, P] float: 1 where the target is among the k most likely tokens of p_l, NaN without target."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        rank = self._rank(target)
        hits = (rank < k).to(torch.float64)
        return torch.where(rank >= 0, hits, torch.full_like(hits, float("nan")))

    def top_k_accuracy(self, k: int = 5, target: str = "next") -> torch.Tensor:
        """[L]: share of positions (with a target) whose target is in the top k of p_l."""
        hits = self.top_k_hits(k, target)
        if bool(torch.isnan(hits).all()):
            raise ValueError(f"no analysed position has a {target!r} target inside its sequence")
        return hits.nanmean(dim=1)

    def to_dataframe(self) -> Any:
        """A long pandas table, one row per layer and position."""
        import pandas as pd

        n_layers, n_pos = self.kl.shape
        layer = torch.arange(1, n_layers + 1)[:, None].expand(n_layers, n_pos)
        columns: dict[str, Any] = {
            "layer": layer.reshape(-1).numpy(),
            "depth": (layer.to(torch.float64) / n_layers).reshape(-1).numpy(),
            "sequence": self.sequence[None].expand(n_layers, n_pos).reshape(-1).numpy(),
            "position": self.positions[None].expand(n_layers, n_pos).reshape(-1).numpy(),
            "kl": self.kl.reshape(-1).numpy(),
            "entropy": self.entropy.reshape(-1).numpy(),
        }
        for p, size in self.nucleus.items():
            columns[f"nucleus_{p:g}"] = size.reshape(-1).numpy()
        columns["rank_next"] = self.rank_next.reshape(-1).numpy()
        columns["rank_next2"] = self.rank_next2.reshape(-1).numpy()
        return pd.DataFrame(columns)

    def subset(self, index: torch.Tensor) -> LensStats:
        """The columns (positions) picked by ``index``: a boolean mask [P] or integer indices."""
        index = torch.as_tensor(index)
        pick = lambda x: x[..., index]  # noqa: E731
        return LensStats(positions=pick(self.positions), sequence=pick(self.sequence), kl=pick(self.kl),
                         entropy=pick(self.entropy), nucleus={p: pick(v) for p, v in self.nucleus.items()},
                         rank_next=pick(self.rank_next), rank_next2=pick(self.rank_next2))

    @staticmethod
    def concat(parts: Sequence[LensStats]) -> LensStats:
        """Join statistics of several calls along positions (same model, same top_p)."""
        if not parts:
            raise ValueError("parts is empty: pass at least one LensStats")
        keys = set(parts[0].nucleus)
        if any(set(p.nucleus) != keys or p.n_layers != parts[0].n_layers for p in parts):
            raise ValueError("parts differ in their number of layers or top_p values; compute them alike")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts], dim=-1)  # noqa: E731
        return LensStats(positions=cat("positions"), sequence=cat("sequence"), kl=cat("kl"),
                         entropy=cat("entropy"),
                         nucleus={p: torch.cat([s.nucleus[p] for s in parts], dim=-1) for p in parts[0].nucleus},
                         rank_next=cat("rank_next"), rank_next2=cat("rank_next2"))


def lens_stats(model: Any, input_ids: Any, *, top_p: Sequence[float] = (0.99, 0.9),
               positions: Any = None, chunk: int | None = None, dtype: torch.dtype = torch.float32,
               sequence_index: int = 0, progress: bool = False) -> LensStats:
    """Logit-lens statistics of one sequence for every layer, without materializing [L, T, V].

    ``positions`` (default: all) picks the positions t to analyse; targets are x_{t+1} and x_{t+2}
    of ``input_ids`` itself (teacher forcing). ``chunk`` positions are unembedded at a time (default:
    as many as keep chunk x V under :data:`DEFAULT_MAX_ELEMENTS`). ``dtype`` is the precision of the
    softmax arithmetic (float32; float64 for exact references).
    """
    model = as_model(model)
    adapter = get_adapter(model)
    vocab = vocab_size(model)
    ids = as_token_ids(input_ids, vocab).cpu()
    pos = _check_positions(positions, len(ids))
    top_p = _check_top_p(top_p)
    step = _chunk_size(chunk, vocab)
    hidden = hidden_states(model, ids)  # [L, T, d]
    n_layers = hidden.shape[0]
    device = hidden.device

    def target(offset: int) -> torch.Tensor:
        t = pos + offset
        return torch.where(t < len(ids), ids[t.clamp_max(len(ids) - 1)], torch.full_like(t, -1))

    targets = {1: target(1).to(device), 2: target(2).to(device)}
    kl = torch.empty(n_layers, len(pos))
    entropy = torch.empty(n_layers, len(pos))
    rank1 = torch.empty(n_layers, len(pos), dtype=torch.long)
    rank2 = torch.empty(n_layers, len(pos), dtype=torch.long)
    nucleus = torch.empty(len(top_p), n_layers, len(pos), dtype=torch.long)
    starts = range(0, len(pos), step)
    bar = tqdm(total=len(starts) * n_layers, desc="logit lens", disable=not progress, leave=False)
    with torch.no_grad():
        for start in starts:
            cols = slice(start, start + step)
            rows = pos[cols].to(device)
            final = lens_log_probs(model, hidden[-1, rows], dtype=dtype, adapter=adapter)
            for layer in range(n_layers):
                logp = final if layer == n_layers - 1 else lens_log_probs(model, hidden[layer, rows], dtype=dtype,
                                                                         adapter=adapter)
                probs = logp.exp()
                kl[layer, cols] = (probs * (logp - final)).sum(-1).clamp_min(0).cpu()
                entropy[layer, cols] = -(probs * logp).sum(-1).cpu()
                if top_p:
                    nucleus[:, layer, cols] = nucleus_sizes(logp, top_p).cpu()
                rank1[layer, cols] = _target_rank(logp, targets[1][cols]).cpu()
                rank2[layer, cols] = _target_rank(logp, targets[2][cols]).cpu()
                bar.update()
    bar.close()
    return LensStats(positions=pos, sequence=torch.full_like(pos, sequence_index), kl=kl, entropy=entropy,
                     nucleus={p: nucleus[i] for i, p in enumerate(top_p)}, rank_next=rank1, rank_next2=rank2)


def lens_stats_many(model: Any, sequences: Sequence[Any], *, positions: Sequence[Any] | None = None,
                    top_p: Sequence[float] = (0.99, 0.9), chunk: int | None = None,
                    dtype: torch.dtype = torch.float32, progress: bool = True) -> LensStats:
    """:func:`lens_stats` over several sequences, joined; ``positions`` holds one entry per sequence."""
    if len(sequences) == 0:
        raise ValueError("sequences is empty: pass at least one sequence of token ids")
    if positions is not None and len(positions) != len(sequences):
        raise ValueError(f"positions has {len(positions)} entries for {len(sequences)} sequences: pass one "
                         "per sequence (None for all positions of that sequence)")
    parts = [
        lens_stats(model, ids, top_p=top_p, positions=None if positions is None else positions[i], chunk=chunk,
                   dtype=dtype, sequence_index=i)
        for i, ids in enumerate(tqdm(sequences, desc="logit lens", disable=not progress))
    ]
    return LensStats.concat(parts)
