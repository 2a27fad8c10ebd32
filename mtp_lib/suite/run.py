"""The suite as cached results: the stream, each size's training, each size's analyses.

Three kinds of result, each its own file under ``data/results/<profile>/`` (so the suite can be
trained over several separate GPU runs, one size at a time):

- ``ch05-stream``: the stream's manifest (sources, licences, token counts, fingerprint);
- ``ch05-train-<size>``: the size's training record (sizes, tokens seen, losses, tokens/s, MFU);
- ``ch05-analysis-<size>``: Chapter 1's and 2's analyses of the final weights, and the 2nd-token
  accuracy along training from the log-spaced snapshots;
- ``ch05-tuned-<size>``: Chapter 2's tuned lens beside the logit lens on the final weights
  (:mod:`mtp_lib.suite.tuned`).

The stream, checkpoints and snapshots live outside the repository (``$MTP_CACHE_DIR/suite``); the
weights are not committed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mtp_lib import results
from mtp_lib.marginal_study import task_samples
from mtp_lib.suite import analysis, pretrain, shapes, tuned
from mtp_lib.suite.stream import Stream, StreamSpec, build_stream, load_stream

__all__ = ["SuiteResults", "SuiteSettings", "analyze_shard", "analyze_size", "load_suite", "stream_result", "suite_dir",
           "train_size", "tuned_size"]

VERSION = 1
TASKS = ("translation", "open-ended")


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """Every setting of the suite: Chapter 5's parameters, with the same defaults as its parameters cell
    (the cpu micro-suite); the profiles set the rest."""

    sizes: tuple[str, ...] = ("micro-32", "micro-64", "micro-128")
    sources: tuple[str, ...] = ("translation", "kjv", "brown", "austen", "shakespeare", "sentences", "gcide")
    vocab_size: int = 2048
    max_docs: int = 150
    stream_seed: int = 0
    steps: int = 120
    batch_size: int = 8
    seq_len: int = 128
    micro_batch: int = 0
    train_seed: int = 1234
    compile: bool = False
    n_samples: int = 6
    last_tokens: int = 20
    top_k: int = 5
    top_p: float = 0.99
    nucleus_top_p: tuple[float, ...] = (0.9,)
    along_training: bool = True
    along_samples: int = 2
    open_ended_tokens: int = 200
    tuned_lens: bool = True
    tuned_windows: int = 8
    tuned_steps: int = 100
    tuned_batch: int = 128
    tuned_lr: float = 1e-3
    profile: str = "cpu"
    compute: bool = True  # False: a missing result is an error that says how to compute it
    progress: bool = False

    def __post_init__(self) -> None:
        for size in self.sizes:
            shapes.shape(size)
        StreamSpec(tuple(self.sources), self.vocab_size, self.max_docs, self.stream_seed)

    @classmethod
    def from_profile(cls, profile: str, **overrides: Any) -> SuiteSettings:
        """The settings of ``chapters/profiles/<profile>.yaml`` for Chapter 5, then ``overrides``."""
        path = results.repo_root() / "chapters" / "profiles" / f"{profile}.yaml"
        if not path.is_file():
            raise ValueError(f"no profile {profile!r} ({path.name} is missing): choose tiny, cpu or gpu")
        values = (yaml.safe_load(path.read_text())["chapters"].get("05_size_suite") or {}) | overrides
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown suite settings {sorted(unknown)}: the settings are {sorted(fields)}")
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**(values | tuples | {"profile": profile}))

    @property
    def stream_spec(self) -> StreamSpec:
        return StreamSpec(tuple(self.sources), self.vocab_size, self.max_docs, self.stream_seed)

    def train_spec(self, size: str) -> pretrain.TrainSpec:
        return pretrain.TrainSpec(size=size, steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                                  seed=self.train_seed, micro_batch=self.micro_batch, compile=self.compile,
                                  checkpoint_every=max(50, self.steps // 10))


def suite_dir() -> Path:
    """Where streams, checkpoints and snapshots live: ``$MTP_SUITE_DIR`` or ``$MTP_CACHE_DIR/suite``."""
    if os.environ.get("MTP_SUITE_DIR"):
        return Path(os.environ["MTP_SUITE_DIR"])
    return Path(os.environ.get("MTP_CACHE_DIR", Path.home() / ".cache" / "mtp_lib")) / "suite"


def _cached(name: str, config: dict[str, Any], compute: Callable[[], Any], settings: SuiteSettings,
            how: str, device: Any = None, recompute: bool = False) -> results.CachedResult:
    def refuse() -> Any:
        raise results.MissingResultError(f"the {settings.profile} profile has no stored {name} result for this "
                                         f"configuration, and this run does not compute (compute=False). "
                                         f"Compute it with: {how}")

    return results.cached(name, config, compute if settings.compute else refuse, profile=settings.profile,
                          version=VERSION, device=device, recompute=recompute)


def _stream_folder(settings: SuiteSettings) -> Path:
    key = results.config_key(results.to_jsonable(dataclasses.asdict(settings.stream_spec)), VERSION)
    return suite_dir() / f"stream-{key}"


def stream_result(settings: SuiteSettings) -> results.CachedResult:
    """The stream's manifest (building the stream when it is not cached)."""
    def build() -> dict[str, Any]:
        return open_stream(settings).manifest

    return _cached("ch05-stream", dataclasses.asdict(settings.stream_spec), build, settings,
                   f"python -m mtp_lib.suite stream --profile {settings.profile}")


