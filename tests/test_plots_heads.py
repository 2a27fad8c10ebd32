"""Figures of chapter 3 (mtp_lib.plots.heads) on fresh random synthetic data: what is drawn, where.

Each test draws its data from a fresh seed (printed in the messages; `MTP_TEST_SEED` replays it) and checks the
drawn artists against values computed here: one box per backbone layer, one WHS line per layer and
head, points at the given accuracies, the paper's values as their own grey series, one panel per
strategy / model. The committed paper tables are checked against the numbers SPEC.md quotes.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mtp_lib.plots import heads as P  # noqa: E402
from mtp_lib.plots.lens import read_paper_csv  # noqa: E402
from mtp_lib.results import repo_root  # noqa: E402
from seeds import fresh_seed  # noqa: E402


def gids(ax, prefix: str) -> list[str]:
    artists = list(ax.patches) + list(ax.get_lines())
    return [a.get_gid() for a in artists if a.get_gid() and a.get_gid().startswith(prefix)]


# --------------------------------------------------------------------------------------------------
# Figure 3.1: the architecture


def test_architecture_one_box_per_backbone_layer_and_one_whs_line_per_layer_and_head() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n_layers, n_heads = int(rng.integers(2, 41)), int(rng.integers(1, 4))
    fig = P.architecture(n_layers, n_heads=n_heads, model="m")
    plain, whs = fig.axes
    for ax in (plain, whs):
        layers = gids(ax, "layer-")
        assert sorted(layers) == sorted(f"layer-{i}" for i in range(1, n_layers)), f"seed {seed}: {layers}"
        boxes = {p.get_gid(): p for p in ax.patches if p.get_gid() and p.get_gid().startswith("layer-")}
        bottoms = [boxes[f"layer-{i}"].get_y() for i in range(1, n_layers)]
        assert bottoms == sorted(bottoms), f"seed {seed}: layers are not stacked in order"
        assert sorted(gids(ax, "head-")) == [f"head-{n}" for n in range(1, n_heads + 1)], seed
        assert len(gids(ax, "feed-")) == n_heads and gids(ax, "unembedding") == ["unembedding"], seed
    assert gids(plain, "whs-") == [], f"seed {seed}: the plain panel has WHS lines"
    expected = {f"whs-{n}-{layer}" for n in range(1, n_heads + 1) for layer in range(1, n_layers)}
    assert set(gids(whs, "whs-")) == expected and len(gids(whs, "whs-")) == len(expected), seed
    assert len(gids(whs, "mix-")) == n_heads, seed
    # every WHS line starts at its layer's box and ends at its head's mixing node
    circles = {p.get_gid(): p for p in whs.patches if p.get_gid() and p.get_gid().startswith("mix-")}
    boxes = {p.get_gid(): p for p in whs.patches if p.get_gid() and p.get_gid().startswith("layer-")}
    for line in whs.get_lines():
        n, layer = map(int, line.get_gid().split("-")[1:])
        box = boxes[f"layer-{layer}"]
        assert np.isclose(line.get_ydata()[0], box.get_y() + box.get_height() / 2), seed
        assert np.allclose([line.get_xdata()[1], line.get_ydata()[1]], circles[f"mix-{n}"].center), seed
    assert f"L = {n_layers}" in fig._suptitle.get_text()
    assert "WHS" in whs.get_title() and "without" in plain.get_title()


def test_architecture_rejects_bad_input() -> None:
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="n_layers"):
            P.architecture(bad)
    with pytest.raises(ValueError, match="n_heads"):
        P.architecture(5, n_heads=0)


# --------------------------------------------------------------------------------------------------
# Figure 3.2: accuracy per strategy, ours and the paper's


def synthetic_accuracy(seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    strategies = [f"strategy {i}" for i in range(int(rng.integers(2, 9)))]
    models = [f"model-{i}" for i in range(int(rng.integers(1, 4)))]
    rows = []
    for s in strategies:
        for m in models:
            for t in P.TARGETS:
                a = float(rng.uniform(0.1, 0.9))
                rows.append({"strategy": s, "model": m, "target": t, "accuracy": a,
                             "lo": a - float(rng.uniform(0, 0.1)), "hi": a + float(rng.uniform(0, 0.1))})
    paper_strategies = strategies[1:] + ["paper only"]
    paper = pd.DataFrame([{"strategy": s, "model": f"Pythia {k}", "target": t, "accuracy": float(rng.uniform())}
                          for s in paper_strategies for k in ("410M", "1B") for t in P.TARGETS])
    return pd.DataFrame(rows), paper, strategies + ["paper only"]


def test_strategy_accuracy_points_intervals_and_paper_series() -> None:
    seed = fresh_seed()
    ours, paper, order = synthetic_accuracy(seed)
    fig = P.strategy_accuracy(ours, paper)
    fig.canvas.draw()
    axes = fig.axes[:2]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == order, seed  # shared by both panels
    for ax, target in zip(axes, P.TARGETS):
        assert ax.get_title() == P.TARGETS[target]
        for container in ax.containers:  # ours: one error-bar series per model
            model = container.get_label()
            part = ours[(ours["model"] == model) & (ours["target"] == target)]
            x, y = container.lines[0].get_xdata(), container.lines[0].get_ydata()
            assert np.allclose(x, part["accuracy"]), f"seed {seed}: {model} {target}"
            assert np.allclose(np.round(y), [order.index(s) for s in part["strategy"]]), seed
            (bars,) = container.lines[2]
            spans = [tuple(seg[:, 0]) for seg in map(np.asarray, bars.get_segments())]
            assert np.allclose(spans, part[["lo", "hi"]].to_numpy()), f"seed {seed}: intervals of {model}"
        assert sorted(c.get_label() for c in ax.containers) == sorted(set(ours["model"])), seed
        paper_lines = [ln for ln in ax.get_lines() if ln.get_label().startswith(P.PAPER_LABEL)]
        assert sorted(ln.get_label() for ln in paper_lines) == [f"{P.PAPER_LABEL}: Pythia 1B",
                                                                f"{P.PAPER_LABEL}: Pythia 410M"], seed
        for ln in paper_lines:
            part = paper[(paper["model"] == ln.get_label().split(": ")[1]) & (paper["target"] == target)]
            assert np.allclose(ln.get_xdata(), part["accuracy"]), seed
            assert ln.get_color() == P._PAPER_COLOR
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    n_ours = ours["model"].nunique()
    assert legend[:n_ours] == list(dict.fromkeys(ours["model"])) and all(
        lab.startswith(P.PAPER_LABEL) for lab in legend[n_ours:]), f"seed {seed}: legend {legend}"


def test_strategy_accuracy_without_paper_or_intervals_and_bad_input() -> None:
    seed = fresh_seed()
    ours, _, _ = synthetic_accuracy(seed)
    fig = P.strategy_accuracy(ours.drop(columns=["lo", "hi"]))
    for ax, target in zip(fig.axes[:2], P.TARGETS):
        assert not ax.containers
        for model in ours["model"].unique():
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == model]
            assert np.allclose(line.get_xdata(), ours[(ours["model"] == model) & (ours["target"] == target)]["accuracy"])
    with pytest.raises(ValueError, match="unknown target"):
        P.strategy_accuracy(ours.assign(target="third"))
    with pytest.raises(ValueError, match="lacks columns"):
        P.strategy_accuracy(ours.drop(columns=["accuracy"]))


# --------------------------------------------------------------------------------------------------
# Figure 3.3: training curves


def synthetic_history(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(int(rng.integers(1, 8))):
        warmup = bool(rng.integers(2))
        for m in ("a", "b")[: int(rng.integers(1, 3))]:
            n_heads = int(rng.integers(1, 3))
            phases = ["heads", "joint"] if warmup else ["joint"]
            steps = int(rng.integers(2, 12))
            step = 0
            for phase in phases:
                for _ in range(steps):
                    step += 1
                    rows += [{"strategy": f"s{s}", "model": m, "head": h, "step": step, "phase": phase,
                              "loss": float(rng.uniform(1, 9))} for h in range(1, n_heads + 1)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("smooth", [1, 3])
def test_training_curves_one_panel_per_strategy_lines_per_model_and_head(smooth: int) -> None:
    seed = fresh_seed()
    history = synthetic_history(seed)
    fig = P.training_curves(history, smooth=smooth)
    strategies = list(dict.fromkeys(history["strategy"]))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == strategies, seed
    for ax, strategy in zip(panels, strategies):
        part = history[history["strategy"] == strategy]
        data_lines = [ln for ln in ax.get_lines() if ln.get_gid() != "phase-change"]
        expected = {f"{m}, head {h}" for m, h in part[["model", "head"]].drop_duplicates().itertuples(index=False)}
        assert {ln.get_label() for ln in data_lines} == expected and len(data_lines) == len(expected), seed
        for ln in data_lines:
            model, head = ln.get_label().split(", head ")
            rows = part[(part["model"] == model) & (part["head"] == int(head))].sort_values("step")
            loss = rows["loss"].rolling(smooth, center=True, min_periods=1).mean()
            assert np.allclose(ln.get_xdata(), rows["step"]) and np.allclose(ln.get_ydata(), loss), seed
        changes = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_gid() == "phase-change")
        expected_changes = sorted(
            float(part[(part["model"] == m) & (part["phase"] == "joint")]["step"].min()) - 0.5
            for m in part["model"].unique() if part[part["model"] == m]["phase"].nunique() == 2)
        assert changes == expected_changes, f"seed {seed}: phase lines at {changes}"
    with pytest.raises(ValueError, match="smooth"):
        P.training_curves(history, smooth=0)


# --------------------------------------------------------------------------------------------------
# Figure 3.4: WHS weights and the chapter-2 probes


def test_whs_weights_lines_uniform_reference_and_probe_axis() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    layers = {"with-probe": int(rng.integers(3, 31)), "without": int(rng.integers(3, 31))}
    rows = []
    for model, n in layers.items():
        for head in (1, 2):
            w = rng.dirichlet(np.ones(n - 1))
            rows += [{"model": model, "head": head, "layer": i, "weight": x} for i, x in enumerate(w, 1)]
    weights = pd.DataFrame(rows)
    n = layers["with-probe"]
    probed = sorted(set(rng.integers(1, n + 1, size=4).tolist()) | {n})
    probe = pd.DataFrame([{"model": "with-probe", "layer": layer, "method": method, "accuracy": float(rng.uniform())}
                          for layer in probed for method in ("probe", "lens")])
    fig = P.whs_weights(weights, probe, notes={"without": "no probe stored"})
    main = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main] == list(layers), seed
    for ax, (model, n_layers) in zip(main, layers.items()):
        for head in (1, 2):
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == f"WHS weight, head {head}"]
            part = weights[(weights["model"] == model) & (weights["head"] == head)]
            assert np.allclose(line.get_xdata(), part["layer"]) and np.allclose(line.get_ydata(), part["weight"]), seed
        (uniform,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("uniform")]
        assert np.allclose(uniform.get_ydata(), 1.0 / (n_layers - 1)), seed
    twins = [ax for ax in fig.axes if not ax.get_title()]
    assert len(twins) == 1, f"seed {seed}: a probe axis only for the model with a probe"
    for method in ("probe", "lens"):
        (line,) = [ln for ln in twins[0].get_lines() if ln.get_label().startswith(f"chapter 2 {method}")]
        part = probe[probe["method"] == method]
        assert np.allclose(line.get_xdata(), part["layer"]) and np.allclose(line.get_ydata(), part["accuracy"]), seed
    assert main[0].get_xlim()[1] >= max(probed), f"seed {seed}: the probed layer L is cut off"
    assert any(t.get_text() == "no probe stored" for t in main[1].texts)
    fig = P.whs_weights(weights)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="lacks columns"):
        P.whs_weights(weights.drop(columns=["weight"]))


# --------------------------------------------------------------------------------------------------
# The paper's tables


def test_paper_tables_hold_the_paper_numbers() -> None:
    t1 = read_paper_csv(repo_root() / "data" / "paper" / "table1.csv")
    long = P.paper_table(t1)
    assert len(long) == 2 * 7 * 4 and set(long["target"]) == {"next", "2nd"}
    get = lambda s, m, t: float(long[(long.strategy == s) & (long.model == m) & (long.target == t)]["accuracy"].iloc[0])  # noqa: E731
    assert get("Baseline (FT + marginalization)", "Pythia 410M", "2nd") == 0.682
    assert get("Diff. LR + WHS", "Pythia 2.8B", "next") == 0.833
    assert get("Heads only", "Pythia 1.4B", "2nd") == 0.573
    picked = P.paper_table(t1, ["Heads only"])
    assert set(picked["strategy"]) == {"Heads only"} and len(picked) == 8
    with pytest.raises(ValueError, match="not in the paper"):
        P.paper_table(t1, ["Medusa"])
    t2 = read_paper_csv(repo_root() / "data" / "paper" / "table2.csv").set_index("model")
    assert np.allclose(t2["half_pretraining_lr"], t2["pretraining_lr"] / 2)
    mismatch = sorted(t2.index[~np.isclose(t2["paper_lr"], t2["half_pretraining_lr"])])
    assert mismatch == ["Pythia 1.4B", "Pythia 2.8B"]
    assert t2.loc["Pythia 1.4B", "paper_lr"] == 8e-5 and t2.loc["Pythia 2.8B", "paper_lr"] == 6e-6
