"""Speed of mtp_lib.marginal.marginalize against the naive method, and against the FLOP floor.

Rows, on the same model, text and positions in one run:

  marginalize   mtp_lib.marginal.marginalize: the sample once with a KV cache, then every nucleus
                candidate of every position as one token of packed tree steps on that cache
                (one row per --configs entry: max_tokens_per_chunk x tokens_per_row, and per
                --attention value: packed rows on copies of the cache, or flex, one sequence per
                step with block-sparse FlexAttention; with --compile each again compiled)
  naive         for each position, one forward pass of the context for p(x_{t+1}), then one full
                forward pass of context + candidate per candidate (batch 1, no cache,
                ``logits_to_keep=1``), log-softmax and a weighted log-sum-exp into the marginal.
                With ``--naive-candidates K`` (default) only the K most probable candidates of each
                position are timed and the time per candidate is extrapolated to the whole nucleus
                (the output says so); when K covers a nucleus, that position is run whole and its
                marginal compared with marginalize's.

The FLOP floor: the FLOPs of the candidate steps alone (2 x parameters in the decoder layers'
matmuls per candidate token, attention of each candidate over its context and itself, the
unembedding 2 x d x V per candidate) divided by the device's matmul rate, measured on a large GEMM
in the model's dtype. ``ratio_to_floor`` = marginalize time / floor time (total, context pass
included) and ``candidates_ratio_to_floor`` the same without the context pass (marginalize's own,
timed alone; compiled for the compiled rows).

    python benchmarks/marginal.py --quick                                   # CPU, under a minute
    python benchmarks/marginal.py --device cuda --model smollm2-135m --dtype bfloat16 --out smol.json
    python benchmarks/marginal.py --device cuda --model gemma3-270m --dtype bfloat16 --out gemma.json
    python benchmarks/marginal.py --device cuda --attention packed,flex --compile --configs 65536x1024

Text: Brown Corpus passages from ``data/open_ended`` (mtp_lib.data), joined until ``--context``
tokens. Positions: the last ``--positions`` context ends. The last line printed is
``speedup_vs_naive=<x>`` (naive time / best marginalize time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtp_lib import kernels
from mtp_lib import marginal as MG
from mtp_lib.marginal import MarginalResult, marginalize, nucleus
from mtp_lib.models import LoadedModel, load_model
from mtp_lib.results import provenance


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU run in under a minute (small context, 2 positions)")
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder (mtp_lib.models.load_model)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: auto; cpu with --quick)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--context", type=int, help="tokens of text (default 512; quick 48)")
    p.add_argument("--positions", type=int, help="context ends timed, the last ones (default 64; quick 2)")
    p.add_argument("--top-p", type=float, default=0.99)
    p.add_argument("--configs", help="max_tokens_per_chunk x tokens_per_row to time, comma separated "
                                     "(default: 1024x128 on CPU; 16384x256,8192x128,32768x512 on GPU)")
    p.add_argument("--attention", default="packed",
                   help="marginalize(attention=...) values to time, comma separated: packed, flex "
                        "(flex ignores tokens_per_row: one row per step)")
    p.add_argument("--reduce", default="fused",
                   help="the reduction of bf16 logits on a GPU, comma separated: fused (mtp_lib.kernels, Triton) "
                        "and/or plain (softmax, then a matmul); elsewhere it is plain either way")
    p.add_argument("--merge", default="fused",
                   help="the tree part of the flex rows on a GPU, comma separated: fused (mtp_lib.kernels.tree_merge, "
                        "Triton; the library's default) and/or plain (elementwise products, fused by torch.compile)")
    p.add_argument("--flex-options", default="default",
                   help="FlexAttention kernel_options of the flex rows, semicolon separated: default (torch's) "
                        "or a JSON object, e.g. 'default;{\"BLOCK_M\": 64, \"BLOCK_N\": 64, \"num_warps\": 4}' "
                        "(GPU; each is compiled anew)")
    p.add_argument("--compile", action="store_true",
                   help="also time each config with marginalize(compile=True) (torch.compile of the candidate steps)")
    p.add_argument("--max-logits-elements", type=int, help="marginalize's logits block (default: its own)")
    p.add_argument("--naive-candidates", type=int, help="naive: candidates timed per position, then "
                                                        "extrapolated (default 16; quick 4); 0 = all")
    p.add_argument("--repeats", type=int, help="timed runs of marginalize per config, median (default 3; quick 1)")
    p.add_argument("--warmup", type=int, help="untimed runs of each row before its timed ones (default 1 on a GPU, "
                                              "0 on the CPU): a setting timed after others in the same process was "
                                              "slower in its first runs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the table and settings as JSON here")
    p.add_argument("--profile", type=Path, help="also profile one run of the best config (torch.profiler) and "
                                                "write its tables (stages, then kernels) as text here")
    args = p.parse_args(argv)
    quick = args.quick
    args.device = args.device or ("cpu" if quick else "auto")
    args.context = args.context or (48 if quick else 512)
    args.positions = args.positions or (2 if quick else 64)
    args.naive_candidates = args.naive_candidates if args.naive_candidates is not None else (4 if quick else 16)
    args.repeats = args.repeats or (1 if quick else 3)
    return args


def _choices(flag: str, value: str, first: str, second: str) -> list[str]:
    """The comma-separated values of ``flag``, each one of the two allowed."""
    values = value.split(",")
    if set(values) - {first, second}:
        raise SystemExit(f"{flag} {value!r}: give {first}, {second} or both, comma separated")
    return values


def _flex_options(text: str) -> str | None:
    """One --flex-options entry: None for torch's defaults, else the JSON object, normalized."""
    text = text.strip()
    if text in ("", "default"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--flex-options entry {text!r} is not JSON ({err}): give default or an object such as "
                         '{"BLOCK_M": 64, "BLOCK_N": 64}') from None
    if not isinstance(value, dict):
        raise SystemExit(f"--flex-options entry {text!r} must be a JSON object (FlexAttention's kernel_options)")
    return json.dumps(value, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def matmul_rate(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """FLOP/s of a large square GEMM in ``dtype`` (8192 on GPU, 2048 on CPU), best of a few runs."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 2
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(3):
        dt, _ = _timed(lambda: [a @ b for _ in range(reps)], device)
        best = min(best, dt / reps)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": best, "flops_per_s": 2 * n**3 / best}


def profile(fn: Callable[[], Any], device: torch.device, path: Path, title: str) -> None:
    """Run ``fn`` once under torch.profiler; write the time per stage of marginalize (its
    ``marginal.*`` ranges) and the 40 operators that took the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        _timed(fn, device)
    idle: list[str] = []
    if device.type == "cuda":
        trace = path.with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace))
        events_json = json.loads(trace.read_text())
        idle = ["", *device_idle(events_json), "", *kernel_totals(events_json), ""]
        trace.unlink()
    events = prof.key_averages()
    stages = [e for e in events if e.key.startswith("marginal.")]
    lines = [f"# {title}", "", f"{'stage':<26} {'calls':>6} {'cpu ms':>10} {'device ms':>10}"]
    for e in sorted(stages, key=lambda e: e.key):
        lines.append(f"{e.key:<26} {e.count:>6} {e.cpu_time_total / 1e3:>10.1f} "
                     f"{getattr(e, 'device_time_total', 0.0) / 1e3:>10.1f}")
    lines += idle
    lines += ["", events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                               row_limit=40)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _device_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The device's kernels, copies and memsets in a chrome trace of torch.profiler."""
    return [e for e in trace.get("traceEvents", [])
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]


