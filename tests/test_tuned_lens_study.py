"""mtp_lib.tuned_lens_study and tuned_lens_tables, and Chapter 2's probe floor (lens_tables, whs_report):
the command on the tiny profile, a profile without the result, and the tables against plain loops on
synthetic stored results.

Every test draws a fresh seed and prints it in its assertion messages: rerun with that seed to replay.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtp_lib import lens_tables, tuned_lens_study, whs_report
from mtp_lib import tuned_lens_tables as TL
from mtp_lib.report import CONTRADICTED, NOT_RESOLVED, SUPPORTED
from seeds import fresh_seed


@pytest.mark.usefixtures("one_thread")
def test_command_computes_then_loads_on_the_tiny_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("MTP_NO_COMPUTE", raising=False)
    assert tuned_lens_study.main(["--profile", "tiny", "--model", "tiny-llama"]) == 0
    assert "tiny-llama: computed" in capsys.readouterr().out
    files = list((tmp_path / "tiny").glob("ch02-tuned-lens-*.json"))
    assert len(files) == 1
    value = json.loads(files[0].read_text())["result"]
    study, _ = tuned_lens_study.TunedLensStudy.from_profile("tiny")
    n_layers = value["n_layers"]
    assert value["tuned_layers"] == [x for x in range(n_layers, 0, -study.layer_stride) if x < n_layers][::-1]
    for lens, rows in (("logit", n_layers), ("tuned", len(value["tuned_layers"]))):
        for metric in ("kl", "kl_from_output", "nll", "hit", "entropy"):
            assert np.asarray(value[lens][metric]).shape == (rows, study.n_samples), (lens, metric)
    assert np.allclose(np.asarray(value["logit"]["kl"])[-1], 0, atol=1e-4)  # the last layer is the output
    assert (np.asarray(value["tuned"]["kl_from_output"]) >= -1e-6).all()
    assert tuned_lens_study.main(["--profile", "tiny", "--model", "tiny-llama"]) == 0
    assert "tiny-llama: loaded" in capsys.readouterr().out


def test_a_profile_without_the_result_renders_a_note_with_the_command(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("MTP_NO_COMPUTE", "No GPU here.")
    study = tuned_lens_study.TunedLensStudy(n_samples=2, device="cpu", dtype="float32")
    runs = study.run(["not-a-model"], profile="gpu")
    assert not runs.results and "No GPU here." in runs.missing["not-a-model"]
    command = tuned_lens_study.COMMAND.format(profile="gpu")
    note = TL.missing_note(runs.missing, command)
    assert "`not-a-model`" in note and command in note and "--profile gpu" in note
    assert "only the logit lens of `not-a-model` and draw no calibrated verdict for it" in note
    assert TL.missing_note({}, command) == ""


@dataclasses.dataclass
class FakeResult:
    value: Any
    config: dict[str, Any] = dataclasses.field(default_factory=lambda: {"top_k": 5})


def _fake(rng: np.random.Generator, n_layers: int, n_samples: int, tuned_layers: list[int],
          tuned_kl: float | None = None) -> FakeResult:
    def lens(rows: int, scale: float) -> dict[str, Any]:
        return {m: (scale * rng.random((rows, n_samples))).tolist() for m in ("kl", "kl_from_output", "nll", "entropy")} | {
            "hit": rng.random((rows, n_samples)).tolist()}

    logit, tuned = lens(n_layers, 20.0), lens(len(tuned_layers), 5.0)
    if tuned_kl is not None:
        tuned["kl_from_output"] = (tuned_kl + 0.05 * rng.standard_normal((len(tuned_layers), n_samples))).tolist()
    return FakeResult({"n_layers": n_layers, "tuned_layers": tuned_layers, "vocab": 1000, "logit": logit,
                       "tuned": tuned})


def test_tables_against_plain_loops() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n_layers, n_samples = int(rng.integers(4, 12)), int(rng.integers(2, 8))
    tuned_layers = sorted(rng.choice(np.arange(1, n_layers), size=2, replace=False).tolist())
    runs = {"m": _fake(rng, n_layers, n_samples, tuned_layers)}
    v = runs["m"].value
    frame = TL.lens_frame(runs)
    msg = f"seed {seed}"
    assert len(frame) == (n_layers - 1 + len(tuned_layers)) * n_samples, msg
    tuned_rows = frame[frame["lens"] == "tuned lens"]
    assert sorted(set(tuned_rows["layer"])) == tuned_layers, msg
    table = TL.calibration_table(runs)
    for i, layer in enumerate(tuned_layers):
        assert math.isclose(table.loc[("m", layer), "NLL, tuned lens"], np.mean(v["tuned"]["nll"][i])), msg
        assert math.isclose(table.loc[("m", layer), "NLL, logit lens"], np.mean(v["logit"]["nll"][layer - 1])), msg
    # at layer L the tuned lens is the output, which is the logit lens's last row
    assert math.isclose(table.loc[("m", n_layers), "NLL, tuned lens"], np.mean(v["logit"]["nll"][-1])), msg
    above = sum(np.mean(v["logit"]["nll"][layer - 1]) > math.log(1000) for layer in range(1, n_layers))
    assert f"above the uniform guess at {above} of {n_layers - 1} layers" in TL.calibration_lines(runs)[0], msg


def test_specialization_verdict_uses_the_tuned_lens() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    layers = [3, 6, 9]
    for level, label in ((0.5, SUPPORTED), (6.0, CONTRADICTED)):
        line = TL.specialization_lines({"m": _fake(rng, 12, 8, layers, tuned_kl=level)})[0]
        assert "layer 6 of 12" in line and f"**{label}**" in line, f"seed {seed}: {line}"
    few = TL.specialization_lines({"m": _fake(rng, 12, 3, layers, tuned_kl=0.5)})[0]
    assert f"**{NOT_RESOLVED}**" in few, f"seed {seed}: {few}"
    assert TL.specialization_layer({"n_layers": 10, "tuned_layers": [4, 6]}) == 4  # a tie goes to the earlier layer
    assert TL.specialization_layer({"n_layers": 18, "tuned_layers": [6, 12]}) == 6  # a tie up to rounding, too


def _probe(acc: list[float], n: int, layers: list[int], n_layers: int) -> dict[str, Any]:
    return {"n_layers": n_layers, "layers": layers, "n_train_positions": 10, "offsets": {"2": {
        "probe_accuracy": acc, "lens_accuracy": [0.1] * len(acc), "n_test_positions": n}}}


def test_second_token_floor() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 5000))
    acc = (0.9 * rng.random(4)).round(3).tolist()  # below 1: at 1 the normal approximation has no width
    acc[2] = acc[3] = max(acc) + 0.01  # a tie: the later layer wins
    floor = lens_tables.second_token_floor(_probe(acc, n, [3, 6, 9, 12], 12))
    assert floor is not None and floor["layer"] == 12 and floor["accuracy"] == acc[3], f"seed {seed}"
    half = 1.96 * math.sqrt(acc[3] * (1 - acc[3]) / n)
    assert math.isclose(floor["lo"], max(0, acc[3] - half)) and math.isclose(floor["hi"], min(1, acc[3] + half))
    assert floor["backbone_accuracy"] is None  # layer 11 was not probed
    assert lens_tables.second_token_floor({"offsets": {"1": {}}, "layers": [1], "n_layers": 2}) is None
    line = lens_tables.floor_lines({"m": FakeResult(_probe(acc, n, [3, 6, 9, 12], 12))}, top_k=5)[0]
    assert "layer 12 of 12" in line and "the last layer" in line, f"seed {seed}: {line}"


def test_probe_floor_row_for_table_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    (tmp_path / "p").mkdir()
    record = {"config": {"model": "m", "dtype": "float32", "test": {"n": 7}}, "provenance": {"date": "x"},
              "result": _probe([0.2, 0.5, 0.4], 140, [2, 3, 4], 4)}
    (tmp_path / "p" / "ch02-probe-0.json").write_text(json.dumps(record))
    row, text = whs_report.probe_floor(["m", "other"], "p", "float32")
    assert row.loc[whs_report.FLOOR_ROW, "m (ours)"] == "- / 0.500 (layer 3)"
    assert "layer 3 of 4" in text and "first 7 validation samples" in text and "**other**: no probe floor" in text
    assert "at layer 3, the heads' input" not in text  # the best layer is L-1 itself: said once


def test_probe_calibration_lines_from_the_next_token_probes() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    lens_nll = (rng.random(4) * 20).round(3).tolist()
    probe_nll = (rng.random(4) * 5).round(3).tolist()
    lens = {"m": FakeResult({"info": {"vocab": 1000}})}
    probes = {"m": FakeResult({"n_layers": 4, "layers": [1, 2, 3, 4], "offsets": {"1": {
        "lens_nll": lens_nll, "probe_nll": probe_nll, "n_test_positions": 50}}})}
    line = TL.probe_calibration_lines(lens, probes)[0]
    worst = int(np.argmax(lens_nll[:3]))
    above = sum(x > math.log(1000) for x in lens_nll[:3])
    assert f"at {above} of the 3 probed layers below the last, worst at layer {worst + 1}" in line, f"seed {seed}: {line}"
    assert f"gets {probe_nll[worst]:.1f} nats" in line, f"seed {seed}: {line}"
    probes["m"].value["offsets"] = {"2": {}}
    assert TL.probe_calibration_lines(lens, probes) == []
