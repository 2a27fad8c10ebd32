"""Packing a candidate step: the tree's tokens laid out in rows, and the dense masks of the packed layout.

Every candidate path of a tree level is one token after the context (its ancestors ride along in the
same row for ``depth >= 3``). A token at tree level ``k`` of context end ``t`` gets position ``t + k``
and may see the cache up to ``t``, its ancestors and itself. With ``attention="packed"`` each row
runs after its own copy of the context cache, masked by the additive ``[R, 1, L, T + L]`` masks of
:func:`_packed_masks`; the flex steps (:mod:`mtp_lib.marginal.flex`) use the same layout in one row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from mtp_lib.marginal.context import _Context


def _mask_for(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``[B, 1, L, K]`` from a boolean ``[B, L, K]`` (True = may attend): sdpa and eager take it."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


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

