"""The size suite: stream, schedule and data order, pretraining with exact resume, bad input, analyses."""

from __future__ import annotations

import io
import math
import random
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp_lib import data
from mtp_lib.marginal_study import task_samples
from mtp_lib.suite import analysis, pretrain, shapes
from mtp_lib.suite import sources as S
from mtp_lib.suite.run import SuiteSettings, train_size
from mtp_lib.suite.stream import StreamSpec, build_stream, held_out_overlap, load_stream

from seeds import fresh_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("stream")
    return build_stream(StreamSpec(("translation",), vocab_size=300, max_docs=300), folder / "s",
                        downloads=folder / "dl")


def test_stream_is_deterministic_and_holds_no_evaluation_text(stream, tmp_path: Path) -> None:
    again = build_stream(StreamSpec(("translation",), vocab_size=300, max_docs=300), tmp_path / "s",
                         downloads=tmp_path / "dl")
    assert again.fingerprint == stream.fingerprint
    assert np.array_equal(np.asarray(again.tokens), np.asarray(stream.tokens))
    texts = stream.dataset()["text"]
    assert len(texts) == 300 and stream.manifest["sources"]["translation"]["documents"] == 300
    validation = [data.translation_prompt(p)[1] for p in data.load_translation("validation")[:200]]
    assert not set(validation) & set(texts)
    eos = stream.tokenizer.eos_token_id
    assert int((np.asarray(stream.tokens) == eos).sum()) == 300  # one end-of-text per document
    assert stream.tokenizer.decode(stream.dataset()["input_ids"][0]) == texts[0]


def test_held_out_overlap_finds_copies_whatever_their_spacing() -> None:
    rng = random.Random(fresh_seed())
    words = [f"w{rng.randrange(10**6)}" for _ in range(40)]
    text = " ".join(words)
    copy = "Intro. " + ",  ".join(words).upper() + " outro"
    other = " ".join(f"v{rng.randrange(10**6)}" for _ in range(40))
    half = " ".join(words[:26])
    share = held_out_overlap([copy, other], {"a": text})["a"]
    assert share == 1.0
    assert held_out_overlap([other], {"a": text})["a"] == 0.0
    assert math.isclose(held_out_overlap([half], {"a": text})["a"], (26 - 11) / (40 - 11))


def test_brown_reader_drops_the_evaluation_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tgz = tmp_path / "brown.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, body in [("ca01", "The/at jury/nn said/vbd ./."), ("ca02", "It/pps rained/vbd ./.")]:
            blob = body.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setattr(S, "held_out_brown_files", lambda: {"ca01"})
    assert list(S.read_source("brown", {"brown": tgz}, tmp_path)) == ["It rained."]


def test_validation_rule_matches_the_committed_split() -> None:
    val = {p.id.split("/")[-1] for p in data.load_translation("validation")}
    train = [p.id.split("/")[-1] for p in data.load_translation("train")[:3000]]
    assert all(S.is_validation_chapter(ref) for ref in val)
    assert not any(S.is_validation_chapter(ref) for ref in train)


def test_learning_rate_and_data_order() -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    steps, n, b = rng.randrange(50, 400), rng.randrange(5, 40), rng.randrange(1, 9)
    spec = pretrain.TrainSpec("micro-32", steps, lr=1e-3)
    warm = max(1, round(0.01 * steps))
    lrs = [pretrain.learning_rate(spec, s) for s in range(steps)]
    assert math.isclose(lrs[warm - 1], 1e-3) and all(a <= 1e-3 + 1e-15 for a in lrs), f"seed {seed}"
    assert math.isclose(pretrain.learning_rate(spec, steps), 1e-4), f"seed {seed}"  # decays to 10%
    assert all(x >= y for x, y in zip(lrs[warm:], lrs[warm + 1:])), f"seed {seed}"
    order = np.concatenate([pretrain.batch_windows(s, b, n, 7) for s in range(3 * n)])
    for e in range(3 * b):  # every epoch visits every window once
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n)), f"seed {seed}"
    assert not np.array_equal(order[:n], order[n:2 * n]) or n < 3
    assert np.array_equal(pretrain.batch_windows(3, b, n, 7), order[3 * b:4 * b])
    assert pretrain.snapshot_steps(100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]


