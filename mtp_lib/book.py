"""The book's command line: execute the chapters with a profile through papermill, build the HTML.

    python -m mtp_lib.book run [--profile gpu|cpu|tiny] [--chapter 01_marginalization ...] [--recompute]
    python -m mtp_lib.book build
    python -m mtp_lib.book profiles

``run`` executes each chapter listed in ``_toc.yml`` into a staging copy of the book (``_build/stage``,
or ``--stage`` / ``$MTP_STAGE_DIR``), with the parameters of the profile
(``chapters/profiles/<profile>.yaml``); ``build`` turns the stage into static HTML (``_build/html``, or
``--output``) with jupyter-book 1.x, strictly (warnings are errors), execution off. Chapters not
executed yet are executed by ``build`` from the stored results only (never computing): when a result
is missing, the error names the ``run`` command that computes it.

A profile YAML has a ``parameters`` mapping passed to every chapter that declares those names in
its ``parameters`` cell, a ``chapters`` mapping of per-chapter values, and ``compute: cuda`` when its
results are computed on a GPU only: on a machine without one its missing results are an error that
says how to compute them (``--compute-here`` computes them anyway). ``device: auto`` becomes
``cuda`` when a GPU is there, else ``cpu``. The default profile, ``gpu``, builds the published book
from the committed paper-scale results. Results are read from and written to ``data/results/<profile>``,
or ``--results DIR`` / ``$MTP_RESULTS_DIR`` (the committed results are still read).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .profiles import Profile, available_profiles, chapter_parameters, list_chapters, load_profile
from .results import repo_root

__all__ = ["DEFAULT_PROFILE", "ChapterError", "Profile", "available_profiles", "build_book", "chapter_parameters",
           "default_stage", "list_chapters", "load_profile", "main", "run_chapters"]

BOOK_FILES = ("_config.yml", "_toc.yml", "intro.md")
BOOK_DIRS = ("book_assets",)
DEFAULT_PROFILE = "gpu"
MANIFEST = ".mtp_book.json"  # in the stage: the profile each chapter was executed with


class ChapterError(RuntimeError):
    """A chapter failed; the message names the chapter and the failing cell."""


def _kernel_env() -> None:
    """Make the 'python3' kernel (whose spec runs plain ``python``) start this interpreter."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # the chapters import the mtp_lib of this checkout, whatever copy the environment has installed
    lib = str(repo_root())
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if paths[0] != lib:
        os.environ["PYTHONPATH"] = os.pathsep.join([lib, *filter(None, paths)])
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


def default_stage(root: Path | None = None) -> Path:
    """``$MTP_STAGE_DIR`` if set, else ``<book>/_build/stage``."""
    env = os.environ.get("MTP_STAGE_DIR")
    return Path(env).resolve() if env else (root or repo_root()) / "_build" / "stage"


def _select(profile: Profile, chapters: Sequence[str] | None, base: Path) -> list[str]:
    """The chapters to run, checked against ``_toc.yml`` (and the profile's chapter names)."""
    all_chapters = list_chapters(base)
    unknown_in_profile = sorted(set(profile.chapters) - {Path(c).name for c in all_chapters})
    if unknown_in_profile:
        raise ValueError(f"profile {profile.name!r} names chapters not in _toc.yml: {unknown_in_profile}")
    if not chapters:
        return all_chapters
    by_name = {Path(c).name: c for c in all_chapters}
    missing = [c for c in chapters if c not in by_name and c not in all_chapters]
    if missing:
        raise ValueError(f"unknown chapter(s) {missing}; the book has {sorted(by_name)}")
    return [by_name.get(c, c) for c in chapters]


def _no_compute_reason(profile: Profile, chapter: str, *, cache_only: bool, compute_here: bool) -> str:
    """The sentence a missing result raises with ($MTP_NO_COMPUTE), or '' when computing is allowed."""
    run = f"`python -m mtp_lib.book run --profile {profile.name} --chapter {Path(chapter).name}`"
    if cache_only:
        return f"The build executes chapters from stored results only: compute them with {run}, then build again."
    if profile.compute == "cuda" and not compute_here:
        from .models import resolve_device

        if resolve_device("auto").type != "cuda":
            return (f"The {profile.name} profile's results are computed on a CUDA GPU and this machine has none: "
                    f"run {run} on a GPU machine and commit the new files of data/results/{profile.name}/, or add "
                    f"--compute-here to compute them on this machine (slow).")
    return ""


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables (the kernel inherits them) for the duration; '' unsets one."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _kernel_manager() -> Any:
    """A kernel manager that talks to the kernel over IPC sockets (TCP elsewhere than POSIX).

    Over TCP, ipykernel warns on every start that its traffic is unencrypted; local sockets need no
    encryption and the warning does not belong in a book run.
    """
    from jupyter_client.manager import AsyncKernelManager

    if os.name != "posix":
        return AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"

    return IPCKernelManager


def _record(stage: Path, chapter: str, profile: str) -> None:
    manifest = _manifest(stage)
    manifest[chapter] = {"profile": profile}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _manifest(stage: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((stage / MANIFEST).read_text()))
    except (OSError, ValueError):
        return {}


