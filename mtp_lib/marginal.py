"""Multi-token prediction by marginalization: what a next-token model already knows about later tokens.

A causal LM gives p(x_{t+1} | x<=t). The token after it follows by summing over the intermediate one:

    p(x_{t+2} | x<=t) = sum_y p(x_{t+2} | x<=t, y) p(y | x<=t)

and the d-th token by the same recursion over d-1 intermediate tokens. The sum runs over the top-p
*nucleus* of each intermediate distribution (the smallest set of most probable tokens whose mass
reaches ``top_p``, the token that crosses the threshold included), with the weights renormalized over
it; ``top_p=1.0`` is the exact marginal over the whole vocabulary.

How it runs (:func:`marginalize`):

1. the sample runs once, filling a KV cache of its ``T`` tokens;
2. every kept candidate of every position (and, for ``depth >= 3``, every path of deeper levels)
   becomes one token of a *packed* extra step. A step is a batch of rows; each row is one sequence
   after its own copy of the context's cache, holding ``tokens_per_row`` candidate tokens (of any
   positions), each with its own position id (``t + level``) and a tree attention mask that lets it
   see the cache up to its own context end ``t``, its ancestors in the tree and itself. Rows keep
   the attention of each token to ``T + tokens_per_row`` keys, the batch keeps the matmuls large.
   With ``attention="flex"`` (compiled on a GPU by default) a step is one sequence instead, read
   against the one context cache in place: FlexAttention computes only the 128 x 128 blocks of
   (candidate, context key) pairs that the rule allows, and each token's ancestors and itself
   (at most ``depth`` keys) are attended apart and merged by their log-sum-exps;
3. the unembedding runs on a bounded number of candidates at a time, and each block is reduced at
   once into the ``[P, V]`` marginals (see :func:`_accumulate`): one softmax per candidate, a
   weighted sum per position shifted in log space, ``logaddexp`` across blocks (bf16 logits on a GPU
   with Triton: :func:`mtp_lib.kernels.weighted_softmax_sum`, which does not write the softmax).
   Nothing waits for the device inside a tree level: the layouts of the steps are built on the
   host, and the check for sums that underflowed waits one step late.

Memory stays bounded by ``max_tokens_per_chunk`` (one step), the cache copies (about 1 GiB) and
``max_logits_elements`` (the logits block), whatever the nucleus size: small models keep thousands of
candidates at top-p 0.99 (SmolLM2-135M: a mean of about 2,400 on English prose).

Masks are additive float ``[B, 1, L, T + L]`` tensors (sdpa and eager attention both take them);
models with sliding-window layers (Gemma 2/3) get one mask per layer type, and the cache keeps every
context token in every layer so that the mask alone enforces the window. Learned absolute positions
(GPT-2) work since each token carries its own position id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from mtp_lib import kernels
from mtp_lib.models import check_input_ids, eval_mode, get_adapter

__all__ = ["MarginalResult", "Nucleus", "flex_available", "marginalize", "nucleus", "nucleus_size"]


# --------------------------------------------------------------------------------------------------
# Nucleus (top-p) sets


@dataclasses.dataclass(frozen=True)
class Nucleus:
    """The top-p candidates of a batch of distributions, flattened row by row.

    Within a row the candidates come most probable first. ``log_weights`` are the renormalized
    log-probabilities (they sum to one over a row's candidates in probability space).
    """

    rows: torch.Tensor  # [N] long: which input row each candidate belongs to
    tokens: torch.Tensor  # [N] long: the candidate token ids
    log_weights: torch.Tensor  # [N] float64: log p(token) - log(mass kept in its row)
    sizes: torch.Tensor  # [R] long: candidates per row
    log_mass: torch.Tensor  # [R] float64: log of the probability mass the nucleus kept


def _check_top_p(top_p: float, name: str = "top_p") -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"{name}={top_p!r} must be a number in (0, 1]; use 1.0 for the whole vocabulary")
    return float(top_p)


def _as_log_probs(log_probs: torch.Tensor, name: str = "log_probs") -> torch.Tensor:
    """Normalized log-probabilities in float32 or wider (logits are accepted and normalized too)."""
    if not isinstance(log_probs, torch.Tensor) or not log_probs.is_floating_point() or log_probs.ndim == 0:
        raise ValueError(f"{name} must be a floating tensor of shape [..., V]")
    if log_probs.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension")
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    return torch.log_softmax(log_probs.to(dtype), dim=-1)


def _row_blocks(n_rows: int, n_cols: int, budget: int) -> Iterator[slice]:
    step = max(1, budget // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _nested_nucleus(log_probs: torch.Tensor, top_ps: Sequence[float], budget: int = 2**24
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nuclei of ``log_probs [R, V]`` (normalized) at several ``top_ps`` (ascending) in one sort.

    The nucleus at a smaller top-p is a prefix of the one at a larger top-p (same order), so the
    candidates are those of the largest and each gets one log weight per top-p (``-inf`` where that
    nucleus leaves it out). Returns ``rows [N]``, ``tokens [N]``, ``log_weights [N, m]`` (float64),
    ``sizes [R, m]`` and ``log_mass [R, m]`` (float64). Rows are processed in blocks of about
    ``budget`` elements so that the sort stays bounded in memory.
    """
    rows_out, toks_out, lw_out, sizes_out, mass_out = [], [], [], [], []
    n_rows, vocab = log_probs.shape
    for blk in _row_blocks(n_rows, vocab, budget):
        sorted_lp, order = log_probs[blk].sort(dim=-1, descending=True)
        probs = sorted_lp.double().exp()
        cum = probs.cumsum(dim=-1)
        before = cum - probs  # mass of the more probable tokens
        n_finite = torch.isfinite(sorted_lp).sum(dim=-1)
        sizes = torch.stack([
            n_finite if q >= 1.0 else torch.minimum((before < q).sum(dim=-1), n_finite) for q in top_ps
        ], dim=-1).clamp(min=1)
        log_mass = cum.gather(1, sizes - 1).log()
        n_max = sizes[:, -1]
        rows = torch.repeat_interleave(torch.arange(len(n_max), device=n_max.device), n_max)
        starts = torch.cumsum(n_max, 0) - n_max
        ranks = torch.arange(len(rows), device=rows.device) - starts[rows]
        lw = sorted_lp[rows, ranks].double()[:, None] - log_mass[rows]
        lw = lw.masked_fill(ranks[:, None] >= sizes[rows], -math.inf)
        rows_out.append(rows + blk.start)
        toks_out.append(order[rows, ranks])
        lw_out.append(lw)
        sizes_out.append(sizes)
        mass_out.append(log_mass)
    return (torch.cat(rows_out), torch.cat(toks_out), torch.cat(lw_out), torch.cat(sizes_out),
            torch.cat(mass_out))


def nucleus(log_probs: torch.Tensor, top_p: float) -> Nucleus:
    """The top-p nucleus of each row of ``log_probs`` (``[V]`` or ``[R, V]``; logits are fine too).

    The nucleus is the smallest set of most probable tokens whose mass reaches ``top_p``: the token
    that crosses the threshold is included, and a row keeps at least one token. ``top_p=1.0`` keeps
    every token of nonzero probability. Masses are summed in float64.
    """
    top_p = _check_top_p(top_p)
    lp = _as_log_probs(log_probs)
    flat = lp.reshape(-1, lp.shape[-1])
    rows, tokens, lw, sizes, log_mass = _nested_nucleus(flat, [top_p])
    return Nucleus(rows=rows, tokens=tokens, log_weights=lw[:, 0], sizes=sizes[:, 0], log_mass=log_mass[:, 0])


def nucleus_size(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """How many tokens the top-p nucleus of each distribution holds: ``[..., V] -> [...]`` (long)."""
    top_p = _check_top_p(top_p)
    lp = _as_log_probs(log_probs)
    flat = lp.reshape(-1, lp.shape[-1])
    out = []
    for blk in _row_blocks(flat.shape[0], flat.shape[1], 2**24):
        sorted_lp = flat[blk].sort(dim=-1, descending=True).values
        n_finite = torch.isfinite(sorted_lp).sum(dim=-1)
        if top_p >= 1.0:
            out.append(n_finite)
            continue
        probs = sorted_lp.double().exp()
        before = probs.cumsum(dim=-1) - probs
        out.append(torch.minimum((before < top_p).sum(dim=-1), n_finite).clamp(min=1))
    return torch.cat(out).reshape(lp.shape[:-1])


# --------------------------------------------------------------------------------------------------
# Result


@dataclasses.dataclass
class MarginalResult:
    """What :func:`marginalize` returns.

    ``log_probs[i, 0]`` is log p(x_{t+1} | x<=t) and ``log_probs[i, d]`` the marginal
    log p(x_{t+d+1} | x<=t) for the context end ``t = positions[i]``, all in float32 on the model's
    device. ``n_candidates[i]`` is the size of the next-token nucleus at ``top_p`` (the candidates
    fed for depth 2), ``log_mass[i]`` the log of the mass that nucleus kept. ``n_nodes[l]`` counts
    the candidate paths of length ``l + 1`` that were fed (all positions together), and
    ``n_tokens_fed`` the tokens of all packed candidate steps (ancestors recomputed for depth >= 3).
    """

    log_probs: torch.Tensor  # [P, depth, V] float32
    n_candidates: torch.Tensor  # [P] long
    positions: torch.Tensor  # [P] long
    log_mass: torch.Tensor  # [P] float32
    top_p: float
    depth: int
    n_nodes: tuple[int, ...]
    n_tokens_fed: int
    n_chunks: int
    extra_log_probs: dict[float, torch.Tensor] = dataclasses.field(default_factory=dict)

    def at(self, top_p: float) -> torch.Tensor:
        """The ``[P, depth, V]`` log-probabilities at ``top_p``: the main one or one of ``extra_top_p``."""
        if float(top_p) == self.top_p:
            return self.log_probs
        if float(top_p) in self.extra_log_probs:
            return self.extra_log_probs[float(top_p)]
        raise ValueError(f"top_p={top_p!r} was not computed; available: {[self.top_p, *self.extra_log_probs]}. "
                         "Pass it in marginalize(..., extra_top_p=[...]).")

    def nucleus_size(self, top_p: float) -> torch.Tensor:
        """Size of the next-token nucleus at any ``top_p`` (cheap: from ``log_probs[:, 0]``): ``[P]``."""
        return nucleus_size(self.log_probs[:, 0], top_p)


# --------------------------------------------------------------------------------------------------
# The packed candidate step


_CACHE_COPY_BUDGET = 2**30  # bytes: each row of a candidate step holds its own copy of the context's KV cache


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


def _mask_for(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``[B, 1, L, K]`` from a boolean ``[B, L, K]`` (True = may attend): sdpa and eager take it."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., Any]] = weakref.WeakKeyDictionary()


def _compiled(base: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` of a base model (one per model, kept while the model lives; the model itself is
    not changed). Shapes become dynamic after the first recompilation (torch's default), so chunks
    and samples of other lengths reuse the compiled code."""
    if base not in _COMPILED:
        _COMPILED[base] = torch.compile(base)
    return _COMPILED[base]


@dataclasses.dataclass
class _Packed:
    """The tokens of one candidate step, laid out as ``R`` rows of ``L`` slots (see :func:`_pack`)."""

    input_ids: torch.Tensor  # [R, L] long (padding: token 0)
    pos_ids: torch.Tensor  # [R, L] long: t + level (padding: 0)
    ctx_end: torch.Tensor  # [R, L] long: the last context key a slot may see (padding: -1, none)
    ancestors: torch.Tensor  # [R, L, A] long: slots of a slot's ancestors in its row, -1 where none
    leaf_row: torch.Tensor  # [K] long
    leaf_slot: torch.Tensor  # [K] long
    n_tok: int  # tokens fed, padding excluded

    def to(self, device: torch.device) -> _Packed:
        """The layout on ``device`` (built on the CPU; see :func:`_upload`)."""
        if device.type == "cpu":
            return self
        up = functools.partial(_upload, device=device)
        return dataclasses.replace(self, input_ids=up(self.input_ids), pos_ids=up(self.pos_ids),
                                   ctx_end=up(self.ctx_end), ancestors=up(self.ancestors),
                                   leaf_row=up(self.leaf_row), leaf_slot=up(self.leaf_slot))


def _upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: to a GPU from pinned memory, without waiting for it."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _pack(positions: torch.Tensor, npos: torch.Tensor, paths: torch.Tensor, leaves_per_row: int,
          pad_to: int = 1) -> _Packed:
    """Lay out the leaves ``paths [K, l]`` of context ends ``positions[npos]`` with their ancestors.

    The leaves are cut into rows of ``leaves_per_row``; each row holds its leaves and their distinct
    ancestors (ancestors shared by two rows are computed in both), level by level. A token at tree
    level ``k`` of context end ``t`` gets position ``t + k``. Rows are padded to one length, a
    multiple of ``pad_to``. Leaves must be grouped by ancestor, as built.
    """
    device = npos.device
    n_leaves, depth = paths.shape
    leaf_row = torch.arange(n_leaves, device=device) // leaves_per_row
    n_rows = int(leaf_row[-1]) + 1
    # the distinct prefixes of each row, level by level (the last level: the leaves themselves)
    rows, toks, ts, levels, inverses, offsets = [], [], [], [], [], []
    offset = 0
    for k in range(1, depth + 1):
        if k < depth:
            key = torch.cat([leaf_row[:, None], npos[:, None], paths[:, :k]], dim=1)
            uniq, inv = torch.unique_consecutive(key, dim=0, return_inverse=True)
            u_row, u_pos, u_tok = uniq[:, 0], uniq[:, 1], uniq[:, -1]
        else:
            inv = torch.arange(n_leaves, device=device)
            u_row, u_pos, u_tok = leaf_row, npos, paths[:, -1]
        rows.append(u_row)
        toks.append(u_tok)
        ts.append(positions[u_pos])
        levels.append(torch.full_like(u_pos, k))
        inverses.append(inv)
        offsets.append(offset)
        offset += len(u_tok)
    g_row, g_tok, g_t = torch.cat(rows), torch.cat(toks), torch.cat(ts)
    g_pos = g_t + torch.cat(levels)
    n_tok = len(g_tok)
    # each token's slot in its row
    order = torch.argsort(g_row, stable=True)
    counts = torch.bincount(g_row, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(g_row)
    slot[order] = torch.arange(n_tok, device=device) - starts[g_row[order]]
    length = -(-int(counts.max()) // pad_to) * pad_to

    input_ids = torch.zeros(n_rows, length, dtype=torch.long, device=device)
    pos_ids = torch.zeros(n_rows, length, dtype=torch.long, device=device)
    ctx_end = torch.full((n_rows, length), -1, dtype=torch.long, device=device)
    input_ids[g_row, slot] = g_tok
    pos_ids[g_row, slot] = g_pos
    ctx_end[g_row, slot] = g_t
    # a token at level k + 1 has its ancestors at levels 1..k (column k2: the one at level k2 + 1)
    ancestors = torch.full((n_rows, length, depth - 1), -1, dtype=torch.long, device=device)
    for k in range(1, depth):
        for k2 in range(k):
            ancestors[leaf_row, slot[offsets[k] + inverses[k]], k2] = slot[offsets[k2] + inverses[k2]]
    return _Packed(input_ids=input_ids, pos_ids=pos_ids, ctx_end=ctx_end, ancestors=ancestors,
                   leaf_row=leaf_row, leaf_slot=slot[offsets[-1]:], n_tok=n_tok)


def _packed_masks(ctx: _Context, packed: _Packed) -> Any:
    """Dense additive masks ``[R, 1, L, T + L]`` of a packed step: each slot sees the cache up to its
    context end, its ancestors and itself (and nothing outside the sliding window in sliding layers);
    padding sees only itself."""
    n_rows, length = packed.input_ids.shape
    n_ctx, device = ctx.n_ctx, packed.input_ids.device
    allowed = torch.zeros(n_rows, length, n_ctx + length, dtype=torch.bool, device=device)
    allowed[:, :, :n_ctx] = torch.arange(n_ctx, device=device) <= packed.ctx_end[:, :, None]
    slots = torch.arange(length, device=device)
    own = slots[:, None] == slots
    for a in range(packed.ancestors.shape[-1]):
        own = own | (packed.ancestors[:, :, a, None] == slots)
    allowed[:, :, n_ctx:] = own
    pos_ids = packed.pos_ids
    key_pos = torch.cat([torch.arange(n_ctx, device=device).expand(n_rows, -1), pos_ids], dim=1)

    def make(window: int | None) -> torch.Tensor:
        within = allowed if window is None else allowed & ((pos_ids[:, :, None] - key_pos[:, None, :]) < window)
        return _mask_for(within, ctx.dtype)

    return _masks_by_layer_type(ctx, make)


def _masks_by_layer_type(ctx: _Context, make: Callable[[int | None], Any]) -> Any:
    """The ``attention_mask`` argument of a step from ``make(window)``: one mask per layer type (Gemma
    2/3), one windowed mask for all layers (Mistral), or one unwindowed mask."""
    if ctx.layer_types:
        return {"full_attention": make(None), "sliding_attention": make(ctx.window)}
    return make(ctx.window)


# --------------------------------------------------------------------------------------------------
# Block-sparse tree attention (FlexAttention): one row per step, the context cache read in place


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


def _candidate_step(ctx: _Context, positions: torch.Tensor, npos: torch.Tensor, paths: torch.Tensor,
                    leaves_per_row: int, compile: bool = False, flex: bool = False) -> tuple[torch.Tensor, int]:
    """Final-normed hidden states ``[K, d]`` (on the model's device) of the leaves ``paths [K, l]`` of
    context ends ``positions[npos]`` (all three on the CPU: the layout is built there, and the device
    is not waited for), and the number of tokens fed.

    A token at tree level ``k`` of context end ``t`` gets position ``t + k`` and may attend to cache
    keys ``0..t``, to its ancestors and to itself (and to nothing outside the sliding window in
    sliding-window layers). Packed (``flex=False``): rows of ``leaves_per_row`` leaves, each after
    its own copy of the context cache, with dense masks. Flex: all leaves in one row; the context part
    by FlexAttention over the blocks the rule allows, reading the one cache in place, and the tree
    part (ancestors and itself) apart (:func:`_tree_attention_forward`).
    """
    from transformers import DynamicCache

    device = ctx.kv[0][0].device
    base = ctx.adapter.base(ctx.model)
    run = _compiled(base) if compile else base
    if flex:
        packed = _pack(positions, npos, paths, len(npos), pad_to=_FLEX_BLOCK).to(device)
        mask = _masks_by_layer_type(ctx, lambda window: _context_block_mask(packed, ctx.n_ctx, window))
        all_sliding = ctx.window is not None and not ctx.layer_types
        tree = _tree_attention(packed, ctx.window, all_sliding, ctx.kv)
        with _attention_function(ctx.model, _FLEX_ATTENTION):
            out = run(input_ids=packed.input_ids, position_ids=packed.pos_ids, attention_mask=mask,
                      use_cache=False, mtp_tree=tree)
    else:
        packed = _pack(positions, npos, paths, leaves_per_row).to(device)
        n_rows = packed.input_ids.shape[0]
        cache = DynamicCache(ddp_cache_data=[(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1))
                                             for k, v in ctx.kv])
        out = run(input_ids=packed.input_ids, position_ids=packed.pos_ids, attention_mask=_packed_masks(ctx, packed),
                  past_key_values=cache, use_cache=True)
    return out.last_hidden_state[packed.leaf_row, packed.leaf_slot], packed.n_tok


# --------------------------------------------------------------------------------------------------
# Reducing a block of candidate logits into the marginals


_FUSED_REDUCE = True  # bf16 logits on a GPU with Triton: mtp_lib.kernels.weighted_softmax_sum (False: softmax, matmul)
# the flex steps' tree part by mtp_lib.kernels.tree_merge on a GPU (False: _merge_tree_part's elementwise
# products, which torch.compile fuses). Measured side by side, compiled, bf16, H200 (benchmarks/marginal.py
# --merge fused,plain, in both orders; data/results/gpu/*-flex-h200.json and repeats/*-h200-reversed.json):
# SmolLM2 0.200 s against 0.205 s and 0.191 against 0.201; Gemma 3 0.210 against 0.212 and 0.207 against 0.218
_FUSED_MERGE = True
_DENSE_SEGMENTS = 16  # up to this many (position, top-p) pairs a block is summed by one small matmul
_DENSE_BF16_ELEMENTS = 2**24  # bf16 blocks: by one matmul while its [pairs, rows] weight matrix stays this small


@dataclasses.dataclass
class _Segments:
    """The positions of a block of candidate rows (``npos`` non-decreasing), cut on the host."""

    uniq: torch.Tensor  # [S] long, on the device: the positions
    inverse: torch.Tensor  # [R] long, on the device: each row's segment
    uniq_host: list[int]
    counts_host: list[int]


def _segments(npos_host: torch.Tensor, device: torch.device) -> _Segments:
    """Segments of ``npos_host`` (a CPU tensor), copied to ``device`` without waiting for it."""
    uniq, inv, counts = torch.unique_consecutive(npos_host, return_inverse=True, return_counts=True)
    return _Segments(uniq=_upload(uniq, device), inverse=_upload(inv, device), uniq_host=uniq.tolist(),
                     counts_host=counts.tolist())


def _accumulate(acc: torch.Tensor, logits: torch.Tensor, npos: torch.Tensor, log_w: torch.Tensor,
                segments: _Segments | None = None,
                recompute: Callable[[slice], torch.Tensor] | None = None) -> Callable[[], None] | None:
    """Add ``sum_i w_i softmax(logits_i)`` to ``acc [m, P, V]`` (log space) for the segments of ``npos``.

    ``logits [R, V]`` of candidates ``i`` of positions ``npos [R]`` (non-decreasing), with log weights
    ``log_w [R, m]``, one column per top-p. Per segment (the candidates of one position) and top-p
    this is ``logsumexp_i (log_w_i + log_softmax(logits_i))``. It is computed from one softmax per row:
    each segment is shifted by its largest log weight, the weighted probabilities summed, and the
    shift added back to the log; blocks combine with ``logaddexp``. Entries whose sum underflows the
    floating type (marginals below about ``e^-87`` of the segment's largest weight, in float32) are
    left out of that sum and added exactly with ``logsumexp`` (:func:`_exact_pass`), so no finite
    log-probability is lost.

    ``segments``: the segments of ``npos`` cut on the host (else cut here, which waits for the device).
    ``recompute``: the logits of some rows again (from the hidden states). Given, whether any entry
    underflowed is not waited for: a function is returned that waits for this block alone and adds
    those entries, to be called once later work is queued so that the device does not idle (it
    recomputes the few rows it needs, so the logits block is not kept). Else the exact pass runs here
    and None is returned.
    """
    dtype = acc.dtype
    # bfloat16 logits (a bf16 model): probabilities and weights in bfloat16 too (computed in float32,
    # rounded once: at most 2^-8 relative, below the rounding of the logits themselves, and the same
    # exponent range as float32), summed by a bf16 matmul. Half the memory traffic of float32.
    low = logits.dtype == torch.bfloat16
    seg = segments if segments is not None else _segments(npos.cpu(), npos.device)
    uniq, inv = seg.uniq, seg.inverse
    n_seg, m = len(seg.uniq_host), log_w.shape[1]
    w = log_w.to(dtype)
    shift = torch.full((n_seg, m), -math.inf, dtype=dtype, device=w.device)
    shift.scatter_reduce_(0, inv[:, None].expand(-1, m), w, reduce="amax")
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    coef = (w - shift[inv]).exp()  # [R, m], in [0, 1]
    n_out = n_seg * m
    if n_out <= _DENSE_SEGMENTS or (low and n_out * len(npos) <= _DENSE_BF16_ELEMENTS):
        dense = torch.zeros(m, n_seg, len(npos), dtype=torch.bfloat16 if low else dtype, device=w.device)
        dense[:, inv, torch.arange(len(npos), device=w.device)] = coef.T.to(dense.dtype)
        if low and _FUSED_REDUCE and n_out <= kernels.MAX_WEIGHT_ROWS and kernels.available(logits):
            # one Triton pass for the log-sum-exps, one for the weighted sum: the probabilities are not written
            total = kernels.weighted_softmax_sum(logits, dense.view(n_out, -1)).view(m, n_seg, -1)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=dense.dtype)
            total = (dense.view(n_out, -1) @ probs).view(m, n_seg, -1).to(dtype)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.bfloat16 if low else dtype)
        total = torch.zeros(m, n_seg, probs.shape[1], dtype=dtype, device=probs.device)
        for j in range(m):
            total[j].index_add_(0, inv, probs * coef[:, j, None])
    # float32 (and bf16, same exponent range) loses precision in subnormals: those entries, and for the
    # bf16 products anything within 2^24 of them (below about e^-70 of the largest weight), are left
    # out here and summed exactly by _exact_pass
    under = total < torch.finfo(dtype).tiny * (2.0**24 if low else 1.0)
    log_total = (torch.log(total) + shift.T[:, :, None]).masked_fill_(under, -math.inf)
    acc[:, uniq] = torch.logaddexp(acc[:, uniq], log_total)

    flag = under.any()
    if recompute is None:
        if bool(flag):
            _exact_pass(acc, lambda rows: logits[rows], under, w, seg)
        return None
    if flag.device.type == "cuda":
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        ready: torch.cuda.Event | None = event
    else:
        host, ready = flag, None

    def finish() -> None:
        if ready is not None:
            ready.synchronize()  # waits for this block only, not for what was queued after it
        if bool(host):
            _exact_pass(acc, recompute, under, w, seg)

    return finish


def _logits_of_rows(adapter: Any, model: nn.Module, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
    return adapter.logits(model, hidden[rows], normed=True)


def _exact_pass(acc: torch.Tensor, logits_of: Callable[[slice], torch.Tensor], under: torch.Tensor,
                w: torch.Tensor, seg: _Segments) -> None:
    """Add the entries ``under [m, S, V]`` that :func:`_accumulate` left out, by ``logsumexp`` in
    ``acc``'s dtype; ``logits_of(rows)``: the logits of a segment's rows."""
    dtype = acc.dtype
    starts = [0, *itertools.accumulate(seg.counts_host)]
    for j, g in under.any(dim=-1).nonzero().tolist():
        rows = slice(starts[g], starts[g] + seg.counts_host[g])
        if not bool(torch.isfinite(w[rows, j]).any()):
            continue  # no candidate of this segment is in this nucleus: -inf is exact
        cols = under[j, g].nonzero()[:, 0]
        logits = logits_of(rows).to(dtype)
        y = logits[:, cols] - torch.logsumexp(logits, dim=-1)[:, None] + w[rows, j, None]
        p = seg.uniq_host[g]
        acc[j, p, cols] = torch.logaddexp(acc[j, p, cols], torch.logsumexp(y, dim=0))


# --------------------------------------------------------------------------------------------------
# The public entry point


_NUCLEUS_ELEMENTS = 2**27  # rows x vocabulary per sort of the nuclei (float64 sums: some 40 bytes an element)


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


def _check_positions(positions: Any, n_ctx: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(n_ctx)
    pos = torch.as_tensor(positions)
    if pos.is_floating_point() or pos.dtype == torch.bool or pos.ndim > 1:
        raise ValueError("positions must be a 1-D sequence of integer context ends t (0 <= t < T)")
    pos = pos.reshape(-1).long()
    if len(pos) == 0:
        raise ValueError("positions is empty: give at least one context end t, or None for all")
    if int(pos.min()) < 0 or int(pos.max()) >= n_ctx:
        raise ValueError(f"positions must lie in [0, {n_ctx - 1}] (the context ends in input_ids), "
                         f"got min {int(pos.min())}, max {int(pos.max())}")
    return pos


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def marginalize(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    depth: int = 2,
    top_p: float = 0.99,
    positions: Sequence[int] | torch.Tensor | None = None,
    extra_top_p: Sequence[float] = (),
    max_tokens_per_chunk: int | None = None,
    tokens_per_row: int | None = None,
    max_logits_elements: int | None = None,
    progress: bool = False,
    compile: bool = False,
    attention: str = "auto",
) -> MarginalResult:
    """Next-token and marginal d-th-token distributions of a causal LM, for each context end.

    Args:
        model: a Hugging Face causal LM of a family :func:`mtp_lib.models.get_adapter` knows
            (GPT-NeoX, Llama, Gemma 1-3, GPT-2). It is run in eval mode without gradients and left
            as it was.
        input_ids: one sample, ``[1, T]`` (or ``[T]``) token ids.
        depth: how many tokens ahead: ``log_probs[:, d]`` for ``d < depth`` (1 = next token only).
        top_p: nucleus of every intermediate distribution, in (0, 1]; 1.0 sums over the whole vocabulary.
        positions: context ends ``t`` (0-based indices into ``input_ids``) to evaluate, in this order;
            None = all ``0..T-1``.
        extra_top_p: more top-p values (each <= ``top_p``) computed in the same pass: their nuclei are
            prefixes of the main one. Read them with :meth:`MarginalResult.at`.
        max_tokens_per_chunk: candidate tokens per forward pass (None: 1024 on CPU, 16384 on GPU).
        tokens_per_row: length of one packed sequence of the step; a step runs ``max_tokens_per_chunk
            / tokens_per_row`` of them as a batch, each after its own copy of the context's KV cache
            (bounded to about 1 GiB). Each token attends to ``T + tokens_per_row`` keys.
            None: 128 on CPU, 256 on GPU.
        max_logits_elements: candidates x vocabulary per logits block (buffers of this size in the
            model's dtype, and for ``depth >= 3`` in float32; None: 2**25 on CPU, on a GPU about 1/64
            of its memory: 2**30 on an 80 GB card, 2**28 on 24 GB).
        progress: show a tqdm bar per tree level.
        compile: run the context pass and the candidate steps through ``torch.compile`` of the
            model's base model (fuses its normalizations, rotary embeddings and activations on a GPU,
            and spares the host the eager pass's thousands of launches). The first calls compile
            (tens of seconds); the results equal the eager ones up to floating-point rounding.
        attention: how the candidate steps attend. ``"packed"``: rows of ``tokens_per_row`` tokens,
            each after its own copy of the context cache, with dense additive masks (any attention
            implementation of the model). ``"flex"``: all tokens of a step in one sequence after the
            one cache, FlexAttention over the 128 x 128 blocks that hold allowed pairs only (each
            token computes about ``t + level`` keys instead of ``T + tokens_per_row``; compiled on a
            GPU, a slow reference implementation on the CPU; on a GPU the heads need at least 16
            dimensions). ``"auto"``: flex with ``compile=True`` on a GPU, packed otherwise (eager on a
            GPU, packed measured a little faster; heads of fewer than 16 dimensions).

    Returns:
        :class:`MarginalResult` with ``log_probs [P, depth, V]`` (float32) and ``n_candidates [P]``.

    Cost: one forward pass of the sample, plus one packed token per candidate path (for depth 2 the
    sum of the nucleus sizes), plus their unembedding.
    """
    adapter = get_adapter(model)
    config: Any = model.config
    vocab = int(adapter.unembed_weight(model).shape[0])
    depth = _check_int(depth, "depth", 1)
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} must be True or False")
    if attention not in ("auto", "packed", "flex"):
        raise ValueError(f"attention={attention!r} must be 'auto', 'packed' or 'flex'")
    if attention == "flex" and not flex_available():
        raise ValueError("attention='flex' needs FlexAttention (torch >= 2.5); use attention='packed'")
    top_p = _check_top_p(top_p)
    extras = sorted({_check_top_p(q, "extra_top_p") for q in extra_top_p} - {top_p})
    if extras and extras[-1] > top_p:
        raise ValueError(f"extra_top_p values must be <= top_p={top_p} (their nuclei are prefixes of the main one); "
                         f"got {extras[-1]}. Raise top_p instead.")
    top_ps = [*extras, top_p]
    device = next(model.parameters()).device
    gpu = device.type != "cpu"
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
    max_tokens_per_chunk = _check_int(max_tokens_per_chunk if max_tokens_per_chunk is not None
                                      else (16384 if gpu else 1024), "max_tokens_per_chunk", 1)
    tokens_per_row = _check_int(tokens_per_row if tokens_per_row is not None else (256 if gpu else 128),
                                "tokens_per_row", 1)
    max_logits_elements = _check_int(max_logits_elements if max_logits_elements is not None
                                     else _default_logits_elements(device), "max_logits_elements", 1)
    sort_budget = min(max_logits_elements, _NUCLEUS_ELEMENTS)
    input_ids = check_input_ids(input_ids, vocab).to(device)
    n_ctx = input_ids.shape[1]
    pos_host = _check_positions(positions, n_ctx).cpu()
    pos = pos_host.to(device)
    if adapter.family == "gpt2":  # learned absolute positions: no room beyond the table
        limit = int(config.n_positions)
        if n_ctx + depth - 1 > limit:
            raise ValueError(f"input_ids of {n_ctx} tokens with depth={depth} needs positions up to "
                             f"{n_ctx + depth - 2}, beyond this GPT-2's {limit}: shorten the input")

    from tqdm.auto import tqdm

    with eval_mode(model), torch.inference_mode():
        with record_function("marginal.context"):
            ctx, hidden = _run_context(model, adapter, input_ids, compile)
        acc_dtype = torch.promote_types(ctx.dtype, torch.float32)
        n_pos, m = len(pos), len(top_ps)
        acc = torch.full((m, n_pos, depth, vocab), -math.inf, dtype=acc_dtype, device=device)

        # level 0: the next-token distributions, and the first candidates
        node_pos, node_paths, node_w = [], [], []
        sizes0, mass0 = [], []
        for blk in _row_blocks(n_pos, vocab, max_logits_elements):
            logits = adapter.logits(model, hidden[pos[blk]], normed=True)
            lp = torch.log_softmax(logits.to(acc_dtype), dim=-1)
            acc[:, blk, 0] = lp
            rows, toks, lw, sizes, log_mass = _nested_nucleus(lp, top_ps, sort_budget)
            node_pos.append(rows + blk.start)
            node_paths.append(toks[:, None])
            node_w.append(lw)
            sizes0.append(sizes[:, -1])
            mass0.append(log_mass[:, -1])
        npos, paths, log_w = torch.cat(node_pos), torch.cat(node_paths), torch.cat(node_w)
        n_candidates, log_mass0 = torch.cat(sizes0), torch.cat(mass0)

        n_nodes: list[int] = []
        n_tokens_fed = n_chunks = 0
        row_len = min(tokens_per_row, max_tokens_per_chunk)
        # rows per step: packed, as many as the chunk and the cache copies allow; flex, one (no copies)
        n_rows = 1 if flex else max(1, min(max_tokens_per_chunk // row_len,
                                           _CACHE_COPY_BUDGET // max(1, ctx.kv_bytes)))
        for level in range(1, depth):
            n_nodes.append(len(npos))
            grow = level + 1 < depth
            next_pos, next_paths, next_w = [], [], []
            # room for each leaf's ancestors: a row of a step holds its leaves and their ancestors
            leaves_per_row = max(1, (max_tokens_per_chunk if flex else row_len) // level)
            per_chunk = n_rows * leaves_per_row
            bar = tqdm(total=len(npos), desc=f"marginalize: level {level + 1} of {depth}", disable=not progress,
                       leave=False)
            # one wait per level: the steps' layouts and the segments of every logits block are cut on the
            # host, so that nothing below waits for the device (save the exact passes, one step late)
            npos_host, paths_host = npos.cpu(), paths.cpu()
            previous: list[Callable[[], None]] = []  # the exact passes of the step before
            for start in range(0, len(npos), per_chunk):
                sl = slice(start, min(len(npos), start + per_chunk))
                c_pos, c_paths, c_w = npos[sl], paths[sl], log_w[sl]
                with record_function("marginal.candidate_step"):
                    hid, n_tok = _candidate_step(ctx, pos_host, npos_host[sl], paths_host[sl], leaves_per_row,
                                                 compile, flex)
                n_chunks += 1
                n_tokens_fed += n_tok
                current: list[Callable[[], None]] = []
                for blk in _row_blocks(len(c_pos), vocab, max_logits_elements):
                    with record_function("marginal.unembedding"):
                        logits = adapter.logits(model, hid[blk], normed=True)
                    with record_function("marginal.reduce"):
                        seg = _segments(npos_host[sl][blk], device)
                        recompute = functools.partial(_logits_of_rows, adapter, model, hid[blk])
                        finish = _accumulate(acc[:, :, level], logits, c_pos[blk], c_w[blk], seg, recompute)
                        assert finish is not None
                        current.append(finish)
                    if grow:
                        log_q = torch.log_softmax(logits.to(acc_dtype), dim=-1)
                        rows, toks, lw, _, _ = _nested_nucleus(log_q, top_ps, sort_budget)
                        next_pos.append(c_pos[blk][rows])
                        next_paths.append(torch.cat([c_paths[blk][rows], toks[:, None]], dim=1))
                        # a path is in the nucleus at top-p q only if every step is: weights add up
                        next_w.append(c_w[blk][rows] + lw)
                for finish in previous:  # the step before's, now that this one is queued
                    finish()
                previous = current
                bar.update(sl.stop - sl.start)
            for finish in previous:
                finish()
            bar.close()
            if grow:
                npos, paths, log_w = torch.cat(next_pos), torch.cat(next_paths), torch.cat(next_w)

    log_probs = acc.float()
    return MarginalResult(
        log_probs=log_probs[-1], n_candidates=n_candidates, positions=pos, log_mass=log_mass0.float(),
        top_p=top_p, depth=depth, n_nodes=tuple(n_nodes), n_tokens_fed=n_tokens_fed, n_chunks=n_chunks,
        extra_log_probs={q: log_probs[j] for j, q in enumerate(extras)},
    )