def kernel_totals(trace: dict[str, Any], top: int = 30) -> list[str]:
    """The ``top`` device kernels by total time, with their whole names (torch.profiler's table cuts
    them, and Inductor's fused kernels are told apart by the ends of their names)."""
    totals: dict[str, list[float]] = {}
    for e in _device_events(trace):
        totals.setdefault(e["name"], []).append(float(e["dur"]))
    rows = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]
    lines = [f"kernels by device time (top {top}): {'ms':>8} {'calls':>6} {'us/call':>8}  name"]
    lines += [f"{'':<30} {sum(d) / 1e3:>8.2f} {len(d):>6} {sum(d) / len(d):>8.1f}  {name}" for name, d in rows]
    return lines


def step_kernels(trace: dict[str, Any], steps: int, top: int = 20) -> list[str]:
    """:func:`kernel_totals` of ``steps`` profiled steps, headed by the kernels' busy share of their
    span (first kernel's start to last kernel's end): a low share means the device waited on the host."""
    lines = kernel_totals(trace, top=top)
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    if kernels:
        span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
        lines.insert(0, f"{steps} steps: kernels busy {sum(e['dur'] for e in kernels) / span:.1%} of "
                        f"{span / 1e3:.1f} ms ({span / 1e3 / steps:.1f} ms per step; {len(kernels)} kernels)")
    return lines


