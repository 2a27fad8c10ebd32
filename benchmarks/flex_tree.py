"""One layer of a flex candidate step: how the tree part (each candidate's own key) is best attended.

Times, on the same random inputs at the shapes of one step (``--slots`` candidates of the last 64
context ends of a ``--context``-token sample, SmolLM2-135M's heads by default), compiled:

  context only      FlexAttention over the context keys with the step's BlockMask, with log-sum-exp
                    (the part every design shares)
  mtp_lib           mtp_lib.marginal's attention function with marginal.flex._FUSED_MERGE off: the above,
                    and the tree part merged by elementwise products and the log-sum-exps
  merge kernel      the same with the tree part by mtp_lib.kernels.tree_merge (one Triton kernel): the
                    library's default
  one call          one FlexAttention call over the context keys (padded to whole blocks) followed by
                    the step's own keys, the tree part as each query block's diagonal block

and checks that the last three agree. With ``--kernel-options``, the context part again with each of
FlexAttention's kernel_options given (block sizes, warps, stages, TMA), checked against torch's
defaults (the tree part does not depend on them). A variant that fails to compile or run is recorded
with its error, and the others still run. GPU only (compiled FlexAttention).

    python benchmarks/flex_tree.py --out flex_tree.json
    python benchmarks/flex_tree.py --kernel-options 'default;{"BLOCK_M": 64, "BLOCK_N": 64};{"num_warps": 8}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtp_lib import marginal as MG
from mtp_lib.results import provenance


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=65536, help="candidates in the step")
    p.add_argument("--context", type=int, default=512, help="tokens of the sample")
    p.add_argument("--heads", default="9,3,64", help="query heads, key-value heads, head dim")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kernel-options", default="default",
                   help="FlexAttention kernel_options to time the context part with, semicolon separated: "
                        "default (torch's) or a JSON object, e.g. 'default;{\"BLOCK_M\": 64, \"BLOCK_N\": 64}'")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def one_call_mask(packed: Any, n_ctx: int) -> tuple[Any, int]:
    """The BlockMask of the one-call design (depth 2: a slot sees context keys up to its end, and itself)."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = MG.flex._FLEX_BLOCK
    ctx_end = packed.ctx_end[0]
    length = len(ctx_end)
    n_qb, n_cb = length // bs, -(-n_ctx // bs)
    first = n_cb * bs
    first_t = torch.full((), first, device=ctx_end.device)

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return torch.where(kv < first_t, kv <= ctx_end[q], kv - first_t == q)

    t_max = ctx_end.view(n_qb, bs).amax(-1)
    need = torch.arange(n_cb, device=ctx_end.device) * bs <= t_max[:, None]
    own = torch.eye(n_qb, dtype=torch.bool, device=ctx_end.device)
    num, idx = MG.flex._block_lists(torch.cat([need, own], dim=1))
    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(length, first + length))
    return mask, first


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/flex_tree.py needs a CUDA device (compiled FlexAttention)")
    from torch.nn.attention.flex_attention import flex_attention

    dev, bf = torch.device("cuda"), torch.bfloat16
    n_heads, n_kv, head_dim = (int(x) for x in args.heads.split(","))
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(args.context - 64, args.context)
    npos = torch.sort(torch.randint(0, 64, (args.slots,), generator=gen)).values
    paths = torch.randint(0, 1000, (args.slots, 1), generator=gen)
    packed = MG.packing._pack(positions, npos, paths, args.slots, pad_to=MG.flex._FLEX_BLOCK).to(dev)
    length = packed.input_ids.shape[1]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dev, bf)

    q = randn(1, length, n_heads, head_dim).transpose(1, 2)  # the layouts transformers hands on
    key, value = (randn(1, length, n_kv, head_dim).transpose(1, 2) for _ in range(2))
    k_ctx, v_ctx = randn(1, n_kv, args.context, head_dim), randn(1, n_kv, args.context, head_dim)
    scale = head_dim**-0.5
    ctx_mask = MG.flex._context_block_mask(packed, args.context, None)
    tree = MG.flex._tree_attention(packed, None, False, [(k_ctx, v_ctx)])
    one_mask, first = one_call_mask(packed, args.context)
    pad = first - args.context
    k_pad, v_pad = (nn.functional.pad(x, (0, 0, 0, pad)) for x in (k_ctx, v_ctx))
    layer = nn.Module()
    layer.layer_idx = 0  # type: ignore[assignment]

    options: dict[str, Any] | None = None  # the kernel_options of the variant being timed

    def context_only() -> Any:
        kernel_options: Any = options
        return flex_attention(q, k_ctx, v_ctx, block_mask=ctx_mask, scale=scale, enable_gqa=True, **MG.flex._FLEX_LSE,
                              kernel_options=kernel_options)

    def ours(merge_kernel: bool = False) -> torch.Tensor:
        saved = MG.flex._FLEX_KERNEL_OPTIONS, MG.flex._FUSED_MERGE
        MG.flex._FLEX_KERNEL_OPTIONS, MG.flex._FUSED_MERGE = options, merge_kernel
        try:
            return MG.flex._tree_attention_forward(layer, q, key, value, ctx_mask, scaling=scale, mtp_tree=tree)[0]
        finally:
            MG.flex._FLEX_KERNEL_OPTIONS, MG.flex._FUSED_MERGE = saved

    def ours_merge_kernel() -> torch.Tensor:
        return ours(merge_kernel=True)

    def one_call() -> torch.Tensor:
        out = flex_attention(q, torch.cat([k_pad, key], 2), torch.cat([v_pad, value], 2), block_mask=one_mask,
                             scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    # torch's defaults first (the others are checked against them), then each option given
    option_list: list[dict[str, Any] | None] = [None]
    for text in args.kernel_options.split(";"):
        if text.strip() not in ("", "default"):
            option_list.append(json.loads(text))
    variants: list[tuple[str, Any, dict[str, Any] | None]] = [
        ("context only", context_only, None), ("mtp_lib", ours, None), ("merge kernel", ours_merge_kernel, None),
        ("one call", one_call, None)]
    variants += [("context only", context_only, o) for o in option_list[1:]]
    rows: list[dict[str, Any]] = []
    outs: dict[str, Any] = {}
    for name, fn, options in variants:
        compiled = torch.compile(fn)
        try:
            with torch.inference_mode():
                for _ in range(3):
                    out = compiled()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.repeats):
                    compiled()
                stop.record()
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - one setting that does not compile must not end the sweep
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            rows.append({"variant": name, "kernel_options": options, "error": error})
            print(f"{name:<14} failed: {error}{f'  kernel_options {options}' if options else ''}", file=sys.stderr)
            continue
        ms = start.elapsed_time(stop) / args.repeats
        row = {"variant": name, "kernel_options": options, "ms_per_layer": ms}
        if options is None:
            outs[name] = out
        elif name in outs:  # the output (not the log-sum-exp) against torch's defaults
            row["max_abs_diff_vs_default"] = float(out[0].float().sub(outs[name][0].float()).abs().max())
        rows.append(row)
        print(f"{name:<14} {ms:8.3f} ms per layer{f'  kernel_options {options}' if options else ''}", file=sys.stderr)

    def differs(name: str) -> float | None:  # max |mtp_lib - name|, None when either failed
        if "mtp_lib" not in outs or name not in outs:
            return None
        return float((outs["mtp_lib"].float() - outs[name].float()).abs().max())

    diff, diff_kernel = differs("one call"), differs("merge kernel")
    print(f"mtp_lib vs one call: max |difference| {diff}; vs the merge kernel {diff_kernel}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "benchmark": "flex_tree", "device_name": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "settings": {"slots": args.slots, "padded_slots": length, "context": args.context,
                         "heads": [n_heads, n_kv, head_dim], "dtype": "bfloat16", "repeats": args.repeats},
            "rows": rows, "max_abs_diff_mtp_lib_vs_one_call": diff,
            "max_abs_diff_mtp_lib_vs_merge_kernel": diff_kernel,
            "provenance": provenance(device=dev, source=__file__)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