def _spec(**kw) -> pretrain.TrainSpec:
    return pretrain.TrainSpec(**({"size": "micro-32", "steps": 6, "batch_size": 4, "seq_len": 16, "compile": False,
                                  "log_every": 1, "checkpoint_every": 3} | kw))


def test_a_resumed_run_equals_an_uninterrupted_one(stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = len(stream.tokenizer)
    whole = pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(), tmp_path / "a", progress=False)
    calls = {"n": 0}
    original = pretrain._Run.train_step

    def dies_after_five(self):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(pretrain._Run, "train_step", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(), tmp_path / "b", progress=False)
    monkeypatch.setattr(pretrain._Run, "train_step", original)
    resumed = pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(), tmp_path / "b", progress=False)
    assert resumed["throughput"]["resumed_from_step"] == 4  # the checkpoint of step 4; step 5 is redone
    assert resumed["history"] == whole["history"]
    config = shapes.gpt_neox_config("micro-32", vocab)
    for step in (0, 4, 6):
        a = pretrain.load_snapshot(tmp_path / "a", step, config).state_dict()
        b = pretrain.load_snapshot(tmp_path / "b", step, config).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {step}"
    assert whole["history"][-1]["loss"] < whole["history"][0]["loss"]
    assert whole["train_tokens"] == 6 * 4 * 16 and whole["data_fingerprint"] == stream.fingerprint


def test_a_checkpoint_of_another_run_or_a_broken_one_is_refused(stream, tmp_path: Path) -> None:
    vocab = len(stream.tokenizer)
    pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(steps=3), tmp_path, progress=False)
    with pytest.raises(RuntimeError, match=r"belongs to another run.*recipe.size.*micro-64.*fresh=True"):
        pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(size="micro-64", steps=3), tmp_path,
                          progress=False)
    with pytest.raises(RuntimeError, match="data: checkpoint"):
        pretrain.pretrain(stream.tokens, "0" * 16, vocab, _spec(steps=3), tmp_path, progress=False)
    snapshots = sorted(tmp_path.glob("step-*.safetensors"))
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot be read.*corrupted"):
        pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(steps=3), tmp_path, progress=False)
    assert sorted(tmp_path.glob("step-*.safetensors")) == snapshots  # nothing trained is lost
    fresh = pretrain.pretrain(stream.tokens, stream.fingerprint, vocab, _spec(size="micro-64", steps=3), tmp_path,
                              fresh=True, progress=False)
    assert fresh["size"] == "micro-64"


