"""Pretraining throughput of the suite's sizes: tokens/s and model-FLOPs utilization (MFU).

Runs the suite's own training (``mtp_lib.suite.pretrain.pretrain``, the code that trains the suite)
for a few steps per size and setting on the same stream, in one process, and reports what the run
measured after its first steps (compilation and warm-up excluded, checkpoint writes subtracted):

    python benchmarks/pretrain.py --profile gpu --sizes 14m 160m --steps 30 --out data/results/gpu/benchmark-pretrain.json

MFU = tokens/s x (6 N + 12 L d T) / the card's dense bf16 peak (PaLM's convention; N counts the
parameters that multiply: non-embedding and unembedding). ``--micro-batch`` and ``--compile``
compare settings side by side (comma-separated; ``--compile`` takes 1, 0 or a torch.compile mode such
as ``max-autotune-no-cudagraphs``). ``--kernels`` adds the top device kernels of a few steps of the
first setting, and the share of the step they fill (where the time goes, for the MFU goal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from mtp_lib.results import provenance
from mtp_lib.suite import pretrain
from mtp_lib.suite.run import SuiteSettings, open_stream


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="gpu", help="whose stream and recipe (chapters/profiles/<profile>.yaml)")
    parser.add_argument("--sizes", nargs="+", default=["160m"])
    parser.add_argument("--steps", type=int, default=30, help="steps per size and setting (the first 5 untimed)")
    parser.add_argument("--micro-batch", default="0", help="comma-separated micro batches (0: the whole batch)")
    parser.add_argument("--compile", default="1",
                        help="comma-separated: 1 compiled, 0 eager, or a torch.compile mode (compiled so)")
    parser.add_argument("--kernels", action="store_true", help="top device kernels of 5 steps of the first setting")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = SuiteSettings.from_profile(args.profile)
    stream = open_stream(settings)
    rows = []
    for size in args.sizes:
        for micro in (int(m) for m in args.micro_batch.split(",")):
            for compiled in (_compile_setting(c) for c in args.compile.split(",")):
                spec = dataclasses.replace(settings.train_spec(size), steps=args.steps, micro_batch=micro,
                                           compile=compiled, checkpoint_every=10**9)
                with tempfile.TemporaryDirectory() as tmp:
                    rec = pretrain.pretrain(stream.tokens, stream.fingerprint, len(stream.tokenizer), spec, Path(tmp),
                                            eos_id=stream.tokenizer.eos_token_id, progress=False)
                row = {"size": size, "micro_batch": rec["throughput"]["micro_batch"], "compile": compiled,
                       "tokens_per_s": rec["tokens_per_s"], "mfu": rec["mfu"], "params": rec["params"],
                       "non_embedding_params": rec["non_embedding_params"],
                       "flops_per_token": rec["throughput"]["flops_per_token"],
                       "timed_steps": rec["throughput"]["timed_steps"], "seconds": rec["throughput"]["seconds"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    kernels = profile_steps(stream, dataclasses.replace(
        settings.train_spec(args.sizes[0]), micro_batch=int(args.micro_batch.split(",")[0]),
        compile=_compile_setting(args.compile.split(",")[0]))) if args.kernels else None
    if kernels:
        print("\n".join(kernels))
    out = {"settings": {"profile": args.profile, "steps": args.steps, "batch_size": settings.batch_size,
                        "seq_len": settings.seq_len, "vocab_size": len(stream.tokenizer)},
           "stream": stream.fingerprint, "rows": rows, "kernels": kernels, "provenance": provenance()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


def _compile_setting(text: str) -> bool | str:
    return {"1": True, "0": False}.get(text, text)


def profile_steps(stream: Any, spec: pretrain.TrainSpec, steps: int = 5) -> list[str]:
    """The top device kernels of ``steps`` training steps (after 3 of warm-up and compilation) under
    torch.profiler, and the kernels' busy share of the profiled time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from marginal import step_kernels  # benchmarks/marginal.py: the kernels of a chrome trace

    with tempfile.TemporaryDirectory() as tmp:
        run = pretrain._Run(stream.tokens, stream.fingerprint, len(stream.tokenizer), stream.tokenizer.eos_token_id,
                            spec, Path(tmp), fresh=False)
        for _ in range(3):
            run.train_step()
        cuda = run.acc.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                run.train_step()
            if cuda:
                torch.cuda.synchronize()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    return step_kernels(events, steps, top=20)


if __name__ == "__main__":
    main()
