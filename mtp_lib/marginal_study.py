"""Chapter 1's experiment: top-p marginalization on the two tasks, run once per model and cached.

For each model and task, :meth:`MarginalStudy.run` computes (or loads, see :mod:`mtp_lib.results`)
three results:

- ``ch01-marginal``: next token and the 2nd-token marginal at ``top_p`` (and, in the same pass,
  every smaller top-p of the sweep), on the first ``n_samples`` samples;
- ``ch01-sweep``: the same at the largest top-p of the sweep, when it lies beyond ``top_p``;
- ``ch01-depth3``: the 3rd token (and the 2nd) at ``depth3_top_p`` on ``depth3_samples`` samples.

Each stores per sample the rank of the reference token at every evaluated target (0 = most
probable), the next-token nucleus sizes at the 2nd-token contexts, the tokens fed and seconds spent,
and for the token browser the top tokens of both distributions. The configuration dicts are the
cache keys of the committed results: change them only with a new ``VERSION``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mtp_lib import data, metrics
from mtp_lib import models as M
from mtp_lib.marginal import MarginalResult, marginalize
from mtp_lib.results import CachedResult, cached

__all__ = ["BROWSER_TOP", "CONTEXT_SHOWN", "TASKS", "VERSION", "DeviceChoice", "LazyModel", "MarginalRuns", "MarginalStudy",
           "evenly_spaced", "task_samples"]

VERSION = 1  # bump when the computation changes what it stores
TASKS = ["translation", "open-ended"]
BROWSER_TOP = 5  # tokens listed per distribution in the browser
CONTEXT_SHOWN = 24  # context tokens shown in the browser
_TRANSLATION: dict[str, Any] = {"dataset": "bible-es-en", "split": "validation", "template": "paper", "min_target_words": 20,
                "max_target_words": 60, "order": "file"}


def task_samples(tok: Any, task: str, n: int, *, open_ended_tokens: int = 200) -> list[data.Sample]:
    """Chapter 1's samples of a task: the first ``n`` validation pairs with 20-60 target words, or the
    first ``n`` Brown passages cut to ``open_ended_tokens`` tokens."""
    if task == "translation":
        return data.translation_samples(tok, n, min_target_words=_TRANSLATION["min_target_words"],
                                        max_target_words=_TRANSLATION["max_target_words"])
    if task == "open-ended":
        return data.open_ended_samples(tok, n, n_tokens=open_ended_tokens)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class LazyModel:
    """Loads a model on first call: a rebuild from stored results never loads the weights."""

    def __init__(self, name: str, device: torch.device, dtype: str) -> None:
        self.name, self.device, self.dtype = name, device, dtype
        self._lm: Any = None

    def __call__(self) -> Any:
        if self._lm is None:
            self._lm = M.load_model(self.name, device=self.device, dtype=self.dtype, progress=lambda msg: None)
        return self._lm


def evenly_spaced(items: list[int], n: int) -> list[int]:
    """``n`` evenly spaced items of ``items`` (all of them when ``n >= len(items)``), in order."""
    if n >= len(items):
        return list(items)
    picked = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in picked]


@dataclasses.dataclass
class MarginalRuns:
    """The cached results of one study, keyed by ``(model, task)``; ``info`` per model."""

    main: dict[tuple[str, str], CachedResult]
    sweep: dict[tuple[str, str], CachedResult]
    depth3: dict[tuple[str, str], CachedResult]
    info: dict[str, dict[str, Any]]

    def all_results(self) -> list[CachedResult]:
        return [*self.main.values(), *self.sweep.values(), *self.depth3.values()]

    def sources(self) -> Any:
        """Per model and task: samples and seconds of each result, loaded or computed, and the device."""
        import pandas as pd

        rows = []
        for key, main in self.main.items():
            row: dict[str, Any] = {"model": key[0], "task": key[1]}
            status: set[str] = set()
            devices = set()
            for label, res in (("marginal", main), ("sweep", self.sweep.get(key)), ("depth 3", self.depth3.get(key))):
                if res is not None:
                    row[f"{label}: samples"] = len(res.value["samples"])
                    row[f"{label}: seconds"] = res.provenance["wall_time_s"]
                    row.setdefault("status", status)  # (the column after the main result's, as before)
                    devices.add(res.provenance["device"])
                    status.add("loaded" if res.loaded else "computed now")
            row["status"] = " / ".join(sorted(status))
            row["computed on"] = "; ".join(sorted(devices))
            rows.append(row)
        return pd.DataFrame(rows).set_index(["model", "task"])


class DeviceChoice:
    """The ``device`` and ``dtype`` parameters of a chapter ("auto" or a name), resolved."""

    device: str
    dtype: str

    @property
    def dev(self) -> torch.device:
        return M.resolve_device(self.device)

    @property
    def dtype_name(self) -> str:
        """The dtype's name as stored in the cache keys (e.g. "bfloat16")."""
        return str(M.resolve_dtype(self.dtype, self.dev)).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class MarginalStudy(DeviceChoice):
    """Chapter 1's parameters (see the chapter's parameters cell for each one's meaning)."""

    n_samples: int
    last_tokens: int = 20
    positions_per_sample: int = 20
    top_p: float = 0.99
    nucleus_top_p: tuple[float, ...] = (0.99, 0.9)
    sweep_top_p: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    sweep_samples: int = 2
    depth3_top_p: float = 0.5
    depth3_samples: int = 2
    widget_samples: int = 2
    open_ended_tokens: int = 200
    max_tokens_per_chunk: int = 0
    progress: bool = False
    dtype: str = "auto"
    device: str = "auto"

    @property
    def sweep(self) -> list[float]:
        return sorted(float(q) for q in self.sweep_top_p)

    @property
    def main_extras(self) -> list[float]:
        """Sweep values below ``top_p``: computed in the main pass (their nuclei are prefixes of its)."""
        return [q for q in self.sweep if q < self.top_p]

    @property
    def sweep_separate(self) -> bool:
        """Whether the sweep goes beyond ``top_p`` and so needs its own, costlier run."""
        return self.sweep[-1] > self.top_p

    @property
    def nucleus_qs(self) -> list[float]:
        return sorted({0.5, 0.8, 0.9, 0.95, 0.99, 0.999, self.top_p, self.depth3_top_p, *self.sweep,
                       *self.nucleus_top_p})

    def describe(self, top_k: int) -> str:
        """The study's settings in words, for the chapter's settings line."""
        return (f"{self.n_samples} samples per task, the last {self.last_tokens} target tokens of each (marginals: "
                f"{min(self.positions_per_sample, self.last_tokens)} of them); top-{top_k} accuracy; 2nd token at "
                f"top-{self.top_p:g}; 3rd token at top-{self.depth3_top_p:g} on {self.depth3_samples} samples; "
                f"top-p sweep {self.sweep}" + (f" on {self.sweep_samples} samples" if self.sweep_separate
                                               else " (from the same run)"))

    def sweep_note(self) -> str:
        """Which samples and run Figure 1.4's sweep comes from."""
        if self.sweep_separate:
            return (f"the first {self.sweep_samples} samples per task, one run at top-{self.sweep[-1]:g} with the "
                    "smaller values computed in the same pass")
        return f"the {self.n_samples} samples of Figure 1.1, all values from its run at top-{self.top_p:g}"

    def selection(self, task: str) -> dict[str, Any]:
        if task == "translation":
            return dict(_TRANSLATION)
        return {"source": "Brown Corpus passages (mtp_lib.data.load_open_ended)", "n_tokens": self.open_ended_tokens,
                "order": "file"}

    def config(self, model: str, task: str, n: int, depth: int, q: float, extras: list[float],
               n_browser: int) -> dict[str, Any]:
        """The cache key of one result (the committed results are stored under it)."""
        return {"model": model, "dtype": self.dtype_name, "task": task, "selection": self.selection(task),
                "n_samples": n, "last_tokens": self.last_tokens, "positions_per_sample": self.positions_per_sample,
                "depth": depth, "top_p": q, "extra_top_p": extras,
                "nucleus_top_p": self.nucleus_qs if depth >= 2 else [],
                "browser": {"samples": n_browser, "top": BROWSER_TOP, "context": CONTEXT_SHOWN}}

    def run(self, models: list[str], *, profile: str, recompute: bool = False) -> MarginalRuns:
        """Load or compute the three results of every model and task."""
        runs = MarginalRuns({}, {}, {}, {})
        for model in models:
            lm = LazyModel(model, self.dev, self.dtype_name)
            for task in TASKS:
                def one(name: str, n: int, depth: int, q: float, extras: list[float], n_browser: int) -> CachedResult:
                    compute: Callable[[], Any] = lambda: self.compute(lm(), task, n, depth, q, extras, n_browser)
                    return cached(name, self.config(model, task, n, depth, q, extras, n_browser), compute,
                                  profile=profile, recompute=recompute, device=self.dev, version=VERSION)

                runs.main[model, task] = one("ch01-marginal", self.n_samples, 2, self.top_p, self.main_extras,
                                             self.widget_samples)
                if self.sweep_separate:
                    runs.sweep[model, task] = one("ch01-sweep", self.sweep_samples, 2, self.sweep[-1],
                                                  self.sweep[:-1], 0)
                runs.depth3[model, task] = one("ch01-depth3", self.depth3_samples, 3, self.depth3_top_p, [], 0)
            runs.info[model] = runs.main[model, TASKS[0]].value["info"]
        return runs

    # ------------------------------------------------------------------------------------------------
    # The computation behind one result

    def samples(self, tok: Any, task: str, n: int) -> list[data.Sample]:
        return task_samples(tok, task, n, open_ended_tokens=self.open_ended_tokens)

    def _timed(self, fn: Callable[[], MarginalResult]) -> tuple[MarginalResult, float]:
        dev = self.dev
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, round(time.perf_counter() - start, 4)

    def compute(self, lm: Any, task: str, n: int, depth: int, q: float, extras: list[float],
                n_browser: int) -> dict[str, Any]:
        """Per sample: ranks of the references at offsets 1..depth (top-p q and extras), nucleus sizes, cost.

        The next token (offset 1) and the nucleus sizes come from one pass over the sample and are kept
        for all last ``last_tokens`` targets; the marginals (offsets 2..depth) for the evaluated subset."""
        from tqdm.auto import tqdm

        out = []
        chunk = self.max_tokens_per_chunk or None
        samples = self.samples(lm.tokenizer, task, n)
        for i, sample in enumerate(tqdm(samples, desc=f"{lm.name} {task} depth {depth}", disable=not self.progress)):
            ids = torch.tensor([sample.input_ids])
            every = list(data.evaluation_targets(sample, self.last_tokens))
            targets = evenly_spaced(every, self.positions_per_sample)
            rec: dict[str, Any] = {"id": sample.id, "n_tokens": len(sample.input_ids), "targets": {"1": every},
                                   "ranks": {}, "seconds": {}, "tokens_fed": {}}
            self._next_token(lm, ids, sample, every, q, rec)
            for d in range(2, depth + 1):
                res, rec["seconds"][str(d)] = self._timed(lambda: marginalize(
                    lm.model, ids, depth=d, top_p=q, positions=[j - d for j in targets], extra_top_p=extras,
                    max_tokens_per_chunk=chunk))
                rec["targets"][str(d)] = targets
                rec["tokens_fed"][str(d)] = res.n_tokens_fed
                refs = torch.tensor([sample.input_ids[j] for j in targets], device=res.log_probs.device)
                rec["ranks"][str(d)] = {f"{float(p):g}": metrics.target_rank(res.at(p)[:, d - 1], refs).tolist()
                                        for p in [q, *extras]}
                if d == 2 and i < n_browser:
                    rec["browser"] = browser_entries(lm.tokenizer, sample, targets, res)
                if d == depth:
                    rec["nodes"] = list(res.n_nodes)
            out.append(rec)
        info = {k: v for k, v in lm.info().items() if k != "device"}
        return {"info": info, "samples": out}

    def _next_token(self, lm: Any, ids: torch.Tensor, sample: data.Sample, every: list[int], q: float,
                    rec: dict[str, Any]) -> None:
        # offset 1 and the nuclei at t = j - 2 (the candidates of the 2nd-token marginal): no candidates fed
        ctx = sorted({j - 1 for j in every} | {j - 2 for j in every})
        row = {t: r for r, t in enumerate(ctx)}
        res, rec["seconds"]["1"] = self._timed(lambda: marginalize(lm.model, ids, depth=1, positions=ctx))
        lp = res.log_probs[:, 0]
        refs = torch.tensor([sample.input_ids[j] for j in every], device=lp.device)
        rank1 = metrics.target_rank(lp[[row[j - 1] for j in every]], refs).tolist()
        rec["ranks"]["1"] = {f"{float(q):g}": rank1}
        rec["nucleus"] = {f"{float(p):g}": metrics.nucleus_size(lp[[row[j - 2] for j in every]], p).tolist()
                          for p in self.nucleus_qs}
        rec["tokens_fed"]["1"] = 0


