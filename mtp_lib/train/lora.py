"""LoRA adapters (``peft``) on shared modules, and merging them back into plain layers."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

__all__ = ["add_lora", "lora_params", "merge_lora"]


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


def lora_params(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA weights of ``module`` (A and B matrices), in module order."""
    return [p for n, p in module.named_parameters() if "lora_" in n]
