"""Chapter 4's tables and sentences from the benchmark runs (:mod:`mtp_lib.spec_runs`).

:func:`collect` pools the runs' per-prompt records and summary rows (``benchmarks/speculative.py``'s
``per_prompt`` and ``rows``); the other functions turn them into the chapter's tables (speed and
acceptance per row, rank acceptance, the goals) and its sentences. Every share of outputs identical
to greedy decoding is counted from the per-prompt records, so that nothing is called lossless unless
it equals greedy decoding on every prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .plots.decode import method_heads, pass_costs
from .report import difference_with_ci
from .spec_goals import GOALS, goal_table, goals_note

__all__ = ["GOALS", "INVARIANCE_COMMAND", "Benchmark", "acceptance_note", "collect", "cost_frame", "cost_note", "goal_table",
           "goals_note", "invariance_table", "oracle_pairs",
           "identity_note", "identity_shares", "rank_table", "speed_note", "speed_table"]

TASKS = ("translation", "open-ended")
TASK_SHORT = {"translation": "transl.", "open-ended": "open"}
Runs = Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass
class Benchmark:
    """The runs' per-prompt ``records`` (with ``model``), their ``summary`` rows, the drafted ``depths``
    per (model, method), and the runs timed on a GPU."""

    runs: Runs
    records: list[dict[str, Any]]
    summary: pd.DataFrame
    depths: dict[tuple[str, str], int]
    gpu_runs: set[str]

    def tasks(self) -> list[str]:
        """The tasks present, translation first."""
        present = set(self.summary["task"]) if "task" in self.summary else set()
        return [t for t in TASKS if t in present]


def collect(runs: Runs) -> Benchmark:
    """Pool the runs (run name -> ``{"result": benchmark JSON, ...}``) into one :class:`Benchmark`."""
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    depths: dict[tuple[str, str], int] = {}
    for name, run in runs.items():
        r = run["result"]
        records += [{**rec, "model": name} for rec in r["per_prompt"]]
        rows += [{**row, "model": name} for row in r["rows"]]
        for method in {rec["method"] for rec in r["per_prompt"]}:
            n = method_heads(method)
            if method in r["trees"]:
                depths[name, method] = max(len(c) for c in r["trees"][method])
            elif n is not None and method.startswith("spec"):
                depths[name, method] = n - 1
    gpu = {n for n, run in runs.items() if run["result"]["cuda_graphs"]
           or "cpu" not in str(run["result"]["provenance"].get("device", "")).lower()}
    return Benchmark(runs, records, pd.DataFrame(rows), depths, gpu)


def _fmt(x: Any, digits: int = 2) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    return f"{x:.{digits}f}" if np.isfinite(x) else "-"


def identity_shares(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Per model, method and task (and ``all``): prompts whose output equals ``greedy_graph``'s, of how many."""
    if not records:
        return pd.DataFrame(columns=["model", "method", "task", "identical", "prompts"])
    df = pd.DataFrame(records)[["model", "method", "task", "identical_to_greedy"]]
    df["identical_to_greedy"] = df["identical_to_greedy"].astype(bool)
    both = pd.concat([df, df.assign(task="all")], ignore_index=True)
    out = both.groupby(["model", "method", "task"], sort=False)["identical_to_greedy"].agg(["sum", "size"])
    return out.rename(columns={"sum": "identical", "size": "prompts"}).reset_index()


def _share_text(identical: int, prompts: int) -> str:
    return f"{identical}/{prompts} ({identical / prompts:.0%})" if prompts else "-"


def speed_table(bench: Benchmark) -> pd.DataFrame | None:
    """Table 4.2: per model and row, tau, the speedups and tokens/s per task, and the prompts whose output
    equals greedy decoding's, per task and over all prompts (counted from the per-prompt records)."""
    summary, tasks = bench.summary, bench.tasks()
    same = identity_shares(bench.records).set_index(["model", "method", "task"])
    columns = (("tau", "tau", 2), ("speedup over greedy_graph", "speedup_vs_greedy_graph", 2),
               ("speedup over generate", "speedup_vs_generate", 2), ("tokens/s", "tokens_per_s", 1))
    out = []
    for name in bench.runs:
        mine = summary[summary["model"] == name]
        for method in dict.fromkeys(mine["method"]):
            row: dict[Any, str] = {"model": name, "row": method}
            for column, key, digits in columns:
                if key == "tokens_per_s" and not bench.gpu_runs:
                    continue
                for task in tasks:
                    r = mine[(mine["task"] == task) & (mine["method"] == method)]
                    r = r.iloc[0] if not r.empty else {}
                    timed = key == "tau" or (bool(r.get("timed", False)) and (key != "tokens_per_s" or name in bench.gpu_runs))
                    row[column, TASK_SHORT.get(task, task)] = _fmt(r.get(key), digits) if timed else "-"
            for task in [*tasks, "all"]:
                k = (name, method, task)
                row["same as greedy", TASK_SHORT.get(task, task)] = (
                    _share_text(int(same.loc[k, "identical"]), int(same.loc[k, "prompts"])) if k in same.index else "-")
            out.append(row)
    if not out:
        return None
    table = pd.DataFrame(out).set_index(["model", "row"])
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def _value(summary: pd.DataFrame, model: str, task: str, method: str, column: str) -> float:
    part = summary[(summary["model"] == model) & (summary["task"] == task) & (summary["method"] == method)]
    return float(part[column].iloc[0]) if not part.empty and pd.notna(part[column].iloc[0]) else float("nan")


