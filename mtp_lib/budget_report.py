"""Chapter 3's paper-budget tables and verdicts, from the units of :mod:`mtp_lib.budget_runs`.

Accuracies are seed means of top-k hits ``[samples, 2, last]``. Two spreads stand side by side: the
standard deviation over seeds (training noise: head and LoRA initialization, batch order), and the
95% cluster bootstrap over evaluation samples of the seed-mean (which tokens were evaluated). A
claim "row A > row B" is judged on the paired per-token difference A - B (same samples, every
seed) with :func:`mtp_lib.report.verdict`, on an interval that holds both spreads (see
:func:`seed_sample_interval`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import metrics, report
from .budget_runs import COMMAND, NOT_PUBLISHED, PUBLISHED_LR, BudgetRuns
from .strategy_runs import STRATEGIES

__all__ = ["T975", "claims_table", "curve_frame", "first_loss_table", "lr_table", "missing_note", "reference_table",
           "seed_accuracy_table", "seed_hits", "seed_sample_interval", "speed_table", "whs_movement"]

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Student's t quantile 0.975 by degrees of freedom (beyond 10: 1.96 + 2.4 / df, within 0.02)."""


def seed_hits(runs: BudgetRuns, name: str, rec: str) -> np.ndarray:
    """The hits of one row over its stored seeds, ``[seeds, samples, 2, last]`` (float)."""
    seeds = [s for s in runs.setup.seeds[name] if (name, rec, s) in runs.rows]
    return np.asarray([runs.rows[name, rec, s].value["hits"] for s in seeds], dtype=float)


def _groups(n_samples: int, n_positions: int) -> list[int]:
    return np.repeat(np.arange(n_samples), n_positions).tolist()


