"""The training loop: the recipe's phases of optimizer steps, evaluation, checkpoints and resume."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from mtp_lib.heads import MTPModel
from mtp_lib.models import eval_mode, get_adapter
from mtp_lib.train.batches import TrainSample, make_batch
from mtp_lib.train.config import TrainConfig, phases
from mtp_lib.train.lora import merge_lora
from mtp_lib.train.objective import Objective, balance_losses, build_net, trainable_state
from mtp_lib.train.scoring import accuracy, eval_losses, evaluate
from mtp_lib.train.steps import (batch_order, cosine, make_accelerator, make_optimizer, release, seed_dropout,
                                 set_trainable)
from mtp_lib.train.store import (CHECKPOINT, RESULT_FILES, fingerprint, read_checkpoint, restore_trainable,
                                 save_trained, write_checkpoint)

__all__ = ["TrainResult", "compile_layers", "train"]


@dataclasses.dataclass
class TrainResult:
    """``model``: the trained :class:`MTPModel`, or for ``objective="ntp"`` a plain HF model with
    the LoRA merged (both in eval mode, in the model's dtype). ``history``: one record per optimizer
    step (``phase``, ``step`` within the phase, ``lr`` = the base LR used in that step, heads getting
    ``head_lr_multiplier`` times it, mean training ``loss`` per head) and per evaluation
    (``eval_loss`` per head, and ``eval_top5`` per head for MTP)."""

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]


class _Run:
    """One call of :func:`train`: the objective, the data, the history and where checkpoints go."""

    def __init__(self, objective: Objective, samples: Sequence[TrainSample], config: TrainConfig, acc: Any, *,
                 eval_samples: Sequence[TrainSample] | None, ckpt: Path | None, print_progress: bool,
                 callback: Callable[[dict[str, Any]], None] | None, pack_rows: int = 0) -> None:
        self.objective, self.samples, self.config, self.acc = objective, samples, config, acc
        self.pack_rows = pack_rows
        self.eval_samples, self.ckpt, self.callback = eval_samples, ckpt, callback
        self.progress = print_progress and acc.is_main_process
        self.phases = phases(config)
        self.history: list[dict[str, Any]] = []
        per_step = config.micro_batch_size * acc.num_processes
        if config.effective_batch_size % per_step:
            raise ValueError(f"effective_batch_size={config.effective_batch_size} is not a multiple of "
                             f"micro_batch_size x processes = {config.micro_batch_size} x {acc.num_processes}")
        self.accum = config.effective_batch_size // per_step
        self.steps_per_epoch = len(samples) // config.effective_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(samples)} samples make no full batch of effective_batch_size="
                             f"{config.effective_batch_size}: pass more samples or lower it")

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.callback is not None:
            self.callback(entry)

    @torch.no_grad()
    def evaluate(self, phase: str, step: int) -> None:
        """Score the held-out samples (in eval mode: no dropout) and record the result."""
        if not self.eval_samples:
            return
        config, net = self.config, self.objective.net
        with eval_mode(self.objective), self.acc.autocast():
            entry: dict[str, Any] = {"phase": phase, "step": step,
                                     "eval_loss": eval_losses(self.objective, self.eval_samples, config.n_heads,
                                                              config.micro_batch_size, self.acc.device)}
            if config.objective == "mtp":
                entry["eval_top5"] = accuracy(evaluate(cast(MTPModel, net), self.eval_samples,
                                                       batch_size=config.micro_batch_size))
        self.record(entry)

    def start(self, fingerprint_now: dict[str, Any] | None, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from, restored into the network; or None, the folder cleared."""
        if self.ckpt is None or fingerprint_now is None:
            return None
        if resume and self.ckpt.is_file():
            saved = read_checkpoint(self.ckpt, fingerprint_now)
            restore_trainable(self.objective.net, saved["trainable"], self.ckpt)
            self.history = list(saved["history"])
            return saved
        if self.acc.is_main_process:  # an interrupted new run must not leave the old one's files looking finished
            for name in (CHECKPOINT, *RESULT_FILES):
                (self.ckpt.parent / name).unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        return None

    def run(self, saved: dict[str, Any] | None, fingerprint_now: dict[str, Any] | None) -> None:
        start_phase, start_step = (saved["phase"], saved["step"]) if saved is not None else (0, 0)
        for p_idx in range(start_phase, len(self.phases)):
            here = saved if p_idx == start_phase else None
            self.run_phase(p_idx, start_step if here is not None else 0, here, fingerprint_now)

    def run_phase(self, p_idx: int, step0: int, saved: dict[str, Any] | None,
                  fingerprint_now: dict[str, Any] | None) -> None:
        from tqdm.auto import tqdm

        config, phase = self.config, self.phases[p_idx]
        total = self.steps_per_epoch * phase.epochs if config.phase_steps is None else config.phase_steps[p_idx]
        total = total if config.max_steps is None else min(total, config.max_steps)
        params = set_trainable(self.objective, phase)
        optimizer = make_optimizer(self.objective, phase, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(total))
        if saved is not None and saved.get("optimizer") is not None:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        wrapped, optimizer = self.acc.prepare(self.objective, optimizer)
        bar = tqdm(total=total, initial=step0, desc=f"train ({phase.name})", disable=not self.progress)
        for step in range(step0, total):
            losses = self.step(p_idx, step, wrapped, params)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mean = [round(float(x), 6) for x in self.acc.reduce(losses, reduction="mean")]
            self.record({"phase": phase.name, "step": step + 1, "lr": config.lr * cosine(total)(step), "loss": mean})
            bar.update(1)
            bar.set_postfix({f"h{n + 1}": f"{x:.3f}" for n, x in enumerate(mean)})
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
                self.evaluate(phase.name, step + 1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                self.checkpoint(p_idx, step + 1, total, optimizer, scheduler, fingerprint_now)
        bar.close()
        self.evaluate(phase.name, total)
        self.checkpoint(p_idx, total, total, optimizer, scheduler, fingerprint_now)
        release(self.acc, wrapped, optimizer)

    def step(self, p_idx: int, step: int, wrapped: nn.Module, params: list[nn.Parameter]) -> torch.Tensor:
        """Forward and backward over one effective batch (this process' share of it); clip the
        gradients. Returns the mean loss per head over this process' micro-batches."""
        config, acc, phase = self.config, self.acc, self.phases[p_idx]
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        size = config.effective_batch_size
        chunk = batch_order(config.seed, p_idx, epoch, len(self.samples))[in_epoch * size:(in_epoch + 1) * size]
        losses = torch.zeros(config.n_heads, device=acc.device)
        for micro in range(self.accum):
            index = micro * acc.num_processes + acc.process_index  # this micro-batch's place in the step
            lo = index * config.micro_batch_size
            batch = make_batch([self.samples[int(i)] for i in chunk[lo:lo + config.micro_batch_size]],
                               config.n_heads, self.pack_rows).to(acc.device)
            seed_dropout(config.seed, p_idx, step, index, acc.device)
            with acc.no_sync(wrapped) if micro < self.accum - 1 else contextlib.nullcontext():
                mean, rms, _ = wrapped(batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids)
                loss = balance_losses(mean, rms) if phase.balance else mean.sum()
                acc.backward(loss / self.accum)
            losses += mean.detach() / self.accum
        if config.max_grad_norm is not None:
            acc.clip_grad_norm_(params, config.max_grad_norm)
        return losses

    def checkpoint(self, p_idx: int, step: int, total: int, optimizer: Any, scheduler: Any,
                   fingerprint_now: dict[str, Any] | None) -> None:
        """Save where the run is (a finished phase points at the next phase's step 0)."""
        if self.ckpt is not None and self.acc.is_main_process:
            done = step >= total
            write_checkpoint(self.ckpt, {
                "fingerprint": fingerprint_now, "phase": p_idx + 1 if done else p_idx,
                "step": 0 if done else step, "history": self.history,
                "trainable": {k: v.cpu() for k, v in trainable_state(self.objective.net).items()},
                "optimizer": None if done else optimizer.state_dict(),
                "scheduler": None if done else scheduler.state_dict()})
        self.acc.wait_for_everyone()


_RECOMPILE_LIMITS: list[int] = []  # dynamo's limits before each compile_layers call, restored by its undo


def compile_layers(net: nn.Module, adapter: Any, *, undo: bool = False) -> int:
    """Compile each decoder layer of ``net`` (backbone and layer heads) on its own with torch.compile,
    or (``undo``) return them to eager; the number of layers.

    Regional compilation: the layers run the same code, so they share compiled graphs and compiling
    costs a few layers' time; Inductor fuses each layer's small kernels (norms, rotary, activation,
    LoRA's scaling), so a step launches fewer kernels. Sequence lengths vary by batch, so the graphs
    take a dynamic length from the start. Each layer variant gets its own graph: the first layer's
    input needs no gradient and the later ones' do (with LoRA), the heads' layers are called with
    other keyword arguments than the backbone's, and evaluation runs without gradients; dynamo's
    recompile limit (8 graphs per function, which these variants reach) is raised to 32 while the
    layers are compiled, and put back by ``undo``."""
    import torch._dynamo

    if not undo:
        _RECOMPILE_LIMITS.append(torch._dynamo.config.recompile_limit)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    elif _RECOMPILE_LIMITS:
        torch._dynamo.config.recompile_limit = _RECOMPILE_LIMITS.pop()
    suffix = adapter.layers_attr.split(".")[-1]
    n = 0
    for name, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == suffix:
            for layer in module:
                if undo:
                    layer._compiled_call_impl = None
                else:
                    layer.compile(dynamic=True)
                n += 1
    return n


def train(model: nn.Module, samples: Sequence[TrainSample], config: TrainConfig, *,
          eval_samples: Sequence[TrainSample] | None = None, out_dir: str | Path | None = None,
          resume: bool = True, progress: bool = True, accelerator: Any | None = None,
          callback: Callable[[dict[str, Any]], None] | None = None, compile: bool = False,
          pack_rows: int = 0) -> TrainResult:
    """Train ``config``'s recipe on ``model`` (a Hugging Face causal LM, left unchanged).

    ``samples`` are the training sequences (loss on their target tokens), ``eval_samples`` optional
    held-out ones, scored every ``config.eval_every`` steps and at the end of each phase. With
    ``out_dir``, checkpoints go to ``out_dir/checkpoint.pt`` and the final weights are written by
    :func:`save_trained`. A checkpoint records the run's fingerprint (config, model, starting
    weights, samples: :mod:`mtp_lib.train.store`); when ``resume``, a run with the same fingerprint
    picks up where it stopped (a finished one returns its weights without training), and a run with
    another fingerprint is refused with what differs. ``resume=False`` starts over; a run that
    starts from step 0 first removes the folder's checkpoint and results (``trained.safetensors``,
    ``config.json``, ``history.json``), so an interrupted new run never leaves an old one looking
    finished. ``callback`` receives every history record as it is made. ``compile``: train with each
    decoder layer compiled (:func:`compile_layers`; how the steps run, not what they compute: the
    result differs from eager training by rounding only), returned to eager afterwards.
    ``accelerator``: an ``accelerate.Accelerator`` to use (default: a new one, bf16 autocast on CUDA).
    ``pack_rows``: train on micro-batches packed into rows of at most this many tokens
    (:func:`mtp_lib.train.batches.pack`; several sequences a row, attention kept inside each) instead
    of one right-padded sequence a row: fewer padding tokens through the network, the same loss up to
    rounding (how the steps run, like ``compile``; dropout masks fall on other positions). 0: padded.
    """
    if len(samples) == 0:
        raise ValueError("samples is empty: pass the training sequences")
    if pack_rows and (longest := max(len(s.input_ids) for s in samples)) > pack_rows:
        raise ValueError(f"pack_rows={pack_rows} is shorter than the longest sample ({longest} tokens): pass at "
                         "least that, or 0 (padded)")
    acc = make_accelerator(config, accelerator)
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = [(m, m.training) for m in model.modules()]
    net = build_net(model, config)
    if compile:
        compile_layers(net, get_adapter(model))
    objective = Objective(net, config.objective).to(acc.device)
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    run = _Run(objective, samples, config, acc, eval_samples=eval_samples, ckpt=ckpt, print_progress=progress,
               callback=callback, pack_rows=pack_rows)
    now = fingerprint(model, samples, config, eval_samples) if ckpt is not None else None
    trained = objective.head_params() + objective.lora_params()
    dtypes = [p.dtype for p in trained]
    if acc.mixed_precision in ("bf16", "fp16"):  # trainable weights in float32 under autocast
        for p in trained:
            p.data = p.data.float()
    net.train(config.train_mode)
    devices = [torch.cuda.current_device()] if acc.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # dropout seeding leaves the caller's RNG as it was
            run.run(run.start(now, resume), now)
    finally:
        for p in net.parameters():
            p.requires_grad_(False)
        for p, flag in flags.items():  # the shared weights get the model's own flags back
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        net.eval()
        if compile:
            compile_layers(net, get_adapter(model), undo=True)
    for p, dtype in zip(trained, dtypes):  # back to the model's dtype, for use without autocast
        p.data = p.data.to(dtype)
    if out_dir is not None and acc.is_main_process:
        save_trained(net, config, out_dir, history=run.history)
    acc.wait_for_everyone()
    return TrainResult(model=merge_lora(net) if config.objective == "ntp" else net, config=config,
                       history=run.history)
