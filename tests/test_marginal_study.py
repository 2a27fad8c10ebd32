"""mtp_lib.marginal_study, marginal_tables and marginal_claims: the stored ranks against a plain forward
pass on a tiny model, the cache keys of the committed results, and the tables and verdicts against
plain loops on synthetic stored results.

Every test draws a fresh seed and prints it in its assertion messages: rerun with that seed to replay.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mtp_lib import data, marginal_claims
from mtp_lib import marginal_tables as T
from mtp_lib import models as M
from mtp_lib.marginal_study import MarginalStudy, evenly_spaced
from mtp_lib.report import CONTRADICTED, SUPPORTED, paired_difference
from mtp_lib.results import config_key, repo_root
from seeds import fresh_seed


def test_evenly_spaced_keeps_order_and_ends() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    items = sorted(rng.sample(range(1000), rng.randint(1, 40)))
    n = rng.randint(2, 50)  # one item cannot hold both ends: n = 1 is checked below
    got = evenly_spaced(items, n)
    assert got == sorted(got) and set(got) <= set(items), f"seed {seed}"
    assert got[0] == items[0] and got[-1] == items[-1], f"seed {seed}"
    assert len(got) == min(n, len(items)) or (n < len(items) and len(got) <= n), f"seed {seed}"
    assert evenly_spaced(items, 1) == items[:1], f"seed {seed}"  # the first


def test_configs_are_the_committed_cache_keys() -> None:
    """The gpu profile's parameters give the keys of the committed ch01 results (else `make book` recomputes)."""
    params = yaml.safe_load((repo_root() / "chapters" / "profiles" / "gpu.yaml").read_text())
    p = params["chapters"]["01_marginalization"]
    study = MarginalStudy(n_samples=p["n_samples"], last_tokens=p["last_tokens"],
                          positions_per_sample=p["positions_per_sample"], top_p=p["top_p"],
                          sweep_top_p=tuple(p["sweep_top_p"]), sweep_samples=p["sweep_samples"],
                          depth3_top_p=p["depth3_top_p"], depth3_samples=p["depth3_samples"],
                          widget_samples=p["widget_samples"], dtype=params["parameters"]["dtype"], device="cpu")
    stored = {f.name for f in (repo_root() / "data" / "results" / "gpu").glob("ch01-*.json")}
    for model in p["models"]:
        for task in ("translation", "open-ended"):
            main = study.config(model, task, study.n_samples, 2, study.top_p, study.main_extras, study.widget_samples)
            sweep = study.config(model, task, study.sweep_samples, 2, study.sweep[-1], study.sweep[:-1], 0)
            depth3 = study.config(model, task, study.depth3_samples, 3, study.depth3_top_p, [], 0)
            for name, cfg in (("ch01-marginal", main), ("ch01-sweep", sweep), ("ch01-depth3", depth3)):
                assert f"{name}-{config_key(cfg, 1)}.json" in stored, f"{name} {model} {task}: key changed"


def test_compute_ranks_match_a_plain_forward_pass() -> None:
    seed = fresh_seed()
    lm = M.load_model("tiny-llama", device="cpu", dtype="float32")
    study = MarginalStudy(n_samples=2, last_tokens=6, positions_per_sample=3, top_p=0.9, sweep_top_p=(0.5, 0.9),
                          depth3_top_p=0.5, open_ended_tokens=40, device="cpu", dtype="float32")
    task = random.Random(seed).choice(["translation", "open-ended"])
    out = study.compute(lm, task, 2, 2, 0.9, [0.5], 1)
    samples = study.samples(lm.tokenizer, task, 2)
    for rec, sample in zip(out["samples"], samples):
        ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            logp = lm.model(ids).logits[0].double().log_softmax(-1)
        every = list(data.evaluation_targets(sample, 6))
        assert rec["targets"]["1"] == every, f"seed {seed}"
        want = [int((logp[j - 1] > logp[j - 1, sample.input_ids[j]]).sum()) for j in every]
        assert rec["ranks"]["1"]["0.9"] == want, f"seed {seed}: next-token ranks"
        assert rec["targets"]["2"] == evenly_spaced(every, 3), f"seed {seed}"
        assert set(rec["ranks"]["2"]) == {"0.9", "0.5"}, f"seed {seed}"
        assert len(rec["nucleus"]["0.9"]) == len(every), f"seed {seed}"
    assert "browser" in out["samples"][0] and "browser" not in out["samples"][1], f"seed {seed}"