def device_idle(trace: dict[str, Any], min_gap_us: float = 50.0) -> list[str]:
    """Where the device waited, from a chrome trace of torch.profiler: the kernels' busy time against
    their span, and each gap of at least ``min_gap_us`` charged to the ``marginal.*`` range that was
    open on the host when the kernel after the gap was launched (the host was late there)."""
    events = trace.get("traceEvents", [])
    kernels = sorted(_device_events(trace), key=lambda e: e["ts"])
    if not kernels:
        return ["device idle: no kernels in the trace"]
    launches = {e["args"]["correlation"]: e["ts"] for e in events  # runtime launches, and Triton's by the driver
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "user_annotation" and e.get("name", "").startswith("marginal.")),
                    key=lambda r: r[0])
    busy, gaps, end = 0.0, [], kernels[0]["ts"]
    by_range: dict[str, list[float]] = {}
    for k in kernels:
        start, stop = k["ts"], k["ts"] + k["dur"]
        if start - end >= min_gap_us:
            launched = launches.get(k.get("args", {}).get("correlation"))
            where = "outside marginal.* ranges"
            if launched is not None:
                open_ranges = [r for r in ranges if r[0] <= launched <= r[1]]
                if open_ranges:
                    where = min(open_ranges, key=lambda r: r[1] - r[0])[2]
            gaps.append((start - end, where, k["name"][:60]))
            by_range.setdefault(where, []).append(start - end)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - kernels[0]["ts"]
    lines = [f"device busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span (first to last kernel); "
             f"gaps of {min_gap_us:.0f} us or more: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.2f} ms in all",
             f"{'host range when the next kernel was launched':<46} {'gaps':>6} {'ms':>8}"]
    for where, gs in sorted(by_range.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{where:<46} {len(gs):>6} {sum(gs) / 1e3:>8.2f}")
    lines.append("largest gaps (ms, host range, next kernel):")
    lines += [f"  {g / 1e3:7.2f}  {w:<26} {name}" for g, w, name in sorted(gaps, reverse=True)[:12]]
    return lines


# --------------------------------------------------------------------------------------------------
# FLOPs of the candidate steps


def _matmul_params(lm: LoadedModel) -> int:
    """Weights of the matmuls in the decoder layers (nn.Linear and GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return sum(mod.weight.numel() for mod in lm.adapter.layers(lm.model).modules()
               if isinstance(mod, (nn.Linear, Conv1D)))


def candidate_flops(lm: LoadedModel, result: MarginalResult) -> dict[str, float]:
    """FLOPs of the depth-2 candidate steps: matmuls, attention over context + itself, unembedding."""
    cfg = lm.model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * lm.n_layers
    window = getattr(cfg, "sliding_window", None)
    n_cand = result.n_candidates.double().cpu()
    keys_full = result.positions.double().cpu() + 2  # context 0..t and the candidate itself
    keys_sliding = keys_full.clamp(max=window) if window else keys_full
    attn_keys = sum(float((n_cand * (keys_sliding if lt == "sliding_attention" else keys_full)).sum())
                    for lt in layer_types)
    tokens = float(n_cand.sum())
    matmul = 2.0 * _matmul_params(lm) * tokens
    attention = 4.0 * n_heads * head_dim * attn_keys  # QK^T and AV
    unembed = 2.0 * d_model * lm.vocab_size * tokens
    return {"candidate_tokens": tokens, "matmul": matmul, "attention": attention, "unembedding": unembed,
            "total": matmul + attention + unembed}


# --------------------------------------------------------------------------------------------------
# The naive method


def naive(model: nn.Module, ids: torch.Tensor, positions: list[int], top_p: float, per_position: int,
          device: torch.device) -> dict[str, Any]:
    """One full forward pass per candidate, no cache; K candidates per position timed, the rest extrapolated."""
    total_s = 0.0
    timed_candidates = 0
    all_candidates = 0
    exact: dict[int, torch.Tensor] = {}

    def forward(seq: torch.Tensor) -> torch.Tensor:
        logits = model(seq, use_cache=False, logits_to_keep=1).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    with torch.inference_mode():
        forward(ids[:, :8])  # warm-up
        for t in positions:
            ctx = ids[:, : t + 1]
            dt_ctx, log_p = _timed(lambda: forward(ctx), device)
            nuc = nucleus(log_p, top_p)
            n = len(nuc.tokens)
            k = n if per_position <= 0 else min(per_position, n)

            def run(k: int = k, nuc: Any = nuc, ctx: torch.Tensor = ctx) -> torch.Tensor:
                acc = torch.full_like(log_p, -math.inf)
                for y, w in zip(nuc.tokens[:k].tolist(), nuc.log_weights[:k].tolist()):
                    seq = torch.cat([ctx, torch.tensor([[y]], device=ctx.device)], dim=1)
                    acc = torch.logaddexp(acc, forward(seq) + w)
                return acc

            dt, acc = _timed(run, device)
            total_s += dt_ctx + dt / k * n
            timed_candidates += k
            all_candidates += n
            if k == n:
                exact[t] = acc
    return {"seconds": total_s, "timed_candidates": timed_candidates, "candidates": all_candidates,
            "extrapolated": timed_candidates < all_candidates, "exact": exact}


# --------------------------------------------------------------------------------------------------


def _text_ids(lm: LoadedModel, n_tokens: int) -> torch.Tensor:
    from mtp_lib.data import load_open_ended

    ids: list[int] = []
    for text in load_open_ended():
        ids += lm.tokenizer(text.text + "\n\n", add_special_tokens=not ids).input_ids
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"--context {n_tokens}: the open-ended texts give only {len(ids)} tokens")
    return torch.tensor([ids[:n_tokens]])


def _versions() -> dict[str, str]:
    import transformers

    import mtp_lib

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mtp_lib": mtp_lib.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


@dataclasses.dataclass
class Plan:
    """What one run times: the text and positions, and every marginalize row's setting as
    (attention, max_tokens_per_chunk, tokens_per_row, FlexAttention kernel_options as JSON or None,
    merge); flex runs one row per step, so only the chunk counts there. ``reduces`` apply to each row."""

    ids: torch.Tensor
    positions: list[int]
    configs: list[tuple[int, ...]]
    attentions: list[str]
    reduces: list[str]
    merges: list[str]
    flex_options: list[str | None]
    runs: list[tuple[str, int, int, str | None, str]]
    warmup: int
    fused_possible: bool  # the fused bf16 reduction can run (a GPU, bf16, Triton)
    merge_possible: bool  # the fused tree merge can run (a GPU, Triton)


def make_plan(args: argparse.Namespace, lm: LoadedModel, dtype: torch.dtype) -> Plan:
    device = lm.device
    ids = _text_ids(lm, args.context).to(device)
    n_ctx = ids.shape[1]
    if not 1 <= args.positions <= n_ctx:
        raise SystemExit(f"--positions must be in [1, {n_ctx}]")
    default_configs = "16384x256,8192x128,32768x512" if device.type == "cuda" else "1024x128"
    configs = [tuple(int(x) for x in c.split("x")) for c in (args.configs or default_configs).split(",")]
    attentions = _choices("--attention", args.attention, "packed", "flex")
    merges = _choices("--merge", args.merge, "fused", "plain")
    flex_options = [_flex_options(o) for o in args.flex_options.split(";")]
    runs = list(dict.fromkeys((a, c, r if a == "packed" else c, o, m) for a in attentions for c, r in configs
                              for o in (flex_options if a == "flex" else [None])
                              for m in (merges if a == "flex" else ["plain"])))
    return Plan(ids, list(range(n_ctx - args.positions, n_ctx)), configs, attentions,
                _choices("--reduce", args.reduce, "fused", "plain"), merges, flex_options, runs,
                args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0),
                device.type == "cuda" and dtype == torch.bfloat16 and kernels.triton is not None,
                device.type == "cuda" and kernels.triton is not None)


def run_row(lm: LoadedModel, plan: Plan, args: argparse.Namespace, setting: tuple[str, int, int, str | None, str],
            compiled: bool) -> MarginalResult:
    """marginalize with one row's setting (the flex kernel options and merge are the library's
    module settings: set here, restored by main)."""
    attention, chunk, row, options, merge = setting
    MG.flex._FLEX_KERNEL_OPTIONS = None if options is None else json.loads(options)
    MG.flex._FUSED_MERGE = merge == "fused"
    return marginalize(lm.model, plan.ids, depth=2, top_p=args.top_p, positions=plan.positions,
                       max_tokens_per_chunk=chunk, tokens_per_row=row, max_logits_elements=args.max_logits_elements,
                       compile=compiled, attention=attention)


def context_pass(lm: LoadedModel, plan: Plan, repeats: int, compiled: bool) -> float:
    """marginalize's context pass alone (compiled when its candidate steps are), median."""
    with torch.inference_mode():
        times = [_timed(lambda: MG.context._run_context(lm.model, lm.adapter, plan.ids, compiled), lm.device)[0]
                 for _ in range(plan.warmup + repeats)]
    return statistics.median(times[plan.warmup:])


