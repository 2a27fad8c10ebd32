"""Figures of chapter 1: multi-token prediction by marginalization.

Each function takes plain pandas DataFrames and returns the matplotlib Figure:

- :func:`accuracy_by_size` top-k accuracy of the next, 2nd (and 3rd) token against parameter count
  (the paper's Figure 1), one panel per task;
- :func:`nucleus_by_size` mean size of the top-p nucleus against parameter count (Figure 4);
- :func:`accuracy_vs_top_p` accuracy of a marginal against the top-p of its nucleus, with its cost.

Line style encodes what is predicted (solid: next token, dashed: 2nd token, dotted: 3rd token) or,
in :func:`nucleus_by_size`, the top-p (solid 0.99, dashed 0.9). The paper's values
(``data/paper/fig1.csv``, ``fig4.csv``) are drawn in grey as their own series, labelled
"paper: <family>, read off", never mixed with ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .common import model_colors, ordered_tasks as _tasks, read_paper_csv, require_columns as _require

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType

__all__ = ["OFFSET_LABELS", "PAPER_LABEL", "accuracy_by_size", "accuracy_vs_top_p", "nucleus_by_size",
           "read_paper_csv"]

PAPER_LABEL = "paper"
OFFSET_LABELS = {1: "next token", 2: "2nd token", 3: "3rd token"}
_OFFSET_STYLE: dict[int, tuple[LineStyleType, str]] = {1: ("-", "o"), 2: ("--", "s"), 3: (":", "^")}
_TOP_P_STYLE: dict[float, tuple[LineStyleType, str]] = {0.99: ("-", "o"), 0.9: ("--", "s")}
_OTHER_STYLE: tuple[LineStyleType, str] = ("-.", "D")
_PAPER_COLORS = {"Pythia": "0.6", "Llama-3": "0.3"}
_PAPER_MARKERS = {"Pythia": ".", "Llama-3": "P"}


def _series(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["series"])) if "series" in df.columns else [""]


def _bounds(part: pd.DataFrame, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    val = part[y].to_numpy(dtype=float)
    lo = part[f"{y}_lo"].to_numpy(dtype=float) if f"{y}_lo" in part.columns else np.full_like(val, np.nan)
    hi = part[f"{y}_hi"].to_numpy(dtype=float) if f"{y}_hi" in part.columns else np.full_like(val, np.nan)
    return val, lo, hi


def _errorbar(ax: Any, x: np.ndarray, part: pd.DataFrame, y: str, *, linestyle: LineStyleType, gid: str,
              **kw: Any) -> Any:
    """Points at ``y`` with their ``y_lo``/``y_hi`` interval (no bar where a bound is NaN), joined by a line.

    The data line gets ``gid`` (tests and readers find each series by it); the error bars take the
    line style too, so that a single point still shows what it predicts.
    """
    val, lo, hi = _bounds(part, y)
    err = np.vstack([np.where(np.isnan(lo), 0.0, val - lo), np.where(np.isnan(hi), 0.0, hi - val)])
    bars = ax.errorbar(x, val, yerr=np.clip(err, 0, None), capsize=3, markersize=6, linestyle=linestyle,
                       label="_nolegend_", **kw)
    bars.lines[0].set_gid(gid)
    for coll in bars.lines[2]:
        coll.set_linestyle(linestyle)
        coll.set_gid(f"{gid}|interval")
    return bars


def _paper_lines(ax: Any, paper: pd.DataFrame, *, value: str, key_col: str,
                 styles: dict[Any, tuple[LineStyleType, str]], labels: dict[Any, str], task: str) -> None:
    """The paper's values of one task: one grey line per family and key (offset or top-p)."""
    for family in dict.fromkeys(paper["family"]):
        for key in sorted(set(paper[key_col])):
            part = paper[(paper["family"] == family) & (paper["task"] == task)
                         & (paper[key_col] == key)].sort_values("params")
            if part.empty:
                continue
            ax.plot(part["params"], part[value], linestyle=styles.get(key, _OTHER_STYLE)[0],
                    marker=_PAPER_MARKERS.get(family, "x"), color=_PAPER_COLORS.get(family, "0.45"), markersize=6,
                    linewidth=1.2, label=f"{PAPER_LABEL}: {family}, {labels.get(key, key)} (read off)",
                    gid=f"paper|{family}|{task}|{key}")


