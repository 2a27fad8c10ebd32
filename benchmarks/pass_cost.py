"""Where a verification step's time goes: one step by dtype, tree and part, on the device's captured graphs.

Chapter 4's float32 runs found tree rows slower than chains (SmolLM2, H200: a 10-node tree step
8.1 ms against 4.8 ms for a 2-token chain, where bfloat16 gives 3.8 and 3.5 ms). This times, for a
model with ``--heads`` layer heads, each dtype and tree, and the plain and the invariant verifier:

  step        the decoder's captured verification step (masks, backbone, heads, head 1's greedy
              tokens, the acceptance, heads 2..'s top-k at the accepted node)
  compiled    with ``--compile``: the same step compiled by torch.compile, then captured
              (``SpeculativeDecoder(compile_step=True)``: Inductor fuses each layer's small kernels)
  step+host   the same called as the decoder calls it (the step's tensor built on the host, copied in,
              its predictions copied back): the whole step but for the host's drafting and acceptance
  forward     the model and heads' forward alone (their states at every token)
  head1       head 1's greedy token at every token
  heads@all   heads 2..'s logits and top-k at every node (what the decoder computed before e55cdb7)
  heads@row   the same at one node (what it computes now)
  commit      the cache compaction after a tree step that accepted an off-chain node

and, by rows S, one matmul of an MLP weight and of the unembedding alone: in float32 (no TF32)
matmuls run on CUDA cores, so their cost grows with the rows of a pass much sooner than in
bfloat16; ``tf32`` keeps float32 weights and runs the matmuls on the tensor cores in TF32. ``--profile`` adds the top kernels of five eager steps per dtype and tree (torch.profiler).

Timings need no trained weights: ``--shape smollm2-135m`` (or gemma3-270m, a config.json, a tiny
model's name) builds the model from its config with random weights, so no model files are needed on
the GPU machine; ``--model`` loads real weights instead. On CUDA every part is a captured graph
timed by CUDA events (the median of ``--trials`` trials of ``--repeats`` replays); on the CPU the
same parts run eagerly, timed by the wall clock (a smoke run, not a measurement).

    python benchmarks/pass_cost.py --shape smollm2-135m --profile --out pass-cost-smollm2.json
    python benchmarks/pass_cost.py --shape tiny-llama --device cpu --repeats 2 --trials 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtp_lib.tiny_models import SHAPES, TINY_MODELS, benchmark_model

# greedy, spec2_chain, spec4_chain, spec2_tree's and spec4_tree's shapes, spec4_dyn's
TREES = ("chain0", "chain1", "chain3", "top10", "tree64", "dyn64")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", default="smollm2-135m",
                     help=f"random weights in a known shape ({', '.join(SHAPES)}, {', '.join(TINY_MODELS)}) or a config.json")
    src.add_argument("--model", help="real weights: an alias, hub id or folder (mtp_lib.models.load_model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default="float32,tf32,bf16",
                   help="comma separated: float32, tf32 (float32 weights, TF32 matmuls), bf16")
    p.add_argument("--trees", default=",".join(TREES[1:]), help=f"comma separated, of {', '.join(TREES)}")
    p.add_argument("--verifiers", default="plain,invariant", help="comma separated: plain, invariant")
    p.add_argument("--heads", type=int, default=4, help="MTP heads (layer heads)")
    p.add_argument("--context", type=int, default=160, help="tokens in the cache before the step")
    p.add_argument("--gemm-rows", default="1,2,4,11,16,32,65", help="rows of the matmuls timed alone")
    p.add_argument("--repeats", type=int, default=50, help="replays per trial")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="top kernels of eager steps (torch.profiler)")
    p.add_argument("--compile", action="store_true", help="also time each step compiled (torch.compile)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    bad = [t for t in args.trees.split(",") if t not in TREES]
    if bad:
        p.error(f"unknown trees {bad}: choose from {', '.join(TREES)}")
    if any(v not in ("plain", "invariant") for v in args.verifiers.split(",")):
        p.error(f"--verifiers {args.verifiers!r}: choose from plain, invariant")
    return args


def make_tree(name: str) -> Any:
    from mtp_lib.decode import DynamicTree, Tree

    if name == "dyn64":
        return DynamicTree(64, 3)
    if name.startswith("chain"):
        return Tree.chain(int(name[5:]))
    if name == "top10":  # head 2's ten best drafts side by side
        return Tree(tuple((r,) for r in range(10)))
    ranks = [[0.6, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01]] * 3  # a calibrated-looking tree
    return Tree.from_rank_probs(ranks, 64)


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> Any:
    """The backbone (random weights in ``--shape``, or ``--model``'s) with ``--heads`` layer heads."""
    from mtp_lib.heads import MTPModel

    backbone = benchmark_model(args.model, args.shape, device, dtype)
    return MTPModel(backbone, n_heads=args.heads).to(device=device, dtype=dtype).eval()


class Timer:
    """Times ``fn`` on fixed inputs: a replayed CUDA graph timed by events, or eager calls by the clock."""

    def __init__(self, device: torch.device, repeats: int, trials: int) -> None:
        self.cuda, self.repeats, self.trials = device.type == "cuda", repeats, trials

    def __call__(self, fn: Callable[..., Any], *inputs: torch.Tensor, capture: bool = True) -> float:
        """Milliseconds per call: the median over trials of the mean over ``repeats`` calls."""
        from mtp_lib.decode_graph import GraphRunner

        if capture:
            runner = GraphRunner(fn, inputs, cuda_graph=self.cuda)
            call: Callable[[], Any] = runner.graph.replay if runner.graph is not None else lambda: runner.fn(*runner.inputs)
        else:
            call = lambda: fn(*inputs)  # noqa: E731
        call()
        per_trial = []
        for _ in range(self.trials):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.repeats):
                    call()
                stop.record()
                torch.cuda.synchronize()
                per_trial.append(start.elapsed_time(stop) / self.repeats)
            else:
                t0 = time.perf_counter()
                for _ in range(self.repeats):
                    call()
                per_trial.append((time.perf_counter() - t0) * 1e3 / self.repeats)
        return round(statistics.median(per_trial), 4)


