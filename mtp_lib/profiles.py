"""The book's profiles: ``chapters/profiles/<name>.yaml``, and the parameters each chapter gets from one.

A profile YAML has a ``parameters`` mapping passed to every chapter that declares those names in its
``parameters`` cell, a ``chapters`` mapping of per-chapter values, and ``compute: cuda`` when its
results are computed on a GPU only. Values are checked against the type of each chapter's default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .results import repo_root

__all__ = ["Profile", "available_profiles", "chapter_parameters", "list_chapters", "load_profile", "profiles_dir"]


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
    compute: str = "any"  # "cuda": its results are computed on a GPU only


def load_profile(name: str, root: Path | None = None) -> Profile:
    """Read ``chapters/profiles/<name>.yaml``; an unknown name lists the available ones."""
    path = profiles_dir(root) / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available_profiles(root)) or 'none'}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"description", "parameters", "chapters", "compute"}
    if unknown:
        raise ValueError(f"{path.name}: unknown keys {sorted(unknown)}; allowed: description, parameters, chapters, "
                         "compute")
    chapters = data.get("chapters") or {}
    for chap, params in chapters.items():
        if not isinstance(params, dict):
            raise ValueError(f"{path.name}: chapters.{chap} must be a mapping of parameter names to values")
    compute = str(data.get("compute", "any"))
    if compute not in ("any", "cuda"):
        raise ValueError(f"{path.name}: compute={compute!r} must be 'any' or 'cuda' (results computed on a GPU only)")
    return Profile(name, str(data.get("description", "")), dict(data.get("parameters") or {}),
                   {k: dict(v or {}) for k, v in chapters.items()}, compute)


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