def _best_spec(summary: pd.DataFrame, model: str, task: str) -> Any:
    part = summary[(summary["model"] == model) & (summary["task"] == task) & summary["method"].str.startswith("spec")
                   & summary["speedup_vs_greedy_graph"].notna()]
    return None if part.empty else part.loc[part["speedup_vs_greedy_graph"].idxmax()]


def speed_note(bench: Benchmark) -> str:
    """Per model and task: greedy_graph against generate, the fastest speculative row, prompt lookup."""
    s, lines = bench.summary, []
    for name in bench.runs:
        for task in bench.tasks():
            best, gen = _best_spec(s, name, task), _value(s, name, task, "generate", "speedup_vs_greedy_graph")
            text = (f"- **{name}, {task}**: `greedy_graph` runs at {1 / gen:.2f}x the tokens per second of `generate`"
                    if np.isfinite(gen) else f"- **{name}, {task}**:")
            if best is not None:
                verdict = "faster" if best["speedup_vs_greedy_graph"] > 1 else "slower"
                text += (f"; the fastest speculative row, `{best['method']}`, gains tau = {best['tau']:.2f} tokens per "
                         f"step and is {best['speedup_vs_greedy_graph']:.2f}x `greedy_graph` ({verdict}), "
                         f"{best['speedup_vs_generate']:.2f}x `generate`")
            pl = _value(s, name, task, "prompt_lookup", "speedup_vs_greedy_graph")
            if np.isfinite(pl):
                text += (f"; prompt lookup reaches tau = {_value(s, name, task, 'prompt_lookup', 'tau'):.2f} and "
                         f"{pl:.2f}x `greedy_graph`")
            lines.append(text + ".")
    return "\n".join(lines)


def rank_table(runs: Runs) -> Any:
    """Table 4.3: how often the greedy token n ahead is in head n's top-1, top-3, top-10 (a Styler; None if empty)."""
    out = []
    for name, run in runs.items():
        for variant, table in run["result"]["rank_acceptance"].items():
            for n, row in enumerate(table, start=2):
                cum = np.cumsum(row)
                out.append({"model": name, "heads": variant.replace("heads-", ""), "head": n,
                            **{f"top-{k}": float(cum[k - 1]) for k in (1, 3, 10) if k <= len(cum)}})
    return pd.DataFrame(out).set_index(["model", "heads", "head"]).style.format("{:.3f}") if out else None


