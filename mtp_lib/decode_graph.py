"""The fixed-shape layer under :mod:`mtp_lib.decode`: a static KV cache, tree attention masks, CUDA graphs.

Decoding a small model at batch 1 is bound by kernel launches, not by arithmetic: one forward pass
of SmolLM2-135M launches over a thousand kernels. Capturing a decoding step once as a CUDA graph and
replaying it removes that overhead, but only if the step has fixed shapes, reads and writes fixed
buffers and never waits for the host. This module holds what makes that possible:

- :class:`StaticKVCache` keeps every layer's keys and values in one preallocated buffer
  ``[1, kv_heads, max_len, head_dim]``. A forward call writes its tokens at the *slots* it is told
  (``set_slots``) and attends over the whole buffer; the attention mask says which slots are
  context. "Cropping" rejected draft tokens is moving the write position back: nothing is freed.
  Sliding-window layers (Gemma 3) keep all positions too; the mask applies their window.
- :func:`tree_masks` builds the additive attention masks of one step from device tensors only:
  slot ``s < start`` is context for every query, and a step's own tokens see their tree ancestors.
- :class:`GraphRunner` calls a step function on fixed input buffers. On CUDA it captures the step
  once (after warm-up on a side stream) and replays it; elsewhere, or with ``cuda_graph=False``,
  it calls the function eagerly, so the same code path runs and is tested on CPU.

The Hugging Face attention layers only call ``cache.update(keys, values, layer_idx)`` and read the
mask and positions they are given, so the static cache works for every family without touching
the models' code.

Graphs are captured by hand rather than through ``torch.compile(mode="reduce-overhead")``: no
compile time, no recompiles when a shape changes, and the same step runs eagerly for tests.
Compiling would also fuse the many small kernels of an eager layer, which a graph only replays:
``SpeculativeDecoder(compile_step=True)`` compiles the step (one shape) before capturing it here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["GraphRunner", "MaskLayout", "StaticKVCache", "StaticMTPCache", "mask_layout", "tree_masks"]


class StaticKVCache:
    """Keys and values of the ``n_layers`` attention layers of one decoder stack, in one fixed buffer.

    The buffer ``[2, n_layers, 1, kv_heads, max_len, head_dim]`` (keys, values) is allocated at the
    first :meth:`update` (so head count, head size, dtype and device come from the model); every
    layer must have the same shape, as in the supported families. Before each forward call,
    :meth:`set_slots` says where its ``S`` tokens go (a device tensor ``[S]``); ``update`` writes
    them there in place and returns the layer's whole keys and values. One buffer for all layers
    lets :meth:`move` rearrange every layer in two kernels.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        if n_layers < 1 or max_len < 1:
            raise ValueError(f"n_layers={n_layers} and max_len={max_len} must be >= 1")
        self.n_layers, self.max_len = n_layers, max_len
        self.kv: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None

    def set_slots(self, slots: torch.Tensor) -> None:
        self.slots = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values ``[1, H, S, D]`` at the current slots; return the layer's full buffers."""
        if self.slots is None:
            raise RuntimeError("StaticKVCache.update before set_slots: the decoder sets the write slots")
        b, h, _, d = key_states.shape
        if b != 1:
            raise ValueError(f"the static cache holds one sequence; got batch size {b}")
        if self.kv is None:
            self.kv = key_states.new_zeros(2, self.n_layers, 1, h, self.max_len, d)
        if value_states.shape[-1] != d or self.kv.shape[3] != h or self.kv.shape[5] != d or layer_idx >= self.n_layers:
            raise ValueError(f"layer {layer_idx}: keys {tuple(key_states.shape)} / values {tuple(value_states.shape)} "
                             f"do not fit the static cache {tuple(self.kv.shape)}: layers of different shapes "
                             "are not supported")
        keys, values = self.kv[0, layer_idx], self.kv[1, layer_idx]
        keys.index_copy_(2, self.slots, key_states)
        values.index_copy_(2, self.slots, value_states)
        return keys, values

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the entries of slots ``src`` to slots ``dst`` in every layer (all sources read first)."""
        if self.kv is not None:
            self.kv.index_copy_(4, dst, self.kv.index_select(4, src))


class StaticMTPCache:
    """Static caches of an :class:`mtp_lib.heads.MTPModel`: one for the backbone, one per layer head.

    It stands in for :class:`mtp_lib.heads.MTPCache` in ``MTPModel.forward``, which reads its
    ``backbone`` and ``heads``, calls ``begin()`` and ``get_seq_length()``. The decoder keeps
    ``length`` (the context tokens in the cache) up to date on the host, but a captured step must not
    depend on it: pass positions and the mask explicitly.
    """

    def __init__(self, n_backbone_layers: int, n_heads: int, has_head_caches: bool, max_len: int) -> None:
        self.length = 0
        self.backbone = StaticKVCache(n_backbone_layers, max_len)
        self.heads: list[StaticKVCache | None] = [StaticKVCache(1, max_len) if has_head_caches else None
                                                  for _ in range(n_heads)]

    def caches(self) -> list[StaticKVCache]:
        return [c for c in [self.backbone, *self.heads] if c is not None]

    def begin(self) -> None:
        """Called by ``MTPModel.forward``; nothing to do."""

    def get_seq_length(self) -> int:
        """The context tokens in the cache, as last set by the decoder."""
        return self.length

    def set_slots(self, slots: torch.Tensor) -> None:
        for cache in self.caches():
            cache.set_slots(slots)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in self.caches():
            cache.move(src, dst)


# --------------------------------------------------------------------------------------------------
# Masks


class MaskLayout:
    """How a model takes its attention mask: one 4D tensor, or a dict per layer type (Gemma 2/3).

    ``window`` is the sliding window of the sliding layers (of all layers when ``per_type`` is False
    and the model slides everywhere, as Mistral), or None.
    """

    def __init__(self, per_type: bool, window: int | None) -> None:
        self.per_type = per_type
        self.window = window

    def __repr__(self) -> str:
        return f"MaskLayout(per_type={self.per_type}, window={self.window})"


def mask_layout(configs: Sequence[Any]) -> MaskLayout:
    """The mask layout for modules built from ``configs`` (a backbone's and its heads' configs).

    Models with sliding-window layer types get a dict ``{"full_attention", "sliding_attention"}``;
    others one tensor (with the window applied to every layer for Mistral, as Hugging Face does).
    """
    types = {t for c in configs for t in (getattr(c, "layer_types", None) or [])}
    window = getattr(configs[0], "sliding_window", None)
    if "sliding_attention" in types:
        unknown = types - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"layer types {sorted(unknown)} are not supported by the static decoder")
        if not window:
            raise ValueError("the model has sliding_attention layers but no config.sliding_window")
        return MaskLayout(per_type=True, window=int(window))
    if window and getattr(configs[0], "model_type", None) == "mistral":
        return MaskLayout(per_type=False, window=int(window))
    return MaskLayout(per_type=False, window=None)


def tree_masks(start: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor, max_len: int,
               layout: MaskLayout, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive attention masks ``[1, 1, S, max_len]`` for ``S`` tokens written at slots ``start + i``.

    ``start`` ``[1]``: the number of context tokens in the cache (slots ``0..start-1``, slot = position).
    ``depth`` ``[S]``: token ``i`` has position ``start + depth[i]``. ``ancestors`` ``[S, S]`` bool:
    token ``i`` may attend to token ``j`` of the step (its tree ancestors and itself; a lower
    triangle for a plain sequence). Slots after the step's tokens hold stale entries and are hidden.
    Sliding layers also hide keys ``window`` or more positions behind the query. Only fixed-shape
    device operations: safe to capture in a CUDA graph.
    """
    n = depth.shape[0]
    slot = torch.arange(max_len, device=depth.device)
    rel = slot - start  # [K] slot relative to the step's first token
    in_step = (rel >= 0) & (rel < n)
    idx = rel.clamp(0, n - 1)
    allowed = (rel < 0)[None, :] | (in_step[None, :] & ancestors[:, idx])  # [S, K]
    neg = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=depth.device)

    def additive(ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, zero, neg)[None, None]

    if layout.window is None:
        return additive(allowed)
    q_pos = start + depth  # [S]
    k_pos = torch.where(rel < 0, slot, start + depth[idx])  # [K]
    near = (q_pos[:, None] - k_pos[None, :]) < layout.window
    sliding = additive(allowed & near)
    if not layout.per_type:
        return sliding
    return {"full_attention": additive(allowed), "sliding_attention": sliding}


