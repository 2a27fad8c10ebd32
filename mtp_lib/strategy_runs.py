"""The rows of the paper's Table 1 (Chapter 3): one cached training run and evaluation per model and strategy.

A :class:`Table1Setup` holds the chapter's parameters; :func:`run_rows` trains and evaluates every
(model, recipe) row through :func:`mtp_lib.results.cached`, so that a rebuild loads stored rows and
loads no model at all. The cache configuration of a row (:meth:`Table1Setup.row_config`) names the
model, its dtype, the recipe with every field of its ``TrainConfig``, the training subset (selection
rule, size, a hash of its pair ids), the evaluation samples' ids and the evaluation settings.

- MTP rows (``ch03-heads``): :func:`mtp_lib.train.train`, then :func:`mtp_lib.train.evaluate`
  (head n, from the context ending at t = j - n, must rank x_j in its top k).
- The baseline (``ch03-baseline``): the model LoRA-fine-tuned on next-token loss, scored by its
  next-token distribution (t = j - 1) and its top-p marginal of the 2nd token (t = j - 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["PAPER_ROWS", "STRATEGIES", "VERSIONS", "Table1Setup", "run_rows", "selected_ids", "status_table"]

STRATEGIES = {  # recipe -> the row's name in the paper's Table 1 (in the paper's order)
    "ntp_baseline": "Baseline (FT + marginalization)", "heads_only": "Heads only", "vanilla_joint": "Vanilla joint",
    "head_warmup": "Head warmup", "diff_lr": "Diff. LR", "head_warmup_diff_lr": "Head warmup + Diff. LR",
    "diff_lr_whs": "Diff. LR + WHS", "medusa": "Medusa heads (not in the paper)",
}
PAPER_ROWS = ["heads_only", "vanilla_joint", "head_warmup", "diff_lr", "head_warmup_diff_lr", "diff_lr_whs"]
VERSIONS = {"ch03-heads": 1, "ch03-baseline": 1}  # bump when a computation changes


def _selection(dataset: str, split: str, lo: int, hi: int, order: str) -> dict[str, Any]:
    return {"dataset": dataset, "split": split, "template": "paper", "min_target_words": lo,
            "max_target_words": hi, "order": order}


def selected_ids(selection: Mapping[str, Any], n: int, shuffle_seed: int | None = None) -> list[str]:
    """The pair ids :func:`mtp_lib.data.translation_samples` picks for ``selection`` (without a tokenizer)."""
    from . import data

    pairs = data.load_translation(selection["split"], selection["dataset"])
    if shuffle_seed is not None:
        pairs = pairs.copy()
        random.Random(shuffle_seed).shuffle(pairs)
    lo, hi = selection["min_target_words"], selection["max_target_words"]
    ids = [p.id for p in pairs if lo <= len(p.target.split()) <= hi][:n]
    if len(ids) < n:
        raise ValueError(f"n={n}: only {len(ids)} {selection['split']} pairs have {lo}-{hi} target words")
    return ids


@dataclasses.dataclass
class Table1Setup:
    """Chapter 3's parameters (see its parameters cell).

    ``device`` ("auto", "cpu", "cuda" or a torch.device) and ``dtype`` ("auto", "float32", "bfloat16")
    are resolved on creation (:func:`mtp_lib.models.resolve_device`, ``resolve_dtype``): afterwards
    ``device`` is a torch.device and ``dtype`` a name such as "bfloat16". ``recipes`` are checked and
    put in the paper's row order; the training and evaluation pair ids are selected.
    """

    models: list[str]
    recipes: list[str]
    dataset: str
    n_train: int
    data_seed: int
    epochs: int
    effective_batch: int
    micro_batch: int
    max_steps: int
    lrs: dict[str, float]
    default_lr: float
    medusa_lr: float
    seed: int
    n_eval: int
    last_tokens: int
    top_k: int
    baseline_top_p: float
    dtype: str
    device: Any
    profile: str
    recompute: bool = False
    save_dir: str = ""

    def __post_init__(self) -> None:
        from . import models as M

        self.device = M.resolve_device(self.device)
        self.dtype = str(M.resolve_dtype(self.dtype, self.device)).replace("torch.", "")
        unknown = [r for r in self.recipes if r not in STRATEGIES]
        if unknown:
            raise ValueError(f"recipes {unknown} are not rows of this chapter; choose among {list(STRATEGIES)}")
        self.recipes = [r for r in STRATEGIES if r in self.recipes]  # the paper's row order
        self.train_selection = _selection(self.dataset, "train", 1, 100_000, f"shuffled, seed {self.data_seed}")
        self.eval_selection = _selection(self.dataset, "validation", 20, 60, "file")
        self.train_ids = selected_ids(self.train_selection, self.n_train, self.data_seed)
        self.eval_ids = selected_ids(self.eval_selection, self.n_eval)

    @property
    def head_rows(self) -> list[str]:
        """The paper's layer-copy strategies among this run's recipes."""
        return [r for r in PAPER_ROWS if r in self.recipes]

    def base_lr(self, name: str, rec: str) -> float:
        return self.medusa_lr if rec == "medusa" else float(self.lrs.get(name, self.default_lr))

    def train_config(self, name: str, rec: str) -> Any:
        from .train import recipe

        return recipe(rec, lr=self.base_lr(name, rec), epochs=self.epochs, effective_batch_size=self.effective_batch,
                      micro_batch_size=self.micro_batch, max_steps=self.max_steps if self.max_steps > 0 else None,
                      seed=self.seed)

    def row_config(self, name: str, rec: str) -> dict[str, Any]:
        """The cache configuration of one row (its key: do not change what goes in)."""
        evaluation: dict[str, Any] = {"last_tokens": self.last_tokens, "top_k": self.top_k}
        if rec == "ntp_baseline":
            evaluation.update(method="marginalization", depth=2, top_p=self.baseline_top_p)
        ids_sha = hashlib.sha256("\n".join(self.train_ids).encode()).hexdigest()[:16]
        return {"model": name, "dtype": self.dtype, "recipe": rec, "train": self.train_config(name, rec).to_dict(),
                "train_samples": {**self.train_selection, "n": self.n_train, "ids_sha256": ids_sha},
                "eval_samples": {**self.eval_selection, "n": self.n_eval, "ids": self.eval_ids},
                "evaluation": evaluation}

    def describe(self) -> str:
        """The training and evaluation settings, for :func:`mtp_lib.report.run_settings`' details."""
        steps = self.n_train // self.effective_batch
        return (f"training: {self.n_train:,} {self.dataset} pairs, {self.epochs} epoch(s) of {steps} optimizer steps "
                f"of {self.effective_batch} sequences "
                + (f"(capped at {self.max_steps} steps) " if self.max_steps > 0 else "")
                + f"per phase, base LR {', '.join(f'{m}: {self.lrs.get(m, self.default_lr):g}' for m in self.models)}, "
                f"Medusa LR {self.medusa_lr:g}; evaluation: {self.n_eval} validation samples x last "
                f"{self.last_tokens} tokens, top-{self.top_k}; baseline top-p {self.baseline_top_p}")


