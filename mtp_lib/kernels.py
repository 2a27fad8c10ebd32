"""Triton kernels of the GPU hot paths (used when Triton and a CUDA device are there; plain torch otherwise).

:func:`weighted_softmax_sum` is the reduction of :mod:`mtp_lib.marginal`: ``coef @ softmax(logits)``
for a bfloat16 logits block ``[R, V]`` and a few weight rows ``[M, R]``, without writing the
probabilities: one kernel takes each row's log-sum-exp, a second reads the logits once more and
multiplies the exponentials, rounded to bfloat16 as the plain path rounds its probabilities, by the
weights on the tensor cores (float32 accumulation). Two reads of the logits instead of the softmax's
read and write and the matmul's read.

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

__all__ = ["MAX_WEIGHT_ROWS", "available", "weighted_softmax_sum"]

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
