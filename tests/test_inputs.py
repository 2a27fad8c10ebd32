"""Inputs are accepted the same way everywhere (mtp_lib.inputs): a model or the LoadedModel of load_model;
token ids as a tensor [T] or [1, T], a list or a tokenizer's BatchEncoding; clear errors for bad devices
and empty positions; no tokenizer warning on decoding."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from mtp_lib import inputs, lens
from mtp_lib import models as M
from mtp_lib.decode import greedy_generate, hf_generate, speculative_generate
from mtp_lib.heads import MTPModel
from mtp_lib.marginal import marginalize
from seeds import fresh_seed


@pytest.fixture(scope="module")
def lm() -> M.LoadedModel:
    return M.load_model("tiny-llama", device="cpu")


def _forms(text: str) -> dict[str, Any]:
    """The same token ids in every accepted form."""
    tok = M.byte_tokenizer()
    ids = tok(text)["input_ids"]
    return {"list": list(ids), "nested list": [list(ids)], "[T]": torch.tensor(ids), "[1, T]": torch.tensor([ids]),
            "BatchEncoding": tok(text), "BatchEncoding pt": tok(text, return_tensors="pt")}


def _text(seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefgh ,.") for _ in range(rng.randint(6, 14)))


def test_every_form_of_ids_gives_the_same_results(lm: M.LoadedModel) -> None:
    seed = fresh_seed()
    forms = _forms(_text(seed))
    want = forms["[1, T]"]
    n = want.shape[1]
    mtp = MTPModel(lm, n_heads=2, seed=seed)
    ref_marg = marginalize(lm.model, want, top_p=0.8, positions=[n - 1, 0])
    ref_lens = lens.lens_stats(lm.model, want)
    ref_spec = speculative_generate(mtp, want, 5)
    ref_hf = hf_generate(lm.model, want, 3)
    for name, ids in forms.items():
        msg = f"seed {seed}, {name}"
        got = marginalize(lm.model, ids, top_p=0.8, positions=[n - 1, 0])
        assert torch.equal(got.log_probs, ref_marg.log_probs), msg
        assert torch.equal(lens.lens_stats(lm.model, ids).kl, ref_lens.kl), msg
        assert torch.equal(speculative_generate(mtp, ids, 5).tokens, ref_spec.tokens), msg
        assert torch.equal(greedy_generate(mtp, ids, 5).tokens, ref_spec.tokens), msg
        assert torch.equal(hf_generate(lm.model, ids, 3).tokens, ref_hf.tokens), msg
        assert torch.equal(inputs.as_ids(ids), want[0]), msg


def test_a_loaded_model_is_accepted_where_a_model_is(lm: M.LoadedModel) -> None:
    seed = fresh_seed()
    ids = _forms(_text(seed))["[1, T]"]
    assert M.get_adapter(lm) is lm.adapter
    assert torch.equal(marginalize(lm, ids, top_p=0.7).log_probs, marginalize(lm.model, ids, top_p=0.7).log_probs)
    assert torch.equal(lens.lens_stats(lm, ids).entropy, lens.lens_stats(lm.model, ids).entropy)
    assert torch.equal(lens.hidden_states(lm, ids), lens.hidden_states(lm.model, ids))
    assert lens.vocab_size(lm) == lm.vocab_size
    assert torch.equal(hf_generate(lm, ids, 3).tokens, hf_generate(lm.model, ids, 3).tokens)
    a, b = MTPModel(lm, n_heads=2, seed=seed), MTPModel(lm.model, n_heads=2, seed=seed)
    assert torch.equal(a(ids).logits, b(ids).logits), f"seed {seed}"
    # speculative decoding needs heads: a LoadedModel there says how to get them, not "add an adapter"
    with pytest.raises(ValueError, match=r"MTPModel\(model, n_heads") as err:
        speculative_generate(lm, ids, 3)  # type: ignore[arg-type]
    assert "Adapter" not in str(err.value)


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda", "cuda:7", "tpu0"])
def test_bad_device_strings_list_the_choices(device: str) -> None:
    if device in M.device_choices():
        pytest.skip(f"{device} exists on this machine")
    with pytest.raises(ValueError, match=r"choose one of \['auto', 'cpu'") as err:
        M.load_model("tiny-gpt2", device=device)
    assert repr(device) in str(err.value)


@pytest.mark.parametrize("empty", [[], (), torch.tensor([], dtype=torch.long)])
def test_empty_positions_say_so(lm: M.LoadedModel, empty: Any) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    for call in (lambda: marginalize(lm, ids, positions=empty), lambda: lens.lens_stats(lm, ids, positions=empty),
                 lambda: lens.lens_stats_many(lm, [ids], positions=[empty])):
        with pytest.raises(ValueError, match="positions is empty"):
            call()


@pytest.mark.parametrize("bad, words", [
    ([[1, 2], [3, 4]], "one sequence"), ("some text", "tokenize it first"), ({"attention_mask": [1]}, "without 'input_ids'"),
    ([1.5, 2.0], "integer"), (object(), "BatchEncoding"),
])
def test_bad_ids_say_what_is_accepted(bad: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        inputs.as_ids(bad)


def test_a_non_model_says_what_a_model_is() -> None:
    with pytest.raises(ValueError, match="LoadedModel"):
        inputs.as_model("smollm2-135m")
    with pytest.raises(ValueError, match="not a Hugging Face causal LM"):
        M.get_adapter(torch.nn.Linear(2, 2))


def _records(logger: logging.Logger) -> tuple[list[logging.LogRecord], logging.Handler]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    return records, handler


def test_a_bpe_tokenizer_with_clean_up_decodes_without_warning(tmp_path: Path) -> None:
    """SmolLM2's converted tokenizer sets clean_up_tokenization_spaces=True, on which transformers warns at
    every process's first decode (and ignores it for BPE). A tiny BPE tokenizer with the same setting,
    loaded through load_model, decodes the same text without the warning."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    M.build_tiny_model("llama", n_layers=2, seed=0).save_pretrained(tmp_path)
    tok = M.byte_tokenizer()
    tok.clean_up_tokenization_spaces = True
    tok.save_pretrained(tmp_path)
    ids = tok("Hello , world . It 's ok !")["input_ids"]
    logger = hf_logging.get_logger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    records, handler = _records(logger)
    try:
        lm = M.load_model(str(tmp_path), device="cpu")
        getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()  # warned once per process otherwise
        ours = lm.tokenizer.decode(ids)
        assert not [r for r in records if "clean_up_tokenization_spaces" in r.getMessage()]
        plain = AutoTokenizer.from_pretrained(tmp_path)
        getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()
        theirs = plain.decode(ids)  # the situation of the issue: the warning, and the same text
        assert [r for r in records if "clean_up_tokenization_spaces" in r.getMessage()]
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert ours == theirs == "Hello , world . It 's ok !"
