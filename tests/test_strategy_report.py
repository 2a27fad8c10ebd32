"""Chapter 3's runs, tables and sentences (mtp_lib.strategy_runs, strategy_report, whs_report).

The tables are checked on fresh random hits against plain numpy references; the cache configuration
of a row is checked against the results committed for the cpu and gpu profiles (a changed key
would make the book retrain every row).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mtp_lib import report
from mtp_lib import strategy_report as T
from mtp_lib.book import load_profile
from mtp_lib.results import config_key, repo_root
from mtp_lib.strategy_runs import STRATEGIES, VERSIONS, Table1Setup, status_table
from mtp_lib.whs_report import notebook_parameters, whs_frames, whs_note
from seeds import fresh_seed

CHAPTER = repo_root() / "chapters" / "03_mtp_heads.ipynb"
SETUP_FIELDS = ["models", "recipes", "dataset", "n_train", "data_seed", "epochs", "effective_batch", "micro_batch",
                "max_steps", "lrs", "default_lr", "medusa_lr", "seed", "n_eval", "last_tokens", "top_k",
                "baseline_top_p", "dtype", "device", "profile", "recompute", "save_dir"]


def chapter_setup(profile: str | None = None, **overrides) -> Table1Setup:
    # the chapter's parameters cell, overridden by a profile's values (as the book runs it) and by overrides
    values = notebook_parameters(CHAPTER)
    if profile is not None:
        prof = load_profile(profile)
        values.update({k: v for k, v in prof.parameters.items() if k in values})
        values.update(prof.chapters["03_mtp_heads"])
        values["profile"] = profile
    values.update(device="cpu", **overrides)
    return Table1Setup(**{k: values[k] for k in SETUP_FIELDS})


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_row_configs_match_the_committed_results(profile: str) -> None:
    setup = chapter_setup(profile)
    for name in setup.models:
        for rec in setup.recipes:
            kind = "ch03-baseline" if rec == "ntp_baseline" else "ch03-heads"
            key = config_key(setup.row_config(name, rec), VERSIONS[kind])
            path = repo_root() / "data" / "results" / profile / f"{kind}-{key}.json"
            assert path.is_file(), f"{profile}: {name} {rec} has no committed result {path.name}: its cache key changed"
            assert json.loads(path.read_text())["config"]["recipe"] == rec


def test_setup_orders_recipes_and_refuses_unknown_ones() -> None:
    setup = chapter_setup(recipes=["medusa", "heads_only", "ntp_baseline"], n_train=4, n_eval=2)
    assert setup.recipes == ["ntp_baseline", "heads_only", "medusa"]
    assert setup.head_rows == ["heads_only"]
    assert setup.dtype == "float32" and str(setup.device) == "cpu"
    assert len(setup.train_ids) == 4 and len(setup.eval_ids) == 2
    with pytest.raises(ValueError, match="not rows of this chapter"):
        chapter_setup(recipes=["heads_only", "nope"], n_train=4, n_eval=2)


def fake_rows(rng: np.random.Generator, recipes: list[str], models=("m1",), n=6, last=5, steps=4):
    rows = {}
    for name in models:
        for rec in recipes:
            p = rng.uniform(0.1, 0.9)
            value = {"hits": (rng.random((n, 2, last)) < p).astype(int).tolist(),
                     "history": [{"loss": list(rng.uniform(1, 9, 2)), "phase": "joint"} for _ in range(steps)]
                     + [{"eval": 1.0}],
                     "info": {"vocab": 100, "layers": 4}, "train_seconds": 1.0, "eval_seconds": 2.0,
                     "nucleus_mean": [3.0] * n}
            rows[name, rec] = SimpleNamespace(value=value, loaded=True, provenance={"device": "cpu"})
    return rows


def test_accuracy_frame_matches_numpy_means() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    rows = fake_rows(rng, ["heads_only", "diff_lr"], models=("a", "b"))
    frame = T.accuracy_frame(rows)
    assert len(frame) == 2 * 2 * 2, seed
    for _, r in frame.iterrows():
        h = np.asarray(rows[r["model"], r["recipe"]].value["hits"], dtype=float)
        assert np.isclose(r["accuracy"], h[:, T.TARGET_INDEX[r["target"]]].mean()), seed
        assert r["lo"] <= r["accuracy"] <= r["hi"], seed
        assert r["strategy"] == STRATEGIES[r["recipe"]]


def test_row_difference_is_the_paired_mean_and_claims_use_the_shared_verdict() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    recipes = ["ntp_baseline", "heads_only", "vanilla_joint", "diff_lr", "medusa"]
    rows = fake_rows(rng, recipes)
    rows["m1", "ntp_baseline"].value["hits"] = np.ones((6, 2, 5), dtype=int).tolist()  # beats every row
    for rec in recipes[1:]:  # clearly: at a rate of 0.3 (a row near 0.9 could tie it on 6 samples)
        rows["m1", rec].value["hits"] = (rng.random((6, 2, 5)) < 0.3).astype(int).tolist()
    diff = T.row_difference(rows, "m1", "vanilla_joint", "heads_only", "2nd")
    a = np.asarray(rows["m1", "vanilla_joint"].value["hits"])[:, 1]
    b = np.asarray(rows["m1", "heads_only"].value["hits"])[:, 1]
    assert np.isclose(diff.mean, (a - b).mean()), seed
    setup = SimpleNamespace(recipes=recipes, head_rows=["heads_only", "vanilla_joint", "diff_lr"], models=["m1"])
    paper = pd.DataFrame([{"strategy": STRATEGIES[r], "model": m, "next": x, "second": x / 2}
                          for m in ("P1", "P2") for r, x in (("ntp_baseline", 0.9), ("heads_only", 0.5),
                                                             ("vanilla_joint", 0.6), ("diff_lr", 0.4))])
    table = T.claims_table(rows, paper, setup)
    claims = T.claims(setup)
    assert list(table.index) == [c[0] for c in claims]
    for text, a_rec, b_rec, target in claims:
        expected = report.verdict(T.row_difference(rows, "m1", a_rec, b_rec, target)).text
        assert table.loc[text, "m1"] == expected, seed
    baseline = [c for c in claims if c[1] == "ntp_baseline"]
    assert [c[2] for c in baseline] == ["heads_only", "vanilla_joint", "diff_lr", "medusa"]
    assert all(table.loc[c[0], "m1"].endswith(report.SUPPORTED) for c in baseline), seed
    paper_col = table["paper: Pythia models where it holds"]
    assert paper_col["Joint training beats heads only on the 2nd token"] == "2 of 2"
    assert paper_col["Diff. LR beats vanilla joint on the 2nd token"] == "0 of 2"
    assert paper_col[f"The baseline beats {STRATEGIES['medusa']} on the 2nd token"] == "-"


def test_loss_history_budget_and_notes() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    recipes = ["ntp_baseline", "heads_only", "head_warmup", "diff_lr_whs"]
    rows = fake_rows(rng, recipes, steps=int(rng.integers(2, 9)))
    steps = len(rows["m1", "heads_only"].value["history"]) - 1
    rows["m1", "head_warmup"].value["history"] *= 2  # a longer two-phase row does not set the budget
    history = T.loss_history(rows)
    assert set(history["head"]) == {1, 2} and history["step"].max() == 2 * steps, seed
    assert T.budget_steps(rows) == steps, seed
    setup = SimpleNamespace(models=["m1"], recipes=recipes, head_rows=["heads_only", "head_warmup", "diff_lr_whs"],
                            n_train=16, effective_batch=4, baseline_top_p=0.9, last_tokens=5)
    assert T.is_short(rows, setup) and str(steps) in T.short_budget_warning(rows, setup)
    assert "not a reproduction" in T.budget_note(rows, setup) and "top-0.9 nucleus" in T.budget_note(rows, setup)
    layer_rows = history["strategy"].isin([STRATEGIES[r] for r in setup.head_rows])
    first = history[layer_rows & (history["head"] == 2) & (history["step"] == 1)]["loss"].mean()
    assert f"from {first:.2f}" in T.loss_note(history, rows, setup), seed
    assert f"would cost {np.log(100):.2f}" in T.loss_note(history, rows, setup)


def test_ranking_note_orders_rows_by_second_token_accuracy() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    recipes = ["heads_only", "vanilla_joint", "diff_lr"]
    rows = fake_rows(rng, recipes)
    paper = pd.DataFrame([{"strategy": STRATEGIES[r], "model": "P", "next": 0.5, "second": x}
                          for r, x in zip(recipes, (0.1, 0.3, 0.2))])
    setup = SimpleNamespace(models=["m1"], recipes=recipes, head_rows=recipes, last_tokens=5, baseline_top_p=0.9)
    text = T.ranking_note(rows, paper, setup)
    assert "Vanilla joint (0.300) > Diff. LR (0.200) > Heads only (0.100)" in text
    mine = sorted(recipes, key=lambda r: -np.asarray(rows["m1", r].value["hits"])[:, 1].mean())
    positions = [text.split("**m1**")[1].index(STRATEGIES[r] + " (") for r in mine]
    assert positions == sorted(positions), seed


def test_whs_note_names_the_most_weighted_layers_and_flags_unmoved_weights(tmp_path) -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n_back = int(rng.integers(4, 12))
    w = rng.dirichlet(np.ones(n_back), size=2)
    rows = {("m", "diff_lr_whs"): SimpleNamespace(value={"whs_weights": w.tolist()})}
    text = whs_note(rows, ["m"], None)
    for head, ws in enumerate(w, 1):
        top = np.argsort(ws)[::-1][:3] + 1
        assert f"head {head} weights layers {', '.join(map(str, top))} most" in text, seed
    flat = {("m", "diff_lr_whs"): SimpleNamespace(value={"whs_weights": np.full((2, n_back), 1 / n_back).tolist()})}
    assert "within 0% of uniform" in whs_note(flat, ["m"], None)
    assert "not among" in whs_note({}, ["m"], None)
    frames = whs_frames(rows, ["m"], "no-such-profile", "float32")
    assert len(frames.weights) == 2 * n_back and frames.probe is None and "run Chapter 2" in frames.notes["m"]


def test_notebook_parameters_reads_literals_only(tmp_path) -> None:
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
                     "source": ["a = 1\n", "b = [1, 2]  # c\n", "c = some_call()\n"]}]}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    assert notebook_parameters(path) == {"a": 1, "b": [1, 2]}
    path.write_text(json.dumps({"cells": []}))
    with pytest.raises(ValueError, match="parameters"):
        notebook_parameters(path)


def test_status_table_says_loaded_or_computed_per_row() -> None:
    rng = np.random.default_rng(fresh_seed())
    rows = fake_rows(rng, ["ntp_baseline", "heads_only"])
    rows["m1", "heads_only"].loaded = False
    table = status_table(rows)
    assert table.loc[("m1", STRATEGIES["heads_only"]), "result"] == "computed now"
    assert table.loc[("m1", STRATEGIES["ntp_baseline"]), "result"] == "loaded"
    assert list(table.columns) == ["result", "train [s]", "evaluation [s]"]
