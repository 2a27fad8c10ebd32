"""Figure of Chapter 3's paper-budget section: held-out accuracy against sequences seen, per row."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .common import figure_legend, require_columns

__all__ = ["learning_curves"]


def learning_curves(curves: pd.DataFrame, *, marker_sequences: int | None = None, marker_label: str = "",
                    k: int = 5) -> Any:
    """Top-k accuracy of head 1 (x_{t+1}, left) and head 2 (x_{t+2}, right) against sequences seen,
    one row of panels per model, one colour per strategy: the mean over seeds as a line, the range
    over seeds as a band. ``curves`` has columns ``model, strategy, seed, sequences, head, accuracy``
    (:func:`mtp_lib.budget_report.curve_frame`). ``marker_sequences`` draws a dotted vertical line
    there (e.g. an earlier, shorter budget), labelled ``marker_label``."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    require_columns(curves, {"model", "strategy", "seed", "sequences", "head", "accuracy"}, "curves")
    models = list(dict.fromkeys(curves["model"]))
    strategies = list(dict.fromkeys(curves["strategy"]))
    colors = dict(zip(strategies, sns.color_palette("colorblind", len(strategies))))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.4 * len(models)), squeeze=False, sharex=True)
    for row, model in zip(axes, models):
        for ax, head, title in zip(row, (1, 2), ("next token $x_{t+1}$ (head 1)", "2nd token $x_{t+2}$ (head 2)")):
            part = curves[(curves["model"] == model) & (curves["head"] == head)]
            for strategy in strategies:
                g = part[part["strategy"] == strategy].groupby("sequences")["accuracy"]
                if g.ngroups == 0:
                    continue
                mean, lo, hi = g.mean(), g.min(), g.max()
                ax.plot(mean.index, mean.to_numpy(), color=colors[strategy], linewidth=1.4, label=strategy)
                ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=colors[strategy], alpha=0.18,
                                linewidth=0)
            if marker_sequences:
                ax.axvline(marker_sequences, color="0.3", linestyle=":", linewidth=1.2, label=marker_label or None)
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.set_ylabel(f"held-out top-{k} accuracy")
    for ax in axes[-1]:
        ax.set_xlabel("training sequences seen")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))  # 200k, not 200000
    n_labels = figure_legend(fig, axes.flat)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (n_labels > 4) + 0.03 * (n_labels > 8), 1, 1))
    return fig
