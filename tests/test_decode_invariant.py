"""mtp_lib.decode_invariant: position-invariant verification, on CPU.

In float64 the invariant decoder must compute what brute-force greedy decoding computes (the
attention and the slot tables are right). In bfloat16 a position's logits in a pass of several
tokens (a chain or a tree) must equal bit for bit those of one-token greedy passes of the same width,
and speculative decoding must then equal greedy decoding token for token.

What the CPU cannot show: that the GPU kernels (cuBLAS, CUDA reductions) compute every row of a
fixed-shape op the same way; that is checked by ``benchmarks/speculative.py --invariant`` on a GPU.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mtp_lib.decode import DynamicTree, ReferenceDrafter, SpeculativeDecoder, Tree, greedy_generate
from mtp_lib.decode_graph import MaskLayout, tree_masks
from mtp_lib.decode_invariant import invariant_attention, slot_table, tree_paths
from mtp_lib.heads import MTPModel
from mtp_lib.models import build_tiny_model
from seeds import fresh_seed

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]


def tiny(family: str, seed: int, dtype: torch.dtype, n_layers: int = 4) -> nn.Module:
    """A tiny model with its own random unembedding (varied greedy outputs), in ``dtype``."""
    model: Any = build_tiny_model(family, n_layers=n_layers, seed=seed % 997)
    out = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    out.weight = nn.Parameter(torch.randn(out.weight.shape, generator=g) / out.weight.shape[1] ** 0.5)
    return model.to(dtype).eval()


def mtp_of(model: nn.Module, n_heads: int, seed: int, **options: Any) -> MTPModel:
    return MTPModel(model, n_heads=n_heads, seed=seed, **options).to(next(model.parameters()).dtype).eval()


def prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def random_tree(rng: random.Random, depth: int) -> Tree:
    return Tree.cartesian([rng.randint(1, 3) for _ in range(depth)])


class NoisyDrafter:
    """Drafts the reference continuation at rank 0 with probability ``p``, a wrong token otherwise."""

    def __init__(self, reference: list[int], p: float, rng: random.Random) -> None:
        self.right = ReferenceDrafter(reference)
        self.p, self.rng = p, rng

    def __call__(self, tokens: Any, head_candidates: list[list[int]]) -> list[list[int]]:
        rows = self.right(tokens, head_candidates)
        return [[r[0] if self.rng.random() < self.p else (r[0] + 1) % 256, *r[1:]] for r in rows]


# --------------------------------------------------------------------------------------------------
# Pieces


def test_tree_paths_walk_from_the_root() -> None:
    rng = random.Random(fresh_seed())
    tree = random_tree(rng, 3)
    width = tree.size + rng.randint(0, 3)
    paths = tree_paths(tree, width)
    for i in range(width):
        if i >= tree.size:
            assert paths[i, 0] == i
            continue
        node = i
        for d in range(tree.depths[i], -1, -1):
            assert paths[i, d] == node and tree.depths[node] == d
            node = tree.parents[node]
    with pytest.raises(ValueError, match="smaller than the tree"):
        tree_paths(tree, tree.size - 1)


@pytest.mark.parametrize("window", [None, 5])
def test_slot_table_matches_brute_force(window: int | None) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    tree = random_tree(rng, 3)
    width = tree.size + rng.randint(0, 2)
    start, length = rng.randint(0, 20), 64
    depth = torch.tensor([*tree.depths, *[0] * (width - tree.size)])
    paths = tree_paths(tree, width)
    table = slot_table(torch.tensor([start]), depth, paths, length, MaskLayout(per_type=False, window=window))
    assert isinstance(table, torch.Tensor)
    for i in range(width):
        p = start + int(depth[i])
        for j in range(length):
            want = -1
            if j <= p and (window is None or p - j < window):
                want = j if j < start else start + int(paths[i, j - start])
            assert table[0, 0, i, j] == want, f"query {i}, position {j}, seed {seed}"
    chain = slot_table(torch.tensor([start]), torch.arange(4), None, length, MaskLayout(per_type=False, window=None))
    assert isinstance(chain, torch.Tensor)
    for i in range(4):
        assert chain[0, 0, i].tolist() == [*range(start + i + 1), *[-1] * (length - start - i - 1)], f"seed {seed}"


def test_invariant_attention_equals_plain_attention() -> None:
    """With keys already in order (slot = position) it is causal softmax attention with grouped heads."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    h, kv, s, length, d = 6, 2, 5, 16, 8
    q = torch.randn(1, h, s, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, kv, length, d, generator=g, dtype=torch.float64) for _ in range(2))
    start = 7
    table = slot_table(torch.tensor([start]), torch.arange(s), None, length, MaskLayout(per_type=False, window=None))
    out, _ = invariant_attention(nn.Module(), q, k, v, table, scaling=0.3)
    for head in range(h):
        kh, vh = k[0, head // (h // kv)], v[0, head // (h // kv)]
        for i in range(s):
            w = torch.softmax(q[0, head, i] @ kh[:start + i + 1].T * 0.3, dim=-1)
            assert torch.allclose(out[0, i, head], w @ vh[:start + i + 1]), f"head {head}, query {i}, seed {seed}"
    with pytest.raises(ValueError, match="slot table"):
        invariant_attention(nn.Module(), q, k, v, None, scaling=0.3)


# --------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("family", FAMILIES)
def test_invariant_decoding_equals_greedy_in_float64(family: str) -> None:
    """The invariant path computes the model: in float64 its greedy and speculative outputs (chains and
    trees, drafts right or not) equal the plain decoder's greedy output."""
    seed = fresh_seed()
    rng = random.Random(seed)
    n_layers = 6 if family == "gemma" else 4  # gemma: sliding layers with window 64, crossed below
    mtp = mtp_of(tiny(family, seed, torch.float64, n_layers), 3, seed)
    ids = prompt(seed, 50)
    ref = greedy_generate(mtp, ids, 30)
    width = 10
    for tree in (Tree.chain(0), Tree.chain(2), Tree.cartesian([2, 3])):
        dec = SpeculativeDecoder(mtp, tree=tree, max_length=100, invariant=True, width=width)
        drafter = NoisyDrafter(ref.tokens[0].tolist(), 0.7, rng) if tree.depth else None
        out = dec.generate(ids, 30, drafter=drafter)
        assert out.tokens.tolist() == ref.tokens.tolist(), f"{family} {tree.choices}, seed {seed}"
        assert sum(out.accepted_lengths) == 30, f"seed {seed}"


@pytest.mark.parametrize("family", ["llama", "gemma"])
@torch.no_grad()
def test_logits_of_a_position_do_not_depend_on_the_pass_in_bfloat16(family: str) -> None:
    """A node's head-1 logits in a pass of a random chain or tree equal, bit for bit, those of one-token
    greedy passes (of the same width) over its path; random contexts."""
    seed = fresh_seed()
    rng = random.Random(seed)
    width = 13  # room for the largest random tree below
    mtp = mtp_of(tiny(family, seed, torch.bfloat16, 6 if family == "gemma" else 4), width, seed)  # deep chains
    greedy = SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=160, invariant=True, width=width)
    for trial in range(3):
        tree = Tree.chain(rng.randint(1, width - 1)) if trial == 0 else random_tree(rng, rng.randint(1, 2))
        verifier = SpeculativeDecoder(mtp, tree=tree, max_length=160, invariant=True, width=width)
        ids = prompt(seed + trial, rng.randint(5, 90))
        start = ids.shape[1]
        tokens = [rng.randrange(256) for _ in range(tree.size)]
        for dec in (greedy, verifier):
            dec._verifier.prefill(ids)
        together = verifier._verifier.head1_logits(start, tokens)  # type: ignore[union-attr]
        for node in rng.sample(range(tree.size), min(tree.size, 4)):
            path = [node]
            while tree.parents[path[-1]] >= 0:
                path.append(tree.parents[path[-1]])
            for d, n in enumerate(path[::-1]):
                alone = greedy._verifier.head1_logits(start + d, [tokens[n]])  # type: ignore[union-attr]
            msg = f"{family}, tree {tree.choices}, node {node}, context {start}, seed {seed}"
            assert torch.equal(together[node], alone[0]), msg


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_speculative_equals_greedy_in_bfloat16(family: str) -> None:
    """With invariant=True, speculation (chains and trees, drafts right 80% of the time, so positions
    are verified at every depth) gives the invariant greedy output token for token."""
    seed = fresh_seed()
    rng = random.Random(seed)
    mtp = mtp_of(tiny(family, seed, torch.bfloat16, 6 if family == "gemma" else 4), 4, seed)
    width = 16
    greedy = SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=200, invariant=True, width=width)
    for trial in range(2):
        ids = prompt(seed + trial, rng.randint(10, 70))
        ref = greedy.generate(ids, 48)
        for tree in (Tree.chain(3), Tree.cartesian([3, 2, 1]), Tree.chain(1), DynamicTree(8, 3, k=3)):
            dec = SpeculativeDecoder(mtp, tree=tree, max_length=200, invariant=True, width=width)
            out = dec.generate(ids, 48, drafter=NoisyDrafter(ref.tokens[0].tolist(), 0.8, rng))
            msg = f"{family}, tree {tree}, prompt {ids.shape[1]}, seed {seed}"
            assert out.tokens.tolist() == ref.tokens.tolist(), msg
            assert max(out.accepted_lengths) > 1, msg


