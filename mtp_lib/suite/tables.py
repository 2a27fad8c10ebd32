"""Chapter 5's tables and the size claims' verdicts, from the suite's cached results.

The claims are trends over model size. Every size is evaluated on the same samples and the same
target tokens (one tokenizer), so a trend is estimated *paired*: a bootstrap draws samples, every
size's statistic is recomputed on the drawn samples, and the least-squares slope against
log10(non-embedding parameters) is fitted to those; the 95% percentile interval of the slope goes
to :func:`mtp_lib.report.verdict`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mtp_lib.metrics import Interval, mean_with_ci
from mtp_lib.report import Direction, verdict
from mtp_lib.suite.shapes import attention_flops_per_token
from mtp_lib.tuned_lens_tables import lens_rows

__all__ = ["accuracy_frame", "along_frame", "kl_at_depth", "kl_frame", "lens_agreement", "loss_frame", "nucleus_frame",
           "paired_trend", "pythia", "size_claims", "size_table", "source_table", "standin_text",
           "kernel_shares", "throughput_benchmarks", "throughput_note", "throughput_table", "tuned_kl_at_depth"]

TASKS = ("translation", "open-ended")
OFFSETS = {1: "next", 2: "second"}
MODEL = "book suite"


def size_table(trains: Mapping[str, Any]) -> pd.DataFrame:
    """One row per size: shape, parameters, tokens seen (per parameter, epochs), loss, speed."""
    rows = []
    for size, r in trains.items():
        v = r.value
        s = v["shape"]
        rows.append({"size": size, "d / L / H": f"{s['d_model']} / {s['n_layers']} / {s['n_heads']}",
                     "params": v["params"], "non-embedding params": v["non_embedding_params"],
                     "tokens seen": v["train_tokens"], "tokens per non-emb. param": round(
                         v["train_tokens"] / v["non_embedding_params"]), "epochs": round(v["epochs"], 2),
                     "peak lr": v["recipe"]["peak_lr"], "final loss": v["final_loss"],
                     "tokens/s": v["tokens_per_s"], "MFU": v["mfu"], "device": v["throughput"]["device"]})
    return pd.DataFrame(rows).set_index("size")


MFU_GOAL = 0.40  # issue 15's goal for the 160m size (PaLM's model FLOPs over the card's dense bf16 peak)


def throughput_table(benchmarks: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``benchmarks/pretrain.py``'s rows (a size at a micro batch, compiled or not: a few timed steps of
    the suite's own training), one per row of every stored run, with the card that ran it and whether
    its MFU reaches :data:`MFU_GOAL`."""
    rows = []
    for bench in benchmarks:
        device = bench["provenance"].get("device", "?")
        for r in bench["rows"]:
            rows.append({"size": r["size"], "micro batch": r["micro_batch"], "compiled": r["compile"],
                         "tokens/s": round(r["tokens_per_s"]), "MFU": r["mfu"],
                         f"MFU >= {MFU_GOAL:.2f}": None if r["mfu"] is None else r["mfu"] >= MFU_GOAL,
                         "timed steps": r["timed_steps"], "device": device})
    return pd.DataFrame(rows)


# a device kernel's family, by its name: cuDNN/flash attention, cuBLAS (nvjet) or CUTLASS matmuls,
# Inductor's fused Triton kernels (elementwise, norms, the loss); the first pattern that matches wins
KERNEL_FAMILIES = (("attention", re.compile(r"sdpa|flash|fmha|attention|dot_do_o")),
                   ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma")),
                   ("fused (Triton)", re.compile(r"^triton_")))


