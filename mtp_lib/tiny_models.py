"""Tiny random causal LMs built from a config, with a byte-level tokenizer: for tests and the ``tiny`` profile."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtp_lib.adapters import ADAPTERS

__all__ = ["TINY_MODELS", "TINY_VOCAB", "build_tiny_model", "byte_tokenizer"]

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