# --------------------------------------------------------------------------------------------------
# Tables and claims on synthetic stored results


@dataclasses.dataclass
class FakeResult:
    value: Any
    provenance: dict[str, Any] = dataclasses.field(default_factory=lambda: {"device": "a GPU", "wall_time_s": 1.0})


def _fake_runs(rng: np.random.Generator, n_samples: int, qs: list[float], p_next: float, p_2nd: dict[str, float],
               n_targets: int = 10) -> dict[tuple[str, str], FakeResult]:
    runs = {}
    for task in ("translation", "open-ended"):
        samples = []
        for s in range(n_samples):
            targets = list(range(50, 50 + n_targets))
            rank1 = [int(rng.random() > p_next) * 10 for _ in targets]
            ranks2 = {f"{q:g}": [int(rng.random() > p_2nd[task]) * 10 for _ in targets] for q in qs}
            samples.append({"id": f"{task}-{s}", "targets": {"1": targets, "2": targets},
                            "ranks": {"1": {f"{qs[-1]:g}": rank1}, "2": ranks2},
                            "nucleus": {f"{q:g}": [int(x) for x in rng.integers(1, 100, len(targets))] for q in qs},
                            "tokens_fed": {"1": 0, "2": int(rng.integers(10, 100))},
                            "seconds": {"1": 0.1, "2": 0.5}})
        runs["m", task] = FakeResult({"samples": samples})
    return runs


INFO = {"m": {"params": 1.5e8, "vocab": 10**6}}


def test_rank_table_is_every_stored_rank() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    runs = _fake_runs(rng, 3, [0.5, 0.9], 0.7, {"translation": 0.5, "open-ended": 0.4})
    ranks = T.rank_table(runs, INFO, k=5)
    want = sum(len(r) for res in runs.values() for s in res.value["samples"]
               for by_q in s["ranks"].values() for r in by_q.values())
    assert len(ranks) == want, f"seed {seed}"
    assert (ranks["hit"] == (ranks["rank"] < 5)).all(), f"seed {seed}"
    assert ranks[ranks["offset"] == 1]["top_p"].isna().all(), f"seed {seed}"


def test_paired_hits_pair_the_same_targets_in_any_row_order() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    runs = _fake_runs(rng, 6, [0.5, 0.9], 0.7, {"translation": 0.5, "open-ended": 0.4})
    ranks = T.rank_table(runs, INFO).sample(frac=1.0, random_state=seed % 2**31)  # shuffled rows
    a, b, groups = T.paired_hits(ranks, {"task": "translation", "top_p": 0.5}, {"task": "translation", "top_p": 0.9})
    sel = {q: {(s["id"], j): r < 5 for s in runs["m", "translation"].value["samples"]
               for j, r in zip(s["targets"]["2"], s["ranks"]["2"][f"{q:g}"])} for q in (0.5, 0.9)}
    assert len(a) == len(sel[0.5]), f"seed {seed}"
    want = sum(sel[0.5][k] - sel[0.9][k] for k in sel[0.5]) / len(sel[0.5])
    assert abs(float(np.mean(a - b)) - want) < 1e-12, f"seed {seed}"
    with pytest.raises(ValueError, match="share no"):
        T.paired_hits(ranks, {"task": "translation"}, {"task": "nothing"})


