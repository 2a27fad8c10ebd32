"""Self-speculative decoding with multi-token prediction heads: lossless, greedy, batch size 1.

Each step of :func:`speculative_generate` feeds the token head 1 chose last (the *root*) together
with drafts of the tokens after it, taken from heads 2..N at the same context end, in one forward
pass. Head 1's greedy choice at every fed token then says which drafts greedy decoding would
itself have produced: the longest such prefix is kept, and head 1's choice after it is the next
root. The output is, token for token, what :func:`greedy_generate` (head 1, one token per pass)
gives; only the number of forward passes changes.

With ``tree`` (a :class:`Tree`) the step verifies several candidates per head at once (Medusa's
tree attention): every path of the tree is one draft continuation, and the deepest path that
greedy decoding agrees with is accepted. ``Tree.chain(n)`` is the plain sequence of the top-1
drafts of heads 2..n+1 (the default, with every head). A :class:`DynamicTree` is chosen anew at every
step from the heads' own probabilities there (EAGLE-2's dynamic tree), with the same number of nodes.

Counting: :attr:`GenerateOutput.accepted_lengths` lists the tokens gained by each forward pass:
1 for the prompt's pass (the first new token), then 1 + the accepted drafts for each verification
step. Their sum is the number of new tokens; :attr:`GenerateOutput.tau` (mean accepted tokens per
verification step, Spec-Bench's "mean accepted tokens") leaves the prompt's pass out.

Two caches. The *static* one (default, :mod:`mtp_lib.decode_graph`) has fixed buffers, builds its
own masks and, on CUDA, replays each step as a captured CUDA graph (``cuda_graphs=True``): the
fast path, and the only one with tree verification. The *dynamic* one (``static_cache=False``)
is Hugging Face's own ``DynamicCache`` through :class:`mtp_lib.heads.MTPCache`, cropped after each
step: the plain reference the static path is tested against.

Drafts may come from elsewhere than the heads (a :class:`Drafter`): :class:`ReferenceDrafter`
drafts a known continuation (perfect drafts, for tests), :class:`MarginalOracleDrafter` drafts
x_{t+2}.. from the model's own marginal distribution (see there) to show how far the heads are
from what the model itself knows.

Baselines through transformers: :func:`hf_generate` (plain greedy ``generate``, and prompt lookup
decoding with ``prompt_lookup_num_tokens``); :func:`next_token_model` gives the Hugging Face model
whose greedy output head 1 reproduces, so that their outputs can be compared too.

Example::

    mtp = MTPModel(model, n_heads=4)            # or mtp_lib.train.train(...).model
    out = speculative_generate(mtp, ids, 128, eos_token_id=tok.eos_token_id)
    out.tokens, out.accepted_lengths, out.tau
    decoder = SpeculativeDecoder(mtp, tree=Tree.cartesian([3, 2, 2]), max_length=1024)
    for ids in prompts:                          # graphs are captured once, reused per prompt
        decoder.generate(ids, 128)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mtp_lib.decode_baselines import hf_generate, next_token_model
from mtp_lib.decode_output import GenerateOutput, _check_max_new, _eos_set, acceptance_summary
from mtp_lib.decode_tree import Drafter, DynamicTree, MarginalOracleDrafter, PromptLookupDrafter, ReferenceDrafter, Tree, rank_acceptance
from mtp_lib.decode_verify import _DynamicVerifier, _first_heads, _position_limit, _StaticVerifier
from mtp_lib.heads import MTPModel
from mtp_lib.inputs import as_ids

__all__ = [
    "Drafter",
    "DynamicTree",
    "GenerateOutput",
    "MarginalOracleDrafter",
    "PromptLookupDrafter",
    "ReferenceDrafter",
    "SpeculativeDecoder",
    "Tree",
    "acceptance_summary",
    "greedy_generate",
    "hf_generate",
    "next_token_model",
    "rank_acceptance",
    "speculative_generate",
]


# --------------------------------------------------------------------------------------------------
# The decoder


class SpeculativeDecoder:
    """Speculative decoding with ``mtp``'s heads over ``tree``, reusable across prompts.

    ``tree``: the draft tree (default ``Tree.chain(mtp.n_heads - 1)``: every head's top-1 draft;
    ``Tree.chain(0)``: plain greedy decoding; a :class:`DynamicTree`: each step's own). ``static_cache``: the fixed-buffer cache (needed for
    trees and CUDA graphs) or Hugging Face's dynamic one. ``max_length``: room of the static cache;
    a prompt of T tokens may generate up to ``max_length - T - tree.size + 1`` tokens.
    ``cuda_graphs``: capture the step as a CUDA graph when the model is on CUDA (ignored elsewhere);
    capturing happens here, once. ``pad_prompts``: pad prompts to 64, 128, 256, .. tokens so that
    their pass is a captured graph too (default: when CUDA graphs are used). Only heads
    1..tree.depth+1 are run. ``invariant``: position-invariant verification
    (:mod:`mtp_lib.decode_invariant`): every pass feeds ``width`` tokens (default the tree's size)
    and attention reads keys in logical order, so that in any dtype a token's logits are bit-identical
    whatever is verified beside it; decoders with the same ``width`` and ``max_length`` (greedy ones,
    ``Tree.chain(0)``, included) then give identical outputs. ``compile_step``: compile the step with
    ``torch.compile`` (Inductor fuses the many small kernels of each layer) before it is captured; the
    first decoder of a shape compiles for seconds to minutes.

    The decoder shares ``mtp``'s weights: changing them in place is seen by later calls, moving the
    model to another device or dtype is not (build a new decoder).
    """

    def __init__(self, mtp: MTPModel, *, tree: Tree | DynamicTree | None = None, max_length: int = 1024,
                 static_cache: bool = True, cuda_graphs: bool = True, pad_prompts: bool | None = None,
                 invariant: bool = False, width: int | None = None, compile_step: bool = False) -> None:
        if not isinstance(mtp, MTPModel):
            raise ValueError(f"mtp must be an mtp_lib.heads.MTPModel (a model with its MTP heads), got "
                             f"{type(mtp).__name__}: build one with MTPModel(model, n_heads=...) (a model or the "
                             "LoadedModel of load_model), or train heads with mtp_lib.train")
        tree = Tree.chain(mtp.n_heads - 1) if tree is None else tree
        if not isinstance(tree, (Tree, DynamicTree)):
            raise ValueError(f"tree must be a mtp_lib.decode.Tree or DynamicTree, got {type(tree).__name__}")
        if isinstance(tree, DynamicTree) and not static_cache:
            raise ValueError("a DynamicTree needs the static cache (static_cache=True)")
        if tree.depth > mtp.n_heads - 1:
            raise ValueError(f"the tree drafts {tree.depth} tokens ahead but the model has {mtp.n_heads} heads "
                             f"(at most {mtp.n_heads - 1} drafts): use a shallower tree or more heads")
        if width is not None and not invariant:
            raise ValueError("width is the pass width of invariant decoding: pass invariant=True with it")
        if invariant and not static_cache:
            raise ValueError("invariant=True needs the static cache (static_cache=True)")
        if compile_step and not static_cache:
            raise ValueError("compile_step=True needs the static cache (static_cache=True)")
        self.width = tree.size if width is None else width
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < self.width + 1:
            raise ValueError(f"max_length={max_length!r} must be an integer > the tokens of a pass ({self.width})")
        limit = _position_limit(mtp)
        if static_cache and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's {limit} learned positions: lower it")
        self.mtp, self.tree, self.static_cache = mtp, tree, static_cache
        self.max_length = max_length if static_cache else None
        self.view = _first_heads(mtp, tree.depth + 1)
        self._verifier: _StaticVerifier | _DynamicVerifier
        if invariant:  # position-invariant verification: mtp_lib.decode_invariant
            from mtp_lib.decode_invariant import InvariantVerifier
            self._verifier = InvariantVerifier(self.view, tree, max_length, cuda_graphs, pad_prompts, width,
                                               compile_step)
        elif isinstance(tree, Tree) and not static_cache:
            self._verifier = _DynamicVerifier(self.view, tree)
        else:
            self._verifier = _StaticVerifier(self.view, tree, max_length, cuda_graphs, pad_prompts,
                                             compile_step=compile_step)

    @property
    def uses_cuda_graphs(self) -> bool:
        return isinstance(self._verifier, _StaticVerifier) and self._verifier.graphs

    @torch.no_grad()
    def generate(self, input_ids: Any, max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None,
                 drafter: Drafter | None = None, progress: bool = False) -> GenerateOutput:
        """Decode ``input_ids`` (one prompt: a tensor ``[T]`` or ``[1, T]``, a list, a ``BatchEncoding``) for
        up to ``max_new_tokens`` tokens, stopping after the first token in ``eos_token_id``. ``drafter``
        replaces the heads' drafts (see :class:`Drafter`). The tokens come back where the prompt was
        (a list's: on the CPU)."""
        from tqdm.auto import tqdm

        max_new = _check_max_new(max_new_tokens)
        eos = _eos_set(eos_token_id)
        prompt = as_ids(input_ids, self.mtp.vocab_size)
        ids = prompt[None].to(self._verifier.device)
        self._check_room(ids.shape[1], max_new)
        bar = tqdm(total=max_new, desc="decode", disable=not progress)
        tokens, stopped = ids[0].tolist(), False
        accepted: list[int] = []
        seconds = dict.fromkeys(("prefill", "draft", "verify", "accept"), 0.0)
        if max_new > 0:
            accepted, stopped = self._decode(ids, tokens, max_new, eos, drafter, bar.update, seconds)
        bar.close()
        out = torch.tensor([tokens], dtype=torch.long, device=prompt.device)
        return GenerateOutput(out, ids.shape[1], accepted, n_forward=len(accepted), stopped_by_eos=stopped,
                              step_seconds=seconds)

    def _check_room(self, prompt_len: int, max_new: int) -> None:
        need = prompt_len + max_new + self.width - 1
        room = self.max_length if self.max_length is not None else _position_limit(self.mtp)
        if room is not None and max_new > 0 and need > room:
            raise ValueError(f"a prompt of {prompt_len} tokens with max_new_tokens={max_new} and a tree of "
                             f"{self.width} tokens needs {need} positions, more than the "
                             f"{'static cache' if self.max_length is not None else 'model'} holds ({room}): "
                             "raise max_length or lower max_new_tokens")

    def _decode(self, ids: torch.Tensor, tokens: list[int], max_new: int, eos: frozenset[int],
                drafter: Drafter | None, update: Callable[[int], Any], seconds: dict[str, float]
                ) -> tuple[list[int], bool]:
        """The prompt's pass, then verification steps until ``max_new`` tokens or an end of sequence;
        ``tokens`` grows in place. Returns the tokens gained per pass and whether an eos stopped it;
        adds the host's seconds per phase to ``seconds`` (see :class:`GenerateOutput`)."""
        prompt_len = len(tokens)
        t0 = time.perf_counter()
        pred = self._verifier.prefill(ids)
        seconds["prefill"] = time.perf_counter() - t0
        tokens.append(pred.greedy[0])
        accepted = [1]
        update(1)
        stopped = tokens[-1] in eos
        row = 0
        while not stopped and len(tokens) - prompt_len < max_new:
            t0 = time.perf_counter()
            candidates = pred.candidates(row)
            drafts = candidates if drafter is None else drafter(tokens, candidates)
            tree = self.tree.build(pred.probabilities(row)) if isinstance(self.tree, DynamicTree) else self.tree
            step_tokens = tree.fill(tokens[-1], drafts)
            start = len(tokens) - 1  # tokens in the cache: all but the root
            t1 = time.perf_counter()
            pred = self._verifier.step(start, step_tokens, tree)  # returns once its predictions are on the host
            t2 = time.perf_counter()
            path = tree.accept(step_tokens, pred.greedy)
            self._verifier.commit(start, path)
            row = path[-1]
            gained = [step_tokens[i] for i in path[1:]] + [pred.greedy[row]]
            gained = gained[:max_new - (len(tokens) - prompt_len)]
            for i, tok in enumerate(gained):
                if tok in eos:
                    gained, stopped = gained[:i + 1], True
                    break
            tokens.extend(gained)
            accepted.append(len(gained))
            update(len(gained))
            seconds["draft"] += t1 - t0
            seconds["verify"] += t2 - t1
            seconds["accept"] += time.perf_counter() - t2
        return accepted, stopped


def speculative_generate(mtp_model: MTPModel, input_ids: Any, max_new_tokens: int, *,
                         tree: Tree | DynamicTree | None = None, eos_token_id: int | Sequence[int] | None = None,
                         drafter: Drafter | None = None, static_cache: bool = True, cuda_graphs: bool = True,
                         max_length: int | None = None, progress: bool = False) -> GenerateOutput:
    """Lossless self-speculative greedy decoding of one prompt with the heads of ``mtp_model``.

    The output equals :func:`greedy_generate`'s token for token. ``input_ids``: one prompt, a tensor
    ``[T]`` or ``[1, T]``, a list of ids or a tokenizer's ``BatchEncoding``. ``tree`` defaults to the chain of
    every head's top-1 draft; ``max_length`` to just what this call needs. Builds a
    :class:`SpeculativeDecoder` (capturing its CUDA graphs) per call: for many prompts build one
    decoder and call its ``generate``.
    """
    tree = Tree.chain(mtp_model.n_heads - 1) if tree is None and isinstance(mtp_model, MTPModel) else tree
    size = tree.size if isinstance(tree, (Tree, DynamicTree)) else 1
    if max_length is None:
        n = len(as_ids(input_ids))
        max_length = max(n + _check_max_new(max_new_tokens) + size - 1, size + 1)
    decoder = SpeculativeDecoder(mtp_model, tree=tree, max_length=max_length, static_cache=static_cache,
                                 cuda_graphs=cuda_graphs)
    return decoder.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, drafter=drafter, progress=progress)


def greedy_generate(mtp_model: MTPModel, input_ids: Any, max_new_tokens: int, *,
                    eos_token_id: int | Sequence[int] | None = None, static_cache: bool = False,
                    cuda_graphs: bool = True, max_length: int | None = None, progress: bool = False) -> GenerateOutput:
    """Greedy decoding with head 1 alone, one token per forward pass: the reference output.

    By default through Hugging Face's dynamic cache (plain, eager). ``static_cache=True`` gives the
    fast decoder of the same output: static cache and, on CUDA, one captured CUDA graph per token
    (the honest baseline for speculation). Heads 2..N are not run.
    """
    return speculative_generate(mtp_model, input_ids, max_new_tokens, tree=Tree.chain(0), eos_token_id=eos_token_id,
                                static_cache=static_cache, cuda_graphs=cuda_graphs, max_length=max_length,
                                progress=progress)

