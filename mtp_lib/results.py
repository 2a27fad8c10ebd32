"""Run-or-load cache for expensive results, keyed by their full configuration, with provenance.

Every expensive computation of the book goes through :func:`cached`::

    res = cached("fig1-marginal", {"model": "smollm2-135m", "top_p": 0.99, ...},
                 compute=lambda: run_analysis(...), profile="cpu", version=1)
    res.value        # what compute() returned (JSON round-tripped)
    res.provenance   # git commit, package versions, device, date, wall time

A result lives in one small JSON file ``data/results/<profile>/<name>-<key>.json``, where ``key`` hashes
the configuration together with ``version``, the code version of the analysis: bump it when the
analysis changes what it computes, and old results stop matching. Committed result files let anyone
rebuild the book without recomputing; ``recompute=True`` ignores them and overwrites.

Results are written to ``$MTP_RESULTS_DIR/<profile>`` when that is set (a folder outside the checkout),
and read from there first, then from the committed ``data/results/<profile>``. When
``$MTP_NO_COMPUTE`` holds a sentence (the book sets it for a GPU profile on a machine without a GPU),
a missing result raises :class:`MissingResultError` with that sentence instead of computing it.
The provenance's ``source`` (:mod:`mtp_lib.sources`) makes every result traceable to the code that
computed it, with or without git.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .sources import SourceStatus, announce, source_record, source_status

__all__ = ["CachedResult", "MissingResultError", "cached", "config_key", "provenance", "repo_root", "results_dir",
           "search_dirs", "stored_files",
           "to_jsonable"]

_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def repo_root() -> Path:
    """The checkout that holds this package (the folder above ``mtp_lib/``)."""
    return Path(__file__).resolve().parent.parent


def results_dir(profile: str) -> Path:
    """``$MTP_RESULTS_DIR/<profile>`` if set, else ``<repo>/data/results/<profile>``."""
    if not profile or not set(profile) <= _NAME_OK:
        raise ValueError(f"profile={profile!r} must be a non-empty name of lowercase letters, digits, '-', '_'")
    base = os.environ.get("MTP_RESULTS_DIR")
    return (Path(base) if base else repo_root() / "data" / "results") / profile


def search_dirs(profile: str) -> list[Path]:
    """Where a result is looked for: the results folder, then the committed one if that differs."""
    first, committed = results_dir(profile), repo_root() / "data" / "results" / profile
    return [first] if first.resolve() == committed.resolve() else [first, committed]


def _shown(path: Path) -> str:
    """A path as a message shows it: relative to the checkout when inside it."""
    try:
        return path.resolve().relative_to(repo_root()).as_posix()
    except ValueError:
        return str(path)


def stored_files(profile: str, pattern: str) -> list[Path]:
    """The files of ``profile`` whose names match ``pattern`` (a glob), one per name: the results
    folder's first, then the committed folder's (see :func:`results_dir`)."""
    found: dict[str, Path] = {}
    for folder in search_dirs(profile):
        for path in sorted(folder.glob(pattern)):
            found.setdefault(path.name, path)
    return list(found.values())


class MissingResultError(RuntimeError):
    """A result is not stored and computing it is off for this run ($MTP_NO_COMPUTE)."""


def to_jsonable(obj: Any) -> Any:
    """Tensors, arrays and numpy scalars to lists and numbers; dataclasses to dicts; NaN/inf kept as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Path):
        return obj.name
    raise TypeError(f"cannot store a {type(obj).__name__} in a result; return dicts, lists, numbers, strings or tensors")


