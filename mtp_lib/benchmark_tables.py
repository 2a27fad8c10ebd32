"""The marginalization benchmarks (``benchmarks/marginal.py`` JSON outputs) as a table and a summary.

The summary leads with what the hardware allows: the time of ``marginalize`` against the FLOP floor
(the candidate steps' FLOPs at the device's measured matmul rate) on a named device. The ratio to
the naive method comes beside it with how it was measured: one forward pass per candidate, batch 1,
no cache, timed on a few candidates per position and extrapolated linearly to the whole nucleus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["benchmark_table", "fastest_row", "load_benchmarks", "missing_benchmarks", "speed_summary"]


def load_benchmarks(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(file name, record)`` of every marginal benchmark under ``root/data/results``: the GPU runs,
    then the quick CPU run when it is stored."""
    gpu = sorted((root / "data" / "results" / "gpu").glob("benchmark-marginal*.json"))
    quick = root / "data" / "results" / "cpu" / "benchmark-marginal-quick.json"
    return [(p.name, json.loads(p.read_text())) for p in [*gpu, *([quick] if quick.is_file() else [])]]


def missing_benchmarks(root: Path) -> list[str]:
    """What to run when a benchmark the chapter reads is not stored."""
    out = []
    if not sorted((root / "data" / "results" / "gpu").glob("benchmark-marginal*.json")):
        out.append("No GPU benchmark is stored yet (`data/results/gpu/benchmark-marginal*.json` is absent): "
                   "run `python benchmarks/marginal.py --device cuda --model <model> --dtype bfloat16 --out "
                   "data/results/gpu/benchmark-marginal-<model>.json` for SmolLM2 and Gemma to fill this table.")
    if not (root / "data" / "results" / "cpu" / "benchmark-marginal-quick.json").is_file():
        out.append("The quick CPU benchmark is not stored (`data/results/cpu/benchmark-marginal-quick.json`): run "
                   "`python benchmarks/marginal.py --quick --threads 1 --out data/results/cpu/benchmark-marginal-quick.json`.")
    return out


def fastest_row(b: dict[str, Any]) -> str:
    """The fastest marginalize row of a run: method, attention (packed before the attention option), config,
    the reduction of the logits (plain before the fused kernel), and for flex rows FlexAttention's
    kernel_options and the tree part's merge (where the run compared them)."""
    best = min((r for r in b["rows"] if r["method"].startswith("marginalize")), key=lambda r: r["seconds"])
    attention = best.get("attention", "packed")
    size = (f"{best['max_tokens_per_chunk']}x{best['tokens_per_row']}" if attention == "packed"
            else str(best["max_tokens_per_chunk"]))
    extras = f", kernel_options {json.dumps(best['flex_options'])}" if "flex_options" in best else ""
    if attention == "flex":  # (runs from before the merge kernel have no "merge": elementwise)
        extras += ", merge kernel" if best.get("merge") == "fused" else ", elementwise merge"
    return (f"{'compiled' if 'compile' in best['method'] else 'eager'}, {attention} {size}, "
            f"{best.get('reduce', 'plain')} reduction{extras}: {best['seconds']:.3f} s")


def _naive(b: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in b["rows"] if r["method"] == "naive")


def benchmark_table(benchmarks: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    """One column per benchmark file: device, settings, throughput, ratio to the FLOP floor, then the
    ratio to the naive method (marked when extrapolated)."""
    import pandas as pd

    rows = []
    for name, b in benchmarks:
        s = b["settings"]
        naive = _naive(b)
        rows.append({"file": name, "model": b["model"]["name"], "device": b["device_name"], "dtype": b["dtype"],
                     "context / positions": f"{s['context']} / {len(s['positions'])}", "top-p": s["top_p"],
                     "mean nucleus": round(b["nucleus"]["mean"]), "fastest": fastest_row(b),
                     "time / FLOP floor": round(b["ratio_to_floor"], 2),
                     "candidate steps / FLOP floor": round(b["candidates_ratio_to_floor"], 2),
                     "positions per s": round(b["positions_per_s"], 2),
                     "candidates per s": round(b["candidates_per_s"]),
                     "speedup vs naive": f"{b['speedup_vs_naive']:.1f}x" + (
                         f" (extrapolated from {naive.get('timed_candidates', '?')} of {naive['candidates']})"
                         if naive.get("extrapolated") else "")})
    return pd.DataFrame(rows).set_index("file").T if rows else None


def speed_summary(benchmarks: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Per model, its run closest to the FLOP floor on a GPU: the ratio to the floor and the device first,
    then the ratio to the naive method with how it was measured."""
    best: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, b in benchmarks:
        if b.get("device", "cpu").startswith("cuda"):
            model = b["model"]["name"]
            if model not in best or b["ratio_to_floor"] < best[model][1]["ratio_to_floor"]:
                best[model] = (name, b)
    lines = []
    for model, (name, b) in best.items():
        s, naive = b["settings"], _naive(b)
        how = (f"timed on {naive['timed_candidates']:,} of the {naive['candidates']:,} candidates (the "
               f"{s['naive_candidates_per_position']} most probable per position) and extrapolated linearly to all"
               if naive.get("extrapolated") else f"timed on all {naive['candidates']:,} candidates")
        lines.append(
            f"- **{model}** on an {b['device_name']} ({b['dtype']}): {b['ratio_to_floor']:.2f} times the FLOP floor "
            f"({b['candidates_ratio_to_floor']:.2f} times for the candidate steps alone), "
            f"{b['positions_per_s']:.0f} positions and {b['candidates_per_s']:,.0f} candidate tokens per second, "
            f"{len(s['positions'])} positions of a {s['context']}-token context with a mean top-{s['top_p']:g} nucleus of "
            f"{b['nucleus']['mean']:,.0f} candidates (`{name}`). Beside it, {b['speedup_vs_naive']:,.0f} times "
            f"faster than the naive method: one forward pass of context and candidate per candidate, batch 1, "
            f"no KV cache, {how}.")
    return "\n".join(lines)
