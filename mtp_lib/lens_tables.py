"""Chapter 2's tables and summaries, from the stored results of :mod:`mtp_lib.lens_study`.

- :func:`kl_table`, :func:`kl_summary`: Figure 2.1's KL(p_l || p_L) per layer and sample, and its
  values at fixed depths with intervals over samples, beside the paper's Pythia ranges as context;
- :func:`entropy_table`, :func:`entropy_summary`: Figure 2.2's entropies along the two sentences;
- :func:`layer_scores`, :func:`probe_lines`, :func:`lens_probe_agreement`: Figure 2.3's lens and
  probe accuracies, and where the token after next is best read;
- :func:`second_token_floor`, :func:`floor_lines`: the layer where the probes read the token after next
  best and their accuracy there, which Chapter 3 sets beside its Table 1 (the probe floor);
- :func:`scale_table`, :func:`scale_lines`, :func:`rms_lines`: the residual stream's scale;
- :func:`comparison_markdown`: the chapter's closing comparison with the paper.

The paper's values are read off its plots for Pythia on another dataset and tokenizer: they are
shown as context beside our intervals, never turned into a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mtp_lib.metrics import Interval, mean_with_ci
from mtp_lib.report import ci_text, verdict
from mtp_lib.results import CachedResult

__all__ = ["X1", "X2", "comparison_markdown", "entropy_summary", "entropy_table", "floor_lines", "kl_curve",
           "kl_summary", "kl_table", "layer_scores", "second_token_floor", "lens_probe_agreement", "probe_lines", "rms_lines", "scale_lines",
           "scale_table"]

X1, X2 = "xₜ₊₁", "xₜ₊₂"  # for the text built from the results (plain text: no math in cell outputs)
Runs = Mapping[str, CachedResult]


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def kl_table(lens: Runs) -> Any:
    """One row per (model, layer l < L, sample): KL(p_l || p_L) in nats, with depth l / L."""
    import pandas as pd

    rows = []
    for name, res in lens.items():
        kl = np.asarray(res.value["kl"])  # [L, samples]
        n_layers = res.value["n_layers"]
        for layer in range(1, n_layers):  # the last layer is p_L itself (KL 0), as in the paper
            for s, value in enumerate(kl[layer - 1]):
                rows.append({"model": name, "layer": layer, "depth": layer / n_layers, "sample": s, "kl": value})
    return pd.DataFrame(rows)


def kl_curve(value: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Depths l / L and the KL averaged over samples, for l = 1..L-1."""
    n_layers = value["n_layers"]
    return np.arange(1, n_layers) / n_layers, np.asarray(value["kl"]).mean(1)[: n_layers - 1]


def _kl_at(value: Mapping[str, Any], depth: float) -> Interval:
    """KL at a normalized depth (linear between layers) with a bootstrap interval over samples."""
    n_layers = value["n_layers"]
    depths = np.arange(1, n_layers) / n_layers
    per_sample = np.asarray(value["kl"])[: n_layers - 1]  # [L-1, samples]
    return mean_with_ci([float(np.interp(depth, depths, per_sample[:, s])) for s in range(per_sample.shape[1])])


def _paper_range(paper_kl: Any, series: str, depth: float | None = None) -> str:
    part = paper_kl[paper_kl["series"] == series]
    r = part[part["depth"] == depth].iloc[0] if depth is not None else part.iloc[0]
    return f"{r.kl_low:g}-{r.kl_high:g}" if r.kl_low != r.kl_high else f"{r.kl_low:g}"


