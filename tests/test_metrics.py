"""mtp_lib.metrics against plain loops and the statistics the intervals promise.

Every test draws a fresh seed and prints it in its assertion messages: rerun with that seed to replay.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from mtp_lib import marginal as MG
from mtp_lib import metrics as M
from seeds import fresh_seed


def test_reference_targets_are_the_next_tokens() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    ids = [rng.randrange(100) for _ in range(rng.randint(1, 30))]
    positions = [rng.randrange(len(ids)) for _ in range(rng.randint(1, 10))]
    depth = rng.randint(1, 4)
    got = M.reference_targets(torch.tensor([ids]), positions, depth)
    want = [[ids[t + d + 1] if t + d + 1 < len(ids) else -1 for d in range(depth)] for t in positions]
    assert got.tolist() == want, f"seed {seed}"


def test_rank_and_topk_hits_match_a_plain_sort() -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(7, 3, 50, generator=gen)
    log_probs[0, 0, :5] = log_probs[0, 0].max() + 1  # a tie for first place: the target shares rank 0
    targets = torch.randint(0, 50, (7, 3), generator=gen)
    targets[0, 0] = 2
    ranks = M.target_rank(log_probs, targets)
    k = random.Random(seed).randint(1, 10)
    hits = M.topk_hits(log_probs, targets, k=k)
    for i in range(7):
        for j in range(3):
            row = log_probs[i, j].tolist()
            want = sum(v > row[targets[i, j]] for v in row)
            assert ranks[i, j] == want, f"seed {seed}"
            assert bool(hits[i, j]) == (want < k), f"seed {seed}"
    assert ranks[0, 0] == 0
    untied = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    tt = torch.randint(0, 30, (40,), generator=gen)
    topk = untied.topk(k, dim=-1).indices
    assert torch.equal(M.topk_hits(untied, tt, k), (topk == tt[:, None]).any(-1)), f"seed {seed}"


def test_nucleus_size_is_the_marginal_modules() -> None:
    assert M.nucleus_size is MG.nucleus_size


def test_wilson_bounds_invert_the_score_test() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    n = rng.randint(1, 500)
    s = rng.randint(0, n)
    level = rng.uniform(0.5, 0.99)
    mean, lo, hi = M.wilson_interval(s, n, level)
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    assert mean == s / n and 0 <= lo <= mean <= hi <= 1, f"seed {seed}"
    for bound in (lo, hi):
        if 0 < bound < 1:  # the score statistic equals z at each bound
            score = abs(s / n - bound) / math.sqrt(bound * (1 - bound) / n)
            assert score == pytest.approx(z, rel=1e-9), f"seed {seed}"
    # the textbook example: 8 of 10 at 95%
    assert M.wilson_interval(8, 10, 0.95)[1:] == pytest.approx((0.4902, 0.9433), abs=1e-4)


def _clustered(gen: torch.Generator, n_groups: int, per_group: int, p: float) -> tuple[torch.Tensor, list[int]]:
    """Hits whose probability varies strongly by group (mean p over groups)."""
    half = min(p, 1 - p)
    group_p = p - half + 2 * half * torch.rand(n_groups, generator=gen, dtype=torch.float64)
    hits = torch.rand(n_groups, per_group, generator=gen) < group_p[:, None]
    return hits.reshape(-1), [g for g in range(n_groups) for _ in range(per_group)]


def test_cluster_bootstrap_covers_where_the_iid_interval_does_not() -> None:
    """Hits correlated within samples: the cluster bootstrap keeps about its coverage, Wilson loses it."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    p, level, reps = 0.6, 0.9, 200
    cover_boot = cover_wilson = 0
    for r in range(reps):
        hits, groups = _clustered(gen, 20, 40, p)
        _, lo, hi = M.accuracy_with_ci(hits, groups=groups, level=level, n_boot=400, seed=r)
        cover_boot += lo <= p <= hi
        _, lo, hi = M.accuracy_with_ci(hits, level=level)
        cover_wilson += lo <= p <= hi
    assert 0.78 <= cover_boot / reps <= 0.97, f"seed {seed}: cluster bootstrap coverage {cover_boot / reps}"
    assert cover_wilson / reps < 0.7, f"seed {seed}: Wilson coverage {cover_wilson / reps}"


def test_mean_with_ci_properties() -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(60, generator=gen) * 100
    groups = torch.randint(0, 6, (60,), generator=gen)
    mean, lo, hi = M.mean_with_ci(values, groups=groups, seed=seed % 1000)
    assert mean == pytest.approx(float(values.double().mean())), f"seed {seed}"
    assert lo <= mean <= hi, f"seed {seed}"
    assert M.mean_with_ci(values, groups=groups, seed=3) == M.mean_with_ci(values, groups=groups, seed=3)
    # one group: no between-sample spread to estimate
    one = M.mean_with_ci(values, groups=[0] * 60)
    assert math.isnan(one.lo) and math.isnan(one.hi) and one.mean == pytest.approx(mean)
    # iid bootstrap of a normal mean: close to mean +- 1.96 sd / sqrt(n)
    x = torch.randn(400, generator=gen, dtype=torch.float64)
    m, lo, hi = M.mean_with_ci(x, n_boot=4000, seed=seed % 1000)
    half = 1.96 * float(x.std()) / 20
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15), f"seed {seed}"


