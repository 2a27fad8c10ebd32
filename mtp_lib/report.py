"""Differences with intervals, and the claim verdicts every chapter draws from them, worded once.

A claim of the paper becomes a number with a direction: "the 2nd token is harder than the next"
is ``accuracy(2nd) - accuracy(next) < 0``. The chapters estimate that number with a 95% interval
and :func:`verdict` turns it into one of three words, the same way everywhere:

- **supported**: the whole interval lies on the claimed side of the threshold;
- **contradicted**: the whole interval lies on the other side;
- **not resolved**: the interval holds the threshold, or there is no interval (a single sample, or
  fewer samples than the chapter asks for before it judges).

Intervals, like everywhere in the book, are cluster bootstraps over samples (:mod:`mtp_lib.metrics`):

- :func:`paired_difference` when both numbers are measured on the *same* positions (two top-p on
  the same targets, two training recipes on the same evaluated tokens): the per-position difference
  ``a_i - b_i`` is averaged and samples are resampled, which keeps each sample's pairs together;
- :func:`difference_with_ci` when they come from different samples (translation against
  open-ended text): each side's samples are resampled on their own, and the interval is that of
  ``mean(a) - mean(b)``; with ``paired=True`` when both sides measure the same samples at positions
  of their own (two decoders' steps on one prompt): one draw of samples serves both sides.

A value read off one of the paper's plots, on another dataset and tokenizer, is no test of ours:
:func:`paper_context` words it as context, with its reading error beside our interval, and draws
no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from mtp_lib.metrics import Interval, _as_values, _check_level, _group_keys, _group_sums, mean_with_ci
from mtp_lib.results import CachedResult

__all__ = [
    "CONTRADICTED",
    "NOT_RESOLVED",
    "SUPPORTED",
    "Verdict",
    "ci_text",
    "difference_with_ci",
    "paired_difference",
    "paper_context",
    "quiet_libraries",
    "run_settings",
    "verdict",
]

SUPPORTED, CONTRADICTED, NOT_RESOLVED = "supported", "contradicted", "not resolved"
Direction = Literal["greater", "less"]
Groups = Sequence[Hashable] | torch.Tensor | None


class Verdict(NamedTuple):
    """A claim's verdict: ``label`` is one of supported / contradicted / not resolved; ``text`` gives
    the estimate, its interval and the label (e.g. ``"-0.310 [-0.400, -0.220]: supported"``);
    ``reason`` says why a claim is not resolved (empty otherwise)."""

    label: str
    estimate: Interval
    text: str
    reason: str = ""


def ci_text(ci: Interval | Sequence[float], digits: int = 2, *, signed: bool = False) -> str:
    """``"0.45 [0.40, 0.50]"``; the mean alone when the interval has NaN bounds (no interval).

    ``signed`` writes the sign of every number (``+0.03 [-0.01, +0.07]``), for differences.
    """
    mean, lo, hi = (float(x) for x in ci)
    spec = f"{'+' if signed else ''}.{int(digits)}f"
    if math.isnan(lo) or math.isnan(hi):
        return format(mean, spec)
    return f"{format(mean, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def verdict(estimate: Interval | Sequence[float], *, direction: Direction = "greater", threshold: float = 0.0,
            samples: int | None = None, min_samples: int = 2, digits: int = 3, signed: bool = True) -> Verdict:
    """Whether an estimate with its interval supports the claim ``estimate > threshold`` (``direction=
    "greater"``) or ``estimate < threshold`` (``"less"``).

    ``samples`` (how many samples the interval rests on) below ``min_samples`` gives "not resolved"
    whatever the interval says: a bootstrap over a handful of samples is only their spread.
    """
    if direction not in ("greater", "less"):
        raise ValueError(f"direction={direction!r} must be 'greater' (claim: estimate > threshold) or 'less'")
    ci = Interval(*(float(x) for x in estimate))
    if not math.isnan(ci.lo) and not math.isnan(ci.hi) and ci.lo > ci.hi:
        raise ValueError(f"the interval's bounds are reversed: lo={ci.lo} > hi={ci.hi}")
    number = ci_text(ci, digits, signed=signed)
    if math.isnan(ci.lo) or math.isnan(ci.hi):
        return Verdict(NOT_RESOLVED, ci, f"{number}: {NOT_RESOLVED} (no interval: a single sample)",
                       "no interval: a single sample")
    if samples is not None and samples < min_samples:
        reason = f"{samples} samples, fewer than the {min_samples} a verdict needs"
        return Verdict(NOT_RESOLVED, ci, f"{number}: {NOT_RESOLVED} ({reason})", reason)
    above, below = ci.lo > threshold, ci.hi < threshold
    if not (above or below):
        reason = f"the interval holds {threshold:g}"
        return Verdict(NOT_RESOLVED, ci, f"{number}: {NOT_RESOLVED}", reason)
    label = SUPPORTED if above == (direction == "greater") else CONTRADICTED
    return Verdict(label, ci, f"{number}: {label}")


def paired_difference(a: Any, b: Any, *, groups: Groups = None, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> Interval:
    """Mean of ``a - b`` over pairs measured on the same positions, with a bootstrap interval.

    ``a[i]`` and ``b[i]`` belong to the same position (e.g. a hit at top-0.9 and at top-0.99 on one
    target); ``groups[i]`` names its sample, and whole samples are resampled (cluster bootstrap,
    :func:`mtp_lib.metrics.mean_with_ci`). NaN bounds with fewer than two samples.
    """
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a paired difference needs one b per a: got {len(x)} values in a and {len(y)} in b")
    return mean_with_ci(x - y, groups=groups, level=level, n_boot=n_boot, seed=seed)


def difference_with_ci(a: Any, b: Any, *, groups_a: Groups = None, groups_b: Groups = None, paired: bool = False,
                       level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` for values from different samples, with a bootstrap interval.

    Each side's groups (samples; values one by one when None) are resampled independently and the
    difference of the pooled means recomputed; percentile interval. NaN bounds when either side has
    fewer than two groups. ``paired``: both sides' groups name the same samples, each side with its
    own values in each (two decoders' steps on the same prompts), and one draw of samples serves
    both sides.
    """
    level = _check_level(level)
    x, y = _as_values(a, "a"), _as_values(b, "b")
    mean = float(x.mean() - y.mean())
    order = None
    if paired:
        keys_a, keys_b = (list(dict.fromkeys([] if g is None else _group_keys(g))) for g in (groups_a, groups_b))
        if not keys_a or set(keys_a) != set(keys_b):
            raise ValueError("a paired difference needs groups on both sides that name the same samples")
        order = keys_a
    sums_a, counts_a = _group_sums(x, groups_a, order)
    sums_b, counts_b = _group_sums(y, groups_b, order)
    if len(sums_a) < 2 or len(sums_b) < 2:
        return Interval(mean, math.nan, math.nan)
    gen = torch.Generator().manual_seed(seed)
    ia = torch.randint(len(sums_a), (n_boot, len(sums_a)), generator=gen)
    ib = ia if paired else torch.randint(len(sums_b), (n_boot, len(sums_b)), generator=gen)
    boot = sums_a[ia].sum(1) / counts_a[ia].sum(1) - sums_b[ib].sum(1) / counts_b[ib].sum(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boot, q).tolist()
    return Interval(mean, lo, hi)


