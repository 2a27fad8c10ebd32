"""Training samples to padded batches whose labels mark each head's targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = ["IGNORE", "Batch", "TrainSample", "collate"]

IGNORE = -100


class TrainSample(Protocol):
    """What the trainer reads from a sample (``mtp_lib.data.Sample`` has both)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def target_start(self) -> int: ...


@dataclasses.dataclass
class Batch:
    """Right-padded token ids [B, T], attention mask [B, T] and labels [n_heads, B, T].

    ``labels[n - 1, b, t]`` = x_{t+n} of sequence b where t + n is a target token of it
    (``target_start <= t + n < len``), else -100 (ignored).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(samples: Sequence[TrainSample], n_heads: int, pad_id: int = 0) -> Batch:
    """Pad ``samples`` to a :class:`Batch` whose labels mark head n's targets (see there)."""
    if not samples:
        raise ValueError("samples is empty")
    lengths = [len(s.input_ids) for s in samples]
    T = max(lengths)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    labels = torch.full((n_heads, len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        n_tok, start = lengths[b], int(s.target_start)
        if not 0 <= start < n_tok:
            raise ValueError(f"sample {b}: target_start={start} must lie in 0..len(input_ids)-1 = {n_tok - 1}")
        ids[b, :n_tok] = torch.as_tensor(list(s.input_ids), dtype=torch.long)
        mask[b, :n_tok] = 1
        for n in range(1, n_heads + 1):
            first = max(start - n, 0)  # the first context end t whose x_{t+n} is a target token
            if first < n_tok - n:
                labels[n - 1, b, first:n_tok - n] = ids[b, first + n:n_tok]
    return Batch(ids, mask, labels)
