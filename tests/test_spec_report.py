"""Chapter 4's runs, tables and browser (mtp_lib.spec_runs, spec_report, token_browser).

Tables are checked on fresh random benchmark records against plain counts; the cache keys of the
chapter's results are checked against the committed cpu and gpu results, and the identity counts
against the committed benchmarks' own summary rows.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest

from mtp_lib import spec_report as S
from mtp_lib.book import load_profile
from mtp_lib.results import config_key, repo_root
from mtp_lib.spec_runs import VERSIONS, SpecSetup, load_runs
from mtp_lib.token_browser import chosen_prompts, steps_html
from mtp_lib.whs_report import notebook_parameters
from seeds import fresh_seed

CHAPTER = repo_root() / "chapters" / "04_speculative_decoding.ipynb"
FIELDS = ["models", "benchmark_glob", "tasks", "n_prompts", "max_new_tokens", "open_prompt_tokens", "methods",
          "head_counts", "train_prompts", "distill_tokens", "epochs", "lr", "head_init", "batch", "tree_nodes",
          "calib_prompts", "oracle_prompts", "oracle_top_p", "prompt_lookup", "repeats", "threads", "seed", "dtype",
          "device", "profile", "recompute"]


def chapter_setup(profile: str) -> SpecSetup:
    values = notebook_parameters(CHAPTER)
    prof = load_profile(profile)
    values.update({k: v for k, v in prof.parameters.items() if k in values})
    values.update(prof.chapters["04_speculative_decoding"], profile=profile, device="cpu")
    return SpecSetup(**{k: values[k] for k in FIELDS})


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_chapter_loads_the_committed_results(profile: str) -> None:
    setup = chapter_setup(profile)
    runs, notes = load_runs(setup)  # the cpu profile would run the benchmark (minutes) if a key had changed
    assert runs and all(r["loaded"] for r in runs.values()), notes
    assert {r["result"]["model"]["name"] for r in runs.values()} == set(setup.models)
    widget_prompts = load_profile(profile).chapters["04_speculative_decoding"]["widget_prompts"]
    for name, run in runs.items():
        key = config_key({"model": name, "run": run["key"], "prompts": chosen_prompts(run, widget_prompts)},
                         VERSIONS["ch04-text"])
        assert (repo_root() / "data" / "results" / profile / f"ch04-text-{key}.json").is_file(), name


def test_measured_cache_key_is_the_benchmark_command_line() -> None:
    setup = chapter_setup("cpu")
    for name in setup.models:
        config = {"model": name, "dtype": "float32", "device": "cpu", "benchmark": setup.benchmark_argv(name)}
        path = repo_root() / "data" / "results" / "cpu" / f"ch04-benchmark-{config_key(config, 1)}.json"
        assert path.is_file(), f"{name}: the benchmark's cache key changed"


def test_identity_counts_match_the_committed_benchmarks_summaries() -> None:
    runs, _ = load_runs(chapter_setup("gpu"))
    bench = S.collect(runs)
    shares = S.identity_shares(bench.records).set_index(["model", "method", "task"])
    for _, row in bench.summary.iterrows():
        got = shares.loc[(row["model"], row["method"], row["task"])]
        assert got["prompts"] == row["prompts"]
        assert np.isclose(got["identical"] / got["prompts"], row["identical_to_greedy"])


def fake_run(rng: np.random.Generator, dtype: str = "bfloat16", n_prompts: int = 3, all_same: bool = False) -> dict:
    methods = ["generate", "greedy_graph", "spec2_chain", "spec4_tree"]
    records = []
    for task in ("translation", "open-ended"):
        for p in range(n_prompts):
            for m in methods:
                lengths = [1] + list(rng.integers(1, 4 if m == "spec4_tree" else 3, 5)) if m.startswith("spec") else [1] * 6
                same = all_same or m in ("generate", "greedy_graph") or bool(rng.random() < 0.5)
                records.append({"task": task, "prompt": f"p{p}", "method": m, "timed": True,
                                "new_tokens": int(sum(lengths)), "n_forward": len(lengths),
                                "seconds": float(rng.uniform(0.5, 2)), "accepted_lengths": lengths,
                                "new_token_ids": list(range(int(sum(lengths)))), "identical_to_greedy": same,
                                "first_difference_to_greedy": None if same else 3})
    rows = []
    for task in ("translation", "open-ended", "all"):
        for m in methods:
            rows.append({"task": task, "method": m, "prompts": n_prompts, "timed": True,
                         "tau": float(rng.uniform(1, 3)), "speedup_vs_greedy_graph": float(rng.uniform(0.5, 2)),
                         "speedup_vs_generate": float(rng.uniform(1, 12)), "tokens_per_s": 100.0,
                         "identical_to_greedy": 1.0, "identical_to_generate": 1.0})
    return {"result": {"per_prompt": records, "rows": rows, "trees": {"spec4_tree": [[0], [0, 1], [0, 1, 2]]},
                       "cuda_graphs": True, "dtype": dtype, "provenance": {"device": "NVIDIA H100"},
                       "rank_acceptance": {}}, "source": "x.json", "key": "k", "loaded": True}


def test_speed_table_counts_identical_outputs_per_row_and_task() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    runs = {"m bfloat16": fake_run(rng), "m float32": fake_run(rng, "float32", all_same=True)}
    bench = S.collect(runs)
    assert bench.depths["m bfloat16", "spec2_chain"] == 1 and bench.depths["m bfloat16", "spec4_tree"] == 3
    table = S.speed_table(bench)
    records = pd.DataFrame(bench.records)
    for (model, method), row in table.iterrows():
        for task, short in (("translation", "transl."), ("open-ended", "open"), ("all", "all")):
            part = records[(records["model"] == model) & (records["method"] == method)]
            part = part if task == "all" else part[part["task"] == task]
            k, n = int(part["identical_to_greedy"].sum()), len(part)
            assert row["same as greedy", short] == f"{k}/{n} ({k / n:.0%})", f"seed {seed}: {model} {method} {task}"


def test_identity_note_says_lossless_only_when_every_output_equals_greedy() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    mixed = fake_run(rng)
    mixed["result"]["per_prompt"][2]["identical_to_greedy"] = False  # at least one output differs
    mixed["result"]["per_prompt"][2]["first_difference_to_greedy"] = 3
    runs = {"a bfloat16": mixed, "b float32": fake_run(rng, "float32", all_same=True)}
    note = S.identity_note(S.collect(runs))
    line_a, line_b = [line for line in note.splitlines() if line.startswith("- ")]
    n_diff = sum(not r["identical_to_greedy"] for r in mixed["result"]["per_prompt"] if r["method"] != "greedy_graph")
    assert "not lossless" in line_a and f"{n_diff} of 18 outputs differ" in line_a, seed
    assert "lossless on these prompts" in line_b and "not lossless" not in line_b


def test_goal_table_compares_the_best_bit_exact_row_with_each_threshold() -> None:
    """Each goal reads the best speculative row among those identical to greedy on every prompt of the
    task (none: missed), over the fastest greedy row where the run names it, else over greedy_graph."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    old, new = fake_run(rng), fake_run(rng)
    for run in (old, new):
        for row in run["result"]["rows"]:
            row["identical_to_greedy"] = float(rng.choice([1.0, 1.0, 0.5]))
    for row in new["result"]["rows"]:
        row["fastest_greedy"], row["speedup_vs_fastest_greedy"] = "generate_compiled", float(rng.uniform(0.5, 3))
    runs = {"old": old, "new": new}
    bench = S.collect(runs)
    goals = S.goal_table(bench).set_index(["model", "goal"])
    for name, column in (("old", "speedup_vs_greedy_graph"), ("new", "speedup_vs_fastest_greedy")):
        for task, tau, speed in S.GOALS:
            s = bench.summary
            spec = s[(s["model"] == name) & (s["task"] == task) & s["method"].str.startswith("spec")]
            exact = spec[spec["identical_to_greedy"] == 1]
            for goal, key, threshold in ((f"{task}: tau >= {tau}", "tau", tau),
                                         (f"{task}: >= {speed}x the fastest greedy row", column, speed)):
                got = goals.loc[(name, goal)]
                if exact.empty:
                    assert got["row"] == "no bit-exact row" and got["verdict"] == "missed", f"seed {seed}"
                    continue
                best = exact[key].max()
                assert got["measured"] == f"{best:.2f}" and got["met"] == (best >= threshold), f"{name} {goal} {seed}"
        against = goals.loc[(name, f"translation: >= 2.0x the fastest greedy row"), "against"]
        assert ("generate_compiled" in against) == (name == "new"), against
        worst = bench.summary[(bench.summary["model"] == name) & bench.summary["method"].str.startswith("spec")
                              & (bench.summary["task"] != "all")]["identical_to_greedy"].min()
        assert goals.loc[(name, "every speculative output identical to greedy"), "met"] == (worst == 1), seed
    assert set(goals["verdict"]) <= {"met", "missed", "not measured"}
    assert re.search(r"meets \d of 5 goals", S.goals_note(goals.reset_index(), runs))


