"""Verifiers of speculative decoding: run the model on a step's tokens, keep the cache in line with the
accepted ones. :class:`_StaticVerifier` (fixed buffers, own masks, CUDA graphs) is the fast path,
:class:`_DynamicVerifier` (Hugging Face's DynamicCache, chains only) the plain reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mtp_lib.decode_graph import GraphRunner, StaticMTPCache, mask_layout, tree_masks
from mtp_lib.decode_tree import DynamicTree, Tree
from mtp_lib.heads import LayerHead, MTPModel, shallow_module_copy


def _first_heads(mtp: MTPModel, n: int) -> MTPModel:
    """A view of ``mtp`` with heads 1..n only (shared weights, own eval-mode module tree)."""
    view = shallow_module_copy(mtp)
    assert isinstance(view, MTPModel)
    view.heads = nn.ModuleList(list(mtp.heads)[:n])
    view.n_heads = n
    return view.eval()


@dataclasses.dataclass
class _TreeTensors:
    """A step's tree on the device, padded to the pass width ``W``: rows past the tree's nodes are
    padding tokens, their own parents at depth 0. ``parents`` ``[W]`` (the root's: itself), ``depths``
    ``[W]``, ``ancestors`` ``[W, W]`` bool (:meth:`Tree.ancestors`: node ``j`` is ``i`` or above it),
    ``paths`` ``[W, W]`` (:func:`mtp_lib.decode_invariant.tree_paths`: ``[i, d]`` is ``i``'s ancestor at
    depth ``d``, then zeros)."""

    parents: torch.Tensor
    depths: torch.Tensor
    ancestors: torch.Tensor
    paths: torch.Tensor

    @staticmethod
    def padded(tree: Tree, width: int) -> tuple[list[int], list[int]]:
        """``tree``'s parents and depths padded to ``width`` (as lists: the layout of :meth:`of`)."""
        parents = [p if p >= 0 else 0 for p in tree.parents] + list(range(tree.size, width))
        return parents, [*tree.depths, *[0] * (width - tree.size)]

    @classmethod
    def of(cls, tree: Tree, width: int, device: torch.device) -> _TreeTensors:
        parents, depths = cls.padded(tree, width)
        return cls.from_parents(torch.tensor(parents, device=device), torch.tensor(depths, device=device), tree.depth)

    @classmethod
    def from_parents(cls, parents: torch.Tensor, depths: torch.Tensor, max_depth: int) -> _TreeTensors:
        """From ``parents`` and ``depths`` ``[W]`` on the device (fixed shapes, no host sync: capturable):
        every node walks ``max_depth`` steps up, marking each node it passes as an ancestor and as its
        path's entry at that node's depth (the root, its own parent, is passed again and again)."""
        w = parents.shape[0]
        index = torch.arange(w, device=parents.device)
        ancestors = torch.zeros(w, w, dtype=torch.bool, device=parents.device)
        paths = torch.zeros(w, w, dtype=torch.long, device=parents.device)
        mark = torch.ones(w, dtype=torch.bool, device=parents.device)
        node = index
        for _ in range(max_depth + 1):
            ancestors.index_put_((index, node), mark)
            paths.index_put_((index, depths.index_select(0, node)), node)
            node = parents.index_select(0, node)
        return cls(parents, depths, ancestors, paths)


def _accepted_node(tokens: torch.Tensor, greedy: torch.Tensor, tree: _TreeTensors) -> torch.Tensor:
    """The device twin of :meth:`Tree.accept`: the index ``[1]`` of the deepest node that greedy decoding
    agrees with, the first one on ties (fixed shapes, no host sync: capturable).

    ``tokens``, ``greedy``: the ``n`` nodes' tokens and head 1's choice after each. Node i matches
    when ``tokens_i == greedy_{parent(i)}`` (the root always does); it is right when every node on its
    path matches: ``right_i = not any_j (ancestors_ij and not match_j)``. The accepted node maximizes
    ``depth_i * n + (n - 1 - i)`` over the right ones.
    """
    n = tokens.shape[0]
    index = torch.arange(n, device=tokens.device)
    match = (tokens == greedy.index_select(0, tree.parents)) | (index == 0)
    right = ~(tree.ancestors & ~match[None, :]).any(dim=1)
    score = torch.where(right, tree.depths * n + (n - 1 - index), -1)
    return score.argmax().reshape(1)


def _predict(mtp: MTPModel, states: torch.Tensor, k: int, tokens: torch.Tensor | None = None,
             tree: _TreeTensors | None = None, probs: bool = False) -> torch.Tensor:
    """Head 1's greedy token at each of the ``R`` rows of ``states`` ``[n_heads, R, H]``, the row the next
    step drafts from, and the top-``k`` tokens of heads 2.. there, packed in one long tensor: ``[R]``,
    ``[1]``, ``[n_heads - 1, k]`` flattened; with ``probs``, then their probabilities in units of
    ``2**-40`` (:class:`DynamicTree` builds the next step's tree from them).

    The row is 0 for a prompt's pass (one row), and after verifying ``tokens`` the node of ``tree`` it
    accepts (:func:`_accepted_node`). So the other heads are unembedded at one row, not at every node
    of the tree: ``n_heads - 1`` rows of ``V`` logits instead of ``(n_heads - 1) * R``. Head 1's logits
    are a matmul of their own, so their rounding does not depend on how many heads run.
    """
    greedy = mtp.unembed_states(states[:1])[0].argmax(dim=-1)
    if tokens is None or tree is None:
        row = torch.zeros(1, dtype=torch.long, device=states.device)
    else:
        row = _accepted_node(tokens, greedy, tree)
    if mtp.n_heads == 1 or k == 0:
        return torch.cat([greedy, row])
    logits = mtp.unembed_states(states[1:].index_select(1, row))
    if not probs:
        return torch.cat([greedy, row, logits.topk(k, dim=-1).indices.reshape(-1)])
    top = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).topk(k, dim=-1)
    return torch.cat([greedy, row, top.indices.reshape(-1), (top.values * _PROB_UNIT).long().reshape(-1)])


