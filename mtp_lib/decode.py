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
drafts of heads 2..n+1 (the default, with every head).

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

import dataclasses
import heapq
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mtp_lib.decode_graph import GraphRunner, StaticMTPCache, mask_layout, tree_masks
from mtp_lib.heads import LayerHead, MTPModel, shallow_module_copy
from mtp_lib.models import check_input_ids, eval_mode, get_adapter

__all__ = [
    "Drafter",
    "GenerateOutput",
    "MarginalOracleDrafter",
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
# The draft tree


@dataclasses.dataclass(frozen=True)
class Tree:
    """The draft tokens of one verification step, as Medusa's "choices".

    Node 0 is the root (head 1's last choice, known to be right). Each choice ``(r_1, ..., r_d)`` is
    one more node at depth ``d``: the ``r_d``-th most likely token of head ``d + 1``, child of the
    node ``(r_1, ..., r_{d-1})``. Every prefix of a choice must be a choice too. Nodes are ordered by
    depth, then by choice, so parents come before children.
    """

    choices: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        norm: list[tuple[int, ...]] = []
        for c in self.choices:
            if not isinstance(c, (tuple, list)) or not c or not all(
                    isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in c):
                raise ValueError(f"tree choice {c!r} must be a non-empty tuple of ranks >= 0, like (0,) or (1, 0)")
            norm.append(tuple(c))
        if len(set(norm)) != len(norm):
            raise ValueError("tree choices contain duplicates")
        present = set(norm)
        for c in norm:
            if len(c) > 1 and c[:-1] not in present:
                raise ValueError(f"tree choice {c} has no parent {c[:-1]}: add every prefix")
        object.__setattr__(self, "choices", tuple(sorted(norm, key=lambda c: (len(c), c))))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def chain(cls, n_drafts: int) -> Tree:
        """The top-1 draft of heads 2..n_drafts+1 in a row (no branching); ``chain(0)`` is greedy decoding."""
        if isinstance(n_drafts, bool) or not isinstance(n_drafts, int) or n_drafts < 0:
            raise ValueError(f"n_drafts={n_drafts!r} must be an integer >= 0")
        return cls(tuple((0,) * d for d in range(1, n_drafts + 1)))

    @classmethod
    def cartesian(cls, widths: Sequence[int]) -> Tree:
        """Every combination of the top ``widths[d-1]`` tokens of head ``d + 1`` at each depth ``d``."""
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths={list(widths)!r} must be a non-empty list of integers >= 1, e.g. [3, 2]")
        choices = [c for d in range(1, len(widths) + 1) for c in itertools.product(*(range(w) for w in widths[:d]))]
        return cls(tuple(choices))

    @classmethod
    def from_rank_probs(cls, rank_probs: Sequence[Sequence[float]] | torch.Tensor, n_nodes: int) -> Tree:
        """The ``n_nodes`` most probable paths when draft rank ``r`` of head ``d + 1`` is right with
        probability ``rank_probs[d - 1][r]`` independently (Medusa's tree construction).

        A path's probability is the product over its depths, so a parent is at least as probable as its
        children and the chosen set is a tree. ``rank_probs`` can come from :func:`rank_acceptance`.
        """
        probs = [[float(p) for p in row] for row in (rank_probs.tolist() if isinstance(rank_probs, torch.Tensor)
                                                     else rank_probs)]
        if not probs or any(not row for row in probs) or any(not 0 <= p <= 1 for row in probs for p in row):
            raise ValueError("rank_probs must be a non-empty [depth][rank] table of probabilities in [0, 1]")
        if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 0:
            raise ValueError(f"n_nodes={n_nodes!r} must be an integer >= 0")
        chosen: list[tuple[int, ...]] = []
        heap: list[tuple[float, tuple[int, ...]]] = [(-p, (r,)) for r, p in enumerate(probs[0])]
        heapq.heapify(heap)
        while heap and len(chosen) < n_nodes:
            neg, path = heapq.heappop(heap)
            chosen.append(path)
            if len(path) < len(probs):
                for r, p in enumerate(probs[len(path)]):
                    heapq.heappush(heap, (neg * p, path + (r,)))
        return cls(tuple(chosen))

    # -- structure -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Tokens fed per verification step: the root and one per choice."""
        return 1 + len(self.choices)

    @property
    def depth(self) -> int:
        """Drafted tokens on the longest path (the heads used beyond head 1)."""
        return max((len(c) for c in self.choices), default=0)

    @property
    def widths(self) -> tuple[int, ...]:
        """Candidates needed from head ``d + 1`` at each depth ``d`` (largest rank + 1)."""
        return tuple(max(c[-1] for c in self.choices if len(c) == d) + 1 for d in range(1, self.depth + 1))

    @property
    def is_chain(self) -> bool:
        """One node per depth: accepted tokens always sit in order right after the root."""
        return all(len(c) == i + 1 for i, c in enumerate(self.choices))

    @property
    def parents(self) -> tuple[int, ...]:
        """Parent node of every node (-1 for the root)."""
        index = {c: i + 1 for i, c in enumerate(self.choices)}
        return (-1, *(index.get(c[:-1], 0) for c in self.choices))

    @property
    def depths(self) -> tuple[int, ...]:
        return (0, *(len(c) for c in self.choices))

    def ancestors(self) -> torch.Tensor:
        """``[size, size]`` bool: ``[i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors."""
        parents = self.parents
        out = torch.zeros(self.size, self.size, dtype=torch.bool)
        for i in range(self.size):
            j = i
            while j >= 0:
                out[i, j] = True
                j = parents[j]
        return out

    # -- use -----------------------------------------------------------------------------------

    def fill(self, root: int, drafts: Sequence[Sequence[int]]) -> list[int]:
        """The tokens of all nodes: ``root``, then ``drafts[d - 1][r]`` for each choice ending in rank
        ``r`` at depth ``d``."""
        if len(drafts) < self.depth:
            raise ValueError(f"drafts has {len(drafts)} rows; the tree needs one per depth ({self.depth})")
        tokens = [int(root)]
        for c in self.choices:
            row = drafts[len(c) - 1]
            if c[-1] >= len(row):
                raise ValueError(f"drafts for depth {len(c)} have {len(row)} candidates; the tree needs {c[-1] + 1}")
            tokens.append(int(row[c[-1]]))
        return tokens

    def accept(self, tokens: Sequence[int], greedy: Sequence[int]) -> list[int]:
        """The accepted path (node indices from the root) given head 1's greedy choice at every node.

        A node is right when its parent is right and its token is the parent's greedy choice; the
        deepest right node (the first one, on ties) ends the path.
        """
        parents, depths = self.parents, self.depths
        right = [True] + [False] * (self.size - 1)
        best = 0
        for i in range(1, self.size):
            p = parents[i]
            right[i] = right[p] and tokens[i] == greedy[p]
            if right[i] and depths[i] > depths[best]:
                best = i
        path = []
        while best >= 0:
            path.append(best)
            best = parents[best]
        return path[::-1]


# --------------------------------------------------------------------------------------------------
# Drafters


class Drafter(Protocol):
    """Where the draft tokens come from, if not from the heads.

    Called before every verification step with ``tokens`` (everything so far, the prompt included;
    the last one is the root: head 1's choice for x_{t+1}, known to be right) and ``head_candidates``
    (``[depth][k]``: the heads' top-k tokens for x_{t+1+d}, d = 1..depth, at context end t). Returns
    ``[depth][>= k]`` candidates in the same layout, best first.
    """

    def __call__(self, tokens: Sequence[int], head_candidates: list[list[int]]) -> Sequence[Sequence[int]]: ...


class ReferenceDrafter:
    """Drafts a known sequence: rank 0 at depth ``d`` is ``reference[len(tokens) + d - 1]``.

    With the greedy output as ``reference`` every draft is right and every step accepts the whole
    path (tests). Other ranks, and depths past the end of ``reference``, keep the heads' candidates.
    """

    def __init__(self, reference: Sequence[int] | torch.Tensor) -> None:
        self.reference = [int(x) for x in (reference.reshape(-1).tolist() if isinstance(reference, torch.Tensor)
                                           else reference)]

    def __call__(self, tokens: Sequence[int], head_candidates: list[list[int]]) -> list[list[int]]:
        n = len(tokens)
        out = []
        for d, row in enumerate(head_candidates, start=1):
            j = n + d - 1
            out.append([self.reference[j] if j < len(self.reference) else row[0], *row[1:]])
        return out


class MarginalOracleDrafter:
    """Drafts x_{t+1+d} as the top tokens of the model's *marginal* p(x_{t+1+d} | x<=t) (:mod:`mtp_lib.marginal`).

    Why the marginal: when the step is drafted, x_{t+1} (the root) is already known, and the
    model's own p(x_{t+2} | x<=t, x_{t+1}) is exactly what verification computes next, so drafting
    from it would be trivially perfect (and cost a forward pass per token: plain decoding). A head
    drafts x_{t+2} from the context x<=t alone; the best any such drafter can know about x_{t+2} is
    the model's marginal over x_{t+1}, sum_y p(x_{t+2} | x<=t, y) p(y | x<=t). This drafter uses
    exactly that (the root is ignored), so its acceptance bounds what heads trained to imitate the
    model could reach, drafting token by token. It recomputes the context and a nucleus of
    candidates (``top_p``) every step: measure acceptance with it, not speed.

    Verify with a head 1 that *is* ``model`` (e.g. ``MTPModel(model, n_heads=d + 1,
    head_type="medusa")``, whose head 1 is the model's own output) to compare like with like.
    """

    def __init__(self, model: nn.Module, *, top_p: float = 0.99, **marginalize_options: Any) -> None:
        self.model = model
        self.top_p = top_p
        self.options = marginalize_options  # passed on to marginalize (chunk sizes)

    def __call__(self, tokens: Sequence[int], head_candidates: list[list[int]]) -> list[list[int]]:
        from mtp_lib.marginal import marginalize

        depth = len(head_candidates)
        if depth == 0:
            return []
        k = max(len(row) for row in head_candidates)
        device = next(self.model.parameters()).device
        context = torch.tensor([list(tokens[:-1])], device=device)  # x<=t: the root x_{t+1} is left out
        res = marginalize(self.model, context, depth=depth + 1, top_p=self.top_p, positions=[context.shape[1] - 1],
                          **self.options)
        return [res.log_probs[0, d].topk(k).indices.tolist() for d in range(1, depth + 1)]


# --------------------------------------------------------------------------------------------------
# Output


@dataclasses.dataclass
class GenerateOutput:
    """What the generate functions return.

    ``tokens``: ``[1, T + new]``, the prompt included. ``accepted_lengths``: tokens gained by each
    forward pass (the prompt's pass first), each >= 1, summing to the new tokens; empty when no
    token was generated, or when a transformers baseline's passes could not be counted.
    ``n_forward``: forward passes of the model (for the baselines: calls of its ``forward``).
    ``stopped_by_eos``: the output ends with an end-of-sequence token it generated.
    ``step_seconds`` (:class:`SpeculativeDecoder` only): host wall time summed over the call, split
    into ``prefill`` (the prompt's pass), ``draft`` (drafts and the tree's tokens), ``verify`` (the
    verification pass until its predictions reach the host) and ``accept`` (the accepted path,
    cache commit, bookkeeping).
    """

    tokens: torch.Tensor
    prompt_length: int
    accepted_lengths: list[int]
    n_forward: int
    stopped_by_eos: bool = False
    step_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.shape[1]) - self.prompt_length

    @property
    def new_token_ids(self) -> list[int]:
        return self.tokens[0, self.prompt_length:].tolist()

    @property
    def tau(self) -> float:
        """Mean tokens gained per verification step (the prompt's pass left out); NaN without steps."""
        steps = self.accepted_lengths[1:]
        return sum(steps) / len(steps) if steps else math.nan


