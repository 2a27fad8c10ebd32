"""What every chapter's figures share: the style, input checks, the paper's reference CSVs, task order."""

from __future__ import annotations

from typing import Any

import pandas as pd

TASK_ORDER = ("translation", "open-ended")


def setup_style() -> None:
    """A quiet seaborn style with readable fonts, used by every chapter."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def model_colors(models: Any) -> dict[Any, Any]:
    """One colour of seaborn's colorblind palette per model, in the given order."""
    import seaborn as sns

    models = list(models)
    return dict(zip(models, sns.color_palette("colorblind", max(len(models), 1))))


def require_columns(df: Any, columns: set[str], name: str) -> None:
    """A clear ValueError unless ``df`` is a non-empty DataFrame holding ``columns``."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = columns - set(df.columns)
    if missing:
        raise ValueError(f"{name} lacks columns {sorted(missing)} (it has {sorted(df.columns)})")
    if df.empty:
        raise ValueError(f"{name} is empty")


def figure_legend(fig: Any, axes: Any, *, ncol: int = 4) -> int:
    """One legend under ``fig`` for every labelled artist of ``axes`` (the first of each label, in
    order); returns how many entries it has (for the room to leave under the panels)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), ncol),
                   fontsize=8, frameon=False)
    return len(handles)


def read_paper_csv(path: Any) -> pd.DataFrame:
    """A reference-value CSV of ``data/paper/`` (lines starting with ``#`` are comments)."""
    return pd.read_csv(path, comment="#", skipinitialspace=True)


def ordered_tasks(df: pd.DataFrame) -> list[str]:
    """The tasks present in ``df["task"]``, the paper's two first and in its order."""
    present = list(dict.fromkeys(df["task"]))
    return [t for t in TASK_ORDER if t in present] + [t for t in present if t not in TASK_ORDER]
