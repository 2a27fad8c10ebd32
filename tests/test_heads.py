"""mtp_lib.heads on the four tiny families, in float64 against the plain HF model as reference."""

from __future__ import annotations

import random

import pytest
import torch

from mtp_lib.heads import LayerHead, MedusaHead, MTPModel, NextTokenHead
from mtp_lib.models import build_tiny_model, get_adapter
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]
# Gemma3 tiny models: with 4 layers every layer (the head's too) is sliding-window (64 tokens),
# with 6 the last one is global. Sequences of 80 tokens cross the window.
SHAPES = [(f, 4) for f in FAMILIES] + [("gemma", 6)]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str, n_layers: int = 4) -> torch.nn.Module:
    return build_tiny_model(family, n_layers=n_layers, seed=fresh_seed() % 1000).double()


def random_ids(seed: int, batch: int = 2, seq: int = 80) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


@pytest.mark.parametrize("family,n_layers", SHAPES)
def test_head1_reproduces_model_and_other_heads_differ(family: str, n_layers: int) -> None:
    seed = fresh_seed()
    model = tiny(family, n_layers)
    for p in model.parameters():  # as from_pretrained marks them: the heads' re-initialization must not skip
        p._is_hf_initialized = True
    ids = random_ids(seed)
    mtp = MTPModel(model, n_heads=3, seed=seed)
    with torch.no_grad():
        ref = model(ids).logits
        logits = mtp(ids).logits
    assert logits.shape == (3, *ref.shape), f"seed {seed}"
    torch.testing.assert_close(logits[0], ref, rtol=1e-10, atol=1e-10, msg=f"head 1 vs model, seed {seed}")
    for n in (1, 2):  # heads 2 and 3 start random, each its own
        assert (logits[n] - ref).abs().max() > 1e-3, f"head {n + 1} equals the model, seed {seed}"
    adapter = get_adapter(model)
    last = adapter.layers(model)[-1]
    for n, head in enumerate(mtp.heads):
        assert isinstance(head, LayerHead)
        layer = getattr(head.body, adapter.layers_attr)[0]
        same = all(torch.equal(a, b) for a, b in zip(layer.parameters(), last.parameters()))
        assert same == (n == 0), f"head {n + 1}: copied from the last layer = {same}, seed {seed}"
        assert all(p.data_ptr() != q.data_ptr() for p in layer.parameters() for q in last.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_building_and_using_leaves_model_unchanged(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(name, type(m).__name__, m.training) for name, m in model.named_modules()]
    layer_idx = [getattr(m, "layer_idx", None) for m in model.modules()]
    config = model.config.to_dict()
    ids = random_ids(seed, seq=20)
    ref = model(ids).logits.detach()
    for kwargs in [dict(), dict(weighted_hidden_states=True), dict(head_type="medusa")]:
        mtp = MTPModel(model, n_heads=2, **kwargs)
        mtp.train()
        out = mtp(ids, use_cache=True)
        out.logits.sum().backward()
        with torch.no_grad():  # change every head parameter: none of them may be the model's
            for p in mtp.heads.parameters():
                p.add_(1.0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed, seed {seed}"
    assert [(n, type(m).__name__, m.training) for n, m in model.named_modules()] == structure
    assert [getattr(m, "layer_idx", None) for m in model.modules()] == layer_idx
    assert model.config.to_dict() == config
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_positions(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family)
    ids = random_ids(seed, batch=3, seq=17)
    V = get_adapter(model).unembed(model).weight.shape[0]
    for head_type in ("layer", "medusa"):
        for n_heads in (1, 2, 4):
            mtp = MTPModel(model, n_heads=n_heads, head_type=head_type)
            assert isinstance(mtp.heads, torch.nn.ModuleList) and len(mtp.heads) == n_heads
            with torch.no_grad():
                full = mtp(ids)
                last = mtp(ids, last_only=True)
                picked = mtp(ids, logits_positions=torch.tensor([3, 0, 16]))
            assert full.logits.shape == (n_heads, 3, 17, V)
            assert full.states.shape == (n_heads, 3, 17, mtp.hidden_size)
            assert last.logits.shape == (n_heads, 3, 1, V)
            torch.testing.assert_close(last.logits[:, :, 0], full.logits[:, :, -1], msg=f"seed {seed}")
            torch.testing.assert_close(picked.logits, full.logits[:, :, [3, 0, 16]], msg=f"seed {seed}")
            torch.testing.assert_close(mtp.unembed_states(full.states), full.logits, msg=f"seed {seed}")


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_hidden_states(family: str) -> None:
    """Head n's input is softmax(w_n / 0.1) . [z^1 .. z^{L-1}], checked against the model's own layers."""
    seed = fresh_seed()
    model = tiny(family, 5)
    ids = random_ids(seed, seq=24)
    mtp = MTPModel(model, n_heads=2, weighted_hidden_states=True)
    w0 = mtp.whs_weights()
    assert w0.shape == (2, 4)
    torch.testing.assert_close(w0, torch.full((2, 4), 0.25, dtype=torch.float32), msg="uniform at init")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in mtp.heads:
            head.mix.weight.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    w = mtp.whs_weights()
    torch.testing.assert_close(w.sum(-1), torch.ones(2), msg=f"seed {seed}")
    assert (w > 0).all()
    # reference: the model's own layer outputs z^1 .. z^4, by hooks, mixed by hand
    adapter = get_adapter(model)
    zs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: zs.append(o if torch.is_tensor(o) else o[0]))
             for layer in adapter.layers(model)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    seen: list[torch.Tensor] = []
    probes = [getattr(head.body, adapter.layers_attr)[0].register_forward_pre_hook(lambda m, a, k: seen.append(
        (a[0] if a else next(iter(k.values()))).clone()), with_kwargs=True) for head in mtp.heads]
    with torch.no_grad():
        mtp(ids)
    for p in probes:
        p.remove()
    for n in range(2):
        want = sum(w[n, l].double() * zs[l] for l in range(4))
        torch.testing.assert_close(seen[n], want, rtol=1e-10, atol=1e-10, msg=f"head {n + 1}, seed {seed}")


@pytest.mark.parametrize("family,n_layers", SHAPES)
@pytest.mark.parametrize("kind", ["layer", "whs", "medusa"])
def test_cache_two_pieces_and_crop(family: str, n_layers: int, kind: str) -> None:
    seed = fresh_seed()
    model = tiny(family, n_layers)
    mtp = MTPModel(model, n_heads=2, weighted_hidden_states=kind == "whs",
                   head_type="medusa" if kind == "medusa" else "layer", seed=seed)
    rng = random.Random(seed)
    ids = random_ids(seed, seq=80)
    draft = random_ids(seed + 1, seq=rng.randint(1, 12))
    cut = rng.randint(1, 79)
    with torch.no_grad():
        full = mtp(ids).logits
        first = mtp(ids[:, :cut], use_cache=True)
        second = mtp(ids[:, cut:], cache=first.cache, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 2), full, rtol=1e-10, atol=1e-10,
                                   msg=f"cut {cut}, seed {seed}")
        assert second.cache.get_seq_length() == 80
        # a rejected draft: feed it, crop it away, then feed the true continuation
        cache = mtp.new_cache(rollback=True)
        out = mtp(ids[:, :cut], cache=cache, use_cache=True)
        out = mtp(draft, cache=out.cache, use_cache=True)
        out.cache.crop(cut)
        assert out.cache.get_seq_length() == cut
        out = mtp(ids[:, cut:], cache=out.cache, use_cache=True, last_only=True)
        torch.testing.assert_close(out.logits[:, :, 0], full[:, :, -1], rtol=1e-10, atol=1e-10,
                                   msg=f"cut {cut}, draft {draft.shape[1]}, seed {seed}")
        if family == "gemma":  # sliding-window layers past their window: only the last call can be undone
            with pytest.raises(ValueError, match="sliding-window"):
                out.cache.crop(cut - 1)
            with pytest.raises(ValueError, match="sliding-window"):
                second.cache.crop(79)  # a cache made without rollback=True


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_matches_unpadded(family: str) -> None:
    """A right-padded batch with its attention mask gives each sequence's own logits (the trainer pads so)."""
    seed = fresh_seed()
    model = tiny(family)
    mtp = MTPModel(model, n_heads=2, weighted_hidden_states=True, seed=seed)
    a, b = random_ids(seed, batch=1, seq=30), random_ids(seed + 1, batch=1, seq=19)
    batch = torch.full((2, 30), 256)
    batch[0], batch[1, :19] = a[0], b[0]
    mask = torch.zeros(2, 30, dtype=torch.long)
    mask[0], mask[1, :19] = 1, 1
    with torch.no_grad():
        padded = mtp(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[:, 0], mtp(a).logits[:, 0], rtol=1e-10, atol=1e-10, msg=f"seed {seed}")
        torch.testing.assert_close(padded[:, 1, :19], mtp(b).logits[:, 0], rtol=1e-10, atol=1e-10,
                                   msg=f"seed {seed}")


