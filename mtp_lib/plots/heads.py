"""Figures of chapter 3: MTP heads (architecture, accuracy per strategy, training curves, WHS weights).

Each function takes plain data (an integer, pandas DataFrames) and returns the matplotlib Figure.
The paper's Table 1 values (``data/paper/table1.csv``) are drawn as their own grey series labelled
"paper (Pythia ...), Table 1", never mixed with ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .common import figure_legend, model_colors, require_columns as _require

__all__ = ["PAPER_LABEL", "TARGETS", "architecture", "paper_table", "strategy_accuracy", "training_curves", "whs_weights"]

PAPER_LABEL = "paper, Table 1"
TARGETS = {"next": "next token $x_{t+1}$", "2nd": "2nd token $x_{t+2}$"}
_PAPER_COLOR = "0.45"
_FROZEN, _HEAD, _MIX, _SHARED = "#c7d3e3", "#f6d5ad", "#c9e7c9", "#dddddd"


# --------------------------------------------------------------------------------------------------
# Figure 5 of the paper: the architecture, drawn from the model's layer count


def _box(ax: Any, x: float, y: float, w: float, h: float, color: str, text: str = "", *, gid: str = "",
         fontsize: float = 8) -> Any:
    from matplotlib.patches import FancyBboxPatch

    patch = FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.0,rounding_size=0.06", facecolor=color,
                           edgecolor="0.25", linewidth=0.8)
    patch.set_gid(gid or None)
    ax.add_patch(patch)
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)
    return patch


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], *, gid: str = "", **kw: Any) -> Any:
    from matplotlib.patches import FancyArrowPatch

    arrow = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color="0.2", linewidth=1.0,
                            shrinkA=0, shrinkB=0, **kw)
    arrow.set_gid(gid or None)
    ax.add_patch(arrow)
    return arrow


def architecture(n_layers: int, *, n_heads: int = 2, model: str = "") -> Any:
    """The paper's Figure 5 for a model of ``n_layers`` decoder layers: heads without and with WHS.

    Left panel: the backbone (embedding and layers 1..L-1, one box per layer) feeds z^{L-1} to each
    of ``n_heads`` heads (copies of layer L); a shared, frozen f_u (final norm + W_u) turns head n's
    output into p(x_{t+n} | x<=t). Right panel: with weighted hidden states every backbone layer
    feeds a per-head mixture softmax(w_n / T) . [z^1 .. z^{L-1}] (one line per layer and head).
    Layer boxes carry the gid ``layer-<l>``, mixture lines ``whs-<n>-<l>``, heads ``head-<n>``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
        raise ValueError(f"n_layers={n_layers!r} must be an integer >= 2 (a backbone of L-1 layers and a last layer)")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or not 1 <= n_heads <= 4:
        raise ValueError(f"n_heads={n_heads!r} must be an integer in 1..4 (the paper draws 2)")
    n_back = n_layers - 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 7.4))
    bottom, top = 1.3, 9.3  # the backbone's extent
    gap = min(0.06, 2.0 / n_back)
    height = (top - bottom - gap * (n_back - 1)) / n_back
    label_every = 1 if n_back <= 12 else max(1, n_back // 6)
    head_w = 8.0 / n_heads - 0.4
    head_x = [1.0 + i * 8.0 / n_heads + 0.2 for i in range(n_heads)]
    for ax, whs in zip(axes, (False, True)):
        ax.set_xlim(-0.2, 10.2)
        ax.set_ylim(-0.3, 15.6)
        ax.axis("off")
        _box(ax, 3.4, 0.0, 3.2, 0.8, _SHARED, "embedding of $x_{\\leq t}$", gid="embedding")
        _arrow(ax, (5.0, 0.8), (5.0, bottom))
        centers = []
        for layer in range(1, n_back + 1):
            y = bottom + (layer - 1) * (height + gap)
            shown = layer in (1, n_back) or (layer % label_every == 0 and n_back - layer >= label_every / 2)
            text = (f"layer {layer}" + (" = L-1" if layer == n_back else "")) if shown else ""
            _box(ax, 3.4, y, 3.2, height, _FROZEN, text, gid=f"layer-{layer}",
                 fontsize=8 if n_back <= 12 else 6.5)
            centers.append(y + height / 2)
        ax.text(2.6, (bottom + top) / 2, f"backbone:\nlayers 1..{n_back}\nof the pretrained\nmodel (frozen;\n"
                "LoRA r = 8 on\nq, k, v in the\njoint strategies)", ha="right", va="center", fontsize=7.5)
        head_y = 11.0
        for n in range(1, n_heads + 1):
            x = head_x[n - 1]
            init = "the original layer L" if n == 1 else "random"
            _box(ax, x, head_y, head_w, 1.2, _HEAD, f"head {n}: copy of layer L\n(init: {init})", gid=f"head-{n}",
                 fontsize=7.5)
            cx = x + head_w / 2
            if whs:
                node = (cx, 10.15)
                for layer, cy in enumerate(centers, 1):
                    side = 3.4 if cx < 5.0 else 6.6
                    (line,) = ax.plot([side, node[0]], [cy, node[1]], color="#3a8a3a", linewidth=0.6, alpha=0.55)
                    line.set_gid(f"whs-{n}-{layer}")
                circle = Circle(node, 0.32, facecolor=_MIX, edgecolor="0.25", linewidth=0.8, zorder=3)
                circle.set_gid(f"mix-{n}")
                ax.add_patch(circle)
                ax.text(*node, "$\\Sigma$", ha="center", va="center", fontsize=9, zorder=4)
                ax.text(node[0] + (0.45 if cx < 5.0 else -0.45), node[1] - 0.05,
                        f"softmax($w_{n}$/T)", ha="left" if cx < 5.0 else "right", va="center", fontsize=7)
                _arrow(ax, (node[0], node[1] + 0.32), (cx, head_y), gid=f"feed-{n}")
            else:
                _arrow(ax, (5.0, top), (cx, head_y), gid=f"feed-{n}")
            _arrow(ax, (cx, head_y + 1.2), (cx, 12.9))
            ax.text(cx, 14.35, f"$p(x_{{t+{n}}} \\mid x_{{\\leq t}})$", ha="center", va="center", fontsize=9)
            _arrow(ax, (cx, 13.7), (cx, 14.0))
        _box(ax, 1.0, 12.9, 8.0, 0.8, _SHARED, "$f_u$: final norm + unembedding $W_u$ (+ softmax); shared, frozen",
             gid="unembedding")
        if not whs:
            ax.text(5.15, top + 0.45, "$z^{L-1}$", ha="left", va="bottom", fontsize=9)
        title = "without WHS: every head reads $z^{L-1}$" if not whs else \
            "with WHS: head n reads softmax($w_n$/T) $\\cdot$ [$z^1$ .. $z^{L-1}$]"
        ax.set_title(title, fontsize=10)
    name = f"{model}, " if model else ""
    fig.suptitle(f"MTP heads on a backbone ({name}L = {n_layers} decoder layers, {n_heads} heads)", fontsize=11)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Table 1 as a figure


def strategy_accuracy(ours: pd.DataFrame, paper: pd.DataFrame | None = None, *, k: int = 5) -> Any:
    """Top-k accuracy per training strategy: one panel per target (next token, 2nd token).

    ``ours`` has columns ``strategy``, ``model``, ``target`` ('next' or '2nd'), ``accuracy`` and
    optionally ``lo`` / ``hi`` (a confidence interval, drawn as horizontal error bars); one colour
    per model. ``paper`` (columns ``strategy``, ``model``, ``target``, ``accuracy``) is drawn in
    grey, one marker shape per paper model, labelled ``"paper, Table 1: <model>"``. Strategies are
    listed top to bottom in their order of first appearance (ours, then the paper's).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    _require(ours, {"strategy", "model", "target", "accuracy"}, "ours")
    if paper is not None:
        _require(paper, {"strategy", "model", "target", "accuracy"}, "paper")
    frames = [ours] + ([paper] if paper is not None else [])
    bad = set().union(*(set(f["target"]) for f in frames)) - set(TARGETS)
    if bad:
        raise ValueError(f"unknown target values {sorted(bad)}; use 'next' and '2nd'")
    strategies = list(dict.fromkeys([*ours["strategy"], *(paper["strategy"] if paper is not None else [])]))
    ypos = {s: i for i, s in enumerate(strategies)}
    models = list(dict.fromkeys(ours["model"]))
    paper_models = list(dict.fromkeys(paper["model"])) if paper is not None else []
    colors = model_colors(models)
    markers = ["s", "D", "^", "v", "P", "X", "<", ">"]
    n_series = len(models) + len(paper_models)
    offsets = np.linspace(-0.3, 0.3, n_series) if n_series > 1 else np.zeros(1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(strategies) + 2.2), sharey=True)
    for ax, target in zip(axes, TARGETS):
        for i, model in enumerate(models):
            part = ours[(ours["model"] == model) & (ours["target"] == target)]
            if part.empty:
                continue
            y = part["strategy"].map(ypos).to_numpy() + offsets[i]
            x = part["accuracy"].to_numpy(dtype=float)
            if {"lo", "hi"} <= set(part.columns):
                lo, hi = part["lo"].to_numpy(dtype=float), part["hi"].to_numpy(dtype=float)
                err = np.vstack([np.nan_to_num(x - lo), np.nan_to_num(hi - x)])
                ax.errorbar(x, y, xerr=err, fmt="o", color=colors[model], markersize=6, capsize=3, label=model)
            else:
                ax.plot(x, y, "o", color=colors[model], markersize=6, label=model)
        for j, model in enumerate(paper_models):
            assert paper is not None  # paper_models is empty without it
            part = paper[(paper["model"] == model) & (paper["target"] == target)]
            if part.empty:
                continue
            y = part["strategy"].map(ypos).to_numpy() + offsets[len(models) + j]
            ax.plot(part["accuracy"].to_numpy(dtype=float), y, markers[j % len(markers)], color=_PAPER_COLOR,
                    markersize=5, fillstyle="none", label=f"{PAPER_LABEL}: {model}")
        ax.set_title(TARGETS[target])
        ax.set_xlabel(f"top-{k} accuracy")
        ax.set_xlim(0, 1)
        ax.set_yticks(range(len(strategies)), strategies)
        ax.set_ylim(len(strategies) - 0.5, -0.5)
        ax.grid(axis="y", alpha=0.25)
    found = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
    labels = sorted(found, key=lambda lab: (lab.startswith(PAPER_LABEL), lab not in models))  # ours first
    fig.legend([found[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1 if labels else 0, 1, 1))
    return fig


# --------------------------------------------------------------------------------------------------
# Training curves


def training_curves(history: pd.DataFrame, *, smooth: int = 1, ncols: int = 4) -> Any:
    """Training loss per optimizer step, one panel per strategy, one line per (model, head).

    ``history`` has columns ``strategy``, ``model``, ``head`` (1, 2, ...), ``step`` (counted across
    the run's phases, 1-based), ``loss`` and ``phase``. Colour is the head, line style the model. A
    dotted vertical line marks where a phase ends and the next begins (head warmup -> joint).
    ``smooth`` > 1 draws a centred rolling mean over that many steps.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _require(history, {"strategy", "model", "head", "step", "loss", "phase"}, "history")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth={smooth!r} must be a positive integer (1 = no smoothing)")
    strategies = list(dict.fromkeys(history["strategy"]))
    models = list(dict.fromkeys(history["model"]))
    heads = sorted(set(int(h) for h in history["head"]))
    colors = dict(zip(heads, sns.color_palette("colorblind", max(heads) + 1)[: len(heads)]))
    styles = dict(zip(models, ["-", "--", ":", "-."] * 4))
    ncols = max(1, min(ncols, len(strategies)))
    nrows = -(-len(strategies) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[len(strategies):]:
        ax.axis("off")
    for ax, strategy in zip(axes.flat, strategies):
        part = history[history["strategy"] == strategy]
        for model in models:
            for head in heads:
                rows = part[(part["model"] == model) & (part["head"] == head)].sort_values("step")
                if rows.empty:
                    continue
                loss = rows["loss"].rolling(smooth, center=True, min_periods=1).mean() if smooth > 1 else rows["loss"]
                ax.plot(rows["step"], loss, linestyle=styles[model], color=colors[head], linewidth=1.2,
                        label=f"{model}, head {head}")
            rows = part[part["model"] == model].sort_values("step")
            changes = rows["step"][rows["phase"].ne(rows["phase"].shift()) & rows["phase"].shift().notna()]
            for step in sorted(set(changes)):
                ax.axvline(step - 0.5, color="0.4", linestyle=":", linewidth=1.0, gid="phase-change")
        ax.set_title(strategy, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss [nats]")
    n_labels = figure_legend(fig, axes.flat)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * (n_labels > 4), 1, 1))
    return fig


# --------------------------------------------------------------------------------------------------
# WHS weights against the probes of chapter 2


def whs_weights(weights: pd.DataFrame, probe: pd.DataFrame | None = None, *,
                notes: Mapping[str, str] | None = None, k: int = 5) -> Any:
    """Learned WHS mixing weights per layer, beside chapter 2's per-layer x_{t+2} accuracies.

    ``weights`` has columns ``model``, ``head``, ``layer`` (1..L-1) and ``weight`` (each head's weights
    sum to 1): one panel per model, one line per head, and a dashed line at the uniform initial weight
    1/(L-1). ``probe`` (columns ``model``, ``layer``, ``method``, ``accuracy``) is drawn on a right-hand
    axis in grey, one line per method (e.g. 'probe', 'lens'), labelled ``"chapter 2 <method>: ..."``; its
    layers may include L (the model's own output), so the x axis extends to the last probed layer.
    ``notes`` maps a model to a sentence written into its panel (e.g. why no probe is shown).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _require(weights, {"model", "head", "layer", "weight"}, "weights")
    if probe is not None:
        _require(probe, {"model", "layer", "method", "accuracy"}, "probe")
    models = list(dict.fromkeys(weights["model"]))
    heads = sorted(set(int(h) for h in weights["head"]))
    colors = dict(zip(heads, sns.color_palette("colorblind", max(heads) + 1)[: len(heads)]))
    method_style: dict[str, dict[str, Any]] = {"probe": dict(linestyle="--", marker="s"),
                                               "lens": dict(linestyle=":", marker=None)}
    fig, axes = plt.subplots(1, len(models), figsize=(6.8 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        part = weights[weights["model"] == model]
        n_back = int(part["layer"].max())
        for head in heads:
            rows = part[part["head"] == head].sort_values("layer")
            if not rows.empty:
                ax.plot(rows["layer"], rows["weight"], marker="o", markersize=3, color=colors[head],
                        label=f"WHS weight, head {head}")
        ax.axhline(1.0 / n_back, color="0.3", linestyle="--", linewidth=0.9, label="uniform (initial) weight")
        ax.set_xlabel("layer l (output $z^l$ of decoder layer l)")
        ax.set_ylabel("softmax($w_n$/T) weight")
        ax.set_title(model)
        handles, labels = ax.get_legend_handles_labels()
        right_most, top_axis = n_back, ax
        if probe is not None and not probe[probe["model"] == model].empty:
            right = ax.twinx()
            right.grid(False)
            mine = probe[probe["model"] == model]
            for method in dict.fromkeys(mine["method"]):
                rows = mine[mine["method"] == method].sort_values("layer")
                style = method_style.get(method, dict(linestyle="-.", marker="^"))
                right.plot(rows["layer"], rows["accuracy"], color=_PAPER_COLOR, markersize=4,
                           label=f"chapter 2 {method}: top-{k} acc. of $x_{{t+2}}$", **style)
            right.set_ylabel(f"chapter 2: top-{k} accuracy of $x_{{t+2}}$", color=_PAPER_COLOR)
            right.set_ylim(0, 1)
            right_most = max(n_back, int(mine["layer"].max()))  # the last layer L itself may be probed
            top_axis = right  # drawn above ax: the legend goes there, or the probe lines cross it
            h2, l2 = right.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.set_xlim(0.5, right_most + 0.5)
        ax.set_ylim(0, 1.5 * max(float(part["weight"].max()), 1.0 / n_back))  # headroom for the note and legend
        if notes and notes.get(model):
            ax.text(0.02, 0.97, notes[model], transform=ax.transAxes, ha="left", va="top", fontsize=7.5,
                    wrap=True, bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.85))
        top_axis.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                        frameon=False)
    fig.tight_layout()
    return fig


def paper_table(paper: pd.DataFrame, strategies: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's Table 1 in long form (``strategy, model, target, accuracy``) from its CSV layout
    (``strategy, model, next, second``), optionally restricted to ``strategies`` in that order."""
    _require(paper, {"strategy", "model", "next", "second"}, "paper")
    long = pd.concat([paper.assign(target="next", accuracy=paper["next"]),
                      paper.assign(target="2nd", accuracy=paper["second"])], ignore_index=True)
    long = long[["strategy", "model", "target", "accuracy"]]
    if strategies is not None:
        unknown = set(strategies) - set(long["strategy"])
        if unknown:
            raise ValueError(f"strategies {sorted(unknown)} are not in the paper's table ({sorted(set(long['strategy']))})")
        long = long[long["strategy"].isin(strategies)]
    return long.reset_index(drop=True)
