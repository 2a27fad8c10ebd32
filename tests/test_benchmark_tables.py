"""mtp_lib.benchmark_tables on the committed benchmark files and on synthetic records."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from mtp_lib import benchmark_tables as B
from mtp_lib.results import repo_root
from seeds import fresh_seed


def _record(model: str, device: str, ratio: float, extrapolated: bool = True) -> dict:
    rows = [{"method": "marginalize", "attention": "flex", "reduce": "fused", "max_tokens_per_chunk": 65536,
             "tokens_per_row": 65536, "merge": "fused", "seconds": 0.3},
            {"method": "marginalize+compile", "attention": "packed", "reduce": "plain", "max_tokens_per_chunk": 1024,
             "tokens_per_row": 128, "seconds": 0.2},
            {"method": "naive", "seconds": 900.0, "candidates": 5000, "timed_candidates": 64, "extrapolated": extrapolated}]
    return {"device": device, "device_name": f"GPU-{ratio}" if device.startswith("cuda") else "a CPU",
            "dtype": "bfloat16", "model": {"name": model}, "rows": rows,
            "settings": {"context": 512, "positions": list(range(4)), "top_p": 0.99, "naive_candidates_per_position": 16},
            "nucleus": {"mean": 1250.0}, "ratio_to_floor": ratio, "candidates_ratio_to_floor": ratio - 0.1,
            "positions_per_s": 300.0, "candidates_per_s": 5e5, "speedup_vs_naive": 4500.0}


def test_speed_summary_leads_with_the_floor_of_the_best_gpu_run() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    ratios = [rng.uniform(2, 8) for _ in range(4)]
    records = [(f"b{i}.json", _record("m", "cuda:0", r)) for i, r in enumerate(ratios)]
    records.append(("cpu.json", _record("m", "cpu", 1.0)))  # closer to its floor, but not a GPU run
    text = B.speed_summary(records)
    best = min(ratios)
    assert text.startswith(f"- **m** on an GPU-{best} (bfloat16): {best:.2f} times the FLOP floor"), f"seed {seed}: {text}"
    assert text.index("FLOP floor") < text.index("naive"), f"seed {seed}"
    assert "timed on 64 of the 5,000 candidates" in text and "extrapolated" in text, f"seed {seed}"
    whole = B.speed_summary([("a.json", _record("m", "cuda:0", 3.0, extrapolated=False))])
    assert "timed on all 5,000 candidates" in whole and "extrapolated" not in whole


def test_fastest_row_and_table() -> None:
    rec = _record("m", "cuda:0", 3.0)
    assert B.fastest_row(rec) == "compiled, packed 1024x128, plain reduction: 0.200 s"
    flex = copy.deepcopy(rec)
    flex["rows"][1]["seconds"] = 0.5
    assert B.fastest_row(flex) == "eager, flex 65536, fused reduction, merge kernel: 0.300 s"
    table = B.benchmark_table([("a.json", rec)])
    assert table.loc["time / FLOP floor", "a.json"] == 3.0
    assert "extrapolated from 64 of 5000" in table.loc["speedup vs naive", "a.json"]
    assert B.benchmark_table([]) is None


def test_committed_benchmarks_load(tmp_path: Path) -> None:
    found = B.load_benchmarks(repo_root())
    if found:  # the committed files: every one summarises
        assert B.benchmark_table(found) is not None and B.speed_summary(found)
    assert len(B.missing_benchmarks(tmp_path)) == 2
    (tmp_path / "data" / "results" / "gpu").mkdir(parents=True)
    (tmp_path / "data" / "results" / "gpu" / "benchmark-marginal-x.json").write_text(json.dumps(_record("m", "cuda:0", 3)))
    assert len(B.missing_benchmarks(tmp_path)) == 1
    assert [n for n, _ in B.load_benchmarks(tmp_path)] == ["benchmark-marginal-x.json"]
