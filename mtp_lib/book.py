"""The book's command line: execute the chapters with a profile through papermill, build the HTML.

    python -m mtp_lib.book run --profile cpu [--chapter 01_marginalization ...] [--recompute]
    python -m mtp_lib.book build
    python -m mtp_lib.book profiles

``run`` executes each chapter listed in ``_toc.yml`` into a staging copy of the book (``_build/stage``),
with the parameters of the profile (``chapters/profiles/<profile>.yaml``); ``build`` turns the stage
into static HTML (``_build/html``) with jupyter-book 1.x, strictly (warnings are errors), execution
off. A profile YAML has a ``parameters`` mapping passed to every chapter that declares those names in
its ``parameters`` cell, and a ``chapters`` mapping of per-chapter values. ``device: auto`` becomes
``cuda`` when a GPU is there, else ``cpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .results import repo_root

__all__ = ["ChapterError", "Profile", "build_book", "chapter_parameters", "list_chapters", "load_profile",
           "main", "run_chapters"]

BOOK_FILES = ("_config.yml", "_toc.yml", "intro.md")
BOOK_DIRS = ("book_assets",)


class ChapterError(RuntimeError):
    """A chapter failed; the message names the chapter and the failing cell."""


def profiles_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "chapters" / "profiles"


def available_profiles(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in profiles_dir(root).glob("*.yaml"))


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    parameters: dict[str, Any]
    chapters: dict[str, dict[str, Any]]


def load_profile(name: str, root: Path | None = None) -> Profile:
    """Read ``chapters/profiles/<name>.yaml``; an unknown name lists the available ones."""
    path = profiles_dir(root) / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available_profiles(root)) or 'none'}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"description", "parameters", "chapters"}
    if unknown:
        raise ValueError(f"{path.name}: unknown keys {sorted(unknown)}; allowed: description, parameters, chapters")
    chapters = data.get("chapters") or {}
    for chap, params in chapters.items():
        if not isinstance(params, dict):
            raise ValueError(f"{path.name}: chapters.{chap} must be a mapping of parameter names to values")
    return Profile(name, str(data.get("description", "")), dict(data.get("parameters") or {}),
                   {k: dict(v or {}) for k, v in chapters.items()})


def list_chapters(root: Path | None = None) -> list[str]:
    """The notebook chapters of ``_toc.yml``, in order, as paths relative to the book root without suffix."""
    toc = yaml.safe_load(((root or repo_root()) / "_toc.yml").read_text())
    files: list[str] = []

    def walk(entries: Any) -> None:
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("chapters", "sections"):
                walk(entry.get(key))
            for part in entry.get("parts", []) or []:
                walk(part.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []) or []:
        walk(part.get("chapters"))
    base = root or repo_root()
    return [f for f in files if (base / f"{f}.ipynb").is_file()]


def _declared_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    import papermill

    return papermill.inspect_notebook(str(notebook))


def _type_ok(value: Any, default: str | None) -> bool:
    """Whether ``value`` fits the type of the chapter's default (read from the parameters cell)."""
    import ast

    try:
        ref = ast.literal_eval(default) if default is not None else None
    except (ValueError, SyntaxError):
        return True  # an expression we cannot judge
    if ref is None:
        return True
    if isinstance(ref, bool) or isinstance(value, bool):
        return isinstance(ref, bool) and isinstance(value, bool)
    if isinstance(ref, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(ref))


def chapter_parameters(profile: Profile, chapter: str, notebook: Path, *, recompute: bool = False) -> dict[str, Any]:
    """The parameters one chapter gets from a profile, checked against its ``parameters`` cell."""
    declared = _declared_parameters(notebook)
    stem = Path(chapter).name
    specific = profile.chapters.get(stem, {})
    if specific and not declared:
        raise ValueError(f"profile {profile.name!r} sets {sorted(specific)} for {stem}, which has no parameters cell")
    bad = sorted(set(specific) - set(declared))
    if bad:
        raise ValueError(f"profile {profile.name!r}: invalid parameter(s) {bad} for chapter {stem}; "
                         f"its parameters cell declares {sorted(declared)}")
    params = {k: v for k, v in profile.parameters.items() if k in declared}
    params.update(specific)
    if "recompute" in declared and recompute:
        params["recompute"] = True
    if "profile" in declared:
        params["profile"] = profile.name
    if params.get("device") == "auto":
        from .models import resolve_device

        params["device"] = resolve_device("auto").type
    for key, value in params.items():
        default = declared[key].get("default")
        if not _type_ok(value, default):
            raise ValueError(f"profile {profile.name!r}: parameter {key}={value!r} for chapter {stem} should be "
                             f"of the type of its default, {default}")
    return params


