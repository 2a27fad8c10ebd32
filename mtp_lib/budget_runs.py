"""Chapter 3 at the paper's training budget, with seeds: one cached result per (model, row, seed).

Every Table 1 row (and the Medusa row) trains for ``total_steps`` optimizer steps of
``effective_batch`` sequences (the paper: 3,125 x 64 = 200k sequences, one epoch of its data) on the
shuffled WEB + KJV training pairs (:func:`mtp_lib.data.translation_samples`, ``references``). Every
row gets the same total: a head-warmup row spends ``warmup_fraction`` of it on its heads-only
phase (the paper's 1 + 1 epochs: one half) and the rest jointly (``TrainConfig.phase_steps``).
Each phase has its own cosine schedule, as in :mod:`mtp_lib.train`.

Learning rates follow the paper's rule (half the model's published peak pretraining LR,
:data:`PUBLISHED_LR`), for the heads and the Medusa rows alike. A model without a published LR gets
an LR sweep on one row (``lr_sweep``, ``sweep_recipe``, the model's first seed): each candidate is a
unit of its own, scored on held-out validation pairs disjoint from the evaluated ones (the
``select`` samples: mean top-k accuracy of both heads); the best is every row's LR, and its sweep
unit is that row's first-seed result (same cache key).

A unit stores the hits on the evaluated tokens (as Chapter 3's rows), the learning curve (held-out
top-5 accuracy per head every ``eval_every`` steps, from :func:`mtp_lib.train.train`), the first
training losses per head, the training loss per window of steps, the WHS weights, and the speed
(non-padding tokens per second of training steps, and MFU against the GPU's bf16 peak where known).
:func:`run_budget` loads stored units and computes the missing ones only when ``compute`` is set,
so a build without a GPU shows what is stored and names the command that fills the rest
(``scripts/table1_paper_budget.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .results import CachedResult, cached, config_key, repo_root, search_dirs, to_jsonable
from .strategy_runs import STRATEGIES

__all__ = ["COMMAND", "KIND", "NOT_PUBLISHED", "PARAMETERS", "PUBLISHED_LR", "VERSION", "BudgetRuns",
           "BudgetSetup", "Unit", "chapter_setup", "chosen_lr", "run_budget", "save_folder",
           "setup_from_parameters", "stored"]

KIND, VERSION = "ch03-budget", 1
COMMAND = "python scripts/table1_paper_budget.py --profile {profile}"
PUBLISHED_LR: dict[str, tuple[float, str]] = {  # model -> (peak pretraining LR, where it is published)
    "smollm2-135m": (3e-3, "SmolLM2-135M's nanotron pretraining config, GitHub huggingface/smollm, "
                           "text/pretraining/smollm2/config_smollm2_135M.yaml: AdamW, peak LR 0.003, 2,000 warmup "
                           "steps, linear decay from step 1.6M over 400k steps"),
}
NOT_PUBLISHED = {  # model -> where a pretraining LR was looked for and not found
    "gemma3-270m": "neither the Gemma 3 Technical Report (arXiv 2503.19786) nor the model card gives one",
}
N_FIRST = 20  # training losses kept from the start of a run
WINDOW = 25  # steps per mean of the stored training-loss curve


class Unit(NamedTuple):
    """One cached training run: model, recipe (a Table 1 row), seed and base learning rate."""

    model: str
    recipe: str
    seed: int
    lr: float


@dataclasses.dataclass
class BudgetSetup:
    """The paper-budget section's parameters (the chapter's ``budget_*`` parameters)."""

    models: list[str]
    recipes: list[str]
    seeds: dict[str, list[int]]
    lrs: dict[str, float]
    lr_sweep: dict[str, list[float]]
    sweep_recipe: str
    total_steps: int
    warmup_fraction: float
    effective_batch: int
    micro_batch: int
    eval_every: int
    n_train: int
    n_eval: int
    n_select: int
    dataset: str = "bible-es-en"
    references: list[str] = dataclasses.field(default_factory=lambda: ["web", "kjv"])
    data_seed: int = 0
    last_tokens: int = 20
    top_k: int = 5
    baseline_top_p: float = 0.99
    dtype: str = "auto"
    device: Any = "auto"
    profile: str = "cpu"
    compute: bool = False
    checkpoint_every: int = 250
    save_dir: str = ""
    progress: bool = False  # a unit's start line and progress bar (not in a unit's key)
    compile: bool = False  # decoder layers compiled (train(compile=True): how, not what; recorded in the speed)
    gpu_processes: int = 1  # units training at once on this GPU (their speed is shared; recorded in the speed)
    pack_rows: int = 0  # >0: packed rows of this many tokens (train(pack_rows=...): how, not what; recorded)

    def __post_init__(self) -> None:
        from . import models as M
        from .strategy_runs import _selection, selected_ids

        self.device = M.resolve_device(self.device)
        self.dtype = str(M.resolve_dtype(self.dtype, self.device)).replace("torch.", "")
        unknown = [r for r in [*self.recipes, self.sweep_recipe] if r not in STRATEGIES]
        if unknown:
            raise ValueError(f"recipes {unknown} are not rows of Chapter 3; choose among {list(STRATEGIES)}")
        if self.sweep_recipe == "ntp_baseline":
            raise ValueError("sweep_recipe='ntp_baseline': sweep the LR on an MTP row (its heads are scored)")
        self.recipes = [r for r in STRATEGIES if r in self.recipes]
        for name in self.models:
            if not self.seeds.get(name):
                raise ValueError(f"seeds has no seed for model {name!r}: give seeds={{{name!r}: [0, 1, 2]}}")
            if name not in self.lrs and not self.lr_sweep.get(name):
                raise ValueError(f"model {name!r} has neither an LR in lrs nor candidates in lr_sweep")
        if not 0 < self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must lie strictly between 0 and 1")
        if self.total_steps < 2 or self.eval_every < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 2 and eval_every={self.eval_every} >= 1")
        self.train_selection = {**_selection(self.dataset, "train", 1, 100_000, f"shuffled, seed {self.data_seed}"),
                                "references": list(self.references)}
        self.eval_selection = _selection(self.dataset, "validation", 20, 60, "file")
        self.train_ids = self._train_ids()
        held_out = selected_ids(self.eval_selection, self.n_eval + self.n_select)
        self.eval_ids, self.select_ids = held_out[:self.n_eval], held_out[self.n_eval:]

    def _train_ids(self) -> list[str]:
        # the ids mtp_lib.data.translation_samples picks (words 1..100000, shuffled by data_seed)
        from . import data

        pairs = data.load_translation("train", self.dataset, references=self.references)
        random.Random(self.data_seed).shuffle(pairs)
        ids = [p.id for p in pairs if 1 <= len(p.target.split()) <= 100_000]
        n = self.n_train or len(ids)
        if n > len(ids):
            raise ValueError(f"n_train={n}: the train split has {len(ids)} pairs with references {self.references}")
        return ids[:n]

    @property
    def head_rows(self) -> list[str]:
        from .strategy_runs import PAPER_ROWS

        return [r for r in PAPER_ROWS if r in self.recipes]

    def phase_steps(self, rec: str) -> tuple[int, ...]:
        """Optimizer steps per phase: warmup rows split the budget, every other row runs it whole."""
        if "warmup" not in rec:
            return (self.total_steps,)
        warm = max(1, min(self.total_steps - 1, round(self.warmup_fraction * self.total_steps)))
        return (warm, self.total_steps - warm)

    def train_config(self, unit: Unit) -> Any:
        from .train import recipe

        return recipe(unit.recipe, lr=unit.lr, seed=unit.seed, effective_batch_size=self.effective_batch,
                      micro_batch_size=self.micro_batch, phase_steps=self.phase_steps(unit.recipe),
                      eval_every=self.eval_every, checkpoint_every=self.checkpoint_every)

    def unit_config(self, unit: Unit) -> dict[str, Any]:
        """The cache configuration of one unit."""
        evaluation: dict[str, Any] = {"last_tokens": self.last_tokens, "top_k": self.top_k,
                                      "curve": {"every": self.eval_every, "top_k": 5, "last_tokens": 20}}
        if unit.recipe == "ntp_baseline":
            evaluation.update(method="marginalization", depth=2, top_p=self.baseline_top_p)
        sha = hashlib.sha256("\n".join(self.train_ids).encode()).hexdigest()[:16]
        train = self.train_config(unit).to_dict()
        del train["checkpoint_every"]  # where a run may resume changes nothing it computes
        return {"model": unit.model, "dtype": self.dtype, "recipe": unit.recipe, "train": train,
                "train_samples": {**self.train_selection, "n": len(self.train_ids), "ids_sha256": sha},
                "eval_samples": {**self.eval_selection, "n": self.n_eval, "ids": self.eval_ids},
                "select_samples": {**self.eval_selection, "n": self.n_select, "ids": self.select_ids},
                "evaluation": evaluation}

    def sweep_units(self, name: str) -> list[Unit]:
        """The LR sweep of a model without a published LR (empty for the others)."""
        if name in self.lrs:
            return []
        return [Unit(name, self.sweep_recipe, self.seeds[name][0], float(lr)) for lr in self.lr_sweep[name]]

    def row_units(self, name: str, lr: float) -> list[Unit]:
        """The model's rows, seed-major: every row's first seed before any row's second (a GPU run cut
        short leaves whole seeds of the table, not all seeds of a few rows)."""
        return [Unit(name, rec, seed, lr) for seed in self.seeds[name] for rec in self.recipes]

    def describe(self) -> str:
        sequences = self.total_steps * self.effective_batch
        return (f"{self.total_steps:,} optimizer steps of {self.effective_batch} sequences per row ({sequences:,} "
                f"sequences, {sequences / len(self.train_ids):.2f} epochs of {len(self.train_ids):,} "
                f"{'+'.join(self.references).upper()} pairs); warmup rows: {self.phase_steps('head_warmup')[0]:,} "
                f"heads-only steps inside that budget; held-out top-5 every {self.eval_every} steps; evaluation: "
                f"{self.n_eval} validation samples x last {self.last_tokens} tokens; LR selection (sweep): "
                f"{self.n_select} other validation samples")


@dataclasses.dataclass
class BudgetRuns:
    """The units found (or computed): ``rows[(model, recipe, seed)]``, ``sweep[(model, lr)]``; the LR each
    model's rows use (``lr``, None while its sweep is incomplete); ``missing``: units not stored."""

    setup: BudgetSetup
    rows: dict[tuple[str, str, int], CachedResult]
    sweep: dict[tuple[str, float], CachedResult]
    lr: dict[str, float | None]
    missing: list[Unit]


