"""What the analyses accept as a model, token ids and positions: one way, everywhere.

- a model: a Hugging Face causal LM, or the :class:`mtp_lib.models.LoadedModel` that
  :func:`mtp_lib.models.load_model` returns (its ``.model`` is used);
- token ids of one sequence: a tensor ``[T]`` or ``[1, T]``, a list of ints (or ``[[...]]``), or what
  the tokenizer returns for one text (a ``BatchEncoding``, or any mapping with ``"input_ids"``);
- positions: a 1-D sequence of indices into the sequence, or None for all.

Each helper raises a ValueError that says what is wrong and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["as_ids", "as_model", "as_positions"]


def as_model(model: Any, name: str = "model") -> nn.Module:
    """The ``nn.Module`` of ``model``: the model itself, or ``model.model`` for a ``LoadedModel``."""
    from mtp_lib.models import LoadedModel

    if isinstance(model, LoadedModel):
        model = model.model
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} must be a Hugging Face causal LM (a torch nn.Module) or the LoadedModel that "
                         f"mtp_lib.models.load_model returns, got {type(model).__name__}")
    return model


def as_ids(input_ids: Any, vocab: int | None = None, *, name: str = "input_ids") -> torch.Tensor:
    """One sequence of token ids as a 1-D int64 tensor (on the device it already is; lists: the CPU).

    Accepts a tensor ``[T]`` or ``[1, T]``, a list of ints or ``[[ints]]``, and a tokenizer's
    ``BatchEncoding`` of one text (its ``input_ids``). Batches of several sequences are refused (call
    once per sequence: sequences of different lengths need no padding that way). With ``vocab``, ids
    outside ``[0, vocab)`` are refused too.
    """
    if isinstance(input_ids, Mapping):  # a BatchEncoding (a UserDict) or a plain dict
        if "input_ids" not in input_ids:
            raise ValueError(f"{name} is a mapping without 'input_ids' (keys: {sorted(input_ids)}); pass the "
                             "tokenizer's output for one text, or the token ids themselves")
        input_ids = input_ids["input_ids"]
    ids = input_ids if isinstance(input_ids, torch.Tensor) else _tensor_of(input_ids, name)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"{name} must be one sequence, shape [T] or [1, T], got shape {list(ids.shape)}; "
                         "call once per sequence")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one token")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds ids outside [0, {vocab}) (min {int(ids.min())}, max {int(ids.max())}); "
                         "was it tokenized for another model?")
    return ids


def _tensor_of(values: Any, name: str) -> torch.Tensor:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be token ids, got text: tokenize it first (tokenizer(text)['input_ids'])")
    try:
        return torch.as_tensor(list(values))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor, a list of token ids or a tokenizer's BatchEncoding, "
                         f"got {type(values).__name__}") from err


def as_positions(positions: Any, length: int, *, what: str = "index t") -> torch.Tensor:
    """Positions in a sequence of ``length`` tokens as a 1-D int64 CPU tensor; None: all ``0..length-1``."""
    if positions is None:
        return torch.arange(length)
    try:
        pos = torch.as_tensor(positions).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"positions must be a 1-D sequence of ints or None, got {positions!r}") from err
    if pos.numel() == 0:
        raise ValueError(f"positions is empty: give at least one {what} (0 <= t < {length}), or None for all")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex() or pos.ndim > 1:
        raise ValueError(f"positions must be a 1-D sequence of integer indices t (0 <= t < {length}), "
                         f"got dtype {pos.dtype} and shape {list(pos.shape)}")
    pos = pos.reshape(-1).long()
    if int(pos.min()) < 0 or int(pos.max()) >= length:
        raise ValueError(f"positions must lie in [0, {length - 1}] for a sequence of {length} tokens, "
                         f"got min {int(pos.min())}, max {int(pos.max())}")
    return pos
