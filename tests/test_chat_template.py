"""mtp_lib.chat_template (Chapter 1's chat-template check) and Chapter 0's translations (mtp_lib.model_overview),
on a tiny model whose tokenizer gets a small chat template, and on synthetic stored results.

Every test draws a fresh seed and prints it in its assertion messages: rerun with that seed to replay.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtp_lib import chat_template, data
from mtp_lib import models as M
from mtp_lib.model_overview import chat_prompt, greedy_translations
from mtp_lib.report import paired_difference
from seeds import fresh_seed

TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat() -> object:
    lm = M.load_model("tiny-llama", device="cpu", dtype="float32")
    lm.tokenizer.chat_template = TEMPLATE
    return lm


@pytest.mark.usefixtures("one_thread")
def test_both_prompts_score_the_same_targets_and_ranks_match_a_plain_forward(tiny_chat: object) -> None:
    lm = tiny_chat
    plain = data.translation_samples(lm.tokenizer, 2)  # type: ignore[attr-defined]
    chat = chat_template.chat_samples(lm.tokenizer, plain)  # type: ignore[attr-defined]
    for p, c in zip(plain, chat):
        assert c.text.startswith("<|user|>") and "<|assistant|>\n" in c.text
        assert c.input_ids[-20:] == p.input_ids[-20:]  # the same reference tokens at the end
        assert c.text.endswith(p.text[-40:])
    value = chat_template.template_effect(lm, 2, last_tokens=6, positions=2, top_p=0.9)
    assert value["same_targets"] == [True, True]
    assert value["example_prompt"].startswith("<|user|>Translate")
    for version, samples in zip(chat_template.VERSIONS, (plain, chat)):
        for rec, s in zip(value["versions"][version], samples):
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(torch.tensor([s.input_ids])).logits[0].float(), -1)  # type: ignore[attr-defined]
            every = list(data.evaluation_targets(s, 6))
            ref = [int((logp[j - 1] > logp[j - 1, s.input_ids[j]]).sum()) for j in every]
            assert rec["rank_next"] == ref, version
            assert len(rec["rank_2nd"]) == 2 and all(r >= 0 for r in rec["rank_2nd"])


def test_a_model_without_a_template_is_refused() -> None:
    lm = M.load_model("tiny-gpt-neox", device="cpu", dtype="float32")
    assert chat_prompt(lm.tokenizer, "x") is None
    with pytest.raises(ValueError, match="no chat template"):
        chat_template.chat_samples(lm.tokenizer, data.translation_samples(lm.tokenizer, 1))


@pytest.mark.usefixtures("one_thread")
def test_greedy_translations_in_both_prompts(tiny_chat: object) -> None:
    out = greedy_translations(tiny_chat, 2, 5)["translations"]
    assert [t["id"] for t in out] == [s.id for s in data.translation_samples(tiny_chat.tokenizer, 2)]  # type: ignore[attr-defined]
    assert all(set(t) == {"id", "paper prompt", "chat template"} and "\n" not in t["paper prompt"] for t in out)


def test_template_lines_against_a_plain_loop() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n, last = int(rng.integers(2, 7)), int(rng.integers(3, 9))

    def runs() -> list[dict[str, list[int]]]:
        return [{"rank_next": rng.integers(0, 12, last).tolist(), "rank_2nd": rng.integers(0, 12, 2).tolist()}
                for _ in range(n)]

    value = {"versions": {v: runs() for v in chat_template.VERSIONS}, "same_targets": [True] * n}
    lines = chat_template.template_lines(value, top_k=5)
    plain = np.array([r < 5 for s in value["versions"]["paper prompt"] for r in s["rank_next"]], dtype=float)
    chat = np.array([r < 5 for s in value["versions"]["chat template"] for r in s["rank_next"]], dtype=float)
    diff = paired_difference(chat, plain, groups=np.repeat(np.arange(n), last).tolist())
    assert f"{plain.mean():.2f} in the paper's prompt, {chat.mean():.2f} in the chat template" in lines[0], f"seed {seed}"
    assert f"{diff.mean:+.2f} [{diff.lo:+.2f}, {diff.hi:+.2f}]" in lines[0], f"seed {seed}: {lines[0]}"
    assert len(lines) == 2


def test_translation_table_puts_each_models_outputs_beside_the_reference() -> None:
    from types import SimpleNamespace

    from mtp_lib.model_overview import translation_table

    pairs = {p.id: p for p in data.load_translation("validation")}
    ids = list(pairs)[:2]
    results = {"a": SimpleNamespace(value={"translations": [{"id": i, "paper prompt": f"a{i}", "chat template": f"c{i}"}
                                                             for i in ids]}),
               "b": SimpleNamespace(value={"translations": [{"id": i, "paper prompt": f"b{i}"} for i in ids]})}
    table = translation_table(results)  # type: ignore[arg-type]
    assert list(table.index) == ids
    assert list(table.columns) == ["Spanish", "reference", "a (paper prompt)", "a (chat template)", "b (paper prompt)"]
    for i in ids:
        assert table.loc[i, "reference"] == pairs[i].target and table.loc[i, "b (paper prompt)"] == f"b{i}"
