"""Chapter 1's tables, from the stored results of :mod:`mtp_lib.marginal_study`.

The long tables (one row per evaluated target) come first: :func:`rank_table` (rank of the
reference, hit) and :func:`nucleus_table` (next-token nucleus sizes). :func:`grouped_ci` summarizes
them per group with cluster-bootstrap intervals over samples, and :func:`subsets` gives the sample
sets the chapter reports (all samples, and the paper's first ten). The tables the chapter shows are
built from those: :func:`accuracy_table`, :func:`nucleus_summary`, :func:`figure_table`,
:func:`every_number`, :func:`paper_reference`, :func:`depth3_table` and :func:`sweep_tables`, with
paired differences (same targets) from :func:`paired_hits`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtp_lib import metrics
from mtp_lib.report import ci_text, paired_difference, paper_context
from mtp_lib.results import CachedResult

__all__ = ["accuracy_table", "depth3_lines", "depth3_table", "every_number", "figure_table", "grouped_ci", "interp_paper",
           "nucleus_summary", "nucleus_table", "paired_hits", "paper_context_rows", "paper_reference", "rank_table",
           "subsets", "sweep_lines", "sweep_tables"]

Results = Mapping[tuple[str, str], CachedResult]
READING_ERROR = 0.01  # the paper's accuracies read off its plot


def rank_table(results: Results, info: Mapping[str, Mapping[str, Any]], k: int = 5) -> Any:
    """One row per (model, task, sample, offset, top-p, evaluated target): rank and hit (top-p is NaN
    for the next token, which has no intermediate token)."""
    import pandas as pd

    rows = []
    for (model, task), res in results.items():
        for s_index, rec in enumerate(res.value["samples"]):
            for d, by_q in rec["ranks"].items():
                targets, off = rec["targets"][d], int(d)
                for q, ranks in by_q.items():
                    for j, rank in zip(targets, ranks):
                        rows.append({"model": model, "params": info[model]["params"], "task": task,
                                     "sample": rec["id"], "sample_index": s_index, "offset": off,
                                     "top_p": float(q) if off > 1 else np.nan, "target": j, "rank": rank,
                                     "hit": rank < k})
    return pd.DataFrame(rows)


def nucleus_table(results: Results, info: Mapping[str, Mapping[str, Any]]) -> Any:
    """One row per (model, task, sample, top-p, position t = j - 2): the size of the next-token nucleus."""
    import pandas as pd

    rows = []
    for (model, task), res in results.items():
        for s_index, rec in enumerate(res.value["samples"]):
            for q, sizes in rec["nucleus"].items():
                for j, size in zip(rec["targets"]["1"], sizes):
                    rows.append({"model": model, "params": info[model]["params"], "task": task, "sample": rec["id"],
                                 "sample_index": s_index, "top_p": float(q), "position": j - 2, "nucleus": size})
    return pd.DataFrame(rows)


def grouped_ci(table: Any, value: str, by: Sequence[str], kind: str) -> Any:
    """Mean of ``value`` per group of ``by`` with a 95% cluster-bootstrap interval over samples
    (``kind="accuracy"`` for hits, ``"mean"`` for any other value); columns ``value``,
    ``value_lo``, ``value_hi``, ``positions``, ``samples``."""
    import pandas as pd

    if kind not in ("accuracy", "mean"):
        raise ValueError(f"kind={kind!r} must be 'accuracy' or 'mean'")
    out = []
    for keys, part in table.groupby(list(by), sort=False, dropna=False):
        groups = part["sample"].tolist()
        if kind == "accuracy":
            ci = metrics.accuracy_with_ci(part[value].to_numpy(), groups=groups)
        else:
            ci = metrics.mean_with_ci(part[value].to_numpy(dtype=float), groups=groups)
        keys = keys if isinstance(keys, tuple) else (keys,)
        out.append({**dict(zip(by, keys)), "positions": len(part), "samples": part["sample"].nunique(),
                    value: ci.mean, f"{value}_lo": ci.lo, f"{value}_hi": ci.hi})
    return pd.DataFrame(out)


def _accuracy(table: Any, by: Sequence[str]) -> Any:
    return grouped_ci(table, "hit", by, "accuracy").rename(
        columns={"hit": "accuracy", "hit_lo": "accuracy_lo", "hit_hi": "accuracy_hi"})


def subsets(table: Any, paper_samples: int) -> list[tuple[str, Any]]:
    """The table as (series name, rows): all samples, and the paper's first ones when there are more."""
    n = int(table["sample_index"].max()) + 1
    out = [(f"{n} samples", table)]
    if n > paper_samples:
        out.append((f"first {paper_samples} samples", table[table["sample_index"] < paper_samples]))
    return out