def time_rows(lm: LoadedModel, plan: Plan, args: argparse.Namespace
              ) -> tuple[list[dict[str, Any]], tuple[float, MarginalResult, float], float | None]:
    """Every row (per compile setting, run setting and reduction): its record, the best row's
    (seconds, result, context pass seconds), and the seconds compiling took (None without --compile)."""
    if args.compile:
        # every (flex kernel_options, merge) setting compiles the steps anew, static then dynamic, on the
        # one code object of transformers' forward wrapper; past torch's 8 per code object a setting
        # would silently run eager
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 + 4 * len(plan.runs))
    rows: list[dict[str, Any]] = []
    best: tuple[float, MarginalResult, float] | None = None
    first: MarginalResult | None = None
    compile_s: float | None = None
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:  # compile outside the timing (the first calls compile, then shapes turn dynamic)
            t0 = time.perf_counter()
            for setting in plan.runs:
                run_row(lm, plan, args, setting, True)
            compile_s = time.perf_counter() - t0
            print(f"compiled in {compile_s:.0f} s", file=sys.stderr)
        ctx_s = context_pass(lm, plan, args.repeats, compiled)
        for setting, reduce in ((run, red) for run in plan.runs for red in plan.reduces):
            MG.reduce._FUSED_REDUCE = reduce == "fused"
            times, result = [], None
            for i in range(plan.warmup + args.repeats):
                dt, result = _timed(lambda: run_row(lm, plan, args, setting, compiled), lm.device)
                if i >= plan.warmup:
                    times.append(dt)
            assert result is not None
            record = row_record(plan, setting, reduce, compiled, times, ctx_s, result)
            if first is None:
                first = result
            else:  # against the first row (eager; packed unless only flex is timed), same inputs
                record["max_abs_prob_diff_vs_first"] = float(
                    (result.log_probs[:, 1].exp() - first.log_probs[:, 1].exp()).abs().max())
            rows.append(record)
            if best is None or record["seconds"] < best[0]:
                best = (record["seconds"], result, ctx_s)
    assert best is not None
    return rows, best, compile_s


