"""Argument planning for :func:`mtp_lib.marginal.marginalize`: checks, defaults and budgets, all up front."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtp_lib.inputs import as_ids, as_positions
from mtp_lib.marginal.flex import _FLEX_MIN_HEAD_DIM, _head_dim, flex_available
from mtp_lib.marginal.nuclei import _check_top_p
from mtp_lib.models import get_adapter

_NUCLEUS_ELEMENTS = 2**27  # rows x vocabulary per sort of the nuclei (float64 sums: some 40 bytes an element)
_CACHE_COPY_BUDGET = 2**30  # bytes: each row of a candidate step holds its own copy of the context's KV cache


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one :func:`marginalize` call computes, and in what pieces."""

    adapter: Any
    vocab: int
    device: torch.device
    input_ids: torch.Tensor  # [1, T] on the device
    pos_host: torch.Tensor  # [P] the context ends, on the CPU
    pos: torch.Tensor  # [P] the same, on the device
    depth: int
    top_p: float
    extras: list[float]  # the extra top-p values, ascending, each < top_p
    compile: bool
    flex: bool
    max_tokens_per_chunk: int
    row_len: int  # slots of a packed row
    max_logits_elements: int
    sort_budget: int  # rows x vocabulary per sort of the nuclei
    progress: bool

    @property
    def top_ps(self) -> list[float]:
        """Every top-p computed, ascending (the main one last)."""
        return [*self.extras, self.top_p]

    def rows_per_step(self, kv_bytes: int) -> int:
        """Rows of a candidate step: packed, as many as the chunk and the cache copies allow; flex, one (no copies)."""
        if self.flex:
            return 1
        return max(1, min(self.max_tokens_per_chunk // self.row_len, _CACHE_COPY_BUDGET // max(1, kv_bytes)))

    def leaves_per_row(self, level: int) -> int:
        """Leaves of tree level ``level`` per row: a row holds its leaves and their ``level - 1`` ancestors."""
        return max(1, (self.max_tokens_per_chunk if self.flex else self.row_len) // level)


def _default_logits_elements(device: torch.device) -> int:
    """Candidates x vocabulary per logits block: 2^25 on the CPU; on a GPU a power of two near 1/64 of
    its memory in elements (2^30 on an 80 GB card, 2^28 on 24 GB), between 2^26 and 2^30. Fewer,
    larger blocks cost the host less per candidate."""
    if device.type == "cpu":
        return 2**25
    if device.type != "cuda":
        return 2**28
    total = torch.cuda.get_device_properties(device).total_memory
    return 2 ** max(26, min(30, int(math.log2(max(1, total // 64)))))


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def _extra_top_ps(top_p: float, extra_top_p: Sequence[float]) -> list[float]:
    extras = sorted({_check_top_p(q, "extra_top_p") for q in extra_top_p} - {top_p})
    if extras and extras[-1] > top_p:
        raise ValueError(f"extra_top_p values must be <= top_p={top_p} (their nuclei are prefixes of the main one); "
                         f"got {extras[-1]}. Raise top_p instead.")
    return extras


def _use_flex(attention: str, compile: bool, gpu: bool, config: Any) -> bool:
    """Whether the candidate steps run through FlexAttention (see ``marginalize``'s ``attention``)."""
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} must be True or False")
    if attention not in ("auto", "packed", "flex"):
        raise ValueError(f"attention={attention!r} must be 'auto', 'packed' or 'flex'")
    if attention == "flex" and not flex_available():
        raise ValueError("attention='flex' needs FlexAttention (torch >= 2.5); use attention='packed'")
    # auto: flex only compiled on a GPU. Measured side by side (SmolLM2, H100, 512-token context:
    # data/results/gpu/benchmark-marginal-smollm2-135m-packed-vs-flex.json): compiled, flex takes
    # 0.23 s where packed takes 0.27-0.28 s; eager, flex is a little slower (0.48 s against 0.46-0.47 s:
    # its tree part ran as separate kernels then; not measured again since the merge kernel).
    small_heads = gpu and _head_dim(config) < _FLEX_MIN_HEAD_DIM  # compiled FlexAttention refuses them
    flex = attention == "flex" or (attention == "auto" and gpu and compile and flex_available() and not small_heads)
    if flex and small_heads:
        raise ValueError(f"attention='flex' on a GPU needs heads of at least {_FLEX_MIN_HEAD_DIM} dimensions (torch's "
                         f"compiled FlexAttention), this model's have {_head_dim(config)}; use attention='packed'")
    if flex and compile and not gpu:
        raise ValueError("compile=True with attention='flex' needs a GPU (torch's compiled FlexAttention on the "
                         "CPU gives no log-sum-exp); use attention='packed' on the CPU")
    return flex


def _plan(model: nn.Module, input_ids: Any, *, depth: int, top_p: float, positions: Any, extra_top_p: Sequence[float],
          max_tokens_per_chunk: int | None, tokens_per_row: int | None, max_logits_elements: int | None,
          progress: bool, compile: bool, attention: str) -> _Plan:
    """Check the arguments of ``marginalize`` and fill in the defaults of the device."""
    adapter = get_adapter(model)
    config: Any = model.config
    vocab = int(adapter.unembed_weight(model).shape[0])
    depth = _check_int(depth, "depth", 1)
    device = next(model.parameters()).device
    gpu = device.type != "cpu"
    flex = _use_flex(attention, compile, gpu, config)
    top_p = _check_top_p(top_p)
    extras = _extra_top_ps(top_p, extra_top_p)
    chunk = _check_int(max_tokens_per_chunk if max_tokens_per_chunk is not None else (16384 if gpu else 1024),
                       "max_tokens_per_chunk", 1)
    row = _check_int(tokens_per_row if tokens_per_row is not None else (256 if gpu else 128), "tokens_per_row", 1)
    logits_elements = _check_int(max_logits_elements if max_logits_elements is not None
                                 else _default_logits_elements(device), "max_logits_elements", 1)
    ids = as_ids(input_ids, vocab)[None].to(device)
    n_ctx = ids.shape[1]
    pos_host = as_positions(positions, n_ctx, what="context end t")
    if adapter.family == "gpt2":  # learned absolute positions: no room beyond the table
        limit = int(config.n_positions)
        if n_ctx + depth - 1 > limit:
            raise ValueError(f"input_ids of {n_ctx} tokens with depth={depth} needs positions up to "
                             f"{n_ctx + depth - 2}, beyond this GPT-2's {limit}: shorten the input")
    return _Plan(adapter=adapter, vocab=vocab, device=device, input_ids=ids, pos_host=pos_host, pos=pos_host.to(device),
                 depth=depth, top_p=top_p, extras=extras, compile=compile, flex=flex, max_tokens_per_chunk=chunk,
                 row_len=min(row, chunk), max_logits_elements=logits_elements,
                 sort_budget=min(logits_elements, _NUCLEUS_ELEMENTS), progress=progress)
