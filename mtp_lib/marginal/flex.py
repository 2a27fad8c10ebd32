"""Block-sparse tree attention (FlexAttention): a candidate step as one row, the context cache read in place.

With ``attention="flex"`` all tokens of a step form one sequence after the one context cache. The
context part runs through FlexAttention over the 128 x 128 blocks of (candidate, context key) pairs
that the rule allows (:func:`_context_block_mask`); each token's ancestors and itself (at most
``depth`` keys) are attended apart and merged with it by their log-sum-exps
(:func:`_tree_attention_forward`: :func:`mtp_lib.kernels.tree_merge` on a GPU, else
:func:`_merge_tree_part`). The function is registered in transformers' ``AttentionInterface`` and
switched on for a step by :func:`_attention_function`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mtp_lib import kernels
from mtp_lib.marginal.packing import _Packed

# the tree part by mtp_lib.kernels.tree_merge on a GPU (False: _merge_tree_part's elementwise products,
# which torch.compile fuses). Measured side by side, compiled, bf16, H200 (benchmarks/marginal.py
# --merge fused,plain, in both orders; data/results/gpu/*-flex-h200.json and repeats/*-h200-reversed.json):
# SmolLM2 0.200 s against 0.205 s and 0.191 against 0.201; Gemma 3 0.210 against 0.212 and 0.207 against 0.218
_FUSED_MERGE = True
_FLEX_BLOCK = 128  # FlexAttention's block size (queries and keys)
# FlexAttention's kernel_options for the context part (None: torch's defaults, on an H100 in
# bf16 BLOCK_M=128, BLOCK_N=128, 3 stages, 4 warps at head_dim 64). Set by benchmarks/flex_tree.py and
# benchmarks/marginal.py --flex-options to compare settings; the BlockMask's 128-blocks must be
# multiples of BLOCK_M and BLOCK_N.
_FLEX_KERNEL_OPTIONS: dict[str, Any] | None = None
_FLEX_ATTENTION = "mtp_lib_tree_flex"  # our attention function's name in transformers' AttentionInterface
# torch's compiled FlexAttention (a GPU's) refuses heads of fewer dimensions ("NYI: embedding dimension
# of the query, key, and value must be at least 16", torch 2.11 on an H200)
_FLEX_MIN_HEAD_DIM = 16


try:  # FlexAttention: torch >= 2.5 (older: attention="packed" only)
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # pragma: no cover
    _flex_module = None  # type: ignore[assignment]
_flex_attention: Callable[..., Any] | None = getattr(_flex_module, "flex_attention", None)
_BlockMask: Any = getattr(_flex_module, "BlockMask", None)
# the log-sum-exp is asked for by an AuxRequest from torch 2.9, by return_lse before
_FLEX_LSE: dict[str, Any] = ({"return_aux": _flex_module.AuxRequest(lse=True)} if hasattr(_flex_module, "AuxRequest")
                             else {"return_lse": True})
# the transposed block lists serve the backward pass only; torch >= 2.6 can skip them
_NO_Q_BLOCKS: dict[str, Any] = ({"compute_q_blocks": False} if _BlockMask is not None and "compute_q_blocks" in
                                inspect.signature(_BlockMask.from_kv_blocks).parameters else {})


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    return _flex_attention is not None


def _head_dim(config: Any) -> int:
    """The attention heads' dimension of a transformers config (``head_dim``, else hidden / heads)."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else int(config.hidden_size) // int(config.num_attention_heads)


