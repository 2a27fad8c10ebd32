"""mtp_lib.model_overview on tiny models: the continuation is the model's greedy output, cached."""

from __future__ import annotations

import pytest
import torch

from mtp_lib import data
from mtp_lib import models as M
from mtp_lib.model_overview import continuation, model_overview, token_lengths


def test_overview_and_continuation(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    ov = model_overview(["tiny-llama", "tiny-gpt-neox"], "The cat", 4, profile="test", device="cpu", dtype="float32")
    assert list(ov.table().index) == ["tiny-llama", "tiny-gpt-neox"] and not any(r.loaded for r in ov.results)
    lm = M.load_model("tiny-llama", device="cpu", dtype="float32")
    ids = lm.tokenizer("The cat", return_tensors="pt").input_ids
    with torch.no_grad():  # greedy by hand: argmax of each step
        for _ in range(4):
            ids = torch.cat([ids, lm.model(ids).logits[:, -1:].argmax(-1)], 1)
    want = lm.tokenizer.decode(ids[0, -4:], skip_special_tokens=True)
    assert continuation(lm, "The cat", 4)["continuation"] == want
    assert ov.rows[0]["continuation"] == "The cat ..." + want
    assert "> The cat ..." in ov.cards()[0]
    again = model_overview(["tiny-llama"], "The cat", 4, profile="test", device="cpu", dtype="float32")
    assert again.results[0].loaded


def test_token_lengths_count_targets_and_passages() -> None:
    tok = M.byte_tokenizer()
    passages = data.load_open_ended()
    table = token_lengths({"bytes": tok}, passages, 3)
    samples = data.translation_samples(tok, 3)
    assert table[table["task"] == "translation"]["tokens"].tolist() == [len(s.input_ids) - s.target_start for s in samples]
    assert table[table["task"] == "open-ended"]["tokens"].tolist() == [len(tok(p.text).input_ids) for p in passages[:3]]
