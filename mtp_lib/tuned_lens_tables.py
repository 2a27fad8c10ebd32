"""Chapter 2's tuned lens beside the logit lens, from the stored results of :mod:`mtp_lib.tuned_lens_study`.

- :func:`lens_frame`: per model, lens (logit, tuned), layer and sample: KL(lens || p_L) and the next
  token's NLL, for Figure 2.1b;
- :func:`calibration_table`, :func:`calibration_lines`: how badly the logit lens is calibrated (its
  NLL of the next token against the uniform guess log|V|), and what the tuned lens does instead;
- :func:`probe_calibration_lines`: the same miscalibration read from Chapter 2's next-token probes, for a
  profile that has them but lacks the tuned lens;
- :func:`specialization_lines`: the early-specialization verdict, from the calibrated lens;
- :func:`missing_note`: what the page says when a profile lacks the result.

Both lenses are scored on the same held-out positions, so their differences are paired: intervals are
cluster bootstraps over samples of the per-sample differences (:func:`mtp_lib.report.paired_difference`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mtp_lib.marginal_claims import MIN_SAMPLES
from mtp_lib.metrics import mean_with_ci
from mtp_lib.report import ci_text, paired_difference, verdict
from mtp_lib.results import CachedResult

__all__ = ["SETTLED_NATS", "calibration_lines", "calibration_table", "lens_frame", "lens_rows", "missing_note", "probe_calibration_lines",
           "specialization_lines", "specialization_layer"]

SETTLED_NATS = 2.0  # a lens within this many nats of the output has "settled" on the next token (as Figure 2.1's text)
Runs = Mapping[str, CachedResult]
_LENSES = ("logit", "tuned")


def lens_rows(value: Mapping[str, Any], lens: str, metric: str) -> dict[int, np.ndarray]:
    """Layer (1-based) -> per-sample values of one lens; the tuned lens at its layers and at L (the output)."""
    n_layers = value["n_layers"]
    stored = np.asarray(value[lens][metric], dtype=float)
    if lens == "logit":
        return {layer: stored[layer - 1] for layer in range(1, n_layers + 1)}
    out = dict(zip(value["tuned_layers"], stored))
    out[n_layers] = np.asarray(value["logit"][metric], dtype=float)[n_layers - 1]
    return out


def lens_frame(tuned: Runs) -> Any:
    """One row per model, lens, layer l < L and sample: depth l / L, KL(lens || p_L) (``kl``), KL(p_L || lens)
    (``kl_from_output``) and the NLL of x_(t+1) (nats)."""
    import pandas as pd

    rows = []
    for name, res in tuned.items():
        v = res.value
        for lens in _LENSES:
            kl, back, nll = (lens_rows(v, lens, m) for m in ("kl", "kl_from_output", "nll"))
            for layer in sorted(kl):
                if layer == v["n_layers"]:
                    continue
                for s, (a, b, c) in enumerate(zip(kl[layer], back[layer], nll[layer])):
                    rows.append({"model": name, "lens": f"{lens} lens", "layer": layer, "depth": layer / v["n_layers"],
                                 "sample": s, "kl": a, "kl_from_output": b, "nll": c, "log_vocab": math.log(v["vocab"])})
    return pd.DataFrame(rows)


def calibration_table(tuned: Runs) -> Any:
    """Per model and tuned layer (and L): both lenses' mean NLL of x_(t+1), top-k accuracy and entropy, beside log|V|."""
    import pandas as pd

    rows = []
    for name, res in tuned.items():
        v = res.value
        metrics = {(lens, m): lens_rows(v, lens, m) for lens in _LENSES for m in ("nll", "hit", "entropy", "kl", "kl_from_output")}
        for layer in sorted(metrics[("tuned", "nll")]):
            row: dict[str, Any] = {"model": name, "layer": layer, "depth": round(layer / v["n_layers"], 2)}
            for lens in _LENSES:
                row[f"NLL, {lens} lens"] = float(metrics[(lens, "nll")][layer].mean())
            row["log|V| (uniform guess)"] = math.log(v["vocab"])
            for lens in _LENSES:
                row[f"entropy, {lens} lens"] = float(metrics[(lens, "entropy")][layer].mean())
            for lens in _LENSES:
                row[f"top-{res.config['top_k']}, {lens} lens"] = float(metrics[(lens, "hit")][layer].mean())
            for lens in _LENSES:
                row[f"KL(p_L || lens), {lens} lens"] = float(metrics[(lens, "kl_from_output")][layer].mean())
            for lens in _LENSES:
                row[f"KL(lens || p_L), {lens} lens"] = float(metrics[(lens, "kl")][layer].mean())
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "layer"])


