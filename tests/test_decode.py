"""mtp_lib.decode and mtp_lib.decode_graph on tiny models of the four families, in float64.

The reference is brute-force greedy decoding: the whole sequence through ``MTPModel`` at every
token, no cache, argmax of head 1. Speculative decoding (static and dynamic cache, chains and
trees, random heads and scripted drafts) must reproduce it token for token.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mtp_lib.decode import (
    DynamicTree,
    GenerateOutput,
    MarginalOracleDrafter,
    PromptLookupDrafter,
    ReferenceDrafter,
    SpeculativeDecoder,
    Tree,
    acceptance_summary,
    greedy_generate,
    hf_generate,
    next_token_model,
    rank_acceptance,
    speculative_generate,
)
from mtp_lib.decode_verify import _accepted_node, _StaticVerifier, _TreeTensors
from mtp_lib.decode_graph import GraphRunner, MaskLayout, StaticKVCache, tree_masks
from mtp_lib.heads import MTPModel
from mtp_lib.models import build_tiny_model
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]
VOCAB = 257
# (family, layers, MTPModel options): gemma with 4 layers slides everywhere (window 64), with 6 the
# last layer (so the heads) is global; prompts + outputs below cross the window.
VARIANTS = [("gpt_neox", 4, {}), ("llama", 4, {}), ("gemma", 4, {}), ("gpt2", 4, {}),
            ("gemma", 6, {"weighted_hidden_states": True}), ("llama", 4, {"weighted_hidden_states": True}),
            ("gpt2", 4, {"head_type": "medusa"}), ("gpt_neox", 4, {"head_type": "medusa"})]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str, seed: int, n_layers: int = 4) -> nn.Module:
    """A tiny float64 model whose greedy outputs vary: its own random (untied) unembedding.

    With the tied embeddings of the tiny llama and gpt2, every token predicts itself and greedy
    decoding repeats one token forever, which would make the comparisons below nearly empty.
    """
    model: Any = build_tiny_model(family, n_layers=n_layers, seed=seed % 997)
    out = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    out.weight = nn.Parameter(torch.randn(out.weight.shape, generator=g) / out.weight.shape[1] ** 0.5)
    return model.double().eval()


def prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def brute_greedy(mtp: MTPModel, ids: torch.Tensor, max_new: int, eos: int | None = None) -> list[int]:
    """Head 1's greedy continuation, recomputing the whole sequence at every token."""
    seq = ids[0].tolist()
    for _ in range(max_new):
        tok = int(mtp(torch.tensor([seq])).logits[0, 0, -1].argmax())
        seq.append(tok)
        if tok == eos:
            break
    return seq


def check_counts(out: GenerateOutput, max_new: int, msg: str) -> None:
    assert out.new_tokens <= max_new, msg
    assert sum(out.accepted_lengths) == out.new_tokens, msg
    assert all(a >= 1 for a in out.accepted_lengths), msg
    assert out.n_forward == len(out.accepted_lengths), msg


class ScriptedDrafter:
    """Drafts with the true greedy token at a random rank of each depth, or nowhere; records what
    each step must then accept (the tree node along the true tokens, as deep as it goes)."""

    def __init__(self, reference: list[int], tree: Tree, rng: random.Random) -> None:
        self.ref, self.tree, self.rng = reference, tree, rng
        self.expected: list[int] = []

    def __call__(self, tokens, head_candidates):
        n, rows, ranks = len(tokens), [], []
        for d, width in enumerate(self.tree.widths, start=1):
            true = self.ref[n + d - 1] if n + d - 1 < len(self.ref) else 0
            row = [(true + 1 + j) % VOCAB for j in range(width)]  # all wrong
            pos = self.rng.choice([*range(width), None])
            if pos is not None:
                row[pos] = true
            rows.append(row)
            ranks.append(pos)
        depth = 0
        while depth < len(ranks) and ranks[depth] is not None and tuple(ranks[:depth + 1]) in self.tree.choices:
            depth += 1
        self.expected.append(depth + 1)
        return rows


# --------------------------------------------------------------------------------------------------
# Trees and masks


