"""Compute Chapter 3's paper-budget units (one cached result per model, Table 1 row and seed) on a GPU.

The settings are Chapter 3's for the profile (its parameters cell and chapters/profiles/<profile>.yaml,
the ``budget_*`` values), so the results land under the keys the chapter looks up, in
data/results/<profile>/ (or $MTP_RESULTS_DIR/<profile>). Every missing unit, LR sweeps first:

    MTP_GIT_COMMIT=$(git rev-parse HEAD) python scripts/table1_paper_budget.py --profile gpu

Some units (each a separate cached result, so several runs fill the table):

    python scripts/table1_paper_budget.py --profile gpu --models smollm2-135m --recipes diff_lr --seeds 0 1

What is stored and what is missing, without computing:

    python scripts/table1_paper_budget.py --profile gpu --list

Units spread over several GPUs of one host, one process per GPU (``--shard K/N``: every N-th unit,
from the K-th, in a fixed order: LR sweeps, then each model's rows seed-major, every row's first seed
before any second; a row of a model whose LR sweep is not stored yet waits for it):

    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python scripts/table1_paper_budget.py --shard $i/4 & done; wait

A training step waits on the host more than on the GPU, so several units can share one GPU:
``--jobs N`` keeps N units training at once on this machine's GPU, one process each (each unit
records how many shared it; ``benchmarks/train_step.py --processes N`` measures what sharing gives).
The units are taken in the order above as processes end, so a short unit does not leave its place
idle, and a model's rows start as soon as its LR sweep is stored:

    python scripts/table1_paper_budget.py --models smollm2-135m --jobs 3

On a host of several GPUs, ``--gpus G`` (or ``all``) keeps ``--jobs`` units on each of G GPUs from one
queue: each new process goes to the GPU running the fewest (``CUDA_VISIBLE_DEVICES``), so the LR
sweeps start first everywhere and every GPU takes the next unit as soon as one of its own ends:

    python scripts/table1_paper_budget.py --gpus all --jobs 3 --compile --pack 512

A unit checkpoints every ``--checkpoint-every`` steps under --save-dir; the same command resumes it.
``--stop-after MINUTES`` stops cleanly right after a checkpoint once that much time has passed (for
machines lent by the slot). The commit recorded with each result comes from git, or from
$MTP_GIT_COMMIT on a machine without the history.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from mtp_lib.cli import drop_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="gpu", help="profile whose Chapter 3 settings to use (gpu, cpu, tiny)")
    p.add_argument("--models", nargs="+", help="only these models (default: the profile's budget_models)")
    p.add_argument("--recipes", nargs="+", help="only these rows (LR sweeps of the chosen models always run first)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    p.add_argument("--shard", default="0/1", help="K/N: only every N-th unit from the K-th (one process per GPU)")
    p.add_argument("--jobs", type=int, default=1, help="N > 1: N units at once on each GPU, one process each")
    p.add_argument("--gpus", default="1", metavar="G",
                   help="G > 1 or 'all': --jobs units on each of G GPUs of this host, from one queue")
    p.add_argument("--gpu-processes", type=int, default=1, help=argparse.SUPPRESS)  # set by --jobs in its processes
    p.add_argument("--unit", type=int, default=-1, help=argparse.SUPPRESS)  # set by --jobs: the one unit to compute
    p.add_argument("--list", action="store_true", help="list the units, stored or missing, and compute nothing")
    p.add_argument("--save-dir", default="runs/paper-budget", help="checkpoints (resume); '' for none")
    p.add_argument("--checkpoint-every", type=int, default=250, help="optimizer steps between checkpoints")
    p.add_argument("--stop-after", type=float, default=0, help="minutes; stop right after a checkpoint past it")
    p.add_argument("--no-progress", action="store_true", help="no start line and progress bar per unit")
    p.add_argument("--compile", action="store_true",
                   help="train with each decoder layer compiled (torch.compile; benchmarks/train_step.py times it)")
    p.add_argument("--pack", type=int, default=0, metavar="TOKENS",
                   help="train on rows packed with several sequences, up to TOKENS a row (512 fits every pair), "
                        "instead of one padded sequence a row (benchmarks/train_step.py --variants ... packed)")
    p.add_argument("--allow-cpu", action="store_true", help="compute a GPU profile's units without a GPU (slow)")
    return p.parse_args(argv)


def unit_argv(argv: list[str], unit: int, jobs: int, minutes_left: float | None = None) -> list[str]:
    """``argv`` for the process of unit ``unit`` under ``--jobs jobs``: --jobs replaced by --unit and
    --gpu-processes, and --stop-after by the minutes left of the whole run's."""
    left = [] if minutes_left is None else ["--stop-after", f"{max(minutes_left, 1e-3):.4f}"]
    out = drop_options(argv, valued=("--jobs", "--gpus", "--stop-after"))
    return out + ["--unit", str(unit), "--gpu-processes", str(jobs), *left]