@torch.no_grad()
def time_parts(mtp: Any, tree: Any, invariant: bool, width: int, args: argparse.Namespace, timer: Timer
               ) -> dict[str, Any]:
    """One row: every part of one step of ``tree`` (passes of ``width`` tokens when ``invariant``)."""
    from mtp_lib.decode import DynamicTree, SpeculativeDecoder

    device = next(mtp.parameters()).device
    shape = tree.template if isinstance(tree, DynamicTree) else tree

    def verifier(compile_step: bool) -> Any:
        dec = SpeculativeDecoder(mtp, tree=tree, max_length=args.context + 2 * width + 64, cuda_graphs=True,
                                 invariant=invariant, width=width if invariant else None, compile_step=compile_step)
        return dec._verifier

    v = verifier(False)
    gen = torch.Generator().manual_seed(0)
    vocab = mtp.vocab_size
    v.prefill(torch.randint(vocab, (1, args.context), generator=gen).to(device))
    tokens = torch.randint(vocab, (shape.size,), generator=gen).tolist()
    packed = v.step_input(args.context, tokens, shape).to(device)
    depths, structure = v.step_structure()
    slots = packed[:1] + torch.arange(v.width, device=device)

    def forward(p: torch.Tensor) -> torch.Tensor:
        v.cache.set_slots(slots)
        return v.states(p[:1], p[1:1 + v.width], depths, structure)

    states = forward(packed).clone()
    row = torch.tensor([shape.size - 1], device=device)  # the deepest node: off the chain in a tree
    k = max(v.k, 1)
    out: dict[str, Any] = {"nodes": shape.size, "width": v.width, "verifier": "invariant" if invariant else "plain"}
    if isinstance(tree, DynamicTree):  # the host's part: this step's tree from the heads' probabilities
        probs = torch.rand(tree.depth, tree.k, generator=gen).sort(descending=True).values.tolist()
        out["build_ms"] = timer(lambda: tree.build(probs), capture=False)
    out["step_ms"] = timer(v._step, packed)
    if args.compile:
        t0 = time.perf_counter()
        fused = verifier(True)  # compiles and captures (on the CPU: compiles at its first step)
        fused.prefill(torch.randint(vocab, (1, args.context), generator=gen).to(device))
        runner = fused.step_runner
        runner(packed)
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["compiled_ms"] = timer(lambda p: runner(p), packed, capture=False)
    out["step_host_ms"] = timer(lambda: v.step(args.context, tokens, shape), capture=False)
    out["forward_ms"] = timer(forward, packed)
    out["head1_ms"] = timer(lambda s: mtp.unembed_states(s[:1])[0].argmax(dim=-1), states)
    if shape.depth > 0:
        d = shape.depth + 1
        out["heads_all_ms"] = timer(lambda s: mtp.unembed_states(s[1:d]).topk(k, dim=-1).indices, states)
        out["heads_row_ms"] = timer(lambda s, r: mtp.unembed_states(s[1:d].index_select(1, r)).topk(k, dim=-1).indices,
                                    states, row)
    if v.commit_runner is not None:
        path = [0, *[i for i in range(shape.size) if shape.depths[i] >= 1][-1:]]
        offsets = path + list(range(len(path), shape.depth + 1))
        out["commit_ms"] = timer(v._commit, torch.tensor([args.context, *offsets], device=device))
    return out


