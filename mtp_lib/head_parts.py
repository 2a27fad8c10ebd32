"""The parts of an :class:`mtp_lib.heads.MTPModel`: its heads, their hidden-state mix, its cache and output.

Layer heads are one-layer versions of the model's own base model (:class:`LayerHead`); Medusa heads
are residual blocks on the final hidden state (:class:`MedusaHead`); head 1 of a Medusa model is the
model's own output (:class:`NextTokenHead`). :func:`shallow_module_copy` shares a model's tensors
while giving the copy its own module tree.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

__all__ = ["HEAD_INITS", "HEAD_TYPES", "HiddenStateMix", "LayerHead", "MTPCache", "MTPOutput", "MedusaHead",
           "NextTokenHead", "shallow_module_copy"]

HEAD_TYPES = ("layer", "medusa")
HEAD_INITS = ("random", "copy")
WHS_TEMPERATURE = 0.1
WHS_INIT = 0.1


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s whole module tree that shares its parameters and buffers.

    Every module is copied (new ``_modules``, ``_parameters``, ``_buffers`` and hook dicts); the
    tensors are not. Replacing a submodule of the copy (as ``peft`` does to add LoRA), registering a
    hook on it or switching it to train mode leaves the original untouched; changing a shared
    tensor's values in place does not.
    """
    new = copy.copy(module)
    for name, value in list(vars(module).items()):
        if isinstance(value, (dict, set)):  # _parameters, _buffers, _modules, hooks, ...
            setattr(new, name, copy.copy(value))
    for name, child in module._modules.items():
        new._modules[name] = None if child is None else shallow_module_copy(child)
    return new


def _config_with_layers(config: Any, layer_types: list[str] | None, n_layers: int) -> Any:
    """A copy of ``config`` describing ``n_layers`` layers (of ``layer_types`` where the family has them)."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = n_layers
    if layer_types is not None:
        new.layer_types = list(layer_types)
    return new


class _NoPositions(nn.Module):
    """Stands in for GPT-2's position embedding in a head: z already carries the positions."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


# --------------------------------------------------------------------------------------------------
# Heads


class HiddenStateMix(nn.Module):
    """Weighted hidden states: softmax(w / T) . [z^1 .. z^{L-1}], w initialized to 0.1 (uniform)."""

    def __init__(self, n_layers: int, *, temperature: float = WHS_TEMPERATURE, init: float = WHS_INIT,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers} must be >= 1 for weighted hidden states")
        self.temperature = temperature
        self.weight = nn.Parameter(torch.full((n_layers,), init, dtype=dtype, device=device))

    def weights(self) -> torch.Tensor:
        """The mixing weights softmax(w / T), shape [L-1], summing to 1."""
        return torch.softmax(self.weight.float() / self.temperature, dim=0)

    def forward(self, hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(hidden) != self.weight.numel():
            raise ValueError(f"got {len(hidden)} hidden states, expected {self.weight.numel()} (z^1 .. z^(L-1))")
        w = self.weights().to(hidden[0].dtype)
        out = hidden[0] * w[0]
        for w_l, z_l in zip(w[1:], hidden[1:]):
            out = out + w_l * z_l
        return out


class LayerHead(nn.Module):
    """A copy of the model's last decoder layer, run through a one-layer version of its base model.

    ``body`` is the model's base model (``model.model``, ``model.gpt_neox``, ...) with one layer, no
    token embedding and an identity final norm: the final norm is applied by :class:`MTPModel`.
    ``mix`` (WHS) mixes the backbone's layer outputs into the head's input; without it the head reads
    z^{L-1}.
    """

    def __init__(self, body: nn.Module, mix: HiddenStateMix | None = None) -> None:
        super().__init__()
        self.body = body
        self.mix = mix

    def forward(self, hidden: tuple[torch.Tensor, ...], *, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor, cache: Any | None, use_cache: bool) -> torch.Tensor:
        """``hidden`` = (z^1, ..., z^{L-1}) (only the last is read without WHS) -> the head's z^L (unnormed).

        ``cache`` (a one-layer HF cache) is extended in place.
        """
        x = self.mix(hidden) if self.mix is not None else hidden[-1]
        out = self.body(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=use_cache)
        return out.last_hidden_state


class MedusaHead(nn.Module):
    """Medusa-1's residual block h + SiLU(W h + b), W zero-initialized (b keeps nn.Linear's init)."""

    def __init__(self, hidden_size: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, dtype=dtype, device=device)
        nn.init.zeros_(self.linear.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class NextTokenHead(nn.Module):
    """Head 1 of a Medusa model: the model's own next-token prediction (identity, no parameters)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


# --------------------------------------------------------------------------------------------------
# Cache and output


@dataclasses.dataclass
class MTPCache:
    """KV caches of an :class:`MTPModel`: one for the backbone and one per head (None for Medusa heads).

    For speculative decoding, :meth:`crop` drops rejected draft tokens. Full-attention caches can be
    cropped to any length. Sliding-window layers (Gemma 3) keep only their window: such a cache can be
    cropped once it has passed the window only if it was made by ``MTPModel.new_cache(rollback=True)``,
    and then only back to where the last forward call started (enough to reject a draft).

    :meth:`MTPModel.forward` reads ``backbone`` and ``heads``, and calls ``begin()`` and
    ``get_seq_length()``: any object with those can stand in (e.g. static caches for CUDA graphs).
    """

    backbone: Any
    heads: list[Any]
    rollback: bool = False
    start: int = 0  # the cached length when the last forward call began

    def caches(self) -> list[Any]:
        return [c for c in [self.backbone, *self.heads] if c is not None]

    def get_seq_length(self) -> int:
        """How many tokens the cache holds."""
        return int(self.backbone.get_seq_length())

    def _full_sliding_layers(self) -> list[Any]:
        """Sliding-window cache layers that have reached their window."""
        return [layer for c in self.caches() for layer in getattr(c, "layers", [])
                if getattr(layer, "is_sliding", False) and layer.get_seq_length() >= layer.sliding_window]

    def begin(self) -> None:
        """Called by :meth:`MTPModel.forward` before it extends the cache: trims recorded pasts."""
        if self.rollback:
            for layer in self._full_sliding_layers():
                layer.crop(0)  # back to the window (a rollback cache keeps more until cropped)
        self.start = self.get_seq_length()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (``0 <= length <= get_seq_length()``)."""
        current = self.get_seq_length()
        if not 0 <= length <= current:
            raise ValueError(f"length={length} must be between 0 and the cached length {current}")
        if self._full_sliding_layers() and (not self.rollback or length < self.start):
            raise ValueError(
                f"length={length}: sliding-window layers past their window can only drop tokens of the last "
                f"forward call (back to {self.start}), and only in a cache made by new_cache(rollback=True)")
        for cache in self.caches():
            cache.crop(length - current)  # a negative count removes that many tokens


@dataclasses.dataclass
class MTPOutput:
    """What :meth:`MTPModel.forward` returns.

    ``logits``: [n_heads, B, T', V] (T' = the positions asked for), None with ``return_logits=False``.
    ``states``: [n_heads, B, T', H] the normed head outputs that the unembedding reads.
    ``cache``: the updated :class:`MTPCache` with ``use_cache=True``, else None.
    """

    logits: torch.Tensor | None
    states: torch.Tensor
    cache: MTPCache | None
