"""Train MTP heads (and the NTP baseline) the paper's ways: one configurable trainer.

The recipes of the paper's Table 1 are named presets of :class:`TrainConfig` in :data:`RECIPES`:

============================  ====================================================================
``heads_only``                heads trained on a frozen backbone
``vanilla_joint``             heads + LoRA (rank 8) on the backbone's attention q/k/v
``head_warmup``               1 epoch heads only, then 1 epoch joint
``diff_lr``                   joint, heads at 4x the base learning rate
``head_warmup_diff_lr``       both of the above
``diff_lr_whs``               joint, 4x head LR, weighted hidden states
``medusa``                    Medusa-1 heads (residual blocks) on a frozen model (not in the paper)
``ntp_baseline``              the model itself LoRA-fine-tuned on next-token loss (the baseline row;
                              MTP then comes from :mod:`mtp_lib.marginal`)
============================  ====================================================================

Common to all (the paper's Section 3): cross-entropy on target tokens only, AdamW (weight decay
0.01), cosine annealing, an effective batch of 64 sequences by gradient accumulation, bf16 autocast
on GPU; joint phases rescale each head's loss per batch so its RMS matches head 1's. The learning
rate is a config value (the paper: half the model's pretraining LR, see :data:`PAPER_LR`).

Choices the paper leaves open, made here (all config values): LoRA alpha 16, no LoRA dropout;
gradient clipping at norm 1 (the Hugging Face Trainer's default); no weight decay on 1-D parameters
(biases, norms, WHS weights); heads keep their multiplied LR in a warmup phase too; dropout is off
(the paper's models have none); loss RMS is taken over a micro-batch's target tokens; an epoch drops
its last incomplete batch of 64.

The trainer never changes the given model: heads, LoRA and the baseline's merged weights are new
tensors; the backbone shares the frozen weights (see :mod:`mtp_lib.heads`). It runs unchanged under
``accelerate launch`` on several GPUs (data parallel), checkpoints every ``checkpoint_every``
optimizer steps and resumes from the last checkpoint, giving the same result as an uninterrupted
run. Samples are any objects with ``input_ids`` (list of ints) and ``target_start`` (index of the
first target token), e.g. :class:`mtp_lib.data.Sample`.

Example (a short CPU run)::

    lm = load_model("smollm2-135m")
    train_set = translation_samples(lm.tokenizer, 256, split="train")
    eval_set = translation_samples(lm.tokenizer, 50, split="validation")
    config = recipe("diff_lr", lr=1e-4, effective_batch_size=8, micro_batch_size=4, max_steps=30)
    result = train(lm.model, train_set, config, eval_samples=eval_set, out_dir="runs/diff_lr")
    accuracy(evaluate(result.model, eval_set))   # top-5 accuracy of head 1, head 2
    tuned = train(lm.model, train_set, recipe("ntp_baseline", ...)).model   # a plain HF model
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from mtp_lib.heads import HEAD_INITS, MTPModel, shallow_module_copy
from mtp_lib.models import eval_mode, get_adapter

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

__all__ = [
    "PAPER_LR",
    "RECIPES",
    "Batch",
    "TrainConfig",
    "TrainResult",
    "TrainSample",
    "accuracy",
    "add_lora",
    "balance_losses",
    "collate",
    "evaluate",
    "load_trained",
    "merge_lora",
    "recipe",
    "save_trained",
    "train",
]

IGNORE = -100


class TrainSample(Protocol):
    """What the trainer reads from a sample (``mtp_lib.data.Sample`` has both)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def target_start(self) -> int: ...


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Steps count optimizer steps (one step = ``effective_batch_size`` sequences).

    ``objective``: ``"mtp"`` trains an :class:`MTPModel` (``n_heads``, ``head_type``, ``head_init``,
    ``weighted_hidden_states`` as there); ``"ntp"`` LoRA-fine-tunes the model itself on next-token
    loss (the baseline; needs ``joint=True``, ``n_heads=1``). ``joint``: LoRA (``lora_rank`` on the
    family's q/k/v) on the backbone, trained with the heads. ``head_warmup_epochs``: epochs of heads-only
    training before the joint phase. ``head_lr_multiplier``: heads' LR over ``lr`` (Diff. LR: 4).
    ``loss_balancing``: rescale head n's loss to head 1's RMS; None means on in joint phases.
    ``max_steps``: a cap on the steps of each phase (short CPU runs). ``eval_every`` /
    ``checkpoint_every``: every so many steps (0: only at the end of each phase).
    ``mixed_precision``: ``"auto"`` = bf16 autocast on CUDA, none on CPU.

    Training runs with dropout off (the network in eval mode), so that a run is deterministic, resumes
    exactly and gives the same weights on one process or several. Pythia, Llama-style, SmolLM2 and
    Gemma configs have no dropout; GPT-2's (0.1) is not applied here.
    """

    objective: str = "mtp"
    n_heads: int = 2
    head_type: str = "layer"
    head_init: str = "random"
    weighted_hidden_states: bool = False
    joint: bool = False
    head_warmup_epochs: int = 0
    head_lr_multiplier: float = 1.0
    loss_balancing: bool | None = None
    lr: float = 1.5e-4
    epochs: int = 1
    effective_batch_size: int = 64
    micro_batch_size: int = 8
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    max_steps: int | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

        for name in ("n_heads", "epochs", "effective_batch_size", "micro_batch_size", "lora_rank"):
            positive(name)
        for name in ("head_warmup_epochs", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.max_steps is not None:
            positive("max_steps")
        if self.objective not in ("mtp", "ntp"):
            raise ValueError(f"objective={self.objective!r} must be 'mtp' (heads) or 'ntp' (the baseline)")
        if self.effective_batch_size % self.micro_batch_size:
            raise ValueError(f"effective_batch_size={self.effective_batch_size} is not a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0 or not self.head_lr_multiplier > 0:
            raise ValueError(f"lr={self.lr} and head_lr_multiplier={self.head_lr_multiplier} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.head_warmup_epochs and not self.joint:
            raise ValueError("head_warmup_epochs > 0 needs joint=True (warmup precedes joint training)")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} must be 'auto', 'no', 'bf16' or 'fp16'")
        if self.objective == "ntp" and (not self.joint or self.n_heads != 1 or self.head_type != "layer"
                                        or self.weighted_hidden_states or self.head_warmup_epochs):
            raise ValueError("objective='ntp' trains LoRA on the model itself: use joint=True, n_heads=1 and "
                             "no heads options (start from RECIPES['ntp_baseline'])")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init={self.head_init!r} must be one of {HEAD_INITS}")
        if self.head_init != "random" and (self.head_type != "layer" or self.objective != "mtp"):
            raise ValueError(f"head_init={self.head_init!r} needs layer heads (head_type='layer', objective='mtp')")
        if self.head_type == "medusa" and self.n_heads < 2:
            raise ValueError("head_type='medusa' with n_heads=1 has nothing to train (head 1 is the model)")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict. ``head_init`` is left out at its default ("random"): it came after
        results were stored under keys made of this dict, and those keys stay valid."""
        out = dataclasses.asdict(self)
        if out["head_init"] == "random":
            del out["head_init"]
        return out


RECIPES: dict[str, TrainConfig] = {
    "heads_only": TrainConfig(),
    "vanilla_joint": TrainConfig(joint=True),
    "head_warmup": TrainConfig(joint=True, head_warmup_epochs=1),
    "diff_lr": TrainConfig(joint=True, head_lr_multiplier=4.0),
    "head_warmup_diff_lr": TrainConfig(joint=True, head_warmup_epochs=1, head_lr_multiplier=4.0),
    "diff_lr_whs": TrainConfig(joint=True, head_lr_multiplier=4.0, weighted_hidden_states=True),
    "medusa": TrainConfig(head_type="medusa"),
    "ntp_baseline": TrainConfig(objective="ntp", n_heads=1, joint=True),
}
"""The paper's Table 1 rows (plus ``medusa``); change any field with :func:`recipe`."""

PAPER_LR: dict[str, float] = {"pythia-410m": 1.5e-4, "pythia-1b": 1.5e-4, "pythia-1.4b": 8e-5, "pythia-2.8b": 6e-6}
"""Table 2's learning rates ("half the pretraining LR"; the last two do not match half of Pythia's
published 1e-4 and 8e-5)."""


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """``RECIPES[name]`` with some fields changed, e.g. ``recipe("diff_lr", lr=1e-4, max_steps=30)``."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not one of {sorted(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(RECIPES[name], **overrides)


@dataclasses.dataclass(frozen=True)
class _Phase:
    name: str  # "heads", "joint" or "ntp"
    epochs: int
    train_heads: bool
    train_lora: bool
    balance: bool


def _phases(config: TrainConfig) -> list[_Phase]:
    balance = lambda joint: joint if config.loss_balancing is None else config.loss_balancing  # noqa: E731
    if config.objective == "ntp":
        return [_Phase("ntp", config.epochs, False, True, False)]
    phases = []
    if config.head_warmup_epochs:
        phases.append(_Phase("heads", config.head_warmup_epochs, True, False, balance(False)))
    if config.joint:
        phases.append(_Phase("joint", config.epochs, True, True, balance(True)))
    else:
        phases.append(_Phase("heads", config.epochs, True, False, balance(False)))
    return phases


# --------------------------------------------------------------------------------------------------
# Batches


@dataclasses.dataclass
class Batch:
    """Right-padded token ids [B, T], attention mask [B, T] and labels [n_heads, B, T].

    ``labels[n - 1, b, t]`` = x_{t+n} of sequence b where t + n is a target token of it
    (``target_start <= t + n < len``), else -100 (ignored).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(samples: Sequence[TrainSample], n_heads: int, pad_id: int = 0) -> Batch:
    """Pad ``samples`` to a :class:`Batch` whose labels mark head n's targets (see there)."""
    if not samples:
        raise ValueError("samples is empty")
    lengths = [len(s.input_ids) for s in samples]
    T = max(lengths)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    labels = torch.full((n_heads, len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        n_tok, start = lengths[b], int(s.target_start)
        if not 0 <= start < n_tok:
            raise ValueError(f"sample {b}: target_start={start} must lie in 0..len(input_ids)-1 = {n_tok - 1}")
        ids[b, :n_tok] = torch.as_tensor(list(s.input_ids), dtype=torch.long)
        mask[b, :n_tok] = 1
        for n in range(1, n_heads + 1):
            first = max(start - n, 0)  # the first context end t whose x_{t+n} is a target token
            if first < n_tok - n:
                labels[n - 1, b, first:n_tok - n] = ids[b, first + n:n_tok]
    return Batch(ids, mask, labels)


# --------------------------------------------------------------------------------------------------
# LoRA on shared modules


def add_lora(module: nn.Module, targets: Sequence[str], *, rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Add LoRA adapters (``peft``) to the linear layers of ``module`` named by ``targets``, in place.

    ``targets`` are module-name suffixes, e.g. ``adapter.lora_targets``. LoRA's random A matrices come
    from ``seed``. Use it on a :func:`shallow_module_copy` (as the trainer does) to keep the original
    model free of adapters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA targets {missing} name no module of {type(module).__name__}; "
                         "check the adapter's lora_targets")
    gpt2_conv = any(type(m).__name__ == "Conv1D" for n, m in module.named_modules()
                    if any(n.endswith("." + t) for t in targets))
    # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r): a float works
    config = LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
                        lora_dropout=dropout, target_modules=list(targets),
                        fan_in_fan_out=gpt2_conv, bias="none")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module)
    return module


def _lora_layers(module: nn.Module) -> list[tuple[str, LoraLayer]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRA layer of ``module`` by a copy of its base layer with the update merged in.

    The base layer's weight is copied first, so a frozen weight shared with another model is left
    unchanged. Returns ``module`` (changed in place): a plain model again.
    """
    for name, lora in _lora_layers(module):
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        base = lora.get_base_layer()
        merged = copy.deepcopy(base)
        with torch.no_grad():
            for adapter_name in lora.active_adapters:
                # peft defines get_delta_weight on each concrete LoRA layer (Linear, ...), not on LoraLayer
                merged.weight += lora.get_delta_weight(adapter_name).to(merged.weight.dtype)  # type: ignore[attr-defined]
        setattr(parent, name.rsplit(".", 1)[-1], merged)
    return module


def _lora_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


# --------------------------------------------------------------------------------------------------
# The trained network and its loss


class _Objective(nn.Module):
    """The trained network; ``forward(batch)`` gives per-head [mean CE, RMS of CE, #targets].

    One module so that ``accelerate`` (DDP) sees every trainable parameter through one forward.
    """

    def __init__(self, net: nn.Module, objective: str) -> None:
        super().__init__()
        self.net = net
        self.objective = objective

    def head_params(self) -> list[nn.Parameter]:
        return list(cast(MTPModel, self.net).heads.parameters()) if self.objective == "mtp" else []

    def lora_params(self) -> list[nn.Parameter]:
        return _lora_params(self.net)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normed final hidden states per head, [n_heads, B, T, H]."""
        if self.objective == "mtp":
            return self.net(input_ids, attention_mask=attention_mask, return_logits=False).states
        base = get_adapter(self.net).base(self.net)
        return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[None]

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.objective == "mtp":
            return cast(MTPModel, self.net).unembed_states(states)
        return get_adapter(self.net).logits(self.net, states, normed=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states = self.states(input_ids, attention_mask)
        means, rms, counts = [], [], []
        for n in range(labels.shape[0]):
            keep = labels[n] != IGNORE
            ce = nn.functional.cross_entropy(self.logits(states[n][keep]).float(), labels[n][keep],
                                             reduction="none")
            k = ce.numel()
            means.append(ce.sum() / max(k, 1))
            rms.append((ce.detach().square().sum() / max(k, 1)).sqrt())
            counts.append(torch.tensor(float(k), device=ce.device))
        return torch.stack(means), torch.stack(rms), torch.stack(counts)


def balance_losses(means: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """sum_n (RMS_1 / RMS_n) * loss_n, the ratios held constant: each head's loss scaled to head 1's RMS.

    ``means`` [n_heads]: mean CE per head; ``rms`` [n_heads]: root mean square of the per-token CE. A
    head without targets in the batch (RMS 0) gets weight 0.
    """
    ratio = torch.where(rms > 0, rms[0] / rms.clamp(min=1e-12), torch.zeros_like(rms)).detach()
    return (ratio * means).sum()


def _build_net(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The MTPModel (with LoRA on its backbone when joint), or a LoRA'd shallow copy of the model (NTP)."""
    adapter = get_adapter(model)
    lora: dict[str, Any] = dict(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                seed=config.seed)
    if config.objective == "ntp":
        return add_lora(shallow_module_copy(model), adapter.lora_targets, **lora)
    net = MTPModel(model, n_heads=config.n_heads, weighted_hidden_states=config.weighted_hidden_states,
                   head_type=config.head_type, seed=config.seed, head_init=config.head_init)
    if config.joint:
        add_lora(net.backbone, adapter.lora_targets, **lora)
    return net


def _trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes: heads (MTP) and LoRA weights, by name."""
    return {n: p.detach() for n, p in net.named_parameters() if n.startswith("heads.") or "lora_" in n}


# --------------------------------------------------------------------------------------------------
# Evaluation


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
def _eval_losses(objective: _Objective, samples: Sequence[TrainSample], n_heads: int, batch_size: int,
                 device: torch.device) -> list[float]:
    total = torch.zeros(n_heads, dtype=torch.float64)
    count = torch.zeros(n_heads, dtype=torch.float64)
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i:i + batch_size], n_heads).to(device)
        mean, _, k = objective(batch.input_ids, batch.attention_mask, batch.labels)
        total += (mean * k).double().cpu()
        count += k.double().cpu()
    return (total / count.clamp(min=1)).tolist()


# --------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class TrainResult:
    """``model``: the trained :class:`MTPModel`, or for ``objective="ntp"`` a plain HF model with
    the LoRA merged (both in eval mode, in the model's dtype). ``history``: one record per optimizer
    step (``phase``, ``step`` within the phase, ``lr`` = the base LR used in that step, heads getting
    ``head_lr_multiplier`` times it, mean training ``loss`` per head) and per evaluation
    (``eval_loss`` per head, and ``eval_top5`` per head for MTP)."""

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _optimizer(objective: _Objective, phase: _Phase, config: TrainConfig) -> torch.optim.Optimizer:
    groups = []
    for params, lr in [(objective.head_params() if phase.train_heads else [], config.lr * config.head_lr_multiplier),
                       (objective.lora_params() if phase.train_lora else [], config.lr)]:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [{"params": ps, "lr": lr, "weight_decay": wd}
                   for ps, wd in [(decay, config.weight_decay), (no_decay, 0.0)] if ps]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def _set_trainable(objective: _Objective, phase: _Phase) -> list[nn.Parameter]:
    for p in objective.parameters():
        p.requires_grad_(False)
    params = (objective.head_params() if phase.train_heads else []) + (
        objective.lora_params() if phase.train_lora else [])
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError(f"phase {phase.name!r} has no trainable parameters")
    return params


def _release(acc: Any, *prepared: Any) -> None:
    """Drop the accelerator's references to a finished phase's model wrapper and optimizer."""
    for name in ("_models", "_optimizers"):
        kept = getattr(acc, name, None)
        if isinstance(kept, list):
            kept[:] = [x for x in kept if all(x is not p for p in prepared)]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _make_accelerator(config: TrainConfig, accelerator: Any | None) -> Any:
    if accelerator is not None:
        return accelerator
    from accelerate import Accelerator

    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=precision)


def train(model: nn.Module, samples: Sequence[TrainSample], config: TrainConfig, *,
          eval_samples: Sequence[TrainSample] | None = None, out_dir: str | Path | None = None,
          resume: bool = True, progress: bool = True, accelerator: Any | None = None,
          callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``config``'s recipe on ``model`` (a Hugging Face causal LM, left unchanged).

    ``samples`` are the training sequences (loss on their target tokens), ``eval_samples`` optional
    held-out ones, scored every ``config.eval_every`` steps and at the end of each phase. With
    ``out_dir``, checkpoints go to ``out_dir/checkpoint.pt`` and, when ``resume``, a run picks up
    where an interrupted one stopped; the final weights are written by :func:`save_trained`.
    ``callback`` receives every history record as it is made. ``accelerator``: an
    ``accelerate.Accelerator`` to use (default: a new one, bf16 autocast on CUDA).
    """
    from tqdm.auto import tqdm

    if len(samples) == 0:
        raise ValueError("samples is empty: pass the training sequences")
    acc = _make_accelerator(config, accelerator)
    world = acc.num_processes
    per_step = config.micro_batch_size * world
    if config.effective_batch_size % per_step:
        raise ValueError(f"effective_batch_size={config.effective_batch_size} is not a multiple of "
                         f"micro_batch_size x processes = {config.micro_batch_size} x {world}")
    accum = config.effective_batch_size // per_step
    steps_per_epoch = len(samples) // config.effective_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(samples)} samples make no full batch of effective_batch_size="
                         f"{config.effective_batch_size}: pass more samples or lower it")
    phases = _phases(config)
    n_heads = config.n_heads
    flags = {p: p.requires_grad for p in model.parameters()}
    net = _build_net(model, config)
    net.eval()  # dropout off throughout
    objective = _Objective(net, config.objective).to(acc.device)
    dtypes = {id(p): p.dtype for p in objective.head_params() + objective.lora_params()}
    if acc.mixed_precision in ("bf16", "fp16"):  # trainable weights in float32 under autocast
        for p in objective.head_params() + objective.lora_params():
            p.data = p.data.float()
    ckpt = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    history: list[dict[str, Any]] = []
    start_phase, start_step, saved = 0, 0, None
    if ckpt is not None and resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if saved["config"] != config.to_dict():
            raise ValueError(f"{ckpt.name} in out_dir was made with another config; use another out_dir "
                             "or resume=False")
        named = dict(objective.net.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                named[name].copy_(value)
        start_phase, start_step, history = saved["phase"], saved["step"], list(saved["history"])

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if callback is not None:
            callback(entry)

    @torch.no_grad()
    def run_eval(phase: _Phase, step: int) -> None:
        if not eval_samples:
            return
        with acc.autocast():
            entry: dict[str, Any] = {"phase": phase.name, "step": step,
                                     "eval_loss": _eval_losses(objective, eval_samples, n_heads,
                                                               config.micro_batch_size, acc.device)}
            if config.objective == "mtp":
                entry["eval_top5"] = accuracy(evaluate(cast(MTPModel, net), eval_samples,
                                                       batch_size=config.micro_batch_size))
        record(entry)

    try:
        for p_idx in range(start_phase, len(phases)):
            phase = phases[p_idx]
            total = steps_per_epoch * phase.epochs
            if config.max_steps is not None:
                total = min(total, config.max_steps)
            step0 = start_step if p_idx == start_phase else 0
            params = _set_trainable(objective, phase)
            optimizer = _optimizer(objective, phase, config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total))
            if saved is not None and p_idx == start_phase and saved.get("optimizer") is not None:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            wrapped, optimizer = acc.prepare(objective, optimizer)
            bar = tqdm(total=total, initial=step0, desc=f"train ({phase.name})",
                       disable=not progress or not acc.is_main_process)

            def checkpoint(step: int) -> None:
                if ckpt is not None and acc.is_main_process:
                    done = step >= total
                    _save_checkpoint(ckpt, {
                        "config": config.to_dict(), "phase": p_idx + 1 if done else p_idx,
                        "step": 0 if done else step, "history": history,
                        "trainable": {k: v.cpu() for k, v in _trainable_state(objective.net).items()},
                        "optimizer": None if done else optimizer.state_dict(),
                        "scheduler": None if done else scheduler.state_dict()})
                acc.wait_for_everyone()

            for step in range(step0, total):
                epoch, in_epoch = divmod(step, steps_per_epoch)
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + p_idx * 1009 + epoch)
                order = torch.randperm(len(samples), generator=gen)
                chunk = order[in_epoch * config.effective_batch_size:(in_epoch + 1) * config.effective_batch_size]
                losses = torch.zeros(n_heads, device=acc.device)
                for micro in range(accum):
                    lo = (micro * world + acc.process_index) * config.micro_batch_size
                    batch = collate([samples[int(i)] for i in chunk[lo:lo + config.micro_batch_size]],
                                    n_heads).to(acc.device)
                    sync = micro == accum - 1
                    with acc.no_sync(wrapped) if not sync else contextlib.nullcontext():
                        mean, rms, _ = wrapped(batch.input_ids, batch.attention_mask, batch.labels)
                        loss = balance_losses(mean, rms) if phase.balance else mean.sum()
                        acc.backward(loss / accum)
                    losses += mean.detach() / accum
                if config.max_grad_norm is not None:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses = acc.reduce(losses, reduction="mean")
                entry: dict[str, Any] = {"phase": phase.name, "step": step + 1,
                                         "lr": config.lr * _cosine(total)(step),
                                         "loss": [round(float(x), 6) for x in losses]}
                record(entry)
                bar.update(1)
                bar.set_postfix({f"h{n + 1}": f"{x:.3f}" for n, x in enumerate(entry["loss"])})
                if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
                    run_eval(phase, step + 1)
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                    checkpoint(step + 1)
            bar.close()
            run_eval(phase, total)
            checkpoint(total)
            _release(acc, wrapped, optimizer)
            saved = None
    finally:
        for p in net.parameters():
            p.requires_grad_(False)
        for p, flag in flags.items():  # the shared weights get the model's own flags back
            p.requires_grad_(flag)
    if acc.mixed_precision in ("bf16", "fp16"):  # back to the model's dtype, for use without autocast
        for p in objective.head_params() + objective.lora_params():
            p.data = p.data.to(dtypes[id(p)])
    if out_dir is not None and acc.is_main_process:
        save_trained(net, config, out_dir, history=history)
    acc.wait_for_everyone()
    return TrainResult(model=merge_lora(net) if config.objective == "ntp" else net, config=config, history=history)


# --------------------------------------------------------------------------------------------------
# Saving the result


def save_trained(net: nn.Module, config: TrainConfig, out_dir: str | Path, *,
                 history: list[dict[str, Any]] | None = None) -> Path:
    """Write what training changed (heads and LoRA weights, safetensors) and the config to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in _trainable_state(net).items()}
    save_file(tensors, str(out / "trained.safetensors"), metadata={"config": json.dumps(config.to_dict())})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    if history is not None:
        (out / "history.json").write_text(json.dumps(history))
    return out


def load_trained(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """Rebuild a trained result on a fresh ``model``: the :class:`MTPModel`, or the merged NTP model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out_dir) / "trained.safetensors"
    if not path.is_file():
        raise ValueError(f"out_dir={str(out_dir)!r} holds no trained.safetensors (written by train/save_trained)")
    with safe_open(str(path), framework="pt") as f:
        config = TrainConfig(**json.loads((f.metadata() or {})["config"]))
    net = _build_net(model, config)
    params = dict(net.named_parameters())
    state = load_file(str(path))
    if set(state) != set(_trainable_state(net)):
        raise ValueError(f"{path.name} does not fit this model (different family or shape)")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{path.name}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    for p in net.parameters():
        p.requires_grad_(False)
    return merge_lora(net) if config.objective == "ntp" else net.eval()
