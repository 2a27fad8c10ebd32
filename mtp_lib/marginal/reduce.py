"""Reducing a block of candidate logits into the marginals, in log space.

For the candidates ``y`` of one context end, with log weights ``log w_y`` (the path's nucleus
weights), a block adds ``log sum_y w_y softmax(logits_y)`` to the running ``logaddexp`` of that
position's marginal: :func:`_accumulate`, exact down to the smallest float (:func:`_exact_pass`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtp_lib import kernels
from mtp_lib.marginal.packing import _upload

_FUSED_REDUCE = True  # bf16 logits on a GPU with Triton: mtp_lib.kernels.weighted_softmax_sum (False: softmax, matmul)
_DENSE_SEGMENTS = 16  # up to this many (position, top-p) pairs a block is summed by one small matmul
_DENSE_BF16_ELEMENTS = 2**24  # bf16 blocks: by one matmul while its [pairs, rows] weight matrix stays this small


@dataclasses.dataclass
class _Segments:
    """The positions of a block of candidate rows (``npos`` non-decreasing), cut on the host."""

    uniq: torch.Tensor  # [S] long, on the device: the positions
    inverse: torch.Tensor  # [R] long, on the device: each row's segment
    uniq_host: list[int]
    counts_host: list[int]


def _segments(npos_host: torch.Tensor, device: torch.device) -> _Segments:
    """Segments of ``npos_host`` (a CPU tensor), copied to ``device`` without waiting for it."""
    uniq, inv, counts = torch.unique_consecutive(npos_host, return_inverse=True, return_counts=True)
    return _Segments(uniq=_upload(uniq, device), inverse=_upload(inv, device), uniq_host=uniq.tolist(),
                     counts_host=counts.tolist())


def _accumulate(acc: torch.Tensor, logits: torch.Tensor, npos: torch.Tensor, log_w: torch.Tensor,
                segments: _Segments | None = None,
                recompute: Callable[[slice], torch.Tensor] | None = None) -> Callable[[], None] | None:
    """Add ``sum_i w_i softmax(logits_i)`` to ``acc [m, P, V]`` (log space) for the segments of ``npos``.

    ``logits [R, V]`` of candidates ``i`` of positions ``npos [R]`` (non-decreasing), with log weights
    ``log_w [R, m]``, one column per top-p. Per segment (the candidates of one position) and top-p
    this is ``logsumexp_i (log_w_i + log_softmax(logits_i))``. It is computed from one softmax per row:
    each segment is shifted by its largest log weight, the weighted probabilities summed, and the
    shift added back to the log; blocks combine with ``logaddexp``. Entries whose sum underflows the
    floating type (marginals below about ``e^-87`` of the segment's largest weight, in float32) are
    left out of that sum and added exactly with ``logsumexp`` (:func:`_exact_pass`), so no finite
    log-probability is lost.

    ``segments``: the segments of ``npos`` cut on the host (else cut here, which waits for the device).
    ``recompute``: the logits of some rows again (from the hidden states). Given, whether any entry
    underflowed is not waited for: a function is returned that waits for this block alone and adds
    those entries, to be called once later work is queued so that the device does not idle (it
    recomputes the few rows it needs, so the logits block is not kept). Else the exact pass runs here
    and None is returned.
    """
    seg = segments if segments is not None else _segments(npos.cpu(), npos.device)
    w = log_w.to(acc.dtype)
    log_total, under = _weighted_sums(logits, w, seg, acc.dtype)
    acc[:, seg.uniq] = torch.logaddexp(acc[:, seg.uniq], log_total)

    flag = under.any()
    if recompute is None:
        if bool(flag):
            _exact_pass(acc, lambda rows: logits[rows], under, w, seg)
        return None
    if flag.device.type == "cuda":
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        ready: torch.cuda.Event | None = event
    else:
        host, ready = flag, None

    def finish() -> None:
        if ready is not None:
            ready.synchronize()  # waits for this block only, not for what was queued after it
        if bool(host):
            _exact_pass(acc, recompute, under, w, seg)

    return finish


def _weighted_sums(logits: torch.Tensor, w: torch.Tensor, seg: _Segments, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log sum_i w_i softmax(logits_i)`` per segment and top-p, ``[m, S, V]`` in ``dtype``, and where
    that sum underflowed (left at ``-inf``, for :func:`_exact_pass`); see :func:`_accumulate`."""
    # bfloat16 logits (a bf16 model): probabilities and weights in bfloat16 too (computed in float32,
    # rounded once: at most 2^-8 relative, below the rounding of the logits themselves, and the same
    # exponent range as float32), summed by a bf16 matmul. Half the memory traffic of float32.
    low = logits.dtype == torch.bfloat16
    inv = seg.inverse
    n_rows = logits.shape[0]
    n_seg, m = len(seg.uniq_host), w.shape[1]
    shift = torch.full((n_seg, m), -math.inf, dtype=dtype, device=w.device)
    shift.scatter_reduce_(0, inv[:, None].expand(-1, m), w, reduce="amax")
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    coef = (w - shift[inv]).exp()  # [R, m], in [0, 1]
    n_out = n_seg * m
    if n_out <= _DENSE_SEGMENTS or (low and n_out * n_rows <= _DENSE_BF16_ELEMENTS):
        dense = torch.zeros(m, n_seg, n_rows, dtype=torch.bfloat16 if low else dtype, device=w.device)
        dense[:, inv, torch.arange(n_rows, device=w.device)] = coef.T.to(dense.dtype)
        if low and _FUSED_REDUCE and n_out <= kernels.MAX_WEIGHT_ROWS and kernels.available(logits):
            # one Triton pass for the log-sum-exps, one for the weighted sum: the probabilities are not written
            total = kernels.weighted_softmax_sum(logits, dense.view(n_out, -1)).view(m, n_seg, -1)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=dense.dtype)
            total = (dense.view(n_out, -1) @ probs).view(m, n_seg, -1).to(dtype)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.bfloat16 if low else dtype)
        total = torch.zeros(m, n_seg, probs.shape[1], dtype=dtype, device=probs.device)
        for j in range(m):
            total[j].index_add_(0, inv, probs * coef[:, j, None])
    # float32 (and bf16, same exponent range) loses precision in subnormals: those entries, and for the
    # bf16 products anything within 2^24 of them (below about e^-70 of the largest weight), are left
    # out here and summed exactly by _exact_pass
    under = total < torch.finfo(dtype).tiny * (2.0**24 if low else 1.0)
    log_total = (torch.log(total) + shift.T[:, :, None]).masked_fill_(under, -math.inf)
    return log_total, under


def _logits_of_rows(adapter: Any, model: nn.Module, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
    return adapter.logits(model, hidden[rows], normed=True)


def _exact_pass(acc: torch.Tensor, logits_of: Callable[[slice], torch.Tensor], under: torch.Tensor,
                w: torch.Tensor, seg: _Segments) -> None:
    """Add the entries ``under [m, S, V]`` that :func:`_accumulate` left out, by ``logsumexp`` in
    ``acc``'s dtype; ``logits_of(rows)``: the logits of a segment's rows."""
    dtype = acc.dtype
    starts = [0, *itertools.accumulate(seg.counts_host)]
    for j, g in under.any(dim=-1).nonzero().tolist():
        rows = slice(starts[g], starts[g] + seg.counts_host[g])
        if not bool(torch.isfinite(w[rows, j]).any()):
            continue  # no candidate of this segment is in this nucleus: -inf is exact
        cols = under[j, g].nonzero()[:, 0]
        logits = logits_of(rows).to(dtype)
        y = logits[:, cols] - torch.logsumexp(logits, dim=-1)[:, None] + w[rows, j, None]
        p = seg.uniq_host[g]
        acc[j, p, cols] = torch.logaddexp(acc[j, p, cols], torch.logsumexp(y, dim=0))

