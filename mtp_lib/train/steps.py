"""The parts of one optimizer step: parameter groups, the LR schedule, batch order, dropout seeds."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtp_lib.train.config import Phase, TrainConfig
from mtp_lib.train.objective import Objective

__all__ = ["batch_order", "cosine", "make_accelerator", "make_optimizer", "release", "seed_dropout",
           "set_trainable"]


def cosine(total: int) -> Callable[[int], float]:
    """The LR factor at step s of ``total``: (1 + cos(pi s / total)) / 2, from 1 down to 0."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def make_optimizer(objective: Objective, phase: Phase, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the phase's trainable weights: heads at ``lr * head_lr_multiplier``, LoRA at ``lr``;
    no weight decay on 1-D parameters (biases, norms, WHS weights)."""
    groups = []
    for params, lr in [(objective.head_params() if phase.train_heads else [], config.lr * config.head_lr_multiplier),
                       (objective.lora_params() if phase.train_lora else [], config.lr)]:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [{"params": ps, "lr": lr, "weight_decay": wd}
                   for ps, wd in [(decay, config.weight_decay), (no_decay, 0.0)] if ps]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def set_trainable(objective: Objective, phase: Phase) -> list[nn.Parameter]:
    """Freeze everything but the phase's trainable weights; return those."""
    for p in objective.parameters():
        p.requires_grad_(False)
    params = (objective.head_params() if phase.train_heads else []) + (
        objective.lora_params() if phase.train_lora else [])
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError(f"phase {phase.name!r} has no trainable parameters")
    return params


def release(acc: Any, *prepared: Any) -> None:
    """Drop the accelerator's references to a finished phase's model wrapper and optimizer."""
    for name in ("_models", "_optimizers"):
        kept = getattr(acc, name, None)
        if isinstance(kept, list):
            kept[:] = [x for x in kept if all(x is not p for p in prepared)]


def make_accelerator(config: TrainConfig, accelerator: Any | None) -> Any:
    """``accelerator``, or a new ``accelerate.Accelerator`` with the config's mixed precision."""
    if accelerator is not None:
        return accelerator
    from accelerate import Accelerator

    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=precision)


def batch_order(seed: int, phase_index: int, epoch: int, n_samples: int) -> torch.Tensor:
    """The order of the samples in one epoch of one phase: a permutation fixed by its arguments."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 1009 + epoch)
    return torch.randperm(n_samples, generator=gen)


def seed_dropout(seed: int, phase_index: int, step: int, micro_batch: int, device: torch.device) -> None:
    """Seed the global generators (CPU, and ``device``'s when CUDA) for one micro-batch's dropout.

    ``micro_batch`` counts the step's micro-batches over all processes (micro * processes + rank),
    so the masks are a function of the run's position alone: a resumed run draws the masks an
    uninterrupted one drew, and a sequence gets the same mask on one process or several.
    """
    digest = hashlib.sha256(f"{seed}/{phase_index}/{step}/{micro_batch}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") >> 1
    torch.random.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)