def test_tables_agree_with_the_tensor_functions() -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    tables = []
    for sample in range(3):
        n_pos, depth, vocab = 9, 2, 40
        log_probs = torch.log_softmax(torch.randn(n_pos, depth, vocab, generator=gen) * 2, dim=-1)
        ids = torch.randint(0, vocab, (1, 14), generator=gen)
        positions = list(range(14 - n_pos, 14))  # the last ones lack some references
        targets = M.reference_targets(ids, positions, depth)
        table = M.position_table(log_probs, targets, positions=positions, sample=f"s{sample}", k=3)
        assert len(table) == int((targets >= 0).sum()), f"seed {seed}"
        valid = targets >= 0
        hits = M.topk_hits(log_probs[valid], targets[valid], k=3)
        assert table["hit"].tolist() == hits.tolist(), f"seed {seed}"
        sizes = MG.nucleus_size(log_probs[:, 0], 0.9)
        assert table["nucleus_0.9"].tolist() == sizes[valid.nonzero()[:, 0]].tolist(), f"seed {seed}"
        assert table["position"].tolist() == [positions[i] for i in valid.nonzero()[:, 0].tolist()]
        tables.append(table)
    import pandas as pd

    full = pd.concat(tables, ignore_index=True)
    summary = M.summarize(full, n_boot=300)
    assert summary["offset"].tolist() == [1, 2]
    for _, row in summary.iterrows():
        part = full[full["offset"] == row["offset"]]
        assert row["accuracy"] == pytest.approx(part["hit"].mean()), f"seed {seed}"
        assert row["accuracy_lo"] <= row["accuracy"] <= row["accuracy_hi"], f"seed {seed}"
        assert row["samples"] == 3 and row["positions"] == len(part)
        assert row["nucleus_0.99"] == pytest.approx(part["nucleus_0.99"].mean())
    per = M.per_sample(full)
    assert len(per) == 6 and per["positions"].sum() == len(full), f"seed {seed}"


def test_marginal_table_has_one_block_per_top_p() -> None:
    from mtp_lib.models import TINY_VOCAB, build_tiny_model

    seed = fresh_seed()
    model = build_tiny_model("gpt_neox", n_layers=2, hidden=32, seed=seed)
    ids = torch.randint(0, TINY_VOCAB, (1, 12), generator=torch.Generator().manual_seed(seed))
    positions = [3, 7, 7, 11]  # duplicates are fine; the last lacks references
    res = MG.marginalize(model, ids, depth=2, top_p=0.9, extra_top_p=[0.5], positions=positions)
    table = M.marginal_table(res, ids, sample="a", k=2)
    assert sorted(table["top_p"].unique()) == [0.5, 0.9], f"seed {seed}"
    targets = M.reference_targets(ids, positions, 2)
    for q in (0.5, 0.9):
        block = table[table["top_p"] == q]
        valid = targets >= 0
        assert block["hit"].tolist() == M.topk_hits(res.at(q)[valid], targets[valid], k=2).tolist(), f"seed {seed}"
        sizes = MG.nucleus_size(res.log_probs[:, 0], q)
        assert block["candidates"].tolist() == sizes[valid.nonzero()[:, 0]].tolist(), f"seed {seed}"
    summary = M.summarize(table, by=["top_p"], n_boot=100)
    assert len(summary) == 4 and set(summary["top_p"]) == {0.5, 0.9} and "candidates_lo" in summary
    assert math.isnan(summary["accuracy_lo"].iloc[0])  # one sample: no interval


@pytest.mark.parametrize(("call", "name"), [
    (lambda: M.topk_hits(torch.randn(3, 5), torch.tensor([0, 1, 2]), k=0), "k"),
    (lambda: M.topk_hits(torch.randn(3, 5), torch.tensor([0, 1, 5]), k=1), "targets"),
    (lambda: M.target_rank(torch.randn(3, 5), torch.tensor([0, 1])), "targets"),
    (lambda: M.accuracy_with_ci([True, False], level=1.0), "level"),
    (lambda: M.accuracy_with_ci([]), "hits"),
    (lambda: M.accuracy_with_ci([0.5, 1.0]), "hits"),
    (lambda: M.mean_with_ci([1.0, 2.0], groups=[0]), "groups"),
    (lambda: M.mean_with_ci([1.0, float("nan")]), "values"),
    (lambda: M.reference_targets(torch.tensor([[1, 2, 3]]), [3], 1), "positions"),
    (lambda: M.reference_targets(torch.tensor([[1, 2, 3]]), [0], 0), "depth"),
    (lambda: M.position_table(torch.randn(2, 5), torch.zeros(2, 1)), "log_probs"),
    (lambda: M.wilson_interval(1, 0), "n"),
    (lambda: M.position_table(torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), columns={"c": [1]}), "columns"),
])
def test_invalid_arguments_raise_value_error_naming_them(call: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()  # type: ignore[operator]
