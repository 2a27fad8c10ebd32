"""Chapter 2's tuned lens beside its logit lens: the cached result ``ch02-tuned-lens`` and its command.

For each model, :meth:`TunedLensStudy.run` loads (or computes, see :mod:`mtp_lib.results`) one result:
translators (:mod:`mtp_lib.tuned_lens`) trained on the target positions of Bible *training* pairs in
the paper's prompt, then scored with the logit lens on the held-out positions of ``ch02-lens`` (the
first ``n_samples`` validation pairs, contexts t = j - 1 of their last ``last_tokens`` targets j). Per
layer and sample it stores the mean KL in both directions, the next token's NLL and top-k hits, and
the entropy, for both lenses.

A profile whose results are computed on a GPU (``$MTP_NO_COMPUTE`` set by the book) may lack it: the
study then returns the sentence that says how to compute it, and the chapter renders without it. The
command computes the missing results of a profile without running the chapter::

    MTP_GIT_COMMIT=$(git rev-parse HEAD) python -m mtp_lib.tuned_lens_study --profile gpu

(``$MTP_GIT_COMMIT`` records the commit where the checkout has no git history; see
:func:`mtp_lib.results.provenance`). It reads the chapter's parameters from the profile.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtp_lib import data, probe, tuned_lens
from mtp_lib.lens_study import SELECTION, layer_subset
from mtp_lib.marginal_study import DeviceChoice, LazyModel
from mtp_lib.results import CachedResult, MissingResultError, cached

__all__ = ["CHAPTER", "COMMAND", "NAME", "VERSION", "TunedLensRuns", "TunedLensStudy", "fit_and_score", "main"]

NAME, VERSION, CHAPTER = "ch02-tuned-lens", 1, "02_layer_specialization"
COMMAND = "MTP_GIT_COMMIT=$(git rev-parse HEAD) python -m mtp_lib.tuned_lens_study --profile {profile}"
_METRICS = ("kl", "kl_from_output", "nll", "hit", "entropy")


@dataclasses.dataclass
class TunedLensRuns:
    """Per model, the stored result, or (``missing``) the sentence saying how to compute it."""

    results: dict[str, CachedResult]
    missing: dict[str, str]


@dataclasses.dataclass(frozen=True)
class TunedLensStudy(DeviceChoice):
    """The tuned lens's parameters (the chapter's ``tuned_*`` parameters; the rest shared with ``ch02-lens``)."""

    n_samples: int
    last_tokens: int = 20
    top_k: int = 5
    train_samples: int = 24
    layer_stride: int = 1
    steps: int = 300
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    max_elements: int = 2**22
    dtype: str = "auto"
    device: str = "auto"

    def describe(self) -> str:
        return (f"tuned lens: {self.train_samples} training pairs, every {self.layer_stride} layer(s), {self.steps} "
                f"steps of {self.batch} positions (AdamW, lr {self.lr:g})")

    def config(self, name: str) -> dict[str, Any]:
        train = {**SELECTION, "split": "train", "order": f"shuffled, seed {self.seed}", "n": self.train_samples,
                 "positions": "every target position t >= target_start - 1 with x_(t+1) inside the sample"}
        return {"model": name, "dtype": self.dtype_name, "top_k": self.top_k, "train": train,
                "test": {**SELECTION, "n": self.n_samples, "last_tokens": self.last_tokens,
                         "positions": "context ends t = j - 1 of the last `last_tokens` target tokens j"},
                "objective": "KL(p_L || q_l), translator z + B z + b from the identity, AdamW, cosine lr, clip 1",
                "layer_stride": self.layer_stride, "steps": self.steps, "batch_size": self.batch, "lr": self.lr,
                "weight_decay": self.weight_decay, "seed": self.seed}

    def run(self, models: Sequence[str], *, profile: str, recompute: bool = False) -> TunedLensRuns:
        """Load or compute every model's result; where computing is off ($MTP_NO_COMPUTE), keep the reason."""
        runs = TunedLensRuns({}, {})
        for name in models:
            lm = LazyModel(name, self.dev, self.dtype_name)
            try:
                runs.results[name] = cached(NAME, self.config(name), lambda: self.compute(lm()), profile=profile,
                                            recompute=recompute, device=self.dev, version=VERSION)
            except MissingResultError as err:
                runs.missing[name] = str(err)
        return runs

    def compute(self, lm: Any) -> dict[str, Any]:
        """Train the translators, score both lenses on the validation positions, average per sample."""
        shape = {"min_target_words": SELECTION["min_target_words"], "max_target_words": SELECTION["max_target_words"]}
        train = data.translation_samples(lm.tokenizer, self.train_samples, split="train", seed=self.seed, **shape)
        test = data.translation_samples(lm.tokenizer, self.n_samples, **shape)
        train_data = probe.collect_probe_data(
            lm.model, [s.input_ids for s in train], offsets=[1],
            positions=[list(range(s.target_start - 1, len(s.input_ids))) for s in train], progress=False)
        test_data = probe.collect_probe_data(
            lm.model, [s.input_ids for s in test], offsets=[1],
            positions=[data.context_ends(s, 1, self.last_tokens) for s in test], progress=False)
        return {"info": {k: v for k, v in lm.info().items() if k != "device"}, "vocab": lm.vocab_size,
                "train_ids": [s.id for s in train], "test_ids": [s.id for s in test],
                **fit_and_score(lm.model, train_data, test_data, len(test), layer_stride=self.layer_stride,
                                steps=self.steps, batch=self.batch, lr=self.lr, weight_decay=self.weight_decay,
                                seed=self.seed, top_k=self.top_k, max_elements=self.max_elements)}

    # ------------------------------------------------------------------------------------------------
    # From a profile (the command line)

    @classmethod
    def from_profile(cls, profile: str) -> tuple[TunedLensStudy, list[str]]:
        """The study and its models as the chapter builds them under ``profile`` (its parameters cell's
        defaults, overridden by the profile's values)."""
        from mtp_lib.profiles import _declared_parameters, chapter_parameters, load_profile
        from mtp_lib.results import repo_root

        notebook = repo_root() / "chapters" / f"{CHAPTER}.ipynb"
        params = {k: ast.literal_eval(v["default"]) for k, v in _declared_parameters(notebook).items()}
        params.update(chapter_parameters(load_profile(profile), CHAPTER, notebook))
        study = cls(n_samples=params["n_samples"], last_tokens=params["last_tokens"], top_k=params["top_k"],
                    train_samples=params["tuned_train_samples"], layer_stride=params["tuned_layer_stride"],
                    steps=params["tuned_steps"], batch=params["tuned_batch"], lr=params["tuned_lr"],
                    weight_decay=params["probe_weight_decay"], seed=params["seed"],
                    max_elements=params["max_elements"], dtype=params["dtype"], device=params["device"])
        return study, list(params["models"])