def row_record(plan: Plan, setting: tuple[str, int, int, str | None, str], reduce: str, compiled: bool,
               times: list[float], ctx_s: float, result: MarginalResult) -> dict[str, Any]:
    attention, chunk, row, options, merge = setting
    return {"method": "marginalize+compile" if compiled else "marginalize", "attention": attention,
            "reduce": reduce if plan.fused_possible else "plain",
            "max_tokens_per_chunk": chunk, "tokens_per_row": row,
            **({"flex_options": json.loads(options)} if options is not None else {}),
            **({"merge": merge if plan.merge_possible else "plain"} if attention == "flex" else {}),
            "seconds": statistics.median(times), "seconds_all": times,
            "context_pass_s": ctx_s, "candidates": int(result.n_candidates.sum()),
            "tokens_fed": result.n_tokens_fed,
            "chunks": result.n_chunks}


def profile_fastest(lm: LoadedModel, plan: Plan, args: argparse.Namespace, rows: list[dict[str, Any]],
                    dtype: torch.dtype) -> None:
    """--profile: one more run of the fastest row under torch.profiler, its tables written to the file."""
    fastest = min(rows, key=lambda r: r["seconds"])
    chunk, row, compiled = fastest["max_tokens_per_chunk"], fastest["tokens_per_row"], fastest["method"] != "marginalize"
    attention = fastest["attention"]
    options = json.dumps(fastest["flex_options"]) if "flex_options" in fastest else None
    merge = fastest.get("merge", "plain")
    MG.reduce._FUSED_REDUCE = fastest["reduce"] == "fused"
    title = (f"{lm.name} {str(dtype)[6:]} on {_device_name(lm.device)}, {attention} attention, {fastest['reduce']} "
             f"reduction, chunk x row {chunk}x{row}{', compiled' if compiled else ''}"
             f"{f', kernel_options {options}' if options else ''}{', merge kernel' if merge == 'fused' else ''}")
    profile(lambda: run_row(lm, plan, args, (attention, chunk, row, options, merge), compiled), lm.device,
            args.profile, title)


