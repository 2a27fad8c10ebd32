"""Data-parallel training: scripts/train_heads.py under two processes (torchrun, gloo on the CPU, as
``accelerate launch`` starts it on several GPUs) trains the same weights as one process with the same
effective batch: each optimizer step sees the same sequences, split across the processes, and (tiny
GPT-2, dropout 0.1) draws the same dropout masks for them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from seeds import fresh_seed

REPO = Path(__file__).resolve().parents[1]


def train(out: Path, seed: int, recipe: str, model: str, processes: int) -> subprocess.CompletedProcess:
    script = [str(REPO / "scripts" / "train_heads.py"), "--model", model, "--recipe", recipe,
              "--lr", "3e-3", "--epochs", "1", "--max-steps", "3", "--micro-batch", "4",
              "--effective-batch", "16", "--n-train", "48", "--n-eval", "4", "--device", "cpu",
              "--seed", str(seed), "--no-progress", "--out", str(out)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    # this checkout's mtp_lib, not another one an editable install may point at
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(launcher + script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_train_what_one_does(tmp_path: Path) -> None:
    seed = fresh_seed() % 10_000
    rng = random.Random(seed)
    recipe = rng.choice(["heads_only", "diff_lr_whs", "vanilla_joint"])
    model = rng.choice(["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
    runs = {}
    for processes in (1, 2):
        result = train(tmp_path / str(processes), seed, recipe, model, processes)
        assert result.returncode == 0, f"seed {seed}, {processes} process(es):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        assert f"{processes} process(es)" in result.stdout, f"seed {seed}: {result.stdout[-2000:]}"
        runs[processes] = load_file(str(tmp_path / str(processes) / "trained.safetensors"))
    one, two = runs[1], runs[2]
    assert one.keys() == two.keys() and one, f"seed {seed}"
    # Adam moves every weight by up to lr (3e-3) a step whatever its gradient's size, so float32 sums
    # in another order may move a weight by a small part of that; other data would move it by ~lr.
    for name in one:
        diff = (one[name].double() - two[name].double()).abs().max().item()
        assert diff <= 3e-5, f"seed {seed} {recipe} {model}: {name} differs by {diff} (1% of one step: 3e-5)"
    histories = [json.loads((tmp_path / str(n) / "history.json").read_text()) for n in (1, 2)]
    losses = [[r["loss"] for r in h if "loss" in r] for h in histories]
    assert losses[0] and len(losses[0]) == len(losses[1]), f"seed {seed}"
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4), f"seed {seed}"