def fit_and_score(model: Any, train: probe.ProbeData, test: probe.ProbeData, n_test: int, *, layer_stride: int = 1,
                  steps: int = 300, batch: int = 256, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0,
                  top_k: int = 5, max_elements: int = 2**22) -> dict[str, Any]:
    """Train translators on ``train``'s positions (every ``layer_stride``-th layer below L), score both
    lenses on ``test``'s, and average each metric per test sequence (``n_test`` of them): the stored
    form that :mod:`mtp_lib.tuned_lens_tables` reads (``logit`` rows: layers 1..L; ``tuned`` rows: the
    tuned layers)."""
    n_layers = train.n_layers
    layers = [layer for layer in layer_subset(n_layers, layer_stride) if layer < n_layers]
    fit = tuned_lens.fit_tuned_lens(model, train, layers=layers, steps=steps, batch_size=batch, lr=lr,
                                    weight_decay=weight_decay, seed=seed, max_elements=max_elements, progress=False)
    scores = tuned_lens.compare_lenses(model, fit.lens, test, k=top_k, max_elements=max_elements)
    rows = torch.tensor([layer - 1 for layer in layers])

    def per_sample(lens: str, metric: str) -> Any:  # [rows, N] -> [rows, sequences], 5 decimals
        name = metric.replace("kl", f"kl_{lens}", 1) if metric.startswith("kl") else f"{metric}_{lens}"
        values = getattr(scores, name)
        means = torch.stack([values[:, scores.sequence == i].mean(1) for i in range(n_test)], 1)
        return np.round((means if lens == "logit" else means[rows]).numpy(), 5)

    tail = max(1, steps // 10)
    return {"n_layers": n_layers, "tuned_layers": layers, "n_train_positions": len(train),
            "n_test_positions": len(test), **{lens: {m: per_sample(lens, m) for m in _METRICS} for lens in ("logit", "tuned")},
            "train_loss_first": np.round([loss[0] for loss in fit.losses], 4),
            "train_loss_last": np.round([float(np.mean(loss[-tail:])) for loss in fit.losses], 4)}


def main(argv: Sequence[str] | None = None) -> int:
    """Compute (or load) ``ch02-tuned-lens`` for a profile's models; print where each result is stored."""
    parser = argparse.ArgumentParser(prog="python -m mtp_lib.tuned_lens_study", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="gpu", help="chapters/profiles/<name>.yaml (default: gpu)")
    parser.add_argument("--model", action="append", help="only this model (repeatable; default: the profile's)")
    parser.add_argument("--recompute", action="store_true", help="ignore a stored result and recompute it")
    args = parser.parse_args(argv)
    study, models = TunedLensStudy.from_profile(args.profile)
    unknown = sorted(set(args.model or []) - set(models))
    if unknown:
        parser.error(f"--model {unknown} not among the profile's models {models}")
    runs = study.run(args.model or models, profile=args.profile, recompute=args.recompute)
    for name, res in runs.results.items():
        print(f"{name}: {'loaded' if res.loaded else 'computed'} {res.path} ({res.provenance['device']}, "
              f"{res.provenance['wall_time_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