def summarize(lm: LoadedModel, plan: Plan, best: tuple[float, MarginalResult, float], nv: dict[str, Any],
              rate: dict[str, Any], compile_s: float | None) -> dict[str, Any]:
    """The run's headline numbers: the best marginalize row against naive and against the FLOP floor."""
    best_s, result, ctx_s = best
    flops = candidate_flops(lm, result)
    floor_s = flops["total"] / rate["flops_per_s"]
    diffs = [float((result.log_probs[plan.positions.index(t), 1].exp() - acc.exp()).abs().max())
             for t, acc in nv["exact"].items()]
    n_cand = result.n_candidates.double()
    return {
        "speedup_vs_naive": nv["seconds"] / best_s,
        "positions_per_s": len(plan.positions) / best_s,
        "candidates_per_s": float(n_cand.sum()) / best_s,
        "context_pass_s": ctx_s,
        "floor_s": floor_s,
        "ratio_to_floor": best_s / floor_s,
        "candidates_ratio_to_floor": max(best_s - ctx_s, 0.0) / floor_s,
        "flops": flops,
        "matmul": rate,
        "nucleus": {"mean": float(n_cand.mean()), "median": float(n_cand.median()), "min": int(n_cand.min()),
                    "max": int(n_cand.max()), f"mean_at_0.9": float(result.nucleus_size(0.9).double().mean())},
        "naive_vs_marginalize_max_abs_prob_diff": max(diffs) if diffs else None,
        "compile_seconds": compile_s,
    }