_PROB_UNIT = 2.0 ** 40


@dataclasses.dataclass
class _Prediction:
    """Host copy of :func:`_predict`'s output: head 1's greedy tokens at the pass's rows, the row the
    heads drafted at, their top-k tokens there (and their probabilities, where asked for)."""

    greedy: list[int]
    row: int
    flat: list[int]
    depth: int
    k: int

    @classmethod
    def parse(cls, packed: torch.Tensor, rows: int, depth: int, k: int) -> _Prediction:
        values = packed.tolist()  # the one device->host copy of a step
        return cls(values[:rows], values[rows], values[rows + 1:], depth, k)

    def _check(self, row: int) -> None:
        if row != self.row:
            raise RuntimeError(f"the heads drafted at node {self.row} of the step, but node {row} was accepted: "
                               "the device's acceptance disagrees with Tree.accept (a bug: please report it)")

    def candidates(self, row: int) -> list[list[int]]:
        """``[depth][k]``: heads 2..depth+1's top-k tokens at ``row``, the row they were computed at."""
        self._check(row)
        return [self.flat[d * self.k:(d + 1) * self.k] for d in range(self.depth)]

    def probabilities(self, row: int) -> list[list[float]]:
        """``[depth][k]``: the heads' probabilities of those tokens (a decoder of a :class:`DynamicTree`)."""
        self._check(row)
        n = self.depth * self.k
        if len(self.flat) != 2 * n:
            raise RuntimeError("this prediction holds no probabilities: the decoder's tree is not dynamic")
        return [[v / _PROB_UNIT for v in self.flat[n + d * self.k:n + (d + 1) * self.k]] for d in range(self.depth)]


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

    def __init__(self, view: MTPModel, tree: Tree | DynamicTree, max_length: int, cuda_graphs: bool,
                 pad_prompts: bool | None = None, width: int | None = None, compile_step: bool = False) -> None:
        param = next(view.parameters())
        self.dynamic = isinstance(tree, DynamicTree)  # the step's tree comes in with its tokens
        shape = tree.template if isinstance(tree, DynamicTree) else tree
        self.view, self.tree, self.max_length = view, shape, max_length
        self.width = tree.size if width is None else width  # tokens per step pass (padded: decode_invariant)
        self.device, self.dtype = param.device, param.dtype
        self.k = max(tree.widths, default=0)
        configs = [view.backbone.config] + [h.body.config for h in view.heads if isinstance(h, LayerHead)]
        self.layout = mask_layout(configs)
        # room for max_length tokens, rounded up so that the masks' last dimension suits fused attention kernels
        self.buffer_len = -(-max_length // 64) * 64
        n_backbone = len(getattr(view.backbone, view.adapter.layers_attr))
        self.cache = StaticMTPCache(n_backbone, view.n_heads, view.head_type == "layer", self.buffer_len)
        self.nodes = _TreeTensors.of(shape, self.width, self.device)
        graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = graphs
        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.long, device=self.device)

        step_input = self.step_input(0, [0] * shape.size, shape).to(self.device)
        with torch.no_grad():
            step: Any = self._step
            if compile_step:  # fused by Inductor, then captured like the eager step
                self._step(step_input)  # allocates the caches first, so one compilation serves
                step = torch.compile(self._step, fullgraph=True, dynamic=False)
            self.compiled = compile_step
            self.step_runner = GraphRunner(step, [step_input], cuda_graph=graphs)
            self.commit_runner = None if shape.is_chain and not self.dynamic else GraphRunner(
                self._commit, [zeros(1 + shape.depth + 1)], cuda_graph=graphs)
            self.prompt_runners: dict[int, GraphRunner] = {}
            if graphs if pad_prompts is None else pad_prompts:
                limit = min(max_length, _position_limit(view) or max_length)
                for n in sorted({*(64 * 2**i for i in range(20) if 64 * 2**i < limit), limit}):
                    self.prompt_runners[n] = GraphRunner(self._padded_prompt, [zeros(1 + n)], cuda_graph=graphs)

    def states(self, start: torch.Tensor, tokens: torch.Tensor, depth: torch.Tensor,
               structure: torch.Tensor | None) -> torch.Tensor:
        """The heads' normed outputs ``[n_heads, S, H]`` of ``tokens`` ``[S]`` at positions ``start + depth``
        (``start`` ``[1]``, on the device), each seeing the step tokens of ``structure`` ``[S, S]`` (the
        ancestors matrix of :meth:`Tree.ancestors`; None: a plain sequence); the caller sets the cache's
        write slots."""
        if structure is None:
            structure = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=tokens.device).tril()
        mask = tree_masks(start, depth, structure, self.buffer_len, self.layout, self.dtype)
        out = self.view(tokens[None], attention_mask=mask, position_ids=(start + depth)[None], cache=self.cache,
                        use_cache=True, return_logits=False)
        return out.states[:, 0]

    def step_structure(self, nodes: _TreeTensors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The depths and structure that :meth:`states` takes for a step's tokens (of ``nodes``, default the
        decoder's fixed tree)."""
        nodes = self.nodes if nodes is None else nodes
        return nodes.depths, nodes.ancestors

    def _forward(self, start: torch.Tensor, tokens: torch.Tensor, depth: torch.Tensor, structure: torch.Tensor | None,
                 rows: torch.Tensor | None, nodes: _TreeTensors | None = None) -> torch.Tensor:
        """Write ``tokens`` ``[S]`` at slots ``start`` .. and predict at ``rows`` (an index tensor: a
        prompt's last token), or (None) verify the tokens of the tree ``nodes``."""
        self.cache.set_slots(start + torch.arange(tokens.shape[0], device=tokens.device))
        states = self.states(start, tokens, depth, structure)
        if rows is not None:
            return _predict(self.view, states.index_select(1, rows), self.k, probs=self.dynamic)
        return _predict(self.view, states, self.k, tokens, nodes, probs=self.dynamic)

    def step_input(self, start: int, tokens: list[int], tree: Tree) -> torch.Tensor:
        """The step's input on the host: ``[start, tokens (padded to the width)]``, then for a dynamic tree
        its depths and parents (padding: depth 0, their own parents)."""
        pad = self.width - len(tokens)
        values = [start, *tokens, *[0] * pad]
        if self.dynamic:
            parents, depths = _TreeTensors.padded(tree, self.width)
            values += depths + parents
        return torch.tensor(values, dtype=torch.long)

    def _step(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed``: :meth:`step_input`, the tree's tokens after ``start`` cached ones."""
        w = self.width
        nodes = self.nodes
        if self.dynamic:
            nodes = _TreeTensors.from_parents(packed[1 + 2 * w:], packed[1 + w:1 + 2 * w], self.tree.depth)
        return self._forward(packed[:1], packed[1:1 + w], *self.step_structure(nodes), None, nodes)

    def _commit(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed = [start, o_0 .. o_D]``: slot ``start + o_j`` -> slot ``start + j``."""
        start, offsets = packed[:1], packed[1:]
        self.cache.move(start + offsets, start + torch.arange(offsets.shape[0], device=offsets.device))
        return offsets

    def _prompt(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        depth = torch.arange(tokens.shape[0], device=tokens.device)
        return self._forward(torch.zeros_like(last), tokens, depth, None, last)

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

    def step(self, start: int, tokens: list[int], tree: Tree) -> _Prediction:
        """Verify ``tree``'s ``tokens`` after ``start`` cached ones (the decoder's own tree, or this step's)."""
        packed = self.step_runner(self.step_input(start, tokens, tree))
        return _Prediction.parse(packed, self.width, self.tree.depth, self.k)

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
        self.nodes = _TreeTensors.of(tree, tree.size, self.device)
        self.cache: Any = None

    def prefill(self, input_ids: torch.Tensor) -> _Prediction:
        self.cache = self.view.new_cache(rollback=True)
        out = self.view(input_ids, cache=self.cache, use_cache=True, last_only=True, return_logits=False)
        return _Prediction.parse(_predict(self.view, out.states[:, 0], self.k), 1, self.tree.depth, self.k)

    def step(self, start: int, tokens: list[int], tree: Tree) -> _Prediction:
        if self.cache.get_seq_length() != start:
            raise RuntimeError(f"cache holds {self.cache.get_seq_length()} tokens, the step starts at {start}")
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.view(ids, cache=self.cache, use_cache=True, return_logits=False)
        packed = _predict(self.view, out.states[:, 0], self.k, ids[0], self.nodes)
        return _Prediction.parse(packed, len(tokens), self.tree.depth, self.k)

    def commit(self, start: int, path: list[int]) -> None:
        self.cache.crop(start + len(path))


