"""Does a position's logit vector depend on what is verified beside it? Plain against invariant verification.

For each prompt (validation translation prompts and open-ended passages) the model's greedy
continuation is decoded one token per pass; then, after the same prompt cache, a chain of those
greedy tokens and a tree holding them on one branch are verified in one pass each. A node is
*exact* when its head-1 logits are bit-identical to those the same token got in the one-token
passes. The plain static decoder (``mtp_lib.decode``, transformers' SDPA, passes as wide as the
tree) is compared with the invariant one (``invariant=True``: every pass ``width`` tokens, keys in
logical order). No heads are trained: only head 1 (the model itself) is run.

    python benchmarks/invariance.py --device cuda --out invariance-h100.json      # bf16 on the GPU
    python benchmarks/invariance.py --device cpu --dtype bf16 --n-prompts 2        # CPU smoke run

Expected on the GPU in bf16: plain chains and trees inexact at a share of the positions (max logit
differences of tenths), invariant ones exact everywhere (``exact`` 1.0, ``max_abs_diff`` 0.0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder (mtp_lib.models.load_model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--n-prompts", type=int, default=6, help="prompts per task")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens checked per prompt")
    p.add_argument("--chain", type=int, default=4, help="tokens verified together in the chain")
    p.add_argument("--tree", type=int, nargs="+", default=[3, 2, 2], help="Tree.cartesian widths")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


@torch.no_grad()
def plain_logits(dec: Any, start: int, tokens: list[int], tree: Any) -> torch.Tensor:
    """Head 1's logits ``[len(tokens), V]`` of one pass of the plain static verifier over ``tree``'s tokens."""
    from mtp_lib.decode_graph import tree_masks

    v = dec._verifier
    n = len(tokens)
    begin = torch.tensor([start], device=v.device)
    v.cache.set_slots(begin + torch.arange(n, device=v.device))
    depth = torch.tensor(tree.depths[:n], device=v.device)
    anc = tree.ancestors()[:n, :n].to(v.device)
    mask = tree_masks(begin, depth, anc, v.buffer_len, v.layout, v.dtype)
    out = v.view(torch.tensor([tokens], device=v.device), attention_mask=mask, position_ids=(begin + depth)[None],
                 cache=v.cache, use_cache=True, return_logits=False)
    return v.view.unembed_states(out.states[:1, 0])[0]


def node_logits(dec: Any, start: int, tokens: list[int], tree: Any) -> torch.Tensor:
    if dec._verifier.__class__.__name__ == "InvariantVerifier":
        return dec._verifier.head1_logits(start, tokens)
    return plain_logits(dec, start, tokens, tree)


@torch.no_grad()
def check(decoders: dict[str, Any], ids: torch.Tensor, n_tokens: int, trees: dict[str, Any], vocab: int
          ) -> dict[str, Any]:
    """For one prompt: per decoder kind and tree, the nodes on the greedy branch, how many are exact,
    and the largest absolute logit difference to the one-token passes (nodes off the greedy branch hold
    other tokens of the ``vocab``)."""
    from mtp_lib.decode import Tree

    out: dict[str, Any] = {}
    for kind, (greedy, verifiers) in decoders.items():
        start = ids.shape[1]
        seq = greedy.generate(ids, n_tokens).new_token_ids  # the greedy continuation, one token per pass
        greedy._verifier.prefill(ids)
        alone = [node_logits(greedy, start + d, [t], Tree.chain(0))[0].float() for d, t in enumerate(seq)]
        for name, tree in trees.items():
            dec = verifiers[name]
            dec._verifier.prefill(ids)
            exact, diff, nodes = 0, 0.0, 0
            on_branch = [0] + [i for i, c in enumerate(tree.choices, start=1) if all(r == 0 for r in c)]
            for base in range(0, n_tokens - tree.depth, tree.depth + 1):
                tokens = [seq[base + tree.depths[i]] if i in on_branch else (seq[base] + 1 + i) % vocab
                          for i in range(tree.size)]
                together = node_logits(dec, start + base, tokens, tree).float()
                for i in on_branch:
                    d = float((together[i] - alone[base + tree.depths[i]]).abs().max())
                    exact += d == 0.0
                    diff = max(diff, d)
                    nodes += 1
                if not tree.is_chain:  # the greedy branch is node 0, 1, ... only for chains: move it into place
                    dec._verifier.commit(start + base, on_branch)
            out[f"{kind}/{name}"] = {"nodes": nodes, "exact": exact / max(nodes, 1), "max_abs_diff": diff}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mtp_lib.data import open_ended_samples, translation_samples
    from mtp_lib.decode import SpeculativeDecoder, Tree
    from mtp_lib.heads import MTPModel
    from mtp_lib.models import load_model
    from mtp_lib.results import provenance, to_jsonable

    args = parse_args(argv)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tok, device = loaded.tokenizer, loaded.device
    mtp = MTPModel(loaded.model, n_heads=1 + max(args.chain - 1, len(args.tree)), head_type="medusa").eval()
    trees = {"chain": Tree.chain(args.chain - 1), "tree": Tree.cartesian(args.tree)}
    width = max(t.size for t in trees.values())
    prompts = [s.input_ids[:s.target_start] for s in translation_samples(tok, args.n_prompts, split="validation")]
    prompts += [s.input_ids for s in open_ended_samples(tok, args.n_prompts, n_tokens=64)]
    length = max(len(p) for p in prompts) + args.tokens + width + 2
    decoders = {
        "plain": (SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=length, cuda_graphs=False),
                  {n: SpeculativeDecoder(mtp, tree=t, max_length=length, cuda_graphs=False) for n, t in trees.items()}),
        "invariant": (SpeculativeDecoder(mtp, tree=Tree.chain(0), max_length=length, cuda_graphs=False,
                                         invariant=True, width=width),
                      {n: SpeculativeDecoder(mtp, tree=t, max_length=length, cuda_graphs=False, invariant=True,
                                             width=width) for n, t in trees.items()}),
    }
    per_prompt = [check(decoders, torch.tensor([p], device=device), args.tokens, trees, loaded.vocab_size)
                  for p in prompts]
    summary = {}
    for key in per_prompt[0]:
        nodes = sum(r[key]["nodes"] for r in per_prompt)
        summary[key] = {"nodes": nodes, "exact": sum(r[key]["exact"] * r[key]["nodes"] for r in per_prompt) / nodes,
                        "max_abs_diff": max(r[key]["max_abs_diff"] for r in per_prompt)}
        print(f"{key:>18}: {summary[key]['exact']:.3f} of {nodes} positions exact, "
              f"max |logit difference| {summary[key]['max_abs_diff']:.3g}")
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no machine path in the results
    result = {"benchmark": "invariance", "model": loaded.info(), "settings": settings,
              "width": width, "trees": {n: [list(c) for c in t.choices] for n, t in trees.items()},
              "summary": summary, "per_prompt": per_prompt,
              "provenance": provenance(device=device, wall_time_s=time.perf_counter() - t0)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_jsonable(result), indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