def test_bad_sizes_and_settings_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown size '7b'.*14m"):
        pretrain.TrainSpec("7b", 10)
    with pytest.raises(ValueError, match="unknown suite settings"):
        SuiteSettings.from_profile("tiny", learning_rate=1)
    card = types.SimpleNamespace(total_memory=8 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    with pytest.raises(RuntimeError, match="needs about .* GiB, the device has 8 GiB: lower micro_batch"):
        pretrain._check_fits(_spec(size="410m", seq_len=2048), 50000, 64, torch.device("cuda"))
    pretrain._check_fits(_spec(size="14m"), 16384, 8, torch.device("cuda"))


def test_a_missing_gpu_result_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtp_lib.results import MissingResultError
    from mtp_lib.suite.run import load_suite

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    settings = SuiteSettings.from_profile("gpu")
    settings = SuiteSettings(**{**settings.__dict__, "sizes": ("160m", "410m")})  # 410m is never committed
    assert not settings.compute
    with pytest.raises(MissingResultError, match="python -m mtp_lib.suite train --profile gpu --size 410m"):
        train_size(settings, "410m")
    suite = load_suite(settings)  # the committed stream loads; a size without results is listed, not fatal
    assert "410m" not in suite.sizes and any("`410m`" in m for m in suite.missing)
    assert "--size 410m" in suite.note()


def test_model_shapes_follow_pythia() -> None:
    from transformers import GPTNeoXForCausalLM

    counts = {}
    for size in ("14m", "70m"):
        model = GPTNeoXForCausalLM(shapes.gpt_neox_config(size, 50304))
        counts[size] = shapes.param_counts(model)
    # Pythia's published sizes with its 50,304-token vocabulary: 14,067,712 and 70,426,624 parameters
    assert counts["14m"]["params"] == 14_067_712 and counts["70m"]["params"] == 70_426_624
    assert counts["14m"]["non_embedding_params"] == 1_189_888


def test_marginal_hits_against_brute_force(stream) -> None:
    """top_p = 1: the 2nd-token marginal is an exact sum over the vocabulary, computed here by one
    forward pass per intermediate token y, in float64."""
    from transformers import GPTNeoXForCausalLM

    seed = fresh_seed()
    torch.manual_seed(seed)
    vocab = len(stream.tokenizer)
    model = GPTNeoXForCausalLM(shapes.gpt_neox_config("micro-32", vocab)).double().eval()
    sample = task_samples(stream.tokenizer, "translation", 1)[0]
    got = analysis.marginal_hits(model, [sample], last=3, k=5, top_p=1.0, nucleus_top_p=())[0]
    ids = torch.tensor(sample.input_ids)
    want1, want2 = [], []
    with torch.no_grad():
        for j in data.evaluation_targets(sample, 3):
            p_next = model(ids[None, :j]).logits[0, -1].softmax(-1)
            want1.append(int((p_next > p_next[ids[j]]).sum() < 5))
            p_y = model(ids[None, :j - 1]).logits[0, -1].softmax(-1)
            ctx = ids[:j - 1].repeat(vocab, 1)
            after = model(torch.cat([ctx, torch.arange(vocab)[:, None]], 1)).logits[:, -1].softmax(-1)
            marginal = (p_y[:, None] * after).sum(0)
            want2.append(int((marginal > marginal[ids[j]]).sum() < 5))
    assert got["next"] == want1 and got["second"] == want2, f"seed {seed}"
    assert got["nucleus"]["1"] == [vocab] * 3


_DDP_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from mtp_lib.suite import pretrain
from mtp_lib.suite.stream import load_stream
stream = load_stream(Path(sys.argv[1]))
spec = pretrain.TrainSpec("micro-64", 4, batch_size=8, seq_len=16, compile=False, log_every=1)
rec = pretrain.pretrain(stream.tokens, stream.fingerprint, len(stream.tokenizer), spec, Path(sys.argv[2]),
                        progress=False)
print("processes", rec["throughput"]["processes"])
"""


def test_two_processes_train_what_one_does(stream, tmp_path: Path) -> None:
    """Data parallel (torchrun, gloo on the CPU, as ``accelerate launch`` starts it on GPUs): each
    process takes half of every global batch; the weights equal one process's up to summation order."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    runs = {}
    for n in (1, 2):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                    if n > 1 else [sys.executable])
        out = subprocess.run([*launcher, str(script), str(stream.folder), str(tmp_path / str(n))],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"processes {n}" in out.stdout
        runs[n] = load_file(str(tmp_path / str(n) / "step-000004.safetensors"))
    for name, value in runs[1].items():
        diff = (value.double() - runs[2][name].double()).abs().max().item()
        assert diff <= 3e-5, f"{name} differs by {diff}"  # 1% of one AdamW step at lr 3e-3


@pytest.mark.parametrize("profile", ["tiny", "cpu", "gpu"])
def test_the_chapter_and_the_command_line_agree_on_the_settings(profile: str) -> None:
    """Chapter 5 (its parameters cell's defaults, with the profile's values) and ``python -m
    mtp_lib.suite`` (SuiteSettings.from_profile) must name the same cached results."""
    import ast
    import dataclasses

    import papermill

    from mtp_lib.profiles import chapter_parameters, load_profile

    notebook = Path(__file__).resolve().parents[1] / "chapters" / "05_size_suite.ipynb"
    declared = papermill.inspect_notebook(str(notebook))
    values = {name: ast.literal_eval(p["default"]) for name, p in declared.items()}
    values.update(chapter_parameters(load_profile(profile), "05_size_suite", notebook))
    fields = {f.name for f in dataclasses.fields(SuiteSettings)}
    chapter = SuiteSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})
    assert chapter == SuiteSettings.from_profile(profile)
    assert set(values) - fields <= {"device"}  # every other parameter is a setting