def accuracy_table(ranks: Any, top_p: float, paper_samples: int) -> Any:
    """Top-k accuracy per model, task and offset (2nd token at ``top_p``), per sample series."""
    import pandas as pd

    main = ranks[ranks["top_p"].isna() | (ranks["top_p"] == top_p)]
    return pd.concat([_accuracy(part, ["model", "params", "task", "offset"]).assign(series=series)
                      for series, part in subsets(main, paper_samples)], ignore_index=True)


def nucleus_summary(nuclei: Any, paper_samples: int) -> Any:
    """Mean nucleus size per model, task and top-p, per sample series."""
    import pandas as pd

    return pd.concat([grouped_ci(part, "nucleus", ["model", "params", "task", "top_p"], "mean").assign(series=series)
                      for series, part in subsets(nuclei, paper_samples)], ignore_index=True)


def interp_paper(table: Any, value: str, params: float, task: str, key_col: str, key_val: Any) -> float | None:
    """The paper's Pythia curve at ``params`` (linear in log-parameters), or None outside its range."""
    part = table[(table["family"] == "Pythia") & (table["task"] == task) & (table[key_col] == key_val)]
    part = part.sort_values("params")
    x = np.log(part["params"].to_numpy(dtype=float))
    if not len(part) or not x[0] <= np.log(params) <= x[-1]:
        return None
    return float(np.interp(np.log(params), x, part[value].to_numpy(dtype=float)))


def figure_table(acc: Any, paper1: Any, k: int) -> Any:
    """Figure 1.1's numbers: ours with intervals, and the paper's Pythia at the same size as context."""
    import pandas as pd

    main_series = acc["series"].iloc[0]
    rows = []
    for (model, task), part in acc[acc["series"] == main_series].groupby(["model", "task"], sort=False):
        for _, r in part.iterrows():
            ref = interp_paper(paper1, "accuracy", r.params, task, "offset", r.offset)
            rows.append({"model": model, "task": task, "predicted": {1: "next token", 2: "2nd token"}[r.offset],
                         f"ours, top-{k} [95% CI]": ci_text((r.accuracy, r.accuracy_lo, r.accuracy_hi)),
                         "positions": r.positions,
                         f"paper's Pythia at this size (interpolated, ±{READING_ERROR:g} read off)":
                             "-" if ref is None else f"{ref:.2f}"})
    return pd.DataFrame(rows).set_index(["model", "task", "predicted"])


def every_number(ranks: Any, nuclei: Any, *, top_p: float, nucleus_top_p: Sequence[float],
                 paper_samples: int) -> Any:
    """Table 1.1: next and 2nd-token accuracies (top_p and the nucleus top-p) and nucleus sizes, with intervals."""
    import pandas as pd

    rows = []
    shown = {float(top_p), *(float(x) for x in nucleus_top_p)}
    for series, part in subsets(ranks, paper_samples):
        sub_nuc = nuclei[nuclei["sample_index"].isin(part["sample_index"].unique())]
        for (model, task), grp in part.groupby(["model", "task"], sort=False):
            nxt = _accuracy(grp[grp["offset"] == 1], ["model"]).iloc[0]
            second = grp[grp["offset"] == 2]
            n2 = len(second[second["top_p"] == top_p])
            row = {"model": model, "task": task, "samples": series,
                   "positions (next / 2nd)": f"{nxt.positions} / {n2}",
                   "next token": ci_text((nxt.accuracy, nxt.accuracy_lo, nxt.accuracy_hi))}
            for q in sorted((q for q in second["top_p"].unique() if q in shown), reverse=True):
                r = _accuracy(second[second["top_p"] == q], ["model"]).iloc[0]
                row[f"2nd token, top-{q:g}"] = ci_text((r.accuracy, r.accuracy_lo, r.accuracy_hi))
            nn = sub_nuc[(sub_nuc["model"] == model) & (sub_nuc["task"] == task)]
            for q in sorted({float(x) for x in nucleus_top_p}, reverse=True):
                r = grouped_ci(nn[nn["top_p"] == q], "nucleus", ["model"], "mean").iloc[0]
                row[f"nucleus, top-{q:g}"] = ci_text((r.nucleus, r.nucleus_lo, r.nucleus_hi), 0)
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "task", "samples"])