def kl_summary(lens: Runs, paper_kl: Any) -> tuple[Any, list[str]]:
    """KL at depths 0.25, 0.5, 0.75 and at layer L-1 per model (mean over samples), and per model a line
    with 95% intervals over samples beside the paper's Pythia ranges (context, read off its plot)."""
    import pandas as pd

    rows, lines = [], []
    half_ref, end_ref = _paper_range(paper_kl, "larger Pythia models", 0.5), _paper_range(paper_kl, "larger Pythia models", 1.0)
    small_ref = _paper_range(paper_kl, "Pythia 31M")
    for name, res in lens.items():
        depth, mean = kl_curve(res.value)
        rows.append({"model": name, "KL at depth 0.25": float(np.interp(0.25, depth, mean)),
                     "KL at depth 0.5": float(np.interp(0.5, depth, mean)),
                     "KL at depth 0.75": float(np.interp(0.75, depth, mean)), "KL at layer L-1": float(mean[-1])})
        below2 = depth[np.argmax(mean < 2.0)] if (mean < 2.0).any() else None
        half, end = _kl_at(res.value, 0.5), _kl_at(res.value, float(depth[-1]))
        lines.append(
            f"- **{name}** ({res.value['n_layers']} layers): {ci_text(half, 1)} nats at half depth (the paper's larger "
            f"Pythia models: {half_ref}); {ci_text(end)} nats at layer L-1 (theirs: {end_ref}; Pythia 31M: "
            f"{small_ref}). " + (f"The KL first drops below 2 nats at depth {below2:.2f}." if below2 is not None
                                 else "The KL never drops below 2 nats before the last layer."))
    return pd.DataFrame(rows).set_index("model"), lines


def entropy_table(sentences: Runs) -> tuple[dict[str, str], Any]:
    """Figure 2.2's data: panel titles (with their English sentence) and one row per model, sentence
    and predicted token: its first character and the next-token entropy."""
    import pandas as pd

    titles, rows = {}, []
    for name, res in sentences.items():
        for i, sent in enumerate(res.value["sentences"][:2]):
            title = ("the paper's sentence, our Spanish source" if i == 0
                     else f"a Bible validation sentence ({sent['id'].split('/')[-1]})")
            titles[title] = sent["target"]
            for tok, char, ent in zip(sent["tokens"], sent["chars"], sent["entropy"]):
                rows.append({"model": name, "sentence": title, "token": tok, "char": char, "entropy": ent})
    return titles, pd.DataFrame(rows)


def entropy_summary(ent: Any, paper_ent: Any) -> Any:
    """Per model and sentence: median and largest entropy, the share of tokens inside the paper's large
    models' band, and the tokens above the small model's peaks."""
    import pandas as pd

    low_band, peak_band = paper_ent.iloc[1], paper_ent.iloc[0]
    rows = []
    for (name, title), part in ent.groupby(["model", "sentence"], sort=False):
        e = part["entropy"].to_numpy()
        worst = part.iloc[int(np.argmax(e))]
        rows.append({"model": name, "sentence": title, "tokens": len(e), "median entropy": np.median(e),
                     f"share in {low_band.entropy_low:g}-{low_band.entropy_high:g} nats":
                         f"{np.mean((e >= low_band.entropy_low) & (e <= low_band.entropy_high)):.0%}",
                     "max": e.max(), "at token": repr(worst["token"]),
                     f"tokens >= {peak_band.entropy_low:g} nats": int((e >= peak_band.entropy_low).sum())})
    return pd.DataFrame(rows).set_index(["model", "sentence"]).round(2)


def layer_scores(lens: Runs, probes: Runs) -> Any:
    """Figure 2.3's data: per model, layer, method (lens, probe) and target (next, 2nd): accuracy and NLL."""
    import pandas as pd

    rows = []
    for name, res in lens.items():
        lr_, pr = res.value, probes[name].value
        n_layers = lr_["n_layers"]
        nll = {k: dict(zip(pr["layers"], v["lens_nll"])) for k, v in pr["offsets"].items()}
        for layer in range(1, n_layers + 1):
            for target, key, off in (("next", "hits_next", "1"), ("2nd", "hits_2nd", "2")):
                rows.append({"model": name, "layer": layer, "depth": layer / n_layers, "method": "lens",
                             "target": target, "accuracy": float(np.mean(lr_[key][layer - 1])),
                             "nll": nll.get(off, {}).get(layer, np.nan)})
        for off, v in pr["offsets"].items():
            for layer, acc, loss in zip(pr["layers"], v["probe_accuracy"], v["probe_nll"]):
                rows.append({"model": name, "layer": layer, "depth": layer / n_layers, "method": "probe",
                             "target": "next" if off == "1" else "2nd", "accuracy": acc, "nll": loss})
    return pd.DataFrame(rows)