def _kernel_env() -> None:
    """Make the 'python3' kernel (whose spec runs plain ``python``) start this interpreter."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # Busy-waiting OpenMP threads slow torch down badly on a machine with few, shared cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")


def _hide_injected_cell(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in nb.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell["metadata"]["tags"] = [*tags, "remove-cell"]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def prepare_stage(stage: Path, root: Path | None = None) -> None:
    """Copy the book's non-notebook sources into the stage (notebooks arrive executed)."""
    base = root or repo_root()
    stage.mkdir(parents=True, exist_ok=True)
    for name in BOOK_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, stage / name)
    for name in BOOK_DIRS:
        if (base / name).is_dir():
            shutil.copytree(base / name, stage / name, dirs_exist_ok=True)
    for md in base.glob("chapters/*.md"):
        (stage / "chapters").mkdir(exist_ok=True)
        shutil.copy2(md, stage / "chapters" / md.name)


def run_chapters(profile_name: str, chapters: Sequence[str] | None = None, *, recompute: bool = False,
                 stage: Path | None = None, root: Path | None = None, progress: bool = True) -> list[Path]:
    """Execute chapters with a profile into the stage; returns the executed notebooks."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    base = root or repo_root()
    profile = load_profile(profile_name, base)
    all_chapters = list_chapters(base)
    unknown_in_profile = sorted(set(profile.chapters) - {Path(c).name for c in all_chapters})
    if unknown_in_profile:
        raise ValueError(f"profile {profile.name!r} names chapters not in _toc.yml: {unknown_in_profile}")
    if chapters:
        by_name = {Path(c).name: c for c in all_chapters}
        missing = [c for c in chapters if c not in by_name and c not in all_chapters]
        if missing:
            raise ValueError(f"unknown chapter(s) {missing}; the book has {sorted(by_name)}")
        selected = [by_name.get(c, c) for c in chapters]
    else:
        selected = all_chapters
    stage = stage or base / "_build" / "stage"
    prepare_stage(stage, base)
    _kernel_env()
    # check every chapter's parameters before running any: a bad profile fails in seconds
    plans = [(c, chapter_parameters(profile, c, base / f"{c}.ipynb", recompute=recompute)) for c in selected]
    outputs = []
    for i, (chapter, params) in enumerate(plans, 1):
        src, out = base / f"{chapter}.ipynb", stage / f"{chapter}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        print(f"[{i}/{len(plans)}] {chapter} (profile {profile.name}: {shown})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(src), str(out), parameters=params, kernel_name="python3",
                                       progress_bar=progress, cwd=str(src.parent))
        except PapermillExecutionError as err:
            raise ChapterError(
                f"chapter {chapter} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                f"{err.ename}: {err.evalue}\n  the executed notebook, with the traceback, is at "
                f"{out.relative_to(base) if out.is_relative_to(base) else out}"
            ) from None
        _hide_injected_cell(out)
        print(f"    done in {time.perf_counter() - start:.1f} s", flush=True)
        outputs.append(out)
    return outputs


def build_book(*, stage: Path | None = None, output: Path | None = None, root: Path | None = None,
               strict: bool = True) -> Path:
    """Build static HTML from the stage with jupyter-book 1.x (execution off); returns the html folder."""
    from .assets import ensure_vendor_assets

    base = root or repo_root()
    stage = stage or base / "_build" / "stage"
    output = output or base / "_build" / "html"
    missing = [c for c in list_chapters(base) if not (stage / f"{c}.ipynb").is_file()]
    if missing:
        raise ChapterError(f"chapters not executed yet: {missing}; run `python -m mtp_lib.book run --profile ...` first")
    ensure_vendor_assets(base)  # fetched once into the repo's (ignored) book_assets/vendor
    prepare_stage(stage, base)
    work = stage.parent / "jb"
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(stage), "--path-output", str(work)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    print("building HTML:", " ".join(Path(c).name if os.sep in c else c for c in cmd), flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        sys.stderr.write(proc.stderr[-6000:])
        raise ChapterError(f"jupyter-book build failed (exit {proc.returncode}); see the output above")
    built = work / "_build" / "html"
    if output.exists():
        shutil.rmtree(output)
    shutil.move(str(built), str(output))
    print(f"HTML: {output.relative_to(base) if output.is_relative_to(base) else output}/intro.html", flush=True)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp_lib.book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute chapters with a profile through papermill")
    run.add_argument("--profile", default="cpu", help="tiny, cpu or gpu (chapters/profiles/*.yaml)")
    run.add_argument("--chapter", action="append", help="only this chapter (repeatable), e.g. 01_marginalization")
    run.add_argument("--recompute", action="store_true", help="ignore cached results and recompute them")
    run.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    build = sub.add_parser("build", help="build the HTML from the executed chapters")
    build.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    sub.add_parser("profiles", help="list the profiles")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run_chapters(args.profile, args.chapter, recompute=args.recompute, progress=not args.no_progress)
        elif args.command == "build":
            build_book(strict=not args.no_strict)
        else:
            for name in available_profiles():
                print(f"{name}: {load_profile(name).description}")
    except (ChapterError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
