"""mtp_lib.report: verdicts against hand-checked cases, differences against plain bootstrap loops.

Every test draws a fresh seed and prints it in its assertion messages: rerun with that seed to replay.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mtp_lib import metrics
from mtp_lib import report as R
from seeds import fresh_seed


def test_verdict_labels_follow_the_interval_and_the_direction() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(200):
        lo = rng.uniform(-1, 1)
        hi = lo + rng.uniform(0, 1)
        mean = rng.uniform(lo, hi)
        thr = rng.uniform(-1, 1)
        for direction in ("greater", "less"):
            v = R.verdict((mean, lo, hi), direction=direction, threshold=thr)
            if lo > thr:
                want = R.SUPPORTED if direction == "greater" else R.CONTRADICTED
            elif hi < thr:
                want = R.CONTRADICTED if direction == "greater" else R.SUPPORTED
            else:
                want = R.NOT_RESOLVED
            assert v.label == want, f"seed {seed}: {(mean, lo, hi, thr, direction)} gave {v}"
            assert v.text.startswith(R.ci_text((mean, lo, hi), 3, signed=True)), f"seed {seed}"
            assert v.text.endswith(v.label), f"seed {seed}: {v.text}"
            assert (v.reason == "") == (v.label != R.NOT_RESOLVED), f"seed {seed}"


def test_verdict_without_interval_or_enough_samples_is_not_resolved() -> None:
    v = R.verdict((0.5, math.nan, math.nan))
    assert v.label == R.NOT_RESOLVED and "single sample" in v.text and v.text.startswith("+0.500")
    v = R.verdict((0.5, 0.4, 0.6), samples=3, min_samples=5)
    assert v.label == R.NOT_RESOLVED and "3 samples" in v.reason and "5" in v.reason
    assert R.verdict((0.5, 0.4, 0.6), samples=5, min_samples=5).label == R.SUPPORTED
    assert R.verdict((-0.31, -0.4, -0.22), direction="less").text == "-0.310 [-0.400, -0.220]: supported"


def test_verdict_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="direction"):
        R.verdict((0.0, -1.0, 1.0), direction="above")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reversed"):
        R.verdict((0.0, 1.0, -1.0))


def test_ci_text_formats() -> None:
    assert R.ci_text((0.4512, 0.4, 0.5)) == "0.45 [0.40, 0.50]"
    assert R.ci_text((0.4512, math.nan, math.nan)) == "0.45"
    assert R.ci_text((0.03, -0.01, 0.07), signed=True) == "+0.03 [-0.01, +0.07]"
    assert R.ci_text(metrics.Interval(812.4, 700.0, 900.0), 0) == "812 [700, 900]"


def _plain_cluster_means(values: np.ndarray, groups: list[int], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    ids = sorted(set(groups))
    by = {g: values[[i for i, h in enumerate(groups) if h == g]] for g in ids}
    out = []
    for _ in range(n_boot):
        pick = rng.choice(ids, size=len(ids))
        out.append(np.concatenate([by[g] for g in pick]).mean())
    return np.array(out)


def test_paired_difference_is_the_cluster_bootstrap_of_the_differences() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n_groups = int(rng.integers(4, 12))
    groups = [g for g in range(n_groups) for _ in range(int(rng.integers(1, 8)))]
    shift = rng.normal(size=n_groups)  # a per-sample level shared by both members of a pair
    a = np.array([shift[g] + rng.normal() for g in groups])
    b = a - 0.3 + 0.1 * rng.normal(size=len(a))
    got = R.paired_difference(a, b, groups=groups, n_boot=4000, seed=seed % 1000)
    assert math.isclose(got.mean, float((a - b).mean()), rel_tol=1e-12), f"seed {seed}"
    ref = _plain_cluster_means(a - b, groups, rng, 4000)
    lo, hi = np.quantile(ref, [0.025, 0.975])
    spread = hi - lo
    assert abs(got.lo - lo) < 0.2 * spread + 1e-9 and abs(got.hi - hi) < 0.2 * spread + 1e-9, (
        f"seed {seed}: {got} against a plain loop's [{lo}, {hi}]")
    # pairing removes the per-sample level: the interval is far narrower than the unpaired one
    unpaired = R.difference_with_ci(a, b, groups_a=groups, groups_b=groups, seed=seed % 1000)
    assert hi - lo < unpaired.hi - unpaired.lo, f"seed {seed}"
    with pytest.raises(ValueError, match="one b per a"):
        R.paired_difference(a, b[:-1], groups=groups)


def test_difference_with_ci_resamples_each_side_on_its_own() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    ga = [g for g in range(int(rng.integers(3, 9))) for _ in range(int(rng.integers(1, 6)))]
    gb = [100 + g for g in range(int(rng.integers(3, 9))) for _ in range(int(rng.integers(1, 6)))]
    a = rng.normal(size=len(ga)) + rng.normal(size=max(ga) + 1)[ga]
    b = rng.normal(size=len(gb)) + 0.5
    got = R.difference_with_ci(a, b, groups_a=ga, groups_b=gb, n_boot=4000, seed=seed % 1000)
    assert math.isclose(got.mean, float(a.mean() - b.mean()), rel_tol=1e-9, abs_tol=1e-12), f"seed {seed}"
    ref = (_plain_cluster_means(a, ga, rng, 4000) - _plain_cluster_means(b, [g - 100 for g in gb], rng, 4000))
    lo, hi = np.quantile(ref, [0.025, 0.975])
    spread = hi - lo
    assert abs(got.lo - lo) < 0.2 * spread and abs(got.hi - hi) < 0.2 * spread, (
        f"seed {seed}: {got} against a plain loop's [{lo}, {hi}]")
    one = R.difference_with_ci(a, b, groups_a=[0] * len(a), groups_b=gb)
    assert math.isnan(one.lo) and math.isnan(one.hi), f"seed {seed}"


def test_a_paired_difference_of_pooled_means_draws_the_same_samples_for_both_sides() -> None:
    """Two sides with their own values in each sample (two decoders' steps on one prompt): the
    interval is a plain loop's that draws one set of samples for both."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 10))
    level = rng.normal(scale=2.0, size=n)  # a per-sample offset that both sides share
    ga = [g for g in range(n) for _ in range(int(rng.integers(1, 6)))]
    gb = [g for g in reversed(range(n)) for _ in range(int(rng.integers(1, 6)))]  # another order, other sizes
    a, b = rng.normal(size=len(ga)) + level[ga] + 0.3, rng.normal(size=len(gb)) + level[gb]
    got = R.difference_with_ci(a, b, groups_a=ga, groups_b=gb, paired=True, n_boot=4000, seed=seed % 1000)
    assert math.isclose(got.mean, float(a.mean() - b.mean()), rel_tol=1e-9, abs_tol=1e-12), f"seed {seed}"
    ref = []
    for _ in range(4000):
        pick = rng.choice(n, size=n)
        ref.append(np.concatenate([a[np.array(ga) == g] for g in pick]).mean()
                   - np.concatenate([b[np.array(gb) == g] for g in pick]).mean())
    lo, hi = np.quantile(ref, [0.025, 0.975])
    spread = hi - lo
    assert abs(got.lo - lo) < 0.2 * spread and abs(got.hi - hi) < 0.2 * spread, (
        f"seed {seed}: {got} against a plain loop's [{lo}, {hi}]")
    with pytest.raises(ValueError, match="name the same samples"):
        R.difference_with_ci(a, b, groups_a=ga, groups_b=[g + 1 for g in gb], paired=True)


def test_paper_context_draws_no_verdict() -> None:
    text = R.paper_context((0.45, 0.40, 0.50), 0.523)
    assert text == "0.45 [0.40, 0.50] (the paper: 0.52 ± 0.01)"
    assert R.paper_context((0.45, 0.40, 0.50), None) == "0.45 [0.40, 0.50]"
    for word in (R.SUPPORTED, R.CONTRADICTED, "above", "below"):
        assert word not in text


def _result(device: str, loaded: bool, torch_version: str = "2.11.0") -> R.CachedResult:
    from pathlib import Path

    return R.CachedResult("x", {"dtype": "bfloat16"}, None,
                          {"device": device, "versions": {"torch": torch_version, "transformers": "5.0"}},
                          Path("x.json"), loaded)


def test_run_settings_names_where_the_results_were_computed() -> None:
    line = R.run_settings("gpu", [_result("NVIDIA H100", True), _result("NVIDIA H100", True)], models=["a", "b"],
                          details="3 samples")
    assert line == ("**Run settings.** profile `gpu`; results computed on NVIDIA H100 (bfloat16), torch 2.11.0, "
                    "transformers 5.0; loaded from the stored results; models: `a`, `b`; 3 samples.")
    mixed = R.run_settings("cpu", [_result("NVIDIA H100", True), _result("CPU", False, "2.13.0")], models=["a"])
    assert "CPU, NVIDIA H100" in mixed and "2.11.0, 2.13.0" in mixed and "partly loaded" in mixed
    with pytest.raises(ValueError, match="needs the chapter's results"):
        R.run_settings("gpu", [], models=["a"])
    untyped = R.CachedResult("x", {}, None, {"device": "CPU", "versions": {}}, _result("CPU", True).path, True)
    assert "CPU, torch ?" in R.run_settings("cpu", [untyped], models=["a"])  # no "(?)" for an unnamed dtype


def test_quiet_libraries_silences_transformers() -> None:
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    before = gguf_utils.tqdm
    try:
        R.quiet_libraries()
        R.quiet_libraries()  # twice: no double wrapping
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert isinstance(gguf_utils.tqdm, functools.partial) and gguf_utils.tqdm.keywords == {"disable": True}
        assert not isinstance(gguf_utils.tqdm.func, functools.partial)
    finally:
        gguf_utils.tqdm = before
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