def _fake_results(rng: random.Random, sizes: dict[str, int], n: int, acc: dict[str, float]):
    """Training and analysis records of the shape the suite stores, hits drawn at rates ``acc``."""
    trains, analyses = {}, {}
    for size, params in sizes.items():
        trains[size] = types.SimpleNamespace(value={
            "non_embedding_params": params, "params": 2 * params, "train_tokens": 1000, "recipe": {"steps": 10},
            "history": [{"step": 10, "tokens": 1000, "loss": 3.0}]})
        final = {}
        for task in ("translation", "open-ended"):
            final[task] = [{"id": f"s{i}", "next": [int(rng.random() < acc[size] + 0.2) for _ in range(4)],
                            "second": [int(rng.random() < acc[size]) for _ in range(4)],
                            "nucleus": {"0.99": [1000 / (1 + acc[size])] * 4, "0.9": [10.0] * 4}} for i in range(n)]
        lens = [[4.0 - acc[size], 2.0, 0.0] for _ in range(n)]
        analyses[size] = types.SimpleNamespace(value={"final": final, "lens": {"translation": lens, "open-ended": lens},
                                                      "along": {"0": {t: final[t][:2] for t in final}}})
    return trains, analyses


def test_size_claims_judge_paired_trends() -> None:
    from mtp_lib.suite import tables as T

    seed = fresh_seed()
    rng = random.Random(seed)
    sizes = {"14m": 10**6, "31m": 4 * 10**6, "70m": 16 * 10**6}
    trains, analyses = _fake_results(rng, sizes, 40, {"14m": 0.1, "31m": 0.4, "70m": 0.7})
    claims = T.size_claims(trains, analyses, n_boot=300).set_index(["claim", "task"])["verdict"]
    assert set(claims) == {"supported"}, f"seed {seed}: {claims}"
    trains, analyses = _fake_results(rng, sizes, 40, {"14m": 0.7, "31m": 0.4, "70m": 0.1})
    claims = T.size_claims(trains, analyses, n_boot=300)
    assert claims[claims["claim"].str.startswith("2nd-token")]["verdict"].eq("contradicted").all(), f"seed {seed}"
    acc = T.accuracy_frame(trains, analyses)
    assert len(acc) == 3 * 2 * 2 and acc["accuracy_lo"].le(acc["accuracy"]).all()
    assert set(T.along_frame(trains, analyses)["step"]) == {0, 10}


def test_paired_trend_against_polyfit() -> None:
    from mtp_lib.suite.tables import paired_trend

    seed = fresh_seed()
    gen = np.random.default_rng(seed)
    values = {s: gen.random(12) for s in "abcd"}
    x = [1.0, 2.0, 3.5, 4.0]
    got = paired_trend(lambda s, i: float(values[s][i].mean()), list("abcd"), x, 12, n_boot=200, seed=3)
    want = np.polyfit(x, [values[s].mean() for s in "abcd"], 1)[0]
    assert math.isclose(got.mean, want, rel_tol=1e-9, abs_tol=1e-12), f"seed {seed}"
    rng = np.random.default_rng(3)
    draws = [np.polyfit(x, [values[s][idx].mean() for s in "abcd"], 1)[0]
             for idx in (rng.integers(0, 12, 12) for _ in range(200))]
    assert np.allclose([got.lo, got.hi], np.percentile(draws, [2.5, 97.5])), f"seed {seed}"


def test_a_tokenizer_of_another_stream_is_refused(stream, tmp_path: Path) -> None:
    import shutil

    other = build_stream(StreamSpec(("translation",), vocab_size=280, max_docs=50), tmp_path / "o",
                         downloads=tmp_path / "dl")
    mixed = tmp_path / "mixed"
    shutil.copytree(stream.folder, mixed)
    shutil.rmtree(mixed / "tokenizer")
    shutil.copytree(other.folder / "tokenizer", mixed / "tokenizer")
    with pytest.raises(ValueError, match="do not match its manifest.*rebuild the stream"):
        load_stream(mixed)
    assert load_stream(stream.folder).fingerprint == stream.fingerprint
    with pytest.raises(FileNotFoundError, match="no stream in .*python -m mtp_lib.suite stream"):
        load_stream(tmp_path / "nothing")


def test_stream_windows_spread_over_the_stream() -> None:
    from mtp_lib.suite.tuned import stream_windows

    tokens = np.arange(1000)
    wins = stream_windows(tokens, 4, 100)
    assert [int(w[0]) for w in wins] == [0, 300, 600, 900] and all(len(w) == 100 for w in wins)
    assert len(stream_windows(tokens, 50, 400)) == 2  # at most as many as fit without overlapping
    with pytest.raises(ValueError, match="fewer than one window"):
        stream_windows(tokens[:10], 1, 20)