def seed_sample_interval(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> metrics.Interval:
    """Mean of ``values`` ``[seeds, samples, positions]`` with a 95% interval holding both spreads.

    Sample part: the cluster bootstrap over samples of the seed-mean, [lo_b, hi_b]. Seed part (two
    seeds or more): h = t_{0.975, S-1} * sd_s / sqrt(S), sd_s the standard deviation of the S per-seed
    means. Interval: mean -+ sqrt((mean - lo_b)^2 + h^2), sqrt((hi_b - mean)^2 + h^2) (independent
    sources of error add in variance). One seed: the bootstrap interval alone."""
    if values.ndim != 3 or values.shape[0] < 1:
        raise ValueError(f"values must be [seeds, samples, positions] with a seed at least, got {values.shape}")
    s, n, p = values.shape
    boot = metrics.mean_with_ci(values.mean(0).reshape(-1), groups=_groups(n, p), n_boot=n_boot, seed=seed)
    if s < 2 or math.isnan(boot.lo):
        return boot
    h = T975.get(s - 1, 1.96 + 2.4 / (s - 1)) * float(values.reshape(s, -1).mean(1).std(ddof=1)) / math.sqrt(s)
    mean = boot.mean
    return metrics.Interval(mean, mean - math.hypot(mean - boot.lo, h), mean + math.hypot(boot.hi - mean, h))


def _cell(h: np.ndarray) -> str:
    # "mean ± sd over seeds (S) [bootstrap over samples]" for hits [seeds, samples, last]
    per_seed = h.reshape(h.shape[0], -1).mean(1)
    boot = metrics.mean_with_ci(h.mean(0).reshape(-1), groups=_groups(h.shape[1], h.shape[2]))
    sd = f" ± {per_seed.std(ddof=1):.3f}" if len(per_seed) > 1 else ""
    return f"{boot.mean:.3f}{sd} ({len(per_seed)}) [{boot.lo:.3f}, {boot.hi:.3f}]"


def seed_accuracy_table(runs: BudgetRuns) -> pd.DataFrame:
    """Table: per row (index) and model x target (columns), "mean ± sd over seeds (seeds) [95% bootstrap
    over evaluation samples of the seed-mean]"."""
    out: dict[str, dict[str, str]] = {}
    for name in runs.setup.models:
        for rec in runs.setup.recipes:
            h = seed_hits(runs, name, rec)
            if len(h) == 0:
                continue
            for i, target in enumerate(("next", "2nd")):
                out.setdefault(f"{name}: {target}", {})[STRATEGIES[rec]] = _cell(h[:, :, i])
    order = [STRATEGIES[r] for r in runs.setup.recipes]
    return pd.DataFrame(out).reindex([s for s in order if any(s in col for col in out.values())]).fillna("-")


def claims_table(runs: BudgetRuns) -> pd.DataFrame:
    """The paper's orderings (:func:`mtp_lib.strategy_report.claims`) per model: paired difference A - B
    over seeds with :func:`seed_sample_interval` and the verdict; "-" where a row is not stored."""
    from .strategy_report import TARGET_INDEX, claims

    out = []
    for text, a, b, target in claims(runs.setup):
        row = {"claim (row A > row B)": text}
        for name in runs.setup.models:
            seeds = [s for s in runs.setup.seeds[name] if (name, a, s) in runs.rows and (name, b, s) in runs.rows]
            if not seeds:
                row[name] = "-"
                continue
            i = TARGET_INDEX[target]
            d = np.asarray([np.asarray(runs.rows[name, a, s].value["hits"], dtype=float)[:, i]
                            - np.asarray(runs.rows[name, b, s].value["hits"], dtype=float)[:, i] for s in seeds])
            v = report.verdict(seed_sample_interval(d))
            row[name] = v.text + (" (1 seed: the spread over seeds is not measured)" if len(seeds) == 1 else
                                  f" ({len(seeds)} seeds)")
        out.append(row)
    return pd.DataFrame(out, columns=["claim (row A > row B)", *runs.setup.models]).set_index("claim (row A > row B)")


def curve_frame(runs: BudgetRuns) -> pd.DataFrame:
    """Held-out top-5 accuracy during training: ``model, strategy, seed, step, sequences, head, accuracy``."""
    out = []
    for (name, rec, seed), res in runs.rows.items():
        for point in res.value["curve"]:
            for head, acc in enumerate(point.get("top5") or [], 1):
                out.append({"model": name, "strategy": STRATEGIES[rec], "seed": seed, "step": point["step"],
                            "sequences": point["sequences"], "head": head, "accuracy": acc})
    return pd.DataFrame(out, columns=["model", "strategy", "seed", "step", "sequences", "head", "accuracy"])


def first_loss_table(runs: BudgetRuns) -> pd.DataFrame:
    """Head 2's training loss at the first steps against the uniform guess log V, and whether it falls
    (mean of the last stored window of steps below the first step's loss); seed means."""
    out = []
    for name in runs.setup.models:
        for rec in runs.setup.recipes:
            vals = [runs.rows[name, rec, s].value for s in runs.setup.seeds[name] if (name, rec, s) in runs.rows]
            if rec == "ntp_baseline" or not vals:
                continue
            first = np.asarray([v["first_losses"][1] for v in vals])  # [seeds, steps]
            windows = [v["loss_windows"][1] for v in vals if v["loss_windows"][1]]
            last = float(np.mean([w[-1] for w in windows])) if windows else float(first[:, -1].mean())
            log_v = math.log(vals[0]["info"]["vocab"])
            out.append({"model": name, "row": STRATEGIES[rec], "head 1, step 1": round(float(np.mean(
                [v["first_losses"][0][0] for v in vals])), 3), "head 2, step 1": round(float(first[:, 0].mean()), 3),
                "log V (uniform guess)": round(log_v, 3),
                f"head 2, steps 1-{first.shape[1]}": " ".join(f"{x:.2f}" for x in first.mean(0)),
                "head 2 at the end": round(last, 3), "head 2 falls": bool(last < first[:, 0].mean())})
    return pd.DataFrame(out)


def reference_table(runs: BudgetRuns, probe_profile: str) -> pd.DataFrame:
    """Chapter 2's logit lens and affine probe of z^{L-1} for the 2nd token (stored ``ch02-probe``)
    beside the best trained row's 2nd-token accuracy and how many rows beat the probe."""
    from .whs_report import chapter2_probe

    out = []
    for name in runs.setup.models:
        record, note = chapter2_probe(name, probe_profile, runs.setup.dtype)
        mine = {rec: float(seed_hits(runs, name, rec)[:, :, 1].mean()) for rec in runs.setup.recipes
                if rec != "ntp_baseline" and len(seed_hits(runs, name, rec))}
        row: dict[str, Any] = {"model": name, "lens z^(L-1)": None, "probe z^(L-1)": None,
                               "best trained row (2nd)": max(mine.values()) if mine else None}
        if record is not None and "2" in record["result"]["offsets"]:
            res = record["result"]
            layer = res["n_layers"] - 1
            if layer in res["layers"]:
                j, off = res["layers"].index(layer), res["offsets"]["2"]
                row.update({"lens z^(L-1)": off["lens_accuracy"][j], "probe z^(L-1)": off["probe_accuracy"][j],
                            "probe positions": off["n_test_positions"]})
                above = sum(a > off["probe_accuracy"][j] for a in mine.values())
                row["rows above the probe"] = f"{above} of {len(mine)}"
            else:
                note = f"Chapter 2 did not probe layer {layer}"
        row["note"] = note
        out.append(row)
    return pd.DataFrame(out)


def whs_movement(runs: BudgetRuns) -> pd.DataFrame:
    """How far the WHS weights moved from uniform, per model, seed and head: the largest and smallest
    weight over the uniform 1/(L-1), and the total-variation distance 0.5 * sum |w - 1/(L-1)|."""
    out = []
    for (name, rec, seed), res in runs.rows.items():
        if "whs_weights" not in res.value:
            continue
        for head, w in enumerate(np.asarray(res.value["whs_weights"], dtype=float), 1):
            u = 1 / len(w)
            out.append({"model": name, "seed": seed, "head": head, "max / uniform": round(w.max() / u, 3),
                        "min / uniform": round(w.min() / u, 3), "TV distance": round(0.5 * np.abs(w - u).sum(), 4)})
    return pd.DataFrame(out)


def speed_table(runs: BudgetRuns) -> pd.DataFrame:
    """Training speed per unit: device, compiled layers or eager, how many units shared the GPU, padded or
    packed batches, tokens/s of the training steps, MFU, training seconds."""
    return pd.DataFrame([{"model": n, "row": STRATEGIES[r], "seed": s, "device": res.value["speed"]["device"],
                          "layers": "compiled" if res.value["speed"].get("compiled") else "eager",
                          "units on the GPU": res.value["speed"].get("gpu_processes", 1),
                          "batches": (f"packed, rows of {res.value['speed']['pack_rows']}"
                                      if res.value["speed"].get("pack_rows") else "padded"),
                          "tokens/s": res.value["speed"]["tokens_per_s"], "MFU": res.value["speed"]["mfu"],
                          "train [s]": res.value["train_seconds"]} for (n, r, s), res in runs.rows.items()])


def lr_table(runs: BudgetRuns) -> pd.DataFrame:
    """Each model's base LR: half its published pretraining LR, or the sweep's choice with its scores."""
    out = []
    for name in runs.setup.models:
        if name in runs.setup.lrs:
            peak, source = PUBLISHED_LR.get(name, (None, "given as a parameter"))
            out.append({"model": name, "published pretraining LR": peak, "LR used": runs.setup.lrs[name],
                        "how": f"half the published peak ({source})" if peak else source})
            continue
        scores = {lr: res.value["select_accuracy"] for (m, lr), res in runs.sweep.items() if m == name}
        tried = ", ".join(f"{lr:g}: {np.mean(a):.3f}" for lr, a in sorted(scores.items()))
        why = NOT_PUBLISHED.get(name, "none known")
        out.append({"model": name, "published pretraining LR": f"not published ({why})",
                    "LR used": "after the sweep" if runs.lr[name] is None else runs.lr[name],
                    "how": f"sweep on {STRATEGIES[runs.setup.sweep_recipe]} (mean top-{runs.setup.top_k} of both "
                           f"heads on {runs.setup.n_select} held-out pairs): {tried or 'not run yet'}"})
    return pd.DataFrame(out).set_index("model")


def missing_note(runs: BudgetRuns) -> str:
    """What is not stored yet and the command that computes it ("" when every unit is stored)."""
    if not runs.missing:
        return ""
    cmd = COMMAND.format(profile=runs.setup.profile)
    waiting = [m for m, lr in runs.lr.items() if lr is None]
    text = (f"**{len(runs.missing)} paper-budget unit(s) are not stored yet** (profile `{runs.setup.profile}`). "
            f"On a GPU, `MTP_GIT_COMMIT=$(git rev-parse HEAD) {cmd}` computes every missing one (LR sweeps first; "
            f"`--models`, `--recipes`, `--seeds` pick some; `--list` shows them all); an interrupted run resumes "
            "from its checkpoint. Faster on one GPU: `--compile` (compiled layers: a step 1.70x "
            "faster on an H100) and `--jobs 4` (four units at once, one process each, the next unit starting "
            "as one ends: on an H100 four SmolLM2 units were stored 12 minutes after they started, where one "
            "joint unit alone takes 6.4 minutes of training steps; `data/README.md`); on a host of several "
            "GPUs, `--gpus all` keeps `--jobs` units on each from one queue.")
    if waiting:
        text += (f" The rows of {', '.join(waiting)} wait for their LR sweep (the paper's rule needs a published "
                 "pretraining LR, which these models lack).")
    return text