def acceptance_summary(outputs: Sequence[GenerateOutput]) -> dict[str, Any]:
    """Pooled acceptance of several generations: ``tau`` (accepted tokens per verification step over
    all steps of all outputs, the prompts' passes left out), ``histogram`` (``{tokens gained: steps}``),
    and the totals ``new_tokens``, ``steps``, ``forward_passes``."""
    steps = [a for out in outputs for a in out.accepted_lengths[1:]]
    histogram: dict[int, int] = {}
    for a in steps:
        histogram[a] = histogram.get(a, 0) + 1
    return {"tau": sum(steps) / len(steps) if steps else math.nan, "histogram": dict(sorted(histogram.items())),
            "new_tokens": sum(out.new_tokens for out in outputs), "steps": len(steps),
            "forward_passes": sum(out.n_forward for out in outputs)}


# --------------------------------------------------------------------------------------------------
# Helpers


def _first_heads(mtp: MTPModel, n: int) -> MTPModel:
    """A view of ``mtp`` with heads 1..n only (shared weights, own eval-mode module tree)."""
    view = shallow_module_copy(mtp)
    assert isinstance(view, MTPModel)
    view.heads = nn.ModuleList(list(mtp.heads)[:n])
    view.n_heads = n
    return view.eval()


def _predict(mtp: MTPModel, states: torch.Tensor, k: int) -> torch.Tensor:
    """Head 1's greedy token at each row and the top-``k`` tokens of the other heads, packed in one
    long tensor: ``[R]`` then ``[n_heads - 1, R, k]`` flattened. ``states``: ``[n_heads, R, H]``."""
    logits = mtp.unembed_states(states)
    greedy = logits[0].argmax(dim=-1)
    if mtp.n_heads == 1 or k == 0:
        return greedy
    return torch.cat([greedy, logits[1:].topk(k, dim=-1).indices.reshape(-1)])


