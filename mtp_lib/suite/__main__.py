"""Command line of the size suite: build the stream, train sizes, analyze them (cached results).

    python -m mtp_lib.suite stream  --profile gpu
    python -m mtp_lib.suite train   --profile gpu --size 14m 31m
    python -m mtp_lib.suite analyze --profile gpu --size 14m 31m
    python -m mtp_lib.suite analyze --profile gpu --size 160m --shard 0/3   # and 1/3, 2/3 in parallel; then
                                                                            # without --shard, to gather them
    python -m mtp_lib.suite tuned   --profile gpu --size 14m 31m   # the tuned lens beside the logit lens
    python -m mtp_lib.suite run     --profile gpu --size 160m      # train, analyze, tuned lens
    python -m mtp_lib.suite train   --profile gpu --size 14m --retrain   # the weights back (not committed)

Data parallel on several GPUs: ``accelerate launch --multi_gpu --num_processes N -m mtp_lib.suite train ...``
(only training runs in every process). ``--set key=value`` overrides a setting of the profile
(for example ``--set steps=20``); values are read as YAML.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from mtp_lib.suite.run import SuiteSettings, analyze_shard, analyze_size, stream_result, train_size, tuned_size
from mtp_lib.suite.shapes import shape


def _settings(args: argparse.Namespace) -> SuiteSettings:
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return SuiteSettings.from_profile(args.profile, **overrides)


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard takes I/N with 0 <= I < N (for example 0/3), got {text!r}")
    return int(index), int(count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtp_lib.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["stream", "train", "analyze", "tuned", "run"])
    parser.add_argument("--profile", default="cpu", help="tiny, cpu or gpu (chapters/profiles/<profile>.yaml)")
    parser.add_argument("--size", nargs="*", default=None, help="sizes (default: the profile's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--fresh", action="store_true", help="discard a checkpoint of another run and start over")
    parser.add_argument("--retrain", action="store_true",
                        help="train even where the training result is stored (it is replaced): brings back the "
                             "weights, which are not committed, for an analysis or a tuned lens. Same recipe, data "
                             "and seed; on a GPU close to, not bit-identical with, the first run (nondeterministic "
                             "kernels: on an H200 the logged losses of the four sizes moved by up to 0.014 nats)")
    parser.add_argument("--shard", metavar="I/N", help="analyze: only shard I of N of the snapshots' parts, "
                        "storing no result (run the N shards in parallel, then analyze without --shard)")
    parser.add_argument("--device", default="auto", help="device of the analyses: auto, cpu or cuda")
    args = parser.parse_args(argv)
    if args.shard and args.command != "analyze":
        parser.error("--shard goes with the analyze command only")
    try:
        shard = _shard(args.shard) if args.shard else None
        settings = _settings(args)
        sizes = args.size or list(settings.sizes)
        for size in sizes:
            shape(size)  # an unknown size fails here, before any work
        manifest = stream_result(settings)
        print(f"stream {manifest.value['fingerprint']}: {manifest.value['tokens']:,} tokens ({manifest.path.name})")
        for size in sizes if args.command != "stream" else []:
            if args.command in ("train", "run"):
                r = train_size(settings, size, fresh=args.fresh, retrain=args.retrain)
                print(json.dumps({k: r.value[k] for k in ("size", "non_embedding_params", "train_tokens",
                                                          "final_loss", "tokens_per_s", "mfu")}), r.path.name)
            if shard:
                analyze_shard(settings, size, shard, device=args.device)
                print(f"analysis of {size}: shard {args.shard} done")
            elif args.command in ("analyze", "run"):
                a = analyze_size(settings, size, device=args.device)
                print(f"analysis of {size}: {a.path.name}")
            if args.command == "tuned" or (args.command == "run" and settings.tuned_lens):
                t = tuned_size(settings, size, device=args.device)
                print(f"tuned lens of {size}: {t.path.name}")
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
