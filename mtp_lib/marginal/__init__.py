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
   once into the ``[P, V]`` marginals (see :func:`mtp_lib.marginal.reduce._accumulate`): one softmax per candidate, a
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

The modules of this package, one concern each: :mod:`~mtp_lib.marginal.nuclei` (top-p sets),
:mod:`~mtp_lib.marginal.plan` (arguments, defaults, budgets), :mod:`~mtp_lib.marginal.context` (the
context pass), :mod:`~mtp_lib.marginal.levels` (the tree levels, the recursion itself),
:mod:`~mtp_lib.marginal.step` (one candidate step), :mod:`~mtp_lib.marginal.packing` (the packed layout
and its masks), :mod:`~mtp_lib.marginal.flex` (the block-sparse tree attention) and
:mod:`~mtp_lib.marginal.reduce` (logits blocks into the marginals; the Triton kernels' glue).
"""

from __future__ import annotations

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import record_function

from mtp_lib.inputs import as_model
from mtp_lib.marginal.context import _run_context
from mtp_lib.marginal.flex import flex_available
from mtp_lib.marginal.levels import _Counts, _first_level, _tree_level
from mtp_lib.marginal.nuclei import Nucleus, nucleus, nucleus_size
from mtp_lib.marginal.plan import _plan
from mtp_lib.models import eval_mode

__all__ = ["MarginalResult", "Nucleus", "flex_available", "marginalize", "nucleus", "nucleus_size"]


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


def marginalize(model: Any, input_ids: Any, *, depth: int = 2, top_p: float = 0.99,
                positions: Sequence[int] | torch.Tensor | None = None, extra_top_p: Sequence[float] = (),
                max_tokens_per_chunk: int | None = None, tokens_per_row: int | None = None,
                max_logits_elements: int | None = None, progress: bool = False, compile: bool = False,
                attention: str = "auto") -> MarginalResult:
    """Next-token and marginal d-th-token distributions of a causal LM, for each context end.

    Args:
        model: a Hugging Face causal LM of a family :func:`mtp_lib.models.get_adapter` knows (GPT-NeoX,
            Llama, Gemma 1-3, GPT-2), or the ``LoadedModel`` of :func:`mtp_lib.models.load_model`. It
            runs in eval mode without gradients and is left as it was.
        input_ids: one sample: a tensor ``[T]`` or ``[1, T]``, a list of ids, or a tokenizer's ``BatchEncoding``.
        depth: how many tokens ahead: ``log_probs[:, d]`` for ``d < depth`` (1 = next token only).
        top_p: nucleus of every intermediate distribution, in (0, 1]; 1.0 sums over the whole vocabulary.
        positions: context ends ``t`` (indices into ``input_ids``) to evaluate, in this order; None: all.
        extra_top_p: more top-p values (each <= ``top_p``) computed in the same pass: their nuclei are
            prefixes of the main one. Read them with :meth:`MarginalResult.at`.
        max_tokens_per_chunk: candidate tokens per forward pass (None: 1024 on CPU, 16384 on GPU).
        tokens_per_row: length of one packed sequence of a step, each after its own copy of the
            context's KV cache (about 1 GiB in all), attending to ``T + tokens_per_row`` keys (None:
            128 on CPU, 256 on GPU).
        max_logits_elements: candidates x vocabulary per logits block (None: 2**25 on CPU, about 1/64
            of a GPU's memory: 2**30 on an 80 GB card, 2**28 on 24 GB).
        progress: show a tqdm bar per tree level.
        compile: the context pass and the candidate steps through ``torch.compile`` of the base model
            (the first calls compile for tens of seconds; results equal the eager ones up to rounding).
        attention: ``"packed"``: rows after copies of the cache, dense additive masks (any attention
            implementation). ``"flex"``: a step as one sequence after the one cache, FlexAttention over
            the 128 x 128 blocks that hold allowed pairs (compiled on a GPU, where heads need at least
            16 dimensions; a slow reference implementation on the CPU). ``"auto"``: flex with
            ``compile=True`` on a GPU, packed otherwise.

    Returns:
        :class:`MarginalResult` with ``log_probs [P, depth, V]`` (float32) and ``n_candidates [P]``.

    Cost: one forward pass of the sample, plus one packed token per candidate path (for depth 2 the
    sum of the nucleus sizes), plus their unembedding.
    """
    model = as_model(model)
    plan = _plan(model, input_ids, depth=depth, top_p=top_p, positions=positions, extra_top_p=extra_top_p,
                 max_tokens_per_chunk=max_tokens_per_chunk, tokens_per_row=tokens_per_row,
                 max_logits_elements=max_logits_elements, progress=progress, compile=compile, attention=attention)
    with eval_mode(model), torch.inference_mode():
        with record_function("marginal.context"):
            ctx, hidden = _run_context(model, plan.adapter, plan.input_ids, plan.compile)
        # acc[j, i, d] = log p(x_{t+d+1} | x<=t), t = positions[i], over the nuclei at top_ps[j]
        acc = torch.full((len(plan.top_ps), len(plan.pos), plan.depth, plan.vocab), -math.inf, dtype=ctx.acc_dtype,
                         device=plan.device)
        # d = 0: p(y | x<=t) itself; its nucleus gives the first candidates y
        nodes, n_candidates, log_mass = _first_level(ctx, hidden, plan, acc[:, :, 0])
        counts = _Counts()
        for d in range(1, plan.depth):
            # p(x_{t+d+1} | x<=t) = sum over the paths y_1..y_d of the nuclei of p(x_{t+d+1} | x<=t, y_1..y_d)
            # w(y_1..y_d), w = prod_k p(y_k | x<=t, y_<k) renormalized over each nucleus (d = 1: sum_y over p(y | x<=t))
            nodes = _tree_level(ctx, plan, nodes, d, acc[:, :, d], counts, grow=d + 1 < plan.depth)
    log_probs = acc.float()
    return MarginalResult(
        log_probs=log_probs[-1], n_candidates=n_candidates, positions=plan.pos, log_mass=log_mass.float(),
        top_p=plan.top_p, depth=plan.depth, n_nodes=tuple(counts.n_nodes), n_tokens_fed=counts.n_tokens_fed,
        n_chunks=counts.n_chunks, extra_log_probs={q: log_probs[j] for j, q in enumerate(plan.extras)},
    )