def _stderr(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 1e-12) / n))


def _probe_2nd(v: Mapping[str, Any], layers: list[int], n_layers: int, probe_steps: int, probe_batch: int) -> str:
    acc = np.asarray(v["probe_accuracy"])
    n = v["n_test_positions"]
    best = len(acc) - 1 - int(np.argmax(acc[::-1]))  # ties go to the later layer
    best_layer, last_acc = layers[best], acc[-1]
    if best_layer == n_layers:
        text = (f" The {X2} probes are most accurate at the last layer ({last_acc:.2f}): no earlier layer beats it, "
                "no sign here that the last layer has given up second-token information.")
    else:
        gap = float(acc[best] - last_acc)
        half = 1.96 * float(np.hypot(_stderr(acc[best], n), _stderr(last_acc, n)))
        v_gap = verdict((gap, gap - half, gap + half), digits=2)
        text = (f" The {X2} probes reach {acc[best]:.2f} at layer {best_layer} (depth {best_layer / n_layers:.2f}) and "
                f"{last_acc:.2f} at the last layer; that an earlier layer reads {X2} better: {v_gap.text} (normal "
                f"approximation over {n} test positions taken as independent: the stored result has no per-position "
                "hits for a paired interval).")
    worse = int((acc < np.asarray(v["lens_accuracy"])).sum())
    if worse:
        text += (f" At {worse} of {len(acc)} probed layers the probe is *less* accurate than the plain lens it "
                 f"started from (while its NLL is lower): with {probe_steps} steps of {probe_batch} positions it is "
                 "undertrained, and its accuracies are a loose lower bound.")
    return text


def probe_lines(lens: Runs, probes: Runs, *, top_k: int, probe_steps: int, probe_batch: int) -> list[str]:
    """Per model: where the lens reaches the next token, where it and the probes best read the token after."""
    lines = []
    for name, res in lens.items():
        lr_, pr = res.value, probes[name].value
        n_layers = lr_["n_layers"]
        lens_next, lens_2nd = np.asarray(lr_["hits_next"]).mean(1), np.asarray(lr_["hits_2nd"]).mean(1)
        reach = int(np.argmax(lens_next >= 0.9 * lens_next[-1])) + 1
        best_lens2 = int(np.argmax(lens_2nd)) + 1
        text = (f"- **{name}**: the lens's top-{top_k} accuracy for {X1} reaches 90% of the model's own "
                f"({lens_next[-1]:.2f}) at layer {reach} of {n_layers} (depth {reach / n_layers:.2f}). For {X2} the "
                f"lens is best at layer {best_lens2} ({lens_2nd[best_lens2 - 1]:.2f}; the model's own next-token "
                f"distribution read as a guess for {X2} gives {lens_2nd[-1]:.2f}).")
        if "2" in pr["offsets"]:
            text += _probe_2nd(pr["offsets"]["2"], pr["layers"], n_layers, probe_steps, probe_batch)
        lines.append(text)
    return lines


