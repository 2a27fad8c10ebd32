"""Figures of chapter 2: layer specialization (logit lens, entropy along a sentence, probes per layer).

Each function takes plain pandas DataFrames and returns the matplotlib Figure. The paper's reference
values (``data/paper/fig2_kl_by_depth.csv``, ``fig3_entropy.csv``) are drawn as their own, grey,
series labelled "paper (Pythia), read off", never mixed with ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from .common import model_colors, read_paper_csv, require_columns as _require

__all__ = ["PAPER_LABEL", "TARGET_LABELS", "entropy_along_sentence", "kl_by_depth", "layer_accuracy", "logit_and_tuned_lens", "read_paper_csv"]

PAPER_LABEL = "paper (Pythia), read off"
_PAPER_COLOR = "0.45"


def kl_by_depth(kl: pd.DataFrame, paper: pd.DataFrame | None = None) -> Any:
    """Figure 2: KL(p_l || p_L) in nats against normalized depth l / L, one line per model.

    ``kl`` has columns ``model``, ``depth`` and ``kl``, one row per layer and sample (or position):
    each line is the mean over rows at a depth with a 95% bootstrap band. ``paper`` (columns
    ``series``, ``depth``, ``kl_low``, ``kl_high``) is drawn as grey range bars, one legend entry per
    series (a point where low == high).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _require(kl, {"model", "depth", "kl"}, "kl")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    sns.lineplot(kl, x="depth", y="kl", hue="model", errorbar=("ci", 95), n_boot=500, seed=0, marker="o",
                 markersize=4, ax=ax)
    if paper is not None:
        _require(paper, {"series", "depth", "kl_low", "kl_high"}, "paper")
        markers = iter(["s", "D", "^", "v", "P"])
        series = list(dict.fromkeys(paper["series"]))
        for i, name in enumerate(series):
            rows = paper[paper["series"] == name]
            x = rows["depth"].to_numpy() + 0.012 * (i - (len(series) - 1) / 2)  # side by side, not on top
            lo, hi = rows["kl_low"].to_numpy(), rows["kl_high"].to_numpy()
            mid = (lo + hi) / 2
            ax.errorbar(x, mid, yerr=[mid - lo, hi - mid], fmt=next(markers), color=_PAPER_COLOR, capsize=4,
                        markersize=5, linestyle="none", label=f"{PAPER_LABEL}: {name}")
    ax.set_xlabel("normalized layer depth l / L")
    ax.set_ylabel("KL(p_l || p_L) [nats]")
    ax.set_xlim(0, 1.04)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _word_ticks(text: str) -> tuple[list[int], list[str]]:
    """Character offset and text of each whitespace-separated word."""
    found = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    return [f[0] for f in found], [f[1] for f in found]


def entropy_along_sentence(entropy: pd.DataFrame, sentences: Mapping[str, str],
                           paper: pd.DataFrame | None = None) -> Any:
    """Figure 3: entropy of p(x_{t+1} | .) at each target token, one panel per sentence, one line per model.

    ``entropy`` has columns ``model``, ``sentence`` (a key of ``sentences``), ``char`` (offset in the
    sentence of the first non-space character of the predicted token) and ``entropy`` (nats). Models
    tokenize differently, so the x axis is the character offset, labelled with the sentence's words.
    ``sentences`` maps each panel title to the target sentence. ``paper`` (columns ``series``,
    ``entropy_low``, ``entropy_high``) is drawn as grey horizontal bands, one legend entry per series.
    """
    import matplotlib.pyplot as plt

    _require(entropy, {"model", "sentence", "char", "entropy"}, "entropy")
    if not sentences:
        raise ValueError("sentences must map at least one panel title to its sentence")
    unknown = set(entropy["sentence"]) - set(sentences)
    if unknown:
        raise ValueError(f"entropy names sentences {sorted(unknown)} that are not keys of sentences")
    models = list(dict.fromkeys(entropy["model"]))
    palette = model_colors(models)
    fig, axes = plt.subplots(len(sentences), 1, figsize=(11, 3.3 * len(sentences)), squeeze=False)
    for ax, (title, text) in zip(axes[:, 0], sentences.items()):
        if paper is not None:
            _require(paper, {"series", "entropy_low", "entropy_high"}, "paper")
            shades = iter([0.18, 0.10, 0.26, 0.06])
            hatches = iter(["", "//", "\\\\", ".."])
            for _, row in paper.iterrows():
                ax.axhspan(row["entropy_low"], row["entropy_high"], color=_PAPER_COLOR, alpha=next(shades),
                           hatch=next(hatches), lw=0, label=f"{PAPER_LABEL}: {row['series']}")
        for model in models:
            part = entropy[(entropy["model"] == model) & (entropy["sentence"] == title)].sort_values("char")
            if len(part):
                ax.plot(part["char"], part["entropy"], marker="o", markersize=4, color=palette[model], label=model)
        ticks, words = _word_ticks(text)
        ax.set_xticks(ticks, words, rotation=60, ha="right", fontsize=8)
        ax.set_xlim(-1, len(text) + 1)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("entropy [nats]")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