def paper_context(ours: Interval | Sequence[float], paper: float | None, *, reading_error: float = 0.01,
                  digits: int = 2, label: str = "the paper") -> str:
    """Our estimate beside a value read off one of the paper's plots, worded as context, not a test.

    ``"0.45 [0.40, 0.50] (the paper: 0.52 ± 0.01)"``; ours alone when ``paper`` is None (outside
    the paper's range).
    """
    text = ci_text(Interval(*(float(x) for x in ours)), digits)
    if paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return text
    return f"{text} ({label}: {paper:.{digits}f} ± {reading_error:.{digits}f})"



def _joined(values: Iterable[Any]) -> str:
    return ", ".join(sorted({str(v) for v in values if v})) or "?"


def run_settings(profile: str, results: Iterable[CachedResult], *, models: Sequence[str], details: str = "") -> str:
    """The chapter's "Run settings" line, naming where its results were computed: device, dtype and
    library versions from the results' provenance (not the machine rendering the page), and whether
    they were loaded from the stored results or computed in this run."""
    results = list(results)
    if not results:
        raise ValueError("run_settings needs the chapter's results (CachedResult objects from mtp_lib.results.cached)")
    versions = [r.provenance.get("versions") or {} for r in results]
    loaded = {r.loaded for r in results}
    how = ("loaded from the stored results" if loaded == {True} else "computed in this run" if loaded == {False}
           else "partly loaded, partly computed in this run")
    dtype = _joined(r.config.get("dtype") for r in results)  # results whose config names no dtype: said in details
    line = (f"**Run settings.** profile `{profile}`; results computed on {_joined(r.provenance.get('device') for r in results)}"
            + (f" ({dtype})" if dtype != "?" else "") + f", torch {_joined(v.get('torch') for v in versions)}, "
            f"transformers {_joined(v.get('transformers') for v in versions)}; {how}; models: "
            + ", ".join(f"`{m}`" for m in models))
    return line + (f"; {details}" if details else "") + "."


def quiet_libraries() -> None:
    """Keep library notices out of the rendered pages: transformers' advisory warnings (e.g. its
    ``clean_up_tokenization_spaces`` notice on every decode) and progress bars, including the one of the
    one-time GGUF conversion, which transformers draws with its own tqdm. Errors still show."""
    import functools
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=".*clean_up_tokenization.*")
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # (a transformers without GGUF support draws no such bar)
        return
    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