def test_steps_html_marks_one_bar_per_pass_and_highlights_the_drafts() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    lengths = [1] + rng.integers(1, 5, int(rng.integers(1, 10))).tolist()
    ids = list(range(sum(lengths)))
    html = steps_html(ids, lengths, {str(i): f"<{i}>" for i in ids})
    assert html.count("color:#bbb'>|</span>") == len(lengths), seed
    assert html.count("background:#b9e3b9") == sum(a > 1 for a in lengths), seed
    assert "&lt;0&gt;" in html and "<0>" not in html  # token text is escaped
    with pytest.raises(ValueError, match="accepted lengths"):
        steps_html(ids[:-1], lengths, {str(i): "x" for i in ids})


def test_invariance_table_reads_the_stored_runs(tmp_path, monkeypatch) -> None:
    import json

    from mtp_lib import spec_report as spec

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    (tmp_path / "p").mkdir()
    run = {"settings": {"model": "m", "dtype": "bf16", "chain": 4, "tree": [2, 2]},
           "trees": {"chain": [[0], [0, 0], [0, 0, 0]], "tree": [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]},
           "provenance": {"device": "GPU"},
           "summary": {"plain/chain": {"nodes": 8, "exact": 0.5, "max_abs_diff": 0.1},
                       "invariant/tree": {"nodes": 8, "exact": 1.0, "max_abs_diff": 0.0}}}
    (tmp_path / "p" / "benchmark-invariance-m.json").write_text(json.dumps(run))
    table = spec.invariance_table("p")
    assert list(table.index) == [("m", "plain", "chain of 4"), ("m", "invariant", "tree 2x2 (7 nodes)")]
    assert table["bit-identical"].tolist() == [0.5, 1.0]
    assert spec.invariance_table("q").empty


