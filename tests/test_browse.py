"""mtp_lib.browse: the views escape text, mark the references, and the browsers nest their pickers."""

from __future__ import annotations

import dataclasses
from typing import Any

import ipywidgets as w

from mtp_lib import browse, data
from mtp_lib import models as M


def _entry(t: int) -> dict[str, Any]:
    return {"t": t, "context": ["<b>", " cat"], "truncated": True, "ref": [" sat", "\n"], "rank": [0, 3],
            "candidates": 12, "mass": 0.99, "top": [[[" sat", 0.5], [" ran", 0.2]], [["\n", 0.1], [" on", 0.4]]]}


@dataclasses.dataclass
class FakeResult:
    value: Any


def test_marginal_view_escapes_and_marks_the_references() -> None:
    html = browse.marginal_view(_entry(4), 0.99)
    assert "&lt;b&gt;␣cat" not in html and "…&lt;b&gt; cat" in html  # the context escaped, spaces kept
    assert f'style="background:{browse.GREEN}"' in html and f'style="background:{browse.ORANGE}"' in html
    assert "rank 0" in html and "rank 3" in html and "12 candidates" in html and "top-0.99" in html
    assert browse.visible(" a\n") == "␣a⏎" and browse.visible("") == "∅"


def test_marginal_browser_nests_model_task_sample_position() -> None:
    results = {("m", "translation"): FakeResult({"samples": [{"id": "s1", "browser": [_entry(1), _entry(2)]},
                                                             {"id": "s2"}]}),
               ("m", "open-ended"): FakeResult({"samples": [{"id": "s3"}]})}
    top = browse.marginal_browser(results, 0.99)
    assert isinstance(top, w.VBox) and top.children[0].options == ("m",)
    task_picker = top.children[1].children[0]
    assert task_picker.children[0].options == ("translation",)
    assert browse.marginal_browser({("m", "t"): FakeResult({"samples": [{"id": "x"}]})}, 0.99) is None


def test_tokenization_browser_marks_the_evaluated_tokens() -> None:
    tok = M.byte_tokenizer()
    pair = data.load_translation("validation")[0]
    sample = data.translation_samples(tok, 1)[0]
    evaluated = set(data.evaluation_targets(sample, 5))
    html = browse.tokenization_view(pair, {"bytes": sample}, {"bytes": tok}, {"bytes": evaluated})
    assert html.count("<b>") == 2 + 5  # Spanish, English, and the five evaluated tokens
    assert f"({len(sample.input_ids) - sample.target_start} target tokens)" in html
    picker = browse.tokenization_browser({"bytes": tok}, 3)
    assert picker.children[0].options == tuple(s.id for s in data.translation_samples(tok, 3))


def test_layer_browser() -> None:
    sent = {"id": "ours/x", "tokens": [" a", " b", " c"], "views": [{"target_index": 0, "layers": [
        {"layer": 2, "tokens": [" a", " b"], "probs": [0.5, 0.2], "entropy": 1.0, "rank_next": 0, "rank_2nd": 1}]}]}
    top = browse.layer_browser({"m": FakeResult({"n_layers": 2, "sentences": [sent]})})
    assert top.children[0].options == ("m",)
    sample_picker = top.children[1].children[0]
    assert sample_picker.children[0].options == ("paper's sentence (our Spanish)",)