def test_tuned_lens_of_a_size_beside_the_analysis_logit_lens(stream) -> None:
    """Both lenses are scored on the analysis' positions: the stored logit-lens KL equals
    :func:`analysis.lens_kl`'s, and training lowers the tuned lens's objective at every layer."""
    from transformers import GPTNeoXForCausalLM

    from mtp_lib.suite.tuned import tuned_lens_result

    seed = fresh_seed()
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(shapes.gpt_neox_config("micro-128", len(stream.tokenizer))).eval()
    samples = task_samples(stream.tokenizer, "translation", 3)
    got = tuned_lens_result(model, stream.tokens, samples, windows=3, length=48, last=4, steps=30, batch=64, lr=1e-2,
                            seed=seed)
    want = analysis.lens_kl(model, samples, last=4)
    assert np.allclose(np.asarray(got["logit"]["kl"]).T, want, atol=2e-5), f"seed {seed}"
    assert got["tuned_layers"] == [1, 2] and got["n_test_positions"] == 3 * 4
    assert all(last < first for first, last in zip(got["train_loss_first"], got["train_loss_last"])), f"seed {seed}"
    from mtp_lib.suite.tables import lens_agreement

    same = lens_agreement({"m": types.SimpleNamespace(value={"lens": {"translation": want}})},
                          {"m": types.SimpleNamespace(value=got)})
    assert abs(float(same["difference"].iloc[0])) < 1e-4


def test_size_claims_judge_the_tuned_lens_too() -> None:
    from mtp_lib.suite import tables as T

    seed = fresh_seed()
    rng = random.Random(seed)
    sizes = {"14m": 10**6, "31m": 4 * 10**6, "70m": 16 * 10**6}
    trains, analyses = _fake_results(rng, sizes, 30, {"14m": 0.1, "31m": 0.4, "70m": 0.7})
    n_layers = 4
    tuned = {}
    for i, size in enumerate(sizes):  # KL at half depth falls with size, with noise per sample
        kl = [[3.0 - i + rng.random() for _ in range(30)] for _ in range(n_layers)]
        tuned[size] = types.SimpleNamespace(value={"n_layers": n_layers, "tuned_layers": [1, 2, 3],
                                                   "logit": {"kl": kl}, "tuned": {"kl": kl[:3]}})
    claims = T.size_claims(trains, analyses, tuned, n_boot=300).set_index(["claim", "task"])["verdict"]
    row = claims.loc[("layers specialize earlier in larger models (tuned lens: KL at half depth falls)", "translation")]
    assert row == "supported", f"seed {seed}"
    half = T.tuned_kl_at_depth(tuned["14m"].value)  # layer 2 of 4 sits at depth 0.5
    assert np.allclose(half, tuned["14m"].value["tuned"]["kl"][1])
    assert len(T.size_claims(trains, analyses, {"14m": tuned["14m"]}, n_boot=50)) == 5  # not every size: no row


def test_a_killed_analysis_resumes_from_its_snapshots_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each snapshot's analysis is kept beside the weights: a rerun reuses them (here: nothing is
    recomputed), unless the weights they were computed from changed."""
    import os

    from mtp_lib.suite import run

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MTP_SUITE_DIR", str(tmp_path / "suite"))
    settings = SuiteSettings.from_profile("tiny", sizes=("micro-32",), tuned_lens=False)
    first = run.analyze_size(settings, "micro-32", device="cpu")
    assert not first.loaded and first.value["along"]
    first.path.unlink()  # the stored result is gone, as if the analysis had been killed before writing it

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(analysis, "marginal_hits", fail)
    again = run.analyze_size(settings, "micro-32", device="cpu")
    assert again.value == first.value
    again.path.unlink()
    folder = run.run_folder(settings, "micro-32", again.config["data_fingerprint"])
    final = pretrain.snapshot_path(folder, settings.steps)
    os.utime(final, ns=(final.stat().st_atime_ns, final.stat().st_mtime_ns + 1))  # new weights, same name
    with pytest.raises(AssertionError, match="recomputed"):
        run.analyze_size(settings, "micro-32", device="cpu")


def test_missing_weights_name_the_retrain_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights are not committed: a lens of a size whose training is stored but whose weights are gone
    says how to bring them back, and ``retrain`` does (the same recipe, data and seed: the same loss)."""
    import shutil

    from mtp_lib.suite import run

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MTP_SUITE_DIR", str(tmp_path / "suite"))
    settings = SuiteSettings.from_profile("tiny", sizes=("micro-32",))
    first = run.train_size(settings, "micro-32")
    shutil.rmtree(run.run_folder(settings, "micro-32", first.value["data_fingerprint"]))
    with pytest.raises(FileNotFoundError, match="--size micro-32 --retrain"):
        run.tuned_size(settings, "micro-32", device="cpu")
    assert run.train_size(settings, "micro-32", retrain=False).loaded  # the stored record alone
    again = run.train_size(settings, "micro-32", retrain=True)
    assert not again.loaded and again.value["history"] == first.value["history"]
    assert run.train_size(settings, "micro-32", retrain=True).loaded  # weights here: nothing to redo
    assert run.tuned_size(settings, "micro-32", device="cpu").value["tuned_layers"]


