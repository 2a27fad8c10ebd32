"""The fastest ordinary greedy decode of transformers: ``generate`` with a static cache and ``torch.compile``.

transformers' own recipe: a ``StaticCache`` of fixed length made once and reset before each prompt,
passed to ``generate``, which then compiles the model's forward (``CompileConfig``, mode
``reduce-overhead``: CUDA graphs) once for the decoding steps; the prompt's pass runs eagerly.
Compilation is automatic on CUDA; elsewhere the same static-cache path runs eagerly unless
``compile=True`` (slow to compile; for tests).

Example::

    gen = CompiledGenerate(model, max_length=1024)     # one cache, one compilation
    for ids in prompts:
        gen.generate(ids, 128, eos_token_id=tok.eos_token_id).tokens
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtp_lib.decode import GenerateOutput
from mtp_lib.models import check_input_ids, get_adapter

__all__ = ["CompiledGenerate"]


class CompiledGenerate:
    """Greedy ``model.generate`` (batch 1) through one reused ``StaticCache`` of ``max_length`` tokens.

    ``compile``: compile the decoding step (default: on CUDA, as ``generate`` does by itself). The
    first call on a new shape compiles (seconds to minutes): warm up before timing. Each decoding
    pass yields one token, so ``accepted_lengths`` is all ones.
    """

    def __init__(self, model: nn.Module, max_length: int, *, compile: bool | None = None) -> None:
        from transformers import StaticCache

        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be an integer >= 2 (prompt plus new tokens)")
        if not callable(getattr(model, "generate", None)):
            raise ValueError(f"{type(model).__name__} has no generate method: pass a transformers causal LM")
        self.model, self.max_length = model, max_length
        self.device = next(model.parameters()).device
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        self.vocab = int(get_adapter(model).unembed_weight(model).shape[0])
        config: Any = model.config
        self.cache = StaticCache(config=config, max_cache_len=max_length)

    def _config(self, max_new: int, eos: list[int]) -> Any:
        from transformers import CompileConfig, GenerationConfig

        compile_config: Any = CompileConfig(fullgraph=True)
        if self.compile and self.device.type != "cuda":
            compile_config._compile_all_devices = True  # transformers' switch for compiling off CUDA
        pad = eos[0] if eos else (getattr(self.model.config, "pad_token_id", None) or 0)
        # eos_token_id=[] rather than None: generate fills None fields from the model's own generation config
        return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=0,
                                eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                                compile_config=compile_config, disable_compile=not self.compile)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 eos_token_id: int | Sequence[int] | None = None) -> GenerateOutput:
        """Decode ``input_ids`` ``[1, T]`` greedily for up to ``max_new_tokens``, stopping after ``eos_token_id``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        eos = sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or []))
        ids = check_input_ids(input_ids, self.vocab).to(self.device)
        prompt_len = ids.shape[1]
        if ids.shape[0] != 1:
            raise ValueError(f"batch size {ids.shape[0]}: CompiledGenerate decodes one prompt at a time")
        if prompt_len + max_new_tokens > self.max_length:
            raise ValueError(f"a prompt of {prompt_len} tokens plus {max_new_tokens} new ones exceeds the static "
                             f"cache ({self.max_length}): build CompiledGenerate with a larger max_length")
        if max_new_tokens == 0:
            return GenerateOutput(ids.to(input_ids.device), prompt_len, [], 0)
        self.cache.reset()
        generate: Any = getattr(self.model, "generate")
        out = generate(ids, attention_mask=torch.ones_like(ids), generation_config=self._config(max_new_tokens, eos),
                       past_key_values=self.cache)
        n_new = int(out.shape[1]) - prompt_len
        stopped = n_new > 0 and int(out[0, -1]) in eos
        return GenerateOutput(out.to(input_ids.device), prompt_len, [1] * n_new, n_forward=n_new,
                              stopped_by_eos=stopped)
