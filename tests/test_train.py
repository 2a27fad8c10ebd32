"""mtp_lib.train on tiny models: labels, losses, LoRA, freezing, resume, evaluation, the baseline."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from mtp_lib.heads import MTPModel, shallow_module_copy
from mtp_lib.models import build_tiny_model, get_adapter
from mtp_lib.train import (
    RECIPES,
    TrainConfig,
    _Objective,
    accuracy,
    add_lora,
    balance_losses,
    collate,
    evaluate,
    load_trained,
    merge_lora,
    pack,
    recipe,
    train,
)
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class FakeSample:
    input_ids: list[int]
    target_start: int
    id: str = "fake"


def pattern_samples(seed: int, n: int, min_len: int = 28, max_len: int = 40) -> list[FakeSample]:
    """Arithmetic progressions mod 256 after a random prefix: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        start = rng.randint(3, length - 21)
        a, d = rng.randrange(256), rng.randint(1, 4)
        prefix = [rng.randrange(256) for _ in range(start)]
        out.append(FakeSample(prefix + [(a + d * k) % 256 for k in range(length - start)], start, f"s{i}"))
    return out


def small(name: str, **overrides) -> TrainConfig:
    base = dict(lr=3e-3, effective_batch_size=8, micro_batch_size=4)
    return recipe(name, **{**base, **overrides})


def reference_losses(mtp: MTPModel, samples: list[FakeSample]) -> torch.Tensor:
    """Per-head mean CE over target tokens, one sample at a time, by explicit loops over positions."""
    total = torch.zeros(mtp.n_heads, dtype=torch.float64)
    count = torch.zeros(mtp.n_heads)
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids])
            logp = torch.log_softmax(mtp(ids).logits.double(), -1)[:, 0]
            for n in range(1, mtp.n_heads + 1):
                for t in range(len(s.input_ids) - n):
                    if t + n >= s.target_start:
                        total[n - 1] -= logp[n - 1, t, s.input_ids[t + n]]
                        count[n - 1] += 1
    return total / count


def test_collate_labels_brute_force() -> None:
    seed = fresh_seed()
    samples = pattern_samples(seed, 5)
    batch = collate(samples, n_heads=3)
    T = max(len(s.input_ids) for s in samples)
    assert batch.input_ids.shape == (5, T) and batch.labels.shape == (3, 5, T)
    for b, s in enumerate(samples):
        L = len(s.input_ids)
        assert batch.attention_mask[b].tolist() == [1] * L + [0] * (T - L)
        assert batch.input_ids[b, :L].tolist() == s.input_ids
        for n in range(1, 4):
            for t in range(T):
                want = s.input_ids[t + n] if s.target_start <= t + n < L else -100
                assert batch.labels[n - 1, b, t] == want, f"head {n}, sample {b}, t {t}, seed {seed}"
    with pytest.raises(ValueError, match="target_start"):
        collate([FakeSample([1, 2, 3], 3)], 1)