def open_stream(settings: SuiteSettings) -> Stream:
    """The built stream of these settings (built into :func:`suite_dir` the first time)."""
    folder = _stream_folder(settings)
    if (folder / "manifest.json").is_file():
        return load_stream(folder)
    return build_stream(settings.stream_spec, folder, downloads=suite_dir() / "downloads")


def _train_config(settings: SuiteSettings, size: str, fingerprint: str) -> dict[str, Any]:
    return {"data_fingerprint": fingerprint, "recipe": settings.train_spec(size).recipe()}


def run_folder(settings: SuiteSettings, size: str, fingerprint: str) -> Path:
    key = results.config_key(results.to_jsonable(_train_config(settings, size, fingerprint)), VERSION)
    return suite_dir() / "runs" / f"{size}-{key}"


def train_size(settings: SuiteSettings, size: str, *, fresh: bool = False, retrain: bool = False,
               stream: results.CachedResult | None = None) -> results.CachedResult:
    """``size`` trained on the stream (resuming a killed run from its checkpoint). ``retrain``: train
    even where the result is stored (its record is replaced), to bring back the weights, which are not
    committed, for an analysis or a lens. ``stream``: the stream's result where the caller has it."""
    manifest = (stream or stream_result(settings)).value
    fingerprint = manifest["fingerprint"]

    def train() -> dict[str, Any]:
        stream = open_stream(settings)
        eos = stream.tokenizer.eos_token_id
        return pretrain.pretrain(stream.tokens, stream.fingerprint, len(stream.tokenizer), settings.train_spec(size),
                                 run_folder(settings, size, fingerprint), eos_id=eos, fresh=fresh,
                                 progress=settings.progress)

    return _cached(f"ch05-train-{size}", _train_config(settings, size, fingerprint), train, settings,
                   f"python -m mtp_lib.suite train --profile {settings.profile} --size {size} (on a GPU for the "
                   "gpu profile)", recompute=retrain and not pretrain.snapshot_path(
                       run_folder(settings, size, fingerprint), settings.steps).is_file())  # weights here: no need


def _analysis_config(settings: SuiteSettings, size: str, fingerprint: str) -> dict[str, Any]:
    keys = ("n_samples", "last_tokens", "top_k", "top_p", "nucleus_top_p", "along_training", "along_samples",
            "open_ended_tokens")
    return _train_config(settings, size, fingerprint) | {k: getattr(settings, k) for k in keys}


def _weights(settings: SuiteSettings, size: str, fingerprint: str) -> tuple[Stream, Path, Any]:
    """The stream, the size's run folder (checkpoints, snapshots) and its model config."""
    stream = open_stream(settings)
    config = shapes.gpt_neox_config(size, len(stream.tokenizer), max_positions=max(2048, settings.seq_len),
                                    eos_id=stream.tokenizer.eos_token_id)
    folder = run_folder(settings, size, fingerprint)
    if not pretrain.snapshot_path(folder, settings.steps).is_file():
        raise FileNotFoundError(
            f"the weights of {size} are not in {folder} (weights are not committed; a training run keeps them "
            f"under $MTP_SUITE_DIR): train it again, with the same recipe, data and seed, with `python -m mtp_lib.suite "
            f"train --profile {settings.profile} --size {size} --retrain`, then rerun this command")
    return stream, folder, config


def _samples(settings: SuiteSettings, stream: Stream) -> dict[str, list[Any]]:
    return {t: task_samples(stream.tokenizer, t, settings.n_samples, open_ended_tokens=settings.open_ended_tokens)
            for t in TASKS}


