"""Speed of Chapter 3's training steps: tokens/s, MFU and where a step's time goes (issue 16's budget).

A Table 1 unit at the paper's budget is 3,125 optimizer steps of 64 sequences. Its time is this
step's time: this script times the steps of each recipe (``--recipes``) as ``mtp_lib.train.train``
runs them (the unit's own loop: LoRA, heads, autocast, the per-head loss on target tokens), on
sequences whose lengths follow the training pairs' (the percentiles of the WEB + KJV pairs under
each model's tokenizer, measured on this repository's data, below), with random token ids: the
time of a step depends on the shapes, not on the tokens or weights. So ``--shape smollm2-135m``
(or gemma3-270m) needs no model files on the GPU machine; ``--model`` loads real weights.

Per recipe: the median seconds of ``--steps`` steps after ``--warmup`` (each step ends with the
loop's own host sync, the loss it logs), tokens/s (non-padding tokens, and the padded tokens the
step computes), MFU = 6 N tokens/s / peak bf16 FLOP/s (N: every parameter of the trained network,
as the units report it), and the time of the whole 3,125-step unit at that rate. ``--profile``
adds the top kernels of a few steps (torch.profiler) and the kernels' busy share of that time: a
low share means the step waits on the host (kernel launches, Python), not on the GPU.

    python benchmarks/train_step.py --shape smollm2-135m --profile --out train-step-smollm2.json
    python benchmarks/train_step.py --shape tiny-llama --device cpu --steps 2 --warmup 1   # smoke run

Since a step waits on the host, several units can share one GPU (``scripts/table1_paper_budget.py
--shard K/N`` in N processes). ``--processes N`` measures what that gives: the recipes timed in one
process, then in N processes at once, and the throughput of the N together over the one.

    python benchmarks/train_step.py --shape smollm2-135m --recipes vanilla_joint --processes 3 --out p3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtp_lib.cli import drop_options
from mtp_lib.tiny_models import SHAPES, TINY_MODELS, benchmark_model

# Sequence lengths of the paper-budget training pairs (58,381 WEB + KJV pairs, prompt + target) in
# each tokenizer: the 0th, 5th, ..., 100th percentiles, and the mean share of a sequence before its
# target (measured with mtp_lib.data.translation_samples(..., references=["web", "kjv"])).
LENGTHS: dict[str, tuple[list[int], float]] = {
    "smollm2-135m": ([25, 51, 57, 60, 64, 68, 71, 75, 79, 84, 88, 92, 97, 101, 107, 113, 119, 127, 138, 153, 301],
                     0.673),
    "gemma3-270m": ([22, 43, 48, 51, 54, 57, 60, 63, 66, 70, 73, 76, 80, 84, 88, 93, 99, 105, 114, 127, 236], 0.615),
}
UNIT_STEPS = 3125  # the paper's budget: one epoch of 200k pairs at 64 sequences a step
DEFAULT_RECIPES = ["heads_only", "vanilla_joint", "diff_lr_whs", "medusa", "ntp_baseline"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", default="smollm2-135m",
                     help=f"random weights in a known shape ({', '.join(SHAPES)}, {', '.join(TINY_MODELS)}) "
                          "or a config.json")
    src.add_argument("--model", help="real weights: an alias, hub id or folder (mtp_lib.models.load_model)")
    p.add_argument("--lengths", choices=sorted(LENGTHS),
                   help="whose pair lengths to draw (default: --shape's or --model's, else smollm2-135m's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="mtp_lib.train recipes")
    p.add_argument("--batch", type=int, default=64, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward pass")
    p.add_argument("--steps", type=int, default=20, help="timed steps per recipe")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing")
    p.add_argument("--variants", nargs="+", default=["eager"], choices=["eager", "compiled", "packed", "compiled-packed"],
                   help="compiled: each decoder layer compiled (train(compile=True)); its warm-up adds 3 steps "
                        "(the compile and the recompile for a dynamic length). packed: several sequences a row "
                        "(train(pack_rows=--pack-rows)) instead of one padded sequence a row")
    p.add_argument("--pack-rows", type=int, default=512, help="tokens per row of the packed variants")
    p.add_argument("--profile", action="store_true", help="top kernels of 3 steps per recipe (torch.profiler)")
    p.add_argument("--processes", type=int, default=1,
                   help="N > 1: run the recipes in one process, then in N processes at once on the same GPU "
                        "(a step waits on the host, so units can share a GPU): each one's step time and the "
                        "throughput of all N over one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from mtp_lib.train import RECIPES

    bad = [r for r in args.recipes if r not in RECIPES]
    if bad:
        p.error(f"--recipes: unknown {bad}; choose from {', '.join(sorted(RECIPES))}")
    if args.steps < 1 or args.warmup < 1 or args.batch % args.micro_batch:
        p.error("--steps and --warmup must be at least 1, and --batch a multiple of --micro-batch")
    if args.lengths is None:
        args.lengths = next((n for n in LENGTHS if n in (args.shape, args.model)), "smollm2-135m")
    return args


class Sample:
    """A training sequence: random ids, its target from ``target_start`` (mtp_lib.train's TrainSample)."""

    def __init__(self, input_ids: list[int], target_start: int) -> None:
        self.input_ids, self.target_start = input_ids, target_start


def samples(n: int, vocab: int, lengths: str, seed: int) -> list[Sample]:
    """``n`` sequences whose lengths are drawn from ``LENGTHS[lengths]`` (inverse CDF between percentiles)."""
    rng = np.random.default_rng(seed)
    cuts, prompt_share = LENGTHS[lengths]
    sizes = np.interp(rng.uniform(0, 100, n), np.arange(0, 101, 5), cuts).round().astype(int)
    return [Sample(rng.integers(1, vocab, int(t)).tolist(), max(1, min(int(t) - 1, round(prompt_share * int(t)))))
            for t in sizes]


class Clock:
    """A train() callback: the time at which each optimizer step's loss reached the host, and the
    profiler started and stopped around steps ``warmup + 1 .. warmup + 3`` when given one."""

    def __init__(self, warmup: int, profiler: Any = None) -> None:
        self.times: list[float] = []
        self.warmup, self.profiler = warmup, profiler

    def __call__(self, entry: dict[str, Any]) -> None:
        if "loss" not in entry:
            return
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == self.warmup:
            self.profiler.start()
        if self.profiler is not None and len(self.times) == self.warmup + 3:
            self.profiler.stop()


def time_recipe(model: Any, name: str, data: list[Sample], args: argparse.Namespace, device: torch.device,
                profile: bool, variant: str = "eager") -> dict[str, Any]:
    """Train ``name`` for warm-up + timed steps and read the step times off the callback."""
    from mtp_lib.budget_train import _accelerator  # the units' one accelerator per process
    from mtp_lib.results import device_name, mfu
    from mtp_lib.train import recipe, train
    from mtp_lib.train.batches import make_batch
    from mtp_lib.train.steps import batch_order

    compiled, pack_rows = "compiled" in variant, args.pack_rows if "packed" in variant else 0

    warmup = args.warmup + (3 if compiled else 0)
    n_steps = warmup + (3 if profile else args.steps)
    config = recipe(name, seed=args.seed, effective_batch_size=args.batch, micro_batch_size=args.micro_batch,
                    max_steps=n_steps, eval_every=0, checkpoint_every=0, head_warmup_epochs=0)
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as make_profiler

        profiler = make_profiler(activities=[ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []))
    clock = Clock(warmup, profiler)
    used = data[:n_steps * args.batch]  # one epoch of n_steps steps
    result = train(model, used, config, progress=False, callback=clock, accelerator=_accelerator(device),
                   compile=compiled, pack_rows=pack_rows)
    if profiler is not None:
        return {"recipe": name, "profile": kernel_lines(profiler)}
    secs = np.diff(clock.times)[warmup - 1:]  # step warmup+1 .. : each from the previous step's end
    order = batch_order(config.seed, 0, 0, len(used)).tolist()  # the loop's own batches (one phase, one epoch)
    per_step = [[used[j] for j in order[i * args.batch:(i + 1) * args.batch]] for i in range(warmup, n_steps)]
    tokens = statistics.mean(sum(len(s.input_ids) for s in b) for b in per_step)
    micro = [[b[i:i + args.micro_batch] for i in range(0, len(b), args.micro_batch)] for b in per_step]
    padded = statistics.mean(sum(make_batch(m, 1, pack_rows).input_ids.numel() for m in ms) for ms in micro)
    step_s = float(np.median(secs))
    n_params = sum(p.numel() for p in result.model.parameters())
    rate = tokens / step_s
    return {"recipe": name, "variant": variant, "steps": len(secs),
            "step_s": round(step_s, 5),
            "step_s_iqr": [round(float(q), 5) for q in np.percentile(secs, [25, 75])],
            "tokens_per_step": round(tokens, 1), "padded_tokens_per_step": round(padded, 1),
            "tokens_per_s": round(rate, 1), "params": n_params,
            "mfu": mfu(n_params, rate, device_name(device)) if device.type == "cuda" else None,
            "unit_minutes": round(UNIT_STEPS * step_s / 60, 2)}


def kernel_lines(profiler: Any) -> list[str]:
    """The top device kernels of the profiled steps and their busy share of the kernels' span."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from marginal import step_kernels  # benchmarks/marginal.py: the kernels of a chrome trace

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        return step_kernels(json.loads(trace.read_text()), 3, top=15)


def child_argv(argv: list[str], out: Path) -> list[str]:
    """``argv`` for one of the concurrent processes: no --processes, --profile or --out of its own."""
    return drop_options(argv, valued=("--processes", "--out"), flags=("--profile",)) + ["--out", str(out)]


def run_processes(argv: list[str], n: int) -> list[dict[str, Any]]:
    """Run this script in ``n`` processes at once (the same arguments); each one's result."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"p{i}.json" for i in range(n)]
        procs = [subprocess.Popen([sys.executable, __file__, *child_argv(argv, out)]) for out in outs]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit(f"one of the {n} concurrent processes failed (its output is above)")
        return [json.loads(out.read_text()) for out in outs]


def concurrency_rows(argv: list[str], n: int) -> list[dict[str, Any]]:
    """Per recipe and variant: step time and tokens/s of one process alone, then of each of ``n`` at once,
    and the throughput of the ``n`` together over the one (same inputs, same device, one run)."""
    solo = run_processes(argv, 1)[0]["rows"]
    together = [r["rows"] for r in run_processes(argv, n)]
    out = []
    for i, row in enumerate(solo):
        mine = [rows[i] for rows in together]
        total = sum(r["tokens_per_s"] for r in mine)
        out.append({"recipe": row["recipe"], "variant": row["variant"], "processes": n, "step_s_one": row["step_s"],
                    "step_s_each": [r["step_s"] for r in mine], "tokens_per_s_one": row["tokens_per_s"],
                    "tokens_per_s_together": round(total, 1),
                    "throughput_vs_one": round(total / row["tokens_per_s"], 3)})
        each = ", ".join(f"{1e3 * r['step_s']:.1f}" for r in mine)
        print(f"{row['recipe']:<20} {row['variant']:<9} one process {row['step_s'] * 1e3:.1f} ms/step; {n} at once "
              f"{each} ms/step: throughput x{out[-1]['throughput_vs_one']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mtp_lib.models import resolve_device
    from mtp_lib.results import device_name, provenance, to_jsonable

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.processes > 1:
        t0 = time.perf_counter()
        rows = concurrency_rows(argv, args.processes)
        device = resolve_device(args.device)
        result = {"benchmark": "train_step_processes", "settings": {k: str(v) if isinstance(v, Path) else v
                                                                       for k, v in vars(args).items() if k != "out"},
                  "provenance": provenance(device=device, wall_time_s=time.perf_counter() - t0), "rows": rows}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(to_jsonable(result), indent=1))
        return result
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = benchmark_model(args.model, args.shape, device, dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    n = (args.warmup + 3 + max(args.steps, 3)) * args.batch
    data = samples(n, vocab, args.lengths, args.seed)
    print(f"{args.model or args.shape} on {device_name(device)} ({dtype}): {args.batch} sequences a step "
          f"({args.micro_batch} a pass), lengths of {args.lengths}'s pairs", flush=True)
    rows, profiles = [], {}
    for name in args.recipes:
        for variant in args.variants:
            row = time_recipe(model, name, data, args, device, profile=False, variant=variant)
            rows.append(row)
            print(f"{name:<20} {variant:<9} {row['step_s'] * 1e3:8.1f} ms/step  {row['tokens_per_s']:>10,.0f} tok/s  "
                  f"MFU {row['mfu']}  unit {row['unit_minutes']:.1f} min", flush=True)
            if args.profile:
                key = f"{name}/{variant}"
                profiles[key] = time_recipe(model, name, data, args, device, profile=True, variant=variant)["profile"]
                print("\n".join(profiles[key][:8]), flush=True)
    result = {"benchmark": "train_step", "provenance": provenance(device=device, wall_time_s=time.perf_counter() - t0),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
              "dtype": str(dtype).removeprefix("torch."), "unit_steps": UNIT_STEPS, "rows": rows, "profiles": profiles}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_jsonable(result), indent=1))
        print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()
