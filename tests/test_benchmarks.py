"""Helpers of the benchmark scripts that do not need a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_device_idle_charges_gaps_to_the_host_range_open_at_launch() -> None:
    bench = _load("marginal")

    def kernel(ts: float, dur: float, corr: int) -> dict:
        return {"cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts: float, corr: int) -> dict:
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "args": {"correlation": corr}}

    events = [
        {"cat": "user_annotation", "name": "marginal.candidate_step", "ts": 0, "dur": 100},
        {"cat": "user_annotation", "name": "marginal.reduce", "ts": 150, "dur": 400},
        launch(10, 1), kernel(20, 100, 1),  # busy 20-120
        launch(30, 2), kernel(120, 50, 2),  # back to back: no gap
        launch(500, 3), kernel(510, 10, 3),  # launched late, in marginal.reduce: a gap of 340 us
        launch(600, 4), kernel(540, 30, 4),  # (out of order launch times do not matter) a gap of 20 us: below 50
        {**launch(160, 5), "cat": "cuda_driver"}, kernel(700, 10, 5),  # a Triton launch (driver API), 130 us late
    ]
    lines = bench.device_idle({"traceEvents": events})
    assert lines[0].startswith("device busy 0.20 ms of a 0.69 ms span"), lines[0]
    assert "gaps of 50 us or more: 2, 0.47 ms in all" in lines[0], lines[0]
    row = next(line for line in lines if line.startswith("marginal.reduce"))
    assert row.split()[1:] == ["2", "0.47"], row
    assert any("k3" in line for line in lines), lines
    assert bench.device_idle({"traceEvents": []}) == ["device idle: no kernels in the trace"]


def test_kernel_totals_sum_each_kernel_with_its_whole_name() -> None:
    bench = _load("marginal")
    long = "triton_per_fused__to_copy__unsafe_view_add_bmm_cat_clone_mul_neg_slice_3"
    events = [
        {"cat": "kernel", "name": long, "ts": 0, "dur": 100},
        {"cat": "kernel", "name": long, "ts": 200, "dur": 300},
        {"cat": "kernel", "name": "gemm", "ts": 600, "dur": 250},
        {"cat": "gpu_memset", "name": "Memset", "ts": 0, "dur": 5},  # the third: cut by top=2
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999},  # host side: not a kernel
    ]
    lines = bench.kernel_totals({"traceEvents": events}, top=2)
    assert len(lines) == 3
    assert lines[1].split() == ["0.40", "2", "200.0", long], lines[1]
    assert lines[2].split() == ["0.25", "1", "250.0", "gemm"], lines[2]