@dataclasses.dataclass
class _Prediction:
    """Host copy of :func:`_predict`'s output for ``rows`` rows."""

    greedy: list[int]
    flat: list[int]
    rows: int
    depth: int
    k: int

    @classmethod
    def parse(cls, packed: torch.Tensor, rows: int, depth: int, k: int) -> _Prediction:
        values = packed.tolist()  # the one device->host copy of a step
        return cls(values[:rows], values[rows:], rows, depth, k)

    def candidates(self, row: int) -> list[list[int]]:
        """``[depth][k]``: heads 2..depth+1's top-k tokens at ``row``."""
        r, k = self.rows, self.k
        return [self.flat[(d * r + row) * k:(d * r + row + 1) * k] for d in range(self.depth)]


def _check_max_new(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    return max_new_tokens


def _eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be an int, a list of ints or None")
    return frozenset(ids)


def _position_limit(mtp: MTPModel) -> int | None:
    """The number of positions a model with a learned position table (GPT-2) can embed."""
    if mtp.adapter.family == "gpt2":
        config: Any = mtp.backbone.config
        return int(config.n_positions)
    return None


# --------------------------------------------------------------------------------------------------
# Verifiers: run the model on a step's tokens and keep the cache in line with the accepted tokens


class _StaticVerifier:
    """Static cache, own masks; on CUDA every step, cache compaction and prompt pass is a replayed graph.

    Prompts are padded to a few fixed lengths (``pad_prompts``, default: with CUDA graphs) so that
    their pass can be captured too: 64, 128, 256, .. tokens up to the cache size. Padding tokens sit
    after the prompt, so causal attention keeps them out of it, and their cache slots count as stale.
    """

    def __init__(self, view: MTPModel, tree: Tree, max_length: int, cuda_graphs: bool,
                 pad_prompts: bool | None = None, width: int | None = None) -> None:
        param = next(view.parameters())
        self.view, self.tree, self.max_length = view, tree, max_length
        self.width = tree.size if width is None else width  # tokens per step pass (padded: decode_invariant)
        self.device, self.dtype = param.device, param.dtype
        self.k = max(tree.widths, default=0)
        configs = [view.backbone.config] + [h.body.config for h in view.heads if isinstance(h, LayerHead)]
        self.layout = mask_layout(configs)
        # room for max_length tokens, rounded up so that the masks' last dimension suits fused attention kernels
        self.buffer_len = -(-max_length // 64) * 64
        n_backbone = len(getattr(view.backbone, view.adapter.layers_attr))
        self.cache = StaticMTPCache(n_backbone, view.n_heads, view.head_type == "layer", self.buffer_len)
        self.depth = torch.tensor(tree.depths, device=self.device)
        self.ancestors = tree.ancestors().to(self.device)
        graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = graphs
        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.long, device=self.device)

        with torch.no_grad():
            self.step_runner = GraphRunner(self._step, [zeros(1 + self.width)], cuda_graph=graphs)
            self.commit_runner = None if tree.is_chain else GraphRunner(
                self._commit, [zeros(1 + tree.depth + 1)], cuda_graph=graphs)
            self.prompt_runners: dict[int, GraphRunner] = {}
            if graphs if pad_prompts is None else pad_prompts:
                limit = min(max_length, _position_limit(view) or max_length)
                for n in sorted({*(64 * 2**i for i in range(20) if 64 * 2**i < limit), limit}):
                    self.prompt_runners[n] = GraphRunner(self._padded_prompt, [zeros(1 + n)], cuda_graph=graphs)

    def _forward(self, start: torch.Tensor, tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                 rows: torch.Tensor | None) -> torch.Tensor:
        """Write ``tokens`` ``[S]`` at slots ``start`` .. (``start`` ``[1]``, on the device) and predict at
        ``rows`` (an index tensor; None: every token)."""
        self.cache.set_slots(start + torch.arange(tokens.shape[0], device=tokens.device))
        mask = tree_masks(start, depth, ancestors, self.buffer_len, self.layout, self.dtype)
        out = self.view(tokens[None], attention_mask=mask, position_ids=(start + depth)[None], cache=self.cache,
                        use_cache=True, return_logits=False)
        states = out.states[:, 0] if rows is None else out.states[:, 0].index_select(1, rows)
        return _predict(self.view, states, self.k)

    def _step(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed = [start, token_0 .. token_{S-1}]``: the tree's tokens after ``start`` cached ones."""
        return self._forward(packed[:1], packed[1:], self.depth, self.ancestors, None)

    def _commit(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed = [start, o_0 .. o_D]``: slot ``start + o_j`` -> slot ``start + j``."""
        start, offsets = packed[:1], packed[1:]
        self.cache.move(start + offsets, start + torch.arange(offsets.shape[0], device=offsets.device))
        return offsets

    def _prompt(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        depth = torch.arange(n, device=tokens.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        return self._forward(torch.zeros_like(last), tokens, depth, causal, last)

    def _padded_prompt(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed = [T - 1, prompt tokens, padding]``: the prompt from slot 0, predictions at its last token."""
        return self._prompt(packed[1:], packed[:1])

    def prefill(self, input_ids: torch.Tensor) -> _Prediction:
        n = input_ids.shape[1]
        self.cache.length = 0
        fits = [size for size in self.prompt_runners if size >= n]
        if fits:
            ids = input_ids[0].tolist()
            packed = self.prompt_runners[min(fits)](torch.tensor([n - 1, *ids, *[0] * (min(fits) - n)]))
        else:
            packed = self._prompt(input_ids[0], torch.tensor([n - 1], device=self.device))
        self.cache.length = n
        return _Prediction.parse(packed, 1, self.tree.depth, self.k)

    def step(self, start: int, tokens: list[int]) -> _Prediction:
        packed = self.step_runner(torch.tensor([start, *tokens], dtype=torch.long))
        return _Prediction.parse(packed, self.tree.size, self.tree.depth, self.k)

    def commit(self, start: int, path: list[int]) -> None:
        self.cache.length = start + len(path)
        if path == list(range(len(path))):
            return  # already in place: the write position simply moves on
        assert self.commit_runner is not None
        offsets = path + list(range(len(path), self.tree.depth + 1))  # the rest copied onto itself
        self.commit_runner(torch.tensor([start, *offsets], dtype=torch.long))


class _DynamicVerifier:
    """Hugging Face's DynamicCache (through MTPCache) and masks, cropped after each step; chains only."""

    def __init__(self, view: MTPModel, tree: Tree) -> None:
        if not tree.is_chain:
            raise ValueError("tree verification needs static_cache=True (the dynamic cache verifies chains only)")
        self.view, self.tree = view, tree
        self.k = max(tree.widths, default=0)
        self.device = next(view.parameters()).device
        self.cache: Any = None

    def prefill(self, input_ids: torch.Tensor) -> _Prediction:
        self.cache = self.view.new_cache(rollback=True)
        out = self.view(input_ids, cache=self.cache, use_cache=True, last_only=True, return_logits=False)
        return _Prediction.parse(_predict(self.view, out.states[:, 0], self.k), 1, self.tree.depth, self.k)

    def step(self, start: int, tokens: list[int]) -> _Prediction:
        if self.cache.get_seq_length() != start:
            raise RuntimeError(f"cache holds {self.cache.get_seq_length()} tokens, the step starts at {start}")
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.view(ids, cache=self.cache, use_cache=True, return_logits=False)
        return _Prediction.parse(_predict(self.view, out.states[:, 0], self.k), len(tokens), self.tree.depth, self.k)

    def commit(self, start: int, path: list[int]) -> None:
        self.cache.crop(start + len(path))


# --------------------------------------------------------------------------------------------------
# The decoder


class SpeculativeDecoder:
    """Speculative decoding with ``mtp``'s heads over ``tree``, reusable across prompts.

    ``tree``: the draft tree (default ``Tree.chain(mtp.n_heads - 1)``: every head's top-1 draft;
    ``Tree.chain(0)``: plain greedy decoding). ``static_cache``: the fixed-buffer cache (needed for
    trees and CUDA graphs) or Hugging Face's dynamic one. ``max_length``: room of the static cache;
    a prompt of T tokens may generate up to ``max_length - T - tree.size + 1`` tokens.
    ``cuda_graphs``: capture the step as a CUDA graph when the model is on CUDA (ignored elsewhere);
    capturing happens here, once. ``pad_prompts``: pad prompts to 64, 128, 256, .. tokens so that
    their pass is a captured graph too (default: when CUDA graphs are used). Only heads
    1..tree.depth+1 are run. ``invariant``: position-invariant verification
    (:mod:`mtp_lib.decode_invariant`): every pass feeds ``width`` tokens (default the tree's size)
    and attention reads keys in logical order, so that in any dtype a token's logits are bit-identical
    whatever is verified beside it; decoders with the same ``width`` and ``max_length`` (greedy ones,
    ``Tree.chain(0)``, included) then give identical outputs.

    The decoder shares ``mtp``'s weights: changing them in place is seen by later calls, moving the
    model to another device or dtype is not (build a new decoder).
    """

    def __init__(self, mtp: MTPModel, *, tree: Tree | None = None, max_length: int = 1024,
                 static_cache: bool = True, cuda_graphs: bool = True, pad_prompts: bool | None = None,
                 invariant: bool = False, width: int | None = None) -> None:
        if not isinstance(mtp, MTPModel):
            raise ValueError(f"mtp must be an mtp_lib.heads.MTPModel, got {type(mtp).__name__}")
        tree = Tree.chain(mtp.n_heads - 1) if tree is None else tree
        if not isinstance(tree, Tree):
            raise ValueError(f"tree must be a mtp_lib.decode.Tree, got {type(tree).__name__}")
        if tree.depth > mtp.n_heads - 1:
            raise ValueError(f"the tree drafts {tree.depth} tokens ahead but the model has {mtp.n_heads} heads "
                             f"(at most {mtp.n_heads - 1} drafts): use a shallower tree or more heads")
        if width is not None and not invariant:
            raise ValueError("width is the pass width of invariant decoding: pass invariant=True with it")
        if invariant and not static_cache:
            raise ValueError("invariant=True needs the static cache (static_cache=True)")
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
            self._verifier = InvariantVerifier(self.view, tree, max_length, cuda_graphs, pad_prompts, width)
        else:
            self._verifier = (_StaticVerifier(self.view, tree, max_length, cuda_graphs, pad_prompts) if static_cache
                              else _DynamicVerifier(self.view, tree))

    @property
    def uses_cuda_graphs(self) -> bool:
        return isinstance(self._verifier, _StaticVerifier) and self._verifier.graphs

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None,
                 drafter: Drafter | None = None, progress: bool = False) -> GenerateOutput:
        """Decode ``input_ids`` (``[1, T]``) for up to ``max_new_tokens`` tokens, stopping after the
        first token in ``eos_token_id``. ``drafter`` replaces the heads' drafts (see :class:`Drafter`)."""
        from tqdm.auto import tqdm

        max_new = _check_max_new(max_new_tokens)
        eos = _eos_set(eos_token_id)
        ids = check_input_ids(input_ids, self.mtp.vocab_size).to(self._verifier.device)
        prompt_len = ids.shape[1]
        need = prompt_len + max_new + self.width - 1
        room = self.max_length if self.max_length is not None else _position_limit(self.mtp)
        if room is not None and max_new > 0 and need > room:
            raise ValueError(f"a prompt of {prompt_len} tokens with max_new_tokens={max_new} and a tree of "
                             f"{self.width} tokens needs {need} positions, more than the "
                             f"{'static cache' if self.max_length is not None else 'model'} holds ({room}): "
                             "raise max_length or lower max_new_tokens")
        tokens = ids[0].tolist()
        accepted: list[int] = []
        stopped = False
        bar = tqdm(total=max_new, desc="decode", disable=not progress)
        seconds = dict.fromkeys(("prefill", "draft", "verify", "accept"), 0.0)
        if max_new > 0:
            t0 = time.perf_counter()
            pred = self._verifier.prefill(ids)
            seconds["prefill"] = time.perf_counter() - t0
            tokens.append(pred.greedy[0])
            accepted.append(1)
            bar.update(1)
            stopped = tokens[-1] in eos
            row = 0
            while not stopped and len(tokens) - prompt_len < max_new:
                t0 = time.perf_counter()
                candidates = pred.candidates(row)
                drafts = candidates if drafter is None else drafter(tokens, candidates)
                step_tokens = self.tree.fill(tokens[-1], drafts)
                start = len(tokens) - 1  # tokens in the cache: all but the root
                t1 = time.perf_counter()
                pred = self._verifier.step(start, step_tokens)  # returns once its predictions are on the host
                t2 = time.perf_counter()
                path = self.tree.accept(step_tokens, pred.greedy)
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
                bar.update(len(gained))
                t3 = time.perf_counter()
                seconds["draft"] += t1 - t0
                seconds["verify"] += t2 - t1
                seconds["accept"] += t3 - t2
        bar.close()
        out = torch.tensor([tokens], dtype=torch.long, device=input_ids.device)
        return GenerateOutput(out, prompt_len, accepted, n_forward=len(accepted), stopped_by_eos=stopped,
                              step_seconds=seconds)


def speculative_generate(mtp_model: MTPModel, input_ids: torch.Tensor, max_new_tokens: int, *,
                         tree: Tree | None = None, eos_token_id: int | Sequence[int] | None = None,
                         drafter: Drafter | None = None, static_cache: bool = True, cuda_graphs: bool = True,
                         max_length: int | None = None, progress: bool = False) -> GenerateOutput:
    """Lossless self-speculative greedy decoding of one prompt with the heads of ``mtp_model``.

    The output equals :func:`greedy_generate`'s token for token. ``tree`` defaults to the chain of
    every head's top-1 draft; ``max_length`` to just what this call needs. Builds a
    :class:`SpeculativeDecoder` (capturing its CUDA graphs) per call: for many prompts build one
    decoder and call its ``generate``.
    """
    tree = Tree.chain(mtp_model.n_heads - 1) if tree is None and isinstance(mtp_model, MTPModel) else tree
    size = tree.size if isinstance(tree, Tree) else 1
    if max_length is None:
        n = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
        max_length = max(n + _check_max_new(max_new_tokens) + size - 1, size + 1)
    decoder = SpeculativeDecoder(mtp_model, tree=tree, max_length=max_length, static_cache=static_cache,
                                 cuda_graphs=cuda_graphs)
    return decoder.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, drafter=drafter, progress=progress)


def greedy_generate(mtp_model: MTPModel, input_ids: torch.Tensor, max_new_tokens: int, *,
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


# --------------------------------------------------------------------------------------------------
# Calibration of trees


@torch.no_grad()
def rank_acceptance(mtp: MTPModel, outputs: Sequence[GenerateOutput], k: int = 10) -> torch.Tensor:
    """``[n_heads - 1, k]``: how often head ``n``'s ``r``-th most likely token is the token ``n`` ahead.

    Teacher-forced on ``outputs`` (use greedy outputs of head 1: then "the token n ahead" is what
    verification accepts), over the context ends t from the last prompt token on. Row ``n - 2`` is
    head ``n``; feed it to :meth:`Tree.from_rank_probs`.
    """
    if mtp.n_heads < 2:
        raise ValueError("rank_acceptance needs a model with at least 2 heads")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    if not outputs:
        raise ValueError("outputs is empty: pass greedy outputs (GenerateOutput) to calibrate on")
    device = next(mtp.parameters()).device
    hits = torch.zeros(mtp.n_heads - 1, k, dtype=torch.float64)
    counts = torch.zeros(mtp.n_heads - 1, dtype=torch.float64)
    with eval_mode(mtp):
        for out in outputs:
            ids = out.tokens.to(device)
            n_tok = ids.shape[1]
            states = mtp(ids, return_logits=False).states[:, 0]  # [N, T, H]
            for n in range(2, mtp.n_heads + 1):
                ts = torch.arange(max(out.prompt_length - 1, 0), n_tok - n, device=device)
                if len(ts) == 0:
                    continue
                top = mtp.unembed_states(states[n - 1, ts]).topk(k, dim=-1).indices  # [P, k]
                hits[n - 2] += (top == ids[0, ts + n][:, None]).double().sum(0).cpu()
                counts[n - 2] += len(ts)
    return hits / counts.clamp(min=1)[:, None]


# --------------------------------------------------------------------------------------------------
# Baselines through transformers


def next_token_model(mtp: MTPModel, model: nn.Module) -> nn.Module:
    """A Hugging Face causal LM computing exactly head 1 of ``mtp`` (built on ``model``): its greedy
    ``generate`` output is :func:`greedy_generate`'s, so the transformers baselines can be checked
    against it.

    Medusa heads: ``model`` itself. Layer heads: a copy of ``model`` sharing its weights, with the
    last layer replaced by head 1's (after training, head 1 differs from the model's last layer).
    Not possible with weighted hidden states or a LoRA-adapted backbone: ValueError.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    shared = {p.data_ptr() for p in mtp.backbone.parameters()}
    if next(layers[0].parameters()).data_ptr() not in shared:
        raise ValueError("mtp was not built on this model (its backbone does not share the model's weights)")
    if any("lora_" in name for name, _ in mtp.backbone.named_parameters()):
        raise ValueError("the backbone carries LoRA weights: merge them into a model (mtp_lib.train.merge_lora) "
                         "and rebuild; a plain HF model cannot compute this head 1")
    if mtp.weighted_hidden_states:
        raise ValueError("head 1 reads weighted hidden states of all layers: no plain HF model computes it")
    if mtp.head_type == "medusa":
        return model
    head_layer = getattr(mtp.heads[0].body, adapter.layers_attr)[0]
    layer = shallow_module_copy(head_layer)
    for sub in layer.modules():  # back to the last layer's place in the model's own cache
        if isinstance(getattr(sub, "layer_idx", None), int):
            setattr(sub, "layer_idx", len(layers) - 1)
    copy = shallow_module_copy(model)
    new_layers = adapter.layers(copy)
    new_layers[len(layers) - 1] = layer
    return copy.eval()


@torch.no_grad()
def hf_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                eos_token_id: int | Sequence[int] | None = None,
                prompt_lookup_num_tokens: int | None = None) -> GenerateOutput:
    """Greedy ``model.generate`` of transformers (``prompt_lookup_num_tokens``: prompt lookup decoding).

    Stops only at ``eos_token_id`` (None: never; the model's own generation config is not used).
    Forward passes are counted with a hook on ``model.forward``; ``accepted_lengths`` come from the
    cache length at each pass (empty if the cache could not be read).
    """
    from transformers import GenerationConfig

    max_new = _check_max_new(max_new_tokens)
    eos = sorted(_eos_set(eos_token_id))
    vocab = int(get_adapter(model).unembed_weight(model).shape[0])
    device = next(model.parameters()).device
    ids = check_input_ids(input_ids, vocab).to(device)
    prompt_len = ids.shape[1]
    if max_new == 0:
        return GenerateOutput(ids.to(input_ids.device), prompt_len, [], 0)
    pad = eos[0] if eos else (getattr(model.config, "pad_token_id", None) or 0)
    # eos_token_id=[] rather than None: generate fills None fields from the model's own generation config
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=0,
                              eos_token_id=eos, pad_token_id=pad,
                              prompt_lookup_num_tokens=prompt_lookup_num_tokens, temperature=None, top_p=None,
                              top_k=None)
    cached: list[int | None] = []

    def count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        try:
            cached.append(int(cache.get_seq_length()) if cache is not None else 0)
        except Exception:  # an unknown cache type: count the pass only
            cached.append(None)

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        generate: Any = getattr(model, "generate")
        out = generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        handle.remove()
    n_new = out.shape[1] - prompt_len
    stopped = n_new > 0 and int(out[0, -1]) in eos
    accepted: list[int] = []
    if cached and None not in cached:
        # pass i leaves cached[i + 1] + 1 tokens known (its cache after cropping, plus the next token)
        known = [c + 1 for c in cached[1:]] + [int(out.shape[1])]  # type: ignore[operator]
        accepted = [b - a for a, b in zip([prompt_len] + known[:-1], known)]
        if any(a < 1 for a in accepted) or sum(accepted) != n_new:
            accepted = []
    return GenerateOutput(out.to(input_ids.device), prompt_len, accepted, n_forward=len(cached), stopped_by_eos=stopped)
