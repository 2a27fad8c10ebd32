"""Pretraining one size of the suite on the token stream: Pythia's recipe, scaled down.

The loop is plain PyTorch on ``accelerate`` (one process per GPU, DDP, or one CPU process; the same
command on one GPU or several): bf16 autocast, SDPA attention, ``torch.compile`` of the model and
its loss, fused AdamW. Every size sees the same windows of the stream in the same order: step ``s``
reads the global batch ``order[s*B:(s+1)*B]`` of the window order, a fresh permutation of the
stream's windows per epoch drawn from ``seed``; process ``r`` of ``w`` takes rows ``r::w``.

Schedule (Pythia): linear warmup over 1% of the steps, cosine decay to 10% of the peak learning
rate; AdamW (0.9, 0.95), eps 1e-8, weight decay 0.01 on matrices only; gradients clipped to 1.

Checkpoints in ``out_dir``: ``last.pt`` (weights, optimizer, scheduler, step, RNG states, history,
and the fingerprints of the stream, the model and the recipe) every ``checkpoint_every`` steps, so a
killed run resumes exactly; ``step-XXXXXX.safetensors`` weights at steps 0, 1, 2, 4, 8, ... and the
last (log-spaced, as Pythia's), kept for the analyses along training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtp_lib.suite import shapes

__all__ = ["TrainSpec", "batch_windows", "learning_rate", "load_snapshot", "pretrain", "snapshot_path", "snapshot_steps"]


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """One size's recipe. ``lr`` None: Pythia's for the size. ``micro_batch`` 0: the whole share."""

    size: str
    steps: int
    batch_size: int = 64
    seq_len: int = 1024
    lr: float | None = None
    warmup: float = 0.01
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 1234
    micro_batch: int = 0
    compile: bool | str = True  # torch.compile the forward and loss (a str: its mode, e.g. "max-autotune")
    log_every: int = 10
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        shapes.shape(self.size)
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else shapes.shape(self.size).lr

    def recipe(self) -> dict[str, Any]:
        """What the trained weights depend on (not how fast or where they were computed)."""
        out = dataclasses.asdict(self)
        for key in ("micro_batch", "compile", "log_every", "checkpoint_every"):
            out.pop(key)
        return out | {"peak_lr": self.peak_lr}


def learning_rate(spec: TrainSpec, step: int) -> float:
    """Linear warmup to the peak over ``warmup`` of the steps, then cosine to ``min_lr_ratio`` of it."""
    warm = max(1, round(spec.warmup * spec.steps))
    if step < warm:
        return spec.peak_lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, spec.steps - warm))
    return spec.peak_lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_windows(step: int, batch_size: int, n_windows: int, seed: int) -> np.ndarray:
    """Window indices of the global batch at ``step``: positions ``step*B .. step*B+B-1`` of the
    concatenated per-epoch permutations (epoch ``e`` permuted by ``default_rng([seed, e])``)."""
    flat = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(flat, n_windows)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_windows)
        out[epochs == e] = perm[offsets[epochs == e]]
    return out


def snapshot_steps(steps: int) -> list[int]:
    """0, 1, 2, 4, 8, ... below ``steps``, and ``steps``."""
    out, s = [0], 1
    while s < steps:
        out.append(s)
        s *= 2
    return out + [steps]


def _windows(tokens: np.ndarray, idx: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) for i in idx]
    return torch.from_numpy(np.stack(rows))


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # next-token cross-entropy over the window: inputs x_0..x_{T-1}, targets x_1..x_T
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def _optimizer(model: torch.nn.Module, spec: TrainSpec, fused: bool) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.peak_lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _fingerprints(stream_fp: str, config: Any, spec: TrainSpec) -> dict[str, Any]:
    return {"data": stream_fp, "model": json.loads(config.to_json_string(use_diff=False)), "recipe": spec.recipe()}


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for part in ("data", "model", "recipe"):
        a, b = stored.get(part), wanted[part]
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "transformers_version"]
        elif a != b:
            out.append(f"{part}: checkpoint {a!r}, now {b!r}")
    return out


def _read_checkpoint(path: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise RuntimeError(f"{path} cannot be read ({type(err).__name__}: {err}); it is corrupted or not a "
                           "suite checkpoint. Move it away to start this size again (its log-spaced "
                           "snapshots beside it are kept), or pass fresh=True.") from None
    if not isinstance(state, dict) or "fingerprints" not in state:
        raise RuntimeError(f"{path} is not a checkpoint of mtp_lib.suite.pretrain: move it away or pass fresh=True")
    diff = _differences(state["fingerprints"], wanted)
    if diff:
        raise RuntimeError(f"{path} belongs to another run; it differs in: " + "; ".join(diff)
                           + ". Use another out_dir, or pass fresh=True to discard it and train from step 0.")
    return state


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot_path(folder: Path, step: int) -> Path:
    """The file of the weights saved at ``step``."""
    return folder / f"step-{step:06d}.safetensors"


def load_snapshot(folder: Path, step: int, config: Any) -> torch.nn.Module:
    """The weights saved at ``step`` as a ``GPTNeoXForCausalLM`` in eval mode."""
    from safetensors.torch import load_file
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(config)
    model.load_state_dict(load_file(str(snapshot_path(folder, step))))
    return model.eval()


def _save_snapshot(model: torch.nn.Module, folder: Path, step: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snapshot_path(folder, step)))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_fits(spec: TrainSpec, vocab: int, micro: int, device: torch.device) -> None:
    if device.type != "cuda":
        return
    need = shapes.memory_estimate(spec.size, vocab, micro, spec.seq_len)
    have = torch.cuda.get_device_properties(device).total_memory
    if need > 0.9 * have:
        raise RuntimeError(f"size {spec.size} with {micro} sequences of {spec.seq_len} per micro step needs about "
                           f"{need / 2**30:.0f} GiB, the device has {have / 2**30:.0f} GiB: lower micro_batch "
                           "(gradients accumulate, the result is the same) or choose a smaller size")


def _timed_region(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Run:
    """The state of one training run on this process: model, optimizer, step, history, timings."""

    def __init__(self, tokens: np.ndarray, stream_fp: str, vocab_size: int, eos_id: int, spec: TrainSpec,
                 out_dir: Path, fresh: bool) -> None:
        from accelerate import Accelerator
        from transformers import GPTNeoXForCausalLM

        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.spec, self.tokens, self.out_dir = spec, tokens, out_dir
        world = self.acc.num_processes
        if spec.batch_size % world:
            raise ValueError(f"batch_size {spec.batch_size} does not split over {world} processes")
        self.share = spec.batch_size // world
        self.micro = spec.micro_batch or self.share
        if self.share % self.micro:
            raise ValueError(f"micro_batch {self.micro} does not divide the {self.share} sequences per process")
        self.n_windows = (len(tokens) - 1) // spec.seq_len
        if self.n_windows < 1:
            raise ValueError(f"the stream has {len(tokens)} tokens: fewer than one window of {spec.seq_len}")
        self.config = shapes.gpt_neox_config(spec.size, vocab_size, max_positions=max(2048, spec.seq_len),
                                             eos_id=eos_id)
        self.wanted = _fingerprints(stream_fp, self.config, spec)
        self.ckpt = out_dir / "last.pt"
        if fresh and self.acc.is_main_process:
            for f in [self.ckpt, *out_dir.glob("step-*.safetensors")]:
                f.unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        state = _read_checkpoint(self.ckpt, self.wanted) if self.ckpt.exists() else None
        torch.manual_seed(spec.seed)
        self.model = GPTNeoXForCausalLM._from_config(self.config, attn_implementation="sdpa").to(self.acc.device)
        _check_fits(spec, vocab_size, self.micro, self.acc.device)
        self.opt = _optimizer(self.model, spec, fused=self.acc.device.type == "cuda")
        self.step, self.history = 0, []
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.step, self.history = state["step"], state["history"]
            _set_rng_state(state["rng"])
        self.model.train()
        self.ddp, self.opt = self.acc.prepare(self.model, self.opt)
        cuda = self.acc.device.type == "cuda"
        mode = spec.compile if isinstance(spec.compile, str) else None
        self.loss_fn = torch.compile(_loss, mode=mode) if spec.compile and cuda else _loss
        self.autocast = torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=cuda)

    def save(self, snapshot: bool) -> float:
        """Checkpoint (and log-spaced snapshot) on the main process; returns the seconds it took."""
        start = _timed_region(self.acc.device)
        if self.acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if snapshot:
                _save_snapshot(self.model, self.out_dir, self.step)
            _save_checkpoint(self.ckpt, {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                                         "step": self.step, "history": self.history, "rng": _rng_state(),
                                         "fingerprints": self.wanted})
        self.acc.wait_for_everyone()
        return _timed_region(self.acc.device) - start

    def train_step(self) -> torch.Tensor:
        spec, rank, world = self.spec, self.acc.process_index, self.acc.num_processes
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(spec, self.step)
        idx = batch_windows(self.step, spec.batch_size, self.n_windows, spec.seed)[rank::world]
        batch = _windows(self.tokens, idx, spec.seq_len).to(self.acc.device, non_blocking=True)
        total = torch.zeros((), device=self.acc.device)
        for j in range(0, self.share, self.micro):
            last = j + self.micro >= self.share
            with (self.acc.no_sync(self.ddp) if not last else contextlib.nullcontext()), self.autocast:
                loss = self.loss_fn(self.ddp, batch[j:j + self.micro]) * (self.micro / self.share)
            self.acc.backward(loss)
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total


def pretrain(tokens: np.ndarray, stream_fp: str, vocab_size: int, spec: TrainSpec, out_dir: Path, *,
             eos_id: int = 0, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``spec.size`` on ``tokens`` (resuming from ``out_dir/last.pt`` when it is this run's) and
    return the run's record: sizes, tokens seen, loss history, throughput and MFU of this invocation."""
    from tqdm.auto import tqdm

    run = _Run(tokens, stream_fp, vocab_size, eos_id, spec, out_dir, fresh)
    marks = set(snapshot_steps(spec.steps))
    if run.step == 0:
        run.save(snapshot=True)
    first, timed_from, saving, t0 = run.step, run.step + min(5, spec.steps - run.step - 1), 0.0, 0.0
    bar = tqdm(total=spec.steps, initial=run.step, desc=f"pretrain {spec.size}", unit="step",
               disable=not (progress and run.acc.is_main_process))
    while run.step < spec.steps:
        if run.step == timed_from:
            t0, saving = _timed_region(run.acc.device), 0.0
        loss = run.train_step()
        if run.step % spec.log_every == 0 or run.step == spec.steps:
            value = float(run.acc.reduce(loss, reduction="mean"))
            run.history.append({"step": run.step, "loss": round(value, 5), "lr": learning_rate(spec, run.step - 1),
                                "tokens": run.step * spec.batch_size * spec.seq_len})
            bar.set_postfix(loss=f"{value:.3f}")
        if run.step in marks or run.step % spec.checkpoint_every == 0:
            saving += run.save(snapshot=run.step in marks)
        bar.update(1)
    bar.close()
    elapsed = _timed_region(run.acc.device) - t0 - saving if run.step > timed_from else 0.0
    return _record(run, first, run.step - timed_from if elapsed > 0 else 0, elapsed)


