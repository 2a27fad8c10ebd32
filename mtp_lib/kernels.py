"""Triton kernels of the GPU hot paths (used when Triton and a CUDA device are there; plain torch otherwise).

:func:`weighted_softmax_sum` is the reduction of :mod:`mtp_lib.marginal`: ``coef @ softmax(logits)``
for a bfloat16 logits block ``[R, V]`` and a few weight rows ``[M, R]``, without writing the
probabilities: one kernel takes each row's log-sum-exp, a second reads the logits once more and
multiplies the exponentials, rounded to bfloat16 as the plain path rounds its probabilities, by the
weights on the tensor cores (float32 accumulation). Two reads of the logits instead of the softmax's
read and write and the matmul's read.

:func:`tree_merge` is the tree part of :mod:`mtp_lib.marginal`'s flex steps in one kernel: each
candidate's attention output over its context (FlexAttention's, with its log-sum-exp) merged with
the candidate's own key and its ancestors' by an online softmax, written in the layout the output
projection reads. On by default (``mtp_lib.marginal.flex._FUSED_MERGE``): measured 1-5% faster per
``marginalize`` call than the elementwise products ``torch.compile`` fuses (SmolLM2-135M and
Gemma-3-270M, H200, ``benchmarks/marginal.py --merge fused,plain``).

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (slowly), which is how they can be checked
without a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton
    triton = None
    tl = None

__all__ = ["MAX_WEIGHT_ROWS", "available", "tree_merge", "tree_merge_available", "weighted_softmax_sum"]

MAX_WEIGHT_ROWS = 64  # weight rows of one weighted_softmax_sum call (the tensor-core tile's height)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(logits: torch.Tensor) -> bool:
    """Whether :func:`weighted_softmax_sum` can run on ``logits`` (Triton installed, a CUDA tensor or
    the Triton interpreter, bfloat16, rows contiguous)."""
    return (triton is not None and logits.dtype == torch.bfloat16 and logits.ndim == 2 and logits.stride(1) == 1
            and (logits.is_cuda or _interpreting()))


if triton is not None:

    @triton.jit
    def _row_lse_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * stride_x
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            live = m_new > float("-inf")  # a lane that has seen a finite value (else exp(-inf + inf))
            s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
            m = m_new
        top = tl.max(m, axis=0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), axis=0)
        tl.store(out_ptr + row, top + tl.log(total))

    @triton.jit
    def _weighted_exp_kernel(  # type: ignore[no-untyped-def]
                             z_ptr, lse_ptr, c_ptr, out_ptr, n_rows, n_cols, n_out, rows_per_split,
                             stride_z, stride_c, stride_os, stride_om,
                             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                             DOT_F32: tl.constexpr):
        pid_v = tl.program_id(0)
        split = tl.program_id(1)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        outs = tl.arange(0, BLOCK_M)
        out_ok = outs < n_out
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        first = split * rows_per_split
        last = tl.minimum(first + rows_per_split, n_rows)
        for r0 in range(first, last, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < last
            z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            p = tl.where((lse > float("-inf"))[:, None], tl.exp(z - lse[:, None]), 0.0)
            c = tl.load(c_ptr + outs[:, None] * stride_c + rows[None, :], mask=out_ok[:, None] & row_ok[None, :],
                        other=0.0)
            if DOT_F32:  # the interpreter's bf16 dot is wrong: the same products in float32, rounded alike
                acc += tl.dot(c.to(tl.float32), p.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(c, p.to(tl.bfloat16))
        tl.store(out_ptr + split * stride_os + outs[:, None] * stride_om + cols[None, :], acc,
                 mask=out_ok[:, None] & col_ok[None, :])


def weighted_softmax_sum(logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef @ softmax(logits, -1)`` as float32 ``[M, V]``, for bfloat16 ``logits [R, V]`` and
    ``coef [M, R]`` (``M <= MAX_WEIGHT_ROWS``; rounded to bfloat16, like the probabilities, before
    the tensor-core products). Check :func:`available` first."""
    if not available(logits):
        raise ValueError("weighted_softmax_sum needs Triton and bfloat16 logits [R, V] with contiguous rows "
                         "on a CUDA device (or TRITON_INTERPRET=1)")
    n_rows, n_cols = logits.shape
    n_out = coef.shape[0]
    if coef.shape != (n_out, n_rows) or not 1 <= n_out <= MAX_WEIGHT_ROWS:
        raise ValueError(f"coef must be [M, {n_rows}] with 1 <= M <= {MAX_WEIGHT_ROWS}, got {tuple(coef.shape)}")
    coef = coef.to(torch.bfloat16).contiguous()
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    _row_lse_kernel[(n_rows,)](logits, lse, n_cols, logits.stride(0), BLOCK=2048, num_warps=8)
    block_v, block_r = 128, 64
    block_m = max(16, triton.next_power_of_2(n_out))
    n_vblocks = triton.cdiv(n_cols, block_v)
    # enough programs to fill the device: the rows are split, each split writes its own partial sum
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 4
    splits = max(1, min(triton.cdiv(4 * sms, n_vblocks), triton.cdiv(n_rows, block_r)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_r) * block_r
    splits = triton.cdiv(n_rows, rows_per_split)
    out = torch.empty(splits, n_out, n_cols, dtype=torch.float32, device=logits.device)
    grid: Any = (n_vblocks, splits)
    _weighted_exp_kernel[grid](logits, lse, coef, out, n_rows, n_cols, n_out, rows_per_split,
                               logits.stride(0), coef.stride(0), out.stride(0), out.stride(1),
                               BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_V=block_v, DOT_F32=_interpreting(),
                               num_warps=4, num_stages=3)
    return out[0] if splits == 1 else out.sum(0)


if triton is not None:

    @triton.jit
    def _tree_merge_kernel(  # type: ignore[no-untyped-def]
                           q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, anc_ptr, valid_ptr, out_ptr,
                           sq_h, sq_l, sq_d, sk_h, sk_l, sk_d, sv_h, sv_l, sv_d, so_h, so_l, so_d, sl_h, sl_l,
                           length, head_dim, group, out_row, scale, cap,
                           N_ANC: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        head = tl.program_id(1)
        kv_head = head // group
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < length
        ok2 = row_ok[:, None] & (dims < head_dim)[None, :]
        r64 = rows.to(tl.int64)
        q = tl.load(q_ptr + head * sq_h + r64[:, None] * sq_l + dims[None, :] * sq_d, mask=ok2, other=0.0).to(tl.float32)
        # the context part: FlexAttention's output and log-sum-exp (-inf: no context key, its output unused)
        lse = tl.load(lse_ptr + head * sl_h + r64 * sl_l, mask=row_ok, other=float("-inf")).to(tl.float32)
        seen = lse > float("-inf")
        o = tl.load(o_ptr + head * so_h + r64[:, None] * so_l + dims[None, :] * so_d, mask=ok2, other=0.0)
        num = tl.where(seen[:, None], o.to(tl.float32), 0.0)
        den = tl.where(seen, 1.0, 0.0)
        top = lse
        # then the slot itself (always seen), then its ancestors: an online softmax over their scores
        for a in tl.static_range(N_ANC + 1):
            if a == 0:
                slot = r64
                there = row_ok
            else:
                slot = tl.load(anc_ptr + r64 * N_ANC + (a - 1), mask=row_ok, other=0)
                there = row_ok & (tl.load(valid_ptr + r64 * N_ANC + (a - 1), mask=row_ok, other=0) != 0)
            ok_a = there[:, None] & (dims < head_dim)[None, :]
            k = tl.load(k_ptr + kv_head * sk_h + slot[:, None] * sk_l + dims[None, :] * sk_d, mask=ok_a,
                        other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_head * sv_h + slot[:, None] * sv_l + dims[None, :] * sv_d, mask=ok_a,
                        other=0.0).to(tl.float32)
            s = tl.sum(q * k, axis=1) * scale
            if HAS_CAP:  # cap * tanh(s / cap), tanh by exp (2 / (1 + e^-2x) - 1, safe at both ends)
                s = cap * (2.0 / (1.0 + tl.exp(-2.0 * s / cap)) - 1.0)
            s = tl.where(there, s, float("-inf"))
            new_top = tl.maximum(top, s)
            live = new_top > float("-inf")
            alpha = tl.where(live, tl.exp(top - new_top), 0.0)
            w = tl.where(live, tl.exp(s - new_top), 0.0)
            num = num * alpha[:, None] + w[:, None] * v
            den = den * alpha + w
            top = new_top
        merged = num / den[:, None]
        tl.store(out_ptr + r64[:, None] * out_row + head * head_dim + dims[None, :],
                 merged.to(out_ptr.dtype.element_ty), mask=ok2)


def tree_merge_available(query: torch.Tensor) -> bool:
    """Whether :func:`tree_merge` can run on ``query`` (Triton, a CUDA tensor or the interpreter)."""
    return triton is not None and query.ndim == 4 and (query.is_cuda or _interpreting())


def _tree_merge(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_ctx: torch.Tensor,
                lse_ctx: torch.Tensor, ancestors: torch.Tensor, valid: torch.Tensor, scale: float,
                softcap: float) -> torch.Tensor:
    _, n_heads, length, head_dim = query.shape
    n_kv = key.shape[1]
    out = torch.empty(1, length, n_heads, head_dim, dtype=query.dtype, device=query.device)
    n_anc = ancestors.shape[1]
    anc = ancestors.contiguous()
    ok = valid.contiguous().view(torch.uint8)
    block_d = triton.next_power_of_2(head_dim)
    block_l = max(1, min(64, 2048 // block_d))
    grid = (triton.cdiv(length, block_l), n_heads)
    _tree_merge_kernel[grid](query, key, value, out_ctx, lse_ctx, anc, ok, out,
           query.stride(1), query.stride(2), query.stride(3), key.stride(1), key.stride(2), key.stride(3),
           value.stride(1), value.stride(2), value.stride(3), out_ctx.stride(1), out_ctx.stride(2), out_ctx.stride(3),
           lse_ctx.stride(1), lse_ctx.stride(2), length, head_dim, n_heads // n_kv, n_heads * head_dim, scale,
           softcap if softcap else 1.0, N_ANC=n_anc, HAS_CAP=bool(softcap), BLOCK_L=block_l, BLOCK_D=block_d,
           num_warps=4)
    return out


# an opaque custom op, so that torch.compile traces the model around the kernel (its fake: the output's
# shape); torch.library.custom_op: torch >= 2.4
_tree_merge_op: Any = None
if triton is not None and hasattr(torch.library, "custom_op"):
    _tree_merge_op = torch.library.custom_op("mtp_lib::tree_merge", mutates_args=())(_tree_merge)

    @_tree_merge_op.register_fake  # type: ignore[misc]
    def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_ctx: torch.Tensor, lse_ctx: torch.Tensor,
          ancestors: torch.Tensor, valid: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
        _, n_heads, length, head_dim = query.shape
        return query.new_empty(1, length, n_heads, head_dim)


def tree_merge(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_ctx: torch.Tensor,
               lse_ctx: torch.Tensor, ancestors: torch.Tensor, valid: torch.Tensor, scale: float,
               softcap: float | None = None) -> torch.Tensor:
    """The attention output ``[1, L, H, hd]`` (``query``'s dtype) of one flex step's slots: the
    context part ``out_ctx [1, H, L, hd]`` with its natural-log ``lse_ctx [1, H, L]`` (-inf: no
    context key) merged with each slot's own key and value and those of its ancestors (``ancestors
    [L, A]`` slots, ``valid [L, A]`` bool), from ``query [1, H, L, hd]`` and the step's ``key`` and
    ``value [1, Hkv, L, hd]`` (any strides; ``H`` a multiple of ``Hkv``), scores ``q . k * scale``
    (``softcap * tanh(score / softcap)`` when given), in float32. Check
    :func:`tree_merge_available` first."""
    if not tree_merge_available(query):
        raise ValueError("tree_merge needs Triton and CUDA tensors (or TRITON_INTERPRET=1)")
    _, n_heads, length, head_dim = query.shape
    if key.shape != value.shape or key.shape[0] != 1 or key.shape[2:] != (length, head_dim) \
            or n_heads % key.shape[1]:
        raise ValueError(f"key and value must be [1, Hkv, {length}, {head_dim}] with {n_heads} a multiple of Hkv, "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if out_ctx.shape != query.shape or lse_ctx.shape != (1, n_heads, length):
        raise ValueError(f"out_ctx must be {tuple(query.shape)} and lse_ctx [1, {n_heads}, {length}], got "
                         f"{tuple(out_ctx.shape)} and {tuple(lse_ctx.shape)}")
    if ancestors.ndim != 2 or ancestors.shape[0] != length or valid.shape != ancestors.shape \
            or valid.dtype != torch.bool:
        raise ValueError(f"ancestors must be [{length}, A] slots and valid a bool tensor of its shape, got "
                         f"{tuple(ancestors.shape)} and {tuple(valid.shape)} {valid.dtype}")
    args = (query, key, value, out_ctx, lse_ctx, ancestors, valid, float(scale), float(softcap or 0.0))
    if _tree_merge_op is not None:
        return _tree_merge_op(*args)  # type: ignore[no-any-return]
    return _tree_merge(*args)
