"""mtp_lib.lens against an independent float64 reference on tiny random models of all four families.

The reference captures layer outputs with its own forward hooks, applies each family's final norm by
its formula, the unembedding matrix and any soft-capping in float64, and ranks / nucleus sizes by
sorting with numpy. Every test draws fresh random models and inputs; the seed is in each message.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mtp_lib import lens
from mtp_lib.models import build_tiny_model, get_adapter
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]


def tiny(family: str, seed: int, *, dtype: torch.dtype = torch.float32, n_layers: int = 3) -> torch.nn.Module:
    model = build_tiny_model(family, n_layers=n_layers, hidden=32, seed=seed).to(dtype)
    if family == "gemma":  # exercise final logit soft-capping (Gemma 2 has it; the tiny Gemma 3 does not)
        model.config.final_logit_softcapping = 3.0
    return model


def random_ids(seed: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (length,), generator=g)


# --------------------------------------------------------------------------------------------------
# The reference


def hooked_layer_outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, tuple]:
    """Layer outputs from our own hooks, plus the model's logits and output_hidden_states."""
    adapter = get_adapter(model)
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in adapter.layers(model)]
    try:
        with torch.no_grad():
            result = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [o[0] for o in outs], result.logits[0], tuple(h[0] for h in result.hidden_states)


def manual_final_norm(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Each family's final norm by its formula, in float64."""
    adapter = get_adapter(model)
    norm = adapter.final_norm(model)
    h = h.double()
    if adapter.family in ("gpt_neox", "gpt2"):  # LayerNorm
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    scaled = h / torch.sqrt((h**2).mean(-1, keepdim=True) + eps)
    if adapter.family == "gemma":  # Gemma's RMSNorm scales by (1 + w)
        return scaled * (1.0 + norm.weight.double())
    return scaled * norm.weight.double()


@torch.no_grad()
def reference_log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[L, T, V] float64 logit lens from hooks + manual norm + W_u + soft-capping."""
    adapter = get_adapter(model)
    outs, _, _ = hooked_layer_outputs(model, ids)
    unembed = adapter.unembed(model)
    w = unembed.weight.double()
    rows = []
    for h in outs:
        logits = manual_final_norm(model, h) @ w.T
        if unembed.bias is not None:
            logits = logits + unembed.bias.double()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        rows.append(torch.log_softmax(logits, -1))
    return torch.stack(rows)


def reference_nucleus(logp: np.ndarray, p: float) -> np.ndarray:
    probs = np.sort(np.exp(logp), axis=-1)[..., ::-1]
    cum = np.cumsum(probs, axis=-1)
    sizes = np.apply_along_axis(lambda c: np.searchsorted(c, p, side="left") + 1, -1, cum)
    return np.minimum(sizes, logp.shape[-1])


def reference_rank(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of each target by its place in a descending argsort; -1 without target."""
    order = np.argsort(-logp, axis=-1, kind="stable")  # [L, T, V]
    ranks = np.full(logp.shape[:2], -1)
    for t, y in enumerate(targets):
        if y >= 0:
            ranks[:, t] = np.argmax(order[:, t, :] == y, axis=-1)
    return ranks


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_are_the_layer_outputs(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family, seed)
    ids = random_ids(seed, 17)
    hidden = lens.hidden_states(model, ids)
    outs, _, hs = hooked_layer_outputs(model, ids)
    adapter = get_adapter(model)
    assert hidden.shape == (adapter.n_layers(model), 17, hs[0].shape[-1]), f"seed={seed}"
    for layer, h in enumerate(outs):
        torch.testing.assert_close(hidden[layer], h, rtol=0, atol=0, msg=f"seed={seed} layer {layer + 1}")
    # output_hidden_states: [embeddings, layer 1, ..., layer L-1, final-normed layer L]
    for layer in range(len(outs) - 1):
        torch.testing.assert_close(hidden[layer], hs[layer + 1], msg=f"seed={seed} layer {layer + 1}")
    with torch.no_grad():
        torch.testing.assert_close(adapter.final_norm(model)(hidden[-1]), hs[-1], msg=f"seed={seed}")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_log_probs_match_reference_and_model_output(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family, seed)
    ids = random_ids(seed, 19)
    got = lens.layer_log_probs(model, ids)
    ref = reference_log_probs(model, ids)
    assert got.shape == ref.shape and got.dtype == torch.float32, f"seed={seed}"
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-4, msg=f"seed={seed}")
    _, logits, _ = hooked_layer_outputs(model, ids)
    torch.testing.assert_close(got[-1], torch.log_softmax(logits.float(), -1), rtol=0, atol=1e-5,
                               msg=f"seed={seed}: last row is not the model's output")


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_stats_match_brute_force(family: str) -> None:
    """In float64 end to end, every statistic equals the reference computed from [L, T, V]."""
    seed = fresh_seed()
    model = tiny(family, seed, dtype=torch.float64)
    length = 23
    ids = random_ids(seed, length)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(length, size=9, replace=False))
    positions[-1] = length - 1  # the last position has no target; the one before only x_{t+1}
    positions[-2] = length - 2
    stats = lens.lens_stats(model, ids, positions=positions, top_p=(0.99, 0.9, 0.5), chunk=4, dtype=torch.float64)
    ref = reference_log_probs(model, ids)[:, positions]  # [L, P, V]
    logp, p = ref.numpy(), ref.exp().numpy()
    msg = f"seed={seed}"

    kl = (p * (logp - logp[-1:])).sum(-1)
    np.testing.assert_allclose(stats.kl.numpy(), np.maximum(kl, 0), rtol=1e-4, atol=1e-6, err_msg=msg)
    assert (stats.kl >= 0).all() and (stats.kl[-1] == 0).all(), msg
    entropy = -(p * logp).sum(-1)
    np.testing.assert_allclose(stats.entropy.numpy(), entropy, rtol=1e-5, err_msg=msg)
    for top in (0.99, 0.9, 0.5):
        np.testing.assert_array_equal(stats.nucleus[top].numpy(), reference_nucleus(logp, top), err_msg=msg)
    ids_np = ids.numpy()
    next1 = np.array([ids_np[t + 1] if t + 1 < length else -1 for t in positions])
    next2 = np.array([ids_np[t + 2] if t + 2 < length else -1 for t in positions])
    np.testing.assert_array_equal(stats.rank_next.numpy(), reference_rank(logp, next1), err_msg=msg)
    np.testing.assert_array_equal(stats.rank_next2.numpy(), reference_rank(logp, next2), err_msg=msg)
    np.testing.assert_array_equal(stats.positions.numpy(), positions, err_msg=msg)

    hits = stats.top_k_hits(5, "next2")
    assert torch.isnan(hits[:, -2:]).all() and not torch.isnan(hits[:, :-2]).any(), msg
    in_top5 = np.array([[y in np.argsort(-logp[l, i])[:5] for i, y in enumerate(next1)] for l in range(len(logp))])
    expected = in_top5[:, :-1].mean(1)  # the last position has no x_{t+1}
    np.testing.assert_allclose(stats.top_k_accuracy(5, "next").numpy(), expected, err_msg=msg)


