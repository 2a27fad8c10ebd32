"""A tuned lens: one affine translator per layer, trained to reproduce the model's own output.

The logit lens (:mod:`mtp_lib.lens`) reads layer l's output z^l with the model's head f_u (final norm,
unembedding, soft-capping): p_l = softmax(f_u(z^l)). Intermediate layers need not use the coordinates
the head reads, so p_l can be far from the output p_L (and badly calibrated) even where the layer
already holds the answer. The tuned lens of Belrose et al. (2023, "Eliciting Latent Predictions from
Transformers with the Tuned Lens"; AlignmentResearch/tuned-lens) learns, per layer, an affine map in
front of the frozen head,

    q_l = softmax(f_u(z^l + B_l z^l + b_l)),    B_l = 0, b_l = 0 at the start (q_l = p_l),

trained to minimize the KL divergence *from the model's output*,

    KL(p_L || q_l) = sum_x p_L(x) (log p_L(x) - log q_l(x)),

averaged over positions. The translator is added residually (h + B h + b, as tuned-lens does) so that
weight decay pulls it towards the identity, i.e. towards the logit lens. Like tuned-lens, the last
layer has no translator (its lens is the output) and the model is never changed.

What differs from tuned-lens's defaults (SGD with Nesterov momentum, 250 steps of 2^18 tokens of the
Pile, gradient clipping at 1): the budget is the book's, a few hundred positions per step from the
book's own text, so training uses AdamW with a cosine-annealed learning rate (as the probes of
:mod:`mtp_lib.probe`, whose :class:`~mtp_lib.probe.AffineProbe` is the translator) and clips the
gradient at 1.

Typical use::

    train = probe.collect_probe_data(model, train_ids, offsets=(1,))
    test = probe.collect_probe_data(model, test_ids, offsets=(1,))
    fit = fit_tuned_lens(model, train, layers=[3, 6, 9], steps=300, seed=0)
    scores = compare_lenses(model, fit.lens, test)   # per layer and position: KL, NLL, top-k hits
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mtp_lib.lens import DEFAULT_MAX_ELEMENTS, _target_rank
from mtp_lib.probe import AffineProbe, OutputHead, ProbeData, _micro_batch, _resolve

__all__ = ["LensScores", "TunedLens", "TunedLensFit", "compare_lenses", "fit_tuned_lens", "kl_divergence"]


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)) over the last axis, from log-probabilities.

    Terms with p(x) = 0 count 0 (x log x -> 0), so a token that p rules out costs nothing. With
    ``log_q = 0`` it is -H(p), minus the entropy.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


class TunedLens(nn.Module):
    """One residual affine translator (:class:`~mtp_lib.probe.AffineProbe`) per chosen layer (1-based)."""

    def __init__(self, d_model: int, layers: Sequence[int]) -> None:
        super().__init__()
        chosen = [int(layer) for layer in layers]
        if not chosen or min(chosen) < 1 or len(set(chosen)) != len(chosen):
            raise ValueError(f"layers must be distinct 1-based layer numbers, got {list(layers)!r}")
        self.layers = chosen
        self.translators = nn.ModuleList([AffineProbe(d_model) for _ in chosen])

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """z -> z + B_l z + b_l for layer ``layer`` (1-based)."""
        if layer not in self.layers:
            raise ValueError(f"the lens has no translator for layer {layer}; it has {self.layers}")
        return self.translators[self.layers.index(layer)](hidden)  # type: ignore[no-any-return]


@dataclasses.dataclass
class TunedLensFit:
    """A trained lens and, per translator, its training loss KL(p_L || q_l) in nats at every step."""

    lens: TunedLens
    losses: list[list[float]]


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    chosen = list(range(1, n_layers)) if layers is None else [int(layer) for layer in layers]
    if not chosen or min(chosen) < 1 or max(chosen) > n_layers - 1:
        raise ValueError(f"layers must be 1-based layer numbers in [1, {n_layers - 1}] (the last layer, {n_layers}, "
                         f"is the output itself and needs no translator), got {layers!r}")
    return chosen


def fit_tuned_lens(model: nn.Module, data: ProbeData, *, layers: Sequence[int] | None = None, steps: int = 300,
                   batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0,
                   device: str | torch.device | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   progress: bool = True) -> TunedLensFit:
    """Train a translator for each of ``layers`` (default: 1..L-1) on the positions of ``data``.

    Each step draws ``batch_size`` positions (without replacement, reshuffled each epoch by ``seed``),
    computes the model's output log p_L = log softmax(f_u(z^L)) once, and for every layer adds
    KL(p_L || q_l) / batch to the loss; one AdamW step (weight decay on B_l and b_l), gradient norm
    clipped at 1, cosine-annealed learning rate. Unembeds at most ``max_elements`` numbers at a time.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if len(data) == 0:
        raise ValueError("data holds no positions: collect more text")
    chosen = _check_layers(layers, data.n_layers)
    dev = _resolve(device, model)
    head = OutputHead(model, dev)
    micro = _micro_batch(max_elements, head.weight.shape[0])
    lens = TunedLens(int(data.hidden.shape[2]), chosen).to(dev)
    opt = torch.optim.AdamW(lens.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    batch = min(batch_size, n)
    order, cursor = torch.randperm(n, generator=g), 0
    losses: list[list[float]] = [[] for _ in chosen]
    for _ in tqdm(range(steps), desc="tuned lens", disable=not progress, leave=False):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=g), 0
        index = order[cursor:cursor + batch]
        cursor += batch
        opt.zero_grad(set_to_none=True)
        totals = [0.0] * len(chosen)
        for part in index.split(micro):
            with torch.no_grad():
                log_p = torch.log_softmax(head(data.hidden[-1, part].to(dev)).float(), -1)
            for i, layer in enumerate(chosen):
                h = data.hidden[layer - 1, part].to(device=dev, dtype=torch.float32)
                log_q = torch.log_softmax(head(lens.translate(h, layer)).float(), -1)
                loss = kl_divergence(log_p, log_q).sum() / batch
                loss.backward()
                totals[i] += float(loss.detach())
        nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        sched.step()
        for i, total in enumerate(totals):
            losses[i].append(total)
    return TunedLensFit(lens.eval(), losses)