def test_stored_runs_skip_a_run_cut_short(tmp_path, monkeypatch) -> None:
    """A benchmark file written by a run that did not finish (``complete`` false) is named in the notes
    and not shown; the complete run of the same model is."""
    import json

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    (tmp_path / "p").mkdir()
    setup = dataclasses.replace(chapter_setup("gpu"), profile="p", models=["m"])
    for name, complete, date in (("a", None, "2026-01-01"), ("b", False, "2026-02-01")):
        run = {"benchmark": "speculative", "model": {"name": "m"}, "dtype": "bfloat16",
               "provenance": {"date": date}, "per_prompt": [{"task": "t", "prompt": "p1"}, {"task": "t", "prompt": "p1"}]}
        if complete is not None:
            run["complete"] = complete
        (tmp_path / "p" / f"benchmark-speculative-{name}.json").write_text(json.dumps(run))
    runs, notes = load_runs(setup)
    assert [r["source"] for r in runs.values()] == ["benchmark-speculative-a.json"]
    assert any("benchmark-speculative-b.json" in n and "1 prompts done" in n for n in notes), notes
    setup = dataclasses.replace(setup, models=["m", "other"])  # a model without a file: the invariant command
    _, notes = load_runs(setup)
    assert any("`other`" in n and "--model other --invariant" in n for n in notes), notes


def test_oracle_pairs_compare_top1_drafts_on_the_oracle_prompts_only() -> None:
    """Fresh random accepted lengths: the shares equal a brute-force count over the oracle's prompts
    (a row's other prompts and its tree rows left out), and the note says when prompts are too few."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    records = []
    for method, prompts in (("oracle2", range(6)), ("spec2_chain", range(9)), ("spec2_tree", range(9))):
        for p in prompts:
            records.append({"model": "m", "task": "translation", "method": method, "prompt": p,
                            "accepted_lengths": [1, *rng.integers(1, 3, size=rng.integers(1, 12)).tolist()]})
    pairs = S.oracle_pairs(records, n_boot=500, seed=seed)
    assert list(pairs["row"]) == ["spec2_chain"], seed  # top-1 rows only

    def share(method: str) -> float:
        steps = [a for r in records if r["method"] == method and r["prompt"] < 6 for a in r["accepted_lengths"][1:]]
        return sum(a >= 2 for a in steps) / len(steps)

    row = pairs.iloc[0]
    assert row["prompts"] == 6 and np.isclose(row["row_share"], share("spec2_chain")), seed
    assert np.isclose(row["oracle_share"], share("oracle2")) and row["low"] <= row["difference"] <= row["high"], seed
    acceptance = pd.DataFrame([{"model": "m", "task": "translation", "method": "spec2_tree", "head": 2, "share": 0.9},
                               {"model": "m", "task": "translation", "method": "oracle2", "head": 2, "share": 0.8}])
    assert "95% interval over prompts" in S.acceptance_note(acceptance, {"m": {}}, records)
    few = [r for r in records if r["prompt"] < 2]
    assert "too few prompts for an interval" in S.acceptance_note(acceptance, {"m": {}}, few)
    assert S.oracle_pairs([r for r in records if r["method"] != "oracle2"]).empty
