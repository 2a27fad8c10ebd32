"""mtp_lib.tuned_lens: per-layer affine translators trained to match the model's output, on tiny random models.

Each test draws a fresh seed (printed in its messages) for the model, the data, the translators and
the training.
"""

from __future__ import annotations

import pytest
import torch

from mtp_lib import lens, probe, tuned_lens
from mtp_lib.models import build_tiny_model
from seeds import fresh_seed


def _sequences(seed: int, count: int, length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (length,), generator=g) for _ in range(count)]


def test_scores_match_a_float64_reference() -> None:
    """compare_lenses against KL, NLL, top-k and entropy written out by hand from Hugging Face's own
    hidden states, final norm and unembedding, all in float64."""
    seed = fresh_seed()
    model = build_tiny_model("llama", n_layers=3, hidden=32, seed=seed).double()
    ids = _sequences(seed, 1, 12)[0]
    hidden = lens.hidden_states(model, ids)
    data = probe.ProbeData(hidden[:, :-1], {1: ids[1:]}, torch.zeros(11, dtype=torch.long), torch.arange(11))
    tl = tuned_lens.TunedLens(32, [1, 2]).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tl.translators:
            t.delta.copy_(0.2 * torch.randn(32, 32, generator=g, dtype=torch.float64))
            t.bias.copy_(torch.randn(32, generator=g, dtype=torch.float64))
    scores = tuned_lens.compare_lenses(model, tl, data, k=3)
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
        log_p = torch.log_softmax(out.logits[0, :-1], -1)
        for layer in (1, 2):
            msg = f"seed={seed} layer {layer}"
            z = out.hidden_states[layer][0, :-1]  # the output of decoder layer `layer`, before the final norm
            t = tl.translators[layer - 1]
            for name, h in (("logit", z), ("tuned", z @ (torch.eye(32, dtype=torch.float64) + t.delta).T + t.bias)):
                log_q = torch.log_softmax(model.lm_head(model.model.norm(h)), -1)
                p, q = log_p.exp(), log_q.exp()
                ref = {"kl": (q * (log_q - log_p)).sum(-1), "kl_from_output": (p * (log_p - log_q)).sum(-1),
                       "nll": -log_q[torch.arange(11), ids[1:]], "entropy": -(q * log_q).sum(-1),
                       "hit": (log_q.topk(3).indices == ids[1:, None]).any(-1).double()}
                for key, value in ref.items():
                    got = getattr(scores, key.replace("kl", f"kl_{name}", 1) if key.startswith("kl")
                                  else f"{key}_{name}")[layer - 1]
                    torch.testing.assert_close(got, value, rtol=1e-9, atol=1e-10, msg=f"{msg} {name} {key}")
    # layer L: both lenses are the model's output
    assert torch.allclose(scores.kl_tuned[-1], torch.zeros(11, dtype=torch.float64), atol=1e-10), f"seed={seed}"
    torch.testing.assert_close(scores.nll_tuned[-1], -log_p[torch.arange(11), ids[1:]], msg=f"seed={seed}")


def test_untrained_lens_is_the_logit_lens() -> None:
    seed = fresh_seed()
    model = build_tiny_model("gpt_neox", n_layers=4, hidden=32, seed=seed)
    data = probe.collect_probe_data(model, _sequences(seed, 2, 10), offsets=(1,), progress=False)
    scores = tuned_lens.compare_lenses(model, tuned_lens.TunedLens(32, [1, 3]), data)
    for layer in (1, 3):
        for key in ("kl", "nll", "hit", "entropy"):
            torch.testing.assert_close(getattr(scores, f"{key}_tuned")[layer - 1], getattr(scores, f"{key}_logit")[layer - 1],
                                       msg=f"seed={seed} layer {layer} {key}")
    assert torch.isnan(scores.kl_tuned[1]).all(), f"seed={seed}: layer 2 has no translator, its row must be NaN"


@pytest.mark.usefixtures("one_thread")
def test_training_lowers_the_held_out_kl() -> None:
    """The output layer is an affine map of layer 1 (plus the head): the logit lens of layer 1 is far from
    the output, and translators trained on some positions bring it much closer on other positions."""
    seed = fresh_seed()
    model = build_tiny_model("llama", n_layers=2, hidden=32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(32) + torch.randn(32, 32, generator=g) / 32**0.5
    c = torch.randn(32, generator=g)

    def positions(n: int) -> probe.ProbeData:
        z = torch.randn(n, 32, generator=g)
        return probe.ProbeData(torch.stack([z, z @ a.T + c]), {1: torch.randint(0, 257, (n,), generator=g)},
                               torch.arange(n), torch.zeros(n, dtype=torch.long))

    train, test = positions(512), positions(128)
    fit = tuned_lens.fit_tuned_lens(model, train, steps=100, batch_size=64, lr=1e-2, seed=seed, progress=False)
    scores = tuned_lens.compare_lenses(model, fit.lens, test)
    msg = f"seed={seed}"
    losses = fit.losses[0]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), f"{msg}: training loss {losses[:3]} ... {losses[-3:]}"
    before, after = float(scores.kl_logit_from_output[0].mean()), float(scores.kl_tuned_from_output[0].mean())
    assert after < 0.5 * before, f"{msg}: held-out KL(p_L || q_1) {after:.4f}, logit lens {before:.4f}"
    assert float(scores.kl_tuned[0].mean()) < float(scores.kl_logit[0].mean()), f"{msg}: KL(q_1 || p_L) did not fall"
    assert all(p.grad is None for p in model.parameters()), f"{msg}: the model was changed"


def test_bad_input_is_refused_with_a_reason() -> None:
    seed = fresh_seed()
    model = build_tiny_model("llama", n_layers=3, hidden=32, seed=seed)
    data = probe.collect_probe_data(model, _sequences(seed, 2, 8), offsets=(1,), progress=False)
    with pytest.raises(ValueError, match="needs no translator"):
        tuned_lens.fit_tuned_lens(model, data, layers=[3], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        tuned_lens.fit_tuned_lens(model, data, steps=0, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        tuned_lens.TunedLens(32, [1, 1])
    two = probe.collect_probe_data(model, _sequences(seed, 2, 8), offsets=(2,), progress=False)
    with pytest.raises(ValueError, match="next-token targets"):
        tuned_lens.compare_lenses(model, tuned_lens.TunedLens(32, [1]), two)


def test_kl_divergence_ignores_impossible_tokens() -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    log_p[:, 0] = -torch.inf  # p rules token 0 out
    log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
    log_q = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    p = log_p.exp()
    ref = (p[:, 1:] * (log_p[:, 1:] - log_q[:, 1:])).sum(-1)
    torch.testing.assert_close(tuned_lens.kl_divergence(log_p, log_q), ref, msg=f"seed={seed}")
    assert (tuned_lens.kl_divergence(log_q, log_q).abs() < 1e-12).all(), f"seed={seed}"
