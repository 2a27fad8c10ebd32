"""Training samples to batches whose labels mark each head's targets: padded (one sequence a row) or
packed (several sequences a row, told apart by their position ids)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = ["IGNORE", "Batch", "TrainSample", "collate", "make_batch", "pack"]

IGNORE = -100


class TrainSample(Protocol):
    """What the trainer reads from a sample (``mtp_lib.data.Sample`` has both)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def target_start(self) -> int: ...


@dataclasses.dataclass
class Batch:
    """Token ids [B, T], attention mask [B, T] and labels [n_heads, B, T]; packed: position ids [B, T]
    and no attention mask.

    Padded (:func:`collate`): row b is sequence b, right-padded. ``labels[n - 1, b, t]`` = x_{t+n} of
    sequence b where t + n is a target token of it (``target_start <= t + n < len``), else -100 (ignored).
    Packed (:func:`pack`): a row holds several sequences one after the other, each with positions
    0, 1, ..; a position that does not follow its left neighbour's + 1 starts a new sequence, and
    attention stays inside each (transformers builds that block-diagonal causal mask from the
    position ids when the attention mask is None). The labels follow the same rule inside each one.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return Batch(self.input_ids.to(device), move(self.attention_mask), self.labels.to(device),
                     move(self.position_ids))


def _lengths(samples: Sequence[TrainSample]) -> list[int]:
    if not samples:
        raise ValueError("samples is empty")
    lengths = [len(s.input_ids) for s in samples]
    for b, s in enumerate(samples):
        if not 0 <= int(s.target_start) < lengths[b]:
            raise ValueError(f"sample {b}: target_start={int(s.target_start)} must lie in 0..len(input_ids)-1 = "
                             f"{lengths[b] - 1}")
    return lengths


def _place(ids: torch.Tensor, labels: torch.Tensor, row: int, at: int, sample: TrainSample) -> None:
    """Write ``sample`` into ``ids[row, at:]`` and its head targets into ``labels[:, row, at:]``."""
    n_tok, start = len(sample.input_ids), int(sample.target_start)
    ids[row, at:at + n_tok] = torch.as_tensor(list(sample.input_ids), dtype=torch.long)
    for n in range(1, labels.shape[0] + 1):
        first = max(start - n, 0)  # the first context end t whose x_{t+n} is a target token
        if first < n_tok - n:
            labels[n - 1, row, at + first:at + n_tok - n] = ids[row, at + first + n:at + n_tok]


def collate(samples: Sequence[TrainSample], n_heads: int, pad_id: int = 0) -> Batch:
    """Pad ``samples`` to a :class:`Batch` whose labels mark head n's targets (see there)."""
    lengths = _lengths(samples)
    T = max(lengths)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    labels = torch.full((n_heads, len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        _place(ids, labels, b, 0, s)
        mask[b, :lengths[b]] = 1
    return Batch(ids, mask, labels)


def pack(samples: Sequence[TrainSample], n_heads: int, row_tokens: int, pad_id: int = 0) -> Batch:
    """Pack ``samples`` into rows of at most ``row_tokens`` tokens (a :class:`Batch` with position ids).

    First fit, longest first: each sequence goes to the first row with room, so the rows are nearly
    full and a batch of short sequences runs far fewer padding tokens than :func:`collate`'s. The
    rows are as long as the fullest one, rounded up to a multiple of 64 (fewer shapes to compile for),
    at most ``row_tokens``; the rest of a row is padding with positions 0, 1, .. of its own (a sequence
    of no targets). The loss over a batch is the one :func:`collate`'s batch gives, up to rounding.
    """
    lengths = _lengths(samples)
    if max(lengths) > row_tokens:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of row_tokens={row_tokens}")
    rows: list[list[int]] = []  # sample indices per row
    used: list[int] = []
    for b in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[b] <= row_tokens), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(b)
        used[r] += lengths[b]
    T = min(row_tokens, -(-max(used) // 64) * 64)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((n_heads, len(rows), T), IGNORE, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for b in members:
            _place(ids, labels, r, at, samples[b])
            pos[r, at:at + lengths[b]] = torch.arange(lengths[b])
            at += lengths[b]
        pos[r, at:] = torch.arange(T - at)
    return Batch(ids, None, labels, pos)


def make_batch(samples: Sequence[TrainSample], n_heads: int, pack_rows: int = 0) -> Batch:
    """The batch training runs on: :func:`pack`'s rows of ``pack_rows`` tokens, or (0) :func:`collate`'s."""
    return pack(samples, n_heads, pack_rows) if pack_rows else collate(samples, n_heads)