def stored(setup: BudgetSetup, unit: Unit) -> CachedResult | None:
    """The stored result of ``unit`` (results folder, then the committed one), None if absent."""
    cfg = to_jsonable(setup.unit_config(unit))
    file = f"{KIND}-{config_key(cfg, VERSION)}.json"
    for folder in search_dirs(setup.profile):
        if (folder / file).is_file():
            record = json.loads((folder / file).read_text())
            if record.get("config") == cfg:
                return CachedResult(KIND, cfg, record["result"], record["provenance"], folder / file, loaded=True)
    return None


def chosen_lr(setup: BudgetSetup, sweep: Mapping[Unit, CachedResult | None], name: str) -> float | None:
    """The model's published-rule LR, or the sweep's best candidate (None until every candidate is stored)."""
    if name in setup.lrs:
        return float(setup.lrs[name])
    scores = {u.lr: r.value["select_accuracy"] for u, r in sweep.items() if u.model == name and r is not None}
    if len(scores) < len(setup.sweep_units(name)):
        return None
    return max(scores, key=lambda lr: (sum(scores[lr]) / len(scores[lr]), -lr))


def run_budget(setup: BudgetSetup, *, select: Callable[[Unit], bool] = lambda u: True) -> BudgetRuns:
    """Load every unit; compute the missing ones among ``select`` when ``setup.compute`` (sweeps first)."""
    lazies: dict[str, Any] = {}

    def get(unit: Unit) -> CachedResult | None:
        found = stored(setup, unit)
        if found is not None or not setup.compute or not select(unit):
            return found
        from .budget_train import LazyData, run_unit

        lazy = lazies.setdefault(unit.model, LazyData(unit.model, setup))
        return cached(KIND, setup.unit_config(unit), lambda: run_unit(lazy, unit), profile=setup.profile,
                      version=VERSION, device=setup.device)

    out = BudgetRuns(setup, {}, {}, {}, [])
    for name in setup.models:
        sweep = {u: get(u) for u in setup.sweep_units(name)}
        out.sweep.update({(u.model, u.lr): r for u, r in sweep.items() if r is not None})
        out.missing += [u for u, r in sweep.items() if r is None]
        out.lr[name] = lr = chosen_lr(setup, sweep, name)
        if lr is None:
            continue
        for unit in setup.row_units(name, lr):
            res = get(unit)
            if res is None:
                out.missing.append(unit)
            else:
                out.rows[unit.model, unit.recipe, unit.seed] = res
    return out


