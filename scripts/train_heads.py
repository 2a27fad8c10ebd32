"""Train one recipe of the paper's Table 1 on one model, or time training steps of several recipes.

Train (writes trained.safetensors, config.json, history.json, eval.json to --out; an interrupted run
resumes from --out/checkpoint.pt when started again with the same arguments; other arguments are
refused, saying what differs, unless --no-resume starts over):

    python scripts/train_heads.py --model smollm2-135m --recipe diff_lr --lr 1e-4 --out runs/diff_lr

On several GPUs (data parallel), the same command under accelerate:

    accelerate launch --multi_gpu --num_processes 4 scripts/train_heads.py --model ... --recipe ... --out ...

(on CPU processes, for a check: torchrun --standalone --nproc_per_node 2 scripts/train_heads.py --device cpu ...)

Time one optimizer step of several recipes side by side, on the same batch:

    python scripts/train_heads.py --model smollm2-135m --time-step heads_only vanilla_joint --batch 4 --seq 80

The NTP baseline (--recipe ntp_baseline) is read back as a plain HF model with
``mtp_lib.train.load_trained(model, out)``, or saved as one with --save-merged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mtp_lib.train import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder (mtp_lib.models.load_model)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="heads_only")
    p.add_argument("--out", type=Path, help="output folder (needed to train)")
    p.add_argument("--lr", type=float, help="base learning rate (default: the recipe's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per phase")
    p.add_argument("--micro-batch", type=int, help="sequences per forward pass and process")
    p.add_argument("--effective-batch", type=int, help="sequences per optimizer step (paper: 64)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2048, help="training pairs (paper: 200k)")
    p.add_argument("--n-eval", type=int, default=50, help="validation pairs scored at the end (paper: 50)")
    p.add_argument("--dataset", default="bible-es-en", help="mtp_lib.data translation dataset")
    p.add_argument("--references", nargs="+", default=["web"], choices=["web", "kjv"],
                   help="bible-es-en: English references of the training pairs (web kjv: two per verse)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="shuffle the training pairs with this seed before taking --n-train (default: file "
                        "order; with --references web kjv the file order puts every WEB pair first)")
    p.add_argument("--no-dropout", action="store_true",
                   help="train in eval mode (dropout off; TrainConfig.train_mode=False)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under accelerate launch: its device)")
    p.add_argument("--no-resume", action="store_true", help="start over, replacing a checkpoint and results in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--save-merged", action="store_true", help="ntp_baseline: also save the merged HF model")
    p.add_argument("--time-step", nargs="+", metavar="RECIPE", choices=sorted(RECIPES),
                   help="time optimizer steps of these recipes instead of training")
    p.add_argument("--batch", type=int, default=4, help="--time-step: sequences per step")
    p.add_argument("--seq", type=int, default=80, help="--time-step: tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="--time-step: timed steps per recipe and round")
    p.add_argument("--rounds", type=int, default=2,
                   help="--time-step: rounds over the recipes (interleaved, so that load drift hits all alike)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.time_step is None and args.out is None:
        p.error("--out is required to train (or pass --time-step)")
    return args


def make_accelerator(device: str) -> Any:
    from accelerate import Accelerator

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")


def time_steps(args: argparse.Namespace) -> None:
    """Median seconds per optimizer step of each recipe: same batch, same process, recipes interleaved
    over ``--rounds`` rounds, each run's first step (warm-up) not counted."""
    from mtp_lib.data import translation_samples
    from mtp_lib.models import load_model
    from mtp_lib.train import recipe, train

    acc = make_accelerator(args.device)
    loaded = load_model(args.model, device=acc.device)
    pool = [s for s in translation_samples(loaded.tokenizer, 200, split="train", dataset=args.dataset)
            if len(s.input_ids) >= args.seq and s.target_start < args.seq - 1]
    if len(pool) < args.batch:
        raise SystemExit(f"fewer than {args.batch} training samples have {args.seq} tokens; lower --seq")
    batch = [dataclasses.replace(s, input_ids=s.input_ids[:args.seq]) for s in pool[:args.batch]]
    samples = batch * (args.steps + 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{loaded.name}: {loaded.info()['params'] / 1e6:.1f}M params, device {acc.device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch} x {args.seq} tokens, "
          f"{args.rounds} rounds x {args.steps} timed steps per recipe")
    times: dict[str, list[float]] = {name: [] for name in args.time_step}
    for _ in range(args.rounds):
        for name in args.time_step:
            config = recipe(name, effective_batch_size=args.batch, micro_batch_size=args.batch,
                            head_warmup_epochs=0, max_steps=args.steps + 1, epochs=1)
            stamps: list[float] = []

            def stamp(entry: dict[str, Any]) -> None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            train(loaded.model, samples, config, progress=False, accelerator=acc, callback=stamp)
            times[name] += [b - a for a, b in zip(stamps, stamps[1:])]
    print(f"{'recipe':<22}{'median s/step':>14}{'min':>8}{'max':>8}")
    for name, steps in times.items():
        print(f"{name:<22}{statistics.median(steps):>14.3f}{min(steps):>8.3f}{max(steps):>8.3f}")
    if any(n == "head_warmup" or n.startswith("head_warmup") for n in args.time_step):
        print("(warmup recipes timed without their heads-only phase: their joint steps)")


