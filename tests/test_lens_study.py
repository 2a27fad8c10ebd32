"""mtp_lib.lens_study and lens_tables: the cache keys of the committed results, the study on a tiny
model, and the tables against plain loops on synthetic stored results.

Every test draws a fresh seed and prints it in its assertion messages: rerun with that seed to replay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mtp_lib import lens_tables as T
from mtp_lib import models as M
from mtp_lib.lens_study import VERSIONS, LensStudy, layer_subset
from mtp_lib.metrics import mean_with_ci
from mtp_lib.report import CONTRADICTED, SUPPORTED
from mtp_lib.results import config_key, repo_root
from seeds import fresh_seed


def _study_from_profile(profile: str, **extra: Any) -> tuple[LensStudy, list[str]]:
    params = yaml.safe_load((repo_root() / "chapters" / "profiles" / f"{profile}.yaml").read_text())
    nb = repo_root() / "chapters" / "02_layer_specialization.ipynb"
    import json

    defaults: dict[str, Any] = {}
    exec("".join(json.loads(nb.read_text())["cells"][1]["source"]), {}, defaults)  # the parameters cell
    p = {**defaults, **(params.get("parameters") or {}), **params["chapters"]["02_layer_specialization"], **extra}
    fields = {f.name for f in dataclasses.fields(LensStudy)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items() if k in fields}
    return LensStudy(**kwargs), p["models"]


def test_configs_are_the_committed_cache_keys() -> None:
    study, models = _study_from_profile("gpu", device="cpu")
    stored = {f.name for f in (repo_root() / "data" / "results" / "gpu").glob("ch02-*.json")}
    for model in models:
        for name, cfg in (("ch02-lens", study.lens_config(model)), ("ch02-sentences", study.sentences_config(model)),
                          ("ch02-probe", study.probe_config(model))):
            assert f"{name}-{config_key(cfg, VERSIONS[name])}.json" in stored, f"{name} {model}: key changed"


def test_layer_subset_ends_at_the_last_layer() -> None:
    assert layer_subset(10, 3) == [1, 4, 7, 10]
    assert layer_subset(5, 1) == [1, 2, 3, 4, 5]


def test_study_on_a_tiny_model() -> None:
    study, _ = _study_from_profile("tiny", device="cpu", dtype="float32")
    lm = M.load_model("tiny-llama", device="cpu", dtype="float32")
    lens = study.lens_result(lm)
    kl = np.asarray(lens["kl"])
    assert kl.shape == (lm.n_layers, study.n_samples) and (kl >= -1e-6).all()
    assert np.allclose(kl[-1], 0, atol=1e-4)  # the last layer is the output
    sents = study.sentence_result(lm)
    assert [s["id"] for s in sents["sentences"]][0] == "ours/paper-fig3-sentence"
    for s in sents["sentences"]:
        assert len(s["tokens"]) == len(s["entropy"]) == len(s["chars"])
        assert all(e["layer"] in layer_subset(lm.n_layers, study.widget_layer_stride) for v in s["views"]
                   for e in v["layers"])


@dataclasses.dataclass
class FakeResult:
    value: Any
    provenance: dict[str, Any] = dataclasses.field(default_factory=lambda: {"device": "a GPU"})


def _fake_lens(rng: np.random.Generator, n_layers: int, n_samples: int) -> FakeResult:
    kl = np.abs(rng.normal(size=(n_layers, n_samples))) * np.linspace(8, 0, n_layers)[:, None]
    return FakeResult({"n_layers": n_layers, "kl": kl.tolist(), "entropy": rng.random((n_layers, n_samples)).tolist(),
                       "hits_next": rng.random((n_layers, n_samples)).tolist(),
                       "hits_2nd": rng.random((n_layers, n_samples)).tolist(),
                       "rms_evaluated": (1 + rng.random(n_layers)).tolist(), "rms_max": (2 + rng.random(n_layers)).tolist(),
                       "rms_max_position": [0] * n_layers, "rms_max_token": ["a"] * n_layers, "info": {"params": 1e8}})


PAPER_KL = pd.DataFrame([{"series": "larger Pythia models", "depth": 0.5, "kl_low": 2.0, "kl_high": 4.0},
                         {"series": "larger Pythia models", "depth": 1.0, "kl_low": 0.5, "kl_high": 1.0},
                         {"series": "Pythia 31M", "depth": 1.0, "kl_low": 6.3, "kl_high": 6.3}])


def test_kl_table_and_summary() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n_layers, n_samples = int(rng.integers(3, 12)), int(rng.integers(2, 8))
    lens = {"m": _fake_lens(rng, n_layers, n_samples)}
    table = T.kl_table(lens)
    assert len(table) == (n_layers - 1) * n_samples, f"seed {seed}"
    summary, lines = T.kl_summary(lens, PAPER_KL)
    kl = np.asarray(lens["m"].value["kl"])
    assert np.isclose(summary.loc["m", "KL at layer L-1"], kl[n_layers - 2].mean()), f"seed {seed}"
    depths = np.arange(1, n_layers) / n_layers
    half = mean_with_ci([np.interp(0.5, depths, kl[: n_layers - 1, s]) for s in range(n_samples)])
    assert f"{half.mean:.1f} [{half.lo:.1f}, {half.hi:.1f}] nats at half depth" in lines[0], f"seed {seed}: {lines}"
    text = lines[0] + T.comparison_markdown(lens, pd.DataFrame({"model": ["m"], "entropy": [1.0]}), PAPER_KL,
                                            pd.DataFrame({"entropy_low": [5.0, 0.3], "entropy_high": [7.0, 2.5]}))
    for word in ("above the", "below the", "inside", "like the paper", SUPPORTED, CONTRADICTED):
        assert word not in text, f"seed {seed}: {text}"


def test_probe_lines_judge_an_earlier_layer_with_an_interval() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    lens = {"m": _fake_lens(rng, 6, 3)}

    def probes(acc: list[float], n: int) -> dict[str, FakeResult]:
        return {"m": FakeResult({"layers": [2, 4, 6], "offsets": {"2": {
            "probe_accuracy": acc, "lens_accuracy": [0.0, 0.0, 0.0], "n_test_positions": n}}})}

    far = T.probe_lines(lens, probes([0.2, 0.6, 0.3], 5000), top_k=5, probe_steps=1, probe_batch=1)[0]
    assert "layer 4" in far and SUPPORTED in far, f"seed {seed}: {far}"
    close = T.probe_lines(lens, probes([0.2, 0.31, 0.3], 100), top_k=5, probe_steps=1, probe_batch=1)[0]
    assert "not resolved" in close, f"seed {seed}: {close}"
    last = T.probe_lines(lens, probes([0.2, 0.3, 0.4], 100), top_k=5, probe_steps=1, probe_batch=1)[0]
    assert "most accurate at the last layer" in last, f"seed {seed}: {last}"
