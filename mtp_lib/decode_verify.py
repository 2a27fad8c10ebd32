"""Verifiers of speculative decoding: run the model on a step's tokens, keep the cache in line with the
accepted ones. :class:`_StaticVerifier` (fixed buffers, own masks, CUDA graphs) is the fast path,
:class:`_DynamicVerifier` (Hugging Face's DynamicCache, chains only) the plain reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mtp_lib.decode_graph import GraphRunner, StaticMTPCache, mask_layout, tree_masks
from mtp_lib.decode_tree import Tree
from mtp_lib.heads import LayerHead, MTPModel, shallow_module_copy


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