def run_training(args: argparse.Namespace) -> None:
    from mtp_lib.data import translation_samples
    from mtp_lib.models import load_model
    from mtp_lib.train import accuracy, evaluate, recipe, train

    acc = make_accelerator(args.device)
    overrides = {k: v for k, v in dict(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                                        micro_batch_size=args.micro_batch,
                                        effective_batch_size=args.effective_batch).items() if v is not None}
    config = recipe(args.recipe, seed=args.seed, eval_every=args.eval_every,
                    checkpoint_every=args.checkpoint_every, train_mode=not args.no_dropout, **overrides)
    loaded = load_model(args.model, device=acc.device)
    train_set = translation_samples(loaded.tokenizer, args.n_train, split="train", dataset=args.dataset,
                                    references=args.references, seed=args.data_seed)
    eval_set = translation_samples(loaded.tokenizer, args.n_eval, split="validation", dataset=args.dataset)
    if acc.is_main_process:
        print(f"{args.recipe} on {loaded.name} ({loaded.source}): {len(train_set)} training pairs, "
              f"{len(eval_set)} validation pairs, {acc.num_processes} process(es) on {acc.device}")
        print(json.dumps(config.to_dict()))
    start = time.perf_counter()
    try:
        result = train(loaded.model, train_set, config, eval_samples=eval_set if args.eval_every else None,
                       out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress, accelerator=acc)
    except ValueError as err:
        if "resume=False" not in str(err):
            raise
        raise SystemExit(f"{err}\n(this script's --no-resume passes resume=False)") from None
    seconds = time.perf_counter() - start
    if not acc.is_main_process:
        return
    steps = sum(1 for r in result.history if "loss" in r)
    print(f"{steps} optimizer steps (resumed ones included), {seconds:.1f} s of training in this run, "
          f"{acc.num_processes} process(es)")
    summary: dict[str, Any] = {"model": loaded.info(), "config": config.to_dict(), "n_train": len(train_set),
                               "dataset": args.dataset, "references": args.references, "data_seed": args.data_seed,
                               "processes": acc.num_processes,
                               "train_seconds": seconds, "steps": steps}
    if config.objective == "mtp":
        with acc.autocast():
            top5 = accuracy(evaluate(result.model, eval_set, progress=not args.no_progress))
        summary["eval_top5"] = top5
        print("top-5 accuracy per head:", ", ".join(f"head {n + 1}: {a:.3f}" for n, a in enumerate(top5)))
    elif args.save_merged:
        result.model.save_pretrained(args.out / "merged")
        loaded.tokenizer.save_pretrained(args.out / "merged")
        print(f"merged model saved to {args.out / 'merged'}")
    (args.out / "eval.json").write_text(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.time_step:
        time_steps(args)
    else:
        run_training(args)


if __name__ == "__main__":
    sys.exit(main())
