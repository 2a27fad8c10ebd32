"""Chapter 3 at the paper's budget (mtp_lib.budget_runs, budget_train, budget_report, plots.budget).

A tiny model runs the whole path (LR sweep, seeds, a warmup row inside the budget, curves, speed,
resume after a stop at a checkpoint); the tables are checked on fresh random units against numpy.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtp_lib import budget_report as R
from mtp_lib import budget_train, metrics, report
from mtp_lib.budget_runs import PUBLISHED_LR, BudgetRuns, BudgetSetup, Unit, chapter_setup, run_budget
from mtp_lib.strategy_runs import STRATEGIES
from mtp_lib.train import recipe, train
from mtp_lib.train.config import TrainConfig
from seeds import fresh_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_setup(**overrides) -> BudgetSetup:
    values = dict(models=["tiny-llama"], recipes=["heads_only", "head_warmup"], seeds={"tiny-llama": [0, 1]}, lrs={},
                  lr_sweep={"tiny-llama": [1e-3, 1e-2]}, sweep_recipe="heads_only", total_steps=3,
                  warmup_fraction=0.5, effective_batch=2, micro_batch=2, eval_every=1, n_train=6, n_eval=2,
                  n_select=2, last_tokens=6, baseline_top_p=0.9, device="cpu", profile="tiny")
    return BudgetSetup(**{**values, **overrides})


def test_phase_steps_set_each_phase_and_leave_old_keys_alone() -> None:
    config = recipe("head_warmup", phase_steps=[2, 3])
    assert config.phase_steps == (2, 3) and TrainConfig.from_dict(config.to_dict()) == config
    assert "phase_steps" not in recipe("head_warmup").to_dict()  # the keys of stored results do not change
    with pytest.raises(ValueError, match="this recipe runs 2"):
        recipe("head_warmup", phase_steps=(5,))
    with pytest.raises(ValueError, match="positive integers"):
        recipe("heads_only", phase_steps=(0,))
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    samples = [SimpleNamespace(input_ids=torch.randint(0, 100, (12,), generator=gen).tolist(), target_start=4)
               for _ in range(4)]
    from mtp_lib.models import build_tiny_model

    model = build_tiny_model("llama")
    warm = int(torch.randint(1, 4, (1,), generator=gen))
    cool = int(torch.randint(1, 4, (1,), generator=gen))
    result = train(model, samples, recipe("head_warmup", phase_steps=(warm, cool), effective_batch_size=2,
                                          micro_batch_size=2, seed=seed), progress=False)
    phases = [e["phase"] for e in result.history if "loss" in e]
    assert phases == ["heads"] * warm + ["joint"] * cool, (seed, phases)  # more steps than an epoch (2) allowed


def test_seed_sample_interval_adds_the_seed_spread_to_the_bootstrap() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    s, n, p = int(rng.integers(2, 6)), int(rng.integers(3, 8)), int(rng.integers(2, 6))
    x = (rng.random((s, n, p)) < 0.5).astype(float)
    one = R.seed_sample_interval(x[:1])
    assert tuple(one) == tuple(metrics.mean_with_ci(x[0].reshape(-1), groups=np.repeat(np.arange(n), p).tolist()))
    same = R.seed_sample_interval(np.repeat(x[:1], s, axis=0))  # no spread over seeds: the bootstrap alone
    assert np.allclose(tuple(same), tuple(one)), seed
    flat = np.broadcast_to(rng.random((s, 1, 1)), (s, n, p)).copy()  # no spread over samples: the t interval
    got = R.seed_sample_interval(flat)
    per_seed = flat[:, 0, 0]
    half = R.T975[s - 1] * per_seed.std(ddof=1) / math.sqrt(s)
    assert np.allclose(tuple(got), (per_seed.mean(), per_seed.mean() - half, per_seed.mean() + half)), seed
    both = R.seed_sample_interval(x)
    boot = metrics.mean_with_ci(x.mean(0).reshape(-1), groups=np.repeat(np.arange(n), p).tolist())
    assert both.lo <= boot.lo + 1e-12 and both.hi >= boot.hi - 1e-12, seed


def fake_runs(rng: np.random.Generator, recipes: list[str], seeds: dict[str, list[int]], n=5, last=4) -> BudgetRuns:
    rows = {}
    for name, ss in seeds.items():
        for rec in recipes:
            for s in ss:
                value = {"hits": (rng.random((n, 2, last)) < rng.uniform(0.2, 0.8)).astype(int).tolist(),
                         "curve": [{"step": k, "sequences": 4 * k, "top5": rng.random(2).tolist()} for k in (1, 2, 3)],
                         "first_losses": rng.uniform(4, 6, (2, 3)).tolist(),
                         "loss_windows": rng.uniform(1, 3, (2, 2)).tolist(), "info": {"vocab": 100},
                         "speed": {"device": "cpu", "tokens_per_s": 1.0, "mfu": None}, "train_seconds": 1.0}
                if rec == "diff_lr_whs":
                    value["whs_weights"] = rng.dirichlet(np.ones(6), size=2).tolist()
                rows[name, rec, s] = SimpleNamespace(value=value)
    setup = SimpleNamespace(models=list(seeds), recipes=recipes, seeds=seeds, top_k=5, profile="gpu",
                            head_rows=[r for r in recipes if r not in ("ntp_baseline", "medusa")])
    return BudgetRuns(setup, rows, {}, {m: 1e-3 for m in seeds}, [])  # type: ignore[arg-type]


def test_tables_match_numpy_on_random_units() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    recipes = ["ntp_baseline", "heads_only", "vanilla_joint", "diff_lr_whs"]
    runs = fake_runs(rng, recipes, {"a": [0, 1, 2], "b": [0]})
    table = R.seed_accuracy_table(runs)
    h = np.asarray([runs.rows["a", "vanilla_joint", s].value["hits"] for s in (0, 1, 2)], dtype=float)
    per_seed = h[:, :, 1].reshape(3, -1).mean(1)
    assert table.loc["Vanilla joint", "a: 2nd"].startswith(f"{per_seed.mean():.3f} ± {per_seed.std(ddof=1):.3f} (3)")
    assert " ± " not in table.loc["Vanilla joint", "b: next"], seed  # one seed: no spread
    claims = R.claims_table(runs)
    d = h[:, :, 1] - np.asarray([runs.rows["a", "heads_only", s].value["hits"] for s in (0, 1, 2)], float)[:, :, 1]
    text = claims.loc["Joint training beats heads only on the 2nd token", "a"]
    assert text == report.verdict(R.seed_sample_interval(d)).text + " (3 seeds)", seed
    assert "1 seed" in claims.loc["Joint training beats heads only on the 2nd token", "b"]
    curves = R.curve_frame(runs)
    assert len(curves) == len(runs.rows) * 3 * 2
    moved = R.whs_movement(runs)
    w = np.asarray(runs.rows["a", "diff_lr_whs", 1].value["whs_weights"])[1]
    row = moved[(moved["model"] == "a") & (moved["seed"] == 1) & (moved["head"] == 2)].iloc[0]
    assert np.isclose(row["TV distance"], 0.5 * np.abs(w - 1 / 6).sum(), atol=1e-4), seed
    assert np.isclose(row["max / uniform"], w.max() * 6, atol=1e-3), seed
    first = R.first_loss_table(runs)
    mine = first[(first["model"] == "a") & (first["row"] == STRATEGIES["heads_only"])].iloc[0]
    expected = np.mean([runs.rows["a", "heads_only", s].value["first_losses"][1][0] for s in (0, 1, 2)])
    assert np.isclose(mine["head 2, step 1"], expected, atol=1e-3) and mine["log V (uniform guess)"] == round(
        math.log(100), 3), seed


def test_learning_curves_figure_draws_every_model_and_the_marker() -> None:
    from mtp_lib.plots.budget import learning_curves

    runs = fake_runs(np.random.default_rng(fresh_seed()), ["heads_only", "diff_lr"], {"a": [0, 1], "b": [0]})
    fig = learning_curves(R.curve_frame(runs), marker_sequences=6, marker_label="old budget")
    assert len(fig.axes) == 4
    assert all(any(line.get_xdata()[0] == 6 for line in ax.lines) for ax in fig.axes)
    assert fig.axes[-1].xaxis.get_major_formatter()(200_000, 0) == "200k"  # readable ticks at 3,125 x 64
    with pytest.raises(ValueError, match="lacks columns"):
        learning_curves(R.curve_frame(runs).drop(columns="seed"))


def test_gpu_profile_is_the_paper_budget_and_only_names_the_command_without_results(tmp_path, monkeypatch) -> None:
    from mtp_lib import budget_runs, results

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))  # an empty results folder, the committed units hidden
    for module in (results, budget_runs):
        monkeypatch.setattr(module, "search_dirs", lambda profile: [results.results_dir(profile)])
    setup = chapter_setup("gpu")
    assert setup.total_steps * setup.effective_batch == 200_000 and setup.effective_batch == 64
    assert setup.lrs["smollm2-135m"] == PUBLISHED_LR["smollm2-135m"][0] / 2
    assert setup.phase_steps("head_warmup") == (1562, 1563) and setup.phase_steps("diff_lr") == (3125,)
    assert len(setup.train_ids) == 58_381 and len(setup.seeds["smollm2-135m"]) >= 3
    runs = run_budget(setup)  # compute is off: nothing is loaded or trained
    assert not runs.rows and runs.lr["gemma3-270m"] is None
    assert len(runs.missing) == len(setup.recipes) * 3 + len(setup.lr_sweep["gemma3-270m"])
    assert "scripts/table1_paper_budget.py --profile gpu" in R.missing_note(runs)
    # seed-major: a run cut short leaves every row's first seed before any row's second
    smol = [u for u in runs.missing if u.model == "smollm2-135m"]
    n = len(setup.recipes)
    assert [u.seed for u in smol] == [s for s in setup.seeds["smollm2-135m"] for _ in range(n)]
    assert [u.recipe for u in smol[:n]] == [u.recipe for u in smol[n:2 * n]] == setup.recipes


def test_tiny_units_end_to_end_with_sweep_resume_and_speed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))
    setup = tiny_setup()
    first = run_budget(setup)
    assert not first.rows and first.lr == {"tiny-llama": None} and len(first.missing) == 2
    setup = tiny_setup(compute=True, save_dir=str(tmp_path / "runs"), checkpoint_every=1)
    budget_train.DEADLINE.append(0.0)  # long past: the first unit stops after its second step's checkpoint
    try:
        with pytest.raises(budget_train.TimeUp, match="run the same command again"):
            run_budget(setup)
    finally:
        budget_train.DEADLINE.clear()
    assert len(list((tmp_path / "runs").rglob("checkpoint.pt"))) == 1  # the stopped unit's, to resume from
    runs = run_budget(setup)  # resumes the stopped unit, then the rest
    assert not runs.missing and len(runs.rows) == 4 and len(runs.sweep) == 2
    scores = {lr: np.mean(r.value["select_accuracy"]) for (_, lr), r in runs.sweep.items()}
    assert runs.lr["tiny-llama"] == max(sorted(scores), key=lambda lr: scores[lr])
    warm = runs.rows["tiny-llama", "head_warmup", 1].value
    assert warm["phase_steps"] == [2, 1] and [p["step"] for p in warm["curve"]] == [1, 2, 3]
    assert [p["sequences"] for p in warm["curve"]] == [2, 4, 6] and len(warm["first_losses"][1]) == 3
    assert warm["speed"]["tokens"] > 0 and warm["speed"]["mfu"] is None and warm["speed"]["compiled"] is False
    assert warm["speed"]["gpu_processes"] == 1
    again = run_budget(tiny_setup(save_dir=str(tmp_path / "runs")))  # stored now: loaded, nothing trained
    assert not again.missing and all(r.loaded for r in again.rows.values())
    assert R.seed_accuracy_table(again).shape == (2, 2) and len(R.curve_frame(again)) == 4 * 3 * 2


def test_step_clock_counts_every_token_of_an_epoch() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    batch, steps = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    lengths = rng.integers(5, 50, batch * steps).tolist()
    config = recipe("heads_only", effective_batch_size=batch, micro_batch_size=batch, seed=seed % 1000)
    clock = budget_train.StepClock(config, lengths)
    assert sum(clock.tokens_of("heads", s) for s in range(1, steps + 1)) == sum(lengths), seed


def test_setup_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no seed"):
        tiny_setup(seeds={})
    with pytest.raises(ValueError, match="neither an LR"):
        tiny_setup(lr_sweep={})
    with pytest.raises(ValueError, match="not rows"):
        tiny_setup(recipes=["nope"])
    with pytest.raises(ValueError, match="warmup_fraction"):
        tiny_setup(warmup_fraction=1.0)
    assert tiny_setup().sweep_units("tiny-llama") == [Unit("tiny-llama", "heads_only", 0, 1e-3),
                                                      Unit("tiny-llama", "heads_only", 0, 1e-2)]


def test_script_computes_the_chapter_units_of_a_profile_and_lists_them(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "MTP_RESULTS_DIR": str(tmp_path),
           "MTP_GIT_COMMIT": "0123abc"}
    script = [sys.executable, str(repo / "scripts" / "table1_paper_budget.py"), "--profile", "tiny", "--save-dir", ""]

    def run(*extra: str) -> str:
        out = subprocess.run(script + list(extra), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    setup = chapter_setup("tiny")
    assert setup.sweep_recipe != "heads_only" and len(setup.seeds["tiny-llama"]) == 2
    first = run("--models", "tiny-llama", "--recipes", "heads_only", "--seeds", "0")  # the LR sweep first, then the row
    started = [line.split(" seed")[0] for line in first.splitlines() if " steps of " in line]
    assert started == [f"tiny-llama {setup.sweep_recipe}"] * len(setup.lr_sweep["tiny-llama"]) + [
        "tiny-llama heads_only"], first  # each computed unit says what it trains (and shows a progress bar)
    listed = run("--list")
    stored = sorted(line.split()[2] for line in listed.splitlines() if line.strip().startswith("stored"))
    assert stored == sorted(["heads_only", setup.sweep_recipe]), listed  # the best sweep unit is its row's seed 0
    assert f"{len(setup.recipes) * 2 - 2} missing" in listed, listed
    records = [json.loads(r.read_text()) for r in (tmp_path / "tiny").glob("ch03-budget-*.json")]
    assert len(records) == len(setup.lr_sweep["tiny-llama"]) + 1
    assert all(r["provenance"]["git_commit"] for r in records)
    with pytest.raises(AssertionError, match="--shard"):
        run("--shard", "2/2")
    # --jobs 2: two units at a time, one process each (sharing one device); each unit records that two shared it
    two = [r for r in setup.recipes if r not in ("heads_only", setup.sweep_recipe)][:2]
    out = run("--models", "tiny-llama", "--recipes", *two, "--seeds", "0", "--jobs", "2")
    started = sorted(line.split(" seed")[0] for line in out.splitlines() if " steps of " in line)
    assert started == sorted(f"tiny-llama {r}" for r in two), out  # each unit computed once
    records = [json.loads(r.read_text()) for r in (tmp_path / "tiny").glob("ch03-budget-*.json")]
    shared = sorted(r["config"]["recipe"] for r in records if r["result"]["speed"].get("gpu_processes") == 2)
    assert shared == sorted(two), [r["config"] for r in records]
    with pytest.raises(AssertionError, match="--jobs and --gpus run their own processes"):
        run("--jobs", "2", "--shard", "0/2")


def test_jobs_start_a_models_rows_once_its_lr_sweep_is_stored(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "MTP_RESULTS_DIR": str(tmp_path),
           "MTP_GIT_COMMIT": "0123abc"}
    cmd = [sys.executable, str(repo / "scripts" / "table1_paper_budget.py"), "--profile", "tiny", "--save-dir", "",
           "--models", "tiny-llama", "--recipes", "heads_only", "--seeds", "0", "--jobs", "2"]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    setup = chapter_setup("tiny")
    started = [line.split(" lr")[0] for line in out.stdout.splitlines() if " steps of " in line]
    sweep = len(setup.lr_sweep["tiny-llama"])
    assert sorted(started[:sweep]) == [f"tiny-llama {setup.sweep_recipe} seed 0"] * sweep, out.stdout
    assert started[sweep:] == ["tiny-llama heads_only seed 0"], out.stdout  # after the sweep, in the same run
    assert len(list((tmp_path / "tiny").glob("ch03-budget-*.json"))) == sweep + 1


def test_jobs_pass_each_process_the_minutes_left_of_the_whole_run() -> None:
    from loaders import load_file

    script = load_file("scripts/table1_paper_budget.py", "table1_paper_budget")
    argv = ["--profile", "gpu", "--jobs", "4", "--stop-after", "9", "--compile", "--jobs=4", "--stop-after=9"]
    assert script.unit_argv(argv, 7, 4) == ["--profile", "gpu", "--compile", "--unit", "7", "--gpu-processes", "4"]
    assert script.unit_argv(argv, 0, 4, 2.5)[-2:] == ["--stop-after", "2.5000"]


def test_gpus_spread_the_queue_over_the_gpus_least_busy_first(monkeypatch) -> None:
    import os

    from loaders import load_file

    script = load_file("scripts/table1_paper_budget.py", "table1_paper_budget")
    assert script.visible_gpus("all", 4, None) == ["0", "1", "2", "3"]
    assert script.visible_gpus("2", 4, "5,7,9") == ["5", "7"]  # named as this process sees them
    for bad in ("5", "0", "two"):
        with pytest.raises(SystemExit, match="--gpus"):
            script.visible_gpus(bad, 4, None)
    assert script.pick_gpu(["0", "1", "2"], ["0", "1", "0"]) == "2"
    assert script.pick_gpu(["0", "1"], ["1"]) == "0"

    class Fake:  # a unit's process: it ends after `ticks` polls
        def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
            self.unit, self.gpu, self.env = int(cmd[cmd.index("--unit") + 1]), env["CUDA_VISIBLE_DEVICES"], env
            self.per_gpu = int(cmd[cmd.index("--gpu-processes") + 1])
            self.ticks, self.returncode, self.argv = 1 + self.unit % 3, 0, cmd
            self.beside = sum(f.gpu == self.gpu and f.ticks > 0 for f in launched)  # running on its GPU
            launched.append(self)

        def poll(self) -> int | None:
            self.ticks -= 1
            return None if self.ticks > 0 else 0

    launched: list[Fake] = []
    monkeypatch.setattr(script.time, "sleep", lambda s: None)
    todo = list(range(7))

    def ready() -> list[int]:
        running = {f.unit for f in launched if f.ticks > 0}
        done = {f.unit for f in launched if f.ticks <= 0}
        return [i for i in todo if i not in done and i not in running] + sorted(running)

    argv = ["--profile", "gpu", "--jobs", "2", "--gpus", "all"]
    assert script.run_jobs(argv, 2, ready, None, ["3", "4"], launch=Fake) == 0
    assert sorted(f.unit for f in launched) == todo  # each unit once
    assert [f.gpu for f in launched[:4]].count("3") == 2 and all(f.per_gpu == 2 for f in launched)
    assert all("--gpus" not in f.argv and "--jobs" not in f.argv for f in launched)
    assert max(f.beside for f in launched) == 1  # never more than --jobs on one GPU at once, and both used
    assert {f.gpu for f in launched} == {"3", "4"}
    # each of the 4 processes gets its share of the cores for torch's threads and Inductor's workers
    assert script.child_threads(4, 128, {}) == {"OMP_NUM_THREADS": "32", "TORCHINDUCTOR_COMPILE_THREADS": "32"}
    assert script.child_threads(32, 16, {"OMP_NUM_THREADS": "2"}) == {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
    share = script.child_threads(4, script.os.cpu_count() or 1, {})
    assert all(f.env.get(k) == os.environ.get(k, v) for f in launched for k, v in share.items())