def paper_reference(paper1: Any, paper4: Any, tasks: Sequence[str]) -> Any:
    """The paper's values read off its Figures 1 and 4, for Pythia 160M and 410M and Llama-3 8B."""
    import pandas as pd

    rows = []
    for family, name in [("Pythia", "160M"), ("Pythia", "410M"), ("Llama-3", "8B")]:
        for task in tasks:
            a = paper1[(paper1["family"] == family) & (paper1["model"] == name) & (paper1["task"] == task)]
            b = paper4[(paper4["family"] == family) & (paper4["model"] == name) & (paper4["task"] == task)]
            row: dict[str, Any] = {"model": f"{family} {name}", "task": task,
                                   "next token": float(a[a["offset"] == 1]["accuracy"].iloc[0]),
                                   "2nd token, top-0.99": float(a[a["offset"] == 2]["accuracy"].iloc[0])}
            for q in (0.99, 0.9):
                v = b[b["top_p"] == q]["nucleus"]
                row[f"nucleus, top-{q:g}"] = f"{float(v.iloc[0]):g}" if len(v) else "-"
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "task"])


def paired_hits(ranks: Any, a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[Any, Any, list[Any]]:
    """Hits of two selections of ``ranks`` on the same (model, task, sample, target): arrays ``a``,
    ``b`` and the sample of each pair, for :func:`mtp_lib.report.paired_difference`.

    A selection maps columns to values, e.g. ``{"offset": 2, "top_p": 0.99}``.
    """
    def pick(sel: Mapping[str, Any]) -> Any:
        mask = np.ones(len(ranks), dtype=bool)
        for col, val in sel.items():
            mask &= (ranks[col] == val).to_numpy()
        return ranks[mask][["model", "task", "sample", "target", "hit"]]

    both = pick(a).merge(pick(b), on=["model", "task", "sample", "target"], suffixes=("_a", "_b"))
    if len(both) == 0:
        raise ValueError(f"the selections {dict(a)} and {dict(b)} share no (sample, target): nothing to pair")
    return (both["hit_a"].to_numpy(dtype=float), both["hit_b"].to_numpy(dtype=float), both["sample"].tolist())


def _paired(ranks: Any, a: Mapping[str, Any], b: Mapping[str, Any]) -> metrics.Interval:
    x, y, groups = paired_hits(ranks, a, b)
    return paired_difference(x, y, groups=groups)


def depth3_table(d3_ranks: Any, ranks: Any, depth3: Results, *, depth3_top_p: float,
                 top_p: float) -> tuple[Any, Any]:
    """Figure 1.3's accuracies per model, task and offset (``d3``), and the table beside it: next, 2nd and
    3rd-token accuracies at the depth-3 top-p, the paired step 2nd -> 3rd (same targets), the 2nd token
    at ``top_p`` on the same samples, and the cost (tokens fed, seconds) per position."""
    import pandas as pd

    d3 = _accuracy(d3_ranks, ["model", "params", "task", "offset"])
    rows = []
    for (model, task), res in depth3.items():
        samples = res.value["samples"]
        n_pos = sum(len(s["targets"]["3"]) for s in samples)
        part = d3[(d3["model"] == model) & (d3["task"] == task)].set_index("offset")
        row: dict[str, Any] = {"model": model, "task": task, "positions (2nd, 3rd)": n_pos}
        for off in (1, 2, 3):
            r = part.loc[off]
            name = {1: "next", 2: f"2nd, top-{depth3_top_p:g}", 3: f"3rd, top-{depth3_top_p:g}"}[off]
            row[name] = ci_text((r.accuracy, r.accuracy_lo, r.accuracy_hi))
        own = d3_ranks[(d3_ranks["model"] == model) & (d3_ranks["task"] == task)]
        row["3rd - 2nd (paired)"] = ci_text(_paired(own, {"offset": 3}, {"offset": 2}), signed=True)
        ids = [s["id"] for s in samples]
        main_part = ranks[(ranks["model"] == model) & (ranks["task"] == task) & (ranks["offset"] == 2)
                          & (ranks["top_p"] == top_p) & ranks["sample"].isin(ids)]
        if len(main_part):
            r = _accuracy(main_part, ["model"]).iloc[0]
            row[f"2nd, top-{top_p:g} (same samples)"] = ci_text((r.accuracy, r.accuracy_lo, r.accuracy_hi))
        fed = {d: sum(s["tokens_fed"][d] for s in samples) / n_pos for d in ("2", "3")}
        row.update({"tokens fed per position, 2nd": round(fed["2"], 1), "tokens fed per position, 3rd":
                    round(fed["3"], 1), "seconds per position, 3rd": round(sum(s["seconds"]["3"] for s in samples)
                                                                           / n_pos, 2)})
        rows.append(row)
    return d3, pd.DataFrame(rows).set_index(["model", "task"])


def sweep_tables(sweep_ranks: Any, sweep_nuc: Any, runs: Results, *, sweep_top_p: Sequence[float],
                 models: Sequence[str], tasks: Sequence[str]) -> tuple[Any, Any, dict[tuple[str, str], Any]]:
    """Figure 1.4's data: 2nd-token accuracy and mean candidates per top-p with intervals (``sweep``),
    the table shown under it (with each top-p's paired difference from the largest one, on the same
    targets), and per (model, task) the measured throughput (candidate tokens per second, device)."""
    import pandas as pd

    sr = sweep_ranks[(sweep_ranks["offset"] == 2) & sweep_ranks["top_p"].isin(sweep_top_p)]
    acc = grouped_ci(sr, "hit", ["model", "task", "top_p"], "accuracy")
    cost = grouped_ci(sweep_nuc[sweep_nuc["top_p"].isin(sweep_top_p)], "nucleus", ["model", "task", "top_p"], "mean")
    sweep = acc.merge(cost.drop(columns=["positions", "samples"]), on=["model", "task", "top_p"])
    order = {**{m: i for i, m in enumerate(models)}, **{t: i for i, t in enumerate(tasks)}}
    sweep = sweep.sort_values(["model", "task", "top_p"], key=lambda c: c.map(order) if c.name != "top_p" else c)
    sweep = sweep.rename(columns={"hit": "accuracy", "hit_lo": "accuracy_lo", "hit_hi": "accuracy_hi",
                                  "nucleus": "candidates", "nucleus_lo": "candidates_lo",
                                  "nucleus_hi": "candidates_hi"})
    speed = {}
    for key, res in runs.items():
        s = res.value["samples"]
        rate = sum(x["tokens_fed"]["2"] for x in s) / max(sum(x["seconds"]["2"] for x in s), 1e-9)
        speed[key] = (rate, res.provenance["device"])
    hi_q = max(float(q) for q in sweep_top_p)
    rows, diffs = [], []
    for _, r in sweep.iterrows():
        diff = (metrics.Interval(0.0, 0.0, 0.0) if r.top_p == hi_q else
                _paired(sr[(sr["model"] == r.model) & (sr["task"] == r.task)], {"top_p": r.top_p}, {"top_p": hi_q}))
        diffs.append(diff)
        rows.append({"model": r.model, "task": r.task, "top-p": r.top_p,
                     "2nd-token accuracy": ci_text((r.accuracy, r.accuracy_lo, r.accuracy_hi)),
                     f"difference from top-{hi_q:g} (paired)": "-" if r.top_p == hi_q else ci_text(diff, signed=True),
                     "candidates per position": round(r.candidates, 1),
                     "seconds per position (at the run's speed)": round(r.candidates / speed[r.model, r.task][0], 3)})
    sweep = sweep.assign(diff=[d.mean for d in diffs], diff_lo=[d.lo for d in diffs], diff_hi=[d.hi for d in diffs])
    return sweep, pd.DataFrame(rows).set_index(["model", "task", "top-p"]), speed


def paper_context_rows(acc: Any, nuc: Any, paper1: Any, paper4: Any, info: Mapping[str, Mapping[str, Any]],
                       tasks: Sequence[str]) -> list[str]:
    """Per model: our accuracies beside the paper's Pythia at the same size, as context (no verdict)."""
    main_series = acc["series"].iloc[0]
    main = acc[acc["series"] == main_series].set_index(["model", "task", "offset"])
    lines = []
    for model in dict.fromkeys(acc["model"]):
        params = info[model]["params"]
        parts = []
        for task in tasks:
            for off in (1, 2):
                r = main.loc[(model, task, off)]
                ref = interp_paper(paper1, "accuracy", params, task, "offset", off)
                if ref is not None:
                    parts.append(f"{task} {'next' if off == 1 else '2nd'} "
                                 + paper_context((r.accuracy, r.accuracy_lo, r.accuracy_hi), ref,
                                                 reading_error=READING_ERROR, label="Pythia"))
        nuc_part = nuc[(nuc["series"] == main_series) & (nuc["model"] == model) & (nuc["top_p"] == 0.99)]
        sizes = []
        for task in tasks:
            ours = nuc_part[nuc_part["task"] == task]
            ref = interp_paper(paper4, "nucleus", params, task, "top_p", 0.99)
            if len(ours) and ref is not None:
                o = ours.iloc[0]
                sizes.append(f"{task} {ci_text((o.nucleus, o.nucleus_lo, o.nucleus_hi), 0)} (Pythia: about {ref:.0f})")
        if not parts:
            lines.append(f"- **{model}** ({params / 1e6:.2g}M parameters): outside the paper's Pythia sizes.")
            continue
        lines.append(f"- **{model}** ({params / 1e6:.0f}M parameters): top-5 accuracy " + "; ".join(parts)
                     + (". Mean top-0.99 nucleus " + "; ".join(sizes) if sizes else "") + ".")
    return lines


def depth3_lines(d3: Any, table: Any, depth3_top_p: float) -> list[str]:
    """Per model and task: next, 2nd and 3rd-token accuracies and what the 3rd token cost against the 2nd."""
    lines = []
    for (model, task), row in table.iterrows():
        part = d3[(d3["model"] == model) & (d3["task"] == task)].set_index("offset")["accuracy"]
        fed2, fed3 = row["tokens fed per position, 2nd"], row["tokens fed per position, 3rd"]
        lines.append(f"- **{model}, {task}**: next {part[1]:.2f}, 2nd {part[2]:.2f}, 3rd {part[3]:.2f} "
                     f"(top-{depth3_top_p:g}; 3rd - 2nd on the same targets {row['3rd - 2nd (paired)']}); the 3rd "
                     f"token fed {fed3:.0f} tokens per position, {fed3 / max(fed2, 1e-9):.0f} times the 2nd token's "
                     f"{fed2:.0f}.")
    return lines


def sweep_lines(sweep: Any, speed: Mapping[tuple[str, str], tuple[float, str]]) -> list[str]:
    """Per model and task: accuracy and candidates at the largest top-p, what each smaller top-p keeps
    (with its paired difference on the same targets), and the measured throughput."""
    lines = []
    for (model, task), part in sweep.groupby(["model", "task"], sort=False):
        part = part.set_index("top_p")
        hi_q = max(part.index)
        best = part.loc[hi_q]
        parts = []
        for q in part.index:
            if q < hi_q:
                r = part.loc[q]
                parts.append(f"top-{q:g} keeps {r.accuracy:.2f} ({ci_text((r['diff'], r.diff_lo, r.diff_hi), signed=True)}"
                             f" paired) with {r.candidates / best.candidates:.1%} of the candidates")
        rate, where = speed[(model, task)]
        lines.append(f"- **{model}, {task}**: at top-{hi_q:g} the 2nd-token accuracy is {best.accuracy:.2f} for "
                     f"{best.candidates:.0f} candidates per position; " + "; ".join(parts)
                     + f". Measured throughput: {rate:.0f} candidate tokens per second on {where}.")
    return lines