def _ours(ax: Any, ours: pd.DataFrame, *, value: str, key_col: str, styles: dict[Any, tuple[LineStyleType, str]],
          task: str, colors: dict[str, Any], series: list[str]) -> None:
    """Our models of one task: a colour per model, line style and marker per key, filled markers for
    the first series and hollow for the others (set side by side on the x axis)."""
    keys = sorted(set(ours[key_col]))
    for i, name in enumerate(series):
        for model in colors:
            for k, key in enumerate(keys):
                # series and keys side by side (a few percent apart on the log axis), not on top of each other
                shift = (1.0 + 0.08 * (i - (len(series) - 1) / 2)) * (1.0 + 0.025 * (k - (len(keys) - 1) / 2))
                mask = (ours["task"] == task) & (ours["model"] == model) & (ours[key_col] == key)
                if "series" in ours.columns:
                    mask &= ours["series"] == name
                part = ours[mask].sort_values("params")
                if part.empty:
                    continue
                linestyle, marker = styles.get(key, _OTHER_STYLE)
                _errorbar(ax, part["params"].to_numpy(dtype=float) * shift, part, value, linestyle=linestyle,
                          marker=marker, color=colors[model], mfc="white" if i else colors[model],
                          gid=f"ours|{name}|{model}|{task}|{key}")


def _log_x(ax: Any, params: Any, paper: pd.DataFrame | None) -> None:
    """Log x axis with decade ticks; without the paper's range, a decade of room around our models."""
    import matplotlib.ticker as mticker

    ax.set_xscale("log")
    if paper is None:
        x = np.asarray(params, dtype=float)
        ax.set_xlim(x.min() / 3, x.max() * 3)
    ax.xaxis.set_major_locator(mticker.LogLocator(base=10))
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())


def _legend(fig: Any, axes: Sequence[Any], colors: dict[str, Any], keys: dict[str, tuple[LineStyleType, str]],
            series: list[str]) -> None:
    """One legend below the panels: the paper's series, our models (colour), what is drawn (style), samples (fill)."""
    from matplotlib.lines import Line2D

    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    for model, color in colors.items():
        handles[f"ours: {model}"] = Line2D([], [], color=color, marker="o", linestyle="none")
    for label, (linestyle, marker) in keys.items():
        handles[f"ours: {label}"] = Line2D([], [], color="0.15", marker=marker, linestyle=linestyle)
    if len(series) > 1:
        for i, name in enumerate(series):
            handles[f"ours: {name}"] = Line2D([], [], color="0.15", marker="o", mfc="white" if i else "0.15",
                                              linestyle="none")
    ncol = 3
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, fontsize=9,
               frameon=False)
    rows = (len(handles) + ncol - 1) // ncol
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))


def accuracy_by_size(ours: pd.DataFrame, paper: pd.DataFrame | None = None, *, k: int = 5,
                     title: str | None = None) -> Any:
    """Figure 1: top-k accuracy against parameter count (log x), one panel per task.

    ``ours`` has columns ``model``, ``params``, ``task``, ``offset`` (1 = next token, 2, 3),
    ``accuracy`` and optionally ``accuracy_lo``/``accuracy_hi`` (drawn as error bars) and ``series``
    (e.g. "100 samples" and "first 10 samples": filled markers for the first, hollow for the
    others). Colour is the model; line style and marker what is predicted (solid/circle: next token,
    dashed/square: 2nd, dotted/triangle: 3rd); the points of one model and series are joined only
    across sizes of that model (one point each here). ``paper`` (columns ``family``, ``params``,
    ``task``, ``offset``, ``accuracy``) is drawn in grey with the same line styles.
    """
    _require(ours, {"model", "params", "task", "offset", "accuracy"}, "ours")
    bad = set(ours["offset"]) - set(_OFFSET_STYLE)
    if bad:
        raise ValueError(f"ours has offsets {sorted(bad)}; only 1, 2 and 3 are drawn")
    if paper is not None:
        _require(paper, {"family", "params", "task", "offset", "accuracy"}, "paper")
    keys = {OFFSET_LABELS[o]: _OFFSET_STYLE[o] for o in sorted(set(ours["offset"]))}
    return _by_size(ours, paper, value="accuracy", key_col="offset", styles=_OFFSET_STYLE, paper_labels=OFFSET_LABELS,
                    keys=keys, ylabel=f"top-{k} accuracy", log_y=False, title=title)


