"""mtp_lib.probe: affine probes in front of the frozen output head, on tiny random models.

Each test draws a fresh seed (printed in its messages) for the model, the data and the training.
"""

from __future__ import annotations

import random

import pytest
import torch

from mtp_lib import lens, probe
from mtp_lib.models import build_tiny_model, get_adapter
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]


def tiny(family: str, seed: int, *, n_layers: int = 3) -> torch.nn.Module:
    model = build_tiny_model(family, n_layers=n_layers, hidden=32, seed=seed)
    if family == "gemma":
        model.config.final_logit_softcapping = 3.0
    return model


def random_sequences(seed: int, count: int, length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (length,), generator=g) for _ in range(count)]


@pytest.mark.parametrize("family", FAMILIES)
def test_output_head_is_the_models_f_u_and_identity_probe_is_the_logit_lens(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family, seed)
    ids = random_sequences(seed, 1, 15)[0]
    hidden = lens.hidden_states(model, ids)
    head = probe.OutputHead(model)
    identity = probe.AffineProbe(hidden.shape[-1])
    adapter = get_adapter(model)
    for layer in range(hidden.shape[0]):
        msg = f"seed={seed} family={family} layer {layer + 1}"
        with torch.no_grad():
            torch.testing.assert_close(head(hidden[layer]), adapter.logits(model, hidden[layer]), rtol=0, atol=0, msg=msg)
            via_probe = torch.log_softmax(head(identity(hidden[layer])).float(), -1)
        torch.testing.assert_close(via_probe, lens.lens_log_probs(model, hidden[layer]), rtol=0, atol=0, msg=msg)
    assert not any(p.requires_grad for p in head.parameters()), f"seed={seed}"
    assert all(p.requires_grad for p in model.parameters()), f"seed={seed}: the model was changed"


def test_collect_aligns_hidden_states_and_targets() -> None:
    seed = fresh_seed()
    model = tiny(random.Random(seed).choice(FAMILIES), seed)
    seqs = random_sequences(seed, 3, 9)
    data = probe.collect_probe_data(model, seqs, offsets=(1, 2, 3), positions=[None, [0, 4, 6, 7], [8]], progress=False)
    msg = f"seed={seed}"
    # sequence 0: t = 0..5 (t + 3 < 9); sequence 1: 0, 4 (6, 7 lack x_(t+3)); sequence 2: none
    assert data.sequence.tolist() == [0] * 6 + [1] * 2 and data.position.tolist() == [0, 1, 2, 3, 4, 5, 0, 4], msg
    for row, (s, t) in enumerate(zip(data.sequence.tolist(), data.position.tolist())):
        for k in (1, 2, 3):
            assert int(data.targets[k][row]) == int(seqs[s][t + k]), msg
        torch.testing.assert_close(data.hidden[:, row], lens.hidden_states(model, seqs[s])[:, t].float(), msg=msg)
    train, test = data.split(test_fraction=0.5, seed=seed)
    assert len(train) + len(test) == len(data), msg
    assert not set(train.sequence.tolist()) & set(test.sequence.tolist()), msg
    with pytest.raises(ValueError, match="no position"):
        probe.collect_probe_data(model, [seqs[0][:2]], progress=False)


def test_lens_scores_agree_with_lens_stats() -> None:
    """evaluate_probe(None) is the logit lens: same top-5 accuracy as LensStats on the same positions."""
    seed = fresh_seed()
    model = tiny(random.Random(seed).choice(FAMILIES), seed)
    seqs = random_sequences(seed, 4, 12)
    data = probe.collect_probe_data(model, seqs, progress=False)
    stats = lens.lens_stats_many(model, seqs, positions=[list(range(10))] * 4, progress=False)
    for layer in range(data.n_layers):
        for offset, target in ((1, "next"), (2, "next2")):
            score = probe.evaluate_probe(model, None, data.hidden[layer], data.targets[offset], k=5, max_elements=700)
            want = float(stats.top_k_accuracy(5, target)[layer])
            assert score.accuracy == pytest.approx(want, abs=1e-12), f"seed={seed} layer {layer + 1} {target}"
            same = probe.evaluate_probe(model, probe.AffineProbe(data.hidden.shape[-1]), data.hidden[layer],
                                        data.targets[offset])
            assert same.accuracy == score.accuracy and same.nll == pytest.approx(score.nll, rel=1e-6), (
                f"seed={seed}: an untrained probe differs from the lens (or chunking changes the score)")


