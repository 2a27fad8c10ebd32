"""One candidate step: the leaves of a tree level (with their ancestors) through the model, packed or flex."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtp_lib.marginal.context import _Context
from mtp_lib.marginal.flex import (_FLEX_ATTENTION, _FLEX_BLOCK, _attention_function, _context_block_mask,
                                   _tree_attention)
from mtp_lib.marginal.packing import _masks_by_layer_type, _pack, _packed_masks


_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., Any]] = weakref.WeakKeyDictionary()


def _compiled(base: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` of a base model (one per model, kept while the model lives; the model itself is
    not changed). Shapes become dynamic after the first recompilation (torch's default), so chunks
    and samples of other lengths reuse the compiled code."""
    if base not in _COMPILED:
        _COMPILED[base] = torch.compile(base)
    return _COMPILED[base]



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
    part (ancestors and itself) apart (:func:`mtp_lib.marginal.flex._tree_attention_forward`).
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

