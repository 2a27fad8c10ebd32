"""mtp_lib.decode_compiled: transformers' static-cache (compiled) generate equals greedy decoding.

In float64, so that the roundings of fused or differently ordered kernels cannot flip a near tie.
"""

from __future__ import annotations

import pytest
import torch

from mtp_lib.decode import greedy_generate
from mtp_lib.decode_compiled import CompiledGenerate
from seeds import fresh_seed
from test_decode_invariant import mtp_of, prompt, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gemma", "gpt2"])
def test_static_cache_generate_equals_greedy(family: str) -> None:
    """One cache, reset per prompt: prompts of different lengths, with and without an end token."""
    seed = fresh_seed()
    model = tiny(family, seed, torch.float64, 6 if family == "gemma" else 4)
    mtp = mtp_of(model, 1, seed)
    gen = CompiledGenerate(model, 120, compile=False)
    for i, n in enumerate((30, 70, 12)):
        ids = prompt(seed + i, n)
        ref = greedy_generate(mtp, ids, 40)
        out = gen.generate(ids, 40)
        msg = f"{family}, prompt {n}, seed {seed}"
        assert torch.equal(out.tokens, ref.tokens), msg
        assert out.accepted_lengths == [1] * 40 and out.n_forward == 40, msg
        eos = ref.new_token_ids[5]
        stopped = gen.generate(ids, 40, eos_token_id=eos)
        assert torch.equal(stopped.tokens, greedy_generate(mtp, ids, 40, eos_token_id=eos).tokens), msg
        assert stopped.stopped_by_eos, msg
    with pytest.raises(ValueError, match="larger max_length"):
        gen.generate(prompt(seed, 100), 21)
    assert gen.generate(prompt(seed, 10), 0).new_tokens == 0


def test_compiled_generate_on_cpu_equals_greedy() -> None:
    """The compiled path itself (torch.compile through transformers' CompileConfig), on the CPU: slow to
    compile (about half a minute), then reused for a second prompt of another length."""
    seed = fresh_seed()
    model = tiny("llama", seed, torch.float64)
    mtp = mtp_of(model, 1, seed)
    gen = CompiledGenerate(model, 100, compile=True)
    for i, n in enumerate((30, 45)):
        ids = prompt(seed + i, n)
        assert torch.equal(gen.generate(ids, 20).tokens, greedy_generate(mtp, ids, 20).tokens), f"seed {seed}"
