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


# ---------------------------------------------------------------- provenance: commit and source digest

import hashlib  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import nbformat as nbf  # noqa: E402

from mtp_lib import sources as S  # noqa: E402
from seeds import fresh_seed  # noqa: E402


def _checkout(root: Path, rng: random.Random) -> dict[str, str]:
    """A fake checkout: two library files, a chapter notebook (with an output), a pyproject."""
    texts = {"mtp_lib/a.py": f"A = {rng.random()}\n", "mtp_lib/sub/b.py": f"B = {rng.random()}\n"}
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "pyproject.toml").write_text("")
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell("# t"), nbf.v4.new_code_cell(f"x = {rng.random()}"),
                nbf.v4.new_code_cell("print(x)")]
    nb.cells[2].outputs = [nbf.v4.new_output("stream", text="1")]
    (root / "chapters").mkdir()
    nbf.write(nb, root / "chapters/c.ipynb")
    return texts


def test_source_record_digests_every_file_and_tells_stale_from_current(tmp_path: Path) -> None:
    seed = fresh_seed()
    rng = random.Random(seed)
    texts = _checkout(tmp_path, rng)
    rec = S.source_record("chapters/c.ipynb", root=tmp_path)
    assert set(rec["files"]) == {*texts, "chapters/c.ipynb"} and rec["entry"] == ["chapters/c.ipynb"], seed
    for rel, text in texts.items():
        assert rec["files"][rel] == hashlib.sha256(text.encode()).hexdigest()[:16], seed
    nb = nbf.read(tmp_path / "chapters/c.ipynb", as_version=4)
    code = "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert rec["files"]["chapters/c.ipynb"] == hashlib.sha256(code.encode()).hexdigest()[:16], seed
    prov = {"git_commit": None, "source": rec}
    assert S.source_status(prov, root=tmp_path).state == "current"
    nb.cells[2].outputs = [nbf.v4.new_output("stream", text=str(rng.random()))]  # executing is not a change
    nbf.write(nb, tmp_path / "chapters/c.ipynb")
    assert S.source_status(prov, root=tmp_path).current
    nb.cells[1].source += "  # edited"
    nbf.write(nb, tmp_path / "chapters/c.ipynb")
    (tmp_path / "mtp_lib/new.py").write_text("N = 1\n")
    status = S.source_status(prov, root=tmp_path)
    assert status.state == "stale" and status.changed == ("chapters/c.ipynb", "mtp_lib/new.py"), seed
    assert S.source_status({"git_commit": "abc"}, root=tmp_path) == S.SourceStatus("not recorded", (), "abc")
    outside = S.source_record(tmp_path.parent / "elsewhere.ipynb", root=tmp_path)
    assert outside["entry"] == ["elsewhere.ipynb"]  # never an absolute path


def test_provenance_takes_the_commit_passed_in_else_from_git(monkeypatch) -> None:
    commit = "%040x" % random.SystemRandom().getrandbits(160)
    monkeypatch.setattr(R, "_git", lambda *args: None)  # a copy without git history
    monkeypatch.delenv("MTP_GIT_COMMIT", raising=False)
    prov = R.provenance()
    assert prov["git_commit"] is None and prov["git_commit_from"] is None
    assert prov["source"]["files"]["mtp_lib/results.py"] == S.file_digest(R.repo_root() / "mtp_lib/results.py")
    monkeypatch.setenv("MTP_GIT_COMMIT", commit)
    monkeypatch.setenv("MTP_GIT_DIRTY", "1")
    prov = R.provenance()
    assert (prov["git_commit"], prov["git_dirty"], prov["git_commit_from"]) == (commit, True, "MTP_GIT_COMMIT")
    monkeypatch.setattr(R, "_git", lambda *args: commit[::-1] if args[0] == "rev-parse" else "")
    prov = R.provenance()  # a copy's own git may be a stale snapshot: the commit passed in wins
    assert (prov["git_commit"], prov["git_dirty"], prov["git_commit_from"]) == (commit, True, "MTP_GIT_COMMIT")
    monkeypatch.delenv("MTP_GIT_COMMIT")
    prov = R.provenance()
    assert (prov["git_commit"], prov["git_dirty"], prov["git_commit_from"]) == (commit[::-1], False, "git")