def _by_size(ours: pd.DataFrame, paper: pd.DataFrame | None, *, value: str, key_col: str, styles: dict[Any, Any],
             paper_labels: dict[Any, str], keys: dict[str, Any], ylabel: str, log_y: bool,
             title: str | None = None) -> Any:
    """Figures 1 and 4: ``value`` against parameter count, one panel per task, the paper's in grey."""
    import matplotlib.pyplot as plt

    tasks, series = _tasks(ours), _series(ours)
    colors = model_colors(dict.fromkeys(ours.sort_values("params")["model"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.6), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        if paper is not None:
            _paper_lines(ax, paper, value=value, key_col=key_col, styles=styles, labels=paper_labels, task=task)
        _ours(ax, ours, value=value, key_col=key_col, styles=styles, task=task, colors=colors, series=series)
        _log_x(ax, ours["params"], paper)
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
        ax.set_xlabel("parameters")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=11)
    _legend(fig, axes[0], colors, keys, series)
    return fig


def _top_p_label(q: Any) -> str:
    return f"top-{float(q):g}"


def nucleus_by_size(ours: pd.DataFrame, paper: pd.DataFrame | None = None) -> Any:
    """Figure 4: mean number of candidates in the top-p nucleus against parameter count (log-log).

    ``ours`` has columns ``model``, ``params``, ``task``, ``top_p``, ``nucleus`` and optionally
    ``nucleus_lo``/``nucleus_hi`` and ``series``; one panel per task. Colour is the model, line style
    the top-p (solid/circle 0.99, dashed/square 0.9, dash-dot any other). ``paper`` (columns
    ``family``, ``params``, ``task``, ``top_p``, ``nucleus``) is drawn in grey with the same styles.
    """
    _require(ours, {"model", "params", "task", "top_p", "nucleus"}, "ours")
    if paper is not None:
        _require(paper, {"family", "params", "task", "top_p", "nucleus"}, "paper")
    paper_labels = {q: _top_p_label(q) for q in set(paper["top_p"])} if paper is not None else {}
    keys = {_top_p_label(q): _TOP_P_STYLE.get(float(q), _OTHER_STYLE)
            for q in sorted(set(ours["top_p"]), reverse=True)}
    return _by_size(ours, paper, value="nucleus", key_col="top_p", styles=_TOP_P_STYLE, paper_labels=paper_labels,
                    keys=keys, ylabel="mean candidates in the nucleus", log_y=True)


def accuracy_vs_top_p(sweep: pd.DataFrame, *, k: int = 5) -> Any:
    """Accuracy of a marginal against the top-p of its nucleus (top row) and its cost (bottom row).

    ``sweep`` has columns ``model``, ``task``, ``top_p``, ``accuracy``, ``candidates`` (mean extra
    tokens fed per position: the nucleus size) and optionally ``offset`` (line style and marker as in
    :func:`accuracy_by_size`; 2 when absent) and ``_lo``/``_hi`` bounds of both values. One column of
    panels per task, one colour per model. The x axis is a logit scale so that 0.5, 0.9, 0.99 and
    0.999 are evenly spread; the cost axis is logarithmic. The cost is drawn once per model and top-p
    (from the smallest offset's rows).
    """
    import matplotlib.pyplot as plt

    _require(sweep, {"model", "task", "top_p", "accuracy", "candidates"}, "sweep")
    qs = sweep["top_p"].to_numpy(dtype=float)
    if ((qs <= 0) | (qs >= 1)).any():
        raise ValueError("sweep top_p values must lie in (0, 1) for the logit axis; 1.0 (the whole vocabulary) "
                         "cannot be placed on it")
    data = sweep if "offset" in sweep.columns else sweep.assign(offset=2)
    bad = set(data["offset"]) - set(_OFFSET_STYLE)
    if bad:
        raise ValueError(f"sweep has offsets {sorted(bad)}; only 1, 2 and 3 are drawn")
    tasks = _tasks(data)
    models = list(dict.fromkeys(data["model"]))
    colors = model_colors(models)
    offsets = sorted(set(data["offset"]))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.6 * len(tasks), 6.8), squeeze=False, sharex=True)
    for col, task in enumerate(tasks):
        for model in models:
            for off in offsets:
                part = data[(data["task"] == task) & (data["model"] == model) & (data["offset"] == off)]
                part = part.sort_values("top_p")
                if part.empty:
                    continue
                linestyle, marker = _OFFSET_STYLE[off]
                x = part["top_p"].to_numpy(dtype=float)
                _errorbar(axes[0, col], x, part, "accuracy", linestyle=linestyle, marker=marker, color=colors[model],
                          gid=f"ours|{model}|{task}|{off}")
                if off == offsets[0]:
                    _errorbar(axes[1, col], x, part, "candidates", linestyle="-", marker="o", color=colors[model],
                              gid=f"cost|{model}|{task}")
        axes[0, col].set_title(task)
        axes[0, col].set_ylim(0, 1)
        axes[0, col].set_ylabel(f"top-{k} accuracy")
        axes[1, col].set_yscale("log")
        axes[1, col].set_ylabel("candidates per position")
        axes[1, col].set_xscale("logit")
        axes[1, col].set_xlabel("top-p of the nucleus")
        ticks = sorted(set(qs))
        axes[1, col].set_xticks(ticks, [f"{q:g}" for q in ticks])
        axes[1, col].xaxis.set_minor_formatter(plt.NullFormatter())
        for ax in axes[:, col]:
            ax.grid(True, which="major", alpha=0.3)
    keys = {OFFSET_LABELS[o]: _OFFSET_STYLE[o] for o in offsets}
    _legend(fig, list(axes.ravel()), colors, keys, [""])
    return fig