def pick_gpu(gpus: list[str], busy: list[str]) -> str:
    """The GPU of ``gpus`` with the fewest of the running processes' GPUs ``busy`` (the first on ties)."""
    return min(gpus, key=busy.count)


def visible_gpus(count: str, available: int, visible: str | None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each of the ``--gpus count`` GPUs to use: the first ``count``
    (or all) of the ``available`` ones, named as this process sees them (``visible``: its own
    ``CUDA_VISIBLE_DEVICES``, if set)."""
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(available)]
    names = names[:available]
    n = len(names) if count == "all" else int(count) if count.isdigit() else 0
    if n < 1 or n > len(names):
        raise SystemExit(f"--gpus {count}: give 'all' or a count from 1 to the {len(names)} GPU(s) this machine "
                         "shows (nvidia-smi lists them; CUDA_VISIBLE_DEVICES narrows them)")
    return names[:n]


def child_threads(slots: int, cpus: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Each of ``slots`` processes' share of the host's ``cpus``: torch's CPU threads and Inductor's
    compile workers (by default each process takes every core for both: 32 processes of 128 cores
    would run 1,024 compile workers at once). A variable already set is left as it is."""
    share = str(max(1, cpus // slots))
    return {k: share for k in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS") if k not in environ}


def run_jobs(argv: list[str], jobs: int, ready: Callable[[], list[int]], deadline: float | None,
             gpus: list[str] | None = None, launch: Callable[..., Any] | None = None) -> int:
    """Keep ``jobs`` processes of this script at once on each GPU, one per unit.

    ``ready()`` gives the units that could start now (missing, in the fixed order, a model's rows once
    its LR sweep is stored); it is asked again whenever a process ends, so units are taken in order as
    places free up. With ``gpus`` (their ``CUDA_VISIBLE_DEVICES`` values) each process is started on
    the one running the fewest (:func:`pick_gpu`); without, they share this machine's GPU. No unit
    starts past ``deadline``. ``launch(cmd, env=...)`` starts a process (``subprocess.Popen``).
    Returns the worst exit status."""
    import subprocess

    launch = subprocess.Popen if launch is None else launch
    slots = jobs * (len(gpus) if gpus else 1)
    base = {**os.environ, **child_threads(slots, os.cpu_count() or 1, os.environ)}
    running: dict[int, tuple[Any, Any]] = {}  # unit -> (process, its GPU)
    started: set[int] = set()
    worst = 0
    while True:
        free = [i for i in ready() if i not in started] if deadline is None or time.perf_counter() < deadline else []
        for i in free[:slots - len(running)]:
            left = None if deadline is None else (deadline - time.perf_counter()) / 60
            gpu = pick_gpu(gpus, [g for _, g in running.values()]) if gpus else None
            env = base if gpu is None else {**base, "CUDA_VISIBLE_DEVICES": gpu}
            running[i] = (launch([sys.executable, __file__, *unit_argv(argv, i, jobs, left)], env=env), gpu)
            started.add(i)
            if gpu is not None:
                print(f"unit {i} started on GPU {gpu}", flush=True)
        if not running:
            return worst
        while not (done := [i for i, (p, _) in running.items() if p.poll() is not None]):
            time.sleep(1)
        for i in done:
            worst = max(worst, running.pop(i)[0].returncode)


def print_units(runs: Any, setup: Any) -> None:
    """A line per stored unit (its 2nd-token accuracy and speed) and per missing one."""
    import torch

    from mtp_lib.strategy_runs import STRATEGIES

    for (name, rec, seed), res in sorted(runs.rows.items()):
        speed = res.value["speed"]
        print(f"  stored  {name:14s} {rec:20s} seed {seed}  lr {res.value['lr']:g}  2nd-token top-{setup.top_k}: "
              f"{torch.tensor(res.value['hits'], dtype=torch.float)[:, 1].mean():.3f}  {speed['tokens_per_s']:,.0f} "
              f"tokens/s on {speed['device']}  ({res.path.name})")
    for unit in runs.missing:
        print(f"  missing {unit.model:14s} {unit.recipe:20s} seed {unit.seed}  lr {unit.lr:g}  "
              f"({STRATEGIES[unit.recipe]})")
    for name, lr in runs.lr.items():
        if lr is None:
            print(f"  {name}: rows wait for the LR sweep on {setup.sweep_recipe} ({setup.lr_sweep.get(name)})")


def main(argv: list[str] | None = None) -> int:
    import torch

    from mtp_lib import budget_train
    from mtp_lib.budget_runs import Unit, chapter_setup, run_budget
    from mtp_lib.profiles import load_profile

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    queue = args.jobs > 1 or args.gpus != "1"
    if queue and (args.shard != "0/1" or args.list):
        raise SystemExit("--jobs and --gpus run their own processes: give them without --shard and --list")
    if (not args.list and load_profile(args.profile).compute == "cuda" and not torch.cuda.is_available()
            and not args.allow_cpu):
        raise SystemExit(f"profile {args.profile!r} is computed on a CUDA GPU and this machine has none "
                         "(--allow-cpu computes anyway, slowly)")
    gpus = None if args.gpus == "1" else visible_gpus(args.gpus, torch.cuda.device_count(),
                                                       os.environ.get("CUDA_VISIBLE_DEVICES"))
    setup = chapter_setup(args.profile, compute=not args.list and not queue, save_dir=args.save_dir)
    setup.checkpoint_every = args.checkpoint_every  # (not in a unit's key: a checkpoint does not change results)
    setup.progress = not args.no_progress
    setup.compile = args.compile  # (not in a unit's key either: it changes how the steps run, not what they compute)
    setup.gpu_processes = args.gpu_processes  # (nor this: how many units shared the GPU, for their speed)
    setup.pack_rows = args.pack  # (nor this: the same loss up to rounding, with fewer padding tokens)
    bad = sorted(set(args.models or []) - set(setup.models)) + sorted(set(args.recipes or []) - set(setup.recipes))
    if bad:
        raise SystemExit(f"{bad} are not among the profile's budget_models {setup.models} / rows {setup.recipes}")
    if args.stop_after > 0:
        budget_train.DEADLINE.append(time.perf_counter() + 60 * args.stop_after)

    shard, n_shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < n_shards:
        raise SystemExit(f"--shard {args.shard}: give K/N with 0 <= K < N")
    sweeps = [u for name in setup.models for u in setup.sweep_units(name)]
    rows = [u[:3] for name in setup.models for u in setup.row_units(name, 0.0)]  # seed-major, as run_budget runs them

    def index(unit: Unit) -> int:  # the unit's place in a fixed order: sweeps first, then rows
        return sweeps.index(unit) if unit in sweeps else len(sweeps) + rows.index(unit[:3])

    def chosen(unit: Unit) -> bool:
        sweep = unit in setup.sweep_units(unit.model)
        if budget_train.DEADLINE and time.perf_counter() > budget_train.DEADLINE[0]:
            return False  # out of time: start no other unit
        return ((index(unit) == args.unit if args.unit >= 0 else index(unit) % n_shards == shard)
                and (args.models is None or unit.model in args.models)
                and (sweep or args.recipes is None or unit.recipe in args.recipes)
                and (sweep or args.seeds is None or unit.seed in args.seeds))

    def ready() -> list[int]:
        return [index(u) for u in run_budget(setup).missing if chosen(u)]

    start, status = time.perf_counter(), 0
    try:
        if queue:  # this process computes nothing: it starts one process per unit, in order
            status = run_jobs(argv, args.jobs, ready, budget_train.DEADLINE[0] if budget_train.DEADLINE else None,
                              gpus)
        runs = run_budget(setup, select=chosen)  # (with --jobs: what is stored now)
    except budget_train.TimeUp as stop:
        print(f"time is up after {time.perf_counter() - start:.0f} s: {stop}")
        return 3
    print(f"profile {args.profile}: {len(runs.rows)} row unit(s) and {len(runs.sweep)} sweep unit(s) stored, "
          f"{len(runs.missing)} missing; {time.perf_counter() - start:.0f} s")
    if args.unit >= 0:
        return 0  # one unit of a --jobs run: the run lists them all at its end
    print_units(runs, setup)
    return status


if __name__ == "__main__":
    sys.exit(main())
