"""Figures of chapter 5, the size suite: loss curves and accuracy along training.

Both take the frames of :mod:`mtp_lib.suite.tables` and return the matplotlib Figure; one colour
per size, ordered small to large.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .common import require_columns as _require

__all__ = ["accuracy_along_training", "loss_curves"]


def _palette(sizes: list[str]) -> dict[str, Any]:
    import seaborn as sns

    return dict(zip(sizes, sns.color_palette("viridis", len(sizes))))


def loss_curves(losses: pd.DataFrame, *, sizes: list[str]) -> Any:
    """Training loss (nats per token) against tokens seen, log x, one line per size."""
    import matplotlib.pyplot as plt

    _require(losses, {"size", "tokens", "loss"}, "losses")
    colors = _palette(sizes)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for size in sizes:
        part = losses[losses["size"] == size]
        ax.plot(part["tokens"], part["loss"], color=colors[size], label=size, linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("training loss [nats / token]")
    ax.legend(title="size", fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_along_training(along: pd.DataFrame, *, sizes: list[str], k: int = 5) -> Any:
    """Top-k accuracy of the next token (solid) and of the 2nd token by marginalization (dashed)
    against tokens seen (symlog x: step 0 is the random initialization), one panel per task."""
    import matplotlib.pyplot as plt

    _require(along, {"size", "tokens", "task", "offset", "accuracy"}, "along")
    tasks = list(dict.fromkeys(along["task"]))
    colors = _palette(sizes)
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 4.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for size in sizes:
            for offset, style in ((1, "-"), (2, "--")):
                part = along[(along["size"] == size) & (along["task"] == task) & (along["offset"] == offset)]
                part = part.sort_values("tokens")
                ax.plot(part["tokens"], part["accuracy"], style, marker="o", markersize=3, color=colors[size],
                        label=f"{size}, {'next' if offset == 1 else '2nd'} token")
        ax.set_xscale("symlog", linthresh=max(1.0, float(along[along["tokens"] > 0]["tokens"].min())))
        ax.set_title(task)
        ax.set_xlabel("tokens seen (0: initialization)")
    axes[0][0].set_ylabel(f"top-{k} accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig
