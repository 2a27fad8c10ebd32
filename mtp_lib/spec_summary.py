"""The rows of ``benchmarks/speculative.py``'s result: its per-prompt records summarized per task and
method (tokens/s, speedups over the greedy rows on the same prompts, tau, identity with greedy
decoding, host time per verification step), and runs split by task merged into one.

A record is one prompt through one method: ``task``, ``prompt``, ``method``, ``timed``,
``new_tokens``, ``seconds``, ``tokens_per_s``, ``accepted_lengths`` (prefill first), ``step_seconds``
(host seconds per part, our decoders only), ``identical_to_greedy`` and ``identical_to_generate``.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["EAGER_ROWS", "GREEDY_ROWS", "PART_SETTINGS", "add_fastest_greedy", "first_difference", "merge_runs",
           "prompts_done", "step_split", "summarize"]


def prompts_done(records: list[dict[str, Any]]) -> dict[str, int]:
    """Prompts run per task (fewer than --n-prompts where --time-limit stopped the run)."""
    done: dict[str, set[str]] = {}
    for r in records:
        done.setdefault(r["task"], set()).add(r["prompt"])
    return {task: len(ids) for task, ids in done.items()}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


GREEDY_ROWS = ("generate", "generate_compiled", "greedy_graph", "greedy_invariant")  # one token per pass
EAGER_ROWS = ("generate", "prompt_lookup")  # transformers without static cache or graphs


def step_split(rs: list[dict[str, Any]]) -> dict[str, float]:
    """Host milliseconds per verification step spent drafting, verifying and accepting, pooled over
    ``rs`` (records of one decoder row), and per prompt in its prefill; empty for transformers rows."""
    timed = [r for r in rs if r.get("step_seconds")]
    steps = sum(len(r["accepted_lengths"]) - 1 for r in timed)
    if not timed or steps == 0:
        return {}
    out = {f"{part}_ms": 1e3 * sum(r["step_seconds"][part] for r in timed) / steps
           for part in ("draft", "verify", "accept")}
    out["prefill_ms"] = 1e3 * sum(r["step_seconds"]["prefill"] for r in timed) / len(timed)
    return out


def add_fastest_greedy(rows: list[dict[str, Any]]) -> None:
    """Give every timed row of a task ``fastest_greedy`` (the greedy row with the most tokens/s on the
    task) and ``speedup_vs_fastest_greedy`` (its speedup over that row, from ``speedup_vs_<row>``)."""
    for task in {r["task"] for r in rows}:
        mine = [r for r in rows if r["task"] == task]
        greedy = [r for r in mine if r["method"] in GREEDY_ROWS and r["timed"]]
        if not greedy:
            continue
        best = max(greedy, key=lambda r: r["tokens_per_s"])["method"]
        for r in mine:
            if f"speedup_vs_{best}" in r:
                r["fastest_greedy"] = best
                r["speedup_vs_fastest_greedy"] = r[f"speedup_vs_{best}"]


def summarize(records: list[dict[str, Any]], baselines: list[str]) -> list[dict[str, Any]]:
    """Per task and method: mean tokens/s, speedups over baselines and the fastest greedy row (same
    prompts), tau, identity checks, the host time per step."""
    rows = []
    for task in sorted({r["task"] for r in records}) + ["all"]:
        mine = [r for r in records if task in ("all", r["task"])]
        for method in dict.fromkeys(r["method"] for r in mine):
            rs = [r for r in mine if r["method"] == method]
            steps = [a for r in rs for a in r["accepted_lengths"][1:]]
            row = {"task": task, "method": method, "prompts": len(rs), "timed": rs[0]["timed"],
                   "new_tokens": sum(r["new_tokens"] for r in rs),
                   "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
                   "total_tokens_per_s": sum(r["new_tokens"] for r in rs) / sum(r["seconds"] for r in rs),
                   "tau": sum(steps) / len(steps) if steps else None,
                   "identical_to_greedy": sum(r["identical_to_greedy"] for r in rs) / len(rs),
                   "identical_to_generate": sum(r["identical_to_generate"] for r in rs) / len(rs),
                   **step_split(rs)}
            for base in baselines:
                ids = {r["prompt"] for r in rs}
                bs = [r for r in mine if r["method"] == base and r["prompt"] in ids]
                if bs and len(bs) == len(rs) and row["timed"]:
                    row[f"speedup_vs_{base}"] = row["tokens_per_s"] / statistics.mean(r["tokens_per_s"] for r in bs)
            rows.append(row)
    add_fastest_greedy(rows)
    return rows


# settings that may differ between the parts of one merged run
PART_SETTINGS = ("tasks", "out", "merge", "no_progress")


def merge_runs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same setup on disjoint tasks (``--tasks`` each): the records pooled
    and summarized anew, so each task's rows are its own run's and the ``all`` rows pool the parts.
    Refuses parts of another model, dtype, device or setting, or two parts with the same task."""
    first = parts[0]
    same = {k: v for k, v in first["settings"].items() if k not in PART_SETTINGS}
    seen: set[str] = set()
    for i, part in enumerate(parts):
        settings = {k: v for k, v in part["settings"].items() if k not in PART_SETTINGS}
        diff = sorted(k for k in same.keys() | settings.keys() if same.get(k) != settings.get(k))
        device = part["provenance"].get("device")
        if diff or device != first["provenance"].get("device") or part["model"] != first["model"]:
            raise ValueError(f"part {i} is not of the same setup as part 0 (settings {diff}, device {device!r} vs "
                             f"{first['provenance'].get('device')!r}): merge only parts of one run split by --tasks")
        tasks = {r["task"] for r in part["per_prompt"]}
        if tasks & seen:
            raise ValueError(f"part {i} repeats the task(s) {sorted(tasks & seen)}: each part must have its own tasks")
        seen |= tasks
    records = [r for part in parts for r in part["per_prompt"]]
    methods = dict.fromkeys(r["method"] for r in records)
    out = dict(first)
    out.update(rows=summarize(records, [m for m in GREEDY_ROWS if m in methods]), per_prompt=records,
               complete=all(p.get("complete", True) for p in parts),
               settings={**first["settings"], "tasks": sorted(seen), "merged_from": len(parts)},
               provenance={**first["provenance"], "parts": [p["provenance"] for p in parts]})
    return out
