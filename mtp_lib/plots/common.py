"""Shared figure style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAPER_STYLE = {"ours": "-", "paper": ":"}


def setup_style() -> None:
    """A quiet seaborn style with readable fonts, used by every chapter."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` (PNG, 150 dpi) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    return out