def _record(run: _Run, first_step: int, timed_steps: int, elapsed: float) -> dict[str, Any]:
    from mtp_lib.results import device_name, peak_bf16_flops

    spec = run.spec
    counts = shapes.param_counts(run.model)
    per_token = shapes.flops_per_token(counts, spec.size, spec.seq_len)
    tokens_per_s = timed_steps * spec.batch_size * spec.seq_len / elapsed if elapsed > 0 else None
    device = device_name(run.acc.device)
    peak = peak_bf16_flops(device)
    s = shapes.shape(spec.size)
    return {
        "size": spec.size, "shape": dataclasses.asdict(s), **counts, "recipe": spec.recipe(),
        "train_tokens": spec.steps * spec.batch_size * spec.seq_len, "data_fingerprint": run.wanted["data"],
        "stream_tokens": int(len(run.tokens)), "epochs": spec.steps * spec.batch_size * spec.seq_len / len(run.tokens),
        "history": run.history, "final_loss": run.history[-1]["loss"] if run.history else None,
        "snapshots": snapshot_steps(spec.steps),
        "throughput": {"device": device, "processes": run.acc.num_processes, "resumed_from_step": first_step,
                       "timed_steps": timed_steps, "seconds": round(elapsed, 3), "micro_batch": run.micro,
                       "compile": spec.compile, "flops_per_token": per_token, "peak_flops": peak},
        "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s),
        "mfu": None if tokens_per_s is None or peak is None else round(tokens_per_s * per_token / peak, 4),
    }
