"""mtp_lib.kernels against float64 references, on fresh random inputs. They run where Triton runs: on a
CUDA device, or on the CPU with ``TRITON_INTERPRET=1`` (and Triton installed); else they are skipped."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from mtp_lib import kernels
from seeds import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = kernels.triton is not None and (DEVICE == "cuda" or kernels._interpreting())
# the tiny models' width: heads of 16 dimensions on a GPU (its compiled FlexAttention refuses fewer),
# of 8 in the interpreter (faster)
HIDDEN = 64 if DEVICE == "cuda" else 32
pytestmark = pytest.mark.skipif(not RUNS, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``kernels.<name>`` (which still runs)."""
    calls: list[int] = []
    real = getattr(kernels, name)

    def spy(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(kernels, name, spy)
    return calls


def _case(rng: random.Random, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows = rng.choice([1, rng.randint(2, 70), rng.randint(200, 600)])
    vocab = rng.choice([rng.randint(1, 300), rng.randint(1000, 3000)])
    n_out = rng.randint(1, kernels.MAX_WEIGHT_ROWS)
    scale = rng.choice([1.0, 8.0, 40.0])  # peaked rows: probabilities far below bf16's smallest normal too
    logits = (torch.randn(n_rows, vocab, generator=gen) * scale).to(torch.bfloat16)
    coef = torch.rand(n_out, n_rows, generator=gen)
    coef[torch.rand(n_out, n_rows, generator=gen) < 0.5] = 0.0  # each output row sums a subset (a position)
    coef[torch.arange(n_out), torch.randint(0, n_rows, (n_out,), generator=gen)] = 1.0  # and at least one row
    return logits.to(DEVICE), coef.to(DEVICE)


def test_weighted_softmax_sum_matches_float64() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(6 if DEVICE == "cuda" else 3):
        logits, coef = _case(rng, gen)
        got = kernels.weighted_softmax_sum(logits, coef)
        coef64 = coef.to(torch.bfloat16).double()  # the kernel's weights are bfloat16
        want = coef64 @ torch.softmax(logits.double(), dim=-1)
        assert got.dtype == torch.float32 and got.shape == want.shape, f"seed {seed}"
        # each probability is rounded to bfloat16 once (relative 2^-8; the terms are positive), and
        # below float32's smallest normal (2^-126) it may be lost (subnormals, flushed on tensor cores):
        # that range is what marginal.reduce._accumulate hands to its exact pass
        # (the interpreter's float32 -> bfloat16 conversion truncates: relative 2^-7 there)
        tiny = torch.finfo(torch.float32).tiny
        err = (got.double() - want).abs()
        bound = (2.0**-8 if DEVICE == "cuda" else 2.0**-7) * want + tiny * coef64.sum(-1, keepdim=True)
        assert bool((err <= bound).all()), \
            f"seed {seed}: shape {tuple(logits.shape)} x {coef.shape[0]}: error / bound {float((err / bound).max())}"
        normal = want > 2.0**24 * tiny * coef64.sum(-1, keepdim=True)
        assert bool(normal.any()) and bool((got.double()[normal] > 0).all()), f"seed {seed}"


def test_weighted_softmax_sum_rows_log_sum_exp_far_from_zero() -> None:
    """Logits of magnitude 1e3 (a peaked row): the shift by each row's log-sum-exp keeps them finite."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(37, 500, generator=gen) * 1000).to(torch.bfloat16).to(DEVICE)
    coef = torch.ones(1, 37, device=DEVICE)
    got = kernels.weighted_softmax_sum(logits, coef).double()
    want = torch.softmax(logits.double(), dim=-1).sum(0, keepdim=True)
    assert torch.isfinite(got).all(), f"seed {seed}"
    rtol = 2.0**-8 if DEVICE == "cuda" else 2.0**-7
    torch.testing.assert_close(got, want, atol=1e-6, rtol=rtol, msg=lambda m: f"seed {seed}: {m}")


def test_weighted_softmax_sum_rejects_bad_input() -> None:
    logits = torch.zeros(4, 10, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="coef"):
        kernels.weighted_softmax_sum(logits, torch.ones(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="coef"):
        kernels.weighted_softmax_sum(logits, torch.ones(kernels.MAX_WEIGHT_ROWS + 1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.weighted_softmax_sum(logits.float(), torch.ones(1, 4, device=DEVICE))


def test_marginal_reduction_fused_equals_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """mtp_lib.marginal.reduce._accumulate with the fused kernel and with softmax + matmul: the same marginals
    (up to bf16 rounding of the probabilities), the kernel really called."""
    from mtp_lib import marginal as MG

    seed = fresh_seed()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    calls = _spy(monkeypatch, "weighted_softmax_sum")
    for _ in range(3):
        n_rows, vocab = rng.randint(2, 400), rng.randint(5, 3000)
        logits = (torch.randn(n_rows, vocab, generator=gen) * rng.choice([1.0, 20.0])).to(torch.bfloat16).to(DEVICE)
        npos = torch.sort(torch.randint(0, rng.randint(1, 5), (n_rows,), generator=gen)).values.to(DEVICE)
        log_w = (torch.randn(n_rows, 2, generator=gen, dtype=torch.float64) * 3).to(DEVICE)
        accs = []
        for fused in (True, False):
            monkeypatch.setattr(MG.reduce, "_FUSED_REDUCE", fused)
            acc = torch.full((2, int(npos.max()) + 1, vocab), -float("inf"), device=DEVICE)
            MG.reduce._accumulate(acc, logits, npos, log_w)
            accs.append(acc)
        assert torch.equal(torch.isinf(accs[0]), torch.isinf(accs[1])), f"seed {seed}"
        fin = torch.isfinite(accs[1])
        # two bf16 roundings of each probability (at most 2^-7 relative each, interpreter included)
        torch.testing.assert_close(accs[0][fin], accs[1][fin], atol=2 * 2.0**-7, rtol=0,
                                   msg=lambda m: f"seed {seed}: {m}")
    assert calls, f"seed {seed}: the fused kernel was not used"


def _merge_case(rng: random.Random, gen: torch.Generator, dtype: torch.dtype, n_anc: int,
                softcap: float | None) -> tuple[Any, ...]:
    """A flex step's tree part on random inputs: layouts as transformers and FlexAttention hand them on."""
    n_kv = rng.choice([1, 2, 3])
    n_heads = n_kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([16, 48, 64])  # 48: not a power of 2
    length = rng.randint(1, 150)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    query = randn(1, length, n_heads, head_dim).transpose(1, 2)  # strided, as the projections give it
    key, value = (randn(1, length, n_kv, head_dim).transpose(1, 2) for _ in range(2))
    out_ctx = randn(1, n_heads, length, head_dim)
    lse = (torch.randn(1, n_heads, length, generator=gen) * 3).to(DEVICE)
    lse[torch.rand(1, n_heads, length, generator=gen) < 0.2] = -torch.inf  # no context key (padding)
    ancestors = torch.randint(0, length, (length, n_anc), generator=gen).to(DEVICE)
    valid = (torch.rand(length, n_anc, generator=gen) < 0.7).to(DEVICE)
    scale = head_dim**-0.5 * rng.choice([1.0, 4.0])
    return query, key, value, out_ctx, lse, ancestors, valid, scale, softcap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_merge_matches_the_reference_merge(dtype: torch.dtype) -> None:
    """kernels.tree_merge against marginal.flex._merge_tree_part (the elementwise path), in float64."""
    from mtp_lib import marginal as MG

    seed = fresh_seed()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for n_anc, softcap in [(0, None), (1, None), (3, None), (rng.choice([0, 2]), 2.0)]:
        case = _merge_case(rng, gen, dtype, n_anc, softcap)
        query = case[0]
        got = kernels.tree_merge(*case)
        as64: list[Any] = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in case]
        want = MG.flex._merge_tree_part(*as64)
        assert got.dtype == dtype and got.shape == want.shape == (1, query.shape[2], query.shape[1], query.shape[3])
        # float32 sums in the kernel, one rounding to the dtype at the end
        tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
        err = float((got.double() - want).abs().max())
        assert err <= tol * (1 + float(want.abs().max())), f"seed {seed}: max error {err}"


def test_tree_merge_rejects_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    query, key, value, out_ctx, lse, ancestors, valid, scale, _ = _merge_case(random.Random(0), gen, torch.float32, 1,
                                                                              None)
    with pytest.raises(ValueError, match="lse_ctx"):
        kernels.tree_merge(query, key, value, out_ctx, lse[:, :, :0], ancestors, valid, scale)
    with pytest.raises(ValueError, match="valid"):
        kernels.tree_merge(query, key, value, out_ctx, lse, ancestors, valid.int(), scale)
    with pytest.raises(ValueError, match="key and value"):
        kernels.tree_merge(query, key[:, :, :-1], value, out_ctx, lse, ancestors, valid, scale)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_marginalize_flex_with_the_merge_kernel_equals_without(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """marginalize(attention="flex", depth=3) with marginal.flex._FUSED_MERGE on and off: the same marginals,
    the kernel really called (ancestors in the tree; the tiny Gemma's window of 64 cuts into it)."""
    from mtp_lib import marginal as MG
    from mtp_lib.models import TINY_VOCAB, build_tiny_model

    seed = fresh_seed()
    model = build_tiny_model(family, n_layers=6 if family == "gemma" else 3, hidden=HIDDEN, seed=seed).to(DEVICE)
    ids = torch.randint(0, TINY_VOCAB, (1, 150), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    calls = _spy(monkeypatch, "tree_merge")
    results = []
    for fused in (True, False):
        monkeypatch.setattr(MG.flex, "_FUSED_MERGE", fused)
        results.append(MG.marginalize(model, ids, depth=3, top_p=0.6, positions=[149, 100], attention="flex"))
    assert calls, "the merge kernel was not called"
    torch.testing.assert_close(results[0].log_probs, results[1].log_probs, atol=1e-4, rtol=0,
                               msg=lambda m: f"seed {seed}: {m}")


def test_the_merge_kernel_traces_inside_the_compiled_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True with attention="flex" and the merge kernel: the step still traces as one graph
    (fullgraph=True, the eager backend; the kernel is an opaque custom op) and gives the same marginals."""
    from mtp_lib import marginal as MG
    from mtp_lib.models import TINY_VOCAB, build_tiny_model

    seed = fresh_seed()
    model = build_tiny_model("llama", n_layers=2, hidden=HIDDEN, seed=seed).to(DEVICE)
    ids = torch.randint(0, TINY_VOCAB, (1, 140), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    kwargs: dict = dict(depth=2, top_p=0.8, positions=[139, 60], attention="flex")
    want = MG.marginalize(model, ids, **kwargs)
    monkeypatch.setattr(MG.flex, "_FUSED_MERGE", True)
    monkeypatch.setattr(MG.step, "_compiled", lambda base: torch.compile(base, backend="eager", fullgraph=True))
    step = MG.step._candidate_step
    monkeypatch.setattr(MG.levels, "_candidate_step", lambda *a: step(*a[:5], True, True))  # type: ignore[call-arg]  # compiled, flex
    got = MG.marginalize(model, ids, **kwargs)
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-4, rtol=0, msg=lambda m: f"seed {seed}: {m}")
