"""mtp_lib.marginal against a plain brute-force recursion (float64, no cache) on tiny random models.

Every test draws a fresh seed (model weights, input ids, positions, top-p, chunk sizes) and prints it
in its assertion messages: rerun a failure with that seed to replay it.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from mtp_lib import marginal as MG
from mtp_lib.models import TINY_VOCAB, build_tiny_model, get_adapter
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]
# top-p ranges that keep nuclei of the tiny models at about 2-40 tokens (Llama, Gemma and GPT-2 tiny
# models are flatter than the GPT-NeoX one), so that the depth-3 brute force stays cheap
SMALL_TOP_P = {"gpt_neox": (0.4, 0.85), "llama": (0.1, 0.35), "gemma": (0.05, 0.25), "gpt2": (0.1, 0.35)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(family: str, seed: int, dtype: torch.dtype = torch.float64, attn: str = "sdpa") -> Any:
    # 6 layers make the tiny Gemma-3 have both a full and sliding-window (64 tokens) layers
    model: Any = build_tiny_model(family, n_layers=6 if family == "gemma" else 3, hidden=32, seed=seed).to(dtype)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model


# --------------------------------------------------------------------------------------------------
# The reference: the recursion written out plainly


def _ref_nucleus(log_probs: torch.Tensor, top_p: float) -> list[int]:
    """Most probable first; stop once the kept mass reaches top_p (the crossing token is kept)."""
    order = torch.argsort(log_probs, descending=True).tolist()
    if top_p >= 1.0:
        return order
    kept, mass = [], 0.0
    for tok in order:
        kept.append(tok)
        mass += math.exp(float(log_probs[tok]))
        if mass >= top_p:
            break
    return kept


def _ref_dist(model: torch.nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    """log p(next | seq) for equal-length sequences: one full forward pass each, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor(seqs), use_cache=False).logits[:, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def _ref_marginal(model: torch.nn.Module, prefix: list[int], levels: int, top_p: float,
                  log_p: torch.Tensor | None = None) -> torch.Tensor:
    """[levels, V]: row 0 = log p(x_{t+1} | prefix), row d = marginal d tokens further."""
    log_p = _ref_dist(model, [prefix])[0] if log_p is None else log_p
    if levels == 1:
        return log_p[None]
    kept = _ref_nucleus(log_p, top_p)
    w = log_p[kept] - torch.logsumexp(log_p[kept], 0)
    child_p = _ref_dist(model, [prefix + [y] for y in kept])
    child = torch.stack([_ref_marginal(model, prefix + [y], levels - 1, top_p, child_p[i])
                         for i, y in enumerate(kept)])
    return torch.cat([log_p[None], torch.logsumexp(w[:, None, None] + child, dim=0)])


def _assert_matches(result: MG.MarginalResult, model: torch.nn.Module, ids: torch.Tensor, top_p: float,
                    seed: int, atol: float = 2e-5, log_probs: torch.Tensor | None = None) -> None:
    log_probs = result.log_probs if log_probs is None else log_probs
    assert log_probs.dtype == torch.float32, f"seed {seed}"
    for i, t in enumerate(result.positions.tolist()):
        ref = _ref_marginal(model, ids[0, : t + 1].tolist(), result.depth, top_p)
        got = log_probs[i].double()
        assert torch.isfinite(got).all(), f"seed {seed}, t={t}: non-finite log-probs"
        torch.testing.assert_close(got, ref, atol=atol, rtol=1e-5, msg=lambda m: f"seed {seed}, t={t}: {m}")
        n_ref = len(_ref_nucleus(ref[0], top_p))
        n_got = result.n_candidates[i] if top_p == result.top_p else result.nucleus_size(top_p)[i]
        assert int(n_got) == n_ref, f"seed {seed}, t={t}: nucleus of {int(n_got)} tokens, reference {n_ref}"


# --------------------------------------------------------------------------------------------------
# Correctness


def _flex_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the FlexAttention calls of attention="flex" (the CPU runs its reference implementation)."""
    calls: list[int] = []
    real = MG.flex._flex_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(MG.flex, "_flex_attention", spy)
    return calls


def test_flex_kernel_options_reach_flex_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """MG.flex._FLEX_KERNEL_OPTIONS (what benchmarks/flex_tree.py and benchmarks/marginal.py --flex-options
    compare) is handed to every FlexAttention call, and none is handed by default."""
    seed = fresh_seed()
    model = _tiny("llama", seed, torch.float32)
    ids = torch.randint(0, TINY_VOCAB, (1, 40), generator=torch.Generator().manual_seed(seed))
    seen: list[Any] = []
    real = MG.flex._flex_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("kernel_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(MG.flex, "_flex_attention", spy)
    want = MG.marginalize(model, ids, depth=2, top_p=0.5, positions=[39], attention="flex")
    assert seen and all(o is None for o in seen)
    seen.clear()
    options = {"BLOCK_M": 64, "BLOCK_N": 64}
    monkeypatch.setattr(MG.flex, "_FLEX_KERNEL_OPTIONS", options)
    got = MG.marginalize(model, ids, depth=2, top_p=0.5, positions=[39], attention="flex")
    assert seen and all(o == options for o in seen), seen
    torch.testing.assert_close(got.log_probs, want.log_probs)


@pytest.mark.parametrize("attention", ["packed", "flex"])
@pytest.mark.parametrize("family", FAMILIES)
def test_depth2_matches_brute_force(family: str, attention: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    model = _tiny(family, seed)
    # beyond the tiny Gemma's sliding window of 64; flex: beyond one key block of 128
    n_ctx = rng.randint(70, 100) if attention == "packed" else rng.randint(130, 300)
    ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    calls = _flex_calls(monkeypatch)
    for top_p in (1.0, rng.uniform(0.5, 0.95)):
        positions = [rng.randrange(n_ctx), n_ctx - 1] + ([rng.randrange(8)] if top_p < 1 else [])
        result = MG.marginalize(model, ids, depth=2, top_p=top_p, positions=positions, attention=attention,
                                max_tokens_per_chunk=rng.randint(50, 400), tokens_per_row=rng.randint(1, 200),
                                max_logits_elements=rng.randint(1, 300) * TINY_VOCAB)
        assert result.positions.tolist() == positions, f"seed {seed}"
        assert result.log_probs.shape == (len(positions), 2, TINY_VOCAB), f"seed {seed}"
        assert result.n_nodes == (int(result.n_candidates.sum()),), f"seed {seed}"
        _assert_matches(result, model, ids, top_p, seed)
    # flex: one FlexAttention call per layer and step, none for packed
    assert (len(calls) > 0) == (attention == "flex"), f"seed {seed}: {len(calls)} FlexAttention calls"


@pytest.mark.parametrize("attention", ["packed", "flex"])
@pytest.mark.parametrize("family", FAMILIES)
def test_depth3_matches_brute_force(family: str, attention: str) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    model = _tiny(family, seed)
    n_ctx = rng.randint(66, 80) if family == "gemma" else rng.randint(5, 40)
    if attention == "flex":
        n_ctx += 128  # contexts of two key blocks
    ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    positions = [rng.randrange(n_ctx), n_ctx - 1]
    top_p = rng.uniform(*SMALL_TOP_P[family])
    result = MG.marginalize(model, ids, depth=3, top_p=top_p, positions=positions, attention=attention,
                            max_tokens_per_chunk=rng.randint(8, 64) * (4 if attention == "flex" else 1),
                            tokens_per_row=rng.randint(1, 40), max_logits_elements=rng.randint(1, 40) * TINY_VOCAB)
    assert len(result.n_nodes) == 2 and result.n_tokens_fed >= result.n_nodes[1], f"seed {seed}"
    _assert_matches(result, model, ids, top_p, seed)


def _small_vocab_model(family: str, seed: int, vocab: int = 40, window: int = 4) -> Any:
    """A 2-layer model with a small vocabulary (V^2 paths stay cheap); the Gemma-3 one alternates a
    sliding layer of ``window`` and a full layer, so the window cuts into short contexts."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=1)
    config: Any
    if family == "llama":
        config = LlamaConfig(**common)
    else:
        config = Gemma3TextConfig(**common, head_dim=8, sliding_window=window,
                                  layer_types=["sliding_attention", "full_attention"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model.double().eval()


@pytest.mark.parametrize("attention", ["packed", "flex"])
@pytest.mark.parametrize(("family", "window"), [("llama", None), ("gemma", 4), ("gemma", 1)])
def test_depth3_exact_over_the_whole_vocabulary(family: str, window: int | None, attention: str) -> None:
    """top_p=1.0 at depth 3: V^2 paths per position, a packed tree with shared ancestors (the Gemma
    window of 4 cuts into the context; of 1, into the tree too: a level-2 token sees no ancestor)."""
    seed = fresh_seed()
    rng = random.Random(seed)
    model = _small_vocab_model(family, seed, window=window or 4)
    vocab = model.config.vocab_size
    n_ctx = rng.randint(3, 12)
    ids = torch.randint(0, vocab, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    positions = [n_ctx - 1, rng.randrange(n_ctx)]
    result = MG.marginalize(model, ids, depth=3, top_p=1.0, positions=positions, attention=attention,
                            max_tokens_per_chunk=rng.randint(50, 700), tokens_per_row=rng.randint(2, 300),
                            max_logits_elements=rng.randint(1, 200) * vocab)
    assert result.n_nodes == (2 * vocab, 2 * vocab**2), f"seed {seed}"
    _assert_matches(result, model, ids, 1.0, seed)
    # the marginals are distributions
    total = torch.logsumexp(result.log_probs.double(), dim=-1)
    torch.testing.assert_close(total, torch.zeros(2, 3, dtype=torch.float64), atol=1e-5, rtol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_eager_attention_gives_the_same(family: str) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    model = _tiny(family, seed, attn="eager")
    n_ctx = rng.randint(5, 40)
    ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    result = MG.marginalize(model, ids, depth=3, top_p=rng.uniform(*SMALL_TOP_P[family]), positions=[n_ctx - 1, 0],
                            max_tokens_per_chunk=rng.randint(16, 128), tokens_per_row=rng.randint(1, 64))
    _assert_matches(result, model, ids, result.top_p, seed)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_float32_model_close_to_float64_reference(family: str) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    model32 = _tiny(family, seed, torch.float32)
    model64 = _tiny(family, seed, torch.float64)
    n_ctx = rng.randint(20, 90)
    ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    result = MG.marginalize(model32, ids, depth=2, top_p=1.0, positions=[rng.randrange(n_ctx), n_ctx - 1],
                            max_tokens_per_chunk=rng.randint(64, 300), tokens_per_row=rng.randint(16, 300))
    _assert_matches(result, model64, ids, 1.0, seed, atol=2e-4)


def test_bfloat16_model_gives_float32_close_to_reference() -> None:
    seed = fresh_seed()
    model_bf16 = _tiny("llama", seed, torch.bfloat16)
    model64 = _tiny("llama", seed, torch.float64)
    ids = torch.randint(0, TINY_VOCAB, (1, 30), generator=torch.Generator().manual_seed(seed))
    result = MG.marginalize(model_bf16, ids, depth=2, top_p=1.0, positions=[29])
    assert result.log_probs.dtype == torch.float32, f"seed {seed}"
    ref = _ref_marginal(model64, ids[0].tolist(), 2, 1.0)
    # bf16 weights and activations: compare probabilities loosely
    err = (result.log_probs[0].double().exp() - ref.exp()).abs().max()
    assert err < 0.03, f"seed {seed}: max probability error {float(err):.4f}"


def test_extra_top_p_equal_separate_runs() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    family = rng.choice(FAMILIES)
    model = _tiny(family, seed)
    n_ctx = rng.randint(10, 60)
    ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    positions = [rng.randrange(n_ctx) for _ in range(2)]
    depth = rng.choice([2, 3])
    lo, hi = SMALL_TOP_P[family] if depth == 3 else (0.2, 0.95)
    qs = sorted(rng.uniform(lo, hi) for _ in range(2))
    top_p = rng.uniform(qs[-1], hi)
    result = MG.marginalize(model, ids, depth=depth, top_p=top_p, extra_top_p=qs, positions=positions,
                            max_tokens_per_chunk=rng.randint(8, 100), tokens_per_row=rng.randint(1, 50),
                            max_logits_elements=rng.randint(1, 50) * TINY_VOCAB)
    for q in qs:
        alone = MG.marginalize(model, ids, depth=depth, top_p=q, positions=positions)
        torch.testing.assert_close(result.at(q), alone.log_probs, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        torch.testing.assert_close(result.nucleus_size(q), alone.n_candidates, msg=f"seed {seed}")
    _assert_matches(result, model, ids, qs[0], seed, log_probs=result.at(qs[0]))
    with pytest.raises(ValueError, match="top_p"):
        result.at(0.123)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_accumulate_bfloat16_logits_against_float64(scale: float) -> None:
    """The bf16 path of the reduction (bf16 probabilities and weights, one matmul) against float64 sums
    over the same bf16 logits: within bf16 rounding where mass is, exact (fallback) far below it."""
    seed = fresh_seed()
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_rows, vocab, m = rng.randint(2, 300), rng.randint(5, 400), rng.randint(1, 2)
    logits = (torch.randn(n_rows, vocab, generator=g) * scale).to(torch.bfloat16)
    npos = torch.sort(torch.randint(0, rng.randint(1, 40), (n_rows,), generator=g)).values
    log_w = torch.randn(n_rows, m, generator=g, dtype=torch.float64) * 3
    log_w[torch.rand(n_rows, m, generator=g) < 0.2] = -math.inf  # left out of some nuclei
    n_pos = int(npos.max()) + 1
    acc = torch.full((m, n_pos, vocab), -math.inf)
    MG.reduce._accumulate(acc, logits, npos, log_w)
    terms = log_w.T[:, :, None] + torch.log_softmax(logits.double(), dim=-1)[None]  # [m, R, V]
    for j in range(m):
        for p in range(n_pos):
            rows = npos == p
            want = torch.logsumexp(terms[j, rows], dim=0) if rows.any() else torch.full((vocab,), -math.inf,
                                                                                         dtype=torch.float64)
            got = acc[j, p].double()
            assert torch.equal(torch.isinf(got), torch.isinf(want)), f"seed {seed}, top-p {j}, position {p}"
            if not torch.isfinite(want).any():
                continue
            fin = torch.isfinite(want)
            # three bf16 roundings (probability, weight, the matmul's sum), each at most 2^-8 relative:
            # at most log(1 + 3 * 2^-8) = 0.0117 in log space
            torch.testing.assert_close(got[fin], want[fin], atol=0.012, rtol=0,
                                       msg=lambda msg: f"seed {seed}, top-p {j}, position {p}: {msg}")


@pytest.mark.slow
def test_compile_gives_what_eager_gives() -> None:
    """compile=True (torch.compile of the candidate steps): the same marginals, on two samples of other
    lengths (the second call reuses the compiled code with dynamic shapes)."""
    seed = fresh_seed()
    rng = random.Random(seed)
    family = rng.choice(["llama", "gemma"])
    model = _tiny(family, seed, torch.float32)
    for n_ctx in rng.sample(range(8, 60), 2):
        ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed + n_ctx))
        kwargs: dict[str, Any] = dict(depth=2, top_p=rng.uniform(0.8, 1.0), positions=[n_ctx - 1, rng.randrange(n_ctx)],
                                      max_tokens_per_chunk=rng.randint(64, 512), tokens_per_row=rng.randint(16, 128))
        eager = MG.marginalize(model, ids, **kwargs)
        compiled = MG.marginalize(model, ids, compile=True, **kwargs)
        torch.testing.assert_close(compiled.log_probs, eager.log_probs, atol=1e-4, rtol=0,
                                   msg=lambda m: f"seed {seed} {family} n_ctx {n_ctx}: {m}")
    assert not hasattr(model.model, "_orig_mod") and "forward" not in vars(model.model), "the model was changed"
    with pytest.raises(ValueError, match="compile"):
        MG.marginalize(model, ids, compile="yes")


def test_context_block_mask_lists_every_allowed_pair() -> None:
    """The flex step's BlockMask against the rule it stands for, pair by pair: every allowed (query, key)
    pair lies in a listed block, blocks listed full hold allowed pairs only, and without a window
    every block listed holds an allowed pair (the sparsity is real). The rule itself equals the
    packed step's dense mask."""
    seed = fresh_seed()
    rng = random.Random(seed)
    bs = MG.flex._FLEX_BLOCK
    for i in range(60):
        n_ctx = rng.randint(1, 5 * bs)
        n_pos = rng.randint(1, 3) if i % 2 else rng.randint(1, 12)
        near_edges = [t for k in range(1, 5) for t in range(k * bs - 2, k * bs + 2) if t < n_ctx]
        pool = near_edges if i % 2 and near_edges else list(range(n_ctx))  # block edges: off-by-one errors show
        positions = torch.tensor(sorted(rng.sample(pool, min(n_pos, len(pool)))))
        depth = rng.choice([1, 2])  # paths of one or two tokens (levels 1 and 2)
        npos = torch.sort(torch.randint(0, len(positions), (rng.randint(1, 3 * bs),))).values
        paths = torch.randint(0, 50, (len(npos), depth))
        packed = MG.packing._pack(positions, npos, paths, len(npos), pad_to=bs)
        window = rng.choice([None, rng.randint(1, 2 * bs)])
        first = int(positions[0]) + 1  # the first position's level-1 tokens
        edges = [first - (k * bs - 1) + 1 for k in range(1, 5) if k * bs <= first]
        if i % 3 == 0 and edges:  # a window whose first key is the last key of a block
            window = rng.choice(edges)
        ctx = MG.context._Context(model=None, adapter=None, kv=[], n_ctx=n_ctx, dtype=torch.float32,  # type: ignore[arg-type]
                          layer_types=None, window=window)
        mask = MG.flex._context_block_mask(packed, n_ctx, window)
        length = packed.input_ids.shape[1]
        q = torch.arange(length)[:, None]
        kv = torch.arange(n_ctx)[None, :]
        allowed = mask.mask_mod(0, 0, q, kv)
        dense = MG.packing._packed_masks(ctx, packed)[0, 0, :, :n_ctx] == 0  # the packed step's rule
        assert torch.equal(allowed, dense), f"seed {seed}"
        listed = torch.zeros(length // bs, -(-n_ctx // bs), dtype=torch.bool)
        full = torch.zeros_like(listed)
        for qb in range(length // bs):
            listed[qb, mask.kv_indices[0, 0, qb, : mask.kv_num_blocks[0, 0, qb]].long()] = True
            full[qb, mask.full_kv_indices[0, 0, qb, : mask.full_kv_num_blocks[0, 0, qb]].long()] = True
        assert not (listed & full).any(), f"seed {seed}: a block listed both partial and full"
        padded = torch.zeros(length, listed.shape[1] * bs, dtype=torch.bool)
        padded[:, :n_ctx] = allowed
        per_block = padded.view(length // bs, bs, -1, bs)
        any_allowed = per_block.any(dim=(1, 3))
        assert not (any_allowed & ~(listed | full)).any(), f"seed {seed}: an allowed pair outside the listed blocks"
        for qb, kb in full.nonzero().tolist():
            assert bool(per_block[qb, :, kb].all()), f"seed {seed}: block ({qb}, {kb}) marked full holds masked pairs"
        if window is None:
            assert torch.equal(any_allowed, listed | full), f"seed {seed}: a listed block holds no allowed pair"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_flex_step_traces_in_one_graph(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True with attention="flex" (a GPU's setting): the whole model, tree attention included,
    traces without a graph break (checked with fullgraph=True and the eager backend, which runs on the
    CPU); a graph break would leave the layers uncompiled on the GPU."""
    seed = fresh_seed()
    rng = random.Random(seed)
    model = _tiny(family, seed, torch.float32)
    n_ctx = rng.randint(130, 200)
    ids = torch.randint(0, TINY_VOCAB, (1, n_ctx), generator=torch.Generator().manual_seed(seed))
    kwargs: dict[str, Any] = dict(depth=2, top_p=0.9, positions=[n_ctx - 1, rng.randrange(n_ctx)])
    want = MG.marginalize(model, ids, attention="packed", **kwargs)
    monkeypatch.setattr(MG.step, "_compiled", lambda base: torch.compile(base, backend="eager", fullgraph=True))
    step = MG.step._candidate_step
    monkeypatch.setattr(MG.levels, "_candidate_step", lambda *a: step(*a[:5], True, True))  # compiled, flex
    got = MG.marginalize(model, ids, attention="packed", **kwargs)
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-4, rtol=0, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_context_pass_traces_in_one_graph(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True also compiles the context pass (the sample with its KV cache): it traces without a
    graph break (fullgraph=True, the eager backend, on the CPU) and gives the eager pass's hidden states
    and cache; and marginalize(compile=True) runs it so."""
    seed = fresh_seed()
    model = _tiny(family, seed, torch.float32)
    ids = torch.randint(0, TINY_VOCAB, (1, random.Random(seed).randint(8, 60)),
                        generator=torch.Generator().manual_seed(seed))
    adapter = get_adapter(model)
    torch._dynamo.reset()  # other tests' compilations of the same code object count against its limit
    fn = torch.compile(MG.context._context_forward, backend="eager", fullgraph=True)
    calls: list[int] = []

    def compiled(base: Any, input_ids: torch.Tensor, cache: Any) -> Any:
        calls.append(input_ids.shape[1])
        return fn(base, input_ids, cache)

    monkeypatch.setattr(MG.context, "_compiled_context", lambda: compiled)
    with torch.inference_mode():
        want_ctx, want = MG.context._run_context(model, adapter, ids)
        assert calls == []
        got_ctx, got = MG.context._run_context(model, adapter, ids, compile=True)
    assert calls == [ids.shape[1]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"seed {seed}: {m}")
    assert len(got_ctx.kv) == len(want_ctx.kv) == model.config.num_hidden_layers
    for (k, v), (k0, v0) in zip(got_ctx.kv, want_ctx.kv):
        torch.testing.assert_close((k, v), (k0, v0), atol=1e-5, rtol=0)
    calls.clear()
    MG.marginalize(model, ids, depth=2, top_p=0.5, positions=[ids.shape[1] - 1], compile=True)
    assert calls == [ids.shape[1]], "marginalize(compile=True) ran its context pass eagerly"
    torch._dynamo.reset()


def test_sums_stay_in_log_space_far_below_float32_underflow() -> None:
    """A very peaked float32 model: marginal log-probs of hundreds of nats below zero stay finite."""
    seed = fresh_seed()
    model32 = _tiny("gpt_neox", seed, torch.float32)
    model64 = _tiny("gpt_neox", seed, torch.float64)
    for m in (model32, model64):
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(40.0)
    ids = torch.randint(0, TINY_VOCAB, (1, 12), generator=torch.Generator().manual_seed(seed))
    result = MG.marginalize(model32, ids, depth=2, top_p=1.0, positions=[11, 4])
    assert float(result.log_probs.min()) < -200, f"seed {seed}: the test model is not peaked enough"
    for i, t in enumerate([11, 4]):
        ref = _ref_marginal(model64, ids[0, : t + 1].tolist(), 2, 1.0)
        got = result.log_probs[i].double()
        assert torch.isfinite(got).all(), f"seed {seed}: underflow to -inf"
        # float32 logits of magnitude ~1e3 carry absolute errors ~1e-4 per log-prob
        torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-4, msg=lambda m: f"seed {seed}, t={t}: {m}")


def test_model_is_left_as_it_was() -> None:
    seed = fresh_seed()
    model = _tiny("llama", seed, torch.float32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    ids = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
    result = MG.marginalize(model, ids, depth=2, top_p=0.9)
    assert model.training and model.config._attn_implementation == attn, f"seed {seed}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), f"seed {seed}"
    assert not result.log_probs.requires_grad
    # positions=None means every context end 0..T-1
    assert result.positions.tolist() == list(range(9)) and result.log_probs.shape == (9, 2, TINY_VOCAB)


def test_depth1_is_the_next_token_distribution() -> None:
    seed = fresh_seed()
    model = _tiny("gpt2", seed)
    ids = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(seed))
    result = MG.marginalize(model, ids, depth=1, top_p=0.8)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids[None]).logits[0], dim=-1)
    torch.testing.assert_close(result.log_probs[:, 0].double(), ref, atol=1e-6, rtol=1e-6, msg=f"seed {seed}")
    assert result.n_nodes == () and result.n_tokens_fed == 0
    torch.testing.assert_close(result.n_candidates, MG.nucleus_size(ref, 0.8))


# --------------------------------------------------------------------------------------------------
# The nucleus helper


def test_nucleus_is_the_smallest_set_reaching_top_p() -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(50, 300, generator=gen, dtype=torch.float64) * torch.rand(50, 1, generator=gen, dtype=torch.float64) * 6
    top_p = random.Random(seed).uniform(0.05, 0.999)
    nuc = MG.nucleus(logits, top_p)
    log_p = torch.log_softmax(logits, -1)
    sizes = MG.nucleus_size(logits, top_p)
    assert torch.equal(sizes, nuc.sizes), f"seed {seed}"
    for r in range(50):
        toks = nuc.tokens[nuc.rows == r]
        assert toks.tolist() == _ref_nucleus(log_p[r], top_p), f"seed {seed}, row {r}"
        mass = log_p[r, toks].exp().sum()
        assert mass >= top_p and mass - log_p[r, toks[-1]].exp() < top_p, f"seed {seed}, row {r}"
        torch.testing.assert_close(nuc.log_weights[nuc.rows == r].exp().sum(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(nuc.log_mass[r], mass.log())
    # top_p = 1 keeps every token of nonzero probability; the size never shrinks as top_p grows
    assert (MG.nucleus_size(logits, 1.0) == 300).all()
    masked = logits.clone()
    masked[:, :10] = -math.inf
    assert (MG.nucleus_size(masked, 1.0) == 290).all()
    grid = [MG.nucleus_size(logits, q) for q in (0.1, 0.5, 0.9, 0.99)]
    assert all((a <= b).all() for a, b in zip(grid, grid[1:])), f"seed {seed}"
    assert MG.nucleus_size(logits[0], 0.5).ndim == 0


# --------------------------------------------------------------------------------------------------
# Invalid arguments


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
    ({"depth": 0}, "depth"), ({"depth": 2.0}, "depth"),
    ({"positions": [5]}, "positions"), ({"positions": [-1]}, "positions"), ({"positions": []}, "positions"),
    ({"positions": [0.5]}, "positions"),
    ({"extra_top_p": [0.95], "top_p": 0.9}, "extra_top_p"), ({"extra_top_p": [0.0]}, "extra_top_p"),
    ({"max_tokens_per_chunk": 0}, "max_tokens_per_chunk"), ({"max_logits_elements": 0}, "max_logits_elements"),
    ({"tokens_per_row": 0}, "tokens_per_row"), ({"attention": "sparse"}, "attention"),
    ({"attention": "flex", "compile": True}, "attention='flex'"),  # on the CPU
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    model = _tiny("llama", 0, torch.float32)
    ids = torch.randint(0, TINY_VOCAB, (1, 5))
    with pytest.raises(ValueError, match=name):
        MG.marginalize(model, ids, **kwargs)


@pytest.mark.parametrize(("family", "hidden", "want"), [("llama", 32, 8), ("gpt2", 64, 16), ("gemma", 48, 12),
                                                     ("gpt_neox", 128, 32)])
def test_head_dim_of_each_family(family: str, hidden: int, want: int) -> None:
    assert MG.flex._head_dim(build_tiny_model(family, n_layers=1, hidden=hidden).config) == want


def test_flex_on_an_accelerator_rejects_heads_below_16_dimensions() -> None:
    """torch's compiled FlexAttention refuses heads of fewer than 16 dimensions on a GPU: say so before
    running anything (a model on the meta device stands for the GPU here)."""
    model = _tiny("llama", 0, torch.float32).to("meta")  # heads of 8 dimensions
    with pytest.raises(ValueError, match="at least 16 dimensions.*attention='packed'"):
        MG.marginalize(model, torch.randint(0, TINY_VOCAB, (1, 5)), attention="flex")


@pytest.mark.parametrize("ids", [torch.zeros(1, 0, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long),
                                 torch.zeros(1, 5), torch.full((1, 5), TINY_VOCAB), [[1, 2], [3, 4]],
                                 "some text"])
def test_invalid_input_ids_raise_value_error(ids: object) -> None:
    model = _tiny("llama", 0, torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        MG.marginalize(model, ids)  # type: ignore[arg-type]


def test_helpers_reject_bad_top_p() -> None:
    with pytest.raises(ValueError, match="top_p"):
        MG.nucleus(torch.randn(10), 0.0)
    with pytest.raises(ValueError, match="top_p"):
        MG.nucleus_size(torch.randn(10), 2)