def test_chunked_equals_unchunked() -> None:
    seed = fresh_seed()
    family = random.Random(seed).choice(FAMILIES)
    model = tiny(family, seed, dtype=torch.float64)
    ids = random_ids(seed, 21)
    whole = lens.lens_stats(model, ids, chunk=21, dtype=torch.float64)
    for chunk in (1, 5, random.Random(seed).randint(2, 20), None):
        part = lens.lens_stats(model, ids, chunk=chunk, dtype=torch.float64)
        msg = f"seed={seed} family={family} chunk={chunk}"
        torch.testing.assert_close(part.kl, whole.kl, rtol=1e-6, atol=1e-7, msg=msg)
        torch.testing.assert_close(part.entropy, whole.entropy, rtol=1e-6, atol=0, msg=msg)
        for top in whole.nucleus:
            assert torch.equal(part.nucleus[top], whole.nucleus[top]), msg
        assert torch.equal(part.rank_next, whole.rank_next) and torch.equal(part.rank_next2, whole.rank_next2), msg


def test_float32_path_agrees_with_float64() -> None:
    seed = fresh_seed()
    family = random.Random(seed).choice(FAMILIES)
    model = tiny(family, seed)
    ids = random_ids(seed, 25)
    fast = lens.lens_stats(model, ids)
    exact = lens.lens_stats(model.double(), ids, dtype=torch.float64)
    msg = f"seed={seed} family={family}"
    torch.testing.assert_close(fast.kl.double(), exact.kl.double(), rtol=1e-3, atol=1e-4, msg=msg)
    torch.testing.assert_close(fast.entropy.double(), exact.entropy.double(), rtol=1e-4, atol=1e-5, msg=msg)
    for top in exact.nucleus:  # off by one only where a cumulative sum sits at p within rounding
        diff = (fast.nucleus[top] - exact.nucleus[top]).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.95, msg