_TARGET_COLORS = {"next": 0, "2nd": 1}
TARGET_LABELS = {"next": "$x_{t+1}$", "2nd": "$x_{t+2}$"}
_METHOD_STYLE: dict[str, dict[str, Any]] = {"lens": dict(linestyle="-", marker=None),
                                            "probe": dict(linestyle="--", marker="o")}


def layer_accuracy(scores: pd.DataFrame, *, k: int = 5, nll: bool = True) -> Any:
    """Per-layer top-k accuracy (and mean NLL) of the logit lens and of the linear probes.

    ``scores`` has columns ``model``, ``depth``, ``method`` ('lens' or 'probe'), ``target`` ('next'
    for x_{t+1}, '2nd' for x_{t+2}), ``accuracy`` and, when ``nll`` is True, ``nll`` (a NaN point is left
    out and the line joins its neighbours: e.g. a lens NLL known only at the probed layers). One column of panels per model; top row accuracy, bottom row NLL. Colour is the target,
    line style the method (solid: lens, dashed with markers: probe).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    need = {"model", "depth", "method", "target", "accuracy"} | ({"nll"} if nll else set())
    _require(scores, need, "scores")
    bad = (set(scores["method"]) - set(_METHOD_STYLE)) | (set(scores["target"]) - set(_TARGET_COLORS))
    if bad:
        raise ValueError(f"scores has unknown method/target values {sorted(bad)}; use 'lens'/'probe' and "
                         "'next'/'2nd'")
    colors = sns.color_palette("colorblind", len(_TARGET_COLORS))
    models = list(dict.fromkeys(scores["model"]))
    rows = 2 if nll else 1
    fig, axes = plt.subplots(rows, len(models), figsize=(5.2 * len(models), 3.4 * rows), squeeze=False,
                             sharex=True)
    for col, model in enumerate(models):
        for method, style in _METHOD_STYLE.items():
            for target, ci in _TARGET_COLORS.items():
                part = scores[(scores["model"] == model) & (scores["method"] == method)
                              & (scores["target"] == target)].sort_values("depth")
                if part.empty:
                    continue
                label = f"{method}, {TARGET_LABELS[target]}"
                for row, column in enumerate(["accuracy", "nll"][:rows]):
                    values = part[column].to_numpy(dtype=float)
                    drawn = ~np.isnan(values)  # e.g. a lens NLL known only at the probed layers
                    if drawn.any():
                        axes[row, col].plot(part["depth"].to_numpy()[drawn], values[drawn], color=colors[ci],
                                            markersize=4, label=label, **style)
        axes[0, col].set_title(model)
        axes[0, col].set_ylabel(f"top-{k} accuracy")
        axes[0, col].set_ylim(0, 1)
        if nll:
            axes[1, col].set_ylabel("mean NLL [nats]")
            axes[1, col].set_ylim(bottom=0)
        axes[-1, col].set_xlabel("normalized layer depth l / L")
        axes[0, col].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def logit_and_tuned_lens(frame: pd.DataFrame) -> Any:
    """Figure 2.1b: the logit lens (solid) and the tuned lens (dashed) against normalized depth, per model.

    ``frame`` has columns ``model``, ``lens`` ('logit lens', 'tuned lens'), ``depth``, ``kl`` (KL(lens ||
    p_L)), ``kl_from_output`` (KL(p_L || lens)), ``nll`` (of the next token) and ``log_vocab``, one row
    per layer and sample. Panels: the two KLs, then the NLL with each model's uniform guess log|V|
    dotted; lines are means over samples with a 95% bootstrap band.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _require(frame, {"model", "lens", "depth", "kl", "kl_from_output", "nll", "log_vocab"}, "frame")
    models = list(dict.fromkeys(frame["model"]))
    colors = dict(zip(models, sns.color_palette("colorblind", len(models))))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("kl", "KL(lens || p_L) [nats]"), ("kl_from_output", "KL(p_L || lens) [nats]"),
              ("nll", "NLL of x_(t+1) [nats]"))
    for ax, (column, label) in zip(axes, panels):
        sns.lineplot(frame, x="depth", y=column, hue="model", style="lens", palette=colors, errorbar=("ci", 95),
                     n_boot=500, seed=0, marker="o", markersize=4, ax=ax)
        ax.set_xlabel("normalized layer depth l / L")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.04)
        ax.set_ylim(bottom=0)
    for model in models:
        log_v = float(frame.loc[frame["model"] == model, "log_vocab"].iloc[0])
        axes[2].axhline(log_v, color=colors[model], linestyle=":", linewidth=1.2, label=f"{model}: log|V| (uniform)")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