@torch.no_grad()
def time_gemms(mtp: Any, rows: list[int], timer: Timer) -> list[dict[str, Any]]:
    """One matmul alone per weight and rows: the first MLP's up projection and the unembedding."""
    weights = {"mlp_up": next(w for n, w in mtp.backbone.named_parameters() if n.endswith(("up_proj.weight",
                                                                                         "dense_h_to_4h.weight",
                                                                                         "c_fc.weight"))),
               "unembed": mtp.unembed.weight}
    out = []
    for name, w in weights.items():
        for r in rows:
            x = torch.randn(r, w.shape[-1], device=w.device, dtype=w.dtype)
            out.append({"weight": name, "shape": list(w.shape), "rows": r,
                        "ms": timer(lambda a: a @ w.T, x)})
    return out


@torch.no_grad()
def kernel_profile(mtp: Any, tree: Any, args: argparse.Namespace) -> list[str]:
    """The top kernels of five eager steps (plain verifier) under torch.profiler."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from marginal import kernel_totals  # benchmarks/marginal.py: the kernels of a chrome trace
    from torch.profiler import ProfilerActivity, profile

    from mtp_lib.decode import DynamicTree, SpeculativeDecoder

    device = next(mtp.parameters()).device
    shape = tree.template if isinstance(tree, DynamicTree) else tree
    dec = SpeculativeDecoder(mtp, tree=tree, max_length=args.context + 2 * tree.size + 64, cuda_graphs=False)
    v: Any = dec._verifier
    v.prefill(torch.randint(mtp.vocab_size, (1, args.context)).to(device))
    packed = v.step_input(args.context, torch.randint(mtp.vocab_size, (shape.size,)).tolist(), shape).to(device)
    v._step(packed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            v._step(packed)
        if device.type == "cuda":
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return kernel_totals(json.loads(trace.read_text()), top=12)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from mtp_lib.models import resolve_device
    from mtp_lib.results import provenance

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    timer = Timer(device, args.repeats, args.trials)
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16}
    trees = {name: make_tree(name) for name in args.trees.split(",")}
    width = max(t.size for t in trees.values())  # of every invariant pass, as benchmarks/speculative.py
    rows, gemms, profiles = [], [], {}
    for dname in args.dtypes.split(","):
        if dname not in dtypes:
            raise SystemExit(f"--dtypes: unknown {dname!r}; choose from {', '.join(dtypes)}")
        # tf32: float32 weights, matmuls on the tensor cores in TF32 (torch's "high" precision)
        torch.set_float32_matmul_precision("high" if dname == "tf32" else "highest")
        mtp = build_model(args, dtypes[dname], device)
        for name, tree in trees.items():
            for kind in args.verifiers.split(","):
                row = time_parts(mtp, tree, kind == "invariant", width, args, timer)
                rows.append({"dtype": dname, **row, "tree": name})
                print(json.dumps(rows[-1]), flush=True)
            if args.profile:
                profiles[f"{dname}/{name}"] = kernel_profile(mtp, tree, args)
                print("\n".join([f"{dname} {name}", *profiles[f"{dname}/{name}"]]), flush=True)
        gemms += [{"dtype": dname, **g} for g in time_gemms(mtp, [int(r) for r in args.gemm_rows.split(",")], timer)]
        del mtp
    torch.set_float32_matmul_precision("highest")
    for g in gemms:
        print(f"{g['dtype']:8} {g['weight']:8} rows {g['rows']:3d}: {g['ms']:.4f} ms")
    settings = {k: (Path(v).name if isinstance(v, str) and Path(v).is_file() else v)  # no machine path
                for k, v in vars(args).items() if k != "out"}
    result = {"benchmark": "pass_cost", "settings": settings, "rows": rows, "gemm": gemms, "profiles": profiles,
              "provenance": provenance(device=device, wall_time_s=time.perf_counter() - t0, source=__file__)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