def test_bfloat16_model() -> None:
    """The GPU path: a bf16 model gives float32 statistics and its last row is its own output."""
    seed = fresh_seed()
    model = tiny("llama", seed, dtype=torch.bfloat16)
    ids = random_ids(seed, 16)
    logp = lens.layer_log_probs(model, ids)
    assert logp.dtype == torch.float32, f"seed={seed}"
    _, logits, _ = hooked_layer_outputs(model, ids)
    torch.testing.assert_close(logp[-1], torch.log_softmax(logits.float(), -1), rtol=0, atol=2e-2, msg=f"seed={seed}")
    stats = lens.lens_stats(model, ids)
    assert stats.kl.dtype == torch.float32 and (stats.kl[-1] == 0).all() and torch.isfinite(stats.kl).all(), f"seed={seed}"


def test_many_sequences_concatenate() -> None:
    seed = fresh_seed()
    model = tiny("gpt_neox", seed)
    seqs = [random_ids(seed, 12), random_ids(seed + 1, 7).tolist()]
    joined = lens.lens_stats_many(model, seqs, positions=[None, [2, 5]], progress=False)
    first = lens.lens_stats(model, seqs[0])
    second = lens.lens_stats(model, seqs[1], positions=[2, 5])
    msg = f"seed={seed}"
    assert joined.sequence.tolist() == [0] * 12 + [1] * 2, msg
    assert joined.positions.tolist() == list(range(12)) + [2, 5], msg
    torch.testing.assert_close(joined.kl, torch.cat([first.kl, second.kl], 1), msg=msg)
    assert torch.equal(joined.rank_next2, torch.cat([first.rank_next2, second.rank_next2], 1)), msg
    second_only = joined.subset(joined.sequence == 1)
    assert second_only.positions.tolist() == [2, 5], msg
    torch.testing.assert_close(second_only.kl, second.kl, msg=msg)
    assert torch.equal(joined.subset(torch.tensor([12, 13])).rank_next, second.rank_next), msg
    frame = joined.to_dataframe()
    assert len(frame) == joined.n_layers * 14 and set(frame["layer"]) == set(range(1, joined.n_layers + 1)), msg
    np.testing.assert_allclose(joined.depth.numpy(), np.arange(1, joined.n_layers + 1) / joined.n_layers)


def test_invalid_input_raises_clear_errors() -> None:
    model = tiny("llama", 0)
    ids = random_ids(0, 8)
    cases = [
        (lambda: lens.hidden_states(model, torch.zeros(2, 8, dtype=torch.long)), "one sequence"),
        (lambda: lens.hidden_states(model, []), "empty"),
        (lambda: lens.hidden_states(model, torch.zeros(8)), "integer"),
        (lambda: lens.hidden_states(model, torch.tensor([1, 300])), "outside"),
        (lambda: lens.lens_stats(model, ids, positions=[8]), "positions"),
        (lambda: lens.lens_stats(model, ids, top_p=(0.0,)), "top_p"),
        (lambda: lens.lens_stats(model, ids, top_p=(1.5,)), "top_p"),
        (lambda: lens.lens_stats(model, ids, chunk=0), "chunk"),
        (lambda: lens.layer_log_probs(model, ids, max_elements=100), "max_elements"),
        (lambda: lens.lens_stats(model, ids).top_k_hits(0), "k must"),
        (lambda: lens.lens_stats(model, ids).top_k_hits(5, "third"), "target"),
        (lambda: lens.lens_stats_many(model, [ids], positions=[None, None]), "positions"),
        (lambda: lens.lens_stats(model, ids, positions=[7]).top_k_accuracy(5, "next"), "no analysed position"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()


def test_nucleus_sizes_growing_top_k_equals_full_sort() -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    vocab = 300
    # peaked and flat distributions side by side, so some need k to grow up to the whole vocabulary
    temps = torch.tensor([0.2, 1.0, 5.0, 50.0, 1e4]).repeat_interleave(4)
    logp = torch.log_softmax(torch.randn(len(temps), vocab, generator=g, dtype=torch.float64) * 5 / temps[:, None], -1)
    top_p = (0.5, 0.9, 0.99, 0.999)
    want = np.stack([reference_nucleus(logp.numpy(), p) for p in top_p])
    for start_k in (1, 3, 256, vocab):
        got = lens.nucleus_sizes(logp, top_p, start_k=start_k)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"seed={seed} start_k={start_k}")
    with pytest.raises(ValueError, match="start_k"):
        lens.nucleus_sizes(logp, top_p, start_k=0)