def _part(folder: Path, name: str, weights: Path, compute: Callable[[], dict[str, Any]], dev: Any) -> dict[str, Any]:
    """``folder/name.json`` if an earlier (killed) run wrote it from these very ``weights`` (same file
    size and modification time), else ``compute()``, written there first."""
    import json

    import torch

    path = folder / f"{name}.json"
    stat = weights.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("weights") == stamp:
            return stored["value"]  # type: ignore[no-any-return]
    value = compute()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"weights": stamp, "value": results.to_jsonable(value)}))
    tmp.replace(path)
    return value


def _deal(costs: Sequence[float], count: int) -> list[int]:
    """Which of ``count`` shards gets each job: the costliest first, each to the least loaded shard."""
    loads, owner = [0.0] * count, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        owner[j] = min(range(count), key=lambda i: loads[i])
        loads[owner[j]] += costs[j]
    return owner


def _analysis_parts(settings: SuiteSettings, size: str, fingerprint: str, dev: Any,
                    shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The analysis of ``size`` in parts: the final weights' per task, then one per earlier snapshot,
    each kept beside the weights so that a killed analysis resumes. ``shard=(i, n)``: only the parts
    of shard ``i`` of ``n`` (dealt by their rough cost in samples), so that ``n`` processes share the card."""
    stream, folder, config = _weights(settings, size, fingerprint)
    samples = _samples(settings, stream)
    key = results.config_key(results.to_jsonable(_analysis_config(settings, size, fingerprint)), VERSION)
    parts = folder / f"analysis-{key}"

    @functools.lru_cache(maxsize=1)  # the final weights serve both tasks' parts: loaded once
    def load(step: int) -> Any:
        return pretrain.load_snapshot(folder, step, config).to(dev)

    def final(task: str) -> dict[str, Any]:
        model = load(settings.steps)
        return {"final": analysis.marginal_hits(model, samples[task], last=settings.last_tokens, k=settings.top_k,
                                                top_p=settings.top_p, nucleus_top_p=settings.nucleus_top_p),
                "lens": analysis.lens_kl(model, samples[task], last=settings.last_tokens)}

    def along(step: int) -> dict[str, Any]:
        model = load(step)
        return {t: analysis.marginal_hits(model, samples[t][:settings.along_samples], last=settings.last_tokens,
                                          k=settings.top_k, top_p=settings.top_p, nucleus_top_p=())
                for t in TASKS}

    steps = pretrain.snapshot_steps(settings.steps)[:-1] if settings.along_training else []
    # (part name, snapshot step, compute, rough cost: samples x passes, the final's nucleus and lens included)
    jobs = [(f"final-{t}", settings.steps, functools.partial(final, t), 3.0 * settings.n_samples) for t in TASKS]
    jobs += [(f"along-{s:06d}", s, functools.partial(along, s), 2.0 * settings.along_samples) for s in steps]
    mine = [j for j, owner in enumerate(_deal([job[3] for job in jobs], shard[1])) if owner == shard[0]]
    done = {jobs[j][0]: _part(parts, jobs[j][0], pretrain.snapshot_path(folder, jobs[j][1]), jobs[j][2], dev)
            for j in mine}
    finals = {t: done[f"final-{t}"] for t in TASKS if f"final-{t}" in done}
    out: dict[str, Any] = {"size": size, "device": results.device_name(dev)}
    if len(finals) == len(TASKS):  # (a shard may hold only some parts; the whole analysis holds them all)
        out |= {"final": {t: f["final"] for t, f in finals.items()}, "lens": {t: f["lens"] for t, f in finals.items()}}
    out["along"] = {str(s): done[f"along-{s:06d}"] for s in steps if f"along-{s:06d}" in done}
    return out


def analyze_size(settings: SuiteSettings, size: str, *, device: str = "auto",
                 trained: results.CachedResult | None = None) -> results.CachedResult:
    """Chapter 1's and 2's analyses of ``size`` (final weights), and along its training (each snapshot's
    analysis kept beside the weights, so that a killed analysis resumes). ``trained``: the size's
    training result where the caller has it."""
    from mtp_lib.models import resolve_device

    trained = trained or train_size(settings, size)
    fingerprint = trained.value["data_fingerprint"]
    dev = resolve_device(device)
    return _cached(f"ch05-analysis-{size}", _analysis_config(settings, size, fingerprint),
                   lambda: _analysis_parts(settings, size, fingerprint, dev), settings,
                   f"python -m mtp_lib.suite analyze --profile {settings.profile} --size {size}", device=dev)


def analyze_shard(settings: SuiteSettings, size: str, shard: tuple[int, int], *, device: str = "auto") -> None:
    """Compute (or find) shard ``shard = (i, n)`` of ``size``'s analysis parts, storing no result: run
    the ``n`` shards in parallel processes, then :func:`analyze_size`, which gathers the parts."""
    from mtp_lib.models import resolve_device

    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    fingerprint = train_size(settings, size).value["data_fingerprint"]
    _analysis_parts(settings, size, fingerprint, resolve_device(device), shard)


def _tuned_config(settings: SuiteSettings, size: str, fingerprint: str) -> dict[str, Any]:
    keys = ("n_samples", "last_tokens", "top_k", "tuned_windows", "tuned_steps", "tuned_batch", "tuned_lr")
    return _train_config(settings, size, fingerprint) | {k: getattr(settings, k) for k in keys} | {
        "task": "translation", "window_length": settings.seq_len}


def tuned_size(settings: SuiteSettings, size: str, *, device: str = "auto",
               trained: results.CachedResult | None = None) -> results.CachedResult:
    """Chapter 2's tuned lens beside the logit lens on ``size``'s final weights (translation positions).
    ``trained``: the size's training result where the caller has it."""
    from mtp_lib.models import resolve_device

    trained = trained or train_size(settings, size)
    fingerprint = trained.value["data_fingerprint"]
    dev = resolve_device(device)

    def compute() -> dict[str, Any]:
        stream, folder, config = _weights(settings, size, fingerprint)
        samples = task_samples(stream.tokenizer, "translation", settings.n_samples)
        model = pretrain.load_snapshot(folder, settings.steps, config).to(dev)
        return {"size": size, "device": results.device_name(dev), **tuned.tuned_lens_result(
            model, stream.tokens, samples, windows=settings.tuned_windows, length=settings.seq_len,
            last=settings.last_tokens, steps=settings.tuned_steps, batch=settings.tuned_batch, lr=settings.tuned_lr,
            seed=settings.train_seed, top_k=settings.top_k)}

    return _cached(f"ch05-tuned-{size}", _tuned_config(settings, size, fingerprint), compute, settings,
                   f"python -m mtp_lib.suite tuned --profile {settings.profile} --size {size}", device=dev)


@dataclasses.dataclass
class SuiteResults:
    """What the suite has for a chapter: the stream, and each size's training and analysis that exist
    (or were computed); ``missing`` says, per missing result, how to compute it."""

    stream: results.CachedResult
    trains: dict[str, results.CachedResult]
    analyses: dict[str, results.CachedResult]
    missing: list[str]
    tuned: dict[str, results.CachedResult] = dataclasses.field(default_factory=dict)

    @property
    def sizes(self) -> list[str]:
        """The sizes with both results, small to large."""
        done = [s for s in self.trains if s in self.analyses]
        return sorted(done, key=lambda s: self.trains[s].value["non_embedding_params"])

    def note(self) -> str:
        """Markdown: which results are missing and the commands that fill them ("" when none is)."""
        if not self.missing:
            return ""
        return (f"**{len(self.missing)} result(s) of this profile are not stored yet**; the figures below show "
                f"the sizes that are ({', '.join(self.sizes) or 'none'}):\n\n" + "\n".join(f"- {m}" for m in self.missing))


def load_suite(settings: SuiteSettings, *, device: str = "auto") -> SuiteResults:
    """The stream and every size's results: loaded, computed (``settings.compute``), or listed as missing."""
    stream = stream_result(settings)
    trains, analyses, lenses, missing = {}, {}, {}, []
    where = " (on a GPU)" if settings.profile == "gpu" else ""
    for size in settings.sizes:
        step = "train"
        try:
            trains[size] = train_size(settings, size, stream=stream)  # each result loaded once (one note each)
            step = "analyze"
            analyses[size] = analyze_size(settings, size, device=device, trained=trains[size])
            step = "tuned"
            if settings.tuned_lens:
                lenses[size] = tuned_size(settings, size, device=device, trained=trains[size])
        except results.MissingResultError:
            what = {"train": "training", "analyze": "analysis", "tuned": "tuned lens"}[step]
            missing.append(f"`{size}`: its {what} is not stored; compute it{where} with "
                           f"`python -m mtp_lib.suite {step} --profile {settings.profile} --size {size}`")
    return SuiteResults(stream, trains, analyses, missing, lenses)
