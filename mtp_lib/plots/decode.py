"""Figures of chapter 4: self-speculative decoding with the MTP heads (speed, acceptance, step cost).

The figures read the per-prompt records of ``benchmarks/speculative.py`` (its JSON's ``per_prompt``
list, one dict per prompt and method with ``task``, ``prompt``, ``method``, ``seconds``,
``new_tokens``, ``n_forward`` and ``accepted_lengths``) and its summary ``rows``. Two helpers turn
the records into the tables the figures draw:

- :func:`step_acceptance`: per method and task, the share of verification steps in which the draft
  of head n (n = 2..N) was accepted (the step gained at least n tokens);
- :func:`pass_costs`: per method and task, tokens gained per forward pass and the wall time of a
  pass relative to ``greedy_graph``'s; their ratio is the speedup over ``greedy_graph`` in total
  tokens per second.

The figures:

- :func:`speed_bars` tau and speedup over ``greedy_graph`` per method and task, with
  ``greedy_graph`` = 1 and ``generate`` as reference lines;
- :func:`head_acceptance` the acceptance of each head's draft, one panel per model and task;
- :func:`step_cost` what limits the speedup: time per pass against tokens per pass, with lines of
  equal speedup and the ceiling perfect drafts would reach at the same cost.

Artists carry gids (``bar|...``, ``ref|...``, ``acc|...``, ``pt|...``, ``ceil|...``, ``iso|...``)
so that tests and readers can find each series.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .common import model_colors, ordered_tasks as _tasks, require_columns as _require

__all__ = ["BASELINES", "head_acceptance", "method_heads", "pass_costs", "speed_bars", "step_acceptance", "step_cost"]

BASELINES = ("generate", "greedy_graph")
_METHOD = re.compile(r"(?:spec|oracle)(\d+)(?:_(?:chain|tree|dyn|pld))?")
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">")


def method_heads(method: str) -> int | None:
    """Heads a method's name says it uses: ``spec4_tree`` -> 4, ``oracle2`` -> 2, others None."""
    m = _METHOD.fullmatch(method)
    return int(m.group(1)) if m else None


def _records(records: Iterable[Mapping[str, Any]], name: str) -> pd.DataFrame:
    df = pd.DataFrame(list(records))
    _require(df, {"task", "method", "accepted_lengths"}, name)
    if "model" not in df.columns:
        df["model"] = ""
    return df


# --------------------------------------------------------------------------------------------------
# Tables from the benchmark's per-prompt records


