"""mtp_lib.results: run-or-load cache keyed by configuration, with provenance."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mtp_lib import results as R


@pytest.fixture(autouse=True)
def _results_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))


def test_computes_once_then_loads_with_provenance() -> None:
    calls = []
    value = random.SystemRandom().random()

    def compute():
        calls.append(1)
        return {"acc": torch.tensor([value, 0.5]), "n": 3}

    first = R.cached("demo", {"model": "m", "top_p": 0.99}, compute, profile="unit")
    second = R.cached("demo", {"top_p": 0.99, "model": "m"}, compute, profile="unit")
    assert len(calls) == 1 and not first.loaded and second.loaded
    assert first.value == second.value == {"acc": [pytest.approx(value), 0.5], "n": 3}
    assert first.path == second.path and first.path.parent.name == "unit"
    prov = second.provenance
    assert {"git_commit", "git_dirty", "versions", "device", "date", "wall_time_s"} <= set(prov)
    assert "torch" in prov["versions"] and prov["wall_time_s"] >= 0
    stored = json.loads(first.path.read_text())
    assert stored["config"] == {"model": "m", "top_p": 0.99} and stored["version"] == 1


def test_config_version_and_recompute_change_what_runs() -> None:
    counter = iter(range(100))
    f = lambda: {"i": next(counter)}  # noqa: E731
    a = R.cached("x", {"k": 1}, f, profile="unit")
    b = R.cached("x", {"k": 2}, f, profile="unit")
    c = R.cached("x", {"k": 1}, f, profile="unit", version=2)
    d = R.cached("x", {"k": 1}, f, profile="unit", recompute=True)
    e = R.cached("x", {"k": 1}, f, profile="unit")
    assert [r.value["i"] for r in (a, b, c, d, e)] == [0, 1, 2, 3, 3]
    assert len({a.path, b.path, c.path}) == 3 and d.path == a.path and e.loaded
    assert R.cached("x", {"k": 1}, f, profile="other").value["i"] == 4  # profiles are separate


def test_tampered_file_is_refused() -> None:
    res = R.cached("t", {"k": 1}, lambda: 1, profile="unit")
    stored = json.loads(res.path.read_text())
    stored["config"] = {"k": 2}
    res.path.write_text(json.dumps(stored))
    with pytest.raises(RuntimeError, match="does not hold the configuration"):
        R.cached("t", {"k": 1}, lambda: 1, profile="unit")


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="profile"):
        R.cached("n", {}, lambda: 1, profile="../up")
    with pytest.raises(ValueError, match="name"):
        R.cached("Bad Name", {}, lambda: 1, profile="unit")
    with pytest.raises(ValueError, match="mapping"):
        R.cached("n", [1, 2], lambda: 1, profile="unit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot store a object"):
        R.cached("n", {}, lambda: object(), profile="unit")


def test_jsonable_forms() -> None:
    assert R.to_jsonable({"a": (1, 2.5), "b": torch.arange(3), "c": float("nan")}) == {
        "a": [1, 2.5], "b": [0, 1, 2], "c": "nan"}
    assert R.config_key({"a": 1, "b": 2}, 1) == R.config_key({"b": 2, "a": 1}, 1) != R.config_key({"a": 1, "b": 2}, 2)