def test_tree_structure_and_validation() -> None:
    assert Tree.chain(0).size == 1 and Tree.chain(0).depth == 0 and Tree.chain(0).is_chain
    chain = Tree.chain(3)
    assert chain.choices == ((0,), (0, 0), (0, 0, 0)) and chain.parents == (-1, 0, 1, 2) and chain.is_chain
    torch.testing.assert_close(chain.ancestors(), torch.ones(4, 4, dtype=torch.bool).tril())
    cart = Tree.cartesian([2, 3])
    assert cart.size == 1 + 2 + 6 and cart.widths == (2, 3) and cart.depth == 2 and not cart.is_chain
    for i, c in enumerate(cart.choices, start=1):  # parents point at the prefix, ancestors follow them
        p = cart.parents[i]
        assert (cart.choices[p - 1] if p > 0 else ()) == c[:-1]
        anc = {j for j in range(cart.size) if cart.ancestors()[i, j]}
        assert anc == {0, i} | {cart.choices.index(c[:k]) + 1 for k in range(1, len(c))}
    assert Tree(((1, 0), (1,), (0,))).choices == ((0,), (1,), (1, 0))  # sorted by depth
    bad_choices: list[Any] = [[(0, 0)], [(0,), (0,)], [()], [(-1,)], [(0.5,)]]
    for bad in bad_choices:
        with pytest.raises(ValueError):
            Tree(tuple(bad))
    with pytest.raises(ValueError):
        Tree.chain(-1)
    with pytest.raises(ValueError):
        Tree.cartesian([])


def test_tree_accept_matches_brute_force() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(200):
        tree = Tree.cartesian([rng.randint(1, 3) for _ in range(rng.randint(1, 3))])
        tokens = [rng.randrange(3) for _ in range(tree.size)]
        greedy = [rng.randrange(3) for _ in range(tree.size)]
        path = tree.accept(tokens, greedy)

        def right(i: int) -> bool:  # every node on the way agrees with its parent's greedy choice
            return i == 0 or (right(tree.parents[i]) and tokens[i] == greedy[tree.parents[i]])

        best = max((i for i in range(tree.size) if right(i)), key=lambda i: (tree.depths[i], -i))
        expected = [best]
        while tree.parents[expected[-1]] >= 0:
            expected.append(tree.parents[expected[-1]])
        assert path == expected[::-1], f"seed {seed}"


def test_device_acceptance_matches_tree_accept() -> None:
    """``_accepted_node`` (inside the captured step) picks the node ``Tree.accept`` ends at, on random
    trees (chains, cartesian and calibrated shapes) and random tokens."""
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(300):
        shape = rng.randrange(3)
        if shape == 0:
            tree = Tree.chain(rng.randint(0, 4))
        elif shape == 1:
            tree = Tree.cartesian([rng.randint(1, 3) for _ in range(rng.randint(1, 3))])
        else:
            probs = [[rng.random() for _ in range(4)] for _ in range(3)]
            tree = Tree.from_rank_probs(probs, rng.randint(1, 20))
        tokens = [rng.randrange(3) for _ in range(tree.size)]
        greedy = [rng.randrange(3) for _ in range(tree.size)]
        node = _accepted_node(torch.tensor(tokens), torch.tensor(greedy), _TreeTensors.of(tree, tree.size, torch.device("cpu")))
        assert node.shape == (1,) and node.item() == tree.accept(tokens, greedy)[-1], f"seed {seed}"


def test_tree_tensors_match_the_tree() -> None:
    """The device structure of a step (built by walking parents, as inside a captured dynamic step):
    ancestors as :meth:`Tree.ancestors`, paths as a walk to the root, padding rows on their own."""
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(50):
        tree = Tree.from_rank_probs([[rng.random() for _ in range(3)] for _ in range(3)], rng.randint(0, 20))
        width = tree.size + rng.randint(0, 3)
        nodes = _TreeTensors.of(tree, width, torch.device("cpu"))
        ancestors = torch.eye(width, dtype=torch.bool)
        ancestors[:tree.size, :tree.size] = tree.ancestors()
        paths = torch.zeros(width, width, dtype=torch.long)
        for i in range(width):
            node = i
            while node >= 0:
                paths[i, tree.depths[node] if node < tree.size else 0] = node
                node = tree.parents[node] if node < tree.size else -1
        msg = f"{tree.choices}, width {width}, seed {seed}"
        assert torch.equal(nodes.ancestors, ancestors) and torch.equal(nodes.paths, paths), msg
        assert nodes.depths.tolist() == [*tree.depths, *[0] * (width - tree.size)], msg
        assert nodes.parents.tolist() == [0, *tree.parents[1:], *range(tree.size, width)], msg


