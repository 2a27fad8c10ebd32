"""Position-invariant verification: a token's logits do not depend on what is verified beside it.

Why: in bfloat16 a verification pass over several tokens rounds differently from a one-token pass
(kernels are chosen by shape: a matmul over 5 rows reduces in another order than over 1 row,
attention splits its keys differently), so near-ties flip and speculative decoding stops equalling
greedy decoding. Greedy decoding with the *same* computation per position fixes that.

How, with stock kernels (:class:`InvariantVerifier`, ``SpeculativeDecoder(..., invariant=True)``):

1. **One width.** Every decoding pass feeds exactly ``width`` tokens: the step's tree and padding
   tokens (depth 0, attending to the context and themselves; their cache slots are stale). Greedy
   decoding is the tree of one token padded to the same width. Every matmul, normalization and
   softmax then runs at one shape, so with one kernel and one reduction order, and a row's result
   depends on that row's input only (rows of a matmul or a row-wise norm do not mix). The prompt's
   pass is the same call in every decoder of one prompt length (and padding bucket).
2. **Keys in logical order.** Attention (:func:`invariant_attention`, registered with transformers
   as ``"mtp_invariant"``) reads each query's keys and values through a *slot table*
   ``[S, L]``: entry ``j`` is the cache slot holding the key at position ``j`` of that query's own
   sequence (context, then its tree ancestors in depth order), or -1 where the query must not look
   (future, other branches, outside a sliding window). Scores are dot products over the head size
   (each one alone, whatever its slot) gathered into logical order; the softmax and the weighted
   sum of the values (gathered the same way) then reduce over positions ``0..L-1`` in the same
   order for a tree node as for the same token decoded alone. Masked entries weigh exactly 0.

By induction over positions, every key, value and hidden state, hence every logit, is then
bit-identical between greedy decoding and verification of any chain or tree of at most ``width``
tokens: speculative decoding equals greedy decoding token for token, in any dtype. The cost: greedy
decoding runs ``width``-token passes (cheap while a pass is bound by reading the weights: batch 1,
small trees), the values are gathered per query (``S x L x head_dim`` per layer), and the attention
is plain torch ops rather than a fused kernel.

What this relies on: a kernel given the same shapes computes each output row the same way wherever
the row sits (true of cuBLAS/oneDNN GEMMs without data-dependent split-K, and of row-wise
reductions). Measured on an H100 for chains with transformers' SDPA (see the project notes): passes
of equal width agree bit for bit, passes of different widths do not. Width-invariant kernels
(batch-invariant matmuls, RMSNorm and attention as in Thinking Machines' ``batch-invariant-ops``)
would let greedy decoding run one-token passes instead; they are not used here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mtp_lib.decode_tree import DynamicTree, Tree
from mtp_lib.decode_verify import _StaticVerifier, _TreeTensors
from mtp_lib.decode_graph import MaskLayout
from mtp_lib.heads import MTPModel, shallow_module_copy

__all__ = ["ATTENTION", "InvariantVerifier", "invariant_attention", "invariant_view", "slot_table", "tree_paths"]

ATTENTION = "mtp_invariant"  # the name under which transformers finds invariant_attention


def invariant_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over keys read in each query's logical order (a transformers attention function).

    ``query`` ``[1, H, S, D]``; ``key``/``value`` ``[1, H_kv, L, D]`` (the whole static cache);
    ``attention_mask``: the slot table ``[1, 1, S, L]`` (int64) of :func:`slot_table`. Returns
    ``[1, S, H, D]`` as transformers' attention functions do. Per query ``i`` and position ``j``:
    ``score_ij = q_i . k_{slot_ij} * scaling``, ``p_i = softmax_j(score_i)`` (in float32 or wider, masked -> 0),
    ``out_i = sum_j p_ij v_{slot_ij}``, the sum taken over ``j = 0..L-1`` in order.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.long:
        raise ValueError(f"the {ATTENTION!r} attention reads a slot table (int64 [1, 1, S, L]) as its mask, got "
                         f"{type(attention_mask).__name__}: run the model through InvariantVerifier, or give "
                         "it back its own attention implementation")
    b, h, s, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if b != 1 or attention_mask.shape[-2:] != (s, length):
        raise ValueError(f"slot table {tuple(attention_mask.shape)} does not fit {s} queries over {length} cache "
                         f"slots (batch {b}; the invariant decoder runs batch 1)")
    table = attention_mask[0, 0]
    allowed = table >= 0
    slots = table.clamp(min=0)
    group = h // kv_heads
    scale = d ** -0.5 if scaling is None else scaling
    q = query[0].reshape(kv_heads, group * s, d)  # [H_kv, group * S, D], heads of one group together
    scores = torch.matmul(q, key[0].transpose(1, 2)).view(kv_heads, group, s, length) * scale
    scores = scores.gather(3, slots.expand(kv_heads, group, s, length))  # into each query's logical order
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    wide = torch.promote_types(scores.dtype, torch.float32)  # float32 at least, as transformers' eager attention
    probs = torch.softmax(scores, dim=-1, dtype=wide).to(query.dtype)  # [H_kv, group, S, L]
    values = value[0].index_select(1, slots.reshape(-1)).view(kv_heads, s, length, d)  # [H_kv, S, L, D]
    out = torch.matmul(probs.transpose(1, 2), values)  # [H_kv, S, group, D]: one row-block per query
    return out.permute(1, 0, 2, 3).reshape(1, s, h, d), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, invariant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # never used: the decoder passes its own tables


def invariant_view(view: MTPModel) -> MTPModel:
    """Switch ``view`` (a decoder's own module tree, see ``decode._first_heads``) to :func:`invariant_attention`.

    The heads are copied (sharing their weights) and each module's ``config`` is replaced by a copy
    naming the ``"mtp_invariant"`` attention; the model the view was made from keeps its own.
    """
    from transformers import PreTrainedConfig

    _register()
    view.heads = nn.ModuleList([shallow_module_copy(h) for h in view.heads])  # the view shares the mtp's heads
    copies: dict[int, Any] = {}
    for module in view.modules():
        config = getattr(module, "config", None)
        if not isinstance(config, PreTrainedConfig):
            continue
        if id(config) not in copies:
            new = copy.deepcopy(config)  # sub-configs too: the setter below reaches them
            new._attn_implementation = ATTENTION
            copies[id(config)] = new
        module.config = copies[id(config)]
    if not copies:
        raise ValueError("the model has no transformers config to switch to the invariant attention")
    return view


def tree_paths(tree: Tree, width: int) -> torch.Tensor:
    """``[width, width]`` long: row ``i`` lists node ``i``'s path from the root (``[i, d]``: its ancestor
    at depth ``d``), then zeros. Rows past the tree are padding tokens: a path of themselves."""
    if width < tree.size:
        raise ValueError(f"width={width} is smaller than the tree ({tree.size} tokens)")
    return _TreeTensors.of(tree, width, torch.device("cpu")).paths


def slot_table(start: torch.Tensor, depth: torch.Tensor, paths: torch.Tensor | None, length: int,
               layout: MaskLayout) -> torch.Tensor | dict[str, torch.Tensor]:
    """Slot tables ``[1, 1, S, length]`` for ``S`` tokens written at slots ``start + i`` (see the module doc).

    ``start`` ``[1]``: context tokens in the cache (slot = position below it). ``depth`` ``[S]``:
    token ``i`` sits at position ``start + depth[i]``. ``paths`` ``[S, S]`` (:func:`tree_paths`):
    ``paths[i, d]`` is the step token holding position ``start + d`` of token ``i``'s sequence; None
    for a plain sequence (``paths[i, d] = d``). Entry ``[i, j]`` is the slot of position ``j`` for
    query ``i``, or -1 (after the query, or ``window`` or more positions behind it on sliding
    layers). Device operations only: capturable in a CUDA graph.
    """
    n = depth.shape[0]
    pos = torch.arange(length, device=depth.device)
    rel = pos - start  # [L]: position relative to the step's first token
    node = rel.clamp(0, n - 1)
    step_node = node.expand(n, length) if paths is None else paths[:, node]  # [S, L]
    src = torch.where(rel < 0, pos, start + step_node)
    q_pos = start + depth
    allowed = pos[None, :] <= q_pos[:, None]

    def table(ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, src, -1)[None, None]

    if layout.window is None:
        return table(allowed)
    sliding = table(allowed & ((q_pos[:, None] - pos[None, :]) < layout.window))
    return {"full_attention": table(allowed), "sliding_attention": sliding} if layout.per_type else sliding


class InvariantVerifier(_StaticVerifier):
    """The static verifier with fixed-width passes and :func:`invariant_attention` (see the module doc).

    ``width``: tokens per decoding pass (default the tree's size). Decoders whose outputs must be
    compared token for token need the same ``width``, ``max_length`` and model.
    """

    def __init__(self, view: MTPModel, tree: Tree | DynamicTree, max_length: int, cuda_graphs: bool,
                 pad_prompts: bool | None = None, width: int | None = None, compile_step: bool = False) -> None:
        width = tree.size if width is None else width
        if isinstance(width, bool) or not isinstance(width, int) or width < tree.size:
            raise ValueError(f"width={width!r} must be an integer >= the tree size {tree.size}")
        super().__init__(invariant_view(view), tree, max_length, cuda_graphs, pad_prompts, width=width,
                         compile_step=compile_step)

    def states(self, start: torch.Tensor, tokens: torch.Tensor, depth: torch.Tensor,
               structure: torch.Tensor | None) -> torch.Tensor:
        """The heads' normed outputs ``[n_heads, S, H]`` of ``tokens``; ``structure``: the tokens' paths
        (:func:`tree_paths`, None for a plain sequence). The caller sets the cache's write slots."""
        table = slot_table(start, depth, structure, self.buffer_len, self.layout)
        out = self.view(tokens[None], attention_mask=table, position_ids=(start + depth)[None], cache=self.cache,
                        use_cache=True, return_logits=False)
        return out.states[:, 0]

    def step_structure(self, nodes: _TreeTensors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        nodes = self.nodes if nodes is None else nodes
        return nodes.depths, nodes.paths

    @torch.no_grad()
    def head1_logits(self, start: int, tokens: list[int]) -> torch.Tensor:
        """Head 1's logits ``[len(tokens), V]`` of one step's tokens after ``start`` cached ones (eager, for
        tests and diagnostics); the cache keeps what the step wrote, as after :meth:`step`."""
        padded = torch.tensor([*tokens, *[0] * (self.width - len(tokens))], device=self.device)
        start_t = torch.tensor([start], device=self.device)
        self.cache.set_slots(start_t + torch.arange(self.width, device=self.device))
        states = self.states(start_t, padded, *self.step_structure())
        return self.view.unembed_states(states[:1])[0, :len(tokens)]
