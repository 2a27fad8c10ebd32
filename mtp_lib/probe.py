"""Linear probes per layer (tuned-lens style): at which depth is the token after next readable?

The logit lens (:mod:`mtp_lib.lens`) reads layer l's output z^l with the model's own head f_u (final
norm + unembedding). A probe adds one learned affine map per layer in front of that frozen head,

    q_l(x | x_<=t) = softmax(f_u(A_l z^l_t + b_l)),    A_l = I + Delta_l,

initialised at Delta_l = 0, b_l = 0, i.e. at the logit lens itself. Trained with cross-entropy on
x_{t+1} it is the tuned lens (Belrose et al. 2023); trained on x_{t+2} it measures how much of the
token after next a layer holds in a linearly readable form. Plotted against depth, the x_{t+2} curve
shows where second-token information is most available: the evidence behind weighted hidden states
(WHS, :mod:`mtp_lib.heads`), which feed MTP heads a learned mixture of layers instead of the last one.

Training works on plain tensors: hidden states [N, d] of one layer and targets [N]
(:func:`fit_probe`); :func:`collect_probe_data` gathers them from a model and token sequences, and
:func:`layerwise_probes` fits and scores one probe per layer on held-out sequences. Weight decay
pulls Delta_l (not A_l) towards zero, i.e. towards the logit lens. Memory: Delta_l is d x d; the
unembedding of a large vocabulary (Gemma: 262k) dominates, so each step unembeds a bounded number of
positions at a time (``max_elements``) and accumulates gradients. The model is never modified: the
probe trains against a frozen copy of its final norm and unembedding.

Typical use::

    data = collect_probe_data(model, [s.input_ids for s in samples], offsets=(1, 2))
    train, test = data.split(test_fraction=0.25, seed=0)           # by whole texts
    second = layerwise_probes(model, train, test, offset=2, steps=300, seed=0)
    tuned = layerwise_probes(model, train, test, offset=1, steps=300, seed=0)
    second.to_dataframe()   # per layer: top-5 accuracy and nll of the lens and of the probe

Comparable with the paper: nothing directly. Mehra et al. (2025) use the logit lens only (KL to the
final layer, Figure 2) and never probe x_{t+2}; these probes go beyond it. Their top-5 accuracies are
teacher-forced on reference text like the paper's, but a probe is one affine map per layer trained
on a few thousand positions, far weaker than the paper's MTP heads (a full transformer layer trained
on 200k samples), so its accuracy is a lower bound on what a layer holds, not a head's accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mtp_lib.inputs import as_model
from mtp_lib.lens import DEFAULT_MAX_ELEMENTS, _check_positions, _target_rank, as_token_ids, hidden_states, vocab_size
from mtp_lib.models import get_adapter

__all__ = [
    "AffineProbe",
    "LayerwiseProbes",
    "OutputHead",
    "ProbeData",
    "ProbeFit",
    "ProbeScore",
    "collect_probe_data",
    "evaluate_probe",
    "fit_probe",
    "layerwise_probes",
]


class AffineProbe(nn.Module):
    """h -> A h + b with A = I + delta; starts at the identity (delta = 0, b = 0)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self.delta = nn.Parameter(torch.zeros(d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    @property
    def weight(self) -> torch.Tensor:
        """The matrix A = I + delta."""
        return torch.eye(self.delta.shape[0], device=self.delta.device) + self.delta

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.linear(hidden, self.delta, self.bias)


class OutputHead(nn.Module):
    """A frozen copy of a model's f_u: final norm, unembedding, final logit soft-capping.

    Same computation as ``get_adapter(model).logits(model, h)``, but detached from the model so that
    training a probe neither touches the model's gradients nor needs the model on ``device``.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        super().__init__()
        adapter = get_adapter(model)
        self.norm = copy.deepcopy(adapter.final_norm(model))
        self.unembed = copy.deepcopy(adapter.unembed(model))
        cap = getattr(model.config, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.requires_grad_(False)
        if device is not None:
            self.to(device)

    @property
    def weight(self) -> torch.Tensor:
        """The copied unembedding's weight, [vocabulary, hidden]."""
        return cast(torch.Tensor, self.unembed.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.unembed(self.norm(hidden.to(self.dtype)))
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def _resolve(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or None (the model's)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use 'cpu' or None")
    return dev


def _micro_batch(max_elements: int, vocab: int) -> int:
    if not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be a positive int, got {max_elements!r}")
    return max(1, max_elements // vocab)


def _check_pair(hidden: torch.Tensor, targets: torch.Tensor, vocab: int) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, d] (one layer), got shape {list(hidden.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [N] with N = {hidden.shape[0]} (rows of hidden), got shape "
                         f"{list(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("hidden holds no positions: collect more text or fewer offsets")
    if targets.dtype.is_floating_point or int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise ValueError(f"targets must be integer token ids in [0, {vocab})")


# --------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class ProbeData:
    """Cached layer outputs and the tokens that follow them, for training and scoring probes.

    ``hidden`` is [L, N, d] (row l = output of layer l + 1, before the final norm, float32 on the
    CPU); ``targets[k]`` is [N], the token x_{t+k} for each position t; ``sequence`` and ``position``
    say where each of the N positions comes from.
    """

    hidden: torch.Tensor
    targets: dict[int, torch.Tensor]
    sequence: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def n_layers(self) -> int:
        return int(self.hidden.shape[0])

    def subset(self, index: torch.Tensor) -> ProbeData:
        return ProbeData(self.hidden[:, index], {k: v[index] for k, v in self.targets.items()},
                         self.sequence[index], self.position[index])

    def split(self, test_fraction: float = 0.25, seed: int = 0) -> tuple[ProbeData, ProbeData]:
        """(train, test), split by whole sequences so that no text contributes to both."""
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        ids = self.sequence.unique()
        if len(ids) < 2:
            raise ValueError("split needs positions from at least two sequences; collect more texts")
        g = torch.Generator().manual_seed(seed)
        shuffled = ids[torch.randperm(len(ids), generator=g)]
        n_test = min(len(ids) - 1, max(1, round(test_fraction * len(ids))))
        is_test = torch.isin(self.sequence, shuffled[:n_test])
        return self.subset(~is_test), self.subset(is_test)


def collect_probe_data(model: Any, sequences: Sequence[Any], *, offsets: Sequence[int] = (1, 2),
                       positions: Sequence[Any] | None = None, progress: bool = True) -> ProbeData:
    """Run the model on each sequence and keep the layer outputs of positions with all targets.

    A position t is kept when x_{t+k} exists for every k in ``offsets`` (so all offsets are scored
    on the same positions) and, if ``positions`` (one entry per sequence, None for all) is given, t
    is listed there. Memory: L x N x d float32 numbers on the CPU.
    """
    model = as_model(model)
    offs = tuple(int(k) for k in offsets)
    if not offs or min(offs) < 1:
        raise ValueError(f"offsets must be positive ints (1 = next token, 2 = the one after), got {offsets!r}")
    if len(sequences) == 0:
        raise ValueError("sequences is empty: pass at least one sequence of token ids")
    if positions is not None and len(positions) != len(sequences):
        raise ValueError(f"positions has {len(positions)} entries for {len(sequences)} sequences: pass one per "
                         "sequence (None for all its positions)")
    vocab = vocab_size(model)
    hidden: list[torch.Tensor] = []
    targets: dict[int, list[torch.Tensor]] = {k: [] for k in offs}
    seq: list[torch.Tensor] = []
    pos: list[torch.Tensor] = []
    for i, raw in enumerate(tqdm(sequences, desc="collect hidden states", disable=not progress)):
        ids = as_token_ids(raw, vocab, name=f"sequences[{i}]").cpu()
        keep = _check_positions(None if positions is None else positions[i], len(ids))
        keep = keep[keep + max(offs) < len(ids)]
        if len(keep) == 0:
            continue
        hidden.append(hidden_states(model, ids)[:, keep.to(next(model.parameters()).device)].float().cpu())
        for k in offs:
            targets[k].append(ids[keep + k])
        seq.append(torch.full_like(keep, i))
        pos.append(keep)
    if not hidden:
        raise ValueError(f"no position t has x_(t+{max(offs)}) inside its sequence: pass longer sequences")
    return ProbeData(torch.cat(hidden, 1), {k: torch.cat(v) for k, v in targets.items()}, torch.cat(seq),
                     torch.cat(pos))


# --------------------------------------------------------------------------------------------------
# Training and scoring


@dataclasses.dataclass
class ProbeFit:
    """A trained probe and its training loss (mean cross-entropy in nats) at each step."""

    probe: AffineProbe
    losses: list[float]


def fit_probe(model: Any, hidden: torch.Tensor, targets: torch.Tensor, *, steps: int = 300,
              batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0,
              device: str | torch.device | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
              head: OutputHead | None = None, progress: bool = True, desc: str = "probe") -> ProbeFit:
    """Train one :class:`AffineProbe` to predict ``targets`` [N] from ``hidden`` [N, d] through f_u.

    AdamW (weight decay on Delta and b), cosine-annealed learning rate, ``steps`` steps of
    ``batch_size`` positions drawn without replacement (reshuffled each epoch by ``seed``). ``device``
    (default: the model's) is where training runs; ``head`` reuses an :class:`OutputHead` across calls.
    """
    model = as_model(model)
    dev = _resolve(device, model)
    head = head if head is not None else OutputHead(model, dev)
    _check_pair(hidden, targets, head.weight.shape[0])
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    micro = _micro_batch(max_elements, head.weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    probe = AffineProbe(hidden.shape[1]).to(dev)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    n = hidden.shape[0]
    batch = min(batch_size, n)
    order, cursor = torch.randperm(n, generator=g), 0
    losses: list[float] = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=g), 0
        index = order[cursor:cursor + batch]
        cursor += batch
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for part in index.split(micro):
            h = hidden[part].to(device=dev, dtype=torch.float32)
            y = targets[part].to(dev)
            logits = head(probe(h)).float()
            loss = F.cross_entropy(logits, y, reduction="sum") / batch
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        losses.append(total)
    return ProbeFit(probe.eval(), losses)


@dataclasses.dataclass(frozen=True)
class ProbeScore:
    """Top-k accuracy and mean cross-entropy (nats) of a probe, or of the plain lens, on N positions."""

    accuracy: float
    nll: float
    k: int
    n: int


def evaluate_probe(model: Any, probe: AffineProbe | None, hidden: torch.Tensor, targets: torch.Tensor, *,
                   k: int = 5, device: str | torch.device | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   head: OutputHead | None = None) -> ProbeScore:
    """Score ``probe`` (None: the logit lens itself) on held-out ``hidden`` [N, d] and ``targets`` [N].

    A target counts as a top-k hit when fewer than k tokens are strictly more likely (as in
    :class:`mtp_lib.lens.LensStats`).
    """
    model = as_model(model)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    dev = _resolve(device, model)
    head = head if head is not None else OutputHead(model, dev)
    _check_pair(hidden, targets, head.weight.shape[0])
    micro = _micro_batch(max_elements, head.weight.shape[0])
    hits, nll = 0, 0.0
    with torch.no_grad():
        for part in torch.arange(hidden.shape[0]).split(micro):
            h = hidden[part].to(device=dev, dtype=torch.float32)
            y = targets[part].to(dev)
            logp = torch.log_softmax(head(probe(h) if probe is not None else h).float(), dim=-1)
            hits += int((_target_rank(logp, y) < k).sum())
            nll -= float(logp.gather(-1, y[:, None]).sum())
    n = hidden.shape[0]
    return ProbeScore(accuracy=hits / n, nll=nll / n, k=k, n=n)


@dataclasses.dataclass
class LayerwiseProbes:
    """Per-layer scores of the logit lens and of a trained probe for x_{t+offset} on held-out text."""

    offset: int
    k: int
    layers: list[int]  # 1-based layer numbers
    n_layers: int  # L of the model, for normalized depth
    lens: list[ProbeScore]
    probe: list[ProbeScore]
    losses: list[list[float]]
    probes: list[AffineProbe]

    def to_dataframe(self) -> Any:
        """One row per layer and method ('lens' or 'probe'): accuracy, nll, depth."""
        import pandas as pd

        rows = [
            {"layer": layer, "depth": layer / self.n_layers, "method": method, "offset": self.offset,
             "k": self.k, "accuracy": score.accuracy, "nll": score.nll, "n": score.n}
            for layer, lens_score, probe_score in zip(self.layers, self.lens, self.probe)
            for method, score in (("lens", lens_score), ("probe", probe_score))
        ]
        return pd.DataFrame(rows)


def layerwise_probes(model: Any, train: ProbeData, test: ProbeData, *, offset: int = 2, k: int = 5,
                     layers: Sequence[int] | None = None, steps: int = 300, batch_size: int = 256, lr: float = 1e-3,
                     weight_decay: float = 0.01, seed: int = 0, device: str | torch.device | None = None,
                     max_elements: int = DEFAULT_MAX_ELEMENTS, progress: bool = True) -> LayerwiseProbes:
    """Fit one probe per layer for x_{t+offset} on ``train`` and score it and the plain lens on ``test``.

    ``layers`` are 1-based layer numbers (default: all). Each layer's probe uses the same ``seed``.
    """
    model = as_model(model)
    for name, data in (("train", train), ("test", test)):
        if offset not in data.targets:
            raise ValueError(f"{name} has no targets for offset={offset} (it has {sorted(data.targets)}); "
                             f"collect it with offsets including {offset}")
    if train.hidden.shape[0] != test.hidden.shape[0] or train.hidden.shape[2] != test.hidden.shape[2]:
        raise ValueError("train and test come from different models (layer count or width differ)")
    n_layers = train.n_layers
    chosen = list(range(1, n_layers + 1)) if layers is None else [int(layer) for layer in layers]
    if not chosen or min(chosen) < 1 or max(chosen) > n_layers:
        raise ValueError(f"layers must be 1-based layer numbers in [1, {n_layers}], got {layers!r}")
    dev = _resolve(device, model)
    head = OutputHead(model, dev)
    result = LayerwiseProbes(offset=offset, k=k, layers=chosen, n_layers=n_layers, lens=[], probe=[], losses=[],
                             probes=[])
    for layer in tqdm(chosen, desc=f"probes for x_(t+{offset})", disable=not progress):
        fit = fit_probe(model, train.hidden[layer - 1], train.targets[offset], steps=steps, batch_size=batch_size,
                        lr=lr, weight_decay=weight_decay, seed=seed, device=dev, max_elements=max_elements,
                        head=head, progress=progress, desc=f"layer {layer}")
        score = lambda p: evaluate_probe(model, p, test.hidden[layer - 1], test.targets[offset], k=k,  # noqa: E731
                                         device=dev, max_elements=max_elements, head=head)
        result.lens.append(score(None))
        result.probe.append(score(fit.probe))
        result.losses.append(fit.losses)
        result.probes.append(fit.probe.cpu())
    return result
