"""Draft heads for self-speculative decoding of a model as it is: trained on its own greedy output.

Speculative decoding accepts a drafted token when it is the model's own greedy choice, so heads that
draft for a model should learn what that model says, not what a reference text says
(self-distillation, as in Medusa-2's training):

    from mtp_lib.self_distill import greedy_targets, train_draft_heads

    data = greedy_targets(model, samples, n_tokens=96)        # prompts + the model's greedy continuation
    mtp, record = train_draft_heads(model, data, n_heads=4)   # heads 2..4 trained, head 1 = the model
    out = speculative_generate(mtp, ids, 128)                 # equals greedy decoding of ``model``

:func:`train_draft_heads` trains with ``mtp_lib.train`` (the ``heads_only`` recipe by default: the
model is frozen) and then makes the result a verifier of the unchanged model with
:func:`model_as_verifier`: head 1 is reset to the model's own last layer. Heads-only training keeps
heads 2..N independent of head 1 (each reads the frozen z^{L-1}), so this equals training heads 2..N
alone. ``benchmarks/speculative.py`` trains its heads this way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtp_lib.heads import MTPModel

__all__ = ["greedy_targets", "model_as_verifier", "train_draft_heads"]


@torch.no_grad()
def greedy_targets(model: nn.Module, samples: Sequence[Any], n_tokens: int, *, eos_token_id: int | None = None,
                   batch: int | None = None, progress: bool = True) -> list[Any]:
    """Each sample's target replaced by ``model``'s greedy continuation of its prompt
    (``input_ids[:target_start]``), at most ``n_tokens`` tokens, cut after ``eos_token_id``.

    Batched transformers ``generate`` with left padding (``batch`` prompts a call: default 128 on a
    GPU, 8 on a CPU): fast, and exactness does not matter for training data."""
    from tqdm.auto import tqdm

    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be at least 1")
    device = next(model.parameters()).device
    batch = batch or (128 if device.type == "cuda" else 8)
    pad = eos_token_id if eos_token_id is not None else 0
    out = []
    for i in tqdm(range(0, len(samples), batch), desc="greedy targets", disable=not progress):
        chunk = samples[i:i + batch]
        prompts = [list(s.input_ids[:s.target_start]) for s in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_tokens,  # type: ignore[operator]
                             min_new_tokens=1, eos_token_id=eos_token_id, pad_token_id=pad)
        for s, p, row in zip(chunk, prompts, gen[:, width:].tolist()):
            if eos_token_id is not None and eos_token_id in row:
                row = row[:row.index(eos_token_id) + 1]
            out.append(dataclasses.replace(s, input_ids=p + row, target_start=len(p)))
    return out


def model_as_verifier(mtp: MTPModel, model: nn.Module) -> MTPModel:
    """``mtp`` in eval mode with head 1 made the model's own last layer again, so that speculative
    decoding with it verifies against ``model`` itself. Refuses heads whose head 1 cannot be the model:
    a LoRA-adapted backbone (a joint recipe) or weighted hidden states (head 1 reads every layer).
    Medusa heads' head 1 already is the model."""
    mtp.eval()
    if any("lora_" in name for name, _ in mtp.backbone.named_parameters()):
        raise ValueError("these heads come with a LoRA-adapted backbone (a joint recipe): verifying with them "
                         "decodes another model than the given one; train with a heads-only recipe")
    if mtp.head_type == "medusa":
        return mtp
    if mtp.weighted_hidden_states:
        raise ValueError("heads with weighted hidden states: head 1 reads every layer, so it cannot be the "
                         "model's own last layer")
    adapter = mtp.adapter
    last = adapter.layers(model)[-1]
    head_layer = getattr(mtp.heads[0].body, adapter.layers_attr)[0]
    head_layer.load_state_dict(last.state_dict())
    return mtp


def train_draft_heads(model: nn.Module, data: Sequence[Any], n_heads: int, *, recipe: str = "heads_only",
                      head_init: str = "copy", lr: float = 1e-3, epochs: int = 2, batch: int = 16, seed: int = 0,
                      out_dir: str | Path | None = None, keep_head1: bool = False,
                      progress: bool = True) -> tuple[MTPModel, dict[str, Any]]:
    """Train ``n_heads`` heads on ``data`` (from :func:`greedy_targets`) and return them ready to draft
    for ``model`` (:func:`model_as_verifier`; ``keep_head1``: keep the trained head 1 instead), with a
    record of the training: its config, sequences, seconds, steps, first and last loss per head.

    ``head_init="copy"`` starts heads 2..N as copies of the last layer, so each first predicts the next
    token and has only the shift to learn (the paper starts them random: ``"random"``). ``batch``
    sequences a step, in passes of at most 16 on a GPU and 4 on a CPU (memory only), and no more than
    the data holds. ``out_dir``: checkpoints every 200 steps and the trained weights
    (``mtp_lib.train``; an interrupted run resumes)."""
    from mtp_lib.train import recipe as make_recipe
    from mtp_lib.train import train

    if not data:
        raise ValueError("data is empty: pass the samples from greedy_targets")
    cuda = next(model.parameters()).device.type == "cuda"
    micro = min(batch, 16 if cuda else 4)
    effective = max(micro, min(batch - batch % micro, (len(data) // micro) * micro))
    extra = {"head_init": head_init} if head_init != "random" else {}
    config = make_recipe(recipe, n_heads=n_heads, lr=lr, epochs=epochs, seed=seed, effective_batch_size=effective,
                         micro_batch_size=micro, checkpoint_every=200 if out_dir is not None else 0, **extra)
    t0 = time.perf_counter()
    result = train(model, data, config, out_dir=out_dir, progress=progress)
    steps = [h for h in result.history if "loss" in h]
    record = {"config": config.to_dict(), "sequences": len(data), "seconds": time.perf_counter() - t0,
              "steps": len(steps), "first_loss": steps[0]["loss"] if steps else None,
              "last_loss": steps[-1]["loss"] if steps else None}
    mtp: MTPModel = result.model  # type: ignore[assignment]
    return (mtp.eval() if keep_head1 else model_as_verifier(mtp, model)), record