def test_the_suite_loads_each_stored_result_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chapter 5's cell notes count loads: the stream and each training are read once, not again by
    every analysis and lens that depends on them."""
    from collections import Counter

    from mtp_lib import results
    from mtp_lib.suite.run import load_suite

    loads: Counter[str] = Counter()
    monkeypatch.setattr(results, "announce", lambda name, provenance: loads.update([name]))
    suite = load_suite(SuiteSettings.from_profile("cpu", compute=False))
    assert suite.sizes and not suite.missing  # the committed micro-suite
    assert loads["ch05-stream"] == 1 and set(loads.values()) == {1}, loads
    assert all(loads[f"ch05-{what}-{s}"] == 1 for s in suite.sizes for what in ("train", "analysis", "tuned"))


def test_analysis_shards_in_parallel_processes_gather_into_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``analyze --shard i/n`` computes only its share of the snapshots' parts and stores no result;
    the plain ``analyze`` then gathers the parts (computing nothing) into what one process computes."""
    from mtp_lib.suite import run
    from mtp_lib.suite.__main__ import main

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MTP_SUITE_DIR", str(tmp_path / "suite"))
    settings = SuiteSettings.from_profile("tiny", sizes=("micro-32",), tuned_lens=False)
    whole = run.analyze_size(settings, "micro-32", device="cpu")
    whole.path.unlink()
    folder = run.run_folder(settings, "micro-32", whole.config["data_fingerprint"])
    parts = next(folder.glob("analysis-*"))
    for f in parts.glob("*.json"):
        f.unlink()
    run.analyze_shard(settings, "micro-32", (1, 3), device="cpu")  # its share of the parts, no result
    names = sorted(f.name for f in parts.glob("*.json"))
    assert names and len(names) < 1 + len(whole.value["along"]) and not whole.path.exists()
    main(["analyze", "--profile", "tiny", "--size", "micro-32", "--set", "tuned_lens=false", "--shard", "0/3",
          "--device", "cpu"])
    run.analyze_shard(settings, "micro-32", (2, 3), device="cpu")
    assert len(list(parts.glob("*.json"))) == 2 + len(whole.value["along"])  # the final part per task
    monkeypatch.setattr(analysis, "marginal_hits", lambda *a, **k: pytest.fail("recomputed"))
    assert run.analyze_size(settings, "micro-32", device="cpu").value == whole.value
    with pytest.raises(ValueError, match="0 <= i < n"):
        run.analyze_shard(settings, "micro-32", (3, 3))
    with pytest.raises(SystemExit, match="--shard takes I/N"):
        main(["analyze", "--profile", "tiny", "--size", "micro-32", "--shard", "3"])
    with pytest.raises(SystemExit):
        main(["train", "--profile", "tiny", "--size", "micro-32", "--shard", "0/2"])


def test_analysis_parts_are_dealt_costliest_first_to_the_least_loaded_shard() -> None:
    from mtp_lib.suite.run import _deal

    costs = [150.0, 150.0] + [20.0] * 11  # the gpu profile's: two final parts, eleven snapshots
    owner = _deal(costs, 4)
    loads = [sum(c for c, o in zip(costs, owner) if o == i) for i in range(4)]
    assert owner[:2] == [0, 1] and loads == [150, 150, 120, 100]  # the snapshots fill shards 2 and 3 in turn
    assert _deal(costs, 1) == [0] * len(costs)