def _shown(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def run_chapters(profile_name: str, chapters: Sequence[str] | None = None, *, recompute: bool = False,
                 stage: Path | None = None, root: Path | None = None, progress: bool = True,
                 compute_here: bool = False, cache_only: bool = False) -> list[Path]:
    """Execute chapters with a profile into the stage; returns the executed notebooks.

    ``cache_only`` (or a ``compute: cuda`` profile without a GPU, unless ``compute_here``) makes a
    missing result an error that names the command computing it, instead of computing it here.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    base = root or repo_root()
    profile = load_profile(profile_name, base)
    selected = _select(profile, chapters, base)
    stage = stage or default_stage(base)
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
        reason = _no_compute_reason(profile, chapter, cache_only=cache_only, compute_here=compute_here)
        try:
            with _env(MTP_SOURCE=f"{chapter}.ipynb", MTP_NO_COMPUTE=reason):
                papermill.execute_notebook(str(src), str(out), parameters=params, kernel_name="python3",
                                           progress_bar=progress, cwd=str(src.parent),
                                           kernel_manager_class=_kernel_manager())
        except PapermillExecutionError as err:
            raise ChapterError(
                f"chapter {chapter} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                f"{err.ename}: {err.evalue}\n  the executed notebook, with the traceback, is at {_shown(out, base)}"
            ) from None
        _hide_injected_cell(out)
        _record(stage, chapter, profile.name)
        print(f"    done in {time.perf_counter() - start:.1f} s", flush=True)
        outputs.append(out)
    return outputs


def _fill_missing(stage: Path, base: Path, profile: str | None) -> None:
    """Execute, from stored results only, the chapters the stage lacks (after ``run --chapter X``)."""
    missing = [c for c in list_chapters(base) if not (stage / f"{c}.ipynb").is_file()]
    used = [v.get("profile") for v in _manifest(stage).values() if isinstance(v, dict)]
    name = profile or (str(used[-1]) if used and used[-1] else DEFAULT_PROFILE)
    if missing:
        print(f"executing {len(missing)} chapter(s) not run yet, from the stored results of profile {name}: "
              f"{', '.join(Path(c).name for c in missing)}", flush=True)
        run_chapters(name, missing, stage=stage, root=base, progress=False, cache_only=True)
    profiles = {c: _manifest(stage).get(c, {}).get("profile", "?") for c in list_chapters(base)}
    if len(set(profiles.values())) > 1:
        print("note: the chapters come from different profiles: "
              + ", ".join(f"{Path(c).name} ({p})" for c, p in profiles.items()), flush=True)


def build_book(*, stage: Path | None = None, output: Path | None = None, root: Path | None = None,
               strict: bool = True, profile: str | None = None) -> Path:
    """Build static HTML from the stage with jupyter-book 1.x (execution off); returns the html folder.

    Chapters the stage lacks are executed first from stored results (``profile``: default the one
    the stage's chapters were run with, else the default profile).
    """
    from .assets import ensure_vendor_assets

    base = root or repo_root()
    stage = stage or default_stage(base)
    output = output or base / "_build" / "html"
    _fill_missing(stage, base, profile)
    ensure_vendor_assets(base)  # fetched once into the repo's (ignored) book_assets/vendor
    prepare_stage(stage, base)
    work = stage.with_name(stage.name + "-jb")
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(stage), "--path-output", str(work)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    print("building HTML:", " ".join(Path(c).name if os.sep in c else c for c in cmd), flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        sys.stderr.write(proc.stderr[-6000:])
        raise ChapterError(f"jupyter-book build failed (exit {proc.returncode}); see the output above")
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work / "_build" / "html"), str(output))
    print(f"HTML: {_shown(output, base)}/intro.html", flush=True)
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtp_lib.book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute chapters with a profile through papermill")
    run.add_argument("--profile", default=DEFAULT_PROFILE,
                     help=f"gpu, cpu or tiny (chapters/profiles/*.yaml; default {DEFAULT_PROFILE})")
    run.add_argument("--chapter", action="append", help="only this chapter (repeatable), e.g. 01_marginalization")
    run.add_argument("--recompute", action="store_true", help="ignore cached results and recompute them")
    run.add_argument("--compute-here", action="store_true",
                     help="compute the missing results of a GPU profile on this machine, without a GPU (slow)")
    run.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    build = sub.add_parser("build", help="build the HTML from the executed chapters (runs the missing ones from "
                                         "stored results)")
    build.add_argument("--profile", help="profile of the chapters not executed yet (default: the stage's)")
    build.add_argument("--output", type=Path, help="the HTML folder (default _build/html)")
    build.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    for p in (run, build):
        p.add_argument("--stage", type=Path, help="the executed chapters' folder (default $MTP_STAGE_DIR or "
                                                  "_build/stage)")
        p.add_argument("--results", type=Path, help="where results are written and read first (default "
                                                    "$MTP_RESULTS_DIR or data/results; one folder per profile)")
    sub.add_parser("profiles", help="list the profiles")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "results", None):
            os.environ["MTP_RESULTS_DIR"] = str(args.results.resolve())  # the kernels inherit it
        stage = args.stage.resolve() if getattr(args, "stage", None) else None
        if args.command == "run":
            run_chapters(args.profile, args.chapter, recompute=args.recompute, progress=not args.no_progress,
                         stage=stage, compute_here=args.compute_here)
        elif args.command == "build":
            build_book(strict=not args.no_strict, stage=stage, profile=args.profile,
                       output=args.output.resolve() if args.output else None)
        else:
            for name in available_profiles():
                print(f"{name}: {load_profile(name).description}")
    except (ChapterError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
