"""Figures of chapter 0: the models and the data."""

from __future__ import annotations

from typing import Any

import pandas as pd


def length_histograms(lengths: pd.DataFrame) -> Any:
    """Token counts per sample, one panel per task, one colour per model.

    ``lengths`` has columns ``task``, ``model`` and ``tokens``.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    missing = {"task", "model", "tokens"} - set(lengths.columns)
    if missing:
        raise ValueError(f"lengths lacks columns {sorted(missing)}")
    tasks = list(dict.fromkeys(lengths["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        part = lengths[lengths["task"] == task]
        sns.histplot(part, x="tokens", hue="model", element="step", stat="count", common_bins=True, ax=ax)
        ax.set_title(task)
        ax.set_xlabel("tokens per sample" if task != "translation" else "target tokens per sample")
    fig.tight_layout()
    return fig
