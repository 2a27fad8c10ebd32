"""Figures of chapter 1 (mtp_lib.plots.marginal) on fresh random synthetic data: what is drawn, where.

Each test draws its data from a fresh seed (printed in the messages; `MTP_TEST_SEED` replays it) and checks the
drawn artists against the input: one data line per model, task and offset (or top-p) at the given
values, intervals spanning exactly [lo, hi], the paper's reference values as their own grey series
with their own legend entries, line styles (solid next token / top-0.99, dashed 2nd token /
top-0.9), log and logit axes.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mtp_lib.plots import marginal as P  # noqa: E402
from mtp_lib.results import repo_root  # noqa: E402
from seeds import fresh_seed  # noqa: E402

TASKS = ["translation", "open-ended"]


def lines_by_gid(fig) -> dict[str, object]:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def intervals_by_gid(fig) -> dict[str, np.ndarray]:
    """The error-bar segments of each series: [points, 2 (lo, hi)] in data units."""
    out = {}
    for ax in fig.axes:
        for coll in ax.collections:
            gid = coll.get_gid()
            if gid and gid.endswith("|interval"):
                segs = [np.asarray(s) for s in coll.get_segments()]
                out[gid[: -len("|interval")]] = np.array([[s[0, 1], s[1, 1]] for s in segs])
    return out


def legend_labels(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def synthetic_models(rng: np.random.Generator) -> dict[str, float]:
    n = int(rng.integers(1, 4))
    params = np.sort(rng.uniform(7, 11, n))
    return {f"model-{i}": float(10**p) for i, p in enumerate(params)}


def synthetic_accuracy(seed: int, offsets=(1, 2), series=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    models = synthetic_models(rng)
    rows = []
    for name in series or [None]:
        for model, params in models.items():
            for task in TASKS:
                for off in offsets:
                    a = float(rng.uniform(0.1, 0.9))
                    row = {"model": model, "params": params, "task": task, "offset": off, "accuracy": a,
                           "accuracy_lo": a - float(rng.uniform(0, 0.1)), "accuracy_hi": a + float(rng.uniform(0, 0.1))}
                    if name is not None:
                        row["series"] = name
                    rows.append(row)
    return pd.DataFrame(rows)


def paper_fig1() -> pd.DataFrame:
    return P.read_paper_csv(repo_root() / "data" / "paper" / "fig1.csv")


def paper_fig4() -> pd.DataFrame:
    return P.read_paper_csv(repo_root() / "data" / "paper" / "fig4.csv")


def test_paper_csvs_hold_both_families_tasks_and_offsets() -> None:
    f1 = paper_fig1()
    assert set(f1.columns) == {"family", "model", "params", "task", "offset", "accuracy"}
    counts = f1.groupby(["family", "task", "offset"]).size()
    assert (counts.loc["Pythia"] == 10).all() and (counts.loc["Llama-3"] == 2).all() and len(counts) == 8
    assert f1["accuracy"].between(0, 1).all()
    # within a size, the 2nd token is never more accurate than the next (as in the paper's figure)
    wide = f1.pivot_table(index=["family", "model", "task"], columns="offset", values="accuracy")
    assert (wide[2] <= wide[1]).all()
    f4 = paper_fig4()
    assert set(f4.columns) == {"family", "model", "params", "task", "top_p", "nucleus"}
    assert set(f4[f4["top_p"] == 0.9]["task"]) == {"translation"}  # the paper gives top-0.9 for translation only
    assert len(f4) == 36 and (f4["nucleus"] >= 1).all()


@pytest.mark.parametrize("n_series", [1, 2])
def test_accuracy_by_size_draws_ours_at_the_values_and_the_paper_apart(n_series: int) -> None:
    seed = fresh_seed()
    series = [f"{10 * (i + 1)} samples" for i in range(n_series)] if n_series > 1 else None
    ours = synthetic_accuracy(seed, series=series)
    paper = paper_fig1()
    fig = P.accuracy_by_size(ours, paper, k=5)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == TASKS, seed
    assert all(ax.get_xscale() == "log" for ax in axes) and axes[0].get_ylabel() == "top-5 accuracy"
    lines, intervals = lines_by_gid(fig), intervals_by_gid(fig)
    for _, row in ours.iterrows():
        gid = f"ours|{row.get('series', '')}|{row['model']}|{row['task']}|{row['offset']}"
        assert gid in lines, f"seed {seed}: nothing drawn for {gid}"
        line = lines[gid]
        assert np.allclose(line.get_ydata(), [row["accuracy"]]), f"seed {seed}: {gid} at {line.get_ydata()}"
        assert 0.85 < line.get_xdata()[0] / row["params"] < 1.15, f"seed {seed}: {gid} not at its size"
        assert np.allclose(intervals[gid], [[row["accuracy_lo"], row["accuracy_hi"]]]), f"seed {seed}: {gid}"
        assert line.get_linestyle() == {1: "-", 2: "--"}[row["offset"]], seed
    n_ours = len(ours)
    assert sum(g.startswith("ours|") for g in lines) == n_ours, seed
    # the paper: one grey line per family, task and offset, at its read-off values, with its own legend entry
    for (family, task, off), part in paper.groupby(["family", "task", "offset"]):
        line = lines[f"paper|{family}|{task}|{off}"]
        part = part.sort_values("params")
        assert np.allclose(line.get_ydata(), part["accuracy"]) and np.allclose(line.get_xdata(), part["params"])
        assert line.get_linestyle() == {1: "-", 2: "--"}[off]
    labels = legend_labels(fig)
    for family in ("Pythia", "Llama-3"):
        for what in ("next token", "2nd token"):
            assert f"{P.PAPER_LABEL}: {family}, {what} (read off)" in labels, labels
    assert not any(lab.startswith(P.PAPER_LABEL) and "ours" in lab for lab in labels)
    for model in ours["model"].unique():
        assert f"ours: {model}" in labels, f"seed {seed}: no legend entry for {model}"
    if series:
        assert all(f"ours: {s}" in labels for s in series), labels
        # the two series sit side by side, not on top of each other
        xs = {s: lines[f"ours|{s}|model-0|translation|1"].get_xdata()[0] for s in series}
        assert xs[series[0]] != xs[series[1]], seed


def test_accuracy_by_size_third_token_without_paper_and_missing_bounds() -> None:
    seed = fresh_seed()
    ours = synthetic_accuracy(seed, offsets=(1, 2, 3)).drop(columns=["accuracy_hi"])
    ours["accuracy_lo"] = np.nan  # one sample: no interval
    fig = P.accuracy_by_size(ours, title="depth 3")
    lines = lines_by_gid(fig)
    assert not any(g.startswith("paper|") for g in lines), seed
    third = [line for g, line in lines.items() if g.endswith("|3")]
    assert len(third) == ours["model"].nunique() * 2 and all(line.get_linestyle() == ":" for line in third), seed
    for segs in intervals_by_gid(fig).values():
        assert np.allclose(segs[:, 0], segs[:, 1]), f"seed {seed}: an interval drawn without bounds"
    assert "ours: 3rd token" in legend_labels(fig)


def test_accuracy_by_size_rejects_bad_input() -> None:
    ours = synthetic_accuracy(fresh_seed())
    with pytest.raises(ValueError, match="lacks columns"):
        P.accuracy_by_size(ours.drop(columns=["params"]))
    with pytest.raises(ValueError, match="offsets"):
        P.accuracy_by_size(ours.assign(offset=4))
    with pytest.raises(ValueError, match="paper lacks columns"):
        P.accuracy_by_size(ours, paper_fig1().drop(columns=["offset"]))
    with pytest.raises(ValueError, match="empty"):
        P.accuracy_by_size(ours.iloc[:0])
    with pytest.raises(ValueError, match="DataFrame"):
        P.accuracy_by_size(ours.to_dict())


def test_nucleus_by_size_is_log_log_with_styles_per_top_p() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    models = synthetic_models(rng)
    rows = []
    for model, params in models.items():
        for task in TASKS:
            for q in (0.99, 0.9):
                n = float(10 ** rng.uniform(0, 4))
                rows.append({"model": model, "params": params, "task": task, "top_p": q, "nucleus": n,
                             "nucleus_lo": n * 0.8, "nucleus_hi": n * 1.25})
    ours = pd.DataFrame(rows)
    paper = paper_fig4()
    fig = P.nucleus_by_size(ours, paper)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == TASKS
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in axes)
    lines, intervals = lines_by_gid(fig), intervals_by_gid(fig)
    for _, row in ours.iterrows():
        gid = f"ours||{row['model']}|{row['task']}|{row['top_p']}"
        assert np.allclose(lines[gid].get_ydata(), [row["nucleus"]]), f"seed {seed}: {gid}"
        assert np.allclose(intervals[gid], [[row["nucleus_lo"], row["nucleus_hi"]]]), f"seed {seed}: {gid}"
        assert lines[gid].get_linestyle() == {0.99: "-", 0.9: "--"}[row["top_p"]]
    # the paper's top-0.9 is drawn for translation only, dashed; its values are the CSV's
    paper_gids = {g for g in lines if g.startswith("paper|")}
    assert "paper|Pythia|translation|0.9" in paper_gids and "paper|Pythia|open-ended|0.9" not in paper_gids
    tr9 = paper[(paper["family"] == "Pythia") & (paper["task"] == "translation") & (paper["top_p"] == 0.9)]
    assert np.allclose(lines["paper|Pythia|translation|0.9"].get_ydata(), tr9.sort_values("params")["nucleus"])
    assert lines["paper|Pythia|translation|0.9"].get_linestyle() == "--"
    labels = legend_labels(fig)
    assert f"{P.PAPER_LABEL}: Llama-3, top-0.99 (read off)" in labels and "ours: top-0.9" in labels


def test_accuracy_vs_top_p_draws_accuracy_and_cost_on_a_logit_axis() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    qs = sorted(rng.choice([0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999], size=int(rng.integers(2, 6)), replace=False))
    rows = []
    for model in ("a", "b"):
        for task in TASKS:
            for q in qs:
                a, c = float(rng.uniform(0, 1)), float(10 ** rng.uniform(0, 4))
                rows.append({"model": model, "task": task, "top_p": float(q), "accuracy": a, "accuracy_lo": a - 0.05,
                             "accuracy_hi": a + 0.05, "candidates": c, "candidates_lo": c / 2, "candidates_hi": c * 2})
    sweep = pd.DataFrame(rows).sample(frac=1.0, random_state=seed % 2**32)  # any row order
    fig = P.accuracy_vs_top_p(sweep, k=5)
    assert len(fig.axes) == 4
    lines = lines_by_gid(fig)
    for (model, task), part in sweep.groupby(["model", "task"]):
        part = part.sort_values("top_p")
        acc, cost = lines[f"ours|{model}|{task}|2"], lines[f"cost|{model}|{task}"]
        assert np.allclose(acc.get_xdata(), part["top_p"]) and np.allclose(acc.get_ydata(), part["accuracy"]), seed
        assert np.allclose(cost.get_ydata(), part["candidates"]), seed
        assert cost.axes.get_yscale() == "log" and cost.axes.get_xscale() == "logit"
        assert acc.get_linestyle() == "--"
    with pytest.raises(ValueError, match="logit"):
        P.accuracy_vs_top_p(sweep.assign(top_p=1.0))
    with pytest.raises(ValueError, match="lacks columns"):
        P.accuracy_vs_top_p(sweep.drop(columns=["candidates"]))