@dataclasses.dataclass
class LensScores:
    """Per layer (rows: layers 1..L) and position (columns), for the logit lens p_l and the tuned lens q_l.

    ``kl_*`` is KL(lens || p_L) (the paper's direction), ``kl_*_from_output`` KL(p_L || lens) (the
    tuned lens's training objective); ``nll_*`` is -log of the next token x_{t+1}; ``hit_*`` whether
    x_{t+1} is in the lens's top k. The tuned rows are NaN where the lens has no translator; at layer L
    both lenses are the output. ``sequence`` [N] says which sequence each position comes from.
    """

    layers: list[int]
    tuned_layers: list[int]
    kl_logit: torch.Tensor
    kl_tuned: torch.Tensor
    kl_logit_from_output: torch.Tensor
    kl_tuned_from_output: torch.Tensor
    nll_logit: torch.Tensor
    nll_tuned: torch.Tensor
    hit_logit: torch.Tensor
    hit_tuned: torch.Tensor
    entropy_logit: torch.Tensor
    entropy_tuned: torch.Tensor
    sequence: torch.Tensor


def compare_lenses(model: nn.Module, lens: TunedLens, data: ProbeData, *, k: int = 5,
                   device: str | torch.device | None = None,
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> LensScores:
    """Score the logit lens (every layer) and ``lens`` (its layers) on held-out positions of ``data``.

    ``data`` needs the next-token targets (offset 1). float64 arithmetic follows the model's dtype.
    """
    if 1 not in data.targets:
        raise ValueError(f"data has no next-token targets (offsets {sorted(data.targets)}); collect it with offsets=(1,)")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_layers(lens.layers, data.n_layers)
    dev = _resolve(device, model)
    head = OutputHead(model, dev)
    lens = lens.to(dev)
    micro = _micro_batch(max_elements, head.weight.shape[0])
    n_layers, n = data.n_layers, len(data)
    fdtype = torch.float64 if head.dtype == torch.float64 else torch.float32
    out = {key: torch.full((n_layers, n), float("nan"), dtype=torch.float64)
           for key in ("kl_logit", "kl_tuned", "kl_logit_from_output", "kl_tuned_from_output", "nll_logit",
                       "nll_tuned", "hit_logit", "hit_tuned", "entropy_logit", "entropy_tuned")}
    with torch.no_grad():
        for part in torch.arange(n).split(micro):
            y = data.targets[1][part].to(dev)
            log_p = torch.log_softmax(head(data.hidden[-1, part].to(dev)).to(fdtype), -1)
            for layer in range(1, n_layers + 1):
                h = data.hidden[layer - 1, part].to(device=dev, dtype=head.dtype)
                readers = {"logit": h}
                if layer in lens.layers:
                    readers["tuned"] = lens.translate(h.to(next(lens.parameters()).dtype), layer)
                elif layer == n_layers:
                    readers["tuned"] = h
                for name, z in readers.items():
                    log_q = torch.log_softmax(head(z).to(fdtype), -1)
                    row = {f"kl_{name}": kl_divergence(log_q, log_p), f"kl_{name}_from_output": kl_divergence(log_p, log_q),
                           f"nll_{name}": -log_q.gather(-1, y[:, None])[:, 0],
                           f"hit_{name}": (_target_rank(log_q, y) < k).to(fdtype),
                           f"entropy_{name}": kl_divergence(log_q, torch.zeros_like(log_q)).neg()}
                    for key, value in row.items():
                        out[key][layer - 1, part] = value.double().cpu()
    return LensScores(layers=list(range(1, n_layers + 1)), tuned_layers=list(lens.layers), sequence=data.sequence,
                      **out)