def synthetic_task(seed: int, n: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Random h and targets y = argmax f_u(R h) for a random matrix R: an affine probe can fit it exactly."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    rot = torch.randn(d, d, generator=g) / d**0.5
    hidden = torch.randn(n, d, generator=g) * 2
    with torch.no_grad():
        targets = probe.OutputHead(model)(hidden @ rot.T).argmax(-1)
    return hidden, targets


def test_fit_learns_a_linear_task_and_beats_chance() -> None:
    seed = fresh_seed()
    model = tiny("llama", seed)
    hidden, targets = synthetic_task(seed, 3000, model)
    train_h, test_h, train_y, test_y = hidden[:2400], hidden[2400:], targets[:2400], targets[2400:]
    fit = probe.fit_probe(model, train_h, train_y, steps=150, batch_size=128, lr=1e-2, seed=seed, progress=False)
    msg = f"seed={seed}"
    assert sum(fit.losses[-10:]) / 10 < 0.85 * sum(fit.losses[:3]) / 3, f"{msg}: losses {fit.losses[::15]}"
    trained = probe.evaluate_probe(model, fit.probe, test_h, test_y)
    plain = probe.evaluate_probe(model, None, test_h, test_y)
    chance = 5 / 257
    assert trained.accuracy > max(0.5, 3 * chance, plain.accuracy + 0.2), f"{msg}: {trained} vs lens {plain}"
    assert trained.nll < plain.nll, msg


def test_fit_is_seeded_chunk_invariant_and_leaves_the_model_alone() -> None:
    seed = fresh_seed()
    model = tiny(random.Random(seed).choice(FAMILIES), seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hidden, targets = synthetic_task(seed, 200, model)
    kwargs = dict(steps=12, batch_size=64, lr=1e-2, seed=seed, progress=False)
    a = probe.fit_probe(model, hidden, targets, **kwargs)
    b = probe.fit_probe(model, hidden, targets, **kwargs)
    chunked = probe.fit_probe(model, hidden, targets, max_elements=5 * 257, **kwargs)  # micro-batches of 5
    other = probe.fit_probe(model, hidden, targets, **{**kwargs, "seed": seed + 1})
    msg = f"seed={seed}"
    assert a.losses == b.losses and torch.equal(a.probe.delta, b.probe.delta), msg
    torch.testing.assert_close(torch.tensor(chunked.losses), torch.tensor(a.losses), rtol=1e-4, atol=1e-5, msg=msg)
    torch.testing.assert_close(chunked.probe.delta, a.probe.delta, rtol=1e-3, atol=1e-5, msg=msg)
    assert other.losses != a.losses, msg
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{msg}: {name} changed"
    assert all(p.grad is None for p in model.parameters()), msg


def test_layerwise_probes_report() -> None:
    seed = fresh_seed()
    model = tiny("gpt2", seed, n_layers=2)
    data = probe.collect_probe_data(model, random_sequences(seed, 6, 20), progress=False)
    train, test = data.split(seed=seed)
    result = probe.layerwise_probes(model, train, test, offset=2, layers=[2], steps=5, seed=seed, progress=False)
    msg = f"seed={seed}"
    assert result.layers == [2] and len(result.probes) == 1 and len(result.losses[0]) == 5, msg
    lens_score = probe.evaluate_probe(model, None, test.hidden[1], test.targets[2])
    assert result.lens[0] == lens_score, msg
    frame = result.to_dataframe()
    assert list(frame["method"]) == ["lens", "probe"] and list(frame["depth"]) == [1.0, 1.0], msg
    with pytest.raises(ValueError, match="offset=3"):
        probe.layerwise_probes(model, train, test, offset=3, progress=False)
    with pytest.raises(ValueError, match="layers"):
        probe.layerwise_probes(model, train, test, layers=[0], progress=False)


def test_invalid_input_raises_clear_errors() -> None:
    model = tiny("llama", 0)
    hidden, targets = torch.randn(10, 32), torch.randint(0, 257, (10,))
    cases = [
        (lambda: probe.fit_probe(model, hidden[None], targets, progress=False), "hidden must be"),
        (lambda: probe.fit_probe(model, hidden, targets[:5], progress=False), "targets must be"),
        (lambda: probe.fit_probe(model, hidden, targets + 300, progress=False), r"\[0, 257\)"),
        (lambda: probe.fit_probe(model, hidden, targets, steps=0, progress=False), "steps"),
        (lambda: probe.fit_probe(model, hidden, targets, lr=0.0, progress=False), "lr"),
        (lambda: probe.fit_probe(model, hidden, targets, max_elements=0, progress=False), "max_elements"),
        (lambda: probe.fit_probe(model, hidden, targets, device="nonsense", progress=False), "device"),
        (lambda: probe.evaluate_probe(model, None, hidden, targets, k=0), "k must"),
        (lambda: probe.collect_probe_data(model, [], progress=False), "empty"),
        (lambda: probe.collect_probe_data(model, [[1, 2, 3]], offsets=(0,), progress=False), "offsets"),
        (lambda: probe.collect_probe_data(model, [[1, 2, 3]], positions=[None, None], progress=False), "positions"),
        (lambda: probe.AffineProbe(0), "d_model"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()
    data = probe.collect_probe_data(model, [list(range(8))], progress=False)
    with pytest.raises(ValueError, match="two sequences"):
        data.split()