def save_folder(setup: BudgetSetup, unit: Unit) -> Path | None:
    """Where a unit's checkpoint goes (resume after an interruption), or None without ``save_dir``."""
    if not setup.save_dir:
        return None
    return (Path(setup.save_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", unit.model) / unit.recipe
            / f"seed{unit.seed}-lr{unit.lr:g}-steps{setup.total_steps}")



def _timestamp() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


PARAMETERS = {  # the chapter's parameter -> BudgetSetup field
    "budget_models": "models", "budget_recipes": "recipes", "budget_seeds": "seeds", "budget_lrs": "lrs",
    "budget_lr_sweep": "lr_sweep", "budget_sweep_recipe": "sweep_recipe", "budget_steps": "total_steps",
    "budget_warmup_fraction": "warmup_fraction", "budget_effective_batch": "effective_batch",
    "budget_micro_batch": "micro_batch", "budget_eval_every": "eval_every", "budget_n_train": "n_train",
    "budget_n_select": "n_select", "budget_references": "references", "budget_compute": "compute",
    "budget_save_dir": "save_dir", "n_eval": "n_eval", "dataset": "dataset", "data_seed": "data_seed",
    "last_tokens": "last_tokens", "top_k": "top_k", "baseline_top_p": "baseline_top_p", "dtype": "dtype",
    "device": "device", "profile": "profile",
}


def setup_from_parameters(values: Mapping[str, Any], **overrides: Any) -> BudgetSetup:
    """The :class:`BudgetSetup` of the chapter's parameter values (``budget_*`` and the shared ones)."""
    fields = {field: values[name] for name, field in PARAMETERS.items() if name in values}
    fields.update(overrides)
    return BudgetSetup(**fields)


def chapter_setup(profile: str, **overrides: Any) -> BudgetSetup:
    """The setup Chapter 3 builds for ``profile``: its parameters cell, overridden by the profile as the
    book does (:func:`mtp_lib.profiles.chapter_parameters`), then by ``overrides`` (BudgetSetup fields)."""
    from .profiles import chapter_parameters, load_profile
    from .whs_report import notebook_parameters

    path = repo_root() / "chapters" / "03_mtp_heads.ipynb"
    values = notebook_parameters(path)
    values.update(chapter_parameters(load_profile(profile), "03_mtp_heads", path))
    return setup_from_parameters(values, **overrides)