class _LazyModel:
    # Loads the model (and tokenizes the samples) on first use: a rebuild from stored results never does.
    def __init__(self, name: str, setup: Table1Setup) -> None:
        self.name, self.setup = name, setup
        self._lm: Any = None

    def _samples(self, tok: Any, selection: Mapping[str, Any], n: int, ids: list[str], seed: int | None) -> list[Any]:
        from . import data

        out = data.translation_samples(tok, n, split=selection["split"], dataset=selection["dataset"], seed=seed,
                                       min_target_words=selection["min_target_words"],
                                       max_target_words=selection["max_target_words"])
        if [s.id for s in out] != ids:
            raise RuntimeError("selected_ids() no longer matches mtp_lib.data.translation_samples: update it")
        return out

    def __call__(self) -> Any:
        if self._lm is None:
            from . import models as M

            s = self.setup
            self._lm = M.load_model(self.name, device=s.device, dtype=s.dtype, progress=lambda msg: None)
            tok = self._lm.tokenizer
            self.train_set = self._samples(tok, s.train_selection, s.n_train, s.train_ids, s.data_seed)
            self.eval_set = self._samples(tok, s.eval_selection, s.n_eval, s.eval_ids, None)
        return self._lm


class _EvalSettings(Protocol):
    last_tokens: int
    top_k: int
    baseline_top_p: float