def test_pack_puts_each_sequence_and_its_labels_in_one_row() -> None:
    seed = fresh_seed()
    samples = pattern_samples(seed, 9, min_len=24, max_len=60)
    padded, packed = collate(samples, n_heads=3), pack(samples, n_heads=3, row_tokens=150)
    assert packed.attention_mask is None and packed.input_ids.shape[1] <= 150
    assert packed.input_ids.shape[1] % 64 == 0 or packed.input_ids.shape[1] == 150, seed
    found, used = 0, [0] * packed.input_ids.shape[0]  # tokens of sequences per row
    for r in range(packed.input_ids.shape[0]):
        pos = packed.position_ids[r].tolist()
        starts = [t for t in range(len(pos)) if pos[t] == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            assert pos[a:b] == list(range(b - a)), seed
            seq = packed.input_ids[r, a:b].tolist()
            match = [i for i, s in enumerate(samples) if s.input_ids == seq]
            if not match:  # the row's padding: no targets
                assert (packed.labels[:, r, a:b] == -100).all() and b == len(pos), seed
                continue
            i = match[0]
            found += 1
            used[r] += b - a
            assert torch.equal(packed.labels[:, r, a:b], padded.labels[:, i, :b - a]), (seed, i)
    assert found == len(samples), seed
    # First fit leaves no two rows that would fit in one: the first sequence of the later row did
    # not fit the earlier one, which has only grown since. (Fewer tokens than padding is not promised:
    # rows rounded up to 64, or to row_tokens, can exceed a batch of similar lengths.)
    assert sum(used) == sum(len(s.input_ids) for s in samples), seed
    assert all(used[i] + used[j] > 150 for i in range(len(used)) for j in range(i)), (seed, used)
    assert packed.input_ids.shape[1] == min(150, -(-max(used) // 64) * 64), (seed, used)
    with pytest.raises(ValueError, match="does not fit rows"):
        pack(samples, 3, row_tokens=4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_type", ["layer", "medusa"])
def test_packed_rows_give_the_padded_batch_losses(family: str, head_type: str) -> None:
    """The same per-head losses from rows of several sequences (attention kept inside each by the
    position ids) as from one padded sequence a row, in float64; for the NTP objective too."""
    seed = fresh_seed()
    model = build_tiny_model(family, seed=seed % 1000).double()
    mtp = MTPModel(model, n_heads=3, weighted_hidden_states=head_type == "layer", head_type=head_type, seed=seed)
    samples = pattern_samples(seed, 6, min_len=24, max_len=40)
    padded, packed = collate(samples, 3), pack(samples, 3, row_tokens=128)
    assert packed.input_ids.shape[0] < len(samples)  # several sequences share a row
    for net, objective in [(mtp, "mtp"), (model, "ntp")]:
        with torch.no_grad():
            want = _Objective(net, objective)(padded.input_ids, padded.attention_mask, padded.labels[:1]
                                              if objective == "ntp" else padded.labels)
            got = _Objective(net, objective)(packed.input_ids, None, packed.labels[:1] if objective == "ntp"
                                             else packed.labels, packed.position_ids)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"{family} {objective} seed {seed}")  # float32 CE


def assert_trained_alike(model, a, b, config: TrainConfig, seed: int) -> None:
    """Two runs of ``config`` on ``model`` logged the same losses and moved the heads alike, up to float32
    rounding. Adam normalizes each gradient entry, so rounding can flip the sign of a near-zero entry's
    update: how far the weights moved apart is compared with how far training moved them."""
    losses = [[e["loss"] for e in r.history if "loss" in e] for r in (a, b)]
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-4), (losses, seed)
    initial = MTPModel(model, n_heads=2, seed=config.seed).heads
    for (n, p), q, p0 in zip(a.model.heads.named_parameters(), b.model.heads.parameters(), initial.parameters()):
        moved = (p - p0).abs().mean()
        assert moved > 0 and (p - q).abs().mean() < 0.1 * moved, (n, seed)


def test_training_on_packed_rows_follows_padded_training() -> None:
    """``train(pack_rows=...)`` trains to the padded run's losses and weights up to float32 rounding."""
    seed = fresh_seed()
    model = build_tiny_model("llama", seed=seed % 1000)
    samples = pattern_samples(seed, 16, min_len=24, max_len=40)
    config = small("diff_lr", seed=seed % 1000, max_steps=3)
    padded = train(model, samples, config, progress=False)
    packed = train(model, samples, config, progress=False, pack_rows=96)
    assert_trained_alike(model, padded, packed, config, seed)
    with pytest.raises(ValueError, match="pack_rows"):
        train(model, samples, config, progress=False, pack_rows=16)


@pytest.mark.parametrize("family", FAMILIES)
def test_objective_losses_match_reference(family: str) -> None:
    seed = fresh_seed()
    model = build_tiny_model(family, seed=seed % 1000).double()
    mtp = MTPModel(model, n_heads=3, weighted_hidden_states=True, seed=seed)
    samples = pattern_samples(seed, 4)
    batch = collate(samples, 3)
    with torch.no_grad():
        mean, rms, counts = _Objective(mtp, "mtp")(batch.input_ids, batch.attention_mask, batch.labels)
    torch.testing.assert_close(mean.double(), reference_losses(mtp, samples), rtol=1e-6, atol=1e-6,
                               msg=f"seed {seed}")
    assert counts.tolist() == [(batch.labels[n] != -100).sum().item() for n in range(3)]
    assert (rms >= mean).all()  # RMS >= mean for non-negative values


def test_balance_losses() -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(3, generator=g, dtype=torch.float64) * 5).requires_grad_()
    rms = torch.rand(3, generator=g, dtype=torch.float64) * 5 + 0.1
    loss = balance_losses(means, rms)
    loss.backward()
    want = [rms[0] / rms[n] for n in range(3)]
    torch.testing.assert_close(loss.detach(), sum(w * m for w, m in zip(want, means.detach())), msg=f"seed {seed}")
    torch.testing.assert_close(means.grad, torch.stack(want), msg=f"seed {seed}")
    zero = balance_losses(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert zero.item() == 1.0  # a head without targets counts 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_exist_and_merge(family: str) -> None:
    seed = fresh_seed()
    model = build_tiny_model(family, seed=seed % 1000).double()
    adapter = get_adapter(model)
    L = adapter.n_layers(model)
    mtp = MTPModel(model, n_heads=2)
    add_lora(mtp.backbone, adapter.lora_targets, seed=seed)
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in mtp.named_modules() if isinstance(m, LoraLayer)]
    assert len(names) == (L - 1) * len(adapter.lora_targets), names
    assert all(n.startswith("backbone.") and n.rsplit(".", 1)[-1] in adapter.lora_targets for n in names)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    # the NTP baseline: LoRA on every layer of a shallow copy; merging gives the same function
    net = add_lora(shallow_module_copy(model), adapter.lora_targets, seed=seed)
    assert sum(isinstance(m, LoraLayer) for m in net.modules()) == L * len(adapter.lora_targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        before = model(ids).logits
        adapted = net(ids).logits
        merged = merge_lora(net)
        assert not any(isinstance(m, LoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-10, atol=1e-10, msg=f"seed {seed}")
        assert (adapted - before).abs().max() > 1e-4
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0, msg="merge changed the model")
    with pytest.raises(ValueError, match="LoRA targets"):
        add_lora(shallow_module_copy(model), ["no_such_proj"])


@pytest.mark.parametrize("name", ["heads_only", "vanilla_joint", "diff_lr_whs", "medusa"])
def test_training_lowers_loss_and_keeps_frozen_parts(name: str) -> None:
    seed = fresh_seed()
    model = build_tiny_model("llama", seed=seed % 1000)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    train_set, held_out = pattern_samples(seed, 32), pattern_samples(seed + 1, 8)
    config = small(name, seed=seed % 1000, lr=1e-2)
    before = reference_losses(MTPModel(model, n_heads=2, head_type=config.head_type,
                                       weighted_hidden_states=config.weighted_hidden_states, seed=config.seed),
                              held_out)
    initial = MTPModel(model, n_heads=2, head_type=config.head_type,
                       weighted_hidden_states=config.weighted_hidden_states, seed=config.seed)
    result = train(model, train_set, config, progress=False)
    mtp = result.model
    after = reference_losses(mtp, held_out)
    trained = slice(1, None) if name == "medusa" else slice(None)  # Medusa's head 1 is the model itself
    assert (after[trained] < before[trained] - 0.02).all(), f"{name}: {before} -> {after}, seed {seed}"
    assert len([e for e in result.history if "loss" in e]) == 4  # 32 samples / 8 per step
    # the given model and every frozen part of the MTP model are bit for bit unchanged
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"model {k} changed, seed {seed}"
    adapter = get_adapter(model)
    for part, ref in [(mtp.final_norm, adapter.final_norm(model)), (mtp.unembed, adapter.unembed(model))]:
        for (n, p), q in zip(part.named_parameters(), ref.parameters()):
            assert torch.equal(p, frozen_param(frozen, model, q)), f"{n} changed"
    for n, p in mtp.backbone.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen_param(frozen, model, p)), f"backbone {n} changed, seed {seed}"
    lora = {n: p for n, p in mtp.backbone.named_parameters() if "lora_B" in n}
    assert bool(lora) == config.joint and all(p.abs().max() > 0 for p in lora.values())
    for (n, p), q in zip(mtp.heads.named_parameters(), initial.heads.parameters()):
        if p.numel() > 1 or name != "medusa":
            assert not torch.equal(p, q), f"head parameter {n} did not train, seed {seed}"
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are restored


def frozen_param(frozen: dict[str, torch.Tensor], model: torch.nn.Module, p: torch.Tensor) -> torch.Tensor:
    """The saved value of the model's parameter that ``p`` is (by storage)."""
    for name, q in model.named_parameters():
        if q.data_ptr() == p.data_ptr():
            return frozen[name]
    raise AssertionError("not a parameter of the model")


@pytest.mark.parametrize("name,stops", [("head_warmup_diff_lr", (1, 3)), ("ntp_baseline", (1,))])
def test_resume_gives_the_same_result(tmp_path, name: str, stops: tuple[int, ...]) -> None:
    """Interrupt after each of ``stops`` steps (counted over both phases; 2 steps a phase), resume in a
    fresh call each time: the same history and weights as an uninterrupted run."""
    seed = fresh_seed()
    family = random.Random(seed).choice(FAMILIES)
    samples = pattern_samples(seed, 16)
    config = small(name, seed=seed % 1000, checkpoint_every=1)
    full = train(build_tiny_model(family), samples, config, progress=False, out_dir=tmp_path / "a")

    class Interrupt(Exception):
        pass

    steps = 0
    stop_at = iter(stops)
    target = next(stop_at)

    def stop(entry: dict) -> None:
        nonlocal steps, target
        steps += "loss" in entry
        if steps == target:
            target = next(stop_at, -1)
            raise Interrupt

    for _ in stops:
        with pytest.raises(Interrupt):
            train(build_tiny_model(family), samples, config, progress=False, out_dir=tmp_path / "b", callback=stop)
    resumed = train(build_tiny_model(family), samples, config, progress=False, out_dir=tmp_path / "b",
                    callback=stop)
    assert target == -1  # every interruption happened (a step interrupted before its checkpoint is redone)
    assert resumed.history == full.history, f"{family}, seed {seed}"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume ({family}, seed {seed})"
    reloaded = load_trained(build_tiny_model(family), tmp_path / "a")
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        want, got = full.model(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{family}, seed {seed}")
    with pytest.raises(ValueError, match="another run.*lr"):
        train(build_tiny_model(family), samples, dataclasses.replace(config, lr=1e-3), out_dir=tmp_path / "b")


def test_ntp_baseline_is_a_plain_model(tmp_path) -> None:
    seed = fresh_seed()
    model = build_tiny_model("gpt_neox", seed=seed % 1000)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, pattern_samples(seed, 16), small("ntp_baseline"), progress=False)
    tuned = result.model
    assert type(tuned) is type(model)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in tuned.modules())
    assert tuned.state_dict().keys() == model.state_dict().keys()
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, frozen[k])]
    assert changed and all("query_key_value.weight" in k for k in changed), changed
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())