def print_report(rows: list[dict[str, Any]], summary: dict[str, Any], plan: Plan, nv: dict[str, Any],
                 args: argparse.Namespace, best_s: float) -> None:
    print(f"\n{'method':<20} {'attention':>9} {'reduce':>6} {'chunk x row':>12} {'seconds':>9} {'pos/s':>8} "
          f"{'cand/s':>10} {'speedup':>8}")
    for r in rows:
        cfg = f"{r['max_tokens_per_chunk']}x{r['tokens_per_row']}" if r["method"].startswith("marginalize") else "-"
        cfg = f"{r.get('attention', '-'):>9} {r.get('reduce', '-'):>6} {cfg:>12}"
        note = f"  (extrapolated from {r['timed_candidates']} of {r['candidates']} candidates)" \
            if r.get("extrapolated") else ""
        if "flex_options" in r:
            note += f"  kernel_options {json.dumps(r['flex_options'])}"
        if r.get("merge") == "fused":
            note += "  merge kernel"
        print(f"{r['method']:<20} {cfg} {r['seconds']:>9.3f} {len(plan.positions) / r['seconds']:>8.2f} "
              f"{r['candidates'] / r['seconds']:>10.0f} {nv['seconds'] / r['seconds']:>7.1f}x{note}")
    nuc, rate, flops = summary["nucleus"], summary["matmul"], summary["flops"]
    print(f"\nnucleus at top-{args.top_p}: mean {nuc['mean']:.0f}, median "
          f"{nuc['median']:.0f}, range {nuc['min']}-{nuc['max']} candidates; "
          f"top-0.9 mean {nuc['mean_at_0.9']:.0f}")
    print(f"matmul rate {rate['flops_per_s'] / 1e12:.2f} TFLOP/s ({rate['dtype']} GEMM {rate['n']}^3); candidate "
          f"steps {flops['total'] / 1e12:.3f} TFLOP (matmuls {flops['matmul'] / flops['total']:.0%}, attention "
          f"{flops['attention'] / flops['total']:.0%}, unembedding {flops['unembedding'] / flops['total']:.0%})")
    print(f"floor {summary['floor_s']:.4f} s; marginalize {best_s:.4f} s = {summary['ratio_to_floor']:.2f}x the floor "
          f"({summary['candidates_ratio_to_floor']:.2f}x without the {summary['context_pass_s']:.4f} s context pass)")
    if summary["naive_vs_marginalize_max_abs_prob_diff"] is not None:
        print(f"naive vs marginalize on {len(nv['exact'])} whole positions: max |probability difference| "
              f"{summary['naive_vs_marginalize_max_abs_prob_diff']:.2e}")


def settings_of(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    return {"context": plan.ids.shape[1], "positions": plan.positions, "top_p": args.top_p, "depth": 2,
            "configs": [f"{c}x{r}" for c, r in plan.configs], "attention": plan.attentions, "reduce": plan.reduces,
            "flex_options": [None if o is None else json.loads(o) for o in plan.flex_options],
            "merge": plan.merges,
            "max_logits_elements": args.max_logits_elements,
            "naive_candidates_per_position": args.naive_candidates, "repeats": args.repeats,
            "warmup": plan.warmup,
            "quick": args.quick, "text": "Brown Corpus passages (mtp_lib.data.load_open_ended)"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=lambda m: print(m, file=sys.stderr))
    device, dtype = lm.device, next(lm.model.parameters()).dtype
    plan = make_plan(args, lm, dtype)
    print(f"{lm.name} ({lm.info()['params'] / 1e6:.0f}M params, vocab {lm.vocab_size}) {str(dtype)[6:]} on "
          f"{_device_name(device)}; context {plan.ids.shape[1]} tokens, {len(plan.positions)} positions, "
          f"top_p {args.top_p}", file=sys.stderr)
    rate = matmul_rate(device, dtype)

    # marginalize: warm-up (a small nucleus), then per compile setting the context pass alone and each config
    marginalize(lm.model, plan.ids, depth=2, top_p=min(args.top_p, 0.5), positions=plan.positions[-1:])
    defaults = MG.reduce._FUSED_REDUCE, MG.flex._FLEX_KERNEL_OPTIONS, MG.flex._FUSED_MERGE  # each row sets its own
    rows, best, compile_s = time_rows(lm, plan, args)
    if args.profile:
        profile_fastest(lm, plan, args, rows, dtype)
    MG.reduce._FUSED_REDUCE, MG.flex._FLEX_KERNEL_OPTIONS, MG.flex._FUSED_MERGE = defaults  # the library's defaults again

    nv = naive(lm.model, plan.ids, plan.positions, args.top_p, args.naive_candidates, device)
    rows.append({"method": "naive", "seconds": nv["seconds"], "candidates": nv["candidates"],
                 "timed_candidates": nv["timed_candidates"], "extrapolated": nv["extrapolated"]})
    summary = summarize(lm, plan, best, nv, rate, compile_s)
    print_report(rows, summary, plan, nv, args, best[0])
    if args.out:
        record = {
            "benchmark": "marginal", "device": str(device), "device_name": _device_name(device),
            "versions": _versions(), "model": lm.info(), "dtype": str(dtype).replace("torch.", ""),
            "settings": settings_of(args, plan), "rows": rows, **summary,
            "provenance": provenance(device=device, source=__file__),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    print(f"speedup_vs_naive={summary['speedup_vs_naive']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
