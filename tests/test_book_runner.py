"""mtp_lib.book: profiles, parameter checks and failure reports (a throwaway book in tmp)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat as nbf
import pytest

from mtp_lib import book


def _notebook(path: Path, cells: list[tuple[str, str, list[str]]]) -> None:
    nb = nbf.v4.new_notebook()
    for kind, src, tags in cells:
        cell = nbf.v4.new_code_cell(src) if kind == "code" else nbf.v4.new_markdown_cell(src)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbf.write(nb, path)


@pytest.fixture
def toy_book(tmp_path: Path) -> Path:
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/a\n"
                                       "  - file: chapters/b\n  - file: chapters/c\n")
    (tmp_path / "intro.md").write_text("# Intro\n")
    _notebook(tmp_path / "chapters/a.ipynb", [
        ("markdown", "# A", []),
        ("code", "n = 2\nname = 'x'\ndevice = 'cpu'\nprofile = 'cpu'", ["parameters"]),
        ("code", "print('A', n * 10, name, device, profile)", []),
    ])
    _notebook(tmp_path / "chapters/b.ipynb", [
        ("markdown", "# B", []),
        ("code", "fail = False", ["parameters"]),
        ("code", "x = 1", []),
        ("code", "if fail:\n    raise ValueError('broken on purpose')", []),
    ])
    _notebook(tmp_path / "chapters/c.ipynb", [
        ("code", "profile = 'good'\nk = 1", ["parameters"]),
        ("code", "import os\nfrom mtp_lib.results import cached, results_dir\n"
                 "r = cached('toy', {'k': k}, lambda: k * 7, profile=profile)\n"
                 "s = cached('toy', {'k': k}, lambda: 0, profile=profile)\n"
                 "print('toy', r.value, r.loaded, s.loaded, results_dir(profile), os.environ.get('MTP_SOURCE'))", []),
    ])
    prof = tmp_path / "chapters" / "profiles"
    prof.mkdir()
    (prof / "good.yaml").write_text("description: ok\nparameters:\n  device: auto\nchapters:\n  a:\n    n: 5\n")
    (prof / "badparam.yaml").write_text("chapters:\n  a:\n    n_samples: 5\n")
    (prof / "badtype.yaml").write_text("chapters:\n  a:\n    n: five\n")
    (prof / "badchapter.yaml").write_text("chapters:\n  zz:\n    n: 1\n")
    (prof / "fails.yaml").write_text("chapters:\n  b:\n    fail: true\n")
    (prof / "gpuonly.yaml").write_text("compute: cuda\nchapters:\n  c:\n    k: 3\n")
    return tmp_path


def test_unknown_profile_lists_the_available_ones(toy_book: Path) -> None:
    with pytest.raises(ValueError, match="unknown profile 'nope'.*badparam.*good"):
        book.load_profile("nope", toy_book)
    with pytest.raises(ValueError, match="unknown profile"):
        book.load_profile("../x", toy_book)


def test_invalid_parameters_fail_before_anything_runs(toy_book: Path) -> None:
    with pytest.raises(ValueError, match=r"invalid parameter\(s\) \['n_samples'\] for chapter a.*declares"):
        book.run_chapters("badparam", root=toy_book)
    with pytest.raises(ValueError, match="n='five' for chapter a should be of the type of its default, 2"):
        book.run_chapters("badtype", root=toy_book)
    with pytest.raises(ValueError, match=r"chapters not in _toc.yml: \['zz'\]"):
        book.run_chapters("badchapter", root=toy_book)
    with pytest.raises(ValueError, match="unknown chapter"):
        book.run_chapters("good", ["nope"], root=toy_book)


def test_parameters_merge_profile_values_and_resolve_device(toy_book: Path) -> None:
    prof = book.load_profile("good", toy_book)
    params = book.chapter_parameters(prof, "chapters/a", toy_book / "chapters/a.ipynb")
    assert params["n"] == 5 and params["profile"] == "good" and params["device"] in ("cpu", "cuda")
    assert "fail" not in params


def test_run_injects_hides_and_reports_the_failing_cell(toy_book: Path) -> None:
    outs = book.run_chapters("good", ["a"], root=toy_book, progress=False)
    nb = json.loads(outs[0].read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0]["metadata"]["tags"]
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []))
    assert "A 50 x" in printed and "good" in printed
    with pytest.raises(book.ChapterError, match=r"chapter chapters/b failed in cell \d+.*ValueError: broken on purpose"):
        book.run_chapters("fails", root=toy_book, progress=False)


def test_the_book_profiles_are_valid_for_every_chapter() -> None:
    chapters = book.list_chapters()
    assert chapters and chapters[0] == "chapters/00_models_and_data"
    for name in book.available_profiles():
        prof = book.load_profile(name)
        assert {"tiny", "cpu", "gpu"} <= set(book.available_profiles())
        assert set(prof.chapters) <= {Path(c).name for c in chapters}, name
        for chapter in chapters:
            book.chapter_parameters(prof, chapter, book.repo_root() / f"{chapter}.ipynb")


def test_cli_reports_errors_without_traceback(capsys) -> None:
    assert book.main(["run", "--profile", "nope"]) == 1
    assert "error: unknown profile 'nope'" in capsys.readouterr().err


def _printed(notebook: Path) -> str:
    nb = json.loads(notebook.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))


@pytest.fixture
def results_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MTP_RESULTS_DIR", str(tmp_path / "results"))  # the kernels inherit it
    monkeypatch.delenv("MTP_NO_COMPUTE", raising=False)
    return tmp_path / "results"


def test_one_chapter_run_then_the_rest_from_the_cache(toy_book: Path, results_tmp: Path, capfd) -> None:
    stage = toy_book / "stage"
    book.run_chapters("good", ["c"], stage=stage, root=toy_book, progress=False)  # computes toy, k=1
    assert "toy 7 False True" in _printed(stage / "chapters/c.ipynb")
    assert "chapters/c.ipynb" in _printed(stage / "chapters/c.ipynb")  # the kernel knows its chapter
    assert "without encryption" not in capfd.readouterr().err  # the kernel talks over IPC, quietly
    (stage / "chapters/c.ipynb").unlink()
    book._fill_missing(stage, toy_book, None)  # what `build` does first: a, b and c from stored results
    assert "A 50 x" in _printed(stage / "chapters/a.ipynb") and "toy 7 True True" in _printed(stage / "chapters/c.ipynb")
    assert json.loads((stage / book.MANIFEST).read_text())["chapters/c"] == {"profile": "good"}
    assert "mtp-source-note" not in (stage / "chapters/c.ipynb").read_text()  # computed by this source
    stored = next(results_tmp.glob("good/toy-*.json"))
    record = json.loads(stored.read_text())
    del record["provenance"]["source"]  # as results stored before source digests existed
    stored.write_text(json.dumps(record))
    (stage / "chapters/c.ipynb").unlink()
    book._fill_missing(stage, toy_book, None)
    notes = [o for c in json.loads((stage / "chapters/c.ipynb").read_text())["cells"] for o in c.get("outputs", [])
             if "mtp-source-note" in "".join(o.get("data", {}).get("text/html", ""))]
    assert len(notes) == 1, "one note per cell, updated as the cell loads more results"
    assert "source not recorded" in "".join(notes[0]["data"]["text/html"])
    assert re.search(r"toy( \(commit [0-9a-f]{8}\))? &times;2", "".join(notes[0]["data"]["text/html"]))
    (stage / "chapters/c.ipynb").unlink()
    stored.unlink()
    with pytest.raises(book.ChapterError, match=r"chapter chapters/c failed.*MissingResultError: result toy-.* is "
                                                r"not stored.*`python -m mtp_lib.book run --profile good --chapter c`"):
        book._fill_missing(stage, toy_book, None)


def test_a_gpu_profile_without_a_gpu_says_how_to_compute(toy_book: Path, results_tmp: Path, monkeypatch) -> None:
    import torch

    import mtp_lib.models

    monkeypatch.setattr(mtp_lib.models, "resolve_device", lambda spec: torch.device("cpu"))
    with pytest.raises(book.ChapterError, match=r"The gpuonly profile's results are computed on a CUDA GPU.*"
                                                r"--profile gpuonly --chapter c`.*--compute-here"):
        book.run_chapters("gpuonly", ["c"], stage=toy_book / "stage", root=toy_book, progress=False)
    out = book.run_chapters("gpuonly", ["c"], stage=toy_book / "stage", root=toy_book, progress=False,
                            compute_here=True)
    assert "toy 21 False True" in _printed(out[0])


def test_cli_puts_stage_and_results_where_asked(toy_book: Path, results_tmp: Path, monkeypatch, tmp_path) -> None:
    import mtp_lib.profiles

    monkeypatch.setattr(book, "repo_root", lambda: toy_book)
    monkeypatch.setattr(mtp_lib.profiles, "repo_root", lambda: toy_book)
    stage, results = tmp_path / "out" / "my-stage", tmp_path / "out" / "my-results"
    assert book.main(["run", "--profile", "good", "--chapter", "c", "--no-progress", "--stage", str(stage),
                      "--results", str(results)]) == 0
    assert f"toy 7 False True {results / 'good'}" in _printed(stage / "chapters/c.ipynb")
    assert list((results / "good").glob("toy-*.json")) and not (toy_book / "_build").exists()
    monkeypatch.setenv("MTP_STAGE_DIR", str(stage))
    assert book.default_stage(toy_book) == stage


def test_the_default_profile_is_the_published_one() -> None:
    assert book.DEFAULT_PROFILE == "gpu" and book.load_profile("gpu").compute == "cuda"
    assert book._parser().parse_args(["run"]).profile == "gpu"
    makefile = (book.repo_root() / "Makefile").read_text()
    assert "PROFILE ?= gpu" in makefile


def test_readme_front_door_ci_and_publishing() -> None:
    import yaml

    root = book.repo_root()
    readme = (root / "README.md").read_text()
    assert len(readme.encode()) <= 6500, "the README is the front door: keep it short (benchmarks/README.md)"
    links = [x for x in re.findall(r"\]\(([^)\s]+)\)", readme) if not x.startswith(("http:", "https:", "#"))]
    assert links and all((root / x).exists() for x in links), links
    assert "make book" in readme and "make test" in readme
    assert "make test" in (root / ".ci" / "run").read_text()  # CI runs the README's test command
    flow = yaml.safe_load((root / ".github" / "workflows" / "book.yml").read_text())
    steps = [s for job in flow["jobs"].values() for s in job["steps"]]
    assert any("make book" in s.get("run", "") for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-pages-artifact") and s["with"]["path"] == "_build/html"
               for s in steps)
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in steps)