def _dynamic_run(seed: int, spec: DynamicTree) -> tuple[MTPModel, torch.Tensor, Any, list[tuple[Any, Tree]]]:
    # a speculative run with a dynamic tree on a fresh tiny model, recording each step's probabilities and tree
    mtp = MTPModel(tiny("llama", seed), n_heads=3, seed=seed)
    ids = prompt(seed, 20)
    seen: list[tuple[list[list[float]], Tree]] = []

    class Recording(DynamicTree):
        def build(self, probs: Any) -> Tree:
            tree = super().build(probs)
            seen.append((probs, tree))
            return tree

    out = speculative_generate(mtp, ids, 24, tree=Recording(spec.n_nodes, spec.depth, spec.k))
    return mtp, ids, out, seen


def test_dynamic_tree_is_built_from_the_heads_probabilities_at_each_step() -> None:
    """Each step's tree is ``Tree.from_rank_probs`` of the heads' own top-k probabilities at the context
    end it drafts from (checked against a full forward pass there), and trees change from step to step
    (on a random tiny model the heads' ranks can stay put for a whole run: then the next seeds are tried)."""
    seed = fresh_seed()
    spec = DynamicTree(5, 2, k=3)
    mtp, ids, out, seen = _dynamic_run(seed, spec)
    assert out.tokens[0].tolist() == brute_greedy(mtp, ids, 24), f"seed {seed}"
    context = out.tokens[0].tolist()
    end = ids.shape[1]  # context end of the first step: the prompt's last token
    with torch.no_grad():
        for step, (probs, tree) in enumerate(seen):
            logits = mtp(torch.tensor([context[:end]])).logits[1:, 0, -1]  # heads 2, 3 at that end
            want = logits.softmax(dim=-1).topk(spec.k, dim=-1).values
            torch.testing.assert_close(torch.tensor(probs, dtype=want.dtype), want, atol=1e-9, rtol=0,
                                       msg=f"step {step}, seed {seed}")
            assert tree == Tree.from_rank_probs(probs, spec.n_nodes), f"step {step}, seed {seed}"
            end += out.accepted_lengths[step + 1]
    runs = [seen]
    while len({tree for _, tree in runs[-1]}) == 1 and len(runs) < 3:
        runs.append(_dynamic_run(seed + len(runs), spec)[3])
    assert len({tree for _, tree in runs[-1]}) > 1, f"the tree never changed, seeds {seed}..{seed + 2}"


