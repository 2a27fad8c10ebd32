"""Chapter 4's goals (Table 4.4, issue 17's): per model and task, the best bit-exact speculative row
against each threshold, and whether every speculative output equals greedy decoding's.

Re-exported by :mod:`mtp_lib.spec_report`, whose :class:`~mtp_lib.spec_report.Benchmark` they read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .spec_report import Benchmark, Runs

__all__ = ["GOALS", "goal_table", "goals_note"]


# Issue 17's goals, in bfloat16 on bit-exact rows: (task, tau at least, speedup over the fastest greedy row at least)
GOALS = (("translation", 3.0, 2.0), ("open-ended", 2.5, 1.5))


def _speed_column(part: pd.DataFrame) -> tuple[str, str]:
    """The speedup a goal reads: over the fastest greedy row where the run names it, else over greedy_graph
    (runs from before the ``generate_compiled`` row), and the words for it."""
    if "speedup_vs_fastest_greedy" in part and part["speedup_vs_fastest_greedy"].notna().any():
        fastest = part["fastest_greedy"].dropna()
        return "speedup_vs_fastest_greedy", f"the fastest greedy row ({fastest.iloc[0]})" if len(fastest) else "?"
    return "speedup_vs_greedy_graph", "greedy_graph (this run has no fastest-greedy column)"


def _goal(name: str, goal: str, threshold: float, spec: pd.DataFrame, column: str, against: str = "") -> dict[str, Any]:
    # the best bit-exact row's value of `column` against the goal's threshold; rows whose outputs differ
    # from greedy decoding on some prompt are not eligible (their speed is not a lossless decoder's)
    base = {"model": name, "goal": goal, "against": against or "-"}
    if spec.empty or spec[column].isna().all():
        return {**base, "measured": "-", "row": "not run", "met": None}
    exact = spec[(spec["identical_to_greedy"] == 1) & spec[column].notna()]
    if exact.empty:
        return {**base, "measured": "-", "row": "no bit-exact row", "met": False}
    best = exact.loc[exact[column].idxmax()]
    return {**base, "measured": f"{best[column]:.2f}", "row": best["method"], "met": bool(best[column] >= threshold)}


def _identity_goal(bench: Benchmark, name: str) -> dict[str, Any]:
    # every speculative row's output identical to greedy decoding's on every prompt of every task
    rows = bench.summary[(bench.summary["model"] == name) & (bench.summary["task"] != "all")
                         & bench.summary["method"].str.startswith("spec")]
    same = rows["identical_to_greedy"].min() if not rows.empty else float("nan")
    return {"model": name, "goal": "every speculative output identical to greedy", "against": "greedy reference",
            "measured": f"{same:.0%} of outputs in the worst row" if np.isfinite(same) else "-",
            "row": "all speculative rows", "met": bool(same == 1) if np.isfinite(same) else None}


def goal_table(bench: Benchmark) -> pd.DataFrame:
    """Table 4.4: per model, issue 17's goals (:data:`GOALS` per task, and identity on every prompt): the
    best *bit-exact* speculative row (identical to greedy on every prompt of the task), its value, and
    whether it meets the goal (``met``: True, False, or None when not measured; ``verdict`` in words)."""
    out = []
    for name in bench.runs:
        s = bench.summary
        for task, tau, speed in GOALS:
            spec = s[(s["model"] == name) & (s["task"] == task) & s["method"].str.startswith("spec")]
            column, against = _speed_column(spec)
            out += [_goal(name, f"{task}: tau >= {tau}", tau, spec, "tau"),
                    _goal(name, f"{task}: >= {speed}x the fastest greedy row", speed, spec, column, against)]
        out.append(_identity_goal(bench, name))
    goals = pd.DataFrame(out)
    if not goals.empty:
        goals["verdict"] = goals["met"].map({True: "met", False: "missed", None: "not measured"})
    return goals


def goals_note(goals: pd.DataFrame, runs: Runs) -> str:
    """Per run: how many goals it meets, which, and on which device and in which dtype it was measured."""
    lines = []
    for name in runs:
        g = goals[goals["model"] == name]
        met = g[g["met"] == True]["goal"].tolist()  # noqa: E712
        missed = g[g["met"] == False]["goal"].tolist()  # noqa: E712
        result = runs[name]["result"]
        dev_name, dtype = result["provenance"].get("device", "?"), result.get("dtype", "?")
        where = "" if "H100" in dev_name or "H200" in dev_name else ", not the H100 or H200 the goals are set for"
        kind = "" if dtype == "bfloat16" else f"; the goals are set for bfloat16, this run is {dtype}"
        lines.append(f"- **{name}** (measured on {dev_name}{where}{kind}): meets {len(met)} of {len(g)} goals"
                     + (f" ({'; '.join(met)})" if met else "") + (f"; misses {'; '.join(missed)}" if missed else "") + ".")
    return "\n".join(lines)
