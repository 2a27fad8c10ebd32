"""Figures and tables of chapter 4 (mtp_lib.plots.decode) on fresh random synthetic benchmark records.

Each test draws its data from a fresh seed (printed in the messages; `MTP_TEST_SEED` replays it). The tables
are compared with loops written out here (per step, per prompt); the figures are checked by what
they draw: one bar per model, task and method at its value, the baselines as reference lines and
not as bars, one line per method in each model x task panel, one point per method at (cost, tokens
per pass) with its perfect-draft ceiling, lines of equal speedup through the origin.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mtp_lib.plots import decode as P  # noqa: E402
from seeds import fresh_seed  # noqa: E402

TASKS = ["translation", "open-ended"]


def artists_by_gid(fig) -> dict[str, object]:
    out = {}
    for ax in fig.axes:
        for a in [*ax.patches, *ax.get_lines()]:
            if a.get_gid():
                out[a.get_gid()] = a
    return out


def synthetic_records(rng: np.random.Generator) -> tuple[list[dict], list[str], list[str]]:
    """Benchmark-like per-prompt records: baselines, spec rows with random acceptance, an untimed oracle."""
    models = [f"model-{i}" for i in range(int(rng.integers(1, 3)))]
    methods = ["generate", "prompt_lookup", "greedy_graph"] + [
        f"spec{n}_{kind}" for n in sorted(set(rng.choice([2, 3, 4, 5], size=2).tolist())) for kind in ("chain", "tree")]
    records = []
    for model in models:
        for task in TASKS:
            for p in range(int(rng.integers(1, 4))):
                for method in [*methods, "oracle2"]:
                    n = P.method_heads(method) or (4 if method == "prompt_lookup" else 1)
                    steps = [1] + rng.integers(1, n + 1, size=int(rng.integers(0, 12))).tolist()
                    records.append({"model": model, "task": task, "prompt": f"{task}-{p}", "method": method,
                                    "timed": method != "oracle2", "accepted_lengths": steps,
                                    "new_tokens": int(sum(steps)), "n_forward": len(steps),
                                    "seconds": float(rng.uniform(0.01, 2.0))})
    return records, models, methods


# --------------------------------------------------------------------------------------------------
# Tables


def test_method_heads_reads_the_head_count_from_the_name() -> None:
    assert P.method_heads("spec4_tree") == 4 and P.method_heads("spec2_chain") == 2
    assert P.method_heads("oracle2") == 2 and P.method_heads("spec12_chain") == 12
    assert P.method_heads("spec4_pld") == 4 and P.method_heads("spec2_dyn") == 2
    assert P.method_heads("generate") is None and P.method_heads("prompt_lookup") is None
    assert P.method_heads("spec4_fancy") is None


def test_step_acceptance_equals_counting_steps_one_by_one() -> None:
    seed = fresh_seed()
    records, _, _ = synthetic_records(np.random.default_rng(seed))
    got = P.step_acceptance(records)
    expected = {}
    for r in records:
        n = P.method_heads(r["method"])
        if n is None:
            continue
        for head in range(2, n + 1):
            key = (r["model"], r["task"], r["method"], head)
            hit, total = expected.get(key, (0, 0))
            for a in r["accepted_lengths"][1:]:  # the prompt's pass is not a verification step
                hit, total = hit + (a >= head), total + 1
            expected[key] = (hit, total)
    assert len(got) == len(expected), f"seed {seed}: {len(got)} rows, expected {len(expected)}"
    assert not set(got["method"]) & {"generate", "greedy_graph", "prompt_lookup"}, seed
    for _, row in got.iterrows():
        hit, total = expected[row["model"], row["task"], row["method"], row["head"]]
        assert row["steps"] == total, f"seed {seed}: {row.to_dict()}"
        if total:
            assert math.isclose(row["share"], hit / total), f"seed {seed}: {row.to_dict()} vs {hit}/{total}"
        else:
            assert math.isnan(row["share"]), seed


def test_pass_costs_equal_totals_per_prompt_set_and_speedup_is_the_tokens_per_second_ratio() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    records, _, methods = synthetic_records(rng)
    depths = {m: int(rng.integers(1, 6)) for m in methods if m.startswith("spec")}
    got = P.pass_costs(records, depths=depths)
    assert "oracle2" not in set(got["method"]), f"seed {seed}: an untimed method was costed"
    for _, row in got.iterrows():
        key = (row["model"], row["task"])
        mine = [r for r in records if (r["model"], r["task"]) == key and r["method"] == row["method"]]
        base = [r for r in records if (r["model"], r["task"]) == key and r["method"] == "greedy_graph"]
        tok, fwd, sec = (sum(r[k] for r in mine) for k in ("new_tokens", "n_forward", "seconds"))
        btok, bfwd, bsec = (sum(r[k] for r in base) for k in ("new_tokens", "n_forward", "seconds"))
        assert math.isclose(row["tokens_per_pass"], tok / fwd), seed
        assert math.isclose(row["ms_per_pass"], 1000 * sec / fwd), seed
        assert math.isclose(row["cost"], (sec / fwd) / (bsec / bfwd)), seed
        assert math.isclose(row["speedup"], (tok / sec) / (btok / bsec)), f"seed {seed}: {row.to_dict()}"
        if row["method"] in depths:
            assert row["max_tokens_per_pass"] == depths[row["method"]] + 1, seed
        else:
            assert math.isnan(row["max_tokens_per_pass"]), seed
    assert set(got[got["method"] == "greedy_graph"]["cost"]) <= {1.0}, seed


def test_pass_costs_skip_methods_whose_prompts_the_baseline_did_not_run() -> None:
    rec = dict(task="translation", model="m", accepted_lengths=[1, 2], new_tokens=3, n_forward=2, seconds=1.0)
    records = [{**rec, "prompt": "a", "method": "greedy_graph"}, {**rec, "prompt": "a", "method": "spec2_chain"},
               {**rec, "prompt": "b", "method": "spec2_chain"}]
    assert list(P.pass_costs(records)["method"]) == ["greedy_graph"]
    with pytest.raises(ValueError, match="seconds"):
        P.pass_costs([{"task": "t", "method": "m", "accepted_lengths": [1]}])


# --------------------------------------------------------------------------------------------------
# Figures


def synthetic_rows(rng: np.random.Generator, models: list[str], methods: list[str]) -> pd.DataFrame:
    rows = []
    for model in models:
        for task in TASKS:
            for method in [*methods, "oracle2"]:
                speed = 1.0 if method == "greedy_graph" else float(rng.uniform(0.05, 3))
                rows.append({"model": model, "task": task, "method": method, "tau": float(rng.uniform(1, 4)),
                             "speedup_vs_greedy_graph": float("nan") if method == "oracle2" else speed})
    return pd.DataFrame(rows)


def test_speed_bars_one_bar_per_model_task_and_method_baselines_as_lines() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    _, models, methods = synthetic_records(rng)
    rows = synthetic_rows(rng, models, methods)
    fig = P.speed_bars(rows, title="t")
    drawn = artists_by_gid(fig)
    assert len(fig.axes) == 2 * len(TASKS), seed
    for _, r in rows.iterrows():
        for metric in ("speedup_vs_greedy_graph", "tau"):
            gid = f"bar|{metric}|{r['model']}|{r['task']}|{r['method']}"
            if r["method"] in P.BASELINES or (metric != "tau" and np.isnan(r[metric])):
                assert gid not in drawn, f"seed {seed}: {gid} drawn"
            else:
                assert math.isclose(drawn[gid].get_height(), r[metric]), f"seed {seed}: {gid}"
        if r["method"] == "generate":
            line = drawn[f"ref|generate|{r['model']}|{r['task']}"]
            assert np.allclose(line.get_ydata(), r["speedup_vs_greedy_graph"]), seed
    for task in TASKS:
        assert np.allclose(drawn[f"ref|greedy_graph|{task}"].get_ydata(), 1.0), seed
        assert np.allclose(drawn[f"ref|one_token|{task}"].get_ydata(), 1.0), seed
    n_bars = sum(1 for g in drawn if g.startswith("bar|"))
    n_timed = len(models) * len(TASKS) * (len(methods) - len(P.BASELINES))
    assert n_bars == 2 * n_timed + len(models) * len(TASKS), f"seed {seed}: {n_bars} bars"  # the oracle: tau only
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("not timed") == len(models) * len(TASKS), seed
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert set(models) <= set(labels) and any("greedy_graph" in lab for lab in labels), labels
    assert all(f"generate ({m})" in labels for m in models), labels
    assert [ax.get_title() for ax in fig.axes[: len(TASKS)]] == TASKS


def test_speed_bars_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        P.speed_bars(pd.DataFrame({"model": ["m"], "task": ["t"], "method": ["spec2_chain"]}))
    only = pd.DataFrame({"model": ["m"] * 2, "task": ["t"] * 2, "method": list(P.BASELINES), "tau": [1.0, 1.0],
                         "speedup_vs_greedy_graph": [1.0, 1.0]})
    with pytest.raises(ValueError, match="only the baselines"):
        P.speed_bars(only)
    with pytest.raises(ValueError, match="DataFrame"):
        P.speed_bars([{"model": "m"}])


def test_head_acceptance_one_line_per_method_in_each_model_and_task_panel() -> None:
    seed = fresh_seed()
    records, models, _ = synthetic_records(np.random.default_rng(seed))
    acc = P.step_acceptance(records)
    fig = P.head_acceptance(acc)
    assert len(fig.axes) == len(models) * len(TASKS), seed
    drawn = artists_by_gid(fig)
    groups = acc.groupby(["model", "task", "method"], sort=False)
    assert sum(1 for g in drawn if g.startswith("acc|")) == groups.ngroups, seed
    for (model, task, method), part in groups:
        line = drawn[f"acc|{model}|{task}|{method}"]
        part = part.sort_values("head")
        x = np.asarray(line.get_xdata(), dtype=float)
        assert np.array_equal(np.round(x), part["head"].to_numpy()) and np.all(np.abs(x - np.round(x)) < 0.3), seed
        assert np.allclose(line.get_ydata(), part["share"], equal_nan=True), f"seed {seed}: {model} {task} {method}"
    titles = {ax.get_title() for ax in fig.axes}
    assert titles == {f"{m}, {t}" for m in models for t in TASKS}, titles


def test_step_cost_points_ceilings_and_lines_of_equal_speedup() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    records, _, methods = synthetic_records(rng)
    depths = {m: int(rng.integers(1, 5)) for m in methods if m.startswith("spec")}
    costs = P.pass_costs(records, depths=depths)
    speedups = sorted(set(np.round(rng.uniform(0.2, 4, size=3), 2).tolist()))
    fig = P.step_cost(costs, speedups=speedups)
    assert len(fig.axes) == len(TASKS), seed
    drawn = artists_by_gid(fig)
    for _, r in costs.iterrows():
        pt = drawn[f"pt|{r['model']}|{r['task']}|{r['method']}"]
        assert np.allclose([pt.get_xdata()[0], pt.get_ydata()[0]], [r["cost"], r["tokens_per_pass"]]), seed
        ceil = f"ceil|{r['model']}|{r['task']}|{r['method']}"
        if r["method"] in depths:
            assert np.isclose(drawn[ceil].get_ydata()[0], depths[r["method"]] + 1), seed
            assert np.isclose(drawn[ceil].get_xdata()[0], r["cost"]), seed
        else:
            assert ceil not in drawn, f"seed {seed}: {ceil} drawn without a depth"
    for ax in fig.axes:
        iso = {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith("iso|")}
        assert set(iso) == {f"iso|{s:g}" for s in speedups}, seed
        for s in speedups:
            x, y = np.asarray(iso[f"iso|{s:g}"].get_xdata()), np.asarray(iso[f"iso|{s:g}"].get_ydata())
            assert np.allclose(y, s * x), f"seed {seed}: the {s}x line is not y = {s} x"
        assert "greedy_graph" in ax.get_xlabel()