def step_acceptance(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Per model, task, method and head n = 2..N: the share of verification steps that accepted head n's draft.

    A verification step that gains ``a`` tokens accepted the drafts of heads 2..a (in a tree: a path
    down to depth a - 1), so head n's share is the fraction of steps with ``a >= n``. The prompt's
    pass (the first accepted length) is left out. Only methods named ``specN_*`` or ``oracleN`` are
    counted (N from the name). Columns: ``model``, ``task``, ``method``, ``head``, ``share``,
    ``steps``.
    """
    df = _records(records, "records")
    rows = []
    for (model, task, method), part in df.groupby(["model", "task", "method"], sort=False):
        n_heads = method_heads(str(method))
        if n_heads is None or n_heads < 2:
            continue
        steps = np.asarray([a for lengths in part["accepted_lengths"] for a in list(lengths)[1:]], dtype=int)
        for head in range(2, n_heads + 1):
            rows.append({"model": model, "task": task, "method": method, "head": head,
                         "share": float((steps >= head).mean()) if len(steps) else float("nan"),
                         "steps": int(len(steps))})
    return pd.DataFrame(rows, columns=["model", "task", "method", "head", "share", "steps"])


def pass_costs(records: Iterable[Mapping[str, Any]], *, depths: Mapping[str, int] | None = None,
               baseline: str = "greedy_graph") -> pd.DataFrame:
    """Per model, task and timed method: tokens per forward pass, time per pass against ``baseline``'s.

    Pooled over the prompts both methods ran: ``tokens_per_pass`` = new tokens / forward passes,
    ``ms_per_pass`` = wall time / forward passes (the prompt's pass included), ``cost`` = that time
    over the baseline's, ``speedup`` = ``tokens_per_pass / cost`` relative to the baseline's tokens per
    pass (= total new tokens per second over the baseline's). ``max_tokens_per_pass`` is ``depth + 1``
    for methods in ``depths`` (method -> drafted tokens on the longest path): what perfect drafts
    would give per verification step.
    """
    df = _records(records, "records")
    _require(df, {"prompt", "seconds", "new_tokens", "n_forward"}, "records")
    if "timed" in df.columns:
        df = df[df["timed"].astype(bool)]
    rows = []
    for (model, task), part in df.groupby(["model", "task"], sort=False):
        base = part[part["method"] == baseline]
        if base.empty:
            continue
        for method, mine in part.groupby("method", sort=False):
            ref = base[base["prompt"].isin(set(mine["prompt"]))]
            if len(ref) != len(mine) or mine["n_forward"].sum() == 0 or ref["n_forward"].sum() == 0:
                continue
            tpp = mine["new_tokens"].sum() / mine["n_forward"].sum()
            ref_tpp = ref["new_tokens"].sum() / ref["n_forward"].sum()
            ms = 1000 * mine["seconds"].sum() / mine["n_forward"].sum()
            ref_ms = 1000 * ref["seconds"].sum() / ref["n_forward"].sum()
            depth = (depths or {}).get(str(method))
            rows.append({"model": model, "task": task, "method": method, "tokens_per_pass": float(tpp),
                         "ms_per_pass": float(ms), "cost": float(ms / ref_ms),
                         "speedup": float((tpp / ref_tpp) / (ms / ref_ms)),
                         "max_tokens_per_pass": float(depth + 1) if depth is not None else float("nan")})
    return pd.DataFrame(rows, columns=["model", "task", "method", "tokens_per_pass", "ms_per_pass", "cost",
                                       "speedup", "max_tokens_per_pass"])


# --------------------------------------------------------------------------------------------------
# Figures


def _legend_below(fig: Any, handles: dict[str, Any], ncol: int = 3) -> None:
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    rows = (len(handles) + ncol - 1) // ncol
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, min((0.22 * rows + 0.1) / height, 0.4), 1, 1))


def speed_bars(rows: pd.DataFrame, *, title: str | None = None) -> Any:
    """Speedup over ``greedy_graph`` (top) and tau (bottom) per method, one column of panels per task.

    ``rows`` has columns ``model``, ``task``, ``method``, ``tau``, ``speedup_vs_greedy_graph`` (NaN
    for a method that is not timed, e.g. the oracle: no bar, "not timed" written at its place) and,
    for the reference line, the ``generate`` row's ``speedup_vs_greedy_graph``. Bars: every method
    but the two baselines, one colour per model. Reference lines: ``greedy_graph`` = 1 (black) and
    each model's ``generate`` (dashed, the model's colour) on the speedup panels; one token per pass
    (plain decoding) on the tau panels.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    _require(rows, {"model", "task", "method", "tau", "speedup_vs_greedy_graph"}, "rows")
    tasks = _tasks(rows)
    models = list(dict.fromkeys(rows["model"]))
    methods = [m for m in dict.fromkeys(rows["method"]) if m not in BASELINES]
    if not methods:
        raise ValueError("rows hold only the baselines (generate, greedy_graph): nothing to draw as bars")
    colors = model_colors(models)
    width = 0.8 / len(models)
    fig, axes = plt.subplots(2, len(tasks), figsize=(max(6.0, 1.0 * len(methods) + 2.5) * len(tasks) / 1.4, 7.2),
                             squeeze=False, sharex=True, sharey="row")
    for col, task in enumerate(tasks):
        speed_ax, tau_ax = axes[0, col], axes[1, col]
        for metric, ax in (("speedup_vs_greedy_graph", speed_ax), ("tau", tau_ax)):
            for i, model in enumerate(models):
                for j, method in enumerate(methods):
                    sel = rows[(rows["task"] == task) & (rows["model"] == model) & (rows["method"] == method)]
                    if sel.empty:
                        continue
                    value = sel[metric].astype(float).iloc[0]
                    x = j - 0.4 + width * (i + 0.5)
                    if np.isfinite(value):
                        bar = ax.bar(x, value, width=width * 0.92, color=colors[model])[0]
                        bar.set_gid(f"bar|{metric}|{model}|{task}|{method}")
                        ax.text(x, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
                    elif metric == "speedup_vs_greedy_graph":
                        ax.text(x, 0.02, "not timed", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4",
                                transform=ax.get_xaxis_transform())
        ref = speed_ax.axhline(1.0, color="black", linewidth=1.2)
        ref.set_gid(f"ref|greedy_graph|{task}")
        for model in models:
            sel = rows[(rows["task"] == task) & (rows["model"] == model) & (rows["method"] == "generate")]
            if not sel.empty and np.isfinite(float(sel["speedup_vs_greedy_graph"].iloc[0])):
                line = speed_ax.axhline(float(sel["speedup_vs_greedy_graph"].iloc[0]), color=colors[model],
                                        linestyle="--", linewidth=1.2)
                line.set_gid(f"ref|generate|{model}|{task}")
        one = tau_ax.axhline(1.0, color="black", linewidth=1.2)
        one.set_gid(f"ref|one_token|{task}")
        speed_ax.set_title(task)
        tau_ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    for r, metric in enumerate(("speedup_vs_greedy_graph", "tau")):  # room above the tallest bar or line, per row
        values = rows[metric].astype(float).to_numpy()
        top = max(float(np.nanmax(values)) if np.isfinite(values).any() else 1.0, 1.0)
        axes[r, 0].set_ylim(0, 1.15 * top)
    axes[0, 0].set_ylabel("speedup over greedy_graph\n(mean tokens/s ratio)")
    axes[1, 0].set_ylabel("tau (tokens per\nverification step)")
    if title:
        fig.suptitle(title, fontsize=11)
    handles: dict[str, Any] = {f"{m}": Patch(color=colors[m]) for m in models}
    handles["greedy_graph (speedup 1, tau 1)"] = Line2D([], [], color="black")
    for m in models:
        handles[f"generate ({m})"] = Line2D([], [], color=colors[m], linestyle="--")
    _legend_below(fig, handles)
    return fig


def head_acceptance(acceptance: pd.DataFrame, *, title: str | None = None) -> Any:
    """Share of verification steps that accepted head n's draft, against n; one panel per model and task.

    ``acceptance`` is :func:`step_acceptance`'s table (columns ``model``, ``task``, ``method``,
    ``head``, ``share``): one line per method (a single point for a 2-head method), the methods
    set a little apart along x so that equal values stay visible.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    _require(acceptance, {"model", "task", "method", "head", "share"}, "acceptance")
    tasks = _tasks(acceptance)
    models = list(dict.fromkeys(acceptance["model"]))
    methods = list(dict.fromkeys(acceptance["method"]))
    colors = dict(zip(methods, sns.color_palette("deep", len(methods))))
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.8 * len(tasks), 3.4 * len(models) + 0.8),
                             squeeze=False, sharex=True, sharey=True)
    heads = sorted(set(int(h) for h in acceptance["head"]))
    for r, model in enumerate(models):
        for c, task in enumerate(tasks):
            ax = axes[r, c]
            for i, method in enumerate(methods):
                part = acceptance[(acceptance["model"] == model) & (acceptance["task"] == task)
                                  & (acceptance["method"] == method)].sort_values("head")
                if part.empty:
                    continue
                dodge = 0.06 * (i - (len(methods) - 1) / 2)  # methods side by side, not on top of each other
                ax.plot(part["head"] + dodge, part["share"], marker=markers[method], color=colors[method],
                        linestyle="--" if str(method).startswith("oracle") else "-", gid=f"acc|{model}|{task}|{method}")
            ax.set_title(f"{model}, {task}" if model else task, fontsize=10)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xticks(heads)
            if r == len(models) - 1:
                ax.set_xlabel("head n (draft of token t+n)")
            if c == 0:
                ax.set_ylabel("share of steps\naccepting head n's draft")
    if title:
        fig.suptitle(title, fontsize=11)
    handles = {m: Line2D([], [], color=colors[m], marker=markers[m], linestyle="--" if str(m).startswith("oracle")
                         else "-") for m in methods}
    _legend_below(fig, handles, ncol=min(len(handles), 5))
    return fig


def step_cost(costs: pd.DataFrame, *, speedups: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0),
              title: str | None = None) -> Any:
    """What limits the speedup: tokens per forward pass against the time of a pass, one panel per task.

    ``costs`` is :func:`pass_costs`'s table (columns ``model``, ``task``, ``method``, ``cost``,
    ``tokens_per_pass``, optionally ``max_tokens_per_pass``). Each method is a point (colour: model,
    marker: method); grey lines through the origin mark equal speedup over the baseline
    (tokens per pass / cost = s, for each s in ``speedups``), so a point's speedup is read off the
    line it sits on. Where ``max_tokens_per_pass`` is given, a hollow marker above the point shows
    the ceiling perfect drafts would reach at the same cost.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    _require(costs, {"model", "task", "method", "cost", "tokens_per_pass"}, "costs")
    tasks = _tasks(costs)
    models = list(dict.fromkeys(costs["model"]))
    methods = list(dict.fromkeys(costs["method"]))
    colors = model_colors(models)
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    ceiling = costs["max_tokens_per_pass"] if "max_tokens_per_pass" in costs.columns else pd.Series(dtype=float)
    x_max = 1.15 * max(float(costs["cost"].max()), 1.0)
    y_max = 1.15 * max(float(costs["tokens_per_pass"].max()), float(np.nan_to_num(ceiling.max(), nan=1.0)), 1.0)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.9), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        xs = np.linspace(0, x_max, 50)
        for s in speedups:
            line = ax.plot(xs, s * xs, color="0.6", linewidth=0.8, linestyle=":" if s != 1 else "-", zorder=0,
                           gid=f"iso|{s:g}")[0]
            x_label = min(x_max * 0.97, y_max * 0.97 / s)
            ax.text(x_label, s * x_label, f"{s:g}x", fontsize=8, color="0.35", ha="right", va="bottom")
            line.set_label("_nolegend_")
        for _, row in costs[costs["task"] == task].iterrows():
            color, marker = colors[row["model"]], markers[row["method"]]
            ax.plot([row["cost"]], [row["tokens_per_pass"]], marker=marker, color=color, markersize=8,
                    linestyle="none", gid=f"pt|{row['model']}|{task}|{row['method']}")
            top = row.get("max_tokens_per_pass", np.nan)
            if top is not None and np.isfinite(top):
                ax.plot([row["cost"], row["cost"]], [row["tokens_per_pass"], top], color=color, linewidth=0.8,
                        alpha=0.6, gid=f"ceil-line|{row['model']}|{task}|{row['method']}")
                ax.plot([row["cost"]], [top], marker=marker, color=color, mfc="white", markersize=8,
                        linestyle="none", gid=f"ceil|{row['model']}|{task}|{row['method']}")
        ax.set_xlim(0, x_max)
        ax.set_ylim(0, y_max)
        ax.set_title(task)
        ax.set_xlabel("time per forward pass\n(relative to greedy_graph's)")
    axes[0, 0].set_ylabel("new tokens per forward pass")
    if title:
        fig.suptitle(title, fontsize=11)
    handles: dict[str, Any] = {m: Line2D([], [], color=colors[m], marker="o", linestyle="none") for m in models}
    for m in methods:
        handles[m] = Line2D([], [], color="0.2", marker=markers[m], linestyle="none")
    if ceiling.notna().any():
        handles["perfect drafts, same cost"] = Line2D([], [], color="0.2", marker="o", mfc="white", linestyle="none")
    handles["equal speedup over greedy_graph"] = Line2D([], [], color="0.6", linestyle=":")
    _legend_below(fig, handles, ncol=4)
    return fig