def test_an_analysis_loads_each_snapshot_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final weights serve both tasks' parts: one load per snapshot."""
    from collections import Counter

    from mtp_lib.suite import run

    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MTP_SUITE_DIR", str(tmp_path / "suite"))
    settings = SuiteSettings.from_profile("tiny", sizes=("micro-32",), tuned_lens=False)
    run.train_size(settings, "micro-32")
    loads: Counter[int] = Counter()
    real = pretrain.load_snapshot
    monkeypatch.setattr(pretrain, "load_snapshot", lambda folder, step, config: loads.update([step]) or real(
        folder, step, config))
    run.analyze_size(settings, "micro-32", device="cpu")
    assert loads[settings.steps] == 1 and set(loads.values()) == {1}, loads


def test_throughput_table_reads_the_pretrain_benchmarks_and_marks_the_goal(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from mtp_lib.suite import tables as T

    rng = random.Random(fresh_seed())
    mfus = [rng.uniform(0.2, 0.6) for _ in range(3)] + [None]
    rows = [{"size": "160m", "micro_batch": m, "compile": True, "tokens_per_s": rng.uniform(1e5, 6e5), "mfu": f,
             "timed_steps": 25} for m, f in zip((64, 16, 8, 4), mfus)]
    folder = tmp_path / "bench-test"  # a profile with no committed folder: only these files are read
    folder.mkdir()
    (folder / "benchmark-pretrain-160m.json").write_text(json.dumps({"rows": rows, "provenance": {"device": "NVIDIA H100"}}))
    (folder / "benchmark-speculative-x.json").write_text("{}")  # another benchmark: not read
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path))
    table = T.throughput_table(T.throughput_benchmarks("bench-test"))
    goal = f"MFU >= {T.MFU_GOAL:.2f}"
    assert list(table["micro batch"]) == [64, 16, 8, 4] and set(table["device"]) == {"NVIDIA H100"}
    assert list(table[goal]) == [None if f is None else f >= T.MFU_GOAL for f in mfus]


def test_kernel_shares_sum_the_profiled_kernels_by_family_and_the_note_states_the_gap() -> None:
    from mtp_lib.suite import tables as T

    rng = random.Random(fresh_seed())
    names = {"attention": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_k{}", "matmul": "nvjet_sm90_tst_{}_NNN",
             "fused (Triton)": "triton_poi_fused_gelu_{}", "other": "void at::native::elementwise_kernel<{}>(int, float)"}
    kernels = [(family, rng.uniform(0.5, 50.0), i) for i in range(rng.randint(4, 20)) for family in [rng.choice(list(names))]]
    span = sum(ms for _, ms, _ in kernels) / rng.uniform(0.5, 0.99)  # the kernels busy part of the span
    lines = [f"5 steps: kernels busy 97.0% of {span:.1f} ms ({span / 5:.1f} ms per step)",
             f"kernels by device time (top 20): {'ms':>8} {'calls':>6} {'us/call':>8}  name"]
    lines += [f"{'':<30} {ms:>8.2f} {60:>6} {ms * 1e3 / 60:>8.1f}  {names[f].format(i)}" for f, ms, i in kernels]
    k = T.kernel_shares(lines)
    expect = {f: sum(round(ms, 2) for g, ms, _ in kernels if g == f) / round(span, 1) for f in names if f != "other"}
    for family, share in expect.items():
        assert k["shares"][family] == pytest.approx(share, abs=1e-9)
    assert sum(k["shares"].values()) == pytest.approx(1.0) and k["steps"] == 5
    with pytest.raises(ValueError, match="kernel lines"):
        T.kernel_shares(["kernels by device time"])

    mfu = rng.uniform(0.2, 0.39)
    bench = {"settings": {"seq_len": 1024}, "provenance": {"device": "NVIDIA H100"}, "kernels": lines,
             "rows": [{"size": "160m", "micro_batch": 64, "tokens_per_s": 4e5, "mfu": mfu, "flops_per_token": 7e8}]}
    note = T.throughput_note([bench])
    assert f"{T.MFU_GOAL - mfu:.3f} short of the goal" in note and "attention is 16% of the model FLOPs" in note