def second_token_floor(probe: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where a ``ch02-probe`` result reads the token after next best: the probed layer with the highest
    x_(t+2) probe accuracy (ties to the later layer), that accuracy with a normal-approximation 95%
    interval over its test positions, the lens's accuracy there, and the probe's accuracy at layer L-1
    (the state Chapter 3's heads read) when it was probed. None when no x_(t+2) probe was trained."""
    v = probe["offsets"].get("2")
    if v is None:
        return None
    acc, layers, n = np.asarray(v["probe_accuracy"], dtype=float), list(probe["layers"]), int(v["n_test_positions"])
    best = len(acc) - 1 - int(np.argmax(acc[::-1]))
    half = 1.96 * _stderr(float(acc[best]), n)
    backbone = probe["n_layers"] - 1
    return {"layer": layers[best], "n_layers": probe["n_layers"], "accuracy": float(acc[best]),
            "lo": max(0.0, float(acc[best]) - half), "hi": min(1.0, float(acc[best]) + half), "n_positions": n,
            "lens_accuracy": float(v["lens_accuracy"][best]),
            "backbone_accuracy": float(acc[layers.index(backbone)]) if backbone in layers else None}


def floor_lines(probes: Runs, *, top_k: int) -> list[str]:
    """Per model, plainly: at which layer the token after next is best read, and how well (the probe floor)."""
    lines = []
    for name, res in probes.items():
        floor = second_token_floor(res.value)
        if floor is None:
            lines.append(f"- **{name}**: no {X2} probe in this profile (probe_offsets lacks 2).")
            continue
        where = ("the last layer, the model's own final state" if floor["layer"] == floor["n_layers"]
                 else f"depth {floor['layer'] / floor['n_layers']:.2f}")
        text = (f"- **{name}**: {X2} is best read at **layer {floor['layer']} of {floor['n_layers']}** ({where}): a "
                f"linear probe's top-{top_k} accuracy there is **{ci_text((floor['accuracy'], floor['lo'], floor['hi']))}** "
                f"on {floor['n_positions']:,} held-out positions (normal approximation; the plain lens: "
                f"{floor['lens_accuracy']:.2f}).")
        if floor["backbone_accuracy"] is not None and floor["layer"] != floor["n_layers"] - 1:
            text += f" At layer {floor['n_layers'] - 1}, the state Chapter 3's heads read, the probe gets {floor['backbone_accuracy']:.2f}."
        lines.append(text)
    return lines


def lens_probe_agreement(lens: Runs, probes: Runs) -> float:
    """The largest difference between the lens accuracies of ``ch02-lens`` and of ``ch02-probe`` (two code
    paths scoring the same positions) over models, offsets and probed layers."""
    diffs = []
    for name, res in lens.items():
        pr = probes[name].value
        for off, v in pr["offsets"].items():
            key = "hits_next" if off == "1" else "hits_2nd"
            ours = [float(np.mean(res.value[key][layer - 1])) for layer in pr["layers"]]
            diffs.append(float(np.max(np.abs(np.asarray(ours) - np.asarray(v["lens_accuracy"])))))
    return max(diffs)


def scale_table(lens: Runs, probes: Runs) -> Any:
    """Per model and probed layer: the residual stream's RMS, the largest RMS (and its token), the lens's
    entropy and its NLL of the probe target."""
    import pandas as pd

    rows = []
    for name, res in lens.items():
        lr_, pr = res.value, probes[name].value
        off = "1" if "1" in pr["offsets"] else "2"
        nll = dict(zip(pr["layers"], pr["offsets"][off]["lens_nll"]))
        ent = np.asarray(lr_["entropy"]).mean(1)
        for layer in pr["layers"]:
            rows.append({"model": name, "layer": layer, "RMS at evaluated positions": lr_["rms_evaluated"][layer - 1],
                         "max RMS (token)": f"{_fmt(lr_['rms_max'][layer - 1])} ({lr_['rms_max_token'][layer - 1]!r}, "
                                            f"position {lr_['rms_max_position'][layer - 1]})",
                         "lens entropy": ent[layer - 1], f"lens NLL of {X1 if off == '1' else X2}": nll[layer]})
    return pd.DataFrame(rows).set_index(["model", "layer"])


def scale_lines(scale: Any) -> list[str]:
    """Per model: where the lens's NLL peaks, and whether it is confident and wrong there."""
    lines = []
    for name in dict.fromkeys(scale.index.get_level_values(0)):
        part = scale.loc[name]
        col = [c for c in part.columns if c.startswith("lens NLL")][0]
        worst = part[col].idxmax()
        nll_w, ent_w = float(part[col].max()), float(part["lens entropy"][worst])
        confident = nll_w > ent_w + 3
        reading = ("the lens is confident and wrong there, which its top-k accuracy hides" if confident
                   else "the lens is uncertain there rather than confidently wrong")
        lines.append(f"- **{name}**: the lens {col[5:]} peaks at layer {worst}, {nll_w:.1f} nats against "
                     f"{part[col].iloc[-1]:.1f} at the last layer, "
                     + (f"while the lens's entropy at that layer is only {ent_w:.1f} nats" if confident
                        else f"with an entropy of {ent_w:.1f} nats") + f": {reading}.")
    return lines


def rms_lines(lens: Runs) -> list[str]:
    """Per model: how the RMS grows with depth, and any massive activation (a token 20 times larger)."""
    lines = []
    for name, res in lens.items():
        lr_ = res.value
        ratio = np.asarray(lr_["rms_max"]) / np.asarray(lr_["rms_evaluated"])
        big = np.nonzero(ratio > 20)[0]
        ev = lr_["rms_evaluated"]
        text = (f"- **{name}**: at the evaluated positions the RMS grows with depth, from {_fmt(ev[0])} after "
                f"layer 1 to {_fmt(ev[-1])} after layer {len(ev)}. ")
        if len(big):
            pos = sorted({(lr_["rms_max_position"][i], lr_["rms_max_token"][i]) for i in big})
            where = ", ".join(f"position {p} ({t!r})" for p, t in pos)
            text += (f"From layer {big[0] + 1} on, one token ({where}) carries a state {ratio[big].min():.0f}-"
                     f"{ratio[big].max():.0f} times larger: a *massive activation*, which dominates any average over "
                     "all positions but not the evaluated ones.")
        else:
            text += f"No position exceeds 20 times that RMS (largest ratio {ratio.max():.1f})."
        lines.append(text)
    return lines


def comparison_markdown(lens: Runs, ent: Any, paper_kl: Any, paper_ent: Any) -> str:
    """Per model: its KL at half depth and at layer L-1 and its entropies along the two sentences, beside
    the paper's Pythia ranges (context); then the curves' shape, which our own numbers do decide."""
    low, peak = paper_ent.iloc[1], paper_ent.iloc[0]
    lines = []
    for name, res in lens.items():
        e = ent[ent["model"] == name]["entropy"].to_numpy()
        inside = np.mean((e >= low.entropy_low) & (e <= low.entropy_high))
        lines.append(
            f"- **{name}**: KL {ci_text(_kl_at(res.value, 0.5), 1)} nats at half depth (the paper's larger Pythia "
            f"models: {_paper_range(paper_kl, 'larger Pythia models', 0.5)}, its small ones higher) and "
            f"{ci_text(_kl_at(res.value, float(kl_curve(res.value)[0][-1])))} at layer L-1 (larger Pythia: "
            f"{_paper_range(paper_kl, 'larger Pythia models', 1.0)}). Along the two sentences, {inside:.0%} of its "
            f"tokens have an entropy in the larger models' {low.entropy_low:g}-{low.entropy_high:g} nats and "
            f"{int((e >= peak.entropy_low).sum())} of {len(e)} reach {peak.entropy_low:g} nats.")
    curves = {n: kl_curve(r.value) for n, r in lens.items()}
    late = {n: float(d[np.argmax(m < 2.0)]) if (m < 2.0).any() else 1.0 for n, (d, m) in curves.items()}
    small_end = {n: float(m[-1]) <= 1.5 for n, (d, m) in curves.items()}
    if all(v >= 0.75 for v in late.values()) and all(small_end.values()):
        shape = ("**The logit lens agrees in shape.** In every model it comes within 2 nats of the output only in the last "
                 f"quarter of the network (from depth {min(late.values()):.2f} on) and ends within 1.5 nats of it: the "
                 "last layers do the next-token work, as in the paper. The levels are context only: another "
                 "dataset, tokenizer and model family, read off the paper's plot.")
    else:
        shape = ("**The logit lens, in shape.** The depth at which it comes within 2 nats of the output: "
                 + ", ".join(f"{n} {d:.2f}" for n, d in late.items())
                 + "; KL at layer L-1 within 1.5 nats: " + ", ".join(f"{n} {'yes' if v else 'no'}"
                                                                    for n, v in small_end.items())
                 + ". Compare with the paper's picture above.")
    shape += (" The logit lens is not calibrated on these models (Figure 2.1b), so this shape is no verdict: the "
              "early-specialization verdict below reads the tuned lens.")
    return "\n".join(lines) + "\n\n" + shape