def _marginal_hits(model: Any, samples: Sequence[Any], setup: _EvalSettings) -> tuple[list[torch.Tensor], list[float]]:
    # Top-k hits of the next token (t = j - 1) and of the marginal 2nd token (t = j - 2), per sample.
    from . import data, metrics
    from .marginal import marginalize

    hits, nucleus = [], []
    for s in samples:
        ids = torch.tensor([s.input_ids])
        first = data.evaluation_targets(s, setup.last_tokens)[0]
        ends = list(range(first - 2, len(s.input_ids) - 1))  # t = j - 2 .. j - 1 for the evaluated j
        res = marginalize(model, ids, depth=2, top_p=setup.baseline_top_p, positions=ends)
        ref = metrics.reference_targets(ids, res.positions.cpu(), 2).to(res.log_probs.device)
        nxt = metrics.topk_hits(res.log_probs[1:, 0], ref[1:, 0], setup.top_k)
        snd = metrics.topk_hits(res.log_probs[:-1, 1], ref[:-1, 1], setup.top_k)
        hits.append(torch.stack([nxt, snd]).int().cpu())
        nucleus.append(round(float(res.n_candidates[:-1].float().mean()), 2))
    return hits, nucleus


def _run_row(lazy: _LazyModel, rec: str, accelerator: Any) -> dict[str, Any]:
    # Train one row and evaluate it: what the cache stores.
    import numpy as np

    from .train import evaluate, train

    setup = lazy.setup
    lm = lazy()
    out_dir = (Path(setup.save_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", lazy.name) / rec) if setup.save_dir else None
    start = time.perf_counter()
    result: Any = train(lm.model, lazy.train_set, setup.train_config(lazy.name, rec), out_dir=out_dir, progress=False,
                   accelerator=accelerator)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if rec == "ntp_baseline":
        hits, extra["nucleus_mean"] = _marginal_hits(result.model, lazy.eval_set, setup)
    else:
        with accelerator.autocast():
            hits = evaluate(result.model, lazy.eval_set, k=setup.top_k, last=setup.last_tokens,
                            batch_size=setup.micro_batch)
        hits = [h.int() for h in hits]
        if result.model.weighted_hidden_states:
            extra["whs_weights"] = np.round(result.model.whs_weights().float().cpu().numpy(), 6)
    info = {k: v for k, v in lm.info().items() if k != "device"}
    return {"info": info, "history": result.history, "sample_ids": [s.id for s in lazy.eval_set], "hits": hits,
            "train_seconds": round(train_s, 2), "eval_seconds": round(time.perf_counter() - start, 2), **extra}


def run_rows(setup: Table1Setup) -> dict[tuple[str, str], Any]:
    """Every (model, recipe) row as a :class:`mtp_lib.results.CachedResult`, loaded or computed now."""
    from .results import cached

    accelerators: list[Any] = []

    def accelerator() -> Any:
        # One accelerate.Accelerator for all runs: bf16 autocast on CUDA, plain float32 on CPU.
        if not accelerators:
            from accelerate import Accelerator

            cuda = setup.device.type == "cuda"
            accelerators.append(Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no"))
        return accelerators[0]

    def compute(lazy: _LazyModel, rec: str) -> Callable[[], dict[str, Any]]:
        return lambda: _run_row(lazy, rec, accelerator())

    rows = {}
    for name in setup.models:
        lazy = _LazyModel(name, setup)
        for rec in setup.recipes:
            kind = "ch03-baseline" if rec == "ntp_baseline" else "ch03-heads"
            rows[name, rec] = cached(kind, setup.row_config(name, rec), compute(lazy, rec), profile=setup.profile,
                                     recompute=setup.recompute, device=setup.device, version=VERSIONS[kind])
    return rows


def status_table(rows: Mapping[tuple[str, str], Any]) -> Any:
    """Per row whether it was loaded or computed now, and its train and evaluation seconds."""
    import pandas as pd

    return pd.DataFrame([{"model": n, "row": STRATEGIES[r], "result": "loaded" if res.loaded else "computed now",
                          "train [s]": res.value["train_seconds"], "evaluation [s]": res.value["eval_seconds"]}
                         for (n, r), res in rows.items()]).set_index(["model", "row"])
