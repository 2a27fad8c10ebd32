"""One adapter per architecture family: where a causal LM keeps its decoder layers, final norm and unembedding.

Everything else in ``mtp_lib`` reaches a model's parts through :func:`get_adapter`, never through
``model.gpt_neox...`` directly, so that any supported Hugging Face causal LM works: GPT-NeoX (Pythia),
Llama-style (Llama, SmolLM2, Mistral, Qwen2), Gemma 1-3 and GPT-2.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ADAPTERS", "Adapter", "get_adapter"]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Names the parts of one architecture family.

    ``base`` is the attribute of the causal-LM wrapper that holds the decoder stack; ``layers`` and
    ``norm`` are attributes of that stack. ``lora_targets`` are the attention projections that the
    heads chapter's LoRA adapts (query, key, value).
    """

    family: str
    model_types: tuple[str, ...]
    base_attr: str
    layers_attr: str
    norm_attr: str
    lora_targets: tuple[str, ...]

    def base(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base_attr)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order (layer 1 at index 0)."""
        return getattr(self.base(model), self.layers_attr)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.base(model), self.norm_attr)

    def embed(self, model: nn.Module) -> nn.Module:
        return cast("PreTrainedModel", model).get_input_embeddings()

    def unembed(self, model: nn.Module) -> nn.Module:
        """The output projection W_u (tied to the embedding in some models)."""
        return cast("PreTrainedModel", model).get_output_embeddings()

    def unembed_weight(self, model: nn.Module) -> torch.Tensor:
        """W_u's weight, [vocabulary, hidden]: its rows are the vocabulary, its device the logits'."""
        return cast(torch.Tensor, self.unembed(model).weight)

    def logits(self, model: nn.Module, hidden: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """f_u: final norm (unless ``normed``), unembedding and any final logit soft-capping."""
        h = hidden if normed else self.final_norm(model)(hidden)
        out = self.unembed(model)(h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out


ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in [
        Adapter("gpt_neox", ("gpt_neox",), "gpt_neox", "layers", "final_layer_norm", ("query_key_value",)),
        Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), "model", "layers", "norm",
                ("q_proj", "k_proj", "v_proj")),
        Adapter("gemma", ("gemma", "gemma2", "gemma3_text"), "model", "layers", "norm",
                ("q_proj", "k_proj", "v_proj")),
        Adapter("gpt2", ("gpt2",), "transformer", "h", "ln_f", ("c_attn",)),
    ]
}


def get_adapter(model: Any) -> Adapter:
    """The adapter for a Hugging Face causal LM, chosen by ``model.config.model_type`` (or the
    ``LoadedModel``'s of :func:`mtp_lib.models.load_model`)."""
    from mtp_lib.models import LoadedModel

    if isinstance(model, LoadedModel):
        return model.adapter
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face causal LM (it has no config.model_type): pass "
                         "one (AutoModelForCausalLM.from_pretrained(...)) or the LoadedModel of load_model(...)")
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise ValueError(
        f"model_type {model_type!r} ({type(model).__name__}) has no adapter; supported: {supported}. "
        "Add an Adapter to mtp_lib.adapters.ADAPTERS naming its decoder layers, final norm and LoRA targets."
    )
