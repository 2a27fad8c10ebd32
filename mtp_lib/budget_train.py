"""One unit of :mod:`mtp_lib.budget_runs`: train a row at the paper's budget, evaluate it, time it.

Kept apart from the unit bookkeeping so that loading stored units imports no training code.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .budget_runs import N_FIRST, WINDOW, BudgetSetup, Unit, _timestamp, save_folder
from .results import peak_bf16_flops

__all__ = ["DEADLINE", "LazyData", "StepClock", "TimeUp", "run_unit"]

_ACCELERATOR: list[Any] = []
DEADLINE: list[float] = []  # time.perf_counter() after which a run with checkpoints stops at its next checkpoint


class TimeUp(RuntimeError):
    """A unit stopped right after a checkpoint because ``DEADLINE`` passed: run it again to resume."""


def _accelerator(device: torch.device) -> Any:
    # one accelerate.Accelerator per process: bf16 autocast on CUDA, plain float32 on CPU
    if not _ACCELERATOR:
        from accelerate import Accelerator

        cuda = device.type == "cuda"
        _ACCELERATOR.append(Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no"))
    return _ACCELERATOR[0]


class LazyData:
    """The model and the tokenized samples of one model, loaded on first use."""

    def __init__(self, name: str, setup: BudgetSetup) -> None:
        self.name, self.setup = name, setup
        self._lm: Any = None

    def __call__(self) -> Any:
        if self._lm is None:
            from . import data
            from . import models as M

            s = self.setup
            self._lm = lm = M.load_model(self.name, device=s.device, dtype=s.dtype, progress=lambda msg: None)
            self.train_set = data.translation_samples(lm.tokenizer, len(s.train_ids), split="train", dataset=s.dataset,
                                                      min_target_words=1, max_target_words=100_000,
                                                      seed=s.data_seed, references=s.references)
            held = data.translation_samples(lm.tokenizer, s.n_eval + s.n_select, split="validation",
                                            dataset=s.dataset)
            self.eval_set, self.select_set = held[:s.n_eval], held[s.n_eval:]
            if ([x.id for x in self.train_set] != s.train_ids
                    or [x.id for x in held] != s.eval_ids + s.select_ids):
                raise RuntimeError("BudgetSetup's pair selection no longer matches mtp_lib.data.translation_samples")
        return self._lm


class StepClock:
    """A :func:`mtp_lib.train.train` callback: seconds and non-padding tokens of the training steps run
    in this process (evaluations excluded; the first step, which includes start-up, not counted).

    The tokens of step s of phase p are those of the sequences :func:`mtp_lib.train.steps.batch_order`
    puts in that step: the loop's own order, so the count is exact."""

    def __init__(self, config: Any, lengths: list[int], *, stop_at_deadline: bool = False) -> None:
        from .train.config import phases

        self.stop = stop_at_deadline
        self.config, self.lengths = config, np.asarray(lengths)
        self.names = [p.name for p in phases(config)]
        self.per_epoch = len(lengths) // config.effective_batch_size
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._last = _timestamp()
        self._started = False

    def tokens_of(self, phase: str, step: int) -> int:
        from .train.steps import batch_order

        p_idx = self.names.index(phase)
        epoch, in_epoch = divmod(step - 1, self.per_epoch)
        if (p_idx, epoch) not in self._orders:
            self._orders[p_idx, epoch] = batch_order(self.config.seed, p_idx, epoch, len(self.lengths)).numpy()
        size = self.config.effective_batch_size
        return int(self.lengths[self._orders[p_idx, epoch][in_epoch * size:(in_epoch + 1) * size]].sum())

    def __call__(self, entry: dict[str, Any]) -> None:
        now = _timestamp()
        if "loss" in entry:
            if self._started:
                self.seconds += now - self._last
                self.tokens += self.tokens_of(entry["phase"], entry["step"])
                self.steps += 1
            self._started = True
            # the step before this one ended with a checkpoint (or a phase): stopping now loses one step
            every, done = self.config.checkpoint_every, entry["step"] - 1
            at_checkpoint = (done == 0 or (every > 0 and done % every == 0)) and self.steps >= 1
            if self.stop and DEADLINE and now > DEADLINE[0] and at_checkpoint:
                raise TimeUp(f"stopped at step {entry['step'] - 1} of phase {entry['phase']!r}, right after its "
                             "checkpoint: run the same command again to resume")
        self._last = now


