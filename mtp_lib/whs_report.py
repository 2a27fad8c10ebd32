"""Where the weighted-hidden-states (WHS) heads look, against Chapter 2's per-layer probes (Chapter 3).

The Diff. LR + WHS row of Chapter 3 stores its learned mixing weights softmax(w_n / T), one row per
head over the backbone layers 1..L-1. Chapter 2 stores, per layer, a linear probe's (and the logit
lens') top-k accuracy for x_{t+n} (result ``ch02-probe``). :func:`whs_frames` puts both in long
tables for :func:`mtp_lib.plots.heads.whs_weights`, and :func:`whs_note` words how far the weights
moved and whether head 2 weights the layers where the probe reads x_{t+2} best. :func:`probe_floor`
gives Table 1 its reference row: the layer where Chapter 2's probes read x_{t+2} best and their
accuracy there (:func:`mtp_lib.lens_tables.second_token_floor`), the probe floor.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .results import repo_root, results_dir

__all__ = ["FLOOR_ROW", "WhsFrames", "chapter2_probe", "chapter2_settings", "notebook_parameters", "probe_floor", "whs_frames",
           "whs_note"]

FLOOR_ROW = "Reference: Chapter 2 probe floor (2nd token)"


def notebook_parameters(path: Path | str) -> dict[str, Any]:
    """The literal values of a notebook's ``parameters`` cell (names bound to non-literals are left out)."""
    nb = json.loads(Path(path).read_text())
    cell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    values = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def chapter2_settings(profile: str, root: Path | None = None) -> tuple[dict[str, Any], Any, Any] | None:
    """Chapter 2's probe settings for ``profile`` (its parameters cell, overridden by the profile):
    the probe's cache keys, its training samples and its test samples; None without Chapter 2."""
    from .book import load_profile

    path = (root or repo_root()) / "chapters" / "02_layer_specialization.ipynb"
    if not path.is_file():
        return None
    values = notebook_parameters(path)
    try:
        values.update(load_profile(profile, root).chapters.get("02_layer_specialization", {}))
    except ValueError:  # a profile without a YAML file: the notebook's defaults
        pass
    keys = {"offsets": sorted(values.get("probe_offsets", [])), "layer_stride": values.get("probe_layer_stride"),
            "steps": values.get("probe_steps"), "batch_size": values.get("probe_batch"), "seed": values.get("seed")}
    return keys, values.get("probe_train_samples"), values.get("n_samples")


def chapter2_probe(name: str, profile: str, dtype: str) -> tuple[dict[str, Any] | None, str]:
    """The stored ``ch02-probe`` record of this model and dtype: the one made with Chapter 2's current
    settings for ``profile`` if present, else the newest (with a note saying so); None with the reason
    when there is none."""
    found = []
    for path in sorted(results_dir(profile).glob("ch02-probe-*.json")):
        record = json.loads(path.read_text())
        config = record.get("config", {})
        if config.get("model") == name and config.get("dtype") == dtype:
            found.append(record)
    if not found:
        return None, (f"no stored Chapter 2 probe (ch02-probe) for {name} in profile '{profile}': run Chapter 2 "
                      "with this profile first")
    settings = chapter2_settings(profile)
    exact = []
    if settings is not None:
        keys, n_train2, n_test2 = settings
        exact = [r for r in found if all(r["config"].get(k) == v for k, v in keys.items())
                 and r["config"].get("train", {}).get("n") == n_train2 and r["config"].get("test", {}).get("n") == n_test2]
    chosen = max(exact or found, key=lambda r: r["provenance"].get("date", ""))
    return chosen, ("" if exact else "the newest stored Chapter 2 probe (its settings differ from Chapter 2's current "
                                     "ones for this profile)")


class WhsFrames:
    """The WHS weights (``model, head, layer, weight``), Chapter 2's accuracies (``model, layer, method,
    accuracy``), per-model notes on missing probes, and the sentence naming the probes used."""

    def __init__(self, weights: pd.DataFrame, probe: pd.DataFrame | None, notes: dict[str, str], text: str) -> None:
        self.weights, self.probe, self.notes, self.text = weights, probe, notes, text


def _weights(rows: Mapping[tuple[str, str], Any], name: str) -> np.ndarray:
    return np.asarray(rows[name, "diff_lr_whs"].value["whs_weights"])  # [heads, L-1]


