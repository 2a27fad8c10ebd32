"""mtp_lib.train checkpoints on tiny models: only the run that wrote a checkpoint resumes it; training
mode (dropout) with seeded generators resumes exactly."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from mtp_lib.models import build_tiny_model
from mtp_lib.train import recipe, train
from seeds import fresh_seed
from test_train import FAMILIES, pattern_samples, small

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def stop_after(n_steps: int):
    """A callback that interrupts a call of train once ``n_steps`` new optimizer steps are checkpointed
    (with checkpoint_every=1: when the next step is recorded, before its checkpoint)."""
    seen = 0

    def stop(entry: dict) -> None:
        nonlocal seen
        seen += "loss" in entry
        if seen == n_steps + 1:
            raise Interrupt
    return stop


def same_weights(a: torch.nn.Module, b: torch.nn.Module, msg: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), msg
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs: {msg}"


def test_a_checkpoint_resumes_only_its_own_run(tmp_path: Path) -> None:
    """The issue's case: another run's finished checkpoint in out_dir used to be returned as the result.
    Each difference (samples, evaluation samples, model, starting weights, config) is refused, naming it."""
    seed = fresh_seed()
    rng = random.Random(seed)
    family = rng.choice(FAMILIES)
    samples, other = pattern_samples(seed, 16), pattern_samples(seed + 1, 16)
    config = small("heads_only", seed=seed % 1000)
    first = train(build_tiny_model(family), samples, config, progress=False, out_dir=tmp_path)
    # the same run again: the finished result comes back, nothing is trained
    calls: list[dict] = []
    again = train(build_tiny_model(family), samples, config, progress=False, out_dir=tmp_path, callback=calls.append)
    assert calls == [] and again.history == first.history, f"seed {seed}"
    same_weights(first.model, again.model, f"{family}, seed {seed}")
    other_family = rng.choice([f for f in FAMILIES if f != family])
    for kwargs, match in [
        (dict(samples=other), r"training samples \(16 with digest \w+ there, 16 with digest \w+ here\)"),
        (dict(samples=samples[:8] + samples[8:][::-1]), "training samples"),  # same samples, another order
        (dict(eval_samples=other[:2]), "evaluation samples"),
        (dict(model=build_tiny_model(other_family)), "the model"),
        (dict(model=build_tiny_model(family, seed=1 + seed % 1000)), "starting weights"),
        (dict(config=dataclasses.replace(config, lr=1e-3)), r"training config's lr \(0.003 there, 0.001 here\)"),
        (dict(config=recipe("vanilla_joint", **{k: getattr(config, k) for k in
                                                ("lr", "effective_batch_size", "micro_batch_size", "seed")})),
         "training config's joint"),
    ]:
        args = dict(model=build_tiny_model(family), samples=samples, config=config) | kwargs
        with pytest.raises(ValueError, match=match) as err:
            train(args.pop("model"), args.pop("samples"), args.pop("config"), progress=False, out_dir=tmp_path,
                  **args)
        assert "resume=False" in str(err.value), f"{err.value}"
    # resume=False starts over: the result equals a run in a fresh folder, and the folder holds it
    fresh = train(build_tiny_model(family), other, config, progress=False, out_dir=tmp_path, resume=False)
    want = train(build_tiny_model(family), other, config, progress=False)
    same_weights(fresh.model, want.model, f"{family}, seed {seed}")
    assert fresh.history == want.history
    again = train(build_tiny_model(family), other, config, progress=False, out_dir=tmp_path, callback=calls.append)
    same_weights(again.model, want.model, f"{family}, seed {seed}")
    assert calls == []


def test_foreign_or_old_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    seed = fresh_seed()
    samples = pattern_samples(seed, 8)
    config = small("heads_only", seed=seed % 1000)
    run = lambda: train(build_tiny_model("llama"), samples, config, progress=False, out_dir=tmp_path)  # noqa: E731
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(random.Random(seed).randbytes(100))
    with pytest.raises(ValueError, match="is not a checkpoint of mtp_lib.train.*resume=False"):
        run()
    torch.save({"model": torch.zeros(3)}, ckpt)  # some other program's checkpoint
    with pytest.raises(ValueError, match="is not a checkpoint of mtp_lib.train.*resume=False"):
        run()
    # a checkpoint of the format before fingerprints (config, no fingerprint) of another model: before,
    # a raw KeyError; now refused, as nothing says what it was trained on
    torch.save({"config": config.to_dict(), "phase": 1, "step": 0, "history": [],
                "trainable": {"heads.0.other.weight": torch.zeros(2)}, "optimizer": None, "scheduler": None}, ckpt)
    with pytest.raises(ValueError, match="older mtp_lib.train.*resume=False"):
        run()
    result = train(build_tiny_model("llama"), samples, config, progress=False, out_dir=tmp_path, resume=False)
    assert [e["step"] for e in result.history] == [1]


@pytest.mark.parametrize("name,stops", [("head_warmup_diff_lr", (1, 2)), ("vanilla_joint", (1,))])
def test_dropout_run_resumes_bit_for_bit(tmp_path: Path, name: str, stops: tuple[int, ...]) -> None:
    """GPT-2's configs have dropout 0.1 (and LoRA dropout 0.2 here): a run interrupted after each call
    has checkpointed ``stops`` new steps (2 steps a phase) and resumed gives the weights and history of an uninterrupted run, bit for bit;
    the dropout is real (eval-mode training gives other weights); the caller's RNG is left alone."""
    seed = fresh_seed()
    samples = pattern_samples(seed, 16)
    config = small(name, seed=seed % 1000, checkpoint_every=1, lora_dropout=0.2)
    torch.manual_seed(seed)
    full = train(build_tiny_model("gpt2"), samples, config, progress=False, out_dir=tmp_path / "a")
    after = torch.rand(4)
    torch.manual_seed(seed)
    assert torch.equal(after, torch.rand(4)), f"train moved the caller's RNG, seed {seed}"
    for stop in stops:
        with pytest.raises(Interrupt):
            train(build_tiny_model("gpt2"), samples, config, progress=False, out_dir=tmp_path / "b",
                  callback=stop_after(stop))
    torch.manual_seed(seed + 1)  # another global RNG state at resume: must not matter
    resumed = train(build_tiny_model("gpt2"), samples, config, progress=False, out_dir=tmp_path / "b")
    assert resumed.history == full.history, f"seed {seed}"
    same_weights(full.model, resumed.model, f"{name}, seed {seed}")
    no_dropout = train(build_tiny_model("gpt2"), samples, dataclasses.replace(config, train_mode=False),
                       progress=False)
    moved = [k for k, v in no_dropout.model.state_dict().items() if not torch.equal(v, full.model.state_dict()[k])]
    assert moved, f"train_mode made no difference on a model with dropout, seed {seed}"
    assert not full.model.training and not any(m.training for m in full.model.modules())


def test_train_mode_changes_nothing_without_dropout() -> None:
    """Models without dropout train to the same weights in either mode (so results stored before
    train_mode existed, on such models, stay valid under the unchanged key)."""
    seed = fresh_seed()
    family = random.Random(seed).choice(["llama", "gemma", "gpt_neox"])
    samples = pattern_samples(seed, 16)
    config = small("diff_lr_whs", seed=seed % 1000)
    model = build_tiny_model(family)
    model.train()  # the given model's modes come back as they were
    a = train(model, samples, config, progress=False)
    assert all(m.training for m in model.modules())
    b = train(model, samples, dataclasses.replace(config, train_mode=False), progress=False)
    same_weights(a.model, b.model, f"{family}, seed {seed}")
    assert a.history == b.history
    assert "train_mode" not in config.to_dict() and dataclasses.replace(config, train_mode=False).to_dict()[
        "train_mode"] is False