def _curve(history: list[dict[str, Any]], phase_steps: tuple[int, ...], batch: int) -> list[dict[str, Any]]:
    # held-out evaluations at global step = steps of the earlier phases + step within the phase
    names = list(dict.fromkeys(e["phase"] for e in history if "loss" in e))
    offset = {name: sum(phase_steps[:i]) for i, name in enumerate(names)}
    out = []
    for e in history:
        if "eval_loss" in e:
            step = offset[e["phase"]] + e["step"]
            out.append({"step": step, "sequences": step * batch, "loss": e["eval_loss"], "top5": e.get("eval_top5")})
    return out


def _losses(history: list[dict[str, Any]]) -> tuple[list[list[float]], list[list[float]]]:
    # per head: the first N_FIRST training losses, and the mean loss of each window of WINDOW steps
    losses = np.asarray([e["loss"] for e in history if "loss" in e], dtype=float)  # [steps, heads]
    n = len(losses) // WINDOW * WINDOW
    windows = losses[:n].reshape(-1, WINDOW, losses.shape[1]).mean(1) if n else np.zeros((0, losses.shape[1]))
    return np.round(losses[:N_FIRST].T, 5).tolist(), np.round(windows.T, 5).tolist()


def _speed(clock: StepClock, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    # tokens/s of training steps; MFU = 6 * N * tokens / seconds / peak (N: the trained network's parameters)
    from .results import device_name, mfu

    n_params = sum(p.numel() for p in model.parameters())
    name = device_name(device)
    peak = peak_bf16_flops(name) if device.type == "cuda" else None
    rate = clock.tokens / clock.seconds if clock.seconds > 0 else float("nan")
    return {"device": name, "timed_steps": clock.steps, "step_seconds": round(clock.seconds, 3),
            "tokens": clock.tokens, "tokens_per_s": round(rate, 1), "params": n_params,
            "peak_flops": peak, "mfu": mfu(n_params, rate, name) if peak else None}


def run_unit(lazy: LazyData, unit: Unit) -> dict[str, Any]:
    """Train one unit (resuming from its checkpoint under ``save_dir``) and evaluate it."""
    from .strategy_runs import _marginal_hits
    from .train import accuracy, evaluate, train

    setup, begin = lazy.setup, time.perf_counter()
    if setup.progress:
        print(f"{unit.model} {unit.recipe} seed {unit.seed} lr {unit.lr:g}: {setup.total_steps:,} steps of "
              f"{setup.effective_batch} on {setup.device}", flush=True)
    lm, loaded = lazy(), time.perf_counter() - begin
    if setup.progress and loaded > 1:  # the first unit of a model loads it and its pairs
        print(f"  model and {len(lazy.train_set):,} training pairs loaded in {loaded:.0f} s", flush=True)
    acc = _accelerator(setup.device)
    config = setup.train_config(unit)
    folder = save_folder(setup, unit)
    clock = StepClock(config, [len(s.input_ids) for s in lazy.train_set], stop_at_deadline=folder is not None)
    start = time.perf_counter()
    result: Any = train(lm.model, lazy.train_set, config, eval_samples=lazy.eval_set,
                        out_dir=folder, progress=setup.progress, accelerator=acc, callback=clock,
                        compile=setup.compile, pack_rows=setup.pack_rows)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if unit.recipe == "ntp_baseline":
        hits, extra["nucleus_mean"] = _marginal_hits(result.model, lazy.eval_set, setup)
    else:
        with acc.autocast():
            hits = [h.int() for h in evaluate(result.model, lazy.eval_set, k=setup.top_k, last=setup.last_tokens,
                                              batch_size=setup.micro_batch)]
            extra["select_accuracy"] = accuracy(evaluate(result.model, lazy.select_set, k=setup.top_k,
                                                         last=setup.last_tokens, batch_size=setup.micro_batch))
        if result.model.weighted_hidden_states:
            extra["whs_weights"] = np.round(result.model.whs_weights().float().cpu().numpy(), 6)
    first, windows = _losses(result.history)
    info = {k: v for k, v in lm.info().items() if k != "device"}
    return {"info": info, "sample_ids": [s.id for s in lazy.eval_set], "hits": hits, "lr": unit.lr,
            "phase_steps": list(config.phase_steps), "first_losses": first, "loss_windows": windows,
            "loss_window": WINDOW, "curve": _curve(result.history, config.phase_steps, setup.effective_batch),
            "speed": {**_speed(clock, result.model, setup.device), "compiled": setup.compile,
                      "gpu_processes": setup.gpu_processes, "pack_rows": setup.pack_rows},
            "train_seconds": round(train_s, 2),
            "eval_seconds": round(time.perf_counter() - start, 2), **extra}