def kernel_shares(lines: Sequence[str]) -> dict[str, Any]:
    """Where a benchmarked step's device time goes, from ``benchmarks/pretrain.py --kernels``' lines:
    the profiled span (ms, steps) and each kernel family's share of it (the top kernels only: the
    kernels outside them and the idle time make up ``"other"``)."""
    head = re.match(r"(\d+) steps: kernels busy [\d.]+% of ([\d.]+) ms", lines[0]) if lines else None
    if head is None:
        raise ValueError("not the kernel lines of benchmarks/pretrain.py --kernels (their first line is "
                         f"'N steps: kernels busy X% of T ms ...'): {lines[:1]}")
    span = float(head.group(2))
    ms = dict.fromkeys([name for name, _ in KERNEL_FAMILIES] + ["other"], 0.0)
    for line in lines[2:]:  # "   ms  calls  us/call  name", after the table's header
        total, _, _, name = line.split(None, 3)
        family = next((f for f, pattern in KERNEL_FAMILIES if pattern.search(name)), "other")
        ms[family] += float(total)
    ms["other"] += span - sum(ms.values())
    return {"steps": int(head.group(1)), "span_ms": span, "shares": {f: v / span for f, v in ms.items()}}


def throughput_note(benchmarks: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per stored run, its best MFU against :data:`MFU_GOAL` and, where the run profiled its
    first setting's kernels, where that setting's step time goes."""
    lines = []
    for bench in benchmarks:
        device, rows = bench["provenance"].get("device", "?"), [r for r in bench["rows"] if r["mfu"] is not None]
        for size in dict.fromkeys(r["size"] for r in rows):
            best = max((r for r in rows if r["size"] == size), key=lambda r: r["mfu"])
            gap = "reaches the goal" if best["mfu"] >= MFU_GOAL else f"{MFU_GOAL - best['mfu']:.3f} short of the goal"
            lines.append(f"- **{size}** on the {device}: best MFU {best['mfu']:.3f} (micro batch {best['micro_batch']}, "
                         f"{best['tokens_per_s']:,.0f} tokens/s), {gap} of {MFU_GOAL:.2f}.")
        if bench.get("kernels") and bench["rows"]:
            k, first = kernel_shares(bench["kernels"]), bench["rows"][0]
            attention = attention_flops_per_token(first["size"], bench["settings"]["seq_len"]) / first["flops_per_token"]
            parts = ", ".join(f"{family} {share:.0%}" for family, share in k["shares"].items())
            lines.append(f"  Its step at micro batch {first['micro_batch']} takes {k['span_ms'] / k['steps']:.1f} ms "
                         f"({k['steps']} profiled steps): {parts} (other: kernels outside the top 20 and idle time); "
                         f"attention is {attention:.0%} of the model FLOPs counted.")
    return "\n".join(lines)


def throughput_benchmarks(profile: str) -> list[dict[str, Any]]:
    """The stored runs of ``benchmarks/pretrain.py`` (``benchmark-pretrain-*.json``) of ``profile``."""
    import json

    from mtp_lib.results import stored_files

    return [json.loads(path.read_text()) for path in stored_files(profile, "benchmark-pretrain-*.json")]


def loss_frame(trains: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"size": size, **h} for size, r in trains.items() for h in r.value["history"]])


def _hits(records: Sequence[Mapping[str, Any]], offset: int) -> tuple[np.ndarray, list[str]]:
    key = OFFSETS[offset]
    values = [h for rec in records for h in rec[key]]
    groups = [rec["id"] for rec in records for _ in rec[key]]
    return np.asarray(values, dtype=float), groups


def _nominal(size: str, trains: Mapping[str, Any]) -> float:
    # Pythia sizes sit at their nominal size (as the paper's axis); ours otherwise at their parameters
    return float(size[:-1]) * (1e6 if size.endswith("m") else 1e9) if size[0].isdigit() else float(
        trains[size].value["params"])


def accuracy_frame(trains: Mapping[str, Any], analyses: Mapping[str, Any]) -> pd.DataFrame:
    """Rows for :func:`mtp_lib.plots.marginal.accuracy_by_size`: top-k accuracy with intervals."""
    rows = []
    for size, a in analyses.items():
        for task in TASKS:
            for offset in OFFSETS:
                hits, groups = _hits(a.value["final"][task], offset)
                ci = mean_with_ci(hits, groups=groups)
                rows.append({"model": MODEL, "size": size, "params": _nominal(size, trains), "task": task,
                             "offset": offset, "accuracy": ci.mean, "accuracy_lo": ci.lo, "accuracy_hi": ci.hi})
    return pd.DataFrame(rows)


def nucleus_frame(trains: Mapping[str, Any], analyses: Mapping[str, Any]) -> pd.DataFrame:
    """Rows for :func:`mtp_lib.plots.marginal.nucleus_by_size`: mean nucleus size with intervals."""
    rows = []
    for size, a in analyses.items():
        for task in TASKS:
            records = a.value["final"][task]
            for q in records[0]["nucleus"]:
                values = [n for rec in records for n in rec["nucleus"][q]]
                groups = [rec["id"] for rec in records for _ in rec["nucleus"][q]]
                ci = mean_with_ci(np.asarray(values, dtype=float), groups=groups)
                rows.append({"model": MODEL, "size": size, "params": _nominal(size, trains), "task": task,
                             "top_p": float(q), "nucleus": ci.mean, "nucleus_lo": ci.lo, "nucleus_hi": ci.hi})
    return pd.DataFrame(rows)


def kl_frame(analyses: Mapping[str, Any], task: str = "translation") -> pd.DataFrame:
    """Rows for :func:`mtp_lib.plots.lens.kl_by_depth`: per size, sample and layer l, KL at depth l / L."""
    rows = []
    for size, a in analyses.items():
        for per_sample in a.value["lens"][task]:
            n = len(per_sample)
            rows += [{"model": size, "depth": (i + 1) / n, "kl": kl} for i, kl in enumerate(per_sample)]
    return pd.DataFrame(rows)


def along_frame(trains: Mapping[str, Any], analyses: Mapping[str, Any]) -> pd.DataFrame:
    """2nd- and next-token accuracy at each log-spaced snapshot and at the final weights, on the
    snapshots' samples (the first ``along_samples`` of the final analysis')."""
    rows = []
    for size, a in analyses.items():
        tokens_per_step = trains[size].value["train_tokens"] / trains[size].value["recipe"]["steps"]
        steps = {**a.value["along"], str(trains[size].value["recipe"]["steps"]): a.value["final"]}
        first = next(iter(a.value["along"].values()))
        for step, by_task in steps.items():
            for task in TASKS:
                for offset in OFFSETS:
                    hits, _ = _hits(by_task[task][:len(first[task])], offset)
                    rows.append({"size": size, "step": int(step), "tokens": int(step) * tokens_per_step,
                                 "task": task, "offset": offset, "accuracy": float(hits.mean())})
    return pd.DataFrame(rows)


def kl_at_depth(per_sample: Sequence[float], depth: float = 0.5) -> float:
    """KL at normalized depth ``depth``, linearly interpolated between layers (layer l at l / L)."""
    n = len(per_sample)
    return float(np.interp(depth, np.arange(1, n + 1) / n, per_sample))


def tuned_kl_at_depth(value: Mapping[str, Any], depth: float = 0.5) -> np.ndarray:
    """Per sample: the tuned lens's KL(q_l || p_L) at normalized depth ``depth`` (linear between its layers
    l / L, the last layer being the output itself), from a ``ch05-tuned`` result."""
    rows = lens_rows(value, "tuned", "kl")
    layers = sorted(rows)
    grid = np.array(layers) / value["n_layers"]
    table = np.stack([rows[layer] for layer in layers])  # [layers, samples]
    return np.array([np.interp(depth, grid, table[:, s]) for s in range(table.shape[1])])


def lens_agreement(analyses: Mapping[str, Any], tuned: Mapping[str, Any]) -> pd.DataFrame:
    """Per size with both results: the logit lens's mean KL at half depth as the analysis stored it and
    as the tuned-lens run scored it on the same positions. Equal when both read the same weights; a
    difference measures how far a retraining of the same recipe moved them (the weights are not kept)."""
    rows = []
    for size in analyses:
        if size not in tuned:
            continue
        first = np.mean([kl_at_depth(p) for p in analyses[size].value["lens"]["translation"]])
        logit = np.asarray(tuned[size].value["logit"]["kl"], dtype=float).T  # [samples, layers]
        second = np.mean([kl_at_depth(p) for p in logit])
        rows.append({"size": size, "KL at half depth, analysis": round(float(first), 4),
                     "KL at half depth, tuned-lens run": round(float(second), 4),
                     "difference": round(float(second - first), 4),
                     "devices (analysis / lens)": f"{analyses[size].value.get('device', '?')} / "
                                                  f"{tuned[size].value.get('device', '?')}"})
    return pd.DataFrame(rows).set_index("size") if rows else pd.DataFrame()


def paired_trend(stat: Callable[[str, np.ndarray], float], sizes: Sequence[str], x: Sequence[float],
                 n_samples: int, *, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Slope of ``stat(size, samples)`` against ``x`` (least squares), with a paired bootstrap: every
    draw of sample indices is shared by all sizes. ``stat`` gets the size and an index array."""
    xs = np.asarray(x, dtype=float)
    xs = xs - xs.mean()

    def slope(idx: np.ndarray) -> float:
        ys = np.array([stat(s, idx) for s in sizes])
        return float((xs * (ys - ys.mean())).sum() / (xs ** 2).sum())

    rng = np.random.default_rng(seed)
    boots = [slope(rng.integers(0, n_samples, n_samples)) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return Interval(slope(np.arange(n_samples)), float(lo), float(hi))


def _per_sample(analyses: Mapping[str, Any], size: str, task: str, fn: Callable[[Mapping[str, Any]], float]
                ) -> np.ndarray:
    return np.array([fn(rec) for rec in analyses[size].value["final"][task]])


Stat = Callable[[str, np.ndarray], float]


def _mean_of(per_size: Mapping[str, np.ndarray], log: bool = False) -> Stat:
    """The statistic "mean over the drawn samples" (its log10 with ``log``) of per-sample values."""
    def stat(size: str, idx: np.ndarray) -> float:
        mean = float(per_size[size][idx].mean())
        return float(np.log10(mean)) if log else mean
    return stat


def _claims_of_task(trains: Mapping[str, Any], analyses: Mapping[str, Any], sizes: list[str], task: str,
                    tuned: Mapping[str, Any]) -> list[tuple[str, str, Direction, Stat, int]]:
    def per_sample(fn: Callable[[Mapping[str, Any]], float]) -> dict[str, np.ndarray]:
        return {s: _per_sample(analyses, s, task, fn) for s in sizes}

    q = max(analyses[sizes[0]].value["final"][task][0]["nucleus"], key=float)  # the marginal's own top-p
    acc2 = per_sample(lambda r: float(np.mean(r["second"])))
    nuc = per_sample(lambda r: float(np.mean(r["nucleus"][q])))
    n = len(acc2[sizes[0]])
    checks: list[tuple[str, str, Direction, Stat, int]] = [
        ("2nd-token accuracy grows with size", "accuracy per decade", "greater", _mean_of(acc2), n),
        (f"the top-{q} nucleus shrinks with size", "log10 candidates per decade", "less", _mean_of(nuc, log=True), n)]
    if task == "translation":
        kl = {s: np.array([kl_at_depth(p) for p in analyses[s].value["lens"][task]]) for s in sizes}
        checks.append(("layers specialize earlier in larger models (logit lens: KL at half depth falls)",
                       "nats per decade", "less", _mean_of(kl), n))
        if all(s in tuned for s in sizes):
            kl_tuned = {s: tuned_kl_at_depth(tuned[s].value) for s in sizes}
            checks.append(("layers specialize earlier in larger models (tuned lens: KL at half depth falls)",
                           "nats per decade", "less", _mean_of(kl_tuned), len(kl_tuned[sizes[0]])))
    return checks


def size_claims(trains: Mapping[str, Any], analyses: Mapping[str, Any], tuned: Mapping[str, Any] | None = None, *,
                min_samples: int = 5, n_boot: int = 2000) -> pd.DataFrame:
    """The paper's size claims, each a paired trend over our sizes with its verdict.

    - 2nd-token accuracy grows with size (Figure 1): slope of accuracy per decade of parameters > 0;
    - the nucleus shrinks with size (Figure 4): slope of log10(mean top-p nucleus) < 0;
    - layers specialize earlier in larger models (Figure 2): slope of the logit lens' KL at half
      depth < 0 (on the translation positions, as the paper), and the same with the tuned lens
      (:mod:`mtp_lib.suite.tuned`) where ``tuned`` holds every size.
    """
    sizes = sorted(analyses, key=lambda s: trains[s].value["non_embedding_params"])
    x = [float(np.log10(trains[s].value["non_embedding_params"])) for s in sizes]
    rows = []
    for task in TASKS:
        for claim, unit, direction, stat, n in _claims_of_task(trains, analyses, sizes, task, tuned or {}):
            trend = paired_trend(stat, sizes, x, n, n_boot=n_boot)
            v = verdict(trend, direction=direction, samples=n, min_samples=min_samples)
            rows.append({"claim": claim, "task": task, "slope": f"{v.text.split(':')[0]} {unit}",
                         "verdict": v.label,
                         "per size": ", ".join(f"{s} {stat(s, np.arange(n)):.3g}" for s in sizes)})
    return pd.DataFrame(rows)


def source_table(manifest: Mapping[str, Any]) -> pd.DataFrame:
    """The stream's sources: package, licence, documents, words, tokens and share of the stream."""
    rows = [{"source": name, "package": f"{s['package']} {s['version']} ({s['registry']})", "licence": s["licence"],
             "documents": s["documents"], "words": s["words"], "tokens": s["tokens"],
             "share": round(s["tokens"] / manifest["tokens"], 3), "what": s["description"]}
            for name, s in manifest["sources"].items()]
    return pd.DataFrame(rows).set_index("source")


def standin_text(trains: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """Where a suite this small and this briefly trained can and cannot stand in for Pythia, in numbers:
    Pythia's models saw 300B tokens of the Pile (about 1.5 epochs of a 207B-token deduplicated
    corpus; Biderman et al. 2023)."""
    pythia_tokens = 300e9
    lines = []
    for size, r in trains.items():
        v = r.value
        ours = v["train_tokens"] / v["non_embedding_params"]
        line = (f"- **{size}**: {v['train_tokens']:,} tokens seen, {ours:,.1f} per non-embedding parameter "
                f"({v['epochs']:.2g} epochs of our stream)")
        if size[0].isdigit():  # a Pythia shape: same non-embedding parameters as Pythia's model
            theirs = pythia_tokens / v["non_embedding_params"]
            line += f"; Pythia-{size} saw {theirs:,.0f} per non-embedding parameter, {theirs / ours:,.0f} times more"
        lines.append(line + ".")
    return ("Our stream holds {:,} tokens ({:,} documents) of public-domain and permissively licensed English "
            "(books of the 18th-19th centuries, a 1961 corpus, a Bible, a 1913 dictionary, miscellaneous "
            "sentences) and Spanish-English verse pairs: a far narrower, older and smaller domain than the Pile's "
            "825 GB of web, code, papers and books.\n\n".format(manifest["tokens"], manifest["documents"])
            + "\n".join(lines))


def pythia(paper: pd.DataFrame) -> pd.DataFrame:
    """The paper's Pythia rows of one of its read-off tables (not Llama-3: another family)."""
    return paper[paper["family"] == "Pythia"]
