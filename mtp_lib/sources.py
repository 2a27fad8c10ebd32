"""Which source computed a result, and whether it is still the current source.

A result's provenance holds ``source``: a digest of every file of the library (``mtp_lib/**/*.py``)
and of the file that ran it (the chapter notebook, named by ``$MTP_SOURCE`` when the book runs it,
or the script), plus any other module of the checkout that was loaded (a benchmark imported by a
chapter). Each file's digest is the first 16 hex digits of the SHA-256 of its text; a notebook's
is taken over its code cells' sources only, so executing it (outputs) changes nothing. The
``digest`` of the whole is the SHA-256 of the sorted ``path digest`` lines.

:func:`source_status` compares a stored record with the files as they are now: ``current``,
``stale`` (names the files that changed) or ``not recorded`` (results stored before digests
existed). In a notebook kernel, :func:`announce` shows one small note per cell for the results it
loaded that are not current, so that a page never shows old numbers as if the code on the page
had computed them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["SourceStatus", "announce", "file_digest", "source_note", "source_record", "source_status"]

# Folders of a checkout that hold no source of its own (environments, builds, caches).
_NOT_SOURCE = {".venv", "venv", "_build", "build", "site-packages", "dist-packages", "__pycache__", ".git"}


def _root() -> Path:
    return Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=512)
def _digest_of(path: str, mtime_ns: int, size: int) -> str:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if path.endswith(".ipynb"):
        try:
            cells = json.loads(text).get("cells", [])
        except ValueError:
            cells = None
        if cells is not None:  # code cells only: outputs and metadata are not source
            text = "\n\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code"
                               and "injected-parameters" not in c.get("metadata", {}).get("tags", []))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str | None:
    """16 hex digits of a file's SHA-256 (a notebook's code cells only); None if it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _digest_of(str(path), st.st_mtime_ns, st.st_size)


def _relative(path: Path, root: Path) -> str | None:
    """``path`` relative to the checkout, or None when outside it or in no source folder."""
    try:
        rel = path.resolve().relative_to(root)
    except ValueError:
        return None
    return None if _NOT_SOURCE & set(rel.parts) else rel.as_posix()


def _library_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "mtp_lib").rglob("*.py")
                  if "__pycache__" not in p.parts)


def _entry_files(root: Path, entry: str | os.PathLike[str] | None) -> list[str]:
    """What ran besides the library: ``entry`` (or ``$MTP_SOURCE``) and the checkout's loaded modules."""
    named = entry if entry is not None else os.environ.get("MTP_SOURCE")
    out: list[str] = []
    if named:
        path = Path(named) if Path(named).is_absolute() else root / named
        rel = _relative(path, root)
        out.append(rel if rel is not None else Path(named).name)  # never an absolute path of this machine
    if not (root / "pyproject.toml").is_file():
        return out  # an installed copy (site-packages): the modules around it are not the checkout's
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py") and Path(file).is_absolute():  # (torch names a few modules relatively)
            rel = _relative(Path(file), root)
            if rel is not None and not rel.startswith("mtp_lib/"):
                out.append(rel)
    return sorted(set(out))


def source_record(entry: str | os.PathLike[str] | None = None, *, root: Path | None = None) -> dict[str, Any]:
    """The ``source`` entry of a provenance: the digest of every file that ran, and the whole's."""
    base = root or _root()
    entries = _entry_files(base, entry)
    files = {p: file_digest(base / p) for p in _library_files(base) + entries}
    lines = "\n".join(f"{p} {d}" for p, d in sorted(files.items()))
    return {"digest": hashlib.sha256(lines.encode()).hexdigest()[:16], "entry": entries, "files": files}


@dataclasses.dataclass(frozen=True)
class SourceStatus:
    """``state`` is ``current``, ``stale`` or ``not recorded``; ``changed`` the files that differ now."""

    state: str
    changed: tuple[str, ...] = ()
    commit: str | None = None

    @property
    def current(self) -> bool:
        return self.state == "current"


def source_status(provenance: Mapping[str, Any], *, root: Path | None = None) -> SourceStatus:
    """Compare the source a result recorded with the files as they are now.

    Stale when a recorded file changed or is gone, or a library file was added since.
    """
    base = root or _root()
    commit = provenance.get("git_commit")
    record = provenance.get("source")
    if not isinstance(record, Mapping) or not isinstance(record.get("files"), Mapping):
        return SourceStatus("not recorded", commit=commit)
    files: Mapping[str, Any] = record["files"]
    changed = [p for p, d in files.items() if file_digest(base / p) != d]
    changed += [p for p in _library_files(base) if p not in files]
    return SourceStatus("stale" if changed else "current", tuple(sorted(changed)), commit)


def _describe(name: str, status: SourceStatus) -> str:
    commit = f", commit {status.commit[:8]}" if status.commit else ""
    if status.state == "stale":
        shown = ", ".join(status.changed[:4]) + (f" and {len(status.changed) - 4} more" if len(status.changed) > 4 else "")
        return f"{name} (changed since{commit}: {shown})"
    return f"{name}{f' ({commit[2:]})' if commit else ''}"


def source_note(results: Iterable[tuple[str, Mapping[str, Any]]], *, root: Path | None = None) -> str | None:
    """A small HTML note for the (name, provenance) pairs whose source is not current; None if all are."""
    groups: dict[str, dict[str, int]] = {"stale": {}, "not recorded": {}}
    for name, prov in results:
        status = source_status(prov, root=root)
        if not status.current:
            label = _describe(name, status)
            groups[status.state][label] = groups[status.state].get(label, 0) + 1
    parts = []
    for state, text in (("stale", "were computed by source that differs from the current one, so the figures "
                                  "and tables drawn from them may not match the code on this page"),
                        ("not recorded", "carry no digest of the source that computed them, so the figures and "
                                         "tables drawn from them cannot be checked against this page's code")):
        if groups[state]:
            names = ", ".join(html.escape(k) + (f" &times;{n}" if n > 1 else "") for k, n in groups[state].items())
            parts.append(f"<b>{'stale' if state == 'stale' else 'source not recorded'}</b>: "
                         f"these stored results {text}: {names}.")
    if not parts:
        return None
    return ("<div class='mtp-source-note' style='font-size:85%;color:#8a5300;border-left:3px solid #e0a040;"
            "padding:2px 8px;margin:4px 0'>" + "<br>".join(parts) + "</div>")


_CELL_NOTES: dict[str, Any] = {"cell": None, "handle": None, "items": []}


def announce(name: str, provenance: Mapping[str, Any]) -> None:
    """In a notebook kernel, add this result to the cell's note if its source is not current.

    One note per cell, updated in place as the cell loads more results; nothing outside a kernel.
    """
    shell = _kernel_shell()
    if shell is None or source_status(provenance).current:
        return
    from IPython.display import HTML, display

    if _CELL_NOTES["cell"] != shell.execution_count or _CELL_NOTES["handle"] is None:
        _CELL_NOTES.update(cell=shell.execution_count, handle=None, items=[])
    _CELL_NOTES["items"].append((name, dict(provenance)))
    note = HTML(source_note(_CELL_NOTES["items"]) or "")
    if _CELL_NOTES["handle"] is None:
        _CELL_NOTES["handle"] = display(note, display_id=True)
    else:
        _CELL_NOTES["handle"].update(note)


def _kernel_shell() -> Any:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None