def test_tree_from_sorted_rank_probs_orders_ties_as_the_full_heap() -> None:
    """Rows sorted best first (the heads' top-k probabilities) take a lazier path through the heap; with
    ties (0, 1/2, 1) it must pick the same paths: the first ``n`` of every path ordered by product
    (multiplied depth by depth, as the heap does), then by the path itself."""
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(300):
        depth, k = rng.randint(1, 3), rng.randint(1, 4)
        probs = [sorted((rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(k)), reverse=True)
                 for _ in range(depth)]
        paths = [p for d in range(1, depth + 1) for p in itertools.product(range(k), repeat=d)]

        def key(path: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
            neg = -1.0
            for d, r in enumerate(path):
                neg *= probs[d][r]
            return neg, path

        n = rng.randint(0, len(paths))
        assert Tree.from_rank_probs(probs, n) == Tree(tuple(sorted(paths, key=key)[:n])), f"{probs}, {n}, seed {seed}"


def test_dynamic_tree_validation() -> None:
    for bad in [dict(n_nodes=0, depth=1), dict(n_nodes=2, depth=3), dict(n_nodes=13, depth=2, k=3),
                dict(n_nodes=3, depth=1, k=True)]:
        with pytest.raises(ValueError):
            DynamicTree(**bad)
    mtp = MTPModel(tiny("llama", 1), n_heads=3)
    with pytest.raises(ValueError, match="static cache"):
        SpeculativeDecoder(mtp, tree=DynamicTree(4, 2), static_cache=False)
    with pytest.raises(ValueError, match="heads"):
        SpeculativeDecoder(mtp, tree=DynamicTree(4, 3))
    assert DynamicTree(12, 2, k=3).template.size == 13 and DynamicTree(12, 2, k=3).template.depth == 2


def test_tree_from_rank_probs_is_the_most_probable_set() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    probs = [[rng.random() for _ in range(4)] for _ in range(3)]
    paths = [p for d in range(1, 4) for p in itertools.product(range(4), repeat=d)]
    score = {p: math.prod(probs[i][r] for i, r in enumerate(p)) for p in paths}
    for n in (0, 1, 5, 17, len(paths)):
        tree = Tree.from_rank_probs(probs, n)
        assert set(tree.choices) == set(sorted(paths, key=lambda p: -score[p])[:n]), f"n={n}, seed {seed}"
    with pytest.raises(ValueError):
        Tree.from_rank_probs([[1.5]], 2)


@pytest.mark.parametrize("window", [None, 5])
def test_tree_masks_match_brute_force(window: int | None) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    tree = Tree.cartesian([rng.randint(1, 3), rng.randint(1, 2)])
    size, max_len = tree.size, 40
    start = rng.randint(0, max_len - size)
    anc = tree.ancestors()
    masks = tree_masks(torch.tensor([start]), torch.tensor(tree.depths), anc, max_len,
                       MaskLayout(per_type=window is not None, window=window), torch.float64)
    full = masks["full_attention"] if isinstance(masks, dict) else masks
    assert isinstance(masks, dict) == (window is not None)
    for i in range(size):
        q_pos = start + tree.depths[i]
        for s in range(max_len):
            ok = s < start or (start <= s < start + size and bool(anc[i, s - start]))
            assert (full[0, 0, i, s] == 0) == ok, f"full mask [{i}, {s}], seed {seed}"
            if window is not None:
                k_pos = s if s < start else start + tree.depths[min(s - start, size - 1)]
                near = ok and q_pos - k_pos < window
                sliding = masks["sliding_attention"] if isinstance(masks, dict) else masks
                assert (sliding[0, 0, i, s] == 0) == near, f"sliding [{i}, {s}], seed {seed}"


def test_static_kv_cache_writes_and_moves_like_a_list() -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cache = StaticKVCache(n_layers=3, max_len=12)
    ref: list[list[list[Any]]] = [[[None] * 12 for _ in range(3)] for _ in range(2)]  # [k/v][layer][slot]
    for start, n in [(0, 5), (5, 3), (4, 6)]:
        cache.set_slots(torch.arange(start, start + n))
        for layer in range(3):
            k, v = torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)
            keys, values = cache.update(k, v, layer)
            assert keys.shape == (1, 2, 12, 4), f"seed {seed}"
            for i in range(n):
                ref[0][layer][start + i], ref[1][layer][start + i] = k[0, :, i], v[0, :, i]
    src, dst = [4, 7, 9, 2], [4, 5, 6, 7]  # reads before writes: slot 7 goes to 5 and gets 2
    cache.move(torch.tensor(src), torch.tensor(dst))
    moved = dict(zip(dst, src))
    ref = [[[layer[moved.get(j, j)] for j in range(12)] for layer in kv] for kv in ref]
    assert cache.kv is not None
    for kv in range(2):
        for layer in range(3):
            for j in range(10):
                torch.testing.assert_close(cache.kv[kv, layer, 0, :, j], ref[kv][layer][j], msg=f"seed {seed}")
    with pytest.raises(ValueError, match="shape"):
        cache.update(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4), 0)


def test_graph_runner_runs_eagerly_on_buffers() -> None:
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return x * 2

    runner = GraphRunner(fn, [torch.zeros(3)], cuda_graph=False)
    out = runner(torch.tensor([1.0, 2.0, 3.0]))
    assert not runner.captured and calls[0] is runner.inputs[0]
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0, 6.0]))
    with pytest.raises(ValueError, match="CUDA"):
        GraphRunner(fn, [torch.zeros(3)], cuda_graph=True)


