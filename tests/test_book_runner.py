"""mtp_lib.book: profiles, parameter checks and failure reports (a throwaway book in tmp)."""

from __future__ import annotations

import json
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
                                       "  - file: chapters/b\n")
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
    prof = tmp_path / "chapters" / "profiles"
    prof.mkdir()
    (prof / "good.yaml").write_text("description: ok\nparameters:\n  device: auto\nchapters:\n  a:\n    n: 5\n")
    (prof / "badparam.yaml").write_text("chapters:\n  a:\n    n_samples: 5\n")
    (prof / "badtype.yaml").write_text("chapters:\n  a:\n    n: five\n")
    (prof / "badchapter.yaml").write_text("chapters:\n  zz:\n    n: 1\n")
    (prof / "fails.yaml").write_text("chapters:\n  b:\n    fail: true\n")
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
