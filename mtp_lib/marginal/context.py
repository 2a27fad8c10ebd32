"""The context pass: the sample runs once, filling the KV cache that every candidate step reads."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class _Context:
    """The sample after its one forward pass, and what the candidate steps need to know about the model."""

    model: nn.Module
    adapter: Any
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values of the T context tokens
    n_ctx: int
    dtype: torch.dtype
    layer_types: tuple[str, ...] | None  # set when the model takes one mask per layer type
    window: int | None  # sliding window of the sliding layers (or of every layer when layer_types is None)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the whole context cache (all layers)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

    @property
    def acc_dtype(self) -> torch.dtype:
        """The dtype the marginals are summed in: the model's, at least float32."""
        return torch.promote_types(self.dtype, torch.float32)


def _run_context(model: nn.Module, adapter: Any, input_ids: torch.Tensor,
                 compile: bool = False) -> tuple[_Context, torch.Tensor]:
    """One forward pass of the sample: final-normed hidden states ``[T, d]`` and its KV cache.

    ``compile``: through ``torch.compile`` (:func:`_compiled_context`). Eager, the pass is bound by
    the host's launches on a GPU (thousands of small kernels): at 512 tokens on an H100, in bf16,
    eager 35 ms (SmolLM2) and 23 ms (Gemma-3-270M), compiled 10 ms and 8 ms, each pair in one run
    (``data/results/gpu/benchmark-marginal-*-flex.json``, ``context_pass_s`` of the rows)."""
    from transformers import DynamicCache

    config: Any = model.config
    # A plain DynamicCache keeps every token in every layer, also in sliding-window layers: the
    # masks below enforce the window themselves, so that cache keys are indexed by absolute position.
    cache = DynamicCache()
    base = adapter.base(model)
    out = (_compiled_context() if compile else _context_forward)(base, input_ids, cache)
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None and "sliding_attention" in layer_types:
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"model layer types {sorted(unknown)} are not supported by marginalize")
        layer_types = tuple(sorted(set(layer_types)))
    else:
        layer_types = None
        window = window if window and config.model_type == "mistral" else None  # one window for all layers
    layers: list[Any] = list(cache.layers)
    kv = [(layer.keys, layer.values) for layer in layers]
    ctx = _Context(model=model, adapter=adapter, kv=kv, n_ctx=input_ids.shape[1], dtype=out.last_hidden_state.dtype,
                   layer_types=layer_types, window=window)
    return ctx, out.last_hidden_state[0]


def _context_forward(base: nn.Module, input_ids: torch.Tensor, cache: Any) -> Any:
    """The context pass itself (see :func:`_run_context`)."""
    return base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache, use_cache=True)


@functools.cache
def _compiled_context() -> Callable[..., Any]:
    """``torch.compile`` of :func:`_context_forward`, once per process. Compiling this function rather than
    the base model keeps the context pass's compilations (one per model, and one more once sample
    lengths vary) on its own code object: torch allows 8 per code object, and the base models' forward
    wrapper is one code object shared by the transformers model classes, which the candidate steps use."""
    return torch.compile(_context_forward)