def whs_frames(rows: Mapping[tuple[str, str], Any], models: Sequence[str], profile: str, dtype: str) -> WhsFrames:
    """The WHS weights of every model's Diff. LR + WHS row beside Chapter 2's x_(t+2) probe and lens."""
    weight_rows: list[dict[str, Any]] = []
    probe_rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    used = []
    for name in models:
        if (name, "diff_lr_whs") not in rows:
            continue
        for head, ws in enumerate(_weights(rows, name), 1):
            weight_rows += [{"model": name, "head": head, "layer": layer, "weight": x} for layer, x in enumerate(ws, 1)]
        record, note = chapter2_probe(name, profile, dtype)
        if record is None or "2" not in record["result"]["offsets"]:
            notes[name] = note or "the stored Chapter 2 probe has no x_(t+2) offset"
            continue
        res2, c = record["result"], record["config"]
        off = res2["offsets"]["2"]
        for method, key in (("probe", "probe_accuracy"), ("lens", "lens_accuracy")):
            probe_rows += [{"model": name, "layer": layer, "method": method, "accuracy": a}
                           for layer, a in zip(res2["layers"], off[key])]
        used.append(f"{name}: probes on layers {res2['layers']}, trained {c['steps']} steps on "
                    f"{res2['n_train_positions']:,} positions, tested on {off['n_test_positions']} positions"
                    + (f" ({note})" if note else ""))
    text = ("Chapter 2 probes used: " + ("; ".join(used) if used else "none") + "."
            + "".join(f" **{m}**: {t}." for m, t in notes.items()))
    return WhsFrames(pd.DataFrame(weight_rows), pd.DataFrame(probe_rows) if probe_rows else None, notes, text)


def _model_line(w: np.ndarray, name: str, probe: pd.DataFrame | None) -> str:
    # the layers each head weights most, and head 2's rank correlation with the probe's accuracy
    n_back = w.shape[1]
    parts = []
    for head, ws in enumerate(w, 1):
        top = np.argsort(ws)[::-1][:3] + 1
        parts.append(f"head {head} weights layers {', '.join(map(str, top))} most (largest weight {ws.max():.3f}, "
                     f"{ws.max() * n_back:.2f}x uniform; smallest {ws.min() * n_back:.2f}x uniform)")
    text = f"- **{name}**: " + "; ".join(parts) + "."
    mine = probe[(probe["model"] == name) & (probe["method"] == "probe") & (probe["layer"] <= n_back)] \
        if probe is not None else pd.DataFrame()
    if len(mine) >= 3:
        layers = mine["layer"].tolist()
        acc2 = mine["accuracy"].to_numpy()
        corr = pd.Series(w[1][np.asarray(layers) - 1]).rank().corr(pd.Series(acc2).rank())
        text += (f" Chapter 2's x_(t+2) probe is best at layer {layers[int(np.argmax(acc2))]} of the probed backbone "
                 f"layers {layers}; across those {len(layers)} layers the rank correlation of head 2's weight with the "
                 f"probe accuracy is {corr:+.2f}" + (" (too few layers for this to mean much)." if len(layers) < 6 else "."))
    return text


def whs_note(rows: Mapping[tuple[str, str], Any], models: Sequence[str], probe: pd.DataFrame | None) -> str:
    """Per model, the layers each WHS head weights most; and whether the weights moved from uniform at all."""
    names = [n for n in models if (n, "diff_lr_whs") in rows]
    if not names:
        return "The Diff. LR + WHS row is not among this run's `recipes`: no WHS weights to show."
    lines = [_model_line(_weights(rows, n), n, probe) for n in names]
    moved = max(float(np.abs(_weights(rows, n) * _weights(rows, n).shape[1] - 1).max()) for n in names)
    if moved < 0.2:
        lines.append(f"The weights are all within {moved:.0%} of uniform: training was too short for WHS to choose "
                     "layers, so the comparison with the probes is empty for this run.")
    return "\n".join(lines)


def probe_floor(models: Sequence[str], profile: str, dtype: str, *, top_k: int = 5) -> tuple[pd.DataFrame, str]:
    """Table 1's reference row: per model column ``"<model> (ours)"``, Chapter 2's best x_(t+2) probe accuracy
    ("- / 0.431 (layer 30)"; the probe reads no next token), and the sentence that says what it is."""
    from .lens_tables import second_token_floor

    row: dict[str, str] = {}
    lines = []
    for name in models:
        record, note = chapter2_probe(name, profile, dtype)
        floor = second_token_floor(record["result"]) if record is not None else None
        if record is None or floor is None:
            lines.append(f"**{name}**: no probe floor ({note or 'the stored Chapter 2 probe has no x_(t+2) offset'}).")
            continue
        row[f"{name} (ours)"] = f"- / {floor['accuracy']:.3f} (layer {floor['layer']})"
        at_backbone = floor["backbone_accuracy"] is not None and floor["layer"] != floor["n_layers"] - 1
        lines.append(
            f"**{name}**: a linear probe on the frozen model reads x_(t+2) best at layer {floor['layer']} of "
            f"{floor['n_layers']}, top-{top_k} accuracy {floor['accuracy']:.3f} [{floor['lo']:.3f}, {floor['hi']:.3f}] "
            f"on {floor['n_positions']:,} positions of the first {record['config']['test']['n']} validation samples"
            + (f"; at layer {floor['n_layers'] - 1}, the heads' input, {floor['backbone_accuracy']:.3f}" if at_backbone
               else "") + (f" ({note})" if note else "") + ".")
    text = ("**Reference row: the probe floor.** Chapter 2's best one-affine-map reader of the token after next, "
            "with no training of the model: what a 2nd-token head on the frozen model has at least to read. Its test "
            "positions are Table 1's kind (the last 20 target tokens of the first validation samples, 20-60 target "
            "words), on Chapter 2's sample count. " + " ".join(lines))
    return pd.DataFrame([row], index=[FLOOR_ROW]) if row else pd.DataFrame(), text