def test_a_loaded_result_knows_whether_its_source_is_current() -> None:
    value = random.SystemRandom().random()
    fresh = R.cached("src", {"v": value}, lambda: value, profile="unit")
    assert fresh.source_status.current and fresh.provenance["source"]["digest"]
    stored = json.loads(fresh.path.read_text())
    stored["provenance"]["source"]["files"]["mtp_lib/results.py"] = "0" * 16
    fresh.path.write_text(json.dumps(stored))
    loaded = R.cached("src", {"v": value}, lambda: 1 / 0, profile="unit")
    assert loaded.loaded and loaded.source_status.state == "stale"
    assert loaded.source_status.changed == ("mtp_lib/results.py",)
    del stored["provenance"]["source"]
    fresh.path.write_text(json.dumps(stored))
    assert R.cached("src", {"v": value}, lambda: 1 / 0, profile="unit").source_status.state == "not recorded"


def test_source_note_names_stale_and_unrecorded_results(tmp_path: Path) -> None:
    _checkout(tmp_path, random.Random(fresh_seed()))
    rec = S.source_record("chapters/c.ipynb", root=tmp_path)
    current = {"git_commit": None, "source": rec}
    old = {"git_commit": "f36b629ae316", "source": {**rec, "files": {**rec["files"], "mtp_lib/a.py": "x"}}}
    assert S.source_note([("a", current)], root=tmp_path) is None
    note = S.source_note([("a", current), ("b", old), ("c", {}), ("c", {})], root=tmp_path)
    assert note is not None and "<b>stale</b>" in note and "mtp_lib/a.py" in note and "f36b629a" in note
    assert "<b>source not recorded</b>" in note and "c &times;2" in note and "a," not in note


def test_missing_result_with_computing_off_says_how_to_compute_it(monkeypatch) -> None:
    R.cached("have", {"k": 1}, lambda: 1, profile="unit")
    monkeypatch.setenv("MTP_NO_COMPUTE", "Run the GPU command X.")
    assert R.cached("have", {"k": 1}, lambda: 1 / 0, profile="unit").loaded  # stored: loads
    with pytest.raises(R.MissingResultError, match=r"result want-[0-9a-f]{16}\.json of profile 'unit' is not "
                                                   r"stored .*\"k\": 2.*Run the GPU command X\."):
        R.cached("want", {"k": 2}, lambda: 1 / 0, profile="unit")
    with pytest.raises(R.MissingResultError, match="recomputing have was asked for"):
        R.cached("have", {"k": 1}, lambda: 1 / 0, profile="unit", recompute=True)


def test_results_elsewhere_still_read_the_committed_ones(tmp_path: Path, monkeypatch) -> None:
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    monkeypatch.setattr(R, "repo_root", lambda: checkout)
    monkeypatch.delenv("MTP_RESULTS_DIR")
    value = random.SystemRandom().random()
    committed = R.cached("r", {"k": 1}, lambda: value, profile="p")
    assert committed.path.parent == checkout / "data" / "results" / "p"
    monkeypatch.setenv("MTP_RESULTS_DIR", str(elsewhere))
    loaded = R.cached("r", {"k": 1}, lambda: 1 / 0, profile="p")
    assert loaded.loaded and loaded.value == value and loaded.path == committed.path
    redone = R.cached("r", {"k": 1}, lambda: value + 1, profile="p", recompute=True)
    assert redone.path.parent == elsewhere / "p" and R.cached("r", {"k": 1}, lambda: 0, profile="p").value == value + 1


def test_committed_results_hold_no_machine_paths() -> None:
    """Results are published: no absolute path of the machine that computed them."""
    pattern = re.compile(r"(/root/|/home/|/work/|/tmp/|/Users/|[A-Za-z]:\\\\)")
    files = [p for p in (R.repo_root() / "data" / "results").rglob("*") if p.is_file()]
    assert len(files) > 20
    offenders = {}
    for path in files:
        found = pattern.findall(path.read_text(errors="replace"))
        if found:
            offenders[str(path.relative_to(R.repo_root()))] = sorted(set(found))
    assert offenders == {}, f"absolute machine paths in committed results (redact them, say so in the file): {offenders}"
