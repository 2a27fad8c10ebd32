"""What the generate functions return, and the arguments they share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["GenerateOutput", "acceptance_summary"]


@dataclasses.dataclass
class GenerateOutput:
    """What the generate functions return.

    ``tokens``: ``[1, T + new]``, the prompt included. ``accepted_lengths``: tokens gained by each
    forward pass (the prompt's pass first), each >= 1, summing to the new tokens; empty when no
    token was generated, or when a transformers baseline's passes could not be counted.
    ``n_forward``: forward passes of the model (for the baselines: calls of its ``forward``).
    ``stopped_by_eos``: the output ends with an end-of-sequence token it generated.
    ``step_seconds`` (:class:`SpeculativeDecoder` only): host wall time summed over the call, split
    into ``prefill`` (the prompt's pass), ``draft`` (drafts and the tree's tokens), ``verify`` (the
    verification pass until its predictions reach the host) and ``accept`` (the accepted path,
    cache commit, bookkeeping).
    """

    tokens: torch.Tensor
    prompt_length: int
    accepted_lengths: list[int]
    n_forward: int
    stopped_by_eos: bool = False
    step_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.shape[1]) - self.prompt_length

    @property
    def new_token_ids(self) -> list[int]:
        return self.tokens[0, self.prompt_length:].tolist()

    @property
    def tau(self) -> float:
        """Mean tokens gained per verification step (the prompt's pass left out); NaN without steps."""
        steps = self.accepted_lengths[1:]
        return sum(steps) / len(steps) if steps else math.nan


def acceptance_summary(outputs: Sequence[GenerateOutput]) -> dict[str, Any]:
    """Pooled acceptance of several generations: ``tau`` (accepted tokens per verification step over
    all steps of all outputs, the prompts' passes left out), ``histogram`` (``{tokens gained: steps}``),
    and the totals ``new_tokens``, ``steps``, ``forward_passes``."""
    steps = [a for out in outputs for a in out.accepted_lengths[1:]]
    histogram: dict[int, int] = {}
    for a in steps:
        histogram[a] = histogram.get(a, 0) + 1
    return {"tau": sum(steps) / len(steps) if steps else math.nan, "histogram": dict(sorted(histogram.items())),
            "new_tokens": sum(out.new_tokens for out in outputs), "steps": len(steps),
            "forward_passes": sum(out.n_forward for out in outputs)}



def _check_max_new(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    return max_new_tokens


def _eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be an int, a list of ints or None")
    return frozenset(ids)

