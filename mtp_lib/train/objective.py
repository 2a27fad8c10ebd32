"""The trained network (heads and LoRA on a shared backbone) and its per-head loss."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from mtp_lib.heads import MTPModel, shallow_module_copy
from mtp_lib.models import get_adapter
from mtp_lib.train.batches import IGNORE
from mtp_lib.train.config import TrainConfig
from mtp_lib.train.lora import add_lora, lora_params

__all__ = ["Objective", "balance_losses", "build_net", "trainable_state"]


class Objective(nn.Module):
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
        return lora_params(self.net)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normed final hidden states per head, [n_heads, B, T, H] (packed rows: position ids, no mask)."""
        if self.objective == "mtp":
            return self.net(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            return_logits=False).states
        base = get_adapter(self.net).base(self.net)
        return base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state[None]

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.objective == "mtp":
            return cast(MTPModel, self.net).unembed_states(states)
        return get_adapter(self.net).logits(self.net, states, normed=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states = self.states(input_ids, attention_mask, position_ids)
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


def build_net(model: nn.Module, config: TrainConfig) -> nn.Module:
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


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes: heads (MTP) and LoRA weights, by name."""
    return {n: p.detach() for n, p in net.named_parameters() if n.startswith("heads.") or "lora_" in n}
