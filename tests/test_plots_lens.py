"""Figures of chapter 2 (mtp_lib.plots.lens) on fresh random synthetic data: what is drawn, where.

Each test draws its data from a fresh seed (printed in the messages; `MTP_TEST_SEED` replays it) and checks the
drawn artists against values computed independently here: one line per model at the per-depth
means, the paper's reference values as their own labelled series, one panel per sentence / model.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from mtp_lib.plots import lens as P  # noqa: E402
from seeds import fresh_seed  # noqa: E402


def paper_kl() -> pd.DataFrame:
    return pd.DataFrame({"series": ["large", "large", "31M"], "depth": [0.5, 1.0, 1.0],
                         "kl_low": [2.0, 0.5, 6.3], "kl_high": [4.0, 1.0, 6.3]})


def synthetic_kl(seed: int) -> tuple[pd.DataFrame, dict[str, int]]:
    rng = np.random.default_rng(seed)
    n_models = int(rng.integers(1, 4))
    layers = {f"model-{i}": int(rng.integers(3, 12)) for i in range(n_models)}
    rows = [{"model": m, "depth": layer / n, "sample": s, "kl": float(rng.gamma(2.0, 2.0))}
            for m, n in layers.items() for layer in range(1, n) for s in range(int(rng.integers(2, 5)))]
    return pd.DataFrame(rows), layers


def test_kl_by_depth_draws_one_mean_line_per_model_and_the_paper_apart() -> None:
    seed = fresh_seed()
    kl, layers = synthetic_kl(seed)
    paper = paper_kl()
    fig = P.kl_by_depth(kl, paper)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    handles, labels = ax.get_legend_handles_labels()
    for model in layers:
        assert model in labels, f"seed {seed}: no legend entry for {model}"
        expected = kl[kl["model"] == model].groupby("depth")["kl"].mean()
        drawn = [line for line in ax.get_lines() if len(line.get_xdata()) == len(expected)
                 and np.allclose(np.sort(line.get_xdata()), expected.index.to_numpy())
                 and np.allclose(line.get_ydata(), expected.to_numpy())]
        assert drawn, f"seed {seed}: no line at the per-depth means of {model}"
    paper_labels = [lab for lab in labels if lab.startswith(P.PAPER_LABEL)]
    assert sorted(paper_labels) == sorted(f"{P.PAPER_LABEL}: {s}" for s in ["large", "31M"]), seed
    assert not any(lab.startswith(P.PAPER_LABEL) for lab in lines if lab in layers)
    # the range bars span exactly [kl_low, kl_high]
    spans = sorted(tuple(np.round(seg[:, 1], 6)) for coll in ax.collections if isinstance(coll, LineCollection)
                   for seg in map(np.asarray, coll.get_segments()) if len(seg) == 2 and seg[0, 0] == seg[1, 0])
    assert (2.0, 4.0) in spans and (0.5, 1.0) in spans, f"seed {seed}: paper ranges drawn as {spans}"
    assert "KL" in ax.get_ylabel() and "depth" in ax.get_xlabel()


def test_kl_by_depth_without_paper_and_bad_input() -> None:
    kl, layers = synthetic_kl(fresh_seed())
    fig = P.kl_by_depth(kl)
    assert not any(lab.startswith(P.PAPER_LABEL) for lab in fig.axes[0].get_legend_handles_labels()[1])
    with pytest.raises(ValueError, match="lacks columns"):
        P.kl_by_depth(kl.drop(columns=["kl"]))
    with pytest.raises(ValueError, match="paper lacks columns"):
        P.kl_by_depth(kl, paper_kl().drop(columns=["kl_low"]))


def synthetic_entropy(seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    rng = np.random.default_rng(seed)
    words = ["and", "it", "doesn't", "matter", "how", "much", "information", "we're", "looking", "at"]
    sentences = {f"sentence {i}": " ".join(rng.choice(words, size=int(rng.integers(4, 12))))
                 for i in range(int(rng.integers(1, 4)))}
    rows = []
    for model in ["a", "b"]:
        for title, text in sentences.items():
            starts = [i for i, ch in enumerate(text) if ch != " " and (i == 0 or text[i - 1] == " ")]
            for c in starts:
                rows.append({"model": model, "sentence": title, "char": c, "entropy": float(rng.uniform(0, 8))})
    return pd.DataFrame(rows), sentences


def test_entropy_along_sentence_one_panel_per_sentence_lines_at_the_data() -> None:
    seed = fresh_seed()
    ent, sentences = synthetic_entropy(seed)
    paper = pd.DataFrame({"series": ["small peaks", "large most"], "entropy_low": [5.0, 0.3],
                          "entropy_high": [7.0, 2.5]})
    fig = P.entropy_along_sentence(ent, sentences, paper)
    assert len(fig.axes) == len(sentences), seed
    for ax, (title, text) in zip(fig.axes, sentences.items()):
        assert ax.get_title() == title
        assert [t.get_text() for t in ax.get_xticklabels()] == text.split(), seed
        for model in ["a", "b"]:
            part = ent[(ent["model"] == model) & (ent["sentence"] == title)].sort_values("char")
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == model]
            assert np.allclose(line.get_xdata(), part["char"]) and np.allclose(line.get_ydata(), part["entropy"]), seed
        bands = [p for p in ax.patches if p.get_label().startswith(P.PAPER_LABEL)]
        assert sorted(p.get_label() for p in bands) == sorted(f"{P.PAPER_LABEL}: {s}" for s in paper["series"])
        extents = sorted((round(p.get_bbox().y0, 6), round(p.get_bbox().y1, 6)) for p in bands)
        assert extents == [(0.3, 2.5), (5.0, 7.0)], f"seed {seed}: bands at {extents}"


def test_entropy_along_sentence_rejects_unknown_sentences() -> None:
    ent, sentences = synthetic_entropy(fresh_seed())
    with pytest.raises(ValueError, match="not keys of sentences"):
        P.entropy_along_sentence(ent, {"other": "x y"})
    with pytest.raises(ValueError, match="at least one"):
        P.entropy_along_sentence(ent, {})


def test_layer_accuracy_panels_and_line_styles() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    rows = []
    models = {f"m{i}": int(rng.integers(3, 10)) for i in range(int(rng.integers(1, 4)))}
    for model, n in models.items():
        for layer in range(1, n + 1):
            for target in ("next", "2nd"):
                probed = layer % 2 == 0 or layer == n  # probes on a subset of layers, like the CPU profile
                rows.append({"model": model, "depth": layer / n, "method": "lens", "target": target,
                             "accuracy": rng.uniform(), "nll": rng.uniform(0, 20) if probed else np.nan})
                if probed:
                    rows.append({"model": model, "depth": layer / n, "method": "probe", "target": target,
                                 "accuracy": rng.uniform(), "nll": rng.uniform(0, 20)})
    scores = pd.DataFrame(rows)
    fig = P.layer_accuracy(scores)
    assert len(fig.axes) == 2 * len(models), seed
    for col, model in enumerate(models):
        ax_acc, ax_nll = fig.axes[col], fig.axes[len(models) + col]
        assert ax_acc.get_title() == model
        labels = sorted(line.get_label() for line in ax_acc.get_lines())
        names = {f"{m}, {P.TARGET_LABELS[t]}": (m, t) for m in ("lens", "probe") for t in ("next", "2nd")}
        assert labels == sorted(names), seed
        assert sorted(line.get_label() for line in ax_nll.get_lines()) == sorted(names), seed
        for line in ax_acc.get_lines() + ax_nll.get_lines():
            method, target = names[line.get_label()]
            part = scores[(scores["model"] == model) & (scores["method"] == method)
                          & (scores["target"] == target)].sort_values("depth")
            column = "accuracy" if line.axes is ax_acc else "nll"
            part = part[part[column].notna()]
            assert np.allclose(line.get_xdata(), part["depth"]), f"seed {seed}: {model} {line.get_label()}"
            assert np.allclose(line.get_ydata(), part[column]), f"seed {seed}: {model} {line.get_label()}"
            assert line.get_linestyle() == ("--" if method == "probe" else "-")
    fig = P.layer_accuracy(scores.drop(columns=["nll"]), nll=False)
    assert len(fig.axes) == len(models)
    with pytest.raises(ValueError, match="unknown method/target"):
        P.layer_accuracy(scores.assign(method="tuned"))