def test_sweep_tables_difference_is_the_paired_difference() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    qs = [0.5, 0.8, 0.99]
    runs = _fake_runs(rng, 5, qs, 0.7, {"translation": 0.5, "open-ended": 0.4})
    ranks, nuc = T.rank_table(runs, INFO), T.nucleus_table(runs, INFO)
    sweep, table, speed = T.sweep_tables(ranks, nuc, runs, sweep_top_p=qs, models=["m"], tasks=["translation", "open-ended"])
    row = sweep[(sweep["task"] == "open-ended") & (sweep["top_p"] == 0.5)].iloc[0]
    a, b, g = T.paired_hits(ranks[ranks["offset"] == 2], {"task": "open-ended", "top_p": 0.5},
                            {"task": "open-ended", "top_p": 0.99})
    want = paired_difference(a, b, groups=g)
    assert np.allclose([row["diff"], row.diff_lo, row.diff_hi], list(want)), f"seed {seed}"
    samples = runs["m", "open-ended"].value["samples"]
    rate = sum(s["tokens_fed"]["2"] for s in samples) / sum(s["seconds"]["2"] for s in samples)
    assert speed["m", "open-ended"] == (pytest.approx(rate), "a GPU"), f"seed {seed}"
    assert len(table) == len(qs) * 2 and len(T.sweep_lines(sweep, speed)) == 2, f"seed {seed}"


def test_claims_follow_the_data() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    runs = _fake_runs(rng, 12, [0.99], 0.95, {"translation": 0.6, "open-ended": 0.2}, n_targets=20)
    ranks = T.rank_table(runs, INFO)
    lines = marginal_claims.claim1_lines(ranks, INFO, top_p=0.99, k=5, tasks=["translation", "open-ended"])
    assert "2nd - next" in lines[0] and lines[0].count(SUPPORTED) == 4, f"seed {seed}: {lines}"
    second = marginal_claims.claim3_lines(ranks, top_p=0.99)[0].split("2nd token")[1]
    assert second.endswith(f"{SUPPORTED}."), f"seed {seed}: {second}"  # translation far higher
    flipped = ranks.assign(task=ranks["task"].map({"translation": "open-ended", "open-ended": "translation"}))
    second = marginal_claims.claim3_lines(flipped, top_p=0.99)[0].split("2nd token")[1]
    assert second.endswith(f"{CONTRADICTED}."), f"seed {seed}: {second}"
    few = ranks[ranks["sample"].str.endswith(("-0", "-1", "-2"))]
    assert marginal_claims.too_few_samples(few) == 3
    assert SUPPORTED not in "".join(marginal_claims.claim3_lines(few, top_p=0.99)), f"seed {seed}"


def test_paper_values_are_context_not_verdicts() -> None:
    import pandas as pd

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    runs = _fake_runs(rng, 4, [0.99], 0.7, {"translation": 0.5, "open-ended": 0.4})
    ranks, nuclei = T.rank_table(runs, INFO), T.nucleus_table(runs, INFO)
    acc, nuc = T.accuracy_table(ranks, 0.99, 10), T.nucleus_summary(nuclei, 10)
    paper1 = pd.DataFrame([{"family": "Pythia", "model": m, "params": p, "task": t, "offset": o, "accuracy": a}
                           for m, p, a in (("70M", 7e7, 0.3), ("410M", 4.1e8, 0.5))
                           for t in ("translation", "open-ended") for o in (1, 2)])
    paper4 = pd.DataFrame([{"family": "Pythia", "model": m, "params": p, "task": t, "top_p": 0.99, "nucleus": n}
                           for m, p, n in (("70M", 7e7, 3000), ("410M", 4.1e8, 1000)) for t in ("translation", "open-ended")])
    text = "\n".join(T.paper_context_rows(acc, nuc, paper1, paper4, INFO, ["translation", "open-ended"]))
    assert "± 0.01" in text, text
    for word in ("above", "below", SUPPORTED, CONTRADICTED):
        assert word not in text, f"seed {seed}: {text}"
    want = float(np.interp(np.log(1.5e8), np.log([7e7, 4.1e8]), [0.3, 0.5]))
    assert T.interp_paper(paper1, "accuracy", 1.5e8, "translation", "offset", 1) == pytest.approx(want)
    assert T.interp_paper(paper1, "accuracy", 1e10, "translation", "offset", 1) is None