def config_key(config: Mapping[str, Any], version: int) -> str:
    """A stable 16-hex-digit hash of the configuration and the analysis' code version."""
    canonical = json.dumps({"config": to_jsonable(config), "version": version}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _git(*args: str) -> str | None:
    root = repo_root()
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("mtp_lib", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_name(device: Any = None) -> str:
    """A human name for the device a result was computed on (GPU model, or CPU and core count)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (vendor specs).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_bf16_flops(device: str) -> float | None:
    """The dense bf16 peak of a known GPU named by :func:`device_name` (None for a CPU or an unlisted
    card: no MFU then)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)


def mfu(n_params: int, tokens_per_s: float, device: str) -> float | None:
    """Model FLOP utilization of training: 6 N tokens/s (forward and backward, N parameters) over the
    dense bf16 peak of ``device`` (a :func:`device_name`); None where the peak is unknown."""
    peak = peak_bf16_flops(device)
    return round(6 * n_params * tokens_per_s / peak, 4) if peak else None


def _commit() -> tuple[str | None, bool | None, str | None]:
    """The git commit (and whether the tree had changes) and where it came from: $MTP_GIT_COMMIT when
    it is set (a run on a copy of the checkout passes the commit in; the copy's own git, if it has
    one, may be a stale snapshot: seen on a GPU machine), else git."""
    passed = os.environ.get("MTP_GIT_COMMIT", "").strip()
    if passed:
        flag = os.environ.get("MTP_GIT_DIRTY", "").strip().lower()
        return passed, {"1": True, "true": True, "0": False, "false": False}.get(flag), "MTP_GIT_COMMIT"
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return commit, (bool(dirty) if dirty is not None else None), "git"
    return None, None, None


def provenance(*, device: Any = None, wall_time_s: float | None = None,
               source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Who computed a result: git commit, a digest of the source that ran, versions, device, date.

    The commit comes from git when the checkout has its history, else from ``$MTP_GIT_COMMIT`` (and
    ``$MTP_GIT_DIRTY``: 1 or 0), which a run on a machine without the history passes in. ``source``
    names the file that ran (a chapter or a script; default ``$MTP_SOURCE``, else the checkout's
    loaded scripts): see :func:`mtp_lib.sources.source_record`.
    """
    commit, dirty, origin = _commit()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "git_commit_from": origin,
        "source": source_record(source),
        "versions": _versions(),
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 3),
    }


@dataclasses.dataclass(frozen=True)
class CachedResult:
    """A value with its configuration, provenance and file; ``loaded`` says it came from the cache."""

    name: str
    config: dict[str, Any]
    value: Any
    provenance: dict[str, Any]
    path: Path
    loaded: bool

    @property
    def source_status(self) -> SourceStatus:
        """Whether the source that computed it is the current one (see :mod:`mtp_lib.sources`)."""
        return source_status(self.provenance)


def cached(name: str, config: Mapping[str, Any], compute: Callable[[], Any], *, profile: str, version: int = 1,
           recompute: bool = False, device: Any = None) -> CachedResult:
    """Load the result of ``compute`` for this configuration, or compute and store it.

    ``config`` must hold everything the result depends on (model, data, parameters); ``version`` is the
    analysis' code version. ``device`` (for provenance) is where ``compute`` runs. The stored value is
    the JSON form of what ``compute`` returns (see :func:`to_jsonable`), and the same form is returned
    on both paths, so code that reads a fresh result reads a loaded one the same way.
    """
    if not name or not set(name) <= _NAME_OK:
        raise ValueError(f"name={name!r} must be lowercase letters, digits, '-', '_' or '.'")
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping, got {type(config).__name__}")
    cfg = to_jsonable(config)
    key = config_key(cfg, version)
    file = f"{name}-{key}.json"
    found = [d / file for d in search_dirs(profile) if (d / file).is_file()]
    if found and not recompute:
        stored = json.loads(found[0].read_text())
        if stored.get("config") != cfg or stored.get("version") != version:
            raise RuntimeError(f"{file} does not hold the configuration it is named after; delete it")
        announce(name, stored["provenance"])
        return CachedResult(name, cfg, stored["result"], stored["provenance"], found[0], loaded=True)
    path = results_dir(profile) / file
    _refuse_if_no_compute(name, cfg, profile, file, recompute)
    start = time.perf_counter()
    value = to_jsonable(compute())
    prov = provenance(device=device, wall_time_s=time.perf_counter() - start)
    record = {"name": name, "version": version, "config": cfg, "provenance": prov, "result": value}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return CachedResult(name, cfg, value, prov, path, loaded=False)


def _refuse_if_no_compute(name: str, cfg: Mapping[str, Any], profile: str, file: str, recompute: bool) -> None:
    """Raise :class:`MissingResultError` when ``$MTP_NO_COMPUTE`` is set: say what is missing and how to fill it."""
    how = os.environ.get("MTP_NO_COMPUTE", "").strip()
    if not how:
        return
    shown = json.dumps(cfg, sort_keys=True)
    what = (f"recomputing {name} was asked for" if recompute else
            f"result {file} of profile {profile!r} is not stored (looked in "
            f"{' and '.join(_shown(d) for d in search_dirs(profile))})")
    raise MissingResultError(f"{what}; its configuration: {shown[:300]}{'...' if len(shown) > 300 else ''}. {how}")