def test_evaluate_matches_brute_force() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    model = build_tiny_model(rng.choice(FAMILIES), seed=seed % 1000).double()
    mtp = MTPModel(model, n_heads=3, seed=seed)
    samples = pattern_samples(seed, 5, min_len=30, max_len=45)
    k, last = rng.randint(1, 8), rng.randint(1, 20)
    hits = evaluate(mtp, samples, k=k, last=last, batch_size=2)
    assert len(hits) == 5 and all(h.shape == (3, last) and h.dtype == torch.bool for h in hits)
    with torch.no_grad():
        for s, h in zip(samples, hits):
            logits = mtp(torch.tensor([s.input_ids])).logits[:, 0]
            L = len(s.input_ids)
            for n in range(1, 4):
                for m, j in enumerate(range(L - last, L)):
                    order = torch.argsort(logits[n - 1, j - n], descending=True).tolist()
                    assert h[n - 1, m] == (order.index(s.input_ids[j]) < k), f"k {k}, seed {seed}"
    acc = accuracy(hits)
    assert acc == pytest.approx(torch.stack(hits).float().mean(dim=(0, 2)).tolist())


def test_recipes_and_invalid_configs() -> None:
    assert set(RECIPES) == {"heads_only", "vanilla_joint", "head_warmup", "diff_lr", "head_warmup_diff_lr",
                            "diff_lr_whs", "medusa", "ntp_baseline"}
    assert not RECIPES["heads_only"].joint and RECIPES["vanilla_joint"].joint
    assert RECIPES["head_warmup"].head_warmup_epochs == 1 and RECIPES["diff_lr"].head_lr_multiplier == 4
    assert RECIPES["diff_lr_whs"].weighted_hidden_states and RECIPES["medusa"].head_type == "medusa"
    assert all(c.effective_batch_size == 64 and c.weight_decay == 0.01 and c.lora_rank == 8
               for c in RECIPES.values())
    with pytest.raises(ValueError, match="recipe"):
        recipe("no_such_recipe")
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        recipe("diff_lr", learning_rate=1e-4)
    for bad, match in [(dict(effective_batch_size=60), "multiple"), (dict(objective="x"), "objective"),
                       (dict(head_warmup_epochs=1), "joint=True"), (dict(n_heads=0), "n_heads"),
                       (dict(lr=0.0), "lr"), (dict(mixed_precision="fp8"), "mixed_precision"),
                       (dict(head_init="zeros"), "head_init"), (dict(head_init="copy", head_type="medusa"), "head_init")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="ntp"):
        recipe("ntp_baseline", n_heads=2)
    # head_init joined the config later: at its default it stays out of to_dict, so that results stored
    # under keys made of the dict keep them; set, it is in
    assert "head_init" not in RECIPES["heads_only"].to_dict()
    assert recipe("heads_only", head_init="copy").to_dict()["head_init"] == "copy"
    assert TrainConfig(**recipe("heads_only", head_init="copy").to_dict()).head_init == "copy"
    with pytest.raises(ValueError, match="no full batch"):
        train(build_tiny_model("gpt2"), pattern_samples(0, 7), small("heads_only"), progress=False)