def _block_lists(listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BlockMask's block lists from ``listed [query blocks, key blocks]`` (bool): how many key
    blocks each query block lists, and their indices first (ascending), ``[1, 1, Q]`` and ``[1, 1, Q, K]``."""
    num = listed.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~listed).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _context_block_mask(packed: _Packed, n_ctx: int, window: int | None) -> Any:
    """The :class:`BlockMask` of the context part of a one-row step: slot ``q`` sees context keys
    ``0..ctx_end[q]`` (within the window in sliding layers; padding sees none). Only the 128 x 128
    blocks that hold an allowed pair are listed (the keys up to the block's largest context end), and
    the blocks that every query of a block sees whole are marked full (no mask evaluated there)."""
    bs = _FLEX_BLOCK
    ctx_end, pos = packed.ctx_end[0], packed.pos_ids[0]
    length = len(ctx_end)
    device = ctx_end.device
    n_qb, n_kb = length // bs, -(-n_ctx // bs)

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        ok = kv <= ctx_end[q]
        if window is not None:
            ok = ok & (pos[q] - kv < window)
        return ok

    real = (ctx_end >= 0).view(n_qb, bs)
    big = torch.iinfo(torch.long).max // 4
    t_max = ctx_end.view(n_qb, bs).amax(-1)
    t_min = torch.where(real, ctx_end.view(n_qb, bs), big).amin(-1)
    t_min = torch.where(real.all(-1), t_min, torch.full_like(t_min, -1))  # a block with padding is never full
    k_first = torch.arange(n_kb, device=device) * bs  # first and last key of each key block
    k_last = k_first + bs - 1
    need = k_first <= t_max[:, None]
    full = k_last <= t_min[:, None]
    if window is not None:  # keys within the window of some (every) query of the block
        p = pos.view(n_qb, bs)
        lo = torch.where(real, p, big).amin(-1) - window + 1
        hi = torch.where(real, p, -big).amax(-1) - window + 1
        need &= k_last >= lo[:, None]
        full &= k_first >= hi[:, None]
    partial = need & ~full

    kv_num, kv_idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    block_mask: Any = _BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                               seq_lengths=(length, n_ctx), **_NO_Q_BLOCKS)
    block_mask.ndim = 4  # GPT-2's forward reads attention_mask.ndim (a 4D mask is passed on as it is)
    return block_mask


@dataclasses.dataclass
class _TreeAttention:
    """What the attention function of a flex step needs besides the mask (passed to the model as the
    keyword ``mtp_tree``, which transformers hands on to the attention function)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: the context's keys and values, [1, Hkv, T, hd]
    ancestors: torch.Tensor  # [L, A] long: the slots of each slot's ancestors (0 where none)
    valid: torch.Tensor  # [L, A] bool: an ancestor is there
    valid_sliding: torch.Tensor  # [L, A] bool: and within the sliding window
    all_sliding: bool  # every layer has the window (Mistral)


def _tree_attention(packed: _Packed, window: int | None, all_sliding: bool,
                    kv: list[tuple[torch.Tensor, torch.Tensor]]) -> _TreeAttention:
    anc = packed.ancestors[0]
    valid = anc >= 0
    anc = anc.clamp(min=0)
    pos = packed.pos_ids[0]
    valid_sliding = valid if window is None else valid & (pos[:, None] - pos[anc] < window)
    return _TreeAttention(kv=kv, ancestors=anc, valid=valid, valid_sliding=valid_sliding, all_sliding=all_sliding)


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    """``torch.compile`` of FlexAttention, once per process (a GPU's flex steps outside ``compile=True``)."""
    return torch.compile(_flex_attention)


def _tree_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                            softcap: float | None = None, mtp_tree: _TreeAttention | None = None,
                            sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function of the flex steps: ``query``, ``key`` and ``value`` are the
    step's own slots (no cache). The context part runs through FlexAttention on the layer's context
    keys, read in place, with the step's BlockMask (:func:`_context_block_mask`); the tree part (each
    slot itself and its ancestors, at most ``depth`` keys) is a few elementwise products, merged with
    the context part by its log-sum-exp.

    (``benchmarks/flex_tree.py``, one layer of 65,536 slots at SmolLM2's shapes on an H100,
    ``data/results/gpu/benchmark-flex-tree.json``: this takes 0.39 ms, FlexAttention of the context
    part alone 0.29 ms; one FlexAttention call over the context keys followed by the step's own
    keys, the tree part as their diagonal blocks, took 0.71 ms. On a GPU the tree part is one Triton
    kernel, :func:`mtp_lib.kernels.tree_merge`, by default (``_FUSED_MERGE``): on an H200 it took
    0.38 ms per layer in this benchmark against the products' 0.36, yet the whole ``marginalize`` ran
    1-5% faster with it, where ``torch.compile`` fuses the products with the model's other operations.)

    On a GPU outside ``torch.compile`` FlexAttention runs compiled (once per process, shapes dynamic
    after the first recompilation); on the CPU it is FlexAttention's reference implementation.
    """
    if mtp_tree is None:
        raise RuntimeError("the tree attention of mtp_lib.marginal was called without its mtp_tree argument")
    k_ctx, v_ctx = mtp_tree.kv[module.layer_idx]  # type: ignore[index]
    _, n_heads, length, head_dim = query.shape
    n_kv = key.shape[1]
    scale = float(scaling) if scaling is not None else head_dim**-0.5

    score_mod = None
    if softcap:
        cap = float(softcap)

        def score_mod(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            return cap * torch.tanh(score / cap)

    flex = _flex_attention
    assert flex is not None, "FlexAttention needs torch >= 2.5"
    args = (query, k_ctx, v_ctx)
    kwargs = dict(score_mod=score_mod, block_mask=attention_mask, scale=scale, enable_gqa=n_heads != n_kv,
                  **_FLEX_LSE)
    if _FLEX_KERNEL_OPTIONS is not None:  # (the CPU's reference implementation ignores them)
        kwargs["kernel_options"] = dict(_FLEX_KERNEL_OPTIONS)
    if torch.compiler.is_compiling():  # inside compile=True: traced with the model (no Python-side state here)
        out = flex(*args, **kwargs)
    elif query.device.type != "cpu":
        out = _compiled_flex()(*args, **kwargs)
    else:
        with warnings.catch_warnings():  # the CPU runs the reference implementation on purpose
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex(*args, **kwargs)
    out_ctx, aux = out
    lse_ctx = aux if isinstance(aux, torch.Tensor) else aux.lse  # [1, H, L], natural log; -inf: no context key
    sliding = sliding_window is not None or mtp_tree.all_sliding
    valid = mtp_tree.valid_sliding if sliding else mtp_tree.valid
    if _FUSED_MERGE and kernels.tree_merge_available(query):
        return kernels.tree_merge(query, key, value, out_ctx, lse_ctx, mtp_tree.ancestors, valid, scale, softcap), None
    return _merge_tree_part(query, key, value, out_ctx, lse_ctx, mtp_tree.ancestors, valid, scale, softcap), None


def _merge_tree_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_ctx: torch.Tensor,
                     lse_ctx: torch.Tensor, ancestors: torch.Tensor, valid: torch.Tensor, scale: float,
                     softcap: float | None) -> torch.Tensor:
    """The tree part of a flex step, in float32: each slot's own key (no gather) and its ancestors'
    (gathered by slot), one score per key and head; then a softmax over [context, self, ancestors]
    by their log-sum-exps. Returns ``[1, L, H, hd]`` (what :func:`mtp_lib.kernels.tree_merge` does in
    one kernel)."""
    _, n_heads, length, head_dim = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    q = query.float().view(1, n_kv, group, length, head_dim)

    def score(k: torch.Tensor) -> torch.Tensor:  # [1, Hkv, L, hd] -> [1, Hkv, G, L]
        s = (q * k.float()[:, :, None]).sum(-1) * scale
        return softcap * torch.tanh(s / softcap) if softcap else s

    scores, values = [score(key)], [value]  # a slot always sees itself
    for a in range(ancestors.shape[1]):
        slot = ancestors[:, a]
        scores.append(score(key[:, :, slot]).masked_fill(~valid[:, a], -math.inf))
        values.append(value[:, :, slot])
    lse_ctx = lse_ctx.float().view(1, n_kv, group, length)
    top = lse_ctx
    for s in scores:
        top = torch.maximum(top, s)  # finite: the slot's own score is
    w = torch.exp(lse_ctx - top)
    num = out_ctx.float().view(1, n_kv, group, length, head_dim) * w[..., None]
    den = w
    for s, v in zip(scores, values):
        w = torch.exp(s - top)
        num = num + v.float()[:, :, None] * w[..., None]
        den = den + w
    merged = num / den[..., None]
    return merged.view(1, n_heads, length, head_dim).to(query.dtype).transpose(1, 2).contiguous()


@contextlib.contextmanager
def _attention_function(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with the registered attention function ``name``; the configs are restored after."""
    from transformers import AttentionInterface, PretrainedConfig

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _tree_attention_forward)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if isinstance(c, PretrainedConfig)}
    saved = [(c, c._attn_implementation_internal) for c in configs.values()]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = name
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl

