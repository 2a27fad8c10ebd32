"""Chapter 4's benchmark runs: measured here through the result cache, or read from stored benchmark files.

Every number of Chapter 4 comes from ``benchmarks/speculative.py``, one run per model. A
:class:`SpecSetup` holds the chapter's parameters. :func:`load_runs` either runs the benchmark here
(``cpu`` and ``tiny`` profiles: result ``ch04-benchmark``, keyed by the model, dtype, device and the
benchmark's whole command line, :meth:`SpecSetup.benchmark_argv`) or reads the JSON files matching
``benchmark_glob`` (``gpu`` profile), the newest run per model and dtype. A run is a dict with
``result`` (the benchmark's JSON), ``source`` (its file name), ``key`` and ``loaded``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import sys
import warnings
from typing import Any

__all__ = ["VERSIONS", "SpecSetup", "load_benchmark", "load_runs", "run_info_table", "runs_table"]

VERSIONS = {"ch04-benchmark": 1, "ch04-text": 1}  # bump when a computation changes


def load_benchmark() -> Any:
    """``benchmarks/speculative.py`` as a module (it is a script, not part of mtp_lib)."""
    from .results import repo_root

    path = repo_root() / "benchmarks" / "speculative.py"
    spec = importlib.util.spec_from_file_location("speculative_benchmark", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"the benchmark script {path} is missing: Chapter 4 needs the repository's benchmarks/")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class SpecSetup:
    """Chapter 4's parameters (see its parameters cell); ``device`` and ``dtype`` resolved on creation."""

    models: list[str]
    benchmark_glob: str
    tasks: list[str]
    n_prompts: int
    max_new_tokens: int
    open_prompt_tokens: int
    methods: list[str]
    head_counts: list[int]
    train_prompts: int
    distill_tokens: int
    epochs: int
    lr: float
    head_init: str
    batch: int
    tree_nodes: list[int]
    calib_prompts: int
    oracle_prompts: int
    oracle_top_p: float
    prompt_lookup: int
    repeats: int
    threads: int
    seed: int
    dtype: str
    device: Any
    profile: str
    recompute: bool = False

    def __post_init__(self) -> None:
        from . import models as M

        self.device = M.resolve_device(self.device)
        self.dtype = str(M.resolve_dtype(self.dtype, self.device)).replace("torch.", "")

    @property
    def measure_here(self) -> bool:
        return not self.benchmark_glob

    def benchmark_argv(self, name: str) -> list[str]:
        """The benchmark's command line for one model (part of the cache key: do not reorder)."""
        argv = ["--model", name, "--device", self.device.type, "--dtype", self.dtype, "--tasks", *self.tasks,
                "--n-prompts", str(self.n_prompts), "--max-new-tokens", str(self.max_new_tokens),
                "--open-prompt-tokens", str(self.open_prompt_tokens), "--train-heads", *map(str, self.head_counts),
                "--train-prompts", str(self.train_prompts), "--distill-tokens", str(self.distill_tokens),
                "--epochs", str(self.epochs), "--lr", str(self.lr), "--batch", str(self.batch),
                "--head-init", self.head_init, "--tree-nodes", *map(str, self.tree_nodes),
                "--calib-prompts", str(self.calib_prompts), "--oracle-prompts", str(self.oracle_prompts),
                "--oracle-top-p", str(self.oracle_top_p), "--prompt-lookup", str(self.prompt_lookup),
                "--repeats", str(self.repeats), "--seed", str(self.seed)]
        if self.methods:
            argv += ["--methods", *self.methods]
        if self.threads > 0:
            argv += ["--threads", str(self.threads)]
        return argv

    def describe(self) -> str:
        """The run settings as one Markdown paragraph."""
        import torch
        import transformers

        from .results import device_name

        if self.measure_here:
            how = (f"measured in this chapter ({self.dtype}, {self.threads if self.threads > 0 else 'default'} torch "
                   f"thread(s)): {self.n_prompts} prompt(s) per task ({', '.join(self.tasks)}), at most "
                   f"{self.max_new_tokens} new tokens, heads {self.head_counts} trained on {self.train_prompts} prompts x "
                   f"{self.distill_tokens} greedy tokens, {self.epochs} epoch(s); trees of {self.tree_nodes} nodes; "
                   f"oracle on {self.oracle_prompts} prompt(s) per task at top-p {self.oracle_top_p}")
        else:
            how = f"read from the benchmark files `{self.benchmark_glob}` of profile `{self.profile}`"
        return (f"**Run settings.** profile `{self.profile}`, this kernel's device: {device_name(self.device)}, torch "
                f"{torch.__version__}, transformers {transformers.__version__}, models: "
                f"{', '.join(f'`{m}`' for m in self.models)}; results {how}.")


def _measure(setup: SpecSetup, name: str) -> Any:
    # One benchmark run (its printed table is dropped: the chapter's tables show the same numbers)
    bench = load_benchmark()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bench.main(setup.benchmark_argv(name) + ["--no-progress"])


def _measured_runs(setup: SpecSetup) -> dict[str, dict[str, Any]]:
    from .results import cached

    runs = {}
    for name in setup.models:
        config = {"model": name, "dtype": setup.dtype, "device": setup.device.type,
                  "benchmark": setup.benchmark_argv(name)}
        res = cached("ch04-benchmark", config, lambda name=name: _measure(setup, name), profile=setup.profile,  # type: ignore[misc]
                     recompute=setup.recompute, device=setup.device, version=VERSIONS["ch04-benchmark"])
        runs[name] = {"result": res.value, "source": res.path.name, "key": res.path.stem.rsplit("-", 1)[-1],
                      "loaded": res.loaded}
    return runs


def _stored_runs(setup: SpecSetup, notes: list[str]) -> dict[str, dict[str, Any]]:
    # one run per model and dtype (the newest): a bfloat16 and a float32 run of a model both show
    from .results import config_key, stored_files
    from .sources import announce

    runs: dict[str, dict[str, Any]] = {}
    for path in stored_files(setup.profile, setup.benchmark_glob):
        text = path.read_text()
        result = json.loads(text)
        if result.get("benchmark") != "speculative":
            notes.append(f"`{path.name}` is not a speculative-decoding benchmark: skipped.")
            continue
        name = f"{result['model']['name']} {result['dtype']}"
        if result.get("complete") is False:  # written after each prompt by a run that did not finish
            done = len({(r["task"], r["prompt"]) for r in result["per_prompt"]})
            notes.append(f"`{path.name}` ({name}) is a run cut short ({done} prompts done): skipped.")
            continue
        date = result["provenance"].get("date", "")
        if name in runs and runs[name]["result"]["provenance"].get("date", "") >= date:
            notes.append(f"`{path.name}` ({name}) is older than `{runs[name]['source']}`: skipped.")
            continue
        runs[name] = {"result": result, "source": path.name, "loaded": True,
                      "key": config_key({"file": path.name, "text": text}, 1)}
        announce(path.name, result["provenance"])  # the cell's note, where the code that ran has changed since
    for name in setup.models:
        if not any(run["result"]["model"]["name"] == name for run in runs.values()):
            notes.append(
                f"No benchmark file for `{name}` matches `{setup.benchmark_glob}` in `data/results/{setup.profile}/`. "
                f"On a GPU, run `MTP_GIT_COMMIT=$(git rev-parse HEAD) python benchmarks/speculative.py --device cuda "
                f"--model {name} --invariant --head-init copy --n-prompts 20 --repeats 3 --eager-repeats 1 "
                f"--save-heads runs/spec-heads-{name} "
                f"--out data/results/{setup.profile}/benchmark-speculative-{name}-invariant.json` "
                "(position-invariant verification: every row must equal greedy decoding).")
    return dict(sorted(runs.items()))


def load_runs(setup: SpecSetup) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The benchmark runs (run name -> run) and notes on skipped or missing files."""
    notes: list[str] = []
    runs = _measured_runs(setup) if setup.measure_here else _stored_runs(setup, notes)
    if not runs:
        notes.insert(0, "**No results to show**: the sections below stay empty until a benchmark run is stored.")
    return runs, notes


def runs_table(runs: dict[str, dict[str, Any]]) -> Any:
    """Per run: its result file, whether it was loaded or computed now, and the run's wall time."""
    import pandas as pd

    return pd.DataFrame([{"run": n, "result": r["source"], "status": "loaded" if r["loaded"] else "computed now",
                          "wall time of the run [s]": r["result"]["provenance"].get("wall_time_s")}
                         for n, r in runs.items()]).set_index("run")


def _short_commit(prov: dict[str, Any]) -> str:
    commit = (prov.get("git_commit") or "?")[:8]
    return commit + (" (uncommitted changes)" if prov.get("git_dirty") else "")


def _heads_text(r: dict[str, Any]) -> str:
    # how the run's heads were obtained: trained here (on what, how long) or loaded
    s = r["settings"]
    heads = f"{', '.join(r['heads'])} heads" if r["heads"] else "none"
    if r["heads"] and not s.get("heads"):
        heads += (f", trained here ({s['recipe']}, heads 2..N initialized {s.get('head_init', 'random')}): "
                  f"{s['train_prompts']:,} prompts x {s['distill_tokens']} greedy tokens, {s['epochs']} epoch(s), "
                  f"lr {s['lr']:g}")
        spent = [f"{n} heads {t['seconds']:.0f} s ({t['steps']} steps)" for n, t in r.get("training", {}).items()]
        if spent:
            distill = max(t.get("distill_seconds", 0.0) for t in r["training"].values())
            heads += f"; greedy targets {distill:.0f} s, training " + ", ".join(spent)
    elif s.get("heads"):
        heads += ", loaded from trained folders"
    return heads


def _prompts_text(r: dict[str, Any]) -> str:
    # prompts per task: as asked, or as done where the run's --time-limit stopped it early
    s, done = r["settings"], r.get("prompts_done") or {}
    if not done or all(n == s["n_prompts"] for n in done.values()):
        return f"{s['n_prompts']} per task ({', '.join(s['tasks'])})"
    return (", ".join(f"{task} {n}" for task, n in done.items())
            + f" of {s['n_prompts']} per task (stopped by its {s.get('time_limit', 0):g}-minute time limit)")


def run_info_table(runs: dict[str, dict[str, Any]]) -> Any:
    """Table 4.1: per run (columns), where and with what it ran, its heads, prompts, trees and oracle."""
    import pandas as pd

    out = []
    for name, run in runs.items():
        r, s = run["result"], run["result"]["settings"]
        prov, versions = r["provenance"], r["provenance"].get("versions", {})
        out.append({
            "model": name, "device": prov.get("device"), "dtype": r["dtype"], "CUDA graphs": r["cuda_graphs"],
            "torch": versions.get("torch"), "transformers": versions.get("transformers"), "python": versions.get("python"),
            "code (git)": _short_commit(prov), "date": prov.get("date", "")[:10],
            "prompts": f"{_prompts_text(r)}, at most {s['max_new_tokens']} new tokens, "
                       f"{s['repeats']} timed run(s) each",
            "heads": _heads_text(r), "trees (nodes)": ", ".join(f"{k}: {len(v)}" for k, v in r["trees"].items()) or "-",
            "oracle": f"{s['oracle_prompts']} prompt(s) per task, top-p {s['oracle_top_p']}",
            "threads": s.get("threads") or "default"})
    return pd.DataFrame(out).set_index("model").T if out else None