def oracle_pairs(records: Any, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Head 2's top-1 draft against the marginal oracle's top-1 draft of x_{t+2}, on the same prompts.

    Per model, task and chain row (``specN_chain``: top-1 drafts), on the prompts the oracle ran: the
    share of verification steps that accepted the token two ahead, ``sum_i k_i / sum_i n_i`` over
    prompts i (k_i steps with accepted length >= 2 of n_i), for the row and for the oracle, their
    difference, and a 95% bootstrap interval of the difference that resamples prompts (paired: each
    resampled prompt brings both methods' steps; :func:`mtp_lib.report.difference_with_ci`)."""
    df = pd.DataFrame(list(records))
    cols = ["model", "task", "row", "prompts", "row_share", "oracle_share", "difference", "low", "high"]
    if df.empty or "oracle2" not in set(df["method"]):
        return pd.DataFrame(columns=cols)
    if "model" not in df.columns:
        df["model"] = ""

    def steps(part: pd.DataFrame, keep: set[Any]) -> tuple[list[float], list[Any]]:
        # one (hit, prompt) per verification step (the prompt's pass left out): hit = the token two ahead accepted
        pairs = [(float(a >= 2), r.prompt) for r in part.itertuples() if r.prompt in keep
                 for a in list(r.accepted_lengths)[1:]]
        return [h for h, _ in pairs], [p for _, p in pairs]

    rows = []
    for (model, task), part in df.groupby(["model", "task"], sort=False):
        oracle = part[part["method"] == "oracle2"]
        prompts = set(oracle["prompt"])
        for row in sorted(m for m in set(part["method"]) if str(m).endswith("_chain")):
            mine = part[part["method"] == row]
            if not prompts <= set(mine["prompt"]):
                continue
            (ha, pa), (hb, pb) = steps(mine, prompts), steps(oracle, prompts)
            if set(pa) != set(pb):  # a prompt that ended in its own pass on one side: no step to pair
                both = set(pa) & set(pb)
                (ha, pa), (hb, pb) = steps(mine, both), steps(oracle, both)
            if not ha:
                continue
            diff = difference_with_ci(ha, hb, groups_a=pa, groups_b=pb, paired=True, n_boot=n_boot, seed=seed)
            rows.append({"model": model, "task": task, "row": row, "prompts": len(prompts), "row_share": np.mean(ha),
                         "oracle_share": np.mean(hb), "difference": diff.mean, "low": diff.lo, "high": diff.hi})
    return pd.DataFrame(rows, columns=cols)


def acceptance_note(acceptance: pd.DataFrame, runs: Runs, records: Any = ()) -> str:
    """Per model and task: the best acceptance of head 2's draft, and (given the benchmark's
    ``records``) head 2's top-1 draft against the marginal oracle's on the same prompts (:func:`oracle_pairs`)."""
    pairs = oracle_pairs(records)
    lines = []
    for name in runs:
        for task in sorted(set(acceptance["task"]) if not acceptance.empty else [], key=lambda t: t != "translation"):
            part = acceptance[(acceptance["model"] == name) & (acceptance["task"] == task) & (acceptance["head"] == 2)]
            share = {m: v for m, v in zip(part["method"], part["share"]) if m != "oracle2"}
            if not share:
                continue
            best = max(share, key=lambda m: share[m])
            text = (f"- **{name}, {task}**: head 2's draft is accepted in {share[best]:.0%} of the steps at best "
                    f"(`{best}`, over all prompts)")
            for _, p in pairs[(pairs["model"] == name) & (pairs["task"] == task)].iterrows():
                spread = (f"95% interval over prompts [{p['low']:+.2f}, {p['high']:+.2f}]" if p["prompts"] >= 5
                          else "too few prompts for an interval")
                text += (f"; on the {p['prompts']} prompt(s) the oracle ran, `{p['row']}`'s top-1 draft is accepted in "
                         f"{p['row_share']:.0%} of the steps, the oracle's top-1 in {p['oracle_share']:.0%} "
                         f"(difference {p['difference']:+.2f}, {spread})")
            lines.append(text + ".")
    return "\n".join(lines)


def cost_frame(bench: Benchmark) -> pd.DataFrame:
    """Tokens per pass and cost of a pass against greedy_graph's, per model, task and row (:func:`pass_costs`)."""
    if not bench.records:
        return pd.DataFrame()
    return pd.concat([pass_costs([r for r in bench.records if r["model"] == name],
                                 depths={m: d for (n, m), d in bench.depths.items() if n == name})
                      for name in bench.runs])


def _cost_line(costs: pd.DataFrame, part: pd.DataFrame, name: str, task: str, gpu: bool) -> str:
    # the fastest speculative row's cost and gain per pass, its ceiling, and the best ceiling of any row
    row = part.loc[part["speedup"].idxmax()]
    ref = costs[(costs["model"] == name) & (costs["task"] == task) & (costs["method"] == "greedy_graph")]
    ms = f" ({row['ms_per_pass']:.2f} ms against {float(ref['ms_per_pass'].iloc[0]):.2f} ms)" if gpu else ""
    need = 1.5 * row["cost"]
    text = (f"- **{name}, {task}**: a step of `{row['method']}` costs {row['cost']:.2f}x a greedy pass{ms} and gains "
            f"{row['tokens_per_pass']:.2f} tokens per pass, hence {row['speedup']:.2f}x. ")
    ceiling = row["max_tokens_per_pass"]
    if np.isfinite(ceiling):
        text += (f"Perfect drafts would gain {ceiling:.0f} tokens per pass at that cost: at most "
                 f"{ceiling / row['cost']:.2f}x. ")
    text += f"Reaching 1.5x at this cost takes {need:.2f} tokens per pass"
    text += (" (more than perfect drafts of this depth give: the step itself is too expensive)."
             if np.isfinite(ceiling) and need > ceiling else ".")
    ceilings = part.assign(ceiling=part["max_tokens_per_pass"] / part["cost"]).dropna(subset=["ceiling"])
    if not ceilings.empty:
        top = ceilings.loc[ceilings["ceiling"].idxmax()]
        if top["method"] != row["method"]:
            text += (f" The highest ceiling is `{top['method']}`'s: {top['ceiling']:.2f}x with perfect drafts (a step "
                     f"costs {top['cost']:.2f}x and now gains {top['tokens_per_pass']:.2f} tokens per pass).")
    return text


def cost_note(costs: pd.DataFrame, bench: Benchmark) -> str:
    """Per model and task: what a step of the fastest speculative row costs and gains, and its ceiling."""
    lines = []
    for name in bench.runs:
        for task in [t for t in TASKS if not costs.empty and t in set(costs["task"])]:
            part = costs[(costs["model"] == name) & (costs["task"] == task) & costs["method"].str.startswith("spec")]
            if not part.empty:
                lines.append(_cost_line(costs, part, name, task, name in bench.gpu_runs))
    return "\n".join(lines)


IDENTITY_CAUSE = ("In bfloat16 a verification step over several tokens and a one-token step are different matrix "
                  "products, rounded differently, so a near-tie can flip an argmax and the outputs part from there "
                  "(transformers' own prompt lookup decoding, which also verifies several tokens per pass, departs "
                  "from greedy decoding in the same way); in float32 the roundings are far smaller than the gaps "
                  "between the top tokens, and the library's equality tests run in float64.")


def identity_note(bench: Benchmark) -> str:
    """Per run: whether every output of every other row equals ``greedy_graph``'s, else which differ first.

    "Lossless" is said only of a run whose outputs all equal greedy decoding's.
    """
    lines = []
    for name, run in bench.runs.items():
        mine = [r for r in bench.records if r["model"] == name and r["method"] != "greedy_graph"]
        if not mine:
            continue
        diffs = [r for r in mine if not r.get("identical_to_greedy", True)]
        label = name if run["result"]["dtype"] in name else f"{name} ({run['result']['dtype']})"
        if not diffs:
            lines.append(f"- **{label}**: lossless on these prompts: all {len(mine)} outputs of the other rows equal "
                         "`greedy_graph`'s token for token.")
            continue
        listed = "; ".join(f"`{r['method']}` on {r['task']} prompt {r['prompt']} (first differing token: "
                           f"{r['first_difference_to_greedy']})" for r in diffs[:4])
        lines.append(f"- **{label}**: not lossless: {len(diffs)} of {len(mine)} outputs differ from greedy: {listed}"
                     + (" ..." if len(diffs) > 4 else "") + ".")
    if not lines:
        return ""
    return "**Outputs against greedy decoding**, per run:\n\n" + "\n".join(lines) + "\n\n" + IDENTITY_CAUSE


INVARIANCE_COMMAND = ("MTP_GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/invariance.py --device cuda --model MODEL "
                      "--out data/results/gpu/benchmark-invariance-MODEL.json")


def invariance_table(profile: str) -> pd.DataFrame:
    """The stored ``benchmarks/invariance.py`` runs of a profile: per run, verifier and draft shape, how
    many greedy-branch positions got logits bit-identical to one-token decoding, and the largest
    absolute logit difference (empty when none is stored)."""
    import json

    from mtp_lib.results import stored_files
    from mtp_lib.sources import announce

    rows = []
    for path in stored_files(profile, "benchmark-invariance-*.json"):
        r, name = json.loads(path.read_text()), path.name
        announce(name, r["provenance"])
        for key, s in r["summary"].items():
            verifier, shape = key.split("/")
            rows.append({"model": r["settings"]["model"], "device": r["provenance"].get("device", "?"),
                         "dtype": r["settings"]["dtype"], "verifier": verifier,
                         "draft": (f"tree {'x'.join(map(str, r['settings']['tree']))} ({len(r['trees'][shape]) + 1} "
                                   f"nodes)" if shape == "tree" else f"chain of {r['settings']['chain']}"),
                         "positions": s["nodes"], "bit-identical": round(s["exact"], 3),
                         "max |logit difference|": s["max_abs_diff"], "file": name})
    return pd.DataFrame(rows).set_index(["model", "verifier", "draft"]) if rows else pd.DataFrame()