def calibration_lines(tuned: Runs) -> list[str]:
    """Per model: at how many layers the logit lens does worse than the uniform guess on the next token, and
    how much the tuned lens lowers the NLL (paired, over samples) at its worst layer."""
    lines = []
    for name, res in tuned.items():
        v = res.value
        log_v, n_layers = math.log(v["vocab"]), v["n_layers"]
        logit, tuned_nll = lens_rows(v, "logit", "nll"), lens_rows(v, "tuned", "nll")
        means = {layer: float(x.mean()) for layer, x in logit.items() if layer < n_layers}
        above = [layer for layer, m in means.items() if m > log_v]
        worst = max(means, key=lambda layer: means[layer])
        probed = [layer for layer in tuned_nll if layer < n_layers]
        at = max(probed, key=lambda layer: means[layer])  # the tuned layer where the logit lens is worst
        gain = paired_difference(logit[at], tuned_nll[at])
        ok = [layer for layer in probed if tuned_nll[layer].mean() <= log_v]
        lines.append(
            f"- **{name}** (|V| = {v['vocab']:,}, log|V| = {log_v:.1f} nats): the logit lens's NLL of the next token is "
            f"above the uniform guess at {len(above)} of {n_layers - 1} layers, worst at layer {worst} "
            f"({means[worst]:.1f} nats; the model's own: {float(logit[n_layers].mean()):.2f}). The tuned lens lowers "
            f"it at layer {at} by {ci_text(gain, 1)} nats (paired over {len(logit[at])} samples) and is below log|V| "
            f"at {len(ok)} of its {len(probed)} layers.")
    return lines


def specialization_layer(value: Mapping[str, Any], depth: float = 0.5) -> int:
    """The tuned layer closest to ``depth`` l / L (the earlier one on a tie)."""
    layers = value["tuned_layers"]
    return min(layers, key=lambda layer: (round(abs(layer / value["n_layers"] - depth), 9), layer))


def specialization_lines(tuned: Runs, *, depth: float = 0.5, min_samples: int = MIN_SAMPLES) -> list[str]:
    """Per model: the paper's early specialization ("by half depth the layers have settled on the next
    token") judged with the calibrated lens: KL(p_L || q_l), the tuned lens's own measure of how much of
    the output it misses, below :data:`SETTLED_NATS` at the tuned layer nearest ``depth``, with a
    bootstrap interval over samples; the paper's direction KL(q_l || p_L) and the logit lens beside it."""
    lines = []
    for name, res in tuned.items():
        v = res.value
        layer = specialization_layer(v, depth)
        est = mean_with_ci(lens_rows(v, "tuned", "kl_from_output")[layer])
        judged = verdict(est, direction="less", threshold=SETTLED_NATS, samples=len(lens_rows(v, "tuned", "kl")[layer]),
                         min_samples=min_samples, digits=2, signed=False)
        lines.append(
            f"- **{name}**, layer {layer} of {v['n_layers']} (depth {layer / v['n_layers']:.2f}): KL(p_L || q_l) = "
            f"{ci_text(est)} nats for the tuned lens (the logit lens: "
            f"{ci_text(mean_with_ci(lens_rows(v, 'logit', 'kl_from_output')[layer]))}); in the paper's direction, "
            f"KL(q_l || p_L) = {ci_text(mean_with_ci(lens_rows(v, 'tuned', 'kl')[layer]))} (logit lens: "
            f"{ci_text(mean_with_ci(lens_rows(v, 'logit', 'kl')[layer]))}). That the next token is settled by this depth "
            f"(below {SETTLED_NATS:g} nats): **{judged.label}**" + (f" ({judged.reason})" if judged.reason else "") + ".")
    return lines


def probe_calibration_lines(lens: Runs, probes: Runs) -> list[str]:
    """From the stored ``ch02-lens`` and ``ch02-probe`` results alone: per model with next-token probes, at how
    many probed layers the logit lens's NLL of x_(t+1) exceeds log|V|, and the NLL of the next-token probe (an
    affine map trained by cross-entropy, tuned-lens's other objective) at the lens's worst layer."""
    lines = []
    for name, res in lens.items():
        pr = probes[name].value
        if "1" not in pr["offsets"]:
            continue
        log_v, v = math.log(res.value["info"]["vocab"]), pr["offsets"]["1"]
        layers = [layer for layer in pr["layers"] if layer < pr["n_layers"]]
        lens_nll = dict(zip(pr["layers"], v["lens_nll"]))
        probe_nll = dict(zip(pr["layers"], v["probe_nll"]))
        worst = max(layers, key=lambda layer: lens_nll[layer])
        above = sum(lens_nll[layer] > log_v for layer in layers)
        lines.append(f"- **{name}** (log|V| = {log_v:.1f} nats): the logit lens's NLL of the next token exceeds the "
                     f"uniform guess at {above} of the {len(layers)} probed layers below the last, worst at layer {worst} "
                     f"({lens_nll[worst]:.1f} nats), where the next-token probe of `ch02-probe` gets "
                     f"{probe_nll[worst]:.1f} nats ({v['n_test_positions']:,} held-out positions).")
    return lines


def missing_note(missing: Mapping[str, str], command: str, *, short: bool = False) -> str:
    """The page's note for models whose tuned-lens result this profile lacks, with the command that computes it
    (``short``: one sentence pointing to the first note)."""
    if not missing:
        return ""
    names = ", ".join(f"`{m}`" for m in missing)
    if short:
        return f"(The tuned lens of {names} is not computed for this profile: see above.)"
    return (f"**Not computed yet for this profile:** the tuned lens of {names}. "
            f"On a machine with a GPU, from the checkout's root: `{command}` computes and stores it under "
            f"`data/results/`; commit the new files and rebuild. Until then the sections below show only the logit "
            f"lens of {names} and draw no calibrated verdict for {'it' if len(missing) == 1 else 'them'}.")