def test_evaluate_gives_every_part_back_its_mode() -> None:
    """evaluate() runs in eval mode and restores each submodule's own mode: a model built in eval
    mode (no dropout) must not come back with dropout on, nor a training one come back in eval."""
    seed = fresh_seed()
    model = build_tiny_model("gpt2", seed=seed % 1000).double()  # GPT-2 configs have dropout 0.1
    mtp = MTPModel(model, n_heads=2, seed=seed)
    assert not mtp.training and not any(m.training for m in mtp.modules()), f"seed {seed}"
    samples = pattern_samples(seed, 3, min_len=30, max_len=40)
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        before = mtp(ids).logits
        evaluate(mtp, samples, k=3, last=5, batch_size=2)
        assert not any(m.training for m in mtp.modules()), f"seed {seed}"
        assert torch.equal(mtp(ids).logits, before), f"seed {seed}: evaluate() switched dropout on"
    mtp.heads.train()  # mixed modes: heads training, backbone frozen in eval
    evaluate(mtp, samples, k=3, last=5, batch_size=2)
    assert all(m.training for m in mtp.heads.modules()) and not mtp.backbone.training, f"seed {seed}"


def test_compiled_layers_train_as_eager_ones() -> None:
    """``train(compile=True)`` compiles each decoder layer (backbone and layer heads), trains to the
    eager run's losses and weights up to float32 rounding, and leaves every layer eager afterwards.
    Lengths vary by batch, so the layers also meet a new sequence length (a recompile)."""
    seed = fresh_seed()
    model = build_tiny_model("llama", seed=seed % 1000)
    samples = pattern_samples(seed, 16, min_len=24, max_len=40)
    config = small("diff_lr", seed=seed % 1000, max_steps=2)
    eager = train(model, samples, config, progress=False)
    compiled = train(model, samples, config, progress=False, compile=True)
    assert_trained_alike(model, eager, compiled, config, seed)
    layers = [m for m in compiled.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) == len(model.model.layers) + 1  # backbone's and head 2's
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in layers)
    import torch._dynamo as dynamo

    from mtp_lib.train import compile_layers

    limit = dynamo.config.recompile_limit
    assert compile_layers(compiled.model, get_adapter(model)) == len(layers)
    assert dynamo.config.recompile_limit == max(limit, 32)
    compile_layers(compiled.model, get_adapter(model), undo=True)
    assert dynamo.config.recompile_limit == limit  # dynamo's own limit again