def test_invalid_invariant_arguments() -> None:
    seed = fresh_seed()
    mtp = mtp_of(tiny("llama", seed, torch.float32), 3, seed)
    with pytest.raises(ValueError, match="invariant=True"):
        SpeculativeDecoder(mtp, max_length=64, width=4)
    with pytest.raises(ValueError, match="static cache"):
        SpeculativeDecoder(mtp, max_length=64, invariant=True, static_cache=False)
    with pytest.raises(ValueError, match="width"):
        SpeculativeDecoder(mtp, tree=Tree.cartesian([3, 2]), max_length=64, invariant=True, width=4)
    dec = SpeculativeDecoder(mtp, tree=Tree.chain(1), max_length=40, invariant=True, width=8)
    with pytest.raises(ValueError, match="needs 41 positions"):
        dec.generate(prompt(seed, 20), 14)
    assert mtp.backbone.config._attn_implementation != "mtp_invariant"  # the model keeps its attention


# --------------------------------------------------------------------------------------------------
# The GPU's failure mode, emulated on the CPU


class ShapeDependentKernels(TorchFunctionMode):
    """CPU kernels that round as GPU kernels chosen by shape do.

    A matmul (``F.linear``, ``matmul``) splits its reduction into chunks whose size depends on how
    many rows it computes (as cuBLAS picks split-K and tiles by shape), each partial rounded to the
    input dtype. SDPA sums its values in blocks of 4 *cache slots*, each block rounded (as a fused
    kernel's key blocks). On the CPU's own kernels a position's logits happen not to depend on the
    pass (see the module doc); under this mode the plain decoder's do, the invariant decoder's must not.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = self.matmul(x, w.t())
            return out if bias is None else out + bias
        if func in (torch.matmul, torch.Tensor.__matmul__):
            return self.matmul(args[0], args[1])
        if func is F.scaled_dot_product_attention:
            return self.sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        k = a.shape[-1]
        rows = a.numel() // k
        chunk = -(-k // (1 + rows.bit_length() % 3))  # 1, 2 or 3 partial sums, by the number of rows
        out = None
        for i in range(0, k, chunk):
            part = torch.matmul(a[..., i:i + chunk].float(), b[..., i:i + chunk, :].float()).to(a.dtype)
            out = part if out is None else out + part
        assert out is not None
        return out

    @staticmethod
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        assert attn_mask is not None and not is_causal, "the static decoder passes its own masks"
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        p = torch.softmax(scores, dim=-1).to(q.dtype)
        out = None
        for i in range(0, k.shape[2], 4):
            part = torch.matmul(p[..., i:i + 4].float(), v[..., i:i + 4, :].float()).to(q.dtype)
            out = part if out is None else out + part
        assert out is not None
        return out


@torch.no_grad()
def _logits_by_node(dec: SpeculativeDecoder, start: int, tokens: list[int], tree: Tree) -> torch.Tensor:
    """Head 1's logits ``[tree.size, V]`` of one pass over the tree's tokens (plain or invariant decoder)."""
    verifier: Any = dec._verifier
    if hasattr(verifier, "head1_logits"):
        return verifier.head1_logits(start, tokens)
    n = len(tokens)
    begin = torch.tensor([start])
    verifier.cache.set_slots(begin + torch.arange(n))
    depth = torch.tensor(tree.depths)
    mask = tree_masks(begin, depth, tree.ancestors(), verifier.buffer_len, verifier.layout, verifier.dtype)
    out = verifier.view(torch.tensor([tokens]), attention_mask=mask, position_ids=(begin + depth)[None],
                        cache=verifier.cache, use_cache=True, return_logits=False)
    return verifier.view.unembed_states(out.states[:1, 0])[0]


@pytest.mark.parametrize("family", ["llama", "gemma"])
@torch.no_grad()
def test_invariance_survives_shape_dependent_kernels(family: str) -> None:
    """Under :class:`ShapeDependentKernels`, nodes of a chain or a tree verified together get other logits
    than one-token passes in the plain decoder, and bit-identical ones in the invariant decoder (whose
    greedy passes have the tree's width; head 1 unembedded alone)."""
    seed = fresh_seed()
    rng = random.Random(seed)
    mtp = mtp_of(tiny(family, seed, torch.bfloat16, 6 if family == "gemma" else 4), 4, seed)
    ids = prompt(seed, rng.randint(20, 60))
    start = ids.shape[1]
    for tree in (Tree.chain(3), Tree.cartesian([3, 2])):
        tokens = [rng.randrange(256) for _ in range(tree.size)]
        differ = {}
        for invariant in (False, True):
            kw: dict[str, Any] = {"invariant": True, "width": tree.size} if invariant else {"cuda_graphs": False}
            alone_dec = SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=128, **kw)
            together_dec = SpeculativeDecoder(mtp, tree=tree, max_length=128, **kw)
            with ShapeDependentKernels():
                for dec in (alone_dec, together_dec):
                    dec._verifier.prefill(ids)
                together = _logits_by_node(together_dec, start, tokens, tree)
                n_differ = 0
                for node in range(tree.size):
                    path = [node]
                    while tree.parents[path[-1]] >= 0:
                        path.append(tree.parents[path[-1]])
                    for d, n in enumerate(path[::-1]):
                        alone = _logits_by_node(alone_dec, start + d, [tokens[n]], Tree.chain(0))[0]
                    n_differ += not torch.equal(alone, together[node])
            differ[invariant] = n_differ
        msg = f"{family}, tree {tree.choices}: nodes whose logits differ {differ}, seed {seed}"
        assert differ[False] > 0 and differ[True] == 0, msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_captured_invariant_decoding_on_cuda_equals_greedy_in_bfloat16(family: str) -> None:
    """On the GPU, with every step a captured CUDA graph: speculation (chains and trees) equals the invariant
    greedy decode token for token, and a chain's logits equal one-token passes bit for bit."""
    seed = fresh_seed()
    rng = random.Random(seed)
    model = tiny(family, seed, torch.bfloat16, 6 if family == "gemma" else 4).cuda()
    mtp = mtp_of(model, 4, seed).cuda()
    width = 16
    greedy = SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=200, invariant=True, width=width)
    assert greedy.uses_cuda_graphs
    ids = prompt(seed, rng.randint(10, 70)).cuda()
    ref = greedy.generate(ids, 48)
    for tree in (Tree.chain(3), Tree.cartesian([3, 2, 1]), DynamicTree(8, 3, k=3)):
        dec = SpeculativeDecoder(mtp, tree=tree, max_length=200, invariant=True, width=width)
        out = dec.generate(ids, 48, drafter=NoisyDrafter(ref.tokens[0].tolist(), 0.8, rng))
        assert out.tokens.tolist() == ref.tokens.tolist(), f"{family}, tree {tree}, seed {seed}"
    chain = SpeculativeDecoder(mtp, tree=Tree.chain(3), max_length=200, invariant=True, width=width)
    with torch.no_grad():
        for dec in (greedy, chain):
            dec._verifier.prefill(ids)
        tokens = ref.tokens[0, ids.shape[1]:ids.shape[1] + 4].tolist()
        together = chain._verifier.head1_logits(ids.shape[1], tokens)  # type: ignore[union-attr]
        for d, t in enumerate(tokens):
            alone = greedy._verifier.head1_logits(ids.shape[1] + d, [t])  # type: ignore[union-attr]
            assert torch.equal(together[d], alone[0]), f"{family}, position {d}, seed {seed}"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_compiled_steps_keep_speculation_equal_to_greedy_in_bfloat16(family: str, device: str) -> None:
    """``compile_step=True`` (Inductor's fused kernels; captured as CUDA graphs on the GPU): a compiled
    invariant tree decoder still gives the compiled invariant greedy decoder's output token for token,
    and a compiled plain decoder the eager one's tokens (Gemma in float64, where rounding cannot flip
    them)."""
    seed = fresh_seed()
    rng = random.Random(seed)
    mtp = mtp_of(tiny(family, seed, torch.bfloat16, 6 if family == "gemma" else 4), 3, seed).to(device)
    ids = prompt(seed, rng.randint(10, 40)).to(device)
    greedy = SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=120, invariant=True, width=10, compile_step=True)
    assert greedy.uses_cuda_graphs == (device == "cuda")
    ref = greedy.generate(ids, 32)
    tree = Tree.cartesian([3, 2])
    dec = SpeculativeDecoder(mtp, tree=tree, max_length=120, invariant=True, width=10, compile_step=True)
    out = dec.generate(ids, 32, drafter=NoisyDrafter(ref.tokens[0].tolist(), 0.8, rng))
    msg = f"{family}, {device}, prompt {ids.shape[1]}, seed {seed}"
    assert dec._verifier.compiled and out.tokens.tolist() == ref.tokens.tolist(), msg  # type: ignore[union-attr]
    assert max(out.accepted_lengths) > 1, msg
    if family != "gemma":  # one family is enough here: each compilation takes seconds on the CPU
        return
    wide = mtp_of(tiny(family, seed, torch.float64, 6), 3, seed).to(device)
    eager = SpeculativeDecoder(wide, tree=tree, max_length=120).generate(ids, 32)
    fused = SpeculativeDecoder(wide, tree=tree, max_length=120, compile_step=True).generate(ids, 32)
    assert fused.tokens.tolist() == eager.tokens.tolist(), msg
    assert fused.accepted_lengths == eager.accepted_lengths, msg
