"""The suite's model sizes: Pythia's shapes (GPT-NeoX), our vocabulary, their FLOPs and memory.

Shapes and learning rates are those of the Pythia suite (Biderman et al. 2023, Table 1 and the
released configs): width ``d``, depth ``L``, heads ``H``, MLP 4d, rotary on 25% of each head,
parallel attention and MLP, untied input and output embeddings. The ``micro-*`` shapes are ours,
for the CPU profiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["SHAPES", "Shape", "attention_flops_per_token", "flops_per_token", "gpt_neox_config", "memory_estimate",
           "param_counts", "shape"]


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    lr: float  # Pythia's peak learning rate for this size (ours for micro-*)


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("micro-32", 32, 2, 2, 3e-3),
    Shape("micro-64", 64, 2, 2, 3e-3),
    Shape("micro-128", 128, 3, 4, 2e-3),
    Shape("14m", 128, 6, 4, 1e-3),
    Shape("31m", 256, 6, 8, 1e-3),
    Shape("70m", 512, 6, 8, 1e-3),
    Shape("160m", 768, 12, 12, 6e-4),
    Shape("410m", 1024, 24, 16, 3e-4),
    Shape("1b", 2048, 16, 8, 3e-4),
]}



def shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown size {name!r}: choose from {', '.join(SHAPES)}")
    return SHAPES[name]


def gpt_neox_config(size: str, vocab_size: int, *, max_positions: int = 2048, eos_id: int = 0) -> Any:
    """A ``GPTNeoXConfig`` at Pythia's shape for ``size`` with our vocabulary (no dropout, as Pythia)."""
    from transformers import GPTNeoXConfig

    s = shape(size)
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads, intermediate_size=4 * s.d_model,
        use_parallel_residual=True, max_position_embeddings=max_positions, tie_word_embeddings=False,
        hidden_act="gelu", layer_norm_eps=1e-5, initializer_range=0.02, attention_dropout=0.0,
        hidden_dropout=0.0, bos_token_id=eos_id, eos_token_id=eos_id)
    rope = getattr(config, "rope_parameters", None)  # transformers 5 (4.x: config.rotary_pct)
    if isinstance(rope, dict):
        rope["partial_rotary_factor"] = 0.25  # Pythia's rotary_pct: rotary on a quarter of each head
    else:
        config.rotary_pct = 0.25
    return config


def param_counts(model: Any) -> dict[str, int]:
    """``params`` (all), ``non_embedding_params`` (all but the input and output embeddings, as Pythia
    and Kaplan et al. count model size) and ``unembedding_params``."""
    total = sum(p.numel() for p in model.parameters())
    emb_in = model.get_input_embeddings().weight.numel()
    emb_out = model.get_output_embeddings().weight.numel()
    return {"params": total, "non_embedding_params": total - emb_in - emb_out, "unembedding_params": emb_out}


def flops_per_token(counts: dict[str, int], size: str, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's model-FLOPs convention (Chowdhery et al. 2022, appendix B):
    6 N (N = the parameters that multiply: non-embedding + unembedding) + 12 L d T (attention
    scores and values over a sequence of T, forward and backward). The embedding lookup counts 0."""
    n = counts["non_embedding_params"] + counts["unembedding_params"]
    return 6.0 * n + attention_flops_per_token(size, seq_len)


def attention_flops_per_token(size: str, seq_len: int) -> float:
    """PaLM's attention term of :func:`flops_per_token`: 12 L d T (scores and values, forward and backward)."""
    s = shape(size)
    return 12.0 * s.n_layers * s.d_model * seq_len



def memory_estimate(size: str, vocab_size: int, micro_batch: int, seq_len: int) -> float:
    """Bytes a training step needs, roughly: fp32 weights, gradients and AdamW's two moments (16 B per
    parameter), bf16 activations (Korthikanti et al. 2022: 34 T d bytes per layer and sequence; their
    5 H T^2 term for the attention scores is absent with SDPA's fused attention, which keeps none)
    and float32 logits with their gradient (8 B per logit)."""
    s = shape(size)
    params = 12 * s.d_model ** 2 * s.n_layers + 2 * vocab_size * s.d_model
    acts = micro_batch * seq_len * s.d_model * 34 * s.n_layers
    return 16.0 * params + acts + 8.0 * micro_batch * seq_len * vocab_size
