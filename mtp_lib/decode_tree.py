"""The draft tree of a verification step, where its drafts come from, and how to calibrate it.

A :class:`Tree` lists the drafts of one step as Medusa's "choices" (``Tree.chain(n)``: the top-1
drafts of heads 2..n+1 in a row). Drafts come from the heads, or from a :class:`Drafter`:
:class:`ReferenceDrafter` (a known continuation, for tests) or :class:`MarginalOracleDrafter` (the
model's own marginal, an upper bound for heads). :func:`rank_acceptance` measures how often each
head's r-th draft is right, for :meth:`Tree.from_rank_probs`.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mtp_lib.decode_output import GenerateOutput
from mtp_lib.heads import MTPModel
from mtp_lib.models import eval_mode

__all__ = ["Drafter", "DynamicTree", "MarginalOracleDrafter", "PromptLookupDrafter", "ReferenceDrafter", "Tree",
           "rank_acceptance"]


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
        if all(a >= b for row in probs for a, b in zip(row, row[1:])):
            return cls(_best_paths_sorted(probs, n_nodes))
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

    # -- structure (read at every decoding step: each computed once) --------------------------------

    @property
    def size(self) -> int:
        """Tokens fed per verification step: the root and one per choice."""
        return 1 + len(self.choices)

    @functools.cached_property
    def depth(self) -> int:
        """Drafted tokens on the longest path (the heads used beyond head 1)."""
        return max((len(c) for c in self.choices), default=0)

    @functools.cached_property
    def widths(self) -> tuple[int, ...]:
        """Candidates needed from head ``d + 1`` at each depth ``d`` (largest rank + 1)."""
        return tuple(max(c[-1] for c in self.choices if len(c) == d) + 1 for d in range(1, self.depth + 1))

    @functools.cached_property
    def is_chain(self) -> bool:
        """One node per depth: accepted tokens always sit in order right after the root."""
        return all(len(c) == i + 1 for i, c in enumerate(self.choices))

    @functools.cached_property
    def parents(self) -> tuple[int, ...]:
        """Parent node of every node (-1 for the root)."""
        index = {c: i + 1 for i, c in enumerate(self.choices)}
        return (-1, *(index.get(c[:-1], 0) for c in self.choices))

    @functools.cached_property
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


def _best_paths_sorted(probs: list[list[float]], n_nodes: int) -> tuple[tuple[int, ...], ...]:
    """:meth:`Tree.from_rank_probs`'s paths when every row of ``probs`` is sorted (best rank first), as
    the heads' top-k probabilities are: a path enters the heap only once the path before it (its
    previous sibling, or its parent for rank 0) has left it, which that path precedes in the heap's
    order (a larger or equal product, then a smaller tuple). So the paths leave in the same order as
    from the heap of every path, after about ``2 n`` pushes instead of ``n k``."""
    chosen: list[tuple[int, ...]] = []
    heap: list[tuple[float, tuple[int, ...], float]] = [(-1.0 * probs[0][0], (0,), -1.0)]  # (-p, path, parent's -p)
    while heap and len(chosen) < n_nodes:
        neg, path, above = heapq.heappop(heap)
        chosen.append(path)
        depth, rank = len(path), path[-1]
        if rank + 1 < len(probs[depth - 1]):
            heapq.heappush(heap, (above * probs[depth - 1][rank + 1], path[:-1] + (rank + 1,), above))
        if depth < len(probs):
            heapq.heappush(heap, (neg * probs[depth][0], path + (0,), neg))
    return tuple(chosen)


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """A draft tree chosen anew at every step from the heads' own confidence (EAGLE-2's dynamic tree,
    with the heads in place of a draft model).

    At each step head ``d + 1``'s ``r``-th draft is taken to be right with the probability the head
    itself gives it there, independently across depths, and the tree is the ``n_nodes`` most probable
    paths (:meth:`Tree.from_rank_probs` on that step's probabilities instead of rates calibrated over
    many steps): where head 2 is sure, the tree goes deep along its draft; where it hesitates, wide.
    Every step verifies ``n_nodes + 1`` tokens, so the decoder's pass keeps one shape.
    """

    n_nodes: int
    depth: int
    k: int = 10

    def __post_init__(self) -> None:
        for name in ("n_nodes", "depth", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DynamicTree {name}={value!r} must be an integer >= 1")
        if self.n_nodes < self.depth:
            raise ValueError(f"n_nodes={self.n_nodes} cannot reach depth={self.depth}: use n_nodes >= depth")
        if self.n_nodes > sum(self.k ** d for d in range(1, self.depth + 1)):
            raise ValueError(f"n_nodes={self.n_nodes} exceeds the {self.k} drafts per head over {self.depth} "
                             "depths: raise k or depth, or lower n_nodes")

    @property
    def size(self) -> int:
        return 1 + self.n_nodes

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.k,) * self.depth

    @property
    def template(self) -> Tree:
        """A tree of this size and depth (the shapes a decoder's captured step is built for)."""
        return Tree.from_rank_probs([[1.0] + [0.5 / r for r in range(1, self.k)]] * self.depth,  # top-1 chain,
                                    self.n_nodes)  # then wide

    def build(self, probs: Sequence[Sequence[float]]) -> Tree:
        """This step's tree from ``probs`` ``[depth][k]``: the heads' probabilities of their top-k drafts."""
        return Tree.from_rank_probs(probs, self.n_nodes)


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


class PromptLookupDrafter:
    """Prompt lookup drafting (Saxena 2023; transformers' ``prompt_lookup_num_tokens``) inside our decoder.

    Finds the most recent earlier occurrence of the last n tokens (the root included; n from
    ``max_ngram`` down to ``min_ngram``) and drafts what followed it there: rank 0 at depth d is the
    d-th token after the match. Other ranks, depths past the text, and steps without a match keep the
    heads' candidates, so with trained heads it is a hybrid (copy where the text repeats, the heads
    elsewhere) and with the same tree, verifier and CUDA graphs as the heads' rows its speed and
    acceptance compare with theirs on equal terms. Drafting is a scan of the text on the host,
    O(len(tokens) x max_ngram) per step.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if isinstance(min_ngram, bool) or not isinstance(min_ngram, int) or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, max_ngram={max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, tokens: Sequence[int], depth: int) -> list[int]:
        """Up to ``depth`` tokens that followed the latest earlier match of the longest suffix ([] if none)."""
        toks = list(tokens)
        n_tok = len(toks)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            suffix = toks[n_tok - n:]
            for start in range(n_tok - n - 1, -1, -1):  # latest first; the suffix itself is excluded
                if toks[start:start + n] == suffix:
                    return toks[start + n:start + n + depth]
        return []

    def __call__(self, tokens: Sequence[int], head_candidates: list[list[int]]) -> list[list[int]]:
        found = self.lookup(tokens, len(head_candidates))
        out = []
        for d, row in enumerate(head_candidates):
            if d < len(found):
                row = [found[d], *[t for t in row if t != found[d]]][:max(len(row), 1)]
            out.append(list(row))
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


