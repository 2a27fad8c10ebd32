"""The training configuration, the paper's recipes (Table 1) and the phases a recipe runs."""

from __future__ import annotations

import dataclasses
from typing import Any

from mtp_lib.heads import HEAD_INITS

__all__ = ["PAPER_LR", "RECIPES", "TrainConfig", "recipe"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Steps count optimizer steps (one step = ``effective_batch_size`` sequences).

    ``objective``: ``"mtp"`` trains an :class:`MTPModel` (``n_heads``, ``head_type``, ``head_init``,
    ``weighted_hidden_states`` as there); ``"ntp"`` LoRA-fine-tunes the model itself on next-token
    loss (the baseline; needs ``joint=True``, ``n_heads=1``). ``joint``: LoRA (``lora_rank`` on the
    family's q/k/v) on the backbone, trained with the heads. ``head_warmup_epochs``: epochs of heads-only
    training before the joint phase. ``head_lr_multiplier``: heads' LR over ``lr`` (Diff. LR: 4).
    ``loss_balancing``: rescale head n's loss to head 1's RMS; None means on in joint phases.
    ``max_steps``: a cap on the steps of each phase (short CPU runs). ``phase_steps``: the optimizer
    steps of each phase, in order (one number per phase of :func:`phases`), instead of ``epochs`` and
    ``head_warmup_epochs`` epochs: a fixed budget shared between warmup and joint phases (batches
    keep their per-epoch shuffle, so a phase longer than an epoch starts a new one). ``eval_every`` /
    ``checkpoint_every``: every so many steps (0: only at the end of each phase).
    ``mixed_precision``: ``"auto"`` = bf16 autocast on CUDA, none on CPU.

    ``train_mode``: the network trains in training mode, so dropout applies where the architecture
    has it (GPT-2: 0.1; Pythia, Llama-style, SmolLM2 and Gemma configs have none) and LoRA dropout
    (``lora_dropout``) too. Dropout masks are drawn from a generator seeded by (``seed``, phase,
    step, micro-batch), so a run is still deterministic, resumes exactly and draws the same masks for a
    sequence on one process or several. ``train_mode=False``: eval mode throughout, dropout off (how
    runs were made before this option; the same for models without dropout).
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
    phase_steps: tuple[int, ...] | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    mixed_precision: str = "auto"
    train_mode: bool = True

    def __post_init__(self) -> None:
        for name in ("n_heads", "epochs", "effective_batch_size", "micro_batch_size", "lora_rank"):
            self._positive(name)
        for name in ("head_warmup_epochs", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.max_steps is not None:
            self._positive("max_steps")
        if self.objective not in ("mtp", "ntp"):
            raise ValueError(f"objective={self.objective!r} must be 'mtp' (heads) or 'ntp' (the baseline)")
        if self.effective_batch_size % self.micro_batch_size:
            raise ValueError(f"effective_batch_size={self.effective_batch_size} is not a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0 or not self.head_lr_multiplier > 0:
            raise ValueError(f"lr={self.lr} and head_lr_multiplier={self.head_lr_multiplier} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} must lie in [0, 1)")
        if self.head_warmup_epochs and not self.joint:
            raise ValueError("head_warmup_epochs > 0 needs joint=True (warmup precedes joint training)")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} must be 'auto', 'no', 'bf16' or 'fp16'")
        self._check_heads()
        self._check_phase_steps()

    def _check_phase_steps(self) -> None:
        if self.phase_steps is None:
            return
        steps = tuple(self.phase_steps)  # (a list read back from JSON becomes a tuple)
        object.__setattr__(self, "phase_steps", steps)
        if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
            raise ValueError(f"phase_steps={steps!r} must hold positive integers, one per phase")
        names = [p.name for p in phases(self)]
        if len(steps) != len(names):
            raise ValueError(f"phase_steps={steps!r} gives {len(steps)} phase(s) but this recipe runs {len(names)} "
                             f"({', '.join(names)})")

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")

    def _check_heads(self) -> None:
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
        """The fields as a dict. Fields that came after results were stored under keys made of this
        dict are left out at their defaults (``head_init="random"``, ``train_mode=True``,
        ``phase_steps=None``), so those keys stay valid. (``train_mode=True`` trains exactly as before on
        models without dropout, the only ones whose results are stored.)"""
        out = dataclasses.asdict(self)
        for name, default in _LATE_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TrainConfig:
        """The config :meth:`to_dict` gave (fields left out take their defaults)."""
        return cls(**fields)


_LATE_FIELDS: dict[str, Any] = {"head_init": "random", "train_mode": True, "phase_steps": None}

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
class Phase:
    """One phase of a recipe: heads-only warmup, joint, heads-only, or the NTP baseline."""

    name: str  # "heads", "joint" or "ntp"
    epochs: int
    train_heads: bool
    train_lora: bool
    balance: bool


def phases(config: TrainConfig) -> list[Phase]:
    """The phases ``config`` runs, in order."""
    balance = lambda joint: joint if config.loss_balancing is None else config.loss_balancing  # noqa: E731
    if config.objective == "ntp":
        return [Phase("ntp", config.epochs, False, True, False)]
    out = []
    if config.head_warmup_epochs:
        out.append(Phase("heads", config.head_warmup_epochs, True, False, balance(False)))
    if config.joint:
        out.append(Phase("joint", config.epochs, True, True, balance(True)))
    else:
        out.append(Phase("heads", config.epochs, True, False, balance(False)))
    return out