@pytest.mark.parametrize("family", FAMILIES)
def test_medusa_heads(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family)
    ids = random_ids(seed, seq=15)
    mtp = MTPModel(model, n_heads=4, head_type="medusa")
    assert isinstance(mtp.heads[0], NextTokenHead) and not list(mtp.heads[0].parameters())
    blocks = list(mtp.heads)[1:]
    assert all(isinstance(b, MedusaHead) for b in blocks)
    assert len({id(b) for b in blocks}) == 3 and len({b.linear.weight.data_ptr() for b in blocks}) == 3
    assert all(torch.count_nonzero(b.linear.weight) == 0 for b in blocks)
    adapter = get_adapter(model)
    with torch.no_grad():
        logits = mtp(ids).logits
        torch.testing.assert_close(logits[0], model(ids).logits, rtol=1e-10, atol=1e-10, msg=f"seed {seed}")
        # block k: unembed(h + SiLU(b_k)) with h the final normed hidden state (W = 0 at init)
        h = model(ids, output_hidden_states=True).hidden_states[-1]
        for k, block in enumerate(blocks, start=1):
            want = adapter.logits(model, h + torch.nn.functional.silu(block.linear.bias), normed=True)
            torch.testing.assert_close(logits[k], want, rtol=1e-10, atol=1e-10, msg=f"head {k + 1}, seed {seed}")