class HostTensorSpy(TorchDispatchMode):
    """Records every operation that receives a CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        flat, _ = tree_flatten((args, kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in flat):
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family,n_layers,options", VARIANTS)
def test_step_is_capturable(family: str, n_layers: int, options: dict) -> None:
    """With every tensor on the meta device, a step, a cache compaction and a padded prompt pass run
    through: they never read a value on the host (``.item()``, ``nonzero``, branches on tensor
    values all fail on meta), and no operation sees a host tensor: what CUDA graph capture forbids."""
    model = build_tiny_model(family, n_layers=n_layers)
    mtp = MTPModel(model, n_heads=3, **options).to("meta")
    tree = Tree.cartesian([2, 2])
    decoder = SpeculativeDecoder(mtp, tree=tree, max_length=100, cuda_graphs=True, pad_prompts=True)  # eager here
    verifier = decoder._verifier
    assert isinstance(verifier, _StaticVerifier) and verifier.commit_runner is not None
    assert sorted(verifier.prompt_runners) == [64, 100]
    spy = HostTensorSpy()
    with torch.no_grad():
        buffers = [runner.inputs[0] for runner in
                   (verifier.step_runner, verifier.commit_runner, verifier.prompt_runners[64])]
        with spy:  # the captured functions themselves, on their device buffers
            out = verifier._step(buffers[0])
            verifier._commit(buffers[1])
            first = verifier._padded_prompt(buffers[2])
    assert spy.hits == [], f"host tensors in the step: {sorted(set(spy.hits))}"
    # head 1's greedy token per node, the accepted node, heads 2-3's top-2 there (not at every node)
    assert out.device.type == "meta" and out.shape == (tree.size + 1 + 2 * 2,)
    assert first.device.type == "meta" and first.shape == (1 + 1 + 2 * 2,)
    assert not decoder.uses_cuda_graphs
    dynamic = SpeculativeDecoder(mtp, tree=DynamicTree(5, 2, k=2), max_length=100, cuda_graphs=True)._verifier
    with torch.no_grad(), spy:  # the tree's structure comes in with the tokens and is walked on the device
        out = dynamic._step(dynamic.step_runner.inputs[0])
    assert spy.hits == [], f"host tensors in the dynamic step: {sorted(set(spy.hits))}"
    assert out.shape == (6 + 1 + 2 * 2 * 2,)  # and the heads' probabilities of their drafts


# --------------------------------------------------------------------------------------------------
# Lossless decoding


@pytest.mark.parametrize("family,n_layers,options", VARIANTS)
def test_greedy_matches_brute_force(family: str, n_layers: int, options: dict) -> None:
    seed = fresh_seed()
    mtp = MTPModel(tiny(family, seed, n_layers), n_heads=2, seed=seed, **options)
    ids = prompt(seed, 40)
    ref = brute_greedy(mtp, ids, 40)
    for static in (False, True):
        out = greedy_generate(mtp, ids, 40, static_cache=static)
        assert out.tokens[0].tolist() == ref, f"static_cache={static}, seed {seed}"
        assert out.accepted_lengths == [1] * 40 and math.isclose(out.tau, 1.0), f"seed {seed}"


@pytest.mark.parametrize("family,n_layers,options", VARIANTS)
def test_speculative_with_random_heads_equals_greedy(family: str, n_layers: int, options: dict) -> None:
    seed = fresh_seed()
    model = tiny(family, seed, n_layers)
    ids = prompt(seed, 34)
    for n_heads in (2, 3, 4):
        mtp = MTPModel(model, n_heads=n_heads, seed=seed + n_heads, **options)
        ref = brute_greedy(mtp, ids, 36)
        msg = f"{n_heads} heads, seed {seed}"
        static = speculative_generate(mtp, ids, 36)
        dynamic = speculative_generate(mtp, ids, 36, static_cache=False)
        tree = speculative_generate(mtp, ids, 36, tree=Tree.cartesian([3] + [2] * (n_heads - 2)))
        chosen = speculative_generate(mtp, ids, 36, tree=DynamicTree(3 * (n_heads - 1), n_heads - 1, k=3))
        for name, out in [("static", static), ("dynamic", dynamic), ("tree", tree), ("dynamic tree", chosen)]:
            assert out.tokens[0].tolist() == ref, f"{name}, {msg}"
            check_counts(out, 36, f"{name}, {msg}")
        assert static.accepted_lengths == dynamic.accepted_lengths, f"static vs dynamic cache, {msg}"


@pytest.mark.parametrize("family", FAMILIES)
def test_perfect_drafts_are_all_accepted(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family, seed)
    ids = prompt(seed, 30)
    mtp = MTPModel(model, n_heads=4, seed=seed)
    ref = brute_greedy(mtp, ids, 49)  # the prompt's pass gives 1, then 48 = 2 x 24 = 3 x 16 = 4 x 12
    for tree in [Tree.chain(1), Tree.chain(2), Tree.chain(3), Tree.cartesian([2, 2, 3])]:
        for static in (True, False) if tree.is_chain else (True,):
            out = speculative_generate(mtp, ids, 49, tree=tree, drafter=ReferenceDrafter(ref), static_cache=static)
            msg = f"{tree.choices}, static_cache={static}, seed {seed}"
            assert out.tokens[0].tolist() == ref, msg
            check_counts(out, 49, msg)
            assert out.accepted_lengths == [1] + [tree.depth + 1] * (48 // (tree.depth + 1)), msg
            assert out.tau == tree.depth + 1, msg
            summary = acceptance_summary([out, out])
            assert summary["tau"] == tree.depth + 1, msg
            assert summary["histogram"] == {tree.depth + 1: 96 // (tree.depth + 1)}, msg
            assert summary["new_tokens"] == 98 and summary["forward_passes"] == 2 * (1 + 48 // (tree.depth + 1)), msg


@pytest.mark.parametrize("family,n_layers", [("gpt_neox", 4), ("llama", 4), ("gemma", 6), ("gpt2", 4)])
def test_scripted_drafts_accept_exactly_the_right_prefix(family: str, n_layers: int) -> None:
    """Drafts right up to a random depth (at random ranks of the tree): the accepted lengths must be
    exactly the planned ones, paths through any branch are moved into place in the cache, and the
    output stays greedy."""
    seed = fresh_seed()
    model = tiny(family, seed, n_layers)
    ids = prompt(seed, 30)
    mtp = MTPModel(model, n_heads=4, seed=seed)
    ref = brute_greedy(mtp, ids, 60)
    rng = random.Random(seed)
    for tree in [Tree.chain(3), Tree.cartesian([2, 3, 2]), Tree.from_rank_probs([[.6, .3, .1], [.5, .2], [.4, .3]], 9)]:
        drafter = ScriptedDrafter(ref, tree, rng)
        out = speculative_generate(mtp, ids, 60, tree=tree, drafter=drafter)
        msg = f"{tree.choices}, seed {seed}"
        assert out.tokens[0].tolist() == ref, msg
        check_counts(out, 60, msg)
        assert out.accepted_lengths[1:-1] == drafter.expected[:-1], msg
        assert out.accepted_lengths[-1] <= drafter.expected[-1], msg


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_and_max_new_tokens(family: str) -> None:
    """EOS anywhere (the first token, inside a draft, the bonus token) stops the output right after
    its first occurrence, as greedy decoding does; max_new_tokens is never exceeded."""
    seed = fresh_seed()
    model = tiny(family, seed)
    ids = prompt(seed, 25)
    mtp = MTPModel(model, n_heads=4, seed=seed)
    ref = brute_greedy(mtp, ids, 30)
    new = ref[25:]
    for j in range(9):  # eos = the j-th new token: positions 0..8 cover the root, drafts and bonus tokens
        eos = new[j]
        expected = ref[:25 + new.index(eos) + 1]
        msg = f"eos at {j}, seed {seed}"
        greedy = greedy_generate(mtp, ids, 30, eos_token_id=eos)
        assert greedy.tokens[0].tolist() == expected and greedy.stopped_by_eos, msg
        for drafter in (ReferenceDrafter(ref), None):
            out = speculative_generate(mtp, ids, 30, eos_token_id=[eos, VOCAB + 5], drafter=drafter)
            assert out.tokens[0].tolist() == expected and out.stopped_by_eos, msg
            check_counts(out, 30, msg)
    for max_new in (0, 1, 2, 3, 5, 8):
        for tree in (Tree.chain(3), Tree.cartesian([2, 2])):
            out = speculative_generate(mtp, ids, max_new, tree=tree, drafter=ReferenceDrafter(ref))
            assert out.tokens[0].tolist() == ref[:25 + max_new], f"max_new_tokens={max_new}, seed {seed}"
            check_counts(out, max_new, f"max_new_tokens={max_new}, seed {seed}")
            assert not out.stopped_by_eos


@pytest.mark.parametrize("family,n_layers", [("gemma", 4), ("gpt2", 4)])
def test_decoder_reused_across_prompts(family: str, n_layers: int) -> None:
    """One static decoder, prompts of changing length (padded to 64 or 128 tokens, as under CUDA graphs):
    stale cache slots of earlier prompts and padding never leak."""
    seed = fresh_seed()
    mtp = MTPModel(tiny(family, seed, n_layers), n_heads=3, seed=seed)
    decoder = SpeculativeDecoder(mtp, tree=Tree.cartesian([2, 2]), max_length=128, pad_prompts=True)
    assert isinstance(decoder._verifier, _StaticVerifier) and sorted(decoder._verifier.prompt_runners) == [64, 128]
    for i, n in enumerate([60, 8, 33, 1, 70]):
        ids = prompt(seed + i, n)
        drafter = ReferenceDrafter(brute_greedy(mtp, ids, 40)) if i % 2 else None
        out = decoder.generate(ids, 40, drafter=drafter)
        assert out.tokens[0].tolist() == brute_greedy(mtp, ids, 40), f"prompt {i} ({n} tokens), seed {seed}"
    with pytest.raises(ValueError, match="max_length"):
        decoder.generate(prompt(seed, 100), 40)


def test_invalid_arguments() -> None:
    mtp = MTPModel(tiny("llama", 1), n_heads=2)
    ids = prompt(1, 5)
    for bad in [torch.zeros(2, 5, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), ids.float(),
                torch.full((1, 3), VOCAB)]:
        with pytest.raises(ValueError, match="input_ids"):
            speculative_generate(mtp, bad, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(mtp, ids, -1)
    with pytest.raises(ValueError, match="heads"):
        speculative_generate(mtp, ids, 3, tree=Tree.chain(2))
    with pytest.raises(ValueError, match="static_cache"):
        speculative_generate(mtp, ids, 3, tree=Tree.cartesian([2]), static_cache=False)
    with pytest.raises(ValueError, match="eos_token_id"):
        speculative_generate(mtp, ids, 3, eos_token_id="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        SpeculativeDecoder(mtp, max_length=2)
    with pytest.raises(ValueError, match="positions"):
        SpeculativeDecoder(MTPModel(tiny("gpt2", 1), n_heads=2), max_length=5000)


# --------------------------------------------------------------------------------------------------
# Oracle, calibration and transformers baselines


@torch.no_grad()
def test_marginal_oracle_drafts_the_brute_force_marginal() -> None:
    seed = fresh_seed()
    model = tiny("llama", seed)
    ids = prompt(seed, 12)
    tokens = ids[0].tolist()  # the last one plays the root, which the oracle must ignore
    ctx = torch.tensor([tokens[:-1]])
    p1 = model(ctx).logits[0, -1].softmax(-1)
    ext = torch.cat([ctx.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    p2 = (p1[:, None] * model(ext).logits[:, -1].softmax(-1)).sum(0)
    drafts = MarginalOracleDrafter(model, top_p=1.0)(tokens, [[0, 0, 0]])
    assert drafts == [p2.topk(3).indices.tolist()], f"seed {seed}"
    assert MarginalOracleDrafter(model, top_p=1.0)(tokens[:-1] + [(tokens[-1] + 1) % VOCAB], [[0]]) == [drafts[0][:1]]
    # verified by the model itself (Medusa head 1 is the model): lossless like any drafter
    mtp = MTPModel(model, n_heads=2, head_type="medusa")
    out = speculative_generate(mtp, ids, 12, drafter=MarginalOracleDrafter(model, top_p=0.9))
    assert out.tokens[0].tolist() == brute_greedy(mtp, ids, 12), f"seed {seed}"


@torch.no_grad()
def test_rank_acceptance_matches_brute_force() -> None:
    seed = fresh_seed()
    mtp = MTPModel(tiny("gpt_neox", seed), n_heads=3, seed=seed)
    outs = [greedy_generate(mtp, prompt(seed + i, 10 + i), 15) for i in range(2)]
    probs = rank_acceptance(mtp, outs, k=4)
    hits = torch.zeros(2, 4, dtype=torch.float64)
    counts = torch.zeros(2)
    for out in outs:
        logits = mtp(out.tokens).logits[:, 0]
        seq = out.tokens[0]
        for n in (2, 3):
            for t in range(out.prompt_length - 1, len(seq) - n):
                rank = int((logits[n - 1, t] > logits[n - 1, t, seq[t + n]]).sum())
                counts[n - 2] += 1
                if rank < 4:
                    hits[n - 2, rank] += 1
    torch.testing.assert_close(probs, hits / counts[:, None], msg=f"seed {seed}")


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_baselines_equal_greedy(family: str) -> None:
    """next_token_model computes head 1, also after training changed it: plain generate and prompt
    lookup decoding then give greedy_generate's output; their pass counts add up."""
    seed = fresh_seed()
    model = tiny(family, seed)
    ids = prompt(seed, 20)
    all_options: list[dict[str, Any]] = [{}, {"head_type": "medusa"}]
    for options in all_options:
        mtp = MTPModel(model, n_heads=2, seed=seed, **options)
        with torch.no_grad():  # as if trained: head 1 no longer the model's last layer
            for p in mtp.heads[0].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype))
        hf_model: Any = next_token_model(mtp, model)
        ref = greedy_generate(mtp, ids, 30)
        # an eos that does not end the prompt: transformers' prompt lookup returns no new token when it does
        # (seed 407814496, gpt_neox: the prompt ends in the 8th new token)
        eos = next((t for t in ref.new_token_ids[7:] if t != int(ids.flatten()[-1])), ref.new_token_ids[7])
        hf_model.generation_config.eos_token_id = ref.new_token_ids[3]  # must not stop runs without eos
        for kwargs in ({}, {"prompt_lookup_num_tokens": 4}):
            msg = f"{options} {kwargs}, seed {seed}"
            out = hf_generate(hf_model, ids, 30, **kwargs)
            assert torch.equal(out.tokens, ref.tokens), msg
            check_counts(out, 30, msg)
            if not kwargs:
                assert out.accepted_lengths == [1] * 30, msg
            stopped = hf_generate(hf_model, ids, 30, eos_token_id=eos, **kwargs)
            assert torch.equal(stopped.tokens, greedy_generate(mtp, ids, 30, eos_token_id=eos).tokens), msg
    with pytest.raises(ValueError, match="weighted hidden states"):
        next_token_model(MTPModel(model, n_heads=2, weighted_hidden_states=True), model)
    with pytest.raises(ValueError, match="not built on this model"):
        next_token_model(MTPModel(model, n_heads=2), tiny(family, seed + 1))


