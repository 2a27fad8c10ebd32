"""Random causal LMs built from a config: tiny ones with a byte-level tokenizer (tests, the ``tiny``
profile), and the offline models' shapes (benchmarks whose timings need no weights)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtp_lib.adapters import ADAPTERS

__all__ = ["SHAPES", "TINY_MODELS", "TINY_VOCAB", "benchmark_model", "build_shaped_model", "build_tiny_model", "byte_tokenizer"]

TINY_MODELS: dict[str, str] = {"tiny-gpt-neox": "gpt_neox", "tiny-llama": "llama",
                               "tiny-gemma3": "gemma", "tiny-gpt2": "gpt2"}


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with 256 byte tokens and one special token (id 256): no training, no data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", clean_up_tokenization_spaces=False,
    )


TINY_VOCAB = 257


def _tiny_config(family: str, n_layers: int, hidden: int) -> Any:
    from transformers import GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig

    common: dict[str, Any] = dict(vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                             intermediate_size=4 * hidden, max_position_embeddings=2048, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=2048,
                           tie_word_embeddings=True, **common)
    if family == "gemma":
        return Gemma3TextConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=hidden // 4, intermediate_size=2 * hidden,
                                max_position_embeddings=2048, sliding_window=64, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=2048, **common)
    raise ValueError(f"family={family!r} is not one of {sorted(ADAPTERS)}")


def build_tiny_model(family: str, *, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (vocabulary of :func:`byte_tokenizer`).

    The same ``seed`` gives the same weights. Its predictions are near uniform: it exercises code
    paths, it says nothing about language.
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(family, n_layers, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # The default init (std 0.02) leaves the logits almost flat. Rescaling the unembedding gives
        # peaked distributions for gpt_neox, llama and gpt2 (mean top-1 probability about 0.2-0.4),
        # closer to what the analyses meet in real models; Gemma's (1 + w) norm and scaled tied
        # embedding keep the tiny gemma nearly flat. Tied embeddings need a smaller scale: each token
        # then sees its own embedding in the residual stream.
        with torch.no_grad():
            out_w = model.get_output_embeddings().weight
            tied = out_w is model.get_input_embeddings().weight
            out_w.normal_(0.0, (0.6 if tied else 3.0) / hidden**0.5)
    return model.eval()


# The configs of the offline models (their config.json files, shapes only): timings need no weights.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                        sliding_window=512, tie_word_embeddings=True,
                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3),
}


def build_shaped_model(shape: str, *, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM: a tiny one (``tiny-<family>``), one of the offline models'
    shapes (:data:`SHAPES`) or a config.json file's. For timings, which do not depend on the weights."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    if shape.startswith("tiny-"):
        if shape not in TINY_MODELS:
            raise ValueError(f"shape {shape!r}: the tiny models are {', '.join(TINY_MODELS)}")
        return build_tiny_model(TINY_MODELS[shape], seed=seed)
    if shape in SHAPES:
        fields = dict(SHAPES[shape])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    elif Path(shape).is_file():
        config = AutoConfig.from_pretrained(shape)
    else:
        raise ValueError(f"shape {shape!r} is neither a known shape ({', '.join(SHAPES)}), a tiny model "
                         f"({', '.join(TINY_MODELS)}) nor a config.json file")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def benchmark_model(model: str | None, shape: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A benchmark's model: ``model``'s real weights (an alias, hub id or folder) if given, else random
    weights in ``shape`` (see :func:`build_shaped_model`), on ``device`` in ``dtype``. A bad shape
    exits with what the known ones are."""
    if model:
        from .models import load_model

        return load_model(model, device=str(device), dtype=dtype).model
    try:
        return build_shaped_model(shape).to(device=device, dtype=dtype)
    except ValueError as err:
        raise SystemExit(f"--shape: {err}") from None