@pytest.mark.parametrize("kind", ["layer", "whs", "medusa"])
def test_save_and_load_heads(tmp_path, kind: str) -> None:
    seed = fresh_seed()
    model = tiny("llama")
    opts = dict(n_heads=3, weighted_hidden_states=kind == "whs", head_type="medusa" if kind == "medusa" else "layer")
    mtp = MTPModel(model, seed=seed, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make the heads unlike any fresh initialization
        for p in mtp.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    path = mtp.save_heads(tmp_path / "heads.safetensors")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_bytes = sum(p.numel() * p.element_size() for p in mtp.heads.parameters())
    assert path.stat().st_size < head_bytes + 10_000 < model_bytes + 10_000
    other = MTPModel(model, seed=seed + 1, **opts)
    ids = random_ids(seed, seq=12)
    with torch.no_grad():
        assert kind == "medusa" or not torch.equal(other(ids).logits, mtp(ids).logits)
        other.load_heads(path)
        torch.testing.assert_close(other(ids).logits, mtp(ids).logits, rtol=0, atol=0, msg=f"seed {seed}")
        again = MTPModel.from_saved(model, path)
        torch.testing.assert_close(again(ids).logits, mtp(ids).logits, rtol=0, atol=0, msg=f"seed {seed}")
    with pytest.raises(ValueError, match="do not fit"):
        MTPModel(model, n_heads=2, head_type=opts["head_type"]).load_heads(path)
    with pytest.raises(ValueError, match="not a file"):
        other.load_heads(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("family,n_layers", SHAPES)
def test_copy_init_starts_every_head_as_the_last_layer(tmp_path, family: str, n_layers: int) -> None:
    seed = fresh_seed()
    model = tiny(family, n_layers)
    ids = random_ids(seed)
    mtp = MTPModel(model, n_heads=3, seed=seed, head_init="copy")
    assert mtp.options()["head_init"] == "copy"
    with torch.no_grad():
        ref = model(ids).logits
        logits = mtp(ids).logits
    for n in range(3):  # every head predicts x_{t+1} at first: the copy of the last layer
        torch.testing.assert_close(logits[n], ref, rtol=1e-10, atol=1e-10, msg=f"head {n + 1}, seed {seed}")
    adapter = get_adapter(model)
    last = adapter.layers(model)[-1]
    layers = [getattr(head.body, adapter.layers_attr)[0] for head in mtp.heads]
    for layer in layers:  # copies, not shared: training one head moves no other part
        assert all(p.data_ptr() != q.data_ptr() for p in layer.parameters() for q in last.parameters())
    assert layers[1].parameters().__next__().data_ptr() != layers[2].parameters().__next__().data_ptr()
    path = mtp.save_heads(tmp_path / "heads.safetensors")
    assert MTPModel.from_saved(model, path).options()["head_init"] == "copy", f"seed {seed}"


def test_invalid_arguments() -> None:
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="n_heads"):
        MTPModel(model, n_heads=0)
    with pytest.raises(ValueError, match="head_type"):
        MTPModel(model, head_type="linear")
    with pytest.raises(ValueError, match="weighted_hidden_states"):
        MTPModel(model, weighted_hidden_states=True, head_type="medusa")
    with pytest.raises(ValueError, match="head_init"):
        MTPModel(model, head_init="zeros")
    with pytest.raises(ValueError, match="head_init"):
        MTPModel(model, head_init="copy", head_type="medusa")
    with pytest.raises(ValueError, match="weighted_hidden_states=False"):
        MTPModel(model).whs_weights()
    mtp = MTPModel(model)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids"):
        mtp(ids[0])
    with pytest.raises(ValueError, match="last_only"):
        mtp(ids, last_only=True, logits_positions=slice(0, 1))
    with pytest.raises(ValueError, match="use_cache"):
        mtp(ids, cache=mtp.new_cache())
    with pytest.raises(ValueError, match="length"):
        mtp(ids, use_cache=True).cache.crop(4)
    with pytest.raises(ValueError, match="model_type"):
        MTPModel(torch.nn.Linear(2, 2))