def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    pld = PromptLookupDrafter(max_ngram=3)
    assert pld.lookup([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # the 3-gram [1, 2, 3] matched at 0
    assert pld.lookup([5, 7, 5, 8, 5], 4) == [8, 5]  # only the 1-gram [5]: its latest earlier match, at 2
    assert pld.lookup([4, 6, 1, 6, 2, 7, 1, 6], 2) == [2, 7]  # the 2-gram [1, 6] wins over the 1-gram [6]
    assert pld.lookup([1, 2, 3], 2) == [] and pld.lookup([7], 2) == []
    # rank 0 replaced where the text matches, the heads' candidates kept otherwise (no duplicates)
    assert pld([1, 2, 1], [[4, 2], [8, 9], [5, 6]]) == [[2, 4], [1, 8], [5, 6]]
    assert PromptLookupDrafter(min_ngram=2)([1, 2, 3, 1], [[4], [5]]) == [[4], [5]]
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=2, min_ngram=3)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_prompt_lookup_decoding_is_greedy(family: str) -> None:
    """A repetitive prompt: the lookup drafts copies, the heads the rest; the output stays greedy."""
    seed = fresh_seed()
    model = tiny(family, seed, 4)
    base = prompt(seed, 9)
    ids = torch.cat([base, base, base[:, :5]], dim=1)
    mtp = MTPModel(model, n_heads=4, seed=seed)
    ref = brute_greedy(mtp, ids, 40)
    for tree in [Tree.chain(3), Tree.cartesian([2, 2, 1])]:
        out = speculative_generate(mtp, ids, 40, tree=tree, drafter=PromptLookupDrafter())
        assert out.tokens[0].tolist() == ref, f"{tree.choices}, seed {seed}"
