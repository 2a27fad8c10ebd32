"""Chapter 2's tuned lens on one suite size, beside its logit lens (issue: a calibrated lens).

The logit lens reads layer l with the model's own head; where the layers do not yet use the head's
coordinates its KL(p_l || p_L) measures the lens's miscalibration as much as the layer's progress. The
tuned lens (:mod:`mtp_lib.tuned_lens`) learns one affine translator per layer, z -> z + B_l z + b_l, to
minimize KL(p_L || q_l) on training text, and is then scored on held-out positions.

Here the translators of a size are trained on ``windows`` windows of ``length`` tokens spread evenly
over the suite's own training stream (every position with a next token), and both lenses are scored
on the positions of the final analysis' logit lens (:func:`mtp_lib.suite.analysis.lens_kl`): the
context ends j - 1 of the last ``last`` target tokens of each translation sample, which the stream
holds out. The stored form is :mod:`mtp_lib.tuned_lens_study`'s, so :mod:`mtp_lib.tuned_lens_tables`
reads it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtp_lib import data, probe
from mtp_lib.lens import vocab_size
from mtp_lib.tuned_lens_study import fit_and_score

__all__ = ["stream_windows", "tuned_lens_result"]


def stream_windows(tokens: np.ndarray, n: int, length: int) -> list[np.ndarray]:
    """``n`` windows of ``length`` tokens starting at evenly spaced offsets of ``tokens`` (the whole
    stream when it is shorter than ``n`` windows: then fewer, non-overlapping windows)."""
    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 windows of length >= 2, got n={n}, length={length}")
    span = len(tokens) - length
    if span < 0:
        raise ValueError(f"the stream holds {len(tokens)} tokens, fewer than one window of {length}")
    n = min(n, span // length + 1)
    starts = np.linspace(0, span, n).round().astype(int)
    return [np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts]


def tuned_lens_result(model: torch.nn.Module, tokens: np.ndarray, samples: Sequence[data.Sample], *, windows: int,
                      length: int, last: int = 20, steps: int = 300, batch: int = 256, lr: float = 1e-3,
                      weight_decay: float = 0.01, seed: int = 0, top_k: int = 5, max_elements: int = 2**22
                      ) -> dict[str, Any]:
    """Train the tuned lens of ``model`` on windows of the stream ``tokens``; score both lenses on the
    next-token contexts of ``samples`` (per sample: the mean over its ``last`` positions)."""
    was_training = model.training
    model.eval()
    try:
        train = probe.collect_probe_data(model, stream_windows(tokens, windows, length), offsets=[1], progress=False)
        test = probe.collect_probe_data(model, [s.input_ids for s in samples], offsets=[1],
                                        positions=[data.context_ends(s, 1, last) for s in samples], progress=False)
        scored = fit_and_score(model, train, test, len(samples), steps=steps, batch=batch, lr=lr,
                               weight_decay=weight_decay, seed=seed, top_k=top_k, max_elements=max_elements)
    finally:
        model.train(was_training)
    return {"vocab": vocab_size(model), "test_ids": [s.id for s in samples], "train_windows": windows,
            "window_length": length, **scored}