# --------------------------------------------------------------------------------------------------
# CUDA graphs


class GraphRunner:
    """Run ``fn(*buffers)`` on fixed input buffers, replaying a captured CUDA graph when enabled.

    ``example_inputs`` give the buffers' shapes, dtypes and device (they are cloned). Each call
    copies its inputs into the buffers and returns ``fn``'s outputs; with a graph these are the
    same tensors every call, overwritten by the next one, so copy what you keep.

    ``fn`` must be capturable: fixed shapes, no host synchronization (``.item()``, ``nonzero``,
    Python branches on tensor values), no host data copied in, and only in-place writes to
    persistent tensors (such as a :class:`StaticKVCache`). Its warm-up runs (and the capture) execute
    it on the example inputs, so it must tolerate them (a static cache just gets stale slots).
    Without ``cuda_graph`` (or off CUDA) ``fn`` runs eagerly on the same buffers.
    """

    def __init__(self, fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor], *,
                 cuda_graph: bool, warmup: int = 2) -> None:
        self.fn = fn
        self.inputs = [x.clone() for x in example_inputs]
        self.graph: Any | None = None
        self.outputs: Any = None
        if not cuda_graph:
            return
        if not all(x.is_cuda for x in self.inputs):
            raise ValueError("cuda_graph=True needs CUDA input buffers (the model on a CUDA device); "
                             "pass cuda_graphs=False to run eagerly")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = fn(*self.inputs)
        except RuntimeError as err:
            raise RuntimeError(f"capturing the decoding step as a CUDA graph failed ({err}); something in "
                               "the step synchronizes with the host or changes shape. Pass cuda_graphs=False "
                               "to decode eagerly.") from err
        self.graph = graph

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(inputs)}")
        for buf, x in zip(self.inputs, inputs):
            buf.copy_(x, non_blocking=True)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.outputs