def browser_entries(tok: Any, sample: data.Sample, targets: list[int], res: MarginalResult) -> list[dict[str, Any]]:
    """The top tokens of x_(t+1) and of the marginal x_(t+2) from each context t = j - 2 (main top-p)."""
    ids, out = sample.input_ids, []
    top = res.log_probs.float().topk(BROWSER_TOP, dim=-1)
    sizes, mass = res.nucleus_size(res.top_p).tolist(), res.log_mass.exp().tolist()

    def show(token_id: int) -> str:
        return str(tok.decode([int(token_id)]))

    for i, j in enumerate(targets):
        t = j - 2
        lo = max(0, t + 1 - CONTEXT_SHOWN)
        refs = [ids[t + 1], ids[t + 2]]
        ranks = [int((res.log_probs[i, d] > res.log_probs[i, d, refs[d]]).sum()) for d in range(2)]
        out.append({
            "t": t, "context": [show(x) for x in ids[lo:t + 1]], "truncated": lo > 0,
            "ref": [show(x) for x in refs], "rank": ranks, "candidates": sizes[i], "mass": round(mass[i], 5),
            "top": [[[show(x), round(float(p), 5)] for x, p in zip(top.indices[i, d].tolist(),
                                                                  top.values[i, d].exp().tolist())]
                    for d in range(2)],
        })
    return out
