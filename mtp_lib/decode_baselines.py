"""Baselines through transformers: greedy ``generate``, prompt lookup decoding, and the Hugging Face
model that computes exactly head 1 of an MTP model (so that their outputs can be compared)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtp_lib.decode_output import GenerateOutput, _check_max_new, _eos_set
from mtp_lib.heads import MTPModel, shallow_module_copy
from mtp_lib.inputs import as_ids, as_model
from mtp_lib.models import get_adapter

__all__ = ["hf_generate", "next_token_model"]


def next_token_model(mtp: MTPModel, model: Any) -> nn.Module:
    """A Hugging Face causal LM computing exactly head 1 of ``mtp`` (built on ``model``): its greedy
    ``generate`` output is :func:`greedy_generate`'s, so the transformers baselines can be checked
    against it.

    Medusa heads: ``model`` itself. Layer heads: a copy of ``model`` sharing its weights, with the
    last layer replaced by head 1's (after training, head 1 differs from the model's last layer).
    Not possible with weighted hidden states or a LoRA-adapted backbone: ValueError.
    """
    model = as_model(model)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    shared = {p.data_ptr() for p in mtp.backbone.parameters()}
    if next(layers[0].parameters()).data_ptr() not in shared:
        raise ValueError("mtp was not built on this model (its backbone does not share the model's weights)")
    if any("lora_" in name for name, _ in mtp.backbone.named_parameters()):
        raise ValueError("the backbone carries LoRA weights: merge them into a model (mtp_lib.train.merge_lora) "
                         "and rebuild; a plain HF model cannot compute this head 1")
    if mtp.weighted_hidden_states:
        raise ValueError("head 1 reads weighted hidden states of all layers: no plain HF model computes it")
    if mtp.head_type == "medusa":
        return model
    head_layer = getattr(mtp.heads[0].body, adapter.layers_attr)[0]
    layer = shallow_module_copy(head_layer)
    for sub in layer.modules():  # back to the last layer's place in the model's own cache
        if isinstance(getattr(sub, "layer_idx", None), int):
            setattr(sub, "layer_idx", len(layers) - 1)
    copy = shallow_module_copy(model)
    new_layers = adapter.layers(copy)
    new_layers[len(layers) - 1] = layer
    return copy.eval()


@torch.no_grad()
def hf_generate(model: Any, input_ids: Any, max_new_tokens: int, *,
                eos_token_id: int | Sequence[int] | None = None,
                prompt_lookup_num_tokens: int | None = None) -> GenerateOutput:
    """Greedy ``model.generate`` of transformers (``prompt_lookup_num_tokens``: prompt lookup decoding).

    Stops only at ``eos_token_id`` (None: never; the model's own generation config is not used). With
    prompt lookup, transformers (5.x) returns no new token when the prompt's last token is that eos.
    Forward passes are counted with a hook on ``model.forward``; ``accepted_lengths`` come from the
    cache length at each pass (empty if the cache could not be read).
    """
    from transformers import GenerationConfig

    max_new = _check_max_new(max_new_tokens)
    eos = sorted(_eos_set(eos_token_id))
    model = as_model(model)
    vocab = int(get_adapter(model).unembed_weight(model).shape[0])
    device = next(model.parameters()).device
    prompt = as_ids(input_ids, vocab)  # the output goes back where the prompt was
    ids = prompt[None].to(device)
    prompt_len = ids.shape[1]
    if max_new == 0:
        return GenerateOutput(ids.to(prompt.device), prompt_len, [], 0)
    pad = eos[0] if eos else (getattr(model.config, "pad_token_id", None) or 0)
    # eos_token_id=[] rather than None: generate fills None fields from the model's own generation config
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=0,
                              eos_token_id=eos, pad_token_id=pad,
                              prompt_lookup_num_tokens=prompt_lookup_num_tokens, temperature=None, top_p=None,
                              top_k=None)
    cached: list[int | None] = []

    def count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        try:
            cached.append(int(cache.get_seq_length()) if cache is not None else 0)
        except Exception:  # an unknown cache type: count the pass only
            cached.append(None)

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        generate: Any = getattr(model, "generate")
        out = generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        handle.remove()
    n_new = out.shape[1] - prompt_len
    stopped = n_new > 0 and int(out[0, -1]) in eos
    accepted: list[int] = []
    if cached and None not in cached:
        # pass i leaves cached[i + 1] + 1 tokens known (its cache after cropping, plus the next token)
        known = [c + 1 for c in cached[1:]] + [int(out.shape[1])]  # type: ignore[operator]
        accepted = [b - a for a, b in zip([prompt_len] + known[:-1], known)]
        if any(a < 1 for a in accepted) or sum(accepted) != n_new:
            accepted = []
    return GenerateOutput(out.to(prompt.device), prompt_len, accepted, n_forward=len(cached), stopped_by_eos=stopped)
